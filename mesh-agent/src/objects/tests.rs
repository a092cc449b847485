//! The conformance table of the README ("Istio security resources"), field
//! by field: each supported field changes a decision the way Istio
//! documents, each refused one is refused with its field named, and a DENY
//! that cannot be used fails closed.

use std::{collections::BTreeMap, net::IpAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

use super::*;
use crate::{
    policy::{Authorizer, Connection, Peer, Reason, Request, normalize_path},
    spiffe::SpiffeId,
    state::{AuthorizationPolicy, AuthzAction, Labels, PeerAuthMode, PeerAuthentication, Service, ServicePort},
};

fn meta<'a>(name: &'a str, namespace: &'a str, annotations: &'a BTreeMap<String, String>) -> Meta<'a> {
    Meta { name, namespace, annotations, created: None }
}

/// An Istio AuthorizationPolicy `shop/NAME` with `spec`, converted.
fn convert_ap(name: &str, spec: Value) -> Result<AuthorizationPolicy, Refused> {
    convert_ap_in("shop", name, spec)
}

fn convert_ap_in(ns: &str, name: &str, spec: Value) -> Result<AuthorizationPolicy, Refused> {
    let none = BTreeMap::new();
    let kind = find("security.istio.io/v1", "AuthorizationPolicy").unwrap();
    match kind.convert(&meta(name, ns, &none), &spec)? {
        Converted::AuthorizationPolicy(p) => Ok(p),
        other => panic!("{other:?}"),
    }
}

fn ap(spec: Value) -> AuthorizationPolicy {
    convert_ap("p", spec).unwrap_or_else(|e| panic!("refused: {e}"))
}

/// What is enforced for a refused object: its stand-in, if any.
fn stand_in(r: &Refused) -> Option<AuthorizationPolicy> {
    r.stand_in.as_deref().map(|c| match c {
        Converted::AuthorizationPolicy(p) => p.clone(),
        other => panic!("{other:?}"),
    })
}

/// One check against `policies` for a pod `shop` labelled `app: api`.
struct Check<'a> {
    /// "ns/sa", or "-" for a plaintext client.
    who: &'a str,
    from_ip: &'a str,
    to_ip: &'a str,
    port: u16,
    /// `None`: a TCP connection (L4).
    http: Option<(&'a str, &'a str, &'a str, &'a [&'a str])>,
    namespace: &'a str,
    app: &'a str,
}

const GET: Check<'static> = Check {
    who: "shop/web",
    from_ip: "198.51.100.7",
    to_ip: "198.51.100.20",
    port: 8080,
    http: Some(("GET", "/api/items", "api.shop", &[])),
    namespace: "shop",
    app: "api",
};

impl Check<'_> {
    fn run(&self, policies: &[AuthorizationPolicy], services: &[Service]) -> (bool, Reason, Option<String>) {
        let authz = Authorizer::build(policies, crate::state::DEFAULT_ROOT_NAMESPACE, services);
        assert!(authz.invalid().is_empty(), "{:?}", authz.invalid());
        let labels: Labels = [("app".to_string(), self.app.to_string())].into();
        let wp = authz.for_workload(self.namespace, &labels);
        let peer = self.who.split_once('/').map(|(ns, sa)| Peer::new(&SpiffeId::new("cluster.local", ns, sa).unwrap()));
        let conn = Connection {
            peer: peer.as_ref(),
            port: self.port,
            source: self.from_ip.parse::<IpAddr>().unwrap(),
            destination: self.to_ip.parse::<IpAddr>().unwrap(),
        };
        let d = match self.http {
            Some((method, target, host, headers)) => {
                let mut map = HeaderMap::new();
                for h in headers {
                    let (k, v) = h.split_once(": ").unwrap();
                    map.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
                }
                let path = normalize_path(target).unwrap();
                wp.check_http(&conn, &Request { method, path: &path, host, headers: &map })
            }
            None => wp.check_connection(&conn),
        };
        (d.allowed, d.reason, d.audit.map(str::to_owned))
    }

    fn allowed(&self, policies: &[AuthorizationPolicy]) -> bool {
        self.run(policies, &[]).0
    }
}

fn allow_if(rule: Value) -> Vec<AuthorizationPolicy> {
    vec![ap(json!({"action": "ALLOW", "rules": [rule]}))]
}

fn deny_if(rule: Value) -> Vec<AuthorizationPolicy> {
    vec![ap(json!({"action": "DENY", "rules": [rule]}))]
}

#[test]
fn kinds_are_found_by_group_and_kind() {
    assert!(find("security.istio.io/v1", "AuthorizationPolicy").is_ok());
    assert!(find("security.istio.io/v1beta1", "PeerAuthentication").is_ok(), "same schema as v1");
    let e = find("security.istio.io/v1alpha9", "AuthorizationPolicy").unwrap_err();
    assert!(e.contains("v1alpha9") && e.contains("v1, v1beta1"), "{e}");
    let e = find("nodemesh.io/v1alpha1", "AuthorizationPolicy").unwrap_err();
    assert!(e.contains("not a kind the mesh reads") && e.contains("security.istio.io/v1 AuthorizationPolicy"), "{e}");
}

/// Istio's examples: `spec: {}` allows nothing; `rules: [{}]` allows all;
/// a DENY with no rules denies nothing; the default action is ALLOW.
#[test]
fn empty_policies_mean_what_istio_says() {
    let allow_nothing = ap(json!({}));
    assert_eq!(allow_nothing.action, AuthzAction::Allow);
    assert!(!GET.allowed(std::slice::from_ref(&allow_nothing)));
    assert_eq!(GET.run(&[allow_nothing], &[]).1, Reason::NoAllowMatched);
    assert!(GET.allowed(&[ap(json!({"rules": [{}]}))]));
    assert!(GET.allowed(&[ap(json!({"action": "DENY"}))]));
    assert!(!GET.allowed(&[ap(json!({"action": "DENY", "rules": [{}]}))]));
    // Empty lists are Istio's "not set".
    assert!(GET.allowed(&allow_if(json!({"from": [], "to": [{"operation": {"methods": []}}], "when": []}))));
    assert!(!GET.allowed(&[ap(Value::Null)]), "no spec at all: ALLOW nothing");
}

#[test]
fn selector_match_labels() {
    let p = vec![ap(json!({"selector": {"matchLabels": {"app": "api"}}}))];
    assert!(!GET.allowed(&p));
    assert!(Check { app: "db", ..GET }.allowed(&p), "not selected");
    // An empty matchLabels selects the whole namespace, like no selector.
    let p = vec![ap(json!({"selector": {"matchLabels": {}}}))];
    assert!(!Check { app: "db", ..GET }.allowed(&p));
    assert!(Check { namespace: "other", ..GET }.allowed(&p), "another namespace");
}

fn service(name: &str, app: &str) -> Service {
    Service {
        name: name.into(),
        namespace: "shop".into(),
        ips: vec![],
        selector: [("app".to_string(), app.to_string())].into(),
        ports: vec![ServicePort { name: "http".into(), port: 80, target_port: 8080, app_protocol: None }],
        endpoint_ips: None,
    }
}

#[test]
fn target_refs_to_a_service_select_its_pods() {
    let services = [service("api", "api"), service("db", "db")];
    for spec in [
        json!({"targetRefs": [{"kind": "Service", "group": "", "name": "api"}]}),
        json!({"targetRef": {"kind": "Service", "name": "api"}}),
    ] {
        let p = vec![ap(spec)];
        assert_eq!(p[0].target_services, Some(vec!["api".to_string()]));
        assert!(!GET.run(&p, &services).0, "the api service's pods are default-deny");
        assert!(Check { app: "db", ..GET }.run(&p, &services).0, "the db service's are not");
        assert!(GET.run(&p, &[]).0, "no such service: it selects nothing");
    }
    for (spec, field) in [
        (json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}]}), "spec.targetRefs[0].kind"),
        (json!({"targetRef": {"kind": "GatewayClass", "group": "gateway.networking.k8s.io", "name": "istio-waypoint"}}), "spec.targetRef.kind"),
    ] {
        let e = convert_ap("p", spec).unwrap_err();
        assert_eq!(e.reason, "Unsupported");
        assert!(e.message.starts_with(field), "{e}");
        assert!(e.stand_in.is_none(), "an ALLOW is left out");
    }
    let e = convert_ap("p", json!({"selector": {"matchLabels": {"app": "api"}}, "targetRefs": [{"kind": "Service", "name": "api"}]})).unwrap_err();
    assert_eq!(e.reason, "Invalid", "{e}");
}

#[test]
fn actions() {
    let rule = json!({"to": [{"operation": {"paths": ["/admin"]}}]});
    let admin = Check { http: Some(("GET", "/admin", "api.shop", &[])), ..GET };
    let deny = vec![ap(json!({"action": "DENY", "rules": [rule]}))];
    assert!(!admin.allowed(&deny) && GET.allowed(&deny));
    let allow = vec![ap(json!({"action": "ALLOW", "rules": [rule]}))];
    assert!(admin.allowed(&allow) && !GET.allowed(&allow));
    // AUDIT never changes the decision; it is reported with it.
    let audit = ap(json!({"action": "AUDIT", "rules": [rule]}));
    assert_eq!(admin.run(std::slice::from_ref(&audit), &[]), (true, Reason::NoAllowPolicy, Some("shop/p".into())));
    assert_eq!(GET.run(std::slice::from_ref(&audit), &[]), (true, Reason::NoAllowPolicy, None));
    let mut with_deny = deny.clone();
    with_deny.push(AuthorizationPolicy { name: "audit".into(), ..audit });
    assert_eq!(admin.run(&with_deny, &[]), (false, Reason::DenyMatched, Some("shop/audit".into())));
    // CUSTOM: refused; what its rules match is denied meanwhile.
    let e = convert_ap("p", json!({"action": "CUSTOM", "provider": {"name": "ext-authz"}, "rules": [rule]})).unwrap_err();
    assert_eq!(e.reason, "Unsupported");
    assert!(e.message.starts_with("spec.action: CUSTOM"), "{e}");
    let s = vec![stand_in(&e).unwrap()];
    assert_eq!(admin.run(&s, &[]).1, Reason::InvalidPolicy);
    assert!(!admin.allowed(&s) && GET.allowed(&s));
    let e = convert_ap("p", json!({"action": "ALLOW", "provider": {"name": "x"}})).unwrap_err();
    assert!(e.message.starts_with("spec.provider"), "{e}");
    let e = convert_ap("p", json!({"action": "MAYBE"})).unwrap_err();
    assert!(e.message.starts_with("spec.action: unknown variant `MAYBE`"), "{e}");
}

#[test]
fn principals_namespaces_and_service_accounts() {
    let from = |source: Value| allow_if(json!({"from": [{"source": source}]}));
    let cases: &[(Value, &str, bool)] = &[
        (json!({"principals": ["cluster.local/ns/shop/sa/web"]}), "shop/web", true),
        (json!({"principals": ["cluster.local/ns/shop/sa/web"]}), "shop/db", false),
        (json!({"principals": ["cluster.local/ns/shop/*"]}), "shop/db", true),
        (json!({"principals": ["*/sa/web"]}), "ops/web", true),
        (json!({"principals": ["*/sa/web"]}), "ops/webx", false),
        (json!({"principals": ["*"]}), "ops/x", true),
        (json!({"principals": ["*"]}), "-", false),
        (json!({"notPrincipals": ["cluster.local/ns/shop/sa/web"]}), "shop/web", false),
        (json!({"notPrincipals": ["cluster.local/ns/shop/sa/web"]}), "-", true),
        (json!({"namespaces": ["shop"]}), "shop/x", true),
        (json!({"namespaces": ["sh*"]}), "shop/x", true),
        (json!({"namespaces": ["ops"]}), "shop/x", false),
        (json!({"namespaces": ["shop"]}), "-", false),
        (json!({"notNamespaces": ["shop"]}), "shop/x", false),
        (json!({"notNamespaces": ["shop"]}), "ops/x", true),
        (json!({"serviceAccounts": ["shop/web"]}), "shop/web", true),
        (json!({"serviceAccounts": ["shop/web"]}), "ops/web", false),
        (json!({"notServiceAccounts": ["shop/web"]}), "shop/web", false),
        (json!({"notServiceAccounts": ["shop/web"]}), "shop/db", true),
    ];
    for &(ref source, who, allowed) in cases {
        assert_eq!(Check { who, ..GET }.allowed(&from(source.clone())), allowed, "{source} from {who}");
    }
    for (source, field) in [
        (json!({"principals": ["spiffe://cluster.local/ns/shop/sa/web"]}), "spec.rules[0].from[0].source.principals[0]"),
        (json!({"principals": ["cluster.local/ns/shop/*/x"]}), "spec.rules[0].from[0].source.principals[0]"),
        (json!({"notNamespaces": ["Shop"]}), "spec.rules[0].from[0].source.notNamespaces[0]"),
        (json!({"serviceAccounts": ["web"]}), "spec.rules[0].from[0].source.serviceAccounts[0]"),
        (json!({"serviceAccounts": ["shop/web"], "principals": ["*"]}), "spec.rules[0].from[0].source.serviceAccounts"),
    ] {
        let e = convert_ap("p", json!({"rules": [{"from": [{"source": source}]}]})).unwrap_err();
        assert_eq!(e.reason, "Invalid", "{e}");
        assert!(e.message.starts_with(field), "{field}: {e}");
    }
    let e = convert_ap("p", json!({"rules": [{"from": [{"source": {"trustDomains": ["td"]}}]}]})).unwrap_err();
    assert_eq!(e.reason, "Unsupported");
    assert!(e.message.starts_with("spec.rules[0].from[0].source.trustDomains"), "{e}");
}

/// `remoteIpBlocks` are `ipBlocks` here: without a proxy protocol or a
/// trusted X-Forwarded-For, the original client is the peer.
#[test]
fn ip_blocks() {
    let from = |source: Value| allow_if(json!({"from": [{"source": source}]}));
    for field in ["ipBlocks", "remoteIpBlocks"] {
        let not = format!("not{}{}", field[..1].to_uppercase(), &field[1..]);
        let p = from(json!({field: ["198.51.100.0/28", "203.0.113.5"]}));
        assert!(GET.allowed(&p), "{field}");
        assert!(Check { from_ip: "203.0.113.5", ..GET }.allowed(&p));
        assert!(!Check { from_ip: "198.51.100.16", ..GET }.allowed(&p));
        assert!(Check { from_ip: "::ffff:198.51.100.7", ..GET }.allowed(&p), "v4-mapped");
        assert!(Check { who: "-", ..GET }.allowed(&p), "plaintext clients have an address too");
        let p = from(json!({not.clone(): ["198.51.100.0/28"]}));
        assert!(!GET.allowed(&p) && Check { from_ip: "203.0.113.9", ..GET }.allowed(&p), "{not}");
        let p = from(json!({field: ["2001:db8::/32"]}));
        assert!(Check { from_ip: "2001:db8::1", ..GET }.allowed(&p) && !GET.allowed(&p));
        for bad in ["198.51.100.7/24", "198.51.100.300", "example.com"] {
            let e = convert_ap("p", json!({"rules": [{"from": [{"source": {field: ["203.0.113.0/24", bad]}}]}]})).unwrap_err();
            assert!(e.message.starts_with(&format!("spec.rules[0].from[0].source.{field}[1]")), "{e}");
        }
    }
    // Both lists set: both must match.
    let p = from(json!({"ipBlocks": ["198.51.100.0/24"], "remoteIpBlocks": ["198.51.100.7"]}));
    assert!(GET.allowed(&p) && !Check { from_ip: "198.51.100.8", ..GET }.allowed(&p));
}

#[test]
fn request_principals_are_refused_or_make_a_deny_stricter() {
    let rule = json!({"from": [{"source": {"requestPrincipals": ["issuer.example/*"], "namespaces": ["ops"]}}]});
    let e = convert_ap("p", json!({"action": "ALLOW", "rules": [rule]})).unwrap_err();
    assert_eq!(e.reason, "Unsupported");
    assert!(e.message.starts_with("spec.rules[0].from[0].source.requestPrincipals: not supported: request authentication"), "{e}");
    // An ALLOW stands without the rule: it allows nothing, ops included.
    let s = stand_in(&e).unwrap();
    assert_eq!((s.action, s.rules.len()), (crate::state::AuthzAction::Allow, 0));
    assert!(s.refused.as_deref().is_some_and(|m| m.contains("allows less, never more")), "{s:?}");
    assert!(GET.allowed(&[]) && !GET.allowed(&[s]), "the workload is default-deny, as with the policy");
    // A DENY is enforced without the field: it denies ops whatever the JWT.
    let e = convert_ap("p", json!({"action": "DENY", "rules": [rule]})).unwrap_err();
    assert!(e.message.contains("deny more, never less"), "{e}");
    let s = vec![stand_in(&e).unwrap()];
    assert!(!Check { who: "ops/x", ..GET }.allowed(&s));
    assert_eq!(Check { who: "ops/x", ..GET }.run(&s, &[]).1, Reason::InvalidPolicy);
    assert!(GET.allowed(&s), "still only ops");
    let e = convert_ap("p", json!({"action": "DENY", "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}]})).unwrap_err();
    assert!(e.message.starts_with("spec.rules[0].from[0].source.notRequestPrincipals"), "{e}");
}

#[test]
fn operations() {
    let to = |op: Value| allow_if(json!({"to": [{"operation": op}]}));
    let req = |method, target, host| Check { http: Some((method, target, host, &[])), ..GET };
    let cases: &[(Value, Check<'_>, bool)] = &[
        (json!({"hosts": ["api.shop"]}), req("GET", "/", "API.shop:8080"), true),
        (json!({"hosts": ["*.example.com"]}), req("GET", "/", "api.shop"), false),
        (json!({"notHosts": ["api.shop"]}), req("GET", "/", "api.shop"), false),
        (json!({"ports": ["8080"]}), GET, true),
        (json!({"ports": ["9090"]}), GET, false),
        (json!({"notPorts": ["8080"]}), GET, false),
        (json!({"methods": ["GET", "HEAD"]}), req("GET", "/", "x"), true),
        (json!({"methods": ["GET"]}), req("POST", "/", "x"), false),
        (json!({"notMethods": ["DELETE"]}), req("DELETE", "/", "x"), false),
        (json!({"paths": ["/api/*"]}), req("GET", "/api/items", "x"), true),
        (json!({"paths": ["*.css"]}), req("GET", "/a/site.css", "x"), true),
        (json!({"paths": ["/api"]}), req("GET", "/api/items", "x"), false),
        (json!({"notPaths": ["/admin*"]}), req("GET", "/admin/x", "x"), false),
        (json!({"paths": ["/admin"]}), req("GET", "/x/../admin", "x"), true),
    ];
    for (op, check, allowed) in cases {
        assert_eq!(check.allowed(&to(op.clone())), *allowed, "{op}");
    }
    for (op, field) in [
        (json!({"ports": ["http"]}), "spec.rules[0].to[0].operation.ports[0]"),
        (json!({"notPorts": ["80", "70000"]}), "spec.rules[0].to[0].operation.notPorts[1]"),
        (json!({"ports": [8080]}), "spec.rules[0].to[0].operation.ports[0]"),
        (json!({"methods": ["GET "]}), "spec.rules[0].to[0].operation.methods[0]"),
        (json!({"paths": ["/a/{*}/b"]}), "spec.rules[0].to[0].operation.paths[0]"),
        (json!({"notPaths": ["/a//b"]}), "spec.rules[0].to[0].operation.notPaths[0]"),
        (json!({"hosts": ["api.shop:8080"]}), "spec.rules[0].to[0].operation.hosts[0]"),
        (json!({"colour": ["blue"]}), "spec.rules[0].to[0].operation"),
    ] {
        let e = convert_ap("p", json!({"rules": [{"to": [{"operation": op}]}]})).unwrap_err();
        assert_eq!(e.reason, "Invalid", "{e}");
        assert!(e.message.starts_with(field), "{field}: {e}");
    }
}

#[test]
fn conditions() {
    let when = |key: &str, values: Value| allow_if(json!({"when": [{"key": key, "values": values}]}));
    let when_not = |key: &str, values: Value| allow_if(json!({"when": [{"key": key, "notValues": values}]}));
    let hdr = Check { http: Some(("GET", "/", "x", &["x-user: alice", "User-Agent: Mozilla/5.0"])), ..GET };
    assert!(hdr.allowed(&when("request.headers[User-Agent]", json!(["Mozilla/*"]))));
    assert!(!hdr.allowed(&when("request.headers[x-user]", json!(["bob"]))));
    assert!(!hdr.allowed(&when_not("request.headers[x-user]", json!(["al*"]))));
    assert!(GET.allowed(&when_not("request.headers[x-user]", json!(["alice"]))), "absent header");
    for key in ["source.ip", "remote.ip"] {
        assert!(GET.allowed(&when(key, json!(["198.51.100.0/24"]))), "{key}");
        assert!(!GET.allowed(&when_not(key, json!(["198.51.100.7"]))), "{key}");
    }
    assert!(GET.allowed(&when("destination.ip", json!(["198.51.100.20"]))));
    assert!(!GET.allowed(&when("destination.ip", json!(["203.0.113.0/24"]))));
    assert!(GET.allowed(&when("destination.port", json!(["80", "8080"]))));
    assert!(!GET.allowed(&when_not("destination.port", json!(["8080"]))));
    assert!(GET.allowed(&when("source.namespace", json!(["shop"]))));
    assert!(!Check { who: "-", ..GET }.allowed(&when("source.namespace", json!(["shop"]))), "requires mTLS");
    assert!(GET.allowed(&when("source.principal", json!(["cluster.local/ns/shop/sa/web"]))));
    assert!(!GET.allowed(&when_not("source.principal", json!(["*/sa/web"]))));
    // Known at L4 too: a TCP connection is decided by them.
    let tcp = Check { http: None, ..GET };
    assert!(tcp.allowed(&when("source.ip", json!(["198.51.100.7"]))));
    assert!(!tcp.allowed(&when("destination.port", json!(["9090"]))));
    for (key, reason, why) in [
        ("request.auth.claims[iss]", "Unsupported", "request authentication"),
        ("request.auth.principal", "Unsupported", "request authentication"),
        ("connection.sni", "Unsupported", "SNI"),
        ("experimental.envoy.filters.http.x", "Unsupported", "Envoy"),
    ] {
        let e = convert_ap("p", json!({"rules": [{"when": [{"key": key, "values": ["x"]}]}]})).unwrap_err();
        assert_eq!(e.reason, reason, "{e}");
        assert!(e.message.starts_with("spec.rules[0].when[0].key") && e.message.contains(why), "{e}");
        // In a DENY the condition is dropped: the rule denies more.
        let e = convert_ap("p", json!({"action": "DENY", "rules": [{"when": [{"key": key, "values": ["x"]}]}]})).unwrap_err();
        assert!(!GET.allowed(&[stand_in(&e).unwrap()]), "{key}");
    }
    for (cond, field) in [
        (json!({"key": "source.color", "values": ["x"]}), "spec.rules[0].when[0].key"),
        (json!({"key": "request.headers[]", "values": ["x"]}), "spec.rules[0].when[0].key"),
        (json!({"key": "destination.port", "values": ["eighty"]}), "spec.rules[0].when[0].values[0]"),
        (json!({"key": "source.ip", "notValues": ["10.0.0.1/8"]}), "spec.rules[0].when[0].notValues[0]"),
        (json!({"key": "source.namespace"}), "spec.rules[0].when[0]"),
        (json!({"values": ["x"]}), "spec.rules[0].when[0]"),
    ] {
        let e = convert_ap("p", json!({"rules": [{"when": [cond]}]})).unwrap_err();
        assert_eq!(e.reason, "Invalid", "{e}");
        assert!(e.message.starts_with(field), "{field}: {e}");
    }
}

/// Istio: HTTP-only fields on a TCP connection make an ALLOW rule match
/// nothing and a DENY rule match regardless of them.
#[test]
fn http_only_fields_on_tcp_are_stricter() {
    let tcp = Check { http: None, ..GET };
    for rule in [
        json!({"to": [{"operation": {"methods": ["GET"]}}]}),
        json!({"to": [{"operation": {"paths": ["/x"]}}]}),
        json!({"to": [{"operation": {"notHosts": ["x"]}}]}),
        json!({"when": [{"key": "request.headers[x-user]", "values": ["a"]}]}),
    ] {
        assert!(!tcp.allowed(&allow_if(rule.clone())), "ALLOW {rule}");
        assert!(!tcp.allowed(&deny_if(rule.clone())), "DENY {rule}");
    }
    let rule = json!({"from": [{"source": {"namespaces": ["ops"]}}], "to": [{"operation": {"methods": ["GET"]}}]});
    assert!(tcp.allowed(&deny_if(rule)), "the L4 parts still have to match");
}

/// A policy in the root namespace (istio-system) applies to every
/// workload its selector matches, in every namespace.
#[test]
fn root_namespace_policies_apply_mesh_wide() {
    let mesh = convert_ap_in("istio-system", "deny-ops", json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["ops"]}}]}]})).unwrap();
    let ops = Check { who: "ops/x", ..GET };
    assert!(!ops.allowed(std::slice::from_ref(&mesh)));
    assert!(!Check { namespace: "other", ..ops }.allowed(std::slice::from_ref(&mesh)));
    let sel = convert_ap_in("istio-system", "allow-nothing", json!({"selector": {"matchLabels": {"app": "api"}}})).unwrap();
    assert!(!GET.allowed(std::slice::from_ref(&sel)) && Check { app: "db", ..GET }.allowed(&[sel]));
    // Another root namespace.
    let authz = Authorizer::build(&[mesh], "mesh-root", &[]);
    let labels: Labels = [("app".to_string(), "api".to_string())].into();
    let wp = authz.for_workload("shop", &labels);
    assert!(wp.is_empty(), "istio-system is an ordinary namespace then");
}

/// An unknown field or wrong type: refused with its path; a DENY that
/// cannot be read denies all it selects; an ALLOW allows nothing (what it
/// selects stays default-deny).
#[test]
fn unreadable_objects_fail_closed_when_they_deny() {
    let e = convert_ap("p", json!({"action": "ALLOW", "selector": {"matchLabels": {"app": "api"}}, "rules": [{"to": [{"operation": {"ports": ["80"]}}], "colour": 1}]})).unwrap_err();
    assert_eq!(e.reason, "Invalid");
    assert!(e.message.starts_with("spec.rules[0]") && e.message.contains("unknown field `colour`"), "{e}");
    let s = stand_in(&e).unwrap();
    assert_eq!((s.action, s.rules.len()), (crate::state::AuthzAction::Allow, 0));
    assert_eq!(s.selector, Some([("app".to_string(), "api".to_string())].into()));
    // No action: Istio's default, ALLOW.
    let e = convert_ap("p", json!({"rules": [{"colour": 1}]})).unwrap_err();
    assert_eq!(stand_in(&e).map(|s| (s.action, s.rules.len(), s.selector)), Some((crate::state::AuthzAction::Allow, 0, None)));
    let e = convert_ap("p", json!({"action": "DENY", "selector": {"matchLabels": {"app": "api"}}, "rules": [{"from": "ops"}]})).unwrap_err();
    assert!(e.message.starts_with("spec.rules[0].from: invalid type"), "{e}");
    let s = stand_in(&e).unwrap();
    assert_eq!(s.selector, Some([("app".to_string(), "api".to_string())].into()));
    assert!(s.refused.is_some());
    assert_eq!(GET.run(std::slice::from_ref(&s), &[]).1, Reason::InvalidPolicy);
    assert!(!Check { who: "-", http: None, ..GET }.allowed(std::slice::from_ref(&s)));
    assert!(Check { app: "db", ..GET }.allowed(&[s]), "only what it selected");
    // Invalid values in a DENY: the same.
    let e = convert_ap("p", json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["x"]}}]}]})).unwrap_err();
    assert!(!Check { app: "db", ..GET }.allowed(&[stand_in(&e).unwrap()]), "no selector: the namespace");
}

#[test]
fn ignore_path_case_annotation() {
    let annotations: BTreeMap<String, String> = [(IGNORE_PATH_CASE_ANNOTATION.to_string(), "true".to_string())].into();
    let kind = find("security.istio.io/v1", "AuthorizationPolicy").unwrap();
    let spec = json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]});
    let Converted::AuthorizationPolicy(p) = kind.convert(&meta("p", "shop", &annotations), &spec).unwrap() else { panic!() };
    assert!(p.ignore_path_case);
    assert!(!Check { http: Some(("GET", "/ADMIN", "x", &[])), ..GET }.allowed(&[p]));
    let bad: BTreeMap<String, String> = [(IGNORE_PATH_CASE_ANNOTATION.to_string(), "yes".to_string())].into();
    let e = kind.convert(&meta("p", "shop", &bad), &spec).unwrap_err();
    assert!(e.message.starts_with("metadata.annotations.nodemesh.io/ignore-path-case"), "{e}");
}

fn convert_pa(spec: Value) -> Result<PeerAuthentication, Refused> {
    let none = BTreeMap::new();
    let kind = find("security.istio.io/v1", "PeerAuthentication").unwrap();
    match kind.convert(&meta("pa", "shop", &none), &spec)? {
        Converted::PeerAuthentication(p) => Ok(p),
        other => panic!("{other:?}"),
    }
}

#[test]
fn peer_authentication() {
    use PeerAuthMode::*;
    for (mode, want) in [("STRICT", Strict), ("PERMISSIVE", Permissive), ("DISABLE", Disable), ("UNSET", Unset)] {
        assert_eq!(convert_pa(json!({"mtls": {"mode": mode}})).unwrap().mode, want);
    }
    let p = convert_pa(json!({})).unwrap();
    assert_eq!((p.mode, p.selector), (Unset, None), "no mtls: inherit");
    let p = convert_pa(json!({"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "STRICT"},
                               "portLevelMtls": {"8080": {"mode": "DISABLE"}, "9090": {}}}))
    .unwrap();
    assert_eq!(p.port_level, [(8080, Disable), (9090, Unset)].into());
    for (spec, field) in [
        (json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}}), "spec.portLevelMtls: needs a selector"),
        (json!({"selector": {"matchLabels": {}}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}), "spec.portLevelMtls: needs a selector"),
        (json!({"selector": {"matchLabels": {"app": "api"}}, "portLevelMtls": {"0": {"mode": "DISABLE"}}}), "spec.portLevelMtls.0"),
        (json!({"mtls": {"mode": "strict"}}), "spec.mtls.mode: unknown variant"),
    ] {
        let e = convert_pa(spec).unwrap_err();
        assert!(e.message.starts_with(field), "{field}: {e}");
    }
    // Refused but STRICT somewhere: stays STRICT for what it selects.
    let none = BTreeMap::new();
    let kind = find("security.istio.io/v1", "PeerAuthentication").unwrap();
    let e = kind.convert(&meta("pa", "shop", &none), &json!({"mtls": {"mode": "STRICT", "colour": 1}})).unwrap_err();
    let Some(Converted::PeerAuthentication(s)) = e.stand_in.as_deref() else { panic!("{e:?}") };
    assert_eq!((s.mode, &s.selector), (Strict, &None));
    let e = kind.convert(&meta("pa", "shop", &none), &json!({"mtls": {"mode": "PERMISSIVE"}, "colour": 1})).unwrap_err();
    assert!(e.stand_in.is_none(), "a refused PERMISSIVE is left out");
}
