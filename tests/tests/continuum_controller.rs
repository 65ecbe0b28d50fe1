//! The Continuum controller against two strict test API servers (one per
//! region, each its own Kubernetes cluster) loaded with
//! manifests/rbac/continuum-controller.yaml, and three real witnesses over
//! HTTPS. Region a's CNPG Cluster starts primary, b's is a replica cluster
//! of it; killing a's agent (its whole runtime: region death) must promote
//! b exactly once, and a's Cluster must be fenced and stay fenced when its
//! agent returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use continuum_agent::continuum::controller::ControllerConfig;
use continuum_agent::continuum::{cnpg, ContinuumAgent, Options};
use continuum_shared::lease::HolderId;
use continuum_testapi::{PolicyRule, RequestRecord, TestApi};
use continuum_tests::pg_proc::PgRegion;
use continuum_tests::pki::Pki;
use continuum_tests::rbac_proof;
use continuum_tests::registry_series::series_in;
use continuum_tests::witness_proc::{WitnessOpts, WitnessProc};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

const NS: &str = "db";
use continuum_tests::continuum_fixture::{self as fixture, continuum_ar, GROUP};

fn role_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/rbac/continuum-controller.yaml")
}

/// One region: its cluster (test API server) and, while alive, its agent
/// running in a runtime of its own (shut down = region death).
struct Region {
    name: &'static str,
    api: TestApi,
    agent: Option<Instance>,
    registry: Option<prometheus::Registry>,
}

/// One agent process (pod) of a region: a `ContinuumAgent` in a runtime of
/// its own. Dropping it is SIGKILL (every task stops at once);
/// [`Instance::shutdown`] is SIGTERM (`ContinuumAgent::shutdown`).
struct Instance {
    rt: Option<tokio::runtime::Runtime>,
    registry: prometheus::Registry,
    leading: tokio::sync::watch::Receiver<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stopped: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Instance {
    /// Starts an agent of `region` against `api` with leader-election
    /// `identity` (the same leader Lease for every instance of a region).
    async fn start(api: &TestApi, region: &'static str, identity: &str) -> Instance {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let cfg = api.config_for("agent").unwrap();
        let identity = identity.to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
        rt.spawn(async move {
            let client = kube::Client::try_from(cfg).unwrap();
            let opts = Options {
                controller: ControllerConfig {
                    region: HolderId::new(region).unwrap(),
                    tick: Duration::from_millis(50),
                    max_drift: 0.01,
                    margin: Duration::from_millis(200),
                    instance: identity.clone(),
                    meta_refresh: Duration::from_millis(300),
                },
                health_addr: "127.0.0.1:0".parse().unwrap(),
                lease_namespace: "continuum-system".into(),
                lease_name: "continuum-failover".into(),
                identity,
                lease_duration: Duration::from_secs(2),
            };
            let agent = ContinuumAgent::start(client, opts).await.unwrap();
            let _ = tx.send((agent.registry.clone(), agent.leading.clone()));
            if stop_rx.await.is_ok() {
                agent.shutdown().await;
                let _ = stopped_tx.send(());
            } else {
                std::future::pending::<()>().await;
            }
        });
        let (registry, leading) = rx.await.unwrap();
        Instance {
            rt: Some(rt),
            registry,
            leading,
            stop: Some(stop_tx),
            stopped: Some(stopped_rx),
        }
    }

    fn leading(&self) -> bool {
        *self.leading.borrow()
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        counter_sum(&series_in(&self.registry, name, labels))
    }

    /// Graceful stop; returns once `ContinuumAgent::shutdown` returned.
    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).unwrap();
        }
        if let Some(stopped) = self.stopped.take() {
            stopped.await.unwrap();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn role_rules() -> Vec<PolicyRule> {
    continuum_testapi::rbac::rules_from_file(&role_path()).unwrap()
}

impl Region {
    async fn new(name: &'static str, pki: &Pki, cluster_spec: Value, spec: &Value) -> Region {
        Region::with_rules(name, pki, cluster_spec, spec, role_rules()).await
    }

    /// A region whose agent holds exactly `rules`; `cluster_spec` null: no
    /// CNPG Cluster (a region naming a `postgres` connection).
    async fn with_rules(
        name: &'static str,
        pki: &Pki,
        cluster_spec: Value,
        spec: &Value,
        rules: Vec<PolicyRule>,
    ) -> Region {
        let api = TestApi::start_with(continuum_testapi::Options {
            rules: Some(rules),
            ..Default::default()
        })
        .await
        .unwrap();
        fixture::register_kinds(&api);
        let admin = api.admin_client().unwrap();
        fixture::put_witness_tls(&admin, NS, pki).await.unwrap();
        if !cluster_spec.is_null() {
            fixture::create_cluster(&admin, NS, &format!("pg-{name}"), cluster_spec)
                .await
                .unwrap();
        }
        fixture::create_continuum(&admin, NS, "app", spec)
            .await
            .unwrap();
        Region {
            name,
            api,
            agent: None,
            registry: None,
        }
    }

    /// Starts this region's agent (identity `agent-<region>`) in a fresh runtime.
    async fn start_agent(&mut self) {
        let agent = Instance::start(&self.api, self.name, &format!("agent-{}", self.name)).await;
        self.registry = Some(agent.registry.clone());
        self.agent = Some(agent);
    }

    /// Region death: every task of the agent stops at once (no fence on the
    /// way out, no lease release).
    fn kill_agent(&mut self) {
        self.agent.take();
    }

    /// SIGTERM: the agent stops gracefully (its registry stays readable).
    async fn shutdown_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.shutdown().await;
        }
    }

    fn cluster(&self) -> Value {
        self.api
            .object(cnpg::GROUP, cnpg::PLURAL, NS, &format!("pg-{}", self.name))
            .unwrap()
    }

    fn status(&self) -> Value {
        self.api
            .object(GROUP, "continuums", NS, "app")
            .unwrap()
            .get("status")
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Every series of `name` carrying all of `labels`.
    fn series(&self, name: &str, labels: &[(&str, &str)]) -> Vec<prometheus::proto::Metric> {
        self.registry
            .as_ref()
            .map(|reg| series_in(reg, name, labels))
            .unwrap_or_default()
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        counter_sum(&self.series(name, labels))
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
        self.series(name, labels)
            .first()
            .map(|m| m.get_gauge().get_value() as i64)
    }

    /// Stores `conninfo` as Secret `name` (key `uri`) in the test namespace.
    async fn put_connection_secret(&self, name: &str, conninfo: &str) {
        use base64::Engine;
        let admin = self.api.admin_client().unwrap();
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin, NS);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": name, "namespace": NS},
                    "data": {"uri": base64::engine::general_purpose::STANDARD.encode(conninfo)},
                }))
                .unwrap(),
            )
            .await
            .unwrap();
    }

    fn assert_no_forbidden(&self) {
        let denied: Vec<_> = self
            .api
            .requests()
            .into_iter()
            .filter(|r| r.code == 403)
            .collect();
        assert!(
            denied.is_empty(),
            "region {}: RBAC denied {denied:?}",
            self.name
        );
    }
}

fn counter_sum(series: &[prometheus::proto::Metric]) -> u64 {
    series
        .iter()
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn annotation(obj: &Value, key: &str) -> Option<String> {
    obj["metadata"]["annotations"][key]
        .as_str()
        .map(String::from)
}

fn fenced(obj: &Value) -> bool {
    annotation(obj, cnpg::ANNOTATION_FENCED).as_deref() == Some("[\"*\"]")
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Setup {
    a: Region,
    b: Region,
    _witnesses: Vec<WitnessProc>,
}

fn sync_on(peer: &str) -> Value {
    json!({"synchronous": {"method": "first", "number": 1, "standbyNamesPre": [peer], "maxStandbyNamesFromCluster": 0, "standbyNamesPost": [], "dataDurability": "required"}})
}

/// Three witnesses, two regions, both agents running; returns once a holds
/// the lease, has recorded b as its synchronous standby, and b waits.
async fn setup(mode: &str) -> Setup {
    setup_with(mode, 1).await
}

/// [`setup`] with a lease TTL of `ttl_seconds`.
async fn setup_with(mode: &str, ttl_seconds: u64) -> Setup {
    let pki = Arc::new(Pki::generate().unwrap());
    let witnesses: Vec<WitnessProc> = (0..3)
        .map(|_| WitnessProc::start(WitnessOpts::default().with_pki(pki.clone())).unwrap())
        .collect();
    let spec = json!({
        "regions": [{"name": "a", "cnpg": {"name": "pg-a"}}, {"name": "b", "cnpg": {"name": "pg-b"}}],
        "witnesses": {"urls": witnesses.iter().map(|w| w.api_url()).collect::<Vec<_>>(), "tlsSecretRef": {"name": "witness-tls"}},
        "ttlSeconds": ttl_seconds,
        "mode": mode,
        "syncPolicy": "preferred",
    });
    let mut a = Region::new(
        "a",
        &pki,
        json!({"instances": 3, "replica": {"self": "pg-a", "primary": "pg-a", "source": "pg-b"}, "postgresql": sync_on("pg-b")}),
        &spec,
    )
    .await;
    let mut b = Region::new(
        "b",
        &pki,
        json!({"instances": 3, "replica": {"self": "pg-b", "primary": "pg-a", "source": "pg-a"}, "postgresql": sync_on("pg-a")}),
        &spec,
    )
    .await;
    a.start_agent().await;
    b.start_agent().await;
    wait_for(
        "a primary, holding epoch 1, b recorded",
        Duration::from_secs(20),
        || {
            let s = a.status();
            let c = a.cluster();
            s["phase"] == "Primary"
                && s["epoch"] == 1
                && s["conditions"].as_array().into_iter().flatten().any(|c| {
                    c["type"] == "Decision" && c["message"] == "primary: holding the lease"
                })
                && !fenced(&c)
                && annotation(&c, cnpg::ANNOTATION_EPOCH).as_deref() == Some("1")
        },
    )
    .await;
    // a requires b synchronously (CNPG standbyNamesPre names b's Cluster).
    assert_eq!(
        a.cluster()["spec"]["postgresql"]["synchronous"]["standbyNamesPre"],
        json!(["pg-b"])
    );
    wait_for("b sees a as primary", Duration::from_secs(10), || {
        let s = b.status();
        s["phase"] == "Standby" && s["primaryRegion"] == "a"
    })
    .await;
    Setup {
        a,
        b,
        _witnesses: witnesses,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_death_promotes_b_once_and_a_stays_fenced() {
    let Setup {
        mut a,
        mut b,
        _witnesses,
    } = setup("automatic").await;
    let a_before = a.cluster();
    a.kill_agent();

    wait_for("b promoted", Duration::from_secs(15), || {
        b.cluster()["spec"]["replica"]["primary"] == "pg-b"
    })
    .await;
    let c = b.cluster();
    // Promotion without a token (failover), epoch recorded on the Cluster.
    assert!(c["spec"]["replica"].get("promotionToken").is_none());
    assert_eq!(annotation(&c, cnpg::ANNOTATION_EPOCH).as_deref(), Some("2"));
    assert_eq!(
        annotation(&c, cnpg::ANNOTATION_PEER_ATTACHED).as_deref(),
        Some("false")
    );
    wait_for(
        "b status records the failover",
        Duration::from_secs(10),
        || {
            let s = b.status();
            s["phase"] == "Primary"
                && s["epoch"] == 2
                && s["primaryRegion"] == "b"
                && s["lastFailover"]["fromRegion"] == "a"
                && s["lastFailover"]["toRegion"] == "b"
                && s["lastFailover"]["epoch"] == 2
        },
    )
    .await;
    let lf = &b.status()["lastFailover"];
    assert!(lf["startedAt"].is_string() && lf["completedAt"].is_string());
    assert!(lf["durationMs"].is_u64());
    // Preferred policy, peer gone: witnesses record "none" before b stops
    // requiring a (its inherited standbyNamesPre named a).
    wait_for(
        "b drops the dead synchronous standby",
        Duration::from_secs(10),
        || {
            b.cluster()["spec"]["postgresql"]
                .get("synchronous")
                .is_none()
        },
    )
    .await;
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "promote"), ("result", "ok")]
        ),
        1
    );
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "update_meta"), ("result", "ok")]
        ),
        1,
        "one witness record (sync standby none) after the promotion"
    );
    let events = b.api.objects("events.k8s.io", "events");
    assert!(
        events.iter().any(|e| e["reason"] == "Promoted"),
        "a Promoted Event on b: {events:?}"
    );

    // a's region comes back: its agent fences the old primary and it stays
    // fenced (a newer epoch exists), its topology untouched.
    assert!(
        !fenced(&a.cluster()),
        "region death left a's Cluster as it was"
    );
    a.start_agent().await;
    wait_for("a fenced on return", Duration::from_secs(10), || {
        fenced(&a.cluster())
    })
    .await;
    wait_for("a status Fenced", Duration::from_secs(10), || {
        let s = a.status();
        s["phase"] == "Fenced" && s["primaryRegion"] == "b" && s["epoch"] == 2
    })
    .await;
    // Even with b gone too (lease free), a does not resume: its epoch is behind.
    let adopt_failed = |a: &Region| a.metric(ACTIONS, &[("action", "adopt"), ("result", "failed")]);
    let refused_before = adopt_failed(&a);
    b.kill_agent();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let c = a.cluster();
        assert!(fenced(&c), "a must stay fenced");
        assert_eq!(c["spec"]["replica"], a_before["spec"]["replica"]);
        assert_eq!(annotation(&c, cnpg::ANNOTATION_EPOCH).as_deref(), Some("1"));
    }
    assert_eq!(
        a.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "acquire"), ("result", "ok")]
        ),
        0
    );
    let reason = a.status()["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Decision")
        .unwrap()["message"]
        .clone();
    assert_eq!(
        reason,
        "fenced: a newer epoch was granted; rejoin as a replica"
    );
    // It may probe epoch 2 once (it could be its own, unrecorded), and the
    // witnesses' refusal settles it: no probe (and warning) every TTL.
    let probes = adopt_failed(&a) - refused_before;
    assert!(probes <= 1, "{probes} adoption attempts of epoch 2");
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    // Minimality is proven by role_is_sufficient_and_minimal below.
    a.kill_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_witnesses_fences_the_primary_until_they_return() {
    let Setup {
        mut a,
        mut b,
        mut _witnesses,
    } = setup("automatic").await;
    for w in _witnesses.iter_mut() {
        w.kill9();
    }
    // Invariant 2: no renewal by the deadline, so the fence guard fences a.
    wait_for(
        "a fenced without witnesses",
        Duration::from_secs(10),
        || fenced(&a.cluster()),
    )
    .await;
    wait_for("a status Fenced", Duration::from_secs(10), || {
        a.status()["phase"] == "Fenced"
    })
    .await;
    assert!(
        a.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "fence"), ("result", "ok")]
        ) >= 1
    );
    // b cannot see a majority: it never promotes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(b.cluster()["spec"]["replica"]["primary"], "pg-a");
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "acquire"), ("result", "ok")]
        ),
        0
    );
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    a.kill_agent();
    b.kill_agent();
}

/// Witnesses lost, then back (durable store): a is fenced and the lease is
/// free, so both regions may race for it: a (fenced, no newer epoch: may
/// resume) and b (the recorded synchronous standby: may promote). Exactly one
/// of them must end up primary at epoch 2, never both (invariant 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_witnesses_return_exactly_one_region_is_primary() {
    let Setup {
        mut a,
        mut b,
        mut _witnesses,
    } = setup("automatic").await;
    for w in _witnesses.iter_mut() {
        w.kill9();
    }
    wait_for(
        "a fenced without witnesses",
        Duration::from_secs(10),
        || fenced(&a.cluster()),
    )
    .await;
    for w in _witnesses.iter_mut() {
        w.restart().unwrap();
    }
    let a_primary = |a: &Region| {
        let c = a.cluster();
        !fenced(&c) && annotation(&c, cnpg::ANNOTATION_EPOCH).as_deref() == Some("2")
    };
    let b_primary = |b: &Region| {
        let c = b.cluster();
        c["spec"]["replica"]["primary"] == "pg-b"
            && annotation(&c, cnpg::ANNOTATION_EPOCH).as_deref() == Some("2")
    };
    wait_for(
        "one region primary at epoch 2",
        Duration::from_secs(20),
        || a_primary(&a) || b_primary(&b),
    )
    .await;
    // Let the loser observe the winner, then check they never overlap.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (pa, pb) = (a_primary(&a), b_primary(&b));
        assert!(pa != pb, "exactly one primary: a={pa} b={pb}");
        if pb {
            assert!(fenced(&a.cluster()), "a stays fenced once b promoted");
        } else {
            assert_eq!(b.cluster()["spec"]["replica"]["primary"], "pg-a");
        }
    }
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    a.kill_agent();
    b.kill_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_spec_is_reported_in_status() {
    let pki = Pki::generate().unwrap();
    let spec = json!({
        "regions": [{"name": "x", "cnpg": {"name": "pg-x"}}, {"name": "y", "cnpg": {"name": "pg-y"}}],
        "witnesses": {"urls": ["https://127.0.0.1:1"], "tlsSecretRef": {"name": "witness-tls"}},
        "ttlSeconds": 1,
    });
    let mut a = Region::new("a", &pki, json!({"instances": 1}), &spec).await;
    a.start_agent().await;
    wait_for(
        "Decision=False UnknownRegion",
        Duration::from_secs(10),
        || {
            a.status()["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| {
                    c["type"] == "Decision"
                        && c["status"] == "False"
                        && c["reason"] == "UnknownRegion"
                })
        },
    )
    .await;
    // Nothing was done to the Cluster.
    assert!(a.cluster()["metadata"]["annotations"].is_null());
    a.assert_no_forbidden();
    a.kill_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_mode_does_not_promote() {
    let Setup {
        mut a,
        mut b,
        _witnesses,
    } = setup("manual").await;
    a.kill_agent();
    wait_for("b sees the lease expired", Duration::from_secs(10), || {
        b.status()["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["type"] == "Decision"
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("manual mode"))
            })
    })
    .await;
    // Several TTLs later, still a replica cluster of a.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = b.cluster();
    assert_eq!(c["spec"]["replica"]["primary"], "pg-a");
    assert_eq!(annotation(&c, cnpg::ANNOTATION_EPOCH), None);
    assert_eq!(b.status()["phase"], "Standby");
    assert!(b.status().get("lastFailover").is_none());
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "acquire"), ("result", "ok")]
        ),
        0
    );
    b.assert_no_forbidden();
    b.kill_agent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_cluster_patches_are_retried_and_promote_once() {
    let Setup {
        mut a,
        mut b,
        _witnesses,
    } = setup("automatic").await;
    // b's first three Cluster patches (the promotion) fail: 503, 503, 409.
    b.api
        .fail_next(Some("patch"), Some("clusters"), None, 2, 503);
    b.api
        .fail_next(Some("patch"), Some("clusters"), None, 1, 409);
    a.kill_agent();
    wait_for(
        "b promoted despite the faults",
        Duration::from_secs(15),
        || b.cluster()["spec"]["replica"]["primary"] == "pg-b",
    )
    .await;
    assert_eq!(
        annotation(&b.cluster(), cnpg::ANNOTATION_EPOCH).as_deref(),
        Some("2")
    );
    wait_for("status written", Duration::from_secs(10), || {
        b.status()["phase"] == "Primary"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "promote"), ("result", "failed")]
        ),
        3
    );
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_action_errors_total",
            &[("action", "promote"), ("error", "server_error")]
        ),
        2
    );
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_action_errors_total",
            &[("action", "promote"), ("error", "conflict")]
        ),
        1
    );
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "promote"), ("result", "ok")]
        ),
        1
    );
    // The lease was taken once: the retries re-decided Promote under the same epoch.
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "acquire"), ("result", "ok")]
        ),
        1
    );
    let promotes: Vec<_> = b
        .api
        .requests()
        .into_iter()
        .filter(|r| r.verb == "patch" && r.resource == "clusters" && r.code == 200)
        .collect();
    assert!(!promotes.is_empty());
    b.assert_no_forbidden();
    b.kill_agent();
}

/// Planned switchover by CNPG tokens (`continuum-agent switchover --continuum`):
/// the annotation on a's Continuum makes a record the intent, demote its
/// Cluster, record CNPG's demotion token (the test plays CNPG) at the
/// witnesses and release; b promotes with `promotionToken` at epoch 2 and
/// nothing is fenced. Manual mode: an operator's switchover needs no
/// automatic promotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_by_annotation_hands_over_with_cnpg_tokens() {
    let Setup {
        mut a,
        mut b,
        _witnesses,
    } = setup("manual").await;
    let admin_a = a.api.admin_client().unwrap();
    // A region that is not in the spec is refused.
    assert!(
        continuum_agent::continuum::switchover::request(&admin_a, NS, "app", "zz")
            .await
            .is_err()
    );
    // Asked of the standby region's cluster: refused, nothing annotated.
    let admin_b = b.api.admin_client().unwrap();
    let err = continuum_agent::continuum::switchover::request(&admin_b, NS, "app", "b")
        .await
        .expect_err("b's copy is not the primary's");
    assert!(
        format!("{err:#}").contains("against a's cluster"),
        "{err:#}"
    );
    assert!(annotation(
        &b.api.object(GROUP, "continuums", NS, "app").unwrap(),
        cnpg::ANNOTATION_SWITCHOVER_TO
    )
    .is_none());
    // To the region that is already primary: nothing to do.
    assert_eq!(
        continuum_agent::continuum::switchover::request(&admin_a, NS, "app", "a")
            .await
            .unwrap(),
        continuum_agent::continuum::switchover::Requested::AlreadyPrimary
    );
    assert_eq!(
        continuum_agent::continuum::switchover::request(&admin_a, NS, "app", "b")
            .await
            .unwrap(),
        continuum_agent::continuum::switchover::Requested::Annotated
    );
    wait_for("a demoted", Duration::from_secs(10), || {
        a.cluster()["spec"]["replica"]["primary"] == "pg-b"
    })
    .await;
    // Without CNPG's token, b does not move.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(b.cluster()["spec"]["replica"]["primary"], "pg-a");
    assert!(!fenced(&a.cluster()), "a switchover fences nothing");
    // CNPG demoted a cleanly and publishes the token.
    let token = "eyJsYXRlc3RDaGVja3BvaW50IjoiMC8zMDAwMDI4In0=";
    cnpg::cluster_api(admin_a.clone(), NS)
        .patch_status(
            "pg-a",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"demotionToken": token}})),
        )
        .await
        .unwrap();
    wait_for("b promoted with the token", Duration::from_secs(10), || {
        let c = b.cluster();
        c["spec"]["replica"]["primary"] == "pg-b" && c["spec"]["replica"]["promotionToken"] == token
    })
    .await;
    let c = b.cluster();
    assert_eq!(annotation(&c, cnpg::ANNOTATION_EPOCH).as_deref(), Some("2"));
    assert_ne!(
        annotation(&c, cnpg::ANNOTATION_PEER_ATTACHED).as_deref(),
        Some("false"),
        "the old primary stays attached as a replica"
    );
    wait_for("b reports the switchover", Duration::from_secs(10), || {
        let s = b.status();
        s["phase"] == "Primary"
            && s["epoch"] == 2
            && s["lastSwitchover"]["fromRegion"] == "a"
            && s["lastSwitchover"]["toRegion"] == "b"
            && s["lastSwitchover"]["epoch"] == 2
            && s["lastSwitchover"]["durationMs"].is_u64()
    })
    .await;
    let done = continuum_agent::continuum::switchover::wait_done(
        &admin_a,
        NS,
        "app",
        "b",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(done.requested_at.is_some() && done.demoted_at.is_some() && done.released_at.is_some());
    assert_eq!(done.epoch, Some(1));
    let s = a.status();
    assert_eq!(s["phase"], "Standby");
    assert!(
        a.api.object(GROUP, "continuums", NS, "app").unwrap()["metadata"]["annotations"]
            [cnpg::ANNOTATION_SWITCHOVER_TO]
            .is_null(),
        "the request annotation is removed"
    );
    assert!(!fenced(&a.cluster()) && !fenced(&b.cluster()));
    for (r, action) in [
        (&a, "demote"),
        (&a, "record_token"),
        (&a, "release"),
        (&b, "promote"),
    ] {
        assert_eq!(
            r.metric(
                "continuum_cnpg_failover_actions_total",
                &[("action", action), ("result", "ok")]
            ),
            1,
            "{} {action}",
            r.name
        );
    }
    let events = a.api.objects("events.k8s.io", "events");
    assert!(
        events.iter().any(|e| e["reason"] == "Demoting"),
        "a Demoting Event on a: {events:?}"
    );
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    a.kill_agent();
    b.kill_agent();
}

/// The finalizer: deleting a's Continuum releases the lease at the
/// witnesses (after recording "no synchronous standby", so b does not
/// promote), fences and unfences nothing, and lets the object go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_continuum_releases_the_lease_and_fences_nothing() {
    use continuum_agent::continuum::controller::FINALIZER;
    use continuum_shared::lease::{LeaseName, Read, Request, Response};
    let Setup {
        mut a,
        mut b,
        _witnesses,
    } = setup("automatic").await;
    for r in [&a, &b] {
        wait_for("finalizer added", Duration::from_secs(10), || {
            r.api.object(GROUP, "continuums", NS, "app").unwrap()["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
        })
        .await;
    }
    let before = a.cluster();
    let cts: Api<DynamicObject> =
        Api::namespaced_with(a.api.admin_client().unwrap(), NS, &continuum_ar());
    cts.delete("app", &Default::default()).await.unwrap();
    wait_for("a's Continuum gone", Duration::from_secs(10), || {
        a.api.object(GROUP, "continuums", NS, "app").is_none()
    })
    .await;
    // Released at the witnesses, "no synchronous standby" recorded first.
    let client = _witnesses[0].client().unwrap();
    let (_, resp) = client
        .send(&Request::Read(Read {
            name: LeaseName::new("continuum/db/app").unwrap(),
        }))
        .await
        .unwrap();
    let Response::State(view) = resp else {
        panic!("read answers a state: {resp:?}")
    };
    assert_eq!(view.holder, None, "released");
    assert_eq!(
        view.meta.as_ref().and_then(|m| m.sync_standby.clone()),
        None
    );
    // Nothing fenced or unfenced, the topology untouched; b does not promote.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = a.cluster();
    assert!(!fenced(&after));
    assert_eq!(after["spec"], before["spec"]);
    assert_eq!(b.cluster()["spec"]["replica"]["primary"], "pg-a");
    let events = a.api.objects("events.k8s.io", "events");
    assert!(
        events.iter().any(|e| e["reason"] == "Finalized"),
        "a Finalized Event: {events:?}"
    );
    assert_eq!(
        a.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "finalize"), ("result", "ok")]
        ),
        1,
        "finalize counted"
    );
    assert_eq!(
        a.gauge("continuum_cnpg_lease_held", &[("continuum", "db/app")]),
        None,
        "a deleted Continuum's series are removed"
    );
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    a.kill_agent();
    b.kill_agent();
}

/// A switchover whose successor never takes the lease (its agent is gone):
/// the demoted old primary takes the lease back after its handover timeout
/// and promotes its own Cluster again; the successor's Cluster never moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_switchover_is_taken_back_by_the_old_primary() {
    let Setup {
        mut a,
        mut b,
        _witnesses,
    } = setup("automatic").await;
    b.kill_agent();
    let admin_a = a.api.admin_client().unwrap();
    continuum_agent::continuum::switchover::request(&admin_a, NS, "app", "b")
        .await
        .unwrap();
    wait_for("a demoted", Duration::from_secs(10), || {
        a.cluster()["spec"]["replica"]["primary"] == "pg-b"
    })
    .await;
    cnpg::cluster_api(admin_a.clone(), NS)
        .patch_status(
            "pg-a",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"demotionToken": "dG9rZW4="}})),
        )
        .await
        .unwrap();
    wait_for("a released the lease", Duration::from_secs(10), || {
        a.status()["lastSwitchover"]["releasedAt"].is_string()
    })
    .await;
    wait_for(
        "a takes the lease back and promotes itself",
        Duration::from_secs(30),
        || {
            let c = a.cluster();
            c["spec"]["replica"]["primary"] == "pg-a"
                && annotation(&c, cnpg::ANNOTATION_EPOCH).as_deref() == Some("2")
        },
    )
    .await;
    assert_eq!(b.cluster()["spec"]["replica"]["primary"], "pg-a");
    a.assert_no_forbidden();
    a.kill_agent();
}

/// Every code path of the controller that talks to its own cluster's API
/// server, region a alone with one witness: leader election in
/// continuum-system (get: 404, create, then get + update renewals), the
/// watch (list, watch), the finalizer (Continuum patch), the witness Secret
/// (get), the Cluster (get; the epoch record: patch), status (patch) and
/// Events (create; the second of two identical ActionFailed Events: patch,
/// from two injected 503s on the Cluster patch). Stops early on a 403.
async fn rbac_scenario(pki: Arc<Pki>, rules: Vec<PolicyRule>) -> Vec<RequestRecord> {
    let w = WitnessProc::start(WitnessOpts::default().with_pki(pki.clone())).unwrap();
    let spec = json!({
        "regions": [{"name": "a", "cnpg": {"name": "pg-a"}}, {"name": "b", "cnpg": {"name": "pg-b"}}],
        "witnesses": {"urls": [w.api_url()], "tlsSecretRef": {"name": "witness-tls"}},
        "ttlSeconds": 1,
        "mode": "automatic",
        "syncPolicy": "preferred",
    });
    let mut a = Region::with_rules(
        "a",
        &pki,
        json!({"instances": 3, "replica": {"self": "pg-a", "primary": "pg-a", "source": "pg-b"}, "postgresql": sync_on("pg-b")}),
        &spec,
        rules,
    )
    .await;
    a.api
        .fail_next(Some("patch"), Some("clusters"), None, 2, 503);
    a.start_agent().await;
    let done = |r: &[RequestRecord]| {
        let seen = |group: &str, res: &str, verb: &str| {
            r.iter()
                .any(|x| x.group == group && x.resource == res && x.verb == verb && x.code < 300)
        };
        seen("events.k8s.io", "events", "patch")
            && seen("coordination.k8s.io", "leases", "update")
            && seen("dr.openova.io", "continuums", "patch")
            && r.iter().any(|x| {
                x.resource == "continuums"
                    && x.subresource.as_deref() == Some("status")
                    && x.code < 300
            })
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = a.api.requests();
        if done(&r) || r.iter().any(|x| x.code == 403) || tokio::time::Instant::now() >= end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.kill_agent();
    a.api.requests()
}

/// manifests/rbac/continuum-controller.yaml, derived from the request log:
/// no request refused, every grant (leader-election Role included: Leases
/// in continuum-system, get/update only by name) used, and removing any one
/// verb makes a request it covered fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_is_sufficient_and_minimal() {
    let pki = Arc::new(Pki::generate().unwrap());
    let rules = role_rules();
    assert!(rules
        .iter()
        .any(|r| r.namespace.as_deref() == Some("continuum-system")
            && r.resources == ["leases"]
            && r.resource_names == ["continuum-failover"]));
    let recorded = rbac_scenario(pki.clone(), rules.clone()).await;
    rbac_proof::assert_sufficient_and_used(&rules, &recorded, &[]);
    rbac_proof::assert_each_verb_needed(&rules, &[], 4, |fewer| rbac_scenario(pki.clone(), fewer))
        .await;
}

/// The lease as each witness sees it.
async fn witness_views(witnesses: &[WitnessProc]) -> Vec<continuum_shared::lease::LeaseView> {
    use continuum_shared::lease::{LeaseName, Read, Request, Response};
    let mut out = Vec::new();
    for w in witnesses {
        let client = w.client().unwrap();
        let (_, resp) = client
            .send(&Request::Read(Read {
                name: LeaseName::new("continuum/db/app").unwrap(),
            }))
            .await
            .unwrap();
        if let Response::State(view) = resp {
            out.push(view);
        }
    }
    out
}

/// (seq, confirmed LSN) of the lease metadata at each witness that has one.
async fn witness_metas(witnesses: &[WitnessProc]) -> Vec<(u64, Option<u64>)> {
    witness_views(witnesses)
        .await
        .into_iter()
        .filter_map(|v| v.meta.map(|m| (m.seq, m.confirmed_lsn)))
        .collect()
}

fn lsn(text: &str) -> u64 {
    text.parse::<continuum_shared::pg::Lsn>()
        .unwrap_or_else(|e| panic!("LSN {text:?}: {e}"))
        .0
}

async fn set_standby_names(pg: &PgRegion, value: Option<&str>) {
    let c = pg.connect().await.unwrap();
    match value {
        Some(v) => c
            .batch_execute(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{v}'"
            ))
            .await
            .unwrap(),
        None => c
            .batch_execute("ALTER SYSTEM RESET synchronous_standby_names")
            .await
            .unwrap(),
    }
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
}

/// Invariant 3 against a real PostgreSQL: the Cluster's spec already asks
/// CNPG for b as synchronous standby, but the running primary has not
/// applied it. The witnesses must not hear "b is synchronous" until the
/// server waits for b on every commit; then the confirmed LSN follows the
/// commits, and b's promotion reports its replay position, which holds
/// everything a confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_is_recorded_only_once_the_running_primary_requires_it() {
    let pg_a = PgRegion::primary("pg-a", "pg-b").unwrap();
    let pg_b = PgRegion::standby_of(&pg_a, "pg-b").unwrap();
    // CNPG has not reconciled the spec into the server yet.
    set_standby_names(&pg_a, Some("")).await;

    let pki = Arc::new(Pki::generate().unwrap());
    let witnesses: Vec<WitnessProc> = (0..3)
        .map(|_| WitnessProc::start(WitnessOpts::default().with_pki(pki.clone())).unwrap())
        .collect();
    let conn = |n: &str| json!({"name": n, "key": "uri"});
    let spec = json!({
        "regions": [
            {"name": "a", "cnpg": {"name": "pg-a", "connectionSecretRef": conn("pg-a-conn")}},
            {"name": "b", "cnpg": {"name": "pg-b", "connectionSecretRef": conn("pg-b-conn")}},
        ],
        "witnesses": {"urls": witnesses.iter().map(|w| w.api_url()).collect::<Vec<_>>(), "tlsSecretRef": {"name": "witness-tls"}},
        "ttlSeconds": 1,
        "mode": "automatic",
        "syncPolicy": "preferred",
    });
    let mut a = Region::new(
        "a",
        &pki,
        json!({"instances": 1, "replica": {"self": "pg-a", "primary": "pg-a", "source": "pg-b"}, "postgresql": sync_on("pg-b")}),
        &spec,
    )
    .await;
    let mut b = Region::new(
        "b",
        &pki,
        json!({"instances": 1, "replica": {"self": "pg-b", "primary": "pg-a", "source": "pg-a"}, "postgresql": sync_on("pg-a")}),
        &spec,
    )
    .await;
    a.put_connection_secret("pg-a-conn", &pg_a.conninfo()).await;
    b.put_connection_secret("pg-b-conn", &pg_b.conninfo()).await;
    a.put_connection_secret("pg-a-follow", &pg_b.conninfo())
        .await;
    b.put_connection_secret("pg-b-follow", &pg_a.conninfo())
        .await;
    a.start_agent().await;
    b.start_agent().await;

    const WAITING: &str =
        "waiting for CloudNativePG to apply the synchronous standby to the running primary";
    wait_for(
        "a holds and waits for CNPG",
        Duration::from_secs(20),
        || {
            let s = a.status();
            s["phase"] == "Primary"
                && s["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Decision" && c["message"] == WAITING)
        },
    )
    .await;
    // Well past the metadata refresh period and many ticks: b is never
    // recorded while the server does not wait for it.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let s = a.status();
        assert_ne!(
            s["synchronousStandby"], "b",
            "b recorded as synchronous before the running primary required it: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The spec was already right: no patch storm while waiting.
    let patches = a
        .api
        .requests()
        .into_iter()
        .filter(|r| r.verb == "patch" && r.resource == cnpg::PLURAL)
        .count();
    assert!(
        patches <= 2,
        "{patches} Cluster patches while waiting for CNPG"
    );

    // CNPG applies the spec.
    set_standby_names(&pg_a, None).await;
    wait_for(
        "a records b with a confirmed LSN",
        Duration::from_secs(10),
        || {
            let s = a.status();
            s["synchronousStandby"] == "b" && s["confirmedLsn"].is_string()
        },
    )
    .await;
    let first = lsn(a.status()["confirmedLsn"].as_str().unwrap());
    let c = pg_a.connect().await.unwrap();
    c.batch_execute("CREATE TABLE t (v int); INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    wait_for(
        "the confirmed LSN follows the commits",
        Duration::from_secs(10),
        || {
            a.status()["confirmedLsn"]
                .as_str()
                .is_some_and(|l| lsn(l) > first)
        },
    )
    .await;
    assert_eq!(
        a.gauge("continuum_cnpg_peer_reachable", &[("peer", "b")]),
        Some(1),
        "b streams from a"
    );
    wait_for("b sees a holding", Duration::from_secs(5), || {
        b.gauge("continuum_cnpg_peer_reachable", &[("peer", "a")]) == Some(1)
    })
    .await;

    // a's agent restarts: the new process adopts the grant (same epoch), and
    // its records must outrank the earlier process's at the witnesses, or a
    // later "no synchronous standby" would be silently dropped.
    let before = witness_metas(&witnesses).await;
    let old_seq = before.iter().map(|(s, _)| *s).max().unwrap();
    a.kill_agent();
    a.start_agent().await;
    c.batch_execute("INSERT INTO t SELECT generate_series(1001, 2000)")
        .await
        .unwrap();
    let old_lsn = before.iter().filter_map(|(_, l)| *l).max().unwrap_or(0);
    // The new process's own record (status is written after a majority
    // stored it) carries the new commits...
    wait_for(
        "the restarted agent records the new commits",
        Duration::from_secs(10),
        || {
            a.status()["confirmedLsn"]
                .as_str()
                .is_some_and(|l| lsn(l) > old_lsn)
        },
    )
    .await;
    let local = lsn(a.status()["confirmedLsn"].as_str().unwrap());
    // ...and the witnesses hold it, not the earlier process's record.
    let after = witness_metas(&witnesses).await;
    assert!(
        after.iter().filter(|(s, l)| *s > old_seq && l.is_some_and(|l| l >= local)).count() >= 2,
        "the restarted agent's update lost to the old process's (seq {old_seq}, LSN {old_lsn:#x}); local {local:#x}, witnesses {after:?}"
    );

    // Region a's agent dies; a's last confirmed LSN stays at the witnesses.
    wait_for(
        "a's status after the restart",
        Duration::from_secs(10),
        || a.status()["confirmedLsn"].is_string(),
    )
    .await;
    let confirmed = lsn(a.status()["confirmedLsn"].as_str().unwrap());
    a.kill_agent();
    wait_for("b promoted", Duration::from_secs(15), || {
        b.status()["lastFailover"]["lsnAtPromotion"].is_string()
    })
    .await;
    let at_promotion = lsn(b.status()["lastFailover"]["lsnAtPromotion"]
        .as_str()
        .unwrap());
    assert!(
        at_promotion >= confirmed,
        "b promoted at {at_promotion:#x}, below a's confirmed {confirmed:#x}"
    );
    let rows: i64 = pg_b
        .connect()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2000, "every commit a acknowledged is on b");
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    b.kill_agent();
}

/// Two regions whose Continuum names PostgreSQL connections (no CNPG),
/// three witnesses, both agents running. Returns once a holds the lease and
/// its running server requires b on every commit, b's agent waits as the
/// standby, and the epoch table replicated to b.
struct PgSetup {
    pg_a: PgRegion,
    pg_b: PgRegion,
    a: Region,
    b: Region,
    witnesses: Vec<WitnessProc>,
}

async fn pg_setup() -> PgSetup {
    let pg_a = PgRegion::primary("a", "b").unwrap();
    let pg_b = PgRegion::standby_of(&pg_a, "b").unwrap();
    // The server starts asynchronous: the agent must require b itself.
    set_standby_names(&pg_a, Some("")).await;
    pg_a.connect()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE drill_writes (id bigint PRIMARY KEY, region int NOT NULL)")
        .await
        .unwrap();
    let pki = Arc::new(Pki::generate().unwrap());
    let witnesses: Vec<WitnessProc> = (0..3)
        .map(|_| WitnessProc::start(WitnessOpts::default().with_pki(pki.clone())).unwrap())
        .collect();
    // primaryConninfoSecretRef: how each server streams from the other once
    // a switchover makes it the standby.
    let conn = |n: &str| {
        json!({
            "connectionSecretRef": {"name": format!("pg-{n}-conn"), "key": "uri"},
            "primaryConninfoSecretRef": {"name": format!("pg-{n}-follow"), "key": "uri"},
        })
    };
    let spec = json!({
        "regions": [{"name": "a", "postgres": conn("a")}, {"name": "b", "postgres": conn("b")}],
        "witnesses": {"urls": witnesses.iter().map(|w| w.api_url()).collect::<Vec<_>>(), "tlsSecretRef": {"name": "witness-tls"}},
        "ttlSeconds": 1,
        "mode": "automatic",
        "syncPolicy": "preferred",
    });
    let mut a = Region::new("a", &pki, Value::Null, &spec).await;
    let mut b = Region::new("b", &pki, Value::Null, &spec).await;
    a.put_connection_secret("pg-a-conn", &pg_a.conninfo()).await;
    b.put_connection_secret("pg-b-conn", &pg_b.conninfo()).await;
    a.put_connection_secret("pg-a-follow", &pg_b.conninfo())
        .await;
    b.put_connection_secret("pg-b-follow", &pg_a.conninfo())
        .await;
    a.start_agent().await;
    b.start_agent().await;
    wait_for(
        "a primary at epoch 1, b recorded with a confirmed LSN",
        Duration::from_secs(20),
        || {
            let s = a.status();
            s["phase"] == "Primary"
                && s["epoch"] == 1
                && s["synchronousStandby"] == "b"
                && s["confirmedLsn"].is_string()
        },
    )
    .await;
    // The running server waits for b: the agent set it, not the test.
    let names: String = scalar(&pg_a, "SHOW synchronous_standby_names", &[]).await;
    assert_eq!(names, "FIRST 1 (\"b\")");
    wait_for("b standby of a", Duration::from_secs(10), || {
        let s = b.status();
        s["phase"] == "Standby" && s["primaryRegion"] == "a"
    })
    .await;
    assert_eq!(db_epoch(&pg_b).await, Some(1), "epoch 1 replicated to b");
    PgSetup {
        pg_a,
        pg_b,
        a,
        b,
        witnesses,
    }
}

/// The one value `sql` returns on `pg`.
async fn scalar<T>(
    pg: &PgRegion,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    pg.connect()
        .await
        .unwrap()
        .query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// `continuum.epoch` of a server (None: no table yet).
async fn db_epoch(pg: &PgRegion) -> Option<i64> {
    let c = pg.connect().await.ok()?;
    let row = c
        .query_opt("SELECT epoch FROM continuum.epoch WHERE id = 1", &[])
        .await
        .ok()??;
    row.try_get(0).ok()
}

async fn server_fenced(pg: &PgRegion) -> bool {
    continuum_shared::pg::backend::is_fenced(&pg.conninfo())
        .await
        .unwrap_or(false)
}

fn start_writer(
    pg_a: &PgRegion,
    pg_b: &PgRegion,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<continuum_tests::drill::writer::WriterLog>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = tokio::spawn(continuum_tests::drill::writer::run(
        vec![pg_a.conninfo(), pg_b.conninfo()],
        0,
        1,
        stop.clone(),
    ));
    (stop, task)
}

/// How many of the writer's acknowledged commits are on `pg`, and how many
/// there were.
async fn acked_on(
    pg: &PgRegion,
    log: &continuum_tests::drill::writer::WriterLog,
) -> (usize, usize) {
    let ids: Vec<i64> = log.acks.iter().map(|k| k.id).collect();
    let present: i64 = scalar(
        pg,
        "SELECT count(*) FROM drill_writes WHERE id = ANY($1)",
        &[&ids],
    )
    .await;
    (present as usize, ids.len())
}

/// Region a dies (agent and server, kill -9) under a continuous writer: b's
/// agent promotes its server once (pg_promote after replay caught up), with
/// every commit a acknowledged; status, Events and metrics say so. a's
/// server returns unfenced, as it was; its agent fences it under the newer
/// epoch and it stays fenced (invariants 3-5 through the direct back-end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_regions_fail_over_without_loss_and_the_old_primary_stays_fenced() {
    let PgSetup {
        mut pg_a,
        pg_b,
        mut a,
        mut b,
        witnesses: _witnesses,
    } = pg_setup().await;
    let (stop, writer) = start_writer(&pg_a, &pg_b);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let confirmed = lsn(a.status()["confirmedLsn"].as_str().unwrap());

    // Region death.
    a.kill_agent();
    pg_a.kill9().unwrap();
    wait_for("b promoted", Duration::from_secs(15), || {
        let s = b.status();
        s["phase"] == "Primary"
            && s["epoch"] == 2
            && s["lastFailover"]["lsnAtPromotion"].is_string()
    })
    .await;
    // The writer goes on against b.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = writer.await.unwrap();
    let on_a = log.acks.iter().filter(|k| k.region == 0).count();
    let on_b = log.acks.iter().filter(|k| k.region == 1).count();
    assert!(on_a > 0 && on_b > 0, "acks on a {on_a}, on b {on_b}");
    let (present, acked) = acked_on(&pg_b, &log).await;
    assert_eq!(present, acked, "every acknowledged commit is on b");
    let at_promotion = lsn(b.status()["lastFailover"]["lsnAtPromotion"]
        .as_str()
        .unwrap());
    assert!(
        at_promotion >= confirmed,
        "b promoted at {at_promotion:#x}, below a's confirmed {confirmed:#x}"
    );
    assert_eq!(db_epoch(&pg_b).await, Some(2), "b's server records epoch 2");
    assert_eq!(
        b.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "promote"), ("result", "ok")]
        ),
        1
    );
    let events = b.api.objects("events.k8s.io", "events");
    assert!(
        events.iter().any(|e| e["reason"] == "Promoted"
            && e["note"].as_str().is_some_and(|n| n.contains("pg_promote"))),
        "a Promoted Event on b: {events:?}"
    );

    // a returns as it died: a primary, not fenced (kill -9 left no fence).
    pg_a.start().unwrap();
    assert!(!server_fenced(&pg_a).await, "kill -9 left a unfenced");
    a.start_agent().await;
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !server_fenced(&pg_a).await {
        assert!(tokio::time::Instant::now() < end, "a's server never fenced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and stays fenced while b is primary at the newer epoch. A read that
    // fails (a session cut by a repeated fence) proves nothing either way;
    // most reads must answer.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut answered = 0;
    while tokio::time::Instant::now() < until {
        match continuum_shared::pg::backend::is_fenced(&pg_a.conninfo()).await {
            Ok(fenced) => {
                assert!(fenced, "a's server was unfenced");
                answered += 1;
            }
            Err(e) => eprintln!("fence check did not answer: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered >= 10, "only {answered} fence checks answered");
    let write = pg_a
        .connect()
        .await
        .unwrap()
        .execute("INSERT INTO drill_writes VALUES (-1, 0)", &[])
        .await;
    assert!(write.is_err(), "the fenced former primary took a write");
    assert_eq!(a.status()["phase"], "Fenced");
    assert_eq!(b.status()["epoch"], 2);
    let events = a.api.objects("events.k8s.io", "events");
    assert!(
        events.iter().any(|e| e["reason"] == "Fenced"),
        "a Fenced Event on a: {events:?}"
    );
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    a.kill_agent();
    b.kill_agent();
}

/// Polls the async `cond` until it holds.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Plays the server's supervisor (kubelet, systemd): waits until the agent
/// has stopped `pg`, checks that it shut down cleanly, and starts it again.
async fn restart_once_stopped(pg: &mut PgRegion, limit: Duration) {
    let end = tokio::time::Instant::now() + limit;
    while pg.is_running() {
        assert!(
            tokio::time::Instant::now() < end,
            "{}'s server was never stopped; log:\n{}",
            pg.name(),
            pg.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = pg.log_tail();
    assert!(
        log.contains("received fast shutdown request")
            && log.contains("database system is shut down"),
        "{} did not shut down fast and cleanly:\n{log}",
        pg.name()
    );
    pg.start().unwrap();
}

/// The streaming standby `app` of `pg`, if any.
async fn streams_to(pg: &PgRegion, app: &str) -> bool {
    let Ok(c) = pg.connect().await else {
        return false;
    };
    c.query_opt(
        "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
        &[&app],
    )
    .await
    .ok()
    .flatten()
    .is_some()
}

/// One leg of a planned switchover of `postgres` regions, from `old` to
/// `new`, requested through `old`'s copy of the Continuum with the same
/// call `continuum-agent switchover --continuum` makes. The old server is
/// fenced, stopped (fast) and, restarted by its supervisor, streams from the
/// new primary without a rebuild; the new one promotes at the next epoch.
async fn switch_over(
    (old, pg_old): (&Region, &mut PgRegion),
    (new, pg_new): (&Region, &PgRegion),
    epoch: u64,
) {
    use continuum_agent::continuum::switchover;
    let admin = old.api.admin_client().unwrap();
    assert_eq!(
        switchover::request(&admin, NS, "app", new.name)
            .await
            .unwrap(),
        switchover::Requested::Annotated
    );
    restart_once_stopped(pg_old, Duration::from_secs(20)).await;
    let in_recovery: bool = scalar(pg_old, "SELECT pg_is_in_recovery()", &[]).await;
    assert!(in_recovery, "{} came back as a standby", old.name);
    let done = switchover::wait_done(&admin, NS, "app", new.name, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        done.requested_at.is_some() && done.demoted_at.is_some() && done.released_at.is_some(),
        "{done:?}"
    );
    assert_eq!(done.epoch, Some(epoch - 1));
    wait_for(
        &format!("{} reports the switchover at epoch {epoch}", new.name),
        Duration::from_secs(20),
        || {
            let s = new.status();
            s["phase"] == "Primary"
                && s["epoch"] == epoch
                && s["lastSwitchover"]["fromRegion"] == old.name
                && s["lastSwitchover"]["toRegion"] == new.name
                && s["lastSwitchover"]["epoch"] == epoch
        },
    )
    .await;
    // No rebuild: the old server streams from the new primary, which
    // requires it again and records it at the witnesses.
    eventually(
        &format!("{} streams from {}", old.name, new.name),
        Duration::from_secs(20),
        || streams_to(pg_new, old.name),
    )
    .await;
    wait_for(
        &format!("{} records {} as synchronous", new.name, old.name),
        Duration::from_secs(20),
        || new.status()["synchronousStandby"] == old.name,
    )
    .await;
    wait_for(
        &format!("{} reports Standby", old.name),
        Duration::from_secs(10),
        || old.status()["phase"] == "Standby",
    )
    .await;
    assert_eq!(db_epoch(pg_new).await, Some(epoch as i64));
    assert!(
        old.api.object(GROUP, "continuums", NS, "app").unwrap()["metadata"]["annotations"]
            [cnpg::ANNOTATION_SWITCHOVER_TO]
            .is_null(),
        "the request annotation is removed"
    );
}

/// Planned switchover a -> b and failback b -> a of `postgres` regions,
/// through the resource, under a continuous writer: nothing acknowledged
/// is lost, the two regions never acknowledge at the same time, the epoch
/// goes 1 -> 2 -> 3, and neither old primary is rebuilt: each, stopped by
/// its agent and restarted by its supervisor, streams from the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_switchover_and_failback_through_the_resource_rebuild_nothing() {
    let PgSetup {
        mut pg_a,
        mut pg_b,
        mut a,
        mut b,
        witnesses: _witnesses,
    } = pg_setup().await;
    let (stop, writer) = start_writer(&pg_a, &pg_b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    switch_over((&a, &mut pg_a), (&b, &pg_b), 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    switch_over((&b, &mut pg_b), (&a, &pg_a), 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = writer.await.unwrap();

    // The writer moved a -> b -> a, never back and forth: one region
    // acknowledged at a time.
    let mut runs: Vec<usize> = log.acks.iter().map(|k| k.region).collect();
    runs.dedup();
    assert_eq!(runs, vec![0, 1, 0], "acknowledging regions in order");
    for pg in [&pg_a, &pg_b] {
        eventually(
            &format!("every acknowledged commit on {}", pg.name()),
            Duration::from_secs(10),
            || async {
                let (present, acked) = acked_on(pg, &log).await;
                present == acked
            },
        )
        .await;
    }
    for (r, action, n) in [
        (&a, "record_final_lsn", 1),
        (&a, "stop_for_handover", 1),
        (&a, "release", 1),
        (&a, "promote", 1),
        (&b, "record_final_lsn", 1),
        (&b, "stop_for_handover", 1),
        (&b, "release", 1),
        (&b, "promote", 1),
    ] {
        assert_eq!(
            r.metric(
                "continuum_cnpg_failover_actions_total",
                &[("action", action), ("result", "ok")]
            ),
            n,
            "{} {action}",
            r.name
        );
    }
    for r in [&a, &b] {
        let events = r.api.objects("events.k8s.io", "events");
        for reason in [
            "FinalPositionRecorded",
            "StoppedForHandover",
            "LeaseReleased",
            "Promoted",
        ] {
            assert!(
                events.iter().any(|e| e["reason"] == reason),
                "a {reason} Event on {}: {events:?}",
                r.name
            );
        }
    }
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    a.kill_agent();
    b.kill_agent();
}

/// The witnesses die while a writer commits to a: a's fence guard fences
/// the server by its conservative deadline, so no commit is acknowledged
/// later than one TTL after the last renewal could have been sent (the
/// witnesses' kill), and b, without a majority, never promotes
/// (invariant 2 through the direct back-end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_primary_fences_itself_when_the_witnesses_are_lost() {
    let PgSetup {
        pg_a,
        pg_b,
        mut a,
        mut b,
        mut witnesses,
    } = pg_setup().await;
    let (stop, writer) = start_writer(&pg_a, &pg_b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = std::time::Instant::now();
    for w in witnesses.iter_mut() {
        w.kill9();
    }
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !server_fenced(&pg_a).await {
        assert!(tokio::time::Instant::now() < end, "a's server never fenced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = writer.await.unwrap();
    let last_a = log
        .acks
        .iter()
        .filter(|k| k.region == 0)
        .map(|k| k.at)
        .max()
        .expect("a acknowledged writes before the witnesses died");
    let ttl = Duration::from_secs(1);
    assert!(
        last_a < killed + ttl,
        "a acknowledged a commit {:?} after the witnesses died (TTL {ttl:?})",
        last_a - killed
    );
    assert!(
        log.acks.iter().all(|k| k.region == 0),
        "b acknowledged writes without a majority"
    );
    assert!(
        a.metric(
            "continuum_cnpg_failover_actions_total",
            &[("action", "fence"), ("result", "ok")]
        ) >= 1
    );
    let in_recovery: bool = scalar(&pg_b, "SELECT pg_is_in_recovery()", &[]).await;
    assert!(in_recovery, "b promoted without a majority");
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    a.kill_agent();
    b.kill_agent();
}

/// Versions of an object with the instant each arrived.
type History = Arc<std::sync::Mutex<Vec<(tokio::time::Instant, Value)>>>;

/// Every version of `r`'s Cluster written from now on (a watch from its
/// current resourceVersion, resumed if the stream ends), with the instant
/// it arrived: a fence that is lifted again a moment later is still seen.
fn cluster_history(r: &Region) -> (History, tokio::task::JoinHandle<()>) {
    use futures::TryStreamExt;
    use kube::api::{WatchEvent, WatchParams};
    let clusters = cnpg::cluster_api(r.api.admin_client().unwrap(), NS);
    let name = format!("pg-{}", r.name);
    let mut rv = r.cluster()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok(stream) = clusters.watch(&WatchParams::default(), &rv).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let mut stream = Box::pin(stream);
            while let Ok(Some(ev)) = stream.try_next().await {
                let obj = match ev {
                    WatchEvent::Added(o) | WatchEvent::Modified(o) => o,
                    WatchEvent::Error(e) => panic!("Cluster watch: {e:?}"),
                    _ => continue,
                };
                if let Some(v) = obj.metadata.resource_version.clone() {
                    rv = v;
                }
                if obj.metadata.name.as_deref() == Some(name.as_str()) {
                    let v = serde_json::to_value(&obj).unwrap();
                    out.lock().unwrap().push((tokio::time::Instant::now(), v));
                }
            }
        }
    });
    (seen, task)
}

/// First instant a recorded version satisfied `cond`.
fn first_when(history: &History, cond: impl Fn(&Value) -> bool) -> Option<tokio::time::Instant> {
    history
        .lock()
        .unwrap()
        .iter()
        .find(|(_, v)| cond(v))
        .map(|(t, _)| *t)
}

const ACTIONS: &str = "continuum_cnpg_failover_actions_total";

/// `r`'s agent fenced exactly once since it counted `before` fences, and its
/// guard never stood down for a successor.
fn assert_fenced_once_without_handover(r: &Region, before: u64) {
    assert_eq!(
        r.metric(ACTIONS, &[("action", "fence"), ("result", "ok")]),
        before + 1
    );
    assert_eq!(
        r.metric(ACTIONS, &[("action", "fence"), ("result", "handed_over")]),
        0
    );
}

/// A rolling update of region a's Deployment: two agents of a share the
/// leader Lease; the leading one gets SIGTERM. It stops its controller,
/// releases the leader Lease, and its fence guard watches the witnesses:
/// the other instance takes over at its next attempt, adopts the live grant
/// (same epoch) and records under it, so the old guard stands down. a's
/// Cluster is never fenced (every version of it is watched), b never
/// promotes, the epoch at the witnesses stays 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leader_handover_adopts_without_fencing() {
    let Setup {
        mut a,
        b,
        _witnesses,
    } = setup_with("automatic", 5).await;
    let (a_history, a_watch) = cluster_history(&a);
    let (b_history, b_watch) = cluster_history(&b);
    let a2 = Instance::start(&a.api, "a", "agent-a2").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.agent.as_ref().unwrap().leading(), "agent-a leads");
    assert!(!a2.leading(), "agent-a2 follows");
    // Counted from here (a fences its Cluster once while starting up,
    // before it first acquires the lease).
    let fences_before = a.metric(ACTIONS, &[("action", "fence"), ("result", "ok")]);
    let fenced_events = |r: &Region| {
        r.api
            .objects("events.k8s.io", "events")
            .iter()
            .filter(|e| e["reason"] == "Fenced")
            .count()
    };
    let fenced_events_before = fenced_events(&a);
    let before = witness_views(&_witnesses).await;
    assert!(before
        .iter()
        .all(|v| v.epoch.0 == 1 && v.holder.as_ref().map(|h| h.as_str()) == Some("a")));

    let t0 = tokio::time::Instant::now();
    a.shutdown_agent().await;
    let took = t0.elapsed();
    // The guard stood down (well before its deadline, < one TTL).
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(a2.leading(), "agent-a2 took the leader Lease over");
    let old = |labels: &[(&str, &str)]| a.metric(ACTIONS, labels);
    assert_eq!(old(&[("action", "fence"), ("result", "handed_over")]), 1);
    assert_eq!(old(&[("action", "fence"), ("result", "ok")]), fences_before);
    assert_eq!(
        a2.metric(ACTIONS, &[("action", "fence"), ("result", "ok")]),
        0
    );
    assert_eq!(
        a2.metric(ACTIONS, &[("action", "adopt"), ("result", "ok")]),
        1
    );
    assert_eq!(
        a2.metric(ACTIONS, &[("action", "acquire"), ("result", "ok")]),
        0
    );
    // The leader Lease was released (empty holder), then taken by agent-a2.
    let lease = a
        .api
        .object(
            "coordination.k8s.io",
            "leases",
            "continuum-system",
            "continuum-failover",
        )
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "agent-a2");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // Several TTLs on: a2 keeps holding epoch 1; nothing fenced, b waits.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!fenced(&a.cluster()));
        assert_eq!(b.cluster()["spec"]["replica"]["primary"], "pg-a");
    }
    let s = a.status();
    assert_eq!(s["phase"], "Primary");
    assert_eq!(s["epoch"], 1);
    let after = witness_views(&_witnesses).await;
    assert!(
        after
            .iter()
            .all(|v| v.max_epoch.0 == 1 && v.holder.as_ref().map(|h| h.as_str()) == Some("a")),
        "{after:?}"
    );
    // The watch was live throughout: a write made now reaches it (nothing
    // else wrote a's Cluster during the handover).
    cnpg::cluster_api(a.api.admin_client().unwrap(), NS)
        .patch(
            "pg-a",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"test/probe": "1"}}})),
        )
        .await
        .unwrap();
    wait_for("the watch sees the probe", Duration::from_secs(5), || {
        first_when(&a_history, |c| c["metadata"]["labels"]["test/probe"] == "1").is_some()
    })
    .await;
    a_watch.abort();
    b_watch.abort();
    assert_eq!(first_when(&a_history, fenced), None, "a was never fenced");
    assert_eq!(
        first_when(&b_history, |c| c["spec"]["replica"]["primary"] == "pg-b"),
        None,
        "b never promoted"
    );
    assert_eq!(
        b.metric(ACTIONS, &[("action", "acquire"), ("result", "ok")]),
        0
    );
    let events = a.api.objects("events.k8s.io", "events");
    assert!(
        events.iter().any(|e| e["reason"] == "FenceHandedOver"),
        "a FenceHandedOver Event: {events:?}"
    );
    assert_eq!(
        fenced_events(&a),
        fenced_events_before,
        "no Fenced Event since: {events:?}"
    );
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    drop(a2);
}

/// SIGTERM with no other agent of region a: nobody adopts, so the old fence
/// guard fences a's Cluster at its last deadline, which is before the
/// witnesses' lease can expire (invariant 2): the fenced version of a's
/// Cluster is written before b promotes, and shutdown returns within one
/// TTL. b then promotes as after a region death.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_without_successor_fences_by_the_deadline() {
    let Setup {
        mut a,
        mut b,
        _witnesses,
    } = setup_with("automatic", 2).await;
    let (a_history, a_watch) = cluster_history(&a);
    let (b_history, b_watch) = cluster_history(&b);
    // Counted from here (a fences once while starting up).
    let fences_before = a.metric(ACTIONS, &[("action", "fence"), ("result", "ok")]);
    assert!(!fenced(&a.cluster()));
    let t0 = tokio::time::Instant::now();
    a.shutdown_agent().await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert!(fenced(&a.cluster()), "fenced when shutdown returns");
    assert_fenced_once_without_handover(&a, fences_before);
    wait_for("b promoted", Duration::from_secs(15), || {
        b.cluster()["spec"]["replica"]["primary"] == "pg-b"
    })
    .await;
    assert_eq!(
        annotation(&b.cluster(), cnpg::ANNOTATION_EPOCH).as_deref(),
        Some("2")
    );
    // Give the watches a moment to deliver the last versions.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_watch.abort();
    b_watch.abort();
    let fenced_at = first_when(&a_history, fenced).expect("a's fenced version seen");
    let promoted_at = first_when(&b_history, |c| c["spec"]["replica"]["primary"] == "pg-b")
        .expect("b's promotion seen");
    assert!(
        fenced_at < promoted_at,
        "a fenced {:?} before b promoted",
        promoted_at - fenced_at
    );
    assert!(
        fenced_at - t0 < Duration::from_secs(2),
        "fenced within one TTL"
    );
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    b.kill_agent();
}

/// Invariant 2 through the fence guard alone, `postgres` back-end: a's
/// agent shuts down (SIGTERM) with no other agent of its region to adopt
/// the grant, so its decision loop is gone and only the guard can fence.
/// It fences the running server by the grant's deadline (before shutdown
/// returns), a acknowledges no write after that, and b promotes with every
/// acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_guard_fences_when_the_agent_stops_without_successor() {
    let PgSetup {
        pg_a,
        pg_b,
        mut a,
        mut b,
        witnesses: _witnesses,
    } = pg_setup().await;
    let (stop, writer) = start_writer(&pg_a, &pg_b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fences_before = a.metric(ACTIONS, &[("action", "fence"), ("result", "ok")]);
    assert!(!server_fenced(&pg_a).await);
    let t0 = tokio::time::Instant::now();
    a.shutdown_agent().await;
    let shut = tokio::time::Instant::now();
    assert!(
        shut - t0 < Duration::from_secs(2),
        "shutdown took {:?}",
        shut - t0
    );
    assert!(server_fenced(&pg_a).await, "fenced when shutdown returns");
    assert_fenced_once_without_handover(&a, fences_before);
    wait_for("b promoted", Duration::from_secs(15), || {
        let s = b.status();
        s["phase"] == "Primary" && s["epoch"] == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = writer.await.unwrap();
    let last_on_a = log
        .acks
        .iter()
        .filter(|k| k.region == 0)
        .map(|k| k.at)
        .max();
    let last_on_a = tokio::time::Instant::from_std(last_on_a.expect("a acknowledged writes"));
    assert!(
        last_on_a <= shut,
        "a acknowledged a write {:?} after its fence",
        last_on_a - shut
    );
    let mut runs: Vec<usize> = log.acks.iter().map(|k| k.region).collect();
    runs.dedup();
    assert_eq!(runs, vec![0, 1], "acknowledging regions in order");
    let (present, acked) = acked_on(&pg_b, &log).await;
    assert_eq!(present, acked, "every acknowledged commit is on b");
    a.assert_no_forbidden();
    b.assert_no_forbidden();
    b.kill_agent();
}
