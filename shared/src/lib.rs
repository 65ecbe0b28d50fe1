//! Continuum's shared core: the lease protocol (types, wire format, validation),
//! the quorum client, and the plumbing both binaries use.
//!
//! Nothing in this crate talks to Kubernetes: domain types and decisions stay
//! plain so they can be tested exhaustively.
#![forbid(unsafe_code)]

pub mod dns;
pub mod failover;
pub mod health;
pub mod lease;
pub mod link;
/// Direct PostgreSQL fencing and promotion back-end (feature `pg`).
#[cfg(feature = "pg")]
pub mod pg;
pub mod quorum;
pub mod transport;
