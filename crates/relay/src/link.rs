//! Proxy links (`postern://proxy?host=H&port=443&tls=1[&media=587]`).
//!
//! The format is shared with the client, which imports these links, so it is defined
//! once in `postern_protocol::link`; this module re-exports it for the relay's users.

pub use postern_protocol::link::*;
