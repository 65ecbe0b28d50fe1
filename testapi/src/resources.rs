//! Resource registry: which resources the server serves, their scope and whether
//! they have a status subresource. Later controllers register their CRDs here.

/// One served resource (`group/version/plural`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSpec {
    /// API group, empty for the core group.
    pub group: String,
    pub version: String,
    /// Plural name used in URLs (`helmreleases`).
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    /// Writes to the main resource ignore `.status`; `/status` writes ignore the rest.
    pub status_subresource: bool,
}

impl ResourceSpec {
    pub fn new(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
            status_subresource: status,
        }
    }

    /// `apiVersion` as written in objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group` as the API server names it in messages (`helmreleases.helm.toolkit.fluxcd.io`).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// The resources every test server starts with.
pub fn default_resources() -> Vec<ResourceSpec> {
    vec![
        ResourceSpec::new("", "v1", "namespaces", "Namespace", false, true),
        ResourceSpec::new("", "v1", "secrets", "Secret", true, false),
        ResourceSpec::new("", "v1", "configmaps", "ConfigMap", true, false),
        ResourceSpec::new("", "v1", "events", "Event", true, false),
        ResourceSpec::new("", "v1", "nodes", "Node", false, true),
        ResourceSpec::new("", "v1", "pods", "Pod", true, true),
        ResourceSpec::new("events.k8s.io", "v1", "events", "Event", true, false),
        ResourceSpec::new("coordination.k8s.io", "v1", "leases", "Lease", true, false),
        ResourceSpec::new("apps", "v1", "deployments", "Deployment", true, true),
        ResourceSpec::new("apps", "v1", "daemonsets", "DaemonSet", true, true),
        ResourceSpec::new(
            "helm.toolkit.fluxcd.io",
            "v2",
            "helmreleases",
            "HelmRelease",
            true,
            true,
        ),
        ResourceSpec::new(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
        ),
    ]
}
