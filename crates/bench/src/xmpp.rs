//! The XMPP stream as the load generator of `--mode peers` sees it: an incremental reader
//! that turns the bytes a server sends into stream headers and whole top-level elements
//! (stanzas, SASL and stream-management nonzas), plus the few stanzas the load generator
//! writes. Raw XML over tokio, parsed with `quick-xml`; only what a client of this
//! benchmark needs (RFC 6120 streams, SASL PLAIN, resource binding, XEP-0077 in-band
//! registration, XEP-0198 stream management, XEP-0184 receipts).
//!
//! The reader keeps no state across a stream restart (after SASL success the server opens
//! a new stream on the same connection): a `<stream:stream>` start tag anywhere begins a
//! new stream.

use std::fmt;

use quick_xml::events::{BytesStart, Event};
use quick_xml::XmlVersion;
use tokio::io::AsyncBufRead;

pub const NS_CLIENT: &str = "jabber:client";
pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
pub const NS_SM: &str = "urn:xmpp:sm:3";
pub const NS_REGISTER: &str = "jabber:iq:register";
pub const NS_REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
pub const NS_RECEIPTS: &str = "urn:xmpp:receipts";

/// What went wrong talking XMPP to a server.
#[derive(Debug, thiserror::Error)]
pub enum XmppError {
    #[error("the server closed the connection")]
    Closed,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server sent malformed XML: {0}")]
    Xml(String),
    #[error("the server ended the stream with an error: {0}")]
    StreamError(String),
    #[error("SASL authentication failed: {0}")]
    AuthFailed(String),
    #[error("expected {wanted} from the server, got {got}")]
    Unexpected { wanted: &'static str, got: String },
    #[error("the server does not offer {0}")]
    NotOffered(&'static str),
    #[error("the server refused {what}: {detail}")]
    Refused { what: &'static str, detail: String },
    #[error("no {0} from the server within the time allowed")]
    Timeout(&'static str),
}

/// One element with its attributes (qualified names as written, values unescaped), child
/// elements and text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The namespace declared on this element (`xmlns`), if any.
    pub fn ns(&self) -> Option<&str> {
        self.attr("xmlns")
    }

    /// Whether this element is `name` in namespace `ns` (declared on it).
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns() == Some(ns)
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// A short description for error messages: the element's name and its first child's.
    fn describe(&self) -> String {
        match self.children.first() {
            Some(c) => format!("<{}> with <{}>", self.name, c.name),
            None => format!("<{}>", self.name),
        }
    }

    /// The defined condition and text of an error element (`<failure>`, `<error>`,
    /// `<stream:error>`), e.g. `not-authorized (bad password)`.
    fn condition(&self) -> String {
        let condition = self
            .children
            .iter()
            .find(|c| c.name != "text")
            .map_or("no condition", |c| c.name.as_str());
        match self.child("text").map(|t| t.text.trim()) {
            Some(t) if !t.is_empty() => format!("{condition} ({t})"),
            _ => condition.to_string(),
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What the server sent next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A `<stream:stream>` start tag: a new stream (also after a restart).
    StreamOpen { id: Option<String> },
    /// A complete top-level element.
    Stanza(Element),
    /// `</stream:stream>`.
    StreamClose,
}

/// Reads the server's side of an XMPP connection incrementally: whatever the TCP reads cut,
/// [`XmlStream::next`] returns whole top-level elements.
pub struct XmlStream<R> {
    reader: quick_xml::Reader<R>,
    buf: Vec<u8>,
    /// The elements open below the stream element, outermost first.
    open: Vec<Element>,
}

impl<R: AsyncBufRead + Unpin> XmlStream<R> {
    pub fn new(inner: R) -> Self {
        let mut reader = quick_xml::Reader::from_reader(inner);
        // The stream element's end tag comes when the stream ends, and a restart opens a
        // new stream element inside the old one as far as the parser can tell: names are
        // matched here, not by the parser.
        reader.config_mut().check_end_names = false;
        Self {
            reader,
            buf: Vec::with_capacity(1024),
            open: Vec::new(),
        }
    }

    /// The next stream header, stanza or stream end. Errors: [`XmppError::Closed`] at the
    /// end of the connection (also in the middle of an element), [`XmppError::Xml`] for
    /// what is not XML.
    pub async fn next(&mut self) -> Result<Incoming, XmppError> {
        loop {
            self.buf.clear();
            let event = self
                .reader
                .read_event_into_async(&mut self.buf)
                .await
                .map_err(|e| match e {
                    quick_xml::Error::Io(io) => {
                        XmppError::Io(std::io::Error::new(io.kind(), io.to_string()))
                    }
                    other => XmppError::Xml(other.to_string()),
                })?;
            match event {
                Event::Start(start) => {
                    if start.name().as_ref() == b"stream:stream" {
                        // A new stream: nothing of an earlier one is still open.
                        self.open.clear();
                        let open = element(&start)?;
                        return Ok(Incoming::StreamOpen {
                            id: open.attr("id").map(str::to_string),
                        });
                    }
                    self.open.push(element(&start)?);
                }
                Event::Empty(start) => {
                    let el = element(&start)?;
                    match self.open.last_mut() {
                        Some(parent) => parent.children.push(el),
                        None => return Ok(Incoming::Stanza(el)),
                    }
                }
                Event::End(_) => match self.open.pop() {
                    None => return Ok(Incoming::StreamClose),
                    Some(el) => match self.open.last_mut() {
                        Some(parent) => parent.children.push(el),
                        None => return Ok(Incoming::Stanza(el)),
                    },
                },
                Event::Text(t) => {
                    if let Some(el) = self.open.last_mut() {
                        let s = t.decode().map_err(|e| XmppError::Xml(e.to_string()))?;
                        el.text.push_str(&s);
                    }
                }
                Event::CData(t) => {
                    if let Some(el) = self.open.last_mut() {
                        let s = t.decode().map_err(|e| XmppError::Xml(e.to_string()))?;
                        el.text.push_str(&s);
                    }
                }
                Event::GeneralRef(r) => {
                    if let Some(el) = self.open.last_mut() {
                        let c = if r.is_char_ref() {
                            r.resolve_char_ref()
                                .map_err(|e| XmppError::Xml(e.to_string()))?
                                .map(String::from)
                        } else {
                            let name = r.decode().map_err(|e| XmppError::Xml(e.to_string()))?;
                            quick_xml::escape::resolve_predefined_entity(&name).map(String::from)
                        };
                        let c = c.ok_or_else(|| {
                            XmppError::Xml(format!(
                                "unknown entity &{};",
                                String::from_utf8_lossy(&r)
                            ))
                        })?;
                        el.text.push_str(&c);
                    }
                }
                Event::Eof => return Err(XmppError::Closed),
                // The XML declaration before each stream header, and what XMPP forbids
                // anyway (comments, processing instructions, DTDs): nothing to keep.
                Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
            }
        }
    }

    /// The next top-level element; a stream header, the end of the stream or a
    /// `<stream:error>` is an error. `wanted` names what the caller waits for.
    pub async fn stanza(&mut self, wanted: &'static str) -> Result<Element, XmppError> {
        match self.next().await? {
            Incoming::Stanza(el) if el.name == "stream:error" => {
                Err(XmppError::StreamError(el.condition()))
            }
            Incoming::Stanza(el) => Ok(el),
            Incoming::StreamOpen { .. } => Err(XmppError::Unexpected {
                wanted,
                got: "a new stream header".into(),
            }),
            Incoming::StreamClose => Err(XmppError::Closed),
        }
    }

    /// The server's stream header (after we opened or restarted the stream).
    pub async fn stream_open(&mut self) -> Result<(), XmppError> {
        match self.next().await? {
            Incoming::StreamOpen { .. } => Ok(()),
            Incoming::Stanza(el) if el.name == "stream:error" => {
                Err(XmppError::StreamError(el.condition()))
            }
            Incoming::Stanza(el) => Err(XmppError::Unexpected {
                wanted: "the stream header",
                got: el.describe(),
            }),
            Incoming::StreamClose => Err(XmppError::Closed),
        }
    }
}

/// An owned element from a start tag, attributes unescaped.
fn element(start: &BytesStart<'_>) -> Result<Element, XmppError> {
    let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in start.attributes() {
        let a = a.map_err(|e| XmppError::Xml(format!("attribute of <{name}>: {e}")))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| XmppError::Xml(format!("attribute {key} of <{name}>: {e}")))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        ..Element::default()
    })
}

/// The outcome of SASL authentication: `Ok` for `<success/>`, [`XmppError::AuthFailed`]
/// with the condition for `<failure/>`, [`XmppError::Unexpected`] for anything else.
pub fn sasl_outcome(el: &Element) -> Result<(), XmppError> {
    if el.is("success", NS_SASL) {
        Ok(())
    } else if el.is("failure", NS_SASL) {
        Err(XmppError::AuthFailed(el.condition()))
    } else {
        Err(XmppError::Unexpected {
            wanted: "SASL <success/> or <failure/>",
            got: el.describe(),
        })
    }
}

/// XEP-0198: the count `h` of a stream-management acknowledgement `<a h='…'/>`; `None` for
/// any other element. An `<a/>` whose `h` is missing or not a 32-bit count is an error.
pub fn sm_ack(el: &Element) -> Option<Result<u32, XmppError>> {
    if !el.is("a", NS_SM) {
        return None;
    }
    Some(
        el.attr("h")
            .and_then(|h| h.parse::<u32>().ok())
            .ok_or_else(|| XmppError::Xml(format!("<a/> with h={:?}", el.attr("h")))),
    )
}

/// XEP-0198: whether this is the server's request for our count, `<r/>`.
pub fn is_sm_request(el: &Element) -> bool {
    el.is("r", NS_SM)
}

/// Stanzas count for XEP-0198's `h`; nonzas (`<r/>`, `<a/>`, SASL …) do not.
pub fn is_stanza(el: &Element) -> bool {
    matches!(el.name.as_str(), "message" | "presence" | "iq")
}

/// The result of an `<iq/>` we sent with id `id`: `Ok` for `type='result'`,
/// [`XmppError::Refused`] for `type='error'`.
pub fn iq_result(el: &Element, id: &str, what: &'static str) -> Result<(), XmppError> {
    if el.name != "iq" || el.attr("id") != Some(id) {
        return Err(XmppError::Unexpected {
            wanted: what,
            got: el.describe(),
        });
    }
    match el.attr("type") {
        Some("result") => Ok(()),
        _ => Err(XmppError::Refused {
            what,
            detail: el
                .child("error")
                .map_or_else(|| el.describe(), Element::condition),
        }),
    }
}

/// Whether `<stream:features>` offers SASL mechanism `mechanism`.
pub fn offers_mechanism(features: &Element, mechanism: &str) -> bool {
    features
        .children
        .iter()
        .filter(|c| c.is("mechanisms", NS_SASL))
        .flat_map(|m| m.children.iter())
        .any(|m| m.name == "mechanism" && m.text.trim() == mechanism)
}

/// Whether `<stream:features>` has a child `name` in namespace `ns`.
pub fn offers(features: &Element, name: &str, ns: &str) -> bool {
    features.children.iter().any(|c| c.is(name, ns))
}

/// Escapes text for an XML attribute value or character data.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(s)
}

/// What the client writes.
pub mod out {
    use base64::Engine;

    use super::{escape, NS_BIND, NS_CLIENT, NS_RECEIPTS, NS_REGISTER, NS_SASL, NS_SESSION};
    use super::{NS_SM, NS_STREAM};

    pub fn stream_header(domain: &str) -> String {
        format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAM}' \
             to='{}' version='1.0'>",
            escape(domain)
        )
    }

    pub const STREAM_END: &str = "</stream:stream>";

    /// SASL PLAIN (RFC 4616): no authorisation identity, then user and password.
    pub fn auth_plain(user: &str, password: &str) -> String {
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>")
    }

    pub fn register(id: &str, user: &str, password: &str) -> String {
        format!(
            "<iq type='set' id='{id}'><query xmlns='{NS_REGISTER}'><username>{}</username>\
             <password>{}</password></query></iq>",
            escape(user),
            escape(password)
        )
    }

    pub fn bind(id: &str, resource: &str) -> String {
        format!(
            "<iq type='set' id='{id}'><bind xmlns='{NS_BIND}'><resource>{}</resource></bind></iq>",
            escape(resource)
        )
    }

    pub fn session(id: &str) -> String {
        format!("<iq type='set' id='{id}'><session xmlns='{NS_SESSION}'/></iq>")
    }

    pub fn sm_enable() -> String {
        format!("<enable xmlns='{NS_SM}'/>")
    }

    pub fn sm_request() -> String {
        format!("<r xmlns='{NS_SM}'/>")
    }

    pub fn sm_ack(h: u32) -> String {
        format!("<a xmlns='{NS_SM}' h='{h}'/>")
    }

    /// A chat message asking for a XEP-0184 delivery receipt.
    pub fn message(to: &str, id: &str, body: &str) -> String {
        format!(
            "<message to='{}' id='{}' type='chat'><body>{}</body><request xmlns='{NS_RECEIPTS}'/></message>",
            escape(to),
            escape(id),
            escape(body)
        )
    }

    /// The XEP-0184 receipt for message `id`, to its sender.
    pub fn receipt(to: &str, id: &str) -> String {
        format!(
            "<message to='{}' id='r{}'><received xmlns='{NS_RECEIPTS}' id='{}'/></message>",
            escape(to),
            escape(id),
            escape(id)
        )
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, BufReader, ReadBuf};

    use super::*;

    /// Hands out the given chunks one per read, as TCP might.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(mut chunk) = self.0.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.0.push_front(chunk.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    fn stream(chunks: Vec<Vec<u8>>) -> XmlStream<BufReader<Chunks>> {
        XmlStream::new(BufReader::new(Chunks(chunks.into())))
    }

    fn all(chunks: Vec<Vec<u8>>) -> (Vec<Incoming>, XmppError) {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async {
                let mut s = stream(chunks);
                let mut out = Vec::new();
                loop {
                    match s.next().await {
                        Ok(i) => out.push(i),
                        Err(e) => return (out, e),
                    }
                }
            })
    }

    /// What ejabberd sends a client: header, features, SASL success, a restarted stream,
    /// a message with a body and entities, stream-management nonzas, and the end.
    const TRANSCRIPT: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='bench.test' version='1.0'>\
        <stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
        <mechanism>PLAIN</mechanism><mechanism>SCRAM-SHA-1</mechanism></mechanisms>\
        <register xmlns='http://jabber.org/features/iq-register'/></stream:features>\
        <success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>\
        <?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='s2' version='1.0'>\
        <message from='a@bench.test/x' to='b@bench.test' id='m&amp;1' type='chat'>\
        <body>hi &lt;there&gt; &#233;</body><request xmlns='urn:xmpp:receipts'/></message> \
        <r xmlns='urn:xmpp:sm:3'/><a xmlns='urn:xmpp:sm:3' h='7'/></stream:stream>";

    fn expected() -> Vec<Incoming> {
        let el = |name: &str, attrs: &[(&str, &str)], children, text: &str| Element {
            name: name.into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            children,
            text: text.into(),
        };
        let mech = |m: &str| el("mechanism", &[], vec![], m);
        vec![
            Incoming::StreamOpen {
                id: Some("s1".into()),
            },
            Incoming::Stanza(el(
                "stream:features",
                &[],
                vec![
                    el(
                        "mechanisms",
                        &[("xmlns", NS_SASL)],
                        vec![mech("PLAIN"), mech("SCRAM-SHA-1")],
                        "",
                    ),
                    el("register", &[("xmlns", NS_REGISTER_FEATURE)], vec![], ""),
                ],
                "",
            )),
            Incoming::Stanza(el("success", &[("xmlns", NS_SASL)], vec![], "")),
            Incoming::StreamOpen {
                id: Some("s2".into()),
            },
            Incoming::Stanza(el(
                "message",
                &[
                    ("from", "a@bench.test/x"),
                    ("to", "b@bench.test"),
                    ("id", "m&1"),
                    ("type", "chat"),
                ],
                vec![
                    el("body", &[], vec![], "hi <there> é"),
                    el("request", &[("xmlns", NS_RECEIPTS)], vec![], ""),
                ],
                "",
            )),
            Incoming::Stanza(el("r", &[("xmlns", NS_SM)], vec![], "")),
            Incoming::Stanza(el("a", &[("xmlns", NS_SM), ("h", "7")], vec![], "")),
            Incoming::StreamClose,
        ]
    }

    #[test]
    fn whole_transcript_in_one_read() {
        let (got, end) = all(vec![TRANSCRIPT.as_bytes().to_vec()]);
        assert_eq!(got, expected());
        assert!(matches!(end, XmppError::Closed), "{end}");
    }

    #[test]
    fn one_byte_per_read() {
        let chunks = TRANSCRIPT.bytes().map(|b| vec![b]).collect();
        let (got, _) = all(chunks);
        assert_eq!(got, expected());
    }

    #[test]
    fn every_split_point() {
        // Two reads, cut at every byte: inside names, attribute values, entities, between
        // a stanza's end tag and the next one.
        let bytes = TRANSCRIPT.as_bytes();
        for cut in 1..bytes.len() {
            let (got, _) = all(vec![bytes[..cut].to_vec(), bytes[cut..].to_vec()]);
            assert_eq!(got, expected(), "cut at {cut}");
        }
    }

    #[test]
    fn connection_closed_inside_a_stanza() {
        let (got, end) = all(vec![b"<stream:stream><message id='1'><body>par".to_vec()]);
        assert_eq!(got, vec![Incoming::StreamOpen { id: None }]);
        assert!(matches!(end, XmppError::Closed), "{end}");
    }

    #[test]
    fn malformed_xml_is_an_error() {
        let (_, end) = all(vec![b"<stream:stream><message id='1' id='2'/>".to_vec()]);
        assert!(matches!(end, XmppError::Xml(_)), "{end}");
        let (_, end) = all(vec![b"<stream:stream><body>&bogus;</body>".to_vec()]);
        assert!(matches!(end, XmppError::Xml(_)), "{end}");
    }

    fn parse_one(xml: &str) -> Element {
        let (got, _) = all(vec![format!("<stream:stream>{xml}").into_bytes()]);
        match got.get(1) {
            Some(Incoming::Stanza(el)) => el.clone(),
            other => panic!("no stanza in {xml}: {other:?}"),
        }
    }

    #[test]
    fn stream_management_ack() {
        let h = |xml: &str| sm_ack(&parse_one(xml)).map(|r| r.map_err(|e| e.to_string()));
        assert_eq!(h("<a xmlns='urn:xmpp:sm:3' h='0'/>"), Some(Ok(0)));
        assert_eq!(h("<a h=\"42\" xmlns=\"urn:xmpp:sm:3\"/>"), Some(Ok(42)));
        assert_eq!(
            h("<a xmlns='urn:xmpp:sm:3' h='4294967295'/>"),
            Some(Ok(u32::MAX))
        );
        assert!(matches!(
            h("<a xmlns='urn:xmpp:sm:3' h='4294967296'/>"),
            Some(Err(_))
        ));
        assert!(matches!(
            h("<a xmlns='urn:xmpp:sm:3' h='-1'/>"),
            Some(Err(_))
        ));
        assert!(matches!(h("<a xmlns='urn:xmpp:sm:3'/>"), Some(Err(_))));
        // Another namespace's <a/>, or an <r/>, is not an acknowledgement.
        assert_eq!(h("<a xmlns='urn:xmpp:sm:2' h='1'/>"), None);
        assert_eq!(h("<r xmlns='urn:xmpp:sm:3'/>"), None);
        assert!(is_sm_request(&parse_one("<r xmlns='urn:xmpp:sm:3'/>")));
        assert!(!is_sm_request(&parse_one("<r/>")));
    }

    #[test]
    fn sasl_success_and_failure() {
        assert!(sasl_outcome(&parse_one(
            "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
        ))
        .is_ok());
        let failure = parse_one(
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/>\
             <text xml:lang='en'>Invalid username or password</text></failure>",
        );
        match sasl_outcome(&failure) {
            Err(XmppError::AuthFailed(why)) => {
                assert_eq!(why, "not-authorized (Invalid username or password)")
            }
            other => panic!("{other:?}"),
        }
        let bare =
            parse_one("<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><aborted/></failure>");
        assert!(matches!(sasl_outcome(&bare), Err(XmppError::AuthFailed(w)) if w == "aborted"));
        // A <success/> in another namespace is not SASL success.
        assert!(matches!(
            sasl_outcome(&parse_one("<success/>")),
            Err(XmppError::Unexpected { .. })
        ));
    }

    #[test]
    fn stream_error_and_iq_results() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt.block_on(async {
            let mut s = stream(vec![b"<stream:stream><stream:error><policy-violation \
                xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
                .to_vec()]);
            s.stream_open().await.unwrap();
            s.stanza("anything").await
        });
        assert!(matches!(err, Err(XmppError::StreamError(c)) if c == "policy-violation"));

        let ok = parse_one("<iq type='result' id='b1'/>");
        assert!(iq_result(&ok, "b1", "bind").is_ok());
        assert!(matches!(
            iq_result(&ok, "b2", "bind"),
            Err(XmppError::Unexpected { .. })
        ));
        let refused = parse_one(
            "<iq type='error' id='reg'><error type='cancel'><conflict \
             xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
        );
        assert!(matches!(
            iq_result(&refused, "reg", "registration"),
            Err(XmppError::Refused { detail, .. }) if detail == "conflict"
        ));
    }

    #[test]
    fn features() {
        let (got, _) = all(vec![TRANSCRIPT.as_bytes().to_vec()]);
        let Some(Incoming::Stanza(f)) = got.get(1) else {
            panic!("{got:?}")
        };
        assert!(offers_mechanism(f, "PLAIN"));
        assert!(!offers_mechanism(f, "EXTERNAL"));
        assert!(offers(f, "register", NS_REGISTER_FEATURE));
        assert!(!offers(f, "sm", NS_SM));
    }

    #[test]
    fn written_stanzas_parse_back() {
        let m = parse_one(&out::message("b@bench.test", "id'1", "<&>"));
        assert_eq!(m.attr("id"), Some("id'1"));
        assert_eq!(m.child("body").map(|b| b.text.as_str()), Some("<&>"));
        assert!(m.children.iter().any(|c| c.is("request", NS_RECEIPTS)));
        let r = parse_one(&out::receipt("a@bench.test/x", "abc"));
        let received = r.child("received").unwrap();
        assert!(received.is("received", NS_RECEIPTS));
        assert_eq!(received.attr("id"), Some("abc"));
        assert_eq!(sm_ack(&parse_one(&out::sm_ack(9))).unwrap().unwrap(), 9);
        let auth = parse_one(&out::auth_plain("u", "p"));
        assert_eq!(auth.text, "AHUAcA==");
    }
}
