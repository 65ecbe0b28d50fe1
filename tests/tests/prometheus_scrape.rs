//! Real scrape: Debian's Prometheus scrapes a witness process and every
//! in-cluster agent mode (`run`, `continuum`, `node-pivot`,
//! `pivot watch-sources`, each its own process against the test API server
//! with the shipped ClusterRoles), and the test reads the expected series
//! back through Prometheus's HTTP API. `promtool check metrics` must accept
//! every `/metrics` body.
//!
//! Needs /usr/bin/prometheus and /usr/bin/promtool (Debian package
//! `prometheus`); skips with a message when they are missing.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use continuum_shared::lease::{Acquire, Epoch, HolderId, LeaseName, Request, Response};
use continuum_testapi::resources::ResourceSpec;
use continuum_testapi::{rbac, Options, TestApi};
use continuum_tests::bins::workspace_bin;
use continuum_tests::prometheus_proc::{repo_root, PrometheusProc, ScrapeJob};
use continuum_tests::witness_proc::{free_port, http_get, tail, WitnessOpts, WitnessProc};

/// A process killed on drop, its output in a log file.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
    health: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(
        name: &'static str,
        dir: &Path,
        args: &[String],
        env: &[(&str, String)],
        health: SocketAddr,
    ) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(workspace_bin("continuum-agent").expect("agent binary"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CONTINUUM_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn agent");
        Proc {
            name,
            child,
            log,
            health,
        }
    }

    /// Waits until `/metrics` answers 200 (30 s at most).
    fn wait_metrics(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, body)) = http_get(self.health, "/metrics") {
                return body;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status}:\n{}",
                    self.name,
                    tail(&self.log, 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} serves no /metrics after 30 s:\n{}",
                self.name,
                tail(&self.log, 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn addr() -> SocketAddr {
    ([127, 0, 0, 1], free_port().expect("port")).into()
}

/// `promtool check metrics` on one exposition body (stdin).
fn promtool_check_metrics(what: &str, body: &str) {
    let mut child = Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics rejects {what}:\n{}{}\n--- body ---\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The union of the shipped ClusterRoles' rules (manifests/rbac/*.yaml): the
/// agent processes run with exactly what the manifests grant.
fn shipped_rules() -> Vec<continuum_testapi::rbac::PolicyRule> {
    let dir = repo_root().join("manifests/rbac");
    let mut rules = Vec::new();
    for e in std::fs::read_dir(&dir).expect("rbac dir") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "yaml")
            && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            rules.extend(rbac::rules_from_file(&p).expect("ClusterRole rules"));
        }
    }
    rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_agent_and_witness_and_promtool_accepts_their_metrics() {
    for bin in ["/usr/bin/prometheus", "/usr/bin/promtool"] {
        if !Path::new(bin).exists() {
            continuum_tests::skip::skip(
                "Prometheus scrape",
                &format!("{bin} missing (Debian package prometheus)"),
            );
            return;
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");

    // The test API server, with the shipped roles for the agent's token.
    let srv = TestApi::start_with(Options {
        rules: Some(shipped_rules()),
        ..Options::default()
    })
    .await
    .expect("test API server");
    srv.register(ResourceSpec::new(
        "dr.openova.io",
        "v1",
        "continuums",
        "Continuum",
        true,
        true,
    ));
    for (plural, kind) in [
        ("helmrepositories", "HelmRepository"),
        ("ocirepositories", "OCIRepository"),
        ("gitrepositories", "GitRepository"),
        ("helmcharts", "HelmChart"),
    ] {
        srv.register(ResourceSpec::new(
            "source.toolkit.fluxcd.io",
            "v1",
            plural,
            kind,
            true,
            true,
        ));
    }
    let url = srv.url();
    // `continuum` reads a kubeconfig (it has no --kube-url).
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {url}\n\
             users:\n- name: agent\n  user:\n    token: agent\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: agent\n\
             current-context: t\n"
        ),
    )
    .expect("kubeconfig");
    let kube = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--kube-url".into(),
            url.clone(),
            "--kube-token".into(),
            "agent".into(),
        ]);
        v
    };

    let (run_h, cont_h, node_h, src_h) = (addr(), addr(), addr(), addr());
    let s = |a: SocketAddr| a.to_string();
    let mut procs = [
        Proc::spawn(
            "agent-run",
            dir.path(),
            &[
                kube(&["run"]),
                vec![
                    "--health-addr".into(),
                    s(run_h),
                    "--identity".into(),
                    "scrape-run".into(),
                ],
            ]
            .concat(),
            &[],
            run_h,
        ),
        Proc::spawn(
            "agent-continuum",
            dir.path(),
            &[
                "continuum".into(),
                "--region".into(),
                "eu-1".into(),
                "--health-listen".into(),
                s(cont_h),
                "--identity".into(),
                "scrape-continuum".into(),
            ],
            &[("KUBECONFIG", kubeconfig.display().to_string())],
            cont_h,
        ),
        Proc::spawn(
            "agent-node-pivot",
            dir.path(),
            &[
                kube(&["node-pivot"]),
                vec![
                    "--node-name".into(),
                    "node-1".into(),
                    "--registries-file".into(),
                    dir.path().join("registries.yaml").display().to_string(),
                    "--mirror-map".into(),
                    dir.path().join("mirror-map.yaml").display().to_string(),
                    "--health-addr".into(),
                    s(node_h),
                ],
            ]
            .concat(),
            &[],
            node_h,
        ),
        Proc::spawn(
            "agent-source-pivot",
            dir.path(),
            &[
                vec!["pivot".into()],
                kube(&["watch-sources"]),
                vec![
                    "--local-hosts".into(),
                    ".t42.omani.works".into(),
                    "--health-addr".into(),
                    s(src_h),
                ],
            ]
            .concat(),
            &[],
            src_h,
        ),
    ];
    for p in procs.iter_mut() {
        p.wait_metrics();
    }

    // A witness with one granted lease, so its per-lease series exist.
    let witness = WitnessProc::start(WitnessOpts::default()).expect("witness");
    let (status, resp) = witness
        .client()
        .expect("witness client")
        .send(&Request::Acquire(Acquire {
            name: LeaseName::new("continuum/db/app").expect("lease name"),
            holder: HolderId::new("eu-1").expect("holder"),
            epoch: Epoch(1),
            ttl_ms: 60_000,
        }))
        .await
        .expect("acquire");
    assert_eq!(status, 200, "{resp:?}");
    assert!(matches!(resp, Response::Granted { .. }), "{resp:?}");

    let mut jobs: Vec<ScrapeJob> = procs
        .iter()
        .map(|p| ScrapeJob::new(p.name, p.health.to_string()))
        .collect();
    jobs.push(ScrapeJob::new("witness", witness.health_addr().to_string()));
    let prom = PrometheusProc::start(&jobs).expect("prometheus");

    // Expected series, read back through the HTTP API: (query, job, value).
    let expected: &[(&str, &str, f64)] = &[
        ("up", "agent-run", 1.0),
        ("up", "agent-continuum", 1.0),
        ("up", "agent-node-pivot", 1.0),
        ("up", "agent-source-pivot", 1.0),
        ("up", "witness", 1.0),
        ("continuum_agent_leader", "agent-run", 1.0),
        ("continuum_hr_recovery_guardrail_tripped", "agent-run", 0.0),
        ("continuum_flux_guard_blocked", "agent-run", 0.0),
        (
            "continuum_failover_controller_leader",
            "agent-continuum",
            1.0,
        ),
        (
            "continuum_node_pivot_restart_needed",
            "agent-node-pivot",
            0.0,
        ),
        ("continuum_witness_grants_total", "witness", 1.0),
        (
            "continuum_witness_lease_epoch{lease=\"continuum/db/app\"}",
            "witness",
            1.0,
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut missing: Vec<String>;
    loop {
        missing = Vec::new();
        for (q, job, want) in expected {
            let query = if let Some(open) = q.strip_suffix('}') {
                format!("{open}, job=\"{job}\"}}")
            } else {
                format!("{q}{{job=\"{job}\"}}")
            };
            let got: Vec<f64> = prom
                .query(&query)
                .expect("query")
                .iter()
                .filter_map(|r| r["value"][1].as_str().and_then(|v| v.parse().ok()))
                .collect();
            if got != [*want] {
                missing.push(format!("{query} = {got:?}, want {want}"));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        missing.is_empty(),
        "series not as expected after 45 s:\n{}\nprometheus log:\n{}",
        missing.join("\n"),
        prom.log_tail()
    );

    // Every series Prometheus stored for a job, as a sanity check that it
    // ingested whole bodies (not just `up`).
    let stored = prom
        .query("count by (job) ({__name__=~\"continuum_.+\"})")
        .expect("count");
    assert_eq!(
        stored.len(),
        jobs.len(),
        "jobs with continuum_ series: {stored:?}"
    );

    // promtool accepts each /metrics body.
    for p in procs.iter_mut() {
        let body = p.wait_metrics();
        promtool_check_metrics(p.name, &body);
    }
    let body = witness.metrics().expect("witness metrics");
    promtool_check_metrics("witness", &body);
}
