//! Fuzz the control link's receive path: arbitrary datagrams into an
//! endpoint (boringtun parsing, MAC/AEAD checks, peer lookup), arbitrary
//! inner packets through an established session (our IPv4/UDP/ICMP and
//! heartbeat parsing), and the inner parser on its own. Nothing may panic.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use continuum_shared::link::core::{LinkCore, Output};
use continuum_shared::link::{packet, LinkConfig, LinkMetrics, PeerConfig, PrivateKey};
use libfuzzer_sys::fuzz_target;

const VIP_A: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 1);
const VIP_B: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 2);

struct Pair {
    a: LinkCore,
    b: LinkCore,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
}

/// Delivers every datagram until both sides are quiet (bounded).
fn pump(p: &mut Pair, mut out_a: Vec<Output>, mut out_b: Vec<Output>) {
    for _ in 0..8 {
        if out_a.is_empty() && out_b.is_empty() {
            return;
        }
        let mut next_a = Vec::new();
        let mut next_b = Vec::new();
        for o in out_a.drain(..) {
            if let Output::Send(_, d) = o {
                p.b.on_datagram(p.a_addr, &d, Duration::ZERO, &mut next_b);
            }
        }
        for o in out_b.drain(..) {
            if let Output::Send(_, d) = o {
                p.a.on_datagram(p.b_addr, &d, Duration::ZERO, &mut next_a);
            }
        }
        out_a = next_a;
        out_b = next_b;
    }
}

fn setup() -> Pair {
    let ka: PrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
        .parse()
        .unwrap();
    let kb: PrivateKey = "QPsw3gsJ0alY0UwKWq4pWeVNzxF3tqj8ooWLbSmHE2s="
        .parse()
        .unwrap();
    let a_addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let b_addr: SocketAddr = "127.0.0.1:2".parse().unwrap();
    let mut ca = LinkConfig::new(ka.clone(), a_addr, VIP_A);
    let mut pb = PeerConfig::new(kb.public_key(), VIP_B);
    pb.endpoint = Some(b_addr);
    ca.peers.push(pb);
    let mut cb = LinkConfig::new(kb, b_addr, VIP_B);
    cb.peers.push(PeerConfig::new(ka.public_key(), VIP_A));
    let metrics = |_| LinkMetrics::new(&prometheus::Registry::new()).unwrap();
    let mut p = Pair {
        a: LinkCore::new(&ca, metrics(0)).unwrap(),
        b: LinkCore::new(&cb, metrics(1)).unwrap(),
        a_addr,
        b_addr,
    };
    // The first heartbeat starts the handshake.
    let mut out = Vec::new();
    p.a.send_heartbeats(Duration::ZERO, &mut out);
    pump(&mut p, out, Vec::new());
    p
}

static PAIR: Mutex<Option<Pair>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let _ = packet::parse(data, VIP_B);
    let mut guard = PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let p = guard.get_or_insert_with(setup);
    // Outer: the datagram as received from the network.
    let mut out_b = Vec::new();
    p.b.on_datagram(p.a_addr, data, Duration::ZERO, &mut out_b);
    // Inner: the bytes as a decrypted packet from an authenticated peer.
    let mut out_a = Vec::new();
    p.a.send_raw_inner(0, data, &mut out_a);
    pump(p, out_a, out_b);
});
