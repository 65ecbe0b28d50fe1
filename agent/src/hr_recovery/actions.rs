//! Kubernetes writes and reads of the recovery (the "apply" and "observe" glue).

use jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource};
use serde_json::{json, Value};

use super::helm_storage::{self, ReleaseRecord, StorageError};
use super::model::{HelmRelease, HrView};
use super::{
    ANNOTATION_CORRECTED, ANNOTATION_UNLOCKED_AT, ANNOTATION_UNLOCKED_RELEASE, CORRECTED_MESSAGE,
    FIELD_MANAGER,
};

/// Errors of one reconcile; `label()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listing Helm storage secrets: {0}")]
    ListSecrets(#[source] kube::Error),
    #[error("helm storage secret unreadable: {0}")]
    Storage(#[from] StorageError),
    #[error("annotating the HelmRelease: {0}")]
    Annotate(#[source] kube::Error),
    #[error("patching status (annotation rolled back): {0}")]
    StatusPatch(#[source] kube::Error),
    #[error(
        "patching status failed ({status}) and removing the annotation failed too: {rollback}"
    )]
    Rollback {
        status: kube::Error,
        rollback: kube::Error,
    },
    #[error("suspending the HelmRelease: {0}")]
    Suspend(#[source] kube::Error),
    #[error("resuming the HelmRelease (left suspended!): {0}")]
    Resume(#[source] kube::Error),
    #[error("listing HelmReleases: {0}")]
    List(#[source] kube::Error),
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Self::ListSecrets(_) => "list_secrets",
            Self::Storage(e) => e.label(),
            Self::Annotate(_) => "annotate",
            Self::StatusPatch(_) => "status_patch",
            Self::Rollback { .. } => "rollback",
            Self::Suspend(_) => "suspend",
            Self::Resume(_) => "resume",
            Self::List(_) => "list",
        }
    }
}

fn pp() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The newest Helm release record for the HelmRelease's release, if any.
pub async fn latest_release(
    client: &Client,
    view: &HrView,
) -> Result<Option<ReleaseRecord>, Error> {
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Secret"), "secrets");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &view.storage_namespace, &ar);
    let lp = ListParams::default().labels(&format!("owner=helm,name={}", view.release_name));
    let list = api.list(&lp).await.map_err(Error::ListSecrets)?;
    let newest = list
        .items
        .into_iter()
        .filter_map(|s| serde_json::to_value(&s).ok())
        .max_by_key(|s| helm_storage::secret_version(s).unwrap_or(0));
    match newest {
        None => Ok(None),
        Some(s) => Ok(Some(helm_storage::decode_secret(&s)?)),
    }
}

/// Ready=True condition replacing the existing Ready entry, others kept.
fn corrected_conditions(hr: &HelmRelease, now: Timestamp) -> Value {
    let ready = json!({
        "type": "Ready",
        "status": "True",
        "reason": "ReconciliationSucceeded",
        "message": CORRECTED_MESSAGE,
        "lastTransitionTime": rfc3339(now),
        "observedGeneration": hr.metadata.generation.unwrap_or(0),
    });
    let mut out: Vec<Value> = hr
        .status
        .as_ref()
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .map(|c| {
            c.iter()
                .filter(|c| c.get("type").and_then(Value::as_str) != Some("Ready"))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    out.insert(0, ready);
    Value::Array(out)
}

/// Branch B: annotate (guarded by the observed resourceVersion), then patch the
/// status; if the status patch fails, remove the annotation so the next pass retries.
pub async fn correct_ready(
    client: &Client,
    hr: &HelmRelease,
    view: &HrView,
    now: Timestamp,
) -> Result<(), Error> {
    let api: Api<HelmRelease> = Api::namespaced(client.clone(), &view.namespace);
    let ann = json!({"metadata": {
        "resourceVersion": hr.metadata.resource_version,
        "annotations": {ANNOTATION_CORRECTED: rfc3339(now)},
    }});
    api.patch(&view.name, &pp(), &Patch::Merge(&ann))
        .await
        .map_err(Error::Annotate)?;
    let status = json!({"status": {"conditions": corrected_conditions(hr, now)}});
    if let Err(status_err) = api
        .patch_status(&view.name, &pp(), &Patch::Merge(&status))
        .await
    {
        let undo = json!({"metadata": {"annotations": {ANNOTATION_CORRECTED: null}}});
        return match api.patch(&view.name, &pp(), &Patch::Merge(&undo)).await {
            Ok(_) => Err(Error::StatusPatch(status_err)),
            Err(rollback) => Err(Error::Rollback {
                status: status_err,
                rollback,
            }),
        };
    }
    Ok(())
}

/// Branch A: suspend (with the audit annotations, guarded by the observed
/// resourceVersion), then resume, which makes helm-controller start over.
pub async fn unlock_pending(
    client: &Client,
    hr: &HelmRelease,
    view: &HrView,
    key: &str,
    now: Timestamp,
) -> Result<(), Error> {
    let api: Api<HelmRelease> = Api::namespaced(client.clone(), &view.namespace);
    let suspend = json!({
        "metadata": {
            "resourceVersion": hr.metadata.resource_version,
            "annotations": {ANNOTATION_UNLOCKED_AT: rfc3339(now), ANNOTATION_UNLOCKED_RELEASE: key},
        },
        "spec": {"suspend": true},
    });
    api.patch(&view.name, &pp(), &Patch::Merge(&suspend))
        .await
        .map_err(Error::Suspend)?;
    let resume = json!({"spec": {"suspend": false}});
    let mut attempt = 0u64;
    loop {
        match api.patch(&view.name, &pp(), &Patch::Merge(&resume)).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt >= 2 => return Err(Error::Resume(e)),
            Err(e) => {
                tracing::warn!(namespace = %view.namespace, name = %view.name, attempt, error = %e, "resume after suspend failed, retrying");
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
        }
    }
}

/// Publish an Event about a HelmRelease; failures are counted, never fatal.
pub async fn publish(
    recorder: &Recorder,
    metrics: &super::metrics::Metrics,
    hr: &HelmRelease,
    warning: bool,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "StuckHelmReleaseRecovery".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &hr.object_ref(&())).await {
        metrics.events_failed.inc();
        tracing::warn!(error = %e, reason, "could not publish Event");
    }
}
