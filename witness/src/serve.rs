//! `continuum-witness serve`: builds the store and the witness, then runs
//! the HTTPS API and the health port until SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{restart_rule_enabled, ServeArgs, StoreKind};
use crate::metrics::Metrics;
use crate::service::Witness;
use crate::store::{EmbeddedStore, EtcdStore, Store};

/// Opens the configured store.
pub async fn open_store(args: &ServeArgs) -> anyhow::Result<Store> {
    Ok(match args.store {
        StoreKind::Embedded => Store::Embedded(
            EmbeddedStore::open(&args.data_dir, restart_rule_enabled()).with_context(|| {
                format!(
                    "cannot open the embedded store in {}",
                    args.data_dir.display()
                )
            })?,
        ),
        StoreKind::Etcd => {
            if args.etcd_endpoints.is_empty() {
                anyhow::bail!("--store etcd needs --etcd-endpoints");
            }
            Store::Etcd(Box::new(
                EtcdStore::connect(&args.etcd_endpoints, &args.etcd_prefix)
                    .await
                    .with_context(|| {
                        format!("cannot connect to etcd at {:?}", args.etcd_endpoints)
                    })?,
            ))
        }
    })
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let tls = crate::tls::server_config(&args.tls_cert, &args.tls_key, &args.client_ca)
        .context("bad TLS configuration")?;
    let metrics = Arc::new(Metrics::new().context("cannot register metrics")?);
    let store = open_store(&args).await?;
    let witness = Witness::new(store, metrics);
    // Observers of holder/epoch changes (DNS publication) attach here with
    // `witness.with_change_sink(..)` and spawn their task.
    let (witness, _dns_publisher) = crate::dns_publish::attach(&args.dns, witness)
        .context("bad DNS publication settings (--pdns-*)")?;
    let api = TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("cannot listen on --api-listen {}", args.api_listen))?;
    let health = TcpListener::bind(args.health_listen)
        .await
        .with_context(|| format!("cannot listen on --health-listen {}", args.health_listen))?;
    tracing::info!(
        api = %api.local_addr()?,
        health = %health.local_addr()?,
        store = witness.store_kind(),
        "witness serving: HTTPS lease API on `api`, /metrics /healthz /readyz on `health`"
    );
    // The lease API over the control link (same Witness::handle as HTTPS).
    let _link = match &args.link_config {
        Some(path) => Some(serve_link(path, &witness).await?),
        None => None,
    };
    tokio::select! {
        r = crate::https::serve_api(api, tls, witness.clone()) => r.context("API server stopped")?,
        r = crate::health::serve_health(health, witness.clone()) => r.context("health server stopped")?,
        _ = shutdown_signal() => tracing::info!("signal received; witness stopping"),
    }
    Ok(())
}

/// Binds the link endpoint of `--link-config` and spawns `link_api::serve`.
/// The returned endpoint must live as long as the witness serves.
async fn serve_link(
    path: &std::path::Path,
    witness: &Arc<Witness>,
) -> anyhow::Result<Arc<continuum_shared::link::LinkEndpoint>> {
    use continuum_shared::link::{config::LinkConfigFile, LinkEndpoint};
    let file = LinkConfigFile::load(path)?;
    let (endpoint, inbound) = LinkEndpoint::bind(file.link.clone(), witness.metrics().registry())
        .await
        .with_context(|| format!("cannot start the link of --link-config {}", path.display()))?;
    let endpoint = Arc::new(endpoint);
    tracing::info!(listen = %endpoint.local_addr(), virtual_ip = %file.link.virtual_ip,
        peers = file.link.peers.len(), "witness serving the lease API over the control link");
    tokio::spawn(crate::link_api::serve(
        witness.clone(),
        endpoint.clone(),
        inbound,
    ));
    Ok(endpoint)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
