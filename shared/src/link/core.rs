//! The control link without I/O: datagrams and clock ticks in, datagrams to
//! send and messages to deliver out. The tokio endpoint pumps it; tests and
//! the fuzz target drive it directly.
//!
//! Peer lookup: a handshake initiation names its sender only inside the
//! encrypted static key, so after the MAC check we open it with
//! `parse_handshake_anon` and look the key up in the allow-list. Every other
//! message carries our receiver index, whose upper 24 bits are the peer's
//! slot (boringtun gives each `Tunn` the index `slot << 8`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use super::heartbeat::{Heartbeat, HeartbeatTracker, HEARTBEAT_PORT};
use super::metrics::LinkMetrics;
use super::packet::{self, Inner};
use super::{Inbound, LinkConfig, LinkError, PeerConfig, PeerStats, PublicKey};

/// Handshake messages per second before cookie replies start. Each message
/// is checked twice against the shared limiter (our gate, then the `Tunn`),
/// so the limiter is created with twice this value.
pub const HANDSHAKE_RATE_LIMIT: u64 = 50;
/// Heartbeats remembered per peer for RTT and loss (at 200 ms: 10 s).
pub const HEARTBEAT_WINDOW: usize = 50;
/// A heartbeat unanswered for this long counts as lost.
pub const HEARTBEAT_ANSWER_WITHIN: Duration = Duration::from_millis(1000);
/// Heartbeats unanswered this long while a session exists: the peer may have
/// restarted and lost its session, so start a new handshake rather than wait
/// for boringtun's KEEPALIVE + REKEY_TIMEOUT (15 s).
pub const REHANDSHAKE_AFTER_SILENCE: Duration = Duration::from_secs(1);
/// At most one such probe per this interval while the silence lasts (one
/// 148-byte initiation per second to a dead peer; boringtun alone would
/// retry every 5 s).
pub const REHANDSHAKE_INTERVAL: Duration = Duration::from_secs(1);
/// Scratch buffer: the largest UDP datagram plus WireGuard overhead.
const BUF_LEN: usize = 65_536 + 64;

/// What the core wants done.
#[derive(Debug)]
pub enum Output {
    /// Send this datagram on the UDP socket.
    Send(SocketAddr, Vec<u8>),
    /// Hand this message to the application.
    Deliver(Inbound),
}

struct Peer {
    cfg: PeerConfig,
    label: String,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    hb: HeartbeatTracker,
    handshakes: u64,
    /// When we last started a handshake because heartbeats went unanswered.
    last_probe: Option<Duration>,
    /// When heartbeats started (silence is measured from here before any reply).
    first_heartbeat: Option<Duration>,
}

/// The sans-I/O link state.
pub struct LinkCore {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    virtual_ip: Ipv4Addr,
    peers: Vec<Peer>,
    by_key: HashMap<PublicKey, usize>,
    limiter: Arc<RateLimiter>,
    metrics: LinkMetrics,
    ip_id: u16,
    buf: Vec<u8>,
}

/// A boringtun result copied out of the scratch buffer.
enum Step {
    Network(Vec<u8>),
    Tunnel(Vec<u8>, IpAddr),
    Done,
    Err(WireGuardError),
}

fn own(r: TunnResult<'_>) -> Step {
    match r {
        TunnResult::Done => Step::Done,
        TunnResult::Err(e) => Step::Err(e),
        TunnResult::WriteToNetwork(b) => Step::Network(b.to_vec()),
        TunnResult::WriteToTunnelV4(b, a) => Step::Tunnel(b.to_vec(), IpAddr::V4(a)),
        TunnResult::WriteToTunnelV6(b, a) => Step::Tunnel(b.to_vec(), IpAddr::V6(a)),
    }
}

/// Metric label for a boringtun refusal.
pub fn wg_error_label(e: &WireGuardError) -> &'static str {
    match e {
        WireGuardError::DuplicateCounter
        | WireGuardError::InvalidCounter
        | WireGuardError::WrongTai64nTimestamp => "replay",
        WireGuardError::InvalidMac => "bad_mac",
        WireGuardError::InvalidAeadTag
        | WireGuardError::WrongKey
        | WireGuardError::WrongIndex
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::UnexpectedPacket => "auth_failed",
        WireGuardError::InvalidPacket
        | WireGuardError::IncorrectPacketLength
        | WireGuardError::WrongPacketType => "malformed",
        WireGuardError::NoCurrentSession => "no_session",
        WireGuardError::UnderLoad => "under_load",
        WireGuardError::ConnectionExpired => "expired",
        WireGuardError::DestinationBufferTooSmall | WireGuardError::LockFailed => "internal",
    }
}

impl LinkCore {
    pub fn new(config: &LinkConfig, metrics: LinkMetrics) -> Result<Self, LinkError> {
        let secret = config.private_key.to_x25519();
        let public = x25519::PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, 2 * HANDSHAKE_RATE_LIMIT));
        let mut peers = Vec::with_capacity(config.peers.len());
        let mut by_key = HashMap::new();
        if config.peers.len() >= 1 << 24 {
            return Err(LinkError::Config("too many peers".into()));
        }
        for (slot, cfg) in config.peers.iter().enumerate() {
            if by_key.insert(cfg.public_key, slot).is_some() {
                return Err(LinkError::Config(format!(
                    "peer {} listed twice",
                    cfg.public_key
                )));
            }
            if cfg.virtual_ip == config.virtual_ip {
                return Err(LinkError::Config(format!(
                    "peer {} has our own virtual IP {}",
                    cfg.public_key, cfg.virtual_ip
                )));
            }
            let tunn = Tunn::new(
                secret.clone(),
                cfg.public_key.to_x25519(),
                None,
                cfg.persistent_keepalive,
                slot as u32,
                Some(limiter.clone()),
            );
            peers.push(Peer {
                label: cfg.label(),
                cfg: cfg.clone(),
                tunn,
                endpoint: cfg.endpoint,
                hb: HeartbeatTracker::new(HEARTBEAT_WINDOW, HEARTBEAT_ANSWER_WITHIN),
                handshakes: 0,
                last_probe: None,
                first_heartbeat: None,
            });
        }
        Ok(LinkCore {
            secret,
            public,
            virtual_ip: config.virtual_ip,
            peers,
            by_key,
            limiter,
            metrics,
            ip_id: 0,
            buf: vec![0u8; BUF_LEN],
        })
    }

    pub fn metrics(&self) -> &LinkMetrics {
        &self.metrics
    }

    fn drop_packet(&self, reason: &'static str, src: SocketAddr) {
        self.metrics.dropped.with_label_values(&[reason]).inc();
        tracing::debug!(%src, reason, "link: dropped packet without answer");
    }

    fn next_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    /// Handles one datagram received from `src` at `now` (time since the
    /// endpoint started).
    pub fn on_datagram(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        let slot = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => return self.drop_packet("malformed", src),
            Ok(Packet::HandshakeInit(_)) => {
                // Check MAC1 (and the cookie under load) before any DH.
                let verified = self
                    .limiter
                    .verify_packet(Some(src.ip()), datagram, &mut self.buf);
                let init = match verified {
                    Ok(Packet::HandshakeInit(init)) => init,
                    Ok(_) => return self.drop_packet("malformed", src),
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        out.push(Output::Send(src, cookie.to_vec()));
                        self.metrics.cookie_replies.inc();
                        return;
                    }
                    Err(TunnResult::Err(e)) => return self.drop_packet(wg_error_label(&e), src),
                    Err(_) => return self.drop_packet("internal", src),
                };
                let half = match parse_handshake_anon(&self.secret, &self.public, &init) {
                    Ok(half) => half,
                    Err(e) => return self.drop_packet(wg_error_label(&e), src),
                };
                match self.by_key.get(&PublicKey(half.peer_static_public)) {
                    Some(&slot) => slot,
                    None => return self.drop_packet("unknown_key", src),
                }
            }
            Ok(Packet::HandshakeResponse(p)) => (p.receiver_idx >> 8) as usize,
            Ok(Packet::PacketCookieReply(p)) => (p.receiver_idx >> 8) as usize,
            Ok(Packet::PacketData(p)) => (p.receiver_idx >> 8) as usize,
        };
        if slot >= self.peers.len() {
            return self.drop_packet("unknown_index", src);
        }
        let is_init = matches!(
            Tunn::parse_incoming_packet(datagram),
            Ok(Packet::HandshakeInit(_))
        );
        let is_resp = matches!(
            Tunn::parse_incoming_packet(datagram),
            Ok(Packet::HandshakeResponse(_))
        );
        let step = own(self.peers[slot]
            .tunn
            .decapsulate(Some(src.ip()), datagram, &mut self.buf));
        match step {
            Step::Err(e) => self.drop_packet(wg_error_label(&e), src),
            Step::Network(bytes) => {
                self.authenticated(slot, src);
                if is_init || is_resp {
                    let role = if is_init { "responder" } else { "initiator" };
                    self.peers[slot].handshakes += 1;
                    self.metrics
                        .handshakes
                        .with_label_values(&[&self.peers[slot].label, role])
                        .inc();
                    tracing::info!(peer = %self.peers[slot].label, role, %src, "link: handshake completed");
                }
                self.send_raw(slot, src, bytes, out);
                // Packets queued while the session was being set up go now;
                // boringtun wants empty decapsulate calls until Done.
                self.drain_queue(slot, out);
            }
            Step::Tunnel(inner, from) => {
                self.authenticated(slot, src);
                self.on_inner(slot, &inner, from, now, out);
            }
            Step::Done => self.authenticated(slot, src),
        }
    }

    /// Bookkeeping for a packet boringtun authenticated: count it, and follow
    /// the peer to its new address (WireGuard roaming).
    fn authenticated(&mut self, slot: usize, src: SocketAddr) {
        let peer = &mut self.peers[slot];
        self.metrics
            .rx_packets
            .with_label_values(&[&peer.label])
            .inc();
        if peer.endpoint != Some(src) {
            tracing::info!(peer = %peer.label, old = ?peer.endpoint, new = %src, "link: peer endpoint changed");
            peer.endpoint = Some(src);
        }
    }

    fn send_raw(&mut self, slot: usize, dst: SocketAddr, bytes: Vec<u8>, out: &mut Vec<Output>) {
        self.metrics
            .tx_packets
            .with_label_values(&[&self.peers[slot].label])
            .inc();
        out.push(Output::Send(dst, bytes));
    }

    fn send_to_peer(&mut self, slot: usize, bytes: Vec<u8>, out: &mut Vec<Output>) {
        match self.peers[slot].endpoint {
            Some(dst) => self.send_raw(slot, dst, bytes, out),
            None => {
                self.metrics
                    .dropped
                    .with_label_values(&["no_endpoint"])
                    .inc();
            }
        }
    }

    fn drain_queue(&mut self, slot: usize, out: &mut Vec<Output>) {
        // The queue holds at most 256 packets; the bound is a safety net.
        for _ in 0..1024 {
            match own(self.peers[slot].tunn.decapsulate(None, &[], &mut self.buf)) {
                Step::Network(bytes) => self.send_to_peer(slot, bytes, out),
                _ => break,
            }
        }
    }

    fn on_inner(
        &mut self,
        slot: usize,
        inner: &[u8],
        from: IpAddr,
        now: Duration,
        out: &mut Vec<Output>,
    ) {
        let peer_ip = self.peers[slot].cfg.virtual_ip;
        if from != IpAddr::V4(peer_ip) {
            // WireGuard's cryptokey routing: a peer may only use its own address.
            self.metrics
                .dropped
                .with_label_values(&["disallowed_source"])
                .inc();
            return;
        }
        match packet::parse(inner, self.virtual_ip) {
            Err(e) => {
                self.metrics.dropped.with_label_values(&[e.label()]).inc();
            }
            Ok(Inner::EchoRequest { src, icmp }) => {
                let id = self.next_id();
                let reply = packet::build_echo_reply(self.virtual_ip, src, icmp, id);
                self.metrics
                    .echo_replies
                    .with_label_values(&[&self.peers[slot].label])
                    .inc();
                self.encapsulate(slot, &reply, out);
            }
            Ok(Inner::Udp {
                src_port,
                dst_port,
                payload,
                ..
            }) if dst_port == HEARTBEAT_PORT => match Heartbeat::decode(payload) {
                Some(Heartbeat::Ping { seq, sent_nanos }) => {
                    let pong = Heartbeat::Pong { seq, sent_nanos }.encode();
                    // Errors are counted inside; a lost pong is a lost heartbeat.
                    let _ = self.send_udp(slot, HEARTBEAT_PORT, src_port, &pong, out);
                }
                Some(Heartbeat::Pong { seq, sent_nanos }) => {
                    let peer = &mut self.peers[slot];
                    if let Some(rtt) = peer.hb.on_pong(seq, sent_nanos, now) {
                        self.metrics
                            .heartbeat_rtt
                            .with_label_values(&[&peer.label])
                            .observe(rtt.as_secs_f64());
                    }
                }
                None => {
                    self.metrics
                        .dropped
                        .with_label_values(&["bad_heartbeat"])
                        .inc();
                }
            },
            Ok(Inner::Udp {
                src_port,
                dst_port,
                payload,
                ..
            }) => {
                let peer = &self.peers[slot];
                out.push(Output::Deliver(Inbound {
                    peer: peer.cfg.public_key,
                    peer_name: peer.cfg.name.clone(),
                    src_port,
                    dst_port,
                    payload: payload.to_vec(),
                }));
            }
        }
    }

    /// Encrypts one inner IP packet for a peer (or queues it and starts a
    /// handshake when there is no session yet).
    fn encapsulate(&mut self, slot: usize, ip_packet: &[u8], out: &mut Vec<Output>) {
        match own(self.peers[slot].tunn.encapsulate(ip_packet, &mut self.buf)) {
            Step::Network(bytes) => self.send_to_peer(slot, bytes, out),
            Step::Err(e) => {
                self.metrics
                    .dropped
                    .with_label_values(&[wg_error_label(&e)])
                    .inc();
            }
            // Queued behind a handshake in progress; sent by drain_queue.
            Step::Done | Step::Tunnel(..) => {}
        }
    }

    /// Slot of a peer by key.
    pub fn slot(&self, peer: &PublicKey) -> Option<usize> {
        self.by_key.get(peer).copied()
    }

    /// Sends one UDP message to a peer inside the tunnel.
    pub fn send_udp(
        &mut self,
        slot: usize,
        src_port: u16,
        dst_port: u16,
        payload: &[u8],
        out: &mut Vec<Output>,
    ) -> Result<(), LinkError> {
        let dst_ip = self
            .peers
            .get(slot)
            .ok_or(LinkError::UnknownPeer)?
            .cfg
            .virtual_ip;
        let id = self.next_id();
        let pkt = packet::build_udp(self.virtual_ip, dst_ip, src_port, dst_port, payload, id)?;
        self.encapsulate(slot, &pkt, out);
        Ok(())
    }

    /// Encrypts an arbitrary inner packet (tests and the fuzz target use it
    /// to feed the peer's receive path).
    #[doc(hidden)]
    pub fn send_raw_inner(&mut self, slot: usize, ip_packet: &[u8], out: &mut Vec<Output>) {
        if slot < self.peers.len() {
            self.encapsulate(slot, ip_packet, out);
        }
    }

    /// Drives boringtun's timers; call about every 250 ms.
    pub fn tick_timers(&mut self, out: &mut Vec<Output>) {
        for slot in 0..self.peers.len() {
            let step = own(self.peers[slot].tunn.update_timers(&mut self.buf));
            match step {
                Step::Network(bytes) => self.send_to_peer(slot, bytes, out),
                Step::Err(WireGuardError::ConnectionExpired) => {
                    // boringtun gives up after REKEY_ATTEMPT_TIME and stays
                    // expired until asked: ask, so the link heals by itself.
                    self.metrics
                        .expired
                        .with_label_values(&[&self.peers[slot].label])
                        .inc();
                    tracing::warn!(peer = %self.peers[slot].label, "link: connection expired; forcing a new handshake");
                    if self.peers[slot].endpoint.is_some() {
                        let step = own(self.peers[slot]
                            .tunn
                            .format_handshake_initiation(&mut self.buf, true));
                        if let Step::Network(bytes) = step {
                            self.send_to_peer(slot, bytes, out);
                        }
                    }
                }
                Step::Err(e) => {
                    tracing::debug!(peer = %self.peers[slot].label, error = ?e, "link: timer error");
                }
                Step::Done | Step::Tunnel(..) => {}
            }
            let up = self.peers[slot].tunn.time_since_last_handshake().is_some();
            self.metrics
                .session_up
                .with_label_values(&[&self.peers[slot].label])
                .set(i64::from(up));
        }
    }

    /// Resets the shared handshake rate limiter; call once a second.
    pub fn reset_rate_limiter(&self) {
        self.limiter.reset_count();
    }

    /// Sends one heartbeat to every peer that has heartbeats on. Without a
    /// session the heartbeat is counted as sent (and will count as lost) and
    /// a handshake is started instead of queueing stale heartbeats.
    pub fn send_heartbeats(&mut self, now: Duration, out: &mut Vec<Output>) {
        for slot in 0..self.peers.len() {
            if !self.peers[slot].cfg.heartbeat {
                continue;
            }
            let ping = self.peers[slot].hb.on_send(now).encode();
            let first = *self.peers[slot].first_heartbeat.get_or_insert(now);
            if self.peers[slot].tunn.time_since_last_handshake().is_some() {
                let _ = self.send_udp(slot, HEARTBEAT_PORT, HEARTBEAT_PORT, &ping, out);
                let peer = &self.peers[slot];
                let silence = peer
                    .hb
                    .since_last_reply(now)
                    .unwrap_or_else(|| now.saturating_sub(first));
                let probe_due = peer
                    .last_probe
                    .is_none_or(|t| now.saturating_sub(t) >= REHANDSHAKE_INTERVAL);
                if silence >= REHANDSHAKE_AFTER_SILENCE && probe_due && peer.endpoint.is_some() {
                    self.peers[slot].last_probe = Some(now);
                    tracing::info!(peer = %self.peers[slot].label, silence_ms = silence.as_millis() as u64,
                        "link: heartbeats unanswered; starting a new handshake");
                    let step = own(self.peers[slot]
                        .tunn
                        .format_handshake_initiation(&mut self.buf, true));
                    if let Step::Network(bytes) = step {
                        self.send_to_peer(slot, bytes, out);
                    }
                }
            } else if self.peers[slot].endpoint.is_some() {
                let step = own(self.peers[slot]
                    .tunn
                    .format_handshake_initiation(&mut self.buf, false));
                if let Step::Network(bytes) = step {
                    self.send_to_peer(slot, bytes, out);
                }
            }
        }
    }

    /// Per-peer figures for the health model.
    pub fn stats(&self, now: Duration) -> Vec<PeerStats> {
        self.peers
            .iter()
            .map(|p| {
                let (_, tx_bytes, rx_bytes, _, _) = p.tunn.stats();
                PeerStats {
                    name: p.cfg.name.clone(),
                    public_key: p.cfg.public_key,
                    virtual_ip: p.cfg.virtual_ip,
                    endpoint: p.endpoint,
                    last_handshake_age: p.tunn.time_since_last_handshake(),
                    since_last_reply: p.hb.since_last_reply(now),
                    rtt_p50: p.hb.rtt_quantile(0.5),
                    rtt_p99: p.hb.rtt_quantile(0.99),
                    loss_ratio: p.hb.loss_ratio(now),
                    heartbeats_sent: p.hb.sent_total(),
                    heartbeats_answered: p.hb.answered_total(),
                    handshakes: p.handshakes,
                    tx_bytes: tx_bytes as u64,
                    rx_bytes: rx_bytes as u64,
                }
            })
            .collect()
    }
}
