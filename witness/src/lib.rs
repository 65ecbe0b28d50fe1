//! The witness: a lease arbiter outside the regions.
#![forbid(unsafe_code)]
