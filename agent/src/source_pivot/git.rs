//! `pivot sources`: rewrite source URL declarations in Git (clone, edit, commit,
//! push) with the real git CLI. The edit is textual and line-based, so
//! formatting, comments and key order survive; only `url:` values that start
//! with `--from` have that prefix replaced by `--to`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why the pivot stopped. `label()` is the metric/exit label.
#[derive(Debug, thiserror::Error)]
pub enum GitPivotError {
    #[error("git {args}: {stderr}")]
    Git { args: String, stderr: String },
    #[error("could not run git: {0}")]
    Spawn(std::io::Error),
    #[error("path {0} does not exist in the cloned branch")]
    NoPath(String),
    #[error("no `url:` declaration under {path} starts with {from}")]
    NoMatches { path: String, from: String },
    #[error("push rejected by {remote}: {stderr}")]
    PushRejected { remote: String, stderr: String },
    #[error("clone is dirty before editing: {0}")]
    DirtyClone(String),
    #[error("file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid prefixes: {0}")]
    BadArgs(String),
}

impl GitPivotError {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Git { .. } => "git",
            Self::Spawn(_) => "spawn",
            Self::NoPath(_) => "no_path",
            Self::NoMatches { .. } => "no_matches",
            Self::PushRejected { .. } => "push_rejected",
            Self::DirtyClone(_) => "dirty_clone",
            Self::File { .. } => "file",
            Self::BadArgs(_) => "bad_args",
        }
    }
}

/// Rewrite `url:` values starting with `from` (plain, single- or double-quoted,
/// in a mapping or a list item). Returns the new text and the number of rewrites.
pub fn rewrite_urls(text: &str, from: &str, to: &str) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut count = 0;
    for line in text.split_inclusive('\n') {
        match rewrite_line(line, from, to) {
            Some(l) => {
                out.push_str(&l);
                count += 1;
            }
            None => out.push_str(line),
        }
    }
    (out, count)
}

fn rewrite_line(line: &str, from: &str, to: &str) -> Option<String> {
    let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
    let mut rest = &line[indent..];
    let mut head = indent;
    // List item: `- url: ...`
    if let Some(r) = rest.strip_prefix("- ") {
        let r2 = r.trim_start_matches(' ');
        head += rest.len() - r2.len();
        rest = r2;
    }
    let after_key = rest
        .strip_prefix("url:")
        .or_else(|| rest.strip_prefix("\"url\":"))
        .or_else(|| rest.strip_prefix("'url':"))?;
    head += rest.len() - after_key.len();
    let value = after_key.trim_start_matches([' ', '\t']);
    if value.len() == after_key.len() && !after_key.trim_end().is_empty() {
        // `url:x` is not a YAML key/value pair.
        return None;
    }
    head += after_key.len() - value.len();
    let quote = match value.as_bytes().first() {
        Some(b'"') => "\"",
        Some(b'\'') => "'",
        _ => "",
    };
    let unquoted = &value[quote.len()..];
    let tail = unquoted.strip_prefix(from)?;
    Some(format!("{}{quote}{to}{tail}", &line[..head]))
}

/// Run git in `dir`; stderr in the error.
fn git(dir: Option<&Path>, args: &[&str]) -> Result<String, GitPivotError> {
    let mut cmd = Command::new("git");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .output()
        .map_err(GitPivotError::Spawn)?;
    if !out.status.success() {
        return Err(GitPivotError::Git {
            args: args.join(" "),
            // `push --porcelain` reports per-ref rejections on stdout.
            stderr: format!(
                "{} {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )
            .trim()
            .to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Debug, Clone)]
pub struct GitPivotArgs {
    pub remote: String,
    pub branch: String,
    /// Directory inside the repository (e.g. `clusters/_template/bootstrap-kit`).
    pub path: String,
    pub from: String,
    pub to: String,
    pub dry_run: bool,
    pub author_name: String,
    pub author_email: String,
}

#[derive(Debug, Clone, Default)]
pub struct GitPivotReport {
    /// (file relative to the repository, rewrites in it)
    pub files: Vec<(String, usize)>,
    pub rewrites: usize,
    /// `git diff` of the edit (always filled, printed by --dry-run).
    pub diff: String,
    /// Commit pushed (None on --dry-run).
    pub commit: Option<String>,
    pub message: String,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), GitPivotError> {
    let file_err = |source| GitPivotError::File {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(file_err)?
        .collect::<Result<_, _>>()
        .map_err(file_err)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let ft = e.file_type().map_err(file_err)?;
        if ft.is_dir() {
            yaml_files(&p, out)?;
        } else if ft.is_file()
            && matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml"))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Clone, rewrite, and (unless dry-run) commit and push. Nothing outside the
/// temporary clone is touched on any error or on --dry-run.
pub fn pivot(args: &GitPivotArgs) -> Result<GitPivotReport, GitPivotError> {
    if args.from.is_empty() || args.to.is_empty() || args.from == args.to {
        return Err(GitPivotError::BadArgs(
            "--from and --to must be non-empty and different".into(),
        ));
    }
    if args.path.split('/').any(|c| c == "..") || args.path.starts_with('/') {
        return Err(GitPivotError::BadArgs(format!(
            "--path {} must be relative inside the repository",
            args.path
        )));
    }
    let tmp = tempfile::tempdir().map_err(|source| GitPivotError::File {
        path: std::env::temp_dir(),
        source,
    })?;
    let dir = tmp.path().join("repo");
    let dir_s = dir.to_string_lossy().into_owned();
    git(
        None,
        &[
            "clone",
            "--quiet",
            "--single-branch",
            "--branch",
            &args.branch,
            &args.remote,
            &dir_s,
        ],
    )?;
    let status = git(Some(&dir), &["status", "--porcelain"])?;
    if !status.trim().is_empty() {
        return Err(GitPivotError::DirtyClone(status.trim().to_string()));
    }
    let root = dir.join(&args.path);
    if !root.is_dir() {
        return Err(GitPivotError::NoPath(args.path.clone()));
    }
    let mut files = Vec::new();
    yaml_files(&root, &mut files)?;
    let mut report = GitPivotReport::default();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|source| GitPivotError::File {
            path: f.clone(),
            source,
        })?;
        let (new, n) = rewrite_urls(&text, &args.from, &args.to);
        if n > 0 {
            std::fs::write(&f, new).map_err(|source| GitPivotError::File {
                path: f.clone(),
                source,
            })?;
            let rel = f
                .strip_prefix(&dir)
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned();
            report.files.push((rel, n));
            report.rewrites += n;
        }
    }
    if report.rewrites == 0 {
        return Err(GitPivotError::NoMatches {
            path: args.path.clone(),
            from: args.from.clone(),
        });
    }
    report.diff = git(Some(&dir), &["diff", "--no-color"])?;
    let mut message = format!(
        "pivot sources: {} -> {} in {}\n\nRewrote {} url declaration(s) in {} file(s) so Flux keeps the\nSovereign-local sources: Git first, so the cluster never reverts the pivot.\n\n",
        args.from,
        args.to,
        args.path,
        report.rewrites,
        report.files.len()
    );
    for (f, n) in &report.files {
        message.push_str(&format!("- {f} ({n})\n"));
    }
    report.message = message;
    if args.dry_run {
        return Ok(report);
    }
    git(Some(&dir), &["add", "--", &args.path])?;
    let name = format!("user.name={}", args.author_name);
    let email = format!("user.email={}", args.author_email);
    git(
        Some(&dir),
        &[
            "-c",
            &name,
            "-c",
            &email,
            "commit",
            "--quiet",
            "-m",
            &report.message,
        ],
    )?;
    let refspec = format!("HEAD:refs/heads/{}", args.branch);
    match git(Some(&dir), &["push", "--porcelain", "origin", &refspec]) {
        Ok(_) => {}
        Err(GitPivotError::Git { stderr, .. })
            if stderr.contains("rejected") || stderr.contains("non-fast-forward") =>
        {
            return Err(GitPivotError::PushRejected {
                remote: args.remote.clone(),
                stderr,
            });
        }
        Err(e) => return Err(e),
    }
    report.commit = Some(git(Some(&dir), &["rev-parse", "HEAD"])?.trim().to_string());
    Ok(report)
}

/// Ask Flux to reconcile a GitRepository now (`reconcile.fluxcd.io/requestedAt`).
pub async fn request_reconcile(
    client: kube::Client,
    namespace: &str,
    name: &str,
    at: &str,
) -> Result<(), kube::Error> {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::core::{ApiResource, GroupVersionKind};
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("source.toolkit.fluxcd.io", "v1", "GitRepository"),
        "gitrepositories",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &ar);
    let patch = serde_json::json!({
        "metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": at}}
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_table() {
        let from = "oci://ghcr.io/openova-io";
        let to = "oci://harbor.sov.io/openova-io";
        let cases: &[(&str, &str, usize)] = &[
            (
                "  url: oci://ghcr.io/openova-io\n",
                "  url: oci://harbor.sov.io/openova-io\n",
                1,
            ),
            (
                "  url: \"oci://ghcr.io/openova-io\" # pinned\n",
                "  url: \"oci://harbor.sov.io/openova-io\" # pinned\n",
                1,
            ),
            (
                "  url: 'oci://ghcr.io/openova-io/sub'\n",
                "  url: 'oci://harbor.sov.io/openova-io/sub'\n",
                1,
            ),
            (
                "  - url: oci://ghcr.io/openova-io\n",
                "  - url: oci://harbor.sov.io/openova-io\n",
                1,
            ),
            (
                "  url:   oci://ghcr.io/openova-io\r\n",
                "  url:   oci://harbor.sov.io/openova-io\r\n",
                1,
            ),
            (
                "  # url: oci://ghcr.io/openova-io\n",
                "  # url: oci://ghcr.io/openova-io\n",
                0,
            ),
            (
                "  baseurl: oci://ghcr.io/openova-io\n",
                "  baseurl: oci://ghcr.io/openova-io\n",
                0,
            ),
            (
                "  url: oci://ghcr.io/other\n",
                "  url: oci://ghcr.io/other\n",
                0,
            ),
            (
                "  url:oci://ghcr.io/openova-io\n",
                "  url:oci://ghcr.io/openova-io\n",
                0,
            ),
            (
                "  description: see url: oci://ghcr.io/openova-io\n",
                "  description: see url: oci://ghcr.io/openova-io\n",
                0,
            ),
        ];
        for (input, expected, n) in cases {
            let (out, count) = rewrite_urls(input, from, to);
            assert_eq!((out.as_str(), count), (*expected, *n), "input {input:?}");
        }
    }

    #[test]
    fn rewrite_preserves_everything_else() {
        let doc = "# header comment\napiVersion: source.toolkit.fluxcd.io/v1\nkind: HelmRepository\nmetadata:\n  name: bp-cilium   # trailing\nspec:\n  type: oci\n  url: oci://ghcr.io/openova-io\n  interval: 10m\n";
        let (out, n) = rewrite_urls(
            doc,
            "oci://ghcr.io/openova-io",
            "oci://harbor.sov.io/openova-io",
        );
        assert_eq!(n, 1);
        assert_eq!(
            out,
            doc.replace(
                "url: oci://ghcr.io/openova-io",
                "url: oci://harbor.sov.io/openova-io"
            )
        );
    }
}
