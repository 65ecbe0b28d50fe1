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
    /// `templates/` documents that declare `kind: CustomResourceDefinition` but
    /// do not render without values into a CRD the guard can read: Helm may
    /// still send them, so the guard cannot call the chart safe.
    pub unverifiable: Vec<Unverifiable>,
}

/// A template document that looks like a CRD and could not be read as one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unverifiable {
    /// Archive path of the template.
    pub file: String,
    /// Why it could not be read (YAML error or CRD error).
    pub why: String,
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

/// Whether a document declares a top-level `kind: CustomResourceDefinition`
/// (indented text, e.g. inside a block scalar, does not count).
pub fn looks_like_crd(doc: &str) -> bool {
    doc.lines().any(|l| {
        l.strip_prefix("kind:").is_some_and(|v| {
            let v = v.split('#').next().unwrap_or("").trim();
            v.trim_matches(|c| c == '"' || c == '\'') == "CustomResourceDefinition"
        })
    })
}

/// CRDs of one file, and the template documents that look like CRDs but cannot
/// be read. `crds/` files must parse; other template documents that do not are
/// skipped (a broken ConfigMap template is Helm's problem, not a CRD risk).
fn crds_of(
    file: &str,
    text: &str,
    template: bool,
) -> Result<(Vec<ChartCrd>, Vec<Unverifiable>), ChartError> {
    let mut out = Vec::new();
    let mut unverifiable = Vec::new();
    let mut cannot_verify = |looks: bool, why: String| {
        if looks {
            unverifiable.push(Unverifiable {
                file: file.into(),
                why,
            });
        }
    };
    for doc in documents(text) {
        let looks = template && looks_like_crd(&doc);
        let rendered = if template && doc.contains("{{") {
            render_without_values(&doc)
        } else {
            doc
        };
        let v = match parse_yaml(&rendered) {
            Ok(v) => v,
            Err(message) if template => {
                cannot_verify(
                    looks,
                    format!("invalid YAML once rendered without values: {message}"),
                );
                continue;
            }
            Err(message) => {
                return Err(ChartError::Yaml {
                    file: file.into(),
                    message,
                })
            }
        };
        if !crd::is_crd(&v) {
            if template {
                cannot_verify(
                    looks,
                    "declares kind: CustomResourceDefinition but does not render to an apiextensions.k8s.io CRD without values".into(),
                );
            }
            continue;
        }
        match crd::parse(&v) {
            Ok(c) => out.push(ChartCrd {
                crd: c,
                file: file.into(),
                from_templates: template,
            }),
            Err(e) if template => {
                cannot_verify(looks, e.to_string());
                continue;
            }
            Err(source) => {
                return Err(ChartError::Crd {
                    file: file.into(),
                    source,
                })
            }
        }
    }
    Ok((out, unverifiable))
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
            Kind::Crds => out.crds.extend(crds_of(&full, &text(), false)?.0),
            Kind::Template => {
                let (crds, unverifiable) = crds_of(&full, &text(), true)?;
                out.crds.extend(crds);
                out.unverifiable.extend(unverifiable);
            }
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
        let (crds, unverifiable) = crds_of("t.yaml", t, true).unwrap();
        assert_eq!(crds.len(), 1);
        assert!(unverifiable.is_empty());
        assert_eq!(crds[0].crd.storage_version(), Some("v1"));
        // A broken document in templates is skipped; in crds/ it is an error.
        let bad = "a: [\n---\nkind: ConfigMap\n";
        assert_eq!(crds_of("t.yaml", bad, true).unwrap(), (vec![], vec![]));
        assert_eq!(
            crds_of("c.yaml", bad, false).unwrap_err().label(),
            "chart_yaml"
        );
    }

    #[test]
    fn template_crds_that_cannot_be_read_are_reported() {
        let cases = [
            // Broken once rendered: a multi-line action leaves an unclosed flow sequence.
            (
                "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: a.b\nspec: {{ toYaml\n  .Values.spec }}\n  versions: [\n",
                true,
            ),
            // apiVersion from values: not provably a CRD.
            (
                "apiVersion: {{ .Values.crdApi }}\nkind: CustomResourceDefinition\nmetadata:\n  name: a.b\n",
                true,
            ),
            // Quoted kind, no group: parses but is not a usable CRD.
            (
                "apiVersion: apiextensions.k8s.io/v1\nkind: \"CustomResourceDefinition\"\nmetadata:\n  name: a.b\nspec:\n  versions: []\n",
                true,
            ),
            // The text only inside a block scalar: not a CRD declaration.
            (
                "apiVersion: v1\nkind: ConfigMap\ndata:\n  x: |\n    kind: CustomResourceDefinition\n    a: [\n",
                false,
            ),
        ];
        for (doc, want) in cases {
            let (crds, unverifiable) = crds_of("c/templates/x.yaml", doc, true).unwrap();
            assert!(crds.is_empty(), "{doc}");
            assert_eq!(
                unverifiable.len(),
                usize::from(want),
                "{doc}: {unverifiable:?}"
            );
            if want {
                assert_eq!(unverifiable[0].file, "c/templates/x.yaml");
            }
        }
        // Through a whole archive: the contents say which template.
        let t = tgz(&[
            ("c/Chart.yaml", b"name: c\nversion: 1.0.0\n".to_vec()),
            ("c/templates/x.yaml", cases[1].0.as_bytes().to_vec()),
        ]);
        let c = extract(&t, 1 << 20).unwrap();
        assert_eq!(c.unverifiable.len(), 1);
        assert_eq!(c.unverifiable[0].file, "c/templates/x.yaml");
    }

    /// A tar.gz of `(path, bytes)` files.
    fn tgz(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut b = tar::Builder::new(gz);
        for (path, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, content.as_slice()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    const CRD: &str = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: a.b\nspec:\n  group: b\n  names: {plural: a}\n  versions: [{name: v1, served: true, storage: true}]\n";

    /// A small chart like the seed corpus: crds/, templates/, values, a nested subchart.
    fn sample_chart() -> Vec<u8> {
        let sub = tgz(&[
            ("sub/Chart.yaml", b"name: sub\nversion: 0.1.0\n".to_vec()),
            (
                "sub/templates/crd.yaml",
                format!("{{{{- if .Values.crds }}}}\n{CRD}{{{{- end }}}}\n").into_bytes(),
            ),
        ]);
        tgz(&[
            (
                "c/Chart.yaml",
                b"name: c\nversion: 1.0.0\nappVersion: 2.4.0\n".to_vec(),
            ),
            (
                "c/values.yaml",
                b"helmController:\n  tag: v1.1.0\n".to_vec(),
            ),
            ("c/crds/a.yaml", CRD.as_bytes().to_vec()),
            ("c/charts/sub-0.1.0.tgz", sub),
        ])
    }

    /// Truncated and bit-flipped archives: an error or a bounded result, never a panic.
    #[test]
    fn truncated_and_corrupted_archives_are_errors_not_panics() {
        let good = sample_chart();
        let c = extract(&good, 1 << 20).unwrap();
        assert_eq!(c.crds.len(), 2);
        assert_eq!(c.charts.len(), 2);
        let mut errors = 0;
        for n in 0..good.len() {
            match extract(&good[..n], 1 << 20) {
                Err(_) => errors += 1,
                // Only a cut after tar's end-of-archive blocks (in gzip's tail) reads
                // through: then nothing was lost. A cut never silently drops a CRD.
                Ok(c) => assert_eq!((c.crds.len(), c.charts.len()), (2, 2), "prefix {n}"),
            }
        }
        assert!(errors > good.len() * 9 / 10, "{errors} of {}", good.len());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut bad = good.clone();
            let i = (x % bad.len() as u64) as usize;
            bad[i] ^= 1 << (x >> 61);
            if let Ok(c) = extract(&bad, 1 << 20) {
                assert!(c.crds.len() <= 2 && c.charts.len() <= 2);
            }
        }
    }

    #[test]
    fn bounds_hold() {
        // Total unpacked bytes: a gzip bomb of zeros stops at the limit.
        let bomb = tgz(&[
            ("c/Chart.yaml", b"name: c\nversion: 1\n".to_vec()),
            ("c/templates/big.yaml", vec![b' '; 4 << 20]),
        ]);
        assert!(bomb.len() < 64 * 1024, "compresses well: {}", bomb.len());
        match extract(&bomb, 1 << 20) {
            Err(ChartError::TooLarge { limit }) => assert_eq!(limit, 1 << 20),
            other => panic!("{other:?}"),
        }
        // One file over MAX_FILE_BYTES by its header: refused before reading it.
        let mut h = tar::Header::new_gnu();
        h.set_path("c/templates/huge.yaml").unwrap();
        h.set_size(MAX_FILE_BYTES + 1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, h.as_bytes()).unwrap();
        let huge = gz.finish().unwrap();
        match extract(&huge, u64::MAX) {
            Err(ChartError::TooLarge { limit }) => assert_eq!(limit, MAX_FILE_BYTES),
            other => panic!("{other:?}"),
        }
        // Nesting: MAX_DEPTH levels of charts/*.tgz are read, one more is refused.
        let nest = |levels: usize| {
            let mut inner = tgz(&[("n/Chart.yaml", b"name: n\nversion: 1\n".to_vec())]);
            for _ in 0..levels {
                inner = tgz(&[
                    ("n/Chart.yaml", b"name: n\nversion: 1\n".to_vec()),
                    ("n/charts/n.tgz", inner),
                ]);
            }
            inner
        };
        assert_eq!(
            extract(&nest(MAX_DEPTH), 1 << 20).unwrap().charts.len(),
            MAX_DEPTH + 1
        );
        assert_eq!(
            extract(&nest(MAX_DEPTH + 1), 1 << 20).unwrap_err().label(),
            "chart_too_deep"
        );
    }

    proptest::proptest! {
        /// Arbitrary splices into a real archive never panic, and a result stays bounded.
        #[test]
        fn mutated_archives_never_panic(at in 0usize..4096, junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), cut in 0usize..4096) {
            let mut bad = sample_chart();
            let at = at % (bad.len() + 1);
            bad.splice(at..(at + junk.len()).min(bad.len()), junk);
            bad.truncate(bad.len().saturating_sub(cut % 8));
            if let Ok(c) = extract(&bad, 1 << 20) {
                proptest::prop_assert!(c.crds.len() <= 2 && c.charts.len() <= 2);
            }
        }
    }

    /// The fuzz seed is a real chart: what the fuzzer mutates starts from a readable archive.
    #[test]
    fn fuzz_seed_is_a_chart() {
        let seed = include_bytes!("../../fuzz/seeds/chart_archive/bp-flux-1.1.2.tgz");
        let c = extract(seed, 1 << 20).unwrap();
        assert_eq!(c.root().map(|r| r.name.as_str()), Some("bp-flux"));
        assert_eq!(
            c.chart_named("flux2")
                .and_then(|f| f.app_version.as_deref()),
            Some("2.4.0")
        );
        assert_eq!(
            c.crds
                .iter()
                .map(|c| (c.crd.name.as_str(), c.from_templates))
                .collect::<Vec<_>>(),
            [
                ("helmreleases.helm.toolkit.fluxcd.io", false),
                ("helmreleases.helm.toolkit.fluxcd.io", true)
            ]
        );
        assert!(c.unverifiable.is_empty());
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
