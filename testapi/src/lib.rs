//! Strict in-process Kubernetes API test server (in progress).
#![forbid(unsafe_code)]
