//! The `postern` command. Minimal wiring for the relay subcommand; the messenger's
//! subcommands are added in the main branch.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "postern",
    version,
    about = "Postern: an end-to-end encrypted messenger that keeps working through volunteer relays"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a relay (volunteer proxy) in front of the Postern service, or print its link.
    Relay(postern_relay::cli::RelayCli),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Relay(args) => postern_relay::cli::run(args).await,
    }
}
