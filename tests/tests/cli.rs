//! The agent's command line as an operator meets it: `check` validates a
//! config with no CA, root or kernel; `run` refuses what would serve
//! nothing; each error cause is printed once; a missing privilege is named.

use anyhow::{Result, ensure};
use mesh_e2e::{Agent, agent_bin};

fn run(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Agent::run_once(&agent_bin()?, args)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn temp(name: &str, text: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("mesh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p)
}

const GOOD: &str = "nodes: [{name: node-a}, {name: node-b}]
namespaces: [{name: shop, labels: {nodemesh.io/dataplane-mode: enabled}}, {name: legacy}]
pods:
  - {name: web, namespace: shop, node: node-a, ip: 198.51.100.31, netns: /run/netns/x, cgroup: /sys/fs/cgroup/x}
  - {name: old, namespace: legacy, node: node-a, ip: 198.51.100.32, netns: /run/netns/y, cgroup: /sys/fs/cgroup/y}
";

#[test]
fn check_validates_a_config_without_ca_root_or_kernel() -> Result<()> {
    let good = temp("good.yaml", GOOD)?;
    let g = good.to_str().expect("utf-8");
    let (code, out, err) = run(&["check", "--config", g])?;
    ensure!(code == 0, "{out} {err}");
    ensure!(out.contains("valid: 2 nodes, 2 namespaces, 2 pods"), "{out}");
    let (code, out, _) = run(&["check", "--config", g, "--node", "node-a"])?;
    ensure!(code == 0);
    ensure!(out.contains("shop/web") && out.contains("enrolled") && out.contains("legacy/old") && out.contains("not in the mesh"), "{out}");

    let (code, _, err) = run(&["check", "--config", g, "--node", "node-c"])?;
    ensure!(code == 1, "unknown node accepted");
    ensure!(err.contains(r#"has no node "node-c" (--node); its nodes: node-a, node-b"#), "{err}");
    let empty = temp("empty.yaml", "")?;
    let (code, _, err) = run(&["check", "--config", empty.to_str().expect("utf-8")])?;
    ensure!(code == 1, "empty config accepted");
    ensure!(err.contains("declares no nodes: there is nothing for an agent to serve"), "{err}");
    let bad = temp("bad.yaml", &GOOD.replace("198.51.100.32", "198.51.100.300"))?;
    let (code, _, err) = run(&["check", "--config", bad.to_str().expect("utf-8")])?;
    ensure!(code == 1);
    ensure!(err.contains("pods[1].ip") && err.contains("invalid IP address"), "{err}");
    Ok(())
}

#[test]
fn run_refuses_a_config_with_nothing_to_serve() -> Result<()> {
    let empty = temp("run-empty.yaml", "")?;
    let good = temp("run-good.yaml", GOOD)?;
    let ca = ["--ca-endpoint", "https://127.0.0.1:1", "--ca-roots", "/nonexistent", "--ca-token-file", "/nonexistent"];
    for (config, node, want) in [
        (&empty, "node-a", "declares no nodes"),
        (&good, "node-z", r#"has no node "node-z""#),
    ] {
        let mut args = vec!["run", "--config", config.to_str().expect("utf-8"), "--node", node, "--admin", "127.0.0.1:0"];
        args.extend(ca);
        let (code, out, err) = run(&args)?;
        ensure!(code != 0, "started on {}", config.display());
        ensure!(err.contains(want), "{err}");
        ensure!(!out.contains("\"event\""), "printed an event line: {out}");
    }
    Ok(())
}

#[test]
fn each_cause_is_printed_once() -> Result<()> {
    let (code, _, err) = run(&["check", "--config", "/nonexistent/mesh.yaml"])?;
    ensure!(code == 1);
    ensure!(err.matches("No such file or directory").count() == 1, "doubled cause: {err}");
    ensure!(!err.contains("\u{1b}["), "ANSI escape codes off a terminal: {err:?}");
    Ok(())
}

/// Without its privileges, `run` says which capabilities it lacks instead of an
/// `Operation not permitted` from deep inside the eBPF loader.
#[test]
fn run_without_privileges_names_what_is_missing() -> Result<()> {
    let good = temp("run-nopriv.yaml", GOOD)?;
    let out = std::process::Command::new("setpriv")
        // Still uid 0, but with an empty bounding set: no capability at all.
        .args(["--bounding-set=-all", "--inh-caps=-all"])
        .arg(agent_bin()?)
        .args(["run", "--config", good.to_str().expect("utf-8"), "--node", "node-a", "--admin", "127.0.0.1:0"])
        .args(["--ca-endpoint", "https://127.0.0.1:1", "--ca-roots", "/nonexistent", "--ca-token-file", "/nonexistent"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "ran without privileges");
    ensure!(err.contains("must run as root or with the capabilities it lacks: CAP_BPF"), "{err}");
    ensure!(err.contains("CAP_NET_ADMIN") && err.contains("CAP_SYS_ADMIN"), "{err}");
    Ok(())
}

/// A `--bpffs` that is not a bpf filesystem: the agent refuses to start and
/// says how to mount one (it pins the state that must outlive it there).
#[test]
fn run_without_a_bpffs_says_how_to_mount_one() -> Result<()> {
    let good = temp("run-nobpffs.yaml", GOOD)?;
    let dir = std::env::temp_dir().join(format!("mesh-cli-{}", std::process::id()));
    let plain = dir.join("not-bpffs");
    std::fs::create_dir_all(&plain)?;
    let run_dir = dir.join("run");
    let (code, out, err) = run(&[
        "run", "--config", good.to_str().expect("utf-8"), "--node", "node-a", "--admin", "127.0.0.1:0",
        "--ca-endpoint", "https://127.0.0.1:1", "--ca-roots", "/nonexistent", "--ca-token-file", "/nonexistent",
        "--bpffs", plain.to_str().expect("utf-8"), "--run-dir", run_dir.to_str().expect("utf-8"),
    ])?;
    ensure!(code != 0, "started without a bpffs: {out}");
    ensure!(err.contains("is not a bpf filesystem") && err.contains("mount -t bpf bpf"), "{err}");
    ensure!(!out.contains("\"event\""), "{out}");
    Ok(())
}
