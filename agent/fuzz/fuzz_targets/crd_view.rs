//! Fuzz the CRD views the Flux guard builds from YAML/JSON it did not write
//! (chart `crds/` and `templates/` files, live CRDs, Helm release manifests):
//! any text either gives CRD views whose storage version is consistent, or
//! errors; never a panic.
#![no_main]

use continuum_agent::flux_guard::{chart, crd, release};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // As a chart template (rendered without values) and as a plain document.
    for doc in [chart::render_without_values(text), text.to_string()] {
        for d in serde_yaml_check::Deserializer::from_str(&doc).take(64) {
            let Ok(v) = serde_json::Value::deserialize(d) else {
                break;
            };
            if let Ok(c) = crd::parse(&v) {
                assert!(crd::is_crd(&v));
                assert!(!c.name.is_empty());
                let storage = c.versions.iter().filter(|v| v.storage).count();
                assert_eq!(c.storage_version().is_some(), storage == 1);
            }
        }
    }
    // As the `manifest` of a Helm release: CRD names only, bounded by the text.
    let names = release::manifest_crds(text);
    assert!(names.len() <= text.matches("CustomResourceDefinition").count());
});
