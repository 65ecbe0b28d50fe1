//! Stuck HelmRelease recovery (seed 001), as a watch-driven controller.
//!
//! Stackable-style split: `observe` (kube reads) -> [`model::validate`] (pure:
//! raw object to a typed view, or a skip reason) -> [`decide`] (pure: view + now
//! -> decision with an exact deadline) -> `apply` (kube writes, in [`actions`])
//! -> report (Event, metric, structured log line). Only [`controller`],
//! [`actions`] and [`pass`] touch the API server.
//!
//! Branch B: Ready Unknown past the threshold with `history[0].status ==
//! "deployed"` -> annotate, then patch the status Ready=True (rolled back if the
//! status patch fails). Branch A: the latest Helm storage Secret is pending-*,
//! older than the HelmRelease's timeout, no reconcile in progress, held past the
//! threshold -> suspend/resume toggle. Both branches share one guardrail.

pub mod actions;
pub mod controller;
pub mod decide;
pub mod goduration;
pub mod guardrail;
pub mod helm_storage;
pub mod metrics;
pub mod model;
pub mod pass;

use std::time::Duration;

/// Audit + idempotency annotation for branch B (exact key from the seed).
pub const ANNOTATION_CORRECTED: &str = "stuck-hr-recovery.openova.io/auto-corrected-at";
/// Audit annotation for branch A: when the pending release was unlocked.
pub const ANNOTATION_UNLOCKED_AT: &str = "stuck-hr-recovery.openova.io/auto-unlocked-at";
/// Idempotency annotation for branch A: which pending release (`<name>.v<N>`) was unlocked.
pub const ANNOTATION_UNLOCKED_RELEASE: &str = "stuck-hr-recovery.openova.io/auto-unlocked-release";
/// Operator acknowledgement of a tripped guardrail, on the agent's leader Lease:
/// an RFC 3339 time at or after the trip re-arms the recovery.
pub const ANNOTATION_GUARDRAIL_ACK: &str = "stuck-hr-recovery.openova.io/guardrail-ack";
/// Operator-greppable message of the branch B status correction.
pub const CORRECTED_MESSAGE: &str =
    "auto-corrected from deployed-but-unknown-Ready by stuck-hr-recovery (continuum-agent)";
/// Field manager of every write.
pub const FIELD_MANAGER: &str = "continuum-hr-recovery";

/// Tunables shared by the controller and the one-shot pass.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a stuck condition must hold before acting (seed default 5 min).
    pub threshold: Duration,
    /// Guardrail: at most this many actions per pass (seed default 10).
    pub max_actions: usize,
    /// Controller mode: length of one guardrail "pass" (the CronJob period it replaces).
    pub guardrail_window: Duration,
    /// Only report what would be done.
    pub dry_run: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            threshold: Duration::from_secs(300),
            max_actions: 10,
            guardrail_window: Duration::from_secs(300),
            dry_run: false,
        }
    }
}
