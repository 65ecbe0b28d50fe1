//! `continuum-agent switchover --continuum NAME --to REGION`: a planned
//! switchover of CloudNativePG Clusters, through the Continuum resource.
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

/// Whether the controller can switch this Continuum over: only CNPG's
/// distributed topology hands over without a rebuild. A region that names a
/// `postgres` connection fails over automatically, but a clean handover
/// stops its server on its host, which the controller cannot reach.
pub fn supported(spec: &ContinuumSpec) -> Result<(), String> {
    match spec.regions.iter().find(|r| r.postgres.is_some()) {
        Some(r) => Err(format!(
            "region {} names a postgres connection: the Continuum controller fails such regions over \
             but cannot switch them over (a clean handover stops the server on its host); run \
             `continuum-agent failover` on the database hosts and `continuum-agent switchover --agent ...`",
            r.name
        )),
        None => Ok(()),
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
    if let Err(why) = supported(&cr.spec) {
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
    fn postgres_regions_are_refused() {
        let spec = |a: &str, b: &str| -> ContinuumSpec {
            let region = |n: &str, kind: &str| match kind {
                "cnpg" => json!({"name": n, "cnpg": {"name": format!("pg-{n}")}}),
                _ => {
                    json!({"name": n, "postgres": {"connectionSecretRef": {"name": n, "key": "uri"}}})
                }
            };
            serde_json::from_value(json!({
                "regions": [region("a", a), region("b", b)],
                "witnesses": {"urls": ["https://w"], "tlsSecretRef": {"name": "t"}},
            }))
            .expect("spec")
        };
        assert_eq!(supported(&spec("cnpg", "cnpg")), Ok(()));
        let err = supported(&spec("postgres", "postgres")).expect_err("postgres");
        assert!(
            err.contains("region a names a postgres connection"),
            "{err}"
        );
        assert!(supported(&spec("cnpg", "postgres"))
            .expect_err("mixed")
            .contains("region b"));
    }
}
