//! `postern dev`: a whole local network in one command.

use postern_server::{DataDir, Server, ServerConfig};

use crate::cli::DevArgs;

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let dir = DataDir::new(&args.data);
    let public = if args.listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", args.listen.port())
    } else {
        args.listen.to_string()
    };
    dir.init(&public)?;
    let server = Server::bind(ServerConfig::new(&args.data, args.listen)).await?;
    let addr = server.local_addr();
    if addr.port() != args.listen.port() {
        // Port 0 was asked for: tell clients the real one.
        dir.init(&format!("127.0.0.1:{}", addr.port()))?;
    }
    let exe = std::env::current_exe()
        .ok()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "postern".into());
    let network = dir.network_path();
    let n = network.display();
    println!(
        "\
Postern development network is running.
  server   {addr}   (embedded SQLite database in {data})
  network  {n}

Try it from another terminal:
  {exe} --home /tmp/postern-alice account create alice --network {n}
  {exe} --home /tmp/postern-bob account create bob --network {n}
  {exe} --home /tmp/postern-alice send bob 'hello bob'
  {exe} --home /tmp/postern-bob inbox
  {exe} --home /tmp/postern-bob send alice 'hi alice'
  {exe} --home /tmp/postern-alice inbox
  {exe} --home /tmp/postern-alice history bob      (✓ sent, ✓✓ delivered)

Press Ctrl-C to stop. Data stays in {data} for the next run.",
        data = args.data.display()
    );
    server.run_until(super::shutdown_signal()).await?;
    Ok(())
}
