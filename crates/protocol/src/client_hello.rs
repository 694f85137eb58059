//! Reading a TLS ClientHello off the wire before any TLS library sees it: the record
//! framing and handshake reassembly that both the relay (SNI routing) and the testbed's
//! censor (SNI and JA4 blocking) need. What is *in* the hello is parsed elsewhere, by the
//! `tls-parser` crate; this module only finds where the hello message starts and ends.
//!
//! A ClientHello may be spread over many TCP segments and over several TLS records (a
//! record holds at most 16 KiB, and clients with post-quantum key shares send hellos
//! near 2 KiB that some split). [`examine`] looks at the bytes received so far and says
//! either how many bytes it needs before its answer can change, or hands back the whole
//! handshake message. [`read`] drives it over an async reader. Both are bounded by a
//! caller-chosen `max` on the bytes read.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Why the first bytes of a connection are not a usable ClientHello.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum HelloError {
    /// The first bytes are not a TLS handshake record carrying a ClientHello.
    #[error("not a TLS handshake")]
    NotTls,
    /// The ClientHello is larger than the caller allows.
    #[error("ClientHello too large")]
    TooLarge,
    /// The peer closed before sending a full ClientHello.
    #[error("connection closed during ClientHello")]
    Eof,
    /// Reading failed.
    #[error("read error: {0}")]
    Io(String),
}

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// More bytes are needed: at least this many in total before the answer can change.
    NeedMore(usize),
    /// The complete ClientHello handshake message (type, 24-bit length, body),
    /// reassembled from its records.
    Complete(Vec<u8>),
}

const RECORD_HEADER: usize = 5;
/// The largest record payload TLS allows (RFC 8446 §5.1).
const MAX_RECORD: usize = 16384;
const CLIENT_HELLO: u8 = 0x01;

/// The handshake message length, once its 4-byte header has arrived, checked against `max`.
fn message_len(handshake: &[u8], max: usize) -> Result<Option<usize>, HelloError> {
    if handshake.len() < 4 {
        return Ok(None);
    }
    if handshake[0] != CLIENT_HELLO {
        return Err(HelloError::NotTls);
    }
    let len = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
    if len + 4 > max {
        return Err(HelloError::TooLarge);
    }
    Ok(Some(len + 4))
}

/// Examines `buf` (bytes from the start of the connection) without consuming them.
pub fn examine(buf: &[u8], max: usize) -> Result<Framing, HelloError> {
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        if let Some(len) = message_len(&handshake, max)? {
            if handshake.len() >= len {
                handshake.truncate(len);
                return Ok(Framing::Complete(handshake));
            }
        }
        let need_more = || {
            if buf.len() >= max {
                Err(HelloError::TooLarge)
            } else {
                Ok(Framing::NeedMore(buf.len() + 1))
            }
        };
        if pos >= buf.len() {
            return need_more();
        }
        let rest = &buf[pos..];
        // Validate as much of the record header as has arrived, byte by byte, so that
        // what is not TLS is told at once rather than after waiting for more.
        if rest[0] != 0x16
            || (rest.len() >= 2 && rest[1] != 0x03)
            || (rest.len() >= 3 && rest[2] > 0x04)
        {
            return Err(HelloError::NotTls);
        }
        if rest.len() < RECORD_HEADER {
            return need_more();
        }
        let rlen = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if rlen == 0 || rlen > MAX_RECORD {
            return Err(HelloError::NotTls);
        }
        if pos + RECORD_HEADER + rlen > max {
            return Err(HelloError::TooLarge);
        }
        let avail = (rest.len() - RECORD_HEADER).min(rlen);
        handshake.extend_from_slice(&rest[RECORD_HEADER..RECORD_HEADER + avail]);
        pos += RECORD_HEADER + avail;
        if avail < rlen {
            // A partial record: only a complete message can finish, and that needs the
            // rest of this record first; check what its header already tells.
            message_len(&handshake, max)?;
            return Ok(Framing::NeedMore(pos - avail + rlen));
        }
    }
}

/// Reads from `io` into `buf` until a complete ClientHello is buffered, at most `max`
/// bytes, and returns the handshake message. Every byte read stays in `buf` whatever the
/// outcome (to be forwarded untouched, or passed on uninspected). The caller bounds the
/// time.
pub async fn read<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, HelloError> {
    let mut chunk = [0u8; 2048];
    // Re-examine only once enough bytes arrived to change the answer, so a client sending
    // one byte per segment costs O(n), not O(n^2).
    let mut need = 0;
    loop {
        if buf.len() >= need {
            match examine(buf, max)? {
                Framing::Complete(message) => return Ok(message),
                Framing::NeedMore(n) => need = n,
            }
        }
        let want = max.saturating_sub(buf.len()).min(chunk.len());
        let n = io
            .read(&mut chunk[..want])
            .await
            .map_err(|e| HelloError::Io(e.kind().to_string()))?;
        if n == 0 {
            return Err(HelloError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A ClientHello-shaped handshake message with a body of `len` bytes.
    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![CLIENT_HELLO, (len >> 16) as u8, (len >> 8) as u8, len as u8];
        m.extend((0..len).map(|i| i as u8));
        m
    }

    fn records(message: &[u8], per_record: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in message.chunks(per_record) {
            out.extend_from_slice(&[
                0x16,
                0x03,
                0x01,
                (chunk.len() >> 8) as u8,
                chunk.len() as u8,
            ]);
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn reassembles_a_hello_split_over_records_and_cut_anywhere() {
        let m = message(1800);
        let raw = records(&m, 700);
        assert_eq!(examine(&raw, 16384), Ok(Framing::Complete(m.clone())));
        for cut in 0..raw.len() {
            match examine(&raw[..cut], 16384) {
                Ok(Framing::NeedMore(n)) => assert!(n > cut && n <= raw.len(), "cut {cut}: {n}"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        // Bytes after the hello (the client's next flight) are not part of it.
        let mut more = raw.clone();
        more.extend_from_slice(b"\x14\x03\x03\x00\x01\x01");
        assert_eq!(examine(&more, 16384), Ok(Framing::Complete(m)));
    }

    #[test]
    fn refuses_what_is_not_a_bounded_hello() {
        assert_eq!(
            examine(b"GET / HTTP/1.1\r\n", 16384),
            Err(HelloError::NotTls)
        );
        assert_eq!(examine(b"\x16\x02", 16384), Err(HelloError::NotTls));
        let mut server_hello = records(&message(10), 100);
        server_hello[5] = 0x02;
        assert_eq!(examine(&server_hello, 16384), Err(HelloError::NotTls));
        assert_eq!(
            examine(&records(&message(20000), 16000), 16384),
            Err(HelloError::TooLarge)
        );
        // A header that announces a too-large message is refused before its body arrives.
        assert_eq!(
            examine(&records(&message(20000), 16000)[..20], 16384),
            Err(HelloError::TooLarge)
        );
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = examine(&bytes, 16384);
        }

        #[test]
        fn reader_handles_any_segmentation(per_record in 8usize..900, len in 40usize..3000,
                                           cut in 1usize..64) {
            let m = message(len);
            let raw = records(&m, per_record);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (got, read) = rt.block_on(async {
                let (mut tx, mut rx) = tokio::io::duplex(cut);
                let writer = tokio::spawn({
                    let raw = raw.clone();
                    async move {
                        use tokio::io::AsyncWriteExt;
                        let _ = tx.write_all(&raw).await;
                        let _ = tx.write_all(b"trailing").await;
                    }
                });
                let mut buf = Vec::new();
                let message = read(&mut rx, 16384, &mut buf).await.unwrap();
                drop(rx);
                let _ = writer.await;
                (message, buf)
            });
            prop_assert_eq!(got, m);
            prop_assert!(read.starts_with(&raw));
        }
    }
}
