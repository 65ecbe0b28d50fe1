//! Fuzz the registry pivot renderer's input: any mirror map text either renders
//! YAML that parses back with the k3s top-level keys, or is rejected with an
//! error; it never panics. Rendering is deterministic.
#![no_main]

use std::collections::BTreeMap;

use continuum_agent::node_pivot::render::{render_text, HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let secrets: BTreeMap<String, String> = [("username", "u"), ("password", "p"), ("token", "t")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(out) = render_text(text, &secrets) {
        assert!(out.starts_with(HEADER));
        let v: serde_yaml_check::Value =
            serde_yaml_check::from_str(&out).expect("rendered YAML parses");
        assert!(v.get("mirrors").is_some());
        assert_eq!(
            render_text(text, &secrets).ok().as_deref(),
            Some(out.as_str())
        );
    }
});
