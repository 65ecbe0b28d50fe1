//! RBAC: the ClusterRoles and Roles loaded from `manifests/` decide every
//! non-admin request. A Role's rules apply only to requests in its namespace
//! (as kube-apiserver's RBAC authorizer binds them through a RoleBinding).

use serde::Deserialize;

/// One `rules[]` entry of a ClusterRole or Role.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// `Some(ns)` for a Role's rule: it grants only requests in `ns`;
    /// `None` for a ClusterRole's (cluster-wide binding).
    #[serde(skip)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub api_groups: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub verbs: Vec<String>,
    #[serde(default)]
    pub resource_names: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RoleDoc {
    kind: Option<String>,
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    rules: Vec<PolicyRule>,
}

/// Errors reading a ClusterRole file.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
    #[error("parsing ClusterRole YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("no ClusterRole or Role document found")]
    NoRole,
    #[error("Role {0} has no metadata.namespace")]
    RoleWithoutNamespace(String),
}

/// Rules of every `kind: ClusterRole` and `kind: Role` document in a
/// (multi-document) YAML text; a Role's rules carry its namespace.
pub fn rules_from_yaml(text: &str) -> Result<Vec<PolicyRule>, RbacError> {
    let mut rules = Vec::new();
    let mut found = false;
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let role: RoleDoc = serde_yaml::from_value(value)?;
        match role.kind.as_deref() {
            Some("ClusterRole") => {
                found = true;
                rules.extend(role.rules);
            }
            Some("Role") => {
                let Some(ns) = role.metadata.namespace else {
                    return Err(RbacError::RoleWithoutNamespace(
                        role.metadata.name.unwrap_or_default(),
                    ));
                };
                found = true;
                rules.extend(role.rules.into_iter().map(|r| PolicyRule {
                    namespace: Some(ns.clone()),
                    ..r
                }));
            }
            _ => {}
        }
    }
    if !found {
        return Err(RbacError::NoRole);
    }
    Ok(rules)
}

/// Rules from a ClusterRole / Role file.
pub fn rules_from_file(path: &std::path::Path) -> Result<Vec<PolicyRule>, RbacError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RbacError::Read(path.display().to_string(), e))?;
    rules_from_yaml(&text)
}

/// Whether `rules` allow `verb` on `group`/`resource[/subresource]` (named
/// `name` if any) for a cluster-wide request: only ClusterRole rules count.
pub fn allows(
    rules: &[PolicyRule],
    verb: &str,
    group: &str,
    resource: &str,
    sub: Option<&str>,
    name: Option<&str>,
) -> bool {
    allows_in(rules, verb, group, resource, sub, None, name)
}

/// [`allows`] for a request in `namespace` (`None`: cluster-scoped, or a
/// list/watch across all namespaces): a Role's rule counts only in its own.
pub fn allows_in(
    rules: &[PolicyRule],
    verb: &str,
    group: &str,
    resource: &str,
    sub: Option<&str>,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let full = match sub {
        Some(s) => format!("{resource}/{s}"),
        None => resource.to_string(),
    };
    rules.iter().any(|r| {
        let ns_ok = r.namespace.is_none() || r.namespace.as_deref() == namespace;
        let verb_ok = r.verbs.iter().any(|v| v == "*" || v == verb);
        let group_ok = r.api_groups.iter().any(|g| g == "*" || g == group);
        let res_ok = r.resources.iter().any(|x| x == "*" || *x == full);
        let name_ok = r.resource_names.is_empty()
            || match name {
                // Real RBAC cannot restrict list/watch by name without a
                // field selector; a POST create carries no name (`None`),
                // while a server-side apply that creates does.
                Some(n) if verb != "list" && verb != "watch" => {
                    r.resource_names.iter().any(|x| x == n)
                }
                _ => false,
            };
        ns_ok && verb_ok && group_ok && res_ok && name_ok
    })
}
