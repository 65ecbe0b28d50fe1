//! The etcd store: etcd is the arbiter, the witness process is stateless.
//!
//! Per lease two keys under the prefix:
//! * `<prefix><name>/record`: the [`PersistedLease`] (holder of the last
//!   grant, epoch, `max_epoch`, TTL, metadata), a plain key;
//! * `<prefix><name>/holder`: `{holder, epoch}` attached to an **etcd lease**
//!   whose TTL is the grant's TTL rounded up to whole seconds. The key exists
//!   exactly while the grant is live; etcd deletes it when the etcd lease runs
//!   out.
//!
//! Every request reads both keys, runs the same [`arbiter`](crate::arbiter)
//! decision as the embedded store, and applies it as an etcd transaction
//! guarded by the revisions it read (compare-and-swap); a lost race is retried
//! from the read. So several witness processes can share one etcd and etcd's
//! linearizable transactions arbitrate between them.
//!
//! * Grant: a new etcd lease, then `txn(record unchanged, holder key absent)
//!   -> put record, put holder key with the etcd lease`.
//! * Renewal: a keep-alive of the holder key's etcd lease (no write to the
//!   raft log beyond the lease refresh), then a read confirming the key is
//!   still attached to it (a release racing a renewal on another witness
//!   process cannot be resurrected). A renewal asking for a longer TTL than
//!   the etcd lease has moves the key to a new, longer etcd lease in a
//!   transaction; a renewal after expiry (nobody took over) re-creates it.
//! * Release: `txn(record unchanged) -> put record, delete holder key`, then
//!   the etcd lease is revoked.
//! * Metadata: `txn(record unchanged, holder key unchanged) -> put record`.
//!
//! Restart semantics: the witness keeps nothing, so a witness restart changes
//! nothing and needs no restart rule. Epochs are committed by etcd before the
//! witness answers. TTLs are kept by etcd: etcd persists its leases and, when
//! it restarts or elects a new leader, refreshes every lease to its full TTL,
//! which is the same conservative rule the embedded store applies. Rounding
//! TTLs up to seconds (and etcd's minimum lease TTL) only lengthens grants,
//! never shortens them.

use std::time::{Duration, Instant};

use continuum_shared::lease::{Epoch, HolderId, LeaseName, LeaseView, Request};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use super::{Applied, StoreError};
use crate::arbiter::{decide, Effect, LeaseRecord, PersistedLease};

/// Compare-and-swap attempts before giving up with `Contention`.
const MAX_ATTEMPTS: u32 = 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HolderValue {
    holder: HolderId,
    epoch: Epoch,
    /// TTL in seconds the etcd lease was granted with (requested; etcd may
    /// round it up), so a renewal knows without asking whether it fits.
    #[serde(default)]
    ttl_s: i64,
}

/// A key as read, with what the compare-and-swap needs.
struct Loaded<T> {
    value: T,
    mod_revision: i64,
    lease: i64,
}

pub struct EtcdStore {
    client: Client,
    prefix: String,
}

fn ttl_secs(ttl_ms: u64) -> i64 {
    i64::try_from(ttl_ms.div_ceil(1000).max(1)).unwrap_or(i64::MAX)
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

impl EtcdStore {
    /// Connect to etcd. The prefix namespaces this witness's keys (several
    /// witnesses sharing one etcd and wanting one arbiter use the same prefix).
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(opts)).await?;
        tracing::info!(
            ?endpoints,
            prefix,
            "etcd store connected; etcd keeps epochs and TTLs"
        );
        Ok(EtcdStore {
            client,
            prefix: prefix.to_string(),
        })
    }

    pub async fn ready(&self) -> bool {
        self.client.clone().status().await.is_ok()
    }

    fn record_key(&self, name: &LeaseName) -> String {
        format!("{}{}/record", self.prefix, name)
    }

    fn holder_key(&self, name: &LeaseName) -> String {
        format!("{}{}/holder", self.prefix, name)
    }

    /// Reads both keys of a lease in one round trip.
    async fn load(
        &self,
        name: &LeaseName,
    ) -> Result<(Option<Loaded<PersistedLease>>, Option<Loaded<HolderValue>>), StoreError> {
        let (rk, hk) = (self.record_key(name), self.holder_key(name));
        let txn = Txn::new().and_then(vec![
            TxnOp::get(rk.clone(), None),
            TxnOp::get(hk.clone(), None),
        ]);
        let resp = self.client.clone().txn(txn).await?;
        let mut record = None;
        let mut holder = None;
        for (i, op) in resp.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(get) = op else {
                continue;
            };
            let Some(kv) = get.kvs().first() else {
                continue;
            };
            if i == 0 {
                record = Some(Loaded {
                    value: serde_json::from_slice(kv.value()).map_err(|e| corrupt(&rk, e))?,
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                });
            } else {
                holder = Some(Loaded {
                    value: serde_json::from_slice(kv.value()).map_err(|e| corrupt(&hk, e))?,
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                });
            }
        }
        Ok((record, holder))
    }

    /// Seconds left on an etcd lease (`None` if it is gone) and its granted TTL.
    async fn lease_ttl(&self, lease: i64) -> Result<Option<(i64, i64)>, StoreError> {
        let r = self.client.clone().lease_time_to_live(lease, None).await?;
        Ok((r.ttl() > 0).then_some((r.ttl(), r.granted_ttl())))
    }

    pub async fn apply(&self, req: &Request, now: Instant) -> Result<Applied, StoreError> {
        let name = req.name();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt.min(10)))).await;
            }
            if let Some(applied) = self.try_apply(name, req, now).await? {
                return Ok(applied);
            }
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    /// One read-decide-write round; `None` when a compare-and-swap lost.
    async fn try_apply(
        &self,
        name: &LeaseName,
        req: &Request,
        now: Instant,
    ) -> Result<Option<Applied>, StoreError> {
        let (record, holder) = self.load(name).await?;
        let mut rec = record
            .as_ref()
            .map(|r| LeaseRecord::restored(r.value.clone(), now, true))
            .unwrap_or_default();
        // Liveness comes from the holder key, not from the record.
        let mut granted_secs = 0;
        rec.expires_at = match &holder {
            None => rec.holder.as_ref().map(|_| now),
            Some(h) => {
                if matches!(req, Request::Renew(_)) {
                    // A renewal's decision does not depend on the time left.
                    Some(now + Duration::from_millis(rec.ttl_ms.max(1)))
                } else {
                    match self.lease_ttl(h.lease).await? {
                        Some((left, granted)) => {
                            granted_secs = granted;
                            Some(now + Duration::from_secs(left.unsigned_abs()))
                        }
                        None => Some(now),
                    }
                }
            }
        };
        let previous_holder = rec.live_holder(now).cloned();
        let d = decide(&rec, req, now);
        let applied = Applied {
            response: d.response.clone(),
            effect: d.effect,
            previous_holder,
            holder: d.record.holder.clone(),
            epoch: d.record.epoch,
        };
        let (rk, hk) = (self.record_key(name), self.holder_key(name));
        let record_unchanged = match &record {
            Some(r) => Compare::mod_revision(rk.clone(), CompareOp::Equal, r.mod_revision),
            None => Compare::version(rk.clone(), CompareOp::Equal, 0),
        };
        let record_bytes = |p: &PersistedLease| serde_json::to_vec(p).map_err(|e| corrupt(&rk, e));
        let mut client = self.client.clone();
        let ok = match d.effect {
            Effect::None => true,
            Effect::Grant => {
                let (Some(new_holder), Some(ttl_ms)) = (d.record.holder.clone(), granted_ttl(&d))
                else {
                    return Ok(Some(applied));
                };
                let value = HolderValue {
                    holder: new_holder,
                    epoch: d.record.epoch,
                    ttl_s: ttl_secs(ttl_ms),
                };
                self.put_holder_txn(
                    vec![
                        record_unchanged,
                        Compare::version(hk.clone(), CompareOp::Equal, 0),
                    ],
                    &hk,
                    &value,
                    ttl_ms,
                    Some((rk.clone(), record_bytes(&d.record.persisted())?)),
                )
                .await?
            }
            Effect::Extend => {
                // An extension always has a holder (the arbiter extends only a
                // matching holder) and a granted TTL.
                let (Some(h), Some(ttl_ms)) = (d.record.holder.clone(), granted_ttl(&d)) else {
                    return Ok(Some(applied));
                };
                let mut value = HolderValue {
                    holder: h,
                    epoch: d.record.epoch,
                    ttl_s: ttl_secs(ttl_ms),
                };
                let record_put = if d.persist {
                    Some((rk.clone(), record_bytes(&d.record.persisted())?))
                } else {
                    None
                };
                match &holder {
                    // Expired, nobody took over: re-create the holder key.
                    None => {
                        self.put_holder_txn(
                            vec![
                                record_unchanged,
                                Compare::version(hk.clone(), CompareOp::Equal, 0),
                            ],
                            &hk,
                            &value,
                            ttl_ms,
                            record_put,
                        )
                        .await?
                    }
                    Some(h) => {
                        if granted_secs == 0 {
                            granted_secs = h.value.ttl_s;
                        }
                        if granted_secs == 0 {
                            granted_secs = match self.lease_ttl(h.lease).await? {
                                Some((_, g)) => g,
                                None => return Ok(None),
                            };
                        }
                        if ttl_secs(ttl_ms) > granted_secs {
                            // Longer TTL than the etcd lease: move the key.
                            value.ttl_s = ttl_secs(ttl_ms);
                            let moved = self
                                .put_holder_txn(
                                    vec![
                                        record_unchanged,
                                        Compare::mod_revision(
                                            hk.clone(),
                                            CompareOp::Equal,
                                            h.mod_revision,
                                        ),
                                    ],
                                    &hk,
                                    &value,
                                    ttl_ms,
                                    record_put,
                                )
                                .await?;
                            if moved {
                                let _ = client.lease_revoke(h.lease).await;
                            }
                            moved
                        } else {
                            self.keep_alive(h.lease, &hk, h.mod_revision).await?
                        }
                    }
                }
            }
            Effect::Release => {
                let txn = Txn::new().when(vec![record_unchanged]).and_then(vec![
                    TxnOp::put(rk.clone(), record_bytes(&d.record.persisted())?, None),
                    TxnOp::delete(hk.clone(), None),
                ]);
                let done = client.txn(txn).await?.succeeded();
                if done {
                    if let Some(h) = &holder {
                        let _ = client.lease_revoke(h.lease).await;
                    }
                }
                done
            }
            Effect::Meta => {
                let mut when = vec![record_unchanged];
                match &holder {
                    Some(h) => when.push(Compare::mod_revision(
                        hk.clone(),
                        CompareOp::Equal,
                        h.mod_revision,
                    )),
                    None => return Ok(None),
                }
                let txn = Txn::new().when(when).and_then(vec![TxnOp::put(
                    rk.clone(),
                    record_bytes(&d.record.persisted())?,
                    None,
                )]);
                client.txn(txn).await?.succeeded()
            }
        };
        Ok(ok.then_some(applied))
    }

    /// Grants an etcd lease of `ttl_ms` (rounded up to seconds) and puts the
    /// holder key on it (plus the record) if `when` holds; revokes the etcd
    /// lease again when the compare fails.
    async fn put_holder_txn(
        &self,
        when: Vec<Compare>,
        hk: &str,
        value: &HolderValue,
        ttl_ms: u64,
        record: Option<(String, Vec<u8>)>,
    ) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        let lease = client.lease_grant(ttl_secs(ttl_ms), None).await?.id();
        let holder_bytes = serde_json::to_vec(value).map_err(|e| corrupt(hk, e))?;
        let mut ops = vec![TxnOp::put(
            hk.to_string(),
            holder_bytes,
            Some(PutOptions::new().with_lease(lease)),
        )];
        if let Some((rk, bytes)) = record {
            ops.push(TxnOp::put(rk, bytes, None));
        }
        let done = client
            .txn(Txn::new().when(when).and_then(ops))
            .await?
            .succeeded();
        if !done {
            let _ = client.lease_revoke(lease).await;
        }
        Ok(done)
    }

    /// Refreshes `lease`, then confirms the holder key is still the one read
    /// (so a renewal racing a release is not answered as granted).
    async fn keep_alive(
        &self,
        lease: i64,
        hk: &str,
        mod_revision: i64,
    ) -> Result<bool, StoreError> {
        let mut client = self.client.clone();
        let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        let alive = match stream.message().await? {
            Some(r) => r.ttl() > 0,
            None => false,
        };
        if !alive {
            return Ok(false);
        }
        let get = client.get(hk.to_string(), None).await?;
        Ok(get
            .kvs()
            .first()
            .is_some_and(|kv| kv.mod_revision() == mod_revision && kv.lease() == lease))
    }

    pub async fn snapshot(&self, now: Instant) -> Result<Vec<LeaseView>, StoreError> {
        let mut client = self.client.clone();
        let resp = client
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            let Some(name) = key
                .strip_prefix(self.prefix.as_str())
                .and_then(|k| k.strip_suffix("/record"))
            else {
                continue;
            };
            let Ok(name) = LeaseName::new(name) else {
                continue;
            };
            if let Some(a) = self
                .try_apply(
                    &name,
                    &Request::Read(continuum_shared::lease::Read { name: name.clone() }),
                    now,
                )
                .await?
            {
                if let continuum_shared::lease::Response::State(v) = a.response {
                    out.push(v);
                }
            }
        }
        Ok(out)
    }
}

/// TTL the decision granted (from its response).
fn granted_ttl(d: &crate::arbiter::Decision) -> Option<u64> {
    match d.response {
        continuum_shared::lease::Response::Granted { ttl_ms, .. } => Some(ttl_ms),
        _ => None,
    }
}
