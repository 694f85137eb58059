//! `postern server init` and `postern server run`.

use std::time::Duration;

use postern_protocol::net::TrustedProxies;
use postern_server::media::{MediaConfig, RemoteConfig};
use postern_server::store::Database;
use postern_server::{DataDir, Limits, Server, ServerConfig};

use crate::cli::{ServerCommand, ServerReshardArgs, ServerRunArgs};

pub async fn run(cmd: ServerCommand) -> anyhow::Result<()> {
    match cmd {
        ServerCommand::Init {
            data,
            public_address,
        } => {
            let report = DataDir::new(&data).init(&public_address)?;
            if report.created_key {
                println!("Created the server key in {}", data.display());
            } else {
                println!("Kept the existing server key in {}", data.display());
            }
            println!("Server public key: {}", report.public_key);
            println!(
                "Network file for clients: {}",
                report.network_file.display()
            );
            println!(
                "Start serving with: postern server run --data {}",
                data.display()
            );
            Ok(())
        }
        ServerCommand::Run(args) => serve(*args).await,
        ServerCommand::Reshard(args) => reshard(args).await,
    }
}

const MIB: u64 = 1024 * 1024;

pub(crate) fn config(args: &ServerRunArgs) -> anyhow::Result<ServerConfig> {
    let mut config = ServerConfig::new(&args.data, args.listen);
    config.database = Database::parse_all(&args.database)?;
    config.log_client_addresses = args.log_client_addresses;
    config.limits = Limits {
        max_connections: args.max_connections,
        registrations_per_minute: args.registrations_per_minute,
        handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        max_queue_per_device: args.max_queue_per_device,
        trusted_proxies: TrustedProxies::new(args.trusted_proxy.clone()),
        max_connections_per_source: args.max_connections_per_source,
        unregistered_timeout: Duration::from_secs(args.unregistered_timeout.max(1)),
        messages_per_minute: args.messages_per_minute,
        max_queued_bytes_per_account: args.max_queued_mib_per_account.saturating_mul(MIB),
        queue_ttl: args.queue_ttl.max(Duration::from_secs(1)),
        min_free_disk: args.min_free_disk_mib.saturating_mul(MIB),
        claims_per_requester_per_minute: args.claims_per_minute,
        claims_per_target_per_minute: args.claims_per_user_per_minute,
        ..Limits::default()
    };
    config.media = if args.no_media {
        None
    } else {
        let mut media = MediaConfig::new(
            args.media_dir
                .clone()
                .unwrap_or_else(|| args.data.join("media")),
        );
        media.max_file_bytes = args.media_max_file_mib.max(1).saturating_mul(MIB);
        media.quota_bytes = args.media_quota_mib.saturating_mul(MIB);
        media.max_uploads_per_account = args.media_max_files_per_account.max(1);
        media.ttl = args.media_ttl.max(Duration::from_secs(1));
        media.partial_ttl = media.partial_ttl.min(media.ttl);
        media.min_free_disk = config.limits.min_free_disk;
        if let (Some(bucket), Some(endpoint)) = (&args.media_s3_bucket, &args.media_s3_endpoint) {
            let mut remote = RemoteConfig::new(endpoint, bucket);
            remote.region = args.media_s3_region.clone();
            remote.prefix = args.media_s3_prefix.clone();
            media.remote = Some(remote);
        }
        Some(media)
    };
    Ok(config)
}

async fn serve(args: ServerRunArgs) -> anyhow::Result<()> {
    let server = Server::bind(config(&args)?).await?;
    let stop = super::shutdown_signal();
    // Scripts and tests wait for this line (the real port when --listen used port 0).
    println!("postern server listening on {}", server.local_addr());
    server.run_until(stop).await?;
    Ok(())
}

async fn reshard(args: ServerReshardArgs) -> anyhow::Result<()> {
    let Database::Postgres(from) = Database::parse_all(&args.database)? else {
        anyhow::bail!("--database: resharding needs the PostgreSQL URLs the nodes use");
    };
    let Database::Postgres(to) = Database::parse_all(&args.to)? else {
        anyhow::bail!("--to: give the PostgreSQL URLs of the new list of shards");
    };
    println!(
        "Moving accounts from {} to {} shards (every node must be stopped)…",
        from.len(),
        to.len()
    );
    let report = postern_server::store::reshard::reshard(&from, &to).await?;
    println!(
        "Moved {} account(s): {} device(s), {} queued message(s), {} receipt(s).",
        report.accounts_moved, report.devices_moved, report.messages_moved, report.receipts_moved
    );
    println!("Start every node with the new list, in this order:");
    let flags: Vec<String> = to.iter().map(|u| format!("--database {u}")).collect();
    println!("  postern server run --data DIR {}", flags.join(" "));
    Ok(())
}
