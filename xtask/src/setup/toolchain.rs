//! The nightly that builds the eBPF crate, and a bpf-linker that uses the
//! same LLVM as that nightly (see "Toolchain for eBPF" in ARCHITECTURE.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::Outcome;
use crate::cmd;

pub struct Nightly {
    sysroot: PathBuf,
    llvm_major: u32,
}

pub fn nightly() -> Result<(Outcome, Nightly)> {
    let version = match cmd::output(nightly_rustc().arg("-vV")) {
        Ok(version) => version,
        Err(_) => {
            if which::which("rustup").is_err() {
                bail!(
                    "rustup is not on PATH: the eBPF crate needs a rustup-managed nightly; \
                     install rustup, or add ~/.cargo/bin to PATH"
                );
            }
            cmd::run(
                Command::new("rustup")
                    .args(["toolchain", "install", "nightly"])
                    .args(["--profile", "minimal", "--component", "rust-src"]),
            )
            .context(
                "installing the nightly needs the Rust dist server (static.rust-lang.org); \
                 if it is unreachable, install a nightly with rust-src by hand",
            )?;
            cmd::output(nightly_rustc().arg("-vV"))?
        }
    };
    let installed = cmd::output(
        Command::new("rustup")
            .args(["component", "list", "--installed"])
            .args(["--toolchain", "nightly"]),
    )?;
    // `-Z build-std=core` compiles core for bpfel-unknown-none from source.
    if !installed
        .lines()
        .any(|component| component.trim() == "rust-src")
    {
        cmd::run(
            Command::new("rustup")
                .args(["component", "add", "rust-src"])
                .args(["--toolchain", "nightly"]),
        )
        .context("adding rust-src to the nightly needs the Rust dist server")?;
    }
    let release = field(&version, "release").unwrap_or("unknown");
    let llvm_major = parse_llvm_major(&version)
        .with_context(|| format!("no LLVM version in `rustc -vV` of the nightly:\n{version}"))?;
    let sysroot = cmd::output(nightly_rustc().args(["--print", "sysroot"]))?;
    let nightly = Nightly {
        sysroot: PathBuf::from(sysroot.trim()),
        llvm_major,
    };
    Ok((
        Outcome::Ok(format!("rustc {release}, LLVM {llvm_major}, rust-src")),
        nightly,
    ))
}

pub fn bpf_linker(nightly: &Nightly) -> Result<Outcome> {
    let reason = match find_bpf_linker() {
        None => "no bpf-linker on PATH or in ~/.cargo/bin would run".to_owned(),
        Some(found) => match found.llvm_major {
            Some(major) if major != nightly.llvm_major => format!(
                "{} was built for LLVM {major}, the nightly has LLVM {}",
                found.path.display(),
                nightly.llvm_major
            ),
            _ if !found.on_path => {
                return Ok(Outcome::Warn(format!(
                    "{} works but is not on PATH, and the eBPF build calls `bpf-linker` by name: \
                     add {} to PATH",
                    found.path.display(),
                    found.path.parent().unwrap_or(Path::new("")).display()
                )));
            }
            _ => {
                return Ok(Outcome::Ok(format!(
                    "{} at {}",
                    found.version,
                    found.path.display()
                )));
            }
        },
    };
    install_bpf_linker(nightly, None)?;
    let found = find_bpf_linker()
        .context("bpf-linker was installed, but neither PATH nor ~/.cargo/bin has one that runs")?;
    Ok(Outcome::Ok(format!(
        "built {} for LLVM {} at {}, because {reason}",
        found.version,
        nightly.llvm_major,
        found.path.display()
    )))
}

/// `cargo install`s bpf-linker linked to the nightly's own libLLVM, into
/// `root` (default: ~/.cargo). About a minute on two cores.
fn install_bpf_linker(nightly: &Nightly, root: Option<&Path>) -> Result<()> {
    let lib = nightly.sysroot.join("lib");
    let llvm = llvm_dylib(&lib)?;
    let lib = lib
        .to_str()
        .filter(|lib| !lib.contains(char::is_whitespace))
        .with_context(|| {
            format!(
                "the nightly's sysroot {} must be a UTF-8 path without spaces to go into RUSTFLAGS",
                lib.display()
            )
        })?;
    let mut install = Command::new("rustup");
    install
        .args(["run", "nightly", "cargo", "install", "bpf-linker"])
        // Reinstall even when this version is installed: that copy may be the
        // broken one (its libLLVM went away with a nightly update).
        .arg("--force")
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{},no-llvm-linking", nightly.llvm_major))
        .env(
            "RUSTFLAGS",
            format!("-L {lib} -l dylib={llvm} -C link-arg=-Wl,-rpath,{lib}"),
        )
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if let Some(root) = root {
        install.arg("--root").arg(root);
    }
    cmd::run(&mut install).with_context(|| {
        format!(
            "building bpf-linker against {lib}/lib{llvm}.so failed: it needs crates.io, and a \
             bpf-linker release with the `llvm-{}` feature",
            nightly.llvm_major
        )
    })
}

/// cargo-fuzz (`cargo xtask fuzz`), installed with the nightly it runs
/// under when `cargo fuzz` does not answer.
pub fn cargo_fuzz() -> Result<Outcome> {
    let version = || cmd::output(Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"]).env("RUSTUP_AUTO_INSTALL", "0"));
    if let Ok(v) = version() {
        return Ok(Outcome::Ok(v.trim().to_owned()));
    }
    cmd::run(Command::new("rustup").args(["run", "nightly", "cargo", "install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz needs crates.io")?;
    let v = version().context("cargo-fuzz was installed, but `cargo fuzz --version` does not run")?;
    Ok(Outcome::Ok(format!("installed {}", v.trim())))
}

/// `rustup run nightly rustc`, never installing the nightly as a side effect:
/// when it is missing, `nightly()` installs it explicitly with a minimal profile.
fn nightly_rustc() -> Command {
    let mut rustc = Command::new("rustup");
    rustc
        .args(["run", "nightly", "rustc"])
        .env("RUSTUP_AUTO_INSTALL", "0");
    rustc
}

struct FoundLinker {
    path: PathBuf,
    version: String,
    on_path: bool,
    /// The `llvm-NN` feature it was `cargo install`ed with, when cargo recorded it.
    llvm_major: Option<u32>,
}

/// The first bpf-linker that runs: on PATH, else in cargo's bin directory.
/// Running `--version` (not just finding the file) catches a binary whose
/// libLLVM was removed by a nightly update.
fn find_bpf_linker() -> Option<FoundLinker> {
    let cargo_home = cargo_home();
    let installed = cargo_home
        .as_ref()
        .map(|home| home.join("bin").join("bpf-linker"));
    let on_path = which::which("bpf-linker").ok().map(|path| (path, true));
    let in_cargo_home = installed.clone().map(|path| (path, false));
    [on_path, in_cargo_home]
        .into_iter()
        .flatten()
        .find_map(|(path, on_path)| {
            let version = cmd::output(Command::new(&path).arg("--version")).ok()?;
            let by_cargo = installed
                .as_ref()
                .is_some_and(|installed| same_file(installed, &path));
            Some(FoundLinker {
                llvm_major: cargo_home
                    .as_deref()
                    .filter(|_| by_cargo)
                    .and_then(installed_llvm_major),
                version: version.trim().to_owned(),
                on_path,
                path,
            })
        })
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
}

fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// The LLVM major of the bpf-linker `cargo install` recorded in
/// `$CARGO_HOME/.crates2.json`, from its `llvm-NN` feature.
fn installed_llvm_major(cargo_home: &Path) -> Option<u32> {
    let record = std::fs::read_to_string(cargo_home.join(".crates2.json")).ok()?;
    parse_installed_llvm_major(&record)
}

fn parse_installed_llvm_major(crates2: &str) -> Option<u32> {
    let record: serde_json::Value = serde_json::from_str(crates2).ok()?;
    let (_, install) = record["installs"]
        .as_object()?
        .iter()
        .find(|(package, _)| package.starts_with("bpf-linker "))?;
    install["features"]
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .find_map(|feature| feature.strip_prefix("llvm-")?.parse().ok())
}

/// `-l dylib=` name of the nightly's libLLVM: `libLLVM-22-rust-1.97.0-nightly.so`
/// -> `LLVM-22-rust-1.97.0-nightly`.
fn llvm_dylib(lib: &Path) -> Result<String> {
    let entries = std::fs::read_dir(lib).with_context(|| format!("reading {}", lib.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name
            .strip_prefix("libLLVM-")
            .and_then(|rest| rest.strip_suffix(".so"))
        {
            return Ok(format!("LLVM-{stem}"));
        }
    }
    bail!(
        "no libLLVM-*.so in {}: bpf-linker links to the nightly's shared LLVM, which \
         x86_64 and aarch64 Linux nightlies ship",
        lib.display()
    )
}

fn parse_llvm_major(rustc_version: &str) -> Option<u32> {
    field(rustc_version, "LLVM version")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// A `key: value` line of `rustc -vV`.
fn field<'a>(rustc_version: &'a str, key: &str) -> Option<&'a str> {
    rustc_version.lines().find_map(|line| {
        let (k, value) = line.split_once(':')?;
        (k.trim() == key).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)
binary: rustc
host: x86_64-unknown-linux-gnu
release: 1.97.0-nightly
LLVM version: 22.1.4
";

    #[test]
    fn reads_the_llvm_major() {
        assert_eq!(parse_llvm_major(RUSTC_VV), Some(22));
        assert_eq!(field(RUSTC_VV, "release"), Some("1.97.0-nightly"));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn reads_the_llvm_feature_cargo_install_recorded() {
        let crates2 = r#"{"installs":{
            "ripgrep 14.0.0 (registry+https://github.com/rust-lang/crates.io-index)":{"features":[]},
            "bpf-linker 0.13.0 (registry+https://github.com/rust-lang/crates.io-index)":
                {"features":["llvm-22","no-llvm-linking"],"no_default_features":true}}}"#;
        assert_eq!(parse_installed_llvm_major(crates2), Some(22));
        assert_eq!(parse_installed_llvm_major(r#"{"installs":{}}"#), None);
        assert_eq!(parse_installed_llvm_major("not json"), None);
    }

    #[test]
    fn names_the_nightly_libllvm() {
        let lib = std::env::temp_dir().join(format!("xtask-llvm-dylib-{}", std::process::id()));
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libLLVM.so.22.1-rust-1.97.0-nightly"), "").unwrap();
        std::fs::write(lib.join("libLLVM-22-rust-1.97.0-nightly.so"), "").unwrap();
        let name = llvm_dylib(&lib);
        std::fs::remove_dir_all(&lib).unwrap();
        assert_eq!(name.unwrap(), "LLVM-22-rust-1.97.0-nightly");
    }

    /// The install path, end to end, into a scratch root so the developer's
    /// bpf-linker is left alone: `cargo test -p xtask -- --ignored`.
    #[test]
    #[ignore = "builds bpf-linker from crates.io: about a minute"]
    fn installs_a_working_bpf_linker() {
        let (_, nightly) = nightly().unwrap();
        let root = std::env::temp_dir().join(format!("xtask-bpf-linker-{}", std::process::id()));
        let installed = install_bpf_linker(&nightly, Some(&root));
        let version = installed
            .and_then(|()| cmd::output(Command::new(root.join("bin/bpf-linker")).arg("--version")));
        std::fs::remove_dir_all(&root).ok();
        assert!(version.unwrap().starts_with("bpf-linker "));
    }
}
