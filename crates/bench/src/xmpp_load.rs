//! The thin-client load of [`crate::thin`], spoken in XMPP to ejabberd or Prosody: the same number of
//! accounts and connected clients, the same senders sending one message at a time to random
//! connected recipients, the same 256-byte bodies, every message acknowledged, and a
//! delivery receipt for each.
//!
//! Each client logs in with SASL PLAIN, binds a resource, starts a session, enables
//! XEP-0198 stream management (`<enable xmlns='urn:xmpp:sm:3'/>`) and sends its initial
//! presence (without it ejabberd treats the account as unavailable and stores messages to
//! its bare JID offline instead of delivering them). Then:
//!
//! * a sender writes `<message to='user@domain' id=…><body>…</body><request/></message>`
//!   followed by `<r/>`, and counts the message acknowledged ("sent ✓") when the server's
//!   `<a h=…/>` covers it (h counts the stanzas the server has handled from this client);
//!   then it sends the next one;
//! * a recipient answers each `<r/>` of the server with `<a h=…/>` (the stanzas it has
//!   received: its acknowledgement, like Postern's `AckMessage`), records the message as
//!   delivered, and answers the XEP-0184 `<request/>` with a `<received/>` message to the
//!   sender, which the sender records as delivered ✓✓ (Postern's `Receipt`).
//!
//! Timestamps are taken in this process with the one clock of [`Recorder`] and joined by
//! message id (the 16-byte id, hex, as the stanza's `id`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::distr::Alphanumeric;
use rand::Rng;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::server::cpu_seconds;
use crate::stats::{mib, Id, Recorder, Summary};
use crate::thin::{bounded, TIMEOUT};
use crate::xmpp::{self, out, Element, Incoming, XmlStream, XmppError};
use crate::xmpp::{NS_BIND, NS_RECEIPTS, NS_REGISTER_FEATURE, NS_SESSION, NS_SM};
use crate::xmpp_server::{XmppServer, DOMAIN};
use crate::ThinArgs;

type Reader = XmlStream<BufReader<OwnedReadHalf>>;

/// What one run against ejabberd measured (the counterpart of [`crate::thin::ThinReport`]).
pub struct XmppReport {
    pub name: &'static str,
    pub summary: Summary,
    pub server_cpu_s: f64,
    pub load_cpu_s: f64,
    pub messaging_s: f64,
    pub rss_registered_kib: u64,
    pub rss_connected_kib: u64,
    pub clients: usize,
    /// Messages bounced with an error, malformed `<a/>`, connections dropped.
    pub errors: [usize; 3],
}

impl XmppReport {
    /// Fails if an acknowledged message was not delivered, or not receipted.
    pub fn check_complete(&self) -> Result<()> {
        let s = &self.summary;
        if s.delivered.len() < s.accepted.len() || s.receipts.len() < s.accepted.len() {
            bail!(
                "{}: {} of {} acknowledged messages were not delivered (or not receipted) \
                 within {TIMEOUT:?}",
                self.name,
                s.accepted.len() - s.delivered.len().min(s.receipts.len()),
                s.accepted.len()
            );
        }
        Ok(())
    }
}

#[derive(Default)]
struct Failures {
    bounced: AtomicUsize,
    bad_acks: AtomicUsize,
    disconnects: AtomicUsize,
}

/// The writing side of one client, shared by its sender and its reader task.
struct Outbox {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Stanzas written since `<enable/>` (XEP-0198 counts them; the server's `h` does too).
    stanzas: Mutex<u64>,
}

impl Outbox {
    /// Queues stanza `xml` (plus `tail`, a nonza, in the same write); returns its number.
    fn stanza(&self, xml: String, tail: &str) -> Result<u64, XmppError> {
        let mut n = self.stanzas.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        let mut bytes = xml.into_bytes();
        bytes.extend_from_slice(tail.as_bytes());
        // Under the lock, so that the order of writes is the order of the numbers.
        self.tx.send(bytes).map_err(|_| XmppError::Closed)?;
        Ok(*n)
    }

    fn nonza(&self, xml: String) -> Result<(), XmppError> {
        self.tx
            .send(xml.into_bytes())
            .map_err(|_| XmppError::Closed)
    }
}

/// One connected client.
struct Client {
    /// Bare JID.
    jid: String,
    outbox: Arc<Outbox>,
    /// The highest `h` the server has acknowledged.
    acked: watch::Receiver<u64>,
}

fn password(user: &str) -> String {
    format!("pw-{user}")
}

async fn write(wr: &mut OwnedWriteHalf, xml: &str) -> Result<(), XmppError> {
    wr.write_all(xml.as_bytes()).await?;
    Ok(())
}

/// Connects, opens the stream and reads the server's header and features.
async fn open(address: &str) -> Result<(Reader, OwnedWriteHalf, Element), XmppError> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut xml = XmlStream::new(BufReader::new(rd));
    write(&mut wr, &out::stream_header(DOMAIN)).await?;
    let features = read_features(&mut xml).await?;
    Ok((xml, wr, features))
}

async fn read_features(xml: &mut Reader) -> Result<Element, XmppError> {
    xml.stream_open().await?;
    let features = xml.stanza("<stream:features>").await?;
    if features.name != "stream:features" {
        return Err(XmppError::Unexpected {
            wanted: "<stream:features>",
            got: features.to_string(),
        });
    }
    Ok(features)
}

/// Creates an account with XEP-0077 in-band registration over a short-lived connection.
async fn register(address: &str, user: &str) -> Result<(), XmppError> {
    let (mut xml, mut wr, features) = open(address).await?;
    if !xmpp::offers(&features, "register", NS_REGISTER_FEATURE) {
        return Err(XmppError::NotOffered("in-band registration (XEP-0077)"));
    }
    write(&mut wr, &out::register("reg", user, &password(user))).await?;
    xmpp::iq_result(
        &xml.stanza("the registration result").await?,
        "reg",
        "registration",
    )?;
    write(&mut wr, out::STREAM_END).await?;
    let _ = wr.shutdown().await;
    Ok(())
}

/// Logs in and sets the session up, through `<enabled/>`.
async fn login(address: &str, user: &str) -> Result<(Reader, OwnedWriteHalf), XmppError> {
    let (mut xml, mut wr, features) = open(address).await?;
    if !xmpp::offers_mechanism(&features, "PLAIN") {
        return Err(XmppError::NotOffered("SASL PLAIN"));
    }
    write(&mut wr, &out::auth_plain(user, &password(user))).await?;
    xmpp::sasl_outcome(&xml.stanza("the SASL outcome").await?)?;
    // The stream restarts after SASL success.
    write(&mut wr, &out::stream_header(DOMAIN)).await?;
    let features = read_features(&mut xml).await?;
    if !xmpp::offers(&features, "bind", NS_BIND) {
        return Err(XmppError::NotOffered("resource binding"));
    }
    if !xmpp::offers(&features, "sm", NS_SM) {
        return Err(XmppError::NotOffered("stream management (XEP-0198)"));
    }
    write(&mut wr, &out::bind("bind", "bench")).await?;
    xmpp::iq_result(
        &xml.stanza("the bind result").await?,
        "bind",
        "resource binding",
    )?;
    if xmpp::offers(&features, "session", NS_SESSION) {
        write(&mut wr, &out::session("sess")).await?;
        xmpp::iq_result(
            &xml.stanza("the session result").await?,
            "sess",
            "the session",
        )?;
    }
    write(&mut wr, &out::sm_enable()).await?;
    let enabled = xml.stanza("<enabled/>").await?;
    if !enabled.is("enabled", NS_SM) {
        return Err(XmppError::Refused {
            what: "stream management",
            detail: enabled.to_string(),
        });
    }
    Ok((xml, wr))
}

/// Logs in, starts the client's writer and reader tasks and sends initial presence.
async fn connect(
    address: &str,
    user: String,
    recorder: Arc<Recorder>,
    failures: Arc<Failures>,
    stopping: Arc<AtomicBool>,
) -> Result<Client> {
    let (xml, mut wr) = tokio::time::timeout(TIMEOUT, login(address, &user))
        .await
        .map_err(|_| XmppError::Timeout("login"))
        .and_then(|r| r)
        .with_context(|| format!("logging in as {user}@{DOMAIN}"))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            // Whatever else is already queued goes in the same write.
            batch.clear();
            batch.extend_from_slice(&first);
            while let Ok(more) = rx.try_recv() {
                batch.extend_from_slice(&more);
            }
            if wr.write_all(&batch).await.is_err() {
                break;
            }
        }
        let _ = wr.write_all(out::STREAM_END.as_bytes()).await;
        let _ = wr.shutdown().await;
    });
    let outbox = Arc::new(Outbox {
        tx,
        stanzas: Mutex::new(0),
    });
    let (acked_tx, acked) = watch::channel(0u64);
    tokio::spawn(read_loop(
        xml,
        outbox.clone(),
        acked_tx,
        recorder,
        failures,
        stopping,
    ));
    outbox
        .stanza("<presence/>".into(), "")
        .context("the connection's writer stopped")?;
    Ok(Client {
        jid: format!("{user}@{DOMAIN}"),
        outbox,
        acked,
    })
}

/// A message id written as 32 hex digits.
fn parse_id(s: Option<&str>) -> Option<Id> {
    let bytes = hex::decode(s?).ok()?;
    bytes.try_into().ok()
}

/// Everything a client receives after `<enabled/>`.
async fn read_loop(
    mut xml: Reader,
    outbox: Arc<Outbox>,
    acked: watch::Sender<u64>,
    recorder: Arc<Recorder>,
    failures: Arc<Failures>,
    stopping: Arc<AtomicBool>,
) {
    // Stanzas received since <enable/>: our `h`.
    let mut received: u64 = 0;
    loop {
        let el = match xml.next().await {
            Ok(Incoming::Stanza(el)) if el.name != "stream:error" => el,
            Ok(Incoming::StreamOpen { .. }) => continue,
            _ => {
                if !stopping.load(Ordering::Relaxed) {
                    failures.disconnects.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        };
        if xmpp::is_sm_request(&el) {
            // h is a 32-bit counter that wraps.
            if outbox.nonza(out::sm_ack(received as u32)).is_err() {
                return;
            }
            continue;
        }
        if let Some(h) = xmpp::sm_ack(&el) {
            match h {
                Ok(h) => {
                    acked.send_if_modified(|v| {
                        let h = u64::from(h);
                        let newer = h > *v;
                        if newer {
                            *v = h;
                        }
                        newer
                    });
                }
                Err(_) => {
                    failures.bad_acks.fetch_add(1, Ordering::Relaxed);
                }
            }
            continue;
        }
        if !xmpp::is_stanza(&el) {
            continue;
        }
        received += 1;
        if el.name != "message" {
            continue;
        }
        if el.attr("type") == Some("error") {
            failures.bounced.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if let Some(r) = el.children.iter().find(|c| c.is("received", NS_RECEIPTS)) {
            if let Some(id) = parse_id(r.attr("id")) {
                recorder.record(&recorder.receipts, id);
            }
            continue;
        }
        if el.child("body").is_none() {
            continue;
        }
        let Some(id) = parse_id(el.attr("id")) else {
            continue;
        };
        recorder.record(&recorder.delivered, id);
        let wants_receipt = el.children.iter().any(|c| c.is("request", NS_RECEIPTS));
        if let (true, Some(from), Some(id)) = (wants_receipt, el.attr("from"), el.attr("id")) {
            if outbox.stanza(out::receipt(from, id), "").is_err() {
                return;
            }
        }
    }
}

/// Sends `count` messages one after another (the next once the server's `<a/>` covers the
/// previous one), each to a random other client.
async fn sender(
    me: Arc<Client>,
    all: Arc<Vec<Arc<Client>>>,
    count: usize,
    body_bytes: usize,
    recorder: Arc<Recorder>,
) -> Result<()> {
    let mut acked = me.acked.clone();
    for _ in 0..count {
        let (to, id, body) = {
            let mut rng = rand::rng();
            let to = loop {
                let c = &all[rng.random_range(0..all.len())];
                if c.jid != me.jid {
                    break c.jid.clone();
                }
            };
            let id: Id = rng.random();
            let body: String = (&mut rng)
                .sample_iter(Alphanumeric)
                .take(body_bytes)
                .map(char::from)
                .collect();
            (to, id, body)
        };
        recorder.record(&recorder.sent, id);
        let n = me
            .outbox
            .stanza(
                out::message(&to, &hex::encode(id), &body),
                &out::sm_request(),
            )
            .context("the connection's writer stopped")?;
        match tokio::time::timeout(TIMEOUT, acked.wait_for(|h| *h >= n)).await {
            Ok(Ok(_)) => recorder.record(&recorder.accepted, id),
            Ok(Err(_)) => bail!("{}: the connection closed before <a/>", me.jid),
            Err(_) => bail!("{}: no <a/> for stanza {n} within {TIMEOUT:?}", me.jid),
        }
    }
    Ok(())
}

/// The thin-client load against `server` (freshly started, no accounts yet).
pub async fn measure(args: &ThinArgs, mut server: XmppServer) -> Result<XmppReport> {
    if args.clients < 2 || args.senders == 0 || args.senders > args.clients {
        bail!("need at least 2 clients and 1..=clients senders");
    }
    let name = server.name;
    let address = server.address.clone();
    let users: Vec<String> = (0..args.clients).map(|i| format!("load{i:05}")).collect();

    // 1. Accounts, over short-lived connections.
    let t = Instant::now();
    let jobs = users
        .iter()
        .map(|user| {
            let (address, user) = (address.clone(), user.clone());
            async move {
                tokio::time::timeout(TIMEOUT, register(&address, &user))
                    .await
                    .map_err(|_| XmppError::Timeout("registration"))
                    .and_then(|r| r)
                    .with_context(|| format!("registering {user}@{DOMAIN}"))
            }
        })
        .collect();
    bounded(args.concurrency, jobs)
        .await
        .with_context(|| format!("{name}: registering accounts"))?;
    eprintln!(
        "  {name}: {} accounts registered in {:.1} s",
        users.len(),
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_registered = server.rss_kib()?;

    // 2. Connect every client and keep it connected.
    let recorder = Arc::new(Recorder::new());
    let failures = Arc::new(Failures::default());
    let stopping = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let jobs = users
        .iter()
        .map(|user| {
            let (address, user) = (address.clone(), user.clone());
            let (rec, fail, stop) = (recorder.clone(), failures.clone(), stopping.clone());
            async move { connect(&address, user, rec, fail, stop).await.map(Arc::new) }
        })
        .collect();
    let clients: Arc<Vec<Arc<Client>>> = Arc::new(
        bounded(args.concurrency, jobs)
            .await
            .with_context(|| format!("{name}: connecting clients"))?,
    );
    eprintln!(
        "  {name}: {} clients connected in {:.1} s",
        clients.len(),
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.check_alive()?;
    let rss_connected = server.rss_kib()?;
    eprintln!(
        "  {name}: RSS {} with the accounts registered, {} with {} connected",
        mib(rss_registered),
        mib(rss_connected),
        clients.len()
    );

    // 3. Messaging.
    let per_sender = args.messages.div_ceil(args.senders);
    let cpu_before = server.cpu_seconds()?;
    let cpu_self_before = cpu_seconds("self")?;
    let t = Instant::now();
    let handles: Vec<_> = clients
        .iter()
        .take(args.senders)
        .map(|c| {
            tokio::spawn(sender(
                c.clone(),
                clients.clone(),
                per_sender,
                args.body_bytes,
                recorder.clone(),
            ))
        })
        .collect();
    for h in handles {
        h.await?
            .with_context(|| format!("{name}: a sender failed"))?;
    }
    recorder.wait_drained(TIMEOUT).await;
    let messaging_s = t.elapsed().as_secs_f64();
    let server_cpu_s = server.cpu_seconds()? - cpu_before;
    let load_cpu_s = cpu_seconds("self")? - cpu_self_before;
    server.check_alive()?;
    stopping.store(true, Ordering::Relaxed);
    Ok(XmppReport {
        name,
        summary: recorder.summary(),
        server_cpu_s,
        load_cpu_s,
        messaging_s,
        rss_registered_kib: rss_registered,
        rss_connected_kib: rss_connected,
        clients: clients.len(),
        errors: [
            failures.bounced.load(Ordering::Relaxed),
            failures.bad_acks.load(Ordering::Relaxed),
            failures.disconnects.load(Ordering::Relaxed),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_round_trip_as_hex() {
        let id: Id = [0xab; 16];
        assert_eq!(parse_id(Some(&hex::encode(id))), Some(id));
        assert_eq!(parse_id(Some("abab")), None);
        assert_eq!(parse_id(Some("not hex at all, 32 characters...")), None);
        assert_eq!(parse_id(None), None);
    }

    #[test]
    fn stanza_numbers_follow_the_write_order() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let outbox = Outbox {
            tx,
            stanzas: Mutex::new(0),
        };
        assert_eq!(outbox.stanza("<presence/>".into(), "").unwrap(), 1);
        outbox.nonza(out::sm_ack(1)).unwrap();
        assert_eq!(outbox.stanza("<message/>".into(), "<r/>").unwrap(), 2);
        assert_eq!(rx.try_recv().unwrap(), b"<presence/>");
        assert_eq!(rx.try_recv().unwrap(), out::sm_ack(1).as_bytes());
        assert_eq!(rx.try_recv().unwrap(), b"<message/><r/>");
        drop(rx);
        assert!(matches!(
            outbox.stanza("<message/>".into(), ""),
            Err(XmppError::Closed)
        ));
    }
}
