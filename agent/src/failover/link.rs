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
