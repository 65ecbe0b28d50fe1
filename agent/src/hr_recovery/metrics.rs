//! Prometheus metrics of the recovery controller (one registry per component).

use prometheus::{
    Histogram, HistogramOpts, HistogramTimer, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    /// `branch` = deployed_unknown_ready | pending_release; `outcome` = done | dry_run | failed | guardrail.
    pub actions: IntCounterVec,
    pub skipped: IntCounterVec,
    pub errors: IntCounterVec,
    pub reconcile: Histogram,
    pub guardrail_tripped: IntGauge,
    pub guardrail_trips: IntCounter,
    pub events_failed: IntCounter,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            actions: IntCounterVec::new(
                Opts::new(
                    "continuum_hr_recovery_actions_total",
                    "Recovery actions by branch and outcome",
                ),
                &["branch", "outcome"],
            )?,
            skipped: IntCounterVec::new(
                Opts::new(
                    "continuum_hr_recovery_skipped_total",
                    "HelmReleases skipped for bad input, by reason",
                ),
                &["reason"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "continuum_hr_recovery_reconcile_errors_total",
                    "Reconcile errors by error kind",
                ),
                &["error"],
            )?,
            reconcile: Histogram::with_opts(
                HistogramOpts::new(
                    "continuum_hr_recovery_reconcile_duration_seconds",
                    "Duration of one reconcile",
                )
                .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )?,
            guardrail_tripped: IntGauge::new(
                "continuum_hr_recovery_guardrail_tripped",
                "1 while the guardrail is tripped and not acknowledged",
            )?,
            guardrail_trips: IntCounter::new(
                "continuum_hr_recovery_guardrail_trips_total",
                "Times the guardrail tripped",
            )?,
            events_failed: IntCounter::new(
                "continuum_hr_recovery_events_failed_total",
                "Kubernetes Events that could not be published",
            )?,
        };
        registry.register(Box::new(m.actions.clone()))?;
        registry.register(Box::new(m.skipped.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.reconcile.clone()))?;
        registry.register(Box::new(m.guardrail_tripped.clone()))?;
        registry.register(Box::new(m.guardrail_trips.clone()))?;
        registry.register(Box::new(m.events_failed.clone()))?;
        Ok(m)
    }

    /// Observes the reconcile duration when dropped, whatever path the reconcile took.
    pub fn reconcile_timer(&self) -> HistogramTimer {
        self.reconcile.start_timer()
    }
}
