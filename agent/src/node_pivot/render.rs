//! Pure renderer: declared mirror map + Secret values -> k3s `registries.yaml`.
//!
//! No I/O here, so every validation rule is table-tested and fuzzed
//! (`agent/fuzz`, target `render_mirror_map`). The output follows the k3s schema
//! exactly (`mirrors.<host>.endpoint[]`, `mirrors.<host>.rewrite{regex: replacement}`,
//! `configs.<host>.auth{username,password,auth,identity_token}`,
//! `configs.<host>.tls{ca_file,cert_file,key_file,insecure_skip_verify}`), with
//! sorted keys so the same input always renders the same bytes (an unchanged
//! render then writes nothing).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The declared mirror map (YAML or JSON; JSON is valid YAML).
///
/// ```yaml
/// harborFqdn: otech116.omani.works      # default endpoint https://harbor.<fqdn>
/// mirrors:
///   docker.io: { project: proxy-docker.io }       # rewrite "^(.*)$" -> "proxy-docker.io/$1"
///   ghcr.io:   { endpoints: ["https://harbor.otech116.omani.works"], project: proxy-ghcr.io }
/// configs:
///   harbor.otech116.omani.works:
///     auth: { usernameKey: username, passwordKey: password }   # keys of the mounted Secret
///     tls:  { caFile: /etc/continuum/harbor/ca.crt }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorMap {
    /// Sovereign FQDN: mirrors without `endpoints` use `https://harbor.<fqdn>`.
    #[serde(default)]
    pub harbor_fqdn: Option<String>,
    /// Allow `http://` endpoints (test registries only).
    #[serde(default)]
    pub allow_insecure_endpoints: bool,
    #[serde(default)]
    pub mirrors: BTreeMap<String, MirrorSpec>,
    #[serde(default)]
    pub configs: BTreeMap<String, ConfigSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorSpec {
    /// Endpoint URLs tried in order; default `https://harbor.<harborFqdn>`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Harbor proxy-cache project: adds the rewrite `^(.*)$` -> `<project>/$1`.
    #[serde(default)]
    pub project: Option<String>,
    /// Explicit rewrite rules (regex -> replacement), merged with `project`.
    #[serde(default)]
    pub rewrite: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigSpec {
    #[serde(default)]
    pub auth: Option<AuthSpec>,
    #[serde(default)]
    pub tls: Option<TlsSpec>,
}

/// Credentials never appear in the mirror map: each field names a key of the
/// mounted Secret directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthSpec {
    #[serde(default)]
    pub username_key: Option<String>,
    #[serde(default)]
    pub password_key: Option<String>,
    #[serde(default)]
    pub auth_key: Option<String>,
    #[serde(default)]
    pub identity_token_key: Option<String>,
}

/// Paths on the node (k3s reads them itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsSpec {
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub cert_file: Option<String>,
    #[serde(default)]
    pub key_file: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
}

/// Why nothing was rendered. `label()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("mirror map is not valid YAML/JSON for the schema: {0}")]
    Parse(String),
    #[error("mirror map declares no mirrors")]
    NoMirrors,
    #[error("invalid registry host {0:?} (expected host[:port] or \"*\")")]
    BadHost(String),
    #[error("mirror {host}: invalid endpoint {endpoint:?}: {why}")]
    BadEndpoint {
        host: String,
        endpoint: String,
        why: String,
    },
    #[error("mirror {0}: no endpoints and no harborFqdn to derive https://harbor.<fqdn>")]
    NoEndpoint(String),
    #[error("invalid harborFqdn {0:?}")]
    BadFqdn(String),
    #[error("mirror {host}: invalid proxy-cache project {project:?}")]
    BadProject { host: String, project: String },
    #[error("mirror {host}: invalid rewrite regex {regex:?}: {why}")]
    BadRegex {
        host: String,
        regex: String,
        why: String,
    },
    #[error("mirror {host}: rewrite {regex:?} -> {replacement:?} references group ${group} but the regex has {groups} group(s)")]
    BadReplacement {
        host: String,
        regex: String,
        replacement: String,
        group: usize,
        groups: usize,
    },
    #[error("config {host}: Secret has no key {key:?}")]
    MissingSecretKey { host: String, key: String },
    #[error("config {0}: auth needs usernameKey+passwordKey, authKey or identityTokenKey")]
    IncompleteAuth(String),
    #[error("config {host}: invalid TLS file path {path:?} (must be absolute)")]
    BadTlsPath { host: String, path: String },
    #[error("config {0}: certFile and keyFile must be given together")]
    CertWithoutKey(String),
    #[error("rendering YAML failed: {0}")]
    Serialize(String),
}

impl RenderError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Parse(_) => "parse",
            Self::NoMirrors => "no_mirrors",
            Self::BadHost(_) => "bad_host",
            Self::BadEndpoint { .. } => "bad_endpoint",
            Self::NoEndpoint(_) => "no_endpoint",
            Self::BadFqdn(_) => "bad_fqdn",
            Self::BadProject { .. } => "bad_project",
            Self::BadRegex { .. } => "bad_regex",
            Self::BadReplacement { .. } => "bad_replacement",
            Self::MissingSecretKey { .. } => "missing_secret_key",
            Self::IncompleteAuth(_) => "incomplete_auth",
            Self::BadTlsPath { .. } => "bad_tls_path",
            Self::CertWithoutKey(_) => "cert_without_key",
            Self::Serialize(_) => "serialize",
        }
    }
}

/// Parse a mirror map (YAML or JSON). Unknown fields are errors: a typo must
/// not silently drop a mirror.
pub fn parse_mirror_map(text: &str) -> Result<MirrorMap, RenderError> {
    serde_yaml::from_str(text).map_err(|e| RenderError::Parse(e.to_string()))
}

// ---- k3s schema (output) ----

#[derive(Debug, Serialize)]
struct Registries {
    mirrors: BTreeMap<String, Mirror>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    configs: BTreeMap<String, RegistryConfig>,
}

#[derive(Debug, Serialize)]
struct Mirror {
    endpoint: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    rewrite: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct RegistryConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<Auth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Tls>,
}

#[derive(Debug, Serialize)]
struct Auth {
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_token: Option<String>,
}

#[derive(Debug, Serialize)]
struct Tls {
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    insecure_skip_verify: Option<bool>,
}

/// First line of every rendered file: tells a human who owns it.
pub const HEADER: &str =
    "# Managed by continuum-agent node-pivot (registries v2). Manual edits are overwritten.\n";

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// DNS name (lowercase letters, digits, '-', dots; labels 1..63 chars).
pub fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| !b.is_ascii_uppercase())
        && name.split('.').all(valid_label)
}

/// `host[:port]` as a registry key, or `*` (k3s wildcard mirror).
pub fn valid_registry_host(host: &str) -> bool {
    if host == "*" {
        return true;
    }
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|v| v > 0)
    });
    port_ok && valid_dns_name(name)
}

fn check_endpoint(host: &str, endpoint: &str, allow_http: bool) -> Result<(), RenderError> {
    let bad = |why: &str| RenderError::BadEndpoint {
        host: host.into(),
        endpoint: endpoint.into(),
        why: why.into(),
    };
    let rest = if let Some(r) = endpoint.strip_prefix("https://") {
        r
    } else if let Some(r) = endpoint.strip_prefix("http://") {
        if !allow_http {
            return Err(bad(
                "not https (set allowInsecureEndpoints for test registries)",
            ));
        }
        r
    } else {
        return Err(bad("scheme must be https://"));
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    if authority.contains('@') {
        return Err(bad("credentials in the URL (use configs.auth)"));
    }
    if authority == "*" || !valid_registry_host(authority) {
        return Err(bad("invalid host[:port]"));
    }
    if let Some(p) = path {
        if p.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'?' || b == b'#')
        {
            return Err(bad("invalid path"));
        }
    }
    Ok(())
}

/// Harbor project names: lowercase letters, digits, `.`, `_`, `-`; 1..255.
fn valid_project(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 255
        && p.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && p.as_bytes()[0].is_ascii_alphanumeric()
}

/// Highest `$N` / `${N}` referenced by a replacement (named groups are not
/// checked: containerd uses Go's regexp, whose named-group syntax we do not
/// restrict here).
fn max_group_ref(replacement: &str) -> Option<usize> {
    let b = replacement.as_bytes();
    let mut i = 0;
    let mut max = None;
    while i < b.len() {
        if b[i] == b'$' {
            let (start, braced) = if b.get(i + 1) == Some(&b'{') {
                (i + 2, true)
            } else {
                (i + 1, false)
            };
            let mut j = start;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let closed = !braced || b.get(j) == Some(&b'}');
            if j > start && closed {
                if let Ok(n) = replacement[start..j].parse::<usize>() {
                    max = Some(max.map_or(n, |m: usize| m.max(n)));
                }
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    max
}

fn check_rewrite(host: &str, regex: &str, replacement: &str) -> Result<(), RenderError> {
    let re = regex::Regex::new(regex).map_err(|e| RenderError::BadRegex {
        host: host.into(),
        regex: regex.into(),
        why: e.to_string(),
    })?;
    let groups = re.captures_len() - 1;
    if let Some(g) = max_group_ref(replacement) {
        if g > groups {
            return Err(RenderError::BadReplacement {
                host: host.into(),
                regex: regex.into(),
                replacement: replacement.into(),
                group: g,
                groups,
            });
        }
    }
    Ok(())
}

fn secret(
    host: &str,
    secrets: &BTreeMap<String, String>,
    key: &Option<String>,
) -> Result<Option<String>, RenderError> {
    let Some(k) = key else { return Ok(None) };
    match secrets.get(k) {
        // Secret files often end with a newline from `kubectl create secret --from-file`.
        Some(v) => Ok(Some(v.trim_end_matches(['\n', '\r']).to_string())),
        None => Err(RenderError::MissingSecretKey {
            host: host.into(),
            key: k.clone(),
        }),
    }
}

fn check_tls_path(host: &str, p: &Option<String>) -> Result<(), RenderError> {
    match p {
        Some(path) if !path.starts_with('/') || path.contains('\0') || path.contains('\n') => {
            Err(RenderError::BadTlsPath {
                host: host.into(),
                path: path.clone(),
            })
        }
        _ => Ok(()),
    }
}

/// Validate the map and render `registries.yaml`. `secrets` maps Secret keys to
/// values (the mounted Secret directory, read by the caller).
pub fn render(map: &MirrorMap, secrets: &BTreeMap<String, String>) -> Result<String, RenderError> {
    if map.mirrors.is_empty() {
        return Err(RenderError::NoMirrors);
    }
    if let Some(f) = &map.harbor_fqdn {
        if !valid_dns_name(f) {
            return Err(RenderError::BadFqdn(f.clone()));
        }
    }
    let mut mirrors = BTreeMap::new();
    for (host, spec) in &map.mirrors {
        if !valid_registry_host(host) {
            return Err(RenderError::BadHost(host.clone()));
        }
        let endpoints = if spec.endpoints.is_empty() {
            match &map.harbor_fqdn {
                Some(f) => vec![format!("https://harbor.{f}")],
                None => return Err(RenderError::NoEndpoint(host.clone())),
            }
        } else {
            spec.endpoints.clone()
        };
        for e in &endpoints {
            check_endpoint(host, e, map.allow_insecure_endpoints)?;
        }
        let mut rewrite = spec.rewrite.clone();
        if let Some(p) = &spec.project {
            if !valid_project(p) {
                return Err(RenderError::BadProject {
                    host: host.clone(),
                    project: p.clone(),
                });
            }
            rewrite.insert("^(.*)$".into(), format!("{p}/$1"));
        }
        for (re, rep) in &rewrite {
            check_rewrite(host, re, rep)?;
        }
        mirrors.insert(
            host.clone(),
            Mirror {
                endpoint: endpoints,
                rewrite,
            },
        );
    }
    let mut configs = BTreeMap::new();
    for (host, spec) in &map.configs {
        if !valid_registry_host(host) || host == "*" {
            return Err(RenderError::BadHost(host.clone()));
        }
        let auth = match &spec.auth {
            None => None,
            Some(a) => {
                let auth = Auth {
                    username: secret(host, secrets, &a.username_key)?,
                    password: secret(host, secrets, &a.password_key)?,
                    auth: secret(host, secrets, &a.auth_key)?,
                    identity_token: secret(host, secrets, &a.identity_token_key)?,
                };
                let basic = auth.username.is_some() && auth.password.is_some();
                let half = auth.username.is_some() != auth.password.is_some();
                if half || !(basic || auth.auth.is_some() || auth.identity_token.is_some()) {
                    return Err(RenderError::IncompleteAuth(host.clone()));
                }
                Some(auth)
            }
        };
        let tls = match &spec.tls {
            None => None,
            Some(t) => {
                check_tls_path(host, &t.ca_file)?;
                check_tls_path(host, &t.cert_file)?;
                check_tls_path(host, &t.key_file)?;
                if t.cert_file.is_some() != t.key_file.is_some() {
                    return Err(RenderError::CertWithoutKey(host.clone()));
                }
                Some(Tls {
                    ca_file: t.ca_file.clone(),
                    cert_file: t.cert_file.clone(),
                    key_file: t.key_file.clone(),
                    insecure_skip_verify: t.insecure_skip_verify,
                })
            }
        };
        if auth.is_some() || tls.is_some() {
            configs.insert(host.clone(), RegistryConfig { auth, tls });
        }
    }
    let body = serde_yaml::to_string(&Registries { mirrors, configs })
        .map_err(|e| RenderError::Serialize(e.to_string()))?;
    Ok(format!("{HEADER}{body}"))
}

/// Parse + render in one step (what the fuzz target drives).
pub fn render_text(
    map_text: &str,
    secrets: &BTreeMap<String, String>,
) -> Result<String, RenderError> {
    render(&parse_mirror_map(map_text)?, secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> BTreeMap<String, String> {
        [
            ("username", "robot$pull\n"),
            ("password", "s3cr3t"),
            ("token", "tok"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    const GOOD: &str = r#"
harborFqdn: otech116.omani.works
mirrors:
  quay.io: { project: proxy-quay.io }
  docker.io: { project: proxy-docker.io }
  ghcr.io:
    endpoints: ["https://harbor.otech116.omani.works"]
    project: proxy-ghcr.io
configs:
  harbor.otech116.omani.works:
    auth: { usernameKey: username, passwordKey: password }
    tls: { caFile: /etc/continuum/harbor/ca.crt }
"#;

    #[test]
    fn renders_k3s_schema_sorted() {
        let out = render_text(GOOD, &secrets()).unwrap();
        let expected = format!(
            "{HEADER}mirrors:
  docker.io:
    endpoint:
    - https://harbor.otech116.omani.works
    rewrite:
      ^(.*)$: proxy-docker.io/$1
  ghcr.io:
    endpoint:
    - https://harbor.otech116.omani.works
    rewrite:
      ^(.*)$: proxy-ghcr.io/$1
  quay.io:
    endpoint:
    - https://harbor.otech116.omani.works
    rewrite:
      ^(.*)$: proxy-quay.io/$1
configs:
  harbor.otech116.omani.works:
    auth:
      username: robot$pull
      password: s3cr3t
    tls:
      ca_file: /etc/continuum/harbor/ca.crt
"
        );
        assert_eq!(out, expected);
        // And it parses back as YAML with the k3s field names.
        let v: serde_yaml::Value = serde_yaml::from_str(&out).unwrap();
        assert_eq!(
            v["mirrors"]["docker.io"]["rewrite"]["^(.*)$"].as_str(),
            Some("proxy-docker.io/$1")
        );
        assert_eq!(
            v["configs"]["harbor.otech116.omani.works"]["auth"]["username"].as_str(),
            Some("robot$pull")
        );
    }

    #[test]
    fn json_input_renders_the_same() {
        let json = r#"{"harborFqdn":"otech116.omani.works","mirrors":{"docker.io":{"project":"proxy-docker.io"}}}"#;
        let yaml = "harborFqdn: otech116.omani.works\nmirrors:\n  docker.io:\n    project: proxy-docker.io\n";
        assert_eq!(
            render_text(json, &secrets()).unwrap(),
            render_text(yaml, &secrets()).unwrap()
        );
    }

    #[test]
    fn deterministic() {
        let a = render_text(GOOD, &secrets()).unwrap();
        for _ in 0..5 {
            assert_eq!(render_text(GOOD, &secrets()).unwrap(), a);
        }
    }

    #[test]
    fn validation_table() {
        let cases: &[(&str, &str)] = &[
            ("mirrors: {}", "no_mirrors"),
            ("mirros: {}", "parse"),
            ("mirrors: { docker.io: { projekt: x } }", "parse"),
            ("mirrors: { docker.io: {} }", "no_endpoint"),
            ("harborFqdn: Bad_FQDN\nmirrors: { docker.io: {} }", "bad_fqdn"),
            ("harborFqdn: a.b\nmirrors: { 'Docker.IO': {} }", "bad_host"),
            ("harborFqdn: a.b\nmirrors: { 'docker.io:99999': {} }", "bad_host"),
            ("harborFqdn: a.b\nmirrors: { '-x.io': {} }", "bad_host"),
            ("mirrors: { docker.io: { endpoints: ['http://h.io'] } }", "bad_endpoint"),
            ("mirrors: { docker.io: { endpoints: ['ftp://h.io'] } }", "bad_endpoint"),
            ("mirrors: { docker.io: { endpoints: ['https://u:p@h.io'] } }", "bad_endpoint"),
            ("mirrors: { docker.io: { endpoints: ['https://'] } }", "bad_endpoint"),
            ("harborFqdn: a.b\nmirrors: { docker.io: { project: 'Bad Project' } }", "bad_project"),
            ("harborFqdn: a.b\nmirrors: { docker.io: { rewrite: { '^(.*': 'x/$1' } } }", "bad_regex"),
            ("harborFqdn: a.b\nmirrors: { docker.io: { rewrite: { '^(.*)$': 'x/$2' } } }", "bad_replacement"),
            ("harborFqdn: a.b\nmirrors: { docker.io: {} }\nconfigs: { h.io: { auth: { usernameKey: nope, passwordKey: password } } }", "missing_secret_key"),
            ("harborFqdn: a.b\nmirrors: { docker.io: {} }\nconfigs: { h.io: { auth: { usernameKey: username } } }", "incomplete_auth"),
            ("harborFqdn: a.b\nmirrors: { docker.io: {} }\nconfigs: { h.io: { auth: {} } }", "incomplete_auth"),
            ("harborFqdn: a.b\nmirrors: { docker.io: {} }\nconfigs: { h.io: { tls: { caFile: rel/ca.crt } } }", "bad_tls_path"),
            ("harborFqdn: a.b\nmirrors: { docker.io: {} }\nconfigs: { h.io: { tls: { certFile: /c } } }", "cert_without_key"),
            ("harborFqdn: a.b\nmirrors: { docker.io: {} }\nconfigs: { '*': { tls: { caFile: /c } } }", "bad_host"),
        ];
        for (input, label) in cases {
            let got = render_text(input, &secrets());
            match got {
                Err(e) => assert_eq!(e.label(), *label, "input {input:?}: {e}"),
                Ok(out) => panic!("input {input:?} rendered, expected {label}:\n{out}"),
            }
        }
    }

    #[test]
    fn accepted_variants() {
        let cases: &[&str] = &[
            "mirrors: { '*': { endpoints: ['https://harbor.a.b'] } }",
            "mirrors: { 'registry.local:5000': { endpoints: ['https://harbor.a.b:8443/v2'] } }",
            "allowInsecureEndpoints: true\nmirrors: { docker.io: { endpoints: ['http://127.0.0.1:5000'] } }",
            "harborFqdn: a.b\nmirrors: { docker.io: { rewrite: { '^rancher/(.*)': 'mirror/rancher-images/${1}' } } }",
            "harborFqdn: a.b\nmirrors: { docker.io: {} }\nconfigs: { h.io: { auth: { identityTokenKey: token } } }",
            "harborFqdn: a.b\nmirrors: { docker.io: {} }\nconfigs: { h.io: { tls: { certFile: /c, keyFile: /k, insecureSkipVerify: false } } }",
        ];
        for input in cases {
            if let Err(e) = render_text(input, &secrets()) {
                panic!("input {input:?} rejected: {e}");
            }
        }
    }

    #[test]
    fn group_refs() {
        assert_eq!(max_group_ref("x/$1"), Some(1));
        assert_eq!(max_group_ref("${2}-$10"), Some(10));
        assert_eq!(max_group_ref("plain$"), None);
        assert_eq!(max_group_ref("${name}"), None);
    }
}
