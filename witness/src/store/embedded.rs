//! The embedded store: leases in memory, durable state in a redb file.
//!
//! Requests for one lease are serialized by that lease's own async mutex,
//! held across the fsync of a grant, so a grant is on disk before anyone
//! (its holder or a competitor) hears of it. Leases are spread over shards
//! so renewals of different leases do not contend.
//!
//! Writes go through one writer thread that commits everything pending in
//! one redb transaction with `Durability::Immediate` (group commit): one
//! fsync covers many concurrent grants.
//!
//! What is durable and why: see the [`arbiter`](crate::arbiter) module.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use continuum_shared::lease::{LeaseName, LeaseView, Request};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Applied, StoreError};
use crate::arbiter::{decide, Effect, LeaseRecord, PersistedLease};

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const SHARDS: usize = 64;
/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;
/// redb page cache: reads are served from memory, so the cache only holds
/// pages being rewritten (10,000 leases are a 2 MB table).
const CACHE_BYTES: usize = 1 << 20;
/// File name inside `--data-dir`.
pub const DB_FILE: &str = "witness.redb";

type Slot = Arc<tokio::sync::Mutex<LeaseRecord>>;

struct WriteOp {
    key: String,
    value: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

pub struct EmbeddedStore {
    shards: Box<[Mutex<HashMap<LeaseName, Slot>>]>,
    writer: Mutex<mpsc::Sender<WriteOp>>,
    writer_alive: Arc<AtomicBool>,
}

fn shard_of(name: &LeaseName) -> usize {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl EmbeddedStore {
    /// Open (or create) the store in `dir` and load every lease, applying the
    /// restart rule (`restart_rule = false` only in the unsafe test mode).
    /// Refuses to start on an unreadable record: guessing could lower an epoch.
    pub fn open(dir: &Path, restart_rule: bool) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join(DB_FILE))
            .map_err(redb::Error::from)?;
        {
            let txn = db.begin_write().map_err(redb::Error::from)?;
            txn.open_table(LEASES).map_err(redb::Error::from)?;
            txn.commit().map_err(redb::Error::from)?;
        }
        let now = Instant::now();
        let shards: Box<[Mutex<HashMap<LeaseName, Slot>>]> =
            (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        let mut loaded = 0usize;
        {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = txn.open_table(LEASES).map_err(redb::Error::from)?;
            for entry in table.iter().map_err(redb::Error::from)? {
                let (k, v) = entry.map_err(redb::Error::from)?;
                let key = k.value().to_string();
                let name = LeaseName::new(key.clone()).map_err(|e| StoreError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
                let p: PersistedLease =
                    serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                        key: key.clone(),
                        reason: e.to_string(),
                    })?;
                let rec = LeaseRecord::restored(p, now, restart_rule);
                let shard = &shards[shard_of(&name)];
                shard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name, Arc::new(tokio::sync::Mutex::new(rec)));
                loaded += 1;
            }
        }
        tracing::info!(
            leases = loaded,
            restart_rule,
            path = %dir.join(DB_FILE).display(),
            "embedded store loaded; leases that had a holder stay held for their persisted TTL from now (restart rule)"
        );
        if !restart_rule {
            tracing::warn!(
                "UNSAFE test mode: restart rule disabled, persisted holders are treated as expired"
            );
        }
        let (tx, rx) = mpsc::channel::<WriteOp>();
        let writer_alive = Arc::new(AtomicBool::new(true));
        let alive = writer_alive.clone();
        std::thread::Builder::new()
            .name("witness-redb-writer".into())
            .spawn(move || {
                writer_loop(db, rx);
                alive.store(false, Ordering::SeqCst);
            })
            .map_err(|e| StoreError::Embedded(redb::Error::Io(e)))?;
        Ok(EmbeddedStore {
            shards,
            writer: Mutex::new(tx),
            writer_alive,
        })
    }

    pub fn ready(&self) -> bool {
        self.writer_alive.load(Ordering::SeqCst)
    }

    fn slot(&self, name: &LeaseName) -> Option<Slot> {
        let shard = self.shards[shard_of(name)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        shard.get(name).cloned()
    }

    fn slot_or_new(&self, name: &LeaseName) -> Slot {
        let mut shard = self.shards[shard_of(name)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        shard.entry(name.clone()).or_default().clone()
    }

    pub async fn apply(&self, req: &Request, now: Instant) -> Result<Applied, StoreError> {
        let name = req.name();
        let slot = match self.slot(name) {
            Some(s) => s,
            None => {
                // A lease never seen: only a request that changes it gets a
                // slot. Reads, and renewals, releases and metadata updates
                // (refused: nobody holds it), leave no state behind, so
                // unknown names cannot grow the witness's memory.
                let d = decide(&LeaseRecord::default(), req, now);
                if d.effect == Effect::None && !d.persist {
                    return Ok(Applied {
                        response: d.response,
                        effect: d.effect,
                        previous_holder: None,
                        holder: None,
                        epoch: d.record.epoch,
                    });
                }
                self.slot_or_new(name)
            }
        };
        let mut rec = slot.lock().await;
        let previous_holder = rec.live_holder(now).cloned();
        let d = decide(&rec, req, now);
        if d.persist {
            self.persist(name, &d.record.persisted()).await?;
        }
        let applied = Applied {
            response: d.response,
            effect: d.effect,
            previous_holder,
            holder: d.record.holder.clone(),
            epoch: d.record.epoch,
        };
        if d.effect != Effect::None {
            *rec = d.record;
        }
        Ok(applied)
    }

    async fn persist(&self, name: &LeaseName, p: &PersistedLease) -> Result<(), StoreError> {
        let value = serde_json::to_vec(p).map_err(|e| StoreError::Corrupt {
            key: name.to_string(),
            reason: e.to_string(),
        })?;
        let (done, wait) = oneshot::channel();
        let op = WriteOp {
            key: name.as_str().to_string(),
            value,
            done,
        };
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(op)
            .map_err(|_| StoreError::WriterStopped)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(StoreError::Embedded(redb::Error::Io(
                std::io::Error::other(msg),
            ))),
            Err(_) => Err(StoreError::WriterStopped),
        }
    }

    /// How many leases have a slot in memory.
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub async fn snapshot(&self, now: Instant) -> Vec<LeaseView> {
        let mut slots = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            slots.extend(shard.iter().map(|(n, s)| (n.clone(), s.clone())));
        }
        let mut out = Vec::with_capacity(slots.len());
        for (name, slot) in slots {
            let rec = slot.lock().await;
            if rec.max_epoch.0 > 0 || rec.meta.is_some() {
                out.push(rec.view(&name, now));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// Commits pending writes in batches; one fsync acknowledges the whole batch.
fn writer_loop(db: Database, rx: mpsc::Receiver<WriteOp>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let result = commit(&db, &batch).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "embedded store commit failed; grants refused");
        }
        for op in batch {
            let _ = op.done.send(result.clone());
        }
    }
}

fn commit(db: &Database, batch: &[WriteOp]) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let mut table = txn.open_table(LEASES)?;
        for op in batch {
            table.insert(op.key.as_str(), op.value.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use continuum_shared::lease::{Acquire, Epoch, HolderId, Response};
    use std::time::Duration;

    fn acq(holder: &str, epoch: u64) -> Request {
        Request::Acquire(Acquire {
            name: LeaseName::new("db").unwrap(),
            holder: HolderId::new(holder).unwrap(),
            epoch: Epoch(epoch),
            ttl_ms: 60_000,
        })
    }

    /// Requests that change nothing about a lease never seen leave no slot.
    #[tokio::test]
    async fn refused_requests_on_unknown_leases_leave_no_state() {
        use continuum_shared::lease::{LeaseMeta, Read, Release, UpdateMeta};
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path(), true).unwrap();
        let name = |n: &str| LeaseName::new(n).unwrap();
        let holder = HolderId::new("eu-1").unwrap();
        let refused = [
            Request::Renew(Acquire {
                name: name("r"),
                holder: holder.clone(),
                epoch: Epoch(1),
                ttl_ms: 1000,
            }),
            Request::Release(Release {
                name: name("l"),
                holder: holder.clone(),
                epoch: Epoch(1),
            }),
            Request::UpdateMeta(UpdateMeta {
                name: name("m"),
                holder: holder.clone(),
                epoch: Epoch(1),
                meta: LeaseMeta::default(),
            }),
            Request::Read(Read { name: name("q") }),
        ];
        for req in &refused {
            let a = s.apply(req, Instant::now()).await.unwrap();
            assert_eq!(a.effect, Effect::None, "{req:?}: {:?}", a.response);
        }
        assert_eq!(s.slots(), 0, "refused requests created slots");
        s.apply(&acq("eu-1", 1), Instant::now()).await.unwrap();
        assert_eq!(s.slots(), 1);
        let names: Vec<_> = s
            .snapshot(Instant::now())
            .await
            .into_iter()
            .map(|v| v.name.to_string())
            .collect();
        assert_eq!(names, ["db"]);
    }

    #[tokio::test]
    async fn grants_survive_reopen_and_the_restart_rule_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmbeddedStore::open(dir.path(), true).unwrap();
            let a = s.apply(&acq("eu-1", 4), Instant::now()).await.unwrap();
            assert_eq!(
                a.response,
                Response::Granted {
                    epoch: Epoch(4),
                    ttl_ms: 60_000
                }
            );
        }
        // The writer thread holds the database until its channel closes.
        std::thread::sleep(Duration::from_millis(100));
        let s = EmbeddedStore::open(dir.path(), true).unwrap();
        let a = s.apply(&acq("us-1", 5), Instant::now()).await.unwrap();
        assert!(
            matches!(
                a.response,
                Response::Held {
                    epoch: Epoch(4),
                    ..
                }
            ),
            "{:?}",
            a.response
        );
        let a = s
            .apply(&acq("us-1", 4), Instant::now() + Duration::from_secs(61))
            .await
            .unwrap();
        assert_eq!(
            a.response,
            Response::EpochTooLow {
                max_epoch: Epoch(4)
            }
        );
    }
}
