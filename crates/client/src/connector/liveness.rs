//! Keepalive and stall detection for one connection, as a state machine with the clock
//! passed in (so it is tested with a fake clock).
//!
//! A censor can freeze a flow without a reset: packets just stop (measured in Russia from
//! 2025 after 15–20 KB of a flow). TCP will not notice for many minutes, so the client
//! watches the connection itself: after a silence it sends a Ping, and if nothing at all
//! arrives within [`STALL_DEADLINE`] of that ping, the connection is dead and the
//! connector races a new one.
//!
//! Silence allowed before a ping starts at [`PING_AFTER_QUIET_MIN`] after any real
//! traffic (so a stall in the middle of a backlog is caught within a few seconds) and
//! doubles with each answered ping on an otherwise idle connection, up to
//! [`PING_AFTER_QUIET_MAX`] (so an idle connection costs one small ping every few
//! seconds).

use std::time::Duration;

use tokio::time::Instant;

use crate::timeouts::{PING_AFTER_QUIET_MAX, PING_AFTER_QUIET_MIN, STALL_DEADLINE};

/// What the connection should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Nothing to do before `next`.
    Wait { next: Instant },
    /// Send a ping now (and call [`Liveness::ping_sent`]).
    Ping,
    /// Nothing arrived for `silent` although a ping was sent: the connection is dead.
    Dead { silent: Duration },
}

#[derive(Debug, Clone)]
pub struct Liveness {
    last_received: Instant,
    ping_sent: Option<Instant>,
    quiet: Duration,
    min_quiet: Duration,
    max_quiet: Duration,
    deadline: Duration,
}

impl Liveness {
    pub fn new(now: Instant) -> Self {
        Self::with_limits(
            now,
            PING_AFTER_QUIET_MIN,
            PING_AFTER_QUIET_MAX,
            STALL_DEADLINE,
        )
    }

    pub fn with_limits(
        now: Instant,
        min_quiet: Duration,
        max_quiet: Duration,
        deadline: Duration,
    ) -> Self {
        Self {
            last_received: now,
            ping_sent: None,
            quiet: min_quiet,
            min_quiet,
            max_quiet,
            deadline,
        }
    }

    /// A frame other than the answer to a keepalive ping arrived.
    pub fn traffic(&mut self, now: Instant) {
        self.last_received = now;
        self.ping_sent = None;
        self.quiet = self.min_quiet;
    }

    /// The answer to a keepalive ping arrived: the connection is alive and idle.
    pub fn pong(&mut self, now: Instant) {
        self.last_received = now;
        self.ping_sent = None;
        self.quiet = (self.quiet * 2).min(self.max_quiet);
    }

    pub fn ping_sent(&mut self, now: Instant) {
        self.ping_sent = Some(now);
    }

    pub fn check(&self, now: Instant) -> Check {
        match self.ping_sent {
            Some(sent) => {
                let dead_at = sent + self.deadline;
                if now >= dead_at {
                    Check::Dead {
                        silent: now.saturating_duration_since(self.last_received),
                    }
                } else {
                    Check::Wait { next: dead_at }
                }
            }
            None => {
                let ping_at = self.last_received + self.quiet;
                if now >= ping_at {
                    Check::Ping
                } else {
                    Check::Wait { next: ping_at }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_quiet_connection_is_pinged_and_declared_dead_when_nothing_comes_back() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0);
        assert_eq!(
            l.check(t0),
            Check::Wait {
                next: t0 + PING_AFTER_QUIET_MIN
            }
        );
        assert_eq!(l.check(t0 + PING_AFTER_QUIET_MIN), Check::Ping);
        l.ping_sent(t0 + PING_AFTER_QUIET_MIN);
        let dead_at = t0 + PING_AFTER_QUIET_MIN + STALL_DEADLINE;
        assert_eq!(l.check(dead_at - S / 10), Check::Wait { next: dead_at });
        assert_eq!(
            l.check(dead_at),
            Check::Dead {
                silent: PING_AFTER_QUIET_MIN + STALL_DEADLINE
            }
        );
    }

    #[test]
    fn traffic_after_a_ping_keeps_the_connection_alive() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0);
        l.ping_sent(t0 + S);
        // A backlog frame (not the pong) arrives: that proves the path works too.
        l.traffic(t0 + 2 * S);
        assert_eq!(
            l.check(t0 + 2 * S),
            Check::Wait {
                next: t0 + 2 * S + PING_AFTER_QUIET_MIN
            }
        );
        assert!(!matches!(l.check(t0 + 5 * S), Check::Dead { .. }));
    }

    #[test]
    fn an_idle_connection_pings_less_and_less_often_up_to_the_maximum() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0);
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            let Check::Wait { next } = l.check(now) else {
                panic!("should wait")
            };
            gaps.push((next - now).as_secs());
            now = next;
            assert_eq!(l.check(now), Check::Ping);
            l.ping_sent(now);
            l.pong(now);
        }
        assert_eq!(gaps, vec![1, 2, 4, 6, 6, 6]);
        // Real traffic brings back the short silence.
        l.traffic(now);
        assert_eq!(
            l.check(now),
            Check::Wait {
                next: now + PING_AFTER_QUIET_MIN
            }
        );
    }

    #[test]
    fn a_stall_on_an_idle_connection_is_noticed_within_the_documented_bound() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0);
        let mut now = t0;
        // Idle long enough to reach the longest silence.
        for _ in 0..5 {
            let Check::Wait { next } = l.check(now) else {
                panic!()
            };
            now = next;
            l.ping_sent(now);
            l.pong(now);
        }
        let stalled_at = now;
        // From here nothing arrives.
        loop {
            match l.check(now) {
                Check::Wait { next } => now = next,
                Check::Ping => l.ping_sent(now),
                Check::Dead { .. } => break,
            }
        }
        assert!(now - stalled_at <= PING_AFTER_QUIET_MAX + STALL_DEADLINE);
        assert!(
            PING_AFTER_QUIET_MAX + STALL_DEADLINE + crate::timeouts::RACE_STAGGER * 8 <= 15 * S
        );
    }
}
