//! The `postern` command line: one binary for every role in a Postern network.
//!
//! * [`cli`]: the argument grammar (clap), with the help text users read.
//! * `commands::account`, `commands::messaging`: the messenger (`account create`, `send`,
//!   `inbox`, `history`), built on `postern-client`.
//! * `commands::server`: `server init` and `server run`, built on `postern-server`.
//! * `commands::dev`: `postern dev`, a whole local network in one command.
//!
//! * [`hints`]: what to type next, for the client library's errors.
//!
//! `main.rs` only parses arguments, sets up logging and calls [`run`].

pub mod cli;
mod commands;
pub mod hints;
mod output;

pub use cli::Cli;

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    commands::dispatch(cli).await
}
