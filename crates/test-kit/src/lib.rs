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
///
/// The port is chosen below the system's ephemeral range (`ip_local_port_range`), where
/// neither outgoing connections nor listeners bound to port 0 get their ports: a port from
/// inside that range (what binding port 0 gives) was sometimes taken by another test's
/// outgoing connection before the program it was meant for could listen on it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Successive calls in one process walk a permutation of the range, so they never return
    // the same port; each process starts elsewhere in it, so parallel test binaries rarely
    // try the same ports.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u16 = 11_000;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > FIRST + 1_000 {
        let span = u32::from(low - FIRST);
        let start = std::process::id().wrapping_mul(2_654_435_761) % span;
        for _ in 0..span {
            let i = NEXT.fetch_add(1, Ordering::Relaxed);
            // 7,919 is prime, so unless the span is a multiple of it the walk visits every
            // port (if it is, it visits some; past them comes the fallback below).
            let port = FIRST + ((start + i.wrapping_mul(7_919)) % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local address").port()
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| super::free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            ports.len(),
            "a port was handed out twice: {ports:?}"
        );
        for p in ports {
            assert!(p < 32_768, "{p} is in the usual ephemeral range");
            std::net::TcpListener::bind(("127.0.0.1", p)).expect("free port not bindable");
        }
    }
}
