//! Length-prefixed frames: a big-endian `u16` length, then the bytes.
//!
//! The 16-bit prefix is the hard size limit: a frame can never exceed 65,535 bytes, which
//! is also the largest message Noise allows, so one frame carries one Noise message.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ProtocolError;

/// The largest frame body, imposed by the 2-byte length prefix.
pub const MAX_FRAME_LEN: usize = u16::MAX as usize;

/// Reads one frame body into `buf` (cleared first). Returns `Closed` on a clean end of
/// stream before the first length byte.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    let mut len = [0u8; 2];
    match reader.read_exact(&mut len[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ProtocolError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    reader.read_exact(&mut len[1..]).await?;
    let len = u16::from_be_bytes(len) as usize;
    buf.clear();
    // The buffer grows as bytes arrive: a peer that announces 64 KiB and sends nothing
    // costs nothing, where allocating the announced length up front let stalled
    // connections hold 64 KiB each.
    let got = (&mut *reader).take(len as u64).read_to_end(buf).await?;
    if got < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the peer closed in the middle of a {len}-byte frame"),
        )
        .into());
    }
    Ok(())
}

/// Writes one frame. Fails (without writing) if `body` is longer than [`MAX_FRAME_LEN`].
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    body: &[u8],
) -> Result<(), ProtocolError> {
    let len = u16::try_from(body.len()).map_err(|_| ProtocolError::FrameTooLarge {
        len: body.len(),
        max: MAX_FRAME_LEN,
    })?;
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    writer.write_all(&out).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[tokio::test]
    async fn round_trip_and_clean_close() {
        let (mut a, mut b) = tokio::io::duplex(1 << 17);
        write_frame(&mut a, b"hello").await.unwrap();
        write_frame(&mut a, &[]).await.unwrap();
        drop(a);
        let mut buf = Vec::new();
        read_frame(&mut b, &mut buf).await.unwrap();
        assert_eq!(buf, b"hello");
        read_frame(&mut b, &mut buf).await.unwrap();
        assert!(buf.is_empty());
        assert!(matches!(
            read_frame(&mut b, &mut buf).await,
            Err(ProtocolError::Closed)
        ));
    }

    #[tokio::test]
    async fn oversized_frame_is_refused() {
        let (mut a, _b) = tokio::io::duplex(16);
        let big = vec![0u8; MAX_FRAME_LEN + 1];
        assert!(matches!(
            write_frame(&mut a, &big).await,
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_not_a_hang() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 10, 1, 2, 3]).await.unwrap();
        drop(a);
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut b, &mut buf).await,
            Err(ProtocolError::Io(_))
        ));
    }

    /// Regression (issue 18, defect 2): the announced length was allocated at once.
    #[tokio::test]
    async fn an_announced_frame_costs_only_the_bytes_that_arrived() {
        let (mut a, mut b) = tokio::io::duplex(1 << 17);
        a.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
        let mut buf = Vec::new();
        let pending =
            tokio::time::timeout(Duration::from_millis(50), read_frame(&mut b, &mut buf)).await;
        assert!(pending.is_err(), "the frame is not complete");
        assert!(
            buf.capacity() < 4096,
            "a stalled 64 KiB frame holds {} bytes",
            buf.capacity()
        );
        drop(a);
    }

    proptest! {
        #[test]
        fn any_body_round_trips(body in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let (mut a, mut b) = tokio::io::duplex(1 << 13);
                write_frame(&mut a, &body).await.unwrap();
                let mut buf = Vec::new();
                read_frame(&mut b, &mut buf).await.unwrap();
                prop_assert_eq!(buf, body);
                Ok(())
            })?;
        }
    }
}
