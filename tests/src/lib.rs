//! Test harness: starts real components (witness, etcd, PowerDNS, PostgreSQL,
//! wireguard-go) as processes, injects faults, checks recorded histories.
//!
//! Each module is owned by the capability it serves; tests live in `tests/`
//! and benchmarks in `bench/`, dispatched by the `bench` binary.
#![forbid(unsafe_code)]

pub mod bench;
pub mod bins;
pub mod checker;
pub mod continuum_fixture;
pub mod drill;
pub mod etcd_proc;
pub mod faults;
pub mod netns;
pub mod partition;
pub mod pdns_proc;
pub mod pg_proc;
pub mod pki;
pub mod prometheus_proc;
pub mod rbac_proof;
pub mod registry_series;
pub mod skip;
pub mod wg_proc;
pub mod witness_proc;
