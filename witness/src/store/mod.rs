//! Where leases live: an embedded redb file (default) or an etcd cluster.
//!
//! Both run the same [`arbiter`](crate::arbiter) decision; they differ in
//! how they serialize requests for one lease and make grants durable. The
//! service layer only sees [`Store`].

use std::time::Instant;

use continuum_shared::lease::{Epoch, HolderId, LeaseView, Request, Response};

use crate::arbiter::Effect;

pub mod embedded;
pub mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// Why a store could not answer. The witness then answers `Error` and
/// changes nothing it has acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("embedded store I/O failed: {0}")]
    Embedded(#[from] redb::Error),
    #[error("stored record for lease `{key}` is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("embedded store writer has stopped")]
    WriterStopped,
    #[error("etcd request failed: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd compare-and-swap lost {0} times in a row; try again")]
    Contention(u32),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
}

impl StoreError {
    /// Stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Embedded(_) => "embedded_io",
            StoreError::Corrupt { .. } => "corrupt_record",
            StoreError::WriterStopped => "writer_stopped",
            StoreError::Etcd(_) => "etcd",
            StoreError::Contention(_) => "etcd_contention",
            StoreError::DataDir { .. } => "data_dir",
        }
    }
}

/// The result of one request at the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub response: Response,
    pub effect: Effect,
    /// Holder before the request, if it was live then (to tell takeovers).
    pub previous_holder: Option<HolderId>,
    /// Holder after the request (`None` after a release).
    pub holder: Option<HolderId>,
    /// Epoch after the request.
    pub epoch: Epoch,
}

/// The store behind a witness.
pub enum Store {
    Embedded(EmbeddedStore),
    Etcd(Box<EtcdStore>),
}

impl Store {
    /// Decide and apply one validated request received at `now`. Durable
    /// effects are on disk (or committed in etcd) before this returns.
    pub async fn apply(&self, req: &Request, now: Instant) -> Result<Applied, StoreError> {
        match self {
            Store::Embedded(s) => s.apply(req, now).await,
            Store::Etcd(s) => s.apply(req, now).await,
        }
    }

    /// Whether the store can serve requests (loaded / reachable).
    pub async fn ready(&self) -> bool {
        match self {
            Store::Embedded(s) => s.ready(),
            Store::Etcd(s) => s.ready().await,
        }
    }

    /// Every known lease as seen at `now` (for observers such as DNS publication).
    pub async fn snapshot(&self, now: Instant) -> Result<Vec<LeaseView>, StoreError> {
        match self {
            Store::Embedded(s) => Ok(s.snapshot(now).await),
            Store::Etcd(s) => s.snapshot(now).await,
        }
    }

    /// Stable name of the store kind (logs, metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Etcd(_) => "etcd",
        }
    }
}
