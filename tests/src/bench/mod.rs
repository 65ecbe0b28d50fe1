//! Benchmarks: each prints its figures next to the reference it is compared
//! with, measured in the same run. `--json` prints one JSON object instead.

pub mod continuum;
pub mod hr_recovery;
pub mod link;
pub mod manifest;
pub mod node_pivot;
pub mod procstat;
pub mod source_pivot;
pub mod witness;
