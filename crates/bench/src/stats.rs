//! Timing records, percentiles and the printed table.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A message id (16 bytes, chosen by the sender).
pub type Id = [u8; 16];

/// Timestamps (microseconds since the benchmark's start) of each stage of each message,
/// appended from many tasks and joined by message id at the end.
pub struct Recorder {
    start: Instant,
    /// When the sender started sending.
    pub sent: Mutex<Vec<(Id, u64)>>,
    /// When the server acknowledged it (`MessageAccepted`, "sent ✓").
    pub accepted: Mutex<Vec<(Id, u64)>>,
    /// When the recipient received it.
    pub delivered: Mutex<Vec<(Id, u64)>>,
    /// When the sender got the delivery receipt ("delivered ✓✓").
    pub receipts: Mutex<Vec<(Id, u64)>>,
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            sent: Mutex::default(),
            accepted: Mutex::default(),
            delivered: Mutex::default(),
            receipts: Mutex::default(),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub fn record(&self, list: &Mutex<Vec<(Id, u64)>>, id: Id) {
        let t = self.now_us();
        list.lock().unwrap_or_else(|p| p.into_inner()).push((id, t));
    }

    pub fn record_at(&self, list: &Mutex<Vec<(Id, u64)>>, id: Id, t: u64) {
        list.lock().unwrap_or_else(|p| p.into_inner()).push((id, t));
    }

    /// Forgets everything recorded so far (after a warm-up).
    pub fn clear(&self) {
        for l in [&self.sent, &self.accepted, &self.delivered, &self.receipts] {
            l.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Waits (at most `timeout`) until every accepted message was delivered and its
    /// receipt came back.
    pub async fn wait_drained(&self, timeout: std::time::Duration) {
        let accepted = Self::count(&self.accepted);
        let deadline = Instant::now() + timeout;
        while (Self::count(&self.delivered) < accepted || Self::count(&self.receipts) < accepted)
            && Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub fn count(list: &Mutex<Vec<(Id, u64)>>) -> usize {
        list.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Joins the records into per-stage latencies.
    pub fn summary(&self) -> Summary {
        let take = |l: &Mutex<Vec<(Id, u64)>>| l.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent: HashMap<Id, u64> = take(&self.sent).into_iter().collect();
        let latencies = |events: Vec<(Id, u64)>| -> Vec<u64> {
            let mut v: Vec<u64> = events
                .iter()
                .filter_map(|(id, t)| sent.get(id).map(|s| t.saturating_sub(*s)))
                .collect();
            v.sort_unstable();
            v
        };
        let delivered = take(&self.delivered);
        let first_send = sent.values().copied().min().unwrap_or(0);
        let last_delivery = delivered.iter().map(|(_, t)| *t).max().unwrap_or(0);
        Summary {
            sent: sent.len(),
            accepted: latencies(take(&self.accepted)),
            delivered: latencies(delivered),
            receipts: latencies(take(&self.receipts)),
            span_us: last_delivery.saturating_sub(first_send),
        }
    }
}

pub struct Summary {
    pub sent: usize,
    /// Sorted latencies, microseconds.
    pub accepted: Vec<u64>,
    pub delivered: Vec<u64>,
    pub receipts: Vec<u64>,
    /// First send to last delivery.
    pub span_us: u64,
}

impl Summary {
    pub fn delivered_per_second(&self) -> f64 {
        if self.span_us == 0 {
            return 0.0;
        }
        self.delivered.len() as f64 / (self.span_us as f64 / 1e6)
    }
}

/// The `p`-th percentile (0–100) of sorted values, in milliseconds.
pub fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// "p50 / p99 / max" of sorted latencies.
pub fn latency_cell(sorted: &[u64]) -> String {
    if sorted.is_empty() {
        return "n/a".into();
    }
    format!(
        "{:.1} / {:.1} / {:.1} ms",
        percentile_ms(sorted, 50.0),
        percentile_ms(sorted, 99.0),
        percentile_ms(sorted, 100.0)
    )
}

/// A two-column table, printed as Markdown so it can be pasted into the docs.
#[derive(Default)]
pub struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    pub fn row(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.rows.push((name.into(), value.into()));
    }

    pub fn print(&self, title: &str) {
        let w = self
            .rows
            .iter()
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let v = self
            .rows
            .iter()
            .map(|(_, x)| x.len())
            .max()
            .unwrap_or(5)
            .max(5);
        println!("\n### {title}\n");
        println!("| {:<w$} | {:<v$} |", "metric", "value");
        println!("|{}|{}|", "-".repeat(w + 2), "-".repeat(v + 2));
        for (n, x) in &self.rows {
            println!("| {n:<w$} | {x:<v$} |");
        }
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&v, 50.0), 50.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&v, 100.0), 100.0);
        assert!(percentile_ms(&[], 50.0).is_nan());
    }
}
