//! Scaffolding for Postern's tests and benchmarks (never shipped: `publish = false`, a
//! dev-dependency of the crates that test, and a dependency only of the benchmark tools
//! and the testbed's prober, which are themselves never published).
//!
//! * [`process`]: start a `postern` process and wait for the line that says it is ready,
//!   keeping its output drained so it never blocks on a full pipe.
//! * [`tls`]: TLS ClientHello bytes for SNI tests and the testbed's prober.
//! * [`pebble`]: Let's Encrypt's test CA on loopback, for the relay's ACME tests.
//! * [`apt`]: the Debian packages a test needs, installed when missing (as root).
//! * `s3` (feature `s3`): an S3-compatible object store on loopback (s3s-fs), for the
//!   server's media store on object storage.

pub mod apt;
pub mod pebble;
pub mod postgres;
pub mod process;
#[cfg(feature = "s3")]
pub mod s3;
pub mod tls;

/// A loopback port free at the time of asking (for programs that cannot report the port
/// they bound, and for a listener a test must name before it exists). Another program may
/// take it in between: callers check that what answers there is what they started.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local address").port()
}
