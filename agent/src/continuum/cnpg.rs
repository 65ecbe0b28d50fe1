//! CloudNativePG back-end: reads a `postgresql.cnpg.io/v1` Cluster into a
//! [`DbState`] and turns each failover [`Action`] into a merge patch of that
//! Cluster. The operator (CNPG) carries the patch out; this module never
//! talks to PostgreSQL.
//!
//! What is mapped (CNPG docs: replica clusters / distributed topology,
//! fencing, synchronous replication):
//!
//! * **primary**: no `spec.replica`, or `spec.replica.primary` equals this
//!   Cluster's own name (`spec.replica.self`, else `metadata.name`), or (no
//!   distributed topology) `spec.replica.enabled` is not true.
//! * **fenced**: annotation `cnpg.io/fencedInstances` lists `"*"` or the
//!   current primary instance (`status.currentPrimary`).
//! * **epoch**: annotation `dr.openova.io/epoch`, written by the promotion
//!   patch itself and by `RecordEpoch` (invariant 4). An unreadable value
//!   reads as 0, which keeps a fenced primary fenced (invariant 5).
//! * **required standby**: the first `spec.postgresql.synchronous.standbyNamesPre`
//!   entry, mapped back to a region through the Continuum's Cluster names;
//!   `dataDurability: preferred` guarantees nothing, so it maps to none.
//! * **peer attached**: CNPG's Cluster status does not say whether the other
//!   region's designated primary is streaming from this one. The annotation
//!   `dr.openova.io/peer-attached: "false"` says it is not; the failover
//!   promotion writes it (after a promotion without a token the old primary
//!   must be rebuilt before it streams again), an operator or a rebuild
//!   removes it. Absent means attached.
//!
//! What CNPG cannot tell us from the Cluster alone: the replay position of
//! the designated primary (CNPG promotes with `pg_promote`, which replays all
//! received WAL first: that is invariant 4's "caught up"), and whether the
//! promotion finished inside PostgreSQL (the patch's acceptance is the
//! completion time we record).
//!
//! Actions:
//!
//! * `Fence`: `cnpg.io/fencedInstances: '["*"]'`.
//! * `Unfence{standby}`: remove the annotation and set the synchronous standby.
//! * `SetRequiredStandby{s}`: `spec.postgresql.synchronous = {method: first,
//!   number: 1, standbyNamesPre: [<peer cluster name>], dataDurability:
//!   required}`, or `null` (asynchronous) for none.
//! * `Promote{epoch}` (failover, old region gone): `spec.replica.primary` =
//!   own name and `spec.replica.promotionToken` removed (a promotion without
//!   a token); for a non-distributed replica cluster `spec.replica.enabled =
//!   false`. The same patch writes the epoch annotation.
//! * `RecordEpoch{e}`: the epoch annotation, only ever upwards.

use continuum_shared::failover::DbState;
use continuum_shared::lease::{Epoch, HolderId};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{json, Value};

pub const GROUP: &str = "postgresql.cnpg.io";
pub const VERSION: &str = "v1";
pub const KIND: &str = "Cluster";
pub const PLURAL: &str = "clusters";
pub const ANNOTATION_FENCED: &str = "cnpg.io/fencedInstances";
pub const ANNOTATION_EPOCH: &str = "dr.openova.io/epoch";
pub const ANNOTATION_PEER_ATTACHED: &str = "dr.openova.io/peer-attached";
pub const ANNOTATION_PROMOTED_AT: &str = "dr.openova.io/promoted-at";
/// On a Continuum (the old primary's copy): ask for a planned switchover to
/// the named region (`continuum-agent switchover --continuum`).
pub const ANNOTATION_SWITCHOVER_TO: &str = "dr.openova.io/switchover-to";
/// Field manager recorded on every patch (audit: who changed the Cluster).
pub const FIELD_MANAGER: &str = "continuum-agent";

/// The CNPG Cluster resource.
pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

pub fn cluster_api(client: kube::Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, namespace, &api_resource())
}

/// How this region's and the peer's Clusters are named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub region: HolderId,
    pub peer: HolderId,
    /// This region's Cluster name (its `application_name` at the peer).
    pub local_cluster: String,
    /// The peer region's Cluster name (listed in `standbyNamesPre`).
    pub peer_cluster: String,
}

impl Names {
    pub fn region_of(&self, app_name: &str) -> Option<HolderId> {
        if app_name == self.peer_cluster {
            Some(self.peer.clone())
        } else if app_name == self.local_cluster {
            Some(self.region.clone())
        } else {
            None
        }
    }

    /// The `application_name` `region`'s database streams with (its
    /// Cluster's name, or the region id for direct PostgreSQL).
    pub fn application_name_of(&self, region: &HolderId) -> &str {
        if region == &self.region {
            &self.local_cluster
        } else {
            &self.peer_cluster
        }
    }
}

/// Why a Cluster could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum CnpgError {
    #[error("Cluster {0} not found")]
    NotFound(String),
    #[error("API server: {0}")]
    Api(#[from] kube::Error),
    #[error("refusing to lower the recorded epoch from {have} to {want}")]
    EpochBackwards { have: u64, want: u64 },
}

impl CnpgError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "cluster_not_found",
            Self::Api(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Self::Api(kube::Error::Api(s)) if s.code >= 500 => "server_error",
            Self::Api(_) => "api",
            Self::EpochBackwards { .. } => "epoch_backwards",
        }
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

fn annotation<'a>(obj: &'a DynamicObject, key: &str) -> Option<&'a str> {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// This Cluster's own name in the distributed topology.
fn self_name(obj: &DynamicObject) -> &str {
    str_at(&obj.data, &["spec", "replica", "self"])
        .or(obj.metadata.name.as_deref())
        .unwrap_or("")
}

/// Whether the Cluster is (meant to be) the primary of the topology.
pub fn is_primary(obj: &DynamicObject) -> bool {
    let Some(replica) = obj.data.get("spec").and_then(|s| s.get("replica")) else {
        return true;
    };
    match replica.get("primary").and_then(Value::as_str) {
        Some(p) => p == self_name(obj),
        None => replica.get("enabled").and_then(Value::as_bool) != Some(true),
    }
}

/// Whether writes are refused by CNPG's fencing annotation.
pub fn is_fenced(obj: &DynamicObject) -> bool {
    let Some(raw) = annotation(obj, ANNOTATION_FENCED) else {
        return false;
    };
    // An unparsable value: CNPG would reject it; treat as not fenced so the
    // decision re-fences with a valid value.
    let Ok(list) = serde_json::from_str::<Vec<String>>(raw) else {
        return false;
    };
    let current = str_at(&obj.data, &["status", "currentPrimary"]);
    list.iter().any(|i| i == "*" || Some(i.as_str()) == current)
}

/// The epoch annotation (0 when absent or unreadable).
pub fn epoch(obj: &DynamicObject) -> Epoch {
    Epoch(
        annotation(obj, ANNOTATION_EPOCH)
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0),
    )
}

/// The region the Cluster requires to apply every commit, if any.
///
/// CNPG builds `synchronous_standby_names` from `standbyNamesPre`, then the
/// Cluster's own pods (capped by `maxStandbyNamesFromCluster`, unbounded when
/// unset), then `standbyNamesPost`. Unless the list is exactly the peer's
/// Cluster, a local pod can satisfy `FIRST 1` while the other region streams
/// asynchronously, so nothing is reported as required (invariant 3).
pub fn required_standby(obj: &DynamicObject, names: &Names) -> Option<HolderId> {
    let sync = obj
        .data
        .get("spec")?
        .get("postgresql")?
        .get("synchronous")?;
    if sync.get("dataDurability").and_then(Value::as_str) == Some("preferred") {
        return None;
    }
    if sync
        .get("maxStandbyNamesFromCluster")
        .and_then(Value::as_u64)
        != Some(0)
    {
        return None;
    }
    let post = sync.get("standbyNamesPost").and_then(Value::as_array);
    if post.is_some_and(|p| !p.is_empty()) {
        return None;
    }
    match sync.get("standbyNamesPre")?.as_array()?.as_slice() {
        [only] => names.region_of(only.as_str()?),
        _ => None,
    }
}

/// The Cluster as the failover decision sees it.
pub fn observe(obj: &DynamicObject, names: &Names) -> DbState {
    let primary = is_primary(obj);
    DbState {
        primary,
        fenced: primary && is_fenced(obj),
        epoch: epoch(obj),
        required_standby: if primary {
            required_standby(obj, names)
        } else {
            None
        },
        peer_attached: annotation(obj, ANNOTATION_PEER_ATTACHED) != Some("false"),
        // CNPG does not report the designated primary's replay position.
        replay_lsn: None,
    }
}

fn synchronous_for(standby: Option<&HolderId>, names: &Names) -> Value {
    match standby {
        Some(s) => json!({
            "method": "first",
            "number": 1,
            "standbyNamesPre": [names.application_name_of(s)],
            // Local pods must never stand in for the other region.
            "maxStandbyNamesFromCluster": 0,
            "standbyNamesPost": [],
            "dataDurability": "required",
        }),
        None => Value::Null,
    }
}

/// Whether the Cluster's spec already asks CNPG for exactly what
/// [`set_standby_patch`] would write for `standby`.
pub fn spec_requires(obj: &DynamicObject, standby: Option<&HolderId>, names: &Names) -> bool {
    let current = obj
        .data
        .get("spec")
        .and_then(|s| s.get("postgresql"))
        .and_then(|p| p.get("synchronous"))
        .cloned()
        .unwrap_or(Value::Null);
    current == synchronous_for(standby, names)
}

/// Merge patch: fence every instance.
pub fn fence_patch() -> Value {
    json!({"metadata": {"annotations": {ANNOTATION_FENCED: "[\"*\"]"}}})
}

/// Merge patch: lift the fence and require `standby`.
pub fn unfence_patch(standby: Option<&HolderId>, names: &Names) -> Value {
    json!({
        "metadata": {"annotations": {ANNOTATION_FENCED: null}},
        "spec": {"postgresql": {"synchronous": synchronous_for(standby, names)}},
    })
}

/// Merge patch: require `standby` (or none).
pub fn set_standby_patch(standby: Option<&HolderId>, names: &Names) -> Value {
    json!({"spec": {"postgresql": {"synchronous": synchronous_for(standby, names)}}})
}

/// Merge patch: promote without a token (failover) and record the epoch.
pub fn promote_patch(obj: &DynamicObject, epoch: Epoch, now: &str) -> Value {
    let distributed = obj
        .data
        .get("spec")
        .and_then(|s| s.get("replica"))
        .and_then(|r| r.get("primary"))
        .is_some();
    let replica = if distributed {
        json!({"primary": self_name(obj), "promotionToken": null})
    } else {
        json!({"enabled": false})
    };
    json!({
        "metadata": {"annotations": {
            ANNOTATION_EPOCH: epoch.0.to_string(),
            ANNOTATION_PROMOTED_AT: now,
            ANNOTATION_PEER_ATTACHED: "false",
        }},
        "spec": {"replica": replica},
    })
}

/// Whether the Cluster is part of CNPG's distributed topology
/// (`spec.replica.primary`), which switchover by tokens needs.
pub fn is_distributed(obj: &DynamicObject) -> bool {
    str_at(&obj.data, &["spec", "replica", "primary"]).is_some()
}

/// `status.demotionToken`, published by CNPG once a demoted primary has
/// shut down cleanly.
pub fn demotion_token(obj: &DynamicObject) -> Option<String> {
    str_at(&obj.data, &["status", "demotionToken"])
        .filter(|t| !t.is_empty())
        .map(String::from)
}

/// Merge patch: demote this Cluster to a replica of the peer's (the first
/// half of CNPG's switchover; CNPG then publishes `status.demotionToken`).
pub fn demote_patch(names: &Names) -> Value {
    json!({"spec": {"replica": {"primary": names.peer_cluster}}})
}

/// Merge patch: promote with the old primary's demotion token (the second
/// half of CNPG's switchover: CNPG waits for replay up to the token's
/// position, then promotes; the old primary stays attached as a replica).
pub fn promote_with_token_patch(
    obj: &DynamicObject,
    epoch: Epoch,
    token: &str,
    now: &str,
) -> Value {
    json!({
        "metadata": {"annotations": {
            ANNOTATION_EPOCH: epoch.0.to_string(),
            ANNOTATION_PROMOTED_AT: now,
            ANNOTATION_PEER_ATTACHED: null,
        }},
        "spec": {"replica": {"primary": self_name(obj), "promotionToken": token}},
    })
}

/// The old primary's next switchover step while it holds the lease with a
/// handover intent recorded (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverStep {
    /// Set `spec.replica.primary` to the peer's Cluster.
    Demote,
    /// Record CNPG's demotion token in the intent at the witnesses.
    RecordToken(String),
    /// The token is recorded: release the lease to the successor.
    Release,
    Wait(&'static str),
}

pub fn handover_step(token_recorded: bool, obj: &DynamicObject) -> HandoverStep {
    if token_recorded {
        return HandoverStep::Release;
    }
    if !is_distributed(obj) {
        return HandoverStep::Wait(
            "handover: the Cluster is not in CNPG's distributed topology (spec.replica.primary)",
        );
    }
    if is_primary(obj) {
        return HandoverStep::Demote;
    }
    match demotion_token(obj) {
        Some(t) => HandoverStep::RecordToken(t),
        None => HandoverStep::Wait("handover: waiting for CNPG's demotion token"),
    }
}

/// Merge patch: record the epoch.
pub fn epoch_patch(epoch: Epoch) -> Value {
    json!({"metadata": {"annotations": {ANNOTATION_EPOCH: epoch.0.to_string()}}})
}

/// One region's Cluster, reached through its own cluster's API server.
#[derive(Clone)]
pub struct ClusterHandle {
    pub api: Api<DynamicObject>,
    pub name: String,
}

impl ClusterHandle {
    pub async fn get(&self) -> Result<DynamicObject, CnpgError> {
        self.api
            .get_opt(&self.name)
            .await?
            .ok_or_else(|| CnpgError::NotFound(self.name.clone()))
    }

    /// Merge patch with this agent's field manager.
    pub async fn patch(&self, body: &Value) -> Result<DynamicObject, CnpgError> {
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        Ok(self.api.patch(&self.name, &pp, &Patch::Merge(body)).await?)
    }

    pub async fn fence(&self) -> Result<(), CnpgError> {
        self.patch(&fence_patch()).await.map(|_| ())
    }

    /// Writes the epoch unless the Cluster already records a higher one.
    pub async fn record_epoch(&self, want: Epoch) -> Result<(), CnpgError> {
        let obj = self.get().await?;
        let have = epoch(&obj);
        if have.0 > want.0 {
            return Err(CnpgError::EpochBackwards {
                have: have.0,
                want: want.0,
            });
        }
        self.patch(&epoch_patch(want)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HolderId {
        HolderId::new(s).unwrap()
    }

    /// RFC 7386 merge, for applying the patches in tests.
    fn merge(target: &mut Value, patch: &Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(t), Some(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }

    fn names() -> Names {
        Names {
            region: h("b"),
            peer: h("a"),
            local_cluster: "pg-b".into(),
            peer_cluster: "pg-a".into(),
        }
    }

    fn cluster(v: Value) -> DynamicObject {
        let mut base = json!({
            "apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster",
            "metadata": {"name": "pg-b", "namespace": "db"},
        });
        if let (Some(b), Some(extra)) = (base.as_object_mut(), v.as_object()) {
            for (k, val) in extra {
                if k == "metadata" {
                    b["metadata"]["annotations"] = val["annotations"].clone();
                } else {
                    b.insert(k.clone(), val.clone());
                }
            }
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn observation_table() {
        let sync_a = json!({"method": "first", "number": 1, "standbyNamesPre": ["pg-a"], "maxStandbyNamesFromCluster": 0, "dataDurability": "required"});
        let cases: Vec<(&str, Value, DbState)> = vec![
            (
                "plain cluster is primary",
                json!({"spec": {}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "replica of a",
                json!({"spec": {"replica": {"primary": "pg-a", "source": "pg-a"}}}),
                DbState {
                    primary: false,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "self named primary",
                json!({"spec": {"replica": {"primary": "pg-b", "source": "pg-a"}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "replica.self overrides name",
                json!({"spec": {"replica": {"primary": "x", "self": "x"}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "legacy replica enabled",
                json!({"spec": {"replica": {"enabled": true, "source": "pg-a"}}}),
                DbState {
                    primary: false,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "legacy replica disabled",
                json!({"spec": {"replica": {"enabled": false}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "fenced all, epoch, sync a",
                json!({"metadata": {"annotations": {ANNOTATION_FENCED: "[\"*\"]", ANNOTATION_EPOCH: "7"}}, "spec": {"postgresql": {"synchronous": sync_a}}}),
                DbState {
                    primary: true,
                    fenced: true,
                    epoch: Epoch(7),
                    required_standby: Some(h("a")),
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "fenced current primary only",
                json!({"metadata": {"annotations": {ANNOTATION_FENCED: "[\"pg-b-1\"]"}}, "spec": {}, "status": {"currentPrimary": "pg-b-1"}}),
                DbState {
                    primary: true,
                    fenced: true,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "fenced a replica instance only: not fenced",
                json!({"metadata": {"annotations": {ANNOTATION_FENCED: "[\"pg-b-2\"]"}}, "spec": {}, "status": {"currentPrimary": "pg-b-1"}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "garbage fence and epoch",
                json!({"metadata": {"annotations": {ANNOTATION_FENCED: "yes", ANNOTATION_EPOCH: "x"}}, "spec": {}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "preferred durability guarantees nothing",
                json!({"spec": {"postgresql": {"synchronous": {"method": "first", "number": 1, "standbyNamesPre": ["pg-a"], "dataDurability": "preferred"}}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "unknown standby name",
                json!({"spec": {"postgresql": {"synchronous": {"method": "first", "number": 1, "standbyNamesPre": ["other"]}}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "requires itself (inherited)",
                json!({"spec": {"postgresql": {"synchronous": {"method": "first", "number": 1, "standbyNamesPre": ["pg-b"], "maxStandbyNamesFromCluster": 0}}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: Some(h("b")),
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "local pods may stand in for the peer (maxStandbyNamesFromCluster unset)",
                json!({"spec": {"postgresql": {"synchronous": {"method": "first", "number": 1, "standbyNamesPre": ["pg-a"]}}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "local pods may stand in for the peer (maxStandbyNamesFromCluster 1)",
                json!({"spec": {"postgresql": {"synchronous": {"method": "first", "number": 1, "standbyNamesPre": ["pg-a"], "maxStandbyNamesFromCluster": 1}}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "another standby listed after",
                json!({"spec": {"postgresql": {"synchronous": {"method": "first", "number": 1, "standbyNamesPre": ["pg-a"], "maxStandbyNamesFromCluster": 0, "standbyNamesPost": ["x"]}}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "two names before",
                json!({"spec": {"postgresql": {"synchronous": {"method": "first", "number": 1, "standbyNamesPre": ["pg-a", "x"], "maxStandbyNamesFromCluster": 0}}}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
            (
                "peer detached",
                json!({"metadata": {"annotations": {ANNOTATION_PEER_ATTACHED: "false"}}, "spec": {}}),
                DbState {
                    primary: true,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: false,
                    replay_lsn: None,
                },
            ),
            (
                "replica never reports fenced",
                json!({"metadata": {"annotations": {ANNOTATION_FENCED: "[\"*\"]"}}, "spec": {"replica": {"primary": "pg-a"}}}),
                DbState {
                    primary: false,
                    fenced: false,
                    epoch: Epoch(0),
                    required_standby: None,
                    peer_attached: true,
                    replay_lsn: None,
                },
            ),
        ];
        for (name, v, want) in cases {
            assert_eq!(observe(&cluster(v), &names()), want, "{name}");
        }
    }

    #[test]
    fn promote_patch_distributed_and_legacy() {
        let dist = cluster(
            json!({"spec": {"replica": {"primary": "pg-a", "source": "pg-a", "promotionToken": "t"}}}),
        );
        let p = promote_patch(&dist, Epoch(3), "2026-01-01T00:00:00Z");
        assert_eq!(p["spec"]["replica"]["primary"], "pg-b");
        assert!(p["spec"]["replica"]["promotionToken"].is_null());
        assert_eq!(p["metadata"]["annotations"][ANNOTATION_EPOCH], "3");
        let mut promoted = dist.clone();
        merge(&mut promoted.data, &p);
        assert!(is_primary(&promoted));

        let legacy = cluster(json!({"spec": {"replica": {"enabled": true, "source": "pg-a"}}}));
        let p = promote_patch(&legacy, Epoch(3), "t");
        assert_eq!(p["spec"]["replica"], json!({"enabled": false}));
    }

    #[test]
    fn switchover_steps_and_patches() {
        let primary = cluster(
            json!({"spec": {"replica": {"self": "pg-b", "primary": "pg-b", "source": "pg-a"}}}),
        );
        assert_eq!(handover_step(false, &primary), HandoverStep::Demote);
        let mut demoted = primary.clone();
        merge(&mut demoted.data, &demote_patch(&names()));
        assert!(!is_primary(&demoted));
        assert!(matches!(
            handover_step(false, &demoted),
            HandoverStep::Wait(_)
        ));
        merge(
            &mut demoted.data,
            &json!({"status": {"demotionToken": "dG9rZW4="}}),
        );
        assert_eq!(
            handover_step(false, &demoted),
            HandoverStep::RecordToken("dG9rZW4=".into())
        );
        assert_eq!(handover_step(true, &demoted), HandoverStep::Release);
        let legacy = cluster(json!({"spec": {}}));
        assert!(matches!(
            handover_step(false, &legacy),
            HandoverStep::Wait(_)
        ));

        let replica = cluster(
            json!({"metadata": {"annotations": {ANNOTATION_PEER_ATTACHED: "false"}}, "spec": {"replica": {"self": "pg-b", "primary": "pg-a"}}}),
        );
        let p = promote_with_token_patch(&replica, Epoch(4), "dG9rZW4=", "t");
        let mut promoted = replica.clone();
        merge(&mut promoted.data, &p);
        assert!(is_primary(&promoted));
        assert_eq!(
            promoted.data["spec"]["replica"]["promotionToken"],
            "dG9rZW4="
        );
        assert_eq!(p["metadata"]["annotations"][ANNOTATION_EPOCH], "4");
    }

    #[test]
    fn standby_patches_name_the_peer_cluster() {
        let p = set_standby_patch(Some(&h("a")), &names());
        assert_eq!(
            p["spec"]["postgresql"]["synchronous"]["standbyNamesPre"],
            json!(["pg-a"])
        );
        let mut obj = cluster(json!({"spec": {}}));
        merge(&mut obj.data, &p);
        assert_eq!(required_standby(&obj, &names()), Some(h("a")));
        assert!(spec_requires(&obj, Some(&h("a")), &names()));
        assert!(!spec_requires(&obj, None, &names()));
        assert!(!spec_requires(&obj, Some(&h("b")), &names()));
        assert!(spec_requires(&cluster(json!({"spec": {}})), None, &names()));
        assert!(set_standby_patch(None, &names())["spec"]["postgresql"]["synchronous"].is_null());
        let u = unfence_patch(None, &names());
        assert!(u["metadata"]["annotations"][ANNOTATION_FENCED].is_null());
    }
}
