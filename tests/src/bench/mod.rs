//! Benchmarks: each prints its figures next to the reference it is compared
//! with, measured in the same run. `--json` prints one JSON object instead.

pub mod hr_recovery;
pub mod link;
pub mod witness;
