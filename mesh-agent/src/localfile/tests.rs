use super::*;

const GOOD: &str = r#"
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  - name: shop
    labels: {nodemesh.io/dataplane-mode: enabled}
  - name: legacy
pods:
  - name: client
    namespace: shop
    node: node-a
    ip: 198.51.100.11
    labels: {app: client}
    netns: /run/netns/client
    cgroup: /sys/fs/cgroup/unified/client
  - name: server
    namespace: legacy
    node: node-b
    serviceAccount: web
    ip: 198.51.100.12
    netns: /run/netns/server
    cgroup: /sys/fs/cgroup/unified/server
services:
  - name: server
    namespace: legacy
    ip: 198.51.100.250
    selector: {app: server}
    ports: [{name: tcp, port: 80, targetPort: 8080}]
"#;

fn err(text: &str) -> String {
    parse(Path::new("/etc/mesh.yaml"), text).unwrap_err().to_string()
}

#[test]
fn parses_the_example() {
    let s = parse(Path::new("x"), GOOD).unwrap();
    assert_eq!(s.pods.len(), 2);
    assert_eq!(s.trust_domain, "cluster.local");
    let server = s.pod_by_ip("198.51.100.12".parse().unwrap()).unwrap();
    assert_eq!(server.service_account, "web");
    assert_eq!(s.services[0].ports[0].target_port, 8080);
}

#[test]
fn errors_name_file_field_and_reason() {
    let e = err(&GOOD.replace("ip: 198.51.100.11", "ipp: 198.51.100.11"));
    assert!(e.starts_with("/etc/mesh.yaml: pods[0]: unknown field `ipp`"), "{e}");

    let e = err(&GOOD.replace("ip: 198.51.100.11", "ip: 198.51.100.300"));
    assert!(e.contains("/etc/mesh.yaml: pods[0].ip") && e.contains("invalid IP address"), "{e}");

    let e = err(&GOOD.replace("ip: 198.51.100.12", "ip: 198.51.100.11"));
    assert_eq!(e, "/etc/mesh.yaml: pods[1].ip: 198.51.100.11 is already the address of pod shop/client");

    let e = err(&GOOD.replace("node: node-b", "node: node-c"));
    assert_eq!(e, "/etc/mesh.yaml: pods[1].node: node \"node-c\" is not declared under `nodes`");

    let e = err(&GOOD.replace("namespace: legacy\n    node", "namespace: nope\n    node"));
    assert!(e.contains("pods[1].namespace: namespace \"nope\" is not declared"), "{e}");

    let e = err(&GOOD.replace("netns: /run/netns/client", "netns: run/netns/client"));
    assert_eq!(e, "/etc/mesh.yaml: pods[0].netns: run/netns/client is not an absolute path");

    let e = err(&GOOD.replace("dataplane-mode: enabled", "dataplane-mode: yes"));
    assert!(e.contains("namespaces[0].labels.nodemesh.io/dataplane-mode: \"yes\" is not one of"), "{e}");

    let e = err(&GOOD.replace("name: client", "name: Client_1"));
    assert!(e.contains("pods[0].name: \"Client_1\" is not a valid name"), "{e}");

    let e = err(&GOOD.replace("port: 80,", "port: 0,"));
    assert!(e.contains("services[0].ports[0]: port 0"), "{e}");

    let e = err(&format!("{GOOD}peerAuthentications: [{{name: s, namespace: shop, mode: STRICTER}}]\n"));
    assert!(e.contains("peerAuthentications[0]") && e.contains("unknown variant `STRICTER`"), "{e}");
    let e = err(&format!("{GOOD}peerAuthentications: [{{name: s, namespace: nope, mode: STRICT}}]\n"));
    assert!(e.contains("peerAuthentications[0].namespace"), "{e}");
    let ok = parse(Path::new("x"), &format!("{GOOD}peerAuthentications: [{{name: s, namespace: shop, mode: STRICT}}]\n")).unwrap();
    assert_eq!(ok.peer_authentications[0].mode, crate::state::PeerAuthMode::Strict);

    let e = err("pods: [");
    assert!(e.starts_with("/etc/mesh.yaml: "), "{e}");
}
