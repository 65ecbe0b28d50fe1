//! The partition matrix's cluster (root only): region A, region B and the
//! witnesses each in their own network namespace, wired point to point:
//!
//! ```text
//!          W (witnesses, 10.77.1.1 / 10.77.2.1)
//!        a-w/w-a        b-w/w-b
//!   A (10.77.1.2)      B (10.77.2.2)
//!        A 10.77.3.1 -a-b/b-a- 10.77.3.2 B     (streaming replication B <- A)
//! ```
//!
//! Each region's PostgreSQL and agent run inside the region's namespace; the
//! agent reaches its database over the unix socket (same region, never cut)
//! and the witnesses over its own link. The test's writer stays in the root
//! namespace and reaches both databases over their unix sockets, which no
//! partition cuts: it plays the worst client, one that can always reach
//! whichever region still acknowledges writes. A partition drops packets
//! silently with nftables (see [`crate::netns`]).
//!
//! The checker ([`check`]) is pure: it takes the acknowledged-write history,
//! what the survivor holds and when the other region took over, and reports
//! lost writes and acknowledgements by the old primary after the takeover.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use continuum_shared::pg::decide::{is_fenced, rewrite_auto_conf, synchronous_standby_names};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::drill::writer::{self, WriterLog};
use crate::netns::NetNs;
use crate::pg_proc::{bin_dir, run_as, RunAs, SUPERUSER};

pub const REGIONS: [&str; 2] = ["region-a", "region-b"];
const LEASE: &str = "continuum/partition/db";
const PG_PORT: u16 = 5432;
/// Concurrent writers per case.
const WRITERS: usize = 4;
const WITNESS_PORT: u16 = 7001;
const WITNESS_HEALTH_PORT: u16 = 7101;
/// Where each region's agent reaches the witnesses.
const WITNESS_ADDR: [&str; 2] = ["10.77.1.1", "10.77.2.1"];
/// Each region's address on the A-B link (PostgreSQL listens there).
const REPL_ADDR: [&str; 2] = ["10.77.3.1", "10.77.3.2"];
/// Interface names: [region][0] toward the witnesses, [region][1] toward the peer.
pub const IF_TO_W: [&str; 2] = ["a-w", "b-w"];
pub const IF_FROM_W: [&str; 2] = ["w-a", "w-b"];
pub const IF_TO_PEER: [&str; 2] = ["a-b", "b-a"];
/// libfaketime, for the clock-drift case (Debian package `faketime`).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// How to build the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub witnesses: usize,
    pub ttl_ms: u64,
    /// Extra environment per region's agent.
    pub agent_env: [Vec<(String, String)>; 2],
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            witnesses: 1,
            ttl_ms: 2000,
            agent_env: [Vec::new(), Vec::new()],
        }
    }
}

/// CA, a witness server certificate naming the witnesses' link addresses,
/// and one client certificate for the agents.
struct TestPki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn leaf(
    dir: &Path,
    file: &str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(PathBuf, PathBuf)> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, file);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    let (c, k) = (
        dir.join(format!("{file}.crt")),
        dir.join(format!("{file}.key")),
    );
    fs::write(&c, cert.pem())?;
    fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

impl TestPki {
    fn generate(dir: &Path) -> Result<TestPki> {
        let ca_key = KeyPair::generate()?;
        let mut ca_p = CertificateParams::new(Vec::<String>::new())?;
        ca_p.distinguished_name
            .push(DnType::CommonName, "partition test CA");
        ca_p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = ca_p.self_signed(&ca_key)?.pem();
        let ca = Issuer::new(ca_p, ca_key);
        let ca_path = dir.join("ca.crt");
        fs::write(&ca_path, ca_pem)?;
        let mut sans: Vec<String> = WITNESS_ADDR.iter().map(|s| s.to_string()).collect();
        sans.push("127.0.0.1".into());
        let (server_cert, server_key) = leaf(
            dir,
            "witness",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        )?;
        let (client_cert, client_key) = leaf(
            dir,
            "agent",
            vec!["agent".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
        )?;
        Ok(TestPki {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }
}

/// One region's PostgreSQL inside its namespace.
pub struct NsPg {
    name: String,
    peer: String,
    root: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    listen: String,
    who: RunAs,
    bin: PathBuf,
    postmaster: Option<Child>,
}

impl NsPg {
    fn new(parent: &Path, region: usize, who: RunAs) -> Result<NsPg> {
        let root = parent.join(REGIONS[region]);
        fs::create_dir_all(root.join("s"))?;
        for p in [&root, &root.join("s")] {
            std::os::unix::fs::chown(p, Some(who.uid), Some(who.gid))?;
        }
        Ok(NsPg {
            name: REGIONS[region].into(),
            peer: REGIONS[1 - region].into(),
            data: root.join("data"),
            sock: root.join("s"),
            log: root.join("postgres.log"),
            root,
            listen: REPL_ADDR[region].into(),
            who,
            bin: bin_dir(),
            postmaster: None,
        })
    }

    fn tool(&self, name: &str, args: &[String]) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new(self.bin.join(name))
            .args(args)
            .current_dir(&self.root)
            .uid(self.who.uid)
            .gid(self.who.gid)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {name}"))?;
        if !out.status.success() {
            bail!(
                "{name} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The unix-socket connection string (reachable from every namespace).
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={PG_PORT} user={SUPERUSER} dbname=postgres connect_timeout=2",
            self.sock.display()
        )
    }

    fn chown_data(&self) -> Result<()> {
        let st = std::process::Command::new("chown")
            .args(["-R", &format!("{}:{}", self.who.uid, self.who.gid)])
            .arg(&self.data)
            .status()?;
        anyhow::ensure!(st.success(), "chown {}", self.data.display());
        Ok(())
    }

    fn write_conf(&self) -> Result<()> {
        let names = synchronous_standby_names(Some(&self.peer)).replace('\'', "''");
        let text = format!(
            "listen_addresses = '127.0.0.1,{listen}'\n\
             port = {PG_PORT}\n\
             unix_socket_directories = '{sock}'\n\
             shared_buffers = '32MB'\n\
             max_connections = 60\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             wal_keep_size = '256MB'\n\
             hot_standby = on\n\
             wal_log_hints = on\n\
             wal_retrieve_retry_interval = '200ms'\n\
             wal_sender_timeout = '2s'\n\
             wal_receiver_timeout = '2s'\n\
             wal_receiver_status_interval = '1s'\n\
             synchronous_commit = remote_apply\n\
             synchronous_standby_names = '{names}'\n\
             log_line_prefix = '%m [%p] {name} '\n",
            listen = self.listen,
            sock = self.sock.display(),
            name = self.name,
        );
        fs::write(self.data.join("continuum_partition.conf"), text)?;
        self.chown_data()
    }

    fn init_primary(&mut self) -> Result<()> {
        self.tool(
            "initdb",
            &[
                format!("--pgdata={}", self.data.display()),
                format!("--username={SUPERUSER}"),
                "--auth=trust".into(),
                "--locale=C".into(),
                "--no-sync".into(),
            ],
        )?;
        let mut conf = fs::read_to_string(self.data.join("postgresql.conf"))?;
        conf.push_str("\ninclude_if_exists = 'continuum_partition.conf'\n");
        fs::write(self.data.join("postgresql.conf"), conf)?;
        let mut hba = fs::read_to_string(self.data.join("pg_hba.conf"))?;
        hba.push_str(
            "\nhost all all 10.77.0.0/16 trust\nhost replication all 10.77.0.0/16 trust\n",
        );
        fs::write(self.data.join("pg_hba.conf"), hba)?;
        self.write_conf()
    }

    fn init_standby_of(&mut self, primary: &NsPg) -> Result<()> {
        self.tool(
            "pg_basebackup",
            &[
                format!("--pgdata={}", self.data.display()),
                format!("--dbname={}", primary.conninfo()),
                "--wal-method=stream".into(),
                "--checkpoint=fast".into(),
                "--write-recovery-conf".into(),
                "--no-sync".into(),
            ],
        )?;
        // Stream over the A-B link, not the unix socket.
        let conninfo = format!(
            "host={} port={PG_PORT} user={SUPERUSER} application_name={}",
            primary.listen, self.name
        );
        let auto = self.data.join("postgresql.auto.conf");
        let text = fs::read_to_string(&auto).unwrap_or_default();
        fs::write(
            &auto,
            rewrite_auto_conf(&text, &[("primary_conninfo", conninfo)], &[]),
        )?;
        self.write_conf()
    }

    fn start(&mut self, ns: &NetNs) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = ns
            .command("setpriv")
            .args([
                format!("--reuid={}", self.who.uid),
                format!("--regid={}", self.who.gid),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn postgres in its namespace")?;
        self.postmaster = Some(child);
        let start = Instant::now();
        loop {
            let ok = std::process::Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-t", "1", "-h"])
                .arg(&self.sock)
                .args(["-p", &PG_PORT.to_string()])
                .status()?
                .success();
            if ok {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("{} not ready:\n{}", self.name, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_tail(&self) -> String {
        crate::witness_proc::tail(&self.log, 30)
    }

    /// `(in_recovery, fenced)` or None when the server does not answer.
    pub async fn state(&self) -> Option<(bool, bool)> {
        poll_state(&self.conninfo()).await
    }

    /// Which of `ids` this server holds.
    pub async fn present(&self, ids: &[i64]) -> Result<HashSet<i64>> {
        let c = continuum_shared::pg::backend::connect(&self.conninfo()).await?;
        let rows = c
            .query("SELECT id FROM drill_writes WHERE id = ANY($1)", &[&ids])
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
    }

    async fn accepts_write(&self) -> bool {
        let q = async {
            let c = continuum_shared::pg::backend::connect(&self.conninfo())
                .await
                .ok()?;
            c.execute("INSERT INTO drill_probe DEFAULT VALUES", &[])
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(800), q).await,
            Ok(Some(1))
        )
    }
}

/// One structured line of an agent's JSON log.
#[derive(Debug, Clone)]
pub struct AgentEvent {
    pub at: SystemTime,
    pub message: String,
    pub action: String,
    pub detail: String,
}

/// The agent logs `action` twice on applied actions (the label, then the
/// Debug form, e.g. `UpdateMeta { .. }`); JSON keeps the last one. Both map
/// to the label (`update_meta`).
fn action_label(raw: &str) -> String {
    let variant = raw.split([' ', '{', '(']).next().unwrap_or_default();
    let mut out = String::new();
    for (i, ch) in variant.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

/// Parses the agent's JSON log lines (tracing-subscriber's json format).
pub fn parse_agent_log(text: &str) -> Vec<AgentEvent> {
    text.lines()
        .filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let at: jiff::Timestamp = v.get("timestamp")?.as_str()?.parse().ok()?;
            let f = v.get("fields")?;
            let s = |k: &str| {
                f.get(k)
                    .and_then(|x| x.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            Some(AgentEvent {
                at: SystemTime::from(at),
                message: s("message"),
                action: action_label(&s("action")),
                detail: s("detail"),
            })
        })
        .collect()
}

/// Everything one partition case runs. Dropping it kills every process
/// (namespace by namespace) and deletes the namespaces.
pub struct Cluster {
    pub ns: [NetNs; 2],
    pub ns_w: NetNs,
    pub pg: [NsPg; 2],
    pub witness_ports: Vec<u16>,
    witnesses: Vec<Child>,
    agents: [Option<Child>; 2],
    agent_logs: [PathBuf; 2],
    _dir: tempfile::TempDir,
    /// (Instant, SystemTime) taken together, to put writer times on the
    /// agents' log clock.
    anchor: (Instant, SystemTime),
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for ns in self.ns.iter().chain(std::iter::once(&self.ns_w)) {
            ns.kill_all();
        }
        for c in self
            .witnesses
            .iter_mut()
            .chain(self.agents.iter_mut().flatten())
            .chain(self.pg.iter_mut().filter_map(|p| p.postmaster.as_mut()))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    /// Builds namespaces, links, witnesses, both databases and both agents,
    /// and waits until A is a steady primary with B recorded as its
    /// synchronous standby.
    pub async fn start(opts: ClusterOpts) -> Result<Cluster> {
        let t0 = Instant::now();
        let agent_bin = crate::drill::workspace_bin("continuum-agent")?;
        let witness_bin = crate::witness_proc::witness_bin()?;
        let who = run_as()?.context("partition tests run as root")?;
        let dir = tempfile::Builder::new()
            .prefix("continuum-partition-")
            .tempdir_in("/tmp")?;
        std::os::unix::fs::chown(dir.path(), Some(who.uid), Some(who.gid))?;
        let pki = TestPki::generate(dir.path())?;

        let ns_a = NetNs::new("a")?;
        let ns_b = NetNs::new("b")?;
        let ns_w = NetNs::new("w")?;
        ns_a.link("a-w", "10.77.1.2/24", &ns_w, "w-a", "10.77.1.1/24")?;
        ns_b.link("b-w", "10.77.2.2/24", &ns_w, "w-b", "10.77.2.1/24")?;
        ns_a.link("a-b", "10.77.3.1/24", &ns_b, "b-a", "10.77.3.2/24")?;

        let mut witnesses = Vec::new();
        let mut witness_ports = Vec::new();
        for i in 0..opts.witnesses {
            let port = WITNESS_PORT + i as u16;
            let data = dir.path().join(format!("witness-{i}"));
            fs::create_dir_all(&data)?;
            let log = fs::File::create(dir.path().join(format!("witness-{i}.log")))?;
            let child = ns_w
                .command(&witness_bin)
                .arg("serve")
                .arg(format!("--api-listen=0.0.0.0:{port}"))
                .arg(format!(
                    "--health-listen=127.0.0.1:{}",
                    WITNESS_HEALTH_PORT + i as u16
                ))
                .arg("--tls-cert")
                .arg(&pki.server_cert)
                .arg("--tls-key")
                .arg(&pki.server_key)
                .arg("--client-ca")
                .arg(&pki.ca)
                .arg("--data-dir")
                .arg(&data)
                .arg("--store=embedded")
                .env_remove("CONTINUUM_WITNESS_STORE")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("start witness")?;
            witnesses.push(child);
            witness_ports.push(port);
        }

        eprintln!(
            "partition: namespaces and witnesses up after {:?}",
            t0.elapsed()
        );
        let mut a = NsPg::new(dir.path(), 0, who)?;
        let mut b = NsPg::new(dir.path(), 1, who)?;
        tokio::task::block_in_place(|| -> Result<()> {
            a.init_primary()?;
            a.start(&ns_a)?;
            b.init_standby_of(&a)?;
            b.start(&ns_b)
        })?;
        {
            let c = continuum_shared::pg::backend::connect(&a.conninfo()).await?;
            let create = c.batch_execute(
                "CREATE TABLE drill_writes (id bigint PRIMARY KEY, region int NOT NULL, \
                   at timestamptz NOT NULL DEFAULT clock_timestamp()); \
                 CREATE TABLE drill_probe (id bigserial PRIMARY KEY);",
            );
            tokio::time::timeout(Duration::from_secs(30), create)
                .await
                .context("create tables: B never attached as synchronous standby")??;
        }

        eprintln!("partition: databases up after {:?}", t0.elapsed());
        let agent_logs = [
            dir.path().join("agent-region-a.log"),
            dir.path().join("agent-region-b.log"),
        ];
        let mut cluster = Cluster {
            ns: [ns_a, ns_b],
            ns_w,
            pg: [a, b],
            witness_ports,
            witnesses,
            agents: [None, None],
            agent_logs,
            _dir: dir,
            anchor: (Instant::now(), SystemTime::now()),
        };
        for region in 0..2 {
            let urls: Vec<String> = cluster
                .witness_ports
                .iter()
                .map(|p| format!("https://{}:{p}", WITNESS_ADDR[region]))
                .collect();
            let log = fs::File::create(&cluster.agent_logs[region])?;
            let child = cluster.ns[region]
                .command(&agent_bin)
                .arg("failover")
                .args(["--region", REGIONS[region], "--peer", REGIONS[1 - region]])
                .args(["--lease", LEASE])
                .arg(format!("--witness={}", urls.join(",")))
                .arg("--tls-ca")
                .arg(&pki.ca)
                .arg("--tls-cert")
                .arg(&pki.client_cert)
                .arg("--tls-key")
                .arg(&pki.client_key)
                .args(["--pg-conninfo", &cluster.pg[region].conninfo()])
                .args(["--ttl-ms", &opts.ttl_ms.to_string()])
                .args(["--health-listen", "127.0.0.1:9464"])
                .env("RUST_LOG", "info")
                .env("CONTINUUM_LOG_FORMAT", "json")
                .envs(opts.agent_env[region].iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("start agent")?;
            cluster.agents[region] = Some(child);
        }
        cluster.wait_steady(Duration::from_secs(40)).await?;
        eprintln!("partition: steady after {:?}", t0.elapsed());
        Ok(cluster)
    }

    /// The agent's parsed log.
    pub fn events(&self, region: usize) -> Vec<AgentEvent> {
        parse_agent_log(&fs::read_to_string(&self.agent_logs[region]).unwrap_or_default())
    }

    pub fn agent_log_tail(&self, region: usize) -> String {
        crate::witness_proc::tail(&self.agent_logs[region], 25)
    }

    /// Both agents' log tails, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- agent region-a:\n{}\n--- agent region-b:\n{}\n--- pg region-a:\n{}\n--- pg region-b:\n{}",
            self.agent_log_tail(0),
            self.agent_log_tail(1),
            self.pg[0].log_tail(),
            self.pg[1].log_tail()
        )
    }

    async fn wait_steady(&self, bound: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let recorded = self.events(0).iter().any(|e| {
                e.action == "update_meta"
                    && e.message == "failover action applied"
                    && e.detail.contains(REGIONS[1])
            });
            if recorded && self.pg[0].accepts_write().await {
                return Ok(());
            }
            if start.elapsed() > bound {
                bail!(
                    "region-a never became a steady primary with region-b recorded:\n{}",
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An Instant on the wall clock the agents log with.
    pub fn wall(&self, t: Instant) -> SystemTime {
        match t.checked_duration_since(self.anchor.0) {
            Some(d) => self.anchor.1 + d,
            None => self.anchor.1 - self.anchor.0.duration_since(t),
        }
    }

    /// The first time `region`'s agent logged an applied `action`.
    pub fn first_applied(&self, region: usize, action: &str) -> Option<SystemTime> {
        self.events(region)
            .iter()
            .filter(|e| e.action == action && e.message == "failover action applied")
            .map(|e| e.at)
            .min()
    }

    /// Starts the writer (preferring A) and the state poller.
    pub fn start_load(&self, first_id: i64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let conninfos: Vec<String> = self.pg.iter().map(|p| p.conninfo()).collect();
        // Several concurrent writers (disjoint id ranges): more acknowledged
        // commits per millisecond, so a short overlap cannot hide.
        let writers = (0..WRITERS)
            .map(|k| {
                tokio::spawn(writer::run(
                    conninfos.clone(),
                    0,
                    first_id + k as i64 * 1_000_000_000,
                    stop.clone(),
                ))
            })
            .collect();
        let states = Arc::new(Mutex::new(Vec::new()));
        let poller = {
            let stop = stop.clone();
            let states = states.clone();
            let pgs = conninfos;
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for (region, conninfo) in pgs.iter().enumerate() {
                        let s = poll_state(conninfo).await;
                        if let Some((in_recovery, fenced)) = s {
                            states
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Sample {
                                    at: Instant::now(),
                                    region,
                                    in_recovery,
                                    fenced,
                                });
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        Load {
            stop,
            writers,
            poller,
            states,
        }
    }
}

async fn poll_state(conninfo: &str) -> Option<(bool, bool)> {
    let q = async {
        let c = continuum_shared::pg::backend::connect(conninfo)
            .await
            .ok()?;
        let r = c
            .query_one(
                "SELECT pg_is_in_recovery(), current_setting('synchronous_standby_names'), \
                 current_setting('default_transaction_read_only')",
                &[],
            )
            .await
            .ok()?;
        let names: String = r.get(1);
        let ro: String = r.get(2);
        Some((r.get::<_, bool>(0), is_fenced(&names, &ro)))
    };
    tokio::time::timeout(Duration::from_millis(300), q)
        .await
        .ok()
        .flatten()
}

/// One observation of a region's database by the poller.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub region: usize,
    pub in_recovery: bool,
    pub fenced: bool,
}

/// The writer and poller of one case.
pub struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<WriterLog>>,
    poller: tokio::task::JoinHandle<()>,
    states: Arc<Mutex<Vec<Sample>>>,
}

impl Load {
    /// Acknowledgements so far are not visible until [`Load::finish`];
    /// samples are.
    pub fn samples(&self) -> Vec<Sample> {
        self.states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub async fn finish(self) -> Result<(WriterLog, Vec<Sample>)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut log = WriterLog::default();
        for w in self.writers {
            let one = w.await.context("writer task")?;
            log.acks.extend(one.acks);
            log.attempts += one.attempts;
            log.failures += one.failures;
        }
        log.acks.sort_by_key(|a| a.at);
        self.poller.await.context("poller task")?;
        let samples = self
            .states
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok((log, samples))
    }
}

/// First sample at or after `from` where `pred` holds for `region`.
pub fn first_sample(
    samples: &[Sample],
    region: usize,
    from: Instant,
    pred: impl Fn(&Sample) -> bool,
) -> Option<Instant> {
    samples
        .iter()
        .filter(|s| s.region == region && s.at >= from && pred(s))
        .map(|s| s.at)
        .min()
}

/// What the checker found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    pub acked: usize,
    /// Acknowledged ids missing on the survivor.
    pub lost: Vec<i64>,
    /// Ids the old primary acknowledged at or after the takeover.
    pub overlap: Vec<i64>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.overlap.is_empty()
    }
}

/// One acknowledged write on the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallAck {
    pub id: i64,
    pub region: usize,
    pub at: SystemTime,
}

/// The checker. `present` holds which acknowledged ids the survivor has;
/// `takeover` is when the other region (`1 - old`) first held the lease or
/// acknowledged a write, whichever came first (None: it never did).
pub fn check(
    acks: &[WallAck],
    present: &HashSet<i64>,
    old: usize,
    takeover: Option<SystemTime>,
) -> Verdict {
    let lost = acks
        .iter()
        .filter(|a| !present.contains(&a.id))
        .map(|a| a.id)
        .collect();
    let overlap = match takeover {
        Some(t) => acks
            .iter()
            .filter(|a| a.region == old && a.at >= t)
            .map(|a| a.id)
            .collect(),
        None => Vec::new(),
    };
    Verdict {
        acked: acks.len(),
        lost,
        overlap,
    }
}

/// The outcome of one case.
#[derive(Debug)]
pub struct CaseReport {
    pub verdict: Verdict,
    /// The survivor (whose data the loss check used).
    pub survivor: usize,
    /// Since the fault: A seen fenced by the poller.
    pub a_fenced_ms: Option<f64>,
    /// Since the fault: A's agent logged its fence (its own clock; skewed
    /// when that clock is made to drift).
    pub a_fence_logged_ms: Option<f64>,
    /// Since the fault: B's agent logged its lease acquisition.
    pub b_acquired_ms: Option<f64>,
    /// Since the fault: B seen out of recovery by the poller.
    pub b_promoted_ms: Option<f64>,
    pub acks_a_after_fault: usize,
    pub acks_b: usize,
}

impl Cluster {
    /// Stops the load, decides the survivor, runs the checker.
    pub async fn evaluate(&self, load: Load, fault_at: Instant) -> Result<CaseReport> {
        let (log, samples) = load.finish().await?;
        let b_primary = matches!(self.pg[1].state().await, Some((false, _)));
        let survivor = if b_primary { 1 } else { 0 };
        let ids: Vec<i64> = log.acks.iter().map(|a| a.id).collect();
        let present = self.pg[survivor]
            .present(&ids)
            .await
            .with_context(|| format!("read the survivor {}", REGIONS[survivor]))?;
        let acks: Vec<WallAck> = log
            .acks
            .iter()
            .map(|a| WallAck {
                id: a.id,
                region: a.region,
                at: self.wall(a.at),
            })
            .collect();
        let b_acquired = self.first_applied(1, "acquire");
        let b_first_ack = acks.iter().filter(|a| a.region == 1).map(|a| a.at).min();
        let takeover = match (b_acquired, b_first_ack) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        let verdict = check(&acks, &present, 0, takeover);
        let fault_wall = self.wall(fault_at);
        let ms_wall = |t: Option<SystemTime>| {
            t.map(|t| match t.duration_since(fault_wall) {
                Ok(d) => d.as_secs_f64() * 1000.0,
                Err(e) => -(e.duration().as_secs_f64() * 1000.0),
            })
        };
        let ms = |t: Option<Instant>| t.map(|t| t.duration_since(fault_at).as_secs_f64() * 1000.0);
        Ok(CaseReport {
            survivor,
            a_fenced_ms: ms(first_sample(&samples, 0, fault_at, |s| {
                !s.in_recovery && s.fenced
            })),
            a_fence_logged_ms: ms_wall(
                self.events(0)
                    .iter()
                    .filter(|e| e.action == "fence" && e.at >= fault_wall)
                    .map(|e| e.at)
                    .min(),
            ),
            b_acquired_ms: ms_wall(b_acquired),
            b_promoted_ms: ms(first_sample(&samples, 1, fault_at, |s| !s.in_recovery)),
            acks_a_after_fault: log
                .acks
                .iter()
                .filter(|a| a.region == 0 && a.at > fault_at)
                .count(),
            acks_b: log.acks.iter().filter(|a| a.region == 1).count(),
            verdict,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn checker_flags_loss_and_overlap() {
        let acks = [
            WallAck {
                id: 1,
                region: 0,
                at: t(10),
            },
            WallAck {
                id: 2,
                region: 0,
                at: t(20),
            },
            WallAck {
                id: 3,
                region: 1,
                at: t(30),
            },
        ];
        let all: HashSet<i64> = [1, 2, 3].into();
        assert!(check(&acks, &all, 0, Some(t(25))).ok());
        assert!(check(&acks, &all, 0, None).ok());
        let v = check(&acks, &all, 0, Some(t(20)));
        assert_eq!(v.overlap, vec![2]);
        let v = check(&acks, &[1, 3].into(), 0, Some(t(25)));
        assert_eq!(v.lost, vec![2]);
        assert!(v.overlap.is_empty());
    }

    #[test]
    fn parses_agent_json_lines() {
        let text = r#"{"timestamp":"2026-11-21T23:40:01.250000Z","level":"INFO","fields":{"message":"failover action applied","action":"acquire","action":"Acquire { reason: \"x\" }","detail":"x; holding epoch 2"},"target":"a"}
not json
{"timestamp":"2026-11-21T23:40:02Z","level":"WARN","fields":{"message":"fencing the database","action":"fence"},"target":"a"}"#;
        let ev = parse_agent_log(text);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].action, "acquire");
        assert_eq!(
            action_label("UpdateMeta { sync_standby: None }"),
            "update_meta"
        );
        assert_eq!(action_label("fence"), "fence");
        assert_eq!(ev[1].message, "fencing the database");
        assert_eq!(
            ev[1].at.duration_since(ev[0].at).unwrap(),
            Duration::from_millis(750)
        );
    }
}
