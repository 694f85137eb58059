//! Racing routes: Happy Eyeballs (RFC 8305) for relays.
//!
//! Trying routes one after another makes the user wait out every black-holed route's
//! timeout before the one that works. Instead the most promising route starts at once and
//! each further route starts [`RacePolicy::stagger`] after the previous one while earlier
//! attempts are still pending, at most [`RacePolicy::max_in_flight`] at a time. A route
//! that fails (refused, unreachable, or a stage timeout) starts the next one immediately.
//! The first attempt that completes wins; every other attempt is dropped, which cancels
//! it (its socket is closed), and reported as abandoned at the stage it had reached.
//!
//! The race is generic over what an attempt produces, so it is tested with a paused
//! clock and fake attempts, without sockets.

use std::future::Future;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use super::route::{DialReport, Failure, Progress, Route, Stage};
use crate::timeouts::{RACE_MAX_IN_FLIGHT, RACE_STAGGER};

/// How routes are started.
#[derive(Debug, Clone, Copy)]
pub struct RacePolicy {
    /// Delay before the next route starts while earlier ones are pending.
    pub stagger: Duration,
    /// Attempts running at once.
    pub max_in_flight: usize,
}

impl Default for RacePolicy {
    fn default() -> Self {
        Self {
            stagger: RACE_STAGGER,
            max_in_flight: RACE_MAX_IN_FLIGHT,
        }
    }
}

/// How a race ended.
#[derive(Debug)]
pub struct RaceOutcome<T> {
    /// The route that won and what its attempt produced.
    pub winner: Option<(Route, T)>,
    /// Every attempt that was started, in the order they were started.
    pub attempts: Vec<DialReport>,
}

/// Races `routes` (best first) under `policy`. `attempt` opens one route, recording its
/// stages in the [`Progress`] it is given.
pub async fn race<T, F, Fut>(
    routes: Vec<Route>,
    policy: RacePolicy,
    mut attempt: F,
) -> RaceOutcome<T>
where
    F: FnMut(Route, Progress) -> Fut,
    Fut: Future<Output = Result<T, (Stage, Failure)>>,
{
    let started = Instant::now();
    let max_in_flight = policy.max_in_flight.max(1);
    let mut progress: Vec<Progress> = Vec::with_capacity(routes.len());
    let mut running = FuturesUnordered::new();
    let mut next = 0;
    let mut winner = None;
    let mut winner_index = None;

    let mut start_next =
        |running: &mut FuturesUnordered<_>, progress: &mut Vec<Progress>, next: &mut usize| {
            let route: Route = routes[*next].clone();
            let p = Progress::new(&route);
            p.set_started(started.elapsed());
            progress.push(p.clone());
            let index = *next;
            let fut = attempt(route, p);
            running.push(async move { (index, fut.await) });
            *next += 1;
        };

    if !routes.is_empty() {
        start_next(&mut running, &mut progress, &mut next);
    }
    let stagger = tokio::time::sleep(policy.stagger);
    tokio::pin!(stagger);
    loop {
        let can_start = next < routes.len() && running.len() < max_in_flight;
        if running.is_empty() && !can_start {
            break;
        }
        tokio::select! {
            Some((index, result)) = running.next(), if !running.is_empty() => match result {
                Ok(value) => {
                    winner = Some((routes[index].clone(), value));
                    winner_index = Some(index);
                    break;
                }
                Err((stage, failure)) => {
                    progress[index].fail(stage, failure);
                    // A failure frees its slot now: do not make the user wait for the
                    // stagger.
                    if next < routes.len() {
                        start_next(&mut running, &mut progress, &mut next);
                        stagger.as_mut().reset(Instant::now() + policy.stagger);
                    }
                }
            },
            () = &mut stagger, if can_start => {
                start_next(&mut running, &mut progress, &mut next);
                stagger.as_mut().reset(Instant::now() + policy.stagger);
            }
        }
    }
    // Dropping the losers cancels them.
    drop(running);
    let attempts = progress
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if winner_index != Some(i) {
                p.abandon(routes[i].tls());
            }
            p.report()
        })
        .collect();
    RaceOutcome { winner, attempts }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn route(n: u16) -> Route {
        Route::Direct {
            address: format!("127.0.0.1:{n}"),
        }
    }

    /// What a fake attempt does: after `after`, succeed or fail with `failure`.
    #[derive(Clone)]
    struct Plan {
        after: Duration,
        failure: Option<Failure>,
    }

    fn ok_after(ms: u64) -> Plan {
        Plan {
            after: Duration::from_millis(ms),
            failure: None,
        }
    }

    fn fail_after(ms: u64, failure: Failure) -> Plan {
        Plan {
            after: Duration::from_millis(ms),
            failure: Some(failure),
        }
    }

    /// Counts attempts dropped before they finished.
    struct DropGuard(Arc<AtomicUsize>, bool);
    impl DropGuard {
        fn finished(&mut self) {
            self.1 = true;
        }
    }
    impl Drop for DropGuard {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    async fn run(plans: Vec<Plan>, policy: RacePolicy) -> (RaceOutcome<u16>, usize) {
        let cancelled = Arc::new(AtomicUsize::new(0));
        let routes: Vec<Route> = (0..plans.len() as u16).map(route).collect();
        let c = cancelled.clone();
        let outcome = race(routes, policy, move |r, _progress| {
            let n = match &r {
                Route::Direct { address } => {
                    address.rsplit(':').next().unwrap().parse::<u16>().unwrap()
                }
                Route::Relay(_) => unreachable!(),
            };
            let plan = plans[n as usize].clone();
            let mut guard = DropGuard(c.clone(), false);
            async move {
                tokio::time::sleep(plan.after).await;
                guard.finished();
                match plan.failure {
                    None => Ok(n),
                    Some(f) => Err((Stage::Connect, f)),
                }
            }
        })
        .await;
        (outcome, cancelled.load(Ordering::SeqCst))
    }

    fn starts(o: &RaceOutcome<u16>) -> Vec<u128> {
        o.attempts.iter().map(|a| a.started.as_millis()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_best_route_starts_at_once_and_a_fast_one_wins_alone() {
        let (o, cancelled) = run(vec![ok_after(40), ok_after(10)], RacePolicy::default()).await;
        assert_eq!(o.winner.as_ref().map(|w| w.1), Some(0));
        assert_eq!(starts(&o), vec![0], "the second route never started");
        assert_eq!(cancelled, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_routes_are_staggered_and_the_first_to_finish_wins() {
        // Route 0 and 1 hang (black holes); route 2 answers 30 ms after it starts.
        let (o, cancelled) = run(
            vec![
                ok_after(60_000),
                ok_after(60_000),
                ok_after(30),
                ok_after(5),
            ],
            RacePolicy::default(),
        )
        .await;
        assert_eq!(o.winner.as_ref().map(|w| w.1), Some(2));
        assert_eq!(starts(&o), vec![0, 250, 500], "route 3 never started");
        assert_eq!(cancelled, 2, "both hanging attempts were dropped");
        assert_eq!(o.attempts[0].abandoned, Some(Stage::Resolve));
        assert_eq!(o.attempts[2].abandoned, None);
        assert!(o.attempts[2].failed.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_failure_starts_the_next_route_immediately() {
        let (o, _) = run(
            vec![
                fail_after(20, Failure::Refused),
                fail_after(10, Failure::Refused),
                ok_after(10),
            ],
            RacePolicy::default(),
        )
        .await;
        assert_eq!(o.winner.as_ref().map(|w| w.1), Some(2));
        assert_eq!(starts(&o), vec![0, 20, 30]);
        assert_eq!(
            o.attempts[0].failed,
            Some((Stage::Connect, Failure::Refused))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_limit_run_at_once() {
        let policy = RacePolicy {
            stagger: Duration::from_millis(100),
            max_in_flight: 2,
        };
        // Both first routes time out after 1 s; only then may the third start.
        let (o, _) = run(
            vec![
                fail_after(1000, Failure::TimedOut),
                fail_after(1000, Failure::TimedOut),
                ok_after(10),
            ],
            policy,
        )
        .await;
        assert_eq!(o.winner.as_ref().map(|w| w.1), Some(2));
        assert_eq!(starts(&o), vec![0, 100, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_route_fails_each_failure_is_reported_in_start_order() {
        let (o, _) = run(
            vec![
                fail_after(5000, Failure::TimedOut),
                fail_after(1, Failure::Refused),
            ],
            RacePolicy::default(),
        )
        .await;
        assert!(o.winner.is_none());
        assert_eq!(o.attempts.len(), 2);
        assert_eq!(
            o.attempts[0].failed,
            Some((Stage::Connect, Failure::TimedOut))
        );
        assert_eq!(
            o.attempts[1].failed,
            Some((Stage::Connect, Failure::Refused))
        );
        let (o, _) = run(vec![], RacePolicy::default()).await;
        assert!(o.winner.is_none() && o.attempts.is_empty());
    }
}
