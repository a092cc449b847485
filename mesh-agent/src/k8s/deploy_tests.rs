//! `deploy/` checked against the code: the RBAC grants exactly the verbs the
//! agent and the CA use, and the manifests agree with each other and with
//! the binary's flags. (Schema validation is `cargo xtask manifests`.)

use std::collections::BTreeSet;

use serde::Deserialize as _;
use serde_yaml::Value;

use super::source::{status_permissions, watch_permissions};

type Perm = (String, String, String, Option<String>);

fn docs(file: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).filter(|v| !v.is_null()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// A role's rules expanded to one entry per (group, resource, verb, name).
fn granted(role: &Value) -> BTreeSet<Perm> {
    let strs = |v: &Value| -> Vec<String> { v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect() };
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let names = strs(&rule["resourceNames"]);
        let names: Vec<Option<String>> = if names.is_empty() { vec![None] } else { names.into_iter().map(Some).collect() };
        for g in strs(&rule["apiGroups"]) {
            for r in strs(&rule["resources"]) {
                for v in strs(&rule["verbs"]) {
                    assert!(g != "*" && r != "*" && v != "*", "wildcards in {:?}", role["metadata"]["name"]);
                    for n in &names {
                        out.insert((g.clone(), r.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

fn cluster(perms: Vec<(String, String, String)>) -> BTreeSet<Perm> {
    perms.into_iter().map(|(g, r, v)| (g, r, v, None)).collect()
}

fn perm(g: &str, r: &str, v: &str, n: Option<&str>) -> Perm {
    (g.into(), r.into(), v.into(), n.map(Into::into))
}

#[test]
fn rbac_grants_exactly_what_the_agent_and_the_ca_use() {
    let rbac = docs("rbac.yaml");
    // The agent: its watches and the status reports.
    let mut agent = cluster(watch_permissions(false));
    agent.extend(cluster(status_permissions()));
    assert_eq!(granted(find(&rbac, "ClusterRole", "nodemesh-agent")), agent, "ClusterRole nodemesh-agent");
    // The CA: where pods run (namespaces and pods only), TokenReview, and
    // its one ConfigMap.
    let mut ca = cluster(watch_permissions(true));
    ca.insert(perm("authentication.k8s.io", "tokenreviews", "create", None));
    assert_eq!(granted(find(&rbac, "ClusterRole", "nodemesh-ca")), ca, "ClusterRole nodemesh-ca");
    let roots = "nodemesh-ca-roots";
    let ca_ns: BTreeSet<Perm> = [perm("", "configmaps", "create", None), perm("", "configmaps", "patch", Some(roots))].into();
    let role = find(&rbac, "Role", "nodemesh-ca");
    assert_eq!(role["metadata"]["namespace"].as_str(), Some("nodemesh-system"));
    assert_eq!(granted(role), ca_ns, "Role nodemesh-ca");
    // Each role is bound to its own service account only.
    for (kind, binding, role, sa) in [
        ("ClusterRoleBinding", "nodemesh-agent", "nodemesh-agent", "nodemesh-agent"),
        ("ClusterRoleBinding", "nodemesh-ca", "nodemesh-ca", "nodemesh-ca"),
        ("RoleBinding", "nodemesh-ca", "nodemesh-ca", "nodemesh-ca"),
    ] {
        let b = find(&rbac, kind, binding);
        assert_eq!(b["roleRef"]["name"].as_str(), Some(role), "{kind} {binding}");
        let subjects = b["subjects"].as_sequence().unwrap();
        assert_eq!(subjects.len(), 1, "{kind} {binding}");
        assert_eq!(subjects[0]["name"].as_str(), Some(sa), "{kind} {binding}");
        assert_eq!(subjects[0]["namespace"].as_str(), Some("nodemesh-system"), "{kind} {binding}");
    }
}

fn flag<'a>(args: &'a [Value], name: &str) -> &'a str {
    args.iter()
        .filter_map(|a| a.as_str())
        .find_map(|a| a.strip_prefix(&format!("--{name}=")))
        .unwrap_or_else(|| panic!("--{name} missing from {args:?}"))
}

#[test]
fn the_agent_and_the_ca_manifests_agree() {
    let agent_docs = docs("agent.yaml");
    let ds = find(&agent_docs, "DaemonSet", "nodemesh-agent");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = c["args"].as_sequence().unwrap();
    assert_eq!(pod["serviceAccountName"].as_str(), Some("nodemesh-agent"));
    assert_eq!(pod["hostPID"].as_bool(), Some(true), "netns discovery reads /proc of the host");
    assert_eq!(c["securityContext"]["privileged"].as_bool(), Some(false), "capabilities, not privileged");
    // The grace period covers the drain, with margin for detaching and exit.
    let drain = crate::config::parse_duration(flag(args, "drain-timeout")).unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > drain.as_secs(), "terminationGracePeriodSeconds {grace} must exceed --drain-timeout {drain:?}");
    // Node name from the downward API.
    let env = c["env"].as_sequence().unwrap();
    let node = env.iter().find(|e| e["name"].as_str() == Some(crate::config::ENV_NODE_NAME)).expect("NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("spec.nodeName"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/ready"));
    let admin: std::net::SocketAddr = flag(args, "admin").parse().unwrap();
    assert_eq!(c["readinessProbe"]["httpGet"]["port"].as_u64(), Some(u64::from(admin.port())));

    // The token the agent presents is the one the CA reviews.
    let ca_docs = docs("ca.yaml");
    let ca = &find(&ca_docs, "Deployment", "nodemesh-ca")["spec"]["template"]["spec"];
    let ca_args = ca["containers"][0]["args"].as_sequence().unwrap();
    assert_eq!(ca["serviceAccountName"].as_str(), Some("nodemesh-ca"));
    assert_eq!(flag(ca_args, "agent-service-account"), "nodemesh-system/nodemesh-agent");
    let token = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some("ca-token"))
        .expect("the ca-token volume");
    let projected = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projected["audience"].as_str(), Some(flag(ca_args, "audience")));
    assert!(flag(args, "ca-token-file").ends_with(projected["path"].as_str().unwrap()));
    // The trust bundle the CA publishes is the one the agent mounts.
    let (_, cm) = flag(ca_args, "roots-configmap").split_once('/').unwrap();
    let roots = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"].as_str() == Some("ca-roots")).unwrap();
    assert_eq!(roots["configMap"]["name"].as_str(), Some(cm));
    assert!(flag(args, "ca-roots").ends_with(super::ROOTS_KEY));
    // The CA's serving certificate names the address the agents dial.
    let endpoint = flag(args, "ca-endpoint");
    let host = endpoint.trim_start_matches("https://").split(':').next().unwrap();
    assert!(
        ca_args.iter().filter_map(|a| a.as_str()).any(|a| a == format!("--dns-name={host}")),
        "the CA's certificate must name {host}"
    );
}

/// A surge upgrade on the host network: the new agent pod must fit beside
/// the old one on the node, so the DaemonSet declares no container ports
/// (with `hostNetwork` each would be a host port, and the scheduler would
/// never place the surge pod: the rolling update would stall on its first
/// node). Prometheus finds the metrics port from the `--metrics` flag's.
#[test]
fn the_agent_daemonset_can_surge_on_the_host_network() {
    let agent_docs = docs("agent.yaml");
    let ds = find(&agent_docs, "DaemonSet", "nodemesh-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"].as_u64(), Some(1), "the new agent starts beside the old one (handoff)");
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(0), "never a node without an agent");
    for c in pod["containers"].as_sequence().unwrap() {
        assert!(c["ports"].is_null(), "container {:?} declares ports: host ports on the host network block the surge", c["name"]);
    }
    let args = pod["containers"][0]["args"].as_sequence().unwrap();
    let metrics: std::net::SocketAddr = flag(args, "metrics").parse().unwrap();
    let scrape = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability/prometheus-scrape.yaml")).unwrap();
    assert!(scrape.contains(&format!("replacement: $1:{}", metrics.port())), "the scrape config does not use --metrics' port {}", metrics.port());
}
