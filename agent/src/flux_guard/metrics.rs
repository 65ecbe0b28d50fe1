//! Prometheus metrics of the Flux guard (registered on the agent's registry).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    /// Chart revisions checked, by outcome: pass | blocked | overridden.
    pub checks: IntCounterVec,
    /// Blocks, by violation reason (one per distinct reason of a blocked revision).
    pub blocked_total: IntCounterVec,
    /// HelmReleases currently held suspended by the guard.
    pub blocked: IntGauge,
    /// Revisions let through by an operator override despite violations.
    pub overrides: IntCounter,
    /// Errors by kind (fetch, chart, API); the check is retried.
    pub errors: IntCounterVec,
    /// HelmReleases not checked, by reason (no chart source, no artifact yet).
    pub skipped: IntCounterVec,
    /// Chart artifacts downloaded.
    pub fetches: IntCounter,
    pub events_failed: IntCounter,
    /// 1 while every Flux controller Deployment is available.
    pub flux_healthy: IntGauge,
    /// Snapshot writes, and the stored (compressed) size.
    pub snapshots: IntCounter,
    pub snapshot_bytes: IntGauge,
    /// Objects re-applied from the snapshot, by kind.
    pub restores: IntCounterVec,
    /// Seconds from a Flux controller's loss (deletionTimestamp, else first
    /// seen gone) to having re-applied it.
    pub restore_seconds: Histogram,
    /// Seconds from the loss to the re-applied controller being available (the spec's < 60 s).
    pub restore_available_seconds: Histogram,
    /// 1 when the running Flux version differs from the one the Flux HelmRelease would install.
    pub version_skew: IntGaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            checks: IntCounterVec::new(
                Opts::new(
                    "continuum_flux_guard_checks_total",
                    "Chart revisions checked, by outcome (pass, blocked, overridden)",
                ),
                &["outcome"],
            )?,
            blocked_total: IntCounterVec::new(
                Opts::new(
                    "continuum_flux_guard_blocked_total",
                    "HelmRelease chart revisions blocked, by reason",
                ),
                &["reason"],
            )?,
            blocked: IntGauge::new(
                "continuum_flux_guard_blocked",
                "HelmReleases currently suspended by the Flux guard",
            )?,
            overrides: IntCounter::new(
                "continuum_flux_guard_overrides_total",
                "Unsafe chart revisions let through by the operator override annotation",
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "continuum_flux_guard_errors_total",
                    "Flux guard errors by kind",
                ),
                &["error"],
            )?,
            skipped: IntCounterVec::new(
                Opts::new(
                    "continuum_flux_guard_skipped_total",
                    "HelmReleases not checked, by reason",
                ),
                &["reason"],
            )?,
            fetches: IntCounter::new(
                "continuum_flux_guard_artifact_fetches_total",
                "Chart artifacts downloaded",
            )?,
            events_failed: IntCounter::new(
                "continuum_flux_guard_events_failed_total",
                "Kubernetes Events the Flux guard could not publish",
            )?,
            flux_healthy: IntGauge::new(
                "continuum_flux_guard_flux_healthy",
                "1 while every Flux controller Deployment is available",
            )?,
            snapshots: IntCounter::new(
                "continuum_flux_guard_snapshots_total",
                "Flux snapshot ConfigMap writes",
            )?,
            snapshot_bytes: IntGauge::new(
                "continuum_flux_guard_snapshot_bytes",
                "Size of the stored (gzip) Flux snapshot",
            )?,
            restores: IntCounterVec::new(
                Opts::new(
                    "continuum_flux_guard_restores_total",
                    "Objects re-applied from the Flux snapshot, by kind",
                ),
                &["kind"],
            )?,
            restore_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "continuum_flux_guard_restore_seconds",
                    "Time from a Flux controller's loss (deletionTimestamp, else first seen gone) to having re-applied it",
                )
                .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
            )?,
            restore_available_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "continuum_flux_guard_restore_available_seconds",
                    "Time from a Flux controller's loss to the re-applied Deployment being available again",
                )
                .buckets(vec![0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0]),
            )?,
            version_skew: IntGaugeVec::new(
                Opts::new(
                    "continuum_flux_version_skew",
                    "1 when the running Flux version differs from the version the Flux HelmRelease would install",
                ),
                &["helmrelease", "running", "desired"],
            )?,
        };
        registry.register(Box::new(m.checks.clone()))?;
        registry.register(Box::new(m.blocked_total.clone()))?;
        registry.register(Box::new(m.blocked.clone()))?;
        registry.register(Box::new(m.overrides.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.skipped.clone()))?;
        registry.register(Box::new(m.fetches.clone()))?;
        registry.register(Box::new(m.events_failed.clone()))?;
        registry.register(Box::new(m.flux_healthy.clone()))?;
        registry.register(Box::new(m.snapshots.clone()))?;
        registry.register(Box::new(m.snapshot_bytes.clone()))?;
        registry.register(Box::new(m.restores.clone()))?;
        registry.register(Box::new(m.restore_seconds.clone()))?;
        registry.register(Box::new(m.restore_available_seconds.clone()))?;
        registry.register(Box::new(m.version_skew.clone()))?;
        Ok(m)
    }
}
