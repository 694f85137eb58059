//! Accepting clients: everything that happens to a connection before its bytes are
//! forwarded.
//!
//! ```text
//!  accept loop ─► PROXY header ─► per-source limit ─► TLS ─► secret gate ─► route: pool or SNI ─► forward
//!  (maxconn)      (proxy_header)   (limits)            (tls)   (gate)   │      (sni)
//!                                                                       └─► cover site
//! ```
//!
//! * [`listener`] — the accept loop and the per-connection handshake pipeline above, under
//!   one handshake deadline; it hands the prepared pair of streams to [`crate::forward`].
//! * [`limits`] — `maxconn` and the per-source limit.
//! * [`proxy_header`] — the PROXY protocol (the one parser, from the protocol crate).
//! * [`acme`] — certificates from an ACME CA (`[tls.acme]`, Let's Encrypt): the resolver,
//!   the TLS-ALPN-01 challenge, and the background task that orders and renews.
//! * [`tls`] — certificates (files or generated) and the server configuration;
//!   [`tls_stream`] — TLS on rustls's unbuffered API, so idle connections keep no TLS
//!   buffers.
//! * [`gate`] — on a relay with a secret: the client's proof (a token in the TLS session, or
//!   an HTTP request on a plain port), and the hand-over to [`crate::cover`] for everyone else.
//! * [`sni`] — reading a ClientHello's server name and matching it against an allow-list.

pub mod acme;
pub mod gate;
pub mod limits;
pub mod listener;
pub mod proxy_header;
pub mod sni;
pub mod tls;
pub mod tls_stream;
