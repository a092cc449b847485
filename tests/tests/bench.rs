//! Smoke test of `cargo xtask bench`: the bench binary in its shortest mode
//! runs every variant (direct, both agent variants with acceleration on and
//! off, HAProxy in TCP and HTTP mode) and every scenario, and writes its
//! report. No timing is asserted: only that every variant produced numbers
//! (the binary checks that itself in smoke mode, and exits non-zero).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(170);

#[test]
fn every_variant_produces_numbers() -> Result<()> {
    let out = std::env::temp_dir().join(format!("mesh-bench-smoke-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--mode", "smoke", "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the bench binary")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the bench smoke run took more than {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(status.success(), "bench --mode smoke failed ({status}); its stderr is above");
    let run = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .context("no results folder")?;
    let json: Value = serde_json::from_str(&std::fs::read_to_string(run.join("results.json"))?)?;
    let samples = json["samples"].as_array().context("no samples")?;
    for variant in [
        "direct",
        "agent-mtls/accel-off",
        "agent-mtls/accel-on",
        "agent-l7/accel-off",
        "agent-l7/accel-on",
        "haproxy-tcp",
        "haproxy-http",
    ] {
        let s = samples.iter().find(|s| s["variant"] == variant).with_context(|| format!("no sample for {variant}"))?;
        for key in ["p50_ms", "p99_ms", "saturation_rps", "bulk_gbps", "connrate_cps"] {
            ensure!(s["metrics"][key].as_f64().is_some_and(|v| v > 0.0), "{variant}: no {key} in {s}");
        }
    }
    ensure!(out.join("latest.md").is_file() && run.join("latency.svg").is_file());
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
