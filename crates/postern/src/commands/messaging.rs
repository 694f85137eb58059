//! `postern send`, `postern inbox`, `postern history` (and their group forms, `postern
//! group send` and `postern group history`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use postern_client::{human_bytes, Client, ClientError, ConnectMode, Event};
use tokio::sync::broadcast;

use crate::output;

/// Who a message or a history is for: a contact, or a group as the user named it.
pub enum Target {
    Contact(String),
    Group(String),
}

impl Target {
    /// The conversation key the client library takes, and how to name it to the user.
    async fn resolve(&self, client: &Client) -> Result<(String, String), ClientError> {
        Ok(match self {
            Target::Contact(c) => (c.clone(), c.clone()),
            Target::Group(g) => {
                let group = client.find_group(g).await?;
                (
                    group.conversation_key(),
                    format!("the group “{}”", group.name),
                )
            }
        })
    }

    /// The command that shows this conversation.
    fn history_command(&self) -> String {
        match self {
            Target::Contact(c) => format!("postern history {c}"),
            Target::Group(g) => format!("postern group history {}", shell_word(g)),
        }
    }
}

/// `word`, quoted for a shell if it needs to be.
fn shell_word(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

pub async fn send(
    home: PathBuf,
    to: Target,
    text: &str,
    file: Option<&Path>,
) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let mut events = client.subscribe();
    let result = async {
        let (key, shown) = to.resolve(&client).await?;
        // Saved first: from here on nothing typed can be lost (a file is encrypted into
        // the profile, so it may change or go away afterwards).
        let id = match file {
            Some(f) => client.queue_file(&key, f, text).await?,
            None => client.queue(&key, text).await?,
        };
        push_out(&client, &mut events, id)
            .await
            .map(|()| (id, shown))
    }
    .await;
    client.close().await;
    match result {
        Ok((id, shown)) => {
            println!("{id}");
            eprintln!(
                "✓ sent to {shown} (✓✓ appears in `{}` once delivered)",
                to.history_command()
            );
            Ok(())
        }
        Err(e) => Err(not_sent(e)),
    }
}

/// Connects and sends everything pending, this message (`id`) included; returns its
/// outcome. A connection lost on the way is replaced (routes raced again) and what was
/// not acknowledged is re-sent (a file goes on from the last chunk the server
/// acknowledged).
pub(crate) async fn push_out(
    client: &Client,
    events: &mut broadcast::Receiver<Event>,
    id: postern_client::MessageId,
) -> Result<(), ClientError> {
    client.connect(ConnectMode::SendOnly).await?;
    let outcomes = with_progress(events, client.send_pending()).await?;
    report_pending(&outcomes, Some(id));
    match outcomes.into_iter().find(|o| o.message_id == id) {
        Some(o) => o.result,
        None => Err(ClientError::NotConnected),
    }
}

/// What to tell the user when a message saved in history did not go out now.
pub(crate) fn not_sent(e: ClientError) -> anyhow::Error {
    match e {
        e if e.is_connection_problem() => anyhow::Error::new(e).context(
            "not sent yet: the message is saved and goes out with your next `postern send`, \
             `postern inbox` or `postern status`",
        ),
        e @ (ClientError::UnknownContact(_)
        | ClientError::AttachmentTooLarge { .. }
        | ClientError::MediaUnavailable(_)
        | ClientError::GroupUnreachable(_)) => {
            anyhow::Error::new(e).context("not sent: the message stays in your history, marked ✗")
        }
        e => e.into(),
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
                Ok(Event::Sent { message_id, to }) => eprintln!("✓ sent to {} ({message_id})", shown_peer(client, &to).await),
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
            | Event::GroupChanged { .. }
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
            let group = m
                .group
                .as_ref()
                .map(|g| format!(" in “{}”", g.name))
                .unwrap_or_default();
            println!(
                "[{}] {}{group}: {}{}",
                output::time(m.server_time_ms),
                m.from,
                m.text,
                file.unwrap_or_default()
            )
        }
        Event::GroupChanged { group, text, .. } => println!("⚙ “{}”: {text}", group.name),
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
        Event::Delivered {
            message_id,
            to,
            group,
            all,
        } => match group {
            Some(g) => println!(
                "✓✓ delivered to {to} in “{}”{}: {message_id}",
                g.name,
                if *all == Some(true) {
                    " (every member has it now)"
                } else {
                    ""
                }
            ),
            None => println!("✓✓ delivered to {to}: {message_id}"),
        },
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
    target: Target,
    json: bool,
    save_to: Option<&Path>,
) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let found = async {
        let (key, shown) = target.resolve(&client).await?;
        Ok::<_, ClientError>((client.history(&key).await?, shown))
    }
    .await;
    client.close().await;
    let (entries, shown) = found.context("cannot read the history")?;
    let (group, contact) = match &target {
        Target::Group(_) => (true, shown.as_str()),
        Target::Contact(c) => (false, c.as_str()),
    };
    if entries.is_empty() && !json {
        eprintln!("no messages with {shown} yet");
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
            eprintln!("no files from {shown} have arrived here yet");
        }
    }
    for e in entries {
        if json {
            println!("{}", serde_json::to_string(&e)?);
        } else {
            println!("{}", history_line(&e, contact, group));
        }
    }
    Ok(())
}

/// One line of `history`: `contact` is the contact's name, or the group's as shown.
fn history_line(e: &postern_client::HistoryEntry, contact: &str, group: bool) -> String {
    use postern_client::MessageStatus;
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
    let failure = match &e.failure {
        Some(why) => format!("  (not delivered: {why})"),
        None => String::new(),
    };
    let from = e.sender.as_deref().unwrap_or(contact);
    if e.group_event {
        let marks = if e.outgoing {
            format!(" {}", e.marks())
        } else {
            String::new()
        };
        return format!(
            "[{}] ⚙ {}{marks}{failure}",
            output::time(e.created_ms),
            e.text
        );
    }
    if e.outgoing {
        let to = if group { "" } else { contact };
        let arrow = if group { "→" } else { "→ " };
        format!(
            "[{}] {arrow}{to} {} {}{file}{failure}",
            output::time(e.created_ms),
            e.marks(),
            e.text,
        )
    } else if e.status == MessageStatus::KeyChanged {
        format!(
            "[{}] {}",
            output::time(e.created_ms),
            key_changed_line(contact)
        )
    } else if e.status == MessageStatus::Undecryptable {
        format!(
            "[{}] ← {from} ⚠ (could not be decrypted)",
            output::time(e.server_time_ms.unwrap_or(0)),
        )
    } else {
        format!(
            "[{}] ← {from}: {}{file}",
            output::time(e.created_ms),
            e.text
        )
    }
}

/// How events name a conversation: a contact's name, or "the group “name”".
async fn shown_peer(client: &Client, peer: &str) -> String {
    if postern_client::GroupId::from_conversation_key(peer).is_none() {
        return peer.to_string();
    }
    match client.find_group(peer).await {
        Ok(g) => format!("the group “{}”", g.name),
        Err(_) => "a group".to_string(),
    }
}

/// The line that marks a contact's key change, in history and in the inbox.
pub(crate) fn key_changed_line(contact: &str) -> String {
    format!(
        "⚠ {contact}'s safety number changed (new identity key) — verify with \
         `postern contact verify {contact}`"
    )
}
