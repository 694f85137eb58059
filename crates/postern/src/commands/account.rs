//! `postern account ...`

use std::path::PathBuf;

use anyhow::Context;
use postern_client::{Client, ProxyEntry};
use postern_protocol::network::NetworkFile;

use crate::cli::AccountCommand;

pub async fn run(home: PathBuf, cmd: AccountCommand) -> anyhow::Result<()> {
    match cmd {
        AccountCommand::Create {
            name,
            network,
            proxy,
        } => {
            let network = NetworkFile::load(&network)?;
            let relay = proxy
                .as_deref()
                .map(ProxyEntry::parse)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let client = Client::create_account_via(&home, &name, network, relay.clone())
                .await
                .with_context(|| format!("could not create the account {name:?}"))?;
            if let Some(r) = relay {
                println!("Registered through the relay {r} (saved as your first proxy).");
                println!(
                    "To never connect directly: `postern --home {} proxy use on`",
                    home.display()
                );
            }
            println!(
                "Account {} created (device {}) on {}.\nProfile: {}",
                client.username(),
                client.device_id(),
                client.network().server.address,
                home.display()
            );
            println!(
                "Next: `postern --home {} send CONTACT 'hello'`",
                home.display()
            );
            client.close().await;
        }
        AccountCommand::Show => {
            let client = Client::open(&home).await?;
            println!("username: {}", client.username());
            println!("device:   {}", client.device_id());
            println!("server:   {}", client.network().server.address);
            println!("server key: {}", client.network().server.public_key);
            if let Ok(f) = client.network().key_fingerprint() {
                println!("fingerprint: {f}   (compare it with the one the operator publishes)");
            }
            println!("profile:  {}", home.display());
            client.close().await;
        }
    }
    Ok(())
}
