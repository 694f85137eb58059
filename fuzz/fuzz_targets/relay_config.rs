//! The relay's TOML configuration (`crates/relay/src/config.rs`: `postern relay --config`),
//! with its duration and `host:port` readers.
//!
//! Asserts, for any text: parsing and validation never panic; a configuration that
//! validates has at least one enabled listener, limits in their documented ranges,
//! durations that can be added to the clock (the relay computes deadlines from them),
//! only `host:port` servers the same reader accepts, and links (`postern relay link
//! --config`, for listeners on a fixed port) that parse back to themselves;
//! `parse_duration` and `split_host_port` take any line of the text without panicking,
//! and a `host:port` they accept is well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_protocol::link::ProxyLink;
use postern_relay::cli::links_for;
use postern_relay::config::{parse_duration, split_host_port, RelayConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines().take(64) {
        let _ = parse_duration(line);
        if let Ok((host, port)) = split_host_port(line) {
            assert!(!host.is_empty());
            assert_ne!(port, 0);
        }
    }
    let Ok(cfg) = RelayConfig::from_toml_str(text) else {
        return;
    };
    if cfg.validate().is_err() {
        return;
    }
    assert!(cfg.listeners.iter().any(|l| l.enabled));
    let l = &cfg.limits;
    assert!(l.maxconn >= 1);
    assert!((512..=1 << 20).contains(&l.buffer_size));
    assert!((512..=64 * 1024).contains(&l.max_client_hello));
    // The relay adds these to the clock (deadlines): a validated value must not overflow it.
    let now = std::time::Instant::now();
    let durations = [
        l.connect_timeout,
        l.idle_timeout,
        l.half_close_timeout,
        l.handshake_timeout,
        l.shutdown_grace,
    ];
    let checks = cfg.pools.values().map(|p| p.health_check_interval);
    for d in durations.into_iter().chain(checks) {
        assert!(
            now.checked_add(d).and_then(|t| t.checked_add(d)).is_some(),
            "validated duration {d:?} overflows a deadline"
        );
    }
    for pool in cfg.pools.values() {
        assert!(!pool.servers.is_empty());
        for s in &pool.servers {
            assert!(split_host_port(s).is_ok());
        }
    }
    // Port 0 (an ephemeral port, for tests) has no link; every other listener has one.
    for (_, link) in links_for(&cfg, "relay.example.org") {
        if link.port == 0 || link.media == Some(0) {
            continue;
        }
        let text = link.to_string();
        assert_eq!(text.parse::<ProxyLink>().ok(), Some(link), "{text}");
    }
});
