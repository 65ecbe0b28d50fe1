//! Strict in-process Kubernetes API test server.
//!
//! A real `kube::Client` talks to it over HTTP on loopback. It keeps the API
//! semantics controllers depend on, strictly rather than permissively:
//! resourceVersion from one global counter with optimistic concurrency (409 on a
//! stale update), 409 AlreadyExists, 404 NotFound and 422 Invalid with proper
//! `Status` objects, the status subresource, generation bumps on spec changes,
//! watch with bookmarks and `410 Gone` for versions older than the retained event
//! window, list with label/field selectors and pagination, merge patch, JSON patch
//! and server-side apply, and RBAC from a ClusterRole loaded from `manifests/`.
//!
//! Requests carrying `Authorization: Bearer admin` (see [`TestApi::admin_client`])
//! bypass RBAC so tests can seed objects; every other request is checked against
//! the role and recorded (see [`TestApi::requests`]) for minimality tests.
//!
//! Fault injection: [`TestApi::set_latency`], [`TestApi::fail_next`],
//! [`TestApi::drop_watches`]. Dev and test only: never a dependency of a shipped binary.
#![forbid(unsafe_code)]

pub mod patch;
pub mod rbac;
pub mod resources;
pub mod selector;
mod server;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, watch};

pub use rbac::PolicyRule;
pub use resources::ResourceSpec;

/// Identifies a stored object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ObjKey {
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

pub(crate) struct Stored {
    pub obj: Value,
    pub managers: patch::Managers,
}

/// One change, as kept in the event window and sent to watchers.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    pub rv: u64,
    pub key: ObjKey,
    pub kind: &'static str,
    pub obj: Value,
    pub prev: Option<Value>,
}

/// A recorded request (non-admin only).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestRecord {
    /// RBAC verb: get list watch create update patch delete.
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// HTTP status answered.
    pub code: u16,
}

/// A pending injected failure.
#[derive(Debug, Clone)]
struct Fault {
    verb: Option<String>,
    resource: Option<String>,
    subresource: Option<String>,
    remaining: usize,
    code: u16,
}

pub(crate) struct State {
    pub rv: u64,
    pub uid: u64,
    pub resources: Vec<ResourceSpec>,
    pub objects: BTreeMap<ObjKey, Stored>,
    pub changes: VecDeque<Change>,
    /// Changes with rv <= this are no longer retained: older watches get 410.
    pub compacted: u64,
    pub window: usize,
    pub rules: Option<Vec<PolicyRule>>,
    faults: Vec<Fault>,
    pub latency: Duration,
    pub requests: Vec<RequestRecord>,
    pub bookmark_interval: Duration,
}

impl State {
    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn push_change(&mut self, c: Change) {
        self.changes.push_back(c);
        while self.changes.len() > self.window {
            if let Some(old) = self.changes.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    /// Take one injected failure matching this request, if any.
    pub fn take_fault(&mut self, verb: &str, resource: &str, sub: Option<&str>) -> Option<u16> {
        let f = self.faults.iter_mut().find(|f| {
            f.remaining > 0
                && f.verb.as_deref().is_none_or(|v| v == verb)
                && f.resource.as_deref().is_none_or(|r| r == resource)
                && (f.resource.is_none() || f.subresource.as_deref() == sub)
        })?;
        f.remaining -= 1;
        let code = f.code;
        self.faults.retain(|f| f.remaining > 0);
        Some(code)
    }

    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<ResourceSpec> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .cloned()
    }
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub changes_tx: broadcast::Sender<Change>,
    pub drop_tx: watch::Sender<u64>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not poison the server for the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Options for [`TestApi::start_with`].
#[derive(Debug, Clone)]
pub struct Options {
    /// RBAC rules for non-admin requests; `None` allows everything.
    pub rules: Option<Vec<PolicyRule>>,
    /// How many changes are retained for watches (older versions get 410).
    pub window: usize,
    /// Interval between BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rules: None,
            window: 10_000,
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// A running test API server; stops when dropped.
pub struct TestApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.drop_tx.send_modify(|g| *g += 1);
    }
}

impl TestApi {
    /// Start with default options (no RBAC).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Start with RBAC from a ClusterRole YAML file (e.g. `manifests/rbac/hr-recovery.yaml`).
    pub async fn start_with_role(path: &std::path::Path) -> anyhow::Result<Self> {
        let rules = rbac::rules_from_file(path)?;
        Self::start_with(Options {
            rules: Some(rules),
            ..Options::default()
        })
        .await
    }

    pub async fn start_with(opts: Options) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (changes_tx, _) = broadcast::channel(65_536);
        let (drop_tx, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                uid: 0,
                resources: resources::default_resources(),
                objects: BTreeMap::new(),
                changes: VecDeque::new(),
                compacted: 0,
                window: opts.window.max(1),
                rules: opts.rules,
                faults: Vec::new(),
                latency: Duration::ZERO,
                requests: Vec::new(),
                bookmark_interval: opts.bookmark_interval,
            }),
            changes_tx,
            drop_tx,
        });
        let task = tokio::spawn(server::serve(listener, shared.clone()));
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kube config for the given user (`admin` bypasses RBAC).
    pub fn config_for(&self, user: &str) -> anyhow::Result<kube::Config> {
        let mut cfg = kube::Config::new(self.url().parse()?);
        cfg.headers.push((
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {user}"))?,
        ));
        cfg.read_timeout = None;
        // Tests see every answer (injected 503/504 included) instead of kube's silent retries.
        cfg.default_retry = false;
        Ok(cfg)
    }

    /// Client subject to RBAC (the agent's identity).
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(self.config_for("agent")?)?)
    }

    /// Client that bypasses RBAC, for seeding and inspecting.
    pub fn admin_client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(self.config_for("admin")?)?)
    }

    /// Serve an additional resource (a CRD, a built-in type not registered by default).
    pub fn register(&self, spec: ResourceSpec) {
        let mut st = self.shared.lock();
        st.resources.retain(|r| {
            !(r.group == spec.group && r.version == spec.version && r.plural == spec.plural)
        });
        st.resources.push(spec);
    }

    /// Replace the RBAC rules (`None`: allow everything).
    pub fn set_rules(&self, rules: Option<Vec<PolicyRule>>) {
        self.shared.lock().rules = rules;
    }

    /// Added latency before every request is answered.
    pub fn set_latency(&self, d: Duration) {
        self.shared.lock().latency = d;
    }

    /// The next `count` requests matching verb/resource (None = any) and subresource
    /// (None = the main resource; ignored when resource is None) answer `code`.
    pub fn fail_next(
        &self,
        verb: Option<&str>,
        resource: Option<&str>,
        subresource: Option<&str>,
        count: usize,
        code: u16,
    ) {
        self.shared.lock().faults.push(Fault {
            verb: verb.map(Into::into),
            resource: resource.map(Into::into),
            subresource: subresource.map(Into::into),
            remaining: count,
            code,
        });
    }

    /// Close every open watch stream now.
    pub fn drop_watches(&self) {
        self.shared.drop_tx.send_modify(|g| *g += 1);
    }

    /// Forget retained changes so every watch from an older version gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        st.compacted = st.rv;
        st.changes.clear();
    }

    /// Every recorded non-admin request so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Stored object, for assertions without going through HTTP.
    pub fn object(&self, group: &str, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.lock();
        st.objects
            .get(&ObjKey {
                group: group.into(),
                plural: plural.into(),
                namespace: namespace.into(),
                name: name.into(),
            })
            .map(|s| s.obj.clone())
    }

    /// Stored objects of one resource (any namespace).
    pub fn objects(&self, group: &str, plural: &str) -> Vec<Value> {
        let st = self.shared.lock();
        st.objects
            .iter()
            .filter(|(k, _)| k.group == group && k.plural == plural)
            .map(|(_, s)| s.obj.clone())
            .collect()
    }
}
