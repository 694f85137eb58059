//! Entry point of the `postern` binary.

use clap::Parser;

/// jemalloc on Linux: tokio aligns its per-connection allocations to 128 bytes, which glibc's
/// malloc pads; with jemalloc an idle relay connection costs about a quarter less memory
/// (`docs/benchmarks.md`, idle memory).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (read once, at the first allocation). Memory freed by a burst — many
/// connections handshaking at once, then parked while quiet — goes back to the system about a
/// second later, done by jemalloc's own background thread, instead of staying with the process
/// until later allocations happen to trigger the purge (10 s after the last one at the
/// earliest). A relay's resident memory then follows the connections it holds now, which is
/// what a volunteer watching a small server sees. `_RJEM_MALLOC_CONF` still overrides these.
#[cfg(target_os = "linux")]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: Option<&'static u8> =
    Some(&b"background_thread:true,dirty_decay_ms:1000\0"[0]);

fn main() -> std::process::ExitCode {
    let cli = postern::Cli::parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(postern::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = postern::hints::for_error(&e) {
                eprintln!("hint: {hint}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(cli: &postern::Cli) {
    use tracing_subscriber::EnvFilter;
    // Long-running roles log what they do; one-shot client commands stay quiet.
    let default = if cli.command.is_service() {
        "info"
    } else {
        "warn"
    };
    // POSTERN_LOG first, then the conventional RUST_LOG (docs/relay.md), then the default.
    let filter = EnvFilter::try_from_env("POSTERN_LOG")
        .or_else(|_| EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only on a terminal: logs redirected to files or journald stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}
