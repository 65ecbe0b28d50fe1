//! This workspace's binaries (`continuum-agent`, `continuum-witness`) for
//! tests, drills and benchmarks: built first when running under cargo (which
//! sets `CARGO`), so a test never runs a stale binary, then found next to the
//! running executable (`target/<profile>/`). `CONTINUUM_AGENT_BIN` and
//! `CONTINUUM_WITNESS_BIN` override the lookup.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// Builds both binaries once per process, in the running executable's profile.
fn ensure_built() -> Result<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let Some(cargo) = std::env::var_os("CARGO") else {
                return Ok(());
            };
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let release = exe
                .ancestors()
                .any(|d| d.file_name().is_some_and(|n| n == "release"));
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "-q",
                "-p",
                "continuum-agent",
                "-p",
                "continuum-witness",
            ]);
            if release {
                cmd.arg("--release");
            }
            // Cargo gives a test (or `cargo run`) the variables of its own
            // package; build scripts watch some of them (ring's does), so
            // passing them on would rebuild half the dependency tree here
            // and again in the next plain build.
            for (key, _) in std::env::vars_os() {
                let k = key.to_string_lossy();
                let package_var = k.starts_with("CARGO_PKG_")
                    || k.starts_with("CARGO_BIN_")
                    || matches!(
                        k.as_ref(),
                        "CARGO_MANIFEST_DIR"
                            | "CARGO_MANIFEST_PATH"
                            | "CARGO_CRATE_NAME"
                            | "CARGO_PRIMARY_PACKAGE"
                            | "CARGO_TARGET_TMPDIR"
                            | "CARGO_RUSTC_CURRENT_DIR"
                    );
                if package_var {
                    cmd.env_remove(&key);
                }
            }
            match cmd.status() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("cargo build of the agent and witness failed: {s}")),
                Err(e) => Err(format!("cannot run cargo: {e}")),
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Path of `name` (`continuum-agent` or `continuum-witness`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let var = format!("{}_BIN", name.replace('-', "_").to_uppercase());
    if let Some(p) = std::env::var_os(&var) {
        return Ok(PathBuf::from(p));
    }
    ensure_built()?;
    let exe = std::env::current_exe().context("current_exe")?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {}; build it with `cargo build -p {name}` \
         (with --release for release-built drills and benchmarks) or set {var}",
        exe.display()
    )
}
