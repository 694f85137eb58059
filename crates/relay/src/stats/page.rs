//! The human status page (`/` on the stats listener): plain words, live numbers and two small
//! inline SVG graphs of the last hour. No scripts, fonts or images are loaded from anywhere.

use super::{FailReason, Metrics, Sample};
use postern_protocol::units::human_bytes;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn html_esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 3600 {
        format!("{} min", s / 60)
    } else if s < 86400 {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    } else {
        format!("{} days {} h", s / 86400, (s % 86400) / 3600)
    }
}

/// An inline SVG line chart of `values` (oldest first).
pub fn chart(title: &str, values: &[u64], fmt: fn(u64) -> String) -> String {
    let (w, h, pad) = (600.0f64, 120.0f64, 4.0f64);
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    let n = values.len().max(2) - 1;
    let mut pts = String::new();
    for (i, v) in values.iter().enumerate() {
        let x = pad + (w - 2.0 * pad) * (i as f64) / (n as f64);
        let y = h - pad - (h - 2.0 * pad) * (*v as f64) / (max as f64);
        let _ = write!(pts, "{x:.1},{y:.1} ");
    }
    let body = if values.len() < 2 {
        "<text x=\"300\" y=\"64\" text-anchor=\"middle\" fill=\"#777\">collecting data — the graph fills in over the first minutes</text>".to_string()
    } else {
        format!("<polyline fill=\"none\" stroke=\"#2a7ae2\" stroke-width=\"2\" points=\"{pts}\"/>")
    };
    format!(
        "<figure><figcaption>{} <small>(highest: {})</small></figcaption>\
         <svg viewBox=\"0 0 600 120\" width=\"100%\" height=\"120\" role=\"img\" aria-label=\"{}\">\
         <rect x=\"0\" y=\"0\" width=\"600\" height=\"120\" fill=\"#f6f8fa\"/>{body}</svg>\
         <div class=\"axis\"><span>1 hour ago</span><span>now</span></div></figure>",
        html_esc(title),
        fmt(max),
        html_esc(title)
    )
}

/// Renders the whole page.
pub fn render(m: &Metrics, uptime: Duration) -> String {
    let active: u64 = m
        .listeners
        .iter()
        .map(|l| l.active.load(Ordering::Relaxed))
        .sum();
    let parked = m.parked();
    let total: u64 = m
        .listeners
        .iter()
        .map(|l| l.total.load(Ordering::Relaxed))
        .sum();
    let refused: u64 = m
        .listeners
        .iter()
        .map(|l| l.refused.load(Ordering::Relaxed))
        .sum();
    let bytes: u64 = m
        .listeners
        .iter()
        .map(|l| l.bytes_in.load(Ordering::Relaxed) + l.bytes_out.load(Ordering::Relaxed))
        .sum();
    let healthy = m.healthy();
    let (banner_class, banner) = if healthy {
        ("ok", "Working: this relay can reach the service.")
    } else {
        ("bad", "Problem: this relay cannot reach the service right now. Users cannot connect through it until an upstream server answers again.")
    };
    let history: Vec<Sample> = m.history();
    let conns: Vec<u64> = history.iter().map(|s| s.active).collect();
    let traffic: Vec<u64> = history.iter().map(|s| s.bytes).collect();

    let mut listeners = String::new();
    for l in &m.listeners {
        // A CA's ACME validation is not a failure, whatever the counter's family.
        let failures: u64 = FailReason::ALL
            .iter()
            .filter(|r| **r != FailReason::AcmeChallenge)
            .map(|r| l.failures(*r))
            .sum();
        let _ = write!(
            listeners,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html_esc(&l.name),
            l.addr.port(),
            html_esc(&l.kind),
            l.active.load(Ordering::Relaxed),
            l.total.load(Ordering::Relaxed),
            human_bytes(l.bytes_in.load(Ordering::Relaxed) + l.bytes_out.load(Ordering::Relaxed)),
            failures,
            l.refused.load(Ordering::Relaxed),
        );
    }
    let mut upstreams = String::new();
    for p in &m.pools {
        for s in &p.servers {
            let (cls, word) = if s.is_healthy() {
                ("ok", "reachable")
            } else {
                ("bad", "NOT reachable")
            };
            let latency = if s.is_healthy() {
                format!("{:.1} ms", s.latency().as_secs_f64() * 1000.0)
            } else {
                "—".to_string()
            };
            let _ = write!(
                upstreams,
                "<tr><td>{}</td><td>{}</td><td class=\"{cls}\">{word}</td><td>{latency}</td><td>{}</td></tr>",
                html_esc(&p.name),
                html_esc(&s.target),
                s.active()
            );
        }
    }
    if upstreams.is_empty() {
        upstreams.push_str("<tr><td colspan=\"5\">No fixed upstream servers (this relay only routes by TLS server name).</td></tr>");
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="15"><title>Postern relay status</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:760px;margin:1em auto;padding:0 1em;color:#222}}
.banner{{padding:.8em 1em;border-radius:6px;font-weight:600}}
.banner.ok{{background:#e3f6e5;color:#135c1d}} .banner.bad{{background:#fde8e8;color:#8a1414}}
td.ok{{color:#135c1d}} td.bad{{color:#8a1414;font-weight:600}}
.nums{{display:flex;gap:1em;flex-wrap:wrap}} .nums div{{flex:1;min-width:140px;background:#f6f8fa;padding:.6em;border-radius:6px}}
.nums b{{display:block;font-size:1.6em}} table{{border-collapse:collapse;width:100%;margin:.5em 0 1.5em}}
th,td{{text-align:left;padding:.25em .5em;border-bottom:1px solid #ddd}} figure{{margin:1em 0}}
.axis{{display:flex;justify-content:space-between;color:#777;font-size:.8em}} small{{color:#777}}
</style></head><body>
<h1>Postern relay</h1>
<p class="banner {banner_class}">{banner}</p>
<div class="nums">
<div><b>{active}</b>connections open now<br><small>{parked} of them quiet (parked)</small></div>
<div><b>{total}</b>connections since start</div>
<div><b>{traffic_total}</b>data relayed</div>
<div><b>{uptime}</b>running for</div>
</div>
<p><small>Messages passing through this relay are end-to-end encrypted: the relay cannot read them. This page refreshes every 15 seconds.
{refused_note}</small></p>
<h2>Last hour</h2>
{chart_conns}
{chart_traffic}
<h2>Ports</h2>
<table><tr><th>name</th><th>port</th><th>kind</th><th>now</th><th>total</th><th>data</th><th>failed handshakes</th><th>refused (full)</th></tr>
{listeners}</table>
<h2>Service servers this relay forwards to</h2>
<table><tr><th>pool</th><th>server</th><th>status</th><th>connect time</th><th>connections</th></tr>
{upstreams}</table>
<p><small>Machine-readable: <a href="/metrics">/metrics</a> (Prometheus), <a href="/healthz">/healthz</a>.
"Failed handshakes" are often scanners or censors probing the relay; a few are normal.</small></p>
</body></html>
"#,
        traffic_total = human_bytes(bytes),
        uptime = human_duration(uptime),
        refused_note = if refused > 0 {
            format!("{refused} connections were turned away because the relay was full; users were moved to other relays.")
        } else {
            String::new()
        },
        chart_conns = chart("Open connections", &conns, |v| v.to_string()),
        chart_traffic = chart("Data relayed per minute", &traffic, human_bytes),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_polyline() {
        let c = chart("x", &[1, 5, 3], |v| v.to_string());
        assert!(c.contains("<polyline") && c.contains("highest: 5"));
        assert!(chart("x", &[], |v| v.to_string()).contains("collecting data"));
    }
}
