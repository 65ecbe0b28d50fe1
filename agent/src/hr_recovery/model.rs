//! The HelmRelease as the agent reads it, and its validation into a typed view.
//!
//! `spec` and `status` stay raw JSON so one malformed object can never break
//! decoding of the whole watch stream; [`validate`] turns them into a [`HrView`]
//! or a [`SkipReason`] (logged and counted, never a panic).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::goduration;

/// `helm.toolkit.fluxcd.io/v2` HelmRelease with untyped spec and status.
///
/// Decoding already drops what the recovery never reads (see [`slim`]), so the
/// controller's cache of every HelmRelease stays small.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HelmRelease {
    #[serde(default, deserialize_with = "de_meta")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "de_value")]
    pub spec: Value,
    #[serde(
        default,
        deserialize_with = "de_status",
        skip_serializing_if = "Option::is_none"
    )]
    pub status: Option<Value>,
}

fn de_status<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    let mut v = Option::<Value>::deserialize(d)?;
    slim_status(&mut v);
    Ok(v)
}

fn de_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let mut m = ObjectMeta::deserialize(d)?;
    slim_meta(&mut m);
    Ok(m)
}

fn de_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    let mut v = Value::deserialize(d)?;
    slim_spec(&mut v);
    Ok(v)
}

/// `kube::Resource` for a slim HelmRelease type (`helm.toolkit.fluxcd.io/v2`,
/// namespaced, with a `metadata: ObjectMeta` field). Each controller keeps
/// its own slim type with only the fields it reads, to keep its cache small.
macro_rules! helmrelease_resource {
    ($t:ty) => {
        impl kube::Resource for $t {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                "HelmRelease".into()
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                "helm.toolkit.fluxcd.io".into()
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                "v2".into()
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                "helmreleases".into()
            }
            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(
                &mut self,
            ) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use helmrelease_resource;

helmrelease_resource!(HelmRelease);

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CondStatus {
    True,
    False,
    Unknown,
}

/// Why a HelmRelease is not evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    NoStatus,
    NoReadyCondition,
    MalformedConditions,
    BadConditionStatus,
    BadTransitionTime,
    BadTimeout,
    MissingName,
}

impl SkipReason {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoStatus => "no_status",
            Self::NoReadyCondition => "no_ready_condition",
            Self::MalformedConditions => "malformed_conditions",
            Self::BadConditionStatus => "bad_condition_status",
            Self::BadTransitionTime => "bad_transition_time",
            Self::BadTimeout => "bad_timeout",
            Self::MissingName => "missing_name",
        }
    }
}

/// What the decision needs to know about one HelmRelease.
#[derive(Debug, Clone, PartialEq)]
pub struct HrView {
    pub namespace: String,
    pub name: String,
    pub suspended: bool,
    pub ready: CondStatus,
    /// `lastTransitionTime` of the Ready condition.
    pub ready_since: Timestamp,
    /// A `Reconciling=True` condition: helm-controller is working on it.
    pub reconciling: bool,
    pub history0_status: Option<String>,
    pub corrected: bool,
    pub unlocked_release: Option<String>,
    pub timeout: Duration,
    /// Helm release name (`spec.releaseName`, else `<targetNamespace>-<name>`, else `<name>`).
    pub release_name: String,
    /// Where Helm keeps its storage Secrets.
    pub storage_namespace: String,
}

/// Parse an RFC 3339 timestamp as metav1.Time writes it.
pub fn parse_time(s: &str) -> Option<Timestamp> {
    s.parse::<Timestamp>().ok()
}

fn cond_status(v: &Value) -> Result<CondStatus, SkipReason> {
    match v.get("status").and_then(Value::as_str) {
        Some("True") => Ok(CondStatus::True),
        Some("False") => Ok(CondStatus::False),
        Some("Unknown") => Ok(CondStatus::Unknown),
        _ => Err(SkipReason::BadConditionStatus),
    }
}

/// Validate a HelmRelease into a view, or say why it is skipped.
pub fn validate(hr: &HelmRelease) -> Result<HrView, SkipReason> {
    let name = hr
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(SkipReason::MissingName)?;
    let namespace = hr
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(SkipReason::MissingName)?;
    let status = hr
        .status
        .as_ref()
        .filter(|s| s.is_object())
        .ok_or(SkipReason::NoStatus)?;
    let conditions = match status.get("conditions") {
        None | Some(Value::Null) => return Err(SkipReason::NoReadyCondition),
        Some(Value::Array(c)) => c,
        Some(_) => return Err(SkipReason::MalformedConditions),
    };
    let mut ready = None;
    let mut reconciling = false;
    for c in conditions {
        if !c.is_object() {
            return Err(SkipReason::MalformedConditions);
        }
        match c.get("type").and_then(Value::as_str) {
            Some("Ready") => {
                if ready.is_some() {
                    // Two Ready conditions: nothing sane to decide on.
                    return Err(SkipReason::MalformedConditions);
                }
                let st = cond_status(c)?;
                let since = c
                    .get("lastTransitionTime")
                    .and_then(Value::as_str)
                    .and_then(parse_time)
                    .ok_or(SkipReason::BadTransitionTime)?;
                ready = Some((st, since));
            }
            Some("Reconciling") => reconciling = cond_status(c)? == CondStatus::True,
            Some(_) => {}
            None => return Err(SkipReason::MalformedConditions),
        }
    }
    let (ready, ready_since) = ready.ok_or(SkipReason::NoReadyCondition)?;
    let history0_status = status
        .get("history")
        .and_then(Value::as_array)
        .and_then(|h| h.first())
        .and_then(|h| h.get("status"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let spec = &hr.spec;
    let timeout = match spec.get("timeout") {
        None | Some(Value::Null) => Duration::from_secs(300),
        Some(Value::String(s)) => goduration::parse(s).ok_or(SkipReason::BadTimeout)?,
        Some(_) => return Err(SkipReason::BadTimeout),
    };
    let target_ns = spec
        .get("targetNamespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let release_name = match spec
        .get("releaseName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        Some(r) => r.to_string(),
        None => match target_ns {
            Some(t) => format!("{t}-{name}"),
            None => name.clone(),
        },
    };
    let storage_namespace = spec
        .get("storageNamespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| namespace.clone());
    let ann = hr.metadata.annotations.as_ref();
    Ok(HrView {
        suspended: spec
            .get("suspend")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ready,
        ready_since,
        reconciling,
        history0_status,
        corrected: ann
            .and_then(|a| a.get(super::ANNOTATION_CORRECTED))
            .is_some_and(|v| !v.is_empty()),
        unlocked_release: ann
            .and_then(|a| a.get(super::ANNOTATION_UNLOCKED_RELEASE))
            .cloned(),
        timeout,
        release_name,
        storage_namespace,
        namespace,
        name,
    })
}

/// Keep only what [`validate`] and the actions read, so the controller's cache
/// of every HelmRelease stays small (the agent's memory budget is 30 MB).
pub fn slim(hr: &mut HelmRelease) {
    slim_meta(&mut hr.metadata);
    slim_spec(&mut hr.spec);
    slim_status(&mut hr.status);
}

fn slim_meta(m: &mut ObjectMeta) {
    m.managed_fields = None;
    m.labels = None;
    m.owner_references = None;
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| k.starts_with("stuck-hr-recovery.openova.io/"));
    }
}

fn slim_spec(spec: &mut Value) {
    if let Value::Object(spec) = spec {
        spec.retain(|k, _| {
            matches!(
                k.as_str(),
                "timeout" | "releaseName" | "targetNamespace" | "storageNamespace" | "suspend"
            )
        });
    }
}

fn slim_status(status: &mut Option<Value>) {
    if let Some(Value::Object(status)) = status {
        status.retain(|k, _| k == "conditions" || k == "history");
        if let Some(Value::Array(h)) = status.get_mut("history") {
            h.truncate(1);
            if let Some(Value::Object(first)) = h.first_mut() {
                first.retain(|k, _| k == "status");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hr(status: Value) -> HelmRelease {
        serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"timeout": "2m"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn bad_input_table() {
        let t = "2026-01-01T00:00:00Z";
        let cases = [
            (Value::Null, Err(SkipReason::NoStatus)),
            (json!({}), Err(SkipReason::NoReadyCondition)),
            (
                json!({"conditions": "x"}),
                Err(SkipReason::MalformedConditions),
            ),
            (
                json!({"conditions": [1]}),
                Err(SkipReason::MalformedConditions),
            ),
            (
                json!({"conditions": [{"status": "True"}]}),
                Err(SkipReason::MalformedConditions),
            ),
            (
                json!({"conditions": [{"type": "Ready", "status": "Maybe", "lastTransitionTime": t}]}),
                Err(SkipReason::BadConditionStatus),
            ),
            (
                json!({"conditions": [{"type": "Ready", "status": "True"}]}),
                Err(SkipReason::BadTransitionTime),
            ),
            (
                json!({"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "yesterday"}]}),
                Err(SkipReason::BadTransitionTime),
            ),
            (
                json!({"conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": t},
                    {"type": "Ready", "status": "False", "lastTransitionTime": t}]}),
                Err(SkipReason::MalformedConditions),
            ),
            (
                json!({"conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": t}]}),
                Ok(CondStatus::Unknown),
            ),
        ];
        for (status, want) in cases {
            let got = validate(&hr(status.clone())).map(|v| v.ready);
            assert_eq!(got, want, "{status}");
        }
    }

    #[test]
    fn slim_keeps_the_decision() {
        let mut h = hr(
            json!({"conditions": [{"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Released", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "history": [{"status": "deployed", "chartName": "x"}, {"status": "superseded"}], "lastAttemptedRevision": "1.0"}),
        );
        h.spec = json!({"timeout": "1m", "chart": {"spec": {"chart": "x"}}, "values": {"big": [1, 2, 3]}});
        let before = validate(&h);
        slim(&mut h);
        assert_eq!(validate(&h), before);
        assert_eq!(h.spec, json!({"timeout": "1m"}));
        assert_eq!(
            h.status.as_ref().unwrap()["history"],
            json!([{"status": "deployed"}])
        );
        assert_eq!(
            h.status.as_ref().unwrap()["conditions"]
                .as_array()
                .unwrap()
                .len(),
            2,
            "all conditions kept for the status patch"
        );
    }

    #[test]
    fn names_and_timeout() {
        let mut h = hr(
            json!({"conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "history": [{"status": "deployed"}]}),
        );
        let v = validate(&h).unwrap();
        assert_eq!(
            (
                v.release_name.as_str(),
                v.storage_namespace.as_str(),
                v.timeout
            ),
            ("a", "ns", Duration::from_secs(120))
        );
        assert_eq!(v.history0_status.as_deref(), Some("deployed"));
        h.spec = json!({"targetNamespace": "t", "storageNamespace": "s"});
        let v = validate(&h).unwrap();
        assert_eq!(
            (
                v.release_name.as_str(),
                v.storage_namespace.as_str(),
                v.timeout
            ),
            ("t-a", "s", Duration::from_secs(300))
        );
        h.spec = json!({"releaseName": "r", "timeout": 5});
        assert_eq!(validate(&h), Err(SkipReason::BadTimeout));
    }
}
