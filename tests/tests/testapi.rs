//! The test API server keeps real Kubernetes semantics, strictly: each test here
//! drives it with a real `kube::Client` and would fail against a permissive fake.

use std::collections::BTreeMap;
use std::path::PathBuf;

use continuum_testapi::{rbac, Options, ResourceSpec, TestApi};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

fn hr_ar() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("helm.toolkit.fluxcd.io", "v2", "HelmRelease"),
        "helmreleases",
    )
}

fn code(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()},
        "data": {"k": "v"},
    }))
    .unwrap()
}

fn hr(name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease",
        "metadata": {"name": name},
        "spec": {"interval": "5m"},
        "status": {"conditions": []},
    }))
    .unwrap()
}

#[tokio::test]
async fn resource_version_and_optimistic_concurrency() {
    let api_srv = TestApi::start().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(api_srv.admin_client().unwrap(), "ns");
    let a = cms
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    let b = cms
        .create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    let rv_a: u64 = a
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    let rv_b: u64 = b
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv_b > rv_a, "one global counter");
    assert!(a.metadata.uid.is_some() && a.metadata.creation_timestamp.is_some());

    let mut fresh = a.clone();
    fresh.data = Some(BTreeMap::from([("k".into(), "v2".into())]));
    let updated = cms
        .replace("a", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        a.metadata.resource_version
    );
    // The same (now stale) resourceVersion again: 409 Conflict.
    let err = cms
        .replace("a", &PostParams::default(), &fresh)
        .await
        .unwrap_err();
    assert_eq!(code(err), (409, "Conflict".into()));
    // An update without resourceVersion is invalid.
    let mut no_rv = updated.clone();
    no_rv.metadata.resource_version = None;
    assert_eq!(
        code(
            cms.replace("a", &PostParams::default(), &no_rv)
                .await
                .unwrap_err()
        )
        .0,
        422
    );
    // A no-op update does not bump the resourceVersion.
    let same = cms
        .replace("a", &PostParams::default(), &updated)
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        updated.metadata.resource_version
    );
    // Merge patch carrying a stale resourceVersion is a precondition failure.
    let stale =
        json!({"metadata": {"resourceVersion": a.metadata.resource_version}, "data": {"k": "x"}});
    assert_eq!(
        code(
            cms.patch(
                "a",
                &PostParams::default().into_patch(),
                &Patch::Merge(&stale)
            )
            .await
            .unwrap_err()
        )
        .0,
        409
    );
}

trait IntoPatch {
    fn into_patch(self) -> PatchParams;
}
impl IntoPatch for PostParams {
    fn into_patch(self) -> PatchParams {
        PatchParams::default()
    }
}

#[tokio::test]
async fn not_found_already_exists_invalid() {
    let s = TestApi::start().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(s.admin_client().unwrap(), "ns");
    assert_eq!(
        code(cms.get("nope").await.unwrap_err()),
        (404, "NotFound".into())
    );
    assert_eq!(
        code(
            cms.delete("nope", &DeleteParams::default())
                .await
                .unwrap_err()
        )
        .0,
        404
    );
    cms.create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    assert_eq!(
        code(
            cms.create(&PostParams::default(), &cm("a", &[]))
                .await
                .unwrap_err()
        ),
        (409, "AlreadyExists".into())
    );
    assert_eq!(
        code(
            cms.create(&PostParams::default(), &cm("Bad_Name", &[]))
                .await
                .unwrap_err()
        ),
        (422, "Invalid".into())
    );
    let mut unnamed = cm("x", &[]);
    unnamed.metadata.name = None;
    assert_eq!(
        code(
            cms.create(&PostParams::default(), &unnamed)
                .await
                .unwrap_err()
        )
        .0,
        422
    );
    unnamed.metadata.generate_name = Some("gen-".into());
    let g = cms.create(&PostParams::default(), &unnamed).await.unwrap();
    assert!(g.metadata.name.unwrap().starts_with("gen-"));
    // Namespace in the body must match the URL.
    let mut other_ns = cm("c", &[]);
    other_ns.metadata.namespace = Some("elsewhere".into());
    assert_eq!(
        code(
            cms.create(&PostParams::default(), &other_ns)
                .await
                .unwrap_err()
        )
        .0,
        400
    );
    // Unknown resources are 404.
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let w: Api<DynamicObject> = Api::namespaced_with(s.admin_client().unwrap(), "ns", &ar);
    assert_eq!(
        code(w.list(&ListParams::default()).await.unwrap_err()).0,
        404
    );
    // ... until registered.
    s.register(ResourceSpec::new(
        "example.com",
        "v1",
        "widgets",
        "Widget",
        true,
        false,
    ));
    assert!(w
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let s = TestApi::start().await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(s.admin_client().unwrap(), "ns", &hr_ar());
    let created = api.create(&PostParams::default(), &hr("a")).await.unwrap();
    assert!(
        created.data.get("status").is_none(),
        "status is ignored on create"
    );
    assert_eq!(created.metadata.generation, Some(1));

    // Status write through /status: status changes, generation does not, spec ignored.
    let st = json!({"spec": {"interval": "1h"}, "status": {"observedGeneration": 1}});
    let after = api
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&st))
        .await
        .unwrap();
    assert_eq!(after.data["status"]["observedGeneration"], 1);
    assert_eq!(after.data["spec"]["interval"], "5m");
    assert_eq!(after.metadata.generation, Some(1));

    // Main resource: status ignored, metadata change does not bump generation.
    let meta =
        json!({"metadata": {"annotations": {"x": "y"}}, "status": {"observedGeneration": 99}});
    let after = api
        .patch("a", &PatchParams::default(), &Patch::Merge(&meta))
        .await
        .unwrap();
    assert_eq!(after.data["status"]["observedGeneration"], 1);
    assert_eq!(after.metadata.generation, Some(1));
    // Spec change bumps generation.
    let spec = json!({"spec": {"interval": "10m"}});
    let after = api
        .patch("a", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .unwrap();
    assert_eq!(after.metadata.generation, Some(2));
    // PUT on /status with a stale resourceVersion conflicts too.
    let mut stale = created.clone();
    stale.data["status"] = json!({"x": 1});
    let err = api
        .replace_status("a", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert_eq!(code(err).0, 409);
    // Resources without a status subresource have no /status endpoint.
    let cms: Api<ConfigMap> = Api::namespaced(s.admin_client().unwrap(), "ns");
    cms.create(&PostParams::default(), &cm("c", &[]))
        .await
        .unwrap();
    assert_eq!(
        code(
            cms.patch_status("c", &PatchParams::default(), &Patch::Merge(&json!({})))
                .await
                .unwrap_err()
        )
        .0,
        404
    );
}

#[tokio::test]
async fn watch_events_bookmarks_and_gone() {
    let s = TestApi::start_with(Options {
        window: 5,
        bookmark_interval: std::time::Duration::from_millis(50),
        ..Options::default()
    })
    .await
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(s.admin_client().unwrap(), "ns");
    let start = cms
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    let rv0 = start.metadata.resource_version.clone().unwrap();
    let mut stream = cms
        .watch(&WatchParams::default(), &rv0)
        .await
        .unwrap()
        .boxed();
    let mut a = start.clone();
    a.data = Some(BTreeMap::from([("k".into(), "2".into())]));
    cms.replace("a", &PostParams::default(), &a).await.unwrap();
    cms.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let mut kinds = Vec::new();
    let mut bookmark = false;
    while kinds.len() < 3 || !bookmark {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(o) => kinds.push(format!("ADDED {}", o.metadata.name.unwrap())),
            WatchEvent::Modified(o) => kinds.push(format!("MODIFIED {}", o.metadata.name.unwrap())),
            WatchEvent::Deleted(o) => kinds.push(format!("DELETED {}", o.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => bookmark = true,
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(kinds, ["MODIFIED a", "ADDED b", "DELETED a"]);

    // Push the first version out of the retained window: watching from it is 410 Gone.
    for i in 0..10 {
        cms.create(&PostParams::default(), &cm(&format!("f{i}"), &[]))
            .await
            .unwrap();
    }
    let mut old = cms
        .watch(&WatchParams::default(), &rv0)
        .await
        .unwrap()
        .boxed();
    match old.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {other:?}"),
    }

    // Dropped watch streams end.
    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = cms
        .watch(&WatchParams::default().disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    s.drop_watches();
    assert!(
        w.try_next().await.unwrap().is_none(),
        "stream closed by the server"
    );
}

#[tokio::test]
async fn list_selectors_scope_and_pages() {
    let s = TestApi::start().await.unwrap();
    let c = s.admin_client().unwrap();
    for (ns, name, labels) in [
        ("a", "web", vec![("app", "web"), ("tier", "front")]),
        ("a", "db", vec![("app", "db")]),
        ("b", "api", vec![("app", "api"), ("tier", "front")]),
    ] {
        Api::<ConfigMap>::namespaced(c.clone(), ns)
            .create(&PostParams::default(), &cm(name, &labels))
            .await
            .unwrap();
    }
    let all: Api<ConfigMap> = Api::all(c.clone());
    let names = |l: Vec<ConfigMap>| {
        let mut v: Vec<String> = l.into_iter().map(|o| o.metadata.name.unwrap()).collect();
        v.sort();
        v
    };
    let cases = [
        ("", vec!["api", "db", "web"]),
        ("app=web", vec!["web"]),
        ("app!=web", vec!["api", "db"]),
        ("app in (web,api)", vec!["api", "web"]),
        ("app notin (web,api)", vec!["db"]),
        ("tier", vec!["api", "web"]),
        ("!tier", vec!["db"]),
        ("tier=front,app=api", vec!["api"]),
    ];
    for (sel, want) in cases {
        let got = names(
            all.list(&ListParams::default().labels(sel))
                .await
                .unwrap()
                .items,
        );
        assert_eq!(got, want, "selector {sel:?}");
    }
    let ns_a: Api<ConfigMap> = Api::namespaced(c.clone(), "a");
    assert_eq!(
        names(ns_a.list(&ListParams::default()).await.unwrap().items),
        ["db", "web"]
    );
    assert_eq!(
        names(
            all.list(&ListParams::default().fields("metadata.namespace=b"))
                .await
                .unwrap()
                .items
        ),
        ["api"]
    );
    // Pagination: limit 2 gives a continue token, the second page the rest.
    let p1 = all.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(p1.items.len(), 2);
    let token = p1.metadata.continue_.clone().unwrap();
    let p2 = all
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(p2.items.len(), 1);
    assert!(p2.metadata.continue_.is_none());
    // Cluster-scoped resources have no namespace.
    let nodes: Api<Node> = Api::all(c.clone());
    let n = nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(n.metadata.namespace, None);
    // A resourceVersion newer than the server's is "too large".
    let future = (s.resource_version() + 100).to_string();
    let lp = ListParams {
        resource_version: Some(future),
        ..ListParams::default()
    };
    assert_eq!(code(all.list(&lp).await.unwrap_err()).0, 504);
}

#[tokio::test]
async fn patch_types_and_server_side_apply() {
    let s = TestApi::start().await.unwrap();
    let c = s.admin_client().unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(c.clone(), "ns", &hr_ar());
    api.create(&PostParams::default(), &hr("a")).await.unwrap();

    // JSON patch, including a failing test operation (422).
    let jp: json_patch::Patch =
        serde_json::from_value(json!([{"op": "add", "path": "/spec/suspend", "value": true}]))
            .unwrap();
    let out = api
        .patch("a", &PatchParams::default(), &Patch::Json::<()>(jp))
        .await
        .unwrap();
    assert_eq!(out.data["spec"]["suspend"], true);
    let bad: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/spec/suspend", "value": false}]))
            .unwrap();
    assert_eq!(
        code(
            api.patch("a", &PatchParams::default(), &Patch::Json::<()>(bad))
                .await
                .unwrap_err()
        )
        .0,
        422
    );
    // Strategic merge is not served for custom resources.
    assert_eq!(
        code(
            api.patch("a", &PatchParams::default(), &Patch::Strategic(json!({})))
                .await
                .unwrap_err()
        )
        .0,
        415
    );

    // Server-side apply: field manager required, conflicts, force.
    let applied = |v: &str| json!({"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "metadata": {"name": "a"}, "spec": {"timeout": v}});
    let no_mgr = api
        .patch("a", &PatchParams::default(), &Patch::Apply(applied("1m")))
        .await
        .unwrap_err();
    assert_eq!(code(no_mgr).0, 422);
    let out = api
        .patch(
            "a",
            &PatchParams::apply("alice"),
            &Patch::Apply(applied("1m")),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            out.data["spec"]["timeout"].clone(),
            out.data["spec"]["interval"].clone()
        ),
        (json!("1m"), json!("5m"))
    );
    let err = api
        .patch(
            "a",
            &PatchParams::apply("bob"),
            &Patch::Apply(applied("2m")),
        )
        .await
        .unwrap_err();
    assert_eq!(code(err), (409, "Conflict".into()));
    let out = api
        .patch(
            "a",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(applied("2m")),
        )
        .await
        .unwrap();
    assert_eq!(out.data["spec"]["timeout"], "2m");
    // Apply creates missing objects, and apply on /status only touches status.
    let b = json!({"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "metadata": {"name": "b"}, "spec": {"x": 1}, "status": {"y": 1}});
    let out = api
        .patch("b", &PatchParams::apply("alice"), &Patch::Apply(b.clone()))
        .await
        .unwrap();
    assert!(out.data.get("status").is_none());
    let out = api.patch_status("b", &PatchParams::apply("alice"), &Patch::Apply(json!({"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease", "metadata": {"name": "b"}, "spec": {"x": 2}, "status": {"y": 2}}))).await.unwrap();
    assert_eq!(
        (
            out.data["spec"]["x"].clone(),
            out.data["status"]["y"].clone()
        ),
        (json!(1), json!(2))
    );
}

fn role_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/rbac/hr-recovery.yaml")
}

#[tokio::test]
async fn rbac_from_cluster_role_and_faults() {
    let s = TestApi::start_with_role(&role_path()).await.unwrap();
    let agent = s.client().unwrap();
    // ConfigMaps are not granted: 403 with a Forbidden Status.
    let cms: Api<ConfigMap> = Api::namespaced(agent.clone(), "ns");
    let (c, reason) = code(cms.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((c, reason.as_str()), (403, "Forbidden"));
    // HelmReleases: list granted, get not.
    let hrs: Api<DynamicObject> = Api::namespaced_with(agent.clone(), "ns", &hr_ar());
    assert!(hrs.list(&ListParams::default()).await.is_ok());
    assert_eq!(code(hrs.get("x").await.unwrap_err()).0, 403);
    // Admin bypasses RBAC.
    let admin: Api<ConfigMap> = Api::namespaced(s.admin_client().unwrap(), "ns");
    admin
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    // Every agent request is recorded with its verb and answer.
    let rec = s.requests();
    assert!(rec
        .iter()
        .any(|r| r.verb == "list" && r.resource == "configmaps" && r.code == 403));
    assert!(rec
        .iter()
        .any(|r| r.verb == "get" && r.resource == "helmreleases" && r.code == 403));
    assert!(
        !rec.iter().any(|r| r.verb == "create"),
        "admin requests are not recorded"
    );
    // Rules parse from YAML, subresources are separate targets.
    let rules = rbac::rules_from_file(&role_path()).unwrap();
    assert!(rbac::allows(
        &rules,
        "patch",
        "helm.toolkit.fluxcd.io",
        "helmreleases",
        Some("status"),
        Some("a")
    ));
    assert!(!rbac::allows(
        &rules,
        "update",
        "helm.toolkit.fluxcd.io",
        "helmreleases",
        Some("status"),
        Some("a")
    ));

    // Fault injection: the next status patch answers 500, the one after succeeds.
    let admin_hr: Api<DynamicObject> =
        Api::namespaced_with(s.admin_client().unwrap(), "ns", &hr_ar());
    admin_hr
        .create(&PostParams::default(), &hr("a"))
        .await
        .unwrap();
    s.fail_next(Some("patch"), Some("helmreleases"), Some("status"), 1, 500);
    let p = json!({"status": {"x": 1}});
    assert_eq!(
        code(
            admin_hr
                .patch_status("a", &PatchParams::default(), &Patch::Merge(&p))
                .await
                .unwrap_err()
        )
        .0,
        500
    );
    // The main resource is not affected by a fault targeted at /status.
    assert!(admin_hr
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"y": 1}}))
        )
        .await
        .is_ok());
    assert!(admin_hr
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&p))
        .await
        .is_ok());
    s.set_latency(std::time::Duration::from_millis(20));
    assert!(
        admin_hr.get("a").await.is_ok(),
        "latency delays, never fails"
    );
}

/// kube-apiserver authorizes a server-side apply that creates its object as
/// `create` of that name (besides `patch`); one that updates needs `patch` only.
#[tokio::test]
async fn apply_that_creates_needs_create_by_name() {
    // A server whose only rule grants `verbs` on the ConfigMap named "mine".
    async fn server(verbs: &str) -> TestApi {
        let rules = rbac::rules_from_yaml(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: r}}\nrules:\n- apiGroups: [\"\"]\n  resources: [configmaps]\n  resourceNames: [mine]\n  verbs: [{verbs}]\n"
        ))
        .unwrap();
        TestApi::start_with(Options {
            rules: Some(rules),
            ..Options::default()
        })
        .await
        .unwrap()
    }
    let apply = |name: &str| {
        let mut c = cm(name, &[]);
        c.data = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
        c
    };
    let pp = PatchParams::apply("test").force();

    // patch alone: the apply that would create is refused, nothing is created.
    let s = server("get, patch").await;
    let cms: Api<ConfigMap> = Api::namespaced(s.client().unwrap(), "ns");
    let (c, reason) = code(
        cms.patch("mine", &pp, &Patch::Apply(&apply("mine")))
            .await
            .unwrap_err(),
    );
    assert_eq!((c, reason.as_str()), (403, "Forbidden"));
    assert!(s.object("", "configmaps", "ns", "mine").is_none());
    assert!(s
        .requests()
        .iter()
        .any(|r| r.verb == "create" && r.name.as_deref() == Some("mine") && r.code == 403));
    // Once it exists (made by an admin), patch is enough to apply again.
    let admin: Api<ConfigMap> = Api::namespaced(s.admin_client().unwrap(), "ns");
    admin
        .create(&PostParams::default(), &cm("mine", &[]))
        .await
        .unwrap();
    assert!(cms
        .patch("mine", &pp, &Patch::Apply(&apply("mine")))
        .await
        .is_ok());

    // create by name: the creating apply goes through (and is recorded as a
    // create); another name stays refused.
    let s = server("get, create, patch").await;
    let cms: Api<ConfigMap> = Api::namespaced(s.client().unwrap(), "ns");
    assert!(cms
        .patch("mine", &pp, &Patch::Apply(&apply("mine")))
        .await
        .is_ok());
    assert!(s.object("", "configmaps", "ns", "mine").is_some());
    assert!(s
        .requests()
        .iter()
        .any(|r| r.verb == "create" && r.name.as_deref() == Some("mine") && r.code < 300));
    assert_eq!(
        code(
            cms.patch("other", &pp, &Patch::Apply(&apply("other")))
                .await
                .unwrap_err()
        )
        .0,
        403
    );
    // A POST create has no name in the URL: a named rule cannot allow it.
    assert_eq!(
        code(
            cms.create(&PostParams::default(), &cm("mine2", &[]))
                .await
                .unwrap_err()
        )
        .0,
        403
    );
}

/// A Role's rules grant only inside its own namespace (as a RoleBinding
/// does), by name where they name one; a Role without a namespace is an
/// error, not a cluster-wide grant.
#[tokio::test]
async fn role_rules_apply_only_in_their_namespace() {
    let rules = rbac::rules_from_yaml(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: r, namespace: a}\nrules:\n- apiGroups: [\"\"]\n  resources: [configmaps]\n  verbs: [create]\n- apiGroups: [\"\"]\n  resources: [configmaps]\n  resourceNames: [x]\n  verbs: [get, update]\n",
    )
    .unwrap();
    assert!(rules.iter().all(|r| r.namespace.as_deref() == Some("a")));
    assert!(matches!(
        rbac::rules_from_yaml("kind: Role\nmetadata: {name: r}\nrules: []\n"),
        Err(rbac::RbacError::RoleWithoutNamespace(n)) if n == "r"
    ));
    let s = TestApi::start_with(Options {
        rules: Some(rules),
        ..Options::default()
    })
    .await
    .unwrap();
    for ns in ["a", "b"] {
        let admin: Api<ConfigMap> = Api::namespaced(s.admin_client().unwrap(), ns);
        admin
            .create(&PostParams::default(), &cm("x", &[]))
            .await
            .unwrap();
    }
    let in_a: Api<ConfigMap> = Api::namespaced(s.client().unwrap(), "a");
    let in_b: Api<ConfigMap> = Api::namespaced(s.client().unwrap(), "b");
    let all: Api<ConfigMap> = Api::all(s.client().unwrap());
    assert!(in_a.get("x").await.is_ok());
    // Another name, another namespace, all namespaces: refused.
    assert_eq!(code(in_a.get("y").await.unwrap_err()).0, 403);
    assert_eq!(code(in_b.get("x").await.unwrap_err()).0, 403);
    assert_eq!(
        code(all.list(&Default::default()).await.unwrap_err()).0,
        403
    );
    // create has no name in its URL: granted unnamed, in "a" only.
    assert!(in_a
        .create(&PostParams::default(), &cm("z", &[]))
        .await
        .is_ok());
    assert_eq!(
        code(
            in_b.create(&PostParams::default(), &cm("z", &[]))
                .await
                .unwrap_err()
        )
        .0,
        403
    );
    let x = in_a.get("x").await.unwrap();
    assert!(in_a.replace("x", &PostParams::default(), &x).await.is_ok());
}
