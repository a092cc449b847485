//! `cargo xtask demo` is the product's tour: this runs the demo binary as a
//! user would, checks that every stop printed its heading and the numbers it
//! measured, that it exits 0, and that it leaves nothing behind (netns,
//! cgroups, the testbed's bpf filesystem).

use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

/// The first line containing `needle`, and the numbers in it.
fn line_with<'a>(out: &'a str, needle: &str) -> Result<(&'a str, Vec<u64>)> {
    let line = out
        .lines()
        .find(|l| l.contains(needle))
        .with_context(|| format!("the demo printed no line with {needle:?}:\n{out}"))?;
    let numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    Ok((line, numbers))
}

/// The numbers that follow each `word ` in `line` (`web-v1 181` -> 181).
fn after(line: &str, word: &str) -> Result<u64> {
    let rest = line
        .split_once(word)
        .with_context(|| format!("no {word:?} in {line:?}"))?
        .1;
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no number after {word:?} in {line:?}"))
}

#[test]
fn the_demo_tours_every_feature_and_cleans_up() -> Result<()> {
    let agent = mesh_e2e::agent_bin()?;
    let child = Command::new(env!("CARGO_BIN_EXE_demo"))
        .env("MESH_AGENT_BIN", &agent)
        .env("MESHTEST_BIN", env!("CARGO_BIN_EXE_meshtest"))
        .env("MESHHTTP_BIN", env!("CARGO_BIN_EXE_meshhttp"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the demo")?;
    // Its testbed is named after its pid: `mt-demo-PID-N`.
    let prefix = format!("mt-demo-{}-", child.id());
    let out = child.wait_with_output().context("running the demo")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let all = format!("{stdout}\n--- stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "the demo exited with {}:\n{all}", out.status);
    ensure!(!stdout.contains("FAILED"), "{all}");

    // The L4 paths.
    let (_, n) = line_with(&stdout, "bytes echoed intact")?;
    ensure!(n.first() == Some(&(1024 * 1024)), "{n:?}");
    line_with(&stdout, "redirected by eBPF on node-a, tunneled node-a -> node-b over mTLS")?;

    for heading in [
        "== Authorization policy",
        "== STRICT peer authentication ==",
        "== Routing at the source",
        "== Retries",
        "== Circuit breaker",
        "== Metrics",
        "== A trace",
    ] {
        ensure!(stdout.contains(heading), "no heading {heading:?}:\n{all}");
    }

    // Authorization: 403 naming the policy; an allowed request.
    let (l, _) = line_with(&stdout, "shop-client GET /admin/users ->")?;
    ensure!(l.contains("403") && l.contains("deny-admin"), "{l}");
    let (l, _) = line_with(&stdout, "shop-client GET / ->")?;
    ensure!(l.contains("200"), "{l}");
    // STRICT: the plaintext client refused, and counted.
    let (l, _) = line_with(&stdout, "legacy-client -> shop-server")?;
    ensure!(l.contains("reset by the agent") && after(l, "+")? >= 1, "{l}");
    // Canary: every request answered, split between the versions.
    let (l, n) = line_with(&stdout, "requests to /canary/item")?;
    let (v1, v2) = (after(l, "web-v1")?, after(l, "web-v2")?);
    ensure!(n.first() == Some(&(v1 + v2)) && v1 > v2 && v2 > 0, "{l}");
    let (l, _) = line_with(&stdout, "A/B: 50 requests with x-canary: 1")?;
    ensure!(after(l, "web-v2")? == 50, "{l}");
    // Retries: the apps failed, the client saw fewer failures.
    let (l, _) = line_with(&stdout, "with the default retries")?;
    let (app, seen) = (after(l, "the apps failed")?, after(l, "the client saw")?);
    ensure!(app > 0 && seen < app && after(l, "retried")? > 0, "{l}");
    // Circuit breaker: fast 503s.
    let (l, n) = line_with(&stdout, "x-mesh-reply: overflow at once")?;
    ensure!(n.first().is_some_and(|ok| *ok > 0) && after(l, "); ")? > 0 && after(l, "counted")? > 0, "{l}");
    // Metrics: Istio names, with response codes and flags.
    let (l, _) = line_with(&stdout, "istio_requests_total{reporter=\"destination\"")?;
    ensure!(l.contains("response_code="), "{l}");
    ensure!(stdout.contains("response_flags=\"UO\""), "no overflow in the metrics:\n{all}");
    ensure!(stdout.contains("response_flags=\"RBAC\""), "no denial in the metrics:\n{all}");
    // The trace: a client span with a server span under it.
    line_with(&stdout, "- CLIENT span")?;
    line_with(&stdout, "- SERVER span")?;
    line_with(&stdout, "the tour took")?;

    // Nothing left behind by the demo's testbed.
    let netns = Command::new("ip").args(["netns", "list"]).output()?;
    let netns = String::from_utf8_lossy(&netns.stdout);
    ensure!(!netns.lines().any(|l| l.starts_with(&prefix)), "netns left behind:\n{netns}");
    let parent = mesh_e2e::cgroup2_mount()?.join("mesh-e2e");
    let left: Vec<String> = std::fs::read_dir(&parent)
        .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(&prefix)).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "cgroups left behind under {}: {left:?}", parent.display());
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    ensure!(
        !mounts.lines().any(|l| l.contains(" bpf ") && l.contains(&prefix)),
        "bpffs of the demo still mounted:\n{mounts}"
    );
    let tmp = std::env::temp_dir().join("mesh-e2e");
    let dirs: Vec<String> = std::fs::read_dir(&tmp)
        .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(&prefix)).collect())
        .unwrap_or_default();
    // MESH_E2E_KEEP asks the testbed to keep its logs.
    let keep = std::env::var_os("MESH_E2E_KEEP").is_some();
    ensure!(keep || dirs.is_empty(), "temp dirs left behind in {}: {dirs:?}", tmp.display());
    Ok(())
}
