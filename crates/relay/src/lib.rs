//! # postern-relay — the volunteer relay
//!
//! A relay lets people whose network blocks the Postern service reach it through a machine
//! run by a volunteer. It moves bytes and never needs a key: the chat protocol (Noise) is
//! end-to-end encrypted and authenticates the server through the relay.
//!
//! ## Design
//!
//! The model is HAProxy's, so the same binary can also front the reference messenger:
//!
//! ```text
//!  listeners ──────────────► routes ─────────────────────► upstreams
//!  port, TLS or not,         a fixed pool, or SNI           servers per pool, health-checked,
//!  PROXY header expected     routing to an allow-list       load-balanced, PROXY header sent
//! ```
//!
//! The crate's folders follow a connection through the relay:
//!
//! ```text
//!  config ──► accept ──────────────────────────────► forward ──► (stats count it all)
//!  TOML,      accept loop, PROXY header, limits,       copy both
//!  presets    TLS, SNI, route + upstream connect       ways, splice;
//!                                                      park when quiet
//! ```
//!
//! * [`config`] — the TOML model ([`RelayConfig`]) and built-in [`config::presets`]
//!   ([`config::presets::postern_on`] embeds a relay, e.g. in `postern dev`).
//! * [`accept`] — listeners and everything before relaying, under one handshake deadline.
//! * [`upstream`] — pools, resolver, health checks, load balancing.
//! * [`cover`] — on a relay with a secret, the web site everyone without the link gets.
//! * [`forward`] — the relaying itself: copy and splice, idle and half-close timeouts, and
//!   the parking lot where quiet connections wait without a task.
//! * [`stats`] — counters, `/metrics`, `/healthz`, and the HTML status page.
//! * [`stream`] — stream plumbing shared by `accept` and `forward`.
//! * [`Relay`] starts it all and returns a [`RunningRelay`]; [`link`] is the
//!   `postern://proxy?...` link format (shared with the client).
//!
//! The command line (`postern relay`) lives in the `postern` binary. The relay never
//! connects anywhere except pool servers, allow-listed names and, with `[tls.acme]`, its
//! ACME CA, and logs client addresses only when the operator opts in.

#![warn(missing_docs)]

pub mod accept;
pub mod config;
pub mod cover;
pub mod forward;
pub mod link;
mod relay;
pub mod stats;
pub mod stream;
pub mod upstream;

pub use accept::listener::ListenerKind;
pub use config::RelayConfig;
pub use link::ProxyLink;
pub use relay::{Relay, RelayError, RunningRelay};
