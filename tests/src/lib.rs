//! Test harness: starts real components (witness, etcd, PowerDNS, PostgreSQL,
//! wireguard-go) as processes, injects faults, checks recorded histories.
#![forbid(unsafe_code)]
