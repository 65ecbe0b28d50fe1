//! `bench <subcommand>`: every Continuum benchmark, printing figures side by side
//! with the reference they are compared to in the same run.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Continuum benchmarks (figures, never pass/fail)"
)]
struct Cli {
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Witness renewals/s and latency vs etcd; RSS with 10,000 leases.
    Witness,
    /// Round-trip time over the WireGuard link vs plain UDP.
    Link,
    /// Stuck HelmRelease recovery with 2,000 HelmReleases.
    HrRecovery,
    /// Continuum controller (`continuum`): idle on both sides and a failover, TTL 5/2 s, 1 and 20 Continuums.
    Continuum,
    /// Node pivot DaemonSet (`node-pivot`): idle before the cutover, 20 cutover flips.
    NodePivot,
    /// Source watcher (`pivot watch-sources`): idle with 50 Flux sources, their pivot and revert.
    SourcePivot,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.which {
        Which::Witness => continuum_tests::bench::witness::run(cli.json).await,
        Which::Link => continuum_tests::bench::link::run(cli.json).await,
        Which::HrRecovery => continuum_tests::bench::hr_recovery::run(cli.json).await,
        Which::Continuum => continuum_tests::bench::continuum::run(cli.json).await,
        Which::NodePivot => continuum_tests::bench::node_pivot::run(cli.json).await,
        Which::SourcePivot => continuum_tests::bench::source_pivot::run(cli.json).await,
    }
}
