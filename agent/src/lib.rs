//! Continuum agent library: the controllers and their glue, so tests can run
//! agents in-process against the test API server.
#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod continuum;
pub mod failover;
pub mod flux_guard;
pub mod health;
pub mod hr_recovery;
pub mod leader;
pub mod lease_guard;
pub mod node_pivot;
pub mod source_pivot;
