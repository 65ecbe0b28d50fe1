//! Region health: how this region sees each peer (other regions, witnesses)
//! over the control link, plus local checks (the local database answers;
//! later the API server).
//!
//! [`model`] is the pure state machine with hysteresis. [`RegionHealth`]
//! holds one per peer plus the latest local check results, exports them as
//! Prometheus metrics and renders the `/status` JSON document served on the
//! health port. [`monitor`] is the task that feeds it from a
//! [`LinkEndpoint`](crate::link::LinkEndpoint) and the local checks.

pub mod model;
pub mod monitor;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use prometheus::{opts, GaugeVec, IntCounterVec, IntGaugeVec, Registry};
use serde::Serialize;

use crate::link::PeerStats;
pub use model::{Observation, PeerHealth, PeerState, Thresholds, Transition};

/// A check of something local this region needs to be useful (its database,
/// its API server). Failing checks make the region Degraded in `/status`.
pub trait LocalCheck: Send + Sync {
    /// Stable name, used as metric label and JSON key.
    fn name(&self) -> &str;
    /// `Ok(())` when healthy, `Err(reason)` otherwise. Must finish quickly;
    /// the monitor applies a timeout anyway.
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// Prometheus metrics of the health model.
#[derive(Clone)]
pub struct HealthMetrics {
    /// 1 for the peer's current state, 0 for the others.
    pub peer_state: IntGaugeVec,
    pub transitions: IntCounterVec,
    pub rtt_seconds: GaugeVec,
    pub loss_ratio: GaugeVec,
    pub handshake_age_seconds: GaugeVec,
    pub local_check_ok: IntGaugeVec,
}

impl HealthMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = HealthMetrics {
            peer_state: IntGaugeVec::new(
                opts!(
                    "continuum_peer_state",
                    "Health of each peer over the control link (1 = current state)."
                ),
                &["peer", "state"],
            )?,
            transitions: IntCounterVec::new(
                opts!(
                    "continuum_peer_state_transitions_total",
                    "Peer health state changes, by new state."
                ),
                &["peer", "to"],
            )?,
            rtt_seconds: GaugeVec::new(
                opts!(
                    "continuum_peer_rtt_seconds",
                    "Heartbeat round-trip time over the window, by quantile."
                ),
                &["peer", "quantile"],
            )?,
            loss_ratio: GaugeVec::new(
                opts!(
                    "continuum_peer_loss_ratio",
                    "Unanswered fraction of recent heartbeats."
                ),
                &["peer"],
            )?,
            handshake_age_seconds: GaugeVec::new(
                opts!(
                    "continuum_peer_handshake_age_seconds",
                    "Age of the WireGuard session with the peer (-1 without one)."
                ),
                &["peer"],
            )?,
            local_check_ok: IntGaugeVec::new(
                opts!(
                    "continuum_local_check_ok",
                    "1 when the local check passed on its last run."
                ),
                &["check"],
            )?,
        };
        registry.register(Box::new(m.peer_state.clone()))?;
        registry.register(Box::new(m.transitions.clone()))?;
        registry.register(Box::new(m.rtt_seconds.clone()))?;
        registry.register(Box::new(m.loss_ratio.clone()))?;
        registry.register(Box::new(m.handshake_age_seconds.clone()))?;
        registry.register(Box::new(m.local_check_ok.clone()))?;
        Ok(m)
    }
}

/// One peer in the `/status` document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub public_key: String,
    pub state: PeerState,
    pub endpoint: Option<String>,
    pub handshake_age_ms: Option<u64>,
    pub last_reply_ms: Option<u64>,
    pub rtt_p50_us: Option<u64>,
    pub rtt_p99_us: Option<u64>,
    pub loss_ratio: f64,
    pub handshakes: u64,
}

/// One local check in the `/status` document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckStatus {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `/status` document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusDocument {
    pub region: String,
    /// `healthy` when every local check passes, else `degraded`.
    pub state: PeerState,
    pub peers: Vec<PeerStatus>,
    pub local_checks: BTreeMap<String, CheckStatus>,
}

/// Health of every peer and local check of one region.
pub struct RegionHealth {
    region: String,
    thresholds: Thresholds,
    peers: BTreeMap<String, (PeerHealth, Option<PeerStats>)>,
    checks: BTreeMap<String, CheckStatus>,
    metrics: Option<HealthMetrics>,
}

fn us(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_micros() as u64)
}
fn ms(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_millis() as u64)
}

impl RegionHealth {
    pub fn new(region: impl Into<String>, thresholds: Thresholds) -> Self {
        RegionHealth {
            region: region.into(),
            thresholds,
            peers: BTreeMap::new(),
            checks: BTreeMap::new(),
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: HealthMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Feeds the link's latest figures for one peer; returns a transition.
    pub fn observe_peer(&mut self, stats: &PeerStats) -> Option<Transition> {
        let label = stats.label();
        let obs = Observation {
            since_last_reply: stats.since_last_reply,
            handshake_age: stats.last_handshake_age,
            loss_ratio: stats.loss_ratio,
            rtt_p99: stats.rtt_p99,
        };
        let entry = self
            .peers
            .entry(label.clone())
            .or_insert_with(|| (PeerHealth::new(), None));
        let transition = entry.0.observe(&self.thresholds, &obs);
        entry.1 = Some(stats.clone());
        let state = entry.0.state();
        if let Some(t) = transition {
            tracing::info!(peer = %label, from = t.from.label(), to = t.to.label(),
                since_last_reply_ms = ?ms(stats.since_last_reply), loss = stats.loss_ratio,
                rtt_p99_us = ?us(stats.rtt_p99), "health: peer state changed");
        }
        if let Some(m) = &self.metrics {
            for s in PeerState::ALL {
                m.peer_state
                    .with_label_values(&[&label, s.label()])
                    .set(i64::from(s == state));
            }
            if let Some(t) = transition {
                m.transitions
                    .with_label_values(&[&label, t.to.label()])
                    .inc();
            }
            for (q, v) in [("0.5", stats.rtt_p50), ("0.99", stats.rtt_p99)] {
                m.rtt_seconds
                    .with_label_values(&[&label, q])
                    .set(v.map_or(f64::NAN, |d| d.as_secs_f64()));
            }
            m.loss_ratio
                .with_label_values(&[&label])
                .set(stats.loss_ratio);
            m.handshake_age_seconds
                .with_label_values(&[&label])
                .set(stats.last_handshake_age.map_or(-1.0, |d| d.as_secs_f64()));
        }
        transition
    }

    /// Records the result of a local check.
    pub fn record_check(&mut self, name: &str, result: Result<(), String>) {
        let ok = result.is_ok();
        if let Some(m) = &self.metrics {
            m.local_check_ok
                .with_label_values(&[name])
                .set(i64::from(ok));
        }
        let previous = self.checks.get(name).map(|c| c.ok);
        if previous != Some(ok) {
            tracing::info!(check = name, ok, error = ?result.as_ref().err(), "health: local check changed");
        }
        self.checks.insert(
            name.to_owned(),
            CheckStatus {
                ok,
                error: result.err(),
            },
        );
    }

    pub fn peer_state(&self, peer: &str) -> Option<PeerState> {
        self.peers.get(peer).map(|(h, _)| h.state())
    }

    /// The `/status` document.
    pub fn status(&self) -> StatusDocument {
        let peers = self
            .peers
            .iter()
            .map(|(name, (h, s))| PeerStatus {
                name: name.clone(),
                public_key: s
                    .as_ref()
                    .map(|s| s.public_key.to_base64())
                    .unwrap_or_default(),
                state: h.state(),
                endpoint: s.as_ref().and_then(|s| s.endpoint.map(|e| e.to_string())),
                handshake_age_ms: s.as_ref().and_then(|s| ms(s.last_handshake_age)),
                last_reply_ms: s.as_ref().and_then(|s| ms(s.since_last_reply)),
                rtt_p50_us: s.as_ref().and_then(|s| us(s.rtt_p50)),
                rtt_p99_us: s.as_ref().and_then(|s| us(s.rtt_p99)),
                loss_ratio: s.as_ref().map_or(0.0, |s| s.loss_ratio),
                handshakes: s.as_ref().map_or(0, |s| s.handshakes),
            })
            .collect();
        let state = if self.checks.values().all(|c| c.ok) {
            PeerState::Healthy
        } else {
            PeerState::Degraded
        };
        StatusDocument {
            region: self.region.clone(),
            state,
            peers,
            local_checks: self.checks.clone(),
        }
    }

    /// The `/status` document as JSON, ready to serve.
    pub fn render_status_json(&self) -> String {
        // Plain structs with string keys: serialization cannot fail.
        serde_json::to_string_pretty(&self.status()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::PublicKey;

    fn stats(name: &str, reply_ms: Option<u64>) -> PeerStats {
        PeerStats {
            name: name.into(),
            public_key: PublicKey([7; 32]),
            virtual_ip: "10.214.0.2".parse().expect("ip"),
            endpoint: Some("127.0.0.1:5000".parse().expect("addr")),
            last_handshake_age: Some(Duration::from_secs(3)),
            since_last_reply: reply_ms.map(Duration::from_millis),
            rtt_p50: Some(Duration::from_micros(120)),
            rtt_p99: Some(Duration::from_micros(900)),
            loss_ratio: 0.0,
            heartbeats_sent: 10,
            heartbeats_answered: 10,
            handshakes: 1,
            tx_bytes: 0,
            rx_bytes: 0,
        }
    }

    #[test]
    fn status_document_reports_peers_checks_and_metrics() {
        let registry = Registry::new();
        let metrics = HealthMetrics::new(&registry).expect("metrics");
        let mut h = RegionHealth::new("eu-1", Thresholds::default()).with_metrics(metrics);
        for _ in 0..5 {
            h.observe_peer(&stats("witness-a", Some(100)));
        }
        h.observe_peer(&stats("witness-b", None));
        h.record_check("database", Err("connection refused".into()));
        assert_eq!(h.peer_state("witness-a"), Some(PeerState::Healthy));
        assert_eq!(h.peer_state("witness-b"), Some(PeerState::Unreachable));

        let doc: serde_json::Value =
            serde_json::from_str(&h.render_status_json()).expect("valid JSON");
        assert_eq!(doc["region"], "eu-1");
        assert_eq!(doc["state"], "degraded");
        assert_eq!(doc["peers"][0]["name"], "witness-a");
        assert_eq!(doc["peers"][0]["state"], "healthy");
        assert_eq!(doc["peers"][0]["rtt_p50_us"], 120);
        assert_eq!(doc["peers"][1]["state"], "unreachable");
        assert_eq!(doc["local_checks"]["database"]["ok"], false);

        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("encode");
        assert!(text.contains(r#"continuum_peer_state{peer="witness-a",state="healthy"} 1"#));
        assert!(text.contains(r#"continuum_local_check_ok{check="database"} 0"#));
    }
}
