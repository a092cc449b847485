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
    pub agents: AgentBins,
}

/// Which agent binaries ran (`path (mesh-agent X.Y.Z)`); empty in reports
/// re-rendered from a `results.json` older than the field.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct AgentBins {
    #[serde(default)]
    pub current: String,
    /// `--baseline-agent`: what the `@before` variants ran.
    #[serde(default)]
    pub before: Option<String>,
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

    /// The variants in report order: each `@before` one right after its
    /// variant on the current build.
    pub fn shown(&self) -> Vec<Variant> {
        let mut out = Vec::new();
        for &v in &self.variants {
            if v.is_before() && self.variants.contains(&v.current()) {
                continue;
            }
            out.push(v);
            out.extend(v.before().filter(|b| self.variants.contains(b)));
        }
        out
    }

    /// The agent variants measured on both builds (current and `@before`).
    pub fn compared(&self) -> Vec<Variant> {
        self.shown().into_iter().filter(|v| v.before().is_some_and(|b| self.variants.contains(&b))).collect()
    }

    /// After/before: median over repetitions of `variant`'s sum of `keys`
    /// over its `@before` twin's in the same repetition (paired, like
    /// [`Self::added_over_direct`]: both ran under the same machine load).
    pub fn after_before(&self, variant: Variant, keys: &[&str]) -> Option<Stat> {
        let before = variant.before()?;
        let sum = |m: &Metrics| keys.iter().map(|k| m.get(k)).sum::<Option<f64>>();
        let ratios = self
            .samples
            .iter()
            .filter(|s| s.variant == variant)
            .filter_map(|s| {
                let b = self.samples.iter().find(|b| b.variant == before && b.rep == s.rep)?;
                let (a, b) = (sum(&s.metrics)?, sum(&b.metrics)?);
                (b > 0.0).then(|| a / b)
            })
            .collect();
        Stat::of(ratios)
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
        let variant = Variant::from_name(name).with_context(|| format!("unknown variant {name}"))?;
        let rep = s["rep"].as_u64().unwrap_or(1).saturating_sub(1) as usize;
        samples.push(Sample { variant, rep, metrics: serde_json::from_value(s["metrics"].clone())? });
    }
    let variants = Variant::known().filter(|v| samples.iter().any(|s| s.variant == *v)).collect();
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
        agents: serde_json::from_value(v["agents"].clone()).unwrap_or_default(),
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
        "agents": run.agents,
        "afterBefore": after_before_json(run),
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

/// A ratio's median over the repetitions, `(min–max)` when several.
fn ratio_stat_cell(s: Option<Stat>) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{}× ({}–{})", ratio_digits(s.median), ratio_digits(s.min), ratio_digits(s.max)),
        Some(s) => format!("{}×", ratio_digits(s.median)),
        None => "–".into(),
    }
}

/// Two decimals, or two significant digits below 0.1 (a debug build's
/// latency over a release build's is not `0.00`).
fn ratio_digits(r: f64) -> String {
    let digits = if r > 0.0 && r < 0.1 { (-r.log10()).ceil() as usize + 1 } else { 2 };
    format!("{r:.digits$}")
}

/// One row of the after/before table: what it shows, the metric keys
/// summed (both nodes' proxies for resources), which way is better.
struct AfterBeforeRow {
    label: String,
    keys: Vec<String>,
    better: &'static str,
}

/// The after/before table's rows: every per-variant number of the other
/// tables that a ratio makes sense of (counts of failures do not).
fn after_before_rows(run: &Run) -> Vec<AfterBeforeRow> {
    let row = |label: &str, keys: &[&str], better| AfterBeforeRow {
        label: label.to_string(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        better,
    };
    let (lower, higher) = ("lower", "higher");
    let conns = run.profile.open_conns;
    let mut rows = vec![
        row(&format!("latency p50 ({RATE} rps)"), &["p50_ms"], lower),
        row("latency p90", &["p90_ms"], lower),
        row("latency p99", &["p99_ms"], lower),
        row("latency p99.9", &["p999_ms"], lower),
        row(&format!("max req/s ({CONNECTIONS} conns)"), &["saturation_rps"], higher),
        row("bulk Gbit/s (1 stream)", &["bulk_gbps"], higher),
        row("new conn/s", &["connrate_cps"], higher),
        row(&format!("CPU at {RATE} rps, A + B"), &["cpu_a_vcpu", "cpu_b_vcpu"], lower),
        row("RSS idle, A + B", &["rss_idle_a_mb", "rss_idle_b_mb"], lower),
        row("anonymous idle, A + B", &["anon_idle_a_mb", "anon_idle_b_mb"], lower),
        row(&format!("RSS after {RATE} rps, A + B"), &["rss_load_a_mb", "rss_load_b_mb"], lower),
        row(&format!("peak RSS, {conns} conns, A + B"), &["rss_conns_a_mb", "rss_conns_b_mb"], lower),
        row(&format!("peak anonymous, {conns} conns, A + B"), &["anon_conns_a_mb", "anon_conns_b_mb"], lower),
    ];
    for n in &run.profile.idle_conns {
        rows.push(AfterBeforeRow {
            label: format!("KiB per idle connection at {n}, A + B"),
            keys: vec![format!("idle_kib_a_{n}"), format!("idle_kib_b_{n}")],
            better: lower,
        });
    }
    rows.push(row("p99 during restart", &["restart_p99_ms"], lower));
    rows.push(row("p99 during Rapid Reset flood", &["rapid_reset_p99_ms"], lower));
    rows
}

impl AfterBeforeRow {
    fn stat(&self, run: &Run, v: Variant) -> Option<Stat> {
        let keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
        run.after_before(v, &keys)
    }
}

/// `{variant: {keys: {median, min, max, n}}}` for the JSON (derived from
/// the samples; not read back).
fn after_before_json(run: &Run) -> Value {
    let mut out = serde_json::Map::new();
    for v in run.compared() {
        let mut m = serde_json::Map::new();
        for row in after_before_rows(run) {
            if let Some(s) = row.stat(run, v) {
                m.insert(row.keys.join("+"), json!({"median": s.median, "min": s.min, "max": s.max, "n": s.n}));
            }
        }
        out.insert(v.name().to_string(), Value::Object(m));
    }
    Value::Object(out)
}

/// The before/after section: one row per number, one column per agent
/// variant measured on both builds, each cell after/before.
fn after_before_md(run: &Run, md: &mut String) {
    let compared = run.compared();
    if compared.is_empty() {
        return;
    }
    let _ = writeln!(md, "## After / before (`--baseline-agent`)\n");
    let _ = writeln!(
        md,
        "Current build over the baseline binary (the `@before` rows of the tables below), each variant \
         against its own `@before` twin: median over the repetitions of the ratio within one repetition, \
         (min–max) when there are several. Below 1× is less of the number; \"better\" says which way is \
         an improvement. Treat a ratio whose range straddles 1× as no change.\n"
    );
    let _ = writeln!(md, "| after / before | better | {} |", compared.iter().map(|v| v.name()).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(md, "| --- | --- |{}", " --- |".repeat(compared.len()));
    for row in after_before_rows(run) {
        let cells: Vec<String> = compared.iter().map(|&v| ratio_stat_cell(row.stat(run, v))).collect();
        if cells.iter().all(|c| c == "–") {
            continue;
        }
        let _ = writeln!(md, "| {} | {} | {} |", row.label, row.better, cells.join(" | "));
    }
    let _ = writeln!(md);
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
    if !run.agents.current.is_empty() {
        let _ = writeln!(md, "- agent: `{}`", run.agents.current);
    }
    if let Some(before) = &run.agents.before {
        let _ = writeln!(
            md,
            "- `@before` rows: the same variant with the agents of `--baseline-agent` `{before}` (the CA stays the current build), \
             interleaved in the same repetitions"
        );
    }
    let _ = writeln!(
        md,
        "- the machine is shared (other builds run on the same 2 cores): expect noise, read the spreads.\n"
    );
    after_before_md(run, &mut md);

    let _ = writeln!(md, "## Latency: 1 kB HTTP/1.1 GETs at {RATE} rps over {CONNECTIONS} connections (ms)\n");
    let _ = writeln!(md, "| variant | p50 | p90 | p99 | p99.9 | added p50 | added p90 | added p99 | p90 ×direct | p90 ×peer |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for v in run.shown() {
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
        for v in run.shown() {
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
    for v in run.shown() {
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
    for v in run.shown() {
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
        for v in run.shown() {
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
        for v in run.shown() {
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
    // The current build's agents (`@before` ones: see the after/before table).
    let agents: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|v| v.before().is_some() && run.variants.contains(v))
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
                Variant::AgentMtls { accelerate: true, before } => Variant::AgentMtls { accelerate: false, before },
                Variant::AgentL7 { accelerate: true, before } => Variant::AgentL7 { accelerate: false, before },
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
        .shown()
        .into_iter()
        .filter_map(|v| {
            let ys: Option<Vec<f64>> = pct.iter().map(|(_, k)| run.stat(v, k).map(|s| s.median)).collect();
            Some((v, ys?))
        })
        .collect();
    // Room for `…@before` legend entries.
    let right = if series.iter().any(|(v, _)| v.is_before()) { 250.0 } else { 210.0 };
    let (w, h, left, top, bottom) = (550.0 + right, 420.0, 70.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let mut all: Vec<f64> = series.iter().flat_map(|(_, ys)| ys.iter().copied()).filter(|y| *y > 0.0).collect();
    if all.is_empty() {
        // No latency numbers: an empty 1–10 ms frame, not an endless axis.
        all = vec![1.0, 10.0];
    }
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
        // An `@before` line: its variant's colour and dashes, faded, with
        // hollow markers.
        let color = colors[Variant::ALL.iter().position(|a| *a == variant.current()).unwrap_or(n) % colors.len()];
        let dash = if matches!(variant, Variant::AgentMtls { accelerate: true, .. } | Variant::AgentL7 { accelerate: true, .. }) {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let (fade, marker) = if variant.is_before() {
            (r#" stroke-opacity="0.5""#, format!(r#"fill="white" stroke="{color}""#))
        } else {
            ("", format!(r#"fill="{color}""#))
        };
        let dash = format!("{dash}{fade}");
        let points: Vec<String> = ys.iter().enumerate().map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v))).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#, points.join(" "));
        for (i, &v) in ys.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" {marker}><title>{} {}: {v:.3} ms</title></circle>"#,
                x(i),
                y(v),
                variant.name(),
                pct[i].0
            );
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
        assert_eq!(ratio_digits(0.0036), "0.0036");
        assert_eq!(ratio_digits(0.012), "0.012");
        assert_eq!(ratio_digits(0.97), "0.97");
        assert_eq!(ratio_digits(8.523), "8.52");
    }

    fn sample(variant: Variant, rep: usize, p50: f64, rps: f64) -> Sample {
        let mut metrics = Metrics::default();
        for k in ["p50_ms", "p90_ms", "p99_ms", "p999_ms"] {
            metrics.set(k, p50);
        }
        metrics.set("saturation_rps", rps);
        metrics.set("cpu_a_vcpu", 0.02);
        metrics.set("cpu_b_vcpu", 0.02);
        Sample { variant, rep, metrics }
    }

    fn run_of(variants: Vec<Variant>, samples: Vec<Sample>) -> Run {
        Run {
            mode: Mode::Smoke,
            profile: Profile::for_mode(Mode::Smoke),
            machine: Machine::probe(),
            started: SystemTime::UNIX_EPOCH,
            elapsed: Duration::ZERO,
            variants,
            samples,
            policy: Vec::new(),
            agents: AgentBins { current: "/a (mesh-agent 0.1.0)".into(), before: Some("/b (mesh-agent 0.1.0)".into()) },
        }
    }

    #[test]
    fn after_before_pairs_repetitions() {
        let (mtls, direct) = (Variant::ALL[1], Variant::Direct);
        let before = mtls.before().unwrap();
        // Run order: the twin last; the report shows it next to its variant.
        let mut samples = Vec::new();
        for (rep, (a, b)) in [(1.0, 2.0), (3.0, 2.0), (1.0, 1.0)].into_iter().enumerate() {
            samples.push(sample(direct, rep, 0.5, 9000.0));
            samples.push(sample(mtls, rep, a, 4000.0));
            samples.push(sample(before, rep, b, 2000.0));
        }
        let run = run_of(vec![before, direct, mtls], samples);
        assert_eq!(run.shown(), [direct, mtls, before]);
        assert_eq!(run.compared(), [mtls]);
        let p50 = run.after_before(mtls, &["p50_ms"]).unwrap();
        assert_eq!((p50.median, p50.min, p50.max, p50.n), (1.0, 0.5, 1.5, 3));
        assert_eq!(run.after_before(mtls, &["saturation_rps"]).unwrap().median, 2.0);
        assert_eq!(run.after_before(mtls, &["cpu_a_vcpu", "cpu_b_vcpu"]).unwrap().median, 1.0);
        assert!(run.after_before(before, &["p50_ms"]).is_none());
        assert!(run.after_before(mtls, &["bulk_gbps"]).is_none());

        let md = markdown(&run);
        assert!(md.contains("## After / before"), "{md}");
        assert!(md.contains("| latency p50 (1000 rps) | lower | 1.00× (0.50–1.50) |"), "{md}");
        assert!(md.contains("| max req/s (16 conns) | higher | 2.00× (2.00–2.00) |"), "{md}");
        assert!(!md.contains("| bulk Gbit/s (1 stream) | higher |"), "{md}");
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| agent-mtls/accel-off")).collect();
        assert!(rows.len() >= 2 && rows[1].starts_with("| agent-mtls/accel-off@before |"), "{rows:?}");
        assert!(svg(&run).contains("agent-mtls/accel-off@before"));
        assert!(svg(&run_of(vec![direct], Vec::new())).ends_with("</svg>\n"));

        // JSON round trip keeps the @before samples and the binaries.
        let dir = std::env::temp_dir().join(format!("bench-report-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("results.json");
        let json = to_json(&run);
        assert_eq!(json["afterBefore"]["agent-mtls/accel-off"]["saturation_rps"]["median"], 2.0);
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        let back = read_json(&path).unwrap();
        assert_eq!(back.shown(), [direct, mtls, before]);
        assert_eq!(back.agents.before.as_deref(), Some("/b (mesh-agent 0.1.0)"));
        assert_eq!(markdown(&back).lines().filter(|l| l.contains("@before")).count(), markdown(&run).lines().filter(|l| l.contains("@before")).count());

        // A results.json from before the baseline existed: no agents field.
        let mut old = to_json(&run_of(vec![direct, mtls], run.samples.iter().filter(|s| !s.variant.is_before()).map(|s| sample(s.variant, s.rep, 1.0, 1.0)).collect()));
        old.as_object_mut().unwrap().remove("agents");
        old.as_object_mut().unwrap().remove("afterBefore");
        std::fs::write(&path, serde_json::to_string(&old).unwrap()).unwrap();
        let back = read_json(&path).unwrap();
        assert!(back.agents.current.is_empty() && back.agents.before.is_none());
        assert!(!markdown(&back).contains("After / before"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
