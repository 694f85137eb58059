//! `postern send`, `postern inbox`, `postern history`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use postern_client::{Client, ClientError, ConnectMode, Event};
use tokio::sync::broadcast;

use crate::output;

/// How often `inbox --follow` proves the connection is alive.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub async fn send(home: PathBuf, contact: &str, text: &str) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let result = async {
        // Saved first: from here on nothing typed can be lost.
        let id = client.queue(contact, text).await?;
        client.connect(ConnectMode::SendOnly).await?;
        let outcomes = client.send_pending().await?;
        report_pending(&outcomes, Some(id));
        match outcomes.into_iter().find(|o| o.message_id == id) {
            Some(o) => o.result.map(|()| id),
            None => Err(ClientError::NotConnected),
        }
    }
    .await;
    client.close().await;
    match result {
        Ok(id) => {
            println!("{id}");
            eprintln!("✓ sent to {contact} (✓✓ appears in `postern history {contact}` once delivered)");
            Ok(())
        }
        Err(
            e @ (ClientError::Unreachable { .. }
            | ClientError::NotConnected
            | ClientError::Timeout(_)
            | ClientError::Protocol(_)),
        ) => Err(anyhow::Error::new(e).context(
            "not sent yet: the message is saved and goes out with your next `postern send` or `postern inbox`",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Tells the user about earlier pending messages that went out (or never can).
fn report_pending(
    outcomes: &[postern_client::PendingOutcome],
    except: Option<postern_client::MessageId>,
) {
    for o in outcomes.iter().filter(|o| Some(o.message_id) != except) {
        match &o.result {
            Ok(()) => eprintln!("✓ sent an earlier message to {} ({})", o.to, o.message_id),
            Err(e) => eprintln!("✗ an earlier message to {} was not sent: {e}", o.to),
        }
    }
}

pub async fn inbox(home: PathBuf, follow: bool, json: bool) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let mut events = client.subscribe();
    let result = if follow {
        follow_inbox(&client, &mut events, json).await
    } else {
        fetch_once(&client, &mut events, json).await
    };
    client.close().await;
    result
}

async fn fetch_once(
    client: &Client,
    events: &mut broadcast::Receiver<Event>,
    json: bool,
) -> anyhow::Result<()> {
    client.connect(ConnectMode::Receive).await?;
    report_pending(&client.send_pending().await?, None);
    client.sync().await?;
    let mut shown = 0;
    while let Ok(event) = events.try_recv() {
        if print_event(&event, json) {
            shown += 1;
        }
    }
    if shown == 0 && !json {
        eprintln!("no new messages");
    }
    Ok(())
}

async fn follow_inbox(
    client: &Client,
    events: &mut broadcast::Receiver<Event>,
    json: bool,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_secs(1);
    loop {
        match client.connect(ConnectMode::Receive).await {
            Ok(()) => {
                backoff = Duration::from_secs(1);
                match client.send_pending().await {
                    Ok(outcomes) => report_pending(&outcomes, None),
                    Err(e) => eprintln!("could not send waiting messages yet: {e}"),
                }
            }
            // A wrong server key will not fix itself: stop instead of retrying forever.
            Err(
                e @ ClientError::Protocol(
                    postern_protocol::ProtocolError::ServerAuthentication
                    | postern_protocol::ProtocolError::HandshakeClosed,
                ),
            ) => return Err(e.into()),
            Err(e @ (ClientError::NoProfile(_) | ClientError::Profile(_))) => return Err(e.into()),
            Err(e) => {
                eprintln!("{e}; retrying in {}s", backoff.as_secs());
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = super::shutdown_signal() => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        }
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(Event::Disconnected { reason }) => {
                        eprintln!("disconnected: {reason}; reconnecting");
                        break;
                    }
                    Ok(event) => { print_event(&event, json); }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        eprintln!("({n} events skipped; see `postern history`)");
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = keepalive.tick() => {
                    if client.sync().await.is_err() {
                        eprintln!("the connection stopped answering; reconnecting");
                        break;
                    }
                }
                _ = super::shutdown_signal() => return Ok(()),
            }
        }
    }
}

/// Prints a user-facing event; returns whether it printed something.
fn print_event(event: &Event, json: bool) -> bool {
    let visible = matches!(
        event,
        Event::Incoming(_) | Event::Delivered { .. } | Event::Undecryptable { .. }
    );
    if !visible {
        return false;
    }
    if json {
        match serde_json::to_string(event) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("cannot encode event: {e}"),
        }
        return true;
    }
    match event {
        Event::Incoming(m) => println!(
            "[{}] {}: {}",
            output::time(m.server_time_ms),
            m.from,
            m.text
        ),
        Event::Delivered { message_id, to } => println!("✓✓ delivered to {to}: {message_id}"),
        Event::Undecryptable { from, reason, .. } => {
            println!("⚠ a message from {from} could not be decrypted: {reason}")
        }
        _ => {}
    }
    true
}

pub async fn history(home: PathBuf, contact: &str, json: bool) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let entries = client
        .history(contact)
        .await
        .context("cannot read the history")?;
    client.close().await;
    if entries.is_empty() && !json {
        eprintln!("no messages with {contact} yet");
    }
    for e in entries {
        if json {
            println!("{}", serde_json::to_string(&e)?);
        } else if e.outgoing {
            println!(
                "[{}] → {} {} {}",
                output::time(e.created_ms),
                contact,
                e.status.marks(),
                e.text
            );
        } else if e.status == postern_client::MessageStatus::Undecryptable {
            println!(
                "[{}] ← {} ⚠ (could not be decrypted)",
                output::time(e.server_time_ms.unwrap_or(0)),
                contact
            );
        } else {
            println!("[{}] ← {}: {}", output::time(e.created_ms), contact, e.text);
        }
    }
    Ok(())
}
