//! Publishes each lease's holder and epoch as a TXT record into a PowerDNS
//! zone, through the PowerDNS HTTP API, so that GSLB records and any observer
//! can see who is primary (record name and TXT format:
//! [`continuum_shared::dns`]).
//!
//! DNS publishes; it does not arbitrate. So publication never blocks or fails
//! the lease path: [`DnsPublisher::publish`] only records the latest state of
//! the lease and wakes one background task per PowerDNS server. Each task
//! coalesces to the latest state per lease (a burst of changes costs one
//! write), sends all pending leases in one PATCH (up to [`BATCH`] rrsets),
//! retries failures with exponential backoff, and rewrites every known lease
//! every `resync_every` so that a server restored from an old backup or
//! edited by hand converges again. Servers are independent authoritative
//! servers: one being down delays only its own copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use continuum_shared::dns::{DnsError, Published, Zone};
use continuum_shared::lease::{Epoch, HolderId, LeaseName};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Most rrsets sent in one PATCH.
pub const BATCH: usize = 200;
/// TTL of the published records, in seconds: short, since holders change on
/// failover and caching resolvers should not hide that for long.
pub const DEFAULT_RECORD_TTL: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_ERROR_BODY: usize = 4096;

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Base URLs of the PowerDNS HTTP APIs (`http://127.0.0.1:8081`), one per
    /// independent authoritative server.
    pub api_urls: Vec<String>,
    /// The PowerDNS API key (`X-API-Key`).
    pub api_key: String,
    /// The zone the records go into (it must exist on every server).
    pub zone: String,
    /// PowerDNS server id in the API path (`localhost` unless configured).
    pub server_id: String,
    /// TTL of the TXT records, in seconds.
    pub record_ttl: u32,
    /// How often every known lease is rewritten on every server.
    pub resync_every: Duration,
}

impl PublisherConfig {
    pub fn new(api_urls: Vec<String>, api_key: String, zone: String) -> Self {
        PublisherConfig {
            api_urls,
            api_key,
            zone,
            server_id: "localhost".into(),
            record_ttl: DEFAULT_RECORD_TTL,
            resync_every: Duration::from_secs(300),
        }
    }
}

/// `continuum-witness serve` flags of DNS publication (off unless
/// `--pdns-api-url` is given).
#[derive(Debug, Clone, clap::Args)]
pub struct DnsArgs {
    /// Base URL of a PowerDNS HTTP API (e.g. http://127.0.0.1:8081), one per
    /// independent authoritative server; repeat the flag or separate with
    /// commas. Each lease's holder and epoch is published as a TXT record.
    /// DNS publication is off when none is given.
    #[arg(
        long = "pdns-api-url",
        env = "CONTINUUM_WITNESS_PDNS_API_URL",
        value_delimiter = ','
    )]
    pub pdns_api_urls: Vec<String>,
    /// PowerDNS API key (sent as X-API-Key to every server).
    #[arg(long, env = "CONTINUUM_WITNESS_PDNS_API_KEY", hide_env_values = true)]
    pub pdns_api_key: Option<String>,
    /// DNS zone the lease records go into (it must exist on every server);
    /// `continuum/db/app` is published as `app.db.continuum.<zone>`.
    #[arg(long, env = "CONTINUUM_WITNESS_PDNS_ZONE")]
    pub pdns_zone: Option<String>,
    /// PowerDNS server id in the API path (/api/v1/servers/<id>/...).
    #[arg(
        long,
        env = "CONTINUUM_WITNESS_PDNS_SERVER_ID",
        default_value = "localhost"
    )]
    pub pdns_server_id: String,
    /// Seconds between full re-reads of the witness's leases for DNS. Expiry
    /// is not a change event, so an expired holder leaves DNS within this
    /// delay; each re-read costs one store read per lease (several etcd
    /// requests per lease with --store etcd).
    #[arg(
        long,
        env = "CONTINUUM_WITNESS_PDNS_SNAPSHOT_INTERVAL",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub pdns_snapshot_interval: u64,
}

impl DnsArgs {
    /// The publisher configuration, `None` when publication is off.
    pub fn config(&self) -> Result<Option<PublisherConfig>, PublishError> {
        if self.pdns_api_urls.is_empty() {
            if self.pdns_api_key.is_some() || self.pdns_zone.is_some() {
                return Err(PublishError::Config(
                    "--pdns-api-key/--pdns-zone given without --pdns-api-url".into(),
                ));
            }
            return Ok(None);
        }
        let key = self
            .pdns_api_key
            .clone()
            .ok_or_else(|| PublishError::Config("--pdns-api-url needs --pdns-api-key".into()))?;
        let zone = self
            .pdns_zone
            .clone()
            .ok_or_else(|| PublishError::Config("--pdns-api-url needs --pdns-zone".into()))?;
        let mut cfg = PublisherConfig::new(self.pdns_api_urls.clone(), key, zone);
        cfg.server_id = self.pdns_server_id.clone();
        Ok(Some(cfg))
    }
}

/// Attaches DNS publication to `witness` when configured: the publisher
/// receives every grant and release, plus a snapshot every
/// `--pdns-snapshot-interval`. Keep the returned publisher alive while serving.
pub fn attach(
    args: &DnsArgs,
    witness: crate::service::Witness,
) -> Result<(Arc<crate::service::Witness>, Option<DnsPublisher>), PublishError> {
    let Some(cfg) = args.config()? else {
        return Ok((Arc::new(witness), None));
    };
    let publisher = DnsPublisher::start(cfg, witness.metrics().registry())?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let witness = Arc::new(witness.with_change_sink(tx));
    let every = Duration::from_secs(args.pdns_snapshot_interval);
    let task = publisher.follow(witness.clone(), rx, every);
    Ok((
        witness,
        Some(DnsPublisher {
            _follow: Some(Arc::new(Tasks(vec![task]))),
            ..publisher
        }),
    ))
}

/// Why publication could not start, or one PATCH failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Zone(#[from] DnsError),
    #[error("invalid PowerDNS setting: {0}")]
    Config(String),
    #[error("PowerDNS API unreachable: {0}")]
    Unreachable(String),
    #[error("PowerDNS API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("PowerDNS API refused the change ({status}): {body}")]
    Rejected { status: u16, body: String },
    #[error("PowerDNS API failed ({status}): {body}")]
    ServerError { status: u16, body: String },
}

impl PublishError {
    /// Stable label for metrics (the `outcome` of a failed publish).
    pub fn label(&self) -> &'static str {
        match self {
            PublishError::Zone(_) => "invalid_zone",
            PublishError::Config(_) => "config",
            PublishError::Unreachable(_) => "unreachable",
            PublishError::Timeout(_) => "timeout",
            PublishError::Rejected { .. } => "rejected",
            PublishError::ServerError { .. } => "server_error",
        }
    }
}

/// Publication metrics, labelled by PowerDNS API URL.
#[derive(Clone)]
struct Metrics {
    publishes: IntCounterVec,
    lag: HistogramVec,
    pending: IntGaugeVec,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let publishes = IntCounterVec::new(
            Opts::new(
                "continuum_witness_dns_publishes_total",
                "Lease records written to PowerDNS (one per lease and attempt), by server and outcome.",
            ),
            &["server", "outcome"],
        )?;
        let lag = HistogramVec::new(
            HistogramOpts::new(
                "continuum_witness_dns_publish_lag_seconds",
                "Time from a lease change to its record being accepted by PowerDNS.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["server"],
        )?;
        let pending = IntGaugeVec::new(
            Opts::new(
                "continuum_witness_dns_pending",
                "Lease records waiting to be written to PowerDNS, by server.",
            ),
            &["server"],
        )?;
        registry.register(Box::new(publishes.clone()))?;
        registry.register(Box::new(lag.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        Ok(Metrics {
            publishes,
            lag,
            pending,
        })
    }
}

/// A record waiting to be written to one server.
#[derive(Debug, Clone)]
struct Dirty {
    state: Published,
    /// When the oldest unwritten change of this lease arrived.
    since: Instant,
    /// Written again by the periodic resync, not by a change.
    resync: bool,
}

/// What one server still has to receive.
#[derive(Default)]
struct ServerState {
    dirty: HashMap<LeaseName, Dirty>,
    /// Last state this server accepted, per lease.
    written: HashMap<LeaseName, Published>,
}

struct Server {
    url: String,
    endpoint: http::Uri,
    state: Mutex<ServerState>,
    wake: Notify,
}

struct Shared {
    zone: Zone,
    api_key: String,
    record_ttl: u32,
    resync_every: Duration,
    /// Latest state per lease, as the lease path reported it.
    desired: Mutex<HashMap<LeaseName, Published>>,
    servers: Vec<Arc<Server>>,
    metrics: Metrics,
}

/// Aborts the background tasks when the last publisher handle goes.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Handle to the background publication (cheap to clone).
#[derive(Clone)]
pub struct DnsPublisher {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
    /// The task following the witness's changes, when attached.
    _follow: Option<Arc<Tasks>>,
}

impl DnsPublisher {
    /// Validates the configuration, registers the metrics and starts one
    /// background task per server. Must be called inside a Tokio runtime.
    pub fn start(config: PublisherConfig, registry: &Registry) -> Result<Self, PublishError> {
        let zone = Zone::new(&config.zone)?;
        if config.api_urls.is_empty() {
            return Err(PublishError::Config("no PowerDNS API URL".into()));
        }
        if config.api_key.is_empty() {
            return Err(PublishError::Config("the PowerDNS API key is empty".into()));
        }
        if config.api_key.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err(PublishError::Config(
                "the PowerDNS API key must be printable ASCII without spaces".into(),
            ));
        }
        if config.server_id.is_empty()
            || !config
                .server_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(PublishError::Config(format!(
                "server id {:?} must be [A-Za-z0-9._-]+",
                config.server_id
            )));
        }
        let mut servers = Vec::new();
        for url in &config.api_urls {
            let base = url.trim_end_matches('/');
            if !base.starts_with("http://") {
                return Err(PublishError::Config(format!(
                    "PowerDNS API URL {url:?} must start with http:// (the API listens on loopback or an admin network)"
                )));
            }
            let endpoint: http::Uri = format!(
                "{base}/api/v1/servers/{}/zones/{}",
                config.server_id,
                zone.fqdn()
            )
            .parse()
            .map_err(|e| PublishError::Config(format!("PowerDNS API URL {url:?}: {e}")))?;
            servers.push(Arc::new(Server {
                url: base.to_string(),
                endpoint,
                state: Mutex::new(ServerState::default()),
                wake: Notify::new(),
            }));
        }
        let metrics = Metrics::register(registry)
            .map_err(|e| PublishError::Config(format!("metrics: {e}")))?;
        let shared = Arc::new(Shared {
            zone,
            api_key: config.api_key,
            record_ttl: config.record_ttl,
            resync_every: config.resync_every,
            desired: Mutex::new(HashMap::new()),
            servers,
            metrics,
        });
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let tasks = shared
            .servers
            .iter()
            .map(|server| tokio::spawn(run_server(shared.clone(), server.clone(), client.clone())))
            .collect();
        tracing::info!(zone = %shared.zone, servers = ?config.api_urls, "DNS publication started");
        Ok(DnsPublisher {
            shared,
            _tasks: Arc::new(Tasks(tasks)),
            _follow: None,
        })
    }

    /// Records the new state of a lease for publication and returns at once.
    /// A change with an epoch lower than one already reported for the lease
    /// is stale (reordered delivery) and is dropped.
    pub fn publish(&self, name: &LeaseName, holder: Option<&HolderId>, epoch: Epoch) {
        let state = Published {
            holder: holder.cloned(),
            epoch,
        };
        {
            let mut desired = lock(&self.shared.desired);
            match desired.get(name) {
                Some(d) if d.epoch > epoch => {
                    tracing::debug!(lease = %name, epoch = %epoch, published_epoch = %d.epoch, "stale lease change not published");
                    return;
                }
                Some(d) if *d == state => return,
                _ => {}
            }
            desired.insert(name.clone(), state.clone());
        }
        let now = Instant::now();
        for server in &self.shared.servers {
            {
                let mut st = lock(&server.state);
                if st.written.get(name) == Some(&state) && !st.dirty.contains_key(name) {
                    continue;
                }
                let since = st.dirty.get(name).map(|d| d.since).unwrap_or(now);
                st.dirty.insert(
                    name.clone(),
                    Dirty {
                        state: state.clone(),
                        since,
                        resync: false,
                    },
                );
                self.shared
                    .metrics
                    .pending
                    .with_label_values(&[&server.url])
                    .set(st.dirty.len() as i64);
            }
            server.wake.notify_one();
        }
    }

    /// Publishes the current state of every lease of `witness`, then every
    /// change it reports on `changes`, and again a snapshot every
    /// `snapshot_every` (expiry is not a change event: this is how an expired
    /// holder disappears from DNS). A snapshot is applied before the changes
    /// that arrived while it was read, so a newer change always wins.
    pub fn follow(
        &self,
        witness: Arc<crate::service::Witness>,
        mut changes: UnboundedReceiver<crate::service::LeaseChange>,
        snapshot_every: Duration,
    ) -> JoinHandle<()> {
        let publisher = self.clone();
        tokio::spawn(async move {
            // `interval` panics on a zero period.
            let mut ticker = tokio::time::interval(snapshot_every.max(Duration::from_millis(100)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    change = changes.recv() => match change {
                        Some(c) => publisher.publish(&c.name, c.holder.as_ref(), c.epoch),
                        None => {
                            tracing::info!("lease change stream closed; DNS publication follows no more changes");
                            return;
                        }
                    },
                    _ = ticker.tick() => match witness.snapshot().await {
                        Ok(views) => {
                            for v in &views {
                                publisher.publish(&v.name, v.holder.as_ref(), v.epoch);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read the leases for DNS publication; retrying at the next snapshot"),
                    },
                }
            }
        })
    }

    /// The record name a lease is published under.
    pub fn record_name(&self, name: &LeaseName) -> String {
        self.shared.zone.record_name(name)
    }

    /// Leases not yet written to every server.
    pub fn pending(&self) -> usize {
        self.shared
            .servers
            .iter()
            .map(|s| lock(&s.state).dirty.len())
            .sum()
    }
}

/// The lock is only held for map updates that cannot panic; recover the data
/// if a panic elsewhere poisoned it anyway.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run_server(
    shared: Arc<Shared>,
    server: Arc<Server>,
    client: Client<HttpConnector, Full<Bytes>>,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut next_resync = tokio::time::Instant::now() + shared.resync_every;
    loop {
        tokio::select! {
            _ = server.wake.notified() => {}
            _ = tokio::time::sleep_until(next_resync) => {
                next_resync = tokio::time::Instant::now() + shared.resync_every;
                queue_resync(&shared, &server);
            }
        }
        loop {
            let batch: Vec<(LeaseName, Dirty)> = {
                let st = lock(&server.state);
                let mut batch: Vec<_> = st
                    .dirty
                    .iter()
                    .map(|(n, d)| (n.clone(), d.clone()))
                    .collect();
                // Oldest changes first, so that a long queue cannot starve one.
                batch.sort_by_key(|(_, d)| d.since);
                batch.truncate(BATCH);
                batch
            };
            if batch.is_empty() {
                break;
            }
            match patch(&shared, &server, &client, &batch).await {
                Ok(()) => {
                    backoff = FIRST_BACKOFF;
                    written(&shared, &server, &batch);
                }
                Err(e) => {
                    shared
                        .metrics
                        .publishes
                        .with_label_values(&[server.url.as_str(), e.label()])
                        .inc_by(batch.len() as u64);
                    tracing::warn!(server = %server.url, leases = batch.len(), error = %e, retry_in_ms = backoff.as_millis() as u64, "DNS publication failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

fn queue_resync(shared: &Shared, server: &Server) {
    let desired: Vec<(LeaseName, Published)> = lock(&shared.desired)
        .iter()
        .map(|(n, p)| (n.clone(), p.clone()))
        .collect();
    let now = Instant::now();
    let mut st = lock(&server.state);
    for (name, state) in desired {
        st.dirty.entry(name).or_insert(Dirty {
            state,
            since: now,
            resync: true,
        });
    }
}

/// Marks what the server accepted, unless a newer change came meanwhile.
fn written(shared: &Shared, server: &Server, batch: &[(LeaseName, Dirty)]) {
    let now = Instant::now();
    let mut st = lock(&server.state);
    for (name, sent) in batch {
        let record = shared.zone.record_name(name);
        let lag = now.saturating_duration_since(sent.since);
        if !sent.resync {
            shared
                .metrics
                .lag
                .with_label_values(&[&server.url])
                .observe(lag.as_secs_f64());
        }
        shared
            .metrics
            .publishes
            .with_label_values(&[server.url.as_str(), "ok"])
            .inc();
        tracing::info!(
            server = %server.url,
            lease = %name,
            record = %record,
            holder = sent.state.holder.as_ref().map(HolderId::as_str).unwrap_or(""),
            epoch = sent.state.epoch.0,
            lag_ms = lag.as_millis() as u64,
            reason = if sent.resync { "resync" } else { "lease change" },
            "published lease holder to DNS"
        );
        if st.dirty.get(name).is_some_and(|d| d.state == sent.state) {
            st.dirty.remove(name);
        }
        st.written.insert(name.clone(), sent.state.clone());
    }
    shared
        .metrics
        .pending
        .with_label_values(&[&server.url])
        .set(st.dirty.len() as i64);
}

/// The PATCH body replacing the TXT rrset of every lease in `batch`.
fn patch_body(zone: &Zone, ttl: u32, batch: &[(LeaseName, Dirty)]) -> serde_json::Value {
    let rrsets: Vec<serde_json::Value> = batch
        .iter()
        .map(|(name, d)| {
            serde_json::json!({
                "name": zone.record_name(name),
                "type": "TXT",
                "ttl": ttl,
                "changetype": "REPLACE",
                // The content has no quote or backslash (holder ids and
                // epochs are [a-z0-9-]), so quoting it is enough.
                "records": [{"content": format!("\"{}\"", d.state.to_txt()), "disabled": false}],
            })
        })
        .collect();
    serde_json::json!({ "rrsets": rrsets })
}

async fn patch(
    shared: &Shared,
    server: &Server,
    client: &Client<HttpConnector, Full<Bytes>>,
    batch: &[(LeaseName, Dirty)],
) -> Result<(), PublishError> {
    let body = patch_body(&shared.zone, shared.record_ttl, batch).to_string();
    let req = http::Request::builder()
        .method(http::Method::PATCH)
        .uri(server.endpoint.clone())
        .header("X-API-Key", &shared.api_key)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| PublishError::Config(e.to_string()))?;
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| PublishError::Unreachable(format!("{e:?}")))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let body = Limited::new(resp.into_body(), MAX_ERROR_BODY)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_else(|e| format!("(unreadable body: {e})"));
        let status = status.as_u16();
        if status >= 500 {
            Err(PublishError::ServerError { status, body })
        } else {
            Err(PublishError::Rejected { status, body })
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| PublishError::Timeout(REQUEST_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(urls: &[&str]) -> PublisherConfig {
        PublisherConfig::new(
            urls.iter().map(|s| s.to_string()).collect(),
            "key".into(),
            "lease.test".into(),
        )
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        dns: DnsArgs,
    }

    fn parse(args: &[&str]) -> Result<Option<PublisherConfig>, String> {
        use clap::Parser;
        let cli = Cli::try_parse_from(std::iter::once("witness").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.dns.config().map_err(|e| e.label().to_string())
    }

    #[test]
    fn flags_turn_publication_on_and_need_key_and_zone() {
        assert!(matches!(parse(&[]), Ok(None)));
        let cfg = parse(&[
            "--pdns-api-url",
            "http://127.0.0.1:1",
            "--pdns-api-url=http://127.0.0.1:2,http://127.0.0.1:3",
            "--pdns-api-key",
            "k",
            "--pdns-zone",
            "lease.test",
        ])
        .expect("valid")
        .expect("on");
        assert_eq!(
            cfg.api_urls,
            [
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:3"
            ]
        );
        assert_eq!(cfg.server_id, "localhost");
        assert_eq!(
            parse(&["--pdns-api-url", "http://x", "--pdns-zone", "z"]).err(),
            Some("config".into())
        );
        assert_eq!(
            parse(&["--pdns-api-url", "http://x", "--pdns-api-key", "k"]).err(),
            Some("config".into())
        );
        assert_eq!(parse(&["--pdns-zone", "z"]).err(), Some("config".into()));
        assert!(parse(&["--pdns-snapshot-interval", "0"]).is_err());
    }

    #[test]
    fn patch_body_replaces_one_txt_rrset_per_lease() {
        let zone = Zone::new("lease.test").expect("zone");
        let now = Instant::now();
        let batch = vec![
            (
                LeaseName::new("continuum/db/app").expect("name"),
                Dirty {
                    state: Published {
                        holder: Some(HolderId::new("eu-1").expect("holder")),
                        epoch: Epoch(7),
                    },
                    since: now,
                    resync: false,
                },
            ),
            (
                LeaseName::new("other").expect("name"),
                Dirty {
                    state: Published {
                        holder: None,
                        epoch: Epoch(3),
                    },
                    since: now,
                    resync: false,
                },
            ),
        ];
        let body = patch_body(&zone, 5, &batch);
        assert_eq!(
            body,
            serde_json::json!({"rrsets": [
                {"name": "app.db.continuum.lease.test.", "type": "TXT", "ttl": 5, "changetype": "REPLACE",
                 "records": [{"content": "\"holder=eu-1 epoch=7\"", "disabled": false}]},
                {"name": "other.lease.test.", "type": "TXT", "ttl": 5, "changetype": "REPLACE",
                 "records": [{"content": "\"holder= epoch=3\"", "disabled": false}]},
            ]})
        );
    }

    #[tokio::test]
    async fn refuses_bad_settings() {
        let cases: Vec<(PublisherConfig, &str)> = vec![
            (config(&[]), "config"),
            (config(&["https://127.0.0.1:8081"]), "config"),
            (config(&["http://bad host"]), "config"),
            (
                PublisherConfig {
                    zone: "bad..zone".into(),
                    ..config(&["http://127.0.0.1:1"])
                },
                "invalid_zone",
            ),
            (
                PublisherConfig {
                    api_key: String::new(),
                    ..config(&["http://127.0.0.1:1"])
                },
                "config",
            ),
            (
                PublisherConfig {
                    server_id: "a/b".into(),
                    ..config(&["http://127.0.0.1:1"])
                },
                "config",
            ),
        ];
        for (cfg, label) in cases {
            let got = DnsPublisher::start(cfg.clone(), &Registry::new()).map(|_| ());
            assert_eq!(got.map_err(|e| e.label()), Err(label), "{cfg:?}");
        }
    }

    #[tokio::test]
    async fn a_change_during_a_write_stays_pending() {
        let publisher =
            DnsPublisher::start(config(&["http://127.0.0.1:1"]), &Registry::new()).expect("start");
        let name = LeaseName::new("db").expect("name");
        publisher.publish(
            &name,
            Some(&HolderId::new("eu-1").expect("holder")),
            Epoch(1),
        );
        let server = publisher.shared.servers[0].clone();
        let in_flight: Vec<(LeaseName, Dirty)> = lock(&server.state)
            .dirty
            .iter()
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        // A newer change arrives while the PATCH above is in flight...
        publisher.publish(
            &name,
            Some(&HolderId::new("eu-2").expect("holder")),
            Epoch(2),
        );
        // ...then the server accepts the older one.
        written(&publisher.shared, &server, &in_flight);
        let st = lock(&server.state);
        assert_eq!(st.dirty.get(&name).map(|d| d.state.epoch), Some(Epoch(2)));
        assert_eq!(st.written.get(&name).map(|p| p.epoch), Some(Epoch(1)));
        drop(st);
        // Once written everywhere, the same state is not queued again.
        let in_flight: Vec<(LeaseName, Dirty)> = lock(&server.state)
            .dirty
            .iter()
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        written(&publisher.shared, &server, &in_flight);
        publisher.publish(
            &name,
            Some(&HolderId::new("eu-2").expect("holder")),
            Epoch(2),
        );
        assert_eq!(publisher.pending(), 0);
    }

    #[tokio::test]
    async fn coalesces_and_drops_stale_changes_while_a_server_is_down() {
        // Port 1 on loopback refuses connections: nothing is ever written,
        // so the queue shows what would be sent.
        let publisher =
            DnsPublisher::start(config(&["http://127.0.0.1:1"]), &Registry::new()).expect("start");
        let name = LeaseName::new("continuum/db/app").expect("name");
        let eu1 = HolderId::new("eu-1").expect("holder");
        let eu2 = HolderId::new("eu-2").expect("holder");
        publisher.publish(&name, Some(&eu1), Epoch(1));
        publisher.publish(&name, Some(&eu2), Epoch(2));
        publisher.publish(&name, Some(&eu1), Epoch(1)); // reordered, stale
        publisher.publish(&LeaseName::new("b").expect("name"), None, Epoch(4));
        assert_eq!(publisher.pending(), 2);
        let server = &publisher.shared.servers[0];
        let st = lock(&server.state);
        assert_eq!(
            st.dirty.get(&name).map(|d| d.state.clone()),
            Some(Published {
                holder: Some(eu2),
                epoch: Epoch(2)
            })
        );
    }
}
