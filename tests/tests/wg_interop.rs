//! A stock WireGuard peer (Debian's wireguard-go, TUN device, kernel IP stack)
//! talks to our userspace endpoint: handshake, `ping` of our virtual IP, and
//! a lease granted by a witness over the tunnel.
//!
//! Topology (root; both namespaces made and deleted by the test):
//!
//! ```text
//!  netns ctmwg-*                          netns ctmep-*
//!  wireguard-go wg0 10.214.0.2  <-veth->  this test binary, re-executed as
//!  veth 10.213.x.1                        `interop_child` (LinkEndpoint +
//!                                         witness lease API), veth 10.213.x.2
//! ```
//!
//! Our endpoint runs in a re-executed copy of this test binary so that it
//! lives inside its own namespace without touching the host's network.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use continuum_shared::lease::{Acquire, Epoch, HolderId, LeaseName, Request, Response};
use continuum_shared::link::{
    LinkConfig, LinkEndpoint, PeerConfig, PrivateKey, PublicKey, LEASE_PORT,
};
use continuum_tests::wg_proc::{is_root, ns_cmd, veth_between, Netns, WireguardGo};
use serde::{Deserialize, Serialize};

const CHILD_ENV: &str = "CONTINUUM_WG_INTEROP_CHILD";
const OUR_VIP: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 1);
const WG_VIP: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 2);
const OUR_PORT: u16 = 51_821;
const WG_PORT: u16 = 51_820;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
enum ChildConfig {
    /// Run our endpoint and the witness lease API.
    Endpoint {
        private_key: String,
        listen: SocketAddr,
        peer_key: String,
        peer_endpoint: SocketAddr,
        data_dir: String,
    },
    /// Send one lease request to our VIP through the kernel (and so through
    /// wireguard-go) and print the response.
    LeaseClient { request: String },
}

/// Kills the child (and so closes its sockets) on drop.
struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(
    ns: &Netns,
    cfg: &ChildConfig,
) -> anyhow::Result<(ChildGuard, BufReader<std::process::ChildStdout>)> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_string_lossy().into_owned();
    let mut child = ns_cmd(
        &ns.name,
        &[
            &exe,
            "interop_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ],
    )
    .env(CHILD_ENV, serde_json::to_string(cfg)?)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    Ok((ChildGuard(child), BufReader::new(stdout)))
}

/// Reads child lines until one starts with `prefix` (bounded by the child's life).
fn read_until(
    out: &mut BufReader<std::process::ChildStdout>,
    prefix: &str,
) -> anyhow::Result<String> {
    let mut line = String::new();
    for _ in 0..200 {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            anyhow::bail!("child exited before printing {prefix}");
        }
        // libtest prints "test interop_child ... " on the same line first.
        if let Some(at) = line.find(prefix) {
            return Ok(line[at + prefix.len()..].trim_end().to_owned());
        }
    }
    anyhow::bail!("child never printed {prefix}")
}

#[tokio::test]
async fn wireguard_go_peer_handshakes_pings_and_gets_a_lease() {
    if !is_root() {
        continuum_tests::skip::skip(
            "wg_interop",
            "needs root for network namespaces and a TUN device",
        );
        return;
    }
    if Command::new("wireguard-go")
        .arg("--version")
        .output()
        .is_err()
    {
        continuum_tests::skip::skip("wg_interop", "wireguard-go is not installed");
        return;
    }
    let ns_wg = Netns::create("ctmwg").expect("netns for wireguard-go");
    let ns_ep = Netns::create("ctmep").expect("netns for our endpoint");
    let x = 1 + rand::random::<u8>() % 250;
    let (wg_ip, ep_ip) = (Ipv4Addr::new(10, 213, x, 1), Ipv4Addr::new(10, 213, x, 2));
    veth_between(&ns_wg, wg_ip, &ns_ep, ep_ip).expect("veth");

    let ours = PrivateKey::generate();
    let theirs = PrivateKey::generate();
    let dir = tempfile::tempdir().expect("tmp");
    let wg_key_file = dir.path().join("wg.key");
    std::fs::write(&wg_key_file, theirs.to_base64()).expect("key file");

    eprintln!("wg_interop: namespaces and veth ready");
    let wg = WireguardGo::start(&ns_wg, "wg0").expect("wireguard-go");
    ns_wg
        .exec(&[
            "wg",
            "set",
            "wg0",
            "private-key",
            &wg_key_file.to_string_lossy(),
            "listen-port",
            &WG_PORT.to_string(),
            "peer",
            &ours.public_key().to_base64(),
            "endpoint",
            &format!("{ep_ip}:{OUR_PORT}"),
            "allowed-ips",
            &format!("{OUR_VIP}/32"),
        ])
        .expect("wg set");
    ns_wg
        .exec(&["ip", "addr", "add", &format!("{WG_VIP}/24"), "dev", "wg0"])
        .expect("wg0 address");
    ns_wg
        .exec(&["ip", "link", "set", "wg0", "up"])
        .expect("wg0 up");

    eprintln!("wg_interop: wireguard-go configured");
    let (_endpoint, mut ep_out) = spawn_child(
        &ns_ep,
        &ChildConfig::Endpoint {
            private_key: ours.to_base64(),
            listen: SocketAddr::from((ep_ip, OUR_PORT)),
            peer_key: theirs.public_key().to_base64(),
            peer_endpoint: SocketAddr::from((wg_ip, WG_PORT)),
            data_dir: dir.path().join("witness").to_string_lossy().into_owned(),
        },
    )
    .expect("spawn endpoint");
    read_until(&mut ep_out, "READY").expect("endpoint ready");

    eprintln!("wg_interop: endpoint child ready");
    // 1. ping our virtual IP from the wireguard-go namespace.
    let ping = ns_wg
        .exec(&[
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            &OUR_VIP.to_string(),
        ])
        .expect("ping succeeds");
    println!("{ping}");
    assert!(ping.contains(&format!("bytes from {OUR_VIP}")), "{ping}");

    eprintln!("wg_interop: ping done");
    // 2. wireguard-go completed a handshake with our key.
    let hs = wg.latest_handshake(&ours.public_key()).expect("wg show");
    assert!(
        hs > 0,
        "wireguard-go reports no handshake with our endpoint"
    );

    eprintln!("wg_interop: handshake seen");
    // 3. A lease from the witness, over the tunnel, from a plain UDP socket
    //    in the wireguard-go namespace.
    let req = Request::Acquire(Acquire {
        name: LeaseName::new("continuum/db/app").expect("name"),
        holder: HolderId::new("eu-1").expect("holder"),
        epoch: Epoch(1),
        ttl_ms: 5000,
    });
    let (_client, mut client_out) = spawn_child(
        &ns_wg,
        &ChildConfig::LeaseClient {
            request: String::from_utf8(req.encode()).expect("utf8"),
        },
    )
    .expect("spawn lease client");
    let body = read_until(&mut client_out, "RESPONSE ").expect("lease response");
    let resp = Response::decode(body.as_bytes()).expect("valid response");
    assert_eq!(
        resp,
        Response::Granted {
            epoch: Epoch(1),
            ttl_ms: 5000
        }
    );
    drop(wg);
}

/// Helper, not a test: the parent above runs it inside a namespace.
#[tokio::test]
#[ignore = "helper process for wireguard_go_peer_handshakes_pings_and_gets_a_lease"]
async fn interop_child() {
    let Ok(cfg) = std::env::var(CHILD_ENV) else {
        println!("interop_child: started without {CHILD_ENV}; nothing to do");
        return;
    };
    let cfg: ChildConfig = serde_json::from_str(&cfg).expect("child config");
    match cfg {
        ChildConfig::Endpoint {
            private_key,
            listen,
            peer_key,
            peer_endpoint,
            data_dir,
        } => {
            let key: PrivateKey = private_key.parse().expect("key");
            let peer: PublicKey = peer_key.parse().expect("peer key");
            let mut config = LinkConfig::new(key, listen, OUR_VIP);
            let mut p = PeerConfig::new(peer, WG_VIP);
            p.name = "wireguard-go".into();
            p.endpoint = Some(peer_endpoint);
            // wireguard-go does not run our heartbeat protocol.
            p.heartbeat = false;
            config.peers.push(p);
            let registry = prometheus::Registry::new();
            let (ep, rx) = LinkEndpoint::bind(config, &registry).await.expect("bind");
            let store = continuum_witness::store::Store::Embedded(
                continuum_witness::store::embedded::EmbeddedStore::open(
                    std::path::Path::new(&data_dir),
                    true,
                )
                .expect("store"),
            );
            let metrics = continuum_witness::metrics::Metrics::new().expect("metrics");
            let witness = Arc::new(continuum_witness::Witness::new(store, Arc::new(metrics)));
            let ep = Arc::new(ep);
            tokio::spawn(continuum_witness::link_api::serve(witness, ep.clone(), rx));
            println!("READY");
            // Live until the parent closes our stdin (or kills us).
            let _ = tokio::task::spawn_blocking(|| {
                let mut s = String::new();
                std::io::stdin().read_line(&mut s)
            })
            .await;
            drop(ep);
        }
        ChildConfig::LeaseClient { request } => {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
            sock.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = [0u8; 65_536];
            for _ in 0..5 {
                sock.send_to(request.as_bytes(), (OUR_VIP, LEASE_PORT))
                    .expect("send");
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    println!("RESPONSE {}", String::from_utf8_lossy(&buf[..n]));
                    return;
                }
            }
            println!("NO RESPONSE");
        }
    }
}
