//! The load generator and the echo upstream. Every byte that comes back is verified.
//!
//! Upstream protocol (first byte of a connection chooses the mode):
//! * `E` — echo everything back;
//! * `U` + u64 LE length — read `length` bytes of [`pattern`], verify them, answer 8 bytes
//!   (count verified, LE) + 1 byte (1 = every byte matched);
//! * `D` + u64 LE length — send `length` bytes of [`pattern`].
//!
//! No mode relies on half-closed connections (nginx `stream` closes both sides on the first FIN).

use anyhow::{bail, Context, Result};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// Period of the byte pattern (a prime, so it never lines up with buffer sizes).
pub const PERIOD: usize = 65521;
/// Largest chunk read or written at once; a chunk always fits in one pattern window.
pub const CHUNK: usize = 64 * 1024;

/// The pattern, `PERIOD + CHUNK` bytes long, so `pattern()[o % PERIOD..][..n]` is the data at
/// stream offset `o` for any `n <= CHUNK`.
pub fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        (0..PERIOD + CHUNK)
            .map(|i| {
                let x = (i % PERIOD) as u32;
                (x.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (x >> 8) as u8
            })
            .collect()
    })
}

/// The bytes expected at stream offset `offset`, `len <= CHUNK`.
pub fn expected(offset: u64, len: usize) -> &'static [u8] {
    let start = (offset % PERIOD as u64) as usize;
    &pattern()[start..start + len]
}

/// Checks `data` against the pattern at `offset`.
pub fn verify(offset: u64, data: &[u8]) -> bool {
    data.chunks(CHUNK)
        .enumerate()
        .all(|(i, c)| c == expected(offset + (i * CHUNK) as u64, c.len()))
}

/// A 64-byte echo message that encodes the connection and sequence number.
pub fn message(conn: u32, seq: u64, out: &mut [u8]) {
    let start = (conn as u64)
        .wrapping_mul(7919)
        .wrapping_add(seq.wrapping_mul(64));
    for (i, b) in out.iter_mut().enumerate() {
        *b = expected(start + i as u64, 1)[0];
    }
    out[..4].copy_from_slice(&conn.to_le_bytes());
    out[4..12].copy_from_slice(&seq.to_le_bytes());
}

// ---------------------------------------------------------------- upstream

/// Starts the upstream on an ephemeral loopback port.
pub async fn start_upstream() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = serve_upstream(s).await;
            });
        }
    });
    Ok(addr)
}

async fn serve_upstream(mut s: TcpStream) -> Result<()> {
    s.set_nodelay(true)?;
    let mode = s.read_u8().await?;
    match mode {
        b'E' => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        b'U' => {
            let len = s.read_u64_le().await?;
            let mut buf = vec![0u8; CHUNK];
            let (mut got, mut ok) = (0u64, true);
            while got < len {
                let want = ((len - got) as usize).min(CHUNK);
                let n = s.read(&mut buf[..want]).await?;
                if n == 0 {
                    break;
                }
                ok &= verify(got, &buf[..n]);
                got += n as u64;
            }
            let mut reply = [0u8; 9];
            reply[..8].copy_from_slice(&got.to_le_bytes());
            reply[8] = u8::from(ok && got == len);
            s.write_all(&reply).await?;
            // Wait for the client to close, so the reply is never cut by our FIN.
            let _ = s.read(&mut buf).await;
            Ok(())
        }
        b'D' => {
            let len = s.read_u64_le().await?;
            let mut sent = 0u64;
            while sent < len {
                let n = ((len - sent) as usize).min(CHUNK);
                s.write_all(expected(sent, n)).await?;
                sent += n as u64;
            }
            let mut b = [0u8; 1];
            let _ = s.read(&mut b).await;
            Ok(())
        }
        m => bail!("unknown mode {m}"),
    }
}

// ---------------------------------------------------------------- client side

/// A client stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
/// A boxed client stream.
pub type Stream = Box<dyn Io>;

/// Where the load goes.
#[derive(Clone)]
pub struct Target {
    /// Listener address.
    pub addr: SocketAddr,
    /// Wrap in TLS with this client configuration.
    pub tls: Option<Arc<ClientConfig>>,
}

/// Whether the last TLS handshake on a stream was resumed.
pub struct Opened {
    /// The stream.
    pub stream: Stream,
    /// TLS session resumed.
    pub resumed: bool,
}

/// Connects, and does the TLS handshake if the target has TLS.
pub async fn connect(t: &Target) -> Result<Opened> {
    let tcp = TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connect {}", t.addr))?;
    tcp.set_nodelay(true)?;
    match &t.tls {
        None => Ok(Opened {
            stream: Box::new(tcp),
            resumed: false,
        }),
        Some(cfg) => {
            let name = ServerName::try_from("relay.example").expect("static name");
            let s = TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            let resumed = s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            Ok(Opened {
                stream: Box::new(s),
                resumed,
            })
        }
    }
}

/// A client TLS configuration; `resume` keeps a session cache (tickets) shared by all
/// connections made with it.
pub fn client_config(resume: bool) -> Arc<ClientConfig> {
    // The client's own configuration: any relay certificate, signatures checked.
    let mut cfg = postern_protocol::tls::relay_client_config();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(cfg)
}

// ---------------------------------------------------------------- measurements

/// Result of one bulk transfer.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    /// Bytes moved and verified.
    #[allow(dead_code)]
    pub bytes: u64,
    /// Seconds.
    pub secs: f64,
}

impl Bulk {
    /// Bytes per second.
    pub fn rate(&self) -> f64 {
        self.bytes as f64 / self.secs
    }
}

/// Sends `len` verified bytes client → upstream.
pub async fn upload(t: &Target, len: u64) -> Result<Bulk> {
    let mut s = connect(t).await?.stream;
    let start = Instant::now();
    let mut head = [0u8; 9];
    head[0] = b'U';
    head[1..].copy_from_slice(&len.to_le_bytes());
    s.write_all(&head).await?;
    let mut sent = 0u64;
    while sent < len {
        let n = ((len - sent) as usize).min(CHUNK);
        s.write_all(expected(sent, n)).await?;
        sent += n as u64;
    }
    s.flush().await?;
    let mut reply = [0u8; 9];
    s.read_exact(&mut reply).await.context("upload reply")?;
    let secs = start.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(reply[..8].try_into().expect("8 bytes"));
    if reply[8] != 1 || got != len {
        bail!(
            "upload corrupted: upstream verified {got} of {len} bytes, ok={}",
            reply[8]
        );
    }
    Ok(Bulk { bytes: len, secs })
}

/// Receives `len` bytes upstream → client and verifies them.
pub async fn download(t: &Target, len: u64) -> Result<Bulk> {
    let mut s = connect(t).await?.stream;
    let start = Instant::now();
    let mut head = [0u8; 9];
    head[0] = b'D';
    head[1..].copy_from_slice(&len.to_le_bytes());
    s.write_all(&head).await?;
    s.flush().await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < len {
        let want = ((len - got) as usize).min(CHUNK);
        let n = s.read(&mut buf[..want]).await?;
        if n == 0 {
            bail!("download cut after {got} of {len} bytes");
        }
        if !verify(got, &buf[..n]) {
            bail!("download corrupted near byte {got}");
        }
        got += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Bulk { bytes: len, secs })
}

/// Sends `len` verified bytes through the echo upstream and reads them back at the same
/// time on one connection: both directions of the relay busy at once, as when media goes
/// both ways. The rate is bytes per second each way.
pub async fn duplex(t: &Target, len: u64) -> Result<Bulk> {
    let mut s = connect(t).await?.stream;
    s.write_all(b"E").await?;
    let start = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = async move {
        let mut sent = 0u64;
        while sent < len {
            let n = ((len - sent) as usize).min(CHUNK);
            wr.write_all(expected(sent, n)).await?;
            sent += n as u64;
        }
        wr.flush().await?;
        anyhow::Ok(wr)
    };
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        while got < len {
            let want = ((len - got) as usize).min(CHUNK);
            let n = rd.read(&mut buf[..want]).await?;
            if n == 0 {
                bail!("echo cut after {got} of {len} bytes");
            }
            if !verify(got, &buf[..n]) {
                bail!("echo corrupted near byte {got}");
            }
            got += n as u64;
        }
        anyhow::Ok(rd)
    };
    // Both halves on the same task, polled together: neither direction waits for the other.
    let (wr, rd) = tokio::try_join!(writer, reader)?;
    let secs = start.elapsed().as_secs_f64();
    drop(rd.unsplit(wr));
    Ok(Bulk { bytes: len, secs })
}

/// Runs `f` once with `probe` bytes to estimate the rate, then with enough bytes for about
/// `dur`. Returns the long run and the total bytes moved by both.
pub async fn timed_bulk<F, Fut>(probe: u64, dur: Duration, f: F) -> Result<(Bulk, u64)>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<Bulk>>,
{
    let p = f(probe).await?;
    let len = ((p.rate() * dur.as_secs_f64()) as u64).clamp(probe, 1 << 36);
    let b = f(len).await?;
    Ok((b, p.bytes + b.bytes))
}

/// Request/response result.
#[derive(Debug, Clone, Copy)]
pub struct Rr {
    /// Round trips per second, all connections together.
    pub rate: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
    /// Round trips completed.
    pub count: u64,
    /// Bytes moved (both ways).
    #[allow(dead_code)]
    pub bytes: u64,
}

/// `conns` connections each sending a 64-byte message and waiting for its verified echo,
/// back to back, for `dur`.
pub async fn request_response(t: &Target, conns: usize, dur: Duration) -> Result<Rr> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut s = connect(t).await?.stream;
        s.write_all(b"E").await?;
        streams.push(s);
    }
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let (mut out, mut back) = ([0u8; 64], [0u8; 64]);
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                message(i as u32, seq, &mut out);
                s.write_all(&out).await?;
                s.flush().await?;
                s.read_exact(&mut back).await?;
                if back != out {
                    bail!("echo corrupted on connection {i} message {seq}");
                }
                lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                seq += 1;
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64
    };
    Ok(Rr {
        rate: all.len() as f64 / secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        count: all.len() as u64,
        bytes: all.len() as u64 * 128,
    })
}

/// Opens `n` connections (at most `parallel` opening at once), each exchanging one verified
/// 64-byte echo, and returns them still open.
pub async fn open_idle(t: &Target, n: usize, parallel: usize) -> Result<Vec<Stream>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let t = t.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await?;
            let mut s = connect(&t).await?.stream;
            let mut out = [0u8; 65];
            out[0] = b'E';
            message(i as u32, 0, &mut out[1..]);
            s.write_all(&out).await?;
            s.flush().await?;
            let mut back = [0u8; 64];
            s.read_exact(&mut back).await?;
            if back[..] != out[1..] {
                bail!("echo corrupted on idle connection {i}");
            }
            anyhow::Ok(s)
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Handshake result.
#[derive(Debug, Clone, Copy)]
pub struct Handshakes {
    /// Completed connections (handshake + verified echo) per second.
    pub rate: f64,
    /// Fraction of handshakes that resumed a session.
    pub resumed: f64,
    /// Connections completed in all (including those that finished after the timed window).
    pub count: u64,
}

/// `parallel` loops of connect + TLS handshake + one verified 16-byte echo + close, for `dur`.
pub async fn handshakes(t: &Target, parallel: usize, dur: Duration) -> Result<Handshakes> {
    let done = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..parallel {
        let (t, done, resumed, stop) = (t.clone(), done.clone(), resumed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let o = connect(&t).await?;
                let mut s = o.stream;
                let mut out = [0u8; 65];
                out[0] = b'E';
                message(i as u32, seq, &mut out[1..]);
                s.write_all(&out[..17]).await?;
                s.flush().await?;
                let mut back = [0u8; 16];
                s.read_exact(&mut back).await?;
                if back[..] != out[1..17] {
                    bail!("echo corrupted after handshake");
                }
                done.fetch_add(1, Ordering::Relaxed);
                if o.resumed {
                    resumed.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok(Handshakes {
        rate: n as f64 / secs,
        resumed: resumed.load(Ordering::Relaxed) as f64 / n.max(1) as f64,
        count: done.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_windows_are_consistent() {
        // The byte at offset o must be the same whichever window it is read through.
        for o in [0u64, 1, 65520, 65521, 65522, 1 << 33] {
            assert_eq!(expected(o, 1)[0], expected(o - o % 7, 8)[(o % 7) as usize]);
        }
        let mut data = Vec::new();
        for i in 0..5u64 {
            data.extend_from_slice(expected(i * 40_000, 40_000));
        }
        assert!(verify(0, &data));
        data[123_456] ^= 1;
        assert!(!verify(0, &data));
    }

    #[tokio::test]
    async fn direct_path_verifies() {
        let up = start_upstream().await.unwrap();
        let t = Target {
            addr: up,
            tls: None,
        };
        assert_eq!(upload(&t, 1_000_003).await.unwrap().bytes, 1_000_003);
        assert_eq!(download(&t, 777_777).await.unwrap().bytes, 777_777);
        let rr = request_response(&t, 3, Duration::from_millis(100))
            .await
            .unwrap();
        assert!(rr.rate > 0.0 && rr.p50_us <= rr.p99_us && rr.p99_us <= rr.p999_us);
        assert_eq!(duplex(&t, 3_000_017).await.unwrap().bytes, 3_000_017);
        assert_eq!(open_idle(&t, 20, 5).await.unwrap().len(), 20);
    }
}
