//! Medians, spreads and ratios; the Markdown table, the JSON of every
//! sample, the SVG of the latency percentiles, and the machine they ran on.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::load::{CONNECTIONS, Metrics, Profile, RATE};
use crate::{Mode, SKIPPED, Variant};

/// One variant, one repetition.
pub struct Sample {
    pub variant: Variant,
    pub rep: usize,
    pub metrics: Metrics,
}

/// Everything a report is made of.
pub struct Run {
    pub mode: Mode,
    pub profile: Profile,
    pub machine: Machine,
    pub started: SystemTime,
    pub elapsed: Duration,
    pub variants: Vec<Variant>,
    pub samples: Vec<Sample>,
    pub policy: Vec<PolicyBench>,
}

/// Median and range of one metric over the repetitions.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Option<Stat> {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Stat { median, min: v[0], max: v[n - 1], n })
    }
}

impl Run {
    fn values(&self, variant: Variant, key: &str) -> Vec<f64> {
        self.samples.iter().filter(|s| s.variant == variant).filter_map(|s| s.metrics.get(key)).collect()
    }

    pub fn stat(&self, variant: Variant, key: &str) -> Option<Stat> {
        Stat::of(self.values(variant, key))
    }

    /// Median over repetitions of (variant - direct) measured in the same
    /// repetition: the interleaving makes each pair see the same machine
    /// load, so the difference is steadier than a difference of medians.
    pub fn added_over_direct(&self, variant: Variant, key: &str) -> Option<Stat> {
        let diffs = self
            .samples
            .iter()
            .filter(|s| s.variant == variant)
            .filter_map(|s| {
                let base = self.samples.iter().find(|d| d.variant == Variant::Direct && d.rep == s.rep)?;
                Some(s.metrics.get(key)? - base.metrics.get(key)?)
            })
            .collect();
        Stat::of(diffs)
    }

    fn ratio(&self, variant: Variant, other: Option<Variant>, key: &str) -> Option<f64> {
        let other = other.filter(|o| self.variants.contains(o))?;
        let (a, b) = (self.stat(variant, key)?, self.stat(other, key)?);
        (b.median != 0.0).then(|| a.median / b.median)
    }

    /// One variant's `key` over its own `base` (e.g. p99 under a
    /// disturbance over its steady p99), medians.
    fn within(&self, variant: Variant, key: &str, base: &str) -> Option<f64> {
        let (a, b) = (self.stat(variant, key)?, self.stat(variant, base)?);
        (b.median > 0.0).then(|| a.median / b.median)
    }

    /// Smoke check: every variant has every scenario's numbers.
    pub fn check_complete(&self) -> Result<()> {
        let mut missing = Vec::new();
        for &v in &self.variants {
            let mut keys = vec!["p50_ms", "p90_ms", "p99_ms", "saturation_rps", "bulk_gbps", "connrate_cps"];
            if v != Variant::Direct {
                keys.extend(["cpu_a_vcpu", "cpu_b_vcpu", "rss_idle_a_mb", "rss_conns_b_mb"]);
            }
            if v.name().starts_with("agent-") {
                keys.push("restart_requests");
            }
            if matches!(v, Variant::AgentL7 { .. } | Variant::HaproxyHttp) {
                keys.push("rapid_reset_p99_ms");
            }
            for k in keys {
                if !self.stat(v, k).is_some_and(|s| s.median > 0.0) {
                    missing.push(format!("{}:{k}", v.name()));
                }
            }
            // Per-connection memory may round to 0 at a small size: present.
            if v != Variant::Direct {
                for n in &self.profile.idle_conns {
                    for side in ["a", "b"] {
                        let k = format!("idle_kib_{side}_{n}");
                        if self.stat(v, &k).is_none() {
                            missing.push(format!("{}:{k}", v.name()));
                        }
                    }
                }
            }
        }
        ensure!(missing.is_empty(), "variants without numbers: {}", missing.join(", "));
        Ok(())
    }
}

/// What the numbers were measured on.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub load_at_start: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
        let load_at_start = read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        Machine { cpu, cores, kernel, memory_gib, load_at_start }
    }

    fn line(&self) -> String {
        format!(
            "{}, {} cores, {:.0} GiB, Linux {} (load average at start: {})",
            self.cpu, self.cores, self.memory_gib, self.kernel, self.load_at_start
        )
    }
}

/// One criterion benchmark's median estimate.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PolicyBench {
    pub name: String,
    pub median_ns: f64,
    pub low_ns: f64,
    pub high_ns: f64,
}

/// Criterion's `<dir>/*/new/{benchmark,estimates}.json` written since
/// `since` (Unix seconds), for the `policy/` benchmarks.
pub fn criterion_estimates(dir: &Path, since: u64) -> Result<Vec<PolicyBench>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.flatten() {
        let new = entry.path().join("new");
        let (bench, est) = (new.join("benchmark.json"), new.join("estimates.json"));
        let fresh = std::fs::metadata(&est)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .is_some_and(|t| t.as_secs() >= since);
        if !fresh {
            continue;
        }
        let read = |p: &Path| -> Result<Value> {
            serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
                .with_context(|| format!("parsing {}", p.display()))
        };
        let (b, e) = (read(&bench)?, read(&est)?);
        let name = b["full_id"].as_str().unwrap_or_default().to_string();
        if !name.starts_with("policy/") {
            continue;
        }
        let m = &e["median"];
        out.push(PolicyBench {
            name,
            median_ns: m["point_estimate"].as_f64().unwrap_or(f64::NAN),
            low_ns: m["confidence_interval"]["lower_bound"].as_f64().unwrap_or(f64::NAN),
            high_ns: m["confidence_interval"]["upper_bound"].as_f64().unwrap_or(f64::NAN),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Writes `out/<timestamp>/{results.md,results.json,latency.svg}` and
/// `out/latest.md`; returns the run's directory.
pub fn write(out: &Path, run: &Run) -> Result<PathBuf> {
    let dir = out.join(timestamp(run.started));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let md = markdown(run);
    std::fs::write(dir.join("results.md"), &md)?;
    std::fs::write(dir.join("latency.svg"), svg(run))?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&to_json(run))?)?;
    let latest = md.replace("](latency.svg)", &format!("]({}/latency.svg)", timestamp(run.started)));
    std::fs::write(out.join("latest.md"), latest)?;
    Ok(dir)
}

/// Rebuilds a run from the `results.json` it wrote (to re-render a report
/// after changing its format, without measuring again).
pub fn read_json(path: &Path) -> Result<Run> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mode = match v["mode"].as_str() {
        Some("quick") => Mode::Quick,
        Some("smoke") => Mode::Smoke,
        _ => Mode::Full,
    };
    let mut samples = Vec::new();
    for s in v["samples"].as_array().context("no samples")? {
        let name = s["variant"].as_str().unwrap_or_default();
        let variant = *Variant::ALL.iter().find(|v| v.name() == name).with_context(|| format!("unknown variant {name}"))?;
        let rep = s["rep"].as_u64().unwrap_or(1).saturating_sub(1) as usize;
        samples.push(Sample { variant, rep, metrics: serde_json::from_value(s["metrics"].clone())? });
    }
    let variants = Variant::ALL.iter().copied().filter(|v| samples.iter().any(|s| s.variant == *v)).collect();
    let started = v["startedUnix"].as_u64().map_or(SystemTime::UNIX_EPOCH, |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
    Ok(Run {
        mode,
        profile: serde_json::from_value(v["profile"].clone())?,
        machine: serde_json::from_value(v["machine"].clone())?,
        started,
        elapsed: Duration::from_secs(v["elapsedSecs"].as_u64().unwrap_or(0)),
        variants,
        samples,
        policy: serde_json::from_value(v["policy"].clone())?,
    })
}

/// `YYYY-MM-DDTHH-MM-SSZ` (UTC), a folder name that sorts by time.
fn timestamp(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}-{:02}-{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn to_json(run: &Run) -> Value {
    let samples: Vec<Value> = run
        .samples
        .iter()
        .map(|s| json!({"variant": s.variant.name(), "rep": s.rep + 1, "metrics": s.metrics}))
        .collect();
    json!({
        "mode": format!("{:?}", run.mode).to_lowercase(),
        "profile": run.profile,
        "machine": run.machine,
        "started": timestamp(run.started),
        "startedUnix": run.started.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "elapsedSecs": run.elapsed.as_secs(),
        "skipped": SKIPPED.iter().map(|(v, why)| json!({"variant": v, "reason": why})).collect::<Vec<_>>(),
        "samples": samples,
        "policy": run.policy,
    })
}

/// `median (min–max)` with `digits` decimals; `–` when absent.
fn cell(s: Option<Stat>, digits: usize) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.*} ({:.*}–{:.*})", digits, s.median, digits, s.min, digits, s.max),
        Some(s) => format!("{:.*}", digits, s.median),
        None => "–".into(),
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "–".into())
}

pub fn markdown(run: &Run) -> String {
    let mut md = String::new();
    let reps = run.profile.reps;
    let _ = writeln!(md, "# nodemesh benchmark, {}\n", timestamp(run.started));
    let _ = writeln!(md, "- machine: {}", run.machine.line());
    let _ = writeln!(
        md,
        "- mode `{:?}`: {reps} repetition(s) per variant, variants interleaved (order rotated each repetition); {}; {:.0} min in all",
        run.mode,
        run.profile.describe(),
        run.elapsed.as_secs_f64() / 60.0
    );
    let _ = writeln!(
        md,
        "- cells: median over the repetitions, (min–max) when there are several. Ratios compare medians: \
         ×direct to no mesh, ×peer to HAProxy in the same mode (agent-mtls to haproxy-tcp, agent-l7 to haproxy-http)."
    );
    let _ = writeln!(
        md,
        "- the machine is shared (other builds run on the same 2 cores): expect noise, read the spreads.\n"
    );

    let _ = writeln!(md, "## Latency: 1 kB HTTP/1.1 GETs at {RATE} rps over {CONNECTIONS} connections (ms)\n");
    let _ = writeln!(md, "| variant | p50 | p90 | p99 | p99.9 | added p50 | added p90 | added p99 | p90 ×direct | p90 ×peer |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &v in &run.variants {
        let added = |k| if v == Variant::Direct { "–".into() } else { cell(run.added_over_direct(v, k), 3) };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name(),
            cell(run.stat(v, "p50_ms"), 3),
            cell(run.stat(v, "p90_ms"), 3),
            cell(run.stat(v, "p99_ms"), 3),
            cell(run.stat(v, "p999_ms"), 3),
            added("p50_ms"),
            added("p90_ms"),
            added("p99_ms"),
            ratio_cell(run.ratio(v, Some(Variant::Direct), "p90_ms").filter(|_| v != Variant::Direct)),
            ratio_cell(run.ratio(v, v.peer(), "p90_ms")),
        );
    }
    let _ = writeln!(md, "\n\"added\": median over repetitions of (variant − direct) in the same repetition.");
    let _ = writeln!(md, "Plot: [latency.svg](latency.svg).\n");

    if run.variants.iter().any(|v| run.stat(*v, "restart_requests").is_some()) {
        let _ = writeln!(md, "## Restart: both agents replaced under load (DaemonSet-style handoff)\n");
        let _ = writeln!(
            md,
            "{RATE} rps over {CONNECTIONS} keep-alive connections for {} s; node-a's agent replaced a quarter in, node-b's half-way.\n",
            run.profile.restart_secs
        );
        let _ = writeln!(md, "| variant | requests | failed | plaintext at the app | p99 during restart (ms) | p99 steady (ms) | ×steady |");
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
        for &v in &run.variants {
            if run.stat(v, "restart_requests").is_none() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                v.name(),
                cell(run.stat(v, "restart_requests"), 0),
                cell(run.stat(v, "restart_errors"), 0),
                cell(run.stat(v, "restart_plaintext"), 0),
                cell(run.stat(v, "restart_p99_ms"), 3),
                cell(run.stat(v, "p99_ms"), 3),
                ratio_cell(run.within(v, "restart_p99_ms", "p99_ms")),
            );
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(md, "## Throughput\n");
    let _ = writeln!(md, "| variant | max req/s ({CONNECTIONS} conns) | ×direct | ×peer | bulk Gbit/s (1 stream) | ×direct | ×peer | new conn/s | ×direct | ×peer |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &v in &run.variants {
        let d = Some(Variant::Direct).filter(|_| v != Variant::Direct);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            v.name(),
            cell(run.stat(v, "saturation_rps"), 0),
            ratio_cell(run.ratio(v, d, "saturation_rps")),
            ratio_cell(run.ratio(v, v.peer(), "saturation_rps")),
            cell(run.stat(v, "bulk_gbps"), 2),
            ratio_cell(run.ratio(v, d, "bulk_gbps")),
            ratio_cell(run.ratio(v, v.peer(), "bulk_gbps")),
            cell(run.stat(v, "connrate_cps"), 0),
            ratio_cell(run.ratio(v, d, "connrate_cps")),
            ratio_cell(run.ratio(v, v.peer(), "connrate_cps")),
        );
    }

    let _ = writeln!(md, "\n## Proxy resources (client-side node A / server-side node B)\n");
    let _ = writeln!(
        md,
        "RSS includes the binary's resident code pages (file-backed, shared by all processes of one binary); \
         \"anonymous\" is heap and stacks only (`RssAnon`).\n"
    );
    let _ = writeln!(
        md,
        "| variant | CPU at {RATE} rps, vCPU (A / B) | RSS idle MiB (A / B) | anonymous idle MiB (A / B) | RSS after {RATE} rps MiB (A / B) | peak RSS, {0} conns MiB (A / B) | peak anonymous, {0} conns MiB (A / B) |",
        run.profile.open_conns
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
    for &v in &run.variants {
        if v == Variant::Direct {
            continue;
        }
        let pair = |k: &str, d| format!("{} / {}", cell(run.stat(v, &format!("{k}_a_{d}")), 3), cell(run.stat(v, &format!("{k}_b_{d}")), 3));
        let pair1 = |k: &str| format!("{} / {}", cell(run.stat(v, &format!("{k}_a_mb")), 1), cell(run.stat(v, &format!("{k}_b_mb")), 1));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            v.name(),
            pair("cpu", "vcpu"),
            pair1("rss_idle"),
            pair1("anon_idle"),
            pair1("rss_load"),
            pair1("rss_conns"),
            pair1("anon_conns")
        );
    }

    if !run.profile.idle_conns.is_empty() && run.variants.iter().any(|v| *v != Variant::Direct) {
        let sizes = &run.profile.idle_conns;
        let _ = writeln!(md, "\n## Memory per idle connection (KiB of anonymous memory, client-side A / server-side B)\n");
        let _ = writeln!(
            md,
            "`meshtest idle` holds N keep-alive connections (one GET each) on fresh proxies; each proxy's \
             `RssAnon` with them minus before, divided by N. ×peer: A + B against HAProxy's A + B in the same mode.\n"
        );
        let head: Vec<String> = sizes.iter().flat_map(|n| [format!("{n} conns (A / B)"), format!("×peer at {n}")]).collect();
        let _ = writeln!(md, "| variant | {} |", head.join(" | "));
        let _ = writeln!(md, "| --- |{}", " --- |".repeat(head.len()));
        for &v in &run.variants {
            if v == Variant::Direct {
                continue;
            }
            let both = |v: Variant, n: u32| -> Option<f64> {
                Some(run.stat(v, &format!("idle_kib_a_{n}"))?.median + run.stat(v, &format!("idle_kib_b_{n}"))?.median)
            };
            let cells: Vec<String> = sizes
                .iter()
                .flat_map(|&n| {
                    let pair = format!("{} / {}", cell(run.stat(v, &format!("idle_kib_a_{n}")), 1), cell(run.stat(v, &format!("idle_kib_b_{n}")), 1));
                    let peer = v.peer().filter(|p| run.variants.contains(p)).and_then(|p| Some((both(v, n)?, both(p, n)?)));
                    [pair, ratio_cell(peer.and_then(|(a, b)| (b > 0.0).then(|| a / b)))]
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", v.name(), cells.join(" | "));
        }
    }

    if run.variants.iter().any(|v| run.stat(*v, "rapid_reset_p99_ms").is_some()) {
        let _ = writeln!(md, "\n## Legitimate latency during an HTTP/2 Rapid Reset flood\n");
        let _ = writeln!(
            md,
            "{RATE} rps over {CONNECTIONS} connections for {} s while `meshtest rapid-reset` floods the client-side proxy \
             with HEADERS + RST_STREAM pairs on another connection (reconnecting when cut). L7 variants only: \
             the L4 ones pass HTTP/2 to an HTTP/1.1 app that refuses it.\n",
            run.profile.rapid_reset_secs
        );
        let _ = writeln!(md, "| variant | p99 during flood (ms) | p99 steady (ms) | ×steady | failed requests | flood streams/s | flood connections |");
        let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
        for &v in &run.variants {
            if run.stat(v, "rapid_reset_p99_ms").is_none() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                v.name(),
                cell(run.stat(v, "rapid_reset_p99_ms"), 3),
                cell(run.stat(v, "p99_ms"), 3),
                ratio_cell(run.within(v, "rapid_reset_p99_ms", "p99_ms")),
                cell(run.stat(v, "rapid_reset_errors"), 0),
                cell(run.stat(v, "rapid_reset_streams_per_s"), 0),
                cell(run.stat(v, "rapid_reset_connections"), 0),
            );
        }
    }

    if !run.policy.is_empty() {
        let _ = writeln!(md, "\n## Policy evaluation (criterion, `cargo bench -p mesh-agent --bench policy`)\n");
        let _ = writeln!(md, "| benchmark | median | 95% CI |");
        let _ = writeln!(md, "| --- | --- | --- |");
        for p in &run.policy {
            let _ = writeln!(md, "| {} | {} | {} – {} |", p.name, ns(p.median_ns), ns(p.low_ns), ns(p.high_ns));
        }
    }

    let _ = writeln!(md, "\n## Skipped\n");
    for (v, why) in SKIPPED {
        let _ = writeln!(md, "- `{v}`: {why}.");
    }
    if run.policy.is_empty() {
        let _ = writeln!(md, "- policy evaluation (criterion): not run in this mode (`cargo xtask bench` runs it in full mode).");
    }
    let _ = writeln!(md, "\n## Issue 7 targets\n");
    let _ = writeln!(md, "Medians; ✓ met, ✗ not met.\n");
    for line in targets(run) {
        let _ = writeln!(md, "{line}");
    }
    md
}

fn ns(v: f64) -> String {
    if v >= 1000.0 { format!("{:.2} µs", v / 1000.0) } else { format!("{v:.1} ns") }
}

/// The issue's targets as a table: one row per target, one column per
/// agent variant, each cell the measured median and ✓ (met) or ✗.
fn targets(run: &Run) -> Vec<String> {
    const MB: f64 = 1e6 / (1u64 << 20) as f64; // MiB per MB
    let agents: Vec<Variant> = [
        Variant::AgentMtls { accelerate: false },
        Variant::AgentMtls { accelerate: true },
        Variant::AgentL7 { accelerate: false },
        Variant::AgentL7 { accelerate: true },
    ]
    .into_iter()
    .filter(|v| run.variants.contains(v))
    .collect();
    let mark = |v: f64, ok: bool, digits: usize| format!("{v:.digits$} {}", if ok { "✓" } else { "✗" });
    let mark_unit = |v: f64, ok: bool, digits: usize, unit: &str| format!("{v:.digits$}{unit} {}", if ok { "✓" } else { "✗" });
    let worst = |v: Variant, k: &str| -> Option<f64> {
        let (a, b) = (run.stat(v, &format!("{k}_a_{}", if k == "cpu" { "vcpu" } else { "mb" }))?, run.stat(v, &format!("{k}_b_{}", if k == "cpu" { "vcpu" } else { "mb" }))?);
        Some(a.median.max(b.median))
    };
    type Row<'a> = (&'a str, Box<dyn Fn(Variant) -> Option<String> + 'a>);
    let rows: Vec<Row> = vec![
        ("added p90 over direct ≤ 0.10 ms (ms)", Box::new(|v| run.added_over_direct(v, "p90_ms").map(|s| mark(s.median, s.median <= 0.10, 3)))),
        ("added p99 over direct ≤ 0.15 ms (ms)", Box::new(|v| run.added_over_direct(v, "p99_ms").map(|s| mark(s.median, s.median <= 0.15, 3)))),
        ("CPU at 1,000 rps ≤ 0.05 vCPU per node (busier node)", Box::new(|v| worst(v, "cpu").map(|x| mark(x, x <= 0.05, 3)))),
        ("RSS idle ≤ 12 MB (MiB, larger agent)", Box::new(|v| worst(v, "rss_idle").map(|x| mark(x, x <= 12.0 * MB, 1)))),
        ("RSS with 1,000 connections ≤ 20 MB (MiB, larger agent)", Box::new(|v| {
            (run.profile.open_conns >= 1000).then_some(())?;
            worst(v, "rss_conns").map(|x| mark(x, x <= 20.0 * MB, 1))
        })),
        ("saturation ≥ 1.2× HAProxy in the same mode", Box::new(|v| run.ratio(v, v.peer(), "saturation_rps").map(|r| mark_unit(r, r >= 1.2, 2, "×")))),
        ("acceleration: p50 ≥ 15% lower than accel-off (change)", Box::new(|v| {
            let off = match v {
                Variant::AgentMtls { accelerate: true } => Variant::AgentMtls { accelerate: false },
                Variant::AgentL7 { accelerate: true } => Variant::AgentL7 { accelerate: false },
                _ => return None,
            };
            let (a, b) = (run.stat(off, "p50_ms")?, run.stat(v, "p50_ms")?);
            let change = (b.median / a.median - 1.0) * 100.0;
            Some(mark_unit(change, change <= -15.0, 1, " %"))
        })),
    ];
    let mut out = Vec::new();
    out.push(format!("| target | {} |", agents.iter().map(|v| v.name()).collect::<Vec<_>>().join(" | ")));
    out.push(format!("| --- |{}", " --- |".repeat(agents.len())));
    for (name, f) in &rows {
        let cells: Vec<String> = agents.iter().map(|&v| f(v).unwrap_or_else(|| "–".into())).collect();
        out.push(format!("| {name} | {} |", cells.join(" | ")));
    }
    out.push(String::new());
    for p in run.policy.iter().filter(|p| p.name.contains("check_http 10k rules")) {
        out.push(format!("- policy check, {}: {} (≤ 1 µs): {}", p.name, ns(p.median_ns), if p.median_ns <= 1000.0 { "✓" } else { "✗" }));
    }
    out.push(
        "- the acceleration row compares end-to-end p50 (two pod ↔ agent hops are part of the path, the \
         mTLS hop between nodes is not accelerated)."
            .into(),
    );
    out
}

/// Latency percentiles (p50 … p99.9) per variant, log-scale y axis, as a
/// standalone SVG.
pub fn svg(run: &Run) -> String {
    let pct: [(&str, &str); 4] = [("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")];
    let series: Vec<(Variant, Vec<f64>)> = run
        .variants
        .iter()
        .filter_map(|&v| {
            let ys: Option<Vec<f64>> = pct.iter().map(|(_, k)| run.stat(v, k).map(|s| s.median)).collect();
            Some((v, ys?))
        })
        .collect();
    let (w, h, left, right, top, bottom) = (760.0, 420.0, 70.0, 210.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let all: Vec<f64> = series.iter().flat_map(|(_, ys)| ys.iter().copied()).filter(|y| *y > 0.0).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1e-3);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 1.1);
    // The axis starts at the 1-2-5 step just below the smallest value.
    let decade = 10f64.powf(lo.log10().floor());
    let start = [5.0, 2.0, 1.0].into_iter().map(|m| m * decade).find(|v| *v <= lo).unwrap_or(decade);
    let (llo, lhi) = (start.log10(), hi.log10().ceil());
    let y = |v: f64| top + ph * (1.0 - (v.max(10f64.powf(llo)).log10() - llo) / (lhi - llo).max(1e-9));
    let x = |i: usize| left + pw * (i as f64 + 0.5) / pct.len() as f64;
    let colors = ["#222222", "#1f77b4", "#6baed6", "#d62728", "#ff9896", "#2ca02c", "#98df8a"];
    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="14">Latency percentiles, 1 kB GETs at {RATE} rps over {CONNECTIONS} connections (median of {} rep., ms, log scale)</text>"#,
        run.profile.reps
    );
    // Grid: 1, 2, 5 per decade.
    let mut d = llo.floor();
    while d <= lhi {
        for m in [1.0, 2.0, 5.0] {
            let v = 10f64.powf(d) * m;
            if v.log10() > lhi + 1e-9 {
                break;
            }
            if v.log10() < llo - 1e-9 {
                continue;
            }
            let yy = y(v);
            let _ = writeln!(s, r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#dddddd"/>"##, left + pw);
            let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, yy + 4.0, trim(v));
        }
        d += 1.0;
    }
    for (i, (label, _)) in pct.iter().enumerate() {
        let _ = writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#, x(i), top + ph + 20.0);
    }
    let _ = writeln!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888888"/>"##);
    for (n, (variant, ys)) in series.iter().enumerate() {
        let color = colors[Variant::ALL.iter().position(|a| a == variant).unwrap_or(n) % colors.len()];
        let dash = if matches!(variant, Variant::AgentMtls { accelerate: true } | Variant::AgentL7 { accelerate: true }) {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let points: Vec<String> = ys.iter().enumerate().map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v))).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#, points.join(" "));
        for (i, &v) in ys.iter().enumerate() {
            let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{} {}: {v:.3} ms</title></circle>"#, x(i), y(v), variant.name(), pct[i].0);
        }
        let ly = top + 10.0 + n as f64 * 20.0;
        let lx = left + pw + 15.0;
        let _ = writeln!(s, r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#, lx + 24.0);
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, lx + 30.0, ly + 4.0, variant.name());
    }
    let _ = writeln!(s, "</svg>");
    s
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        let s = Stat::of(vec![3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stat::of(vec![1.0, 4.0]).unwrap().median, 2.5);
        assert!(Stat::of(vec![]).is_none());
        assert_eq!(cell(Stat::of(vec![1.0, 2.0, 3.0]), 1), "2.0 (1.0–3.0)");
        assert_eq!(trim(0.5), "0.5");
        assert_eq!(trim(20.0), "20");
    }
}
