//! The failover runner's side of the WireGuard control link
//! (`--witness-link-config`): lease transports to the witnesses named by
//! `--witness-link-peer`, and region health (every link peer plus the local
//! database) as metrics and the `/status` JSON on the health port.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use continuum_shared::health::{monitor, HealthMetrics, LocalCheck, RegionHealth, Thresholds};
use continuum_shared::link::config::LinkConfigFile;
use continuum_shared::link::lease_transport::LinkLeaseClient;
use continuum_shared::link::LinkEndpoint;
use continuum_shared::pg::backend as pg;
use continuum_shared::transport::LeaseTransport;
use prometheus::Registry;
use tokio::task::JoinHandle;

use crate::health::StatusProvider;

/// How often local checks run (docs/control-link.md defaults).
const LOCAL_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The running link; dropping it stops the endpoint and the monitor.
pub(super) struct WitnessLink {
    /// One transport per `--witness-link-peer`, in the given order.
    pub transports: Vec<Arc<dyn LeaseTransport>>,
    /// Renders the `/status` document.
    pub status: StatusProvider,
    _client: LinkLeaseClient,
    monitor: JoinHandle<()>,
}

impl Drop for WitnessLink {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

/// "The local database answers": a connection and `SELECT 1`.
struct DatabaseCheck {
    conninfo: String,
}

impl LocalCheck for DatabaseCheck {
    fn name(&self) -> &str {
        "database"
    }
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let client = pg::connect(&self.conninfo)
                .await
                .map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

/// Loads the config, binds the endpoint (metrics in `registry`), builds the
/// lease transports and starts the health monitor.
pub(super) async fn start(
    config: &Path,
    witness_peers: &[String],
    region: &str,
    pg_conninfo: &str,
    call_timeout: Duration,
    registry: &Registry,
) -> anyhow::Result<WitnessLink> {
    let file = LinkConfigFile::load(config)?;
    let witnesses = file.peers_named(witness_peers)?;
    let heartbeat = file.link.heartbeat_interval;
    let (endpoint, inbound) = LinkEndpoint::bind(file.link.clone(), registry)
        .await
        .with_context(|| format!("--witness-link-config {}", config.display()))?;
    let endpoint = Arc::new(endpoint);
    tracing::info!(listen = %endpoint.local_addr(), virtual_ip = %file.link.virtual_ip,
        witnesses = ?witness_peers, peers = file.link.peers.len(),
        "control link up: lease transports and region health over WireGuard");
    let client = LinkLeaseClient::new(endpoint.clone(), inbound, None);
    let transports = witnesses
        .iter()
        .map(|p| Arc::new(client.transport(p.public_key, call_timeout)) as Arc<dyn LeaseTransport>)
        .collect();

    let metrics = HealthMetrics::new(registry).context("health metrics")?;
    let health = Arc::new(Mutex::new(
        RegionHealth::new(region, Thresholds::default()).with_metrics(metrics),
    ));
    let stats_endpoint = endpoint.clone();
    let checks: Vec<Arc<dyn LocalCheck>> = vec![Arc::new(DatabaseCheck {
        conninfo: pg_conninfo.to_owned(),
    })];
    let monitor = monitor::spawn(
        health.clone(),
        move || stats_endpoint.stats(),
        checks,
        heartbeat,
        LOCAL_CHECK_INTERVAL,
    );
    let status: StatusProvider = Arc::new(move || {
        health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .render_status_json()
    });
    Ok(WitnessLink {
        transports,
        status,
        _client: client,
        monitor,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::FailoverArgs;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: FailoverArgs,
    }

    const BASE: [&str; 11] = [
        "failover",
        "--region",
        "eu-1",
        "--peer",
        "us-1",
        "--tls-ca",
        "ca.pem",
        "--tls-cert",
        "c.pem",
        "--tls-key",
        "k.pem",
    ];

    fn parse(extra: &[&str]) -> Result<FailoverArgs, clap::Error> {
        let argv = BASE
            .iter()
            .chain(["--pg-conninfo", "host=db"].iter())
            .chain(extra.iter());
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    /// (what, extra args, (HTTPS witnesses, link witnesses) or a parse error)
    type Case = (
        &'static str,
        &'static [&'static str],
        Option<(usize, usize)>,
    );

    #[test]
    fn witnesses_over_https_the_link_or_both() {
        let cases: [Case; 5] = [
            ("no witness at all", &[], None),
            ("https only", &["--witness", "https://w:7443"], Some((1, 0))),
            (
                "link only, two peers",
                &[
                    "--witness-link-config",
                    "link.yaml",
                    "--witness-link-peer",
                    "witness-a",
                    "--witness-link-peer",
                    "witness-b",
                ],
                Some((0, 2)),
            ),
            (
                "both",
                &[
                    "--witness",
                    "https://w:7443",
                    "--witness-link-config",
                    "link.yaml",
                    "--witness-link-peer",
                    "witness-b,witness-c",
                ],
                Some((1, 2)),
            ),
            (
                "link peer without a link config",
                &["--witness-link-peer", "witness-a"],
                None,
            ),
        ];
        for (what, extra, want) in cases {
            let got = parse(extra)
                .ok()
                .map(|a| (a.witnesses.len(), a.witness_link_peers.len()));
            assert_eq!(got, want, "{what}");
        }
    }
}
