//! API scenarios run against every witness store (embedded and etcd).
//! Each test file uses the scenarios it needs; the rest are unused there.
#![allow(dead_code)]

use continuum_shared::lease::{
    Acquire, Epoch, HolderId, LeaseMeta, LeaseName, LeaseView, Read, Release, Request, Response,
    UpdateMeta,
};
use continuum_tests::witness_proc::{TestClient, WitnessProc};

pub fn name(s: &str) -> LeaseName {
    LeaseName::new(s).unwrap()
}
pub fn holder(s: &str) -> HolderId {
    HolderId::new(s).unwrap()
}
pub fn acquire(lease: &str, h: &str, epoch: u64, ttl_ms: u64) -> Request {
    Request::Acquire(Acquire {
        name: name(lease),
        holder: holder(h),
        epoch: Epoch(epoch),
        ttl_ms,
    })
}
pub fn renew(lease: &str, h: &str, epoch: u64, ttl_ms: u64) -> Request {
    Request::Renew(Acquire {
        name: name(lease),
        holder: holder(h),
        epoch: Epoch(epoch),
        ttl_ms,
    })
}
pub fn release(lease: &str, h: &str, epoch: u64) -> Request {
    Request::Release(Release {
        name: name(lease),
        holder: holder(h),
        epoch: Epoch(epoch),
    })
}
pub fn read(lease: &str) -> Request {
    Request::Read(Read { name: name(lease) })
}

/// Reads a lease, without the time left (which moves).
pub async fn view(c: &TestClient, lease: &str) -> LeaseView {
    let (status, resp) = c.send(&read(lease)).await.unwrap();
    assert_eq!(status, 200, "{resp:?}");
    let Response::State(mut v) = resp else {
        panic!("read answered {resp:?}")
    };
    v.remaining_ms = None;
    v
}

/// Acquire, conflict, renew, metadata, read, release, epoch checks.
pub async fn lifecycle(w: &WitnessProc) {
    let c = w.client().unwrap();
    let lease = "continuum/db/app";
    let (s, r) = c.send(&acquire(lease, "eu-1", 1, 10_000)).await.unwrap();
    assert_eq!(
        (s, &r),
        (
            200,
            &Response::Granted {
                epoch: Epoch(1),
                ttl_ms: 10_000
            }
        )
    );
    let (s, r) = c.send(&acquire(lease, "us-1", 2, 10_000)).await.unwrap();
    assert_eq!(s, 409, "{r:?}");
    assert!(
        matches!(&r, Response::Held { holder, epoch: Epoch(1), remaining_ms } if holder.as_str() == "eu-1" && *remaining_ms > 0),
        "{r:?}"
    );
    let (s, r) = c.send(&renew(lease, "eu-1", 1, 10_000)).await.unwrap();
    assert_eq!(
        (s, &r),
        (
            200,
            &Response::Granted {
                epoch: Epoch(1),
                ttl_ms: 10_000
            }
        )
    );
    let (s, r) = c.send(&renew(lease, "us-1", 1, 10_000)).await.unwrap();
    assert_eq!(s, 409, "{r:?}");
    assert!(matches!(r, Response::NotHolder { .. }), "{r:?}");
    let meta = LeaseMeta {
        sync_standby: Some(holder("us-1")),
        confirmed_lsn: Some(0x1_6B37_4D48),
        seq: 1,
        ..Default::default()
    };
    let (s, r) = c
        .send(&Request::UpdateMeta(UpdateMeta {
            name: name(lease),
            holder: holder("eu-1"),
            epoch: Epoch(1),
            meta: meta.clone(),
        }))
        .await
        .unwrap();
    assert_eq!((s, r), (200, Response::MetaStored));
    let (s, r) = c
        .send(&Request::UpdateMeta(UpdateMeta {
            name: name(lease),
            holder: holder("us-1"),
            epoch: Epoch(1),
            meta: LeaseMeta::default(),
        }))
        .await
        .unwrap();
    assert_eq!(s, 409, "a non-holder cannot write metadata: {r:?}");
    let v = view(&c, lease).await;
    assert_eq!(v.holder, Some(holder("eu-1")));
    assert_eq!(
        (v.epoch, v.max_epoch, v.meta_epoch),
        (Epoch(1), Epoch(1), Epoch(1))
    );
    assert_eq!(v.meta, Some(meta.clone()));
    let (s, r) = c.send(&release(lease, "us-1", 1)).await.unwrap();
    assert_eq!(s, 409, "{r:?}");
    let (s, r) = c.send(&release(lease, "eu-1", 1)).await.unwrap();
    assert_eq!((s, r), (200, Response::Released));
    let (s, r) = c.send(&acquire(lease, "us-1", 1, 10_000)).await.unwrap();
    assert_eq!(
        (s, r),
        (
            409,
            Response::EpochTooLow {
                max_epoch: Epoch(1)
            }
        )
    );
    let (s, r) = c.send(&acquire(lease, "us-1", 2, 10_000)).await.unwrap();
    assert_eq!(
        (s, r),
        (
            200,
            Response::Granted {
                epoch: Epoch(2),
                ttl_ms: 10_000
            }
        )
    );
    let v = view(&c, lease).await;
    assert_eq!(v.holder, Some(holder("us-1")));
    assert_eq!(v.max_epoch, Epoch(2));
    assert_eq!(
        v.meta,
        Some(meta),
        "metadata survives a new grant for the standby to read"
    );
    let v = view(&c, "never/used").await;
    assert_eq!((v.holder, v.max_epoch), (None, Epoch(0)));
}

fn acquire_json(lease: &str, h: &str, epoch: &str, ttl: &str) -> String {
    format!(r#"{{"acquire":{{"name":"{lease}","holder":"{h}","epoch":{epoch},"ttl_ms":{ttl}}}}}"#)
}

/// Every bad input gets the right 4xx, a message naming the problem, and
/// the lease is unchanged afterwards.
pub async fn bad_input(w: &WitnessProc) {
    let c = w.client().unwrap();
    let lease = "bad/input";
    let (s, _) = c.send(&acquire(lease, "eu-1", 3, 30_000)).await.unwrap();
    assert_eq!(s, 200);
    let before = view(&c, lease).await;
    let json = Some("application/json");
    let huge = format!(
        r#"{{"acquire":{{"name":"{lease}","holder":"us-1","epoch":9,"ttl_ms":1000,"pad":"{}"}}}}"#,
        "x".repeat(9000)
    );
    // (case, method, content type, body, expected status, expected message)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("malformed", "POST", json, b"{\"acquire\": {".to_vec(), 400, "not a valid lease request"),
        ("not json", "POST", json, b"\x00\x01garbage".to_vec(), 400, "not a valid lease request"),
        ("empty", "POST", json, Vec::new(), 400, "not a valid lease request"),
        ("oversized", "POST", json, huge.into_bytes(), 413, "limit"),
        ("one MiB", "POST", json, vec![b' '; 1 << 20], 413, "limit"),
        (
            "unknown field",
            "POST",
            json,
            format!(r#"{{"acquire":{{"name":"{lease}","holder":"us-1","epoch":9,"ttl_ms":1000,"force":true}}}}"#).into_bytes(),
            400,
            "unknown field `force`",
        ),
        ("unknown op", "POST", json, format!(r#"{{"steal":{{"name":"{lease}"}}}}"#).into_bytes(), 400, "unknown variant `steal`"),
        ("ttl zero", "POST", json, acquire_json(lease, "us-1", "9", "0").into_bytes(), 422, "ttl_ms"),
        ("ttl negative", "POST", json, acquire_json(lease, "us-1", "9", "-5").into_bytes(), 400, "-5"),
        ("ttl too large", "POST", json, acquire_json(lease, "us-1", "9", "600001").into_bytes(), 422, "ttl_ms"),
        ("epoch zero", "POST", json, acquire_json(lease, "us-1", "0", "1000").into_bytes(), 422, "epoch"),
        ("empty name", "POST", json, acquire_json("", "us-1", "9", "1000").into_bytes(), 400, "invalid name"),
        ("long name", "POST", json, acquire_json(&"a".repeat(201), "us-1", "9", "1000").into_bytes(), 400, "invalid name"),
        ("bad holder", "POST", json, acquire_json(lease, "US_1", "9", "1000").into_bytes(), 400, "invalid holder"),
        ("content type", "POST", Some("text/plain"), acquire_json(lease, "us-1", "9", "1000").into_bytes(), 415, "application/json"),
        ("method", "GET", None, Vec::new(), 405, "use POST"),
        ("path", "POST-other", json, Vec::new(), 404, "/v1/lease"),
    ];
    for (what, method, ct, body, want_status, want_msg) in cases {
        let (method, path) = match method {
            "POST-other" => ("POST", "/v1/other"),
            m => (m, "/v1/lease"),
        };
        let (status, body) = match c.raw(method, path, ct, body).await {
            Ok(r) => r,
            // The witness answers 413 from Content-Length and closes without
            // reading a huge body; the client may see the close first.
            Err(e) if what == "one MiB" => {
                assert_eq!(view(&c, lease).await, before, "{what}: state changed ({e})");
                continue;
            }
            Err(e) => panic!("{what}: {e:#}"),
        };
        let resp = Response::decode(&body).unwrap_or_else(|e| {
            panic!(
                "{what}: body is not a Response ({e}): {:?}",
                String::from_utf8_lossy(&body)
            )
        });
        let Response::Error { code, message } = &resp else {
            panic!("{what}: expected an error, got {resp:?}")
        };
        assert_eq!(status, want_status, "{what}: {code}: {message}");
        assert!(
            message.contains(want_msg),
            "{what}: message {message:?} should mention {want_msg:?}"
        );
        assert_eq!(view(&c, lease).await, before, "{what}: state changed");
    }
}

/// Without a client certificate: 401, clear message, nothing changes.
pub async fn no_client_certificate(w: &WitnessProc) {
    let c = w.client().unwrap();
    let lease = "auth/none";
    assert_eq!(
        c.send(&acquire(lease, "eu-1", 1, 30_000)).await.unwrap().0,
        200
    );
    let before = view(&c, lease).await;
    let anon = TestClient::new(w.api_addr(), &w.pki().ca_pem, None).unwrap();
    for req in [
        acquire(lease, "us-1", 2, 1000),
        release(lease, "eu-1", 1),
        acquire("auth/fresh", "us-1", 1, 1000),
        read(lease),
    ] {
        let (status, resp) = anon.send(&req).await.unwrap();
        assert_eq!(status, 401, "{resp:?}");
        let Response::Error { code, message } = resp else {
            panic!("expected error, got {resp:?}")
        };
        assert_eq!(code, "unauthenticated");
        assert!(message.contains("client certificate"), "{message}");
    }
    assert_eq!(view(&c, lease).await, before);
    assert_eq!(view(&c, "auth/fresh").await.max_epoch, Epoch(0));
}

/// A client certificate from another CA fails the TLS handshake.
pub async fn rogue_certificate(w: &WitnessProc) {
    let c = w.client().unwrap();
    let lease = "auth/rogue";
    assert_eq!(
        c.send(&acquire(lease, "eu-1", 1, 30_000)).await.unwrap().0,
        200
    );
    let before = view(&c, lease).await;
    let rogue =
        TestClient::new(w.api_addr(), &w.pki().ca_pem, Some(&w.pki().rogue_client)).unwrap();
    let result = rogue.send(&release(lease, "eu-1", 1)).await;
    assert!(result.is_err(), "rogue certificate was served: {result:?}");
    assert_eq!(view(&c, lease).await, before);
}
