//! The WireGuard control link between agents and witnesses.
//!
//! A userspace WireGuard endpoint (boringtun's noise layer) on one UDP
//! socket: no TUN device, no privileges. Each endpoint has a static x25519
//! key and a virtual IPv4 address; peers are an allow-list of public keys,
//! each with an endpoint and the one virtual IP it may use. Inside the tunnel
//! we speak IPv4: UDP messages for the application (lease requests), UDP
//! heartbeats for the health model, and ICMP echo replies so that a stock
//! WireGuard peer can `ping` us. Packets from unknown keys, malformed
//! packets and replays get no answer and are counted by reason in
//! `continuum_link_dropped_packets_total`.
//!
//! Layers: [`packet`] (inner IP/UDP/ICMP), [`heartbeat`] (RTT and loss),
//! [`core`] (sans-I/O state machine around boringtun), [`endpoint`] (tokio
//! socket and timers), [`keys`] (key files).

pub mod config;
pub mod core;
pub mod endpoint;
pub mod heartbeat;
pub mod keys;
pub mod lease_transport;
pub mod metrics;
pub mod packet;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

pub use endpoint::LinkEndpoint;
pub use keys::{PrivateKey, PublicKey};
pub use metrics::LinkMetrics;

/// Heartbeat period at default settings (see the health model for how it
/// turns into "Unreachable within 2 s").
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// In-tunnel UDP port of the witness lease API (one JSON request per
/// message, the response goes back to the sender's port).
pub const LEASE_PORT: u16 = 51_872;
/// How often boringtun's timers are driven (the library asks for ~250 ms).
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer is not in the allow-list")]
    UnknownPeer,
    #[error("inner packet: {0}")]
    Packet(#[from] packet::PacketError),
    #[error("invalid link configuration: {0}")]
    Config(String),
    #[error("metrics registration: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("key: {0}")]
    Key(#[from] keys::KeyError),
    #[error("the link endpoint has shut down")]
    Closed,
}

impl LinkError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            LinkError::Io(_) => "io",
            LinkError::UnknownPeer => "unknown_peer",
            LinkError::Packet(e) => e.label(),
            LinkError::Config(_) => "config",
            LinkError::Metrics(_) => "metrics",
            LinkError::Key(e) => e.label(),
            LinkError::Closed => "closed",
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

fn yes() -> bool {
    true
}

/// One allowed peer, as a config file names it (by public key).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Human name for logs, metrics and `/status` (e.g. `witness-a`, `eu-1`).
    #[serde(default)]
    pub name: String,
    /// The peer's static public key (base64, as `wg pubkey` prints it).
    pub public_key: PublicKey,
    /// Where to send to first; updated from authenticated packets (roaming).
    /// `None` for peers that always call us.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// The only inner source address this peer may use.
    pub virtual_ip: Ipv4Addr,
    /// WireGuard persistent keepalive in seconds; heartbeats usually make it
    /// unnecessary.
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
    /// Send heartbeats (both ends must run Continuum's link; turn off for a
    /// stock WireGuard peer).
    #[serde(default = "yes")]
    pub heartbeat: bool,
}

impl PeerConfig {
    pub fn new(public_key: PublicKey, virtual_ip: Ipv4Addr) -> Self {
        PeerConfig {
            name: String::new(),
            public_key,
            endpoint: None,
            virtual_ip,
            persistent_keepalive: None,
            heartbeat: true,
        }
    }
    /// Name for metrics: the configured name, or the key's first characters.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            self.public_key.short()
        } else {
            self.name.clone()
        }
    }
}

/// Everything an endpoint needs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub private_key: PrivateKey,
    /// UDP address to bind (the public IP:port peers list for us).
    pub listen: SocketAddr,
    /// Our address inside the tunnel.
    pub virtual_ip: Ipv4Addr,
    pub peers: Vec<PeerConfig>,
    pub heartbeat_interval: Duration,
}

impl LinkConfig {
    pub fn new(private_key: PrivateKey, listen: SocketAddr, virtual_ip: Ipv4Addr) -> Self {
        LinkConfig {
            private_key,
            listen,
            virtual_ip,
            peers: Vec::new(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
        }
    }
}

/// A UDP message received through the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub peer: PublicKey,
    pub peer_name: String,
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
}

/// What the link knows about one peer right now.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    pub name: String,
    pub public_key: PublicKey,
    pub virtual_ip: Ipv4Addr,
    pub endpoint: Option<SocketAddr>,
    /// Age of the current session; `None` without one.
    pub last_handshake_age: Option<Duration>,
    /// Time since a heartbeat was last answered; `None` if never.
    pub since_last_reply: Option<Duration>,
    pub rtt_p50: Option<Duration>,
    pub rtt_p99: Option<Duration>,
    /// Unanswered fraction of the settled heartbeats in the window.
    pub loss_ratio: f64,
    pub heartbeats_sent: u64,
    pub heartbeats_answered: u64,
    /// Handshakes completed since the endpoint started (rekeys included).
    pub handshakes: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

impl PeerStats {
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            self.public_key.short()
        } else {
            self.name.clone()
        }
    }
}
