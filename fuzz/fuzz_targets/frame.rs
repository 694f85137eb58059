//! Frames (`crates/protocol/src/frame.rs`): the `u16`-length-prefixed units every byte of a
//! connection travels in, read by the server from anyone and by the client from any path.
//!
//! Asserts, for any byte stream:
//! * `read_frame` splits it exactly as the length prefixes say: each body is the next
//!   `len` bytes, never longer than `MAX_FRAME_LEN`, and re-encoding it with `write_frame`
//!   gives back the very bytes consumed;
//! * the stream ends with `Closed` exactly at a frame boundary, and with an
//!   `UnexpectedEof` I/O error (never a hang, a panic or another error) when truncated;
//! * any body up to the limit round-trips through `write_frame` → `read_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_fuzz::block_on;
use postern_protocol::frame::{read_frame, write_frame, MAX_FRAME_LEN};
use postern_protocol::ProtocolError;

fuzz_target!(|data: &[u8]| {
    let mut reader = data;
    let mut body = Vec::new();
    let mut consumed = 0usize;
    loop {
        match block_on(read_frame(&mut reader, &mut body)) {
            Ok(()) => {
                assert!(body.len() <= MAX_FRAME_LEN);
                let len = usize::from(u16::from_be_bytes([data[consumed], data[consumed + 1]]));
                assert_eq!(body.len(), len, "body length is the prefix");
                let frame = &data[consumed..consumed + 2 + len];
                let mut out = Vec::new();
                block_on(write_frame(&mut out, &body)).expect("a read frame can be written");
                assert_eq!(out, frame, "re-encoding gives the bytes consumed");
                consumed += 2 + len;
                assert_eq!(reader.len(), data.len() - consumed);
            }
            Err(ProtocolError::Closed) => {
                assert_eq!(consumed, data.len(), "clean close only at a frame boundary");
                break;
            }
            Err(ProtocolError::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
                assert!(consumed < data.len(), "truncation means bytes were left");
                let left = data.len() - consumed;
                let truncated = left < 2 || {
                    let len = u16::from_be_bytes([data[consumed], data[consumed + 1]]);
                    left < 2 + usize::from(len)
                };
                assert!(truncated, "EOF error on a complete frame");
                break;
            }
            Err(other) => panic!("unexpected error reading frames: {other}"),
        }
    }

    if data.len() <= MAX_FRAME_LEN {
        let mut wire = Vec::new();
        block_on(write_frame(&mut wire, data)).expect("within the limit");
        assert_eq!(wire.len(), data.len() + 2);
        let mut r = &wire[..];
        block_on(read_frame(&mut r, &mut body)).expect("round trip");
        assert_eq!(body, data);
        assert!(r.is_empty());
    }
});
