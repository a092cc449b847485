//! The harness on its own (no agent): pods talk over the bridge, processes
//! land in the pod's netns and cgroup, nothing outlives a testbed, and the
//! host network is left alone. Needs root; fails (never skips) without it.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mesh_e2e::{PodSpec, ServiceSpec, Testbed, wait_until};
use serde_json::Value;

const MESHTEST: &str = env!("CARGO_BIN_EXE_meshtest");

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, last)
}

fn json_lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn two_pods(tb: &mut Testbed) -> (mesh_e2e::Pod, mesh_e2e::Pod) {
    let client = tb
        .add_pod(PodSpec::new("client", "shop", "node-a", ip(11)))
        .unwrap();
    let server = tb
        .add_pod(PodSpec::new("server", "shop", "node-b", ip(12)))
        .unwrap();
    (client, server)
}

#[test]
fn two_pods_exchange_4mib_through_echo() {
    let mut tb = Testbed::new("two_pods_exchange").unwrap();
    let (client, server) = two_pods(&mut tb);
    let echo = server
        .spawn(MESHTEST, ["echo", "--listen", "0.0.0.0:9000"])
        .unwrap();
    echo.wait_for_stdout(Duration::from_secs(10), |l| l.contains("listening"))
        .unwrap();

    let bytes = 4 * 1024 * 1024;
    let out = client
        .run(
            MESHTEST,
            [
                "send",
                "--to",
                "198.51.100.12:9000",
                "--bytes",
                &bytes.to_string(),
            ],
        )
        .unwrap();
    let result = json_lines(&out.stdout)
        .pop()
        .expect("send printed a JSON line");
    assert!(
        out.status.success(),
        "send failed: {result} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(result["ok"], true);
    assert_eq!(result["sent"], bytes);
    assert_eq!(result["received"], bytes);
    assert_eq!(result["peer"], "198.51.100.12:9000");
    assert!(
        result["local"]
            .as_str()
            .unwrap()
            .starts_with("198.51.100.11:")
    );

    // Without an agent the server sees the client's own address.
    let accepted = echo
        .wait_for_stdout(Duration::from_secs(5), |l| l.contains("accepted"))
        .unwrap();
    let accepted: Value = serde_json::from_str(&accepted).unwrap();
    assert_eq!(accepted["accepted"], result["local"]);
}

#[test]
fn send_reports_failure_as_json_and_exit_code() {
    let mut tb = Testbed::new("send_failure").unwrap();
    let (client, _server) = two_pods(&mut tb);
    // Nothing listens on the server: connection refused.
    let out = client
        .run(
            MESHTEST,
            ["send", "--to", "198.51.100.12:9000", "--bytes", "10"],
        )
        .unwrap();
    assert!(!out.status.success());
    let v = json_lines(&out.stdout).pop().unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["reason"].as_str().unwrap().contains("connect"), "{v}");
}

#[test]
fn hold_keeps_one_connection_until_told_to_stop() {
    let mut tb = Testbed::new("hold").unwrap();
    let (client, server) = two_pods(&mut tb);
    let echo = server.start_echo(9000).unwrap();
    let control = tb.dir().join("stop-hold");
    let hold = client
        .spawn(
            MESHTEST,
            [
                "hold",
                "--to",
                "198.51.100.12:9000",
                "--interval-ms",
                "10",
                "--control",
                control.to_str().unwrap(),
            ],
        )
        .unwrap();
    hold.wait_for_stdout(Duration::from_secs(10), |l| l.contains("\"roundtrips\":20"))
        .unwrap();
    std::fs::write(&control, "").unwrap();
    let out = hold.wait_output(Duration::from_secs(10)).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let summary = json_lines(&out.stdout).pop().unwrap();
    assert_eq!(summary["ok"], true);
    assert!(summary["roundtrips"].as_u64().unwrap() >= 20);
    // One connection for the whole run.
    let accepted = echo
        .stdout_lines()
        .iter()
        .filter(|l| l.contains("accepted"))
        .count();
    assert_eq!(accepted, 1);

    // SIGTERM is a clean stop too.
    let mut hold = client
        .spawn(
            MESHTEST,
            [
                "hold",
                "--to",
                "198.51.100.12:9000",
                "--control",
                "/nonexistent/never",
            ],
        )
        .unwrap();
    hold.wait_for_stdout(Duration::from_secs(10), |l| l.contains("connected"))
        .unwrap();
    hold.terminate().unwrap();
    let out = hold.wait_output(Duration::from_secs(10)).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn hold_fails_fast_when_the_connection_breaks() {
    let mut tb = Testbed::new("hold_breaks").unwrap();
    let (client, server) = two_pods(&mut tb);
    let mut echo = server.start_echo(9000).unwrap();
    let hold = client
        .spawn(
            MESHTEST,
            [
                "hold",
                "--to",
                "198.51.100.12:9000",
                "--interval-ms",
                "10",
                "--control",
                "/nonexistent/never",
            ],
        )
        .unwrap();
    hold.wait_for_stdout(Duration::from_secs(10), |l| l.contains("\"roundtrips\":10"))
        .unwrap();
    echo.kill();
    let out = hold.wait_output(Duration::from_secs(15)).unwrap();
    assert!(!out.status.success());
    assert_eq!(json_lines(&out.stdout).pop().unwrap()["ok"], false);
}

/// `0::/mesh-e2e/...` from /proc/PID/cgroup, as an absolute path.
fn cgroup_of(pid: u32) -> PathBuf {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = s
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line");
    mesh_e2e::cgroup2_mount()
        .unwrap()
        .join(rel.trim_start_matches('/'))
}

fn netns_inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn pod_processes_run_in_the_pod_cgroup_and_netns() {
    let mut tb = Testbed::new("pod_cgroup").unwrap();
    let (client, _server) = two_pods(&mut tb);
    let mut p = client.spawn("sleep", ["30"]).unwrap();
    assert_eq!(cgroup_of(p.pid()), client.cgroup_path());
    let procs = std::fs::read_to_string(client.cgroup_path().join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == p.pid().to_string()));
    let ns = Path::new("/proc").join(p.pid().to_string()).join("ns/net");
    assert_eq!(netns_inode(&ns), netns_inode(&client.netns_path()));
    assert_ne!(
        netns_inode(&ns),
        netns_inode(Path::new("/proc/self/ns/net"))
    );
    p.kill();
    // The harness process itself never moves.
    assert_ne!(cgroup_of(std::process::id()), client.cgroup_path());
}

#[test]
fn pods_have_only_their_connected_route() {
    let host_links_before = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap()
        .stdout;
    let host_routes_before = Command::new("ip").args(["route"]).output().unwrap().stdout;
    {
        let mut tb = Testbed::new("no_default_route").unwrap();
        let (client, _server) = two_pods(&mut tb);
        let other = tb
            .add_pod(PodSpec::new(
                "other",
                "x",
                "node-a",
                Ipv4Addr::new(203, 0, 113, 5),
            ))
            .unwrap();

        let default = client
            .run("ip", ["-4", "route", "show", "default"])
            .unwrap();
        assert!(default.status.success());
        assert!(
            default.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&default.stdout)
        );
        let routes = client.run("ip", ["-4", "route"]).unwrap();
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        assert_eq!(routes.lines().count(), 1, "{routes}");
        assert!(routes.starts_with("198.51.100.0/24 dev eth0"), "{routes}");
        let routes = other.run("ip", ["-4", "route"]).unwrap();
        assert!(String::from_utf8_lossy(&routes.stdout).starts_with("203.0.113.0/24 dev eth0"));

        // Another /24 is unreachable: no route, so connect fails at once.
        let out = other
            .run(
                MESHTEST,
                ["send", "--to", "198.51.100.12:9000", "--bytes", "1"],
            )
            .unwrap();
        assert!(!out.status.success());
        let v = json_lines(&out.stdout).pop().unwrap();
        assert!(v["reason"].as_str().unwrap().contains("unreachable"), "{v}");
    }
    // (Other tests run in parallel, but none of them touch the host either.)
    let host_links_after = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap()
        .stdout;
    let host_routes_after = Command::new("ip").args(["route"]).output().unwrap().stdout;
    assert_eq!(host_links_before, host_links_after);
    assert_eq!(host_routes_before, host_routes_after);
}

struct Made {
    dir: PathBuf,
    netns: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
    pids: Vec<u32>,
}

fn build_and_fill(name: &str) -> (Testbed, Made) {
    let mut tb = Testbed::new(name).unwrap();
    let (client, server) = two_pods(&mut tb);
    let echo = server.start_echo(9000).unwrap();
    let sleeper = client.spawn("sleep", ["600"]).unwrap();
    let made = Made {
        dir: tb.dir().to_path_buf(),
        netns: vec![
            mesh_e2e_fabric(&tb),
            client.netns_path(),
            server.netns_path(),
        ],
        cgroups: vec![
            tb.cgroup_path().to_path_buf(),
            client.cgroup_path().into(),
            server.cgroup_path().into(),
        ],
        pids: vec![echo.pid(), sleeper.pid()],
    };
    // Leak the handles: the testbed alone must kill what runs in its pods.
    std::mem::forget(echo);
    std::mem::forget(sleeper);
    (tb, made)
}

fn mesh_e2e_fabric(tb: &Testbed) -> PathBuf {
    Path::new("/run/netns").join(tb.fabric_netns())
}

fn assert_gone(made: &Made) {
    for ns in &made.netns {
        assert!(!ns.exists(), "{} still exists", ns.display());
    }
    for cg in &made.cgroups {
        assert!(!cg.exists(), "{} still exists", cg.display());
    }
    for pid in &made.pids {
        // Leaked handles are never reaped, so a zombie is fine; alive is not.
        wait_until(Duration::from_secs(5), || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            Ok(stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z"))
        })
        .unwrap_or_else(|_| panic!("pid {pid} survived the testbed"));
    }
}

#[test]
fn drop_removes_netns_cgroups_and_processes() {
    let (tb, made) = build_and_fill("drop_cleans");
    let dir = tb.dir().to_path_buf();
    for ns in &made.netns {
        assert!(ns.exists());
    }
    let bpffs = tb.bpffs().display().to_string();
    let mounted = || std::fs::read_to_string("/proc/mounts").unwrap().lines().any(|l| l.split_whitespace().nth(1) == Some(&bpffs));
    assert!(mounted(), "the testbed mounts its own bpffs");
    drop(tb);
    assert_gone(&made);
    assert!(!dir.exists());
    assert!(!mounted(), "the testbed's bpffs is unmounted");
}

#[test]
fn panic_inside_catch_unwind_still_cleans_up() {
    let mut made = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let (_tb, m) = build_and_fill("panic_cleans");
        made = Some(m);
        panic!("test failure while the testbed is alive");
    }));
    assert!(result.is_err());
    let made = made.expect("testbed was built");
    assert_gone(&made);
    // Kept on purpose (logs of a failing test); nothing to see here.
    assert!(made.dir.exists());
    std::fs::remove_dir_all(&made.dir).unwrap();
}

#[test]
fn config_describes_pods_services_and_enrolment() {
    let mut tb = Testbed::new("config").unwrap();
    let (client, _server) = two_pods(&mut tb);
    tb.add_pod(PodSpec::new("old", "legacy", "node-a", ip(21)).service_account("legacy-sa"))
        .unwrap();
    tb.add_service(
        ServiceSpec::new("server", "shop")
            .port(80, 9000)
            .select("app", "server")
            .ip(ip(250)),
    )
    .unwrap();
    let path = tb.config_path();
    tb.write_config(&path, &["shop"]).unwrap();

    let v: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let nodes: Vec<&str> = v["nodes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node-a", "node-b"]);
    let ns = v["namespaces"].as_sequence().unwrap();
    assert_eq!(ns[0]["name"].as_str(), Some("legacy"));
    assert!(ns[0]["labels"].as_mapping().unwrap().is_empty());
    assert_eq!(
        ns[1]["labels"]["nodemesh.io/dataplane-mode"].as_str(),
        Some("enabled")
    );
    let pod = &v["pods"][0];
    assert_eq!(pod["name"].as_str(), Some("client"));
    assert_eq!(pod["ip"].as_str(), Some("198.51.100.11"));
    assert_eq!(pod["serviceAccount"].as_str(), Some("default"));
    assert_eq!(pod["labels"]["app"].as_str(), Some("client"));
    assert_eq!(
        Path::new(pod["netns"].as_str().unwrap()),
        client.netns_path()
    );
    assert_eq!(
        Path::new(pod["cgroup"].as_str().unwrap()),
        client.cgroup_path()
    );
    assert!(client.cgroup_path().is_absolute() && client.cgroup_path().exists());
    assert_eq!(v["pods"][2]["serviceAccount"].as_str(), Some("legacy-sa"));
    let svc = &v["services"][0];
    assert_eq!(svc["ip"].as_str(), Some("198.51.100.250"));
    assert_eq!(svc["ports"][0]["targetPort"].as_u64(), Some(9000));
    assert_eq!(svc["selector"]["app"].as_str(), Some("server"));

    // Re-enrolment rewrites the file in place (atomically).
    tb.set_enrolled(&path, &["shop", "legacy"]).unwrap();
    let cfg: mesh_e2e::LocalConfig =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        cfg.namespaces
            .iter()
            .all(|n| n.labels.contains_key(mesh_e2e::ENROLL_LABEL))
    );
    let mut leftovers: Vec<_> = std::fs::read_dir(tb.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    leftovers.sort();
    // The testbed's own bpf filesystem, where its agents pin their state.
    assert_eq!(leftovers, [std::ffi::OsString::from("bpffs"), std::ffi::OsString::from("mesh.yaml")]);
}

#[test]
fn addresses_outside_the_pod_ranges_are_refused() {
    let mut tb = Testbed::new("ranges").unwrap();
    let err = tb
        .add_pod(PodSpec::new(
            "bad",
            "x",
            "node-a",
            Ipv4Addr::new(10, 1, 2, 3),
        ))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("outside the pod ranges"),
        "{err:#}"
    );
    tb.add_pod(PodSpec::new("a", "x", "node-a", ip(11)))
        .unwrap();
    assert!(
        tb.add_pod(PodSpec::new("b", "x", "node-a", ip(11)))
            .is_err(),
        "duplicate IP"
    );
    assert!(
        tb.add_pod(PodSpec::new("a", "y", "node-a", ip(12)))
            .is_err(),
        "duplicate name"
    );
}

#[test]
fn agent_binary_missing_is_a_clear_error() {
    let tb = Testbed::new("agent_missing").unwrap();
    let err = tb
        .start_agent_with(
            Path::new("/nonexistent/mesh-agent"),
            &tb.config_path(),
            "node-a",
        )
        .err()
        .expect("no such binary");
    assert!(
        format!("{err:#}").contains("/nonexistent/mesh-agent"),
        "{err:#}"
    );
}
