//! `postern contact verify`: the safety number to compare in person.

use std::path::PathBuf;

use postern_client::{Client, ClientError, ConnectMode, ContactSafety};

use crate::cli::ContactCommand;
use crate::output;

pub async fn run(home: PathBuf, cmd: ContactCommand) -> anyhow::Result<()> {
    let ContactCommand::Verify {
        contact,
        confirm,
        clear,
        json,
    } = cmd;
    let contact = contact.trim().to_ascii_lowercase();
    let client = Client::open(&home).await?;
    let result = verify(&client, &contact, confirm, clear, json).await;
    client.close().await;
    result
}

async fn verify(
    client: &Client,
    contact: &str,
    confirm: bool,
    clear: bool,
    json: bool,
) -> anyhow::Result<()> {
    if clear {
        client.clear_verified(contact).await?;
        println!("{contact} is no longer marked verified.");
        return Ok(());
    }
    // Read the contact's devices from the server, so the number covers the keys it hands
    // out now; offline, the keys pinned on this device still give a number.
    if let Err(e) = client.connect(ConnectMode::SendOnly).await {
        if !e.is_connection_problem() {
            return Err(e.into());
        }
        eprintln!(
            "not connected ({e});\nthe number below comes from the keys pinned on this device"
        );
    }
    let safety = client.safety_number(contact).await?;
    if confirm {
        if safety.changed_now {
            // The number the user compared a moment ago is not this one.
            return Err(
                anyhow::Error::new(ClientError::SafetyNumberChanged(contact.to_string()))
                    .context("not marked verified"),
            );
        }
        client
            .mark_verified(contact, safety.number.digits())
            .await?;
        let safety = client.safety_number(contact).await?;
        if json {
            println!("{}", serde_json::to_string(&safety)?);
        } else {
            println!(
                "✓ {contact} is verified with the safety number\n\n{}\n\n\
                 If their keys ever change, `postern history {contact}` shows ⚠ where it \
                 happened and {contact} is no longer verified.",
                number_block(&safety)
            );
        }
        return Ok(());
    }
    if json {
        println!("{}", serde_json::to_string(&safety)?);
        return Ok(());
    }
    print_safety(client, &safety);
    Ok(())
}

/// The twelve groups, four to a line, indented.
fn number_block(s: &ContactSafety) -> String {
    s.groups
        .chunks(4)
        .map(|line| format!("    {}", line.join("  ")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn print_safety(client: &Client, s: &ContactSafety) {
    let (me, them) = (client.username(), s.contact.as_str());
    println!("Safety number with {them}:\n\n{}\n", number_block(s));
    match super::relay::qr(&s.qr_payload) {
        Ok(qr) => println!("{qr}"),
        Err(e) => eprintln!("(no QR code: {e})"),
    }
    if s.devices > 1 {
        println!("It covers {them}'s {} devices.", s.devices);
    }
    let status = if s.verified {
        format!(
            "✓ Verified: you confirmed this number{}.",
            s.verified_ms
                .map(|ms| format!(" on {}", output::time(ms)))
                .unwrap_or_default()
        )
    } else if s.changed_since_verified {
        format!(
            "⚠ Not verified: {them}'s safety number changed{} since you verified it{}. \
             Compare it again.",
            s.key_changed_ms
                .map(|ms| format!(" on {}", output::time(ms)))
                .unwrap_or_default(),
            s.verified_ms
                .map(|ms| format!(" on {}", output::time(ms)))
                .unwrap_or_default()
        )
    } else if let Some(ms) = s.key_changed_ms {
        format!(
            "⚠ Not verified. {them}'s safety number changed on {} (new identity key).",
            output::time(ms)
        )
    } else {
        "Not verified yet.".to_string()
    };
    println!("{status}");
    if s.changed_now {
        println!("(Their keys changed just now: `postern history {them}` marks it.)");
    }
    if !s.checked_with_server {
        println!("(Computed from the keys pinned on this device: the server was not reached.)");
    }
    println!(
        "\nTo compare: meet {them} in person (or call on a channel where you recognise each\n\
         other) and ask them to run `postern contact verify {me}`. Read the 12 groups aloud,\n\
         or scan each other's QR code.\n\
         • The same 60 digits: nobody is in between. Run\n  \
         `postern contact verify {them} --confirm`.\n\
         • Different digits: someone may be reading your messages. Do not confirm; ask\n  \
         {them} whether they reinstalled, and compare again."
    );
}
