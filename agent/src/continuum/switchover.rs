//! `continuum-agent switchover --continuum NAME --to REGION`: a planned
//! switchover through the Continuum resource (CloudNativePG Clusters, or
//! `postgres` regions that name a `primaryConninfoSecretRef`).
//!
//! The command sets the annotation `dr.openova.io/switchover-to: <region>`
//! on the old primary's Continuum (run it against the old primary's
//! Kubernetes cluster) and waits for that region's status to report the
//! handover done. The controllers do the rest (docs/switchover.md): the old
//! primary's agent records the intent at the witnesses, sets its Cluster's
//! `spec.replica.primary` to the other Cluster (CNPG demotes it and publishes
//! `status.demotionToken`), records the token in the intent and releases
//! the lease; the successor's agent takes the next epoch and sets
//! `replica.primary` + `replica.promotionToken` on its own Cluster.
//!
//! For `postgres` regions the old primary's agent records the intent,
//! fences its server, records the fenced server's WAL end as the final
//! position, writes `primary_conninfo` + `standby.signal` and asks for a fast
//! shutdown, then releases the lease once the server is gone (or back in
//! recovery); the successor takes the next epoch once it replayed past the
//! final position, and promotes with `pg_promote`. The server's supervisor
//! restarts the old one, which then streams from the new primary.

use std::time::Duration;

use anyhow::{bail, Context};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::cnpg::ANNOTATION_SWITCHOVER_TO;
use super::crd::{Continuum, ContinuumSpec, ContinuumStatus, LastSwitchover};

/// What [`request`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// The annotation is set; wait with [`wait_done`].
    Annotated,
    /// `to` already holds the lease: nothing to do.
    AlreadyPrimary,
}

/// Whether this cluster's copy of the Continuum may carry the request: only
/// the primary region's controller acts on it, and only while a region holds
/// the lease. An annotation elsewhere would sit unread until that region
/// became primary, then hand over when nobody expects it.
pub fn check(status: Option<&ContinuumStatus>, to: &str) -> Result<Requested, String> {
    let Some(st) = status else {
        return Err("the Continuum has no status yet: is `continuum-agent continuum` running in this cluster?".into());
    };
    let Some(primary) = st.primary_region.as_deref() else {
        return Err(format!(
            "no region holds the lease (phase {:?}): a switchover needs a live primary; see the Decision condition",
            st.phase
        ));
    };
    if primary == to {
        return Ok(Requested::AlreadyPrimary);
    }
    match st.observed_by.as_deref() {
        Some(me) if me == primary => Ok(Requested::Annotated),
        me => Err(format!(
            "this cluster's copy is reported by region {me:?}, but {primary} is the primary: run the command against {primary}'s cluster"
        )),
    }
}

/// Whether the controller can switch this Continuum over to `to` without a
/// rebuild: CNPG's distributed topology can; a `postgres` region can once
/// the region handing over (the one that is not `to`) names the
/// `primary_conninfo` to follow the other with. Without it, its server
/// could only be stopped, not brought back as a standby.
pub fn supported(spec: &ContinuumSpec, to: &str) -> Result<(), String> {
    let from = spec.regions.iter().find(|r| r.name != to);
    match from.and_then(|r| r.postgres.as_ref().map(|p| (r, p))) {
        Some((r, p)) if p.primary_conninfo_secret_ref.is_none() => Err(format!(
            "region {} names a postgres connection without primaryConninfoSecretRef: its agent \
             cannot turn the server into {to}'s standby after the handover; add it (see the \
             README, \"The Continuum resource\") or use `continuum-agent failover` on the \
             database hosts with `continuum-agent switchover --agent ...`",
            r.name
        )),
        _ => Ok(()),
    }
}

/// Asks for a switchover to `to` (idempotent).
pub async fn request(
    client: &kube::Client,
    ns: &str,
    name: &str,
    to: &str,
) -> anyhow::Result<Requested> {
    continuum_shared::lease::HolderId::new(to).context("--to")?;
    let api: Api<Continuum> = Api::namespaced(client.clone(), ns);
    let cr = api
        .get(name)
        .await
        .with_context(|| format!("Continuum {ns}/{name}"))?;
    if !cr.spec.regions.iter().any(|r| r.name == to) {
        bail!("region {to} is not in spec.regions of {ns}/{name}");
    }
    if let Err(why) = supported(&cr.spec, to) {
        bail!("Continuum {ns}/{name}: {why}");
    }
    match check(cr.status.as_ref(), to) {
        Ok(Requested::AlreadyPrimary) => {
            tracing::info!(continuum = %format!("{ns}/{name}"), to, "already primary: no switchover needed");
            return Ok(Requested::AlreadyPrimary);
        }
        Ok(Requested::Annotated) => {}
        Err(why) => bail!("Continuum {ns}/{name}: {why}"),
    }
    let body = json!({"metadata": {"annotations": {ANNOTATION_SWITCHOVER_TO: to}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .with_context(|| format!("annotate Continuum {ns}/{name}"))?;
    tracing::info!(continuum = %format!("{ns}/{name}"), to, annotation = ANNOTATION_SWITCHOVER_TO, "switchover requested");
    Ok(Requested::Annotated)
}

/// Waits until this cluster's copy reports the switchover to `to` done
/// (`status.primaryRegion == to` and `lastSwitchover.toRegion == to`).
pub async fn wait_done(
    client: &kube::Client,
    ns: &str,
    name: &str,
    to: &str,
    timeout: Duration,
) -> anyhow::Result<LastSwitchover> {
    let api: Api<Continuum> = Api::namespaced(client.clone(), ns);
    let end = tokio::time::Instant::now() + timeout;
    loop {
        let cr = api.get(name).await.context("read Continuum")?;
        let st = cr.status.unwrap_or_default();
        if st.primary_region.as_deref() == Some(to) {
            if let Some(ls) = st
                .last_switchover
                .filter(|l| l.to_region.as_deref() == Some(to))
            {
                return Ok(ls);
            }
        }
        if tokio::time::Instant::now() > end {
            bail!(
                "switchover to {to} not reported done within {timeout:?}: primaryRegion {:?}, phase {:?}",
                st.primary_region,
                st.phase
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(primary: Option<&str>, by: Option<&str>) -> ContinuumStatus {
        ContinuumStatus {
            primary_region: primary.map(String::from),
            observed_by: by.map(String::from),
            phase: Some("Primary".into()),
            ..ContinuumStatus::default()
        }
    }

    #[test]
    fn request_check_table() {
        let cases = [
            (
                "primary's copy",
                Some(st(Some("a"), Some("a"))),
                "b",
                Ok(Requested::Annotated),
            ),
            (
                "already there",
                Some(st(Some("b"), Some("a"))),
                "b",
                Ok(Requested::AlreadyPrimary),
            ),
            (
                "standby's copy",
                Some(st(Some("a"), Some("b"))),
                "b",
                Err("run the command against a's cluster"),
            ),
            (
                "nobody holds",
                Some(st(None, Some("a"))),
                "b",
                Err("no region holds the lease"),
            ),
            ("no status", None, "b", Err("no status yet")),
        ];
        for (name, status, to, want) in cases {
            let got = check(status.as_ref(), to);
            match (&got, want) {
                (Ok(g), Ok(w)) => assert_eq!(*g, w, "{name}"),
                (Err(g), Err(w)) => assert!(g.contains(w), "{name}: {g}"),
                _ => panic!("{name}: got {got:?}"),
            }
        }
    }

    #[test]
    fn postgres_regions_need_a_primary_conninfo() {
        let region = |n: &str, kind: &str| match kind {
            "cnpg" => json!({"name": n, "cnpg": {"name": format!("pg-{n}")}}),
            "pg" => {
                json!({"name": n, "postgres": {"connectionSecretRef": {"name": n, "key": "uri"}}})
            }
            _ => json!({"name": n, "postgres": {
                "connectionSecretRef": {"name": n, "key": "uri"},
                "primaryConninfoSecretRef": {"name": format!("{n}-follow"), "key": "conninfo"},
            }}),
        };
        let spec = |a: &str, b: &str| -> ContinuumSpec {
            serde_json::from_value(json!({
                "regions": [region("a", a), region("b", b)],
                "witnesses": {"urls": ["https://w"], "tlsSecretRef": {"name": "t"}},
            }))
            .expect("spec")
        };
        // (a, b, to, refused region)
        let cases = [
            ("cnpg", "cnpg", "b", None),
            ("pg+follow", "pg+follow", "b", None),
            ("pg+follow", "pg+follow", "a", None),
            ("pg", "pg", "b", Some("region a")),
            ("pg", "pg", "a", Some("region b")),
            ("pg+follow", "pg", "b", None),
            ("pg+follow", "pg", "a", Some("region b")),
        ];
        for (a, b, to, want) in cases {
            let got = supported(&spec(a, b), to);
            match (got, want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => {
                    assert!(
                        e.contains(w) && e.contains("primaryConninfoSecretRef"),
                        "{a}/{b} to {to}: {e}"
                    )
                }
                (got, want) => panic!("{a}/{b} to {to}: got {got:?}, want {want:?}"),
            }
        }
    }
}
