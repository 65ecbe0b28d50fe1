//! RBAC proofs from the test API server's request log: a role file is
//! *sufficient* when a scenario that exercises every code path gets no 403,
//! and *minimal* when every grant it holds (each rule's verb on each of its
//! resources, within its resourceNames and, for a Role, its namespace) was
//! used by some request, and removing any one verb makes a request the verb
//! covered fail with 403.
//!
//! Used by tests/tests/{hr_recovery,flux_guard,continuum_controller,pivot}.rs.

use std::collections::BTreeSet;
use std::future::Future;

use continuum_testapi::{rbac, PolicyRule, RequestRecord};

/// (API group, resource[/subresource], verb).
pub type Triple = (String, String, String);

fn full_resource(r: &RequestRecord) -> String {
    match &r.subresource {
        Some(s) => format!("{}/{s}", r.resource),
        None => r.resource.clone(),
    }
}

/// Whether `rule` alone allows the recorded request.
fn covers(rule: &PolicyRule, r: &RequestRecord) -> bool {
    rbac::allows_in(
        std::slice::from_ref(rule),
        &r.verb,
        &r.group,
        &r.resource,
        r.subresource.as_deref(),
        r.namespace.as_deref(),
        r.name.as_deref(),
    )
}

/// The triples the (authorized) requests used.
pub fn used(records: &[RequestRecord]) -> BTreeSet<Triple> {
    records
        .iter()
        .filter(|r| r.code != 403)
        .map(|r| (r.group.clone(), full_resource(r), r.verb.clone()))
        .collect()
}

/// The triples `rules` grant, leaving out `exempt` verbs.
pub fn granted(rules: &[PolicyRule], exempt: &[&str]) -> BTreeSet<Triple> {
    rules
        .iter()
        .flat_map(|r| {
            r.api_groups.iter().flat_map(move |g| {
                r.resources.iter().flat_map(move |res| {
                    r.verbs
                        .iter()
                        .map(move |v| (g.clone(), res.clone(), v.clone()))
                })
            })
        })
        .filter(|(_, _, v)| !exempt.contains(&v.as_str()))
        .collect()
}

/// One grant: `rule` narrowed to one group, resource and verb (its
/// resourceNames and namespace kept).
fn single(rule: &PolicyRule, group: &str, resource: &str, verb: &str) -> PolicyRule {
    PolicyRule {
        api_groups: vec![group.to_string()],
        resources: vec![resource.to_string()],
        verbs: vec![verb.to_string()],
        ..rule.clone()
    }
}

fn describe(rule: &PolicyRule) -> String {
    let mut s = format!("{:?} {:?}", rule.api_groups, rule.resources);
    if !rule.resource_names.is_empty() {
        s.push_str(&format!(" names {:?}", rule.resource_names));
    }
    if let Some(ns) = &rule.namespace {
        s.push_str(&format!(" in namespace {ns}"));
    }
    s
}

/// Sufficient (no request refused) and every grant used: the used triples
/// equal the granted ones, and each rule's every (group, resource, verb) —
/// within its names and namespace — allowed at least one recorded request.
/// `exempt` verbs (e.g. `escalate`, `bind`: checked by the real API server's
/// escalation prevention, invisible to the test server) are left out.
pub fn assert_sufficient_and_used(
    rules: &[PolicyRule],
    records: &[RequestRecord],
    exempt: &[&str],
) {
    let denied: Vec<&RequestRecord> = records.iter().filter(|r| r.code == 403).collect();
    assert!(denied.is_empty(), "the role lacks {denied:?}");
    let used = used(records);
    let granted = granted(rules, exempt);
    assert_eq!(
        used,
        granted,
        "granted but unused: {:?}; used but not granted: {:?}",
        granted.difference(&used).collect::<Vec<_>>(),
        used.difference(&granted).collect::<Vec<_>>()
    );
    let mut unused = Vec::new();
    for rule in rules {
        for g in &rule.api_groups {
            for res in &rule.resources {
                for v in rule.verbs.iter().filter(|v| !exempt.contains(&v.as_str())) {
                    let one = single(rule, g, res, v);
                    if !records.iter().any(|r| r.code != 403 && covers(&one, r)) {
                        unused.push(format!("{v} on {}", describe(&one)));
                    }
                }
            }
        }
    }
    assert!(unused.is_empty(), "grants no request used: {unused:?}");
}

/// Removes each verb (but `exempt`) from each rule in turn and runs
/// `scenario` with the rest, `parallel` scenarios at a time: each run must
/// record a 403 on a request the removed grant covered, so no grant is there
/// without a code path needing it.
pub async fn assert_each_verb_needed<F, Fut>(
    rules: &[PolicyRule],
    exempt: &[&str],
    parallel: usize,
    scenario: F,
) where
    F: Fn(Vec<PolicyRule>) -> Fut,
    Fut: Future<Output = Vec<RequestRecord>>,
{
    let cases: Vec<(usize, String)> = rules
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.verbs.iter().map(move |v| (i, v.clone())))
        .filter(|(_, v)| !exempt.contains(&v.as_str()))
        .collect();
    for chunk in cases.chunks(parallel.max(1)) {
        let runs = chunk.iter().map(|(i, verb)| {
            let mut fewer = rules.to_vec();
            fewer[*i].verbs.retain(|v| v != verb);
            scenario(fewer)
        });
        let results = futures::future::join_all(runs).await;
        for ((i, verb), recorded) in chunk.iter().zip(results) {
            let removed = PolicyRule {
                verbs: vec![verb.clone()],
                ..rules[*i].clone()
            };
            assert!(
                recorded
                    .iter()
                    .any(|r| r.code == 403 && covers(&removed, r)),
                "removing {verb} on {} went unnoticed",
                describe(&rules[*i])
            );
        }
    }
}
