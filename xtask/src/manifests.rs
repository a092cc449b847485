//! `cargo xtask manifests`: every manifest in `deploy/` validated against the
//! Kubernetes OpenAPI schemas, offline, strictly (unknown fields are errors),
//! for the oldest and the newest Kubernetes the mesh supports.

use anyhow::{Context, Result, bail};

use crate::{cmd, setup, workspace};

/// The range the manifests must hold for: 1.30 is the first with the node
/// name in TokenReviews of bound tokens (the CA needs it).
pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.34.0"];

pub fn run() -> Result<()> {
    let validate = setup::python::kubernetes_validate()?;
    if !validate.exists() {
        bail!("{} is not installed: run `cargo xtask setup`", validate.display());
    }
    let dir = workspace::root().join("deploy");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no manifests in {}", dir.display());
    }
    for version in KUBERNETES_VERSIONS {
        cmd::run(
            std::process::Command::new(&validate)
                .args(["--strict", "--quiet", "--kubernetes-version", version])
                .args(&files),
        )
        .with_context(|| format!("the manifests in deploy/ are not valid for Kubernetes {version}"))?;
    }
    eprintln!("manifests: {} files valid for Kubernetes {}", files.len(), KUBERNETES_VERSIONS.join(" and "));
    Ok(())
}
