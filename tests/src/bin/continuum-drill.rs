//! `continuum-drill region-kill`: the local region-kill drill (no root).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use continuum_tests::drill::{self, DrillOpts};

#[derive(Debug, Parser)]
#[command(
    name = "continuum-drill",
    about = "Kill a region, measure the failover, check no acknowledged write was lost"
)]
struct Cli {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Two PostgreSQL regions (strict synchronous standby), one agent each,
    /// witnesses; SIGKILL the primary's region, measure RTO, verify every
    /// acknowledged write survived, rebuild the killed region and fail back.
    RegionKill {
        /// Kills to run: each kills region A, fails over to B, rebuilds A and fails back to it.
        #[arg(long, default_value_t = 2)]
        iterations: usize,
        /// Witness processes (1 or 3).
        #[arg(long, default_value_t = 1)]
        witnesses: usize,
        /// Lease TTL in milliseconds.
        #[arg(long, default_value_t = 5000)]
        ttl_ms: u64,
        /// Seconds of writes on the primary before each kill.
        #[arg(long, default_value_t = 2.0)]
        warmup_s: f64,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Draw the first iteration's timeline into this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.which {
        Which::RegionKill {
            iterations,
            witnesses,
            ttl_ms,
            warmup_s,
            json,
            svg,
        } => {
            let report = drill::region_kill(DrillOpts {
                iterations,
                witnesses,
                ttl_ms,
                warmup: Duration::from_secs_f64(warmup_s.max(0.1)),
            })
            .await?;
            if let Some(path) = svg {
                std::fs::write(&path, report.svg())?;
            }
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.text());
            }
            if report.lost_acked_writes > 0 || report.split_brain > 0 {
                anyhow::bail!(
                    "safety violated: {} acknowledged write(s) lost, {} split-brain interval(s)",
                    report.lost_acked_writes,
                    report.split_brain
                );
            }
            Ok(())
        }
    }
}
