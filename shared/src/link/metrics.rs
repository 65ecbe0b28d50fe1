//! Prometheus metrics of the control link, registered on the caller's registry.

use prometheus::{
    histogram_opts, opts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Registry,
};

/// Counters and histograms of one link endpoint.
#[derive(Clone)]
pub struct LinkMetrics {
    /// Packets dropped without an answer, by reason (`unknown_key`,
    /// `malformed`, `replay`, `auth_failed`, inner packet reasons, ...).
    pub dropped: IntCounterVec,
    pub rx_packets: IntCounterVec,
    pub tx_packets: IntCounterVec,
    /// Completed handshakes by peer and role (`initiator`, `responder`).
    pub handshakes: IntCounterVec,
    /// `ConnectionExpired` from boringtun, after which we force a handshake.
    pub expired: IntCounterVec,
    pub cookie_replies: IntCounter,
    pub echo_replies: IntCounterVec,
    pub heartbeat_rtt: HistogramVec,
    /// 1 while the peer has a live session.
    pub session_up: IntGaugeVec,
}

impl LinkMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = LinkMetrics {
            dropped: IntCounterVec::new(
                opts!(
                    "continuum_link_dropped_packets_total",
                    "Packets dropped by the control link without an answer, by reason."
                ),
                &["reason"],
            )?,
            rx_packets: IntCounterVec::new(
                opts!(
                    "continuum_link_rx_packets_total",
                    "Authenticated packets received from each peer."
                ),
                &["peer"],
            )?,
            tx_packets: IntCounterVec::new(
                opts!(
                    "continuum_link_tx_packets_total",
                    "Packets sent to each peer (handshakes, data, keepalives)."
                ),
                &["peer"],
            )?,
            handshakes: IntCounterVec::new(
                opts!(
                    "continuum_link_handshakes_total",
                    "Completed WireGuard handshakes, by peer and our role."
                ),
                &["peer", "role"],
            )?,
            expired: IntCounterVec::new(
                opts!(
                    "continuum_link_connection_expired_total",
                    "Sessions boringtun declared expired; a new handshake is forced."
                ),
                &["peer"],
            )?,
            cookie_replies: IntCounter::with_opts(opts!(
                "continuum_link_cookie_replies_total",
                "Cookie replies sent because handshakes arrived faster than the rate limit."
            ))?,
            echo_replies: IntCounterVec::new(
                opts!(
                    "continuum_link_icmp_echo_replies_total",
                    "ICMP echo requests to our virtual IP that we answered."
                ),
                &["peer"],
            )?,
            heartbeat_rtt: HistogramVec::new(
                histogram_opts!(
                    "continuum_link_heartbeat_rtt_seconds",
                    "Round-trip time of heartbeats through the tunnel.",
                    vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0, 2.0
                    ]
                ),
                &["peer"],
            )?,
            session_up: IntGaugeVec::new(
                opts!(
                    "continuum_link_session_up",
                    "1 while a WireGuard session with the peer is established."
                ),
                &["peer"],
            )?,
        };
        registry.register(Box::new(m.dropped.clone()))?;
        registry.register(Box::new(m.rx_packets.clone()))?;
        registry.register(Box::new(m.tx_packets.clone()))?;
        registry.register(Box::new(m.handshakes.clone()))?;
        registry.register(Box::new(m.expired.clone()))?;
        registry.register(Box::new(m.cookie_replies.clone()))?;
        registry.register(Box::new(m.echo_replies.clone()))?;
        registry.register(Box::new(m.heartbeat_rtt.clone()))?;
        registry.register(Box::new(m.session_up.clone()))?;
        Ok(m)
    }

    /// Drop counter for one reason (tests read it).
    pub fn dropped_count(&self, reason: &str) -> u64 {
        self.dropped.with_label_values(&[reason]).get()
    }

    pub fn handshake_count(&self, peer: &str) -> u64 {
        ["initiator", "responder"]
            .iter()
            .map(|r| self.handshakes.with_label_values(&[peer, r]).get())
            .sum()
    }
}
