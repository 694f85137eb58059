//! The censorship testbed's own programs (see `docs/testbed.md`):
//!
//! * `postern-censor`: a modelled censor — nftables drop rules for addresses and ports, and
//!   inspection of each new TCP flow's first client data by a transparent interceptor
//!   ([`classify`], [`profile`]), or flows that go silent after a number of bytes to the
//!   client ([`freeze`]); under `sni-block` and `ja4-block` the interceptor reads the
//!   whole TLS ClientHello and blocks by its server name or JA4 ([`fingerprint`]);
//! * `postern-prober`: an active prober in the style of Frolov et al. (NDSS 2020) that
//!   records how each relay port answers and closes ([`probe`]).

pub mod classify;
pub mod fingerprint;
pub mod freeze;
pub mod probe;
pub mod profile;
