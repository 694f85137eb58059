//! One module per group of commands.

mod account;
mod app;
mod contact;
mod dev;
mod group;
mod messaging;
pub mod proxy;
pub mod relay;
pub mod relay_doctor;
pub mod relay_setup;
mod server;

use std::path::PathBuf;

use anyhow::Context;

use crate::cli::{Cli, Command};

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let home = cli.home;
    match cli.command {
        Command::Account(cmd) => account::run(profile_home(home)?, cmd).await,
        Command::Send {
            contact,
            text,
            file,
        } => {
            let text = text.unwrap_or_default();
            let to = messaging::Target::Contact(contact);
            messaging::send(profile_home(home)?, to, &text, file.as_deref()).await
        }
        Command::Inbox {
            follow,
            json,
            save_to,
        } => messaging::inbox(profile_home(home)?, follow, json, save_to.as_deref()).await,
        Command::History {
            contact,
            json,
            save_to,
        } => {
            let target = messaging::Target::Contact(contact);
            messaging::history(profile_home(home)?, target, json, save_to.as_deref()).await
        }
        Command::Contact(cmd) => contact::run(profile_home(home)?, cmd).await,
        Command::Group(cmd) => group::run(profile_home(home)?, cmd).await,
        Command::Proxy(cmd) => proxy::run(profile_home(home)?, cmd).await,
        Command::Status { json } => proxy::status(profile_home(home)?, json).await,
        Command::Relay(cmd) => relay::run(*cmd).await,
        Command::Server(cmd) => server::run(cmd).await,
        Command::Dev(args) => dev::run(args).await,
        Command::App(args) => app::run(profile_home(home)?, args).await,
    }
}

/// `--home`, else `$POSTERN_HOME` (clap reads both), else `~/.postern`.
fn profile_home(home: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(h) = home {
        return Ok(h);
    }
    let base = std::env::var_os("HOME")
        .context("no profile directory: pass --home DIR or set POSTERN_HOME")?;
    Ok(PathBuf::from(base).join(".postern"))
}

/// A future that resolves when the process is asked to stop (Ctrl-C or SIGTERM). The
/// handlers are installed now, when this is called — not when the future is first polled —
/// so a signal that arrives right after a "ready" line is printed stops the process
/// cleanly instead of killing it.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
