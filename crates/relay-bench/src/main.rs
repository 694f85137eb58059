//! `relay-bench` — the Postern relay side by side with HAProxy (the reference messenger's
//! settings) and nginx `stream`, on loopback, with one load generator that verifies every byte.
//!
//! ```sh
//! cargo run --release -p relay-bench            # ~3-4 minutes; prints one Markdown table
//! cargo run --release -p relay-bench -- --help  # durations, counts, peers, worker threads
//! ```
//!
//! Each relay is started fresh for each memory figure (so the baseline is a clean process) and
//! once more for the throughput, latency and handshake figures. See `docs/benchmarks.md`.

mod load;
mod peers;

use anyhow::{Context, Result};
use clap::Parser;
use load::{Target, CHUNK};
use peers::{Kind, Running, Setup};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark postern relay against HAProxy and nginx on loopback"
)]
struct Args {
    /// Seconds per bulk transfer (each way alone, then both at once; plain and TLS).
    #[arg(long, default_value_t = 3.0)]
    bulk_secs: f64,
    /// Seconds per request/response run.
    #[arg(long, default_value_t = 4.0)]
    rr_secs: f64,
    /// Connections for request/response.
    #[arg(long, default_value_t = 50)]
    rr_conns: usize,
    /// Idle connections held open for the memory figure (keep 2 per connection + the bench's
    /// own 2 well under the open-file limit).
    #[arg(long, default_value_t = 3000)]
    idle_conns: usize,
    /// Seconds the idle connections sit before memory is read (the same for every relay).
    /// Long enough for postern to park quiet connections (`limits.park_after`, 1 s) and for
    /// freed memory to go back to the system, as it would on a relay whose clients have
    /// been quiet for a while.
    #[arg(long, default_value_t = 5.0)]
    idle_settle_secs: f64,
    /// Seconds per TLS handshake run.
    #[arg(long, default_value_t = 4.0)]
    hs_secs: f64,
    /// Concurrent handshaking clients.
    #[arg(long, default_value_t = 32)]
    hs_parallel: usize,
    /// Worker threads (HAProxy nbthread, postern's tokio workers) / processes (nginx).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Load generator (and echo upstream) threads.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Relays to run, comma-separated: haproxy, nginx, postern.
    #[arg(long, value_delimiter = ',', default_value = "haproxy,nginx,postern")]
    peers: Vec<String>,
    /// The `postern` binary (default: build and use the workspace's release binary).
    #[arg(long)]
    postern: Option<PathBuf>,
    /// Extra argument for `postern relay` (repeatable), e.g. `--postern-arg=--config=FILE`.
    #[arg(long, allow_hyphen_values = true)]
    postern_arg: Vec<String>,
    /// Measurements to run, comma-separated: idle, bulk, rr, hs.
    #[arg(long, value_delimiter = ',', default_value = "idle,bulk,rr,hs")]
    tests: Vec<String>,
    /// Rounds of the whole sequence (no relay, then every peer); the table shows each
    /// figure's median over the rounds, then the range. Several rounds interleave the peers in
    /// time, so a burst of load from elsewhere on the machine does not land on one peer only.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Keep the scratch directory (configs, logs) and print its path.
    #[arg(long)]
    keep: bool,
}

fn col(k: Kind) -> usize {
    match k {
        Kind::Haproxy => 1,
        Kind::Nginx => 2,
        Kind::Postern => 3,
    }
}

struct Row {
    name: &'static str,
    unit: &'static str,
    higher_better: bool,
    decimals: usize,
    vals: [Option<f64>; 4],
}

/// Row indices.
mod r {
    pub const UP: usize = 0;
    pub const DOWN: usize = 1;
    pub const DUPLEX: usize = 2;
    pub const TLS_UP: usize = 3;
    pub const TLS_DOWN: usize = 4;
    pub const TLS_DUPLEX: usize = 5;
    pub const RR: usize = 6;
    pub const RR_P50: usize = 7;
    pub const RR_P99: usize = 8;
    pub const RR_P999: usize = 9;
    pub const RR_CPU: usize = 10;
    pub const TLS_RR: usize = 11;
    pub const TLS_RR_P50: usize = 12;
    pub const TLS_RR_P99: usize = 13;
    pub const TLS_RR_P999: usize = 14;
    pub const TLS_RR_CPU: usize = 15;
    pub const IDLE: usize = 16;
    pub const TLS_IDLE: usize = 17;
    pub const HS: usize = 18;
    pub const HS_RESUMED: usize = 19;
    pub const CPU: usize = 20;
    pub const TLS_CPU: usize = 21;
    pub const HS_PER_CPU: usize = 22;
}

fn rows() -> Vec<Row> {
    let row = |name, unit, higher_better, decimals| Row {
        name,
        unit,
        higher_better,
        decimals,
        vals: [None; 4],
    };
    vec![
        row("bulk plain, client→upstream", "MiB/s", true, 0),
        row("bulk plain, upstream→client", "MiB/s", true, 0),
        row(
            "bulk plain, both ways at once (echo)",
            "MiB/s each way",
            true,
            0,
        ),
        row("bulk TLS, client→upstream", "MiB/s", true, 0),
        row("bulk TLS, upstream→client", "MiB/s", true, 0),
        row(
            "bulk TLS, both ways at once (echo)",
            "MiB/s each way",
            true,
            0,
        ),
        row("req/resp plain, 50 conns × 64 B", "req/s", true, 0),
        row("req/resp plain p50", "µs", false, 0),
        row("req/resp plain p99", "µs", false, 0),
        row("req/resp plain p99.9", "µs", false, 0),
        row("req/resp plain, relay CPU per million", "CPU-s/M", false, 1),
        row("req/resp TLS, 50 conns × 64 B", "req/s", true, 0),
        row("req/resp TLS p50", "µs", false, 0),
        row("req/resp TLS p99", "µs", false, 0),
        row("req/resp TLS p99.9", "µs", false, 0),
        row("req/resp TLS, relay CPU per million", "CPU-s/M", false, 1),
        row("idle memory plain", "KiB/conn", false, 2),
        row("idle memory TLS", "KiB/conn", false, 2),
        row("TLS handshakes (full)", "conn/s", true, 0),
        row("TLS handshakes (resumed)", "conn/s", true, 0),
        row("CPU per GiB relayed, plain", "s/GiB", false, 2),
        row("CPU per GiB relayed, TLS", "s/GiB", false, 2),
        row(
            "TLS handshakes (full) per relay CPU-second",
            "conn/CPU-s",
            true,
            0,
        ),
    ]
}

fn fmt(v: Option<f64>, d: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.d$}"),
        _ => "—".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn render(rows: &[Row]) -> String {
    let mut s = String::from(
        "| metric | unit | no relay | HAProxy | nginx | postern | postern ÷ best peer | postern ÷ HAProxy | postern ÷ no relay |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let peers = [r.vals[1], r.vals[2]];
        let best = peers.iter().flatten().copied().reduce(|a, b| {
            if r.higher_better {
                a.max(b)
            } else {
                a.min(b)
            }
        });
        s.push_str(&format!(
            "| {} | {}{} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.unit,
            if r.higher_better {
                ""
            } else {
                " (lower is better)"
            },
            fmt(r.vals[0], r.decimals),
            fmt(r.vals[1], r.decimals),
            fmt(r.vals[2], r.decimals),
            fmt(r.vals[3], r.decimals),
            ratio(r.vals[3], best),
            ratio(r.vals[3], r.vals[1]),
            ratio(r.vals[3], r.vals[0]),
        ));
    }
    s
}

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// Bulk rates on one target, MiB/s: each way alone, then both at once.
struct BulkRates {
    up: f64,
    down: f64,
    duplex: f64,
    /// Bytes the relay carried (each direction counted).
    bytes: u64,
}

/// Bulk on `t`: up, down, then full duplex through the echo.
async fn bulk_rates(t: &Target, secs: f64) -> Result<BulkRates> {
    let dur = Duration::from_secs_f64(secs);
    let probe = 16 * CHUNK as u64 * 16; // 16 MiB
    let (up, b1) = load::timed_bulk(probe, dur, |n| load::upload(t, n)).await?;
    let (down, b2) = load::timed_bulk(probe, dur, |n| load::download(t, n)).await?;
    let (duplex, b3) = load::timed_bulk(probe, dur, |n| load::duplex(t, n)).await?;
    Ok(BulkRates {
        up: up.rate() / MIB,
        down: down.rate() / MIB,
        duplex: duplex.rate() / MIB,
        bytes: b1 + b2 + 2 * b3,
    })
}

/// Idle memory per connection, KiB, on a freshly started relay.
async fn idle_memory(kind: Kind, setup: &Setup, tls: bool, n: usize, settle: f64) -> Result<f64> {
    let relay = Running::start(kind, setup)?;
    let t = target(&relay, tls);
    // Warm up: first-connection allocations (TLS config, thread pools) are not per connection.
    for s in load::open_idle(&t, 8, 8).await? {
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = relay.rss();
    let conns = load::open_idle(&t, n, 64).await?;
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let after = relay.rss();
    drop(conns);
    relay.stop();
    Ok((after.saturating_sub(before)) as f64 / n as f64 / 1024.0)
}

fn target(relay: &Running, tls: bool) -> Target {
    if tls {
        Target {
            addr: relay.tls,
            tls: Some(load::client_config(false)),
        }
    } else {
        Target {
            addr: relay.plain,
            tls: None,
        }
    }
}

async fn bench_peer(kind: Kind, setup: &Setup, a: &Args, rows: &mut [Row]) -> Result<()> {
    let c = col(kind);
    let on = |t: &str| a.tests.iter().any(|x| x == t);
    if on("idle") {
        eprintln!(
            "== {}: idle memory, {} connections",
            kind.name(),
            a.idle_conns
        );
        let settle = a.idle_settle_secs;
        rows[r::IDLE].vals[c] = Some(idle_memory(kind, setup, false, a.idle_conns, settle).await?);
        rows[r::TLS_IDLE].vals[c] =
            Some(idle_memory(kind, setup, true, a.idle_conns, settle).await?);
    }
    let relay = Running::start(kind, setup)?;
    let (plain, tls) = (target(&relay, false), target(&relay, true));
    if on("bulk") {
        bench_bulk(&relay, &plain, &tls, c, a, rows).await?;
    }
    if on("rr") {
        bench_rr(&relay, &plain, &tls, c, a, rows).await?;
    }
    if on("hs") {
        bench_hs(&relay, &tls, c, a, rows).await?;
    }
    relay.stop();
    Ok(())
}

async fn bench_bulk(
    relay: &Running,
    plain: &Target,
    tls: &Target,
    c: usize,
    a: &Args,
    rows: &mut [Row],
) -> Result<()> {
    let kind = relay.kind;
    eprintln!("== {}: bulk", kind.name());
    let cpu0 = relay.cpu();
    let b = bulk_rates(plain, a.bulk_secs).await?;
    let cpu1 = relay.cpu();
    rows[r::UP].vals[c] = Some(b.up);
    rows[r::DOWN].vals[c] = Some(b.down);
    rows[r::DUPLEX].vals[c] = Some(b.duplex);
    rows[r::CPU].vals[c] = Some((cpu1 - cpu0) / (b.bytes as f64 / GIB));
    let b = bulk_rates(tls, a.bulk_secs).await?;
    let cpu2 = relay.cpu();
    rows[r::TLS_UP].vals[c] = Some(b.up);
    rows[r::TLS_DOWN].vals[c] = Some(b.down);
    rows[r::TLS_DUPLEX].vals[c] = Some(b.duplex);
    rows[r::TLS_CPU].vals[c] = Some((cpu2 - cpu1) / (b.bytes as f64 / GIB));
    Ok(())
}

/// Rows of one request/response run: rate, p50, p99, p99.9, relay CPU per million.
struct RrRows {
    rate: usize,
    p50: usize,
    p99: usize,
    p999: usize,
    cpu: usize,
}

const RR_PLAIN: RrRows = RrRows {
    rate: r::RR,
    p50: r::RR_P50,
    p99: r::RR_P99,
    p999: r::RR_P999,
    cpu: r::RR_CPU,
};
const RR_TLS: RrRows = RrRows {
    rate: r::TLS_RR,
    p50: r::TLS_RR_P50,
    p99: r::TLS_RR_P99,
    p999: r::TLS_RR_P999,
    cpu: r::TLS_RR_CPU,
};

/// One request/response run on `t`, its figures in column `c`; `relay` (none for the
/// no-relay column) gives the relay's CPU time per million round trips.
async fn rr_into(
    t: &Target,
    relay: Option<&Running>,
    at: &RrRows,
    c: usize,
    a: &Args,
    rows: &mut [Row],
) -> Result<()> {
    let cpu0 = relay.map(Running::cpu);
    let rr = load::request_response(t, a.rr_conns, Duration::from_secs_f64(a.rr_secs)).await?;
    rows[at.rate].vals[c] = Some(rr.rate);
    rows[at.p50].vals[c] = Some(rr.p50_us);
    rows[at.p99].vals[c] = Some(rr.p99_us);
    rows[at.p999].vals[c] = Some(rr.p999_us);
    if let (Some(relay), Some(cpu0)) = (relay, cpu0) {
        if rr.count > 0 {
            rows[at.cpu].vals[c] = Some((relay.cpu() - cpu0) / (rr.count as f64 / 1e6));
        }
    }
    Ok(())
}

async fn bench_rr(
    relay: &Running,
    plain: &Target,
    tls: &Target,
    c: usize,
    a: &Args,
    rows: &mut [Row],
) -> Result<()> {
    eprintln!("   request/response");
    rr_into(plain, Some(relay), &RR_PLAIN, c, a, rows).await?;
    rr_into(tls, Some(relay), &RR_TLS, c, a, rows).await
}

async fn bench_hs(
    relay: &Running,
    tls: &Target,
    c: usize,
    a: &Args,
    rows: &mut [Row],
) -> Result<()> {
    let kind = relay.kind;
    eprintln!("   TLS handshakes");
    let hs = Duration::from_secs_f64(a.hs_secs);
    let cpu0 = relay.cpu();
    let full = load::handshakes(tls, a.hs_parallel, hs).await?;
    let cpu = relay.cpu() - cpu0;
    rows[r::HS].vals[c] = Some(full.rate);
    // The relay's own cost per handshake: on a shared machine the load generator's client
    // handshakes take much of the CPU, which compresses the rate row towards 1×.
    if cpu > 0.0 {
        rows[r::HS_PER_CPU].vals[c] = Some(full.count as f64 / cpu);
    }
    let resumed_t = Target {
        addr: relay.tls,
        tls: Some(load::client_config(true)),
    };
    let res = load::handshakes(&resumed_t, a.hs_parallel, hs).await?;
    rows[r::HS_RESUMED].vals[c] = Some(res.rate);
    eprintln!(
        "   {}: {:.0} full/s, {:.0} with a session cache/s ({:.0}% resumed)",
        kind.name(),
        full.rate,
        res.rate,
        res.resumed * 100.0
    );
    Ok(())
}

fn postern_binary(a: &Args) -> Result<PathBuf> {
    if let Some(p) = &a.postern {
        return Ok(p.clone());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the release postern binary (cargo build --release -p postern) ...");
    let st = std::process::Command::new(cargo)
        .args(["build", "--release", "-p", "postern"])
        .current_dir(&root)
        .status()
        .context("running cargo")?;
    anyhow::ensure!(st.success(), "cargo build --release -p postern failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/postern"))
}

async fn run(a: Args) -> Result<()> {
    let want: Vec<Kind> = a
        .peers
        .iter()
        .map(|p| match p.as_str() {
            "haproxy" => Ok(Kind::Haproxy),
            "nginx" => Ok(Kind::Nginx),
            "postern" => Ok(Kind::Postern),
            other => anyhow::bail!("unknown peer {other}"),
        })
        .collect::<Result<_>>()?;
    let (have, notes) = peers::find_or_install(&want);
    for n in &notes {
        eprintln!("note: {n}");
    }
    let postern = if have.contains(&Kind::Postern) {
        postern_binary(&a)?
    } else {
        PathBuf::new()
    };
    let dir = tempfile::Builder::new().prefix("relay-bench.").tempdir()?;
    let (cert, key, combined) = peers::write_cert(dir.path())?;
    let upstream = load::start_upstream().await?;
    let setup = Setup {
        dir: dir.path().to_path_buf(),
        upstream,
        cert,
        key,
        combined,
        workers: a.workers,
        postern,
        postern_args: a.postern_arg.clone(),
    };
    let rounds = a.rounds.max(1);
    let mut all = Vec::new();
    for round in 1..=rounds {
        eprintln!("=== round {round} of {rounds}");
        all.push(one_round(&a, &setup, &have, upstream).await?);
    }
    let table = median_rows(&all);

    println!(
        "\nrelay-bench: {} worker(s) per relay, {} load-generator thread(s), {} idle connections, \
         {} request/response connections; all on loopback, every byte verified; median of {} \
         round(s).\n",
        a.workers, a.client_threads, a.idle_conns, a.rr_conns, rounds
    );
    print!("{}", render(&table));
    if rounds > 1 {
        println!("\nRange over the {rounds} rounds (min–max):\n");
        print!("{}", render_range(&all));
    }
    for n in &notes {
        println!("\nnote: {n}");
    }
    if a.keep {
        let p = dir.keep();
        println!("\nscratch directory kept: {}", p.display());
    }
    Ok(())
}

/// One pass: the no-relay path, then every peer in turn.
async fn one_round(
    a: &Args,
    setup: &Setup,
    have: &[Kind],
    upstream: std::net::SocketAddr,
) -> Result<Vec<Row>> {
    let mut rows = rows();
    eprintln!("== no relay (straight to the echo upstream)");
    let direct = Target {
        addr: upstream,
        tls: None,
    };
    if a.tests.iter().any(|t| t == "bulk") {
        let b = bulk_rates(&direct, a.bulk_secs).await?;
        rows[r::UP].vals[0] = Some(b.up);
        rows[r::DOWN].vals[0] = Some(b.down);
        rows[r::DUPLEX].vals[0] = Some(b.duplex);
    }
    if a.tests.iter().any(|t| t == "rr") {
        rr_into(&direct, None, &RR_PLAIN, 0, a, &mut rows).await?;
    }

    for k in have {
        bench_peer(*k, setup, a, &mut rows)
            .await
            .with_context(|| format!("benchmarking {}", k.name()))?;
    }
    Ok(rows)
}

/// Each cell's median over the rounds (the mean of the middle two for an even count).
fn median_rows(all: &[Vec<Row>]) -> Vec<Row> {
    let mut out = rows();
    for (i, row) in out.iter_mut().enumerate() {
        for c in 0..4 {
            let mut v: Vec<f64> = all.iter().filter_map(|r| r[i].vals[c]).collect();
            if v.is_empty() {
                continue;
            }
            v.sort_by(f64::total_cmp);
            let m = v.len() / 2;
            row.vals[c] = Some(if v.len() % 2 == 1 {
                v[m]
            } else {
                (v[m - 1] + v[m]) / 2.0
            });
        }
    }
    out
}

/// The same table with each cell's min–max over the rounds.
fn render_range(all: &[Vec<Row>]) -> String {
    let mut s = String::from(
        "| metric | unit | no relay | HAProxy | nginx | postern |\n|---|---|---:|---:|---:|---:|\n",
    );
    for (i, row) in rows().iter().enumerate() {
        let cell = |c: usize| {
            let v: Vec<f64> = all.iter().filter_map(|r| r[i].vals[c]).collect();
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            if v.is_empty() {
                "—".to_string()
            } else {
                format!(
                    "{}–{}",
                    fmt(Some(lo), row.decimals),
                    fmt(Some(hi), row.decimals)
                )
            }
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.name,
            row.unit,
            cell(0),
            cell(1),
            cell(2),
            cell(3)
        ));
    }
    s
}

fn main() -> Result<()> {
    let a = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.client_threads.max(1))
        .enable_all()
        .build()?
        .block_on(run(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_use_the_best_peer() {
        let mut rs = rows();
        rs[r::UP].vals = [Some(1000.0), Some(400.0), Some(500.0), Some(800.0)];
        rs[r::IDLE].vals = [None, Some(4.0), Some(8.0), Some(1.0)];
        let t = render(&rs);
        let up = t.lines().find(|l| l.contains("plain, client→")).unwrap();
        assert!(up.contains("| 1.60× | 2.00× | 0.80× |"), "{up}");
        let idle = t.lines().find(|l| l.contains("idle memory plain")).unwrap();
        assert!(idle.contains("| 0.25× | 0.25× | — |"), "{idle}");
    }

    #[test]
    fn median_and_range_over_rounds() {
        let round = |v: f64| {
            let mut rs = rows();
            rs[r::UP].vals = [Some(v), None, Some(v * 2.0), Some(v * 3.0)];
            rs
        };
        let all = vec![round(10.0), round(30.0), round(20.0)];
        let m = median_rows(&all);
        assert_eq!(m[r::UP].vals, [Some(20.0), None, Some(40.0), Some(60.0)]);
        assert_eq!(m[r::DOWN].vals, [None; 4]);
        let range = render_range(&all);
        let up = range
            .lines()
            .find(|l| l.contains("plain, client→"))
            .unwrap();
        assert!(up.contains("| 10–30 | — | 20–60 | 30–90 |"), "{up}");
    }
}
