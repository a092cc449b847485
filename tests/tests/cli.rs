//! The agent's command line as an operator meets it: `check` validates a
//! config with no CA, root or kernel; `run` refuses what would serve
//! nothing; each error cause is printed once; a missing privilege is named.

use anyhow::{Context, Result, ensure};
use mesh_e2e::{Agent, PodSpec, Testbed, agent_bin};

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

/// `check --enrollment-label` checks and lists as `run` with the same flag
/// would: the custom label enrolls, the default one no longer does, Istio
/// ambient's pods are never ours, and Istio's key is refused.
#[test]
fn check_follows_the_enrollment_label() -> Result<()> {
    let custom = GOOD.replace("nodemesh.io/dataplane-mode: enabled", "mesh.example.com/member: yes")
        .replace("{name: old, namespace: legacy", "{name: amb, namespace: shop, labels: {istio.io/dataplane-mode: ambient}, node: node-a, ip: 198.51.100.33, netns: /run/netns/z, cgroup: /sys/fs/cgroup/z}\n  - {name: old, namespace: legacy");
    let c = temp("custom-label.yaml", &custom)?;
    let c = c.to_str().expect("utf-8");
    let label = ["--enrollment-label", "mesh.example.com/member=yes"];
    let (code, out, err) = run(&[&["check", "--config", c, "--node", "node-a"][..], &label].concat())?;
    ensure!(code == 0, "{out} {err}");
    let state = |pod: &str| out.lines().find(|l| l.contains(pod)).map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "));
    ensure!(state("shop/web").as_deref() == Some("enrolled"), "{out}");
    ensure!(state("shop/amb").as_deref() == Some("not in the mesh"), "ambient's pod: {out}");
    // Without the flag the default label applies: nothing is enrolled.
    let (code, out, _) = run(&["check", "--config", c, "--node", "node-a"])?;
    ensure!(code == 0 && !out.contains(" enrolled"), "{out}");
    // The value check follows the configured label.
    let bad = temp("custom-bad.yaml", &custom.replace("member: yes", "member: enabled"))?;
    let (code, _, err) = run(&[&["check", "--config", bad.to_str().expect("utf-8")][..], &label].concat())?;
    ensure!(code == 1);
    ensure!(err.contains(r#"namespaces[0].labels.mesh.example.com/member: "enabled" is not one of "yes", "disabled""#), "{err}");
    let (code, _, err) = run(&["check", "--config", c, "--enrollment-label", "istio.io/dataplane-mode=ambient"])?;
    ensure!(code != 0 && err.contains("Istio ambient's enrollment label"), "{err}");
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

/// The admin port already taken by another process: `run` exits non-zero
/// naming the address, and it has loaded and attached nothing: the bpf
/// filesystem it would pin to is empty and the enrolled pod's cgroup has no
/// program (an agent that found the clash only after enrolling would have
/// attached the pod and left its pinned links behind).
#[test]
fn run_with_its_admin_port_taken_attaches_nothing() -> Result<()> {
    let mut tb = Testbed::new("admin_taken")?;
    let pod = tb.add_pod(PodSpec::new("web", "shop", "node-a", [198, 51, 100, 41].into()))?;
    tb.write_config(&tb.config_path(), &["shop"])?;
    let ca = tb.start_ca()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let admin = taken.local_addr()?.to_string();
    let mut args = vec!["run".to_owned(), "--config".into(), tb.config_path().display().to_string()];
    args.extend(["--node", "node-a", "--admin", &admin].map(String::from));
    args.extend(ca.agent_args("node-a")?);
    args.extend(tb.node_state_args());
    let out = Agent::run_once(&agent_bin()?, &args)?;
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(!out.status.success(), "the agent ran with its admin port taken: {stdout}");
    ensure!(
        err.contains(&format!("cannot listen on the admin address {admin} (--admin)")) && err.contains("Address already in use"),
        "{err}"
    );
    ensure!(err.contains("Nothing was loaded or attached to the kernel"), "{err}");
    ensure!(!stdout.contains("\"event\""), "printed an event line: {stdout}");
    // The kernel's own `maps.debug` and `progs.debug` come with every bpffs.
    let pinned: Vec<_> = std::fs::read_dir(tb.bpffs())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|p| p.extension().is_none_or(|x| x != "debug"))
        .collect();
    ensure!(pinned.is_empty(), "pinned under {}: {pinned:?}", tb.bpffs().display());
    let bpftool = std::process::Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(pod.cgroup_path()).output().context("bpftool")?;
    ensure!(bpftool.status.success(), "bpftool cgroup show: {}", String::from_utf8_lossy(&bpftool.stderr));
    // bpftool prints nothing at all for a cgroup without programs.
    let progs = String::from_utf8_lossy(&bpftool.stdout);
    ensure!(progs.trim().is_empty() || progs.trim() == "[]", "programs attached to the pod's cgroup: {progs}");
    drop(taken);
    Ok(())
}

/// `mesh-agent ca` checks its tokens file and config before it writes
/// anything: a bad one leaves no root key behind.
#[test]
fn ca_validates_its_inputs_before_writing_a_root_key() -> Result<()> {
    let good = temp("ca-good.yaml", GOOD)?;
    let bad_tokens = temp("ca-bad-tokens.yaml", "nodes: [node-a]\n")?;
    let state = std::env::temp_dir().join(format!("mesh-cli-{}", std::process::id())).join("ca-state");
    let _ = std::fs::remove_dir_all(&state);
    let (code, _, err) = run(&[
        "ca", "--config", good.to_str().expect("utf-8"), "--state-dir", state.to_str().expect("utf-8"),
        "--tokens", bad_tokens.to_str().expect("utf-8"), "--listen", "127.0.0.1:0",
    ])?;
    ensure!(code != 0, "the CA started on a bad tokens file");
    ensure!(err.contains("ca-bad-tokens.yaml"), "the error does not name the file: {err}");
    ensure!(!state.join("root-key.pem").exists(), "a root key was written before the inputs were checked");
    let (_, help, _) = run(&["ca", "--help"])?;
    ensure!(help.matches("Required with `--source file`").count() == 2, "{help}");
    Ok(())
}
