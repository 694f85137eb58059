//! SNI routing: read a TLS ClientHello (possibly spread over many TCP segments and several
//! TLS records), extract the server name and match it against an allow-list.
//!
//! Framing (records, handshake reassembly, size bound) is shared with the testbed's censor
//! ([`postern_protocol::client_hello`]); the ClientHello itself is parsed by the `tls-parser`
//! crate.

use postern_protocol::client_hello::{self, Framing, HelloError};
use std::net::IpAddr;
use tls_parser::{
    parse_tls_client_hello_extensions, parse_tls_message_handshake, SNIType, TlsExtension,
    TlsMessage, TlsMessageHandshake,
};
use tokio::io::AsyncRead;

/// Why a ClientHello was not usable for routing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SniError {
    /// The first bytes are not a TLS handshake record.
    #[error("not a TLS handshake")]
    NotTls,
    /// The ClientHello is larger than allowed.
    #[error("ClientHello too large")]
    TooLarge,
    /// The handshake message is not a well-formed ClientHello.
    #[error("malformed ClientHello")]
    Malformed,
    /// The ClientHello carries no host name.
    #[error("no server name in ClientHello")]
    Missing,
    /// The server name is an IP literal or not a valid DNS name.
    #[error("server name is not a valid DNS name")]
    InvalidName,
    /// More than one host name, or an extension repeated: which name a server would use
    /// is ambiguous, so the relay routes none.
    #[error("ambiguous ClientHello: several server names or a repeated extension")]
    Ambiguous,
    /// The peer closed before sending a full ClientHello.
    #[error("connection closed during ClientHello")]
    Eof,
    /// Reading failed.
    #[error("read error: {0}")]
    Io(String),
}

/// Outcome of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed: at least this many in total before the answer can change.
    NeedMore(usize),
    /// A complete ClientHello with this (lower-cased) server name.
    Done(String),
}

impl From<HelloError> for SniError {
    fn from(e: HelloError) -> Self {
        match e {
            HelloError::NotTls => SniError::NotTls,
            HelloError::TooLarge => SniError::TooLarge,
            HelloError::Eof => SniError::Eof,
            HelloError::Io(e) => SniError::Io(e),
        }
    }
}

/// Examines `buf` (bytes from the start of the connection) without consuming them.
pub fn examine(buf: &[u8], max: usize) -> Result<Progress, SniError> {
    match client_hello::examine(buf, max)? {
        Framing::NeedMore(n) => Ok(Progress::NeedMore(n)),
        Framing::Complete(message) => extract(&message).map(Progress::Done),
    }
}

fn extract(msg: &[u8]) -> Result<String, SniError> {
    let (_, parsed) = parse_tls_message_handshake(msg).map_err(|_| SniError::Malformed)?;
    let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = parsed else {
        return Err(SniError::Malformed);
    };
    let ext = hello.ext.ok_or(SniError::Missing)?;
    refuse_repeated_extensions(ext)?;
    let (_, exts) = parse_tls_client_hello_extensions(ext).map_err(|_| SniError::Malformed)?;
    let mut found = None;
    for e in exts {
        if let TlsExtension::SNI(names) = e {
            for (kind, name) in names {
                if kind != SNIType::HostName {
                    continue;
                }
                // RFC 6066: at most one name of each type. Taking the first of several
                // would let the name checked here differ from the one a server uses.
                if found.is_some() {
                    return Err(SniError::Ambiguous);
                }
                let name = std::str::from_utf8(name).map_err(|_| SniError::InvalidName)?;
                let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
                if name.parse::<IpAddr>().is_ok() || !is_valid_dns_name(&name) {
                    return Err(SniError::InvalidName);
                }
                found = Some(name);
            }
        }
    }
    found.ok_or(SniError::Missing)
}

/// Refuses an extensions block in which any extension type appears twice (RFC 8446
/// §4.2 forbids it; parsers that keep the first and those that keep the last disagree).
fn refuse_repeated_extensions(mut ext: &[u8]) -> Result<(), SniError> {
    let mut seen: Vec<u16> = Vec::new();
    while !ext.is_empty() {
        if ext.len() < 4 {
            return Err(SniError::Malformed);
        }
        let kind = u16::from_be_bytes([ext[0], ext[1]]);
        let len = u16::from_be_bytes([ext[2], ext[3]]) as usize;
        if ext.len() < 4 + len {
            return Err(SniError::Malformed);
        }
        if seen.contains(&kind) {
            return Err(SniError::Ambiguous);
        }
        seen.push(kind);
        ext = &ext[4 + len..];
    }
    Ok(())
}

/// Reads from `io` until a complete ClientHello is buffered. Returns the server name and every
/// byte read (to be forwarded untouched). The caller bounds the time.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<(String, Vec<u8>), SniError> {
    let mut buf = Vec::with_capacity(1024.min(max));
    let message = client_hello::read(io, max, &mut buf).await?;
    Ok((extract(&message)?, buf))
}

pub use postern_protocol::link::is_valid_dns_name;

/// Allow-list of names a SNI route may connect to.
#[derive(Debug, Clone)]
pub struct AllowList {
    exact: Vec<String>,
    /// `*.x` entries, stored as ".x": strict subdomains only.
    wildcard: Vec<String>,
    /// `.x` entries: x itself and its subdomains.
    suffix: Vec<String>,
}

impl AllowList {
    /// Validates one allow-list entry.
    pub fn check_entry(entry: &str) -> Result<(), String> {
        let bare = entry
            .strip_prefix("*.")
            .or_else(|| entry.strip_prefix('.'))
            .unwrap_or(entry);
        if bare.parse::<IpAddr>().is_ok() {
            return Err("IP addresses are not allowed, only DNS names".into());
        }
        if !is_valid_dns_name(bare) {
            return Err("not a valid DNS name".into());
        }
        if !bare.contains('.') {
            return Err("too broad: name must have at least two labels".into());
        }
        Ok(())
    }

    /// Builds an allow-list from entries validated by [`AllowList::check_entry`].
    pub fn new(entries: &[String]) -> Self {
        let mut list = AllowList {
            exact: vec![],
            wildcard: vec![],
            suffix: vec![],
        };
        for e in entries {
            let e = e.to_ascii_lowercase();
            if let Some(rest) = e.strip_prefix("*.") {
                list.wildcard.push(format!(".{rest}"));
            } else if e.starts_with('.') {
                list.suffix.push(e);
            } else {
                list.exact.push(e);
            }
        }
        list
    }

    /// Whether `name` (lower-case, validated) may be connected to.
    pub fn allows(&self, name: &str) -> bool {
        self.exact.iter().any(|e| e == name)
            || self
                .wildcard
                .iter()
                .any(|w| name.ends_with(w.as_str()) && name.len() > w.len())
            || self
                .suffix
                .iter()
                .any(|s| name.ends_with(s.as_str()) || name == &s[1..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use postern_test_kit::tls::{records, ClientHello};

    /// A ClientHello handshake message with an optional SNI and padding.
    fn client_hello(sni: Option<&str>, padding: usize) -> Vec<u8> {
        let mut h = ClientHello::new();
        if let Some(name) = sni {
            h = h.sni(name);
        }
        h.padding(padding).handshake()
    }

    /// A reader that returns one segment per read.
    struct Segments(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Segments {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(mut seg) = self.0.pop_front() {
                let n = seg.len().min(buf.remaining());
                buf.put_slice(&seg[..n]);
                if n < seg.len() {
                    self.0.push_front(seg.split_off(n));
                }
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn finds_sni() {
        let raw = records(&client_hello(Some("Media.WhatsApp.net"), 0), 16384);
        assert_eq!(
            examine(&raw, 16384),
            Ok(Progress::Done("media.whatsapp.net".into()))
        );
        for cut in 0..raw.len() {
            match examine(&raw[..cut], 16384) {
                Ok(Progress::NeedMore(n)) => assert!(n > cut && n <= raw.len(), "cut {cut}: {n}"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn fragmented_over_records() {
        let raw = records(&client_hello(Some("a.example.org"), 300), 7);
        assert_eq!(
            examine(&raw, 16384),
            Ok(Progress::Done("a.example.org".into()))
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(examine(b"GET / HTTP/1.1\r\n", 16384), Err(SniError::NotTls));
        let raw = records(&client_hello(None, 0), 16384);
        assert_eq!(examine(&raw, 16384), Err(SniError::Missing));
        let raw = records(&client_hello(Some("10.0.0.1"), 0), 16384);
        assert_eq!(examine(&raw, 16384), Err(SniError::InvalidName));
        let raw = records(&client_hello(Some("a.example.org"), 20000), 16000);
        assert_eq!(examine(&raw, 16384), Err(SniError::TooLarge));
    }

    /// Regression (issue 18, defect 8): the first of several names was routed.
    #[test]
    fn several_names_or_a_repeated_extension_are_refused() {
        let two_names =
            ClientHello::new().server_names(&["allowed.example.net", "evil.example.org"]);
        assert_eq!(
            examine(&two_names.records(16384), 16384),
            Err(SniError::Ambiguous)
        );
        let two_sni = ClientHello::new()
            .sni("allowed.example.net")
            .sni("evil.example.org");
        assert_eq!(
            examine(&two_sni.records(16384), 16384),
            Err(SniError::Ambiguous)
        );
        let repeated = ClientHello::new()
            .sni("allowed.example.net")
            .padding(1)
            .padding(1);
        assert_eq!(
            examine(&repeated.records(16384), 16384),
            Err(SniError::Ambiguous)
        );
        let fine = ClientHello::new().sni("allowed.example.net").padding(1);
        assert_eq!(
            examine(&fine.records(16384), 16384),
            Ok(Progress::Done("allowed.example.net".into()))
        );
    }

    #[test]
    fn allow_list() {
        let a = AllowList::new(&[
            "*.whatsapp.net".into(),
            "exact.org".into(),
            ".sfx.io".into(),
        ]);
        assert!(a.allows("mmg.whatsapp.net"));
        assert!(a.allows("a.b.whatsapp.net"));
        assert!(!a.allows("whatsapp.net"));
        assert!(!a.allows("evilwhatsapp.net"));
        assert!(a.allows("exact.org"));
        assert!(!a.allows("x.exact.org"));
        assert!(a.allows("sfx.io") && a.allows("a.sfx.io") && !a.allows("xsfx.io"));
        assert!(AllowList::check_entry("*.com").is_err());
        assert!(AllowList::check_entry("1.2.3.4").is_err());
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = examine(&bytes, 16384);
        }

        #[test]
        fn garbage_after_valid_header(tail in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut raw = vec![0x16, 0x03, 0x01, (tail.len() >> 8) as u8, tail.len() as u8];
            raw.extend_from_slice(&tail);
            let _ = examine(&raw, 16384);
        }

        #[test]
        fn reader_handles_any_segmentation(cuts in proptest::collection::vec(1usize..40, 1..200),
                                           name in "[a-z]{1,12}\\.example\\.net") {
            let raw = records(&client_hello(Some(&name), 200), 100);
            let mut segments = std::collections::VecDeque::new();
            let mut pos = 0;
            for c in cuts.iter().cycle() {
                if pos >= raw.len() { break; }
                let end = (pos + c).min(raw.len());
                segments.push_back(raw[pos..end].to_vec());
                pos = end;
            }
            segments.push_back(b"trailing".to_vec());
            let mut mock = Segments(segments);
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (got, bytes) = rt.block_on(read_client_hello(&mut mock, 16384)).unwrap();
            prop_assert_eq!(got, name);
            prop_assert_eq!(&bytes[..raw.len()], &raw[..]);
        }

        #[test]
        fn any_split_gives_same_answer(split in 1usize..64, name in "[a-z]{1,20}\\.example\\.org") {
            let raw = records(&client_hello(Some(&name), 0), split);
            prop_assert_eq!(examine(&raw, 16384), Ok(Progress::Done(name)));
        }
    }
}
