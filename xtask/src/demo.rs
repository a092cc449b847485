//! `cargo xtask demo`: the end-to-end demo binary from mesh-e2e, run against
//! the freshly built agent.

use std::process::Command;

use anyhow::{Result, ensure};

use crate::{cmd, setup, workspace};

#[derive(clap::Args)]
pub struct Args {
    /// Leave the mesh running after the tour, with commands to try, until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Passed to the demo binary (after `--`).
    #[arg(last = true)]
    demo_args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    setup::run()?;
    workspace::build_bins()?;
    let demo = workspace::debug_bin("demo")?;
    ensure!(
        demo.exists(),
        "{} was not built: the `demo` binary of package mesh-e2e (tests/) is missing",
        demo.display()
    );
    let agent = workspace::debug_bin("mesh-agent")?;
    cmd::run(
        Command::new(demo)
            .args(args.keep.then_some("--keep"))
            .args(&args.demo_args)
            .current_dir(workspace::root())
            .env(workspace::MESH_AGENT_BIN, agent),
    )
}
