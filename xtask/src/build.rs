//! `cargo xtask build`.

use anyhow::Result;

use crate::{setup, workspace};

pub fn run() -> Result<()> {
    setup::run()?;
    workspace::build_bins()
}
