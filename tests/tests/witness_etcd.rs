//! The witness's HTTPS API with the etcd store against a real etcd: the same
//! scenarios as `witness_api`, plus two witness processes sharing one etcd
//! (etcd arbitrates) and a witness restart (etcd keeps the state).
//!
//! Needs the binary: `cargo build -p continuum-witness`, and /usr/bin/etcd.

mod witness_cases;

use std::sync::Arc;

use continuum_shared::lease::{Epoch, Response};
use continuum_tests::etcd_proc::EtcdProc;
use continuum_tests::pki::Pki;
use continuum_tests::witness_proc::{WitnessOpts, WitnessProc};
use witness_cases::*;

fn etcd_witness(etcd: &EtcdProc) -> WitnessProc {
    WitnessProc::start(WitnessOpts::etcd(etcd.endpoint(), "/continuum/test/")).unwrap()
}

#[tokio::test]
async fn lease_lifecycle_over_https_on_etcd() {
    let etcd = EtcdProc::start().unwrap();
    lifecycle(&etcd_witness(&etcd)).await;
}

#[tokio::test]
async fn bad_input_and_auth_on_etcd() {
    let etcd = EtcdProc::start().unwrap();
    let w = etcd_witness(&etcd);
    bad_input(&w).await;
    no_client_certificate(&w).await;
    rogue_certificate(&w).await;
}

/// Two witness processes on one etcd prefix behave as one arbiter; the
/// grant survives a restart of both the witness and etcd.
#[tokio::test]
async fn witnesses_sharing_etcd_agree_and_survive_restarts() {
    let mut etcd = EtcdProc::start().unwrap();
    let pki = Arc::new(Pki::generate().unwrap());
    let opts = WitnessOpts::etcd(etcd.endpoint(), "/continuum/shared/").with_pki(pki);
    let mut a = WitnessProc::start(opts.clone()).unwrap();
    let b = WitnessProc::start(opts).unwrap();
    let (ca, cb) = (a.client().unwrap(), b.client().unwrap());
    let lease = "shared/lease";
    let (s, r) = ca.send(&acquire(lease, "eu-1", 5, 20_000)).await.unwrap();
    assert_eq!(
        (s, r),
        (
            200,
            Response::Granted {
                epoch: Epoch(5),
                ttl_ms: 20_000
            }
        )
    );
    let (s, r) = cb.send(&acquire(lease, "us-1", 6, 20_000)).await.unwrap();
    assert_eq!(
        s, 409,
        "the other witness process must see the grant: {r:?}"
    );
    let (s, _) = cb.send(&renew(lease, "eu-1", 5, 20_000)).await.unwrap();
    assert_eq!(s, 200, "the holder may renew through either process");

    a.kill9();
    etcd.restart().unwrap();
    a.restart().unwrap();
    let ca = a.client().unwrap();
    let v = view(&ca, lease).await;
    assert_eq!(v.holder, Some(holder("eu-1")), "etcd kept the live grant");
    assert_eq!(v.max_epoch, Epoch(5));
    let (s, r) = ca.send(&acquire(lease, "us-1", 6, 20_000)).await.unwrap();
    assert_eq!(s, 409, "{r:?}");
    let (s, _) = ca.send(&release(lease, "eu-1", 5)).await.unwrap();
    assert_eq!(s, 200);
    let (s, r) = cb.send(&acquire(lease, "us-1", 5, 20_000)).await.unwrap();
    assert_eq!(
        (s, r),
        (
            409,
            Response::EpochTooLow {
                max_epoch: Epoch(5)
            }
        )
    );
    let (s, _) = cb.send(&acquire(lease, "us-1", 6, 20_000)).await.unwrap();
    assert_eq!(s, 200);
}

/// A grant whose holder stops renewing expires (etcd's lease runs out) and
/// the lease can then be taken over with a higher epoch.
#[tokio::test]
async fn expired_grant_can_be_taken_over_on_etcd() {
    let etcd = EtcdProc::start().unwrap();
    let w = etcd_witness(&etcd);
    let c = w.client().unwrap();
    let lease = "expiry/lease";
    assert_eq!(
        c.send(&acquire(lease, "eu-1", 1, 1000)).await.unwrap().0,
        200
    );
    // A longer renewal moves the holder key to a longer etcd lease.
    let (s, r) = c.send(&renew(lease, "eu-1", 1, 2000)).await.unwrap();
    assert_eq!(
        (s, r),
        (
            200,
            Response::Granted {
                epoch: Epoch(1),
                ttl_ms: 2000
            }
        )
    );
    let (s, r) = c.send(&acquire(lease, "us-1", 2, 1000)).await.unwrap();
    assert_eq!(s, 409, "{r:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (s, r) = c.send(&acquire(lease, "us-1", 2, 1000)).await.unwrap();
        if s == 200 {
            assert_eq!(
                r,
                Response::Granted {
                    epoch: Epoch(2),
                    ttl_ms: 1000
                }
            );
            break;
        }
        assert!(matches!(r, Response::Held { .. }), "{r:?}");
        assert!(std::time::Instant::now() < deadline, "grant never expired");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let (s, r) = c.send(&renew(lease, "eu-1", 1, 1000)).await.unwrap();
    assert_eq!(
        s, 409,
        "the former holder cannot renew after a takeover: {r:?}"
    );
}
