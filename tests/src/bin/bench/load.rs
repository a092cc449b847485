//! The scenarios: load generators run inside the client pod, the proxies'
//! CPU and memory read from `/proc`.
//!
//! | scenario | tool | metric |
//! | --- | --- | --- |
//! | latency | `oha -q 1000 -c 16 --latency-correction` | p50/p90/p99/p99.9 of 1 kB GETs at a fixed 1,000 rps |
//! | resources | `/proc/PID/stat`, `/proc/PID/status` | proxy CPU (vCPU) during the latency run; RSS (and its anonymous part) idle, after it, and peak with 1,000 open connections |
//! | connections | `oha -q 1000 -c 1000` | peak RSS with 1,000 connections open |
//! | saturation | `wrk -t1 -c16` | requests/s, as many as it gets |
//! | connection rate | `oha -c 16 --disable-keepalive` | new connections (one request each) per second |
//! | bulk | `curl GET /bulk?bytes=N` | one stream's Gbit/s |
//! | idle connections | `meshtest idle` (1,000 then 10,000 keep-alive connections, one GET each, held) | each proxy's anonymous memory per connection (KiB) |
//! | rapid reset | `meshtest rapid-reset` (HTTP/2 HEADERS + RST_STREAM flood) beside `oha -q 1000 -c 16` | the legitimate requests' p99 and errors during the flood (L7 variants: the client side must speak HTTP/2) |
//!
//! oha's `--latency-correction` measures each request from when it was
//! due, not from when it was sent, so a stall is not hidden by the requests
//! it delayed (coordinated omission).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mesh_e2e::Pod;
use serde_json::Value;

use crate::Mode;

/// Tools the bench runs, and the package that brings each (`cargo xtask
/// bench` installs them).
const TOOLS: [(&str, &str); 4] = [
    ("oha", "crates.io `oha`"),
    ("wrk", "Debian `wrk`"),
    ("haproxy", "Debian `haproxy`"),
    ("curl", "Debian `curl`"),
];

/// The path every load request asks for (allowed by the L7 policy).
const PATH: &str = "/api/v1/items";
/// Requests per second of the latency scenario, and its connections.
pub const RATE: u32 = 1000;
pub const CONNECTIONS: u32 = 16;

pub fn check_tools() -> Result<()> {
    for (tool, from) in TOOLS {
        if which(tool).is_none() {
            bail!("`{tool}` is not on PATH: install {from} (`cargo xtask bench` does)");
        }
    }
    Ok(())
}

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// How long and how often: one per [`Mode`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    pub reps: usize,
    pub latency_secs: u64,
    pub saturation_secs: u64,
    pub connrate_secs: u64,
    pub open_conns: u32,
    pub open_conns_secs: u64,
    pub bulk_bytes: u64,
    /// The restart scenario's load (agent variants): the node-a agent is
    /// replaced a quarter in, the node-b agent half-way.
    #[serde(default)]
    pub restart_secs: u64,
    /// Idle keep-alive connections held at once, one measurement each.
    #[serde(default)]
    pub idle_conns: Vec<u32>,
    /// How long a storm of idle connections is given to settle before
    /// memory is read, and between sizes: the agent collects its threads'
    /// free memory two looks (every 2 s) after a storm settles and again
    /// three looks later, once its pools have closed what the storm left
    /// idle (after 5 s), so that the reading is what the proxies hold for
    /// idle connections, not what a burst left in pools or what they freed
    /// and have yet to return.
    #[serde(default)]
    pub idle_settle_ms: u64,
    /// The rapid reset flood's length (legitimate load during it).
    #[serde(default)]
    pub rapid_reset_secs: u64,
    /// Idle time after the proxies are up, before the idle RSS reading.
    pub settle_ms: u64,
    /// Only these scenarios (names in [`SCENARIOS`]); empty: all. For
    /// profiling one kind of load.
    #[serde(default)]
    pub only: Vec<String>,
}

/// Scenario names, for `--scenarios`.
pub const SCENARIOS: [&str; 8] = ["idle-conns", "latency", "open-conns", "saturation", "connrate", "bulk", "rapid-reset", "restart"];

impl Profile {
    pub fn for_mode(mode: Mode) -> Profile {
        match mode {
            Mode::Full => Profile {
                reps: 5,
                latency_secs: 10,
                saturation_secs: 8,
                connrate_secs: 5,
                open_conns: 1000,
                open_conns_secs: 5,
                bulk_bytes: 1 << 30,
                restart_secs: 12,
                idle_conns: vec![1000, 10_000],
                idle_settle_ms: 12_000,
                rapid_reset_secs: 8,
                settle_ms: 1000,
                only: Vec::new(),
            },
            Mode::Quick => Profile {
                reps: 1,
                latency_secs: 3,
                saturation_secs: 3,
                connrate_secs: 2,
                open_conns: 1000,
                open_conns_secs: 3,
                bulk_bytes: 256 << 20,
                restart_secs: 6,
                idle_conns: vec![1000, 10_000],
                idle_settle_ms: 12_000,
                rapid_reset_secs: 3,
                settle_ms: 500,
                only: Vec::new(),
            },
            Mode::Smoke => Profile {
                reps: 1,
                latency_secs: 1,
                saturation_secs: 1,
                connrate_secs: 1,
                open_conns: 100,
                open_conns_secs: 1,
                bulk_bytes: 16 << 20,
                restart_secs: 4,
                idle_conns: vec![100],
                // Too few to be a storm: nothing to wait for.
                idle_settle_ms: 500,
                rapid_reset_secs: 1,
                settle_ms: 200,
                only: Vec::new(),
            },
        }
    }

    pub fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }

    pub fn describe(&self) -> String {
        if !self.only.is_empty() {
            return format!("only {} (durations as in the mode)", self.only.join(", "));
        }
        format!(
            "idle connections {:?}, latency {RATE} rps x {}s, {} open connections x {}s, saturation {}s, connection rate {}s, bulk {} MiB, rapid reset {}s",
            self.idle_conns,
            self.latency_secs,
            self.open_conns,
            self.open_conns_secs,
            self.saturation_secs,
            self.connrate_secs,
            self.bulk_bytes >> 20,
            self.rapid_reset_secs
        )
    }
}

/// Where the client sends its requests.
#[derive(Clone, Debug)]
pub struct Target {
    ip: Ipv4Addr,
    port: u16,
}

impl Target {
    pub fn new(ip: Ipv4Addr, port: u16) -> Target {
        Target { ip, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.ip, self.port)
    }
}

/// One run's numbers, by metric name (see [`crate::report::METRICS`]).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    pub fn set(&mut self, key: &str, v: f64) {
        self.0.insert(key.to_string(), v);
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.get(key).copied()
    }

    pub fn summary(&self) -> String {
        let f = |k: &str| self.get(k).map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        format!(
            "p50 {} p90 {} p99 {} ms, sat {} rps, bulk {} Gbit/s, {} conn/s",
            f("p50_ms"),
            f("p90_ms"),
            f("p99_ms"),
            self.get("saturation_rps").map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into()),
            f("bulk_gbps"),
            self.get("connrate_cps").map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into()),
        )
    }
}

/// One GET must come back 200 with the 1 kB body, and a bulk GET must
/// parse: the variant is up.
pub fn probe(client: &Pod, target: &Target) -> Result<()> {
    let out = client.run(
        "curl",
        ["-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--max-time", "5", &target.url(PATH)],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.trim() == "200 1024", "GET {PATH}: {text} {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Every scenario, in a fixed order, on one variant. `pids` are the proxy
/// processes (client side first), empty for `direct`; `h2_front`: the
/// client-side proxy parses HTTP (and so takes HTTP/2 from the client).
pub fn scenarios(client: &Pod, target: &Target, pids: &[u32], h2_front: bool, p: &Profile) -> Result<Metrics> {
    let mut m = Metrics::default();
    std::thread::sleep(Duration::from_millis(p.settle_ms));
    for (side, pid) in sides(pids) {
        m.set(&format!("rss_idle_{side}_mb"), rss_mb(pid)?);
        // Anonymous pages only: RSS also counts the binary's code pages,
        // which are shared by every process of the same binary.
        m.set(&format!("anon_idle_{side}_mb"), anon_mb(pid)?);
    }

    // First, on fresh proxies: later scenarios leave freed memory that a
    // new connection would reuse, hiding what it costs.
    if !pids.is_empty() && p.wants("idle-conns") {
        idle_conns(client, target, pids, p, &mut m)?;
    }

    // Latency at a fixed rate, and what the proxies spend on it.
    if p.wants("latency") {
        latency(client, target, pids, p, &mut m)?;
    }

    // Many open connections: the proxies' peak memory.
    if !pids.is_empty() && p.wants("open-conns") {
        let peak = PeakRss::start(pids.to_vec());
        let conns = p.open_conns.to_string();
        let v = oha(client, target, &["-q", &RATE.to_string(), "-c", &conns], p.open_conns_secs)?;
        for ((side, _), (rss, anon)) in sides(pids).zip(peak.stop()) {
            m.set(&format!("rss_conns_{side}_mb"), rss);
            m.set(&format!("anon_conns_{side}_mb"), anon);
        }
        m.set("open_conns_errors", errors(&v) as f64);
    }

    if p.wants("saturation") {
        m.set("saturation_rps", wrk(client, target, p.saturation_secs)?);
    }

    if p.wants("connrate") {
        let v = oha(client, target, &["-c", &CONNECTIONS.to_string(), "--disable-keepalive"], p.connrate_secs)?;
        m.set("connrate_cps", v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0));
        m.set("connrate_errors", errors(&v) as f64);
    }

    if p.wants("bulk") {
        m.set("bulk_gbps", bulk(client, target, p.bulk_bytes)?);
    }

    if h2_front && p.wants("rapid-reset") {
        rapid_reset(client, target, p.rapid_reset_secs, &mut m)?;
    }
    Ok(m)
}

/// Per size: `meshtest idle` holds that many keep-alive connections (one
/// GET each); each proxy's anonymous memory with them minus before, per
/// connection, read once the opening has settled
/// ([`Profile::idle_settle_ms`]). After each size the proxies get their
/// descriptors back and the same time to return freed memory, so the
/// next size and the next scenario do not measure that clean-up.
fn idle_conns(client: &Pod, target: &Target, pids: &[u32], p: &Profile, m: &mut Metrics) -> Result<()> {
    for &n in &p.idle_conns {
        let before: Vec<f64> = pids.iter().map(|&pid| anon_mb(pid)).collect::<Result<_>>()?;
        let control = std::env::temp_dir().join(format!("bench-idle-{}-{n}", std::process::id()));
        let _ = std::fs::remove_file(&control);
        let to = format!("{}:{}", target.ip, target.port);
        let (n_arg, control_arg) = (n.to_string(), control.to_string_lossy().into_owned());
        let idle = client.spawn(
            "meshtest",
            ["idle", "--to", &to, "--connections", &n_arg, "--path", PATH, "--control", &control_arg],
        )?;
        let line = idle
            .wait_for_stdout(Duration::from_secs(120), |l| l.contains("\"held\""))
            .with_context(|| format!("meshtest idle: {}", idle.stderr()))?;
        let opened: Value = serde_json::from_str(&line)?;
        ensure!(opened["failed"] == 0, "idle connections failed: {opened}");
        std::thread::sleep(Duration::from_millis(p.idle_settle_ms));
        for ((side, pid), before) in sides(pids).zip(&before) {
            m.set(&format!("idle_kib_{side}_{n}"), (anon_mb(pid)? - before) * 1024.0 / f64::from(n));
        }
        std::fs::write(&control, b"")?;
        let out = idle.wait_output(Duration::from_secs(120))?;
        let _ = std::fs::remove_file(&control);
        ensure!(out.status.success(), "meshtest idle: {}", String::from_utf8_lossy(&out.stdout));
        // The proxies tear the connections down, their pools close what
        // the burst left idle, and their threads return freed memory:
        // the next size, and the next scenario (latency), start settled.
        std::thread::sleep(Duration::from_millis(p.idle_settle_ms));
    }
    Ok(())
}

/// The latency scenario's load (1,000 rps over 16 connections) while
/// another connection floods the client-side proxy with HTTP/2 Rapid Reset;
/// the legitimate requests' p99 and failures, and the flood's pace.
fn rapid_reset(client: &Pod, target: &Target, secs: u64, m: &mut Metrics) -> Result<()> {
    let to = format!("{}:{}", target.ip, target.port);
    let flood_secs = (secs + 1).to_string();
    let flood = client.spawn("meshtest", ["rapid-reset", "--to", &to, "--secs", &flood_secs])?;
    std::thread::sleep(Duration::from_millis(300));
    let run = oha_spawn(client, target, secs)?;
    let out = run.wait_output(Duration::from_secs(secs + 60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "oha (rapid reset) failed ({}): {stdout} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&stdout).with_context(|| format!("oha printed no JSON: {stdout}"))?;
    let p99 = v["latencyPercentiles"]["p99"].as_f64().with_context(|| format!("oha: no p99 in {v}"))?;
    m.set("rapid_reset_p99_ms", p99 * 1e3);
    m.set("rapid_reset_errors", errors(&v) as f64);
    let fout = flood.wait_output(Duration::from_secs(30))?;
    let line = String::from_utf8_lossy(&fout.stdout);
    let f: Value = serde_json::from_str(line.lines().last().unwrap_or_default()).with_context(|| format!("meshtest rapid-reset: {line}"))?;
    m.set("rapid_reset_streams_per_s", f["streams"].as_f64().unwrap_or(0.0) / (secs + 1) as f64);
    m.set("rapid_reset_connections", f["connections"].as_f64().unwrap_or(0.0));
    Ok(())
}

fn latency(client: &Pod, target: &Target, pids: &[u32], p: &Profile, m: &mut Metrics) -> Result<()> {
    let before: Vec<u64> = pids.iter().map(|&pid| cpu_ticks(pid)).collect::<Result<_>>()?;
    let t = Instant::now();
    let v = oha(client, target, &["-q", &RATE.to_string(), "-c", &CONNECTIONS.to_string()], p.latency_secs)?;
    let secs = t.elapsed().as_secs_f64();
    for ((side, pid), before) in sides(pids).zip(before) {
        let used = (cpu_ticks(pid)? - before) as f64 / clock_ticks_per_sec();
        m.set(&format!("cpu_{side}_vcpu"), used / secs);
        m.set(&format!("rss_load_{side}_mb"), rss_mb(pid)?);
    }
    let lat = &v["latencyPercentiles"];
    for (key, name) in [("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"), ("p99.9", "p999_ms")] {
        let s = lat[key].as_f64().with_context(|| format!("oha: no latencyPercentiles.{key} in {v}"))?;
        m.set(name, s * 1e3);
    }
    m.set("latency_rps", v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0));
    m.set("latency_errors", errors(&v) as f64);
    Ok(())
}

/// `a` for the client-side proxy, `b` for the server-side one.
fn sides(pids: &[u32]) -> impl Iterator<Item = (&'static str, u32)> + '_ {
    ["a", "b"].into_iter().zip(pids.iter().copied())
}

/// Runs oha in the client pod for `secs` seconds against the 1 kB path,
/// returns its JSON summary. Fails if fewer than 99% of requests got a 200.
fn oha(client: &Pod, target: &Target, args: &[&str], secs: u64) -> Result<Value> {
    let duration = format!("{secs}s");
    let mut all = vec!["--no-tui", "--output-format", "json", "--latency-correction", "-z", &duration];
    all.extend_from_slice(args);
    let url = target.url(PATH);
    all.push(&url);
    let out = client.spawn("oha", &all)?.wait_output(Duration::from_secs(secs + 60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "oha {all:?} failed ({}): {stdout} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&stdout).with_context(|| format!("oha printed no JSON: {stdout}"))?;
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    let total = ok + errors(&v);
    ensure!(
        total > 0 && ok as f64 >= 0.99 * total as f64,
        "oha {all:?}: only {ok} of {total} requests got 200: status {} errors {}",
        v["statusCodeDistribution"],
        v["errorDistribution"]
    );
    Ok(v)
}

/// oha at the latency scenario's rate for `secs`, started in the background
/// (the restart scenario replaces agents meanwhile).
pub fn oha_spawn(client: &Pod, target: &Target, secs: u64) -> Result<mesh_e2e::PodProcess> {
    let duration = format!("{secs}s");
    let (rate, conns) = (RATE.to_string(), CONNECTIONS.to_string());
    let url = target.url(PATH);
    let all = ["--no-tui", "--output-format", "json", "--latency-correction", "-z", &duration, "-q", &rate, "-c", &conns, &url];
    client.spawn("oha", all)
}

/// The restart scenario's numbers from its oha run: requests, failed
/// requests (what matters: any is a dropped request), p99 during it.
pub fn restart_numbers(run: mesh_e2e::PodProcess, secs: u64, m: &mut Metrics) -> Result<()> {
    let out = run.wait_output(Duration::from_secs(secs + 60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "oha (restart) failed ({}): {stdout} {}", out.status, String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&stdout).with_context(|| format!("oha printed no JSON: {stdout}"))?;
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    m.set("restart_requests", (ok + errors(&v)) as f64);
    m.set("restart_errors", errors(&v) as f64);
    let p99 = v["latencyPercentiles"]["p99"].as_f64().with_context(|| format!("oha: no p99 in {v}"))?;
    m.set("restart_p99_ms", p99 * 1e3);
    Ok(())
}

/// Responses other than 200 plus transport errors. oha counts requests cut
/// by the end of the run (`aborted due to deadline`) as errors: not ours.
fn errors(v: &Value) -> u64 {
    let non_200: u64 = v["statusCodeDistribution"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| *k != "200").filter_map(|(_, n)| n.as_u64()).sum())
        .unwrap_or(0);
    let transport: u64 = v["errorDistribution"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| !k.contains("deadline")).filter_map(|(_, n)| n.as_u64()).sum())
        .unwrap_or(0);
    non_200 + transport
}

/// `wrk -t1 -c16 -dSECS`: requests per second. One thread: the machine's
/// other core is left to the proxies and the server.
fn wrk(client: &Pod, target: &Target, secs: u64) -> Result<f64> {
    let url = target.url(PATH);
    let (c, d) = (CONNECTIONS.to_string(), format!("{secs}s"));
    let args = ["-t1", "-c", &c, "-d", &d, &url];
    let out = client.spawn("wrk", args)?.wait_output(Duration::from_secs(secs + 60))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "wrk failed ({}): {text} {}", out.status, String::from_utf8_lossy(&out.stderr));
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> Result<f64> {
    let field = |label: &str| -> Option<f64> {
        text.lines().find_map(|l| l.trim().strip_prefix(label)?.split_whitespace().next()?.parse().ok())
    };
    let rps = field("Requests/sec:").with_context(|| format!("wrk printed no Requests/sec: {text}"))?;
    let total = text.lines().find_map(|l| l.trim().split_once(" requests in ")?.0.trim().parse::<f64>().ok()).unwrap_or(0.0);
    let bad = field("Non-2xx or 3xx responses:").unwrap_or(0.0);
    ensure!(bad <= 0.01 * total.max(1.0), "wrk: {bad} of {total} responses were not 2xx/3xx: {text}");
    Ok(rps)
}

/// One GET of `bytes` bytes on one connection: Gbit/s.
fn bulk(client: &Pod, target: &Target, bytes: u64) -> Result<f64> {
    let url = target.url(&format!("/bulk?bytes={bytes}"));
    let out = client.run("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}", "--max-time", "120", &url])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let f: Vec<&str> = text.split_whitespace().collect();
    ensure!(f.len() == 3 && f[0] == "200", "bulk GET: {text} {}", String::from_utf8_lossy(&out.stderr));
    let (got, secs): (f64, f64) = (f[1].parse()?, f[2].parse()?);
    ensure!(got as u64 == bytes && secs > 0.0, "bulk GET: {got} of {bytes} bytes in {secs}s");
    Ok(got * 8.0 / secs / 1e9)
}

/// utime + stime of every thread of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields are
    // counted from the last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Resident set size in MiB (`VmRSS`).
fn rss_mb(pid: u32) -> Result<f64> {
    status_mb(pid, "VmRSS:")
}

/// Resident anonymous memory in MiB (`RssAnon`): heap and stacks, what
/// grows with connections.
fn anon_mb(pid: u32) -> Result<f64> {
    status_mb(pid, "RssAnon:")
}

fn status_mb(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_status_kb(&status, field)
        .map(|kb| kb as f64 / 1024.0)
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn parse_status_kb(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok())
}

/// Samples the RSS of some processes every 50 ms on a thread; [`Self::stop`]
/// returns each one's peak `(VmRSS, RssAnon)`.
struct PeakRss {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, f64)>>,
}

impl PeakRss {
    fn start(pids: Vec<u32>) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = vec![(0.0f64, 0.0f64); pids.len()];
            while !flag.load(Ordering::Relaxed) {
                for (p, &pid) in peak.iter_mut().zip(&pids) {
                    if let (Ok(rss), Ok(anon)) = (rss_mb(pid), anon_mb(pid)) {
                        *p = (p.0.max(rss), p.1.max(anon));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        PeakRss { stop, thread }
    }

    fn stop(self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_and_wrk() {
        let stat = "1234 (mesh agent) (x) S 1 1234 1234 0 -1 4194560 3000 0 0 0 250 130 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(380));
        let status = "Name:\tx\nVmRSS:\t   10240 kB\nRssAnon:\t    4096 kB\n";
        assert_eq!(parse_status_kb(status, "VmRSS:"), Some(10240));
        assert_eq!(parse_status_kb(status, "RssAnon:"), Some(4096));
        let wrk = "Running 1s test @ http://x\n  1 threads and 16 connections\n  12345 requests in 1.00s, 13.2MB read\nRequests/sec:  12345.67\nTransfer/sec:     13.2MB\n";
        assert_eq!(parse_wrk(wrk).unwrap(), 12345.67);
        let bad = "  100 requests in 1.00s, 1MB read\n  Non-2xx or 3xx responses: 50\nRequests/sec:  100.00\n";
        assert!(parse_wrk(bad).is_err());
    }
}
