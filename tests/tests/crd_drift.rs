//! manifests/crds/continuum.yaml must be exactly what the Rust types generate.

use std::path::PathBuf;

#[test]
fn continuum_crd_yaml_matches_the_rust_types() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds/continuum.yaml");
    let generated = continuum_agent::continuum::crd::crd_yaml().expect("generate CRD");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{} is out of date with agent/src/continuum/crd.rs; regenerate it with:\n  \
         cargo run -q -p continuum-agent -- crds > manifests/crds/continuum.yaml",
        path.display()
    );
    use kube::CustomResourceExt;
    let crd = continuum_agent::continuum::crd::Continuum::crd();
    assert_eq!(crd.spec.group, "dr.openova.io");
    assert!(crd
        .spec
        .versions
        .iter()
        .any(|v| v.subresources.as_ref().is_some_and(|s| s.status.is_some())));
}
