//! SNI routing (`crates/relay/src/sni.rs`): the relay reads a TLS ClientHello from anyone
//! who connects to a media listener and decides, from its server name, where to connect.
//!
//! The first input byte is the segment size (0 means 1), the rest is the client's stream.
//! Asserts:
//! * a name found is lower case, has no trailing dot, is a valid DNS name and not an IP
//!   literal (so it can only ever match the allow-list's DNS entries), and an allow-list
//!   holding exactly that name allows it while one for another domain does not;
//! * `NeedMore(n)` always asks for more than was given, and never more than the limit
//!   plus one record header;
//! * prefix stability: a stream whose ClientHello is complete gives the same answer for
//!   every longer prefix, and every shorter prefix only asks for more;
//! * `read_client_hello` over the segmented stream agrees with `examine`, returns only
//!   bytes of the stream, and forwards all of them untouched;
//! * the same with the smallest limit the configuration allows (512 bytes).
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use postern_fuzz::{block_on, Segments};
use postern_relay::sni::{examine, is_valid_dns_name, read_client_hello, AllowList, Progress};

fuzz_target!(|data: &[u8]| {
    let Some((&seg, stream)) = data.split_first() else {
        return;
    };
    for max in [16384, 512] {
        check(stream, seg, max);
    }
});

fn check(stream: &[u8], seg: u8, max: usize) {
    let whole = examine(stream, max);
    match &whole {
        Ok(Progress::Done(name)) => check_name(name),
        Ok(Progress::NeedMore(n)) => {
            assert!(
                *n > stream.len(),
                "NeedMore({n}) for {} bytes",
                stream.len()
            );
        }
        Err(_) => {}
    }

    if let Ok(Progress::Done(name)) = &whole {
        // The shortest prefix that is complete, found by bisection, then a few cuts
        // around it: before it only NeedMore, from it the same name.
        let (mut lo, mut hi) = (0, stream.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if matches!(examine(&stream[..mid], max), Ok(Progress::Done(_))) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let done_at = lo;
        for cut in [0, 1, 4, 5, 6, 9, done_at / 2, done_at.saturating_sub(1)] {
            if cut < done_at {
                match examine(&stream[..cut], max) {
                    Ok(Progress::NeedMore(n)) => assert!(n > cut && n <= done_at, "cut {cut}: {n}"),
                    other => panic!("prefix {cut} of a complete ClientHello: {other:?}"),
                }
            }
        }
        for cut in [done_at, (done_at + stream.len()) / 2] {
            assert_eq!(
                examine(&stream[..cut], max).as_ref(),
                Ok(&Progress::Done(name.clone()))
            );
        }
    }

    let mut reader = Segments::new(stream, &[seg]);
    match (block_on(read_client_hello(&mut reader, max)), &whole) {
        (Ok((name, bytes)), _) => {
            assert!(
                stream.starts_with(&bytes),
                "forwarded bytes are the client's"
            );
            assert_eq!(examine(&bytes, max), Ok(Progress::Done(name)));
            assert!(bytes.len() <= max.max(stream.len()));
        }
        (Err(e), Ok(Progress::Done(name))) => {
            panic!("read_client_hello failed ({e}) where examine found {name:?}")
        }
        (Err(_), _) => {}
    }
}

fn check_name(name: &str) {
    assert!(!name.is_empty());
    assert_eq!(name, name.to_ascii_lowercase(), "lower case");
    assert!(!name.ends_with('.'), "no trailing dot");
    assert!(is_valid_dns_name(name), "valid DNS name: {name:?}");
    assert!(
        name.parse::<IpAddr>().is_err(),
        "not an IP literal: {name:?}"
    );
    assert!(AllowList::new(&[name.to_string()]).allows(name));
    let other = AllowList::new(&["*.postern-fuzz.invalid".to_string()]);
    assert_eq!(other.allows(name), name.ends_with(".postern-fuzz.invalid"));
}
