//! Command-line configuration of `continuum-witness serve`.
//!
//! Every flag has a `CONTINUUM_WITNESS_*` environment fallback. Other
//! transports (DNS publication, the WireGuard link) add their flags here.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Which store keeps the leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// A redb file in `--data-dir` (fsync on grants, releases and metadata).
    Embedded,
    /// An existing etcd cluster (etcd then arbitrates; several witnesses may share it).
    Etcd,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Arguments of `continuum-witness serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address of the HTTPS lease API (POST /v1/lease; client certificates required).
    #[arg(
        long,
        env = "CONTINUUM_WITNESS_API_LISTEN",
        default_value = "0.0.0.0:7443"
    )]
    pub api_listen: SocketAddr,
    /// Address of the plain HTTP port for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "CONTINUUM_WITNESS_HEALTH_LISTEN",
        default_value = "0.0.0.0:7080"
    )]
    pub health_listen: SocketAddr,
    /// PEM file with the server certificate chain of the HTTPS API.
    #[arg(long, env = "CONTINUUM_WITNESS_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM file with the private key of `--tls-cert`.
    #[arg(long, env = "CONTINUUM_WITNESS_TLS_KEY")]
    pub tls_key: PathBuf,
    /// PEM file with the CA certificate(s) that sign accepted client certificates.
    #[arg(long, env = "CONTINUUM_WITNESS_CLIENT_CA")]
    pub client_ca: PathBuf,
    /// Where leases are kept.
    #[arg(
        long,
        value_enum,
        env = "CONTINUUM_WITNESS_STORE",
        default_value = "embedded"
    )]
    pub store: StoreKind,
    /// Directory of the embedded store's file (created if missing).
    #[arg(
        long,
        env = "CONTINUUM_WITNESS_DATA_DIR",
        default_value = "/var/lib/continuum-witness"
    )]
    pub data_dir: PathBuf,
    /// etcd client URLs, comma-separated (store = etcd).
    #[arg(
        long,
        env = "CONTINUUM_WITNESS_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix under which the etcd store keeps its leases.
    #[arg(
        long,
        env = "CONTINUUM_WITNESS_ETCD_PREFIX",
        default_value = "/continuum/witness/"
    )]
    pub etcd_prefix: String,
    /// Log line format.
    #[arg(
        long,
        value_enum,
        env = "CONTINUUM_WITNESS_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// YAML link config (key file, UDP listen address, virtual IP, peers):
    /// also serve the lease API over the WireGuard control link. See
    /// docs/control-link.md.
    #[arg(long, env = "CONTINUUM_WITNESS_LINK_CONFIG")]
    pub link_config: Option<PathBuf>,
    /// DNS publication of lease holders to PowerDNS (`--pdns-*`).
    #[command(flatten)]
    pub dns: crate::dns_publish::DnsArgs,
}

/// Name of the test-only switch that disables the restart rule.
pub const UNSAFE_SKIP_RESTART_RULE_ENV: &str = "CONTINUUM_TEST_UNSAFE_SKIP_RESTART_RULE";

/// Whether the restart rule (see `arbiter`) applies. Always true in release
/// builds; a debug build honours `CONTINUUM_TEST_UNSAFE_SKIP_RESTART_RULE=1`
/// so that the checker test can prove it catches the rule's absence.
pub fn restart_rule_enabled() -> bool {
    #[cfg(debug_assertions)]
    {
        if std::env::var(UNSAFE_SKIP_RESTART_RULE_ENV).as_deref() == Ok("1") {
            return false;
        }
    }
    true
}
