//! The Continuum controller: a kube-runtime Controller over `Continuum`
//! resources in this region's cluster. For each resource it runs the same
//! observe -> decide -> apply pipeline as the direct-PostgreSQL runner
//! (`crate::failover`), with this region's database (its CNPG Cluster, or a
//! PostgreSQL server over a connection: [`super::database`]) and the
//! witnesses named in the spec (lease `continuum/<namespace>/<name>`).
//!
//! Each agent changes only its own region's database; the other region's
//! agent does the same there, and the two meet only at the witnesses.
//!
//! Beside the reconcile loop (requeued every tick), each resource has:
//!
//! * a renewer task per grant (renews about every TTL/3 until its
//!   conservative deadline), and
//! * a fence guard that fences the Cluster the instant the deadline passes
//!   without renewal, whatever the reconcile loop is doing (invariant 2).
//!   It survives the loss of leadership and the removal of the runner: it
//!   then fences at the last deadline and exits, unless the witnesses show
//!   before that deadline that another agent of this region (the new
//!   leader) adopted the grant and recorded under it: then it stands down
//!   (`fence` counted as `handed_over`), so a leader change fences nothing.
//!
//! Nothing is kept that cannot be re-derived: after a restart the decision
//! starts again from the Cluster's spec and annotations and the witnesses'
//! majority view, so every action is idempotent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use continuum_shared::failover::{self, Action, DbState, Held, Mode, Observation, SyncPolicy};
use continuum_shared::lease::{HolderId, LeaseMeta, LeaseName};
use continuum_shared::quorum::{Grant, MajorityView, QuorumClient, QuorumConfig};
use continuum_shared::transport::https::TlsMaterial;
use continuum_shared::transport::LeaseTransport;
use continuum_shared::transport::{witness_transport, WitnessProtocol};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde_json::json;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::cnpg::{self, ClusterHandle, Names};
use super::crd::{
    Condition, Continuum, ContinuumStatus, DatabaseRef, FailoverMode, LastFailover, LastSwitchover,
    SpecError, SyncPolicySpec,
};
use super::database::{self, Database, DbError, PgHandoverStep, PgHandoverView, Postgres};
use super::dbfacts;

/// Controller settings that are not per resource.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This region's id (must be one of each Continuum's `spec.regions`).
    pub region: HolderId,
    /// Decision period while nothing changes.
    pub tick: Duration,
    /// Largest clock-rate difference to any witness (fraction).
    pub max_drift: f64,
    /// Safety margin subtracted from every lease deadline.
    pub margin: Duration,
    /// Event reporter instance (pod name).
    pub instance: String,
    /// How often a steady primary re-records its metadata (with a
    /// `connectionSecretRef`, for a current confirmed LSN).
    pub meta_refresh: Duration,
}

/// Errors of one reconcile (the decision loop itself never fails: actions
/// that fail are counted and decided again next tick).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecError),
    #[error("witness TLS secret {0}: {1}")]
    Tls(String, String),
    #[error("database connection secret {0}: {1}")]
    Connection(String, String),
    #[error("quorum client: {0}")]
    Quorum(String),
    #[error("status update: {0}")]
    Status(kube::Error),
    #[error("finalizer update: {0}")]
    Finalizer(kube::Error),
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Spec(e) => e.label(),
            Self::Tls(..) => "tls_secret",
            Self::Connection(..) => "connection_secret",
            Self::Quorum(_) => "quorum_config",
            Self::Status(_) => "status_update",
            Self::Finalizer(_) => "finalizer_update",
        }
    }
}

/// Prometheus series of the Continuum controller.
#[derive(Clone)]
pub struct Metrics {
    /// `action` = failover action label, `result` = ok | failed (and, for
    /// `fence`, handed_over: a stopped runner's guard stood down because
    /// another agent of this region adopted the grant).
    pub actions: IntCounterVec,
    pub action_errors: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    /// Per Continuum (`namespace/name`).
    pub lease_held: IntGaugeVec,
    pub epoch: IntGaugeVec,
    pub primary: IntGaugeVec,
    pub fenced: IntGaugeVec,
    /// Per Continuum and peer region.
    pub peer_reachable: IntGaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let actions = IntCounterVec::new(
            Opts::new(
                "continuum_cnpg_failover_actions_total",
                "Failover actions on the regions' databases (CNPG Clusters or PostgreSQL), by action and result.",
            ),
            &["action", "result"],
        )?;
        let action_errors = IntCounterVec::new(
            Opts::new(
                "continuum_cnpg_failover_action_errors_total",
                "Failed failover actions, by action and error.",
            ),
            &["action", "error"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "continuum_cnpg_reconcile_errors_total",
                "Continuum reconciles that failed, by error.",
            ),
            &["error"],
        )?;
        let gauge = |n: &str, h: &str| IntGaugeVec::new(Opts::new(n, h), &["continuum"]);
        let lease_held = gauge(
            "continuum_cnpg_lease_held",
            "1 while this region holds the Continuum's lease by its conservative deadline.",
        )?;
        let epoch = gauge(
            "continuum_cnpg_epoch",
            "Highest epoch seen for the Continuum.",
        )?;
        let primary = gauge(
            "continuum_cnpg_cluster_primary",
            "1 while this region's database (CNPG Cluster or PostgreSQL) is the primary.",
        )?;
        let fenced = gauge(
            "continuum_cnpg_cluster_fenced",
            "1 while this region's database is fenced.",
        )?;
        let peer_reachable = IntGaugeVec::new(
            Opts::new(
                "continuum_cnpg_peer_reachable",
                "1 while the peer region shows life: it holds the lease at a majority \
                 (seen by a standby), or its Cluster streams from this primary (needs \
                 connectionSecretRef); 0 when it does not; absent when unknown.",
            ),
            &["continuum", "peer"],
        )?;
        registry.register(Box::new(peer_reachable.clone()))?;
        for c in [&actions, &action_errors, &reconcile_errors] {
            registry.register(Box::new(c.clone()))?;
        }
        for g in [&lease_held, &epoch, &primary, &fenced] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Self {
            actions,
            action_errors,
            reconcile_errors,
            lease_held,
            epoch,
            primary,
            fenced,
            peer_reachable,
        })
    }
}

/// Per-Continuum state between ticks (all of it re-derivable).
struct Runner {
    key: String,
    lease: LeaseName,
    names: Names,
    /// Witness URLs, TLS Secret name, TTL and Cluster the runner was built for.
    spec_fp: String,
    secret_rv: String,
    secret_checked: Instant,
    quorum: Arc<QuorumClient>,
    ttl: Duration,
    db: Database,
    grant: watch::Sender<Option<Grant>>,
    renewer: Option<JoinHandle<()>>,
    recorded: Option<LeaseMeta>,
    /// When `recorded` was stored at the witnesses.
    recorded_at: Option<std::time::Instant>,
    /// The highest metadata `seq` this runner used, stored before each
    /// write is sent; its fence guard reads it to tell a successor's record
    /// from this runner's own ([`crate::lease_guard::successor_verdict`]).
    meta_seq: Arc<AtomicU64>,
    /// This runner's id in the records it writes (`LeaseMeta::writer`).
    writer: u64,
    /// The writer of the record at the epoch this runner adopted, named in
    /// its own records (`LeaseMeta::adopted_from`).
    adopted_from: Option<u64>,
    /// libpq connection string from `connectionSecretRef`, if the spec
    /// names one (always, for a `postgres` region).
    db_conn: Option<String>,
    /// The standby the running primary was last seen to require (`None`
    /// before the first successful read; see [`dbfacts::with_facts`]).
    applied_standby: Option<Option<HolderId>>,
    meta_refresh: Duration,
    /// The role-lacks-pg_monitor warning was logged.
    warned_blind: bool,
    /// When this region took the lease as a standby (failover start).
    acquired_at: Option<(Timestamp, Instant)>,
    last_failover: Option<LastFailover>,
    last_switchover: Option<LastSwitchover>,
    /// When this region's part of a switchover started (for its duration).
    switchover_t0: Option<Instant>,
    /// Successor: the demotion token of the handover it took the lease
    /// through (the intent is void in the view once it holds the new epoch).
    promotion_token: Option<String>,
    /// Old primary: when it released the lease to its successor; past this
    /// plus [`HANDOVER_TIMEOUT_TTLS`] x TTL (at least 10 s) it takes the
    /// lease back if nobody took it (in memory: a restarted agent waits for
    /// an operator instead).
    released_for_handover: Option<std::time::Instant>,
    /// Old primary of a `postgres` handover: since when its server has not
    /// answered (after a stop, the proof it went away; see
    /// [`database::pg_handover_step`]).
    handover_silent_since: Option<std::time::Instant>,
    /// Successor: it took the lease through a planned handover (its
    /// promotion is a switchover, not a failover).
    via_handover: bool,
    /// This runner has held the lease (then it never adopts).
    held_once: bool,
    /// When this runner last tried to adopt a grant a previous leader or
    /// runner of this region left (at most once per TTL).
    adopt_tried_at: Option<std::time::Instant>,
    /// An epoch the witnesses refused to renew for this region (a majority
    /// answered, not enough granted): it is not this region's to continue,
    /// so it is not tried again (a fenced former primary would otherwise
    /// probe, and warn, once per TTL for as long as it stays fenced).
    adopt_refused: Option<continuum_shared::lease::Epoch>,
    last_reason: String,
}

impl Drop for Runner {
    fn drop(&mut self) {
        // Stop renewing; the fence guard fences at the last deadline unless
        // a successor of this region adopts the grant first.
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
    }
}

/// Everything a reconcile needs.
pub struct Ctx {
    pub client: Client,
    pub cfg: ControllerConfig,
    pub metrics: Metrics,
    pub recorder: Recorder,
    runners: Mutex<HashMap<String, Arc<Mutex<Runner>>>>,
    /// Fence guards of the runners (finished ones are pruned).
    guards: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Ctx {
    pub fn new(client: Client, cfg: ControllerConfig, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: "continuum-failover".into(),
            instance: Some(cfg.instance.clone()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            cfg,
            metrics,
            runners: Mutex::new(HashMap::new()),
            guards: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn track_guard(&self, guard: JoinHandle<()>) {
        let mut g = self.guards.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|t| !t.is_finished());
        g.push(guard);
    }

    /// Waits until every fence guard has ended. After [`Ctx::stop_all`]
    /// each ends by its last deadline at the latest: stood down for a
    /// successor, or fenced (shutdown waits for this before exiting).
    pub async fn wait_for_guards(&self) {
        loop {
            let pending: Vec<JoinHandle<()>> =
                std::mem::take(&mut *self.guards.lock().unwrap_or_else(|e| e.into_inner()));
            if pending.is_empty() {
                return;
            }
            for t in pending {
                let _ = t.await;
            }
        }
    }

    /// Stop renewing every lease (on losing leadership, on shutdown). Each
    /// fence guard then stands down for a successor of this region that
    /// adopts the grant, or fences its Cluster at the last deadline.
    pub async fn stop_all(&self) {
        self.runners.lock().await.clear();
    }
}

fn event_reason(action: &Action) -> &'static str {
    match action {
        Action::Fence { .. } => "Fenced",
        Action::Acquire { .. } => "LeaseAcquired",
        Action::Adopt { .. } => "LeaseAdopted",
        Action::Promote { .. } => "Promoted",
        Action::Unfence { .. } => "Unfenced",
        Action::SetRequiredStandby { .. } => "RequiredStandbyChanged",
        Action::RecordEpoch { .. } => "EpochRecorded",
        Action::UpdateMeta { .. } => "WitnessRecordUpdated",
        Action::StopForHandover => "StoppedForHandover",
        Action::Release { .. } => "LeaseReleased",
        Action::FollowPeer { .. } => "FollowingPeer",
        Action::StartFenced { .. } => "StartedFenced",
        Action::Rejoin { .. } => "Rejoined",
        Action::Wait { .. } => "Waiting",
    }
}

fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// PostgreSQL's `X/Y` LSN notation.
fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

async fn publish(ctx: &Ctx, oref: &ObjectReference, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Failover".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, oref).await {
        tracing::warn!(error = %e, reason, "could not publish Event");
    }
}

/// Reads the witness TLS Secret: its resourceVersion and the PEM material.
async fn tls_secret(ctx: &Ctx, ns: &str, cr: &Continuum) -> Result<(String, TlsMaterial), Error> {
    let secret_name = &cr.spec.witnesses.tls_secret_ref.name;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let s = secrets
        .get(secret_name)
        .await
        .map_err(|e| Error::Tls(secret_name.clone(), e.to_string()))?;
    let data = s.data.unwrap_or_default();
    let key = |k: &str| {
        data.get(k)
            .map(|b| b.0.clone())
            .ok_or_else(|| Error::Tls(secret_name.clone(), format!("missing key {k}")))
    };
    let tls = TlsMaterial {
        ca_pem: key("ca.crt")?,
        cert_pem: key("tls.crt")?,
        key_pem: key("tls.key")?,
    };
    Ok((s.metadata.resource_version.unwrap_or_default(), tls))
}

/// Reads the database connection string of `connectionSecretRef`: its
/// resourceVersion and the string.
async fn connection_secret(
    ctx: &Ctx,
    ns: &str,
    r: &super::crd::SecretKeyRef,
) -> Result<(String, String), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let s = secrets
        .get(&r.name)
        .await
        .map_err(|e| Error::Connection(r.name.clone(), e.to_string()))?;
    let raw = s
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .ok_or_else(|| Error::Connection(r.name.clone(), format!("missing key {}", r.key)))?;
    let conn = String::from_utf8(raw.0.clone())
        .map_err(|_| Error::Connection(r.name.clone(), format!("key {} is not UTF-8", r.key)))?;
    Ok((s.metadata.resource_version.unwrap_or_default(), conn))
}

async fn optional_connection_secret(
    ctx: &Ctx,
    ns: &str,
    r: Option<&super::crd::SecretKeyRef>,
) -> Result<(String, Option<String>), Error> {
    match r {
        Some(r) => connection_secret(ctx, ns, r)
            .await
            .map(|(v, c)| (v, Some(c))),
        None => Ok((String::new(), None)),
    }
}

/// The connection strings a region's spec names: to its database, and
/// (`postgres`, optional) the `primary_conninfo` to follow the peer with.
#[derive(Default)]
struct Conninfos {
    db: Option<String>,
    follow: Option<String>,
}

/// The witness TLS material and the optional connection strings, with one
/// version string covering every Secret read.
async fn secrets_for(
    ctx: &Ctx,
    ns: &str,
    cr: &Continuum,
    conn_ref: Option<&super::crd::SecretKeyRef>,
    follow_ref: Option<&super::crd::SecretKeyRef>,
) -> Result<(String, TlsMaterial, Conninfos), Error> {
    let (tls_rv, tls) = tls_secret(ctx, ns, cr).await?;
    let (conn_rv, db) = optional_connection_secret(ctx, ns, conn_ref).await?;
    let (follow_rv, follow) = optional_connection_secret(ctx, ns, follow_ref).await?;
    let rv = format!("{tls_rv}|{conn_rv}|{follow_rv}");
    Ok((rv, tls, Conninfos { db, follow }))
}

/// Builds the quorum client for the spec's witnesses.
fn quorum_client(
    ctx: &Ctx,
    cr: &Continuum,
    tls: &TlsMaterial,
    ttl: Duration,
) -> Result<Arc<QuorumClient>, Error> {
    let call_timeout = (ttl / 6).max(Duration::from_millis(100));
    let mut witnesses: Vec<Arc<dyn LeaseTransport>> = Vec::new();
    for url in &cr.spec.witnesses.urls {
        let t = witness_transport(WitnessProtocol::default(), url, tls, call_timeout)
            .map_err(|e| Error::Quorum(format!("witness {url}: {e}")))?;
        witnesses.push(t);
    }
    let qcfg = QuorumConfig {
        max_drift: ctx.cfg.max_drift,
        margin: ctx.cfg.margin,
        ..QuorumConfig::default()
    };
    qcfg.validate(ttl)
        .map_err(|e| Error::Quorum(format!("lease timing: {e}")))?;
    let client = QuorumClient::new(witnesses, qcfg).map_err(|e| Error::Quorum(e.to_string()))?;
    Ok(Arc::new(client))
}

/// How often a runner that holds no lease re-reads the TLS Secret (a
/// rotated certificate is picked up without a GET every tick).
const SECRET_RECHECK: Duration = Duration::from_secs(30);

/// Finds (or creates) the runner of `cr`; rebuilt when its witnesses, TLS
/// material or Cluster changed while no lease is held.
async fn runner_for(ctx: &Ctx, cr: &Continuum) -> Result<Arc<Mutex<Runner>>, Error> {
    let ns = cr.namespace().unwrap_or_else(|| "default".into());
    let name = cr.name_any();
    let key = format!("{ns}/{name}");
    let sides = cr.spec.sides(ctx.cfg.region.as_str())?;
    let peer = HolderId::new(sides.peer.name.clone())
        .map_err(|e| SpecError::RegionName(sides.peer.name.clone(), e.to_string()))?;
    let names = Names {
        region: ctx.cfg.region.clone(),
        peer,
        local_cluster: sides.local.application_name().to_string(),
        peer_cluster: sides.peer.application_name().to_string(),
    };
    let (conn_ref, follow_ref) = match sides.local_db {
        DatabaseRef::Cnpg(c) => (c.connection_secret_ref.as_ref(), None),
        DatabaseRef::Postgres(p) => (
            Some(&p.connection_secret_ref),
            p.primary_conninfo_secret_ref.as_ref(),
        ),
    };
    let ttl = Duration::from_secs(u64::from(cr.spec.ttl_seconds.max(1)));
    let spec_fp = format!(
        "{:?}|{}|{}|{:?}",
        cr.spec.witnesses.urls,
        cr.spec.witnesses.tls_secret_ref.name,
        ttl.as_millis(),
        sides.local_db
    );
    let existing = ctx.runners.lock().await.get(&key).cloned();
    if let Some(r) = &existing {
        let mut guard = r.lock().await;
        // A held lease keeps its runner (and client) until it is lost.
        let holding = guard.grant.borrow().is_some();
        let same_spec = guard.spec_fp == spec_fp && guard.names == names;
        if holding || (same_spec && guard.secret_checked.elapsed() < SECRET_RECHECK) {
            return Ok(r.clone());
        }
        if same_spec {
            let (rv, _, _) = secrets_for(ctx, &ns, cr, conn_ref, follow_ref).await?;
            if rv == guard.secret_rv {
                guard.secret_checked = Instant::now();
                return Ok(r.clone());
            }
        }
    }
    let (secret_rv, tls, conns) = secrets_for(ctx, &ns, cr, conn_ref, follow_ref).await?;
    let db_conn = conns.db;
    let quorum = quorum_client(ctx, cr, &tls, ttl)?;
    let lease = LeaseName::new(format!("continuum/{ns}/{name}"))
        .map_err(|e| SpecError::LeaseName(e.to_string()))?;
    let db = match (sides.local_db, &db_conn) {
        (DatabaseRef::Cnpg(c), _) => Database::Cnpg(Box::new(ClusterHandle {
            api: cnpg::cluster_api(ctx.client.clone(), c.namespace.as_deref().unwrap_or(&ns)),
            name: c.name.clone(),
        })),
        (DatabaseRef::Postgres(_), Some(conn)) => {
            let pg = Postgres::new(conn.clone(), ttl);
            Database::Postgres(match &conns.follow {
                Some(f) => pg.with_follow(f, &names.local_cluster),
                None => pg,
            })
        }
        (DatabaseRef::Postgres(p), None) => {
            return Err(Error::Connection(
                p.connection_secret_ref.name.clone(),
                "no connection string".into(),
            ))
        }
    };
    let (grant_tx, grant_rx) = watch::channel(None);
    let meta_seq = Arc::new(AtomicU64::new(0));
    let writer = LeaseMeta::new_writer_id();
    let guard = tokio::spawn(fence_guard(
        grant_rx,
        db.clone(),
        ctx.metrics.clone(),
        ctx.recorder.clone(),
        cr.object_ref(&()),
        key.clone(),
        crate::lease_guard::SuccessorWatch {
            quorum: quorum.clone(),
            lease: lease.clone(),
            last_seq: meta_seq.clone(),
            writer,
        },
    ));
    ctx.track_guard(guard);
    let runner = Arc::new(Mutex::new(Runner {
        key: key.clone(),
        lease,
        names,
        spec_fp,
        secret_rv,
        secret_checked: Instant::now(),
        quorum,
        ttl,
        db,
        grant: grant_tx,
        renewer: None,
        recorded: None,
        recorded_at: None,
        meta_seq,
        writer,
        adopted_from: None,
        db_conn,
        applied_standby: None,
        meta_refresh: ctx.cfg.meta_refresh,
        warned_blind: false,
        acquired_at: None,
        last_failover: None,
        last_switchover: None,
        switchover_t0: None,
        promotion_token: None,
        released_for_handover: None,
        handover_silent_since: None,
        via_handover: false,
        held_once: false,
        adopt_tried_at: None,
        adopt_refused: None,
        last_reason: String::new(),
    }));
    ctx.runners.lock().await.insert(key, runner.clone());
    Ok(runner)
}

/// Fences the database the moment the held grant's deadline passes without
/// a renewal. When the runner is gone (leadership lost, shutdown), it watches
/// the witnesses until the last deadline it knew: if another agent of this
/// region adopted the grant and recorded under it (a new leader, whose own
/// guard is armed), it stands down; otherwise it fences at that deadline.
/// Either way it then exits.
async fn fence_guard(
    grant: watch::Receiver<Option<Grant>>,
    db: Database,
    metrics: Metrics,
    recorder: Recorder,
    oref: ObjectReference,
    key: String,
    successor: crate::lease_guard::SuccessorWatch,
) {
    let fence = |g: Grant, why: &'static str| {
        let db = db.clone();
        let metrics = metrics.clone();
        let recorder = recorder.clone();
        let oref = oref.clone();
        let key = key.clone();
        async move {
            tracing::warn!(continuum = %key, action = "fence", reason = why, epoch = %g.epoch, "fencing the database");
            match db.fence().await {
                Ok(detail) => {
                    metrics.actions.with_label_values(&["fence", "ok"]).inc();
                    let ev = Event {
                        type_: EventType::Warning,
                        reason: "Fenced".into(),
                        note: Some(format!("{why} (epoch {}): {detail}", g.epoch)),
                        action: "Failover".into(),
                        secondary: None,
                    };
                    if let Err(e) = recorder.publish(&ev, &oref).await {
                        tracing::warn!(error = %e, "could not publish Event");
                    }
                }
                Err(e) => {
                    metrics
                        .actions
                        .with_label_values(&["fence", "failed"])
                        .inc();
                    metrics
                        .action_errors
                        .with_label_values(&["fence", e.label()])
                        .inc();
                    tracing::error!(continuum = %key, action = "fence", error = %e, "fence failed; the decision loop retries");
                }
            }
        }
    };
    let Some(h) =
        crate::lease_guard::fence_at_deadline_unless_adopted(grant, fence, successor).await
    else {
        return;
    };
    let note = format!(
        "another agent of this region adopted epoch {} and recorded at the witnesses (seq {} > this agent's {}): it guards the lease now; not fencing",
        h.grant_epoch, h.successor_seq, h.own_seq
    );
    tracing::info!(continuum = %key, action = "fence", result = "handed_over", epoch = %h.grant_epoch, reason = %note, "fence stood down");
    metrics
        .actions
        .with_label_values(&["fence", "handed_over"])
        .inc();
    let ev = Event {
        type_: EventType::Normal,
        reason: "FenceHandedOver".into(),
        note: Some(note),
        action: "Failover".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &oref).await {
        tracing::warn!(error = %e, "could not publish Event");
    }
}

/// What one tick saw.
struct Seen {
    db: Option<DbState>,
    /// `postgres`: the server refused the connection (its postmaster is gone).
    server_gone: bool,
    /// The running database, when a connection is configured and answered.
    facts: Option<dbfacts::DbFacts>,
    cluster: Option<DynamicObject>,
    view: Option<MajorityView>,
    held: Option<Held>,
}

/// One step of the old primary's part of a planned switchover, by back-end.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HandoverStep {
    Cnpg(cnpg::HandoverStep),
    Pg(PgHandoverStep),
}

impl HandoverStep {
    /// `None` for a wait (with its reason); otherwise the metric label and
    /// Event reason of the step.
    fn label(&self) -> Result<(&'static str, &'static str), &'static str> {
        match self {
            HandoverStep::Cnpg(cnpg::HandoverStep::Wait(r))
            | HandoverStep::Pg(PgHandoverStep::Wait(r)) => Err(r),
            HandoverStep::Cnpg(cnpg::HandoverStep::Demote) => Ok(("demote", "Demoting")),
            HandoverStep::Cnpg(cnpg::HandoverStep::RecordToken(_)) => {
                Ok(("record_token", "DemotionTokenRecorded"))
            }
            HandoverStep::Pg(PgHandoverStep::Fence) => Ok(("fence", "Fenced")),
            HandoverStep::Pg(PgHandoverStep::RecordFinal) => {
                Ok(("record_final_lsn", "FinalPositionRecorded"))
            }
            HandoverStep::Pg(PgHandoverStep::Stop) => {
                Ok(("stop_for_handover", "StoppedForHandover"))
            }
            HandoverStep::Cnpg(cnpg::HandoverStep::Release)
            | HandoverStep::Pg(PgHandoverStep::Release) => Ok(("release", "LeaseReleased")),
        }
    }

    fn is_release(&self) -> bool {
        matches!(
            self,
            HandoverStep::Cnpg(cnpg::HandoverStep::Release)
                | HandoverStep::Pg(PgHandoverStep::Release)
        )
    }
}

impl Runner {
    /// The `seq` of the next metadata write (above `seen`, the highest the
    /// last majority read showed at this epoch), published to the fence
    /// guard before the write is sent.
    fn next_meta_seq(&mut self, seen: Option<u64>) -> u64 {
        let seq = LeaseMeta::next_seq(self.meta_seq.load(Ordering::SeqCst), seen);
        self.meta_seq.fetch_max(seq, Ordering::SeqCst);
        seq
    }

    /// The next metadata record this runner writes: its `seq`
    /// ([`Runner::next_meta_seq`]), its writer id and the writer it adopted
    /// the grant from, so that the predecessor's fence guard can recognise
    /// a successor ([`crate::lease_guard::successor_verdict`]).
    fn new_meta(
        &mut self,
        seen_seq: Option<u64>,
        sync_standby: Option<HolderId>,
        confirmed_lsn: Option<u64>,
        handover: Option<continuum_shared::lease::Handover>,
    ) -> LeaseMeta {
        LeaseMeta {
            sync_standby,
            confirmed_lsn,
            seq: self.next_meta_seq(seen_seq),
            handover,
            writer: Some(self.writer),
            adopted_from: self.adopted_from,
        }
    }

    async fn observe(&mut self) -> Seen {
        let now = std::time::Instant::now();
        let held = self.grant.borrow().as_ref().map(|g| Held {
            epoch: g.epoch,
            deadline: g.deadline.into_std(),
        });
        let mut server_gone = false;
        let (db, facts, cluster) = match self.db.clone() {
            Database::Cnpg(handle) => self.observe_cnpg(&handle).await,
            Database::Postgres(pg) => match pg.observe(&self.names).await {
                Ok((d, f)) => {
                    self.warn_if_blind(&f);
                    (Some(d), Some(f), None)
                }
                Err(e) => {
                    server_gone = matches!(&e, DbError::Pg(p) if p.is_refused());
                    tracing::debug!(continuum = %self.key, error = %e, server_gone, "database not answering");
                    (None, None, None)
                }
            },
        };
        let view = match self.quorum.read_majority(&self.lease).await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!(continuum = %self.key, error = %e, "no majority view");
                None
            }
        };
        if held.is_none_or(|h| now >= h.deadline) {
            self.recorded = None;
            self.recorded_at = None;
        }
        Seen {
            db,
            server_gone,
            facts,
            cluster,
            view,
            held,
        }
    }

    /// The Cluster, and with a connection the running server's facts folded
    /// in (see [`dbfacts`]).
    async fn observe_cnpg(
        &mut self,
        handle: &ClusterHandle,
    ) -> (
        Option<DbState>,
        Option<dbfacts::DbFacts>,
        Option<DynamicObject>,
    ) {
        let cluster = match handle.get().await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::debug!(continuum = %self.key, error = %e, "Cluster not readable");
                None
            }
        };
        let facts = match &self.db_conn {
            Some(conn) => {
                let bound =
                    (self.ttl / 2).clamp(Duration::from_millis(200), Duration::from_secs(2));
                match tokio::time::timeout(bound, dbfacts::read(conn, &self.names.peer_cluster))
                    .await
                {
                    Ok(Ok(f)) => {
                        self.warn_if_blind(&f);
                        self.applied_standby = Some(dbfacts::applied_standby(&f, &self.names));
                        Some(f)
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(continuum = %self.key, error = %e, "database not answering");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(continuum = %self.key, "database did not answer within {bound:?}");
                        None
                    }
                }
            }
            None => None,
        };
        let db = cluster.as_ref().map(|c| {
            let d = cnpg::observe(c, &self.names);
            if self.db_conn.is_some() {
                dbfacts::with_facts(d, facts.as_ref(), self.applied_standby.as_ref())
            } else {
                d
            }
        });
        (db, facts, cluster)
    }

    fn warn_if_blind(&mut self, f: &dbfacts::DbFacts) {
        if !f.sees_replication && !self.warned_blind {
            self.warned_blind = true;
            tracing::warn!(continuum = %self.key, reason = "the connection's role lacks pg_monitor / pg_read_all_stats", "pg_stat_replication not readable: peer streaming and the confirmed LSN are unknown");
        }
    }

    /// The old primary's switchover step while it holds the lease with a
    /// handover intent it recorded in this epoch; `None` otherwise (then
    /// [`Runner::decide`] decides).
    fn handover_step(&mut self, seen: &Seen) -> Option<HandoverStep> {
        let intent = self.recorded.as_ref()?.handover.as_ref()?;
        let now = std::time::Instant::now();
        seen.held.filter(|h| now < h.deadline)?;
        match &self.db {
            Database::Cnpg(_) => {
                let Some(obj) = seen.cluster.as_ref() else {
                    return Some(HandoverStep::Cnpg(cnpg::HandoverStep::Wait(
                        "handover: Cluster not readable",
                    )));
                };
                Some(HandoverStep::Cnpg(cnpg::handover_step(
                    intent.promotion_token.is_some(),
                    obj,
                )))
            }
            Database::Postgres(_) => {
                let final_recorded = intent.final_lsn.is_some();
                let silent_since = match seen.db {
                    Some(_) => None,
                    None => Some(*self.handover_silent_since.get_or_insert(now)),
                };
                self.handover_silent_since = silent_since;
                let bound = (self.ttl * HANDOVER_TIMEOUT_TTLS).max(Duration::from_secs(10));
                Some(HandoverStep::Pg(database::pg_handover_step(
                    PgHandoverView {
                        final_recorded,
                        db: seen.db.as_ref(),
                        server_gone: seen.server_gone,
                        stop_overdue: silent_since.is_some_and(|t| now.duration_since(t) > bound),
                    },
                )))
            }
        }
    }

    /// Records `edit`ed handover intent at the witnesses, under the grant.
    async fn record_intent(
        &mut self,
        edit: impl FnOnce(&mut continuum_shared::lease::Handover),
    ) -> Result<(), (&'static str, String)> {
        let grant = self.grant.borrow().clone();
        let (Some(grant), Some(rec)) = (grant, self.recorded.clone()) else {
            return Err((
                "not_holding",
                "no grant to record the handover under".into(),
            ));
        };
        // The record may be a predecessor's (adopted with its intent):
        // rewritten as this runner's.
        let mut meta = self.new_meta(None, rec.sync_standby, rec.confirmed_lsn, rec.handover);
        if let Some(h) = meta.handover.as_mut() {
            edit(h);
        }
        self.quorum
            .update_meta(&grant, &meta)
            .await
            .map_err(|e| (e.label(), e.to_string()))?;
        self.recorded = Some(meta);
        Ok(())
    }

    /// Applies one switchover step; `Ok` carries a detail for the Event.
    async fn apply_handover(
        &mut self,
        step: &HandoverStep,
    ) -> Result<String, (&'static str, String)> {
        let cnpg_err = |e: cnpg::CnpgError| (e.label(), e.to_string());
        let db_err = |e: DbError| (e.label(), e.to_string());
        match step {
            HandoverStep::Cnpg(cnpg::HandoverStep::Wait(reason))
            | HandoverStep::Pg(PgHandoverStep::Wait(reason)) => Ok((*reason).to_string()),
            HandoverStep::Cnpg(cnpg::HandoverStep::Demote) => {
                let Database::Cnpg(cluster) = &self.db else {
                    return Err((
                        "unsupported",
                        "demotion by patch needs a CNPG Cluster".into(),
                    ));
                };
                cluster
                    .patch(&cnpg::demote_patch(&self.names))
                    .await
                    .map_err(cnpg_err)?;
                Ok(format!(
                    "switchover: demoting, spec.replica.primary={}",
                    self.names.peer_cluster
                ))
            }
            HandoverStep::Cnpg(cnpg::HandoverStep::RecordToken(token)) => {
                let token = token.clone();
                self.record_intent(|h| h.promotion_token = Some(token))
                    .await?;
                if let Some(ls) = self.last_switchover.as_mut() {
                    ls.demoted_at = Some(rfc3339(Timestamp::now()));
                }
                Ok("switchover: CNPG's demotion token recorded at the witnesses".into())
            }
            HandoverStep::Pg(PgHandoverStep::Fence) => {
                let detail = self.db.fence().await.map_err(db_err)?;
                Ok(format!(
                    "switchover: stop acknowledging writes before stopping; {detail}"
                ))
            }
            HandoverStep::Pg(PgHandoverStep::RecordFinal) => {
                let Database::Postgres(pg) = &self.db else {
                    return Err(("unsupported", "needs a postgres region".into()));
                };
                let lsn = pg.final_position().await.map_err(db_err)?;
                self.record_intent(|h| h.final_lsn = Some(lsn)).await?;
                Ok(format!(
                    "switchover: the fenced server's WAL end {} recorded at the witnesses as the final position",
                    lsn_text(lsn)
                ))
            }
            HandoverStep::Pg(PgHandoverStep::Stop) => {
                let Database::Postgres(pg) = &self.db else {
                    return Err(("unsupported", "needs a postgres region".into()));
                };
                let r = pg.stop_to_follow().await.map_err(db_err)?;
                if let Some(ls) = self.last_switchover.as_mut() {
                    ls.demoted_at = Some(rfc3339(Timestamp::now()));
                }
                Ok(format!(
                    "switchover: standby.signal and primary_conninfo written, fast shutdown of postmaster {} requested in {:?}; its supervisor restarts it as the peer's standby",
                    r.postmaster_pid, r.took
                ))
            }
            HandoverStep::Cnpg(cnpg::HandoverStep::Release)
            | HandoverStep::Pg(PgHandoverStep::Release) => {
                let grant = self.grant.borrow().clone();
                let Some(grant) = grant else {
                    return Err(("not_holding", "no grant to release".into()));
                };
                // Stop renewing (and the fence guard) first.
                self.grant.send_replace(None);
                if let Some(r) = self.renewer.take() {
                    r.abort();
                }
                let released = self.quorum.release(&grant).await;
                self.recorded = None;
                self.recorded_at = None;
                self.handover_silent_since = None;
                self.released_for_handover = Some(std::time::Instant::now());
                if let Some(ls) = self.last_switchover.as_mut() {
                    ls.released_at = Some(rfc3339(Timestamp::now()));
                    ls.duration_ms = self
                        .switchover_t0
                        .take()
                        .map(|t| t.elapsed().as_millis() as u64);
                }
                Ok(format!(
                    "switchover: epoch {} released at {released} witness(es) to the successor",
                    grant.epoch
                ))
            }
        }
    }

    fn decide_with(
        &self,
        seen: &Seen,
        mode: FailoverMode,
        policy: SyncPolicySpec,
        request: Option<&HolderId>,
    ) -> Action {
        failover::decide(&Observation {
            now: std::time::Instant::now(),
            region: &self.names.region,
            peer: &self.names.peer,
            mode: match mode {
                FailoverMode::Automatic => Mode::Automatic,
                FailoverMode::Manual => Mode::Manual,
            },
            policy: match policy {
                SyncPolicySpec::Required => SyncPolicy::Required,
                SyncPolicySpec::Preferred => SyncPolicy::Preferred,
            },
            held: seen.held,
            view: seen.view.as_ref(),
            db: seen.db.as_ref(),
            recorded: self.recorded.as_ref(),
            // CNPG runs the database: no offline control file, no
            // direct-PostgreSQL handover or rebuild from this controller.
            offline: None,
            handover_request: request,
            handover_deadline: self
                .released_for_handover
                .map(|t| t + (self.ttl * HANDOVER_TIMEOUT_TTLS).max(Duration::from_secs(10))),
            rejoin: false,
            may_adopt: !self.held_once
                && self.adopt_tried_at.is_none_or(|t| t.elapsed() >= self.ttl)
                && seen
                    .view
                    .as_ref()
                    .is_none_or(|v| Some(v.max_epoch) != self.adopt_refused),
            // Only a connection brings a confirmed LSN worth refreshing.
            meta_refresh_due: seen.facts.is_some()
                && self
                    .recorded_at
                    .is_some_and(|t| t.elapsed() >= self.meta_refresh),
        })
    }

    /// With a connection, a spec change CNPG has not applied to the running
    /// primary yet is waited for, not patched again every tick.
    fn awaiting_cnpg(&self, seen: &Seen, action: Action) -> Action {
        match (&action, &self.db_conn, seen.cluster.as_ref()) {
            (Action::SetRequiredStandby { standby }, Some(_), Some(obj))
                if cnpg::spec_requires(obj, standby.as_ref(), &self.names) =>
            {
                Action::Wait {
                    reason: "waiting for CloudNativePG to apply the synchronous standby to the running primary",
                }
            }
            _ => action,
        }
    }

    /// The confirmed LSN to record with `sync_standby`: what the peer has
    /// applied, when it is the synchronous standby and the server said so.
    fn confirmed_lsn(&self, seen: &Seen, sync_standby: Option<&HolderId>) -> Option<u64> {
        if sync_standby != Some(&self.names.peer) {
            return None;
        }
        match seen.facts.as_ref() {
            Some(f) => f.peer_replay.map(|l| l.0),
            None => self.recorded.as_ref().and_then(|m| m.confirmed_lsn),
        }
    }

    /// Starts holding `g` (taken or adopted): renewer, fence guard input,
    /// and, for a standby, the failover start and a handover's token.
    fn hold(&mut self, g: Grant, seen: &Seen) {
        self.recorded = None;
        self.recorded_at = None;
        self.released_for_handover = None;
        self.held_once = true;
        if seen.db.as_ref().is_some_and(|d| !d.primary) {
            self.acquired_at = Some((Timestamp::now(), Instant::now()));
            let intent = seen
                .view
                .as_ref()
                .and_then(failover::live_intent)
                .filter(|h| h.to == self.names.region);
            self.via_handover = intent.is_some();
            // Taken through a planned handover: promote with its token (CNPG).
            self.promotion_token = intent.and_then(|h| h.promotion_token.clone());
        }
        self.grant.send_replace(Some(g.clone()));
        if let Some(old) = self.renewer.take() {
            old.abort();
        }
        self.renewer = Some(tokio::spawn(crate::lease_guard::renewer(
            self.quorum.clone(),
            g,
            self.grant.clone(),
        )));
    }

    /// Successor of a planned switchover: its promotion goes into
    /// `lastSwitchover` (not `lastFailover`).
    fn record_switchover_promoted(
        &mut self,
        epoch: continuum_shared::lease::Epoch,
        now: Timestamp,
    ) {
        let (started, t0) = self.acquired_at.take().unwrap_or((now, Instant::now()));
        self.last_switchover = Some(LastSwitchover {
            from_region: Some(self.names.peer.as_str().to_string()),
            to_region: Some(self.names.region.as_str().to_string()),
            started_at: Some(rfc3339(started)),
            completed_at: Some(rfc3339(Timestamp::now())),
            duration_ms: Some(t0.elapsed().as_millis() as u64),
            epoch: Some(epoch.0),
            ..LastSwitchover::default()
        });
    }

    /// Applies one action; `Ok` carries a human-readable detail.
    async fn apply(
        &mut self,
        action: &Action,
        seen: &Seen,
    ) -> Result<String, (&'static str, String)> {
        let cnpg_err = |e: cnpg::CnpgError| (e.label(), e.to_string());
        let db_err = |e: DbError| (e.label(), e.to_string());
        match action {
            Action::Wait { reason } => Ok((*reason).to_string()),
            Action::Fence { reason } => {
                let detail = self.db.fence().await.map_err(db_err)?;
                Ok(format!("{reason}; {detail}"))
            }
            Action::Acquire { reason } => {
                let g = self
                    .quorum
                    .acquire(&self.lease, &self.names.region, self.ttl)
                    .await
                    .map_err(|e| (e.label(), e.to_string()))?;
                let epoch = g.epoch;
                self.hold(g, seen);
                Ok(format!("{reason}; holding epoch {epoch}"))
            }
            Action::Adopt { epoch, handover } => {
                self.adopt_tried_at = Some(std::time::Instant::now());
                match self
                    .quorum
                    .adopt(&self.lease, &self.names.region, *epoch, self.ttl)
                    .await
                {
                    Ok(g) => {
                        self.hold(g, seen);
                        // The predecessor's last record at this epoch: its
                        // guard stands down once ours names its writer.
                        self.adopted_from = seen
                            .view
                            .as_ref()
                            .and_then(|v| v.meta.as_ref())
                            .filter(|(e, _)| e == epoch)
                            .and_then(|(_, m)| m.writer);
                        self.recorded = handover.clone();
                        Ok(format!(
                            "continuing this region's grant left by an earlier leader: holding epoch {epoch}, no fence"
                        ))
                    }
                    Err(e) => {
                        if matches!(
                            e,
                            continuum_shared::quorum::QuorumError::NoMajority { .. }
                                | continuum_shared::quorum::QuorumError::Held { .. }
                        ) {
                            self.adopt_refused = Some(*epoch);
                        }
                        if seen.db.as_ref().is_some_and(|d| d.primary && !d.fenced) {
                            let detail = self.db.fence().await.map_err(db_err)?;
                            return Err((e.label(), format!("adoption refused ({e}): {detail}")));
                        }
                        Err((e.label(), format!("adoption refused: {e}")))
                    }
                }
            }
            Action::Promote { epoch } => {
                let now = Timestamp::now();
                let (how, replay) = match self.db.clone() {
                    Database::Postgres(pg) => {
                        let r = pg.promote().await.map_err(db_err)?;
                        if std::mem::take(&mut self.via_handover) {
                            // Planned switchover: the old primary stopped
                            // cleanly and follows this server.
                            self.record_switchover_promoted(*epoch, now);
                            return Ok(format!(
                                "switchover: pg_promote after replaying past the old primary's final position (waited {:?}, promotion {:?}) at epoch {epoch}; lsn_at_promotion={:?}",
                                r.catch_up_wait,
                                r.promote,
                                r.lsn_at_promotion.map(|l| lsn_text(l.0))
                            ));
                        }
                        (
                            format!(
                                "pg_promote after replay caught up with received WAL (waited {:?}, promotion {:?})",
                                r.catch_up_wait, r.promote
                            ),
                            r.lsn_at_promotion.map(|l| l.0),
                        )
                    }
                    Database::Cnpg(cluster) => {
                        let Some(obj) = seen.cluster.as_ref() else {
                            return Err(("cluster_not_found", "no Cluster observed".into()));
                        };
                        self.via_handover = false;
                        if let Some(token) = self.promotion_token.take() {
                            // Planned switchover: promote with the old primary's
                            // demotion token; it stays attached as a replica.
                            cluster
                                .patch(&cnpg::promote_with_token_patch(
                                    obj,
                                    *epoch,
                                    &token,
                                    &rfc3339(now),
                                ))
                                .await
                                .map_err(cnpg_err)?;
                            self.record_switchover_promoted(*epoch, now);
                            return Ok(format!(
                                "switchover: promoted with the demotion token at epoch {epoch}; spec.replica.primary={}",
                                self.names.local_cluster
                            ));
                        }
                        cluster
                            .patch(&cnpg::promote_patch(obj, *epoch, &rfc3339(now)))
                            .await
                            .map_err(cnpg_err)?;
                        (
                            format!(
                                "promoted without a token (failover); spec.replica.primary={}",
                                self.names.local_cluster
                            ),
                            seen.facts.as_ref().and_then(|f| f.replay).map(|l| l.0),
                        )
                    }
                };
                let (started, t0) = self.acquired_at.take().unwrap_or((now, Instant::now()));
                // This server's replay position at the promotion, else what
                // the old primary last confirmed.
                let lsn = replay
                    .or_else(|| {
                        seen.view
                            .as_ref()
                            .and_then(|v| v.meta.as_ref())
                            .and_then(|(_, m)| m.confirmed_lsn)
                    })
                    .map(lsn_text);
                self.last_failover = Some(LastFailover {
                    started_at: Some(rfc3339(started)),
                    completed_at: Some(rfc3339(Timestamp::now())),
                    duration_ms: Some(t0.elapsed().as_millis() as u64),
                    lsn_at_promotion: lsn.clone(),
                    from_region: Some(self.names.peer.as_str().to_string()),
                    to_region: Some(self.names.region.as_str().to_string()),
                    epoch: Some(epoch.0),
                });
                Ok(format!("{how} at epoch {epoch}; lsn_at_promotion={lsn:?}"))
            }
            Action::Unfence { standby } => {
                self.db
                    .unfence(standby.as_ref(), &self.names)
                    .await
                    .map_err(db_err)?;
                Ok(format!("unfenced, requiring standby {standby:?}"))
            }
            Action::SetRequiredStandby { standby } => {
                self.db
                    .set_standby(standby.as_ref(), &self.names)
                    .await
                    .map_err(db_err)?;
                Ok(format!("now requiring standby {standby:?}"))
            }
            Action::RecordEpoch { epoch } => self
                .db
                .record_epoch(*epoch, &self.names.region)
                .await
                .map_err(db_err),
            Action::StopForHandover
            | Action::Release { .. }
            | Action::FollowPeer { .. }
            | Action::StartFenced { .. }
            | Action::Rejoin { .. } => Err((
                "unsupported",
                format!(
                    "{} needs the database host (a data directory); this controller drives the database over the API server or a connection",
                    action.label()
                ),
            )),
            Action::UpdateMeta {
                sync_standby,
                handover,
            } => {
                let grant = self.grant.borrow().clone();
                let Some(grant) = grant else {
                    return Err(("not_holding", "no grant to update metadata under".into()));
                };
                // The Cluster does not carry the confirmed LSN; only a
                // connection to the server does.
                let confirmed = self.confirmed_lsn(seen, sync_standby.as_ref());
                let meta = self.new_meta(
                    seen_seq(seen, grant.epoch),
                    sync_standby.clone(),
                    confirmed,
                    handover.clone(),
                );
                self.quorum
                    .update_meta(&grant, &meta)
                    .await
                    .map_err(|e| (e.label(), e.to_string()))?;
                let lsn = meta.confirmed_lsn.map(lsn_text);
                self.recorded = Some(meta);
                self.recorded_at = Some(std::time::Instant::now());
                let Some(h) = handover else {
                    return Ok(format!(
                        "witnesses record synchronous standby {sync_standby:?} at epoch {} (confirmed LSN {lsn:?})",
                        grant.epoch
                    ));
                };
                // A handover intent: this region's part of a switchover starts.
                let to = h.to.as_str().to_string();
                self.switchover_t0 = Some(Instant::now());
                self.last_switchover = Some(LastSwitchover {
                    from_region: Some(self.names.region.as_str().to_string()),
                    to_region: Some(to.clone()),
                    requested_at: Some(rfc3339(Timestamp::now())),
                    epoch: Some(grant.epoch.0),
                    ..LastSwitchover::default()
                });
                Ok(format!(
                    "switchover: the witnesses record a handover to {:?} at epoch {}",
                    Some(to),
                    grant.epoch
                ))
            }
        }
    }
}

fn condition(
    old: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| rfc3339(Timestamp::now()));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        last_transition_time: last,
        observed_generation: generation,
    }
}

fn pascal(label: &str) -> String {
    label
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The highest metadata `seq` the last majority read showed for `epoch`.
fn seen_seq(seen: &Seen, epoch: continuum_shared::lease::Epoch) -> Option<u64> {
    seen.view
        .as_ref()
        .and_then(|v| v.meta.as_ref())
        .filter(|(e, _)| *e == epoch)
        .map(|(_, m)| m.seq)
}

/// Whether the peer region shows life, when this region can tell: holding,
/// by the peer's Cluster streaming from this primary (read over the
/// connection); not holding, by the peer holding the lease at a majority.
fn peer_reachable(
    holding: bool,
    facts: Option<&dbfacts::DbFacts>,
    view: Option<&MajorityView>,
    peer: &HolderId,
) -> Option<bool> {
    if holding {
        return facts
            .filter(|f| !f.in_recovery && f.sees_replication)
            .map(|f| f.peer_streaming);
    }
    view.map(|v| !v.expired_at_majority && v.holder.as_ref().is_some_and(|(h, _)| h == peer))
}

/// The status this region's agent reports for what it saw.
fn status_for(
    cr: &Continuum,
    region: &HolderId,
    seen: &Seen,
    last_failover: Option<LastFailover>,
    last_switchover: Option<LastSwitchover>,
    recorded: Option<&LeaseMeta>,
    decision: (&str, &str),
) -> ContinuumStatus {
    let old = cr.status.clone().unwrap_or_default();
    let now = std::time::Instant::now();
    let held = seen.held.filter(|h| now < h.deadline);
    let primary_region = match (&held, &seen.view) {
        (Some(_), _) => Some(region.as_str().to_string()),
        (None, Some(v)) if !v.expired_at_majority => {
            v.holder.as_ref().map(|(h, _)| h.as_str().to_string())
        }
        _ => None,
    };
    let epoch = seen
        .view
        .as_ref()
        .map(|v| v.max_epoch.0)
        .into_iter()
        .chain(held.map(|h| h.epoch.0))
        .max();
    let phase = match &seen.db {
        None => "Unknown",
        Some(d) if d.primary && d.fenced => "Fenced",
        Some(d) if d.primary => "Primary",
        Some(_) => "Standby",
    };
    let g = cr.metadata.generation;
    let fenced = seen.db.as_ref().is_some_and(|d| d.fenced);
    ContinuumStatus {
        primary_region,
        epoch: epoch.or(old.epoch),
        phase: Some(phase.into()),
        observed_by: Some(region.as_str().to_string()),
        observed_generation: g,
        last_failover: last_failover.or(old.last_failover.clone()),
        last_switchover: last_switchover.or(old.last_switchover.clone()),
        synchronous_standby: recorded.map(|m| {
            m.sync_standby
                .as_ref()
                .map_or_else(|| "none".to_string(), |s| s.as_str().to_string())
        }),
        confirmed_lsn: recorded.and_then(|m| m.confirmed_lsn).map(lsn_text),
        conditions: vec![
            condition(
                &old.conditions,
                "LeaseHeld",
                held.is_some(),
                if held.is_some() {
                    "Holding"
                } else {
                    "NotHolding"
                },
                held.map_or_else(String::new, |h| format!("epoch {}", h.epoch)),
                g,
            ),
            condition(
                &old.conditions,
                "Fenced",
                fenced,
                if fenced {
                    "FencedInstances"
                } else {
                    "NotFenced"
                },
                String::new(),
                g,
            ),
            condition(
                &old.conditions,
                "Decision",
                true,
                &pascal(decision.0),
                decision.1.to_string(),
                g,
            ),
        ],
    }
}

/// Most actions one reconcile applies back to back (acquire, promote,
/// record, ...): RTO is made of these steps, so they do not wait a tick.
const MAX_STEPS: usize = 8;

/// observe -> decide -> apply (repeated while there is something to do),
/// then report status.
pub async fn reconcile_once(cr: &Continuum, ctx: &Ctx) -> Result<(), Error> {
    if cr.metadata.deletion_timestamp.is_some() {
        return finalize(cr, ctx).await;
    }
    if !cr.finalizers().iter().any(|f| f == FINALIZER) {
        add_finalizer(cr, ctx).await?;
    }
    let runner = runner_for(ctx, cr).await?;
    let mut r = runner.lock().await;
    let oref = cr.object_ref(&());
    let key = r.key.clone();
    let mut seen = r.observe().await;
    let decision: (String, String);
    let mut steps = 0;
    loop {
        if steps == MAX_STEPS {
            // Guardrail (invariant 6): a decision that never settles is a bug
            // or a fight over the Cluster; stop this pass and say so.
            tracing::error!(continuum = %key, steps, "guardrail: more than MAX_STEPS actions in one reconcile; stopping this pass");
            publish(
                ctx,
                &oref,
                true,
                "GuardrailTripped",
                format!(
                    "{steps} failover actions in one pass without settling; next pass in one tick"
                ),
            )
            .await;
            decision = ("guardrail".into(), format!("{steps} actions in one pass"));
            break;
        }
        steps += 1;
        if let Some(step) = r.handover_step(&seen) {
            let (label, reason) = match step.label() {
                Ok(l) => l,
                Err(reason) => {
                    if r.last_reason != reason {
                        tracing::info!(continuum = %key, action = "wait", reason, "waiting");
                        r.last_reason = reason.to_string();
                    }
                    decision = ("wait".into(), reason.to_string());
                    break;
                }
            };
            r.last_reason.clear();
            match r.apply_handover(&step).await {
                Ok(detail) => {
                    ctx.metrics.actions.with_label_values(&[label, "ok"]).inc();
                    tracing::info!(continuum = %key, action = label, detail = %detail, "switchover step applied");
                    publish(ctx, &oref, label == "fence", reason, detail).await;
                    if step.is_release() {
                        clear_switchover_request(cr, ctx).await;
                    }
                }
                Err((err_label, e)) => {
                    ctx.metrics
                        .actions
                        .with_label_values(&[label, "failed"])
                        .inc();
                    ctx.metrics
                        .action_errors
                        .with_label_values(&[label, err_label])
                        .inc();
                    tracing::warn!(continuum = %key, action = label, error = %e, "switchover step failed; will decide again");
                    publish(
                        ctx,
                        &oref,
                        true,
                        "ActionFailed",
                        format!("{label} failed ({err_label}): {e}"),
                    )
                    .await;
                    decision = (format!("{label}_failed"), e);
                    break;
                }
            }
            seen = r.observe().await;
            continue;
        }
        let request = switchover_request(cr, &r.names, &r.db, seen.cluster.as_ref());
        let action = r.decide_with(&seen, cr.spec.mode, cr.spec.sync_policy, request.as_ref());
        let action = r.awaiting_cnpg(&seen, action);
        let label = action.label();
        if let Action::Wait { reason } = &action {
            if r.last_reason != *reason {
                tracing::info!(continuum = %key, action = "wait", reason, "waiting");
                r.last_reason = reason.to_string();
            }
            decision = ("wait".into(), reason.to_string());
            break;
        }
        r.last_reason.clear();
        let refresh = failover::is_meta_refresh(&action, r.recorded.as_ref());
        let t0 = Instant::now();
        let result = r.apply(&action, &seen).await;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(detail) if refresh => {
                // Every few seconds while steady: a metric, no Event.
                ctx.metrics.actions.with_label_values(&[label, "ok"]).inc();
                tracing::debug!(continuum = %key, action = label, took_ms = ms, detail = %detail, "lease metadata refreshed");
                // Nothing else changed: report and wait for the next tick.
                decision = ("wait".into(), "primary: holding the lease".into());
                break;
            }
            Ok(detail) => {
                ctx.metrics.actions.with_label_values(&[label, "ok"]).inc();
                tracing::info!(continuum = %key, action = label, ?action, took_ms = ms, detail = %detail, "failover action applied");
                publish(
                    ctx,
                    &oref,
                    matches!(action, Action::Fence { .. }),
                    event_reason(&action),
                    detail.clone(),
                )
                .await;
            }
            Err((err_label, e)) => {
                ctx.metrics
                    .actions
                    .with_label_values(&[label, "failed"])
                    .inc();
                ctx.metrics
                    .action_errors
                    .with_label_values(&[label, err_label])
                    .inc();
                tracing::warn!(continuum = %key, action = label, ?action, took_ms = ms, error = %e, "failover action failed; will decide again");
                publish(
                    ctx,
                    &oref,
                    true,
                    "ActionFailed",
                    format!("{label} failed ({err_label}): {e}"),
                )
                .await;
                decision = (format!("{label}_failed"), e);
                break;
            }
        }
        seen = r.observe().await;
    }
    let now = std::time::Instant::now();
    let held = seen.held.filter(|h| now < h.deadline);
    let m = &ctx.metrics;
    m.lease_held
        .with_label_values(&[&key])
        .set(i64::from(held.is_some()));
    if let Some(v) = &seen.view {
        m.epoch.with_label_values(&[&key]).set(v.max_epoch.0 as i64);
    }
    if let Some(d) = &seen.db {
        m.primary
            .with_label_values(&[&key])
            .set(i64::from(d.primary));
        m.fenced.with_label_values(&[&key]).set(i64::from(d.fenced));
    }
    let peer = r.names.peer.as_str().to_string();
    match peer_reachable(
        held.is_some(),
        seen.facts.as_ref(),
        seen.view.as_ref(),
        &r.names.peer,
    ) {
        Some(up) => m
            .peer_reachable
            .with_label_values(&[&key, &peer])
            .set(i64::from(up)),
        None => {
            let _ = m.peer_reachable.remove_label_values(&[&key, &peer]);
        }
    }
    let status = status_for(
        cr,
        &ctx.cfg.region,
        &seen,
        r.last_failover.clone(),
        r.last_switchover.clone(),
        r.recorded.as_ref(),
        (&decision.0, &decision.1),
    );
    drop(r);
    if cr.status.as_ref() != Some(&status) {
        let api: Api<Continuum> = Api::namespaced(
            ctx.client.clone(),
            &cr.namespace().unwrap_or_else(|| "default".into()),
        );
        api.patch_status(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(Error::Status)?;
    }
    Ok(())
}

/// How many TTLs a demoted old primary waits for its successor to take the
/// lease before taking it back.
pub const HANDOVER_TIMEOUT_TTLS: u32 = 6;

/// Finalizer on every Continuum: on deletion the region holding the lease
/// gives it up at the witnesses (after recording "no synchronous standby",
/// so the other region, still managed by its own copy, cannot promote by
/// itself while this database keeps running unmanaged). Nothing is fenced
/// or unfenced.
pub const FINALIZER: &str = "dr.openova.io/lease-release";

fn continuum_api(ctx: &Ctx, cr: &Continuum) -> Api<Continuum> {
    Api::namespaced(
        ctx.client.clone(),
        &cr.namespace().unwrap_or_else(|| "default".into()),
    )
}

/// Merge patch of the finalizer list, guarded by the resourceVersion read.
async fn set_finalizers(ctx: &Ctx, cr: &Continuum, list: Vec<String>) -> Result<(), Error> {
    let body = json!({"metadata": {
        "finalizers": list,
        "resourceVersion": cr.resource_version(),
    }});
    continuum_api(ctx, cr)
        .patch(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
        .map(|_| ())
        .map_err(Error::Finalizer)
}

async fn add_finalizer(cr: &Continuum, ctx: &Ctx) -> Result<(), Error> {
    let mut list = cr.finalizers().to_vec();
    list.push(FINALIZER.to_string());
    set_finalizers(ctx, cr, list).await?;
    tracing::info!(continuum = %cr.name_any(), finalizer = FINALIZER, reason = "release the lease if the Continuum is deleted", "finalizer added");
    Ok(())
}

/// Deletion: release the lease (if this region holds it), stop managing,
/// remove the finalizer.
async fn finalize(cr: &Continuum, ctx: &Ctx) -> Result<(), Error> {
    if !cr.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let key = format!(
        "{}/{}",
        cr.namespace().unwrap_or_else(|| "default".into()),
        cr.name_any()
    );
    let oref = cr.object_ref(&());
    let runner = ctx.runners.lock().await.get(&key).cloned();
    let mut detail = "this region did not hold the lease".to_string();
    if let Some(runner) = runner {
        let mut r = runner.lock().await;
        let grant = r.grant.borrow().clone();
        if let Some(g) = grant.filter(|g| g.is_held_at(Instant::now())) {
            let meta = r.new_meta(None, None, None, None);
            if let Err(e) = r.quorum.update_meta(&g, &meta).await {
                let m = &ctx.metrics;
                m.actions.with_label_values(&["finalize", "failed"]).inc();
                m.action_errors
                    .with_label_values(&["finalize", e.label()])
                    .inc();
                return Err(Error::Quorum(format!(
                    "record no synchronous standby before release: {e}"
                )));
            }
            r.grant.send_replace(None);
            if let Some(t) = r.renewer.take() {
                t.abort();
            }
            let released = r.quorum.release(&g).await;
            detail = format!(
                "epoch {} released at {released} witness(es) (no synchronous standby recorded first; nothing fenced or unfenced)",
                g.epoch
            );
        }
        let peer = r.names.peer.as_str().to_string();
        drop(r);
        ctx.runners.lock().await.remove(&key);
        // The Continuum is gone: so are its series.
        let m = &ctx.metrics;
        for g in [&m.lease_held, &m.epoch, &m.primary, &m.fenced] {
            let _ = g.remove_label_values(&[&key]);
        }
        let _ = m.peer_reachable.remove_label_values(&[&key, &peer]);
    }
    ctx.metrics
        .actions
        .with_label_values(&["finalize", "ok"])
        .inc();
    tracing::info!(continuum = %key, action = "finalize", detail = %detail, reason = "Continuum deleted", "lease released, finalizer removed");
    publish(ctx, &oref, false, "Finalized", detail).await;
    let list: Vec<String> = cr
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    set_finalizers(ctx, cr, list).await
}

/// The region named by the switchover annotation, when it is the peer and
/// this region can hand over without a rebuild: a Cluster in CNPG's
/// distributed topology, or a `postgres` server that knows how to follow
/// the peer (`primaryConninfoSecretRef`).
fn switchover_request(
    cr: &Continuum,
    names: &Names,
    db: &Database,
    cluster: Option<&DynamicObject>,
) -> Option<HolderId> {
    let to = cr.annotations().get(cnpg::ANNOTATION_SWITCHOVER_TO)?;
    let to = HolderId::new(to.as_str()).ok()?;
    let able = match db {
        Database::Cnpg(_) => cluster.is_some_and(cnpg::is_distributed),
        Database::Postgres(p) => p.can_follow(),
    };
    (to == names.peer && able).then_some(to)
}

/// The old primary's part is done: remove the request annotation.
async fn clear_switchover_request(cr: &Continuum, ctx: &Ctx) {
    let body = json!({"metadata": {"annotations": {cnpg::ANNOTATION_SWITCHOVER_TO: null}}});
    if let Err(e) = continuum_api(ctx, cr)
        .patch(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
    {
        tracing::warn!(continuum = %cr.name_any(), error = %e, "could not remove the switchover annotation");
    }
}

async fn reconcile(cr: Arc<Continuum>, ctx: Arc<Ctx>) -> Result<Requeue, Error> {
    match reconcile_once(&cr, &ctx).await {
        Ok(()) => Ok(Requeue::requeue(ctx.cfg.tick)),
        Err(e) => {
            if !matches!(e, Error::Status(_) | Error::Finalizer(_)) {
                report_blocked(&cr, &ctx, &e).await;
            }
            Err(e)
        }
    }
}

/// Shows why nothing can be decided (bad spec, unreadable TLS Secret) as a
/// `Decision=False` condition, so `kubectl get continuum -o yaml` tells.
async fn report_blocked(cr: &Continuum, ctx: &Ctx, err: &Error) {
    let old = cr.status.clone().unwrap_or_default();
    let mut conditions: Vec<Condition> = old
        .conditions
        .iter()
        .filter(|c| c.type_ != "Decision")
        .cloned()
        .collect();
    conditions.push(condition(
        &old.conditions,
        "Decision",
        false,
        &pascal(err.label()),
        err.to_string(),
        cr.metadata.generation,
    ));
    if old.conditions == conditions {
        return;
    }
    let api: Api<Continuum> = Api::namespaced(
        ctx.client.clone(),
        &cr.namespace().unwrap_or_else(|| "default".into()),
    );
    let body = json!({"status": {"conditions": conditions, "observedBy": ctx.cfg.region.as_str()}});
    if let Err(e) = api
        .patch_status(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
    {
        tracing::warn!(continuum = %cr.name_any(), error = %e, "could not report the blocked decision");
    }
}

fn error_policy(cr: Arc<Continuum>, err: &Error, ctx: Arc<Ctx>) -> Requeue {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[err.label()])
        .inc();
    tracing::warn!(continuum = %cr.name_any(), error = %err, label = err.label(), "reconcile failed; retrying");
    // Spec errors need an edit; anything else is retried at the tick.
    match err {
        Error::Spec(_) => Requeue::requeue(Duration::from_secs(30)),
        _ => Requeue::requeue(ctx.cfg.tick.max(Duration::from_millis(500))),
    }
}

/// Runs the controller until the stream ends (or the task is aborted on
/// losing leadership; call [`Ctx::stop_all`] then).
pub async fn run(ctx: Arc<Ctx>) {
    let api: Api<Continuum> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use continuum_shared::lease::Epoch;
    use continuum_shared::pg::Lsn;

    fn h(s: &str) -> HolderId {
        HolderId::new(s).expect("valid holder")
    }

    fn view(holder: Option<&str>, expired: bool) -> MajorityView {
        MajorityView {
            holder: holder.map(|x| (h(x), Epoch(3))),
            expired_at_majority: expired,
            max_epoch: Epoch(3),
            meta: None,
            answered: 3,
        }
    }

    fn facts(in_recovery: bool, streaming: bool) -> dbfacts::DbFacts {
        dbfacts::DbFacts {
            in_recovery,
            synchronous_standby_names: String::new(),
            peer_streaming: streaming,
            sees_replication: true,
            peer_replay: Some(Lsn(1)),
            replay: None,
        }
    }

    #[test]
    fn peer_reachable_table() {
        let b = h("b");
        let cases = [
            (
                "holding, peer streams",
                true,
                Some(facts(false, true)),
                None,
                Some(true),
            ),
            (
                "holding, peer does not stream",
                true,
                Some(facts(false, false)),
                None,
                Some(false),
            ),
            (
                "holding, no connection: unknown",
                true,
                None,
                Some(view(Some("a"), false)),
                None,
            ),
            (
                "holding, server still in recovery: unknown",
                true,
                Some(facts(true, false)),
                None,
                None,
            ),
            (
                "standby, peer holds",
                false,
                None,
                Some(view(Some("b"), false)),
                Some(true),
            ),
            (
                "standby, lease expired",
                false,
                None,
                Some(view(None, true)),
                Some(false),
            ),
            (
                "standby, someone else holds",
                false,
                None,
                Some(view(Some("a"), false)),
                Some(false),
            ),
            (
                "standby, no majority view: unknown",
                false,
                None,
                None,
                None,
            ),
        ];
        for (name, holding, f, v, want) in cases {
            assert_eq!(
                peer_reachable(holding, f.as_ref(), v.as_ref(), &b),
                want,
                "{name}"
            );
        }
    }
}
