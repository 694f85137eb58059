//! Scaffolding for Postern's tests and benchmarks (never shipped: `publish = false`, a
//! dev-dependency of the crates that test, and a dependency only of the benchmark tools
//! and the testbed's prober, which are themselves never published).
//!
//! * [`process`]: start a `postern` process and wait for the line that says it is ready,
//!   keeping its output drained so it never blocks on a full pipe.
//! * [`tls`]: TLS ClientHello bytes for SNI tests and the testbed's prober.
//! * [`pebble`]: Let's Encrypt's test CA on loopback, for the relay's ACME tests.
//! * [`apt`]: the Debian packages a test needs, installed when missing (as root).

pub mod apt;
pub mod pebble;
pub mod postgres;
pub mod process;
pub mod tls;
