//! TLS ClientHello bytes for tests of SNI routing: the one builder, so tests agree on
//! what a ClientHello looks like (and can build the malformed ones a censor or an attacker
//! would send: several names, repeated extensions, odd record splits).

/// Builds a TLS ClientHello handshake message: by default a minimal TLS 1.2-style one
/// (fixed random, no session id, one suite); [`ClientHello::random`],
/// [`ClientHello::session_id`] and [`ClientHello::suites`] make it look like a browser's.
#[derive(Debug, Clone)]
pub struct ClientHello {
    random: [u8; 32],
    session_id: Vec<u8>,
    suites: Vec<u16>,
    extensions: Vec<u8>,
}

impl Default for ClientHello {
    fn default() -> Self {
        Self {
            random: [7; 32],
            session_id: Vec::new(),
            suites: vec![0x1301],
            extensions: Vec::new(),
        }
    }
}

impl ClientHello {
    /// A ClientHello with no extensions yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The 32-byte client random.
    pub fn random(mut self, random: [u8; 32]) -> Self {
        self.random = random;
        self
    }

    /// A legacy session id (TLS 1.3 clients send 32 random bytes).
    pub fn session_id(mut self, id: &[u8]) -> Self {
        self.session_id = id.to_vec();
        self
    }

    /// The cipher suites offered.
    pub fn suites(mut self, suites: &[u16]) -> Self {
        self.suites = suites.to_vec();
        self
    }

    /// One server_name extension listing `names` (usually exactly one).
    pub fn server_names(self, names: &[&str]) -> Self {
        let mut list = Vec::new();
        for n in names {
            list.push(0u8); // host_name
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n.as_bytes());
        }
        let mut body = (list.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(&list);
        self.extension(0x0000, &body)
    }

    /// A server_name extension with one name.
    pub fn sni(self, name: &str) -> Self {
        self.server_names(&[name])
    }

    /// A padding extension (type 21) of `len` zero bytes; `0` adds nothing.
    pub fn padding(self, len: usize) -> Self {
        if len == 0 {
            return self;
        }
        self.extension(0x0015, &vec![0u8; len])
    }

    /// Any extension, appended as given (repeats allowed, to test refusing them).
    pub fn extension(mut self, kind: u16, body: &[u8]) -> Self {
        self.extensions.extend_from_slice(&kind.to_be_bytes());
        self.extensions
            .extend_from_slice(&(body.len() as u16).to_be_bytes());
        self.extensions.extend_from_slice(body);
        self
    }

    /// The handshake message (type 1, 24-bit length, body), without a record header.
    pub fn handshake(&self) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&self.random);
        body.push(self.session_id.len() as u8);
        body.extend_from_slice(&self.session_id);
        body.extend_from_slice(&((self.suites.len() * 2) as u16).to_be_bytes());
        for s in &self.suites {
            body.extend_from_slice(&s.to_be_bytes());
        }
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(self.extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&self.extensions);
        let mut msg = vec![0x01];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// The handshake message in TLS records of at most `per_record` bytes each.
    pub fn records(&self, per_record: usize) -> Vec<u8> {
        records(&self.handshake(), per_record)
    }
}

/// Wraps handshake bytes in TLS handshake records of at most `per_record` bytes.
pub fn records(handshake: &[u8], per_record: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in handshake.chunks(per_record.max(1)) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(c.len() as u16).to_be_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// The common case: a ClientHello record (split at 16 KiB) with an optional SNI and padding.
pub fn client_hello_record(sni: Option<&str>, padding: usize) -> Vec<u8> {
    let mut h = ClientHello::new();
    if let Some(name) = sni {
        h = h.sni(name);
    }
    h.padding(padding).records(16384)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let r = client_hello_record(Some("a.example"), 3);
        assert_eq!(&r[..3], &[0x16, 0x03, 0x01]);
        assert_eq!(usize::from(u16::from_be_bytes([r[3], r[4]])), r.len() - 5);
        assert_eq!(r[5], 1);
        assert!(r.windows(9).any(|w| w == b"a.example"));
        assert_eq!(
            records(&[1, 2, 3], 2),
            [0x16, 3, 1, 0, 2, 1, 2, 0x16, 3, 1, 0, 1, 3]
        );
    }
}
