//! Registry pivot (seed 002 steps 04 and 06): renderer + atomic writer on real
//! file systems (tmpfs for disk-full and read-only when root), the node pivot
//! against the strict test API server with manifests/rbac/node-pivot.yaml, the
//! source watcher with manifests/rbac/source-pivot.yaml, and `pivot sources`
//! against a local bare repository with the real git CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use continuum_agent::node_pivot::controller::{NodePivot, NodePivotOptions};
use continuum_agent::node_pivot::render::{self, render_text};
use continuum_agent::node_pivot::writer::{self, WriteOutcome};
use continuum_agent::node_pivot::{self as np, Paths};
use continuum_agent::source_pivot::git::{self, GitPivotArgs, GitPivotError};
use continuum_agent::source_pivot::watch::{self as sw, SourceWatch};
use continuum_agent::source_pivot::LocalHosts;
use continuum_testapi::{rbac, PolicyRule, RequestRecord, ResourceSpec, TestApi};
use continuum_tests::rbac_proof;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

const MAP: &str = r#"
harborFqdn: otech116.omani.works
mirrors:
  docker.io: { project: proxy-docker.io }
  ghcr.io: { project: proxy-ghcr.io }
  quay.io: { project: proxy-quay.io }
  registry.k8s.io: { project: proxy-registry.k8s.io }
  gcr.io: { project: proxy-gcr.io }
configs:
  harbor.otech116.omani.works:
    auth: { usernameKey: username, passwordKey: password }
"#;

fn secrets() -> BTreeMap<String, String> {
    [("username", "robot$pull"), ("password", "pw")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn dir_names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn render_then_write_is_idempotent_with_backup() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("registries.yaml");
    std::fs::write(&target, "mirrors: {}\n").unwrap();
    let v2 = render_text(MAP, &secrets()).unwrap();
    for host in [
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "gcr.io",
    ] {
        assert!(
            v2.contains(&format!(
                "  {host}:\n    endpoint:\n    - https://harbor.otech116.omani.works\n"
            )),
            "{host} missing:\n{v2}"
        );
    }
    assert_eq!(
        writer::write_with_backup(&target, v2.as_bytes()).unwrap(),
        WriteOutcome::Written
    );
    let mtime = std::fs::metadata(&target).unwrap().modified().unwrap();
    assert_eq!(
        writer::write_with_backup(&target, v2.as_bytes()).unwrap(),
        WriteOutcome::Unchanged
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().modified().unwrap(),
        mtime
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), v2);
    assert_eq!(
        std::fs::read_to_string(writer::backup_path(&target)).unwrap(),
        "mirrors: {}\n"
    );
    // A bad map renders nothing, so nothing can be written.
    let bad = MAP.replace("proxy-gcr.io", "Proxy GCR");
    assert_eq!(
        render_text(&bad, &secrets()).unwrap_err().label(),
        "bad_project"
    );
    let mut missing = secrets();
    missing.remove("password");
    assert_eq!(
        render_text(MAP, &missing).unwrap_err().label(),
        "missing_secret_key"
    );
}

/// RAII tmpfs mount (root only).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(opts: &str) -> Self {
        let d = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs failed");
        Self(d)
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn disk_full_leaves_old_file_intact() {
    if !is_root() {
        continuum_tests::skip::skip(
            "disk_full_leaves_old_file_intact",
            "mounting a tmpfs needs root",
        );
        return;
    }
    let fs = Tmpfs::mount("size=8k");
    let target = fs.path().join("registries.yaml");
    std::fs::write(&target, "old\n").unwrap();
    let big = "x".repeat(64 * 1024);
    let e = writer::write_with_backup(&target, big.as_bytes()).unwrap_err();
    assert_eq!(e.label(), "disk_full", "{e}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "old\n");
    // No temp file left to eat the space.
    assert!(
        dir_names(fs.path()).iter().all(|n| !n.contains(".tmp.")),
        "{:?}",
        dir_names(fs.path())
    );
}

#[test]
fn read_only_fs_leaves_old_file_intact() {
    if !is_root() {
        continuum_tests::skip::skip(
            "read_only_fs_leaves_old_file_intact",
            "mount/remount needs root",
        );
        return;
    }
    let fs = Tmpfs::mount("size=1m");
    let target = fs.path().join("registries.yaml");
    std::fs::write(&target, "old\n").unwrap();
    let st = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(fs.path())
        .status()
        .unwrap();
    assert!(st.success());
    let e = writer::write_with_backup(&target, b"new\n").unwrap_err();
    assert_eq!(e.label(), "read_only", "{e}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "old\n");
    let e = writer::remove_with_backup(&target).unwrap_err();
    assert_eq!(e.label(), "read_only", "{e}");
    assert!(target.exists());
}

#[test]
fn permission_denied_leaves_old_file_intact() {
    if is_root() {
        eprintln!("SKIP permission_denied_leaves_old_file_intact: root bypasses directory permissions (read-only and disk-full cases cover failure handling as root)");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("registries.yaml");
    std::fs::write(&target, "old\n").unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let e = writer::write_with_backup(&target, b"new\n").unwrap_err();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(e.label(), "permission", "{e}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "old\n");
}

// ---- node pivot against the test API server ----

async fn wait_for<F: FnMut() -> bool>(what: &str, mut f: F) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn node_annotation(s: &TestApi, node: &str, key: &str) -> Option<String> {
    s.object("", "nodes", "", node)?["metadata"]["annotations"][key]
        .as_str()
        .map(str::to_string)
}

fn report(s: &TestApi, ns: &str, node: &str) -> Option<Value> {
    let cm = s.object("", "configmaps", ns, "continuum-node-pivot-status")?;
    serde_json::from_str(cm["data"][node].as_str()?).ok()
}

async fn set_key(s: &TestApi, ns: &str, value: &str) {
    let api: Api<ConfigMap> = Api::namespaced(s.admin_client().unwrap(), ns);
    api.patch(
        np::DEFAULT_STATUS_CONFIGMAP,
        &PatchParams::default(),
        &Patch::Merge(&json!({"data": {np::DEFAULT_STATUS_KEY: value}})),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn node_pivot_flips_v1_v2_v1_and_reports() {
    let s = TestApi::start_with_role(&repo_root().join("manifests/rbac/node-pivot.yaml"))
        .await
        .unwrap();
    let admin = s.admin_client().unwrap();
    let ns = "catalyst-system";
    let node = "node-a";
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": node}})).unwrap(),
        )
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": np::DEFAULT_STATUS_CONFIGMAP, "namespace": ns},
            "data": {"cutoverComplete": "false", np::DEFAULT_STATUS_KEY: ""},
        }))
        .unwrap(),
    )
    .await
    .unwrap();

    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("registries.yaml");
    let v1 = "mirrors:\n  docker.io:\n    endpoint:\n    - https://harbor.openova.io\n";
    std::fs::write(&target, v1).unwrap();
    let map = d.path().join("mirror-map.yaml");
    std::fs::write(&map, MAP).unwrap();
    let secret_dir = d.path().join("secret");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("username"), "robot$pull\n").unwrap();
    std::fs::write(secret_dir.join("password"), "pw").unwrap();
    let v2 = render_text(MAP, &secrets()).unwrap();

    let pivot = NodePivot::start(
        s.client().unwrap(),
        NodePivotOptions {
            namespace: ns.into(),
            configmap: np::DEFAULT_STATUS_CONFIGMAP.into(),
            key: np::DEFAULT_STATUS_KEY.into(),
            report_configmap: "continuum-node-pivot-status".into(),
            node_name: node.into(),
            paths: Paths {
                target: target.clone(),
                v1_file: None,
            },
            mirror_map: map.clone(),
            secret_dir: Some(secret_dir.clone()),
            health_addr: "127.0.0.1:0".parse().unwrap(),
        },
    )
    .await
    .unwrap();

    // Empty key: cutover not started, nothing touched.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(std::fs::read_to_string(&target).unwrap(), v1);
    assert_eq!(node_annotation(&s, node, np::ANNOTATION_VERSION), None);

    // v2.
    let flipped = std::time::Instant::now();
    set_key(&s, ns, "v2").await;
    wait_for("v2 on disk", || {
        std::fs::read_to_string(&target).ok().as_deref() == Some(v2.as_str())
    })
    .await;
    // A figure for the report only (no timing assertions in tests).
    eprintln!(
        "node pivot: status key flip -> v2 on disk in {} ms",
        flipped.elapsed().as_millis()
    );
    wait_for("v2 on disk and reported", || {
        std::fs::read_to_string(&target).ok().as_deref() == Some(v2.as_str())
            && node_annotation(&s, node, np::ANNOTATION_VERSION).as_deref() == Some("v2")
            && report(&s, ns, node).is_some_and(|r| r["version"] == "v2")
    })
    .await;
    assert_eq!(
        node_annotation(&s, node, np::ANNOTATION_RESTART_NEEDED).as_deref(),
        Some("true")
    );
    assert_eq!(
        std::fs::read_to_string(writer::backup_path(&target)).unwrap(),
        v1
    );
    let r = report(&s, ns, node).unwrap();
    assert_eq!(r["restartNeeded"], true);
    assert_eq!(r["error"], Value::Null);

    // Unknown value: nothing written, error reported.
    set_key(&s, ns, "v3").await;
    wait_for("error reported", || {
        node_annotation(&s, node, np::ANNOTATION_ERROR)
            .is_some_and(|e| e.starts_with("unknown_value"))
    })
    .await;
    assert_eq!(std::fs::read_to_string(&target).unwrap(), v2);
    assert!(report(&s, ns, node).unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("v3"));

    // Back to v1: the pre-pivot content.
    set_key(&s, ns, "v1").await;
    wait_for("v1 restored and reported", || {
        std::fs::read_to_string(&target).ok().as_deref() == Some(v1)
            && node_annotation(&s, node, np::ANNOTATION_VERSION).as_deref() == Some("v1")
            && node_annotation(&s, node, np::ANNOTATION_ERROR).as_deref() == Some("")
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(writer::backup_path(&target)).unwrap(),
        v2
    );

    // A broken mirror map on the next flip: file untouched, error reported.
    std::fs::write(&map, "mirrors: { 'Bad Host': {} }\n").unwrap();
    set_key(&s, ns, "v2").await;
    wait_for("render error reported", || {
        node_annotation(&s, node, np::ANNOTATION_ERROR).is_some_and(|e| e.starts_with("bad_host"))
    })
    .await;
    assert_eq!(std::fs::read_to_string(&target).unwrap(), v1);

    // Events were published about the node, and metrics exported.
    let events = s.objects("events.k8s.io", "events");
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    assert!(reasons.contains(&"RegistriesYamlWritten"), "{reasons:?}");
    assert!(reasons.contains(&"RegistriesYamlFailed"), "{reasons:?}");
    let metrics = http_get(pivot.health_addr, "/metrics").await;
    assert!(
        metrics.contains("continuum_node_pivot_writes_total{outcome=\"written\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("continuum_node_pivot_errors_total{label=\"bad_host\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("continuum_node_pivot_restart_needed 1"),
        "{metrics}"
    );

    // The ClusterRole was sufficient here too (minimality:
    // node_pivot_role_is_sufficient_and_minimal).
    let denied: Vec<_> = s.requests().into_iter().filter(|r| r.code == 403).collect();
    assert!(denied.is_empty(), "403s: {denied:?}");
    drop(pivot);
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

// ---- source watcher ----

fn source_ar(kind: &str) -> ApiResource {
    let (g, v, k, p) = sw::SOURCE_KINDS
        .into_iter()
        .find(|(_, _, k, _)| *k == kind)
        .unwrap();
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, k), p)
}

fn register_sources(s: &TestApi) {
    for (g, v, k, p) in sw::SOURCE_KINDS {
        s.register(ResourceSpec::new(g, v, p, k, true, true));
    }
}

async fn create_source(s: &TestApi, kind: &str, ns: &str, name: &str, url: &str) {
    let ar = source_ar(kind);
    let api: Api<DynamicObject> = Api::namespaced_with(s.admin_client().unwrap(), ns, &ar);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": ar.api_version, "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": {"url": url, "interval": "10m"},
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
}

async fn set_url(s: &TestApi, kind: &str, ns: &str, name: &str, url: &str) {
    let ar = source_ar(kind);
    let api: Api<DynamicObject> = Api::namespaced_with(s.admin_client().unwrap(), ns, &ar);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"url": url}})),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn source_watch_reports_external_and_reverted_urls() {
    let s = TestApi::start_with_role(&repo_root().join("manifests/rbac/source-pivot.yaml"))
        .await
        .unwrap();
    register_sources(&s);
    let ns = "flux-system";
    create_source(
        &s,
        "HelmRepository",
        ns,
        "bp-cilium",
        "oci://ghcr.io/openova-io",
    )
    .await;
    create_source(
        &s,
        "OCIRepository",
        ns,
        "bp-oci",
        "oci://harbor.otech116.omani.works/openova-io/x",
    )
    .await;
    create_source(
        &s,
        "GitRepository",
        ns,
        "openova",
        "http://gitea-http.gitea.svc.cluster.local:3000/openova/openova.git",
    )
    .await;

    let registry = prometheus::Registry::new();
    let metrics = sw::Metrics::new(&registry).unwrap();
    let watch = SourceWatch::start(
        s.client().unwrap(),
        LocalHosts(vec![
            "harbor.otech116.omani.works".into(),
            ".svc.cluster.local".into(),
        ]),
        metrics.clone(),
        "test".into(),
    );
    wait_for("initial list", || watch.status()["sources"] == 3).await;
    let st = watch.status();
    assert_eq!(st["external"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["external"][0]["name"], "bp-cilium");
    assert_eq!(
        metrics
            .external
            .with_label_values(&["HelmRepository"])
            .get(),
        1
    );
    assert_eq!(
        metrics.external.with_label_values(&["GitRepository"]).get(),
        0
    );

    // Step 06 live patch: pivoted.
    set_url(
        &s,
        "HelmRepository",
        ns,
        "bp-cilium",
        "oci://harbor.otech116.omani.works/openova-io",
    )
    .await;
    wait_for("pivot seen", || {
        watch.status()["external"]
            .as_array()
            .is_some_and(Vec::is_empty)
    })
    .await;
    assert_eq!(
        metrics
            .external
            .with_label_values(&["HelmRepository"])
            .get(),
        0
    );

    // Flux re-applies the old URL from Git: reported with both URLs in one event.
    set_url(
        &s,
        "HelmRepository",
        ns,
        "bp-cilium",
        "oci://ghcr.io/openova-io",
    )
    .await;
    wait_for("revert reported", || {
        watch.status()["reverted"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    })
    .await;
    let st = watch.status();
    assert_eq!(st["reverted"][0]["kind"], "HelmRepository");
    assert_eq!(st["reverted"][0]["namespace"], ns);
    assert_eq!(st["reverted"][0]["name"], "bp-cilium");
    assert_eq!(
        st["reverted"][0]["pivotedUrl"],
        "oci://harbor.otech116.omani.works/openova-io"
    );
    assert_eq!(st["reverted"][0]["currentUrl"], "oci://ghcr.io/openova-io");
    assert_eq!(
        metrics.reverts.with_label_values(&["HelmRepository"]).get(),
        1
    );
    assert_eq!(
        metrics
            .external
            .with_label_values(&["HelmRepository"])
            .get(),
        1
    );
    wait_for("Warning Event", || {
        s.objects("events.k8s.io", "events").iter().any(|e| {
            e["reason"] == "SourcePivotReverted"
                && e["type"] == "Warning"
                && e["regarding"]["name"] == "bp-cilium"
        })
    })
    .await;
    // The same document over HTTP.
    let (addr, task) = continuum_agent::health::serve_with_status(
        "127.0.0.1:0".parse().unwrap(),
        continuum_agent::health::HealthState::without_guardrail(prometheus::Registry::new()),
        Some(sw::status_provider(&watch)),
    )
    .await
    .unwrap();
    let body = http_get(addr, "/status").await;
    let json_start = body.find('{').unwrap();
    let doc: Value = serde_json::from_str(body[json_start..].trim()).unwrap();
    assert_eq!(doc["reverted"][0]["currentUrl"], "oci://ghcr.io/openova-io");
    task.abort();
    let denied: Vec<_> = s.requests().into_iter().filter(|r| r.code == 403).collect();
    assert!(denied.is_empty(), "403s: {denied:?}");
    drop(watch);
}

// ---- pivot sources against a local bare repository ----

fn sh_git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const HELMREPO: &str = "# bootstrap-kit: cilium\napiVersion: source.toolkit.fluxcd.io/v1\nkind: HelmRepository\nmetadata:\n  name: bp-cilium\n  namespace: flux-system\nspec:\n  type: oci\n  interval: 10m\n  url: oci://ghcr.io/openova-io   # upstream\n";

/// A bare repository with `main` holding two HelmRepository declarations and an unrelated file.
fn seed_repo(root: &Path) -> (String, PathBuf) {
    let bare = root.join("openova.git");
    std::fs::create_dir(&bare).unwrap();
    sh_git(
        &bare,
        &["init", "--quiet", "--bare", "--initial-branch=main"],
    );
    let work = root.join("seed");
    std::fs::create_dir(&work).unwrap();
    sh_git(&work, &["init", "--quiet", "--initial-branch=main"]);
    let kit = work.join("clusters/_template/bootstrap-kit");
    std::fs::create_dir_all(kit.join("sub")).unwrap();
    std::fs::write(kit.join("01-cilium.yaml"), HELMREPO).unwrap();
    std::fs::write(
        kit.join("sub/02-cert-manager.yml"),
        HELMREPO.replace("bp-cilium", "bp-cert-manager").replace(
            "url: oci://ghcr.io/openova-io   # upstream",
            "url: \"oci://ghcr.io/openova-io/charts\"",
        ),
    )
    .unwrap();
    std::fs::write(work.join("README.md"), "url: oci://ghcr.io/openova-io\n").unwrap();
    sh_git(&work, &["add", "."]);
    sh_git(&work, &["commit", "--quiet", "-m", "seed"]);
    let url = bare.to_string_lossy().into_owned();
    sh_git(&work, &["push", "--quiet", &url, "main"]);
    (url, bare)
}

fn args(remote: &str, dry_run: bool) -> GitPivotArgs {
    GitPivotArgs {
        remote: remote.into(),
        branch: "main".into(),
        path: "clusters/_template/bootstrap-kit".into(),
        from: "oci://ghcr.io/openova-io".into(),
        to: "oci://harbor.otech116.omani.works/openova-io".into(),
        dry_run,
        author_name: "continuum-agent".into(),
        author_email: "continuum-agent@openova.io".into(),
    }
}

#[tokio::test]
async fn git_pivot_rewrites_commits_pushes_and_requests_reconcile() {
    let root = tempfile::tempdir().unwrap();
    let (remote, bare) = seed_repo(root.path());
    let before = sh_git(&bare, &["rev-parse", "main"]);

    // --dry-run: diff produced, remote untouched.
    let dry = git::pivot(&args(&remote, true)).unwrap();
    assert_eq!(dry.rewrites, 2);
    assert!(dry.commit.is_none());
    assert!(
        dry.diff
            .contains("-  url: oci://ghcr.io/openova-io   # upstream"),
        "{}",
        dry.diff
    );
    assert!(
        dry.diff
            .contains("+  url: oci://harbor.otech116.omani.works/openova-io   # upstream"),
        "{}",
        dry.diff
    );
    assert_eq!(sh_git(&bare, &["rev-parse", "main"]), before);

    // Real run.
    let rep = git::pivot(&args(&remote, false)).unwrap();
    let head = sh_git(&bare, &["rev-parse", "main"]).trim().to_string();
    assert_eq!(rep.commit.as_deref(), Some(head.as_str()));
    assert_ne!(head, before.trim());
    let msg = sh_git(&bare, &["log", "-1", "--format=%B", "main"]);
    assert!(msg.starts_with("pivot sources: oci://ghcr.io/openova-io -> oci://harbor.otech116.omani.works/openova-io in clusters/_template/bootstrap-kit"), "{msg}");
    assert!(
        msg.contains("- clusters/_template/bootstrap-kit/01-cilium.yaml (1)"),
        "{msg}"
    );
    let author = sh_git(&bare, &["log", "-1", "--format=%an <%ae>", "main"]);
    assert_eq!(
        author.trim(),
        "continuum-agent <continuum-agent@openova.io>"
    );
    let cilium = sh_git(
        &bare,
        &[
            "show",
            "main:clusters/_template/bootstrap-kit/01-cilium.yaml",
        ],
    );
    assert_eq!(
        cilium,
        HELMREPO.replace(
            "oci://ghcr.io/openova-io",
            "oci://harbor.otech116.omani.works/openova-io"
        )
    );
    let cm = sh_git(
        &bare,
        &[
            "show",
            "main:clusters/_template/bootstrap-kit/sub/02-cert-manager.yml",
        ],
    );
    assert!(
        cm.contains("url: \"oci://harbor.otech116.omani.works/openova-io/charts\""),
        "{cm}"
    );
    // Outside --path: untouched.
    assert_eq!(
        sh_git(&bare, &["show", "main:README.md"]),
        "url: oci://ghcr.io/openova-io\n"
    );
    let changed = sh_git(&bare, &["diff", "--name-only", before.trim(), "main"]);
    assert_eq!(changed.lines().count(), 2, "{changed}");

    // Second run: nothing left to rewrite.
    let e = git::pivot(&args(&remote, false)).unwrap_err();
    assert_eq!(e.label(), "no_matches", "{e}");
    assert_eq!(sh_git(&bare, &["rev-parse", "main"]).trim(), head);

    // Push rejected by the remote.
    std::fs::write(
        bare.join("hooks/pre-receive"),
        "#!/bin/sh\necho 'protected branch' >&2\nexit 1\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            bare.join("hooks/pre-receive"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    let mut a = args(&remote, false);
    a.from = "oci://harbor.otech116.omani.works/openova-io".into();
    a.to = "oci://harbor2.otech116.omani.works/openova-io".into();
    let e = git::pivot(&a).unwrap_err();
    assert!(matches!(e, GitPivotError::PushRejected { .. }), "{e}");
    assert_eq!(sh_git(&bare, &["rev-parse", "main"]).trim(), head);

    // Flux reconcile request on the GitRepository (RBAC from source-pivot.yaml).
    let s = TestApi::start_with_role(&repo_root().join("manifests/rbac/source-pivot.yaml"))
        .await
        .unwrap();
    register_sources(&s);
    create_source(
        &s,
        "GitRepository",
        "flux-system",
        "openova",
        "http://gitea.local/openova/openova.git",
    )
    .await;
    git::request_reconcile(
        s.client().unwrap(),
        "flux-system",
        "openova",
        "2026-05-05T14:38:00Z",
    )
    .await
    .unwrap();
    let gr = s
        .object(
            "source.toolkit.fluxcd.io",
            "gitrepositories",
            "flux-system",
            "openova",
        )
        .unwrap();
    assert_eq!(
        gr["metadata"]["annotations"]["reconcile.fluxcd.io/requestedAt"],
        "2026-05-05T14:38:00Z"
    );
}

// ---- RBAC proofs from the request log ----

/// Polls `s` until `done` holds of its requests or one is refused (403);
/// 20 s at most (then the proof reports what was not reached).
async fn until_done_or_denied(s: &TestApi, done: impl Fn(&[RequestRecord]) -> bool) {
    for _ in 0..800 {
        let r = s.requests();
        if done(&r) || r.iter().any(|x| x.code == 403) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn ok(r: &[RequestRecord], group: &str, res: &str, verb: &str) -> bool {
    r.iter()
        .any(|x| x.group == group && x.resource == res && x.verb == verb && x.code < 300)
}

/// Every API call of `continuum-agent node-pivot`: the watch on the status
/// ConfigMap (list, watch), the first report (patch: 404, then create), later
/// reports (patch), the Node annotations (patch), Events (create; the second
/// RegistriesYamlWritten on the same Node: patch).
async fn node_pivot_scenario(rules: Vec<PolicyRule>) -> Vec<RequestRecord> {
    let s = TestApi::start_with(continuum_testapi::Options {
        rules: Some(rules),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = s.admin_client().unwrap();
    let ns = "catalyst-system";
    let node = "node-a";
    let nodes: Api<Node> = Api::all(admin.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": node}})).unwrap(),
        )
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(admin, ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": np::DEFAULT_STATUS_CONFIGMAP, "namespace": ns},
            "data": {np::DEFAULT_STATUS_KEY: ""},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("registries.yaml");
    std::fs::write(&target, "mirrors: {}\n").unwrap();
    let map = d.path().join("mirror-map.yaml");
    std::fs::write(&map, MAP).unwrap();
    let secret_dir = d.path().join("secret");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::write(secret_dir.join("username"), "robot$pull\n").unwrap();
    std::fs::write(secret_dir.join("password"), "pw").unwrap();
    let pivot = NodePivot::start(
        s.client().unwrap(),
        NodePivotOptions {
            namespace: ns.into(),
            configmap: np::DEFAULT_STATUS_CONFIGMAP.into(),
            key: np::DEFAULT_STATUS_KEY.into(),
            report_configmap: "continuum-node-pivot-status".into(),
            node_name: node.into(),
            paths: Paths {
                target,
                v1_file: None,
            },
            mirror_map: map,
            secret_dir: Some(secret_dir),
            health_addr: "127.0.0.1:0".parse().unwrap(),
        },
    )
    .await
    .unwrap();
    set_key(&s, ns, "v2").await;
    until_done_or_denied(&s, |r| {
        ok(r, "", "configmaps", "create") && ok(r, "", "nodes", "patch")
    })
    .await;
    set_key(&s, ns, "v1").await;
    until_done_or_denied(&s, |r| {
        ok(r, "events.k8s.io", "events", "patch") && ok(r, "", "configmaps", "patch")
    })
    .await;
    drop(pivot);
    s.requests()
}

/// manifests/rbac/node-pivot.yaml from the request log: sufficient, every
/// grant used, each verb needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_pivot_role_is_sufficient_and_minimal() {
    let rules = rbac::rules_from_file(&repo_root().join("manifests/rbac/node-pivot.yaml")).unwrap();
    let recorded = node_pivot_scenario(rules.clone()).await;
    rbac_proof::assert_sufficient_and_used(&rules, &recorded, &[]);
    rbac_proof::assert_each_verb_needed(&rules, &[], 4, node_pivot_scenario).await;
}

/// Every API call of the source pivot's ServiceAccount: the watcher over the
/// three Flux source kinds (list, watch), a pivot reverted twice on one
/// HelmRepository (Event create, then patch of the repeat), and `pivot
/// sources`' reconcile request on the GitRepository (patch).
async fn source_pivot_scenario(rules: Vec<PolicyRule>) -> Vec<RequestRecord> {
    let s = TestApi::start_with(continuum_testapi::Options {
        rules: Some(rules),
        ..Default::default()
    })
    .await
    .unwrap();
    register_sources(&s);
    let ns = "flux-system";
    let (outside, inside) = (
        "oci://ghcr.io/openova-io",
        "oci://harbor.otech116.omani.works/openova-io",
    );
    create_source(&s, "HelmRepository", ns, "h", outside).await;
    create_source(&s, "OCIRepository", ns, "o", inside).await;
    create_source(
        &s,
        "GitRepository",
        ns,
        "g",
        "http://gitea-http.gitea.svc.cluster.local:3000/g.git",
    )
    .await;
    let watch = SourceWatch::start(
        s.client().unwrap(),
        LocalHosts(vec![
            "harbor.otech116.omani.works".into(),
            ".svc.cluster.local".into(),
        ]),
        sw::Metrics::new(&prometheus::Registry::new()).unwrap(),
        "test".into(),
    );
    until_done_or_denied(&s, |_| watch.status()["sources"] == 3).await;
    for n in 1..=2 {
        set_url(&s, "HelmRepository", ns, "h", inside).await;
        until_done_or_denied(&s, |_| {
            watch.status()["external"]
                .as_array()
                .is_some_and(Vec::is_empty)
        })
        .await;
        set_url(&s, "HelmRepository", ns, "h", outside).await;
        until_done_or_denied(&s, |r| {
            let events = r
                .iter()
                .filter(|x| x.resource == "events" && x.code < 300)
                .count();
            events >= n
        })
        .await;
    }
    let _ = git::request_reconcile(s.client().unwrap(), ns, "g", "2026-05-05T14:38:00Z").await;
    drop(watch);
    s.requests()
}

/// manifests/rbac/source-pivot.yaml from the request log: sufficient, every
/// grant used, each verb needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_pivot_role_is_sufficient_and_minimal() {
    let rules =
        rbac::rules_from_file(&repo_root().join("manifests/rbac/source-pivot.yaml")).unwrap();
    let recorded = source_pivot_scenario(rules.clone()).await;
    rbac_proof::assert_sufficient_and_used(&rules, &recorded, &[]);
    rbac_proof::assert_each_verb_needed(&rules, &[], 4, source_pivot_scenario).await;
}

#[test]
fn git_pivot_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let (remote, _bare) = seed_repo(root.path());
    let mut a = args(&remote, true);
    a.path = "clusters/missing".into();
    assert_eq!(git::pivot(&a).unwrap_err().label(), "no_path");
    let mut a = args(&remote, true);
    a.from = "oci://quay.io/none".into();
    assert_eq!(git::pivot(&a).unwrap_err().label(), "no_matches");
    let mut a = args(&remote, true);
    a.branch = "nope".into();
    assert_eq!(git::pivot(&a).unwrap_err().label(), "git");
    let mut a = args(&remote, true);
    a.path = "../etc".into();
    assert_eq!(git::pivot(&a).unwrap_err().label(), "bad_args");
    // The unrelated import keeps the renderer module linked for the header check.
    assert!(render::HEADER.starts_with('#'));
}
