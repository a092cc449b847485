use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::*;

const TD: &str = "spiffe://cluster.local";
/// Documentation addresses: a source pod's, and the workload's.
const SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));
const DESTINATION: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 20));

std::thread_local! {
    /// Set by the `as_istio` copies of the tests: policies are written as
    /// Istio objects and converted back, so the same tables check both forms.
    static ISTIO_FORM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn policies(yaml: &str) -> Vec<AuthorizationPolicy> {
    let ps: Vec<AuthorizationPolicy> = serde_yaml::from_str(yaml).unwrap();
    for p in &ps {
        validate(p).unwrap_or_else(|e| panic!("{}: {e}", p.name));
    }
    if ISTIO_FORM.get() { ps.iter().map(through_istio).collect() } else { ps }
}

/// `p` written as a `security.istio.io/v1` AuthorizationPolicy (principals
/// without `spiffe://`, `from[].source`, `to[].operation`, ports as strings,
/// headers as `request.headers[NAME]` keys), converted as a source would.
fn through_istio(p: &AuthorizationPolicy) -> AuthorizationPolicy {
    use serde_json::{Value, json};
    let bare = |v: &Option<Vec<String>>| v.as_ref().map(|v| v.iter().map(|s| s.strip_prefix("spiffe://").unwrap_or(s).to_owned()).collect::<Vec<_>>());
    let ports = |v: &Option<Vec<u32>>| v.as_ref().map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>());
    let rules: Vec<Value> = p
        .rules
        .iter()
        .map(|r| {
            let from = r.from.as_ref().map(|f| {
                f.iter()
                    .map(|s| {
                        json!({"source": {"principals": bare(&s.principals), "notPrincipals": bare(&s.not_principals),
                                          "namespaces": s.namespaces, "notNamespaces": s.not_namespaces,
                                          "ipBlocks": s.ip_blocks, "notIpBlocks": s.not_ip_blocks}})
                    })
                    .collect::<Vec<_>>()
            });
            let to = r.to.as_ref().map(|t| {
                t.iter()
                    .map(|o| {
                        json!({"operation": {"hosts": o.hosts, "notHosts": o.not_hosts, "ports": ports(&o.ports), "notPorts": ports(&o.not_ports),
                                             "methods": o.methods, "notMethods": o.not_methods, "paths": o.paths, "notPaths": o.not_paths}})
                    })
                    .collect::<Vec<_>>()
            });
            let when = r.when.as_ref().map(|w| {
                w.iter()
                    .map(|c| {
                        let key = c.key.clone().unwrap_or_else(|| format!("request.headers[{}]", c.header));
                        let principal = key == "source.principal";
                        let values = |v: &Option<Vec<String>>| if principal { bare(v) } else { v.clone() };
                        json!({"key": key, "values": values(&c.values), "notValues": values(&c.not_values)})
                    })
                    .collect::<Vec<_>>()
            });
            json!({"from": from, "to": to, "when": when})
        })
        .collect();
    let action = match p.action {
        AuthzAction::Allow => "ALLOW",
        AuthzAction::Deny => "DENY",
        AuthzAction::Audit => "AUDIT",
    };
    let spec = json!({"selector": p.selector.as_ref().map(|s| json!({"matchLabels": s})), "action": action, "rules": rules});
    let annotations: std::collections::BTreeMap<String, String> =
        [(crate::objects::IGNORE_PATH_CASE_ANNOTATION.to_string(), p.ignore_path_case.to_string())].into();
    let meta = crate::objects::Meta { name: &p.name, namespace: &p.namespace, annotations: &annotations, created: None };
    let kind = crate::objects::find("security.istio.io/v1", "AuthorizationPolicy").unwrap();
    match kind.convert(&meta, &spec) {
        Ok(crate::objects::Converted::AuthorizationPolicy(q)) => {
            assert_eq!((&q.name, &q.namespace, &q.selector, q.action, q.ignore_path_case), (&p.name, &p.namespace, &p.selector, p.action, p.ignore_path_case));
            assert_eq!(q.rules.len(), p.rules.len());
            q
        }
        other => panic!("{}: {other:?}\n{spec:#}", p.name),
    }
}

/// The decision tables again, with every policy in Istio's form.
mod as_istio {
    macro_rules! istio_form {
        ($($test:ident),* $(,)?) => {$(
            #[test]
            fn $test() {
                super::ISTIO_FORM.set(true);
                super::$test();
            }
        )*};
    }
    istio_form!(
        http_decisions,
        l4_decisions,
        l4_identity_rules_without_http_denies,
        bypass_attempts_are_denied_or_refused,
        paths_are_case_sensitive_by_default,
        first_matching_policy_in_config_order_is_named,
        an_invalid_policy_denies_what_it_selects,
    );
}

fn labels(app: &str) -> Labels {
    [("app".to_string(), app.to_string())].into()
}

fn peer(sa: &str) -> Option<Peer> {
    // "ns/sa", or "-" for a plaintext peer.
    let (ns, sa) = sa.split_once('/')?;
    Some(Peer::new(&SpiffeId::new("cluster.local", ns, sa).unwrap()))
}

/// One HTTP check: `who` is "ns/sa" or "-"; `headers` as "name: value".
fn http(
    wp: &WorkloadPolicy,
    who: &str,
    port: u16,
    method: &str,
    target: &str,
    host: &str,
    headers: &[&str],
) -> (bool, Option<String>, Reason) {
    let peer = peer(who);
    let path = normalize_path(target).unwrap();
    let mut map = HeaderMap::new();
    for h in headers {
        let (k, v) = h.split_once(": ").unwrap();
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let conn = Connection {
        peer: peer.as_ref(),
        port,
        source: SOURCE,
        destination: DESTINATION,
    };
    let req = Request {
        method,
        path: &path,
        host,
        headers: &map,
    };
    let d = wp.check_http(&conn, &req);
    assert!(!d.to_string().is_empty());
    (d.allowed, d.policy.map(str::to_owned), d.reason)
}

fn tcp(wp: &WorkloadPolicy, who: &str, port: u16) -> (bool, Option<String>, Reason) {
    let peer = peer(who);
    let d = wp.check_connection(&Connection {
        peer: peer.as_ref(),
        port,
        source: SOURCE,
        destination: DESTINATION,
    });
    (d.allowed, d.policy.map(str::to_owned), d.reason)
}

const SHOP: &str = r#"
- name: web-get-only
  namespace: shop
  selector: {app: api}
  action: ALLOW
  rules:
    - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/web"]}]
      to: [{methods: [GET]}]
    - from: [{principals: ["spiffe://cluster.local/ns/ops/*"]}]
    - from: [{principals: ["*/sa/admin"]}]
      to: [{paths: ["/admin", "/admin/*"]}]
    - from: [{namespaces: ["batch"]}]
      to: [{ports: [9090]}]
    - to: [{paths: ["/healthz"]}]
    - from: [{principals: ["*"]}]
      to: [{paths: ["/public/*"], notMethods: [DELETE]}]
    - to: [{hosts: ["*.example.com"], paths: ["/h"]}]
    - to: [{paths: ["/canary"]}]
      when: [{header: X-Canary, values: ["yes", "v2-*"]}]
    - to: [{paths: ["/beta"]}]
      when: [{header: x-user, notValues: ["*@blocked.example"]}]
- name: deny-mallory
  namespace: shop
  action: DENY
  rules:
    - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/mallory"]}]
- name: deny-debug
  namespace: shop
  selector: {app: api}
  action: DENY
  rules:
    - to: [{paths: ["/debug/*"]}]
    - from: [{notNamespaces: ["shop", "ops"]}]
      to: [{paths: ["/internal/*"]}]
    - when: [{header: x-evil, values: ["1"]}]
- name: db-from-api
  namespace: shop
  selector: {app: db}
  action: ALLOW
  rules:
    - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/api"]}]
      to: [{ports: [5432]}]
    - to: [{methods: [GET]}]
- name: db-no-post-on-5433
  namespace: shop
  selector: {app: db}
  action: DENY
  rules:
    - to: [{ports: [5433], methods: [POST]}]
- name: db-plaintext-off
  namespace: shop
  selector: {app: db}
  action: DENY
  rules:
    - from: [{notPrincipals: ["*"]}]
- name: locked
  namespace: shop
  selector: {app: locked}
  action: ALLOW
- name: open
  namespace: shop
  selector: {app: open}
  action: ALLOW
  rules: [{}]
"#;

#[test]
fn http_decisions() {
    use Reason::*;
    let authz = Authorizer::new(&policies(SHOP));
    assert!(authz.invalid().is_empty());
    let api = authz.for_workload("shop", &labels("api"));
    let other = authz.for_workload("shop", &labels("other"));
    let elsewhere = authz.for_workload("other", &labels("api"));
    let locked = authz.for_workload("shop", &labels("locked"));
    let open = authz.for_workload("shop", &labels("open"));
    let db = authz.for_workload("shop", &labels("db"));
    assert!(elsewhere.is_empty() && !api.is_empty() && api.uses_http_attributes());
    let h = "api.shop";
    type Row<'a> = (
        &'a str,
        &'a WorkloadPolicy,
        &'a str,
        u16,
        &'a str,
        &'a str,
        &'a str,
        &'a [&'a str],
        bool,
        Option<&'a str>,
        Reason,
    );
    #[rustfmt::skip]
    let table: &[Row] = &[
        // one principal: GET allowed, POST denied
        ("GET allowed", &api, "shop/web", 8080, "GET", "/items", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        ("method without case", &api, "shop/web", 8080, "get", "/items", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        ("POST denied by default", &api, "shop/web", 8080, "POST", "/items", h, &[], false, None, NoAllowMatched),
        // a second principal: denied everything
        ("other principal GET", &api, "shop/guest", 8080, "GET", "/items", h, &[], false, None, NoAllowMatched),
        ("other principal POST", &api, "shop/guest", 8080, "POST", "/items", h, &[], false, None, NoAllowMatched),
        // DENY beats ALLOW
        ("deny beats allow", &api, "shop/web", 8080, "GET", "/debug/vars", h, &[], false, Some("shop/deny-debug"), DenyMatched),
        ("namespace-wide deny beats allow", &api, "shop/mallory", 8080, "GET", "/healthz", h, &[], false, Some("shop/deny-mallory"), DenyMatched),
        // selector scoping; no ALLOW policy => allow
        ("only DENY policies select it", &other, "shop/guest", 80, "POST", "/x", h, &[], true, None, NoAllowPolicy),
        ("namespace-wide DENY applies", &other, "shop/mallory", 80, "GET", "/x", h, &[], false, Some("shop/deny-mallory"), DenyMatched),
        ("no policy at all", &elsewhere, "shop/mallory", 80, "DELETE", "/x", h, &[], true, None, NoAllowPolicy),
        ("ALLOW without rules allows nothing", &locked, "shop/web", 80, "GET", "/", h, &[], false, None, NoAllowMatched),
        ("the empty rule matches all", &open, "-", 80, "PATCH", "/x", h, &[], true, Some("shop/open"), AllowMatched),
        // principal wildcards
        ("prefix principal", &api, "ops/deploy", 8080, "DELETE", "/anything", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        ("suffix principal, exact path", &api, "team-a/admin", 8080, "POST", "/admin", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        ("suffix principal, prefix path", &api, "team-a/admin", 8080, "POST", "/admin/users", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        ("suffix principal, other path", &api, "team-a/admin", 8080, "POST", "/items", h, &[], false, None, NoAllowMatched),
        ("suffix is not a substring", &api, "team-a/superadmin", 8080, "GET", "/admin", h, &[], false, None, NoAllowMatched),
        // namespaces and ports
        ("namespace on its port", &api, "batch/job", 9090, "POST", "/x", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        ("namespace on another port", &api, "batch/job", 8080, "POST", "/x", h, &[], false, None, NoAllowMatched),
        ("notNamespaces deny", &api, "batch/job", 9090, "GET", "/internal/x", h, &[], false, Some("shop/deny-debug"), DenyMatched),
        ("notNamespaces spares listed", &api, "ops/deploy", 8080, "GET", "/internal/x", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        // plaintext peers
        ("plaintext, rule without from", &api, "-", 8080, "GET", "/healthz", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        ("plaintext never matches principals *", &api, "-", 8080, "GET", "/public/x", h, &[], false, None, NoAllowMatched),
        ("plaintext matches notNamespaces", &api, "-", 8080, "GET", "/internal/x", h, &[], false, Some("shop/deny-debug"), DenyMatched),
        ("any mTLS peer", &api, "far/away", 8080, "GET", "/public/x", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        ("notMethods", &api, "far/away", 8080, "DELETE", "/public/x", h, &[], false, None, NoAllowMatched),
        ("notMethods without case", &api, "far/away", 8080, "delete", "/public/x", h, &[], false, None, NoAllowMatched),
        // hosts
        ("host wildcard, case, port", &api, "-", 8080, "GET", "/h", "API.Example.COM:8080", &[], true, Some("shop/web-get-only"), AllowMatched),
        ("host trailing dot", &api, "-", 8080, "GET", "/h", "x.example.com.", &[], true, Some("shop/web-get-only"), AllowMatched),
        ("host wildcard needs a label", &api, "-", 8080, "GET", "/h", "example.com", &[], false, None, NoAllowMatched),
        ("host suffix lookalike", &api, "-", 8080, "GET", "/h", "evilexample.com", &[], false, None, NoAllowMatched),
        // headers
        ("header value", &api, "-", 8080, "GET", "/canary", h, &["x-canary: yes"], true, Some("shop/web-get-only"), AllowMatched),
        ("header prefix value", &api, "-", 8080, "GET", "/canary", h, &["x-canary: v2-blue"], true, Some("shop/web-get-only"), AllowMatched),
        ("header value case-sensitive", &api, "-", 8080, "GET", "/canary", h, &["x-canary: YES"], false, None, NoAllowMatched),
        ("header absent", &api, "-", 8080, "GET", "/canary", h, &[], false, None, NoAllowMatched),
        ("notValues, absent header", &api, "-", 8080, "GET", "/beta", h, &[], true, Some("shop/web-get-only"), AllowMatched),
        ("notValues, other value", &api, "-", 8080, "GET", "/beta", h, &["x-user: a@b.example"], true, Some("shop/web-get-only"), AllowMatched),
        ("notValues, one of two values", &api, "-", 8080, "GET", "/beta", h, &["x-user: a@b.example", "x-user: m@blocked.example"], false, None, NoAllowMatched),
        ("DENY header", &api, "shop/web", 8080, "GET", "/items", h, &["x-evil: 1"], false, Some("shop/deny-debug"), DenyMatched),
        ("DENY header, repeated", &api, "shop/web", 8080, "GET", "/items", h, &["x-evil: 0", "X-Evil: 1"], false, Some("shop/deny-debug"), DenyMatched),
        // HTTP on an L4-policed workload
        ("db: port rule over HTTP", &db, "shop/api", 5432, "POST", "/", h, &[], true, Some("shop/db-from-api"), AllowMatched),
        ("db: GET on 5433 over HTTP", &db, "shop/web", 5433, "GET", "/", h, &[], true, Some("shop/db-from-api"), AllowMatched),
        ("db: POST on 5433 over HTTP", &db, "shop/api", 5433, "POST", "/", h, &[], false, Some("shop/db-no-post-on-5433"), DenyMatched),
    ];
    for (what, wp, who, port, method, target, host, headers, allowed, policy, reason) in table {
        let got = http(wp, who, *port, method, target, host, headers);
        assert_eq!(
            got,
            (*allowed, policy.map(str::to_owned), *reason),
            "{what}: {who} {method} {target}"
        );
    }
}

#[test]
fn l4_decisions() {
    use Reason::*;
    let authz = Authorizer::new(&policies(SHOP));
    let api = authz.for_workload("shop", &labels("api"));
    let other = authz.for_workload("shop", &labels("other"));
    let db = authz.for_workload("shop", &labels("db"));
    let open = authz.for_workload("shop", &labels("open"));
    let elsewhere = authz.for_workload("other", &labels("db"));
    type Row<'a> = (&'a str, &'a WorkloadPolicy, &'a str, u16, bool, Option<&'a str>, Reason);
    #[rustfmt::skip]
    let table: &[Row] = &[
        ("identity + port rule", &db, "shop/api", 5432, true, Some("shop/db-from-api"), AllowMatched),
        ("identity rule, other port", &db, "shop/api", 6000, false, None, NoAllowMatched),
        ("an HTTP-only ALLOW cannot allow TCP", &db, "shop/web", 5432, false, None, NoAllowMatched),
        ("a DENY with HTTP fields applies to its port", &db, "shop/api", 5433, false, Some("shop/db-no-post-on-5433"), DenyMatched),
        ("plaintext refused by notPrincipals *", &db, "-", 5432, false, Some("shop/db-plaintext-off"), DenyMatched),
        ("ALLOW from a principal prefix", &api, "ops/deploy", 8080, false, Some("shop/deny-debug"), DenyMatched),
        ("namespace-wide DENY", &other, "shop/mallory", 80, false, Some("shop/deny-mallory"), DenyMatched),
        ("only DENY policies, not matching", &other, "shop/web", 80, true, None, NoAllowPolicy),
        ("the empty rule", &open, "-", 1, true, Some("shop/open"), AllowMatched),
        ("no policy", &elsewhere, "-", 5432, true, None, NoAllowPolicy),
    ];
    for (what, wp, who, port, allowed, policy, reason) in table {
        let got = tcp(wp, who, *port);
        assert_eq!(
            got,
            (*allowed, policy.map(str::to_owned), *reason),
            "{what}: {who} :{port}"
        );
    }
}

/// A workload without HTTP-only DENY rules: L4 allows what its identity and
/// port rules allow.
#[test]
fn l4_identity_rules_without_http_denies() {
    let authz = Authorizer::new(&policies(
        r#"
- name: tcp
  namespace: shop
  action: ALLOW
  rules:
    - from: [{namespaces: ["ops"]}]
    - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/web"]}]
      to: [{ports: [80, 443]}]
    - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/web"]}]
      to: [{ports: [8080]}, {methods: [GET]}]
"#,
    ));
    let wp = authz.for_workload("shop", &labels("x"));
    assert!(wp.uses_http_attributes());
    assert!(tcp(&wp, "ops/anyone", 1).0);
    assert!(tcp(&wp, "shop/web", 443).0);
    assert!(
        tcp(&wp, "shop/web", 8080).0,
        "an entry without HTTP fields still allows TCP"
    );
    assert!(!tcp(&wp, "shop/web", 22).0, "the GET entry cannot allow TCP");
    assert!(!tcp(&wp, "shop/other", 80).0);
    assert!(!tcp(&wp, "-", 80).0);
}

const DENY_ADMIN: &str = r#"
- name: deny-admin
  namespace: shop
  action: DENY
  ignorePathCase: IGNORE
  rules:
    - to: [{paths: ["/admin", "/admin/*"]}]
"#;

/// Bypass attempts against a DENY on `/admin` and `/admin/*`: each is denied
/// or refused as malformed (400), never allowed.
#[test]
fn bypass_attempts_are_denied_or_refused() {
    let authz = Authorizer::new(&policies(&DENY_ADMIN.replace("IGNORE", "true")));
    let wp = authz.for_workload("shop", &labels("x"));
    #[rustfmt::skip]
    let attempts: &[(&str, bool)] = &[
        // (target, refused as malformed rather than denied)
        ("/admin", false),
        ("//admin", false),
        ("///admin//", false),
        ("/./admin", false),
        ("/x/../admin", false),
        ("/x/y/../../admin", false),
        ("/../admin", false),
        ("/%61dmin", false),
        ("/adm%69n", false),
        ("/%2e/admin", false),
        ("/%2E%2E/admin", false),
        ("/x/%2e%2e/admin", false),
        ("/ADMIN", false),
        ("/Admin/users", false),
        ("/%41DMIN", false),
        ("/admin/", false),
        ("/admin/.", false),
        ("/admin/x/..", false),
        ("/admin/users", false),
        ("/admin?x=1", false),
        ("/admin/?x=/../public", false),
        ("/\\admin", false),
        ("/admin\\", false),
        ("/admin\\users", false),
        ("\\admin", true),
        ("/admin%2F", true),
        ("/admin%2fx", true),
        ("/x%2F..%2Fadmin", true),
        ("/%5Cadmin", true),
        ("/admin%5c", true),
        ("/admin#x", true),
        ("/public#/../admin", true),
        ("/admin;x", true),
        ("/public/..;/admin", true),
        ("/admin%00.png", true),
        ("/admin%", true),
        ("/admin%g0", true),
        ("/ad min", true),
        ("http://x/admin", true),
    ];
    for (target, refused) in attempts {
        match normalize_path(target) {
            Err(e) => assert!(refused, "{target:?} was refused ({e}), expected a DENY"),
            Ok(path) => {
                assert!(!refused, "{target:?} was accepted as {path}, expected a 400");
                for method in ["GET", "POST"] {
                    let conn = Connection { peer: None, port: 80, source: SOURCE, destination: DESTINATION };
                    let headers = HeaderMap::new();
                    let req = Request {
                        method,
                        path: &path,
                        host: "x",
                        headers: &headers,
                    };
                    let d = wp.check_http(&conn, &req);
                    assert!(!d.allowed, "{target:?} (as {path}) was allowed");
                    assert_eq!(d.policy, Some("shop/deny-admin"), "{target:?}");
                }
            }
        }
    }
    // Paths that only look alike are not the policy's business.
    for target in ["/administrator", "/admins/x", "/x/admin", "/public"] {
        assert!(http(&wp, "-", 80, "GET", target, "x", &[]).0, "{target}");
    }
}

/// Istio compares paths with case, and so do we unless the policy says
/// `ignorePathCase`: then `/ADMIN` is another path.
#[test]
fn paths_are_case_sensitive_by_default() {
    let authz = Authorizer::new(&policies(&DENY_ADMIN.replace("IGNORE", "false")));
    let wp = authz.for_workload("shop", &labels("x"));
    assert!(!http(&wp, "-", 80, "GET", "/admin", "x", &[]).0);
    assert!(!http(&wp, "-", 80, "GET", "/%61dmin/x", "x", &[]).0);
    assert!(http(&wp, "-", 80, "GET", "/ADMIN", "x", &[]).0);
}

#[test]
fn first_matching_policy_in_config_order_is_named() {
    let yaml = r#"
- {name: a, namespace: shop, action: ALLOW, rules: [{to: [{paths: ["/x/*"]}]}]}
- {name: b, namespace: shop, action: DENY, rules: [{to: [{paths: ["/x/y"]}]}]}
- {name: c, namespace: shop, action: DENY, rules: [{to: [{paths: ["/x/*"]}]}]}
- {name: d, namespace: shop, action: ALLOW, rules: [{to: [{paths: ["/x/y"]}]}]}
"#;
    let authz = Authorizer::new(&policies(yaml));
    let wp = authz.for_workload("shop", &labels("x"));
    assert_eq!(http(&wp, "-", 80, "GET", "/x/y", "h", &[]).1.as_deref(), Some("shop/b"));
    assert_eq!(http(&wp, "-", 80, "GET", "/x/z", "h", &[]).1.as_deref(), Some("shop/c"));
    let ps = policies(yaml);
    let authz = Authorizer::new(&[ps[3].clone(), ps[0].clone()]);
    let wp = authz.for_workload("shop", &labels("x"));
    assert_eq!(http(&wp, "-", 80, "GET", "/x/y", "h", &[]).1.as_deref(), Some("shop/d"));
}

#[test]
fn an_invalid_policy_denies_what_it_selects() {
    let mut ps = policies(SHOP);
    ps[0].rules[0].from.as_mut().unwrap()[0].principals = Some(vec!["web".into()]);
    let authz = Authorizer::new(&ps);
    assert_eq!(authz.invalid().len(), 1);
    assert_eq!(authz.invalid()[0].0, "shop/web-get-only");
    assert_eq!(authz.invalid()[0].1.field, "rules[0].from[0].principals[0]");
    let api = authz.for_workload("shop", &labels("api"));
    let got = http(&api, "ops/deploy", 8080, "GET", "/", "h", &[]);
    assert_eq!(got, (false, Some("shop/web-get-only".into()), Reason::InvalidPolicy));
    assert!(!tcp(&api, "ops/deploy", 8080).0);
    let other = authz.for_workload("shop", &labels("other"));
    assert!(
        http(&other, "ops/deploy", 8080, "GET", "/", "h", &[]).0,
        "the selector still scopes it"
    );
}

#[test]
fn validation_names_the_field() {
    let check = |yaml: &str| {
        let p: AuthorizationPolicy = serde_yaml::from_str(yaml).unwrap();
        validate(&p).unwrap_err().to_string()
    };
    let base = "{name: p, namespace: shop, action: DENY, rules: [RULE]}";
    #[rustfmt::skip]
    let table: &[(&str, &str)] = &[
        ("{from: [{principals: [web]}]}", "rules[0].from[0].principals[0]: \"web\" is not a SPIFFE ID"),
        ("{from: [{principals: [\"spiffe://cluster.local/ns/*/sa/x\"]}]}", "rules[0].from[0].principals[0]: \"spiffe://cluster.local/ns/*/sa/x\": '*' is allowed only"),
        ("{from: [{principals: [\"*x*\"]}]}", "rules[0].from[0].principals[0]"),
        ("{from: [{notNamespaces: [Shop]}]}", "rules[0].from[0].notNamespaces[0]: \"Shop\" is not a namespace"),
        ("{from: [{principals: []}]}", "rules[0].from[0].principals: an empty list is ambiguous"),
        ("{from: []}", "rules[0].from: an empty list"),
        ("{to: [{methods: [\"GE T\"]}]}", "rules[0].to[0].methods[0]: \"GE T\" is not an HTTP method"),
        ("{to: [{paths: [admin]}]}", "rules[0].to[0].paths[0]: \"admin\": a path must start with '/'"),
        ("{to: [{notPaths: [\"/a//b\"]}]}", "rules[0].to[0].notPaths[0]: \"/a//b\": it is not in normalized form"),
        ("{to: [{paths: [\"/a%2Fb\"]}]}", "rules[0].to[0].paths[0]: \"/a%2Fb\": requests like it are rejected"),
        ("{to: [{ports: [70000]}]}", "rules[0].to[0].ports[0]: 70000 is not a port (1-65535)"),
        ("{to: [{notPorts: [0]}]}", "rules[0].to[0].notPorts[0]: 0 is not a port"),
        ("{to: [{hosts: [\"a.com:80\"]}]}", "rules[0].to[0].hosts[0]: \"a.com:80\": hosts are matched without their port"),
        ("{when: [{header: \"x y\", values: [a]}]}", "rules[0].when[0].header: \"x y\" is not an HTTP header name"),
        ("{when: [{header: x}]}", "rules[0].when[0]: a condition needs `values` or `notValues`"),
    ];
    for (rule, want) in table {
        let e = check(&base.replace("RULE", rule));
        assert!(e.starts_with(want), "{rule}: {e}");
    }
    let e = check("{name: p, namespace: shop, selector: {}, action: ALLOW}");
    assert!(e.starts_with("selector: an empty selector is ambiguous"), "{e}");
    let e = check("{name: '', namespace: shop, action: ALLOW}");
    assert!(e.starts_with("name: "), "{e}");
    for bad in [
        "{name: p, namespace: shop, action: PERMIT}",
        "{name: p, namespace: shop}",
        "{name: p, namespace: shop, action: ALLOW, rules: [{from: [{source: {principals: [\"*\"]}}]}]}",
        "{name: p, namespace: shop, action: ALLOW, rules: [{to: [{ports: [\"80\"]}]}]}",
    ] {
        assert!(serde_yaml::from_str::<AuthorizationPolicy>(bad).is_err(), "{bad}");
    }
}

#[test]
fn policies_round_trip_through_the_schema() {
    let ps = policies(SHOP);
    let yaml = serde_yaml::to_string(&ps).unwrap();
    assert!(yaml.contains("notNamespaces") && !yaml.contains("ignorePathCase") && !yaml.contains("null"), "{yaml}");
    assert_eq!(serde_yaml::from_str::<Vec<AuthorizationPolicy>>(&yaml).unwrap(), ps);
}

#[test]
fn hosts_for_matching() {
    for (h, want) in [
        ("a.com", "a.com"),
        ("a.com:8080", "a.com"),
        ("a.com.", "a.com"),
        ("a.com.:80", "a.com"),
        ("[::1]:80", "[::1]"),
        ("[::1]", "[::1]"),
        ("", ""),
    ] {
        assert_eq!(host_for_match(h), want, "{h}");
    }
}

/// The index must decide exactly as evaluating every rule in order would.
#[test]
fn index_agrees_with_a_linear_scan() {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    let mut rng = StdRng::seed_from_u64(5);
    let ps = generated_policies(&mut rng, 400);
    let authz = Authorizer::new(&ps);
    assert!(authz.invalid().is_empty(), "{:?}", authz.invalid());
    let wp = authz.for_workload("shop", &labels("api"));
    let sizes = wp.http.family_sizes();
    assert!(sizes.iter().all(|&n| n > 0), "every family is exercised: {sizes:?}");
    let pick = |rng: &mut StdRng, xs: &[&'static str]| xs[rng.gen_range(0..xs.len())];
    let (mut allowed, mut denied, mut audited) = (0, 0, 0);
    for _ in 0..5000 {
        let who = format!(
            "{}/{}",
            pick(&mut rng, &["shop", "ops", "batch", "x"]),
            pick(&mut rng, &["web", "sa3", "sa7", "admin", "db"])
        );
        let who = if rng.gen_bool(0.1) { "-".to_string() } else { who };
        let target = format!(
            "/{}/{}",
            pick(&mut rng, &["api", "admin", "public", "v1"]),
            pick(&mut rng, &["p3", "p7", "x", "s/t.css"])
        );
        let method = pick(&mut rng, &["GET", "POST", "DELETE", "get", "Post"]);
        let upper = method.to_ascii_uppercase();
        let port = [80, 8080, 9090][rng.gen_range(0..3)];
        let source: IpAddr = pick(&mut rng, &["198.51.100.7", "198.51.100.9", "198.51.100.12", "203.0.113.5", "2001:db8::5"]).parse().unwrap();
        let host = pick(
            &mut rng,
            &["api.shop", "API.Example.com:80", "x.example.com", "example.com"],
        );
        let peer = peer(&who);
        let path = normalize_path(&target).unwrap();
        let mut headers = HeaderMap::new();
        for _ in 0..rng.gen_range(0..3) {
            let v = HeaderValue::from_static(pick(&mut rng, &["a", "b", "c"]));
            headers.append(pick(&mut rng, &["x-user", "x-team", "accept"]), v);
        }
        let conn = Connection {
            peer: peer.as_ref(),
            port,
            source,
            destination: DESTINATION,
        };
        let req = Request {
            method,
            path: &path,
            host,
            headers: &headers,
        };
        let ctx_http = Ctx {
            peer: conn.peer,
            port,
            source,
            destination: DESTINATION,
            http: Some(HttpCtx {
                method: &upper,
                path: path.path(),
                host: host_for_match(host),
                headers: &headers,
            }),
        };
        let ctx_l4 = Ctx {
            peer: conn.peer,
            port,
            source,
            destination: DESTINATION,
            http: None,
        };
        let d = wp.check_http(&conn, &req);
        assert_eq!(d, linear(&wp, &ctx_http), "{who} {method} {target} :{port}");
        audited += usize::from(d.audit.is_some());
        if d.allowed {
            allowed += 1
        } else {
            denied += 1
        }
        assert_eq!(wp.check_connection(&conn), linear(&wp, &ctx_l4), "L4 {who} :{port}");
    }
    assert!(
        allowed > 100 && denied > 100 && audited > 100,
        "a table that exercises all: {allowed} allowed, {denied} denied, {audited} audited"
    );
}

fn linear<'a>(wp: &'a WorkloadPolicy, ctx: &Ctx<'_>) -> Decision<'a> {
    let first = |action| {
        (0..wp.rules.len() as u32).find(|&id| wp.policy_of(id).action == action && wp.rule(id).matches(ctx, action))
    };
    let audit = first(AuthzAction::Audit).map(|id| &*wp.policy_of(id).id);
    let decide = |allowed, policy, reason| Decision { allowed, policy, reason, audit };
    if let Some(id) = first(AuthzAction::Deny) {
        let p = wp.policy_of(id);
        let reason = if p.invalid {
            Reason::InvalidPolicy
        } else {
            Reason::DenyMatched
        };
        return decide(false, Some(&p.id), reason);
    }
    if let Some(id) = first(AuthzAction::Allow) {
        return decide(true, Some(&wp.policy_of(id).id), Reason::AllowMatched);
    }
    match wp.has_allow {
        true => decide(false, None, Reason::NoAllowMatched),
        false => decide(true, None, Reason::NoAllowPolicy),
    }
}

use rand::Rng as _;

/// Policies of every shape the index files differently (exact, prefix and
/// suffix principals and paths, namespaces, ports, rules it cannot file).
fn generated_policies(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<AuthorizationPolicy> {
    let principal = |rng: &mut rand::rngs::StdRng| match rng.gen_range(0..10) {
        0 => format!("{TD}/ns/ops/*"),
        1 => "*/sa/admin".to_string(),
        2 => "*".to_string(),
        _ => format!(
            "{TD}/ns/{}/sa/sa{}",
            ["shop", "ops", "batch"][rng.gen_range(0..3)],
            rng.gen_range(0..10)
        ),
    };
    let path = |rng: &mut rand::rngs::StdRng| match rng.gen_range(0..10) {
        0 => format!("/{}/*", ["api", "admin", "public"][rng.gen_range(0..3)]),
        1 => ["*.css", "*css", "*t.css"][rng.gen_range(0..3)].to_string(),
        2 => "*/x".to_string(),
        _ => format!(
            "/{}/p{}",
            ["api", "admin", "v1"][rng.gen_range(0..3)],
            rng.gen_range(0..10)
        ),
    };
    (0..n)
        .map(|i| {
            let mut rule = crate::state::AuthzRule::default();
            let mut src = crate::state::AuthzSource::default();
            let mut op = crate::state::AuthzOperation::default();
            match rng.gen_range(0..8) {
                0 => src.namespaces = Some(vec![["ops", "batch"][rng.gen_range(0..2)].into()]),
                1 => src.not_principals = Some(vec![principal(rng)]),
                2..=5 => src.principals = Some((0..rng.gen_range(1..3)).map(|_| principal(rng)).collect()),
                _ => {}
            }
            match rng.gen_range(0..8) {
                0 => op.ports = Some(vec![[80, 8080, 9090][rng.gen_range(0..3)]]),
                1 => op.not_methods = Some(vec!["DELETE".into()]),
                2..=5 => op.paths = Some((0..rng.gen_range(1..3)).map(|_| path(rng)).collect()),
                _ => {}
            }
            if rng.gen_bool(0.5) {
                op.methods = Some(vec![["GET", "POST"][rng.gen_range(0..2)].into()]);
            }
            if rng.gen_bool(0.2) {
                let h = ["*.example.com", "api.shop", "EXAMPLE.com", "x.*", "*"];
                op.hosts = Some(vec![h[rng.gen_range(0..h.len())].into()]);
            }
            if rng.gen_bool(0.2) {
                let header = ["x-user", "x-team", "Accept"][rng.gen_range(0..3)].to_string();
                let values = Some(vec![["a", "b*", "*"][rng.gen_range(0..3)].to_string()]);
                rule.when = Some(vec![if rng.gen_bool(0.7) {
                    crate::state::AuthzCondition {
                        header,
                        values,
                        ..Default::default()
                    }
                } else {
                    crate::state::AuthzCondition {
                        header,
                        not_values: values,
                        ..Default::default()
                    }
                }]);
            }
            // Istio's other condition keys, known at L4 too.
            if rng.gen_bool(0.15) {
                let (key, value) = [
                    ("source.ip", "198.51.100.0/28"),
                    ("destination.ip", "198.51.100.20"),
                    ("destination.port", "8080"),
                    ("source.namespace", "shop"),
                    ("source.principal", "*/sa/sa1"),
                ][rng.gen_range(0..5)];
                let values = Some(vec![value.to_string()]);
                let c = if rng.gen_bool(0.6) {
                    crate::state::AuthzCondition { key: Some(key.into()), values, ..Default::default() }
                } else {
                    crate::state::AuthzCondition { key: Some(key.into()), not_values: values, ..Default::default() }
                };
                rule.when.get_or_insert_with(Vec::new).push(c);
            }
            if rng.gen_bool(0.1) {
                src.ip_blocks = Some(vec![["198.51.100.0/29", "198.51.100.9", "2001:db8::/32"][rng.gen_range(0..3)].to_string()]);
            }
            if rng.gen_bool(0.05) {
                src.not_ip_blocks = Some(vec!["198.51.100.8/29".to_string()]);
            }
            let action = match rng.gen_range(0..20) {
                0 | 1 => AuthzAction::Deny,
                2 => AuthzAction::Audit,
                _ => AuthzAction::Allow,
            };
            if action == AuthzAction::Deny && rng.gen_bool(0.8) {
                // Mostly narrow denies, or nothing would ever be allowed.
                src.principals = Some(vec![format!("{TD}/ns/shop/sa/sa{}", rng.gen_range(0..10))]);
            }
            if src != Default::default() {
                rule.from = Some(vec![src]);
            }
            if op != Default::default() {
                rule.to = Some(vec![op]);
            }
            AuthorizationPolicy {
                name: format!("p{i}"),
                namespace: "shop".into(),
                selector: None,
                action,
                rules: vec![rule],
                ignore_path_case: false,
                target_services: None,
                refused: None,
            }
        })
        .collect()
}
