//! `cargo xtask crds`: regenerates `deploy/crds.yaml` from the CRD types.
//! The agent prints them (`mesh-agent crds`), so xtask needs no kube
//! dependency; a mesh-agent unit test fails while the file is stale.

use anyhow::{Context, Result};

use crate::{cmd, workspace};

pub fn run() -> Result<()> {
    let yaml = cmd::output(workspace::cargo().args(["run", "-q", "-p", "mesh-agent", "--", "crds"]))
        .context("`mesh-agent crds` failed")?;
    let path = workspace::root().join("deploy/crds.yaml");
    std::fs::write(&path, yaml.trim_end().to_owned() + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("crds: wrote {}", path.display());
    Ok(())
}
