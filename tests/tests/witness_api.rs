//! The witness's HTTPS API with the embedded store: lease lifecycle, bad
//! input, client-certificate authentication, health port, bad config.
//!
//! Needs the binary: `cargo build -p continuum-witness`.

mod witness_cases;

use continuum_tests::witness_proc::{http_get, witness_bin, WitnessOpts, WitnessProc};
use witness_cases::*;

fn witness() -> WitnessProc {
    WitnessProc::start(WitnessOpts::default()).unwrap()
}

#[tokio::test]
async fn lease_lifecycle_over_https() {
    lifecycle(&witness()).await;
}

#[tokio::test]
async fn bad_input_gets_4xx_naming_the_problem_and_changes_nothing() {
    bad_input(&witness()).await;
}

#[tokio::test]
async fn no_client_certificate_gets_401_and_changes_nothing() {
    no_client_certificate(&witness()).await;
}

#[tokio::test]
async fn rogue_client_certificate_fails_the_handshake() {
    rogue_certificate(&witness()).await;
}

#[tokio::test]
async fn health_port_serves_metrics_healthz_readyz() {
    let w = witness();
    let c = w.client().unwrap();
    assert_eq!(
        c.send(&acquire("m/one", "eu-1", 7, 5000)).await.unwrap().0,
        200
    );
    assert_eq!(
        c.send(&acquire("m/one", "us-1", 8, 5000)).await.unwrap().0,
        409
    );
    assert_eq!(http_get(w.health_addr(), "/healthz").unwrap().0, 200);
    assert_eq!(http_get(w.health_addr(), "/readyz").unwrap().0, 200);
    assert_eq!(http_get(w.health_addr(), "/nope").unwrap().0, 404);
    let m = w.metrics().unwrap();
    for needle in [
        r#"continuum_witness_requests_total{op="acquire",outcome="granted"} 1"#,
        r#"continuum_witness_requests_total{op="acquire",outcome="held"} 1"#,
        "continuum_witness_grants_total 1",
        r#"continuum_witness_lease_epoch{lease="m/one"} 7"#,
        "continuum_witness_request_duration_seconds_bucket",
    ] {
        assert!(m.contains(needle), "/metrics lacks {needle}:\n{m}");
    }
}

#[test]
fn bad_config_exits_non_zero_with_a_clear_message() {
    let bin = witness_bin().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.crt");
    let out = std::process::Command::new(&bin)
        .args([
            "serve",
            "--api-listen=127.0.0.1:0",
            "--health-listen=127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(&missing)
        .arg("--tls-key")
        .arg(&missing)
        .arg("--client-ca")
        .arg(&missing)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing.crt"),
        "stderr should name the file: {err}"
    );
    let out = std::process::Command::new(&bin)
        .args(["serve", "--store=zookeeper"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("zookeeper"));
}
