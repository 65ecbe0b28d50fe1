//! Stuck HelmRelease recovery against the strict test API server, loaded with
//! the ClusterRole from manifests/rbac/hr-recovery.yaml.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuum_agent::agent::{Agent, AgentOptions};
use continuum_agent::hr_recovery::controller::Ctx;
use continuum_agent::hr_recovery::guardrail::Guardrail;
use continuum_agent::hr_recovery::helm_storage::encode_release;
use continuum_agent::hr_recovery::metrics::Metrics;
use continuum_agent::hr_recovery::pass::{run_once, PassReport};
use continuum_agent::hr_recovery::{self as hr, Config};
use continuum_testapi::{rbac, PolicyRule, TestApi};
use continuum_tests::rbac_proof;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

const GROUP: &str = "helm.toolkit.fluxcd.io";

fn role_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/rbac/hr-recovery.yaml")
}

fn hr_api(client: kube::Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v2", "HelmRelease"),
        "helmreleases",
    );
    Api::namespaced_with(client, ns, &ar)
}

fn ts(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn ago(secs: i64) -> Timestamp {
    Timestamp::now() - jiff::SignedDuration::from_secs(secs)
}

/// Create a HelmRelease and give it a status through the status subresource (as helm-controller would).
async fn seed_hr(s: &TestApi, ns: &str, name: &str, spec: Value, status: Option<Value>) {
    let api = hr_api(s.admin_client().unwrap(), ns);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    if let Some(st) = status {
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": st})),
        )
        .await
        .unwrap();
    }
}

fn ready(status: &str, since: Timestamp, history0: Option<&str>) -> Value {
    let mut s = json!({"conditions": [{"type": "Ready", "status": status, "reason": "Progressing", "message": "", "lastTransitionTime": ts(since)}]});
    if let Some(h) = history0 {
        s["history"] = json!([{"status": h, "version": 1}]);
    }
    s
}

/// A stuck branch-B HelmRelease (Ready Unknown for 10 minutes, deployed).
async fn seed_stuck_b(s: &TestApi, ns: &str, name: &str) {
    seed_hr(
        s,
        ns,
        name,
        json!({"interval": "5m"}),
        Some(ready("Unknown", ago(600), Some("deployed"))),
    )
    .await;
}

/// A Helm storage Secret for release `name` version `v` in `status`, deployed `age` seconds ago.
async fn seed_secret(s: &TestApi, ns: &str, name: &str, v: u64, status: &str, age: i64) {
    let payload = encode_release(
        &json!({"name": name, "version": v, "info": {"status": status, "last_deployed": ts(ago(age))}}),
    );
    seed_secret_raw(s, ns, name, v, &payload).await;
}

async fn seed_secret_raw(s: &TestApi, ns: &str, name: &str, v: u64, helm_payload: &str) {
    use base64::Engine;
    let secrets: Api<DynamicObject> = Api::namespaced_with(
        s.admin_client().unwrap(),
        ns,
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Secret"), "secrets"),
    );
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("sh.helm.release.v1.{name}.v{v}"), "labels": {"owner": "helm", "name": name, "version": v.to_string()}},
        "type": "helm.sh/release.v1",
        "data": {"release": base64::engine::general_purpose::STANDARD.encode(helm_payload)},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &obj).await.unwrap();
}

fn ctx(s: &TestApi, threshold: Duration, max: usize, dry_run: bool) -> (Ctx, prometheus::Registry) {
    let reg = prometheus::Registry::new();
    let metrics = Metrics::new(&reg).unwrap();
    let cfg = Config {
        threshold,
        max_actions: max,
        guardrail_window: Duration::from_secs(3600),
        dry_run,
    };
    let guard = Arc::new(Mutex::new(Guardrail::new(max, cfg.guardrail_window)));
    (
        Ctx::new(s.client().unwrap(), cfg, metrics, "test".into(), guard),
        reg,
    )
}

fn get_hr(s: &TestApi, ns: &str, name: &str) -> Value {
    s.object(GROUP, "helmreleases", ns, name).unwrap()
}

fn annotation(o: &Value, key: &str) -> Option<String> {
    o.pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn ready_of(o: &Value) -> (String, String) {
    let c = o["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    (
        c["status"].as_str().unwrap().to_string(),
        c["message"].as_str().unwrap_or("").to_string(),
    )
}

fn event_reasons(s: &TestApi) -> Vec<String> {
    s.objects("events.k8s.io", "events")
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

fn writes(s: &TestApi) -> Vec<String> {
    s.requests()
        .into_iter()
        .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .map(|r| {
            format!(
                "{} {}/{}",
                r.verb,
                r.resource,
                r.subresource.unwrap_or_default()
            )
        })
        .collect()
}

fn metric(reg: &prometheus::Registry, name: &str, label: (&str, &str)) -> f64 {
    reg.gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == label.0 && l.value() == label.1)
        })
        .map(|m| m.get_counter().get_value())
        .sum()
}

#[tokio::test]
async fn branch_b_corrects_deployed_unknown_ready_once() {
    let s = TestApi::start_with_role(&role_path()).await.unwrap();
    seed_stuck_b(&s, "apps", "stuck").await;
    // Not past the threshold yet, not deployed, already Ready: untouched.
    seed_hr(
        &s,
        "apps",
        "young",
        json!({}),
        Some(ready("Unknown", ago(1), Some("deployed"))),
    )
    .await;
    seed_hr(
        &s,
        "apps",
        "healthy",
        json!({}),
        Some(ready("True", ago(600), Some("deployed"))),
    )
    .await;
    let (c, reg) = ctx(&s, Duration::from_secs(300), 10, false);
    let report = run_once(&c).await.unwrap();
    assert_eq!(report.acted, 1, "{:?}", report.lines);
    let o = get_hr(&s, "apps", "stuck");
    assert!(annotation(&o, hr::ANNOTATION_CORRECTED).is_some());
    let (st, msg) = ready_of(&o);
    assert_eq!(st, "True");
    assert!(
        msg.contains("auto-corrected from deployed-but-unknown-Ready"),
        "operator-greppable: {msg}"
    );
    assert_eq!(
        o["status"]["history"][0]["status"], "deployed",
        "the rest of the status is kept"
    );
    assert_eq!(ready_of(&get_hr(&s, "apps", "young")).0, "Unknown");
    assert!(annotation(&get_hr(&s, "apps", "healthy"), hr::ANNOTATION_CORRECTED).is_none());
    assert!(event_reasons(&s).contains(&"AutoCorrectedReady".to_string()));
    assert_eq!(
        metric(
            &reg,
            "continuum_hr_recovery_actions_total",
            ("branch", "deployed_unknown_ready")
        ),
        1.0
    );

    // Idempotency: a second pass writes nothing, even if Ready flips back to Unknown.
    let admin = hr_api(s.admin_client().unwrap(), "apps");
    admin
        .patch_status(
            "stuck",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": ready("Unknown", ago(900), Some("deployed"))})),
        )
        .await
        .unwrap();
    s.clear_requests();
    let report = run_once(&c).await.unwrap();
    assert_eq!(report.acted, 0);
    assert!(writes(&s).is_empty(), "re-run wrote {:?}", writes(&s));
}

#[tokio::test]
async fn dry_run_reports_without_writing() {
    let s = TestApi::start_with_role(&role_path()).await.unwrap();
    seed_stuck_b(&s, "apps", "stuck").await;
    let (c, _) = ctx(&s, Duration::from_secs(300), 10, true);
    s.clear_requests();
    let report = run_once(&c).await.unwrap();
    assert_eq!(report.acted, 1);
    assert!(
        report.lines.iter().any(|l| l.contains("would recover")),
        "{:?}",
        report.lines
    );
    assert!(writes(&s).is_empty());
    assert!(annotation(&get_hr(&s, "apps", "stuck"), hr::ANNOTATION_CORRECTED).is_none());
}

#[tokio::test]
async fn branch_a_unlocks_stale_pending_release() {
    let s = TestApi::start_with_role(&role_path()).await.unwrap();
    let failing = ready("False", ago(600), None);
    // Stuck: pending-upgrade older than the 1m timeout, Ready False for 10 minutes.
    seed_hr(
        &s,
        "apps",
        "locked",
        json!({"timeout": "1m"}),
        Some(failing.clone()),
    )
    .await;
    seed_secret(&s, "apps", "locked", 1, "superseded", 3000).await;
    seed_secret(&s, "apps", "locked", 2, "pending-upgrade", 600).await;
    // Pending but younger than its timeout (helm-controller can still unlock it itself).
    seed_hr(
        &s,
        "apps",
        "recent",
        json!({"timeout": "30m"}),
        Some(failing.clone()),
    )
    .await;
    seed_secret(&s, "apps", "recent", 1, "pending-install", 600).await;
    // Reconcile in progress: hands off.
    let mut busy = failing.clone();
    busy["conditions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "Reconciling", "status": "True", "lastTransitionTime": ts(ago(5))}));
    seed_hr(&s, "apps", "busy", json!({"timeout": "1m"}), Some(busy)).await;
    seed_secret(&s, "apps", "busy", 1, "pending-install", 600).await;
    // Failed (not pending): not ours.
    seed_hr(
        &s,
        "apps",
        "failed",
        json!({"timeout": "1m"}),
        Some(failing.clone()),
    )
    .await;
    seed_secret(&s, "apps", "failed", 1, "failed", 600).await;

    let (c, _) = ctx(&s, Duration::from_secs(300), 10, false);
    s.clear_requests();
    let report = run_once(&c).await.unwrap();
    assert_eq!(report.acted, 1, "{:?}", report.lines);
    let o = get_hr(&s, "apps", "locked");
    assert_eq!(
        annotation(&o, hr::ANNOTATION_UNLOCKED_RELEASE).as_deref(),
        Some("locked.v2")
    );
    assert!(annotation(&o, hr::ANNOTATION_UNLOCKED_AT).is_some());
    assert_eq!(o["spec"]["suspend"], false, "resumed after the toggle");
    assert_eq!(
        o["metadata"]["generation"], 3,
        "suspend then resume: two spec changes"
    );
    for other in ["recent", "busy", "failed"] {
        assert!(
            annotation(&get_hr(&s, "apps", other), hr::ANNOTATION_UNLOCKED_RELEASE).is_none(),
            "{other}"
        );
    }
    assert!(event_reasons(&s).contains(&"UnlockedPendingRelease".to_string()));
    // Idempotent for the same pending release.
    s.clear_requests();
    assert_eq!(run_once(&c).await.unwrap().acted, 0);
    assert!(writes(&s).is_empty(), "{:?}", writes(&s));
}

#[tokio::test]
async fn failed_status_patch_rolls_the_annotation_back() {
    let s = TestApi::start_with_role(&role_path()).await.unwrap();
    seed_stuck_b(&s, "apps", "stuck").await;
    let (c, reg) = ctx(&s, Duration::from_secs(300), 10, false);
    s.fail_next(Some("patch"), Some("helmreleases"), Some("status"), 1, 500);
    let report = run_once(&c).await.unwrap();
    assert_eq!(report.errors, 1, "{:?}", report.lines);
    let o = get_hr(&s, "apps", "stuck");
    assert!(
        annotation(&o, hr::ANNOTATION_CORRECTED).is_none(),
        "annotation rolled back"
    );
    assert_eq!(ready_of(&o).0, "Unknown");
    assert!(event_reasons(&s).contains(&"RecoveryFailed".to_string()));
    assert_eq!(
        metric(
            &reg,
            "continuum_hr_recovery_actions_total",
            ("outcome", "failed")
        ),
        1.0
    );
    // The next pass retries and succeeds.
    let report = run_once(&c).await.unwrap();
    assert_eq!((report.acted, report.errors), (1, 0));
    assert_eq!(ready_of(&get_hr(&s, "apps", "stuck")).0, "True");
}

async fn guardrail_case(n: usize, stuck: usize) -> (PassReport, TestApi, usize) {
    let s = TestApi::start_with_role(&role_path()).await.unwrap();
    for i in 0..stuck {
        seed_stuck_b(&s, "apps", &format!("hr{i}")).await;
    }
    let (c, _) = ctx(&s, Duration::from_secs(300), n, false);
    let report = run_once(&c).await.unwrap();
    let corrected = (0..stuck)
        .filter(|i| {
            annotation(
                &get_hr(&s, "apps", &format!("hr{i}")),
                hr::ANNOTATION_CORRECTED,
            )
            .is_some()
        })
        .count();
    (report, s, corrected)
}

#[tokio::test]
async fn guardrail_allows_n_and_stops_at_n_plus_one() {
    let (report, s, corrected) = guardrail_case(3, 3).await;
    assert_eq!(
        (report.acted, corrected, report.guardrail_tripped),
        (3, 3, false)
    );
    assert!(!event_reasons(&s).contains(&"GuardrailTripped".to_string()));

    let (report, s, corrected) = guardrail_case(3, 4).await;
    assert_eq!(
        (report.acted, corrected, report.guardrail_tripped),
        (3, 3, true)
    );
    let warnings: Vec<Value> = s
        .objects("events.k8s.io", "events")
        .into_iter()
        .filter(|e| e["reason"] == "GuardrailTripped")
        .collect();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0]["type"], "Warning");
}

#[tokio::test]
async fn bad_input_is_skipped_never_fatal() {
    let s = TestApi::start_with_role(&role_path()).await.unwrap();
    seed_hr(&s, "apps", "no-status", json!({}), None).await;
    seed_hr(
        &s,
        "apps",
        "odd-conditions",
        json!({}),
        Some(json!({"conditions": "Ready"})),
    )
    .await;
    seed_hr(&s, "apps", "odd-status", json!({}), Some(json!({"conditions": [{"type": "Ready", "status": "Perhaps", "lastTransitionTime": ts(ago(600))}]}))).await;
    seed_hr(&s, "apps", "bad-time", json!({}), Some(json!({"conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "soon"}], "history": [{"status": "deployed"}]}))).await;
    let failing = ready("False", ago(600), None);
    for (name, payload) in [
        ("bad-b64", "!!not base64!!".to_string()),
        ("bad-gzip", {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode([0x1f, 0x8b, 0x08, 0, 9, 9, 9])
        }),
        ("bad-json", {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode("{\"info\":")
        }),
    ] {
        seed_hr(
            &s,
            "apps",
            name,
            json!({"timeout": "1m"}),
            Some(failing.clone()),
        )
        .await;
        seed_secret_raw(&s, "apps", name, 1, &payload).await;
    }
    // One genuinely stuck HelmRelease among the bad ones is still recovered.
    seed_stuck_b(&s, "apps", "zz-stuck").await;
    let (c, reg) = ctx(&s, Duration::from_secs(300), 10, false);
    let report = run_once(&c).await.unwrap();
    assert_eq!(report.acted, 1, "{:?}", report.lines);
    for reason in [
        "no_status",
        "malformed_conditions",
        "bad_condition_status",
        "bad_transition_time",
        "release_bad_base64",
        "release_bad_gzip",
        "release_bad_json",
    ] {
        assert_eq!(
            metric(
                &reg,
                "continuum_hr_recovery_skipped_total",
                ("reason", reason)
            ),
            1.0,
            "{reason}"
        );
    }
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn agent_opts(identity: &str, threshold: Duration, max: usize) -> AgentOptions {
    AgentOptions {
        hr: Config {
            threshold,
            max_actions: max,
            guardrail_window: Duration::from_secs(3600),
            dry_run: false,
        },
        health_addr: "127.0.0.1:0".parse().unwrap(),
        lease_namespace: "continuum-system".into(),
        lease_name: "continuum-agent".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(1),
    }
}

async fn readyz(addr: std::net::SocketAddr) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn controller_acts_at_the_deadline_and_guardrail_needs_ack() {
    let s = TestApi::start_with_role(&role_path()).await.unwrap();
    let agent = Agent::start(
        s.client().unwrap(),
        agent_opts("a", Duration::from_secs(2), 1),
    )
    .await
    .unwrap();
    let mut leading = agent.leading.clone();
    leading.wait_for(|l| *l).await.unwrap();
    // Becomes stuck now: the controller must act by itself once 2 s have passed (requeue at the deadline).
    seed_hr(
        &s,
        "apps",
        "first",
        json!({}),
        Some(ready("Unknown", Timestamp::now(), Some("deployed"))),
    )
    .await;
    wait_for("first corrected", || {
        annotation(&get_hr(&s, "apps", "first"), hr::ANNOTATION_CORRECTED).is_some()
    })
    .await;
    assert_eq!(readyz(agent.health_addr).await, 200);
    // A second action in the same pass trips the guardrail (max 1): not acted, /readyz 503.
    seed_stuck_b(&s, "apps", "second").await;
    wait_for("guardrail", || {
        agent.guard.lock().unwrap().tripped_at().is_some()
    })
    .await;
    assert!(annotation(&get_hr(&s, "apps", "second"), hr::ANNOTATION_CORRECTED).is_none());
    assert_eq!(readyz(agent.health_addr).await, 503);
    // Operator acknowledges on the agent's Lease: re-armed, everything re-evaluated.
    let leases: Api<Lease> = Api::namespaced(s.admin_client().unwrap(), "continuum-system");
    let ack = json!({"metadata": {"annotations": {hr::ANNOTATION_GUARDRAIL_ACK: ts(Timestamp::now() + jiff::SignedDuration::from_secs(1))}}});
    leases
        .patch(
            "continuum-agent",
            &PatchParams::default(),
            &Patch::Merge(&ack),
        )
        .await
        .unwrap();
    wait_for("second corrected after ack", || {
        annotation(&get_hr(&s, "apps", "second"), hr::ANNOTATION_CORRECTED).is_some()
    })
    .await;
    assert_eq!(readyz(agent.health_addr).await, 200);
}

#[tokio::test]
async fn leader_failover_between_two_agents() {
    let s = TestApi::start_with_role(&role_path()).await.unwrap();
    let a = Agent::start(
        s.client().unwrap(),
        agent_opts("agent-a", Duration::from_secs(1), 10),
    )
    .await
    .unwrap();
    let b = Agent::start(
        s.client().unwrap(),
        agent_opts("agent-b", Duration::from_secs(1), 10),
    )
    .await
    .unwrap();
    wait_for("a leader", || *a.leading.borrow() || *b.leading.borrow()).await;
    // Never both, while both run.
    for _ in 0..20 {
        assert!(!(*a.leading.borrow() && *b.leading.borrow()), "two leaders");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (leader, follower) = if *a.leading.borrow() { (a, b) } else { (b, a) };
    let leases: Api<Lease> = Api::namespaced(s.admin_client().unwrap(), "continuum-system");
    let before = leases.get("continuum-agent").await.unwrap().spec.unwrap();
    drop(leader);
    wait_for("follower takes over", || *follower.leading.borrow()).await;
    let after = leases.get("continuum-agent").await.unwrap().spec.unwrap();
    assert_ne!(after.holder_identity, before.holder_identity);
    assert_eq!(
        after.lease_transitions.unwrap_or(0),
        before.lease_transitions.unwrap_or(0) + 1
    );
    // The new leader runs the controller.
    seed_stuck_b(&s, "apps", "stuck").await;
    wait_for("new leader corrects", || {
        annotation(&get_hr(&s, "apps", "stuck"), hr::ANNOTATION_CORRECTED).is_some()
    })
    .await;
}

/// Exercise every code path that talks to the API server; returns the recorded requests.
async fn rbac_scenario(rules: Vec<PolicyRule>) -> Vec<continuum_testapi::RequestRecord> {
    let s = TestApi::start_with(continuum_testapi::Options {
        rules: Some(rules),
        ..Default::default()
    })
    .await
    .unwrap();
    seed_stuck_b(&s, "apps", "b").await;
    seed_hr(
        &s,
        "apps",
        "a",
        json!({"timeout": "1m"}),
        Some(ready("False", ago(600), None)),
    )
    .await;
    seed_secret(&s, "apps", "a", 1, "pending-install", 600).await;
    let (c, _) = ctx(&s, Duration::from_secs(300), 10, false);
    // Two identical failures on "b": the Recorder creates, then patches its Event; the third pass succeeds.
    s.fail_next(Some("patch"), Some("helmreleases"), Some("status"), 2, 500);
    for _ in 0..3 {
        let _ = run_once(&c).await;
    }
    // Leader election (get, create, update) and the watch-driven controller (list, watch).
    let agent = Agent::start(
        s.client().unwrap(),
        agent_opts("x", Duration::from_secs(300), 10),
    )
    .await
    .unwrap();
    for _ in 0..60 {
        let r = s.requests();
        let watched = r
            .iter()
            .any(|r| r.verb == "watch" || (r.resource == "helmreleases" && r.code == 403));
        let renewed = r
            .iter()
            .any(|r| r.verb == "update" || (r.resource == "leases" && r.code == 403));
        if watched && renewed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(agent);
    s.requests()
}

#[tokio::test]
async fn cluster_role_is_sufficient_and_minimal() {
    // The ClusterRole and the leader-election Role (Leases in continuum-system,
    // get/update by name) of the file.
    let rules = rbac::rules_from_file(&role_path()).unwrap();
    assert!(rules
        .iter()
        .any(|r| r.namespace.as_deref() == Some("continuum-system")
            && r.resources == ["leases"]
            && r.resource_names == ["continuum-agent"]));
    let recorded = rbac_scenario(rules.clone()).await;
    rbac_proof::assert_sufficient_and_used(&rules, &recorded, &[]);
    // Remove any single verb: the scenario hits a 403, so a missing rule cannot go unnoticed.
    rbac_proof::assert_each_verb_needed(&rules, &[], 4, rbac_scenario).await;
}
