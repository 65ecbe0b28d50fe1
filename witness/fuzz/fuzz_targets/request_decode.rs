//! Arbitrary bytes into `Request::decode`; every decoded request must
//! re-encode to itself and go through the arbiter (fresh, held and restored
//! records) without panicking and without breaking the epoch invariants.
#![no_main]

use std::time::{Duration, Instant};

use continuum_shared::lease::{Request, Response};
use continuum_witness::arbiter::{decide, Effect, LeaseRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = Request::decode(data) else {
        return;
    };
    assert_eq!(Request::decode(&req.encode()).as_ref(), Ok(&req));
    let now = Instant::now();
    let mut rec = LeaseRecord::default();
    for step in 0..3u64 {
        let at = now + Duration::from_millis(step * 250);
        let before = rec.clone();
        let d = decide(&rec, &req, at);
        assert!(
            d.record.max_epoch >= before.max_epoch,
            "max_epoch went back"
        );
        if d.effect == Effect::None {
            assert_eq!(d.record, before, "a refusal or read changed state");
        }
        if d.effect == Effect::Grant {
            assert!(d.record.epoch > before.max_epoch, "granted a stale epoch");
            assert!(d.persist, "a grant must be durable before the answer");
        }
        if let Response::Granted { epoch, .. } = d.response {
            assert_eq!(epoch, d.record.epoch);
        }
        rec = LeaseRecord::restored(d.record.persisted(), at, true);
    }
});
