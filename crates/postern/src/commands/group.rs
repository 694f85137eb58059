//! `postern group create|add|remove|leave|list|send|history`.
//!
//! A membership change is saved (and the group's new state with it) before anything is
//! sent, like a message: if the service cannot be reached now, the change goes out with
//! the next send. Sending and history are `postern send` and `postern history` with a
//! group for a contact.

use std::path::PathBuf;

use postern_client::{Client, GroupInfo, MembershipChange};

use super::messaging::{self, Target};
use crate::cli::GroupCommand;

pub async fn run(home: PathBuf, cmd: GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Create { name, members } => {
            change(home, async |c: &Client| {
                c.create_group(&name, &members).await
            })
            .await
        }
        GroupCommand::Add { group, members } => {
            change(home, async |c: &Client| {
                c.add_to_group(&group, &members).await
            })
            .await
        }
        GroupCommand::Remove { group, members } => {
            change(home, async |c: &Client| {
                c.remove_from_group(&group, &members).await
            })
            .await
        }
        GroupCommand::Leave { group } => {
            change(home, async |c: &Client| c.leave_group(&group).await).await
        }
        GroupCommand::List { json } => list(home, json).await,
        GroupCommand::Send { group, text, file } => {
            let text = text.unwrap_or_default();
            messaging::send(home, Target::Group(group), &text, file.as_deref()).await
        }
        GroupCommand::History {
            group,
            json,
            save_to,
        } => messaging::history(home, Target::Group(group), json, save_to.as_deref()).await,
    }
}

/// Makes a membership change, then sends it (and whatever else is pending) at once.
async fn change(
    home: PathBuf,
    make: impl AsyncFnOnce(&Client) -> Result<MembershipChange, postern_client::ClientError>,
) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let mut events = client.subscribe();
    let made = make(&client).await;
    let MembershipChange { group, message_id } = match made {
        Ok(m) => m,
        Err(e) => {
            client.close().await;
            return Err(e.into());
        }
    };
    let sent = match message_id {
        Some(id) => messaging::push_out(&client, &mut events, id).await,
        None => Ok(()),
    };
    client.close().await;
    let me = client.username().to_string();
    println!("{}", group.id);
    eprintln!("{}", describe(&group, &me));
    match sent {
        Ok(()) => {
            if group.joined {
                eprintln!("✓ the members have been told");
            } else {
                eprintln!("✓ the members have been told you left");
            }
            Ok(())
        }
        Err(e) => Err(messaging::not_sent(e)),
    }
}

/// "“trip” (id 1a2b3c…): alice (you), bob, carol".
fn describe(g: &GroupInfo, me: &str) -> String {
    let members: Vec<String> = g
        .members
        .iter()
        .map(|m| {
            if m == me {
                format!("{m} (you)")
            } else {
                m.clone()
            }
        })
        .collect();
    let id = g.id.to_string();
    let short = &id[..8];
    if g.joined {
        format!("“{}” (id {short}…): {}", g.name, members.join(", "))
    } else {
        format!(
            "“{}” (id {short}…): you are no longer a member; it has {}",
            g.name,
            if members.is_empty() {
                "nobody else".to_string()
            } else {
                members.join(", ")
            }
        )
    }
}

async fn list(home: PathBuf, json: bool) -> anyhow::Result<()> {
    let client = Client::open(&home).await?;
    let groups = client.groups().await;
    client.close().await;
    let groups = groups?;
    let me = client.username();
    if groups.is_empty() && !json {
        eprintln!("no groups yet: create one with `postern group create NAME MEMBER…`");
    }
    for g in groups {
        if json {
            println!("{}", serde_json::to_string(&g)?);
        } else {
            println!("{}", describe(&g, me));
        }
    }
    Ok(())
}
