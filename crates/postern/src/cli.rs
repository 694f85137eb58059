//! Command-line grammar. Every flag is documented here; `postern help COMMAND` shows it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Postern: an end-to-end encrypted messenger that keeps working when the network blocks it.
#[derive(Debug, Parser)]
#[command(name = "postern", version, about, long_about = None, after_help = "\
Quick start (a whole local network, then two accounts):
  postern dev
  postern --home /tmp/alice account create alice --network postern-dev/network.toml
  postern --home /tmp/bob account create bob --network postern-dev/network.toml
  postern --home /tmp/alice send bob 'hello bob'
  postern --home /tmp/bob inbox")]
pub struct Cli {
    /// Profile directory of the account to use (default: $POSTERN_HOME, else ~/.postern).
    /// Give each user on a machine their own.
    #[arg(long, global = true, env = "POSTERN_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or inspect your account.
    #[command(subcommand)]
    Account(AccountCommand),

    /// Send a message (and a file, with --file); prints its id once the server holds it (✓).
    #[command(after_help = "\
The message is saved in your history before anything is sent: if the server cannot be
reached it stays pending (…) and goes out with your next `send`, `inbox` or `status`, or
at once from a running `inbox --follow`. The saved routes are raced (the one that worked
last starts first); a connection that stalls is replaced and the message sent again
(never twice). A message to a user who does not exist stays in your history, marked ✗.

With --file, the file is encrypted with a key of its own (the server and relays see only
its size), uploaded in chunks with progress on stderr, and the message goes out once the
upload is complete. A dropped or frozen connection is replaced and the upload goes on
from the last chunk the server acknowledged, over whichever route works.
Examples:
  postern send bob 'see you at eight'
  postern send bob --file ~/photos/boat.jpg 'the boat'")]
    Send {
        /// Username of the recipient.
        contact: String,
        /// The message text (quote it); with --file, the file's caption (may be left out).
        #[arg(required_unless_present = "file")]
        text: Option<String>,
        /// A file to send with the message (up to the server's limit, 100 MB by default).
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
    },

    /// Fetch and print messages that arrived for you (and send what is pending).
    #[command(after_help = "\
A connection that stops answering (some networks freeze flows without a reset) is
noticed within about 11 s and replaced; what arrived is never fetched twice, so a backlog
gets through even a path that dies every few kilobytes.

Files sent to you are fetched after the messages, checked and decrypted into the
profile's files/ directory (and copied to --save-to DIR); an interrupted fetch goes on
where it stopped the next time.")]
    Inbox {
        /// Stay connected and print messages and delivery receipts as they arrive; pending
        /// messages go out as soon as a route works.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line instead of text (for scripts).
        #[arg(long)]
        json: bool,
        /// Also save each file that arrives into DIR (a name already taken there gets
        /// a number: photo (2).jpg).
        #[arg(long, value_name = "DIR")]
        save_to: Option<std::path::PathBuf>,
    },

    /// Show your conversation with a contact, with ✓ (sent) and ✓✓ (delivered) marks.
    History {
        /// Username of the contact.
        contact: String,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Copy the files of this conversation that have arrived into DIR.
        #[arg(long, value_name = "DIR")]
        save_to: Option<std::path::PathBuf>,
    },

    /// Your contacts: compare safety numbers in person to check that nobody is in between.
    #[command(subcommand)]
    Contact(ContactCommand),

    /// Groups: create one, add and remove members, leave, list, send and read.
    #[command(
        subcommand,
        after_help = "\
A group's messages, files and membership changes are encrypted end to end to every
member's devices: each message goes to each member as a separate encrypted message, so
the server and relays see ordinary messages and nothing of the group (no name, no member
list). A group has at most 100 members. Members who are offline get everything from the
server's queue when they are back. In `postern group history`, ✓✓ means every member has
the message and ✓✓ 1/2 that one of two does so far.
Examples:
  postern group create trip bob carol
  postern group send trip 'the train leaves at nine'
  postern group send trip --file map.pdf
  postern group history trip
  postern group add trip dave
  postern group remove trip carol
  postern group leave trip"
    )]
    Group(GroupCommand),

    /// Proxies (relays) to reach the service through when the network blocks it.
    #[command(subcommand)]
    Proxy(ProxyCommand),

    /// Connect now and say how: ✓ the route in use, or ✗ what failed at which stage. Sends
    /// what is pending once connected.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },

    /// Run a relay (volunteer proxy) in front of the Postern service, or print its link.
    Relay(Box<crate::commands::relay::RelayCli>),

    /// Run or set up a Postern server (operators).
    #[command(subcommand)]
    Server(ServerCommand),

    /// Start a local development network (server with embedded storage) and print how to
    /// create two accounts and chat.
    Dev(DevArgs),

    /// Open the Postern app: a messenger in your browser for this profile (chats, the
    /// connection banner, Settings → Proxy with the green tick).
    #[command(after_help = "\
Serves the app on loopback only and opens your browser (or prints the address to open).
The address carries a key made for this run: only a browser given it gets in. Without an
account the app starts with onboarding: import the network file, choose a username, and
add a proxy there if the service is blocked where you are. Stop it with Ctrl-C.
Examples:
  postern app
  postern --home /tmp/postern-alice app --no-browser --listen 127.0.0.1:8080")]
    App(AppArgs),
}

impl Command {
    /// Commands that run until stopped (and so log at `info` by default).
    pub fn is_service(&self) -> bool {
        matches!(
            self,
            Command::Server(ServerCommand::Run(_)) | Command::Dev(_)
        ) || matches!(self, Command::Relay(r) if r.command.is_none())
    }
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Register NAME on the network described by a network file, creating the profile.
    #[command(after_help = "\
The network file comes from the server's operator (`postern server init` writes it).
Example:
  postern --home ~/.postern-alice account create alice --network network.toml")]
    Create {
        /// Username: 3-32 characters of a-z, 0-9, '_', '.', '-'.
        name: String,
        /// The network file (network.toml) of the server to register on.
        #[arg(long, value_name = "FILE")]
        network: PathBuf,
        /// Register through this relay (address or postern://proxy link) instead of
        /// connecting directly; it is saved as your first proxy.
        #[arg(long, value_name = "ADDRESS|LINK")]
        proxy: Option<String>,
    },
    /// Print this profile's username, device and server.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum ContactCommand {
    /// Show the safety number with CONTACT (and a QR code) to compare in person; with
    /// --confirm, mark CONTACT verified once it matches.
    #[command(after_help = "\
The safety number is 60 digits computed from your identity keys and CONTACT's, as your
device knows them. The server hands out those keys, so only the two of you can check that
it handed out the right ones: meet (or call on a channel where you recognise each other),
both run `postern contact verify` naming the other, and read the 12 groups aloud or scan
the QR code. The same digits mean nobody is in between; then run it again with --confirm.
Different digits mean someone may be reading your messages: do not confirm.

When CONTACT's keys change (they reinstalled, added a device, or someone substituted keys)
`postern history CONTACT` shows ⚠ where it happened and CONTACT is no longer verified.
Examples:
  postern contact verify bob
  postern contact verify bob --confirm")]
    Verify {
        /// Username of the contact.
        contact: String,
        /// Mark CONTACT verified: you both saw the same number just now.
        #[arg(long, conflicts_with = "clear")]
        confirm: bool,
        /// Remove the verified mark.
        #[arg(long)]
        clear: bool,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// A group, as commands take it.
const GROUP_ARG_HELP: &str =
    "The group: its name, or its id (6 or more of its first hex digits) if several \
     groups share the name";

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group NAME with MEMBERS (usernames) and you; they learn of it with your
    /// next send, which this command does at once.
    Create {
        /// The group's name, as members see it (up to 100 bytes).
        name: String,
        /// Usernames of the other members.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Add MEMBERS to GROUP: they get the messages written from now on.
    Add {
        #[arg(help = GROUP_ARG_HELP)]
        group: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove MEMBERS from GROUP: they are told, and nothing written from now on reaches
    /// them.
    Remove {
        #[arg(help = GROUP_ARG_HELP)]
        group: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Leave GROUP: the others are told; your history of it is kept.
    Leave {
        #[arg(help = GROUP_ARG_HELP)]
        group: String,
    },
    /// Your groups, with their members.
    List {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send a message (and a file, with --file) to every member of GROUP.
    Send {
        #[arg(help = GROUP_ARG_HELP)]
        group: String,
        /// The message text (quote it); with --file, the file's caption (may be left out).
        #[arg(required_unless_present = "file")]
        text: Option<String>,
        /// A file to send with the message (uploaded once, its key sent to every member).
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
    },
    /// Show a group's conversation: who wrote what, membership changes, and for your
    /// messages ✓✓ (every member has it) or ✓✓ 1/2 (some do so far).
    History {
        #[arg(help = GROUP_ARG_HELP)]
        group: String,
        /// One JSON object per line instead of text (with each member's delivery state).
        #[arg(long)]
        json: bool,
        /// Copy the files of this conversation that have arrived into DIR.
        #[arg(long, value_name = "DIR")]
        save_to: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProxyCommand {
    /// Save a proxy: a host (port 443 with TLS), host:port (TLS only on 443), [IPv6]:port,
    /// or a link from `postern relay link`.
    #[command(after_help = "\
Examples:
  postern proxy add relay.example.org
  postern proxy add relay.example.org:5222
  postern proxy add 'postern://proxy?host=relay.example.org&port=443&tls=1'
  postern proxy add 203.0.113.7:80 --no-tls
  postern proxy add 203.0.113.7 --sni cdn.example.net")]
    Add {
        /// Address or link.
        address: String,
        /// Force TLS on for this proxy.
        #[arg(long, conflicts_with = "no_tls")]
        tls: bool,
        /// Force TLS off for this proxy.
        #[arg(long)]
        no_tls: bool,
        /// The relay's media port (checked by `postern proxy check`).
        #[arg(long, value_name = "PORT")]
        media: Option<u16>,
        /// Server name for the TLS ClientHello instead of the host (as the link's `sni=NAME`),
        /// e.g. when the relay's own name is blocked.
        #[arg(long, value_name = "NAME", conflicts_with = "no_sni")]
        sni: Option<String>,
        /// No server name in the TLS ClientHello at all (as the link's `sni=`).
        #[arg(long)]
        no_sni: bool,
    },
    /// List saved proxies and the proxy mode.
    List {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a saved proxy by its number in `proxy list`, its host, or host:port.
    Remove {
        /// N, HOST or HOST:PORT.
        which: String,
    },
    /// Choose how to connect: `on` relays only (never direct), `off` direct only,
    /// `auto` direct first, then relays (the default).
    Use {
        /// on, off or auto.
        #[arg(value_parser = ["on", "off", "auto"])]
        mode: String,
    },
    /// Test the real path through a proxy — TCP, TLS if set, the server's handshake —
    /// stage by stage, then ✓ or ✗ with the reason. Without an argument, every saved
    /// proxy. Relay operators: run this from another machine against your own relay.
    #[command(after_help = "\
Examples:
  postern proxy check
  postern proxy check relay.example.org
  postern proxy check relay.example.org:8443 --tls
  postern proxy check relay.example.org --no-sni
  postern proxy check 'postern://proxy?host=relay.example.org&port=443&tls=1&media=587'
  postern proxy check 'postern://proxy?host=relay.example.org&port=443&tls=1' --network network.toml
      # no profile needed: e.g. a relay's volunteer checking it from another machine")]
    Check {
        /// Address or link to test (need not be saved).
        address: Option<String>,
        /// Test with TLS on (overrides the address's default and the link).
        #[arg(long, conflicts_with = "no_tls")]
        tls: bool,
        /// Test with TLS off.
        #[arg(long)]
        no_tls: bool,
        /// Server name for the TLS ClientHello instead of the host (as the link's `sni=NAME`),
        /// e.g. when the relay's own name is blocked.
        #[arg(long, value_name = "NAME", conflicts_with = "no_sni")]
        sni: Option<String>,
        /// No server name in the TLS ClientHello at all (as the link's `sni=`).
        #[arg(long)]
        no_sni: bool,
        /// One JSON object per proxy instead of text.
        #[arg(long)]
        json: bool,
        /// Check without a profile or account: the server must prove it holds the key in
        /// this network file (what a relay's volunteer, or anyone given only the link and
        /// the network file, can run from anywhere). Needs ADDRESS|LINK.
        #[arg(long, value_name = "FILE", requires = "address")]
        network: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Create the server key (kept, never replaced, if it exists) and write
    /// DIR/network.toml, the file clients import.
    Init {
        /// Data directory (key, network file, database).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Address clients should connect to, as HOST:PORT.
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:5222")]
        public_address: String,
    },
    /// Serve clients (and relays) until SIGTERM or Ctrl-C.
    Run(Box<ServerRunArgs>),
    /// Add PostgreSQL databases to a sharded service. Stop every node first; this moves
    /// the accounts whose shard changes (with their devices, keys, queued messages and
    /// receipts), then the nodes start with the new list. Safe to run again after an
    /// interruption. Example, growing from one database to two:
    ///   postern server reshard --database postgres://postern@db1/postern \
    ///       --to postgres://postern@db1/postern --to postgres://postern@db2/postern
    #[command(verbatim_doc_comment)]
    Reshard(ServerReshardArgs),
}

#[derive(Debug, Args)]
pub struct ServerReshardArgs {
    /// The databases the nodes use now, exactly as given to `server run` (repeat, in
    /// order). Also read from POSTERN_DATABASE (URLs separated by spaces).
    #[arg(
        long,
        value_name = "URL",
        env = "POSTERN_DATABASE",
        value_delimiter = ' ',
        required = true
    )]
    pub database: Vec<String>,
    /// The new list: the same URLs in the same order, then the new (empty) databases.
    #[arg(long, value_name = "URL", required = true)]
    pub to: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServerRunArgs {
    /// Data directory created by `postern server init`.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:5222")]
    pub listen: SocketAddr,
    /// Where accounts and queues live: `sqlite` (the default: DIR/server.db) or a
    /// PostgreSQL URL, postgres://USER[:PASSWORD]@HOST[:PORT]/DB (a unix socket:
    /// postgres://USER@localhost/DB?host=/run/postgresql). Several server nodes given the
    /// same PostgreSQL database serve the same users and wake each other's connections.
    /// Repeat it to shard accounts across several databases: every node must list the
    /// same URLs in the same order, and the number of shards is fixed once accounts exist
    /// (docs/server.md, "Sharding"). Also read from POSTERN_DATABASE (URLs separated by
    /// spaces), which keeps a password out of the process list.
    #[arg(
        long,
        value_name = "URL",
        env = "POSTERN_DATABASE",
        value_delimiter = ' ',
        default_value = "sqlite"
    )]
    pub database: Vec<String>,
    /// Write client addresses to the logs (off by default, to protect users).
    #[arg(long)]
    pub log_client_addresses: bool,
    /// Most concurrent connections; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 16_000)]
    pub max_connections: usize,
    /// New accounts allowed per source address per minute.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub registrations_per_minute: u32,
    /// Seconds a new connection gets to complete its PROXY header and Noise handshake
    /// (slow or silent clients are cut off after this).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Seconds without any request (clients ping every minute) before a connection is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub idle_timeout: u64,
    /// Messages waiting for one device before senders are told to retry later.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_queue_per_device: u32,
    /// A relay or load balancer (address or CIDR block, repeatable) whose PROXY header is
    /// believed, so its clients are counted by their own address. A header from anyone
    /// else is ignored and the connection counts as the peer's address. Default: no one.
    /// Example: --trusted-proxy 10.0.0.0/8 --trusted-proxy 2001:db8::/48
    #[arg(long, value_name = "CIDR")]
    pub trusted_proxy: Vec<postern_protocol::net::Cidr>,
    /// Most concurrent connections from one address (IPv4 address or IPv6 /64; behind an
    /// untrusted relay, the relay's address); more are closed at once. 0 = no limit.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_connections_per_source: usize,
    /// Seconds a connection whose key is not a registered device gets to register before
    /// it is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub unregistered_timeout: u64,
    /// Messages one account may send per minute (more get RATE_LIMITED and stay pending).
    #[arg(long, value_name = "N", default_value_t = 600)]
    pub messages_per_minute: u32,
    /// MiB of undelivered messages one account may have waiting in queues (more get
    /// STORAGE_FULL and stay pending until some are delivered).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub max_queued_mib_per_account: u64,
    /// How long an undelivered message is kept (e.g. 30days, 12h, 90s); then it is
    /// deleted and its sender sees it failed with the reason "expired".
    #[arg(long, value_name = "DURATION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub queue_ttl: std::time::Duration,
    /// New messages are refused (STORAGE_FULL, they stay pending on the sender) while the
    /// data directory's disk has less than this many MiB free.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub min_free_disk_mib: u64,
    /// Key claims (starting a session) one account may make per minute.
    #[arg(long, value_name = "N", default_value_t = 120)]
    pub claims_per_minute: u32,
    /// One-time keys of one user handed out per minute; further claims get the user's
    /// fallback key, so nobody can drain another user's one-time keys.
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub claims_per_user_per_minute: u32,
    /// Where attachments (their ciphertext: the server never sees a key) are kept
    /// [default: DIR/media]; with --media-s3-bucket, only uploads in progress.
    #[arg(long, value_name = "PATH", conflicts_with = "no_media")]
    pub media_dir: Option<PathBuf>,
    /// Keep complete attachments in this S3-compatible bucket (AWS S3, MinIO, Garage,
    /// Ceph…), shared by every node: any node then serves any attachment. Credentials come
    /// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. The bucket holds only ciphertext.
    #[arg(
        long,
        value_name = "NAME",
        requires = "media_s3_endpoint",
        conflicts_with = "no_media"
    )]
    pub media_s3_bucket: Option<String>,
    /// The object storage service's URL, e.g. https://s3.eu-central-1.amazonaws.com or
    /// http://minio.internal:9000 (path-style requests: endpoint/bucket/key).
    #[arg(long, value_name = "URL", requires = "media_s3_bucket")]
    pub media_s3_endpoint: Option<String>,
    /// The bucket's region (what the service signs requests for).
    #[arg(long, value_name = "REGION", default_value = "us-east-1")]
    pub media_s3_region: String,
    /// Object keys start with this inside the bucket.
    #[arg(long, value_name = "PREFIX", default_value = "media/")]
    pub media_s3_prefix: String,
    /// Largest attachment, MiB (of ciphertext: about the file's size).
    #[arg(long, value_name = "MIB", default_value_t = 100)]
    pub media_max_file_mib: u64,
    /// MiB of attachments one account may have stored at once (uploads in progress count
    /// with their whole size); more get STORAGE_FULL until some expire.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub media_quota_mib: u64,
    /// Attachments one account may have stored at once, whatever their size.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub media_max_files_per_account: usize,
    /// How long an attachment is kept after its upload completed (e.g. 30days, 12h); an
    /// upload that makes no progress is deleted after a day (or this, if shorter).
    #[arg(long, value_name = "DURATION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub media_ttl: std::time::Duration,
    /// Keep no attachments: clients are told the server has no media store and say so
    /// ("media: unavailable") instead of trying.
    #[arg(long)]
    pub no_media: bool,
}

#[derive(Debug, Args)]
pub struct AppArgs {
    /// Loopback address to serve on (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Do not open a browser; only print the address to open.
    #[arg(long)]
    pub no_browser: bool,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Data directory of the development server (created if missing).
    #[arg(long, value_name = "DIR", default_value = "postern-dev")]
    pub data: PathBuf,
    /// Address the server listens on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5222")]
    pub listen: SocketAddr,
    /// The relay's plain listener (the 5222/80 kind).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5080")]
    pub relay_plain: SocketAddr,
    /// The relay's TLS listener (the 443 kind).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5443")]
    pub relay_tls: SocketAddr,
    /// The relay's status page and Prometheus metrics.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8199")]
    pub relay_stats: SocketAddr,
    /// Start only the server, without a relay.
    #[arg(long)]
    pub no_relay: bool,
}
