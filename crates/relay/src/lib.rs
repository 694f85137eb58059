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
//! A connection's life ([`listener`]): the accept loop enforces `maxconn` ([`limits`]);
//! then, under one handshake deadline, an optional PROXY header is read ([`proxy_header`]),
//! the per-source limit applied, TLS terminated ([`tls`]), and either a pool server chosen
//! ([`upstream`]: round-robin / least-connections over healthy servers, failover on connect
//! errors, active and passive health checks) or the ClientHello read and its SNI matched
//! against the allow-list ([`sni`]). Finally the handshake task hands the connection to a
//! task of its own that copies bytes both ways under idle and half-close timeouts
//! ([`copy`]): bursts between plain sockets are spliced in the kernel ([`splice`]), and no
//! buffer — copy, pipe or TLS record — is held while a connection is idle ([`tls_stream`]).
//! The relay never connects anywhere except pool servers and allow-listed names.
//!
//! Modules, one concept each:
//! * [`config`] — the TOML model ([`config::RelayConfig`]); [`presets`] — built-in configs
//!   (and [`presets::postern_on`] to embed a relay, e.g. in `postern dev`).
//! * [`relay`] — [`Relay::start`] binds everything and returns a [`RunningRelay`].
//! * [`listener`], [`copy`], [`stream`] — per-connection handling.
//! * [`splice`] — kernel-to-kernel forwarding through pooled pipes (Linux).
//! * [`tls`], [`proxy_header`], [`sni`] — the three handshakes a relay can do;
//!   [`tls_stream`] — TLS on rustls's unbuffered API, so idle connections keep no TLS buffers.
//! * [`upstream`] — pools, resolver, health checks; [`limits`] — maxconn, per-source limit.
//! * [`stats`], [`stats_page`] — counters, `/metrics`, `/healthz`, and the HTML status page.
//! * [`link`] — `postern://proxy?...` links; [`cli`] — `postern relay [link]`.
//!
//! Nothing is written to disk: a generated certificate lives in memory. Client addresses are
//! logged only when the operator opts in.

#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod copy;
pub mod limits;
pub mod link;
pub mod listener;
pub mod presets;
pub mod proxy_header;
pub mod relay;
pub mod sni;
pub mod splice;
pub mod stats;
pub mod stats_page;
pub mod stream;
pub mod tls;
pub mod tls_stream;
pub mod upstream;

pub use config::RelayConfig;
pub use link::ProxyLink;
pub use listener::ListenerKind;
pub use relay::{Relay, RelayError, RunningRelay};
