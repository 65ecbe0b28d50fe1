//! Chart archive (.tgz) reading: every CRD Helm would send, from the chart's and
//! its subcharts' `crds/` directories, nested subchart archives (`charts/*.tgz`),
//! and CRDs in `templates/` (plain YAML, or rendered without values by dropping
//! template actions). Bounded: total unpacked bytes and nesting depth.

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

use serde::Deserialize;
use serde_json::Value;

use super::crd::{self, CrdView};

/// Deepest `charts/*.tgz` nesting followed.
pub const MAX_DEPTH: usize = 4;
/// Largest single file read from the archive.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// `Chart.yaml` of the chart or one of its subcharts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartMeta {
    /// `bp-flux`, `bp-flux/charts/flux2`, ...
    pub path: String,
    pub name: String,
    pub version: String,
    pub app_version: Option<String>,
}

/// One CRD found in the chart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartCrd {
    pub crd: CrdView,
    /// Archive path of the file it came from.
    pub file: String,
    /// Found in `templates/` (Helm installs, upgrades and deletes these; `crds/` only installs).
    pub from_templates: bool,
}

/// Everything the guard reads from one chart archive.
#[derive(Debug, Clone, Default)]
pub struct ChartContents {
    pub charts: Vec<ChartMeta>,
    pub crds: Vec<ChartCrd>,
    /// Controller image tags from each chart's `values.yaml` (by chart path; flux2 layout).
    pub image_tags: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
}

impl ChartContents {
    /// The chart (or subchart) named `name`, outermost first.
    pub fn chart_named(&self, name: &str) -> Option<&ChartMeta> {
        let mut c: Vec<&ChartMeta> = self.charts.iter().filter(|c| c.name == name).collect();
        c.sort_by_key(|c| c.path.matches('/').count());
        c.first().copied()
    }

    /// The top-level chart.
    pub fn root(&self) -> Option<&ChartMeta> {
        self.charts
            .iter()
            .min_by_key(|c| c.path.matches('/').count())
    }
}

/// Why an archive could not be read; `label()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("reading the chart archive: {0}")]
    Archive(#[source] std::io::Error),
    #[error("the chart unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("subchart archives nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("no Chart.yaml in the archive")]
    NoChart,
    #[error("{file}: invalid YAML: {message}")]
    Yaml { file: String, message: String },
    #[error("{file}: {source}")]
    Crd {
        file: String,
        #[source]
        source: crd::CrdError,
    },
}

impl ChartError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Archive(_) => "chart_archive",
            Self::TooLarge { .. } => "chart_too_large",
            Self::TooDeep => "chart_too_deep",
            Self::NoChart => "chart_no_chart_yaml",
            Self::Yaml { .. } => "chart_yaml",
            Self::Crd { .. } => "chart_crd",
        }
    }
}

/// What an archive path is to the guard.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    ChartYaml(String),
    Values(String),
    Crds,
    Template,
    Nested(String),
    Other,
}

fn yaml_ext(f: &str) -> bool {
    f.ends_with(".yaml") || f.ends_with(".yml")
}

fn classify(path: &str) -> Kind {
    let comps: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let Some(root) = comps.first() else {
        return Kind::Other;
    };
    let mut chart = root.to_string();
    let mut i = 1;
    while comps.len() > i + 2 && comps[i] == "charts" {
        chart = format!("{chart}/charts/{}", comps[i + 1]);
        i += 2;
    }
    let rest = &comps[i..];
    let file = rest.last().copied().unwrap_or("");
    match rest {
        ["Chart.yaml"] => Kind::ChartYaml(chart),
        ["values.yaml"] => Kind::Values(chart),
        ["crds", .., _] if yaml_ext(file) || file.ends_with(".json") => Kind::Crds,
        ["templates", .., _] if yaml_ext(file) => Kind::Template,
        ["charts", f] if f.ends_with(".tgz") => Kind::Nested(format!("{chart}/charts/{f}")),
        _ => Kind::Other,
    }
}

/// Split a multi-document YAML text on `---` lines (so one bad document does not hide the next).
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.starts_with("---") && line[3..].trim().is_empty() {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.into_iter().filter(|d| !d.trim().is_empty()).collect()
}

/// Render a template without values: lines that are only template actions go,
/// inline actions become a placeholder scalar.
pub fn render_without_values(doc: &str) -> String {
    let mut out = String::with_capacity(doc.len());
    for line in doc.lines() {
        let t = line.trim();
        if t.starts_with("{{") && t.ends_with("}}") && t.matches("{{").count() == 1 {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            match rest[start..].find("}}") {
                Some(end) => {
                    out.push_str("templated");
                    rest = &rest[start + end + 2..];
                }
                None => {
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

fn parse_yaml(doc: &str) -> Result<Value, String> {
    let de = serde_yaml::Deserializer::from_str(doc);
    Value::deserialize(de).map_err(|e| e.to_string())
}

/// CRDs of one file. `crds/` files must parse; template documents that do not are skipped.
fn crds_of(file: &str, text: &str, template: bool) -> Result<Vec<ChartCrd>, ChartError> {
    let mut out = Vec::new();
    for doc in documents(text) {
        let rendered = if template && doc.contains("{{") {
            render_without_values(&doc)
        } else {
            doc
        };
        let v = match parse_yaml(&rendered) {
            Ok(v) => v,
            Err(_) if template => continue,
            Err(message) => {
                return Err(ChartError::Yaml {
                    file: file.into(),
                    message,
                })
            }
        };
        if !crd::is_crd(&v) {
            continue;
        }
        match crd::parse(&v) {
            Ok(c) => out.push(ChartCrd {
                crd: c,
                file: file.into(),
                from_templates: template,
            }),
            Err(_) if template => continue,
            Err(source) => {
                return Err(ChartError::Crd {
                    file: file.into(),
                    source,
                })
            }
        }
    }
    Ok(out)
}

fn chart_meta(path: String, file: &str, text: &str) -> Result<ChartMeta, ChartError> {
    let v = parse_yaml(text).map_err(|message| ChartError::Yaml {
        file: file.into(),
        message,
    })?;
    let s = |k: &str| match v.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok(ChartMeta {
        name: s("name").unwrap_or_default(),
        version: s("version").unwrap_or_default(),
        app_version: s("appVersion"),
        path,
    })
}

/// Counts unpacked bytes against a shared budget; flags when it runs out.
struct Bounded<R> {
    inner: R,
    left: Rc<Cell<u64>>,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let left = self.left.get();
        if n as u64 > left {
            self.exceeded.set(true);
            return Err(std::io::Error::other("unpacked size limit reached"));
        }
        self.left.set(left - n as u64);
        Ok(n)
    }
}

/// Read every CRD and Chart.yaml of a chart archive; `limit` bounds the unpacked bytes.
pub fn extract(tgz: &[u8], limit: u64) -> Result<ChartContents, ChartError> {
    let mut out = ChartContents::default();
    let left = Rc::new(Cell::new(limit));
    let exceeded = Rc::new(Cell::new(false));
    let r = walk(tgz, "", 0, &left, &exceeded, &mut out);
    if exceeded.get() {
        return Err(ChartError::TooLarge { limit });
    }
    r?;
    if out.charts.is_empty() {
        return Err(ChartError::NoChart);
    }
    Ok(out)
}

fn walk(
    tgz: &[u8],
    prefix: &str,
    depth: usize,
    left: &Rc<Cell<u64>>,
    exceeded: &Rc<Cell<bool>>,
    out: &mut ChartContents,
) -> Result<(), ChartError> {
    if depth > MAX_DEPTH {
        return Err(ChartError::TooDeep);
    }
    let reader = Bounded {
        inner: flate2::read::GzDecoder::new(tgz),
        left: left.clone(),
        exceeded: exceeded.clone(),
    };
    let mut ar = tar::Archive::new(reader);
    let entries = ar.entries().map_err(ChartError::Archive)?;
    for entry in entries {
        let mut e = entry.map_err(ChartError::Archive)?;
        if !e.header().entry_type().is_file() {
            continue;
        }
        let path = e
            .path()
            .map_err(ChartError::Archive)?
            .to_string_lossy()
            .into_owned();
        let kind = classify(&path);
        if kind == Kind::Other {
            continue;
        }
        let size = e.header().size().map_err(ChartError::Archive)?;
        if size > MAX_FILE_BYTES {
            return Err(ChartError::TooLarge {
                limit: MAX_FILE_BYTES,
            });
        }
        let mut buf = Vec::with_capacity(size as usize);
        (&mut e)
            .take(MAX_FILE_BYTES)
            .read_to_end(&mut buf)
            .map_err(ChartError::Archive)?;
        let full = if prefix.is_empty() {
            path.clone()
        } else {
            format!("{prefix}!{path}")
        };
        let text = || String::from_utf8_lossy(&buf).into_owned();
        match kind {
            Kind::ChartYaml(chart) => {
                let chart = match prefix {
                    "" => chart,
                    p => format!("{}/{}", p.trim_end_matches(".tgz"), chart),
                };
                out.charts.push(chart_meta(chart, &full, &text())?);
            }
            Kind::Values(chart) => {
                let chart = match prefix {
                    "" => chart,
                    p => format!("{}/{}", p.trim_end_matches(".tgz"), chart),
                };
                // Values are only read for image tags: unparsable values are not an error here.
                if let Ok(v) = parse_yaml(&text()) {
                    let tags = super::skew::tags_from_values(&v);
                    if !tags.is_empty() {
                        out.image_tags.insert(chart, tags);
                    }
                }
            }
            Kind::Crds => out.crds.extend(crds_of(&full, &text(), false)?),
            Kind::Template => out.crds.extend(crds_of(&full, &text(), true)?),
            Kind::Nested(_) => walk(&buf, &full, depth + 1, left, exceeded, out)?,
            Kind::Other => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_paths() {
        let cases = [
            ("bp-flux/Chart.yaml", Kind::ChartYaml("bp-flux".into())),
            ("bp-flux/crds/a.yaml", Kind::Crds),
            ("bp-flux/crds/sub/a.json", Kind::Crds),
            ("bp-flux/crds/README.md", Kind::Other),
            ("bp-flux/templates/crds.yaml", Kind::Template),
            (
                "bp-flux/charts/flux2/Chart.yaml",
                Kind::ChartYaml("bp-flux/charts/flux2".into()),
            ),
            ("bp-flux/charts/flux2/crds/x.yaml", Kind::Crds),
            ("bp-flux/charts/flux2/templates/x.yml", Kind::Template),
            (
                "bp-flux/charts/flux2-2.14.1.tgz",
                Kind::Nested("bp-flux/charts/flux2-2.14.1.tgz".into()),
            ),
            ("bp-flux/values.yaml", Kind::Values("bp-flux".into())),
            ("bp-flux/README.md", Kind::Other),
            ("./bp-flux/crds/a.yaml", Kind::Crds),
        ];
        for (p, want) in cases {
            assert_eq!(classify(p), want, "{p}");
        }
    }

    #[test]
    fn renders_templates_without_values() {
        let t = "{{- if .Values.installCRDs }}\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: a.b\n  labels:\n    app: {{ .Release.Name }}\nspec:\n  group: b\n  names: {plural: a}\n  versions: [{name: v1, served: true, storage: true}]\n{{- end }}\n";
        let crds = crds_of("t.yaml", t, true).unwrap();
        assert_eq!(crds.len(), 1);
        assert_eq!(crds[0].crd.storage_version(), Some("v1"));
        // A broken document in templates is skipped; in crds/ it is an error.
        let bad = "a: [\n---\nkind: ConfigMap\n";
        assert!(crds_of("t.yaml", bad, true).unwrap().is_empty());
        assert_eq!(
            crds_of("c.yaml", bad, false).unwrap_err().label(),
            "chart_yaml"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(
            extract(b"not gzip", 1 << 20).unwrap_err().label(),
            "chart_archive"
        );
        assert_eq!(extract(&[], 1 << 20).unwrap_err().label(), "chart_archive");
    }
}
