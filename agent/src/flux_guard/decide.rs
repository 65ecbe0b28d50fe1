//! The pre-flight decision, pure: the chart's CRDs, the live CRDs and what the
//! previous checked revision carried in, a verdict out. Mirrors what the API
//! server and Helm would do with the chart (seed 000: a CRD update whose
//! `spec.versions` lacks a `status.storedVersions` entry is refused, the failed
//! release rolls back, and the rollback deletes the controllers).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::chart::{ChartCrd, Unverifiable};
use super::crd::CrdView;
use super::source::CrdPolicy;

/// A CRD the previous checked revision carried and this one does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// Still live, with no object of its kind left: Helm may delete it.
    NoObjects,
    /// Still live and objects exist: deleting the CRD deletes them.
    HasObjects,
    /// Still live, and the agent may not list its objects: treated as unsafe.
    Unverifiable,
}

/// One reason to block.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Violation {
    /// A live `status.storedVersions` entry is absent from the chart's `spec.versions`
    /// (the API server refuses the update: seed 000).
    StoredVersionMissing {
        crd: String,
        stored: String,
        chart_versions: Vec<String>,
    },
    /// A stored version would be `served: false`.
    StoredVersionUnserved { crd: String, stored: String },
    /// The chart's CRD has zero or several `storage: true` versions.
    StorageVersionCount { crd: String, storage: Vec<String> },
    /// The chart drops a CRD that still has objects.
    RemovedWithObjects { crd: String },
    /// The chart drops a CRD whose objects the agent cannot list.
    RemovedUnverifiable { crd: String },
    /// A `templates/` document declares a CRD the guard cannot read without
    /// values: Helm may send it, so nothing can be said about it.
    TemplateUnverifiable { file: String, why: String },
}

impl Violation {
    /// Metric label (`continuum_flux_guard_blocked_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::StoredVersionMissing { .. } => "stored_version_missing",
            Self::StoredVersionUnserved { .. } => "stored_version_unserved",
            Self::StorageVersionCount { .. } => "storage_version_count",
            Self::RemovedWithObjects { .. } => "crd_removed_with_objects",
            Self::RemovedUnverifiable { .. } => "crd_removed_unverifiable",
            Self::TemplateUnverifiable { .. } => "crd_template_unverifiable",
        }
    }

    /// The CRD concerned (the template file for [`Violation::TemplateUnverifiable`]).
    pub fn crd(&self) -> &str {
        match self {
            Self::TemplateUnverifiable { file, .. } => file,
            Self::StoredVersionMissing { crd, .. }
            | Self::StoredVersionUnserved { crd, .. }
            | Self::StorageVersionCount { crd, .. }
            | Self::RemovedWithObjects { crd }
            | Self::RemovedUnverifiable { crd } => crd,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::StoredVersionMissing {
                crd,
                stored,
                chart_versions,
            } => write!(
                f,
                "CRD {crd}: stored version {stored} (status.storedVersions) is missing from the chart's spec.versions [{}]",
                chart_versions.join(", ")
            ),
            Self::StoredVersionUnserved { crd, stored } => write!(
                f,
                "CRD {crd}: stored version {stored} would become served: false"
            ),
            Self::StorageVersionCount { crd, storage } => write!(
                f,
                "CRD {crd}: the chart has {} storage versions [{}], exactly one is required",
                storage.len(),
                storage.join(", ")
            ),
            Self::RemovedWithObjects { crd } => write!(
                f,
                "CRD {crd}: the chart no longer carries it and objects of it exist (deleting the CRD deletes them)"
            ),
            Self::RemovedUnverifiable { crd } => write!(
                f,
                "CRD {crd}: the chart no longer carries it and the agent may not list its objects to prove none exist"
            ),
            Self::TemplateUnverifiable { file, why } => write!(
                f,
                "cannot verify CRD in {file}: {why} (render it without values, or review and override)"
            ),
        }
    }
}

/// What the guard knows about one chart revision.
#[derive(Debug, Clone, Default)]
pub struct Input {
    /// Every CRD the chart carries (duplicates across subcharts allowed).
    pub chart: Vec<CrdView>,
    /// Live CRDs by name (only those that exist).
    pub live: BTreeMap<String, CrdView>,
    /// CRDs of the previous checked revision absent from this one, with their state.
    pub removed: BTreeMap<String, Removed>,
    /// `templates/` documents that look like CRDs and cannot be read.
    pub unverifiable: Vec<Unverifiable>,
    /// Whether the HelmRelease carries an override for exactly this revision.
    pub overridden: bool,
}

/// The guard's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Block(Vec<Violation>),
    /// Violations found, let through by the operator's override.
    Overridden(Vec<Violation>),
}

/// Every violation of the chart against the live CRDs, sorted and de-duplicated.
pub fn violations(input: &Input) -> Vec<Violation> {
    let mut out = BTreeSet::new();
    for c in &input.chart {
        let storage: Vec<String> = c
            .versions
            .iter()
            .filter(|v| v.storage)
            .map(|v| v.name.clone())
            .collect();
        if storage.len() != 1 {
            out.insert(Violation::StorageVersionCount {
                crd: c.name.clone(),
                storage,
            });
        }
        let Some(live) = input.live.get(&c.name) else {
            continue;
        };
        for stored in &live.stored_versions {
            match c.versions.iter().find(|v| &v.name == stored) {
                None => {
                    out.insert(Violation::StoredVersionMissing {
                        crd: c.name.clone(),
                        stored: stored.clone(),
                        chart_versions: c.version_names(),
                    });
                }
                Some(v) if !v.served => {
                    out.insert(Violation::StoredVersionUnserved {
                        crd: c.name.clone(),
                        stored: stored.clone(),
                    });
                }
                Some(_) => {}
            }
        }
    }
    for (crd, state) in &input.removed {
        match state {
            Removed::NoObjects => {}
            Removed::HasObjects => {
                out.insert(Violation::RemovedWithObjects { crd: crd.clone() });
            }
            Removed::Unverifiable => {
                out.insert(Violation::RemovedUnverifiable { crd: crd.clone() });
            }
        }
    }
    for u in &input.unverifiable {
        out.insert(Violation::TemplateUnverifiable {
            file: u.file.clone(),
            why: u.why.clone(),
        });
    }
    out.into_iter().collect()
}

/// The verdict for one chart revision.
pub fn decide(input: &Input) -> Verdict {
    let v = violations(input);
    match (v.is_empty(), input.overridden) {
        (true, _) => Verdict::Pass,
        (false, true) => Verdict::Overridden(v),
        (false, false) => Verdict::Block(v),
    }
}

/// The chart CRDs Helm will send to the API server: every `templates/` CRD, and
/// `crds/` ones per helm-controller's policy (Skip: none; Create: those not live yet).
pub fn applied_crds(
    chart: &[ChartCrd],
    policy: CrdPolicy,
    live: &BTreeSet<String>,
) -> Vec<CrdView> {
    chart
        .iter()
        .filter(|c| {
            c.from_templates
                || match policy {
                    CrdPolicy::Skip => false,
                    CrdPolicy::Create => !live.contains(&c.crd.name),
                    CrdPolicy::CreateReplace => true,
                }
        })
        .map(|c| c.crd.clone())
        .collect()
}

/// CRD names Helm deletes when a later revision drops them (`templates/` only:
/// Helm never deletes `crds/` CRDs).
pub fn deletable_names(chart: &[ChartCrd]) -> BTreeSet<String> {
    chart
        .iter()
        .filter(|c| c.from_templates)
        .map(|c| c.crd.name.clone())
        .collect()
}

/// CRD names the previous revision carried that this one does not.
pub fn removed_names(previous: &BTreeSet<String>, now: &BTreeSet<String>) -> BTreeSet<String> {
    previous.difference(now).cloned().collect()
}

/// Whether an override annotation names this revision (`revision` or `revision@digest`).
pub fn override_matches(annotation: Option<&str>, revision: &str, key: &str) -> bool {
    annotation
        .map(str::trim)
        .is_some_and(|a| !a.is_empty() && (a == revision || a == key))
}

#[cfg(test)]
mod tests {
    use super::super::crd::CrdVersion;
    use super::*;
    use proptest::prelude::*;

    fn crd(name: &str, versions: &[(&str, bool, bool)], stored: &[&str]) -> CrdView {
        CrdView {
            name: name.into(),
            group: name.split_once('.').map(|x| x.1).unwrap_or("").into(),
            plural: name.split('.').next().unwrap_or("").into(),
            versions: versions
                .iter()
                .map(|(n, served, storage)| CrdVersion {
                    name: n.to_string(),
                    served: *served,
                    storage: *storage,
                })
                .collect(),
            stored_versions: stored.iter().map(|s| s.to_string()).collect(),
        }
    }

    const HR: &str = "helmreleases.helm.toolkit.fluxcd.io";
    const KS: &str = "kustomizations.kustomize.toolkit.fluxcd.io";

    fn live(crds: Vec<CrdView>) -> BTreeMap<String, CrdView> {
        crds.into_iter().map(|c| (c.name.clone(), c)).collect()
    }

    #[test]
    fn table() {
        let live_v2 = || live(vec![crd(HR, &[("v2", true, true)], &["v2"])]);
        let cases: Vec<(&str, Input, Vec<&str>)> = vec![
            (
                "seed 000: chart lists only older versions",
                Input {
                    chart: vec![crd(
                        HR,
                        &[("v2beta1", true, true), ("v2beta2", true, false)],
                        &[],
                    )],
                    live: live_v2(),
                    ..Default::default()
                },
                vec!["stored_version_missing"],
            ),
            (
                "same versions: safe",
                Input {
                    chart: vec![crd(
                        HR,
                        &[("v2", true, true), ("v2beta1", true, false)],
                        &[],
                    )],
                    live: live_v2(),
                    ..Default::default()
                },
                vec![],
            ),
            (
                "new storage version with the old one still listed: safe",
                Input {
                    chart: vec![crd(HR, &[("v2", true, false), ("v3", true, true)], &[])],
                    live: live_v2(),
                    ..Default::default()
                },
                vec![],
            ),
            (
                "stored version kept but unserved",
                Input {
                    chart: vec![crd(HR, &[("v2", false, false), ("v3", true, true)], &[])],
                    live: live_v2(),
                    ..Default::default()
                },
                vec!["stored_version_unserved"],
            ),
            (
                "two storage versions",
                Input {
                    chart: vec![crd(HR, &[("v2", true, true), ("v3", true, true)], &[])],
                    live: live_v2(),
                    ..Default::default()
                },
                vec!["storage_version_count"],
            ),
            (
                "no storage version, new CRD",
                Input {
                    chart: vec![crd(KS, &[("v1", true, false)], &[])],
                    ..Default::default()
                },
                vec!["storage_version_count"],
            ),
            (
                "new CRD not live yet: nothing stored",
                Input {
                    chart: vec![crd(KS, &[("v1", true, true)], &[])],
                    ..Default::default()
                },
                vec![],
            ),
            (
                "two stored versions, one missing",
                Input {
                    chart: vec![crd(KS, &[("v1", true, true)], &[])],
                    live: live(vec![crd(
                        KS,
                        &[("v1", true, true), ("v1beta2", true, false)],
                        &["v1beta2", "v1"],
                    )]),
                    ..Default::default()
                },
                vec!["stored_version_missing"],
            ),
            (
                "removed CRD with objects, one without, one unverifiable",
                Input {
                    removed: [
                        ("a.x".to_string(), Removed::HasObjects),
                        ("b.x".to_string(), Removed::NoObjects),
                        ("c.x".to_string(), Removed::Unverifiable),
                    ]
                    .into(),
                    ..Default::default()
                },
                vec!["crd_removed_with_objects", "crd_removed_unverifiable"],
            ),
            (
                "a template that looks like a CRD and cannot be read",
                Input {
                    unverifiable: vec![Unverifiable {
                        file: "c/templates/crd.yaml".into(),
                        why: "invalid YAML".into(),
                    }],
                    ..Default::default()
                },
                vec!["crd_template_unverifiable"],
            ),
            (
                "duplicate CRD in parent and subchart reported once",
                Input {
                    chart: vec![crd(HR, &[("v2beta1", true, true)], &[]); 2],
                    live: live_v2(),
                    ..Default::default()
                },
                vec!["stored_version_missing"],
            ),
        ];
        for (name, input, want) in cases {
            let got: Vec<&str> = violations(&input).iter().map(Violation::label).collect();
            assert_eq!(got, want, "{name}");
            let verdict = decide(&input);
            assert_eq!(
                matches!(verdict, Verdict::Pass),
                want.is_empty(),
                "{name}: {verdict:?}"
            );
            let over = decide(&Input {
                overridden: true,
                ..input
            });
            assert!(
                matches!(over, Verdict::Pass | Verdict::Overridden(_)),
                "{name}: override lets it through"
            );
        }
    }

    #[test]
    fn messages_name_crd_and_versions() {
        let v = Violation::StoredVersionMissing {
            crd: HR.into(),
            stored: "v2".into(),
            chart_versions: vec!["v2beta1".into(), "v2beta2".into()],
        };
        let s = v.to_string();
        assert!(s.contains(HR) && s.contains("v2 ") && s.contains("[v2beta1, v2beta2]"));
        let t = Violation::TemplateUnverifiable {
            file: "c/templates/x.yaml".into(),
            why: "invalid YAML".into(),
        };
        assert!(t
            .to_string()
            .starts_with("cannot verify CRD in c/templates/x.yaml: invalid YAML"));
    }

    #[test]
    fn removed_and_override() {
        let prev: BTreeSet<String> = [HR.to_string(), KS.to_string()].into();
        let chart = vec![
            ChartCrd {
                crd: crd(HR, &[("v2", true, true)], &[]),
                file: "t".into(),
                from_templates: true,
            },
            ChartCrd {
                crd: crd(KS, &[("v1", true, true)], &[]),
                file: "c".into(),
                from_templates: false,
            },
        ];
        // A CRD moved to crds/ is no longer Helm's to delete: it counts as removed from templates.
        assert_eq!(
            removed_names(&prev, &deletable_names(&chart)),
            [KS.to_string()].into()
        );
        assert!(override_matches(Some("1.1.1"), "1.1.1", "1.1.1@sha256:ab"));
        assert!(override_matches(
            Some(" 1.1.1@sha256:ab "),
            "1.1.1",
            "1.1.1@sha256:ab"
        ));
        assert!(!override_matches(Some("1.1.0"), "1.1.1", "1.1.1@sha256:ab"));
        assert!(!override_matches(Some(""), "", ""));
        assert!(!override_matches(None, "1", "1"));
    }

    #[test]
    fn crds_dir_follows_the_helm_controller_policy() {
        let t = |name: &str, templates: bool| ChartCrd {
            crd: crd(name, &[("v1", true, true)], &[]),
            file: "f".into(),
            from_templates: templates,
        };
        let chart = vec![t("a.x", true), t("b.x", false), t("c.x", false)];
        let live: BTreeSet<String> = ["a.x".to_string(), "b.x".to_string()].into();
        let names = |p| {
            applied_crds(&chart, p, &live)
                .into_iter()
                .map(|c| c.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(CrdPolicy::Skip), ["a.x"]);
        assert_eq!(names(CrdPolicy::Create), ["a.x", "c.x"]);
        assert_eq!(names(CrdPolicy::CreateReplace), ["a.x", "b.x", "c.x"]);
    }

    fn version_set() -> impl Strategy<Value = Vec<(String, bool, bool)>> {
        proptest::collection::btree_map("v[1-4](beta[12])?", (any::<bool>(), any::<bool>()), 0..5)
            .prop_map(|m| m.into_iter().map(|(k, (a, b))| (k, a, b)).collect())
    }

    proptest! {
        /// The guard blocks exactly when the API server would refuse the CRD update
        /// (a stored version missing, or not one storage version) or a stored
        /// version stops being served.
        #[test]
        fn blocks_iff_unsafe(chart_v in version_set(), stored in proptest::collection::btree_set("v[1-4](beta[12])?", 0..3)) {
            let refs: Vec<(&str, bool, bool)> = chart_v.iter().map(|(n, a, b)| (n.as_str(), *a, *b)).collect();
            let stored_refs: Vec<&str> = stored.iter().map(String::as_str).collect();
            let input = Input {
                chart: vec![crd(HR, &refs, &[])],
                live: live(vec![crd(HR, &[("v2", true, true)], &stored_refs)]),
                ..Default::default()
            };
            let storage = chart_v.iter().filter(|v| v.2).count();
            let missing = stored.iter().any(|s| !chart_v.iter().any(|v| &v.0 == s));
            let unserved = stored.iter().any(|s| chart_v.iter().any(|v| &v.0 == s && !v.1));
            let unsafe_ = storage != 1 || missing || unserved;
            prop_assert_eq!(matches!(decide(&input), Verdict::Block(_)), unsafe_);
        }
    }
}
