//! What the client remembers about each route, across runs, and the order routes are
//! tried in.
//!
//! Outcomes are kept in the profile's database (`route_health`), so a client that starts
//! in a censored network begins with the route that worked last time instead of
//! rediscovering it. The order, best first:
//!
//! 1. routes whose last outcome was a success, the most recent first (so the route that
//!    worked last leads);
//! 2. routes never tried, in the user's order (in mode `auto`: direct, then the relays as
//!    saved);
//! 3. routes whose last attempt failed, the longest ago first (they may have recovered).
//!
//! A relay whose far end failed the server's authentication is **hostile** and is left
//! out until a check through it succeeds again (`proxy check`) or the user saves it again.
//! With several server addresses in the network file (several nodes of one service) each
//! is a direct route of its own: a node that died fails its attempt, goes last, and the
//! race moves on to the next at once.
//! The direct route is never left out (an impostor on one network must not cut the user
//! off the service for good); it only goes last, like any route that failed.
//! The proxy mode decides what is allowed at all: `off` never yields a relay, `on` never
//! yields the direct route.

use std::collections::HashMap;

use serde::Serialize;

use super::route::Route;
use crate::proxy::ProxyMode;

/// The remembered outcomes of one route (times in ms since the Unix epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteHealth {
    pub last_ok_ms: Option<u64>,
    pub last_failure_ms: Option<u64>,
    /// Why it failed last, in the user's words.
    pub last_failure: Option<String>,
    /// How long its last successful connection took to establish.
    pub last_latency_ms: Option<u64>,
    pub hostile: bool,
}

impl RouteHealth {
    /// The last attempt through this route succeeded.
    pub fn worked_last(&self) -> bool {
        self.last_ok_ms.is_some() && self.last_ok_ms >= self.last_failure_ms
    }

    fn failed_last(&self) -> bool {
        self.last_failure_ms.is_some() && self.last_failure_ms > self.last_ok_ms
    }
}

pub type HealthMap = HashMap<Route, RouteHealth>;

/// What one attempt through a route taught.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteOutcome {
    /// The connection was established (this also clears a hostile mark: the far end
    /// proved the server's identity).
    Worked {
        latency_ms: u64,
    },
    Failed {
        reason: String,
        hostile: bool,
    },
}

/// Whether `route` is left out of races: a relay found hostile. The direct route never is.
fn is_excluded(route: &Route, health: &HealthMap) -> bool {
    matches!(route, Route::Relay(_)) && health.get(route).is_some_and(|h| h.hostile)
}

/// The relays left out of races because they failed the server's authentication.
pub fn hostile(health: &HealthMap) -> Vec<Route> {
    health
        .keys()
        .filter(|r| is_excluded(r, health))
        .cloned()
        .collect()
}

/// The routes `mode` allows, best first (see the module documentation).
pub fn order(
    mode: ProxyMode,
    direct: Vec<Route>,
    relays: Vec<Route>,
    health: &HealthMap,
) -> Vec<Route> {
    let allowed: Vec<Route> = match mode {
        ProxyMode::Off => direct,
        ProxyMode::On => relays,
        ProxyMode::Auto => direct.into_iter().chain(relays).collect(),
    };
    let mut routes: Vec<(usize, Route)> = allowed
        .into_iter()
        .filter(|r| !is_excluded(r, health))
        .enumerate()
        .collect();
    routes.sort_by_key(|(position, r)| match health.get(r) {
        Some(h) if h.worked_last() => (0, u64::MAX - h.last_ok_ms.unwrap_or(0), *position),
        Some(h) if h.failed_last() => (2, h.last_failure_ms.unwrap_or(0), *position),
        _ => (1, 0, *position),
    });
    routes.into_iter().map(|(_, r)| r).collect()
}

/// The route whose last success is the most recent.
pub fn last_worked(health: &HealthMap) -> Option<Route> {
    health
        .iter()
        .filter(|(_, h)| h.worked_last() && !h.hostile)
        .max_by_key(|(_, h)| h.last_ok_ms)
        .map(|(r, _)| r.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ProxyEntry;

    fn direct() -> Route {
        Route::Direct {
            address: "chat.example:5222".into(),
        }
    }

    fn relay(n: u16) -> Route {
        Route::Relay(ProxyEntry {
            host: "relay.example".into(),
            port: n,
            tls: false,
            secret: None,
            sni: Default::default(),
            media: None,
        })
    }

    fn ok_at(ms: u64) -> RouteHealth {
        RouteHealth {
            last_ok_ms: Some(ms),
            ..Default::default()
        }
    }

    fn failed_at(ms: u64) -> RouteHealth {
        RouteHealth {
            last_failure_ms: Some(ms),
            last_failure: Some("timed out".into()),
            ..Default::default()
        }
    }

    #[test]
    fn the_mode_decides_what_is_tried_at_all() {
        let relays = vec![relay(1), relay(2)];
        let h = HealthMap::new();
        assert_eq!(
            order(ProxyMode::Off, vec![direct()], relays.clone(), &h),
            vec![direct()]
        );
        assert_eq!(
            order(ProxyMode::On, vec![direct()], relays.clone(), &h),
            relays
        );
        assert_eq!(
            order(ProxyMode::Auto, vec![direct()], relays, &h),
            vec![direct(), relay(1), relay(2)]
        );
        // Even a direct route that worked last is not tried in mode on.
        let h = HealthMap::from([(direct(), ok_at(100))]);
        assert!(!order(ProxyMode::On, vec![direct()], vec![relay(1)], &h).contains(&direct()));
    }

    #[test]
    fn what_worked_goes_first_and_what_failed_goes_last() {
        let h = HealthMap::from([
            (direct(), failed_at(500)),
            (relay(1), failed_at(400)),
            (relay(3), ok_at(300)),
            (relay(4), ok_at(350)),
        ]);
        let routes = order(
            ProxyMode::Auto,
            vec![direct()],
            vec![relay(1), relay(2), relay(3), relay(4)],
            &h,
        );
        assert_eq!(
            routes,
            vec![relay(4), relay(3), relay(2), relay(1), direct()],
            "worked (latest first), untried, failed (oldest failure first)"
        );
        assert_eq!(last_worked(&h), Some(relay(4)));
    }

    #[test]
    fn a_route_that_recovered_counts_as_working_and_hostile_ones_are_left_out() {
        let mut recovered = failed_at(100);
        recovered.last_ok_ms = Some(200);
        let hostile = RouteHealth {
            hostile: true,
            ..ok_at(900)
        };
        let h = HealthMap::from([(relay(1), recovered), (relay(2), hostile)]);
        assert_eq!(
            order(
                ProxyMode::On,
                vec![direct()],
                vec![relay(2), relay(1), relay(3)],
                &h
            ),
            vec![relay(1), relay(3)]
        );
        assert_eq!(last_worked(&h), Some(relay(1)));
    }

    #[test]
    fn with_several_server_addresses_a_dead_node_goes_last() {
        let node = |n: u16| Route::Direct {
            address: format!("node{n}.example:5222"),
        };
        let nodes = vec![node(1), node(2), node(3)];
        let h = HealthMap::from([(node(1), failed_at(900)), (node(2), ok_at(100))]);
        assert_eq!(
            order(ProxyMode::Off, nodes.clone(), vec![relay(1)], &h),
            vec![node(2), node(3), node(1)]
        );
        assert_eq!(
            order(ProxyMode::Auto, nodes, vec![relay(1)], &HealthMap::new()),
            vec![node(1), node(2), node(3), relay(1)]
        );
    }
}
