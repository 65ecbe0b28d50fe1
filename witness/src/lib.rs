//! The witness: a lease arbiter outside the regions.
//!
//! [`arbiter`] is the pure per-lease decision (and documents what is durable
//! and the restart rule); [`store`] applies it to an embedded redb file or to
//! etcd; [`service::Witness`] is the transport-independent entry point;
//! [`https`] and [`health`] are the HTTP transports.
#![forbid(unsafe_code)]

pub mod arbiter;
pub mod config;
pub mod dns_publish;
pub mod health;
pub mod https;
pub mod link_api;
pub mod metrics;
pub mod serve;
pub mod service;
pub mod store;
pub mod stream;
pub mod tls;

pub use service::{LeaseChange, Witness};
