//! A region's Kubernetes objects for the Continuum controller, in a test API
//! server: the Continuum and CNPG Cluster kinds, the witness TLS Secret, CNPG
//! Clusters and Continuums. Shared by tests/tests/continuum_controller.rs
//! and `bench continuum`.

use anyhow::Context;
use continuum_agent::continuum::cnpg;
use continuum_testapi::{ResourceSpec, TestApi};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use crate::pki::Pki;

/// API group of the Continuum resource.
pub const GROUP: &str = "dr.openova.io";

pub fn continuum_ar() -> kube::core::ApiResource {
    kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk(GROUP, "v1", "Continuum"),
        "continuums",
    )
}

/// Serves Continuums and CNPG Clusters (namespaced, with status).
pub fn register_kinds(api: &TestApi) {
    api.register(ResourceSpec::new(
        GROUP,
        "v1",
        "continuums",
        "Continuum",
        true,
        true,
    ));
    api.register(ResourceSpec::new(
        cnpg::GROUP,
        cnpg::VERSION,
        cnpg::PLURAL,
        cnpg::KIND,
        true,
        true,
    ));
}

/// Secret `witness-tls` with the witnesses' CA and the agents' client
/// certificate (`spec.witnesses.tlsSecretRef`).
pub async fn put_witness_tls(admin: &kube::Client, ns: &str, pki: &Pki) -> anyhow::Result<()> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "witness-tls", "namespace": ns},
                "data": {"ca.crt": b64(&pki.ca_pem), "tls.crt": b64(&pki.client.cert_pem), "tls.key": b64(&pki.client.key_pem)},
            }))?,
        )
        .await
        .context("create witness-tls")?;
    Ok(())
}

/// CNPG Cluster `name` with `spec`, its primary instance `<name>-1`.
pub async fn create_cluster(
    admin: &kube::Client,
    ns: &str,
    name: &str,
    spec: Value,
) -> anyhow::Result<()> {
    let clusters = cnpg::cluster_api(admin.clone(), ns);
    clusters
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster",
                "metadata": {"name": name, "namespace": ns},
                "spec": spec,
            }))?,
        )
        .await
        .with_context(|| format!("create Cluster {name}"))?;
    clusters
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"status": {"currentPrimary": format!("{name}-1"), "instances": 3}}),
            ),
        )
        .await
        .with_context(|| format!("status of Cluster {name}"))?;
    Ok(())
}

/// Continuum `name` with `spec`.
pub async fn create_continuum(
    admin: &kube::Client,
    ns: &str,
    name: &str,
    spec: &Value,
) -> anyhow::Result<()> {
    let cts: Api<DynamicObject> = Api::namespaced_with(admin.clone(), ns, &continuum_ar());
    cts.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "dr.openova.io/v1", "kind": "Continuum",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))?,
    )
    .await
    .with_context(|| format!("create Continuum {name}"))?;
    Ok(())
}
