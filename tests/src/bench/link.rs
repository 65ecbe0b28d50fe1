//! `bench link`: round-trip time of a small message through the WireGuard
//! control link (two userspace endpoints on loopback, encryption both ways)
//! against plain UDP on loopback, measured in the same run and the same way
//! (ping-pong, one message in flight), plus messages per second through one
//! tunnel (one-way, bounded window). Target: link p50 at most +100 µs over
//! UDP p50.
//!
//! Figures only, never pass/fail. `--json` prints one object.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use continuum_shared::link::{LinkConfig, LinkEndpoint, PeerConfig, PrivateKey};
use prometheus::Registry;
use serde_json::json;
use tokio::net::UdpSocket;

const WARMUP: usize = 300;
const SAMPLES: usize = 5_000;
const MESSAGE: &[u8] = b"continuum-bench-0123456789abcdef"; // 32 bytes
const ECHO_PORT: u16 = 7_100;
const THROUGHPUT_MESSAGES: u64 = 100_000;
const WINDOW: u64 = 256;

fn quantile_us(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

async fn udp_rtts() -> anyhow::Result<Vec<Duration>> {
    let server = UdpSocket::bind("127.0.0.1:0").await?;
    let server_addr = server.local_addr()?;
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            if server.send_to(&buf[..n], from).await.is_err() {
                break;
            }
        }
    });
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    let mut buf = [0u8; 2048];
    let mut rtts = Vec::with_capacity(SAMPLES);
    for i in 0..WARMUP + SAMPLES {
        let t = Instant::now();
        client.send_to(MESSAGE, server_addr).await?;
        tokio::time::timeout(Duration::from_secs(1), client.recv_from(&mut buf))
            .await
            .context("udp echo timed out")??;
        if i >= WARMUP {
            rtts.push(t.elapsed());
        }
    }
    echo.abort();
    Ok(rtts)
}

struct Pair {
    a: Arc<LinkEndpoint>,
    a_rx: tokio::sync::mpsc::Receiver<continuum_shared::link::Inbound>,
    b: Arc<LinkEndpoint>,
    b_rx: Option<tokio::sync::mpsc::Receiver<continuum_shared::link::Inbound>>,
    b_key: continuum_shared::link::PublicKey,
    a_key: continuum_shared::link::PublicKey,
}

async fn link_pair() -> anyhow::Result<Pair> {
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (va, vb) = (Ipv4Addr::new(10, 214, 0, 1), Ipv4Addr::new(10, 214, 0, 2));
    let mut cb = LinkConfig::new(kb.clone(), loopback, vb);
    cb.peers.push(PeerConfig::new(ka.public_key(), va));
    let (b, b_rx) = LinkEndpoint::bind(cb, &Registry::new()).await?;
    let mut ca = LinkConfig::new(ka.clone(), loopback, va);
    let mut pb = PeerConfig::new(kb.public_key(), vb);
    pb.endpoint = Some(b.local_addr());
    ca.peers.push(pb);
    let (a, a_rx) = LinkEndpoint::bind(ca, &Registry::new()).await?;
    Ok(Pair {
        a: Arc::new(a),
        a_rx,
        b: Arc::new(b),
        b_rx: Some(b_rx),
        b_key: kb.public_key(),
        a_key: ka.public_key(),
    })
}

async fn link_rtts(p: &mut Pair) -> anyhow::Result<Vec<Duration>> {
    let mut b_rx = p.b_rx.take().context("receiver taken")?;
    let b = p.b.clone();
    let a_key = p.a_key;
    let echo = tokio::spawn(async move {
        while let Some(m) = b_rx.recv().await {
            if b.send_udp(&a_key, m.dst_port, m.src_port, &m.payload)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut rtts = Vec::with_capacity(SAMPLES);
    for i in 0..WARMUP + SAMPLES {
        let t = Instant::now();
        p.a.send_to(&p.b_key, ECHO_PORT, MESSAGE).await?;
        tokio::time::timeout(Duration::from_secs(2), p.a_rx.recv())
            .await
            .context("link echo timed out")?
            .context("link closed")?;
        if i >= WARMUP {
            rtts.push(t.elapsed());
        }
    }
    echo.abort();
    Ok(rtts)
}

/// One-way messages per second A -> B, at most WINDOW unreceived in flight.
async fn link_throughput() -> anyhow::Result<(f64, u64)> {
    let mut p = link_pair().await?;
    let mut b_rx = p.b_rx.take().context("receiver taken")?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let sink = tokio::spawn(async move {
        while b_rx.recv().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    // Warm the session first.
    p.a.send_to(&p.b_key, ECHO_PORT, MESSAGE).await?;
    for _ in 0..200 {
        if received.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let base = received.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut sent = 0u64;
    let mut stalls = 0u64;
    while sent < THROUGHPUT_MESSAGES {
        let got = received.load(Ordering::Relaxed) - base;
        if sent - got >= WINDOW {
            // Give the receiver time; if a window's worth was lost, move on.
            tokio::task::yield_now().await;
            stalls += 1;
            if stalls > 10_000 {
                stalls = 0;
                sent = got; // resynchronise after losses
            }
            continue;
        }
        p.a.send_to(&p.b_key, ECHO_PORT, MESSAGE).await?;
        sent += 1;
    }
    // Wait for the tail (bounded).
    for _ in 0..200 {
        if received.load(Ordering::Relaxed) - base >= THROUGHPUT_MESSAGES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed) - base;
    sink.abort();
    Ok((
        got as f64 / elapsed,
        THROUGHPUT_MESSAGES.saturating_sub(got),
    ))
}

pub async fn run(json_out: bool) -> anyhow::Result<()> {
    // Same process, same method, back to back: UDP first, then the link.
    let mut udp = udp_rtts().await?;
    let mut pair = link_pair().await?;
    let mut link = link_rtts(&mut pair).await?;
    drop(pair);
    udp.sort_unstable();
    link.sort_unstable();
    let (msgs_per_s, lost) = link_throughput().await?;

    let udp_p50 = quantile_us(&udp, 0.5);
    let udp_p99 = quantile_us(&udp, 0.99);
    let link_p50 = quantile_us(&link, 0.5);
    let link_p99 = quantile_us(&link, 0.99);
    if json_out {
        let doc = json!({
            "samples": SAMPLES,
            "message_bytes": MESSAGE.len(),
            "udp": { "rtt_p50_us": udp_p50, "rtt_p99_us": udp_p99 },
            "link": {
                "rtt_p50_us": link_p50,
                "rtt_p99_us": link_p99,
                "msgs_per_s": msgs_per_s,
                "throughput_messages": THROUGHPUT_MESSAGES,
                "throughput_lost": lost,
            },
            "delta_p50_us": link_p50 - udp_p50,
            "target_delta_p50_us": 100,
        });
        println!("{doc}");
    } else {
        println!(
            "link bench: {SAMPLES} ping-pongs of {} bytes on loopback (after {WARMUP} warm-up)",
            MESSAGE.len()
        );
        println!("  plain UDP    rtt p50 {udp_p50:8.1} µs   p99 {udp_p99:8.1} µs");
        println!("  WireGuard    rtt p50 {link_p50:8.1} µs   p99 {link_p99:8.1} µs");
        println!(
            "  delta p50 {:+.1} µs (target: at most +100 µs)",
            link_p50 - udp_p50
        );
        println!(
            "  throughput   {msgs_per_s:.0} msgs/s one-way through one tunnel ({THROUGHPUT_MESSAGES} messages, window {WINDOW}, {lost} lost)"
        );
    }
    Ok(())
}
