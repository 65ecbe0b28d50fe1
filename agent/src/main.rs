//! continuum-agent: runs in every cluster of a Sovereign.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

/// Continuum agent: keeps a multi-region Sovereign alive without a human.
#[derive(Debug, Parser)]
#[command(name = "continuum-agent", version, about, long_about = None)]
struct Cli {
    /// Log format: `json` for production, `text` for a terminal.
    #[arg(
        long,
        env = "CONTINUUM_LOG_FORMAT",
        default_value = "json",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Failover between two regions' PostgreSQL databases (direct back-end): hold the
    /// lease while primary, fence the moment it is lost, promote the synchronous standby.
    Failover(continuum_agent::failover::FailoverArgs),
    /// Run the controllers (stuck HelmRelease recovery) with leader election and the health port.
    Run(continuum_agent::cli::RunArgs),
    /// Stuck HelmRelease recovery, one pass (replaces the CronJob).
    HrRecovery(continuum_agent::cli::HrRecoveryArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Failover(args) => continuum_agent::failover::run(args),
        Command::Run(args) => continuum_agent::cli::run(args),
        Command::HrRecovery(args) => continuum_agent::cli::hr_recovery(args),
    }
}
