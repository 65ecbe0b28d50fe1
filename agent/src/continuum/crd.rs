//! The `Continuum` custom resource (`dr.openova.io/v1`, as in the seed's
//! runbook 6.2): which two regions share one database, where its witnesses
//! are, and how failover behaves. The YAML in `manifests/crds/continuum.yaml`
//! is generated from these types (`continuum-agent crds`); a test fails when
//! it drifts.
//!
//! The resource exists in both regions' clusters; each region's agent reads
//! its local copy and writes that copy's status (its own view: the two
//! statuses agree on primary and epoch once both agents have seen the same
//! majority of witnesses).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired failover behaviour for one database spread over two regions.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "dr.openova.io",
    version = "v1",
    kind = "Continuum",
    plural = "continuums",
    shortname = "ctm",
    namespaced,
    status = "ContinuumStatus",
    printcolumn = r#"{"name":"Primary","type":"string","jsonPath":".status.primaryRegion"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.epoch"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ContinuumSpec {
    /// Exactly two regions; each agent finds its own by `--region`.
    pub regions: Vec<RegionSpec>,
    /// The lease witnesses (a majority must agree on every lease decision).
    pub witnesses: WitnessSpec,
    /// Lease time to live in seconds. Failover cannot be faster than this.
    #[serde(default = "default_ttl_seconds")]
    #[schemars(range(min = 1, max = 300))]
    pub ttl_seconds: u32,
    /// `automatic`: the recorded synchronous standby promotes itself when the
    /// primary's lease expires; `manual`: it waits for an operator.
    #[serde(default)]
    pub mode: FailoverMode,
    /// `required`: writes block while the synchronous standby is away (CNPG
    /// `dataDurability: required`); `preferred`: record "no synchronous
    /// standby" at the witnesses first, then go on without it (no automatic
    /// promotion until it is back).
    #[serde(default)]
    pub sync_policy: SyncPolicySpec,
}

fn default_ttl_seconds() -> u32 {
    5
}

/// One region's database.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionSpec {
    /// Region id: a DNS label, the lease holder id at the witnesses.
    pub name: String,
    /// The region's CloudNativePG Cluster (`postgresql.cnpg.io/v1`), in that
    /// region's Kubernetes cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnpg: Option<CnpgClusterRef>,
    /// For PostgreSQL not managed by CloudNativePG: a Secret holding a libpq
    /// connection string (superuser) to the region's database. The agent
    /// fences (read-only, sessions terminated), promotes (`pg_promote` after
    /// replay caught up) and sets `synchronous_standby_names` over it; the
    /// standby streams with `application_name` = its region name. Exactly
    /// one of `cnpg` and `postgres`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresRef>,
}

/// Reference to a CloudNativePG Cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CnpgClusterRef {
    /// Namespace of the Cluster; defaults to the Continuum's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name of the Cluster. In a distributed topology this is also the name
    /// the other region lists in `standbyNamesPre` (the designated primary's
    /// `application_name`).
    pub name: String,
    /// Optional: a Secret key holding a libpq connection string to this
    /// Cluster's `-rw` Service, as a role with `pg_monitor` (CNPG's
    /// `<cluster>-superuser` Secret, key `uri`, works). With it the agent
    /// reads the *running* primary's `synchronous_standby_names` before it
    /// records a standby as synchronous (the spec may not be applied yet),
    /// keeps the confirmed LSN in the lease metadata current, fills
    /// `lastFailover.lsnAtPromotion` with the replay position at promotion,
    /// and reports whether the peer region streams. Without it the agent
    /// trusts the Cluster's spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret_ref: Option<SecretKeyRef>,
}

/// A libpq connection string kept in a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresRef {
    /// Secret key holding the connection string (`postgresql://...` or
    /// `key=value` form) as a superuser: fencing terminates sessions and
    /// changes settings with `ALTER SYSTEM`.
    pub connection_secret_ref: SecretKeyRef,
    /// Optional, enables planned switchover (`continuum-agent switchover
    /// --continuum`): a Secret key holding the libpq connection string this
    /// region's server streams from the *other* region's server with (a role
    /// with `REPLICATION`). On a handover away from this region the agent
    /// sets it as `primary_conninfo` (adding `application_name` = this
    /// region), writes `standby.signal` and shuts the fenced server down
    /// (fast, with `COPY ... TO PROGRAM 'kill -INT <postmaster>'`: needs a
    /// superuser connection); whatever supervises the server (kubelet,
    /// systemd) starts it again as the new primary's standby, with no rebuild.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_conninfo_secret_ref: Option<SecretKeyRef>,
}

/// One key of a Secret in the Continuum's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// Where the witnesses are and how to reach them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WitnessSpec {
    /// HTTPS base URLs, one per witness (1, or 3 to tolerate one loss).
    #[schemars(length(min = 1))]
    pub urls: Vec<String>,
    /// Secret (in the Continuum's namespace) with `ca.crt` (the witnesses'
    /// CA), `tls.crt` and `tls.key` (this agent's client certificate).
    pub tls_secret_ref: LocalObjectRef,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FailoverMode {
    #[default]
    Automatic,
    Manual,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SyncPolicySpec {
    Required,
    #[default]
    Preferred,
}

/// What this region's agent last observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContinuumStatus {
    /// The region holding the lease at a majority of witnesses (or this
    /// region while it holds the lease by its own deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
    /// Highest epoch (fencing token) seen at a majority of witnesses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// This region's role: Primary, Fenced, Standby, Unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The region whose agent wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last promotion performed by this region's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover: Option<LastFailover>,
    /// The last planned switchover this region took part in (as the
    /// demoted old primary or as the promoted successor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switchover: Option<LastSwitchover>,
    /// The synchronous standby this region recorded at the witnesses in its
    /// current epoch (`none`: automatic promotion forbidden).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous_standby: Option<String>,
    /// The LSN the synchronous standby confirmed, as last recorded at the
    /// witnesses (`X/Y`; needs `connectionSecretRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_lsn: Option<String>,
    /// Standard conditions: LeaseHeld, Fenced, Decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Timings of a promotion.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastFailover {
    /// When this region took the lease (the old primary's lease had expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When the promotion was accepted by the API server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// This region's replay position when it was promoted (`X/Y`; read over
    /// `connectionSecretRef`), else the last LSN the old primary confirmed
    /// to the witnesses, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn_at_promotion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_region: Option<String>,
    /// Epoch the promotion ran under (also on the Cluster's annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// Timings of a planned switchover (annotation `dr.openova.io/switchover-to`
/// on the old primary's Continuum; see docs/switchover.md).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastSwitchover {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_region: Option<String>,
    /// Old primary: when it recorded the handover intent at the witnesses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<String>,
    /// Old primary: when CNPG published its `status.demotionToken`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demoted_at: Option<String>,
    /// Old primary: when it released the lease to the successor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<String>,
    /// Successor: when it took the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Successor: when its promotion with the token was accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// Milliseconds of this region's part (intent to release, or lease to
    /// promotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Epoch this region held (old primary) or took (successor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// The shape of `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The generated CRD as YAML (what `continuum-agent crds` prints).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&Continuum::crd())?;
    Ok(format!(
        "# Generated by `continuum-agent crds` from agent/src/continuum/crd.rs: do not edit.\n{body}"
    ))
}

/// Why a spec cannot be acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec.regions must name exactly two regions, found {0}")]
    RegionCount(usize),
    #[error("region {0:?} is not in spec.regions")]
    UnknownRegion(String),
    #[error("invalid region name {0:?}: {1}")]
    RegionName(String, String),
    #[error("region {0:?} names no database: set exactly one of cnpg and postgres")]
    NoDatabase(String),
    #[error("region {0:?} names both a cnpg Cluster and a postgres connection: set exactly one")]
    TwoDatabases(String),
    #[error("one region names a cnpg Cluster and the other a postgres connection: both must be of one kind")]
    MixedDatabases,
    #[error("spec.witnesses.urls is empty")]
    NoWitnesses,
    #[error("invalid lease name: {0}")]
    LeaseName(String),
}

impl SpecError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::RegionCount(_) => "region_count",
            Self::UnknownRegion(_) => "unknown_region",
            Self::RegionName(..) => "region_name",
            Self::NoDatabase(_) => "no_database",
            Self::TwoDatabases(_) => "two_databases",
            Self::MixedDatabases => "mixed_databases",
            Self::NoWitnesses => "no_witnesses",
            Self::LeaseName(_) => "lease_name",
        }
    }
}

/// The database a region names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DatabaseRef<'a> {
    Cnpg(&'a CnpgClusterRef),
    Postgres(&'a PostgresRef),
}

impl RegionSpec {
    /// The region's database: exactly one of `cnpg` and `postgres`.
    pub fn database(&self) -> Result<DatabaseRef<'_>, SpecError> {
        match (&self.cnpg, &self.postgres) {
            (Some(c), None) => Ok(DatabaseRef::Cnpg(c)),
            (None, Some(p)) => Ok(DatabaseRef::Postgres(p)),
            (None, None) => Err(SpecError::NoDatabase(self.name.clone())),
            (Some(_), Some(_)) => Err(SpecError::TwoDatabases(self.name.clone())),
        }
    }

    /// The `application_name` this region's database streams with when it
    /// is the standby: the CNPG Cluster's name (CNPG's designated primary
    /// uses it), else the region name.
    pub fn application_name(&self) -> &str {
        match &self.cnpg {
            Some(c) => &c.name,
            None => &self.name,
        }
    }
}

/// The two regions seen from `local`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sides<'a> {
    pub local: &'a RegionSpec,
    pub local_db: DatabaseRef<'a>,
    pub peer: &'a RegionSpec,
}

impl ContinuumSpec {
    /// Validates the spec from region `local`'s point of view.
    pub fn sides(&self, local: &str) -> Result<Sides<'_>, SpecError> {
        if self.regions.len() != 2 {
            return Err(SpecError::RegionCount(self.regions.len()));
        }
        for r in &self.regions {
            continuum_shared::lease::HolderId::new(r.name.clone())
                .map_err(|e| SpecError::RegionName(r.name.clone(), e.to_string()))?;
        }
        if self.witnesses.urls.is_empty() {
            return Err(SpecError::NoWitnesses);
        }
        let (l, p) = match (self.regions[0].name == local, self.regions[1].name == local) {
            (true, false) => (&self.regions[0], &self.regions[1]),
            (false, true) => (&self.regions[1], &self.regions[0]),
            _ => return Err(SpecError::UnknownRegion(local.to_string())),
        };
        let local_db = l.database()?;
        // A CNPG replica cluster of an external server (or the reverse) is
        // possible, but its promotion and naming are untested: refused.
        if matches!(local_db, DatabaseRef::Cnpg(_)) != matches!(p.database()?, DatabaseRef::Cnpg(_))
        {
            return Err(SpecError::MixedDatabases);
        }
        Ok(Sides {
            local: l,
            local_db,
            peer: p,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regions by name and database: `c` CNPG, `p` postgres, `cp` both,
    /// `-` none.
    fn spec(regions: &[(&str, &str)]) -> ContinuumSpec {
        ContinuumSpec {
            regions: regions
                .iter()
                .map(|(n, db)| RegionSpec {
                    name: n.to_string(),
                    cnpg: db.contains('c').then(|| CnpgClusterRef {
                        namespace: None,
                        name: format!("pg-{n}"),
                        connection_secret_ref: None,
                    }),
                    postgres: db.contains('p').then(|| PostgresRef {
                        connection_secret_ref: SecretKeyRef {
                            name: format!("pg-{n}"),
                            key: "uri".into(),
                        },
                        primary_conninfo_secret_ref: None,
                    }),
                })
                .collect(),
            witnesses: WitnessSpec {
                urls: vec!["https://w".into()],
                tls_secret_ref: LocalObjectRef { name: "t".into() },
            },
            ttl_seconds: 2,
            mode: FailoverMode::Automatic,
            sync_policy: SyncPolicySpec::Preferred,
        }
    }

    #[test]
    fn sides_validation() {
        let s = spec(&[("a", "c"), ("b", "c")]);
        let sides = s.sides("b").unwrap();
        assert_eq!(sides.local.name, "b");
        assert_eq!(sides.peer.name, "a");
        assert!(matches!(sides.local_db, DatabaseRef::Cnpg(c) if c.name == "pg-b"));
        assert_eq!(sides.peer.application_name(), "pg-a");
        let s = spec(&[("a", "p"), ("b", "p")]);
        let sides = s.sides("a").unwrap();
        assert!(
            matches!(sides.local_db, DatabaseRef::Postgres(p) if p.connection_secret_ref.name == "pg-a")
        );
        assert_eq!(sides.peer.application_name(), "b");
        // (regions, local, error label)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let refused: &[Case] = &[
            (&[("a", "c"), ("b", "c")], "c", "unknown_region"),
            (&[("a", "c")], "a", "region_count"),
            (&[("a", "c"), ("a", "c")], "a", "unknown_region"),
            (&[("a", "-"), ("b", "c")], "a", "no_database"),
            (&[("a", "c"), ("b", "-")], "a", "no_database"),
            (&[("a", "cp"), ("b", "c")], "a", "two_databases"),
            (&[("a", "p"), ("b", "cp")], "a", "two_databases"),
            (&[("A_1", "c"), ("b", "c")], "b", "region_name"),
            (&[("a", "c"), ("b", "p")], "a", "mixed_databases"),
            (&[("a", "c"), ("b", "p")], "b", "mixed_databases"),
        ];
        for (regions, local, want) in refused {
            assert_eq!(
                spec(regions).sides(local).unwrap_err().label(),
                *want,
                "{regions:?} from {local}"
            );
        }
    }

    #[test]
    fn defaults_from_minimal_yaml() {
        let s: ContinuumSpec = serde_json::from_value(serde_json::json!({
            "regions": [{"name": "a", "cnpg": {"name": "pg"}}, {"name": "b", "cnpg": {"name": "pg"}}],
            "witnesses": {"urls": ["https://w:1"], "tlsSecretRef": {"name": "s"}}
        }))
        .unwrap();
        assert_eq!(s.ttl_seconds, 5);
        assert_eq!(s.mode, FailoverMode::Automatic);
        assert_eq!(s.sync_policy, SyncPolicySpec::Preferred);
    }

    #[test]
    fn crd_yaml_names_group_and_status() {
        let y = crd_yaml().unwrap();
        assert!(y.contains("group: dr.openova.io"));
        assert!(y.contains("status: {}"), "status subresource");
        assert!(y.contains("lastFailover"));
        assert!(y.contains("lastSwitchover"));
    }
}
