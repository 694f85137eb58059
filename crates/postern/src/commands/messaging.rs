//! `postern send`, `postern inbox`, `postern history`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use postern_client::{human_bytes, Client, ClientError, ConnectMode, Event};
use tokio::sync::broadcast;

use crate::output;

pub async fn send(
    home: PathBuf,
    contact: &str,
    text: &str,
    file: Option<&Path>,
) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let mut events = client.subscribe();
    let result = async {
        // Saved first: from here on nothing typed can be lost (a file is encrypted into
        // the profile, so it may change or go away afterwards).
        let id = match file {
            Some(f) => client.queue_file(contact, f, text).await?,
            None => client.queue(contact, text).await?,
        };
        client.connect(ConnectMode::SendOnly).await?;
        // Everything pending goes out, this message included; a connection lost on the
        // way is replaced (routes raced again) and what was not acknowledged is re-sent
        // (a file goes on from the last chunk the server acknowledged).
        let outcomes = with_progress(&mut events, client.send_pending()).await?;
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
        Err(
            e @ (ClientError::UnknownContact(_)
            | ClientError::AttachmentTooLarge { .. }
            | ClientError::MediaUnavailable(_)),
        ) => {
            Err(anyhow::Error::new(e)
                .context("not sent: the message stays in your history, marked ✗"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs `work` while printing the progress of file transfers on stderr: one line that
/// updates in place on a terminal, a line per tenth otherwise (logs, scripts).
async fn with_progress<T>(
    events: &mut broadcast::Receiver<Event>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let mut printer = ProgressPrinter::new();
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => {
                printer.finish();
                return r;
            }
            event = events.recv() => {
                if let Ok(event) = event {
                    printer.show(&event);
                }
            }
        }
    }
}

/// Prints file transfer progress on stderr.
pub(crate) struct ProgressPrinter {
    tty: bool,
    /// The tenth last printed (not a terminal), per transfer.
    last: std::collections::HashMap<postern_client::MessageId, u64>,
    open_line: bool,
}

impl ProgressPrinter {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            tty: std::io::stderr().is_terminal(),
            last: Default::default(),
            open_line: false,
        }
    }

    pub fn show(&mut self, event: &Event) {
        use std::io::Write;
        let Event::Transfer {
            message_id,
            peer,
            outgoing,
            file_name,
            done,
            total,
        } = event
        else {
            return;
        };
        let pct = (done * 100).checked_div(*total).unwrap_or(100);
        let line = format!(
            "{} {file_name} {} {peer}: {} of {} ({pct} %)",
            if *outgoing { "uploading" } else { "fetching" },
            if *outgoing { "to" } else { "from" },
            human_bytes(*done),
            human_bytes(*total),
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
            self.open_line = true;
            if done == total {
                eprintln!();
                self.open_line = false;
            }
        } else {
            let tenth = pct / 10;
            if self.last.get(message_id) != Some(&tenth) {
                self.last.insert(*message_id, tenth);
                eprintln!("{line}");
            }
        }
    }

    pub fn finish(&mut self) {
        if self.open_line {
            eprintln!();
            self.open_line = false;
        }
    }
}

/// Copies a received file into `dir` (created if missing) under a name not taken there.
fn save_copy(dir: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "attachment".into());
    let dst = postern_client::attachments::unique_path(dir, &name);
    std::fs::copy(path, &dst)
        .with_context(|| format!("cannot copy {} to {}", path.display(), dst.display()))?;
    Ok(dst)
}

/// How an attachment is shown in a conversation.
fn attachment_line(a: &postern_client::AttachmentInfo) -> String {
    use postern_client::TransferState;
    let what = format!(
        "📎 {} ({}, {})",
        a.file_name,
        human_bytes(a.size),
        a.content_type
    );
    let pct = (a.transferred * 100)
        .checked_div(a.ciphertext_size)
        .unwrap_or(0);
    match a.state {
        TransferState::Uploading => format!("{what} — uploading, {pct} %"),
        TransferState::Uploaded => what,
        TransferState::Downloading => {
            format!("{what} — not fetched yet ({pct} %): run `postern inbox`")
        }
        TransferState::Done => match &a.path {
            Some(p) => format!("{what} — saved at {p}"),
            None => what,
        },
        TransferState::Failed => format!(
            "{what} — ✗ {}",
            a.error.as_deref().unwrap_or("could not be transferred")
        ),
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

pub async fn inbox(
    home: PathBuf,
    follow: bool,
    json: bool,
    save_to: Option<&Path>,
) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let mut events = client.subscribe();
    let result = if follow {
        follow_inbox(&client, &mut events, json, save_to).await
    } else {
        fetch_once(&client, &mut events, json, save_to).await
    };
    client.close().await;
    result
}

async fn fetch_once(
    client: &Client,
    events: &mut broadcast::Receiver<Event>,
    json: bool,
    save_to: Option<&Path>,
) -> anyhow::Result<()> {
    let mut shown = 0;
    let work = async {
        client.connect(ConnectMode::Receive).await?;
        report_pending(&client.send_pending().await?, None);
        // Replaces a connection that stalls on the way, as long as each one makes progress.
        client.receive_all().await?;
        // Then the files those messages announced (resumed where an earlier run stopped).
        client.fetch_attachments().await?;
        Ok::<_, ClientError>(())
    };
    tokio::pin!(work);
    let mut progress = ProgressPrinter::new();
    let mut saving = Ok(());
    let mut on_event = |event: &Event, progress: &mut ProgressPrinter| {
        progress.show(event);
        if let Event::AttachmentSaved { path, .. } = event {
            progress.finish();
            if let (Some(dir), Ok(())) = (save_to, &saving) {
                match save_copy(dir, Path::new(path)) {
                    Ok(copy) => eprintln!("  copied to {}", copy.display()),
                    Err(e) => saving = Err(e),
                }
            }
        }
        print_event(event, json)
    };
    // Events are printed while they arrive, so a long backlog never overflows the queue.
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            event = events.recv() => match event {
                Ok(event) => if on_event(&event, &mut progress) { shown += 1 },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("({n} events skipped; see `postern history`)");
                }
                Err(broadcast::error::RecvError::Closed) => {}
            },
        }
    };
    while let Ok(event) = events.try_recv() {
        if on_event(&event, &mut progress) {
            shown += 1;
        }
    }
    progress.finish();
    saving?;
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
    save_to: Option<&Path>,
) -> anyhow::Result<()> {
    let mut progress = ProgressPrinter::new();
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
                Ok(event @ Event::Transfer { .. }) => progress.show(&event),
                Ok(event) => {
                    if let (Event::AttachmentSaved { path, .. }, Some(dir)) = (&event, save_to) {
                        progress.finish();
                        match save_copy(dir, Path::new(path)) {
                            Ok(copy) => eprintln!("  copied to {}", copy.display()),
                            Err(e) => eprintln!("✗ {e:#}"),
                        }
                    }
                    print_event(&event, json);
                }
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
            | Event::AttachmentSaved { .. }
            | Event::AttachmentFailed { .. }
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
        Event::Incoming(m) => {
            let file = m.attachment.as_ref().map(|a| {
                format!(
                    "{}📎 {} ({}, {})",
                    if m.text.is_empty() { "" } else { " " },
                    a.file_name,
                    human_bytes(a.size),
                    a.content_type
                )
            });
            println!(
                "[{}] {}: {}{}",
                output::time(m.server_time_ms),
                m.from,
                m.text,
                file.unwrap_or_default()
            )
        }
        Event::AttachmentSaved {
            from,
            file_name,
            path,
            ..
        } => println!("📎 {file_name} from {from} saved at {path}"),
        Event::AttachmentFailed {
            peer,
            outgoing,
            file_name,
            reason,
            ..
        } => {
            if *outgoing {
                println!("✗ the file {file_name} to {peer} could not be sent: {reason}")
            } else {
                println!("✗ the file {file_name} from {peer} could not be fetched: {reason}")
            }
        }
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

pub async fn history(
    home: PathBuf,
    contact: &str,
    json: bool,
    save_to: Option<&Path>,
) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let entries = client
        .history(contact)
        .await
        .context("cannot read the history")?;
    client.close().await;
    if entries.is_empty() && !json {
        eprintln!("no messages with {contact} yet");
    }
    if let Some(dir) = save_to {
        let mut copied = 0;
        for e in &entries {
            if let Some(path) = e.attachment.as_ref().and_then(|a| {
                (a.state == postern_client::TransferState::Done)
                    .then_some(a.path.as_deref())
                    .flatten()
            }) {
                let copy = save_copy(dir, Path::new(path))?;
                eprintln!("copied {} to {}", path, copy.display());
                copied += 1;
            }
        }
        if copied == 0 {
            eprintln!("no files from {contact} have arrived here yet");
        }
    }
    for e in entries {
        let file = e
            .attachment
            .as_ref()
            .map(|a| {
                format!(
                    "{}{}",
                    if e.text.is_empty() { "" } else { " " },
                    attachment_line(a)
                )
            })
            .unwrap_or_default();
        if json {
            println!("{}", serde_json::to_string(&e)?);
        } else if e.outgoing {
            println!(
                "[{}] → {} {} {}{}{}",
                output::time(e.created_ms),
                contact,
                e.status.marks(),
                e.text,
                file,
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
            println!(
                "[{}] ← {}: {}{}",
                output::time(e.created_ms),
                contact,
                e.text,
                file
            );
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
