//! Reading an in-process agent's Prometheus registry in tests: the series of
//! one metric family that carry given labels.

/// Every series of `name` in `reg` carrying all of `labels`.
pub fn series_in(
    reg: &prometheus::Registry,
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<prometheus::proto::Metric> {
    reg.gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_series_with_every_label() {
        let reg = prometheus::Registry::new();
        let c = prometheus::IntCounterVec::new(
            prometheus::Opts::new("actions_total", "help"),
            &["action", "result"],
        )
        .expect("counter");
        reg.register(Box::new(c.clone())).expect("register");
        c.with_label_values(&["fence", "ok"]).inc_by(2);
        c.with_label_values(&["fence", "failed"]).inc();
        c.with_label_values(&["promote", "ok"]).inc();
        let fence_ok = series_in(
            &reg,
            "actions_total",
            &[("action", "fence"), ("result", "ok")],
        );
        assert_eq!(fence_ok.len(), 1);
        assert_eq!(fence_ok[0].get_counter().get_value(), 2.0);
        assert_eq!(
            series_in(&reg, "actions_total", &[("action", "fence")]).len(),
            2
        );
        assert_eq!(series_in(&reg, "actions_total", &[]).len(), 3);
        assert!(series_in(&reg, "other_total", &[]).is_empty());
    }
}
