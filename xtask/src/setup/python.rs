//! Python tools the test suite runs, in a virtualenv of their own under the
//! target directory (Debian's Python refuses `pip install` outside one).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use super::Outcome;
use crate::{cmd, workspace};

/// Validates manifests against the Kubernetes OpenAPI schemas, offline.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

pub fn venv() -> Result<PathBuf> {
    Ok(workspace::target_dir()?.join("xtask-venv"))
}

/// The `kubernetes-validate` executable `setup` installed.
pub fn kubernetes_validate() -> Result<PathBuf> {
    Ok(venv()?.join("bin").join(KUBERNETES_VALIDATE))
}

pub(super) fn ensure() -> Result<Outcome> {
    let bin = kubernetes_validate()?;
    let installed = cmd::output(Command::new(&bin).arg("--version"))
        .is_ok_and(|v| v.trim().ends_with(KUBERNETES_VALIDATE_VERSION));
    if installed {
        return Ok(Outcome::Ok(format!("{KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION}")));
    }
    let venv = venv()?;
    // Debian's python3, not a user's pyenv shim: the package list installs it.
    cmd::run(Command::new("/usr/bin/python3").args(["-m", "venv"]).arg(&venv))
        .context("creating the virtualenv needs Debian's python3-venv")?;
    cmd::run(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("{KUBERNETES_VALIDATE}=={KUBERNETES_VALIDATE_VERSION}")),
    )
    .context("pip must reach PyPI")?;
    Ok(Outcome::Ok(format!("installed {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION} in {}", venv.display())))
}
