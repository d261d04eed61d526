//! `strata`: the one binary of Strata. It parses the command line, sets up logging and hands
//! each subcommand to its module under `cmd/`; the work itself lives in the library crates.
//!
//! CLI parsing is `clap` (derive): help, errors and completions users expect, for free.

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

fn main() -> anyhow::Result<()> {
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
        Command::Demo(args) => cmd::demo::run(args),
        Command::Serve(args) => cmd::cluster::serve(args),
        Command::Worker(args) => cmd::cluster::worker(args),
        Command::Cluster { command } => cmd::cluster::cluster(command),
        Command::Token { command } => cmd::cluster::token(command),
    }
}
