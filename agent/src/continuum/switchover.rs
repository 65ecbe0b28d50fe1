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
use super::crd::{Continuum, LastSwitchover};

/// Asks for a switchover to `to` (idempotent).
pub async fn request(client: &kube::Client, ns: &str, name: &str, to: &str) -> anyhow::Result<()> {
    continuum_shared::lease::HolderId::new(to).context("--to")?;
    let api: Api<Continuum> = Api::namespaced(client.clone(), ns);
    let cr = api
        .get(name)
        .await
        .with_context(|| format!("Continuum {ns}/{name}"))?;
    if !cr.spec.regions.iter().any(|r| r.name == to) {
        bail!("region {to} is not in spec.regions of {ns}/{name}");
    }
    let body = json!({"metadata": {"annotations": {ANNOTATION_SWITCHOVER_TO: to}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .with_context(|| format!("annotate Continuum {ns}/{name}"))?;
    tracing::info!(continuum = %format!("{ns}/{name}"), to, annotation = ANNOTATION_SWITCHOVER_TO, "switchover requested");
    Ok(())
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
