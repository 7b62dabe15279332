//! The `podcache` binary: `serve`, `ctl`, `demo`, `k8s-sim` and
//! `completions`. This file parses the command line, sets up logging, the
//! runtime and signals, and maps failures to exit codes; each subcommand
//! lives in its own file, and everything else in the library.

mod backup;
mod ctl;
mod demo;
mod etcd_args;
// Shared with the tests (tests/common includes the same files): they use
// parts the binary does not, and name them from another crate.
#[allow(dead_code, unreachable_pub)]
mod k8s_sim;
#[allow(dead_code, unreachable_pub)]
mod local_etcd;
mod serve;
mod sim_cmd;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};

/// mimalloc instead of the system allocator: the profile of the write path
/// showed glibc malloc/free as the largest cost (about a fifth of the
/// samples); see bench/RESULTS.md. Its v2 line (cargo feature `v2`): the
/// Rust wrapper asks for every block through `mi_malloc_aligned`, which in
/// v3 takes an over-allocating slow path for any block size that is not a
/// power of two (a 160-byte entry landed in a 192-byte block), while v2
/// serves alignments up to 16 from the plain size classes.
///
/// Without transparent huge pages (cargo feature `no_thp`: mimalloc does
/// not `madvise(MADV_HUGEPAGE)` its memory). mimalloc gives free pages back
/// 10 ms after they empty, 64 KiB at a time; on a huge page that splits it,
/// and the next touch of the range faults in and zeroes a whole 2 MiB page
/// again. While memory grows (history filling to its bound, a fill of new
/// keys) a replica spent a fifth of its samples zeroing pages
/// (`clear_page_erms` under `folio_zero_user`); with 4 KiB pages single
/// writes cost as much CPU with history at its default as with none, and
/// memory per entry fell 7–14 % (bench/NOTES.md, "Huge pages"). On a host
/// whose kernel puts every process on huge pages
/// (`/sys/kernel/mm/transparent_hugepage/enabled` = `always`),
/// `MIMALLOC_ALLOW_THP=0` in the environment turns them off for podcache.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration that cannot run (BSD `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "podcache",
    version,
    about = "Keeps a small cache identical on every replica of a Kubernetes service"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "PODCACHE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node.
    Serve(Box<serve::ServeArgs>),
    /// Talk to a running node's REST API.
    Ctl(ctl::CtlArgs),
    /// Run a local cluster on loopback addresses and walk through what podcache does.
    Demo(demo::DemoArgs),
    /// Write pod objects into etcd the way kube-apiserver stores them (for demos and tests).
    #[command(name = "k8s-sim")]
    K8sSim(sim_cmd::K8sSimArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

/// How a subcommand failed.
pub(crate) enum Failure {
    /// The configuration or the command line cannot run: exit 64.
    Config(String),
    /// Anything else: exit 1.
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure::Run(err)
    }
}

/// Logs to stderr; colour only when stderr is a terminal and `NO_COLOR` is
/// unset (<https://no-color.org>), never into a file or a pipe.
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PODCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind;
            let usage_only = matches!(
                err.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            // Printing can only fail when stdout/stderr are gone.
            let _ = err.print();
            return if usage_only {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_CONFIG)
            };
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(args) = &cli.command
        && let Some(threads) = args.worker_threads
    {
        builder.worker_threads(usize::from(threads));
    } else if let Some(value) = std::env::var_os("TOKIO_WORKER_THREADS") {
        // tokio reads it too, and panics on a bad value: read it first.
        match value.to_str().and_then(|v| v.trim().parse::<usize>().ok()) {
            Some(threads) if threads > 0 => {
                builder.worker_threads(threads);
            }
            _ => {
                eprintln!(
                    "podcache: TOKIO_WORKER_THREADS={value:?} is not a positive number of threads"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("podcache: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                init_logging(cli.log_format, "info");
                serve::run(*args).await
            }
            Command::Ctl(args) => ctl::run(args).await,
            Command::K8sSim(args) => sim_cmd::run(args).await,
            Command::Demo(args) => {
                init_logging(cli.log_format, "error");
                demo::run(args).await
            }
            Command::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "podcache",
                    &mut std::io::stdout(),
                );
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(msg)) => {
            eprintln!("podcache: {msg}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Run(err)) => {
            eprintln!("podcache: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A variable's value, unless unset or blank.
pub(crate) fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_is_well_formed() {
        // Unique argument names, valid defaults, conflicts that exist.
        super::Cli::command().debug_assert();
    }
}
