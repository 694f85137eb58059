//! `--mode peers`: the thin-client load against the Postern server and against ejabberd
//! (and Prosody with `--peers postern,ejabberd,prosody`),
//! `--rounds` times each (a fresh server and fresh accounts every time, the peers taking
//! turns within a round so that a burst of load from elsewhere does not land on one only),
//! and one table of each figure's median over the rounds, the ratio postern ÷ ejabberd,
//! and the range.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::stats::{mib, percentile_ms, Summary};
use crate::{ejabberd, prosody, thin, xmpp_load, ThinArgs};

/// A server compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    Postern,
    Ejabberd,
    Prosody,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Postern => "postern",
            Peer::Ejabberd => "ejabberd",
            Peer::Prosody => "prosody",
        }
    }
}

/// What one round measured for one peer, in the table's units.
#[derive(Debug, Clone, Default)]
struct Figures {
    vals: Vec<Option<f64>>,
}

/// One row of the table.
struct Metric {
    name: &'static str,
    unit: &'static str,
    /// `None`: neither (a count reported for information).
    higher_is_better: Option<bool>,
    decimals: usize,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "delivered end to end",
        unit: "msgs/s",
        higher_is_better: Some(true),
        decimals: 0,
    },
    Metric {
        name: "sender's ack (sent ✓) p50",
        unit: "ms",
        higher_is_better: Some(false),
        decimals: 1,
    },
    Metric {
        name: "sender's ack (sent ✓) p99",
        unit: "ms",
        higher_is_better: Some(false),
        decimals: 1,
    },
    Metric {
        name: "delivery to the recipient p50",
        unit: "ms",
        higher_is_better: Some(false),
        decimals: 1,
    },
    Metric {
        name: "delivery to the recipient p99",
        unit: "ms",
        higher_is_better: Some(false),
        decimals: 1,
    },
    Metric {
        name: "receipt back at the sender (✓✓) p50",
        unit: "ms",
        higher_is_better: Some(false),
        decimals: 1,
    },
    Metric {
        name: "receipt back at the sender (✓✓) p99",
        unit: "ms",
        higher_is_better: Some(false),
        decimals: 1,
    },
    Metric {
        name: "server CPU while messaging",
        unit: "% of one core",
        higher_is_better: None,
        decimals: 0,
    },
    Metric {
        name: "server CPU per message delivered",
        unit: "µs",
        higher_is_better: Some(false),
        decimals: 0,
    },
    Metric {
        name: "server RSS per connected client",
        unit: "KiB",
        higher_is_better: Some(false),
        decimals: 1,
    },
    Metric {
        name: "load generator CPU per message",
        unit: "µs",
        higher_is_better: None,
        decimals: 0,
    },
    Metric {
        name: "errors (refused / bad acks / dropped)",
        unit: "count",
        higher_is_better: None,
        decimals: 0,
    },
];

/// The figures common to both peers' reports.
struct Common<'a> {
    summary: &'a Summary,
    server_cpu_s: f64,
    load_cpu_s: f64,
    messaging_s: f64,
    rss_registered_kib: u64,
    rss_connected_kib: u64,
    clients: usize,
    errors: usize,
}

impl Common<'_> {
    fn figures(&self) -> Figures {
        let s = self.summary;
        let p = |v: &[u64], q| (!v.is_empty()).then(|| percentile_ms(v, q));
        let delivered = s.delivered.len() as f64;
        let per_message = |cpu: f64| (delivered > 0.0).then(|| cpu / delivered * 1e6);
        Figures {
            vals: vec![
                Some(s.delivered_per_second()),
                p(&s.accepted, 50.0),
                p(&s.accepted, 99.0),
                p(&s.delivered, 50.0),
                p(&s.delivered, 99.0),
                p(&s.receipts, 50.0),
                p(&s.receipts, 99.0),
                (self.messaging_s > 0.0).then(|| 100.0 * self.server_cpu_s / self.messaging_s),
                per_message(self.server_cpu_s),
                // Signed: a server whose RSS fell while clients connected (a collection
                // of the registrations' garbage) shows it instead of a silent zero.
                Some(
                    (self.rss_connected_kib as f64 - self.rss_registered_kib as f64)
                        / self.clients.max(1) as f64,
                ),
                per_message(self.load_cpu_s),
                Some(self.errors as f64),
            ],
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit: every client is a
/// socket here, and ejabberd (a child) inherits the limit for its side of them.
fn raise_nofile() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
            }
        }
    }
    Ok(lim.rlim_cur)
}

pub async fn run(
    args: &ThinArgs,
    rounds: usize,
    peers: &[Peer],
    binary: &Path,
    parent: &Path,
) -> Result<()> {
    if peers.is_empty() {
        bail!("no peers to run (--peers)");
    }
    let nofile = raise_nofile()?;
    // Clients are sockets in this process and in the server: each needs one descriptor.
    if (nofile as usize) < args.clients + 200 {
        bail!(
            "{} clients need more open files than this process may have ({nofile}); raise the \
             limit (ulimit -n) or use fewer --clients",
            args.clients
        );
    }
    let install = if peers.contains(&Peer::Ejabberd) {
        Some(ejabberd::ensure_installed()?)
    } else {
        None
    };
    let prosody_install = if peers.contains(&Peer::Prosody) {
        Some(prosody::ensure_installed()?)
    } else {
        None
    };
    let rounds = rounds.max(1);
    let mut all: Vec<Vec<Figures>> = Vec::new();
    for round in 1..=rounds {
        let mut row = Vec::new();
        for &peer in peers {
            eprintln!("=== round {round} of {rounds}: {}", peer.name());
            let dir = tempfile::Builder::new()
                .prefix("postern-bench-peers-")
                .tempdir_in(parent)
                .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
            let figures = match peer {
                Peer::Postern => {
                    let r = thin::measure(args, binary, dir.path()).await?;
                    r.check_complete()?;
                    eprintln!(
                        "  postern: RSS {} with the accounts registered, {} with {} connected",
                        mib(r.rss_registered_kib),
                        mib(r.rss_connected_kib),
                        r.clients
                    );
                    Common {
                        summary: &r.summary,
                        server_cpu_s: r.server_cpu_s,
                        load_cpu_s: r.load_cpu_s,
                        messaging_s: r.messaging_s,
                        rss_registered_kib: r.rss_registered_kib,
                        rss_connected_kib: r.rss_connected_kib,
                        clients: r.clients,
                        errors: r.errors.iter().sum(),
                    }
                    .figures()
                }
                Peer::Ejabberd | Peer::Prosody => {
                    let server = if peer == Peer::Ejabberd {
                        let install = install.as_ref().context("ejabberd is not set up")?;
                        ejabberd::start(install, dir.path(), args.clients).await?
                    } else {
                        prosody::start(dir.path()).await?
                    };
                    let r = xmpp_load::measure(args, server).await?;
                    r.check_complete()?;
                    Common {
                        summary: &r.summary,
                        server_cpu_s: r.server_cpu_s,
                        load_cpu_s: r.load_cpu_s,
                        messaging_s: r.messaging_s,
                        rss_registered_kib: r.rss_registered_kib,
                        rss_connected_kib: r.rss_connected_kib,
                        clients: r.clients,
                        errors: r.errors.iter().sum(),
                    }
                    .figures()
                }
            };
            eprintln!(
                "  {}: {} msgs/s delivered, sent ✓ p50 {} ms, delivery p99 {} ms, server CPU {} %",
                peer.name(),
                fmt(figures.vals[0], 0),
                fmt(figures.vals[1], 1),
                fmt(figures.vals[4], 1),
                fmt(figures.vals[7], 0)
            );
            row.push(figures);
        }
        all.push(row);
    }

    let versions: Vec<String> = peers
        .iter()
        .map(|p| match p {
            Peer::Postern => format!("postern ({})", binary.display()),
            Peer::Ejabberd => format!(
                "ejabberd {} (Debian, Mnesia, no TLS)",
                install.as_ref().map_or("?", |i| i.version.as_str())
            ),
            Peer::Prosody => format!(
                "Prosody {} (Debian, internal storage, epoll, no TLS)",
                prosody_install.as_ref().map_or("?", |i| i.version.as_str())
            ),
        })
        .collect();
    println!(
        "\n### Side by side: {} clients connected, {} senders one message at a time, {} messages \
         of {} B to random recipients; median of {} round(s)\n\n{}\n",
        args.clients,
        args.senders,
        args.messages,
        args.body_bytes,
        rounds,
        versions.join(", ")
    );
    print!("{}", render(peers, &median(&all, peers.len())));
    if rounds > 1 {
        println!("\nRange over the {rounds} rounds (min–max):\n");
        print!("{}", render_range(peers, &all));
    }
    Ok(())
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

/// Each figure's median over the rounds (the mean of the middle two for an even count),
/// per peer.
fn median(all: &[Vec<Figures>], peers: usize) -> Vec<Figures> {
    (0..peers)
        .map(|p| Figures {
            vals: (0..METRICS.len())
                .map(|m| {
                    let mut v: Vec<f64> = all
                        .iter()
                        .filter_map(|round| round.get(p)?.vals.get(m).copied().flatten())
                        .collect();
                    if v.is_empty() {
                        return None;
                    }
                    v.sort_by(f64::total_cmp);
                    let mid = v.len() / 2;
                    Some(if v.len() % 2 == 1 {
                        v[mid]
                    } else {
                        (v[mid - 1] + v[mid]) / 2.0
                    })
                })
                .collect(),
        })
        .collect()
}

/// The Markdown table: a column per peer, then postern ÷ each other peer.
fn render(peers: &[Peer], figures: &[Figures]) -> String {
    let postern = peers.iter().position(|p| *p == Peer::Postern);
    let others: Vec<usize> = (0..peers.len()).filter(|i| Some(*i) != postern).collect();
    let mut s = String::from("| metric | unit |");
    for p in peers {
        s.push_str(&format!(" {} |", p.name()));
    }
    if postern.is_some() {
        for &o in &others {
            s.push_str(&format!(" postern ÷ {} |", peers[o].name()));
        }
    }
    s.push_str("\n|---|---|");
    let ratios = if postern.is_some() { others.len() } else { 0 };
    s.push_str(&"---:|".repeat(peers.len() + ratios));
    s.push('\n');
    for (m, metric) in METRICS.iter().enumerate() {
        let val = |p: usize| {
            figures
                .get(p)
                .and_then(|f| f.vals.get(m).copied().flatten())
        };
        let unit = match metric.higher_is_better {
            Some(false) => format!("{} (lower is better)", metric.unit),
            _ => metric.unit.to_string(),
        };
        s.push_str(&format!("| {} | {unit} |", metric.name));
        for p in 0..peers.len() {
            s.push_str(&format!(" {} |", fmt(val(p), metric.decimals)));
        }
        if let Some(pi) = postern {
            for &o in &others {
                let r = match metric.higher_is_better {
                    Some(_) => ratio(val(pi), val(o)),
                    None if metric.unit != "count" => ratio(val(pi), val(o)),
                    None => "—".into(),
                };
                s.push_str(&format!(" {r} |"));
            }
        }
        s.push('\n');
    }
    s
}

/// The same table with each figure's min–max over the rounds.
fn render_range(peers: &[Peer], all: &[Vec<Figures>]) -> String {
    let mut s = String::from("| metric | unit |");
    for p in peers {
        s.push_str(&format!(" {} |", p.name()));
    }
    s.push_str("\n|---|---|");
    s.push_str(&"---:|".repeat(peers.len()));
    s.push('\n');
    for (m, metric) in METRICS.iter().enumerate() {
        s.push_str(&format!("| {} | {} |", metric.name, metric.unit));
        for p in 0..peers.len() {
            let v: Vec<f64> = all
                .iter()
                .filter_map(|round| round.get(p)?.vals.get(m).copied().flatten())
                .collect();
            let cell = if v.is_empty() {
                "—".to_string()
            } else {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                format!(
                    "{}–{}",
                    fmt(Some(lo), metric.decimals),
                    fmt(Some(hi), metric.decimals)
                )
            };
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(first: f64, rss: f64) -> Figures {
        let mut vals = vec![None; METRICS.len()];
        vals[0] = Some(first);
        vals[9] = Some(rss);
        Figures { vals }
    }

    #[test]
    fn median_and_range_over_rounds() {
        let peers = [Peer::Postern, Peer::Ejabberd];
        let all = vec![
            vec![figures(1000.0, 14.0), figures(400.0, 40.0)],
            vec![figures(3000.0, 15.0), figures(500.0, 42.0)],
            vec![figures(2000.0, 16.0), figures(600.0, 41.0)],
        ];
        let m = median(&all, 2);
        assert_eq!(m[0].vals[0], Some(2000.0));
        assert_eq!(m[1].vals[0], Some(500.0));
        assert_eq!(m[1].vals[9], Some(41.0));
        assert_eq!(m[0].vals[1], None);
        let even = median(&all[..2], 2);
        assert_eq!(even[0].vals[0], Some(2000.0));

        let t = render(&peers, &m);
        let rate = t.lines().find(|l| l.starts_with("| delivered")).unwrap();
        assert_eq!(
            rate,
            "| delivered end to end | msgs/s | 2000 | 500 | 4.00× |"
        );
        let rss = t.lines().find(|l| l.contains("RSS per")).unwrap();
        assert!(
            rss.contains("(lower is better) | 15.0 | 41.0 | 0.37× |"),
            "{rss}"
        );
        let p50 = t.lines().find(|l| l.contains("sent ✓) p50")).unwrap();
        assert!(p50.ends_with("| — | — | — |"), "{p50}");

        let r = render_range(&peers, &all);
        let rate = r.lines().find(|l| l.starts_with("| delivered")).unwrap();
        assert_eq!(
            rate,
            "| delivered end to end | msgs/s | 1000–3000 | 400–600 |"
        );
    }

    #[test]
    fn one_peer_alone_has_no_ratio_column() {
        let t = render(&[Peer::Ejabberd], &[figures(10.0, 1.0)]);
        assert!(
            t.starts_with("| metric | unit | ejabberd |\n|---|---|---:|\n"),
            "{t}"
        );
    }
}
