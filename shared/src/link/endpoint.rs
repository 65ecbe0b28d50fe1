//! The tokio side of the link: one UDP socket, a receive task and a timer
//! task pumping [`LinkCore`].

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::Registry;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::core::{LinkCore, Output};
use super::{Inbound, LinkConfig, LinkError, LinkMetrics, PeerStats, PublicKey, TIMER_TICK};

/// Messages waiting for the application before new ones are dropped.
const INBOUND_QUEUE: usize = 1024;
const RATE_LIMIT_RESET: Duration = Duration::from_secs(1);

struct Shared {
    core: Mutex<LinkCore>,
    socket: UdpSocket,
    started: Instant,
    inbound: mpsc::Sender<Inbound>,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, LinkCore> {
        // A panic while holding the lock leaves the state usable: recover it.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    async fn flush(&self, out: &mut Vec<Output>) {
        for o in out.drain(..) {
            match o {
                Output::Send(dst, bytes) => {
                    if let Err(e) = self.socket.send_to(&bytes, dst).await {
                        tracing::debug!(%dst, error = %e, "link: send failed");
                    }
                }
                Output::Deliver(msg) => {
                    if self.inbound.try_send(msg).is_err() {
                        self.core()
                            .metrics()
                            .dropped
                            .with_label_values(&["app_queue_full"])
                            .inc();
                    }
                }
            }
        }
    }
}

/// A running link endpoint. Dropping it stops its tasks and closes the socket.
pub struct LinkEndpoint {
    shared: Arc<Shared>,
    metrics: LinkMetrics,
    local_addr: std::net::SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl LinkEndpoint {
    /// Binds the UDP socket and starts the receive and timer tasks. Returns
    /// the endpoint and the receiver of application messages.
    pub async fn bind(
        config: LinkConfig,
        registry: &Registry,
    ) -> Result<(LinkEndpoint, mpsc::Receiver<Inbound>), LinkError> {
        let metrics = LinkMetrics::new(registry)?;
        let core = LinkCore::new(&config, metrics.clone())?;
        let socket = UdpSocket::bind(config.listen).await?;
        let local_addr = socket.local_addr()?;
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        let shared = Arc::new(Shared {
            core: Mutex::new(core),
            socket,
            started: Instant::now(),
            inbound: tx,
        });
        tracing::info!(%local_addr, virtual_ip = %config.virtual_ip, peers = config.peers.len(),
            public_key = %config.private_key.public_key(), "link: endpoint listening");
        let tasks = vec![
            tokio::spawn(receive_loop(shared.clone())),
            tokio::spawn(timer_loop(shared.clone(), config.heartbeat_interval)),
        ];
        Ok((
            LinkEndpoint {
                shared,
                metrics,
                local_addr,
                tasks,
            },
            rx,
        ))
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> &LinkMetrics {
        &self.metrics
    }

    /// Sends `payload` to `peer`'s virtual IP, UDP port `port`, from the same
    /// port (replies come back to it).
    pub async fn send_to(
        &self,
        peer: &PublicKey,
        port: u16,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        self.send_udp(peer, port, port, payload).await
    }

    /// Sends one UDP message inside the tunnel. Without a session it is
    /// queued (boringtun keeps up to 256) while a handshake runs.
    pub async fn send_udp(
        &self,
        peer: &PublicKey,
        src_port: u16,
        dst_port: u16,
        payload: &[u8],
    ) -> Result<(), LinkError> {
        let mut out = Vec::new();
        {
            let mut core = self.shared.core();
            let slot = core.slot(peer).ok_or(LinkError::UnknownPeer)?;
            core.send_udp(slot, src_port, dst_port, payload, &mut out)?;
        }
        self.shared.flush(&mut out).await;
        Ok(())
    }

    /// Per-peer figures (handshake age, RTT, loss) for the health model.
    pub fn stats(&self) -> Vec<PeerStats> {
        let now = self.shared.now();
        self.shared.core().stats(now)
    }

    pub fn peer_stats(&self, peer: &PublicKey) -> Option<PeerStats> {
        self.stats().into_iter().find(|s| &s.public_key == peer)
    }

    /// Stops the tasks; the socket closes when they are gone.
    pub fn shutdown(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for LinkEndpoint {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn receive_loop(shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::new();
    loop {
        let (n, src) = match shared.socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // ICMP errors from earlier sends surface here on Linux; keep going.
                tracing::debug!(error = %e, "link: receive error");
                continue;
            }
        };
        {
            let now = shared.now();
            shared.core().on_datagram(src, &buf[..n], now, &mut out);
        }
        shared.flush(&mut out).await;
    }
}

async fn timer_loop(shared: Arc<Shared>, heartbeat_interval: Duration) {
    let mut timers = tokio::time::interval(TIMER_TICK);
    let mut heartbeats = tokio::time::interval(heartbeat_interval);
    let mut limiter = tokio::time::interval(RATE_LIMIT_RESET);
    for i in [&mut timers, &mut heartbeats, &mut limiter] {
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = timers.tick() => shared.core().tick_timers(&mut out),
            _ = heartbeats.tick() => {
                let now = shared.now();
                shared.core().send_heartbeats(now, &mut out);
            }
            _ = limiter.tick() => shared.core().reset_rate_limiter(),
        }
        shared.flush(&mut out).await;
    }
}
