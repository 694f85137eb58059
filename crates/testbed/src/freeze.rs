//! The flow-freeze forwarder: splices a client's TCP flow to its destination until the
//! destination has sent `freeze_after` bytes to the client, then goes silent.
//!
//! Models the behaviour reported on Russian (mostly mobile) networks from mid-2025 on
//! (net4people/bbs issue 490): TCP flows to foreign hosting ranges stop after about 15-20 KB
//! from server to client, whatever the protocol. No RST, no FIN: packets just stop. Here,
//! once the limit is reached, the part of the current chunk that fits is delivered and then
//! nothing more goes either way; the client's data is read and discarded (as by a black
//! hole) until the hold time passes, and the destination is not read any more, so its
//! socket buffers fill as on a stalled path. Neither side is closed during the hold.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes a flow may deliver to the client before it freezes (the profile's default).
pub const FREEZE_AFTER: u64 = 16 * 1024;

const CHUNK: usize = 16 * 1024;

/// How a forwarded flow went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// The limit was reached: the flow went silent.
    Frozen { to_client: u64, to_server: u64 },
    /// Both sides finished (or one failed) before the limit.
    Ended { to_client: u64, to_server: u64 },
}

impl Forwarded {
    pub fn to_client(&self) -> u64 {
        match *self {
            Forwarded::Frozen { to_client, .. } | Forwarded::Ended { to_client, .. } => to_client,
        }
    }
}

/// Forwards `client` <-> `upstream` until the flow ends or `freeze_after` bytes went to the
/// client. On a freeze, calls `on_freeze` at once and then holds the flow silently for
/// `hold` (see the module comment) before returning; both sockets are closed only when
/// they are dropped, after that.
pub async fn freeze_flow(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    freeze_after: u64,
    hold: Duration,
    on_freeze: impl FnOnce(&Forwarded),
) -> io::Result<Forwarded> {
    let outcome = forward_until_freeze(client, upstream, freeze_after).await?;
    if let Forwarded::Frozen { .. } = outcome {
        on_freeze(&outcome);
        // Accept whatever the client sends, forward nothing, answer nothing.
        let sink = async {
            let mut buf = vec![0u8; CHUNK];
            while let Ok(k) = client.read(&mut buf).await {
                if k == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(hold, sink).await;
    }
    Ok(outcome)
}

/// The forwarding phase of [`freeze_flow`]: returns [`Forwarded::Frozen`] as soon as the
/// client has received `freeze_after` bytes (the last chunk cut to fit), without reading
/// anything further from `upstream` or forwarding anything further from `client`.
pub async fn forward_until_freeze(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    freeze_after: u64,
) -> io::Result<Forwarded> {
    let to_server = AtomicU64::new(0);
    let mut to_client = 0u64;
    // The part of the last server chunk that still fits, written once forwarding stopped.
    let tail = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let c2s = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    // Pass the client's half-close on, as a splice does.
                    uw.shutdown().await?;
                    return Ok::<_, io::Error>(());
                }
                uw.write_all(&buf[..n]).await?;
                to_server.fetch_add(n as u64, Ordering::Relaxed);
            }
        };
        let s2c = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let room = freeze_after - to_client;
                if room == 0 {
                    return Ok::<_, io::Error>(Some(Vec::new()));
                }
                // Never read past the limit: what the server sends afterwards stays unread.
                let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                let n = ur.read(&mut buf[..want]).await?;
                if n == 0 {
                    cw.shutdown().await?;
                    return Ok(None);
                }
                if n as u64 == room {
                    // Stop the other direction before the client sees the last byte.
                    return Ok(Some(buf[..n].to_vec()));
                }
                cw.write_all(&buf[..n]).await?;
                to_client += n as u64;
            }
        };
        tokio::pin!(c2s, s2c);
        let mut c2s_done = false;
        loop {
            tokio::select! {
                r = &mut c2s, if !c2s_done => match r {
                    Ok(()) => c2s_done = true,
                    Err(_) => break None,
                },
                r = &mut s2c => match r {
                    Ok(Some(tail)) => break Some(tail),
                    Ok(None) => {
                        if !c2s_done {
                            let _ = (&mut c2s).await;
                        }
                        break None;
                    }
                    Err(_) => break None,
                },
            }
        }
    };
    let to_server = to_server.load(Ordering::Relaxed);
    match tail {
        Some(tail) => {
            client.write_all(&tail).await?;
            Ok(Forwarded::Frozen {
                to_client: to_client + tail.len() as u64,
                to_server,
            })
        }
        None => Ok(Forwarded::Ended {
            to_client,
            to_server,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(5);
    /// How long an absence (of data, of a close) is watched for.
    const QUIET: Duration = Duration::from_millis(300);

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// client app <-> censor (freeze_flow) <-> server app, over loopback TCP.
    async fn setup(
        freeze_after: u64,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::sync::oneshot::Receiver<Forwarded>,
        tokio::task::JoinHandle<io::Result<Forwarded>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client_app, mut censor_client) = pair(&l).await;
        let (mut censor_upstream, server_app) = pair(&l).await;
        let (tx, frozen) = tokio::sync::oneshot::channel();
        let censor = tokio::spawn(async move {
            freeze_flow(
                &mut censor_client,
                &mut censor_upstream,
                freeze_after,
                Duration::from_secs(30),
                |f| {
                    let _ = tx.send(*f);
                },
            )
            .await
        });
        (client_app, server_app, frozen, censor)
    }

    async fn read_exact_bounded(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        timeout(WAIT, s.read_exact(&mut buf))
            .await
            .expect("timed out")
            .expect("read");
        buf
    }

    /// Nothing arrives and the connection is neither closed nor reset within QUIET.
    async fn assert_silent(s: &mut TcpStream, what: &str) {
        let mut b = [0u8; 1];
        match timeout(QUIET, s.read(&mut b)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("{what}: closed (FIN)"),
            Ok(Ok(_)) => panic!("{what}: data arrived"),
            Ok(Err(e)) => panic!("{what}: {e}"),
        }
    }

    #[tokio::test]
    async fn a_flow_freezes_after_the_limit_without_closing() {
        let limit = 16384u64;
        let (mut client, mut server, frozen, censor) = setup(limit).await;
        // The client speaks first and is forwarded.
        client.write_all(b"hello server").await.unwrap();
        assert_eq!(read_exact_bounded(&mut server, 12).await, b"hello server");
        // The server sends 64 KiB in odd-sized chunks; the last forwarded one is cut.
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sender = tokio::spawn(async move {
            for c in data.chunks(5000) {
                // Once the censor stops reading, the socket buffers fill and writes block.
                match timeout(QUIET, server.write_all(c)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            server
        });
        let got = read_exact_bounded(&mut client, limit as usize).await;
        let expected: Vec<u8> = (0..limit as u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, expected);
        let f = timeout(WAIT, frozen).await.unwrap().unwrap();
        assert_eq!(
            f,
            Forwarded::Frozen {
                to_client: limit,
                to_server: 12
            }
        );
        assert_silent(&mut client, "client after the freeze").await;

        // What the client writes now does not reach the server; the server's end stays open.
        client.write_all(b"are you there?").await.unwrap();
        let mut server = timeout(WAIT, sender).await.unwrap().expect("server task");
        assert_silent(&mut server, "server after the freeze").await;
        assert!(!censor.is_finished(), "the hold ended early");
        censor.abort();
    }

    #[tokio::test]
    async fn a_short_flow_is_spliced_and_closes_normally() {
        let (mut client, mut server, _frozen, censor) = setup(16384).await;
        client.write_all(b"ping").await.unwrap();
        assert_eq!(read_exact_bounded(&mut server, 4).await, b"ping");
        server.write_all(b"pong").await.unwrap();
        assert_eq!(read_exact_bounded(&mut client, 4).await, b"pong");
        // Half-closes are passed on, both ways.
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        timeout(WAIT, server.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
        server.shutdown().await.unwrap();
        timeout(WAIT, client.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        let r = timeout(WAIT, censor).await.unwrap().unwrap().unwrap();
        assert_eq!(
            r,
            Forwarded::Ended {
                to_client: 4,
                to_server: 4
            }
        );
    }

    #[tokio::test]
    async fn a_zero_limit_freezes_before_any_server_data() {
        let (mut client, mut server, frozen, censor) = setup(0).await;
        server.write_all(b"banner").await.unwrap();
        let f = timeout(WAIT, frozen).await.unwrap().unwrap();
        assert_eq!(f.to_client(), 0);
        assert_silent(&mut client, "client").await;
        censor.abort();
    }
}
