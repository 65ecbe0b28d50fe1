//! The lease-history checker against witnesses that keep their leases in a
//! real etcd (`--store etcd`): contenders fight over one lease through the
//! quorum client while witnesses are killed and restarted, messages are
//! delayed and dropped, and etcd itself is killed -9 and restarted once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use continuum_tests::checker::harness::*;
use continuum_tests::etcd_proc::EtcdProc;
use continuum_tests::faults::Crashable;
use continuum_tests::witness_proc::WitnessOpts;
use tokio::time::sleep;

async fn etcd_run(n: usize) {
    let etcd = tokio::task::spawn_blocking(EtcdProc::start)
        .await
        .unwrap()
        .unwrap();
    let endpoint = etcd.endpoint();
    // Each witness arbitrates alone under its own prefix, as three witnesses
    // with three separate etcd clusters would.
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (pki, ws) = witnesses(n, move |pki| {
        let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        WitnessOpts::etcd(endpoint.clone(), format!("/checker/w{i}/")).with_pki(pki)
    })
    .await;
    let urls: Vec<String> = ws.iter().map(|w| w.lock().unwrap().api_url()).collect();
    let mut crash: Vec<_> = ws.iter().map(|w| witness_crash(Arc::clone(w))).collect();

    // kill -9 etcd once, a third of the way in, and bring it back.
    let etcd = Arc::new(Mutex::new(etcd));
    let mut etcd_crash = ProcCrash(Arc::clone(&etcd), EtcdProc::kill9, EtcdProc::restart);
    let run_for = Duration::from_secs(15);
    let etcd_killer = tokio::spawn(async move {
        sleep(run_for / 3).await;
        etcd_crash.kill9()?;
        sleep(Duration::from_millis(700)).await;
        etcd_crash.restart().await?;
        anyhow::Ok(())
    });
    let r = run(
        &pki,
        &urls,
        &mut crash,
        Duration::from_millis(1000),
        run_for,
        (Duration::from_millis(2000), Duration::from_millis(4000)),
    )
    .await;
    etcd_killer.await.unwrap().unwrap();
    assert_clean(
        &format!("etcd-store witness x{n}"),
        &r.history,
        &r.counts,
        r.kills,
        r.dropped,
    );
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_etcd_witness_with_kill9_and_faults() {
    etcd_run(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_etcd_witnesses_with_kill9_and_faults() {
    etcd_run(3).await;
}
