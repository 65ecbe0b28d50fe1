//! `bench hr-recovery`: 2,000 HelmReleases in the test API server (served from
//! this process), the agent as a separate `continuum-agent run` process.
//!
//! Figures: time from agent start to every HelmRelease reconciled once (full
//! sync), reaction latency from the exact threshold deadline to the corrected
//! status arriving on a watch (p50/p99/max over the stuck HelmReleases), the
//! agent's RSS (VmRSS and peak VmHWM from /proc; target: rss <= 30 MB) and its
//! CPU time (utime + stime from /proc/<pid>/stat): spent until the full sync,
//! during the burst of corrections, and per second while idle afterwards
//! (watching every HelmRelease, renewing its leader Lease): the basis of the
//! Deployment's CPU request and limit.
//!
//! The agent binary is looked up next to this executable (`target/<profile>/
//! continuum-agent`, override with `CONTINUUM_AGENT_BIN`); if missing it is built
//! with cargo in the same profile.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use continuum_testapi::TestApi;
use futures::{StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

use super::procstat::{cpu_s, rss_kb};

/// Idle window after the corrections (override with `CONTINUUM_BENCH_IDLE_S`).
fn idle_s() -> u64 {
    super::procstat::idle_s(60)
}

/// HelmReleases in the server (override with `CONTINUUM_BENCH_HRS`, e.g. 0 for the agent's baseline RSS).
fn total() -> usize {
    std::env::var("CONTINUUM_BENCH_HRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn stuck() -> usize {
    total() / 10
}
const THRESHOLD_S: i64 = 3;

fn agent_bin() -> anyhow::Result<PathBuf> {
    crate::bins::workspace_bin("continuum-agent")
}

fn ts(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// CPU figures of one run, in CPU seconds and millicores (1000 = one core).
struct Cpu {
    sync_s: f64,
    burst_s: f64,
    burst_mcores: f64,
    idle_mcores: f64,
}

async fn metrics_text(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    Some(buf)
}

fn reconciles(text: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with("continuum_hr_recovery_reconcile_duration_seconds_count"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The agent answers /metrics only once it is up; with 0 HelmReleases that is the sync point.
fn metrics_ready(text: &str) -> bool {
    text.contains("continuum_agent_leader 1")
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn run(json_out: bool) -> anyhow::Result<()> {
    let role = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/rbac/hr-recovery.yaml");
    let srv = TestApi::start_with_role(&role).await?;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("helm.toolkit.fluxcd.io", "v2", "HelmRelease"),
        "helmreleases",
    );
    let admin = srv.admin_client()?;

    // 2,000 healthy HelmReleases in 20 namespaces, each with a realistic status.
    let seed_start = Instant::now();
    for i in 0..total() {
        let ns = format!("team-{}", i % 20);
        let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &ar);
        let name = format!("release-{i}");
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "bench"}},
            "spec": {"interval": "10m", "timeout": "5m", "chart": {"spec": {"chart": "podinfo", "version": "6.x",
                "sourceRef": {"kind": "HelmRepository", "name": "podinfo", "namespace": "flux-system"}}}},
        }))?;
        api.create(&PostParams::default(), &obj).await?;
        let status = json!({"status": {
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "InstallSucceeded", "message": "Helm install succeeded", "lastTransitionTime": ts(Timestamp::now())}],
            "history": [{"status": "deployed", "version": 1, "name": name, "namespace": ns, "chartName": "podinfo", "chartVersion": "6.5.0"}],
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    let seed_s = seed_start.elapsed().as_secs_f64();

    // The agent, as its own process, against this server.
    let bin = agent_bin()?;
    let health = format!("127.0.0.1:{}", free_port()?);
    let started = Instant::now();
    let mut child = Command::new(&bin)
        .args([
            "--log-format",
            "json",
            "run",
            "--kube-url",
            &srv.url(),
            "--kube-token",
            "agent",
        ])
        .args([
            "--hr-threshold",
            &format!("{THRESHOLD_S}s"),
            "--hr-max-actions",
            "100000",
            "--health-addr",
            &health,
        ])
        .args(["--lease-duration", "15s", "--identity", "bench-agent"])
        // The recovery controller alone: the bench cluster has no Flux and
        // grants only the hr-recovery role (the guard would meet 403s).
        .arg("--flux-guard-disabled")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let pid = child.id();
    let result = measure(&srv, &admin, &ar, &health, started, pid).await;
    // Idle: every HelmRelease watched and corrected, nothing changing.
    let idle = if result.is_ok() {
        let (c0, t0) = (cpu_s(pid), Instant::now());
        tokio::time::sleep(Duration::from_secs(idle_s())).await;
        c0.zip(cpu_s(pid))
            .map(|(a, b)| (b - a) / t0.elapsed().as_secs_f64() * 1000.0)
    } else {
        None
    };
    let rss = rss_kb(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let hwm = rss_kb(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
    let _ = child.kill();
    let _ = child.wait();
    let (sync_ms, mut lat, forbidden, mut cpu) = result?;
    cpu.idle_mcores = idle.unwrap_or(f64::NAN);
    lat.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99, max) = (
        pct(&lat, 50.0),
        pct(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN),
    );
    if json_out {
        println!(
            "{}",
            json!({
                "bench": "hr-recovery", "helmreleases": total(), "stuck": lat.len(), "threshold_s": THRESHOLD_S,
                "seed_s": seed_s, "full_sync_ms": sync_ms,
                "reaction_p50_ms": p50, "reaction_p99_ms": p99, "reaction_max_ms": max,
                "rss_mb": rss, "rss_peak_mb": hwm, "rss_target_mb": 30, "forbidden_requests": forbidden,
                "cpu_sync_s": cpu.sync_s, "cpu_burst_s": cpu.burst_s, "cpu_burst_mcores": cpu.burst_mcores,
                "cpu_idle_mcores": cpu.idle_mcores, "idle_window_s": idle_s(),
            })
        );
    } else {
        println!("hr-recovery: {} HelmReleases ({} made stuck after sync), threshold {THRESHOLD_S}s, agent as a separate process", total(), stuck());
        println!("  seed (test API server, admin client): {seed_s:.2} s");
        println!(
            "  time to full sync (agent start -> {} reconciled): {sync_ms:.0} ms",
            total()
        );
        println!("  reaction after threshold: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms  (target < 1000 ms)");
        println!("  agent RSS: {rss:.1} MB now, {hwm:.1} MB peak  (target <= 30 MB)");
        println!(
            "  agent CPU: {:.2} s to full sync, {:.2} s for the corrections ({:.0} millicores over the burst), {:.2} millicores idle ({} s window)",
            cpu.sync_s, cpu.burst_s, cpu.burst_mcores, cpu.idle_mcores, idle_s()
        );
        println!("  403 answers to the agent: {forbidden}");
    }
    Ok(())
}

async fn measure(
    srv: &TestApi,
    admin: &kube::Client,
    ar: &ApiResource,
    health: &str,
    started: Instant,
    pid: u32,
) -> anyhow::Result<(f64, Vec<f64>, usize, Cpu)> {
    // Full sync: every HelmRelease reconciled once.
    let sync_ms = loop {
        if let Some(text) = metrics_text(health).await {
            if reconciles(&text) >= total() as u64 && metrics_ready(&text) {
                break started.elapsed().as_secs_f64() * 1000.0;
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "agent did not sync within 120 s"
        );
        anyhow::ensure!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "agent exited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let cpu_sync = cpu_s(pid).unwrap_or(f64::NAN);
    // The burst: a tenth made stuck, the threshold, every correction.
    let burst_start = Instant::now();

    // Watch all HelmReleases and note when each correction arrives.
    let all: Api<DynamicObject> = Api::all_with(admin.clone(), ar);
    let rv = srv.resource_version().to_string();
    let mut stream = all
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await?
        .boxed();
    // Make a tenth of the HelmReleases stuck now, spread over ~2 s so deadlines do not coincide.
    let mut deadlines = std::collections::HashMap::new();
    for i in 0..stuck() {
        let idx = i * (total() / stuck().max(1));
        let ns = format!("team-{}", idx % 20);
        let name = format!("release-{idx}");
        let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, ar);
        let since = Timestamp::now();
        let since_s = Timestamp::from_second(since.as_second())?;
        let status = json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown", "reason": "Progressing",
            "message": "Running 'upgrade' action", "lastTransitionTime": ts(since_s)}]}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        deadlines.insert(
            format!("{ns}/{name}"),
            since_s + SignedDuration::from_secs(THRESHOLD_S),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut lat = Vec::new();
    let until = Instant::now() + Duration::from_secs(THRESHOLD_S as u64 + 30);
    while lat.len() < stuck() && Instant::now() < until {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.try_next()).await;
        let Ok(Ok(Some(WatchEvent::Modified(o)))) = ev else {
            if matches!(ev, Ok(Ok(None)) | Err(_)) {
                break;
            }
            continue;
        };
        let now = Timestamp::now();
        let ready_true = o
            .data
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "Ready"
                        && c["status"] == "True"
                        && c["reason"] == "ReconciliationSucceeded"
                })
            });
        let key = format!(
            "{}/{}",
            o.metadata.namespace.clone().unwrap_or_default(),
            o.metadata.name.clone().unwrap_or_default()
        );
        if ready_true {
            if let Some(d) = deadlines.remove(&key) {
                lat.push(now.duration_since(d).as_secs_f64() * 1000.0);
            }
        }
    }
    anyhow::ensure!(
        lat.len() == stuck(),
        "only {} of {} stuck HelmReleases were corrected",
        lat.len(),
        stuck()
    );
    let burst_s = cpu_s(pid).unwrap_or(f64::NAN) - cpu_sync;
    let cpu = Cpu {
        sync_s: cpu_sync,
        burst_s,
        burst_mcores: burst_s / burst_start.elapsed().as_secs_f64() * 1000.0,
        idle_mcores: f64::NAN,
    };
    let forbidden = srv.requests().iter().filter(|r| r.code == 403).count();
    Ok((sync_ms, lat, forbidden, cpu))
}
