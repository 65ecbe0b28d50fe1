//! Prometheus metrics of the witness (one registry per process).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use continuum_shared::lease::Response;

pub struct Metrics {
    registry: Registry,
    /// Requests by operation and outcome (`granted`, `held`, `unauthenticated`, ...).
    pub requests: IntCounterVec,
    /// New grants (a new holder or epoch), takeovers included.
    pub grants: IntCounter,
    /// Current epoch per lease.
    pub epoch: IntGaugeVec,
    /// Store failures by error label.
    pub store_errors: IntCounterVec,
    /// Time to answer a request, by operation.
    pub latency: HistogramVec,
}

/// Stable outcome label of a response.
pub fn outcome(r: &Response) -> &'static str {
    match r {
        Response::Granted { .. } => "granted",
        Response::Held { .. } => "held",
        Response::EpochTooLow { .. } => "epoch_too_low",
        Response::NotHolder { .. } => "not_holder",
        Response::Released => "released",
        Response::State(_) => "state",
        Response::MetaStored => "meta_stored",
        Response::Error { .. } => "error",
    }
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "continuum_witness_requests_total",
                "Lease requests by operation and outcome.",
            ),
            &["op", "outcome"],
        )?;
        let grants = IntCounter::new(
            "continuum_witness_grants_total",
            "Leases granted to a new holder or epoch.",
        )?;
        let epoch = IntGaugeVec::new(
            Opts::new(
                "continuum_witness_lease_epoch",
                "Epoch of the last grant per lease.",
            ),
            &["lease"],
        )?;
        let store_errors = IntCounterVec::new(
            Opts::new(
                "continuum_witness_store_errors_total",
                "Store failures by error label.",
            ),
            &["error"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "continuum_witness_request_duration_seconds",
                "Time from receiving a decoded request to its answer.",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 1.0,
            ]),
            &["op"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(grants.clone()))?;
        registry.register(Box::new(epoch.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            grants,
            epoch,
            store_errors,
            latency,
        })
    }

    /// The registry, for components that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of every registered metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}
