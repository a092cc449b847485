//! `cargo xtask <command>`: everything it takes to go from a fresh machine to
//! a built, tested, demonstrated mesh. The only place that shells out to
//! apt, rustup and `cargo install`.

mod bench;
mod build;
mod cmd;
mod crds;
mod demo;
mod fuzz;
mod image;
mod install;
mod manifests;
mod setup;
mod test;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Development tasks for the mesh workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install and check everything the build and the tests need (idempotent).
    Setup {
        /// Only what building the agent needs (Debian build packages, the
        /// nightly, bpf-linker): deploy/Dockerfile's build stage.
        #[arg(long)]
        build_only: bool,
    },
    /// Validate every manifest in deploy/ against the Kubernetes schemas (offline).
    Manifests,
    /// Write deploy/crds.yaml from the CRD types (mesh-agent/src/k8s/crd.rs).
    Crds,
    /// Write deploy/install.yaml: namespace, CRDs, RBAC, CA and agent in one
    /// file, with the image set (`kubectl apply -f deploy/install.yaml`).
    InstallManifest(install::Args),
    /// Setup, then build every binary of the workspace (mesh-agent embeds the eBPF object).
    Build,
    /// The agent's OCI image, from a release build and the libraries it links
    /// (no base image, no registry): target/image/mesh-agent-<version>.oci.tar.
    Image(image::Args),
    /// Setup, build, then run the whole test suite, end-to-end tests included (needs root).
    Test(test::Args),
    /// Setup, build, then run the end-to-end demo.
    Demo(demo::Args),
    /// Setup (with the load generators and HAProxy), release build, then the
    /// data-path benchmark side by side with HAProxy, and the policy benchmark.
    Bench(bench::Args),
    /// Build the cargo-fuzz targets (fuzz/) and run each for a bounded time
    /// on its seed corpus (`cargo xtask setup` installs cargo-fuzz).
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup { build_only: false } => setup::run(),
        Command::Setup { build_only: true } => setup::build(),
        Command::Image(args) => image::run(&args),
        Command::Build => build::run(),
        Command::Crds => crds::run(),
        Command::InstallManifest(args) => install::run(&args),
        Command::Manifests => setup::run().and_then(|()| manifests::run()),
        Command::Test(args) => test::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the chain of contexts reads as "what failed: why".
            eprintln!("error: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

/// A failed test run or demo exits with the code of the command that failed,
/// so callers (CI) see what `cargo test` itself would have reported; any
/// other failure exits with 1.
fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<cmd::CommandFailed>())
        .map_or(1, |failed| {
            u8::try_from(failed.exit_code())
                .ok()
                .filter(|&code| code != 0)
                .unwrap_or(1)
        })
}
