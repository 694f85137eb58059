//! `postern send`, `postern inbox`, `postern history`.

use std::path::PathBuf;

use anyhow::Context;
use postern_client::{Client, ClientError, ConnectMode, Event};
use tokio::sync::broadcast;

use crate::output;

pub async fn send(home: PathBuf, contact: &str, text: &str) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let result = async {
        // Saved first: from here on nothing typed can be lost.
        let id = client.queue(contact, text).await?;
        client.connect(ConnectMode::SendOnly).await?;
        // Everything pending goes out, this message included; a connection lost on the
        // way is replaced (routes raced again) and what was not acknowledged is re-sent.
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
            eprintln!(
                "✓ sent to {contact} (✓✓ appears in `postern history {contact}` once delivered)"
            );
            Ok(())
        }
        Err(e) if e.is_connection_problem() => Err(anyhow::Error::new(e).context(
            "not sent yet: the message is saved and goes out with your next `postern send`, \
             `postern inbox` or `postern status`",
        )),
        Err(e @ ClientError::UnknownContact(_)) => {
            Err(anyhow::Error::new(e)
                .context("not sent: the message stays in your history, marked ✗"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Tells the user (on stderr) about earlier pending messages that went out (or never can).
fn report_pending(
    outcomes: &[postern_client::PendingOutcome],
    except: Option<postern_client::MessageId>,
) {
    for line in pending_lines(outcomes, except) {
        eprintln!("{line}");
    }
}

/// One line per earlier pending message: sent, or why it never can be.
pub(crate) fn pending_lines(
    outcomes: &[postern_client::PendingOutcome],
    except: Option<postern_client::MessageId>,
) -> Vec<String> {
    outcomes
        .iter()
        .filter(|o| Some(o.message_id) != except)
        .map(|o| match &o.result {
            Ok(()) => format!("✓ sent an earlier message to {} ({})", o.to, o.message_id),
            Err(e) => format!("✗ an earlier message to {} was not sent: {e}", o.to),
        })
        .collect()
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
    let mut shown = 0;
    let work = async {
        client.connect(ConnectMode::Receive).await?;
        report_pending(&client.send_pending().await?, None);
        // Replaces a connection that stalls on the way, as long as each one makes progress.
        client.receive_all().await?;
        Ok::<_, ClientError>(())
    };
    tokio::pin!(work);
    // Events are printed while they arrive, so a long backlog never overflows the queue.
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            event = events.recv() => match event {
                Ok(event) => if print_event(&event, json) { shown += 1 },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("({n} events skipped; see `postern history`)");
                }
                Err(broadcast::error::RecvError::Closed) => {}
            },
        }
    };
    while let Ok(event) = events.try_recv() {
        if print_event(&event, json) {
            shown += 1;
        }
    }
    result?;
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
    // The client races the routes, keeps the connection alive (a stalled one is noticed
    // and replaced), sends what is pending each time it is back, and goes on receiving
    // where it stopped.
    let stop = super::shutdown_signal();
    tokio::pin!(stop);
    let running = client.keep_connected(ConnectMode::Receive);
    let result = loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(Event::Connected {
                    via, handshake_ms, ..
                }) => {
                    eprintln!("✓ connected via {via} ({handshake_ms} ms)");
                }
                Ok(Event::Disconnected { reason }) => eprintln!("disconnected: {reason}; reconnecting"),
                Ok(Event::AttemptFailed { route, stage, reason, hostile }) => {
                    eprintln!("✗ {route} — {stage}: {reason}{}", if hostile { " (not used again)" } else { "" });
                }
                Ok(Event::Unreachable { retry_in_ms, .. }) => {
                    eprintln!("no route worked; trying again in {:.1} s", retry_in_ms as f64 / 1000.0);
                }
                Ok(Event::Sent { message_id, to }) => eprintln!("✓ sent to {to} ({message_id})"),
                Ok(event) => { print_event(&event, json); }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("({n} events skipped; see `postern history`)");
                }
                Err(broadcast::error::RecvError::Closed) => break Ok(()),
            },
            _ = &mut stop => break Ok(()),
        }
    };
    running.abort();
    result
}

/// Prints a user-facing event; returns whether it printed something.
fn print_event(event: &Event, json: bool) -> bool {
    let visible = matches!(
        event,
        Event::Incoming(_)
            | Event::Delivered { .. }
            | Event::Undecryptable { .. }
            | Event::Failed { .. }
            | Event::KeyChanged { .. }
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
        Event::Failed { to, reason, .. } => println!("✗ a message to {to} failed: {reason}"),
        Event::KeyChanged { contact } => println!("{}", key_changed_line(contact)),
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
                "[{}] → {} {} {}{}",
                output::time(e.created_ms),
                contact,
                e.status.marks(),
                e.text,
                match &e.failure {
                    Some(why) => format!("  (not delivered: {why})"),
                    None => String::new(),
                }
            );
        } else if e.status == postern_client::MessageStatus::KeyChanged {
            println!(
                "[{}] {}",
                output::time(e.created_ms),
                key_changed_line(contact)
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

/// The line that marks a contact's key change, in history and in the inbox.
pub(crate) fn key_changed_line(contact: &str) -> String {
    format!(
        "⚠ {contact}'s safety number changed (new identity key) — verify with \
         `postern contact verify {contact}`"
    )
}
