//! Source pivot that stays pivoted (seed 002 step 06).
//!
//! Two halves:
//! - [`watch`]: lists/watches Flux HelmRepository, OCIRepository and
//!   GitRepository objects and reports those whose URL still points outside the
//!   Sovereign (metric + JSON status), and, within the same watch event, any URL
//!   that went back to an external host after it had been local (the seed 002
//!   failure: Flux re-applied the old URL from Git).
//! - [`git`]: `continuum-agent pivot sources` rewrites the declarations in Git
//!   first, so the cluster never reverts the pivot, then asks Flux to reconcile.
//!
//! [`Tracker`] is the pure part of the watcher (events in, observations out).

pub mod cmd;
pub mod git;
pub mod watch;

use std::collections::BTreeMap;

use serde::Serialize;

/// One Flux source object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SourceKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

/// What one observation of a URL means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Local,
    External,
    /// Was local (`from`), now external again (`to`).
    Reverted {
        from: String,
        to: String,
    },
}

#[derive(Debug, Clone)]
struct Seen {
    url: String,
    local: bool,
    /// Last local URL seen for this object (the pivot target).
    last_local: Option<String>,
    /// Set on a revert, cleared when local again.
    reverted_from: Option<String>,
}

/// Hosts that count as inside the Sovereign: `harbor.x.y` matches exactly,
/// `.x.y` matches any subdomain of x.y (and x.y itself).
#[derive(Debug, Clone, Default)]
pub struct LocalHosts(pub Vec<String>);

impl LocalHosts {
    pub fn is_local(&self, url: &str) -> bool {
        let Some(host) = url_host(url) else {
            return false;
        };
        self.0.iter().any(|e| {
            let e = e.trim().to_ascii_lowercase();
            match e.strip_prefix('.').or_else(|| e.strip_prefix("*.")) {
                Some(domain) => host == domain || host.ends_with(&format!(".{domain}")),
                None => host == e,
            }
        })
    }
}

/// Host of a source URL: `scheme://[user@]host[:port]/...` or scp-like `user@host:path`.
pub fn url_host(url: &str) -> Option<String> {
    let url = url.trim();
    let rest = match url.split_once("://") {
        Some((_, r)) => r,
        None => {
            // scp-like git remote: git@host:org/repo.git
            let (_, r) = url.split_once('@')?;
            let host = r.split(':').next()?;
            return (!host.is_empty()).then(|| host.to_ascii_lowercase());
        }
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit('@').next()?;
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        hostport.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Pure state of the watcher.
#[derive(Debug, Default)]
pub struct Tracker {
    pub local: LocalHosts,
    objects: BTreeMap<SourceKey, Seen>,
}

impl Tracker {
    pub fn new(local: LocalHosts) -> Self {
        Self {
            local,
            objects: BTreeMap::new(),
        }
    }

    pub fn observe(&mut self, key: SourceKey, url: &str) -> Observation {
        let local = self.local.is_local(url);
        let prev = self.objects.remove(&key);
        let (last_local, was_reverted) = match &prev {
            Some(p) => (p.last_local.clone(), p.reverted_from.clone()),
            None => (None, None),
        };
        let (obs, seen) = if local {
            (
                Observation::Local,
                Seen {
                    url: url.into(),
                    local,
                    last_local: Some(url.into()),
                    reverted_from: None,
                },
            )
        } else {
            let newly_reverted = prev.as_ref().is_some_and(|p| p.local);
            let obs = match (&last_local, newly_reverted) {
                (Some(from), true) => Observation::Reverted {
                    from: from.clone(),
                    to: url.into(),
                },
                _ => Observation::External,
            };
            let reverted_from = match &obs {
                Observation::Reverted { from, .. } => Some(from.clone()),
                _ => was_reverted,
            };
            (
                obs,
                Seen {
                    url: url.into(),
                    local,
                    last_local,
                    reverted_from,
                },
            )
        };
        self.objects.insert(key, seen);
        obs
    }

    pub fn forget(&mut self, key: &SourceKey) {
        self.objects.remove(key);
    }

    /// External objects per kind (for the gauge).
    pub fn external_counts(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for (k, s) in &self.objects {
            let c = out.entry(k.kind.clone()).or_insert(0);
            if !s.local {
                *c += 1;
            }
        }
        out
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        let external: Vec<_> = self
            .objects
            .iter()
            .filter(|(_, s)| !s.local)
            .map(|(k, s)| {
                serde_json::json!({
                    "kind": k.kind, "namespace": k.namespace, "name": k.name, "url": s.url,
                })
            })
            .collect();
        let reverted: Vec<_> = self
            .objects
            .iter()
            .filter_map(|(k, s)| {
                s.reverted_from.as_ref().map(|from| {
                    serde_json::json!({
                        "kind": k.kind, "namespace": k.namespace, "name": k.name,
                        "pivotedUrl": from, "currentUrl": s.url,
                    })
                })
            })
            .collect();
        serde_json::json!({
            "sources": self.objects.len(),
            "external": external,
            "reverted": reverted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> SourceKey {
        SourceKey {
            kind: "HelmRepository".into(),
            namespace: "flux-system".into(),
            name: n.into(),
        }
    }

    #[test]
    fn hosts() {
        let cases = [
            ("oci://ghcr.io/openova-io", Some("ghcr.io")),
            (
                "https://user:pw@Gitea.local:3000/o/r.git",
                Some("gitea.local"),
            ),
            ("git@github.com:openova-io/openova.git", Some("github.com")),
            ("ssh://git@[::1]:22/r", Some("::1")),
            ("nonsense", None),
        ];
        for (u, h) in cases {
            assert_eq!(url_host(u).as_deref(), h, "{u}");
        }
        let l = LocalHosts(vec![
            "harbor.otech116.omani.works".into(),
            ".svc.cluster.local".into(),
        ]);
        assert!(l.is_local("oci://harbor.otech116.omani.works/openova-io"));
        assert!(l.is_local("http://gitea-http.gitea.svc.cluster.local:3000/openova/openova.git"));
        assert!(!l.is_local("oci://ghcr.io/openova-io"));
        assert!(!l.is_local("oci://harbor.otech116.omani.works.evil.io/x"));
    }

    #[test]
    fn revert_detected_once_and_reported() {
        let mut t = Tracker::new(LocalHosts(vec!["harbor.sov.io".into()]));
        assert_eq!(
            t.observe(key("a"), "oci://ghcr.io/openova-io"),
            Observation::External
        );
        assert_eq!(
            t.observe(key("a"), "oci://harbor.sov.io/openova-io"),
            Observation::Local
        );
        assert_eq!(
            t.observe(key("a"), "oci://ghcr.io/openova-io"),
            Observation::Reverted {
                from: "oci://harbor.sov.io/openova-io".into(),
                to: "oci://ghcr.io/openova-io".into()
            }
        );
        // A repeated event with the same external URL is not a new revert.
        assert_eq!(
            t.observe(key("a"), "oci://ghcr.io/openova-io"),
            Observation::External
        );
        let s = t.status();
        assert_eq!(s["external"][0]["name"], "a");
        assert_eq!(
            s["reverted"][0]["pivotedUrl"],
            "oci://harbor.sov.io/openova-io"
        );
        assert_eq!(t.external_counts()["HelmRepository"], 1);
        // Local again clears the revert.
        t.observe(key("a"), "oci://harbor.sov.io/openova-io");
        assert_eq!(t.status()["reverted"].as_array().map(Vec::len), Some(0));
        assert_eq!(t.external_counts()["HelmRepository"], 0);
    }
}
