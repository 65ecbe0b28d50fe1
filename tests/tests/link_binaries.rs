//! The control link wired into the binaries: a real `continuum-witness serve
//! --link-config` process serves leases over WireGuard to a quorum client in
//! this process, and a real `continuum-agent failover --witness-link-config`
//! reports the witness in its region-health `/status` JSON, Healthy, then
//! Unreachable after the witness is killed with SIGKILL.
//!
//! Needs the binaries: `cargo build -p continuum-witness -p continuum-agent`
//! (the test builds them itself when run under cargo).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use continuum_shared::lease::{HolderId, LeaseName};
use continuum_shared::link::config::LinkConfigFile;
use continuum_shared::link::keys::keygen;
use continuum_shared::link::lease_transport::LinkLeaseClient;
use continuum_shared::link::{LinkEndpoint, PublicKey};
use continuum_shared::quorum::{QuorumClient, QuorumConfig};
use continuum_shared::transport::LeaseTransport;
use continuum_tests::witness_proc::{free_port, http_get, WitnessOpts, WitnessProc};
use prometheus::Registry;

/// A free loopback UDP port (bound, then released).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A key pair in `dir/name/`: returns the private key path and public key.
fn keys(dir: &Path, name: &str) -> (PathBuf, PublicKey) {
    let (public, private, _) = keygen(Some(&dir.join(name)), None, None).expect("keygen");
    (private, public)
}

struct Peer<'a> {
    name: &'a str,
    key: PublicKey,
    vip: &'a str,
    endpoint: Option<SocketAddr>,
}

/// Writes a link config file and returns its path.
fn write_config(
    dir: &Path,
    file: &str,
    private_key: &Path,
    listen: SocketAddr,
    vip: &str,
    peers: &[Peer<'_>],
) -> PathBuf {
    let mut text = format!(
        "private_key_file: {}\nlisten: \"{listen}\"\nvirtual_ip: {vip}\npeers:\n",
        private_key.display()
    );
    for p in peers {
        text.push_str(&format!(
            "  - name: {}\n    public_key: \"{}\"\n    virtual_ip: {}\n",
            p.name, p.key, p.vip
        ));
        if let Some(e) = p.endpoint {
            text.push_str(&format!("    endpoint: \"{e}\"\n"));
        }
    }
    let path = dir.join(file);
    std::fs::write(&path, text).expect("write config");
    path
}

/// A witness serving its lease API over the link too, with `clients` as
/// its link peers. Returns the witness, its link address and public key.
fn witness_on_link(dir: &Path, clients: &[Peer<'_>]) -> (WitnessProc, SocketAddr, PublicKey) {
    continuum_tests::drill::build_sibling_binaries().expect("build binaries");
    let (sk, pk) = keys(dir, "witness");
    let listen: SocketAddr = ([127, 0, 0, 1], free_udp_port()).into();
    let cfg = write_config(dir, "witness-link.yaml", &sk, listen, "10.214.0.2", clients);
    let w = WitnessProc::start(WitnessOpts {
        extra_args: vec!["--link-config".into(), cfg.display().to_string()],
        ..WitnessOpts::default()
    })
    .expect("witness starts");
    (w, listen, pk)
}

#[tokio::test]
async fn quorum_client_leases_from_a_witness_process_over_the_link() {
    let dir = tempfile::tempdir().expect("tmp");
    let (client_sk, client_pk) = keys(dir.path(), "client");
    let (mut witness, witness_addr, witness_pk) = witness_on_link(
        dir.path(),
        &[Peer {
            name: "eu-1",
            key: client_pk,
            vip: "10.214.0.1",
            endpoint: None,
        }],
    );
    let client_cfg = write_config(
        dir.path(),
        "client-link.yaml",
        &client_sk,
        ([127, 0, 0, 1], free_udp_port()).into(),
        "10.214.0.1",
        &[Peer {
            name: "witness-a",
            key: witness_pk,
            vip: "10.214.0.2",
            endpoint: Some(witness_addr),
        }],
    );
    let file = LinkConfigFile::load(&client_cfg).expect("client config loads");
    let peer = file.peers_named(&["witness-a".into()]).expect("peer")[0].clone();
    let (ep, inbound) = LinkEndpoint::bind(file.link, &Registry::new())
        .await
        .expect("bind");
    let link = LinkLeaseClient::new(Arc::new(ep), inbound, None);
    let transport: Arc<dyn LeaseTransport> =
        Arc::new(link.transport(peer.public_key, Duration::from_secs(2)));
    assert!(transport.endpoint().starts_with("wg://"));
    let client = QuorumClient::new(vec![transport], QuorumConfig::default()).expect("client");

    let name = LeaseName::new("continuum/db/app").expect("name");
    let (eu, us) = (
        HolderId::new("eu-1").expect("holder"),
        HolderId::new("us-1").expect("holder"),
    );
    let ttl = Duration::from_secs(5);
    let grant = client
        .acquire(&name, &eu, ttl)
        .await
        .expect("granted over the link");
    assert_eq!(grant.holder, eu);
    assert_eq!(grant.granted_by, 1);
    let renewed = client.renew(&grant).await.expect("renewed over the link");
    assert_eq!(renewed.epoch, grant.epoch);
    assert!(renewed.deadline > grant.deadline);
    // Held: another holder is refused by the witness process.
    assert!(client.acquire(&name, &us, ttl).await.is_err());
    assert_eq!(client.release(&renewed).await, 1, "released at the witness");
    // Released: the other holder gets it at once, with a higher epoch.
    let next = client
        .acquire(&name, &us, ttl)
        .await
        .expect("granted after release");
    assert!(next.epoch > grant.epoch);

    // The witness's metrics include the link's (same registry).
    let metrics = witness.metrics().expect("metrics");
    assert!(
        metrics.contains("continuum_link_"),
        "no link metrics in the witness registry:\n{metrics}"
    );
    witness.kill9();
}

/// The agent process; killed on drop.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn log_tail(&self) -> String {
        continuum_tests::witness_proc::tail(&self.log, 40)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `/status` state of peer `name`, if the document lists it.
fn peer_state(health: SocketAddr, name: &str) -> Option<(String, serde_json::Value)> {
    let (code, body) = http_get(health, "/status").ok()?;
    if code != 200 {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
    let peer = doc["peers"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?
        .clone();
    Some((peer["state"].as_str()?.to_owned(), doc))
}

/// Polls `/status` until `name` is in `state` (bounded); returns the wait.
fn wait_for_state(agent: &Agent, health: SocketAddr, name: &str, state: &str) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if peer_state(health, name).is_some_and(|(s, _)| s == state) {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "{name} not {state} within 30 s; /status: {:?}\nagent log:\n{}",
        peer_state(health, name),
        agent.log_tail()
    );
}

#[test]
fn agent_status_reports_a_killed_witness_unreachable() {
    let dir = tempfile::tempdir().expect("tmp");
    let (agent_sk, agent_pk) = keys(dir.path(), "agent");
    let (mut witness, witness_addr, witness_pk) = witness_on_link(
        dir.path(),
        &[Peer {
            name: "eu-1",
            key: agent_pk,
            vip: "10.214.0.1",
            endpoint: None,
        }],
    );
    let agent_cfg = write_config(
        dir.path(),
        "agent-link.yaml",
        &agent_sk,
        ([127, 0, 0, 1], free_udp_port()).into(),
        "10.214.0.1",
        &[Peer {
            name: "witness-a",
            key: witness_pk,
            vip: "10.214.0.2",
            endpoint: Some(witness_addr),
        }],
    );
    let health: SocketAddr = ([127, 0, 0, 1], free_port().expect("port")).into();
    let pki = witness.pki().clone();
    let log = dir.path().join("agent.log");
    let out = std::fs::File::create(&log).expect("log");
    let bin = continuum_tests::drill::workspace_bin("continuum-agent").expect("agent binary");
    // No database: the agent waits (and /status shows the local check failing).
    let child = Command::new(bin)
        .arg("failover")
        .args(["--region", "eu-1", "--peer", "us-1"])
        .arg("--witness-link-config")
        .arg(&agent_cfg)
        .args(["--witness-link-peer", "witness-a"])
        .arg("--tls-ca")
        .arg(&pki.ca_cert)
        .arg("--tls-cert")
        .arg(&pki.client.cert)
        .arg("--tls-key")
        .arg(&pki.client.key)
        .arg(format!(
            "--pg-conninfo=host=127.0.0.1 port={} user=postgres connect_timeout=1",
            free_port().expect("port")
        ))
        .arg(format!("--health-listen={health}"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out.try_clone().expect("log"))
        .spawn()
        .expect("agent starts");
    let agent = Agent { child, log };

    let waited = wait_for_state(&agent, health, "witness-a", "healthy");
    println!("witness-a healthy in /status after {waited:?}");
    let (_, doc) = peer_state(health, "witness-a").expect("status");
    assert_eq!(doc["region"], "eu-1");
    assert_eq!(doc["local_checks"]["database"]["ok"], false, "{doc}");
    assert_eq!(
        doc["state"], "degraded",
        "a failing local check degrades the region"
    );
    let (_, metrics) = http_get(health, "/metrics").expect("metrics");
    assert!(
        metrics.contains(r#"continuum_peer_state{peer="witness-a",state="healthy"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("continuum_link_"), "{metrics}");

    witness.kill9();
    let detection = wait_for_state(&agent, health, "witness-a", "unreachable");
    println!(
        "witness-a unreachable in /status {:.0} ms after kill -9 (target 2 s)",
        detection.as_secs_f64() * 1000.0
    );
    let (_, metrics) = http_get(health, "/metrics").expect("metrics");
    assert!(
        metrics.contains(r#"continuum_peer_state{peer="witness-a",state="unreachable"} 1"#),
        "{metrics}"
    );
}
