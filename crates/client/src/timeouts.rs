//! Every time limit the client applies, named once.
//!
//! A route is tried stage by stage (resolve, TCP connect, TLS, the Noise handshake) and
//! each stage has its own bound, so a black-holed path costs at most that stage's limit
//! and the failure names the stage. Routes are raced (see `connector::race`), so these
//! bounds decide when a route is given up, not how long the user waits: the user waits for
//! the fastest route that works.

use std::time::Duration;

/// Resolving the host name of a route.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The TCP connection to one address of a route.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The TLS handshake with a TLS relay.
pub const TLS_TIMEOUT: Duration = Duration::from_secs(5);
/// The Noise handshake with the server once the byte stream is open.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(8);
/// One request's answer (send, key claim, key upload, sync).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Racing: the next route starts this long after the previous one if neither has
/// finished (Happy Eyeballs, RFC 8305, recommends 250 ms between attempts).
pub const RACE_STAGGER: Duration = Duration::from_millis(250);
/// Racing: at most this many routes are being tried at once.
pub const RACE_MAX_IN_FLIGHT: usize = 6;

/// Keepalive: after traffic, the client pings once the connection has been silent this
/// long; each ping answered with no other traffic doubles the silence allowed before the
/// next one, up to [`PING_AFTER_QUIET_MAX`].
pub const PING_AFTER_QUIET_MIN: Duration = Duration::from_secs(1);
/// Keepalive: the longest silence before a ping (an idle connection pings this often).
pub const PING_AFTER_QUIET_MAX: Duration = Duration::from_secs(6);
/// Stall detection: a connection on which a ping has gone unanswered, and nothing else
/// has arrived, for this long is dead (a censor may freeze a flow without a reset). So a
/// stall is noticed within `PING_AFTER_QUIET_MAX + STALL_DEADLINE` (11 s), and a new
/// connection is raced at once.
pub const STALL_DEADLINE: Duration = Duration::from_secs(5);

/// Reconnecting after a drop, or when no route works: exponential back-off between these
/// bounds, with jitter.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// While connected, routes that failed are checked again this often, so the next
/// fail-over starts with one that works.
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(60);
