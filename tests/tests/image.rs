//! The agent's real image (`cargo xtask image`), run with podman the way
//! `deploy/agent.yaml`'s DaemonSet runs it: host PID and network, its
//! capabilities, seccomp profile, read-only root, user, memory limit, env,
//! volume mounts and args, all read from the manifest. It serves its admin
//! API, the manifest's probes pass, and it enrolls a pod of the testbed
//! from the (test) Kubernetes API: the pod's connections go through it.
//!
//! What differs from a cluster, and why: the API server is the harness's
//! (`kubeapi`, on loopback) and is given with `--kubeconfig` (mounted) in
//! place of the in-cluster service account; the CA is the testbed's (file
//! mode, on loopback) instead of the `nodemesh-ca` Service; the `bpffs`
//! and `run` volumes are the testbed's own bpf filesystem and run
//! directory instead of the host's `/sys/fs/bpf` and `/run/nodemesh` (a
//! test never touches the host's pins); the ConfigMap and the projected
//! token are directories holding the CA's root and the node's token; the
//! admin and metrics listeners are on loopback port 0 (tests bind no fixed
//! port), and the probes go to the address the agent reports.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, PodIP, PodSpec as KPodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use mesh_e2e::image::{DaemonSet, Podman, image_archive};
use mesh_e2e::{Agent, PodSpec, Testbed, http_get, kubeapi::ApiServer, wait_until};

use common::{ECHO_PORT, SETTLE, counter, pod_json, send};

const CLIENT_UID: &str = "7e2b9c41-3d5a-4f80-b1c6-2a9d8e4f6b01";
const SERVER_UID: &str = "7e2b9c41-3d5a-4f80-b1c6-2a9d8e4f6b02";
const NODE: &str = "node-a";
/// Where the kubeconfig is mounted in the container.
const KUBECONFIG_DIR: &str = "/etc/nodemesh/kubeconfig";

fn k8s_pod(name: &str, uid: &str, ip: Ipv4Addr) -> Pod {
    Pod {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some("shop".into()), uid: Some(uid.into()), ..Default::default() },
        spec: Some(KPodSpec { node_name: Some(NODE.into()), service_account_name: Some("default".into()), ..Default::default() }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.to_string()),
            pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
            ..Default::default()
        }),
    }
}

fn enrolled_namespace() -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some("shop".into()),
            labels: Some([("nodemesh.io/dataplane-mode".to_string(), "enabled".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Replaces the value of `--flag=VALUE` in `args`; fails if it is not there.
fn set_flag(args: &mut [String], flag: &str, value: &str) -> Result<String> {
    let prefix = format!("{flag}=");
    let arg = args
        .iter_mut()
        .find(|a| a.starts_with(&prefix))
        .with_context(|| format!("deploy/agent.yaml no longer passes {flag}: update this test"))?;
    let old = arg[prefix.len()..].to_owned();
    *arg = format!("{prefix}{value}");
    Ok(old)
}

#[test]
fn the_image_runs_as_the_daemonset_and_enrolls_a_pod() -> Result<()> {
    // Both fail loudly: no image or no podman is a failed test, not a skip.
    let archive = image_archive()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let api = rt.block_on(ApiServer::start())?;

    let mut tb = Testbed::new("image")?;
    let (client_name, server_name) = (format!("pod{CLIENT_UID}"), format!("pod{SERVER_UID}"));
    let (client_ip, server_ip) = (Ipv4Addr::new(198, 51, 100, 61), Ipv4Addr::new(198, 51, 100, 62));
    let client = tb.add_pod(PodSpec::new(client_name.clone(), "shop", NODE, client_ip))?;
    let server = tb.add_pod(PodSpec::new(server_name.clone(), "shop", NODE, server_ip))?;
    tb.write_config(&tb.config_path(), &["shop"])?;
    let ca = tb.start_ca()?;
    let _echo = server.start_echo(ECHO_PORT)?;
    // A process that stays in the client pod, as its containers would: the
    // agent finds the pod's netns through it (hostPID).
    let _client_process = client.spawn("sleep", ["3600"])?;
    api.apply(&enrolled_namespace())?;
    api.apply(&k8s_pod(&client_name, CLIENT_UID, client_ip))?;
    api.apply(&k8s_pod(&server_name, SERVER_UID, server_ip))?;

    // What the DaemonSet's volumes hold on a node, from the testbed.
    let volumes = tb.dir().join("volumes");
    let (roots, token, kubeconfig) = (volumes.join("ca-roots"), volumes.join("ca-token"), volumes.join("kubeconfig"));
    for d in [&roots, &token, &kubeconfig] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::copy(ca.roots_path(), roots.join("roots.pem")).context("the CA's root")?;
    std::fs::write(token.join("token"), ca.token(NODE)?)?;
    // As in a cluster, the client is given the API server's CA (in-cluster:
    // the service account's ca.crt; here any certificate, the server is
    // plain HTTP): the image has no system roots for kube-rs to fall back on.
    std::fs::copy(ca.roots_path(), kubeconfig.join("ca.crt"))?;
    std::fs::write(kubeconfig.join("config"), api.kubeconfig_with_ca(Some(&format!("{KUBECONFIG_DIR}/ca.crt"))))?;
    std::fs::create_dir_all(tb.run_dir())?;

    let ds = DaemonSet::from_repo()?;
    let flags = ds.podman_flags(NODE, |name, volume| {
        Ok(match name {
            // The host's cgroup tree, as on a node: the pods' cgroups are in it.
            "cgroup" => PathBuf::from(volume["hostPath"]["path"].as_str().context("cgroup: a hostPath")?),
            "bpffs" => tb.bpffs(),
            "run" => tb.run_dir(),
            "ca-roots" => roots.clone(),
            "ca-token" => token.clone(),
            other => bail!("deploy/agent.yaml mounts volume {other}: teach this test what a node holds there"),
        })
    })?;
    let mut args = ds.args()?;
    let admin_in_manifest = set_flag(&mut args, "--admin", "127.0.0.1:0")?;
    set_flag(&mut args, "--metrics", "127.0.0.1:0")?;
    set_flag(&mut args, "--ca-endpoint", &ca.endpoint())?;
    args.push(format!("--kubeconfig={KUBECONFIG_DIR}/config"));

    let mut podman = Podman::new(&tb.dir().join("podman"))?;
    let image = podman.load(&archive)?;
    ensure!(
        image == format!("localhost/nodemesh/mesh-agent:{}", env!("CARGO_PKG_VERSION")),
        "the archive holds {image}, not the workspace version's tag"
    );
    let container = tb.name().to_owned();
    podman.track_container(&container);
    let mut run = podman.command();
    run.args(["run", "--rm", "--name", &container]);
    // podman (as root) asks the runtime for RLIMIT_NOFILE and NPROC of
    // 1048576, which root may not set where it lacks CAP_SYS_RESOURCE (as
    // here): give the container this process's open-files limit, and a
    // process limit podman itself stays under (it lowers its own to 32768).
    let mut nofile = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) } == 0, "getrlimit: {}", std::io::Error::last_os_error());
    let nofile = nofile.rlim_max;
    run.arg(format!("--ulimit=nofile={nofile}:{nofile}")).arg("--ulimit=nproc=32768:32768");
    run.args(&flags)
        .arg(format!("--volume={}:{KUBECONFIG_DIR}:ro", kubeconfig.display()))
        .arg("--env=RUST_LOG=info,mesh_agent=debug")
        .arg(&image)
        .args(&args);
    let agent = Agent::start_command(run, NODE, tb.dir(), None, "ready").context("the agent in its image")?;
    tb.adopt_agent(&agent);

    // The kubelet's probes, as the manifest declares them, on the port
    // that stands for the manifest's --admin.
    let admin_port: u16 = admin_in_manifest.rsplit(':').next().and_then(|p| p.parse().ok()).context("--admin's port")?;
    let probes = ds.probes()?;
    ensure!(probes.iter().any(|p| p.path == "/healthz") && probes.iter().any(|p| p.path == "/ready"), "{probes:?}");
    for p in &probes {
        ensure!(p.host == "127.0.0.1" && p.port == admin_port, "the {} probe does not go to --admin {admin_in_manifest}: {p:?}", p.kind);
        let (code, body) = http_get(agent.admin(), &p.path)?;
        ensure!(code == 200, "{} probe GET {}: {code} {}", p.kind, p.path, String::from_utf8_lossy(&body));
    }

    // Listed in /status, enrolled, and its traffic through the agent.
    let to = format!("{server_ip}:{ECHO_PORT}");
    wait_until(SETTLE, || Ok(pod_json(&agent, "shop", &client_name).is_ok_and(|p| p["enrolled"] == true && p["attached"] == true)))
        .with_context(|| format!("the agent in the image did not enroll the client pod: {}", agent.log()))?;
    send(&client, &to, 64 << 10)?;
    let p = pod_json(&agent, "shop", &client_name)?;
    ensure!(p["ebpf"]["redirected"].as_u64() >= Some(1), "not redirected to the agent: {p}");
    ensure!(p["proxy"]["outboundTunneled"].as_u64() >= Some(1), "not tunneled: {p}");
    ensure!(counter(&agent, "shop", &server_name, "proxy.inbound")? >= 1, "the server's side did not deliver it");

    // SIGTERM reaches the agent (podman forwards it): it drains and exits 0.
    let status = agent.stop()?;
    ensure!(status.success(), "the container exited with {status}: {}", agent.log());
    ensure!(agent.log().contains("drained"), "no drain in the log: {}", agent.log());
    ensure!(podman.container_names()?.is_empty(), "a container is left: {:?}", podman.container_names()?);
    podman.cleanup()?;
    Ok(())
}
