//! Patch semantics: JSON merge patch (RFC 7386), JSON patch (RFC 6902, via the
//! `json-patch` crate) and a server-side apply that tracks field ownership per
//! manager (lists are atomic, as for CRDs without list-type markers).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

/// A leaf field path (object keys from the root).
pub type FieldPath = Vec<String>;

/// RFC 7386 merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Map::new());
        }
        if let Value::Object(t) = target {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
    } else {
        *target = patch.clone();
    }
}

/// Identity fields a manager never owns.
fn skip_path(path: &[String]) -> bool {
    matches!(
        path.first().map(String::as_str),
        Some("apiVersion") | Some("kind")
    ) || (path.first().map(String::as_str) == Some("metadata")
        && matches!(
            path.get(1).map(String::as_str),
            Some("name")
                | Some("namespace")
                | Some("resourceVersion")
                | Some("uid")
                | Some("generation")
                | Some("creationTimestamp")
                | Some("managedFields")
        ))
}

/// Leaf paths of `v` (non-empty objects are recursed; lists and scalars are leaves).
pub fn leaf_paths(v: &Value) -> BTreeSet<FieldPath> {
    fn walk(v: &Value, prefix: &mut FieldPath, out: &mut BTreeSet<FieldPath>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, c) in m {
                    prefix.push(k.clone());
                    walk(c, prefix, out);
                    prefix.pop();
                }
            }
            _ => {
                if !prefix.is_empty() && !skip_path(prefix) {
                    out.insert(prefix.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

pub fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| cur.get(k))
}

fn remove_path(v: &mut Value, path: &[String]) {
    if let Some((last, parents)) = path.split_last() {
        let mut cur = v;
        for k in parents {
            match cur.get_mut(k) {
                Some(c) => cur = c,
                None => return,
            }
        }
        if let Value::Object(m) = cur {
            m.remove(last);
        }
    }
}

/// Deep merge where objects merge and everything else replaces (apply semantics).
fn apply_merge(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (k, v) in a {
                match t.get_mut(k) {
                    Some(tv) if tv.is_object() && v.is_object() => apply_merge(tv, v),
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, a) => *t = a.clone(),
    }
}

/// Field ownership of one object: manager -> owned leaf paths.
pub type Managers = BTreeMap<String, BTreeSet<FieldPath>>;

/// A server-side apply conflict: field and the manager owning it.
#[derive(Debug, Clone)]
pub struct Conflict {
    pub manager: String,
    pub path: FieldPath,
}

/// Server-side apply of `applied` by `manager` onto `live`. Returns the new object
/// or the conflicts (when `force` is false).
pub fn server_side_apply(
    live: &Value,
    applied: &Value,
    managers: &mut Managers,
    manager: &str,
    force: bool,
) -> Result<Value, Vec<Conflict>> {
    let new_paths = leaf_paths(applied);
    let mut conflicts = Vec::new();
    for p in &new_paths {
        let differs = get_path(live, p) != get_path(applied, p);
        if !differs {
            continue;
        }
        for (m, owned) in managers.iter() {
            if m != manager && owned.contains(p) {
                conflicts.push(Conflict {
                    manager: m.clone(),
                    path: p.clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let mut out = live.clone();
    // Fields this manager applied before and no longer applies are removed unless someone else owns them.
    let previous = managers.get(manager).cloned().unwrap_or_default();
    for p in previous.difference(&new_paths) {
        let owned_elsewhere = managers.iter().any(|(m, o)| m != manager && o.contains(p));
        if !owned_elsewhere {
            remove_path(&mut out, p);
        }
    }
    apply_merge(&mut out, applied);
    for (m, owned) in managers.iter_mut() {
        if m != manager && force {
            for p in &new_paths {
                owned.remove(p);
            }
        }
    }
    managers.insert(manager.to_string(), new_paths);
    managers.retain(|_, o| !o.is_empty());
    Ok(out)
}

/// After a non-apply write by `manager`, give it the leaf fields that changed.
pub fn record_update(before: &Value, after: &Value, managers: &mut Managers, manager: &str) {
    let after_paths = leaf_paths(after);
    let changed: BTreeSet<FieldPath> = after_paths
        .iter()
        .filter(|p| get_path(before, p) != get_path(after, p))
        .cloned()
        .collect();
    for owned in managers.values_mut() {
        owned.retain(|p| after_paths.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        managers
            .entry(manager.to_string())
            .or_default()
            .extend(changed);
    }
    managers.retain(|_, o| !o.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386_examples() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1, 2]});
        merge_patch(&mut t, &json!({"a": [3]}));
        assert_eq!(t, json!({"a": [3]}));
    }

    #[test]
    fn apply_conflicts_then_force() {
        let mut mgrs = Managers::new();
        let live = json!({"spec": {}});
        let a =
            server_side_apply(&live, &json!({"spec": {"x": 1}}), &mut mgrs, "a", false).unwrap();
        assert!(server_side_apply(&a, &json!({"spec": {"x": 2}}), &mut mgrs, "b", false).is_err());
        // Same value: no conflict, shared ownership.
        assert!(server_side_apply(
            &a,
            &json!({"spec": {"x": 1}}),
            &mut mgrs.clone(),
            "b",
            false
        )
        .is_ok());
        let b = server_side_apply(&a, &json!({"spec": {"x": 2}}), &mut mgrs, "b", true).unwrap();
        assert_eq!(b, json!({"spec": {"x": 2}}));
        assert!(!mgrs.contains_key("a"));
        // b drops the field: it is removed.
        let c = server_side_apply(&b, &json!({"spec": {"y": 1}}), &mut mgrs, "b", false).unwrap();
        assert_eq!(c, json!({"spec": {"y": 1}}));
    }
}
