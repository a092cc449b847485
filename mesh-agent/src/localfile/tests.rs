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

/// The namespace label's values are checked for the configured enrollment
/// label, and only for it.
#[test]
fn the_label_check_follows_the_enrollment_label() {
    let path = Path::new("/etc/mesh.yaml");
    let e = err(&GOOD.replace("dataplane-mode: enabled", "dataplane-mode: yes"));
    assert!(e.ends_with("namespaces[0].labels.nodemesh.io/dataplane-mode: \"yes\" is not one of \"enabled\", \"disabled\""), "{e}");

    let custom = state::Enrollment::parse("mesh.example.com/member=yes").unwrap();
    let custom = state::Scope { enrollment: custom, ..Default::default() };
    let s = parse_with(path, GOOD, &custom).unwrap();
    assert_eq!(s.enrollment_label, custom.enrollment);
    assert!(s.pods.values().all(|p| !s.is_enrolled(p)), "the default label no longer enrolls");
    let ours = GOOD.replace("nodemesh.io/dataplane-mode: enabled", "mesh.example.com/member: yes");
    let s = parse_with(path, &ours, &custom).unwrap();
    let enrolled: Vec<_> = s.pods.values().filter(|p| s.is_enrolled(p)).map(|p| p.key.name.as_str()).collect();
    assert_eq!(enrolled, ["client"]);
    assert!(parse(path, &ours).unwrap().pods.values().all(|p| !parse(path, &ours).unwrap().is_enrolled(p)));
    let e = parse_with(path, &ours.replace("member: yes", "member: enabled"), &custom).unwrap_err().to_string();
    assert!(e.ends_with("namespaces[0].labels.mesh.example.com/member: \"enabled\" is not one of \"yes\", \"disabled\""), "{e}");
    // The default key is just a label now: any value.
    parse_with(path, &GOOD.replace("dataplane-mode: enabled", "dataplane-mode: yes"), &custom).unwrap();
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
    let (rx, stats, fut) = start(path.clone(), Duration::from_millis(10), Default::default()).await.unwrap();
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

const ROUTES: &str = r#"
httpRoutes:
  - name: server-canary
    namespace: legacy
    service: server
    rules:
      - matches: [{headers: [{name: x-canary, exact: "1"}], cookies: [{name: group, exact: beta}]}]
        backends: [{subset: {version: v2}}]
      - matches: [{path: {prefix: /api}, method: GET}]
        backends:
          - {subset: {version: v1}, weight: 90}
          - {subset: {version: v2}, weight: 10}
        timeout: 2s
        retries: {attempts: 3, perTryTimeout: 500ms, retryOn: [connect-failure, 503], budgetPercent: 10}
    circuitBreaker: {maxConnections: 10}
    outlierDetection: {consecutive5xx: 3, baseEjectionTime: 10s}
"#;

fn with_http_port() -> String {
    GOOD.replace("ports: [{name: tcp, port: 80, targetPort: 8080}]", "ports: [{name: tcp, port: 80, targetPort: 8080}, {name: http, port: 81}]")
}

#[test]
fn parses_http_routes() {
    let s = parse(Path::new("x"), &format!("{}{ROUTES}", with_http_port())).unwrap();
    let r = &s.routes[0];
    assert_eq!((r.namespace.as_str(), r.service.as_str()), ("legacy", "server"));
    assert_eq!(r.rules[1].backends[1].weight, Some(10));
    assert_eq!(r.rules[1].timeout.unwrap().0, Duration::from_secs(2));
    assert_eq!(r.rules[1].retries.budget_percent, 10);
    assert_eq!(r.rules[0].retries, crate::route::RetryPolicy::default());
    assert_eq!(r.circuit_breaker.max_connections, 10);
    assert_eq!(r.circuit_breaker.max_requests, 1024);
    assert_eq!(r.outlier_detection.consecutive_5xx, 3);
    assert_eq!(r.outlier_detection.consecutive_connect_failures, 5);
    assert!(parse(Path::new("x"), GOOD).unwrap().routes.is_empty());
}

#[test]
fn http_route_errors_name_file_field_and_reason() {
    let base = with_http_port();
    let with = |from: &str, to: &str| err(&format!("{base}{}", ROUTES.replace(from, to)));
    let r = "/etc/mesh.yaml: httpRoutes[0]";
    #[rustfmt::skip]
    let table: &[(&str, &str, &str)] = &[
        ("weight: 10}", "weight: 0}", "rules[1].backends: weights add up to 90, not 100"),
        ("weight: 10}", "weight: 20}", "rules[1].backends: weights add up to 110, not 100"),
        ("{subset: {version: v2}, weight: 10}", "{subset: {version: v2}}", "rules[1].backends[1].weight: every backend needs a weight when there are several"),
        ("[{subset: {version: v2}}]", "[{subset: {version: v2}, weight: 50}]", "rules[0].backends: weights add up to 50, not 100"),
        ("[{subset: {version: v2}}]", "[{subset: {}}]", "rules[0].backends[0].subset: an empty subset is ambiguous"),
        ("[{subset: {version: v2}}]", "[]", "rules[0].backends: a rule needs at least one backend"),
        ("service: server", "service: nope", "service: service legacy/nope is not declared under `services`"),
        ("namespace: legacy\n    service", "namespace: shop\n    service", "service: service shop/server is not declared"),
        ("namespace: legacy\n    service", "namespace: nope\n    service", "namespace: namespace \"nope\" is not declared"),
        ("name: server-canary", "name: Server", "name: \"Server\" is not a valid name"),
        ("timeout: 2s", "timeout: 2 seconds", "rules[1].timeout: \"2 seconds\" is not a duration"),
        ("timeout: 2s", "timeout: 0s", "rules[1].timeout: must be longer than zero"),
        ("perTryTimeout: 500ms", "perTryTimeout: 5x", "rules[1].retries.perTryTimeout: \"5x\" is not a duration"),
        ("baseEjectionTime: 10s", "baseEjectionTime: 10", "outlierDetection.baseEjectionTime: \"10\" is not a duration"),
        ("retryOn: [connect-failure, 503]", "retryOn: [connect-failure, 600]", "rules[1].retries.retryOn[1]: 600 is not an HTTP status code (100-599)"),
        ("retryOn: [connect-failure, 503]", "retryOn: [connect-failure, 99]", "rules[1].retries.retryOn[1]: 99 is not an HTTP status code"),
        ("retryOn: [connect-failure, 503]", "retryOn: [timeout]", "rules[1].retries.retryOn[0]: \"timeout\" is not a retry condition"),
        ("retryOn: [connect-failure, 503]", "retryOn: []", "rules[1].retries.retryOn: an empty list is ambiguous"),
        ("budgetPercent: 10", "budgetPercent: 101", "rules[1].retries.budgetPercent: 101 is not a percentage"),
        ("attempts: 3", "attempts: 11", "rules[1].retries.attempts: 11 retries is too many"),
        ("attempts: 3", "tries: 3", "rules[1].retries: unknown field `tries`"),
        ("timeout: 2s", "deadline: 2s", "rules[1]: unknown field `deadline`"),
        ("service: server", "service: server\n    hosts: [a]", ": unknown field `hosts`"),
        ("{maxConnections: 10}", "{maxConnections: 0}", "circuitBreaker.maxConnections: must be at least 1"),
        ("{maxConnections: 10}", "{maxConnection: 10}", "circuitBreaker: unknown field `maxConnection`"),
        ("{consecutive5xx: 3,", "{maxEjectionPercent: 101,", "outlierDetection.maxEjectionPercent: 101 is not a percentage"),
        ("[{path: {prefix: /api}, method: GET}]", "[]", "rules[1].matches: an empty list is ambiguous"),
        ("{prefix: /api}", "{regex: /api}", "rules[1].matches[0].path: unknown field `regex`"),
        ("{prefix: /api}", "{prefix: api}", "rules[1].matches[0].path.prefix: \"api\": a path must start with '/'"),
        ("{prefix: /api}", "{prefix: /a//b}", "rules[1].matches[0].path.prefix: \"/a//b\" is not in normalized form"),
        ("{prefix: /api}", "{prefix: /api, exact: /api}", "rules[1].matches[0].path: set exactly one of `exact`, `prefix`"),
        ("method: GET", "method: \"GE T\"", "rules[1].matches[0].method: \"GE T\" is not an HTTP method"),
        ("{name: x-canary, exact: \"1\"}", "{name: x-canary}", "rules[0].matches[0].headers[0]: set exactly one of `exact`, `prefix`, `present`"),
        ("{name: x-canary, exact: \"1\"}", "{name: x-canary, exact: \"1\", present: true}", "rules[0].matches[0].headers[0]: set exactly one"),
        ("{name: x-canary, exact: \"1\"}", "{name: \"x canary\", exact: \"1\"}", "rules[0].matches[0].headers[0].name: \"x canary\" is not a header name"),
        ("headers: [{name: x-canary, exact: \"1\"}]", "headers: []", "rules[0].matches[0].headers: an empty list is ambiguous"),
        ("cookies: [{name: group, exact: beta}]", "cookies: []", "rules[0].matches[0].cookies: an empty list is ambiguous"),
        ("{name: group, exact: beta}", "{name: group, exact: \"a;b\"}", "rules[0].matches[0].cookies[0].exact: \"a;b\" cannot be a cookie value"),
        ("{name: group, exact: beta}", "{name: \"gr oup\", exact: beta}", "rules[0].matches[0].cookies[0].name: \"gr oup\" is not a cookie name"),
        ("{name: group, exact: beta}", "{name: group, value: beta}", "rules[0].matches[0].cookies[0]: unknown field `value`"),
        ("    rules:\n      - matches: [{headers", "    rules: []\n    circuitBreaker: {}\n    xRules:\n      - matches: [{headers", "unknown field `xRules`"),
    ];
    for (from, to, want) in table {
        assert!(ROUTES.contains(from), "{from}");
        let e = with(from, to);
        let want = if want.starts_with("unknown") { want.to_string() } else { format!("{r}.{want}") };
        let want = want.replace("[0].:", "[0]:");
        assert!(e.contains(&want), "{from} -> {to}:\n  got  {e}\n  want {want}");
    }

    let e = err(&format!("{GOOD}{ROUTES}"));
    assert!(e.starts_with(&format!("{r}.service: service legacy/server has no HTTP port")), "{e}");
    let e = err(&format!("{base}{ROUTES}{}", ROUTES.replace("httpRoutes:\n", "")));
    assert!(e.starts_with("/etc/mesh.yaml: httpRoutes[1].name: route legacy/server-canary is declared twice"), "{e}");
    let e = err(&format!("{base}{ROUTES}{}", ROUTES.replace("httpRoutes:\n", "").replace("name: server-canary", "name: other")));
    assert!(e.starts_with("/etc/mesh.yaml: httpRoutes[1].service: service legacy/server is already routed by route server-canary"), "{e}");
    let no_rules = format!("{base}httpRoutes: [{{name: r, namespace: legacy, service: server, rules: []}}]\n");
    assert_eq!(err(&no_rules), format!("{r}.rules: a route needs at least one rule"));
}

/// An invalid route edit is rejected as a whole: the last good state (with
/// its routes) keeps serving and the error is reported.
#[tokio::test]
async fn invalid_route_edit_keeps_the_last_good_state() {
    let dir = std::env::temp_dir().join(format!("mesh-localfile-route-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mesh.yaml");
    let base = with_http_port();
    std::fs::write(&path, format!("{base}{ROUTES}")).unwrap();
    let (rx, stats, fut) = start(path.clone(), Duration::from_millis(10), Default::default()).await.unwrap();
    let task = tokio::spawn(fut);

    std::fs::write(&path, format!("{base}{}", ROUTES.replace("weight: 10}", "weight: 5}"))).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while stats.rejected.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the edit was never looked at");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = stats.last_error.lock().unwrap().clone().unwrap_or_default();
    assert!(err.contains("httpRoutes[0].rules[1].backends: weights add up to 95, not 100"), "{err}");
    let state = rx.borrow().clone();
    assert_eq!(state.routes[0].rules[1].backends[1].weight, Some(10), "the last good route still applies");
    assert_eq!(stats.generation.load(std::sync::atomic::Ordering::Relaxed), 1);

    task.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Istio's objects in the same YAML stream as the mesh document, as
/// `kubectl apply -f` takes them.
const ISTIO_OBJECTS: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-get
  namespace: legacy
  labels: {team: web}
spec:
  selector:
    matchLabels: {app: server}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/default"]
    to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"#;

#[test]
fn kubernetes_objects_share_the_stream() {
    let s = parse(Path::new("x"), &format!("{GOOD}{ISTIO_OBJECTS}")).unwrap();
    assert_eq!(s.authorization_policies.len(), 1);
    let p = &s.authorization_policies[0];
    assert_eq!((p.name.as_str(), p.namespace.as_str()), ("allow-get", "legacy"));
    assert_eq!(p.rules[0].from.as_ref().unwrap()[0].principals, Some(vec!["spiffe://cluster.local/ns/shop/sa/default".to_string()]));
    // The root namespace needs no declaring; its policy is mesh-wide.
    assert_eq!(s.peer_authentications[0].namespace, "istio-system");
    let server = PodKey { namespace: "legacy".into(), name: "server".into() };
    assert_eq!(s.peer_auth_mode(&server, 8080), crate::state::PeerAuthMode::Strict);
    // The objects alone, then the mesh document after them: the same state.
    let reordered = format!("{}\n---\n{GOOD}", ISTIO_OBJECTS.trim_start_matches("\n---\n"));
    assert_eq!(parse(Path::new("x"), &reordered).unwrap(), s);
    // The compact form and Istio's side by side.
    let both = format!("{GOOD}{POLICIES}{ISTIO_OBJECTS}");
    assert_eq!(parse(Path::new("x"), &both).unwrap().authorization_policies.len(), 3);
}

#[test]
fn kubernetes_object_errors_name_document_kind_object_and_field() {
    let with = |from: &str, to: &str| {
        assert!(ISTIO_OBJECTS.contains(from), "{from}");
        err(&format!("{GOOD}{}", ISTIO_OBJECTS.replace(from, to)))
    };
    #[rustfmt::skip]
    let table: &[(&str, &str, &str)] = &[
        ("methods: [\"GET\"]", "methods: [\"GET /\"]", "/etc/mesh.yaml: document 2 (AuthorizationPolicy legacy/allow-get): spec.rules[0].to[0].operation.methods[0]: \"GET /\" is not an HTTP method"),
        ("methods: [\"GET\"]", "verbs: [\"GET\"]", "/etc/mesh.yaml: document 2 (AuthorizationPolicy legacy/allow-get): spec.rules[0].to[0].operation"),
        ("principals: [\"cluster.local/ns/shop/sa/default\"]", "requestPrincipals: [\"*\"]", "/etc/mesh.yaml: document 2 (AuthorizationPolicy legacy/allow-get): spec.rules[0].from[0].source.requestPrincipals: not supported"),
        ("action: ALLOW", "action: CUSTOM", "/etc/mesh.yaml: document 2 (AuthorizationPolicy legacy/allow-get): spec.action: CUSTOM"),
        ("namespace: legacy", "namespace: nope", "/etc/mesh.yaml: document 2 (AuthorizationPolicy nope/allow-get): metadata.namespace: namespace \"nope\" is not declared"),
        ("namespace: legacy\n", "\n", "/etc/mesh.yaml: document 2 (AuthorizationPolicy /allow-get): metadata.namespace: \"\" is not a valid name"),
        ("kind: PeerAuthentication", "kind: RequestAuthentication", "/etc/mesh.yaml: document 3 (RequestAuthentication istio-system/default): security.istio.io/v1beta1 RequestAuthentication is not a kind the mesh reads"),
        ("security.istio.io/v1beta1", "security.istio.io/v2", "/etc/mesh.yaml: document 3 (PeerAuthentication istio-system/default): PeerAuthentication: version \"v2\""),
    ];
    for (from, to, want) in table {
        let e = with(from, to);
        assert!(e.starts_with(want), "{from} -> {to}:\n  got  {e}\n  want {want}");
    }
    let e = with("mtls: {mode: STRICT}", "mtls: {mode: STRICT}\nextra: 1");
    assert!(e.starts_with("/etc/mesh.yaml: document 3 (PeerAuthentication istio-system/default): ") && e.contains("unknown field `extra`"), "{e}");
    // Twice the same object; a second mesh document.
    let e = err(&format!("{GOOD}{ISTIO_OBJECTS}{}", ISTIO_OBJECTS.replace("v1beta1", "v1")));
    assert!(e.starts_with("/etc/mesh.yaml: document 4 (AuthorizationPolicy legacy/allow-get): metadata.name: AuthorizationPolicy legacy/allow-get is declared twice"), "{e}");
    let e = err(&format!("{GOOD}---\n{GOOD}"));
    assert!(e.contains("document 2: a second document without `apiVersion`"), "{e}");
    // The mesh document alone keeps serde's line and column.
    let e = err(&format!("{GOOD}colour: blue\n"));
    assert!(e.contains("line"), "{e}");
}
