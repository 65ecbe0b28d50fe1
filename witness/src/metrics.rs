//! Prometheus metrics of the witness (one registry per process).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
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
    /// Children of `requests` and `latency` resolved once, so the renewal
    /// path does no label hashing: `[op][outcome]` and `[op]`.
    resolved_requests: Vec<IntCounter>,
    resolved_latency: Vec<Histogram>,
}

/// Operations, in [`op_index`] order.
const OPS: [&str; 5] = ["acquire", "renew", "release", "read", "update_meta"];
/// Outcomes, in [`outcome_index`] order.
const OUTCOMES: [&str; 8] = [
    "granted",
    "held",
    "epoch_too_low",
    "not_holder",
    "released",
    "state",
    "meta_stored",
    "error",
];

fn op_index(op: &str) -> Option<usize> {
    OPS.iter().position(|o| *o == op)
}

fn outcome_index(r: &Response) -> usize {
    match r {
        Response::Granted { .. } => 0,
        Response::Held { .. } => 1,
        Response::EpochTooLow { .. } => 2,
        Response::NotHolder { .. } => 3,
        Response::Released => 4,
        Response::State(_) => 5,
        Response::MetaStored => 6,
        Response::Error { .. } => 7,
    }
}

/// Stable outcome label of a response.
pub fn outcome(r: &Response) -> &'static str {
    OUTCOMES[outcome_index(r)]
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
        let mut resolved_requests = Vec::with_capacity(OPS.len() * OUTCOMES.len());
        let mut resolved_latency = Vec::with_capacity(OPS.len());
        for op in OPS {
            resolved_latency.push(latency.get_metric_with_label_values(&[op])?);
            for outcome in OUTCOMES {
                resolved_requests.push(requests.get_metric_with_label_values(&[op, outcome])?);
            }
        }
        Ok(Metrics {
            registry,
            requests,
            grants,
            epoch,
            store_errors,
            latency,
            resolved_requests,
            resolved_latency,
        })
    }

    /// Counts one answered request and its latency.
    pub fn record(&self, op: &str, response: &Response, seconds: f64) {
        let Some(i) = op_index(op) else {
            self.requests
                .with_label_values(&[op, outcome(response)])
                .inc();
            return;
        };
        if let Some(c) = self
            .resolved_requests
            .get(i * OUTCOMES.len() + outcome_index(response))
        {
            c.inc();
        }
        if let Some(h) = self.resolved_latency.get(i) {
            h.observe(seconds);
        }
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
