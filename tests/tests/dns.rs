//! DNS publication against three real PowerDNS servers: the witness's
//! publisher writes, the shared hickory reader reads back from each
//! authoritative server and reports the majority.

use std::time::Duration;

use continuum_shared::dns::{DnsReader, DnsReport, Published, ServerAnswer};
use continuum_shared::lease::{Epoch, HolderId, LeaseName};
use continuum_tests::pdns_proc::PdnsProc;
use continuum_witness::dns_publish::{DnsPublisher, PublisherConfig};

const ZONE: &str = "lease.test";

fn holder(s: &str) -> HolderId {
    HolderId::new(s).expect("holder")
}

fn lease(s: &str) -> LeaseName {
    LeaseName::new(s).expect("lease name")
}

fn published(h: Option<&str>, epoch: u64) -> ServerAnswer {
    ServerAnswer::Published(Published {
        holder: h.map(holder),
        epoch: Epoch(epoch),
    })
}

fn three_servers() -> Vec<PdnsProc> {
    (0..3)
        .map(|_| PdnsProc::start(ZONE).expect("start PowerDNS"))
        .collect()
}

/// One publisher writing to every server, as the witness runs it.
fn publisher_for(servers: &[PdnsProc]) -> (DnsPublisher, prometheus::Registry) {
    let cfg = PublisherConfig::new(
        servers.iter().map(PdnsProc::api_url).collect(),
        servers[0].api_key().to_string(),
        ZONE.to_string(),
    );
    let registry = prometheus::Registry::new();
    let publisher = DnsPublisher::start(cfg, &registry).expect("publisher");
    (publisher, registry)
}

/// Sum of `continuum_witness_dns_publishes_total` with the given outcome.
fn publishes(registry: &prometheus::Registry, outcome: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "continuum_witness_dns_publishes_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "outcome" && l.value() == outcome)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn reader_for(servers: &[PdnsProc]) -> DnsReader {
    let addrs: Vec<_> = servers.iter().map(PdnsProc::dns_addr).collect();
    DnsReader::new(&addrs, ZONE, Duration::from_millis(500)).expect("reader")
}

/// Reads until `done` holds (bounded: about 20 s), returning the last report.
async fn read_until(
    reader: &DnsReader,
    name: &LeaseName,
    done: impl Fn(&DnsReport) -> bool,
) -> DnsReport {
    let mut last = None;
    for _ in 0..200 {
        let report = reader.read(name).await;
        if done(&report) {
            return report;
        }
        last = Some(report);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("DNS never reached the expected state; last report: {last:?}");
}

fn all_say(report: &DnsReport, want: &ServerAnswer) -> bool {
    report.answers.iter().all(|(_, a)| a == want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_to_every_server_and_changes_propagate() {
    let servers = three_servers();
    let (publisher, registry) = publisher_for(&servers);
    let reader = reader_for(&servers);
    let publish = |name: &LeaseName, h: Option<&str>, epoch: u64| {
        publisher.publish(name, h.map(holder).as_ref(), Epoch(epoch));
    };

    // Names that exercise the mapping: plain, escaped, and hashed (too long).
    let long = format!("continuum/{}", "x".repeat(70));
    for name in ["continuum/db/app", "continuum/db.main/x_y", long.as_str()] {
        let name = lease(name);
        // Nothing published yet: every server answers, without a record.
        let report = reader.read(&name).await;
        assert!(all_say(&report, &ServerAnswer::Absent), "{report:?}");
        assert_eq!(report.majority, None);

        publish(&name, Some("eu-1"), 1);
        let report = read_until(&reader, &name, |r| all_say(r, &published(Some("eu-1"), 1))).await;
        let view = report.majority.expect("majority");
        assert_eq!(
            (view.holder, view.epoch, view.agreeing, view.total),
            (Some(holder("eu-1")), Epoch(1), 3, 3)
        );

        // Holder change with an epoch bump.
        publish(&name, Some("eu-2"), 2);
        read_until(&reader, &name, |r| all_say(r, &published(Some("eu-2"), 2))).await;
        // Epoch bump for the same holder (re-acquired).
        publish(&name, Some("eu-2"), 3);
        read_until(&reader, &name, |r| all_say(r, &published(Some("eu-2"), 3))).await;
        // Released: empty holder, epoch of the last grant.
        publish(&name, None, 3);
        let report = read_until(&reader, &name, |r| all_say(r, &published(None, 3))).await;
        let view = report.majority.expect("majority");
        assert_eq!(
            (view.holder, view.epoch, view.agreeing),
            (None, Epoch(3), 3)
        );
        // A stale change (reordered delivery) never overwrites a newer one.
        publish(&name, Some("eu-1"), 1);
        publish(&name, Some("eu-3"), 4);
        read_until(&reader, &name, |r| all_say(r, &published(Some("eu-3"), 4))).await;
    }
    assert_eq!(publisher.pending(), 0);
    assert!(
        publishes(&registry, "ok") >= 3 * 3 * 5,
        "every change written to every server"
    );
    assert_eq!(publishes(&registry, "unreachable"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn majority_survives_a_stopped_or_stale_server_and_is_never_false() {
    let mut servers = three_servers();
    let reader = reader_for(&servers);
    let name = lease("continuum/db/app");
    let record = format!("app.db.continuum.{ZONE}.");
    let (publisher, registry) = publisher_for(&servers);
    let publish = |h: Option<&str>, epoch: u64| {
        publisher.publish(&name, h.map(holder).as_ref(), Epoch(epoch));
    };
    publish(Some("eu-1"), 4);
    read_until(&reader, &name, |r| all_say(r, &published(Some("eu-1"), 4))).await;

    // One server down during a failover: the other two carry the majority.
    servers[2].stop();
    publish(Some("eu-2"), 5);
    let report = read_until(&reader, &name, |r| {
        r.answers[..2]
            .iter()
            .all(|(_, a)| *a == published(Some("eu-2"), 5))
    })
    .await;
    assert_eq!(report.answers[2].1.label(), "unreachable", "{report:?}");
    let view = report.majority.expect("majority of 2 out of 3");
    assert_eq!(
        (view.holder, view.epoch, view.agreeing, view.total),
        (Some(holder("eu-2")), Epoch(5), 2, 3)
    );

    // It comes back with its old copy (stale): the majority is still right,
    // and the publisher's retries bring it up to date.
    read_until(&reader, &name, |_| publishes(&registry, "unreachable") > 0).await;
    servers[2].restart().expect("restart PowerDNS");
    let report = reader.read(&name).await;
    let view = report
        .majority
        .clone()
        .expect("majority with a stale server");
    assert_eq!(
        (view.holder.clone(), view.epoch),
        (Some(holder("eu-2")), Epoch(5)),
        "{report:?}"
    );
    read_until(&reader, &name, |r| all_say(r, &published(Some("eu-2"), 5))).await;

    // A stale record planted on one server: majority still right.
    servers[1]
        .set_txt(&record, "\"holder=eu-1 epoch=4\"")
        .expect("plant");
    let report = read_until(&reader, &name, |r| {
        r.answers[1].1 == published(Some("eu-1"), 4)
    })
    .await;
    let view = report.majority.expect("2 of 3 agree");
    assert_eq!(
        (view.holder, view.epoch, view.agreeing),
        (Some(holder("eu-2")), Epoch(5), 2)
    );

    // Two of three disagree with the first: no false majority.
    servers[2]
        .set_txt(&record, "\"holder=eu-3 epoch=6\"")
        .expect("plant");
    let report = read_until(&reader, &name, |r| {
        r.answers[2].1 == published(Some("eu-3"), 6)
    })
    .await;
    assert_eq!(report.majority, None, "{report:?}");

    // Malformed and duplicate records are invalid answers, never votes.
    servers[2]
        .set_txt(&record, "\"holder=eu-2 epoch=5 extra=1\"")
        .expect("plant");
    let report = read_until(&reader, &name, |r| r.answers[2].1.label() == "invalid").await;
    assert_eq!(report.majority, None, "{report:?}");
    assert_eq!(report.count("invalid"), 1);
    servers[1].stop();
    let report = read_until(&reader, &name, |r| r.answers[1].1.label() == "unreachable").await;
    assert_eq!(
        report.majority, None,
        "1 good answer of 3 is no majority: {report:?}"
    );
}

/// End to end: a witness process started with `--pdns-*` publishes what it
/// grants, releases and lets expire; a restarted witness republishes
/// everything it knows. Needs the binary: `cargo build -p continuum-witness`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_publishes_grants_releases_and_expiry() {
    use continuum_shared::lease::{Acquire, Release, Request, Response};
    use continuum_tests::witness_proc::{WitnessOpts, WitnessProc};

    let servers = three_servers();
    let reader = reader_for(&servers);
    let mut args: Vec<String> = servers
        .iter()
        .map(|s| format!("--pdns-api-url={}", s.api_url()))
        .collect();
    args.push(format!("--pdns-api-key={}", servers[0].api_key()));
    args.push(format!("--pdns-zone={ZONE}"));
    args.push("--pdns-snapshot-interval=1".to_string());
    let mut witness = WitnessProc::start(WitnessOpts {
        extra_args: args,
        ..WitnessOpts::default()
    })
    .expect("start witness");
    let client = witness.client().expect("client");
    let name = lease("continuum/db/app");
    let acquire = |h: &str, epoch: u64, ttl_ms: u64| {
        Request::Acquire(Acquire {
            name: name.clone(),
            holder: holder(h),
            epoch: Epoch(epoch),
            ttl_ms,
        })
    };

    let (status, resp) = client
        .send(&acquire("eu-1", 1, 60_000))
        .await
        .expect("acquire");
    assert_eq!(status, 200, "{resp:?}");
    let report = read_until(&reader, &name, |r| all_say(r, &published(Some("eu-1"), 1))).await;
    assert_eq!(report.majority.map(|v| v.agreeing), Some(3));

    let release = Request::Release(Release {
        name: name.clone(),
        holder: holder("eu-1"),
        epoch: Epoch(1),
    });
    let (status, resp) = client.send(&release).await.expect("release");
    assert_eq!((status, resp), (200, Response::Released));
    read_until(&reader, &name, |r| all_say(r, &published(None, 1))).await;

    // A short grant that nobody renews: the witness's periodic snapshot
    // publishes the lease as free once it has expired.
    let (status, _) = client
        .send(&acquire("eu-2", 2, 500))
        .await
        .expect("acquire");
    assert_eq!(status, 200);
    read_until(&reader, &name, |r| all_say(r, &published(Some("eu-2"), 2))).await;
    read_until(&reader, &name, |r| all_say(r, &published(None, 2))).await;

    // While the witness is down, one server gets a stale record; the
    // restarted witness republishes every lease it knows.
    let (status, _) = client
        .send(&acquire("us-1", 3, 60_000))
        .await
        .expect("acquire");
    assert_eq!(status, 200);
    read_until(&reader, &name, |r| all_say(r, &published(Some("us-1"), 3))).await;
    witness.kill9();
    servers[0]
        .set_txt(
            &format!("app.db.continuum.{ZONE}."),
            "\"holder=eu-1 epoch=1\"",
        )
        .expect("plant");
    read_until(&reader, &name, |r| {
        r.answers[0].1 == published(Some("eu-1"), 1)
    })
    .await;
    witness.restart().expect("restart witness");
    read_until(&reader, &name, |r| all_say(r, &published(Some("us-1"), 3))).await;

    let metrics = witness.metrics().expect("metrics");
    let ok_servers = metrics
        .lines()
        .filter(|l| {
            l.starts_with("continuum_witness_dns_publishes_total{") && l.contains("outcome=\"ok\"")
        })
        .filter(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v >= 1.0)
        })
        .count();
    assert_eq!(ok_servers, 3, "one ok series per server:\n{metrics}");
    assert!(
        metrics.contains("continuum_witness_dns_publish_lag_seconds_bucket"),
        "{metrics}"
    );
}
