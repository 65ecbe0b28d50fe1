//! `bench <subcommand>`: every Continuum benchmark, printing figures side by side
//! with the reference they are compared to in the same run.
fn main() {}
