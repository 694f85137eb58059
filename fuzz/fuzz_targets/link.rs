//! Proxy links and addresses users paste (`crates/protocol/src/link.rs`, and the client's
//! `postern proxy add ADDRESS|LINK` reader, `crates/client/src/proxy.rs`).
//!
//! Asserts, for any text:
//! * a link that parses has a non-empty lower-case host, a port in 1–65535 and a media port
//!   that is not 0; its canonical form (`Display`) parses back to the same link and is a
//!   fixed point;
//! * an address the client accepts has a valid host and a non-zero port, and survives the
//!   ways the client writes it back: as `host:port` (`address()`) and as a link
//!   (`to_link()`, what `postern proxy list` shares) — both read back to the same relay.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_client::proxy::ProxyEntry;
use postern_protocol::link::{is_valid_dns_name, ProxyLink};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = is_valid_dns_name(text);

    if let Ok(link) = text.parse::<ProxyLink>() {
        assert!(!link.host.is_empty());
        assert_eq!(link.host, link.host.to_ascii_lowercase());
        assert_ne!(link.port, 0);
        assert_ne!(link.media, Some(0));
        let canonical = link.to_string();
        let back: ProxyLink = canonical
            .parse()
            .unwrap_or_else(|e| panic!("canonical link {canonical:?} does not parse: {e}"));
        assert_eq!(back, link);
        assert_eq!(back.to_string(), canonical);
    }

    if let Ok(entry) = ProxyEntry::parse(text) {
        assert!(!entry.host.is_empty());
        assert_ne!(entry.port, 0);
        let address = entry.address();
        let again = ProxyEntry::parse(&address)
            .unwrap_or_else(|e| panic!("address {address:?} of {text:?} does not parse: {e}"));
        assert_eq!((&again.host, again.port), (&entry.host, entry.port));
        let link = entry.to_link().to_string();
        let via_link = ProxyEntry::parse(&link)
            .unwrap_or_else(|e| panic!("link {link:?} of {text:?} does not parse: {e}"));
        assert_eq!(via_link, entry, "link {link:?}");
    }
});
