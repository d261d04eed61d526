//! `strata`: the one binary of Strata. It parses the command line, sets up logging and hands
//! each subcommand to its module under `cmd/`; the work itself lives in the library crates.
//!
//! CLI parsing is `clap` (derive): help, errors and completions users expect, for free.
//! `libc` for `mallopt`: see `limit_malloc_arenas`.

use clap::{Parser, Subcommand};

mod cmd;

/// Serve large language models across the machines of your LAN.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr: `text` or `json` (filter with RUST_LOG, default `warn`).
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with model files: make synthetic ones, inspect any.
    Model {
        #[command(subcommand)]
        command: cmd::model::ModelCommand,
    },
    /// Generate text from a model in this process (optionally split into stages).
    Generate(cmd::generate::GenerateArgs),
    /// Chat in the terminal with a cluster (or a model run here).
    Chat(cmd::chat::ChatArgs),
    /// Measure prefill and decode speed, memory and the bandwidth roofline.
    Bench(cmd::bench::BenchArgs),
    /// Perplexity over a text file, and KL divergence from a base model's saved logits.
    Perplexity(cmd::perplexity::PerplexityArgs),
    /// Show what Strata does on this machine, with nothing to download.
    Demo(cmd::demo::DemoArgs),
    /// Run the coordinator: find workers, plan the split, serve the gRPC API.
    Serve(cmd::cluster::ServeArgs),
    /// Run a worker: join a cluster and hold a slice of the model.
    Worker(cmd::cluster::WorkerArgs),
    /// Cluster membership and plans: status, plan, join, drain, remove.
    Cluster {
        #[command(subcommand)]
        command: cmd::cluster::ClusterCommand,
    },
    /// The cluster's join token.
    Token {
        #[command(subcommand)]
        command: cmd::cluster::TokenCommand,
    },
}

/// Keeps glibc's malloc from holding memory the plan did not count:
/// - it gives each thread that allocates its own arena (up to eight per core), and memory
///   freed in one arena is not reused by another, so a worker's runtime, compute and GEMM
///   threads each kept their own high-water mark: two arenas;
/// - after freeing a large block it raises the size from which blocks are mapped (up to
///   32 MiB), so batch-sized tensors then came from the heap, fragmented it, and stayed
///   resident: blocks from 1 MiB up are always mapped, and go back to the system when freed.
///
/// Under the overload campaign's burst (`tests/campaigns/overload.py burst`), workers
/// peaked at 1.10-1.22x the memory their plan counted before, 0.6-0.72x after, with the
/// burst taking about 4% longer. `MALLOC_ARENA_MAX` or `MALLOC_MMAP_THRESHOLD_` in the
/// environment still win.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    for (env, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 1 << 20),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only sets a parameter of the allocator, and this runs first
            // thing in main, before any other thread exists.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // Long-running roles say what they are doing; one-shot commands stay quiet.
    let default_filter = match cli.command {
        Command::Serve(_) | Command::Worker(_) | Command::Cluster { .. } => {
            "warn,strata=info,strata_worker=info,strata_coordinator=info"
        }
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| strata_net::progress::LogWriter);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match cli.command {
        Command::Model { command } => cmd::model::run(command),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Chat(args) => cmd::chat::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Perplexity(args) => cmd::perplexity::run(args),
        Command::Demo(args) => cmd::demo::run(args),
        Command::Serve(args) => cmd::cluster::serve(args),
        Command::Worker(args) => cmd::cluster::worker(args),
        Command::Cluster { command } => cmd::cluster::cluster(command),
        Command::Token { command } => cmd::cluster::token(command),
    }
}
