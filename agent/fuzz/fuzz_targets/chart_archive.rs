//! Fuzz the Flux guard's chart reader (chart artifacts come over the network
//! from source-controller): any bytes are either read into bounded contents or
//! rejected with an error; never a panic, never more than the unpacked-byte
//! budget, and the same bytes always give the same answer.
#![no_main]

use continuum_agent::flux_guard::chart::extract;
use libfuzzer_sys::fuzz_target;

/// Unpacked-byte budget per input (small, so a gzip bomb is cut off quickly).
const LIMIT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let first = extract(data, LIMIT);
    if let Ok(c) = &first {
        assert!(!c.charts.is_empty(), "Ok means a Chart.yaml was read");
        // The budget is shared by every nesting level: each CRD is a document of
        // its own in the unpacked bytes (far more than 32 bytes), so their number
        // is bounded by the budget whatever the nesting.
        assert!(
            (c.crds.len() + c.unverifiable.len()) as u64 <= LIMIT / 32,
            "{} CRDs from {LIMIT} bytes",
            c.crds.len()
        );
    }
    let again = extract(data, LIMIT);
    assert_eq!(
        first
            .as_ref()
            .map(|c| (c.charts.clone(), c.crds.clone(), c.unverifiable.clone()))
            .map_err(|e| e.label()),
        again
            .as_ref()
            .map(|c| (c.charts.clone(), c.crds.clone(), c.unverifiable.clone()))
            .map_err(|e| e.label()),
    );
});
