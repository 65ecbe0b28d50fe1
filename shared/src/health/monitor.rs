//! The task that feeds [`RegionHealth`] from the link and the local checks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::{LocalCheck, RegionHealth};
use crate::link::PeerStats;

/// How long a local check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Observes every peer each `interval` (use the heartbeat interval) and runs
/// the local checks each `check_interval`. Stops when the handle is aborted.
pub fn spawn(
    health: Arc<Mutex<RegionHealth>>,
    stats: impl Fn() -> Vec<PeerStats> + Send + 'static,
    checks: Vec<Arc<dyn LocalCheck>>,
    interval: Duration,
    check_interval: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut peers = tokio::time::interval(interval);
        let mut locals = tokio::time::interval(check_interval);
        loop {
            tokio::select! {
                _ = peers.tick() => {
                    let all = stats();
                    let mut h = health.lock().unwrap_or_else(|e| e.into_inner());
                    for s in &all {
                        h.observe_peer(s);
                    }
                }
                _ = locals.tick() => {
                    for c in &checks {
                        let result = match tokio::time::timeout(CHECK_TIMEOUT, c.check()).await {
                            Ok(r) => r,
                            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                        };
                        health
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record_check(c.name(), result);
                    }
                }
            }
        }
    })
}
