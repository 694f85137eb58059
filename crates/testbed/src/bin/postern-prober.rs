//! `postern-prober`: an active prober in the style of Frolov et al. (NDSS 2020). For each
//! target port it sends an HTTP GET, random bytes, a TLS ClientHello with a random SNI,
//! and nothing (it waits), each on its own connection, all at once; then it records what
//! came back and how the connection ended (FIN, RST or still open) and when.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use postern_testbed::probe::{payload, PROBES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
#[command(name = "postern-prober", about = "The Postern testbed's active prober")]
struct Args {
    /// NAME=HOST:PORT, repeatable.
    #[arg(long = "target", value_name = "NAME=HOST:PORT", required = true)]
    targets: Vec<String>,
    /// Seconds to wait for each connection to end after the probe is sent.
    #[arg(long, default_value_t = 15)]
    wait: u64,
    /// Tab-separated output (one line per probe) instead of the table.
    #[arg(long)]
    tsv: bool,
}

#[derive(Debug)]
struct Outcome {
    target: String,
    probe: &'static str,
    sent: usize,
    answer: String,
    close: String,
    after: String,
}

fn describe(data: &[u8]) -> String {
    if data.is_empty() {
        return "nothing".into();
    }
    let head: String = if data.len() >= 2 && data[0] == 0x16 && data[1] == 0x03 {
        "TLS handshake".into()
    } else if data.len() >= 2 && data[0] == 0x15 && data[1] == 0x03 {
        "TLS alert".into()
    } else if data.iter().take(12).all(|&b| (0x20..0x7f).contains(&b)) {
        let line = data
            .split(|&b| b == b'\r' || b == b'\n')
            .next()
            .unwrap_or(&[]);
        let text = String::from_utf8_lossy(&line[..line.len().min(28)]).into_owned();
        format!("\"{text}\"")
    } else {
        let hex: Vec<String> = data.iter().take(6).map(|b| format!("{b:02x}")).collect();
        format!("binary {}…", hex.join(""))
    };
    format!("{} B {head}", data.len())
}

async fn probe(name: String, addr: SocketAddr, kind: &'static str, wait: Duration) -> Outcome {
    let bytes = payload(kind, &addr.ip().to_string());
    let mut out = Outcome {
        target: name,
        probe: kind,
        sent: bytes.len(),
        answer: String::new(),
        close: String::new(),
        after: String::new(),
    };
    let started = Instant::now();
    let mut s = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            out.answer = "-".into();
            out.close = format!("connect: {}", e.kind());
            out.after = format!("{:.1}s", started.elapsed().as_secs_f64());
            return out;
        }
        Err(_) => {
            out.answer = "-".into();
            out.close = "connect: timed out".into();
            out.after = "5.0s".into();
            return out;
        }
    };
    let started = Instant::now();
    if !bytes.is_empty() {
        if let Err(e) = s.write_all(&bytes).await {
            out.close = format!("write: {}", e.kind());
        }
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = started + wait;
    let close = loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Err(_) => break format!("still open at {}s", wait.as_secs()),
            Ok(Ok(0)) => break "FIN".to_string(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                break "RST".to_string()
            }
            Ok(Err(e)) => break format!("error: {}", e.kind()),
        }
    };
    out.after = format!("{:.1}s", started.elapsed().as_secs_f64());
    out.answer = describe(&got);
    if out.close.is_empty() {
        out.close = close;
    }
    out
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let wait = Duration::from_secs(args.wait);
    let mut tasks = Vec::new();
    for t in &args.targets {
        let (name, addr) = t
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("target {t:?} is not NAME=HOST:PORT"))?;
        let addr: SocketAddr = addr.parse()?;
        for kind in PROBES {
            tasks.push(tokio::spawn(probe(name.to_string(), addr, kind, wait)));
        }
    }
    let mut rows = Vec::new();
    for t in tasks {
        rows.push(t.await?);
    }
    if args.tsv {
        for r in &rows {
            println!(
                "{}\t{}\t{}\t{}\t{}\t{}",
                r.target, r.probe, r.sent, r.answer, r.close, r.after
            );
        }
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:>5}  {:<30} {:<18} {:>6}",
        "port", "probe", "sent", "answer", "close", "after"
    );
    for r in &rows {
        println!(
            "{:<24} {:<10} {:>5}  {:<30} {:<18} {:>6}",
            r.target, r.probe, r.sent, r.answer, r.close, r.after
        );
    }
    Ok(())
}
