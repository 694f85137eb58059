//! The connection banner: what a person is told about the connection, folded from the
//! client's events. Kept apart from the web code so the wording rules are tested alone.

use postern_client::{Event, Stage};
use serde::Serialize;

/// One route that did not work, and where it stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteFailure {
    pub route: String,
    pub stage: Stage,
    /// The stage in words ("TCP connect").
    pub stage_text: String,
    pub reason: String,
}

/// The state the banner shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ConnectionStatus {
    /// No account yet (onboarding).
    NoAccount,
    /// Racing the routes. `failures` are the routes that already failed in this race;
    /// `lost` says why the previous connection ended, if one did.
    Connecting {
        failures: Vec<RouteFailure>,
        lost: Option<String>,
    },
    /// Connected; the server proved its identity.
    Connected { via: String, relay: bool, tls: bool },
    /// No route worked; another race starts after `retry_in_ms`.
    Offline {
        failures: Vec<RouteFailure>,
        retry_in_ms: u64,
    },
}

impl ConnectionStatus {
    /// The banner after `event`, or `None` if the event does not change it.
    pub fn after(&self, event: &Event) -> Option<ConnectionStatus> {
        let next = match event {
            Event::Connecting => ConnectionStatus::Connecting {
                failures: Vec::new(),
                lost: match self {
                    ConnectionStatus::Connecting { lost, .. } => lost.clone(),
                    _ => None,
                },
            },
            Event::Connected {
                via, relay, tls, ..
            } => ConnectionStatus::Connected {
                via: via.clone(),
                relay: *relay,
                tls: *tls,
            },
            Event::Disconnected { reason } => ConnectionStatus::Connecting {
                failures: Vec::new(),
                lost: Some(reason.clone()),
            },
            Event::AttemptFailed {
                route,
                stage,
                reason,
                ..
            } => match self {
                // A relay re-checked in the background while connected changes nothing.
                ConnectionStatus::Connecting { failures, lost } => {
                    let mut failures = failures.clone();
                    failures.push(failure(route, *stage, reason));
                    ConnectionStatus::Connecting {
                        failures,
                        lost: lost.clone(),
                    }
                }
                _ => return None,
            },
            Event::Unreachable {
                attempts,
                retry_in_ms,
                ..
            } => ConnectionStatus::Offline {
                failures: attempts
                    .iter()
                    .filter_map(|a| {
                        let (stage, f) = a.failed.as_ref()?;
                        Some(failure(&a.route, *stage, &f.to_string()))
                    })
                    .collect(),
                retry_in_ms: *retry_in_ms,
            },
            _ => return None,
        };
        (next != *self).then_some(next)
    }
}

fn failure(route: &str, stage: Stage, reason: &str) -> RouteFailure {
    RouteFailure {
        route: route.to_string(),
        stage,
        stage_text: stage.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connecting() -> ConnectionStatus {
        ConnectionStatus::Connecting {
            failures: vec![],
            lost: None,
        }
    }

    #[test]
    fn a_race_collects_failures_then_connects() {
        let s = connecting();
        let s = s
            .after(&Event::AttemptFailed {
                route: "127.0.0.1:1 (direct)".into(),
                stage: Stage::Connect,
                reason: "connection refused".into(),
                hostile: false,
            })
            .unwrap();
        let ConnectionStatus::Connecting { failures, .. } = &s else {
            panic!("{s:?}")
        };
        assert_eq!(failures[0].stage_text, "TCP connect");
        let s = s
            .after(&Event::Connected {
                via: "r:443 (TLS)".into(),
                relay: true,
                tls: true,
                handshake_ms: 3,
            })
            .unwrap();
        assert!(matches!(
            s,
            ConnectionStatus::Connected {
                relay: true,
                tls: true,
                ..
            }
        ));
        // Background re-checks of other relays do not disturb a working connection.
        assert!(s
            .after(&Event::AttemptFailed {
                route: "x".into(),
                stage: Stage::Tls,
                reason: "r".into(),
                hostile: false
            })
            .is_none());
    }

    #[test]
    fn a_lost_connection_says_why_until_the_next_one() {
        let s = ConnectionStatus::Connected {
            via: "d".into(),
            relay: false,
            tls: false,
        };
        let s = s
            .after(&Event::Disconnected {
                reason: "stalled".into(),
            })
            .unwrap();
        let s = s.after(&Event::Connecting).unwrap_or(s);
        assert_eq!(
            s,
            ConnectionStatus::Connecting {
                failures: vec![],
                lost: Some("stalled".into())
            }
        );
    }
}
