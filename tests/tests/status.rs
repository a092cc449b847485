//! `mesh-agent status` as an operator reads it: one agent's table, and
//! `status --all-nodes`, every agent of the cluster through the Kubernetes
//! API: the DaemonSet's pods found by label, each one's `/status` read
//! through the API server's pod proxy (the test API server relays it to the
//! real agents), one aligned table, and the agent that does not answer
//! named with the reason.

mod common;

use anyhow::{Context, Result, ensure};
use k8s_openapi::{
    api::core::v1::{Container, Pod, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use mesh_e2e::{Agent, agent_bin, kubeapi::ApiServer};

use common::{MeshOpts, mesh_with};

/// An agent DaemonSet pod as the API server would hold it: its node, its
/// `--metrics` flag and, on the host network, the node's address
/// (loopback: the agents of this test run on this machine).
fn agent_pod(name: &str, node: &str, metrics: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("nodemesh-system".into()),
            labels: Some([("app.kubernetes.io/name".to_string(), "nodemesh-agent".to_string())].into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            host_network: Some(true),
            containers: vec![Container {
                name: "agent".into(),
                args: Some(vec!["run".into(), "--source=kube".into(), format!("--metrics={metrics}")]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus { phase: Some("Running".into()), pod_ip: Some("127.0.0.1".into()), ..Default::default() }),
    }
}

/// Fails unless every line has a cell starting at each of `columns`'
/// offsets in the header (the cell before ends at least two spaces earlier).
fn aligned(table: &str, columns: &[&str]) -> Result<()> {
    let mut lines = table.lines();
    let header = lines.next().context("an empty table")?;
    // A column's name where it stands alone (ERROR, not the one in CERT ERRORS).
    let alone = |c: &str| {
        header.match_indices(c).map(|(i, _)| i).find(|&i| {
            (i == 0 || header[..i].ends_with("  ")) && (i + c.len() == header.len() || header[i + c.len()..].starts_with("  "))
        })
    };
    let at: Vec<usize> = columns.iter().map(|c| alone(c).with_context(|| format!("no column {c} in {header:?}"))).collect::<Result<_>>()?;
    for line in lines {
        let b = line.as_bytes();
        for (c, &i) in columns.iter().zip(&at) {
            let starts = i < b.len() && b[i] != b' ' && (i == 0 || b[i - 2..i] == *b"  ");
            ensure!(starts, "column {c} (offset {i}) does not start a cell in {line:?}:\n{table}");
        }
    }
    Ok(())
}

#[test]
fn status_all_nodes_lists_every_agent_through_the_api() -> Result<()> {
    // Each agent's metrics port, which serves /status beyond loopback; a
    // third port nobody listens on, for an agent that does not answer.
    let free = || -> Result<String> { Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string()) };
    let (pa, pb, pc) = (free()?, free()?, free()?);
    let (fa, fb) = (["--metrics", pa.as_str()], ["--metrics", pb.as_str()]);
    let node_args: [(&str, &[&str]); 2] = [("node-a", &fa), ("node-b", &fb)];
    let m = mesh_with("allnodes", &MeshOpts { enrolled: &["shop"], node_args: &node_args, ..MeshOpts::default() })?;

    // One agent's own table: its columns line up whatever the names' widths.
    let out = Agent::run_once(&agent_bin()?, ["status", "--admin", &m.a.admin().to_string()])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let table = &text[text.find("POD ").context("no table")?..];
    aligned(table, &["POD", "IP", "ENROLLED", "ATTACHED", "CAPTURE", "LISTENERS"])?;
    ensure!(table.contains("shop/shop-client") && table.contains("legacy/legacy-client"), "{text}");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let api = rt.block_on(ApiServer::start())?;
    api.apply(&agent_pod("nodemesh-agent-aaaaa", "node-a", &pa))?;
    api.apply(&agent_pod("nodemesh-agent-bbbbb", "node-b", &pb))?;
    api.apply(&agent_pod("nodemesh-agent-ccccc", "node-c", &pc))?;
    let kubeconfig = m.tb.dir().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    let kubeconfig = kubeconfig.to_str().context("utf-8 path")?.to_owned();
    let all_nodes = |extra: &[&str]| -> Result<(bool, String, String)> {
        let mut args = vec!["status", "--all-nodes", "--kubeconfig", &kubeconfig];
        args.extend(extra);
        let out = Agent::run_once(&agent_bin()?, &args)?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };

    let (ok, table, err) = all_nodes(&[])?;
    ensure!(!ok, "exit 0 although node-c's agent did not answer:\n{table}");
    ensure!(err.contains("1 of 3 agents did not answer"), "{err}");
    aligned(&table, &["NODE", "AGENT", "READY", "POD", "IP", "ENROLLED", "ATTACHED", "CAPTURE", "CERT EXPIRES", "ERROR"])?;
    let row = |node: &str, pod: &str| -> Result<Vec<String>> {
        let line = table
            .lines()
            .find(|l| l.starts_with(node) && l.contains(pod))
            .with_context(|| format!("no row for {pod} on {node}:\n{table}"))?;
        Ok(line.split_whitespace().map(str::to_owned).collect())
    };
    for (node, pod, ip, agent) in [
        ("node-a", "shop/shop-client", m.shop_client.ip(), "nodemesh-agent-aaaaa"),
        ("node-b", "shop/shop-server", m.shop_server.ip(), "nodemesh-agent-bbbbb"),
    ] {
        let r = row(node, pod)?;
        // NODE AGENT READY POD IP ENROLLED ATTACHED CAPTURE CERT-EXPIRES CERT-ERRORS ERROR
        ensure!(r[1] == agent && r[2] == "true" && r[4] == ip.to_string(), "{r:?}");
        ensure!(r[5] == "true" && r[6] == "true" && r[7] == "true", "not enrolled, attached and captured: {r:?}");
        // RFC 3339, this year or the next (a 24 h certificate).
        let year: i32 = r[8].get(..4).and_then(|y| y.parse().ok()).with_context(|| format!("certificate expiry {:?}", r[8]))?;
        let now = time::OffsetDateTime::now_utc().year();
        ensure!((now..=now + 1).contains(&year) && r[8].contains('T') && r[8].ends_with('Z'), "certificate expiry {:?}", r[8]);
        ensure!(r[9] == "0" && r[10] == "-", "{r:?}");
    }
    for (node, pod) in [("node-a", "legacy/legacy-client"), ("node-b", "legacy/legacy-server")] {
        let r = row(node, pod)?;
        ensure!(r[5] == "false" && r[8] == "-", "a pod outside the mesh shown enrolled or with a certificate: {r:?}");
    }
    let silent = row("node-c", "nodemesh-agent-ccccc")?.join(" ");
    ensure!(
        silent.contains(&format!("no answer: HTTP 503: error trying to reach service: dial tcp {pc}: connect: connection refused")),
        "{silent}"
    );

    // The same as JSON: one entry per agent, the status as the agent wrote it.
    let (_, json, _) = all_nodes(&["--json"])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("--json")?;
    let nodes: Vec<&str> = v.as_array().into_iter().flatten().filter_map(|a| a["node"].as_str()).collect();
    ensure!(nodes.len() == 3 && ["node-a", "node-b", "node-c"].iter().all(|n| nodes.contains(n)), "{json}");
    let a = v.as_array().into_iter().flatten().find(|a| a["node"] == "node-a").context("node-a")?;
    ensure!(a["status"]["node"] == "node-a", "{a}");

    // Without `get` on pods/proxy, every row says so.
    api.deny("get", "pods/proxy");
    let (ok, table, _) = all_nodes(&[])?;
    ensure!(!ok && table.lines().skip(1).count() == 3, "{table}");
    ensure!(table.lines().skip(1).all(|l| l.contains("forbidden: the kubeconfig's user may not get pods/proxy")), "{table}");
    Ok(())
}
