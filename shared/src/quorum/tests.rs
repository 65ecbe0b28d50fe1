use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::model::ModelWitness;
use super::*;
use crate::lease::{LeaseMeta, LeaseView};
use crate::transport::BoxFuture;

fn name() -> LeaseName {
    LeaseName::new("continuum/db/app").unwrap()
}
fn h(s: &str) -> HolderId {
    HolderId::new(s).unwrap()
}

fn reply(w: usize, r: Response) -> Reply {
    Reply {
        witness: w,
        result: Ok(r),
    }
}
fn lost(w: usize) -> Reply {
    Reply {
        witness: w,
        result: Err(TransportError::Dropped),
    }
}
fn granted(e: u64) -> Response {
    Response::Granted {
        epoch: Epoch(e),
        ttl_ms: 1000,
    }
}
fn held(holder: &str, e: u64) -> Response {
    Response::Held {
        holder: h(holder),
        epoch: Epoch(e),
        remaining_ms: 500,
    }
}
fn too_low(e: u64) -> Response {
    Response::EpochTooLow {
        max_epoch: Epoch(e),
    }
}

#[test]
fn acquire_decisions() {
    type Case = (&'static str, usize, Vec<Reply>, bool, &'static str);
    let cases: Vec<Case> = vec![
        (
            "single witness grants",
            1,
            vec![reply(0, granted(5))],
            false,
            "won",
        ),
        (
            "two of three grant",
            3,
            vec![reply(0, granted(5)), reply(1, granted(5)), lost(2)],
            false,
            "won",
        ),
        (
            "one of three grants, others lost",
            3,
            vec![reply(0, granted(5)), lost(1), lost(2)],
            false,
            "unreachable",
        ),
        (
            "epoch too low at a majority: retry",
            3,
            vec![
                reply(0, granted(5)),
                reply(1, too_low(9)),
                reply(2, too_low(7)),
            ],
            false,
            "retry:10",
        ),
        (
            "epoch too low, last round",
            3,
            vec![
                reply(0, granted(5)),
                reply(1, too_low(9)),
                reply(2, too_low(7)),
            ],
            true,
            "no_majority",
        ),
        (
            "held by another at a majority",
            3,
            vec![
                reply(0, held("b", 4)),
                reply(1, held("b", 4)),
                reply(2, granted(5)),
            ],
            false,
            "held",
        ),
        (
            "held at one, too low at one: cannot win",
            3,
            vec![
                reply(0, held("b", 4)),
                reply(1, too_low(6)),
                reply(2, granted(5)),
            ],
            false,
            "retry:7",
        ),
        (
            "our own stale grant: release and retry",
            3,
            vec![reply(0, held("a", 3)), reply(1, granted(5)), lost(2)],
            false,
            "retry:6",
        ),
        (
            "grant of a different epoch does not count",
            1,
            vec![reply(0, granted(4))],
            false,
            "no_majority",
        ),
        (
            "witness error",
            1,
            vec![reply(
                0,
                Response::Error {
                    code: "recovering".into(),
                    message: String::new(),
                },
            )],
            false,
            "no_majority",
        ),
    ];
    for (what, total, replies, last, want) in cases {
        let t = tally(Epoch(5), &replies);
        let got = match decide_acquire(&name(), &h("a"), Epoch(5), total, &t, last) {
            AcquireStep::Won => "won".to_string(),
            AcquireStep::Retry { next, .. } => format!("retry:{next}"),
            AcquireStep::GiveUp { error, release } => {
                // Every grant we got at the proposed epoch is released.
                for w in &t.granted {
                    assert!(
                        release.contains(&(*w, Epoch(5))),
                        "{what}: grant at w{w} not released"
                    );
                }
                error.label().to_string()
            }
        };
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn stale_own_grants_are_released_before_retrying() {
    let replies = vec![reply(0, held("a", 3)), reply(1, granted(5)), lost(2)];
    let t = tally(Epoch(5), &replies);
    let AcquireStep::Retry { release, next } =
        decide_acquire(&name(), &h("a"), Epoch(5), 3, &t, false)
    else {
        panic!("expected a retry");
    };
    assert_eq!(next, Epoch(6));
    assert!(release.contains(&(0, Epoch(3))));
    assert!(release.contains(&(1, Epoch(5))));
}

#[test]
fn deadline_starts_at_send_and_is_shortened_by_drift_and_margin() {
    let cfg = QuorumConfig {
        max_drift: 0.01,
        margin: Duration::from_millis(100),
        ..Default::default()
    };
    let sent = Instant::now();
    let replied = sent + Duration::from_millis(300);
    let ttl = Duration::from_secs(10);
    let d = conservative_deadline(&cfg, sent, replied, ttl);
    assert_eq!(d, sent + Duration::from_millis(9_900 - 100));
    // The unsafe switch counts from the reply, with the full TTL.
    let unsafe_cfg = QuorumConfig {
        unsafe_deadline_from_reply: true,
        ..cfg.clone()
    };
    assert_eq!(
        conservative_deadline(&unsafe_cfg, sent, replied, ttl),
        replied + ttl
    );
}

#[test]
fn config_validation() {
    let ok = QuorumConfig::default();
    assert!(ok.validate(Duration::from_secs(5)).is_ok());
    // 200 ms margin eats more than half of a 300 ms TTL.
    assert_eq!(
        ok.validate(Duration::from_millis(300)).unwrap_err().label(),
        "config"
    );
    let drift = QuorumConfig {
        max_drift: 0.7,
        ..Default::default()
    };
    assert!(drift.validate(Duration::from_secs(5)).is_err());
}

fn view(holder: Option<&str>, epoch: u64, meta: Option<(u64, u64)>) -> LeaseView {
    LeaseView {
        name: name(),
        holder: holder.map(h),
        epoch: Epoch(epoch),
        max_epoch: Epoch(epoch),
        remaining_ms: holder.map(|_| 100),
        meta: meta.map(|(_, seq)| LeaseMeta {
            sync_standby: Some(h("b")),
            confirmed_lsn: Some(seq * 10),
            seq,
            ..Default::default()
        }),
        meta_epoch: Epoch(meta.map_or(0, |(e, _)| e)),
    }
}

#[test]
fn majority_view() {
    let v = combine_views(
        3,
        &[
            view(Some("a"), 4, Some((4, 2))),
            view(Some("a"), 4, Some((4, 3))),
        ],
    )
    .unwrap();
    assert_eq!(v.holder, Some((h("a"), Epoch(4))));
    assert!(!v.expired_at_majority);
    assert_eq!(
        v.meta.as_ref().map(|(e, m)| (*e, m.seq)),
        Some((Epoch(4), 3))
    );

    let v = combine_views(
        3,
        &[
            view(None, 4, Some((3, 9))),
            view(None, 5, Some((4, 1))),
            view(Some("a"), 4, None),
        ],
    )
    .unwrap();
    assert_eq!(v.holder, None);
    assert!(v.expired_at_majority);
    assert_eq!(v.max_epoch, Epoch(5));
    // (epoch, seq) order: a later epoch beats a higher seq.
    assert_eq!(
        v.meta.as_ref().map(|(e, m)| (*e, m.seq)),
        Some((Epoch(4), 1))
    );

    assert!(combine_views(3, &[view(None, 1, None)]).is_none());
}

fn cfg() -> QuorumConfig {
    QuorumConfig {
        margin: Duration::from_millis(50),
        ..Default::default()
    }
}

fn models(n: usize) -> (Vec<Arc<ModelWitness>>, Vec<Arc<dyn LeaseTransport>>) {
    let ws: Vec<Arc<ModelWitness>> = (0..n)
        .map(|i| Arc::new(ModelWitness::new(i, Duration::from_secs(600))))
        .collect();
    let ts = ws
        .iter()
        .map(|w| Arc::clone(w) as Arc<dyn LeaseTransport>)
        .collect();
    (ws, ts)
}

/// A witness that never answers.
struct Dead;
impl LeaseTransport for Dead {
    fn call<'a>(&'a self, _req: &'a Request) -> BoxFuture<'a, Result<Response, TransportError>> {
        Box::pin(async { Err(TransportError::Connect("refused".into())) })
    }
    fn endpoint(&self) -> String {
        "dead://".into()
    }
}

const TTL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn one_holder_at_a_time_and_epochs_increase() {
    let (_ws, ts) = models(3);
    let a = QuorumClient::new(ts.clone(), cfg()).unwrap();
    let b = QuorumClient::new(ts, cfg()).unwrap();
    let ga = a.acquire(&name(), &h("a"), TTL).await.unwrap();
    assert_eq!(ga.epoch, Epoch(1));
    assert!(ga.granted_by >= 2, "a majority granted");
    assert!(ga.sent_at <= ga.granted_at && ga.deadline > ga.sent_at);
    let err = b.acquire(&name(), &h("b"), TTL).await.unwrap_err();
    assert_eq!(
        err,
        QuorumError::Held {
            name: name(),
            holder: h("a"),
            epoch: Epoch(1),
            witnesses: 3
        }
    );
    let ga2 = a.renew(&ga).await.unwrap();
    assert_eq!(ga2.epoch, ga.epoch);
    assert!(ga2.deadline >= ga.deadline);
    assert_eq!(a.release(&ga2).await, 3);
    let gb = b.acquire(&name(), &h("b"), TTL).await.unwrap();
    assert_eq!(
        gb.epoch,
        Epoch(2),
        "b learned epoch 1 from the Held answers"
    );
    // a's old grant cannot be renewed any more.
    assert_eq!(a.renew(&ga2).await.unwrap_err().label(), "no_majority");
}

#[tokio::test]
async fn learns_the_epoch_from_refusals() {
    let (_ws, ts) = models(3);
    let a = QuorumClient::new(ts.clone(), cfg()).unwrap();
    for _ in 0..4 {
        let g = a.acquire(&name(), &h("a"), TTL).await.unwrap();
        a.release(&g).await;
    }
    // A fresh client knows no epoch: its first proposal (1) is refused, the
    // second round proposes max + 1.
    let b = QuorumClient::new(ts, cfg()).unwrap();
    let g = b.acquire(&name(), &h("b"), TTL).await.unwrap();
    assert_eq!(g.epoch, Epoch(5));
}

#[tokio::test]
async fn needs_a_majority_of_answers() {
    let (_ws, mut ts) = models(2);
    ts.push(Arc::new(Dead));
    let c = QuorumClient::new(ts.clone(), cfg()).unwrap();
    let g = c.acquire(&name(), &h("a"), TTL).await.unwrap();
    assert_eq!(g.granted_by, 2);
    c.release(&g).await;

    let (_ws, mut ts) = models(1);
    ts.push(Arc::new(Dead));
    ts.push(Arc::new(Dead));
    let c = QuorumClient::new(ts, cfg()).unwrap();
    let err = c.acquire(&name(), &h("a"), TTL).await.unwrap_err();
    assert_eq!(err.label(), "unreachable");
    // The minority grant was released: a second client with only that
    // witness can take it.
    let (ws1, _) = (_ws, ());
    let solo =
        QuorumClient::new(vec![Arc::clone(&ws1[0]) as Arc<dyn LeaseTransport>], cfg()).unwrap();
    assert!(solo.acquire(&name(), &h("b"), TTL).await.is_ok());
}

#[tokio::test]
async fn a_crashed_witness_with_the_restart_rule_grants_nothing() {
    let (ws, ts) = models(1);
    let a = QuorumClient::new(ts.clone(), cfg()).unwrap();
    let g = a.acquire(&name(), &h("a"), TTL).await.unwrap();
    ws[0].crash();
    let b = QuorumClient::new(ts, cfg()).unwrap();
    assert_eq!(
        b.acquire(&name(), &h("b"), TTL).await.unwrap_err().label(),
        "no_majority"
    );
    // The epoch survived the crash.
    let v = b.read_majority(&name()).await.unwrap();
    assert_eq!(v.max_epoch, g.epoch);
    assert!(v.expired_at_majority);
}

#[tokio::test]
async fn metadata_needs_the_current_epoch_and_a_majority() {
    let (_ws, ts) = models(3);
    let a = QuorumClient::new(ts.clone(), cfg()).unwrap();
    let g = a.acquire(&name(), &h("a"), TTL).await.unwrap();
    let meta = LeaseMeta {
        sync_standby: Some(h("b")),
        confirmed_lsn: Some(42),
        seq: 1,
        ..Default::default()
    };
    a.update_meta(&g, &meta).await.unwrap();
    let v = a.read_majority(&name()).await.unwrap();
    assert_eq!(v.holder, Some((h("a"), g.epoch)));
    assert_eq!(v.meta, Some((g.epoch, meta.clone())));
    // After a release the old grant cannot write.
    a.release(&g).await;
    let stale = LeaseMeta {
        seq: 2,
        ..meta.clone()
    };
    assert_eq!(
        a.update_meta(&g, &stale).await.unwrap_err().label(),
        "no_majority"
    );
    // An expired grant is refused locally.
    let expired = Grant {
        deadline: Instant::now(),
        ..g
    };
    assert_eq!(
        a.update_meta(&expired, &stale).await.unwrap_err().label(),
        "expired"
    );
}

#[tokio::test]
async fn keeper_holds_renews_and_hands_over_on_shutdown() {
    let (_ws, ts) = models(3);
    let ttl = Duration::from_millis(600);
    let a = Arc::new(QuorumClient::new(ts.clone(), cfg()).unwrap());
    let b = Arc::new(QuorumClient::new(ts, cfg()).unwrap());
    let ka = LeaseKeeper::spawn(a, name(), h("a"), ttl).unwrap();
    let mut rx = ka.subscribe();
    let first = *rx
        .wait_for(|s| matches!(s, LeaseState::Holding { .. }))
        .await
        .unwrap();
    let LeaseState::Holding { epoch, deadline } = first else {
        unreachable!()
    };
    // Wait for a renewal: the deadline moves while the epoch stays.
    let renewed = *rx
        .wait_for(|s| matches!(s, LeaseState::Holding { deadline: d, .. } if *d > deadline))
        .await
        .unwrap();
    assert_eq!(
        renewed.held_epoch_at(Instant::now().min(deadline)),
        Some(epoch)
    );
    // The deadline rule does not depend on the task: past it, not held.
    assert!(!renewed.is_held_at(deadline + Duration::from_secs(60)));
    let kb = LeaseKeeper::spawn(b, name(), h("b"), ttl).unwrap();
    assert!(!kb.is_held_at(Instant::now()));
    ka.shutdown().await;
    let mut rxb = kb.subscribe();
    let got = *rxb
        .wait_for(|s| matches!(s, LeaseState::Holding { .. }))
        .await
        .unwrap();
    let LeaseState::Holding { epoch: eb, .. } = got else {
        unreachable!()
    };
    assert!(eb > epoch);
    kb.shutdown().await;
}

/// A new process of the holder (restart, leader change) continues its own
/// grant by renewal; it can never adopt another holder's grant, a wrong
/// epoch, or a grant someone took over.
#[tokio::test]
async fn adopt_continues_only_the_own_current_grant() {
    let (_ws, ts) = models(3);
    let first = QuorumClient::new(ts.clone(), cfg()).unwrap();
    let g = first.acquire(&name(), &h("a"), TTL).await.unwrap();
    // The process is gone; a fresh client of the same region adopts.
    let second = QuorumClient::new(ts.clone(), cfg()).unwrap();
    let before = Instant::now();
    let adopted = second.adopt(&name(), &h("a"), g.epoch, TTL).await.unwrap();
    assert_eq!(adopted.epoch, g.epoch);
    assert!(adopted.granted_by >= 2);
    assert!(
        adopted.sent_at >= before,
        "the deadline counts from the adopting request, not the old grant"
    );
    assert!(adopted.deadline > adopted.sent_at);
    // Another region, or a wrong epoch, is refused.
    let other = QuorumClient::new(ts.clone(), cfg()).unwrap();
    assert_eq!(
        other
            .adopt(&name(), &h("b"), g.epoch, TTL)
            .await
            .unwrap_err()
            .label(),
        "no_majority"
    );
    assert!(second
        .adopt(&name(), &h("a"), Epoch(g.epoch.0 + 1), TTL)
        .await
        .is_err());
    // Once b took over, a can no longer adopt its old epoch.
    second.release(&adopted).await;
    let gb = other.acquire(&name(), &h("b"), TTL).await.unwrap();
    assert!(gb.epoch > g.epoch);
    assert!(second.adopt(&name(), &h("a"), g.epoch, TTL).await.is_err());
    // A zero TTL is refused before anything is sent.
    assert!(second
        .adopt(&name(), &h("b"), gb.epoch, Duration::ZERO)
        .await
        .is_err());
}
