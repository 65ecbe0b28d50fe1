//! The drill's client: commits continuously to whichever region accepts
//! writes and records every acknowledged transaction (id, region, time).
//!
//! A commit counts as acknowledged only when PostgreSQL returned success.
//! A call cut short by the client's own timeout is "unknown" and never
//! counted: the server may or may not have committed it, and the drill only
//! promises that what was acknowledged survives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

/// One acknowledged commit.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub id: i64,
    /// Index of the region that acknowledged it.
    pub region: usize,
    /// When the acknowledgement arrived.
    pub at: Instant,
}

/// What the writer did.
#[derive(Debug, Default)]
pub struct WriterLog {
    pub acks: Vec<Ack>,
    pub attempts: u64,
    pub failures: u64,
}

const CONNECT_BOUND: Duration = Duration::from_millis(300);
const COMMIT_BOUND: Duration = Duration::from_secs(1);

async fn connect(conninfo: &str) -> Option<Client> {
    let fut = tokio_postgres::connect(conninfo, tokio_postgres::NoTls);
    let (client, conn) = tokio::time::timeout(CONNECT_BOUND, fut).await.ok()?.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(client)
}

/// Writes ids from `first_id` upwards until `stop` is set, to `regions`
/// (libpq conninfos), starting with `prefer`.
pub async fn run(
    regions: Vec<String>,
    prefer: usize,
    first_id: i64,
    stop: Arc<AtomicBool>,
) -> WriterLog {
    let mut log = WriterLog::default();
    let mut clients: Vec<Option<Client>> = regions.iter().map(|_| None).collect();
    let mut target = prefer;
    let mut id = first_id;
    while !stop.load(Ordering::Relaxed) {
        log.attempts += 1;
        if clients[target].is_none() {
            clients[target] = connect(&regions[target]).await;
        }
        let ok = match &clients[target] {
            Some(c) => {
                let region = target as i32;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &region];
                let insert = c.execute(
                    "INSERT INTO drill_writes (id, region) VALUES ($1, $2)",
                    &params,
                );
                matches!(tokio::time::timeout(COMMIT_BOUND, insert).await, Ok(Ok(1)))
            }
            None => false,
        };
        if ok {
            log.acks.push(Ack {
                id,
                region: target,
                at: Instant::now(),
            });
        } else {
            log.failures += 1;
            // The connection's state is unknown: start over, on the other region.
            clients[target] = None;
            target = (target + 1) % regions.len();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Every id is tried once: an unknown outcome is never retried as
        // the same id, so "acknowledged" stays exact.
        id += 1;
    }
    log
}
