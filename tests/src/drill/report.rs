//! The drill's figures: one JSON object, a text summary, and an SVG timeline
//! of one iteration (kill, lease expiry, promotion, acknowledged writes).

use serde::Serialize;

use super::DrillOpts;

/// One kill and its failover.
#[derive(Debug, Clone, Serialize)]
pub struct IterationReport {
    pub iteration: usize,
    pub killed: String,
    pub promoted: String,
    /// Epoch the survivor recorded in its database.
    pub epoch: Option<u64>,
    pub acked_writes: u64,
    pub lost_acked_writes: u64,
    pub split_brain: u64,
    /// Kill to first write acknowledged by the survivor.
    pub rto_ms: Option<f64>,
    /// Kill to the lease seen expired (or taken) at a majority of witnesses.
    pub lease_expired_ms: Option<f64>,
    /// Kill to the survivor out of recovery.
    pub promoted_ms: Option<f64>,
    /// When the kill happened, from the drill's start.
    pub killed_at_ms: f64,
    /// Failback by `continuum-agent switchover`: fence on the old primary to
    /// the first write acknowledged by the new one.
    pub switchover_ms: Option<f64>,
    /// Failback: last write acknowledged by the old primary to the first by
    /// the new one (what a client sees).
    pub switchover_gap_ms: Option<f64>,
    pub switchover_acked_writes: u64,
    /// The old primary needed pg_rewind to follow (a clean handover never does).
    pub switchover_rebuilt: bool,
    /// (region index, ms from the kill) of acknowledgements around the kill.
    #[serde(skip)]
    pub acks_ms: Vec<(usize, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// The whole drill.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub iterations: usize,
    pub witnesses: usize,
    pub ttl_ms: u64,
    pub acked_writes: u64,
    pub lost_acked_writes: u64,
    pub split_brain: u64,
    pub rto_ms: Percentiles,
    /// Failback switchovers: fence to first write on the new primary.
    pub switchover_ms: Percentiles,
    /// Failback switchovers that needed a rebuild of the old primary.
    pub switchover_rebuilds: u64,
    pub runs: Vec<IterationReport>,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(|a, b| a.total_cmp(b));
    Percentiles {
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Report {
    pub fn new(opts: &DrillOpts, runs: Vec<IterationReport>) -> Report {
        let rto: Vec<f64> = runs.iter().filter_map(|r| r.rto_ms).collect();
        let sw: Vec<f64> = runs.iter().filter_map(|r| r.switchover_ms).collect();
        Report {
            iterations: runs.len(),
            witnesses: opts.witnesses,
            ttl_ms: opts.ttl_ms,
            acked_writes: runs
                .iter()
                .map(|r| r.acked_writes + r.switchover_acked_writes)
                .sum(),
            lost_acked_writes: runs.iter().map(|r| r.lost_acked_writes).sum(),
            split_brain: runs.iter().map(|r| r.split_brain).sum(),
            rto_ms: percentiles(rto),
            switchover_ms: percentiles(sw),
            switchover_rebuilds: runs.iter().filter(|r| r.switchover_rebuilt).count() as u64,
            runs,
        }
    }

    pub fn text(&self) -> String {
        let mut out = format!(
            "region-kill drill: {} iteration(s), {} witness(es), TTL {} ms\n",
            self.iterations, self.witnesses, self.ttl_ms
        );
        out.push_str("  iter  killed     promoted   epoch  expired_ms  promoted_ms  rto_ms  acked  lost  split  failback_ms  gap_ms\n");
        for r in &self.runs {
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
            out.push_str(&format!(
                "  {:>4}  {:<9}  {:<9}  {:>5}  {:>10}  {:>11}  {:>6}  {:>5}  {:>4}  {:>5}  {:>11}  {:>6}\n",
                r.iteration,
                r.killed,
                r.promoted,
                r.epoch.map_or("-".into(), |e| e.to_string()),
                f(r.lease_expired_ms),
                f(r.promoted_ms),
                f(r.rto_ms),
                r.acked_writes + r.switchover_acked_writes,
                r.lost_acked_writes,
                r.split_brain,
                f(r.switchover_ms),
                f(r.switchover_gap_ms)
            ));
        }
        out.push_str(&format!(
            "  acknowledged writes {}, lost {}, split-brain intervals {}; RTO p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms\n",
            self.acked_writes,
            self.lost_acked_writes,
            self.split_brain,
            self.rto_ms.p50,
            self.rto_ms.p99,
            self.rto_ms.max
        ));
        out.push_str(&format!(
            "  failback by switchover (fence to first write on the new primary): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; old primary rebuilt {} time(s)\n",
            self.switchover_ms.p50,
            self.switchover_ms.p99,
            self.switchover_ms.max,
            self.switchover_rebuilds
        ));
        out
    }

    /// An SVG timeline of the first iteration.
    pub fn svg(&self) -> String {
        let Some(r) = self.runs.first() else {
            return String::from("<svg xmlns=\"http://www.w3.org/2000/svg\"/>");
        };
        let (w, h) = (900.0, 400.0);
        let lo = -2000.0f64;
        let hi = r.rto_ms.unwrap_or(0.0).max(r.promoted_ms.unwrap_or(0.0)) + 1500.0;
        let x = |ms: f64| 60.0 + (ms - lo) / (hi - lo) * (w - 90.0);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"20\" font-size=\"14\">Region-kill drill, iteration {}: {} killed, {} promoted (TTL {} ms, {} witness(es))</text>\n",
            r.iteration, r.killed, r.promoted, self.ttl_ms, self.witnesses
        );
        for (row, name) in [(0usize, "region-a"), (1, "region-b")] {
            let y = 80.0 + row as f64 * 50.0;
            s.push_str(&format!(
                "<text x=\"5\" y=\"{}\">{name}</text><line x1=\"60\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#ccc\"/>\n",
                y + 4.0,
                w - 30.0
            ));
            for (region, ms) in &r.acks_ms {
                if *region == row && *ms >= lo && *ms <= hi {
                    s.push_str(&format!(
                        "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1}\" y2=\"{2}\" stroke=\"{3}\"/>\n",
                        x(*ms),
                        y - 10.0,
                        y + 10.0,
                        if row == 0 { "#1f77b4" } else { "#2ca02c" }
                    ));
                }
            }
        }
        let mut mark = |ms: Option<f64>, label: &str, color: &str, dy: f64| {
            if let Some(ms) = ms {
                s.push_str(&marker(
                    x(ms),
                    w,
                    ms,
                    label,
                    color,
                    (45.0, 160.0),
                    180.0 + dy,
                ));
            }
        };
        mark(Some(0.0), "kill", "#d62728", 0.0);
        mark(r.lease_expired_ms, "lease expired", "#ff7f0e", 16.0);
        mark(r.promoted_ms, "promoted", "#9467bd", 32.0);
        mark(r.rto_ms, "first write on survivor (RTO)", "#2ca02c", 48.0);
        // Failback by switchover, on its own axis (it runs later): the old
        // primary's fence, its last acknowledged write, the new primary's
        // first.
        if let Some(sw) = r.switchover_ms {
            let (flo, fhi) = (-500.0f64, sw.max(0.0) + 500.0);
            let fx = |ms: f64| 60.0 + (ms - flo) / (fhi - flo) * (w - 90.0);
            s.push_str(&format!(
                "<text x=\"10\" y=\"262\" font-size=\"14\">Failback by switchover ({} back to {})</text>\n\
                 <line x1=\"60\" x2=\"{}\" y1=\"300\" y2=\"300\" stroke=\"#ccc\"/>\n",
                r.promoted,
                r.killed,
                w - 30.0
            ));
            let last_old = r.switchover_gap_ms.map(|g| sw - g);
            for (i, (ms, label, color)) in [
                (Some(0.0), "fence (old primary)", "#d62728"),
                (last_old, "last write on old primary", "#1f77b4"),
                (Some(sw), "first write on new primary", "#2ca02c"),
            ]
            .into_iter()
            .enumerate()
            {
                let Some(ms) = ms else { continue };
                s.push_str(&marker(
                    fx(ms),
                    w,
                    ms,
                    label,
                    color,
                    (275.0, 315.0),
                    330.0 + 14.0 * i as f64,
                ));
            }
        }
        s.push_str(&format!(
            "<text x=\"10\" y=\"{}\">ticks: acknowledged commits; lost acknowledged writes {}, split-brain {}</text>\n</svg>\n",
            h - 10.0,
            r.lost_acked_writes,
            r.split_brain
        ));
        s
    }
}

/// One dashed milestone line at `px` (from `y.0` to `y.1`) with its label
/// at height `ty`; labels near the right edge of a `w`-wide image grow
/// leftwards.
fn marker(px: f64, w: f64, ms: f64, label: &str, color: &str, y: (f64, f64), ty: f64) -> String {
    let (tx, anchor) = if px > w * 0.6 {
        (px - 3.0, "end")
    } else {
        (px + 3.0, "start")
    };
    format!(
        "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/>\
         <text x=\"{tx:.1}\" y=\"{ty}\" fill=\"{color}\" text-anchor=\"{anchor}\">{label} {ms:.0} ms</text>\n",
        y.0, y.1
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> IterationReport {
        IterationReport {
            iteration: 1,
            killed: "region-a".into(),
            promoted: "region-b".into(),
            epoch: Some(2),
            acked_writes: 10,
            lost_acked_writes: 0,
            split_brain: 0,
            rto_ms: Some(2100.0),
            lease_expired_ms: Some(1900.0),
            promoted_ms: Some(2000.0),
            killed_at_ms: 5000.0,
            switchover_ms: Some(400.0),
            switchover_gap_ms: Some(350.0),
            switchover_acked_writes: 5,
            switchover_rebuilt: false,
            acks_ms: vec![(0, -10.0), (1, 2100.0)],
        }
    }

    fn report(runs: Vec<IterationReport>) -> Report {
        Report {
            iterations: runs.len(),
            witnesses: 3,
            ttl_ms: 2000,
            acked_writes: 10,
            lost_acked_writes: 0,
            split_brain: 0,
            rto_ms: percentiles(vec![2100.0]),
            switchover_ms: percentiles(vec![400.0]),
            switchover_rebuilds: 0,
            runs,
        }
    }

    #[test]
    fn svg_marks_every_milestone_of_the_run() {
        let svg = report(vec![run()]).svg();
        for label in [
            "kill 0 ms",
            "lease expired 1900 ms",
            "promoted 2000 ms",
            "first write on survivor (RTO) 2100 ms",
            "fence (old primary) 0 ms",
            "last write on old primary 50 ms",
            "first write on new primary 400 ms",
        ] {
            assert!(svg.contains(label), "{label} missing from\n{svg}");
        }
        assert!(svg.trim_end().ends_with("</svg>"));
        // Without a failback the fence panel is left out, not invented.
        let mut no_failback = run();
        no_failback.switchover_ms = None;
        assert!(!report(vec![no_failback])
            .svg()
            .contains("fence (old primary)"));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 99.0), 10.0);
        assert_eq!(percentile(&v[..1], 99.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
