//! Forwarding: moving bytes both ways once a connection is prepared.
//!
//! * [`copy`] — the relaying future for one connection (idle and half-close timeouts, a
//!   per-thread scratch buffer so idle connections hold no copy buffer, refusing a PROXY
//!   header smuggled inside a client's stream);
//! * [`splice`] — kernel-to-kernel forwarding through pooled pipes between plain sockets
//!   (Linux);
//! * [`park`] — quiet connections leave the runtime: their sockets wait in one epoll set
//!   until bytes come, instead of each holding a task and two registrations.
//!
//! Nothing here knows about listeners, TLS or routes.

pub mod copy;
pub mod park;
pub mod splice;
