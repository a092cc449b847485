//! Compiles the CA's gRPC API (`proto/ca.proto`, tonic + prost; needs `protoc`)
//! and builds the eBPF programs (`mesh-ebpf`, nightly, bpfel-unknown-none) with
//! aya-build and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! With `AYA_BUILD_SKIP=1` (check-only builds) an empty object is left instead
//! and the agent refuses to start its data path with a message saying so.

use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    tonic_prost_build::configure()
        .compile_protos(&["proto/ca.proto"], &["proto"])
        .context("compiling proto/ca.proto failed: is protoc installed (Debian: protobuf-compiler)?")?;

    let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out.join("mesh-ebpf");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(&object, b"").context("writing the placeholder eBPF object")?;
        return Ok(());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed: run `cargo xtask setup` (nightly with rust-src, bpf-linker)",
    )
}
