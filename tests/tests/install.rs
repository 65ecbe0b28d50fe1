//! The install artefacts: kustomize renders (offline, `kubectl kustomize`),
//! what every rendered workload may do, that each container's arguments are
//! accepted by the real binary, RBAC bindings per mode, CRDs and ClusterRoles
//! equal to the generated and proven ones, alert rules (`promtool check
//! rules`) and the dashboard reading only metrics the code exports, the
//! witness systemd unit (`systemd-analyze`), the bootstrap-kit slot and the
//! Dockerfiles.
//!
//! Rendering needs kubectl with kustomize v4+ (components); without kubectl
//! those tests print why and return.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};

use continuum_tests::bins::workspace_bin;
use continuum_tests::prometheus_proc::{
    code_metric_names, is_known, promql_metric_names, repo_root,
};
use serde_json::Value;

/// Every kustomization shipped; `manifests/base` and `manifests/witness` are
/// the default renders (no opt-in component).
const RENDERS: &[&str] = &[
    "manifests/base",
    "manifests/witness",
    "manifests/overlays/example",
    "manifests/overlays/witness-site",
    "manifests/components/monitoring",
    "manifests/components/source-pivot",
    "manifests/components/flux-source-access",
];
const DEFAULT_RENDERS: &[&str] = &["manifests/base", "manifests/witness"];

fn kubectl() -> Option<&'static str> {
    let Ok(out) = Command::new("kubectl")
        .args(["version", "--client"])
        .stderr(Stdio::null())
        .output()
    else {
        continuum_tests::skip::skip(
            "kustomize renders",
            "kubectl not found (install kubectl with kustomize v4+ to run them)",
        );
        return None;
    };
    // Components need kustomize v3.7+; Debian's kubernetes-client (1.20)
    // embeds v2 and cannot render them: fail loudly rather than skip.
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    assert!(
        out.status.success() && major.is_some_and(|m| m >= 4),
        "kubectl is too old for these manifests (needs kustomize v4+):\n{text}"
    );
    Some("kubectl")
}

fn parse_docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|d| {
            let v: serde_yaml::Value = serde_yaml::Value::deserialize(d).expect("valid YAML");
            let j: Value = serde_json::to_value(v).expect("YAML as JSON");
            (!j.is_null()).then_some(j)
        })
        .collect()
}

/// `kubectl kustomize <dir>`: the rendered objects and the raw text.
fn render(kubectl: &str, dir: &str) -> (Vec<Value>, String) {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(repo_root().join(dir))
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 render");
    (parse_docs(&text), text)
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or("")
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

fn of_kind<'a>(objs: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objs.iter().filter(move |o| kind(o) == k)
}

fn workloads(objs: &[Value]) -> Vec<&Value> {
    objs.iter()
        .filter(|o| {
            matches!(
                kind(o),
                "Deployment" | "DaemonSet" | "StatefulSet" | "Job" | "CronJob"
            )
        })
        .collect()
}

fn pod_spec(w: &Value) -> &Value {
    &w["spec"]["template"]["spec"]
}

fn containers(w: &Value) -> Vec<&Value> {
    let spec = pod_spec(w);
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .collect()
}

/// Every object of every render, with the render it came from.
fn all_renders(kubectl: &str) -> Vec<(&'static str, Vec<Value>)> {
    RENDERS.iter().map(|d| (*d, render(kubectl, d).0)).collect()
}

#[test]
fn every_kustomization_renders_offline() {
    let Some(k) = kubectl() else { return };
    for dir in RENDERS.iter().chain(["deploy/bootstrap-kit"].iter()) {
        let (objs, _) = render(k, dir);
        assert!(!objs.is_empty(), "{dir} renders nothing");
        for o in &objs {
            assert!(
                !kind(o).is_empty() && !name(o).is_empty() && o["apiVersion"].is_string(),
                "{dir}: object without apiVersion/kind/name: {o}"
            );
        }
    }
    let (base, _) = render(k, "manifests/base");
    let kinds: BTreeSet<&str> = base.iter().map(kind).collect();
    for want in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "DaemonSet",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(want), "base has no {want}: {kinds:?}");
    }
    let (witness, _) = render(k, "manifests/witness");
    assert!(of_kind(&witness, "Deployment").any(|d| name(d) == "continuum-witness"));
}

#[test]
fn default_renders_contain_no_monitoring_coreos_com_object() {
    let Some(k) = kubectl() else { return };
    for dir in DEFAULT_RENDERS {
        let (objs, text) = render(k, dir);
        assert!(
            !text.contains("monitoring.coreos.com"),
            "{dir} references monitoring.coreos.com; observability toggles default off (seed 004, 3.9)"
        );
        assert!(objs.iter().all(|o| !o["apiVersion"]
            .as_str()
            .unwrap_or("")
            .starts_with("monitoring.coreos.com")));
    }
    // Opt-in: the monitoring component adds exactly the two kinds, and its
    // ServiceMonitor selects every metrics Service of the render.
    let (objs, _) = render(k, "manifests/overlays/example");
    let mon: Vec<&str> = objs
        .iter()
        .filter(|o| {
            o["apiVersion"]
                .as_str()
                .unwrap_or("")
                .starts_with("monitoring.coreos.com/")
        })
        .map(kind)
        .collect();
    assert_eq!(
        mon,
        ["PrometheusRule", "ServiceMonitor"],
        "monitoring objects: {mon:?}"
    );
    let sm = of_kind(&objs, "ServiceMonitor")
        .next()
        .expect("ServiceMonitor");
    let selector = sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let port = sm["spec"]["endpoints"][0]["port"]
        .as_str()
        .expect("endpoint port");
    let selected: Vec<&Value> = of_kind(&objs, "Service")
        .filter(|s| {
            selector
                .iter()
                .all(|(k, v)| &s["metadata"]["labels"][k] == v)
        })
        .collect();
    assert_eq!(
        selected.len(),
        4,
        "agent, failover, node-pivot and source-pivot Services"
    );
    for s in &selected {
        assert!(
            s["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == port),
            "Service {} has no port named {port}",
            name(s)
        );
    }
    // Every Deployment/DaemonSet has a metrics Service selecting its pods.
    for w in workloads(&objs) {
        let labels = &w["spec"]["template"]["metadata"]["labels"];
        assert!(
            selected.iter().any(|s| s["spec"]["selector"]
                .as_object()
                .is_some_and(|sel| sel.iter().all(|(k, v)| &labels[k] == v))),
            "{} is not scraped",
            name(w)
        );
    }
}

/// Workloads allowed to run as uid 0 (with no capability at all), and why.
const ROOT_ALLOWED: &[(&str, &str)] = &[(
    "continuum-node-pivot",
    "writes /etc/rancher/k3s/registries.yaml in a root-owned 0755 host directory",
)];

#[test]
fn every_workload_is_locked_down_with_requests_and_limits() {
    let Some(k) = kubectl() else { return };
    let mut seen = 0;
    for (dir, objs) in all_renders(k) {
        for w in workloads(&objs) {
            seen += 1;
            let n = name(w);
            let spec = pod_spec(w);
            let psc = &spec["securityContext"];
            let root_ok = ROOT_ALLOWED.iter().any(|(r, _)| *r == n);
            for key in ["hostNetwork", "hostPID", "hostIPC"] {
                assert!(spec[key] != true, "{dir} {n}: {key}");
            }
            for c in containers(w) {
                let cn = c["name"].as_str().unwrap_or("");
                let sc = &c["securityContext"];
                let at = format!("{dir} {n}/{cn}");
                assert_eq!(
                    sc["readOnlyRootFilesystem"], true,
                    "{at}: readOnlyRootFilesystem"
                );
                assert_eq!(
                    sc["allowPrivilegeEscalation"], false,
                    "{at}: allowPrivilegeEscalation"
                );
                assert!(sc["privileged"] != true, "{at}: privileged");
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{at}: drop ALL"
                );
                assert!(
                    sc["capabilities"]["add"].is_null(),
                    "{at}: adds capabilities"
                );
                let seccomp = sc["seccompProfile"]["type"]
                    .as_str()
                    .or(psc["seccompProfile"]["type"].as_str());
                assert_eq!(seccomp, Some("RuntimeDefault"), "{at}: seccomp");
                let uid = sc["runAsUser"].as_i64().or(psc["runAsUser"].as_i64());
                let non_root = sc["runAsNonRoot"]
                    .as_bool()
                    .or(psc["runAsNonRoot"].as_bool());
                if root_ok {
                    assert_eq!(uid, Some(0), "{at}: the root exception must say so");
                } else {
                    assert_eq!(non_root, Some(true), "{at}: runAsNonRoot");
                    assert!(uid.is_some_and(|u| u > 0), "{at}: runAsUser {uid:?}");
                }
                for kind in ["requests", "limits"] {
                    for res in ["cpu", "memory"] {
                        assert!(
                            c["resources"][kind][res].is_string()
                                || c["resources"][kind][res].is_number(),
                            "{at}: no {kind}.{res}"
                        );
                    }
                }
            }
        }
    }
    assert!(seen >= 5, "only {seen} workloads rendered");
}

#[test]
fn the_only_host_path_is_etc_rancher_k3s_on_the_node_pivot_daemonset() {
    let Some(k) = kubectl() else { return };
    let mut found = Vec::new();
    for (dir, objs) in all_renders(k) {
        for w in workloads(&objs) {
            for v in pod_spec(w)["volumes"].as_array().into_iter().flatten() {
                if let Some(p) = v["hostPath"]["path"].as_str() {
                    found.push((dir, kind(w).to_string(), name(w).to_string(), p.to_string()));
                }
            }
        }
    }
    assert!(
        !found.is_empty(),
        "the node pivot DaemonSet mounts no host path"
    );
    for (dir, k, n, p) in &found {
        assert_eq!(
            (k.as_str(), n.as_str(), p.as_str()),
            ("DaemonSet", "continuum-node-pivot", "/etc/rancher/k3s"),
            "{dir}: unexpected hostPath"
        );
    }
}

/// Whether a NetworkPolicy podSelector selects pods with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let by_labels = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| &labels[k] == v));
    let by_exprs = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let vals = e["values"].as_array().cloned().unwrap_or_default();
            match e["operator"].as_str() {
                Some("In") => vals.contains(&labels[e["key"].as_str().unwrap_or("")]),
                Some("Exists") => !labels[e["key"].as_str().unwrap_or("")].is_null(),
                _ => false,
            }
        });
    by_labels && by_exprs
}

#[test]
fn network_policies_deny_by_default_and_open_only_each_pods_ports() {
    let Some(k) = kubectl() else { return };
    for dir in ["manifests/overlays/example", "manifests/witness"] {
        let (objs, _) = render(k, dir);
        let policies: Vec<&Value> = of_kind(&objs, "NetworkPolicy").collect();
        for w in workloads(&objs) {
            let labels = &w["spec"]["template"]["metadata"]["labels"];
            let mine: Vec<&&Value> = policies
                .iter()
                .filter(|p| selects(&p["spec"]["podSelector"], labels))
                .collect();
            let types: BTreeSet<&str> = mine
                .iter()
                .flat_map(|p| p["spec"]["policyTypes"].as_array().into_iter().flatten())
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(
                types,
                ["Egress", "Ingress"].into(),
                "{dir} {}: not isolated both ways",
                name(w)
            );
            // Allowed ingress ports are exactly the container ports.
            let allowed: BTreeSet<i64> = mine
                .iter()
                .flat_map(|p| p["spec"]["ingress"].as_array().into_iter().flatten())
                .flat_map(|r| r["ports"].as_array().into_iter().flatten())
                .filter_map(|p| p["port"].as_i64())
                .collect();
            let ports: BTreeSet<i64> = containers(w)
                .iter()
                .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                .filter_map(|p| p["containerPort"].as_i64())
                .collect();
            assert_eq!(allowed, ports, "{dir} {}: ingress ports", name(w));
            // Every egress rule names its ports.
            for p in &mine {
                for r in p["spec"]["egress"].as_array().into_iter().flatten() {
                    assert!(
                        r["ports"].is_array(),
                        "{dir} {}: egress to any port",
                        name(p)
                    );
                }
            }
        }
    }
}

/// `kubectl kustomize` of a throw-away overlay: manifests/base plus `components`.
fn render_base_with(kubectl: &str, components: &[&str]) -> Vec<Value> {
    // kustomize refuses absolute paths: a directory two levels below the
    // repository root, referring to ../../manifests/...
    let parent = repo_root().join("target");
    std::fs::create_dir_all(&parent).expect("target dir");
    let dir = tempfile::tempdir_in(&parent).expect("tempdir");
    let rel = |p: &str| format!("../../{p}");
    let mut text = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n",
        rel("manifests/base")
    );
    for c in components {
        text.push_str(&format!("  - {}\n", rel(c)));
    }
    std::fs::write(dir.path().join("kustomization.yaml"), text).expect("write overlay");
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir.path())
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize base + {components:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_docs(&String::from_utf8(out.stdout).expect("utf-8 render"))
}

/// Flux's own policies in flux-system (`allow-egress`: ingress only from
/// flux-system pods) would stop the Flux guard's artifact fetch;
/// components/flux-source-access admits exactly the `run` pods to
/// source-controller's artifact port, and the agent's egress allows it.
#[test]
fn flux_source_access_admits_only_the_flux_guard_to_source_controller() {
    let Some(k) = kubectl() else { return };
    // The default render leaves flux-system alone.
    let (base, _) = render(k, "manifests/base");
    assert!(
        base.iter()
            .all(|o| o["metadata"]["namespace"] != "flux-system"),
        "manifests/base writes into flux-system"
    );
    let objs = render_base_with(k, &["manifests/components/flux-source-access"]);
    let in_flux: Vec<&Value> = objs
        .iter()
        .filter(|o| o["metadata"]["namespace"] == "flux-system")
        .collect();
    assert_eq!(in_flux.len(), 1, "one object in flux-system: {in_flux:?}");
    let p = in_flux[0];
    assert_eq!(kind(p), "NetworkPolicy");
    let spec = &p["spec"];
    assert_eq!(
        spec["podSelector"]["matchLabels"],
        serde_json::json!({"app": "source-controller"})
    );
    // Ingress only: source-controller's egress stays as Flux's policies have it.
    assert_eq!(spec["policyTypes"], serde_json::json!(["Ingress"]));
    let rules = spec["ingress"].as_array().expect("ingress");
    assert_eq!(rules.len(), 1);
    let ports: Vec<i64> = rules[0]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, [9090], "source-controller's `http` container port");
    let from = rules[0]["from"].as_array().expect("from");
    assert_eq!(from.len(), 1);
    assert_eq!(
        from[0]["namespaceSelector"]["matchLabels"],
        serde_json::json!({"kubernetes.io/metadata.name": "continuum-system"})
    );
    for w in workloads(&objs) {
        let labels = &w["spec"]["template"]["metadata"]["labels"];
        assert_eq!(w["metadata"]["namespace"], "continuum-system");
        assert_eq!(
            selects(&from[0]["podSelector"], labels),
            name(w) == "continuum-agent",
            "{} admitted to source-controller",
            name(w)
        );
    }
    // The agent's own egress allows the same port.
    let agent = of_kind(&objs, "Deployment")
        .find(|d| name(d) == "continuum-agent")
        .expect("agent Deployment");
    let labels = &agent["spec"]["template"]["metadata"]["labels"];
    let egress: BTreeSet<i64> = of_kind(&objs, "NetworkPolicy")
        .filter(|p| p["metadata"]["namespace"] == "continuum-system")
        .filter(|p| selects(&p["spec"]["podSelector"], labels))
        .flat_map(|p| p["spec"]["egress"].as_array().into_iter().flatten())
        .flat_map(|r| r["ports"].as_array().into_iter().flatten())
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert!(egress.contains(&9090), "agent egress ports {egress:?}");
}

/// `<bin> <subcommand...> --help` text, and whether `<bin> <args...> --help`
/// parses (clap validates every flag and value before it reaches `--help`).
fn help(bin: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin)
        .args(args)
        .arg("--help")
        .env_clear()
        .output()
        .expect("run binary");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The port of an `--x=host:port` argument.
fn port_of(arg: &str) -> Option<i64> {
    arg.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

#[test]
fn container_args_and_env_are_accepted_by_the_real_binaries() {
    let Some(k) = kubectl() else { return };
    let mut checked = 0;
    for (dir, objs) in all_renders(k) {
        for w in workloads(&objs) {
            for c in containers(w) {
                let image = c["image"].as_str().unwrap_or("");
                let bin_name = if image.contains("continuum-witness") {
                    "continuum-witness"
                } else if image.contains("continuum-agent") {
                    "continuum-agent"
                } else {
                    panic!("{dir} {}: unknown image {image}", name(w));
                };
                let bin = workspace_bin(bin_name).expect("binary");
                let args: Vec<&str> = c["args"]
                    .as_array()
                    .expect("args")
                    .iter()
                    .map(|a| a.as_str().expect("string arg"))
                    .collect();
                let sub: Vec<&str> = args
                    .iter()
                    .copied()
                    .take_while(|a| !a.starts_with('-'))
                    .collect();
                assert!(
                    !sub.is_empty(),
                    "{dir} {}: no subcommand in {args:?}",
                    name(w)
                );
                let at = format!("{dir} {} ({bin_name} {})", name(w), sub.join(" "));
                let (ok, text) = help(&bin, &sub);
                assert!(ok, "{at}: unknown subcommand:\n{text}");
                for a in &args[sub.len()..] {
                    let flag = a.split('=').next().unwrap_or(a);
                    assert!(
                        text.contains(&format!("{flag} <")) || text.contains(&format!("{flag}\n")),
                        "{at}: {flag} is not a flag of this subcommand:\n{text}"
                    );
                }
                let (ok, text) = help(&bin, &args);
                assert!(ok, "{at}: the binary rejects {args:?}:\n{text}");
                for e in c["env"].as_array().into_iter().flatten() {
                    let var = e["name"].as_str().expect("env name");
                    assert!(
                        text.contains(var),
                        "{at}: env {var} is read by no flag:\n{text}"
                    );
                }
                // The probe/metrics port is the one the health flag listens on.
                let health = args
                    .iter()
                    .find(|a| a.starts_with("--health-addr=") || a.starts_with("--health-listen="));
                let health_port = health.and_then(|a| port_of(a)).expect("health port flag");
                let ports: Vec<&Value> = c["ports"].as_array().into_iter().flatten().collect();
                let metrics = ports
                    .iter()
                    .find(|p| p["name"] == "metrics")
                    .expect("port named metrics");
                assert_eq!(metrics["containerPort"].as_i64(), Some(health_port), "{at}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 5, "only {checked} containers checked");
}

/// ClusterRoles and Roles of manifests/rbac/*.yaml (by kind and name), and
/// the file names.
fn proven_rbac() -> (BTreeMap<(String, String), Value>, Vec<String>) {
    let dir = repo_root().join("manifests/rbac");
    let mut roles = BTreeMap::new();
    let mut files = Vec::new();
    for e in std::fs::read_dir(&dir).expect("manifests/rbac") {
        let p = e.expect("entry").path();
        let f = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if f == "kustomization.yaml" || !f.ends_with(".yaml") {
            continue;
        }
        files.push(f);
        for o in parse_docs(&std::fs::read_to_string(&p).expect("read")) {
            if matches!(kind(&o), "ClusterRole" | "Role") {
                roles.insert((kind(&o).to_string(), name(&o).to_string()), o);
            }
        }
    }
    files.sort();
    (roles, files)
}

#[test]
fn roles_in_the_render_are_exactly_the_proven_rbac_files() {
    let (proven, files) = proven_rbac();
    // Every proven file is part of the kustomization (so it ships).
    let kust: Value = serde_json::to_value(
        serde_yaml::from_str::<serde_yaml::Value>(
            &std::fs::read_to_string(repo_root().join("manifests/rbac/kustomization.yaml"))
                .expect("rbac kustomization"),
        )
        .expect("yaml"),
    )
    .expect("json");
    let mut listed: Vec<String> = kust["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("path").to_string())
        .collect();
    listed.sort();
    assert_eq!(
        listed, files,
        "manifests/rbac/kustomization.yaml must list every rbac/*.yaml"
    );
    let Some(k) = kubectl() else { return };
    let (objs, _) = render(k, "manifests/base");
    let rendered: BTreeMap<(String, String), Value> = objs
        .iter()
        .filter(|o| matches!(kind(o), "ClusterRole" | "Role"))
        .map(|r| ((kind(r).to_string(), name(r).to_string()), r.clone()))
        .collect();
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        proven.keys().collect::<Vec<_>>(),
        "roles shipped vs proven"
    );
    for (n, r) in &rendered {
        assert_eq!(r, &proven[n], "{n:?} differs from manifests/rbac");
    }
    // Roles (and their bindings) live in the agents' namespace, where the
    // leader Leases are; no ClusterRole grants Leases.
    for o in objs
        .iter()
        .filter(|o| matches!(kind(o), "Role" | "RoleBinding"))
    {
        assert_eq!(
            o["metadata"]["namespace"],
            "continuum-system",
            "{} {}",
            kind(o),
            name(o)
        );
    }
    for r in of_kind(&objs, "ClusterRole") {
        for rule in r["rules"].as_array().into_iter().flatten() {
            assert!(
                !rule["apiGroups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|g| g == "coordination.k8s.io" || g == "*"),
                "ClusterRole {} grants Leases cluster-wide",
                name(r)
            );
        }
    }
}

/// The value of `--flag=value` in a container's args.
fn flag<'a>(c: &'a Value, flag: &str) -> Option<&'a str> {
    c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

/// Each leader-elected Deployment's Lease (its `--lease-name` /
/// `--leader-lease`, in its own namespace) is what its ServiceAccount's
/// Role grants: create (RBAC cannot name-limit a POST), and get/update of
/// exactly that name.
#[test]
fn leader_leases_are_granted_by_name_in_the_agents_namespace() {
    let Some(k) = kubectl() else { return };
    let (objs, _) = render(k, "manifests/base");
    let mut checked = 0;
    for (deploy, lease_flag) in [
        ("continuum-agent", "--lease-name"),
        ("continuum-failover", "--leader-lease"),
    ] {
        let w = of_kind(&objs, "Deployment")
            .find(|d| name(d) == deploy)
            .expect("Deployment");
        let c = containers(w)[0];
        let lease = flag(c, lease_flag).expect("lease name flag");
        let ns_from_pod = c["env"].as_array().into_iter().flatten().any(|e| {
            e["name"] == "CONTINUUM_LEASE_NAMESPACE"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        });
        assert!(ns_from_pod, "{deploy}: Lease namespace is not the pod's");
        let sa = pod_spec(w)["serviceAccountName"].as_str().expect("SA");
        let roles: Vec<&Value> = of_kind(&objs, "RoleBinding")
            .filter(|b| {
                b["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["name"] == sa)
            })
            .filter_map(|b| of_kind(&objs, "Role").find(|r| name(r) == b["roleRef"]["name"]))
            .collect();
        assert_eq!(roles.len(), 1, "{deploy}: one leader-election Role");
        let rules = roles[0]["rules"].as_array().expect("rules");
        let grants = |verb: &str| -> Vec<Vec<String>> {
            rules
                .iter()
                .filter(|r| {
                    r["resources"] == serde_json::json!(["leases"])
                        && r["verbs"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|v| v == verb)
                })
                .map(|r| {
                    r["resourceNames"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .collect()
        };
        assert_eq!(grants("create"), [Vec::<String>::new()], "{deploy}");
        for verb in ["get", "update"] {
            assert_eq!(grants(verb), [vec![lease.to_string()]], "{deploy} {verb}");
        }
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn each_service_account_is_bound_to_exactly_its_modes_roles() {
    let Some(k) = kubectl() else { return };
    let (proven, _) = proven_rbac();
    // The Flux guard's role (when its file exists) belongs to `run`.
    let flux_guard: Vec<String> = proven
        .keys()
        .filter(|(_, n)| n.contains("flux-guard"))
        .map(|(_, n)| n.clone())
        .collect();
    let mut expected: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    expected.insert(
        "continuum-agent",
        [
            "continuum-hr-recovery".to_string(),
            "Role continuum-agent-leader-election".to_string(),
        ]
        .into_iter()
        .chain(flux_guard)
        .collect(),
    );
    expected.insert(
        "continuum-failover",
        [
            "continuum-failover".to_string(),
            "Role continuum-failover-leader-election".to_string(),
        ]
        .into(),
    );
    expected.insert(
        "continuum-node-pivot",
        ["continuum-node-pivot".to_string()].into(),
    );
    expected.insert(
        "continuum-source-pivot",
        ["continuum-source-pivot".to_string()].into(),
    );

    let (objs, _) = render(k, "manifests/overlays/example");
    let mut bound: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (binding, role_kind, prefix) in [
        ("ClusterRoleBinding", "ClusterRole", ""),
        ("RoleBinding", "Role", "Role "),
    ] {
        for b in of_kind(&objs, binding) {
            let role = b["roleRef"]["name"].as_str().expect("roleRef").to_string();
            assert_eq!(b["roleRef"]["kind"], role_kind, "{binding} {}", name(b));
            assert!(
                of_kind(&objs, role_kind)
                    .any(|r| name(r) == role
                        && r["metadata"]["namespace"] == b["metadata"]["namespace"]),
                "{binding} {} refers to a missing {role_kind} {role}",
                name(b)
            );
            for s in b["subjects"].as_array().expect("subjects") {
                assert_eq!(s["kind"], "ServiceAccount", "binding {}", name(b));
                assert_eq!(s["namespace"], "continuum-system", "binding {}", name(b));
                bound
                    .entry(s["name"].as_str().expect("sa").to_string())
                    .or_default()
                    .insert(format!("{prefix}{role}"));
            }
        }
    }
    let sas: BTreeSet<&str> = of_kind(&objs, "ServiceAccount").map(name).collect();
    for (sa, roles) in &expected {
        assert!(sas.contains(sa), "ServiceAccount {sa} not rendered");
        assert_eq!(bound.get(*sa), Some(roles), "roles bound to {sa}");
    }
    assert_eq!(
        bound.len(),
        expected.len(),
        "bindings to other subjects: {bound:?}"
    );
    // Each workload runs under its own mode's ServiceAccount.
    let by_workload = [
        ("continuum-agent", "continuum-agent"),
        ("continuum-failover", "continuum-failover"),
        ("continuum-node-pivot", "continuum-node-pivot"),
        ("continuum-source-pivot", "continuum-source-pivot"),
    ];
    for w in workloads(&objs) {
        let sa = pod_spec(w)["serviceAccountName"].as_str().unwrap_or("");
        let want = by_workload
            .iter()
            .find(|(n, _)| *n == name(w))
            .map(|(_, s)| *s)
            .unwrap_or_else(|| panic!("unexpected workload {}", name(w)));
        assert_eq!(sa, want, "{}", name(w));
    }
    // The witness talks to no Kubernetes API.
    let (wobjs, _) = render(k, "manifests/witness");
    let w = of_kind(&wobjs, "Deployment").next().expect("witness");
    assert_eq!(pod_spec(w)["automountServiceAccountToken"], false);
    assert_eq!(of_kind(&wobjs, "ClusterRoleBinding").count(), 0);
    assert_eq!(of_kind(&wobjs, "RoleBinding").count(), 0);
}

#[test]
fn crds_in_the_render_equal_the_generated_ones() {
    let Some(k) = kubectl() else { return };
    let bin = workspace_bin("continuum-agent").expect("agent binary");
    let out = Command::new(bin)
        .arg("crds")
        .output()
        .expect("continuum-agent crds");
    assert!(out.status.success());
    let generated = parse_docs(&String::from_utf8(out.stdout).expect("utf-8"));
    let (objs, _) = render(k, "manifests/base");
    let rendered: Vec<Value> = of_kind(&objs, "CustomResourceDefinition")
        .cloned()
        .map(integral)
        .collect();
    let generated: Vec<Value> = generated.into_iter().map(integral).collect();
    assert!(!generated.is_empty());
    assert_eq!(
        rendered, generated,
        "rendered CRDs differ from `continuum-agent crds`"
    );
}

/// JSON numbers compared by value: the generator writes `300.0` where
/// kustomize writes `300` (the API server reads both as the same number).
fn integral(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(integral).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, x)| (k, integral(x))).collect()),
        x => x,
    }
}

fn prometheus_rule() -> Value {
    let text = std::fs::read_to_string(
        repo_root().join("manifests/components/monitoring/prometheusrule.yaml"),
    )
    .expect("prometheusrule.yaml");
    parse_docs(&text).into_iter().next().expect("one object")
}

/// The alerts the issue asks for (guardrail tripped, failover started and
/// completed, lease lost, region Unreachable, sources not pivoted, Flux guard
/// blocked), each with a runbook paragraph in README.md.
#[test]
fn alert_rules_pass_promtool_and_read_only_exported_metrics() {
    let rule = prometheus_rule();
    let metrics = code_metric_names().expect("metric inventory");
    let mut alerts = BTreeSet::new();
    for g in rule["spec"]["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let alert = r["alert"].as_str().expect("alert name").to_string();
            let expr = r["expr"].as_str().expect("expr");
            let used = promql_metric_names(expr);
            assert!(!used.is_empty(), "{alert} reads no continuum_ metric");
            for m in &used {
                assert!(
                    is_known(m, &metrics),
                    "{alert}: {m} is not exported by any binary"
                );
            }
            assert!(r["annotations"]["summary"].is_string(), "{alert}: summary");
            assert!(r["labels"]["severity"].is_string(), "{alert}: severity");
            alerts.insert(alert);
        }
    }
    for want in [
        "ContinuumGuardrailTripped",
        "ContinuumFailoverStarted",
        "ContinuumFailoverCompleted",
        "ContinuumLeaseLost",
        "ContinuumRegionUnreachable",
        "ContinuumSourcesNotPivoted",
        "ContinuumFluxGuardBlocked",
    ] {
        assert!(alerts.contains(want), "missing alert {want}");
    }
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    for a in &alerts {
        assert!(
            readme.contains(&format!("#### {a}")),
            "README.md has no runbook for {a}"
        );
    }

    if !Path::new("/usr/bin/promtool").exists() {
        continuum_tests::skip::skip(
            "promtool part",
            "/usr/bin/promtool missing (Debian package prometheus)",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, serde_yaml::to_string(&rule["spec"]).expect("yaml")).expect("write");
    let out = Command::new("/usr/bin/promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{} rules found", alerts.len())),
        "{text}"
    );
}

/// `promtool test rules` cases: each required alert stays quiet before its
/// series says so and fires, with exactly these labels, after. Annotations
/// are left out of the tested copy (their templates are checked by
/// `promtool check rules` above).
const ALERT_CASES: &str = r#"rule_files: [rules.yaml]
evaluation_interval: 15s
tests:
  - interval: 1m
    input_series:
      - series: 'continuum_hr_recovery_guardrail_tripped{namespace="continuum-system",job="continuum-agent-metrics",pod="a"}'
        values: '0 0 1 1 1'
      - series: 'continuum_cnpg_failover_actions_total{namespace="continuum-system",job="continuum-failover-metrics",pod="b",action="acquire",result="ok"}'
        values: '0 0 1 1 1'
      - series: 'continuum_cnpg_failover_actions_total{namespace="continuum-system",job="continuum-failover-metrics",pod="b",action="promote",result="ok"}'
        values: '0 0 1 1 1'
      - series: 'continuum_cnpg_failover_actions_total{namespace="continuum-system",job="continuum-failover-metrics",pod="c",action="fence",result="ok"}'
        values: '0 0 1 1 1'
      - series: 'continuum_failover_actions_total{job="db-agent",instance="10.0.0.1:9464",action="fence"}'
        values: '0 0 0 0 0'
      - series: 'continuum_peer_state{job="db-agent",instance="10.0.0.1:9464",peer="eu-2",state="unreachable"}'
        values: '0 0 1 1 1'
      - series: 'continuum_peer_state{job="db-agent",instance="10.0.0.1:9464",peer="eu-2",state="healthy"}'
        values: '1 1 0 0 0'
      - series: 'continuum_flux_guard_blocked{namespace="continuum-system",job="continuum-agent-metrics",pod="a"}'
        values: '0 0 2 2 2'
      - series: 'continuum_source_pivot_external{namespace="continuum-system",job="continuum-source-pivot-metrics",pod="s",kind="HelmRepository"}'
        values: '3x40'
    alert_rule_test:
      - {eval_time: 1m, alertname: ContinuumGuardrailTripped, exp_alerts: []}
      - {eval_time: 1m, alertname: ContinuumFailoverStarted, exp_alerts: []}
      - {eval_time: 1m, alertname: ContinuumLeaseLost, exp_alerts: []}
      - {eval_time: 1m, alertname: ContinuumRegionUnreachable, exp_alerts: []}
      - eval_time: 3m
        alertname: ContinuumGuardrailTripped
        exp_alerts:
          - exp_labels: {severity: critical, namespace: continuum-system, job: continuum-agent-metrics}
      - eval_time: 3m
        alertname: ContinuumFailoverStarted
        exp_alerts:
          - exp_labels: {severity: warning, namespace: continuum-system, job: continuum-failover-metrics}
      - eval_time: 3m
        alertname: ContinuumFailoverCompleted
        exp_alerts:
          - exp_labels: {severity: warning, namespace: continuum-system, job: continuum-failover-metrics}
      - eval_time: 3m
        alertname: ContinuumLeaseLost
        exp_alerts:
          - exp_labels: {severity: critical, namespace: continuum-system, job: continuum-failover-metrics}
      - eval_time: 3m
        alertname: ContinuumRegionUnreachable
        exp_alerts:
          - exp_labels: {severity: critical, job: db-agent, instance: "10.0.0.1:9464", peer: eu-2}
      - eval_time: 3m
        alertname: ContinuumFluxGuardBlocked
        exp_alerts:
          - exp_labels: {severity: critical, namespace: continuum-system, job: continuum-agent-metrics}
      - {eval_time: 20m, alertname: ContinuumSourcesNotPivoted, exp_alerts: []}
      - eval_time: 40m
        alertname: ContinuumSourcesNotPivoted
        exp_alerts:
          - exp_labels: {severity: warning, namespace: continuum-system, job: continuum-source-pivot-metrics, kind: HelmRepository}
  # ContinuumNoLeader: both `run` replicas scraped and following (== 0 arm),
  # no `continuum` replica exporting its gauge at all (absent arm, job label).
  - interval: 1m
    input_series:
      - series: 'continuum_agent_leader{namespace="continuum-system",job="continuum-agent-metrics",pod="a"}'
        values: '0x10'
      - series: 'continuum_agent_leader{namespace="continuum-system",job="continuum-agent-metrics",pod="b"}'
        values: '0x10'
    alert_rule_test:
      - {eval_time: 1m, alertname: ContinuumNoLeader, exp_alerts: []}
      - eval_time: 3m
        alertname: ContinuumNoLeader
        exp_alerts:
          - exp_labels: {severity: critical, namespace: continuum-system, job: continuum-agent-metrics}
          - exp_labels: {severity: critical, job: continuum-failover-metrics}
  # ContinuumRegionUnreachable from the Continuum controller: the standby
  # region's agent sees no live holder (0), the primary's sees the peer
  # streaming (1): only the first fires.
  - interval: 1m
    input_series:
      - series: 'continuum_cnpg_peer_reachable{namespace="continuum-system",job="continuum-failover-metrics",pod="f",continuum="apps/db",peer="eu-1"}'
        values: '1 1 0 0 0'
      - series: 'continuum_cnpg_peer_reachable{namespace="continuum-system",job="continuum-failover-metrics",pod="g",continuum="apps/db2",peer="eu-2"}'
        values: '1x5'
    alert_rule_test:
      - {eval_time: 1m, alertname: ContinuumRegionUnreachable, exp_alerts: []}
      - eval_time: 3m
        alertname: ContinuumRegionUnreachable
        exp_alerts:
          - exp_labels: {severity: critical, namespace: continuum-system, job: continuum-failover-metrics, continuum: apps/db, peer: eu-1}
  # One leader each: quiet.
  - interval: 1m
    input_series:
      - series: 'continuum_agent_leader{namespace="continuum-system",job="continuum-agent-metrics",pod="a"}'
        values: '1x10'
      - series: 'continuum_agent_leader{namespace="continuum-system",job="continuum-agent-metrics",pod="b"}'
        values: '0x10'
      - series: 'continuum_failover_controller_leader{namespace="continuum-system",job="continuum-failover-metrics",pod="f"}'
        values: '1x10'
    alert_rule_test:
      - {eval_time: 5m, alertname: ContinuumNoLeader, exp_alerts: []}
"#;

#[test]
fn alerts_fire_on_the_series_the_binaries_export() {
    if !Path::new("/usr/bin/promtool").exists() {
        continuum_tests::skip::skip(
            "alert rule tests",
            "/usr/bin/promtool missing (Debian package prometheus)",
        );
        return;
    }
    let mut spec = prometheus_rule()["spec"].clone();
    for g in spec["groups"].as_array_mut().expect("groups") {
        for r in g["rules"].as_array_mut().expect("rules") {
            r.as_object_mut().expect("rule").remove("annotations");
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&spec).expect("yaml"),
    )
    .expect("write rules");
    std::fs::write(dir.path().join("cases.yaml"), ALERT_CASES).expect("write cases");
    let out = Command::new("/usr/bin/promtool")
        .args(["test", "rules", "cases.yaml"])
        .current_dir(dir.path())
        .output()
        .expect("promtool test rules");
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every case names a metric the code exports.
    let metrics = code_metric_names().expect("metric inventory");
    for m in promql_metric_names(ALERT_CASES) {
        assert!(is_known(&m, &metrics), "case series {m} is not exported");
    }
}

/// Every `expr` in the dashboard JSON, recursively.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" {
                    if let Some(s) = x.as_str() {
                        out.push(s.to_string());
                    }
                }
                exprs(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_reads_only_exported_metrics_and_covers_each_area() {
    let path = repo_root().join("deploy/grafana/continuum-dashboard.json");
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("JSON");
    let metrics = code_metric_names().expect("metric inventory");
    let mut all = Vec::new();
    exprs(&dash["panels"], &mut all);
    assert!(all.len() >= 20, "only {} queries", all.len());
    let mut used = BTreeSet::new();
    for e in &all {
        let names = promql_metric_names(e);
        assert!(!names.is_empty(), "query reads no continuum_ metric: {e}");
        for m in names {
            assert!(
                is_known(&m, &metrics),
                "dashboard query reads unknown metric {m}: {e}"
            );
            used.insert(m);
        }
    }
    // One row per area, each with at least one of its metrics.
    let rows: Vec<&str> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    for (area, prefix) in [
        ("Region health", "continuum_peer_"),
        ("Leases and epochs", "continuum_witness_lease_epoch"),
        ("Failovers", "continuum_cnpg_failover_actions_total"),
        ("HelmRelease recoveries", "continuum_hr_recovery_"),
        ("Pivots", "continuum_source_pivot_"),
        ("Flux guard", "continuum_flux_guard_"),
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(area)),
            "no {area} row: {rows:?}"
        );
        assert!(
            used.iter().any(|m| m.starts_with(prefix)),
            "{area}: no {prefix}* query"
        );
    }
    // Panel ids are unique (Grafana needs them).
    let ids: Vec<i64> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["id"].as_i64())
        .collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len());
}

#[test]
fn witness_systemd_unit_verifies_and_its_flags_and_env_are_real() {
    let unit_path = repo_root().join("deploy/witness/continuum-witness.service");
    let unit = std::fs::read_to_string(&unit_path).expect("unit");
    let bin = workspace_bin("continuum-witness").expect("witness binary");
    // ExecStart's flags (continuation lines joined) parse with the real binary.
    let exec = unit
        .replace("\\\n", " ")
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart=").map(str::to_string))
        .expect("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/continuum-witness"));
    let args: Vec<String> = words
        .map(|w| w.replace("%d", "/run/credentials/x"))
        .collect();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, help_text) = help(&bin, &arg_refs);
    assert!(
        ok,
        "continuum-witness rejects ExecStart {args:?}:\n{help_text}"
    );
    // Every variable in the env example (set or commented) is one the binary reads.
    let env = std::fs::read_to_string(repo_root().join("deploy/witness/witness.env")).expect("env");
    let mut vars = 0;
    for l in env.lines() {
        let l = l.trim_start_matches('#');
        if let Some((k, _)) = l.split_once('=') {
            if k.starts_with("CONTINUUM_WITNESS_") && !k.contains(' ') {
                vars += 1;
                assert!(
                    help_text.contains(&format!("[env: {k}")),
                    "witness.env: {k} is read by no flag"
                );
            }
        }
    }
    assert!(vars >= 8, "witness.env names only {vars} settings");
    for want in [
        "DynamicUser=yes",
        "StateDirectory=continuum-witness",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(want), "unit lacks {want}");
    }

    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        continuum_tests::skip::skip("systemd-analyze part", "systemd-analyze not installed");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("continuum-witness.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/continuum-witness",
            &bin.display().to_string(),
        ),
    )
    .expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    // Exposure score (0 = locked down, 10 = unprotected); 1.4 when written.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=25", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exposure above 2.5:\n{text}");
}

#[test]
fn bootstrap_kit_slot_comes_after_the_kit_and_before_apps() {
    let text = std::fs::read_to_string(repo_root().join("deploy/bootstrap-kit/continuum.yaml"))
        .expect("slot");
    let objs = parse_docs(&text);
    let src = objs
        .iter()
        .find(|o| kind(o) == "OCIRepository")
        .expect("source");
    let ks = objs
        .iter()
        .find(|o| kind(o) == "Kustomization" && name(o) == "continuum")
        .expect("Kustomization continuum");
    assert_eq!(ks["spec"]["sourceRef"]["kind"], "OCIRepository");
    assert_eq!(ks["spec"]["sourceRef"]["name"], name(src));
    let deps: Vec<&str> = ks["spec"]["dependsOn"]
        .as_array()
        .expect("dependsOn")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(deps, ["bootstrap-kit"]);
    assert_eq!(
        ks["spec"]["wait"], true,
        "Ready only once the workloads are"
    );
    assert!(
        ks["spec"]["components"].is_null(),
        "monitoring stays opt-in in the slot"
    );
    // The path exists in the published tree (manifests/) and the patch
    // targets an object it renders.
    let path = ks["spec"]["path"].as_str().expect("path");
    assert!(repo_root()
        .join("manifests")
        .join(path)
        .join("kustomization.yaml")
        .is_file());
    let apps_text =
        std::fs::read_to_string(repo_root().join("deploy/bootstrap-kit/apps-example.yaml"))
            .expect("apps example");
    let apps = parse_docs(&apps_text);
    let apps_deps: Vec<&str> = apps[0]["spec"]["dependsOn"]
        .as_array()
        .expect("dependsOn")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert!(
        apps_deps.contains(&"continuum"),
        "apps must wait for continuum"
    );
    let Some(k) = kubectl() else { return };
    let (base, _) = render(k, "manifests/base");
    for p in ks["spec"]["patches"].as_array().expect("patches") {
        let t = &p["target"];
        assert!(
            base.iter()
                .any(|o| o["kind"] == t["kind"] && o["metadata"]["name"] == t["name"]),
            "patch target {t} not in manifests/base"
        );
    }
    for i in ks["spec"]["images"].as_array().expect("images") {
        let n = i["name"].as_str().expect("image name");
        assert!(
            workloads(&base)
                .iter()
                .flat_map(|w| containers(w))
                .any(|c| c["image"].as_str().is_some_and(|im| im.starts_with(n))),
            "images entry {n} matches no container"
        );
    }
}

#[test]
fn dockerfiles_are_multi_stage_static_and_non_root() {
    for (file, bin) in [
        ("deploy/docker/agent.Dockerfile", "continuum-agent"),
        ("deploy/docker/witness.Dockerfile", "continuum-witness"),
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).expect("Dockerfile");
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert_eq!(froms.len(), 2, "{file}: build stage + runtime stage");
        assert!(
            froms[1].contains("distroless/static"),
            "{file}: static distroless runtime"
        );
        assert!(text.contains(&format!("-p {bin}")), "{file}: builds {bin}");
        assert!(text.contains("--locked"), "{file}: Cargo.lock respected");
        let user = text
            .lines()
            .rfind(|l| l.starts_with("USER "))
            .expect("USER");
        assert_eq!(user, "USER 65532:65532", "{file}");
        assert!(text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{bin}\"]")));
    }
}
