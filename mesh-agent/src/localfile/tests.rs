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

const POLICIES: &str = r#"
authorizationPolicies:
  - name: web-get-only
    namespace: shop
    selector: {app: client}
    action: ALLOW
    rules:
      - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/ops/*"]}]
        to: [{methods: [GET], paths: ["/api/*"], ports: [8080]}]
        when: [{header: x-tenant, values: [acme]}]
  - name: deny-admin
    namespace: shop
    action: DENY
    rules:
      - to: [{paths: ["/admin", "/admin/*"]}]
"#;

#[test]
fn parses_authorization_policies() {
    let s = parse(Path::new("x"), &format!("{GOOD}{POLICIES}")).unwrap();
    let ps = &s.authorization_policies;
    assert_eq!(ps.len(), 2);
    assert_eq!(ps[0].action, crate::state::AuthzAction::Allow);
    assert_eq!(ps[0].rules[0].to.as_ref().unwrap()[0].ports, Some(vec![8080]));
    assert_eq!(ps[1].selector, None);
    assert!(ps[1].rules[0].from.is_none());
    assert!(parse(Path::new("x"), GOOD).unwrap().authorization_policies.is_empty());
}

#[test]
fn authorization_policy_errors_name_file_field_and_reason() {
    let with = |from: &str, to: &str| err(&format!("{GOOD}{}", POLICIES.replace(from, to)));
    #[rustfmt::skip]
    let table: &[(&str, &str, &str)] = &[
        ("methods: [GET]", "verbs: [GET]", "/etc/mesh.yaml: authorizationPolicies[0].rules[0].to[0]: unknown field `verbs`"),
        ("action: DENY", "action: REJECT", "/etc/mesh.yaml: authorizationPolicies[1].action: unknown variant `REJECT`"),
        ("name: deny-admin", "name: ''", "/etc/mesh.yaml: authorizationPolicies[1].name: \"\" is not a valid name"),
        ("namespace: shop\n    action: DENY", "namespace: nope\n    action: DENY", "/etc/mesh.yaml: authorizationPolicies[1].namespace: namespace \"nope\" is not declared"),
        ("name: deny-admin", "name: web-get-only", "/etc/mesh.yaml: authorizationPolicies[1].name: policy shop/web-get-only is declared twice"),
        ("sa/web\"", "sa/*/web\"", "/etc/mesh.yaml: authorizationPolicies[0].rules[0].from[0].principals[0]: \"spiffe://cluster.local/ns/shop/sa/*/web\": '*' is allowed only"),
        ("\"spiffe://cluster.local/ns/ops/*\"", "\"cluster.local/ns/ops/*\"", "/etc/mesh.yaml: authorizationPolicies[0].rules[0].from[0].principals[1]: \"cluster.local/ns/ops/*\": a principal prefix must start with \"spiffe://\""),
        ("methods: [GET]", "methods: [\"GET /\"]", "/etc/mesh.yaml: authorizationPolicies[0].rules[0].to[0].methods[0]: \"GET /\" is not an HTTP method"),
        ("\"/admin/*\"", "\"admin/*\"", "/etc/mesh.yaml: authorizationPolicies[1].rules[0].to[0].paths[1]: \"admin/*\": a path must start with '/'"),
        ("ports: [8080]", "ports: [80, 65536]", "/etc/mesh.yaml: authorizationPolicies[0].rules[0].to[0].ports[1]: 65536 is not a port (1-65535)"),
        ("selector: {app: client}", "selector: {}", "/etc/mesh.yaml: authorizationPolicies[0].selector: an empty selector is ambiguous"),
        ("values: [acme]", "values: []", "/etc/mesh.yaml: authorizationPolicies[0].rules[0].when[0].values: an empty list is ambiguous"),
    ];
    for (from, to, want) in table {
        assert!(POLICIES.contains(from), "{from}");
        let e = with(from, to);
        assert!(e.starts_with(want), "{from} -> {to}:\n  got  {e}\n  want {want}");
    }
}

/// An invalid policy edit is rejected as a whole: the watcher keeps
/// publishing the last good state (with its policies) and reports the error.
#[tokio::test]
async fn invalid_policy_edit_keeps_the_last_good_state() {
    let dir = std::env::temp_dir().join(format!("mesh-localfile-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, format!("{GOOD}{POLICIES}")).unwrap();
    let (rx, stats, fut) = start(path.clone(), Duration::from_millis(10)).await.unwrap();
    let task = tokio::spawn(fut);

    let bad = POLICIES.replace("paths: [\"/admin\", \"/admin/*\"]", "paths: [\"/admin\", \"/admin//*\"]");
    std::fs::write(&path, format!("{GOOD}{bad}")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while stats.rejected.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the edit was never looked at");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = stats.last_error.lock().unwrap().clone().unwrap_or_default();
    assert!(err.contains("authorizationPolicies[1].rules[0].to[0].paths[1]"), "{err}");
    let state = rx.borrow().clone();
    let paths = state.authorization_policies[1].rules[0].to.as_ref().unwrap()[0].paths.clone();
    assert_eq!(paths, Some(vec!["/admin".to_string(), "/admin/*".to_string()]), "the last good policy still applies");
    assert_eq!(stats.generation.load(std::sync::atomic::Ordering::Relaxed), 1);

    task.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}
