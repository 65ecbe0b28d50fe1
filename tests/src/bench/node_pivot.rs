//! `bench node-pivot`: `continuum-agent node-pivot` (the DaemonSet, with the
//! args of manifests/base/node-pivot.yaml; only its file paths and health
//! listener are the bench's) as a separate process against the test API
//! server (served from this process) loaded with manifests/rbac/node-pivot.yaml.
//!
//! Figures: CPU per second over an idle window before the cutover (the status
//! ConfigMap watched, its key empty: what every node does almost always),
//! then the burst of a cutover flipped back and forth: the status key set to
//! v2 and v1 alternately `CONTINUUM_BENCH_FLIPS` times (default 20), each flip
//! waited for until the rendered registries.yaml is on disk and the node's
//! annotation and report ConfigMap say so: CPU-seconds per flip, the average
//! and the highest rate over a 100 ms window; RSS. Printed next to the
//! manifest's requests and limits.

use std::time::Duration;

use anyhow::Context;
use continuum_agent::node_pivot::render::render_text;
use continuum_agent::node_pivot::{self as np};
use continuum_testapi::TestApi;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use super::manifest;
use super::procstat::{self, AgentProc, CpuMark};

const NS: &str = "catalyst-system";
const NODE: &str = "node-a";
const REPORT: &str = "continuum-node-pivot-status";

/// A mirror map like a Sovereign's: five upstream registries through Harbor.
const MAP: &str = r#"
harborFqdn: bench.example.org
mirrors:
  docker.io: { project: proxy-docker.io }
  ghcr.io: { project: proxy-ghcr.io }
  quay.io: { project: proxy-quay.io }
  registry.k8s.io: { project: proxy-registry.k8s.io }
  gcr.io: { project: proxy-gcr.io }
configs:
  harbor.bench.example.org:
    auth: { usernameKey: username, passwordKey: password }
"#;

const V1: &str = "mirrors:\n  docker.io:\n    endpoint:\n    - https://harbor.openova.io\n";

fn flips() -> usize {
    std::env::var("CONTINUUM_BENCH_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

pub async fn run(json_out: bool) -> anyhow::Result<()> {
    let reference = manifest::container(
        "manifests/base/node-pivot.yaml",
        "DaemonSet",
        "continuum-node-pivot",
        "node-pivot",
    )?;
    let idle_s = procstat::idle_s(60);
    // Built (under cargo) and found before anything is timed.
    crate::bins::workspace_bin("continuum-agent")?;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let srv = TestApi::start_with_role(&root.join("manifests/rbac/node-pivot.yaml")).await?;
    let admin = srv.admin_client()?;
    Api::<Node>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NODE}}))?,
        )
        .await?;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": np::DEFAULT_STATUS_CONFIGMAP, "namespace": NS},
            "data": {"cutoverComplete": "false", np::DEFAULT_STATUS_KEY: ""},
        }))?,
    )
    .await?;

    let dir = tempfile::tempdir()?;
    let target = dir.path().join("registries.yaml");
    std::fs::write(&target, V1)?;
    let map = dir.path().join("mirror-map.yaml");
    std::fs::write(&map, MAP)?;
    let secret_dir = dir.path().join("secret");
    std::fs::create_dir(&secret_dir)?;
    std::fs::write(secret_dir.join("username"), "robot$pull\n")?;
    std::fs::write(secret_dir.join("password"), "pw")?;
    let secrets: std::collections::BTreeMap<String, String> =
        [("username", "robot$pull"), ("password", "pw")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let v2 = render_text(MAP, &secrets).context("render the bench's mirror map")?;

    let health = procstat::loopback_addr()?;
    let mut args = reference.args_without(&[
        "--health-addr",
        "--registries-file",
        "--mirror-map",
        "--secret-dir",
    ]);
    args.extend([
        format!("--health-addr={health}"),
        format!("--registries-file={}", target.display()),
        format!("--mirror-map={}", map.display()),
        format!("--secret-dir={}", secret_dir.display()),
        format!("--kube-url={}", srv.url()),
        "--kube-token=agent".into(),
    ]);
    let started = std::time::Instant::now();
    let mut agent = AgentProc::spawn(
        dir.path(),
        "node-pivot",
        &args,
        &[("CONTINUUM_NODE_NAME", NODE.to_string())],
    )?;
    agent.wait_metrics(health).await?;
    let startup_s = started.elapsed().as_secs_f64();
    let startup_cpu = procstat::cpu_s(agent.pid()).unwrap_or(f64::NAN);
    // Let the initial list and watch settle before the idle window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = procstat::idle(&[agent.pid()], idle_s).await[0];
    agent.ensure_running()?;
    anyhow::ensure!(
        std::fs::read_to_string(&target)? == V1,
        "registries.yaml changed before the cutover"
    );
    let mem_idle = procstat::mem(agent.pid());

    // The cutover, flipped back and forth.
    let burst = CpuMark::new(&[agent.pid()]);
    agent.reset_peak();
    let mut per_flip_ms = Vec::new();
    for i in 0..flips() {
        let (version, content) = if i % 2 == 0 {
            ("v2", v2.as_str())
        } else {
            ("v1", V1)
        };
        cms.patch(
            np::DEFAULT_STATUS_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(&json!({"data": {np::DEFAULT_STATUS_KEY: version}})),
        )
        .await?;
        let took = agent
            .wait_for(
                &format!("flip {i} to {version}"),
                Duration::from_secs(30),
                || {
                    std::fs::read_to_string(&target).ok().as_deref() == Some(content)
                        && srv.object("", "nodes", "", NODE).is_some_and(|n| {
                            n["metadata"]["annotations"][np::ANNOTATION_VERSION] == version
                        })
                        && srv
                            .object("", "configmaps", NS, REPORT)
                            .and_then(|cm| cm["data"][NODE].as_str().map(String::from))
                            .and_then(|r| serde_json::from_str::<Value>(&r).ok())
                            .is_some_and(|r| r["version"] == version)
                },
            )
            .await?;
        per_flip_ms.push(took.as_secs_f64() * 1000.0);
    }
    let burst = burst.span()[0];
    let peak = agent.peak_mcores();
    let mem = procstat::mem(agent.pid());
    let forbidden = srv.requests().iter().filter(|r| r.code == 403).count();
    drop(agent);
    per_flip_ms.sort_by(f64::total_cmp);
    let n = per_flip_ms.len().max(1) as f64;
    let flip_p50 = per_flip_ms
        .get(per_flip_ms.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    let flip_max = per_flip_ms.last().copied().unwrap_or(f64::NAN);

    if json_out {
        println!(
            "{}",
            json!({
                "bench": "node-pivot", "reference": reference.json(), "machine": "shared 2-core",
                "startup_s": startup_s, "cpu_startup_s": startup_cpu,
                "idle_window_s": idle_s, "cpu_idle_mcores": idle.mcores(),
                "rss_idle_mib": mem_idle.rss_mib,
                "flips": per_flip_ms.len(), "flip_p50_ms": flip_p50, "flip_max_ms": flip_max,
                "cpu_burst_s": burst.cpu_s, "burst_wall_s": burst.wall_s, "cpu_per_flip_s": burst.cpu_s / n,
                "cpu_burst_mcores": burst.mcores(), "cpu_burst_peak_100ms_mcores": peak,
                "rss_mib": mem.rss_mib, "rss_peak_mib": mem.peak_mib, "forbidden_requests": forbidden,
            })
        );
        return Ok(());
    }
    println!("node-pivot: `continuum-agent node-pivot` (args of {}) as a separate process against the test API server; shared 2-core machine", reference.manifest);
    println!("  reference: {}", reference.line());
    println!("  start to /metrics: {startup_s:.2} s, {startup_cpu:.2} CPU-s");
    println!(
        "  idle before the cutover ({idle_s} s, status ConfigMap watched): {:.2} millicores, RSS {:.1} MiB",
        idle.mcores(),
        mem_idle.rss_mib
    );
    println!(
        "  cutover burst: {} flips v2/v1 (write + annotation + report each), p50 {flip_p50:.0} ms, max {flip_max:.0} ms; {:.3} CPU-s ({:.4} per flip) over {:.1} s = {:.1} millicores average, peak {peak:.0} m over 100 ms",
        per_flip_ms.len(),
        burst.cpu_s,
        burst.cpu_s / n,
        burst.wall_s,
        burst.mcores()
    );
    println!(
        "  RSS after: {:.1} MiB, peak {:.1} MiB; 403 answers: {forbidden}",
        mem.rss_mib, mem.peak_mib
    );
    let [cpu, mem] = reference.compare(idle.mcores(), peak, mem);
    println!("  vs manifest (burst = peak over 100 ms):");
    println!("    {cpu}");
    println!("    {mem}");
    Ok(())
}
