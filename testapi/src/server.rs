//! HTTP front: routing, RBAC, fault injection and the verb handlers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::patch::{self, Managers};
use crate::selector::{FieldSelector, LabelSelector};
use crate::{Change, ObjKey, RequestRecord, ResourceSpec, Shared, State, Stored};

type Body = UnsyncBoxBody<Bytes, Infallible>;

pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A parsed API path.
#[derive(Debug, Clone)]
struct Route {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, r @ ..] if !r.is_empty() => (Some(ns.to_string()), r),
        r => (None, r),
    };
    let (plural, name, sub) = match rest {
        [p] => (p.to_string(), None, None),
        [p, n] => (p.to_string(), Some(n.to_string()), None),
        [p, n, s] => (p.to_string(), Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    if plural.is_empty() {
        return None;
    }
    Some(Route {
        group,
        version,
        plural,
        namespace,
        name,
        sub,
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn full(code: u16, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

/// A `Status` object as the API server returns it for failures.
pub(crate) fn status(
    code: u16,
    reason: &str,
    message: impl Into<String>,
    details: Value,
) -> (u16, Value) {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code,
    });
    if !details.is_null() {
        s["details"] = details;
    }
    (code, s)
}

fn details(res: &ResourceSpec, name: &str) -> Value {
    json!({"name": name, "group": res.group, "kind": res.plural})
}

fn not_found(res: &ResourceSpec, name: &str) -> (u16, Value) {
    status(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", res.qualified()),
        details(res, name),
    )
}

fn invalid(res: &ResourceSpec, name: &str, field: &str, msg: &str) -> (u16, Value) {
    let mut d = details(res, name);
    d["causes"] = json!([{"reason": "FieldValueInvalid", "message": msg, "field": field}]);
    status(
        422,
        "Invalid",
        format!("{} \"{name}\" is invalid: {field}: {msg}", res.kind),
        d,
    )
}

fn bad_request(msg: impl Into<String>) -> (u16, Value) {
    status(400, "BadRequest", msg, Value::Null)
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The 403 a real API server answers when RBAC denies `verb` on the route.
fn forbidden(user: &str, verb: &str, route: &Route) -> (u16, Value) {
    let qualified = if route.group.is_empty() {
        route.plural.clone()
    } else {
        format!("{}.{}", route.plural, route.group)
    };
    let full_res = match &route.sub {
        Some(s) => format!("{}/{}", route.plural, s),
        None => route.plural.clone(),
    };
    let target = match &route.name {
        Some(n) => format!("{qualified} \"{n}\""),
        None => qualified,
    };
    let scope = match &route.namespace {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".to_string(),
    };
    let msg = format!(
        "{target} is forbidden: User \"{user}\" cannot {verb} resource \"{full_res}\" in API group \"{}\"{scope}",
        route.group
    );
    status(
        403,
        "Forbidden",
        msg,
        json!({"name": route.name.clone().unwrap_or_default(), "group": route.group, "kind": route.plural}),
    )
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let user = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("anonymous")
        .to_string();
    let admin = user == "admin";
    let Some(route) = parse_path(req.uri().path()) else {
        let (c, v) = status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Value::Null,
        );
        return full(c, &v);
    };
    let q = parse_query(req.uri().query());
    let is_watch = matches!(q.get("watch").map(String::as_str), Some("1") | Some("true"));
    let verb = match (req.method().clone(), route.name.is_some()) {
        (Method::GET, _) if is_watch => "watch",
        (Method::GET, true) => "get",
        (Method::GET, false) => "list",
        (Method::POST, false) => "create",
        (Method::PUT, true) => "update",
        (Method::PATCH, true) => "patch",
        (Method::DELETE, true) => "delete",
        (Method::DELETE, false) => "deletecollection",
        _ => {
            let (c, v) = status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                Value::Null,
            );
            return full(c, &v);
        }
    };
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();

    let record_as = |st: &mut State, verb: &str, code: u16| {
        if !admin {
            st.requests.push(RequestRecord {
                verb: verb.to_string(),
                group: route.group.clone(),
                resource: route.plural.clone(),
                subresource: route.sub.clone(),
                namespace: route.namespace.clone(),
                name: route.name.clone(),
                code,
            });
        }
    };
    let record = |st: &mut State, code: u16| record_as(st, verb, code);

    // RBAC, injected faults, resource lookup.
    let res = {
        let mut st = shared.lock();
        if !admin {
            if let Some(rules) = &st.rules {
                if !crate::rbac::allows_in(
                    rules,
                    verb,
                    &route.group,
                    &route.plural,
                    route.sub.as_deref(),
                    route.namespace.as_deref(),
                    route.name.as_deref(),
                ) {
                    let (c, v) = forbidden(&user, verb, &route);
                    record(&mut st, c);
                    return full(c, &v);
                }
            }
        }
        if let Some(code) = st.take_fault(verb, &route.plural, route.sub.as_deref()) {
            let reason = if code == 503 {
                "ServiceUnavailable"
            } else {
                "InternalError"
            };
            let (c, v) = status(code, reason, "injected fault", Value::Null);
            record(&mut st, c);
            return full(c, &v);
        }
        match st.resource(&route.group, &route.version, &route.plural) {
            Some(r) => r,
            None => {
                let (c, v) = status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                    Value::Null,
                );
                record(&mut st, c);
                return full(c, &v);
            }
        }
    };
    // Scope: cluster resources have no namespace; namespaced objects need one except for list/watch.
    let scope_ok = if res.namespaced {
        route.namespace.is_some() || matches!(verb, "list" | "watch")
    } else {
        route.namespace.is_none()
    };
    let sub_ok = match route.sub.as_deref() {
        None => true,
        Some("status") => res.status_subresource && matches!(verb, "get" | "update" | "patch"),
        Some(_) => false,
    };
    if !scope_ok || !sub_ok {
        let (c, v) = status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Value::Null,
        );
        record(&mut shared.lock(), c);
        return full(c, &v);
    }

    if verb == "watch" {
        let resp = watch(&shared, &res, &route, &q);
        record(&mut shared.lock(), resp.status().as_u16());
        return resp;
    }

    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let mut st = shared.lock();
    // A server-side apply that creates the object is also authorized as
    // `create` of that name (kube-apiserver's patch handler does so), and
    // recorded as one.
    let apply_creates = verb == "patch"
        && content_type == "application/apply-patch+yaml"
        && route.sub.is_none()
        && !admin
        && route
            .name
            .as_deref()
            .is_some_and(|n| !st.objects.contains_key(&key_of(&res, &route, n)));
    if apply_creates {
        let denied = st.rules.as_ref().is_some_and(|rules| {
            !crate::rbac::allows_in(
                rules,
                "create",
                &route.group,
                &route.plural,
                None,
                route.namespace.as_deref(),
                route.name.as_deref(),
            )
        });
        if denied {
            let (c, v) = forbidden(&user, "create", &route);
            record_as(&mut st, "create", c);
            return full(c, &v);
        }
    }
    let (code, value, change) = match verb {
        "get" => with_none(get(&st, &res, &route)),
        "list" => with_none(list(&st, &res, &route, &q)),
        "create" => create(&mut st, &res, &route, &q, &body),
        "update" => update(&mut st, &res, &route, &q, &body),
        "patch" => patch_handler(&mut st, &res, &route, &q, &body, &content_type),
        "delete" => delete(&mut st, &res, &route),
        _ => with_none(status(
            405,
            "MethodNotAllowed",
            "deletecollection is not served",
            Value::Null,
        )),
    };
    if let Some(c) = change {
        st.push_change(c.clone());
        let _ = shared.changes_tx.send(c);
    }
    if apply_creates {
        record_as(&mut st, "create", code);
    }
    record(&mut st, code);
    drop(st);
    full(code, &value)
}

type Outcome = (u16, Value, Option<Change>);

fn with_none((c, v): (u16, Value)) -> Outcome {
    (c, v, None)
}

fn key_of(res: &ResourceSpec, route: &Route, name: &str) -> ObjKey {
    ObjKey {
        group: res.group.clone(),
        plural: res.plural.clone(),
        namespace: if res.namespaced {
            route.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        },
        name: name.to_string(),
    }
}

fn get(st: &State, res: &ResourceSpec, route: &Route) -> (u16, Value) {
    let name = route.name.clone().unwrap_or_default();
    match st.objects.get(&key_of(res, route, &name)) {
        Some(s) => (200, s.obj.clone()),
        None => not_found(res, &name),
    }
}

fn list(
    st: &State,
    res: &ResourceSpec,
    route: &Route,
    q: &HashMap<String, String>,
) -> (u16, Value) {
    let labels =
        match LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or("")) {
            Ok(s) => s,
            Err(e) => return bad_request(e),
        };
    let fields =
        match FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or("")) {
            Ok(s) => s,
            Err(e) => return bad_request(e),
        };
    if let Some(rv) = q.get("resourceVersion").filter(|s| !s.is_empty()) {
        match rv.parse::<u64>() {
            Ok(n) if n > st.rv => {
                return status(
                    504,
                    "Timeout",
                    format!("Too large resource version: {n}, current: {}", st.rv),
                    Value::Null,
                )
            }
            Ok(_) => {}
            Err(_) => return bad_request(format!("invalid resource version: {rv}")),
        }
    }
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let after = q.get("continue").filter(|c| !c.is_empty()).cloned();
    let mut items = Vec::new();
    let mut next = None;
    for (k, s) in st.objects.iter() {
        if k.group != res.group || k.plural != res.plural {
            continue;
        }
        if let Some(ns) = &route.namespace {
            if &k.namespace != ns {
                continue;
            }
        }
        let pos = format!("{}/{}", k.namespace, k.name);
        if after.as_ref().is_some_and(|a| pos.as_str() <= a.as_str()) {
            continue;
        }
        if !labels.matches(&s.obj) || !fields.matches(&s.obj) {
            continue;
        }
        if limit.is_some_and(|l| items.len() >= l) {
            next = Some(format!(
                "{}/{}",
                items_last_ns(&items),
                items_last_name(&items)
            ));
            break;
        }
        items.push(s.obj.clone());
    }
    let mut meta = json!({"resourceVersion": st.rv.to_string()});
    if let Some(n) = next {
        meta["continue"] = Value::String(n);
    }
    (
        200,
        json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": meta, "items": items}),
    )
}

fn items_last_ns(items: &[Value]) -> String {
    items
        .last()
        .and_then(|o| o.pointer("/metadata/namespace"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn items_last_name(items: &[Value]) -> String {
    items
        .last()
        .and_then(|o| o.pointer("/metadata/name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn parse_body(body: &[u8]) -> Result<Value, (u16, Value)> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(bad_request("the body of the request was not a JSON object")),
        Err(e) => Err(bad_request(format!(
            "the body of the request was in an unknown format: {e}"
        ))),
    }
}

/// Checks apiVersion/kind and the namespace of a request body against the route.
fn check_identity(
    res: &ResourceSpec,
    route: &Route,
    obj: &mut Value,
    require_types: bool,
) -> Result<(), (u16, Value)> {
    for (field, want) in [
        ("apiVersion", res.api_version()),
        ("kind", res.kind.clone()),
    ] {
        match obj.get(field).and_then(Value::as_str) {
            Some(v) if v != want => {
                return Err(bad_request(format!(
                    "the API version/kind in the data ({v}) does not match the expected {want}"
                )))
            }
            None if require_types => return Err(bad_request(format!("{field} must be set"))),
            _ => {}
        }
        obj[field] = Value::String(want);
    }
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    let body_ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_string);
    if res.namespaced {
        let url_ns = route.namespace.clone().unwrap_or_default();
        if body_ns
            .as_ref()
            .is_some_and(|b| !b.is_empty() && *b != url_ns)
        {
            return Err(bad_request("the namespace of the provided object does not match the namespace sent on the request"));
        }
        obj["metadata"]["namespace"] = Value::String(url_ns);
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    Ok(())
}

fn strip_for_spec_compare(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn create(
    st: &mut State,
    res: &ResourceSpec,
    route: &Route,
    q: &HashMap<String, String>,
    body: &[u8],
) -> Outcome {
    let mut obj = match parse_body(body) {
        Ok(v) => v,
        Err(e) => return with_none(e),
    };
    if let Err(e) = check_identity(res, route, &mut obj, false) {
        return with_none(e);
    }
    let mgr = q
        .get("fieldManager")
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    create_obj(st, res, route, obj, None, &mgr)
}

fn create_obj(
    st: &mut State,
    res: &ResourceSpec,
    route: &Route,
    mut obj: Value,
    managers: Option<Managers>,
    mgr: &str,
) -> Outcome {
    let mut name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        match obj
            .pointer("/metadata/generateName")
            .and_then(Value::as_str)
        {
            Some(g) if !g.is_empty() => {
                st.uid += 1;
                name = format!("{g}{:05x}", st.uid);
            }
            _ => {
                return with_none(invalid(
                    res,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ))
            }
        }
    }
    if !valid_name(&name) {
        return with_none(invalid(
            res,
            &name,
            "metadata.name",
            &format!("Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"),
        ));
    }
    let key = key_of(res, route, &name);
    if st.objects.contains_key(&key) {
        return with_none(status(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", res.qualified()),
            details(res, &name),
        ));
    }
    if res.status_subresource {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    let rv = st.next_rv();
    st.uid += 1;
    let uid = format!("00000000-0000-4000-8000-{:012x}", st.uid);
    let meta = obj["metadata"].as_object_mut();
    if let Some(m) = meta {
        m.insert("name".into(), Value::String(name));
        m.insert("uid".into(), Value::String(uid));
        m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
        m.remove("deletionTimestamp");
        m.remove("managedFields");
        m.remove("generateName");
        if res.status_subresource {
            m.insert("generation".into(), json!(1));
        } else {
            m.remove("generation");
        }
    }
    let managers = managers.unwrap_or_else(|| {
        let mut m = Managers::new();
        patch::record_update(&Value::Null, &obj, &mut m, mgr);
        m
    });
    st.objects.insert(
        key.clone(),
        Stored {
            obj: obj.clone(),
            managers,
        },
    );
    let change = Change {
        rv,
        key,
        kind: "ADDED",
        obj: obj.clone(),
        prev: None,
    };
    (201, obj, Some(change))
}

/// Common tail of update and patch: subresource filtering, server-managed
/// metadata, no-op detection, generation, resourceVersion.
fn commit(
    st: &mut State,
    res: &ResourceSpec,
    key: ObjKey,
    mut new: Value,
    sub: bool,
    managers: Managers,
) -> Outcome {
    let Some(old_stored) = st.objects.get(&key) else {
        return with_none(not_found(res, &key.name));
    };
    let old = old_stored.obj.clone();
    if new.pointer("/metadata/name").and_then(Value::as_str) != Some(key.name.as_str()) {
        return with_none(bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    if res.status_subresource {
        if sub {
            let status = new.get("status").cloned();
            new = old.clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
    }
    new["apiVersion"] = Value::String(res.api_version());
    new["kind"] = Value::String(res.kind.clone());
    if !new.get("metadata").is_some_and(Value::is_object) {
        new["metadata"] = json!({});
    }
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "generation",
        "namespace",
        "resourceVersion",
    ] {
        match old.pointer(&format!("/metadata/{f}")) {
            Some(v) => new["metadata"][f] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(f);
                }
            }
        }
    }
    if let Some(m) = new["metadata"].as_object_mut() {
        m.remove("managedFields");
    }
    if new == old {
        return (200, old, None);
    }
    if res.status_subresource
        && !sub
        && strip_for_spec_compare(&new) != strip_for_spec_compare(&old)
    {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        new["metadata"]["generation"] = json!(g + 1);
    }
    let rv = st.next_rv();
    new["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    // Finalizers: an object being deleted goes away once its last
    // finalizer is removed.
    let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
    let finalizers_left = new
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    if deleting && !finalizers_left {
        st.objects.remove(&key);
        let change = Change {
            rv,
            key,
            kind: "DELETED",
            obj: new.clone(),
            prev: None,
        };
        return (200, new, Some(change));
    }
    st.objects.insert(
        key.clone(),
        Stored {
            obj: new.clone(),
            managers,
        },
    );
    let change = Change {
        rv,
        key,
        kind: "MODIFIED",
        obj: new.clone(),
        prev: Some(old),
    };
    (200, new, Some(change))
}

fn conflict(res: &ResourceSpec, name: &str) -> (u16, Value) {
    status(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            res.qualified()
        ),
        details(res, name),
    )
}

fn update(
    st: &mut State,
    res: &ResourceSpec,
    route: &Route,
    q: &HashMap<String, String>,
    body: &[u8],
) -> Outcome {
    let name = route.name.clone().unwrap_or_default();
    let mut obj = match parse_body(body) {
        Ok(v) => v,
        Err(e) => return with_none(e),
    };
    if let Err(e) = check_identity(res, route, &mut obj, false) {
        return with_none(e);
    }
    let key = key_of(res, route, &name);
    let Some(old) = st.objects.get(&key) else {
        return with_none(not_found(res, &name));
    };
    match obj
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        None | Some("") => {
            return with_none(invalid(
                res,
                &name,
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
            ))
        }
        Some(rv)
            if Some(rv)
                != old
                    .obj
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str) =>
        {
            return with_none(conflict(res, &name))
        }
        _ => {}
    }
    let mut managers = old.managers.clone();
    let before = old.obj.clone();
    let mgr = q
        .get("fieldManager")
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let sub = route.sub.is_some();
    let out = commit(st, res, key.clone(), obj, sub, managers.clone());
    if let (200, after, Some(_)) = (&out.0, &out.1, &out.2) {
        patch::record_update(&before, after, &mut managers, &mgr);
        if let Some(s) = st.objects.get_mut(&key) {
            s.managers = managers;
        }
    }
    out
}

fn patch_handler(
    st: &mut State,
    res: &ResourceSpec,
    route: &Route,
    q: &HashMap<String, String>,
    body: &[u8],
    content_type: &str,
) -> Outcome {
    let name = route.name.clone().unwrap_or_default();
    let key = key_of(res, route, &name);
    let sub = route.sub.is_some();
    let existing = st
        .objects
        .get(&key)
        .map(|s| (s.obj.clone(), s.managers.clone()));
    match content_type {
        "application/apply-patch+yaml" => {
            let Some(mgr) = q.get("fieldManager").filter(|m| !m.is_empty()).cloned() else {
                return with_none(status(
                    422,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    Value::Null,
                ));
            };
            let force = q.get("force").map(String::as_str) == Some("true");
            let mut applied: Value = match serde_yaml::from_slice(body) {
                Ok(v) => v,
                Err(e) => return with_none(bad_request(format!("error decoding YAML: {e}"))),
            };
            if !applied.is_object() {
                return with_none(bad_request("apply patch must be an object"));
            }
            if let Err(e) = check_identity(res, route, &mut applied, true) {
                return with_none(e);
            }
            if applied.pointer("/metadata/name").and_then(Value::as_str) != Some(name.as_str()) {
                return with_none(bad_request("the name of the object does not match the name on the URL"));
            }
            // Only the part this endpoint may write takes part in ownership.
            if res.status_subresource {
                if sub {
                    let status = applied.get("status").cloned();
                    let mut only = json!({"apiVersion": applied["apiVersion"], "kind": applied["kind"], "metadata": {"name": name}});
                    if let Some(s) = status {
                        only["status"] = s;
                    }
                    applied = only;
                } else if let Some(m) = applied.as_object_mut() {
                    m.remove("status");
                }
            }
            let (live, mut managers) = match existing {
                Some(e) => e,
                None if sub => return with_none(not_found(res, &name)),
                None => (json!({}), Managers::new()),
            };
            // Status ownership is tracked apart from the main resource's.
            let mut scoped: Managers = managers
                .iter()
                .map(|(m, paths)| {
                    (m.clone(), paths.iter().filter(|p| (p.first().map(String::as_str) == Some("status")) == sub).cloned().collect())
                })
                .collect();
            let merged = match patch::server_side_apply(&live, &applied, &mut scoped, &mgr, force) {
                Ok(v) => v,
                Err(conflicts) => {
                    let causes: Vec<Value> = conflicts
                        .iter()
                        .map(|c| {
                            json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": format!(".{}", c.path.join("."))})
                        })
                        .collect();
                    let msg = format!(
                        "Apply failed with {} conflict{}: {}",
                        conflicts.len(),
                        if conflicts.len() == 1 { "" } else { "s" },
                        conflicts.iter().map(|c| format!("conflict with \"{}\": .{}", c.manager, c.path.join("."))).collect::<Vec<_>>().join(", ")
                    );
                    let mut d = details(res, &name);
                    d["causes"] = Value::Array(causes);
                    return with_none(status(409, "Conflict", msg, d));
                }
            };
            for (m, paths) in managers.iter_mut() {
                paths.retain(|p| (p.first().map(String::as_str) == Some("status")) != sub);
                if let Some(s) = scoped.get(m) {
                    paths.extend(s.iter().cloned());
                }
            }
            for (m, s) in scoped {
                managers.entry(m).or_default().extend(s);
            }
            managers.retain(|_, o| !o.is_empty());
            if !st.objects.contains_key(&key) {
                return create_obj(st, res, route, merged, Some(managers), &mgr);
            }
            commit(st, res, key, merged, sub, managers)
        }
        "application/merge-patch+json" | "application/json-patch+json" => {
            let Some((live, mut managers)) = existing else { return with_none(not_found(res, &name)) };
            let mut new = live.clone();
            if content_type == "application/merge-patch+json" {
                let p: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return with_none(bad_request(format!("invalid merge patch: {e}"))),
                };
                patch::merge_patch(&mut new, &p);
            } else {
                let p: json_patch::Patch = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return with_none(bad_request(format!("invalid JSON patch: {e}"))),
                };
                if let Err(e) = json_patch::patch(&mut new, &p) {
                    return with_none(status(422, "Invalid", format!("the server rejected our request due to an error in our request: {e}"), details(res, &name)));
                }
            }
            // A resourceVersion in the patch is a precondition.
            let old_rv = live.pointer("/metadata/resourceVersion").cloned();
            if new.pointer("/metadata/resourceVersion").cloned() != old_rv {
                return with_none(conflict(res, &name));
            }
            if !new.is_object() {
                return with_none(bad_request("patch did not produce an object"));
            }
            let mgr = q.get("fieldManager").cloned().unwrap_or_else(|| "unknown".into());
            let before = live.clone();
            let out = commit(st, res, key.clone(), new, sub, managers.clone());
            if let (200, after, Some(_)) = (&out.0, &out.1, &out.2) {
                patch::record_update(&before, after, &mut managers, &mgr);
                if let Some(s) = st.objects.get_mut(&key) {
                    s.managers = managers;
                }
            }
            out
        }
        other => with_none(status(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"),
            Value::Null,
        )),
    }
}

fn delete(st: &mut State, res: &ResourceSpec, route: &Route) -> Outcome {
    let name = route.name.clone().unwrap_or_default();
    let key = key_of(res, route, &name);
    // Finalizers: mark the object as being deleted and keep it until a
    // controller removes the last one (see `commit`).
    if let Some(stored) = st.objects.get(&key) {
        let has_finalizers = stored
            .obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if stored.obj.pointer("/metadata/deletionTimestamp").is_some() {
                return (200, stored.obj.clone(), None);
            }
            let prev = stored.obj.clone();
            let mut obj = prev.clone();
            let rv = st.next_rv();
            obj["metadata"]["deletionTimestamp"] = Value::String(now_rfc3339());
            obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
            if let Some(stored) = st.objects.get_mut(&key) {
                stored.obj = obj.clone();
            }
            let change = Change {
                rv,
                key,
                kind: "MODIFIED",
                obj: obj.clone(),
                prev: Some(prev),
            };
            return (200, obj, Some(change));
        }
    }
    let Some(old) = st.objects.remove(&key) else {
        return with_none(not_found(res, &name));
    };
    let rv = st.next_rv();
    let mut obj = old.obj;
    obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
    let change = Change {
        rv,
        key,
        kind: "DELETED",
        obj: obj.clone(),
        prev: None,
    };
    (200, obj, Some(change))
}

/// Which watch event (if any) a change produces for a filtered watch.
fn event_for(
    c: &Change,
    res: &ResourceSpec,
    ns: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<(&'static str, Value)> {
    if c.key.group != res.group || c.key.plural != res.plural {
        return None;
    }
    if ns.is_some_and(|n| n != c.key.namespace) {
        return None;
    }
    let m = |o: &Value| labels.matches(o) && fields.matches(o);
    match c.kind {
        "MODIFIED" => {
            let now = m(&c.obj);
            let before = c.prev.as_ref().is_some_and(m);
            match (now, before) {
                (true, true) => Some(("MODIFIED", c.obj.clone())),
                (true, false) => Some(("ADDED", c.obj.clone())),
                (false, true) => Some(("DELETED", c.obj.clone())),
                (false, false) => None,
            }
        }
        k => m(&c.obj).then(|| (k, c.obj.clone())),
    }
}

fn line(kind: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn watch(
    shared: &Arc<Shared>,
    res: &ResourceSpec,
    route: &Route,
    q: &HashMap<String, String>,
) -> Response<Body> {
    let labels =
        match LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or("")) {
            Ok(s) => s,
            Err(e) => return full_pair(bad_request(e)),
        };
    let fields =
        match FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or("")) {
            Ok(s) => s,
            Err(e) => return full_pair(bad_request(e)),
        };
    let from = match q.get("resourceVersion").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return full_pair(bad_request(format!("invalid resource version: {s}"))),
        },
    };
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let ns = if res.namespaced {
        route.namespace.clone()
    } else {
        None
    };

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4096);
    let mut initial = Vec::new();
    let (mut changes_rx, mut last_seen, bookmark_every) = {
        let st = shared.lock();
        let changes_rx = shared.changes_tx.subscribe();
        let start = match from {
            None | Some(0) => {
                for (k, s) in st.objects.iter() {
                    let c = Change {
                        rv: 0,
                        key: k.clone(),
                        kind: "ADDED",
                        obj: s.obj.clone(),
                        prev: None,
                    };
                    if let Some((kind, o)) = event_for(&c, res, ns.as_deref(), &labels, &fields) {
                        initial.push(line(kind, &o));
                    }
                }
                st.rv
            }
            Some(n) if n < st.compacted => {
                let (_, s) = status(
                    410,
                    "Expired",
                    format!("too old resource version: {n} ({})", st.compacted + 1),
                    Value::Null,
                );
                initial.push(line("ERROR", &s));
                drop(st);
                let _ = tx.try_send(initial.remove(0));
                drop(tx);
                return stream_response(rx);
            }
            Some(n) => {
                for c in st.changes.iter().filter(|c| c.rv > n) {
                    if let Some((kind, o)) = event_for(c, res, ns.as_deref(), &labels, &fields) {
                        initial.push(line(kind, &o));
                    }
                }
                st.rv.max(n)
            }
        };
        (changes_rx, start, st.bookmark_interval)
    };
    let mut drop_rx = shared.drop_tx.subscribe();
    drop_rx.mark_unchanged();
    let kind = res.kind.clone();
    let api_version = res.api_version();
    let res = res.clone();
    tokio::spawn(async move {
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut tick = tokio::time::interval(bookmark_every.max(Duration::from_millis(10)));
        tick.tick().await;
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = changes_rx.recv() => match c {
                    Ok(c) => {
                        if c.rv <= last_seen {
                            continue;
                        }
                        last_seen = c.rv;
                        if let Some((k, o)) = event_for(&c, &res, ns.as_deref(), &labels, &fields) {
                            if tx.send(line(k, &o)).await.is_err() {
                                return;
                            }
                        }
                    }
                    // A slow watcher is closed, as the API server does.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": last_seen.to_string()}});
                    if tx.send(line("BOOKMARK", &bm)).await.is_err() {
                        return;
                    }
                }
                _ = drop_rx.changed() => return,
                _ = until_deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    stream_response(rx)
}

fn full_pair((c, v): (u16, Value)) -> Response<Body> {
    full(c, &v)
}

fn stream_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let r = parse_path("/apis/helm.toolkit.fluxcd.io/v2/namespaces/ns/helmreleases/a/status")
            .unwrap();
        assert_eq!(
            (
                r.group.as_str(),
                r.plural.as_str(),
                r.namespace.as_deref(),
                r.name.as_deref(),
                r.sub.as_deref()
            ),
            (
                "helm.toolkit.fluxcd.io",
                "helmreleases",
                Some("ns"),
                Some("a"),
                Some("status")
            )
        );
        let r = parse_path("/api/v1/namespaces/ns").unwrap();
        assert_eq!(
            (r.plural.as_str(), r.name.as_deref(), r.namespace),
            ("namespaces", Some("ns"), None)
        );
        let r = parse_path("/api/v1/secrets").unwrap();
        assert_eq!((r.plural.as_str(), r.name), ("secrets", None));
        assert_eq!(
            percent_decode("owner%3Dhelm%2Cname+in+(a)"),
            "owner=helm,name in (a)"
        );
    }
}
