//! continuum-agent: runs in every cluster of a Sovereign.
#![forbid(unsafe_code)]

use clap::Parser;

/// Continuum agent: keeps a multi-region Sovereign alive without a human.
///
/// Controllers arrive issue by issue; this binary currently offers the
/// shared plumbing only.
#[derive(Debug, Parser)]
#[command(name = "continuum-agent", version, about, long_about = None)]
struct Cli {
    /// Log format: `json` for production, `text` for a terminal.
    #[arg(long, env = "CONTINUUM_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
