//! `cargo xtask image`: the agent's OCI image, built from nothing but this
//! machine's files: no base image, no registry.
//!
//! 1. The release `mesh-agent` (the eBPF object is embedded by its build.rs),
//!    built as `deploy/Dockerfile` builds it: `cargo build --release --locked`.
//! 2. A root filesystem of exactly what the binary needs to run
//!    (`target/image/rootfs/`): the binary without its debug sections, the
//!    shared libraries `ldd` names (at the paths it names, so the dynamic
//!    loader finds them with no `ld.so.cache`), and `/etc/nsswitch.conf` so
//!    that `--ca-endpoint`'s host name is looked up in `/etc/hosts` and then
//!    DNS. No shell, no package manager, no CA certificates (the agent
//!    trusts only `--ca-roots` and the Kubernetes service account's CA).
//! 3. An OCI image of that one layer (umoci), entrypoint `mesh-agent`,
//!    tagged with the workspace version, written as an OCI archive
//!    (`target/image/mesh-agent-<version>.oci.tar`, named
//!    `nodemesh/mesh-agent:<version>` inside) by skopeo. `podman load -i`,
//!    `skopeo copy oci-archive:... docker://REGISTRY/...` and containerd's
//!    `ctr images import` read it.
//!
//! `--rootfs-only` stops after step 2: `deploy/Dockerfile` copies that
//! directory into a `scratch` image, so both images hold the same files.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::{cmd, setup, workspace};

/// Tells tests/tests/image.rs which archive to load.
pub const MESH_AGENT_IMAGE: &str = "MESH_AGENT_IMAGE";

/// The image's name; the tag is the workspace version.
pub const REPOSITORY: &str = "nodemesh/mesh-agent";
/// Where the agent lives in the image (the entrypoint).
const BINARY: &str = "usr/local/bin/mesh-agent";

#[derive(clap::Args)]
pub struct Args {
    /// Stop after the root filesystem (target/image/rootfs): what
    /// deploy/Dockerfile copies into its image.
    #[arg(long)]
    rootfs_only: bool,
}

/// `nodemesh/mesh-agent:<version>`.
pub fn reference() -> String {
    format!("{REPOSITORY}:{}", version())
}

fn version() -> &'static str {
    // xtask's version is the workspace's (`version.workspace = true`).
    env!("CARGO_PKG_VERSION")
}

/// The archive `cargo xtask image` writes.
pub fn archive() -> Result<PathBuf> {
    Ok(image_dir()?.join(format!("mesh-agent-{}.oci.tar", version())))
}

fn image_dir() -> Result<PathBuf> {
    Ok(workspace::target_dir()?.join("image"))
}

pub fn run(args: &Args) -> Result<()> {
    setup::build()?;
    if !args.rootfs_only {
        setup::image_tools()?;
    }
    build(!args.rootfs_only)
}

/// Builds the release agent, its root filesystem and (with `archive`) the
/// OCI archive; prints where they are and their sizes.
pub fn build(archive: bool) -> Result<()> {
    cmd::run(workspace::cargo().args(["build", "--release", "--locked", "--package", "mesh-agent", "--bin", "mesh-agent"]))?;
    let agent = workspace::target_dir()?.join("release").join("mesh-agent");
    let dir = image_dir()?;
    let rootfs = dir.join("rootfs");
    let files = make_rootfs(&agent, &rootfs)?;
    let rootfs_bytes: u64 = files.iter().map(|(_, bytes)| bytes).sum();
    eprintln!("image: root filesystem {} ({} files, {}):", rootfs.display(), files.len(), mib(rootfs_bytes));
    for (path, bytes) in &files {
        eprintln!("image:   /{} ({})", path.display(), mib(*bytes));
    }
    if !archive {
        return Ok(());
    }
    let out = self::archive()?;
    write_archive(&rootfs, &dir.join("oci"), &out)?;
    let size = std::fs::metadata(&out).with_context(|| format!("reading {}", out.display()))?.len();
    println!("image: {} in {} ({} compressed, {} unpacked)", reference(), out.display(), mib(size), mib(rootfs_bytes));
    Ok(())
}

/// Lays out `rootfs` afresh; returns every file written (relative path,
/// size), for the summary.
fn make_rootfs(agent: &Path, rootfs: &Path) -> Result<Vec<(PathBuf, u64)>> {
    if rootfs.exists() {
        std::fs::remove_dir_all(rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    let mut files = Vec::new();
    let binary = rootfs.join(BINARY);
    create_parent(&binary)?;
    // Line tables (the release profile's `debug = 1`) are for profiling
    // on the build machine: three quarters of the file, and no use in a pod.
    cmd::run(Command::new("objcopy").arg("--strip-debug").arg(agent).arg(&binary))
        .context("objcopy comes with binutils, which the Rust toolchain's linker needs anyway")?;
    files.push(PathBuf::from(BINARY));
    let ldd = cmd::output(Command::new("ldd").arg(agent)).with_context(|| format!("ldd {}", agent.display()))?;
    for lib in shared_libraries(&ldd)? {
        let inside = lib.strip_prefix("/").with_context(|| format!("ldd named a relative path {}", lib.display()))?;
        let to = rootfs.join(inside);
        create_parent(&to)?;
        // The file itself, not a symlink: the image has nothing to point at.
        std::fs::copy(&lib, &to).with_context(|| format!("copying {} to {}", lib.display(), to.display()))?;
        files.push(inside.to_owned());
    }
    let nsswitch = rootfs.join("etc/nsswitch.conf");
    create_parent(&nsswitch)?;
    std::fs::write(&nsswitch, "hosts: files dns\n").with_context(|| format!("writing {}", nsswitch.display()))?;
    files.push(PathBuf::from("etc/nsswitch.conf"));
    files
        .into_iter()
        .map(|f| {
            let bytes = std::fs::metadata(rootfs.join(&f)).with_context(|| format!("reading {}", f.display()))?.len();
            Ok((f, bytes))
        })
        .collect()
}

fn create_parent(path: &Path) -> Result<()> {
    let dir = path.parent().context("a path in the root filesystem has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// The libraries in `ldd`'s answer, the dynamic loader included; the vDSO
/// has no file. A library `ldd` cannot find is an error: the image would
/// not start.
fn shared_libraries(ldd: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in ldd.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("ldd: {line}: the binary would not start in the image");
        }
        let path = match line.split_once("=>") {
            Some((_, to)) => to.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            _ if line.starts_with("linux-vdso") || line.starts_with("linux-gate") => {}
            _ if line.contains("statically linked") => {}
            _ => bail!("ldd printed a line this does not understand: {line:?}"),
        }
    }
    Ok(libs)
}

/// One-layer OCI image of `rootfs` in the layout `layout`, then the archive.
fn write_archive(rootfs: &Path, layout: &Path, out: &Path) -> Result<()> {
    for stale in [layout, out] {
        if stale.is_dir() {
            std::fs::remove_dir_all(stale).with_context(|| format!("removing {}", stale.display()))?;
        } else if stale.exists() {
            std::fs::remove_file(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    let image = format!("{}:{}", layout.display(), version());
    cmd::run(Command::new("umoci").args(["init", "--layout"]).arg(layout))?;
    cmd::run(Command::new("umoci").args(["new", "--image", &image]))?;
    cmd::run(
        Command::new("umoci")
            .args(["insert", "--image", &image, "--history.created_by", "cargo xtask image", "--history.comment", "the agent and its libraries"])
            .arg(rootfs)
            .arg("/"),
    )?;
    let version = version();
    cmd::run(Command::new("umoci").args(["config", "--image", &image]).args([
        &format!("--config.entrypoint=/{BINARY}"),
        // Root, as the DaemonSet runs it (`runAsUser: 0`): it loads eBPF.
        "--config.user=0:0",
        "--config.workingdir=/",
        "--config.label=org.opencontainers.image.title=mesh-agent",
        &format!("--config.label=org.opencontainers.image.version={version}"),
        "--config.label=org.opencontainers.image.description=nodemesh node agent and CA (mesh-agent run / mesh-agent ca)",
        "--history.created_by=cargo xtask image",
        "--history.comment=entrypoint and labels",
    ]))?;
    cmd::run(Command::new("umoci").args(["gc", "--layout"]).arg(layout))?;
    let archive = format!("oci-archive:{}:{}", out.display(), reference());
    cmd::run(Command::new("skopeo").args(["copy", "--quiet", &format!("oci:{image}"), &archive]))?;
    ensure!(out.is_file(), "skopeo wrote no {}", out.display());
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_libraries_ldd_names() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffc8d3f2000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f2b1c000000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2b1be1f000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f2b1d9c4000)
";
        let libs = shared_libraries(ldd).unwrap();
        assert_eq!(
            libs,
            ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
                .map(PathBuf::from)
        );
        let err = shared_libraries("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libfoo.so.1 => not found"), "{err}");
        assert!(shared_libraries("\tstatically linked\n").unwrap().is_empty());
    }
}
