//! The relay's incremental PROXY header framing (`crates/relay/src/proxy_header.rs`), as
//! its load-balancer listeners read it from a peer whose bytes arrive in any segments.
//!
//! The first input byte is the segment size (0 means 1), the rest is the stream. Asserts:
//! * a complete header never claims more bytes than were given;
//! * prefix stability: once some prefix of the stream parses as a complete header, every
//!   longer prefix gives the same header and length, and no shorter prefix is an error
//!   (a slow sender of a valid header is never refused); a stream that is refused or still
//!   incomplete has no prefix that is complete;
//! * `read_header` on the segmented stream (limit 4096, as the listener) agrees with
//!   `parse` on the whole stream, and the bytes it returns after the header are exactly
//!   the ones that followed it;
//! * `signature` says `Yes` for every stream that starts with a complete header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_fuzz::{block_on, Segments};
use postern_relay::proxy_header::{parse, read_header, Parsed, ProxyHeaderError, Signature};

/// What the relay's listener passes to `read_header`.
const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&seg, stream)) = data.split_first() else {
        return;
    };
    let stream = &stream[..stream.len().min(2 * MAX)];
    let whole = parse(stream);
    if let Ok(Parsed::Complete(_, len)) = &whole {
        assert!(*len <= stream.len());
        assert_eq!(
            postern_relay::proxy_header::signature(stream),
            Signature::Yes
        );
    }

    // Prefixes (up to the first 700 bytes: headers are at most a few hundred).
    let mut complete: Option<Parsed> = None;
    for cut in 0..=stream.len().min(700) {
        let p = parse(&stream[..cut]);
        match (&complete, p) {
            (Some(c), Ok(p)) => assert_eq!(&p, c, "longer prefix {cut} changed the header"),
            (Some(c), Err(e)) => panic!("prefix {cut} refused ({e}) after complete {c:?}"),
            (None, Ok(Parsed::Complete(a, len))) => complete = Some(Parsed::Complete(a, len)),
            (None, Ok(Parsed::Incomplete)) => {}
            (None, Err(e)) => {
                assert!(
                    whole.is_err(),
                    "prefix {cut} refused ({e}) but the whole stream is {whole:?}"
                );
                break;
            }
        }
    }
    if let Some(c) = &complete {
        assert_eq!(whole.as_ref().ok(), Some(c), "whole stream vs its prefix");
    }

    let mut reader = Segments::new(stream, &[seg]);
    let read = block_on(read_header(&mut reader, MAX));
    match (&whole, read) {
        (Ok(Parsed::Complete(a, len)), Ok((got, rest))) => {
            assert_eq!(&got, a);
            assert!(stream[*len..].starts_with(&rest), "bytes after the header");
        }
        (Err(_), Err(ProxyHeaderError::Invalid)) => {}
        (Ok(Parsed::Incomplete), Err(ProxyHeaderError::Eof | ProxyHeaderError::TooLarge)) => {}
        // A stream longer than the limit may be refused before its end is seen.
        (_, Err(ProxyHeaderError::TooLarge)) if stream.len() >= MAX => {}
        (w, r) => panic!("parse: {w:?}, read_header: {r:?}"),
    }
});
