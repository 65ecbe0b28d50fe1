#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use continuum_witness::config::{LogFormat, ServeArgs};

/// Continuum witness: grants named leases with fencing epochs so that at most
/// one region is primary.
#[derive(Debug, Parser)]
#[command(name = "continuum-witness", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the lease API (HTTPS) and the health port (HTTP).
    Serve(Box<ServeArgs>),
    /// Write a WireGuard key pair for the control link and print the public key.
    Keygen(KeygenArgs),
}

/// `keygen`: the private key file gets mode 0600; existing files are never
/// overwritten. Agents name this witness by the printed public key.
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

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            init_logs(args.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(continuum_witness::serve::serve(*args)))
        }
        Command::Keygen(args) => continuum_shared::link::keys::keygen(
            args.out_dir.as_deref(),
            args.private_key_file.as_deref(),
            args.public_key_file.as_deref(),
        )
        .map(|(public, sk, pk)| {
            // stdout carries only the key, so scripts can capture it.
            eprintln!("wrote {} (mode 0600) and {}", sk.display(), pk.display());
            println!("{public}");
        })
        .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "witness failed");
            eprintln!("continuum-witness: {e:#}");
            ExitCode::FAILURE
        }
    }
}
