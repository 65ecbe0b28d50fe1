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
    /// Planned switchover or failback between two regions, no rebuild, no lost
    /// acknowledged write: asks the primary's agent (`--admin-listen`) to hand the
    /// lease over to `--to` and waits until that region is primary (docs/switchover.md).
    Switchover(continuum_agent::failover::switchover::SwitchoverArgs),
    /// Run the controllers (stuck HelmRelease recovery) with leader election and the health port.
    Run(continuum_agent::cli::RunArgs),
    /// Stuck HelmRelease recovery, one pass (replaces the CronJob).
    HrRecovery(continuum_agent::cli::HrRecoveryArgs),
    /// DaemonSet mode: keep this node's k3s registries.yaml at the version named by the cutover status ConfigMap.
    NodePivot(continuum_agent::node_pivot::cmd::NodePivotArgs),
    /// Registry/source pivot tools (`pivot sources`: rewrite Flux source URLs in Git, push, reconcile).
    Pivot(continuum_agent::source_pivot::cmd::PivotArgs),
    /// Write a WireGuard key pair for the control link and print the public key.
    Keygen(KeygenArgs),
    /// Continuum controller: fail CloudNativePG Clusters over between regions as the
    /// `Continuum` resources (dr.openova.io/v1) of this cluster describe (leader-elected).
    Continuum(continuum_agent::continuum::ContinuumArgs),
    /// Print the generated CustomResourceDefinition YAML (manifests/crds/continuum.yaml).
    Crds,
}

/// `keygen`: the private key file gets mode 0600; existing files are never
/// overwritten. Peers name this agent by the printed public key.
#[derive(Debug, clap::Args)]
struct KeygenArgs {
    /// Directory for `private.key` and `public.key` (created if missing).
    #[arg(long, env = "CONTINUUM_KEY_DIR")]
    out_dir: Option<std::path::PathBuf>,
    /// Private key path (overrides --out-dir).
    #[arg(long, env = "CONTINUUM_PRIVATE_KEY_FILE")]
    private_key_file: Option<std::path::PathBuf>,
    /// Public key path (overrides --out-dir).
    #[arg(long, env = "CONTINUUM_PUBLIC_KEY_FILE")]
    public_key_file: Option<std::path::PathBuf>,
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
        Command::Switchover(args) => continuum_agent::failover::switchover::run(args),
        Command::Run(args) => continuum_agent::cli::run(args),
        Command::HrRecovery(args) => continuum_agent::cli::hr_recovery(args),
        Command::NodePivot(args) => continuum_agent::node_pivot::cmd::run(args),
        Command::Pivot(args) => continuum_agent::source_pivot::cmd::run(args),
        Command::Continuum(args) => continuum_agent::continuum::run(args),
        Command::Crds => continuum_agent::continuum::print_crds(),
        Command::Keygen(args) => {
            let (public, sk, pk) = continuum_shared::link::keys::keygen(
                args.out_dir.as_deref(),
                args.private_key_file.as_deref(),
                args.public_key_file.as_deref(),
            )?;
            // stdout carries only the key, so scripts can capture it.
            eprintln!("wrote {} (mode 0600) and {}", sk.display(), pk.display());
            println!("{public}");
            Ok(())
        }
    }
}
