//! Conversion, conditions and precedence of Gateway API routes, from
//! local-file YAML (the same objects a cluster holds).

use std::path::Path as FsPath;

use http::{HeaderMap, HeaderValue, Method};

use super::*;
use crate::route::{RequestView, RouteTable, Selected, Selection};

const BASE: &str = r#"
nodes: [{name: node-a}]
namespaces:
  - {name: shop, labels: {nodemesh.io/dataplane-mode: enabled}}
  - {name: other, labels: {nodemesh.io/dataplane-mode: enabled}}
services:
  - {name: echo, namespace: shop, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 7070}, {name: tcp, port: 9090}]}
  - {name: echo-v1, namespace: shop, selector: {app: echo, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 7070}]}
  - {name: echo-v2, namespace: shop, selector: {app: echo, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 7070}]}
"#;

fn state(objects: &str) -> crate::state::MeshState {
    crate::localfile::parse(FsPath::new("x"), &format!("{BASE}{objects}")).unwrap()
}

fn refused(objects: &str) -> String {
    crate::localfile::parse(FsPath::new("x"), &format!("{BASE}{objects}")).unwrap_err().to_string()
}

fn view<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap, client: &'a str) -> RequestView<'a> {
    RequestView { method, path, query: None, headers, client_namespace: client, port: 80 }
}

fn backend(s: &Selected<'_>) -> String {
    let b = s.backend.expect("a backend");
    b.service.as_ref().map_or_else(|| "(own)".into(), |s| s.name.clone())
}

fn route_doc(name: &str, created: Option<&str>, rules: &str) -> String {
    let created = created.map(|c| format!("\n  creationTimestamp: \"{c}\"")).unwrap_or_default();
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: shop{created}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\n  rules:\n{rules}"
    )
}

/// The spec's precedence across rules and routes, one table: each row a
/// request and the route/rule that must win.
#[test]
fn precedence_follows_the_httproute_spec() {
    let a = route_doc(
        "a",
        Some("2024-01-02T00:00:00Z"),
        r#"  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: "1"}, {name: x-b, value: "1"}]}]
    backendRefs: [{name: echo-v1, port: 80}]
"#,
    );
    let b = route_doc(
        "b",
        Some("2024-01-01T00:00:00Z"),
        r#"  - matches: [{path: {type: Exact, value: /api}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api/v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-a, value: "1"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: q, value: "1"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: echo-v2, port: 80}]
"#,
    );
    // c: same as b's last rule, newer and alphabetically first: b (older) wins.
    let c = route_doc("aa-newer", Some("2024-06-01T00:00:00Z"), "  - backendRefs: [{name: echo-v1, port: 80}]\n");
    let s = state(&format!("{a}{b}{c}"));
    let table = RouteTable::from_state(&s);
    let h = |pairs: &[(&'static str, &'static str)]| {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    };
    #[rustfmt::skip]
    let cases: &[(&Method, &str, HeaderMap, &str, usize)] = &[
        // Exact beats every prefix, even a longer route's header match.
        (&Method::GET, "/api", h(&[("x-a", "1"), ("x-b", "1")]), "shop/b", 0),
        // The longest prefix wins over method and headers.
        (&Method::POST, "/api/v2/x", h(&[("x-a", "1")]), "shop/b", 1),
        // Same prefix: a method beats headers.
        (&Method::POST, "/api/x", h(&[("x-a", "1"), ("x-b", "1")]), "shop/a", 2),
        // Same prefix, no method: more headers win.
        (&Method::GET, "/api/x", h(&[("x-a", "1"), ("x-b", "1")]), "shop/a", 3),
        (&Method::GET, "/api/x", h(&[("x-a", "1")]), "shop/b", 2),
        // Headers beat query parameters.
        (&Method::GET, "/api/x?q=1", h(&[("x-a", "1")]), "shop/b", 2),
        (&Method::GET, "/api/x?q=1", h(&[]), "shop/b", 3),
        // Equal matches: the oldest route (b), not the first by name (a, aa-newer).
        (&Method::GET, "/api/x", h(&[]), "shop/a", 1),
        (&Method::GET, "/other", h(&[]), "shop/b", 4),
    ];
    for (i, (m, p, hs, route, rule)) in cases.iter().enumerate() {
        let v = RequestView { method: m, path: p, query: None, headers: hs, client_namespace: "shop", port: 80 };
        let sel = table.select("shop", "echo", &v, 0).rule().unwrap_or_else(|| panic!("case {i}: nothing selected"));
        assert_eq!((sel.route, sel.rule_index), (*route, *rule), "case {i}: {m} {p}");
    }
}

#[test]
fn equal_routes_without_timestamps_go_by_namespace_and_name() {
    let x = route_doc("x", None, "  - backendRefs: [{name: echo-v2, port: 80}]\n");
    let y = route_doc("w", None, "  - backendRefs: [{name: echo-v1, port: 80}]\n");
    let table = RouteTable::from_state(&state(&format!("{x}{y}")));
    let h = HeaderMap::new();
    let sel = table.select("shop", "echo", &view(&Method::GET, "/", &h, "shop"), 0).rule().unwrap();
    assert_eq!((sel.route, backend(&sel).as_str()), ("shop/w", "echo-v1"));
    // A timestamp makes a route older than any without one.
    let x = route_doc("x", Some("2030-01-01T00:00:00Z"), "  - backendRefs: [{name: echo-v2, port: 80}]\n");
    let table = RouteTable::from_state(&state(&format!("{x}{y}")));
    let sel = table.select("shop", "echo", &view(&Method::GET, "/", &h, "shop"), 0).rule().unwrap();
    assert_eq!(sel.route, "shop/x");
}

#[test]
fn unmatched_requests_under_gateway_routes_are_404_and_weights_are_proportions() {
    let r = route_doc(
        "w",
        None,
        r#"  - matches: [{path: {type: Exact, value: /split}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 7}, {name: echo-v2, port: 80, weight: 3}, {name: echo, port: 80, weight: 0}]
  - matches: [{path: {type: Exact, value: /none}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 0}]
  - matches: [{path: {type: Exact, value: /empty}}]
"#,
    );
    let table = RouteTable::from_state(&state(&r));
    let h = HeaderMap::new();
    assert_eq!(table.select("shop", "echo", &view(&Method::GET, "/elsewhere", &h, "shop"), 0), Selection::Unmatched { route: "shop/w" });
    let mut counts = std::collections::BTreeMap::new();
    for rand in 0..10 {
        let sel = table.select("shop", "echo", &view(&Method::GET, "/split", &h, "shop"), rand).rule().unwrap();
        *counts.entry(backend(&sel)).or_insert(0) += 1;
    }
    assert_eq!(counts, [("echo-v1".to_string(), 7), ("echo-v2".to_string(), 3)].into());
    for p in ["/none", "/empty"] {
        let sel = table.select("shop", "echo", &view(&Method::GET, p, &h, "shop"), 0).rule().unwrap();
        assert!(sel.backend.is_none(), "{p}: nothing to forward to (500)");
    }
}

#[test]
fn consumer_routes_apply_to_their_own_namespace_only_and_ports_scope_routes() {
    let objects = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: other}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: shop}]
  rules: [{backendRefs: [{name: echo, namespace: shop, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
  rules: [{backendRefs: [{name: echo-v2, port: 80}]}]
"#;
    let objects = objects.replace("port: 8080}]\n  rules: [{backendRefs: [{name: echo-v2", "port: 80}]\n  rules: [{backendRefs: [{name: echo-v2");
    let table = RouteTable::from_state(&state(&objects));
    let h = HeaderMap::new();
    let sel = table.select("shop", "echo", &view(&Method::GET, "/", &h, "other"), 0).rule().unwrap();
    assert_eq!((sel.route, backend(&sel).as_str()), ("other/consumer", "echo"));
    let sel = table.select("shop", "echo", &view(&Method::GET, "/", &h, "shop"), 0).rule().unwrap();
    assert_eq!((sel.route, backend(&sel).as_str()), ("shop/producer", "echo-v2"));
    // The producer route names port 80: another port of the service has no route.
    let v = RequestView { port: 7070, ..view(&Method::GET, "/", &h, "shop") };
    assert_eq!(table.select("shop", "echo", &v, 0), Selection::NoRoute);
}

#[test]
fn matches_regex_query_method_and_grpc() {
    let objects = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: m, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}}]
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{headers: [{type: RegularExpression, name: x-user, value: "a.*"}], queryParams: [{name: animal, value: whale}]}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{method: DELETE}]
      backendRefs: [{name: echo-v2, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 7070}]
  rules:
    - matches: [{method: {service: pkg.Echo, method: Say}}]
      backendRefs: [{name: echo-v1, port: 7070}]
    - matches: [{method: {service: pkg.Echo}}]
      backendRefs: [{name: echo-v2, port: 7070}]
    - matches: [{method: {method: Other}}]
      backendRefs: [{name: echo, port: 7070}]
"#;
    let table = RouteTable::from_state(&state(objects));
    let none = HeaderMap::new();
    let mut user = HeaderMap::new();
    user.insert("x-user", HeaderValue::from_static("alice"));
    let pick = |m: &Method, p: &str, q: Option<&str>, h: &HeaderMap, port: u16| {
        let v = RequestView { method: m, path: p, query: q, headers: h, client_namespace: "shop", port };
        table.select("shop", "echo", &v, 0).rule().map(|s| (s.route.to_owned(), s.rule_index))
    };
    let m = |r: &str, i: usize| Some((r.to_owned(), i));
    assert_eq!(pick(&Method::GET, "/items/42", None, &none, 80), m("shop/m", 0));
    assert_eq!(pick(&Method::GET, "/items/42x", None, &none, 80), None, "the whole path");
    assert_eq!(pick(&Method::GET, "/x", Some("animal=whale&b=1"), &user, 80), m("shop/m", 1));
    assert_eq!(pick(&Method::GET, "/x", Some("animal=dolphin&animal=whale"), &user, 80), None, "the first value counts");
    assert_eq!(pick(&Method::GET, "/x", Some("animal=whale"), &none, 80), None);
    assert_eq!(pick(&Method::DELETE, "/x", None, &none, 80), m("shop/m", 2));
    assert_eq!(pick(&Method::POST, "/pkg.Echo/Say", None, &none, 7070), m("shop/g", 0));
    assert_eq!(pick(&Method::POST, "/pkg.Echo/Other", None, &none, 7070), m("shop/g", 1), "the service beats a method alone");
    assert_eq!(pick(&Method::POST, "/pkg.Else/Other", None, &none, 7070), m("shop/g", 2));
    assert_eq!(pick(&Method::POST, "/pkg.Else/Say", None, &none, 7070), None);
}

#[test]
fn conditions_per_parent_name_the_reason() {
    let svc = crate::localfile::parse(FsPath::new("x"), BASE).unwrap().services;
    let spec: api::HttpRouteSpec = serde_yaml::from_str(
        r#"
parentRefs:
  - {group: "", kind: Service, name: echo, port: 80}
  - {group: "", kind: Service, name: nope}
  - {group: "", kind: Service, name: echo, port: 81}
  - {group: "", kind: Service, name: echo, port: 9090}
  - {group: "", kind: Service, name: echo, sectionName: http}
  - {name: some-gateway}
  - {group: gateway.networking.k8s.io, kind: Gateway, name: gw}
rules:
  - backendRefs:
      - {name: echo-v1, port: 80}
      - {name: missing, port: 80}
      - {name: echo-v1, port: 81}
      - {name: echo-v1, namespace: elsewhere, port: 80}
      - {group: example.com, kind: Bucket, name: b}
"#,
    )
    .unwrap();
    let out = convert(&RouteObject { namespace: "shop", name: "r", created: None, spec: Spec::Http(&spec) }, &svc);
    // Gateways are not ours: no status for them.
    let got: Vec<(bool, &str)> = out.parents.iter().map(|p| (p.accepted.status, p.accepted.reason)).collect();
    assert_eq!(got, [(true, "Accepted"), (false, "NoMatchingParent"), (false, "NoMatchingParent"), (false, "UnsupportedValue"), (false, "UnsupportedValue")]);
    assert_eq!(out.routes.len(), 1, "only the accepted parent is routed");
    let refs = &out.parents[0].resolved_refs;
    assert_eq!((refs.status, refs.reason), (false, "InvalidKind"));
    for want in ["backendRefs[1]: service shop/missing does not exist", "backendRefs[2]: service shop/echo-v1 has no port 81", "not this route's parent", "Bucket"] {
        assert!(refs.message.contains(want), "{want}: {}", refs.message);
    }
    let b = &out.routes[0].rules[0].backends;
    assert_eq!(b.iter().map(|b| b.invalid.is_some()).collect::<Vec<_>>(), [false, true, true, true, true]);
    assert!(out.parents[3].accepted.message.contains("port 9090 of service shop/echo is not declared HTTP"), "{}", out.parents[3].accepted.message);
    assert!(out.parents[4].accepted.message.contains("sectionName"));

    // Only RefNotPermitted left: its own reason.
    let spec: api::HttpRouteSpec = serde_yaml::from_str("parentRefs: [{group: \"\", kind: Service, name: echo}]\nrules: [{backendRefs: [{name: echo-v1, namespace: elsewhere, port: 80}]}]").unwrap();
    let out = convert(&RouteObject { namespace: "shop", name: "r", created: None, spec: Spec::Http(&spec) }, &svc);
    assert_eq!(out.parents[0].resolved_refs.reason, "RefNotPermitted");
}

/// Invalid specs: every accepted-looking parent is refused with
/// UnsupportedValue naming the field; nothing of the route is applied.
#[test]
fn unsupported_fields_refuse_the_route_naming_the_field() {
    let svc = crate::localfile::parse(FsPath::new("x"), BASE).unwrap().services;
    let cases = [
        ("rules: [{matches: [{path: {type: RegularExpression, value: \"(\"}}]}]", "spec.rules[0].matches[0].path.value"),
        ("rules: [{matches: [{path: {value: \"a\"}}]}]", "spec.rules[0].matches[0].path.value"),
        ("rules: [{matches: [{path: {value: \"/a//b\"}}]}]", "spec.rules[0].matches[0].path.value"),
        ("rules: [{filters: [{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}]}]", "spec.rules[0].filters[0].type"),
        ("rules: [{filters: [{type: CORS, cors: {}}]}]", "spec.rules[0].filters[0].type"),
        ("rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]}]", "spec.rules[0].filters[0].requestRedirect.statusCode"),
        ("rules: [{filters: [{type: RequestRedirect, requestRedirect: {}}], backendRefs: [{name: echo, port: 80}]}]", "spec.rules[0].backendRefs"),
        ("rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]", "spec.rules[0].filters[0].urlRewrite.path"),
        ("rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: \"bad name\", value: x}]}}]}]", "spec.rules[0].filters[0].requestHeaderModifier.set[0].name"),
        ("rules: [{filters: [{type: RequestHeaderModifier}]}]", "spec.rules[0].filters[0].requestHeaderModifier"),
        ("rules: [{timeouts: {request: 1s, backendRequest: 2s}}]", "spec.rules[0].timeouts.backendRequest"),
        ("rules: [{timeouts: {request: 1d}}]", "spec.rules[0].timeouts.request"),
        ("rules: [{backendRefs: [{name: echo}]}]", "spec.rules[0].backendRefs[0].port"),
    ];
    for (rules, field) in cases {
        let spec: api::HttpRouteSpec = serde_yaml::from_str(&format!("parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n{rules}")).unwrap();
        let out = convert(&RouteObject { namespace: "shop", name: "r", created: None, spec: Spec::Http(&spec) }, &svc);
        assert!(out.routes.is_empty(), "{rules}");
        let a = &out.parents[0].accepted;
        assert_eq!((a.status, a.reason), (false, "UnsupportedValue"), "{rules}");
        assert!(a.message.starts_with(&format!("{field}: ")), "{rules}: {}", a.message);
    }
    // The schema's maxItems, which the API server enforces and the local
    // file does not: past them the route is refused, naming the list.
    let many = |n: usize, item: &str| vec![item; n].join(", ");
    let hdr = "{name: x-a, value: b}";
    let limits = [
        (format!("rules: [{}]", many(17, "{}")), "spec.rules"),
        (format!("rules: [{{matches: [{}]}}]", many(65, "{path: {value: /}}")), "spec.rules[0].matches"),
        (format!("rules: [{{matches: [{{headers: [{}]}}]}}]", many(17, hdr)), "spec.rules[0].matches[0].headers"),
        (format!("rules: [{{matches: [{{queryParams: [{}]}}]}}]", many(17, hdr)), "spec.rules[0].matches[0].queryParams"),
        (format!("rules: [{{backendRefs: [{}]}}]", many(17, "{name: echo, port: 80}")), "spec.rules[0].backendRefs"),
        (format!("rules: [{{filters: [{}]}}]", many(17, "{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: y}]}}")), "spec.rules[0].filters"),
        (format!("rules: [{{backendRefs: [{{name: echo, port: 80, filters: [{}]}}]}}]", many(17, "{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: y}]}}")), "spec.rules[0].backendRefs[0].filters"),
    ];
    for (rules, field) in &limits {
        let spec: api::HttpRouteSpec = serde_yaml::from_str(&format!("parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n{rules}")).unwrap();
        let out = convert(&RouteObject { namespace: "shop", name: "r", created: None, spec: Spec::Http(&spec) }, &svc);
        assert!(out.routes.is_empty(), "{field}");
        assert!(out.parents[0].accepted.message.starts_with(&format!("{field}: ")), "{field}: {}", out.parents[0].accepted.message);
    }
    // At the limit: accepted.
    let spec: api::HttpRouteSpec = serde_yaml::from_str(&format!("parentRefs: [{{group: \"\", kind: Service, name: echo}}]\nrules: [{{matches: [{}]}}]", many(64, "{path: {value: /}}"))).unwrap();
    assert_eq!(convert(&RouteObject { namespace: "shop", name: "r", created: None, spec: Spec::Http(&spec) }, &svc).routes.len(), 1);
    // GRPCRoute has the same limits (its matches were not bounded).
    let spec: api::GrpcRouteSpec = serde_yaml::from_str(&format!("parentRefs: [{{group: \"\", kind: Service, name: echo}}]\nrules: [{{matches: [{}]}}]", many(65, "{method: {service: a.B}}"))).unwrap();
    let out = convert(&RouteObject { namespace: "shop", name: "r", created: None, spec: Spec::Grpc(&spec) }, &svc);
    assert!(out.routes.is_empty() && out.parents[0].accepted.message.starts_with("spec.rules[0].matches: "), "{}", out.parents[0].accepted.message);

    // The local file says the same, naming the document.
    let doc = route_doc("bad", None, "  - filters: [{type: CORS, cors: {}}]\n");
    let e = refused(&doc);
    assert!(e.contains("documents[1] (HTTPRoute shop/bad).spec.parentRefs: UnsupportedValue: spec.rules[0].filters[0].type: CORS filters are not supported"), "{e}");
    // A field of another channel is an error with its name, not ignored.
    let e = refused(&route_doc("bad", None, "  - retry: {attempts: 2}\n"));
    assert!(e.contains("unknown field `retry`"), "{e}");
    let e = refused("---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec: {}\n");
    assert!(e.contains("apiVersion"), "{e}");
    let e = refused("---\napiVersion: example.com/v1\nkind: Widget\nmetadata: {name: r, namespace: shop}\n");
    assert!(e.contains("example.com/v1 Widget is not a kind the mesh reads") && e.contains("gateway.networking.k8s.io/v1 HTTPRoute"), "{e}");
}

#[test]
fn filters_timeouts_and_defaults_convert() {
    let r = route_doc(
        "f",
        None,
        r#"  - matches: [{path: {value: /p}}]
    timeouts: {request: 1m30s, backendRequest: 500ms}
    filters:
      - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Set, value: a}], add: [{name: X-Add, value: b}], remove: [X-Remove]}}
      - {type: URLRewrite, urlRewrite: {hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /q}}}
      - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}, fraction: {numerator: 1, denominator: 4}}}
    backendRefs:
      - name: echo-v1
        port: 80
        filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-resp, value: "1"}]}}]
  - timeouts: {request: 0s}
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]
"#,
    );
    let s = state(&r);
    let rules = &s.routes[0].rules;
    assert_eq!(rules[0].timeout, Some(RouteDuration(Duration::from_secs(90))));
    assert_eq!(rules[0].retries.per_try_timeout, Some(RouteDuration(Duration::from_millis(500))));
    assert_eq!(rules[0].retries.attempts, RetryPolicy::default().attempts, "the mesh's default retries");
    assert_eq!(
        rules[0].filters,
        vec![
            Filter::RequestHeaderModifier(HeaderModifier { set: vec![("x-set".into(), "a".into())], add: vec![("x-add".into(), "b".into())], remove: vec!["x-remove".into()] }),
            Filter::UrlRewrite { hostname: Some("example.org".into()), path: Some(PathModifier::ReplacePrefixMatch("/q".into())) },
            Filter::RequestMirror { backend: BackendService { namespace: "shop".into(), name: "echo-v2".into(), port: 80 }, per_million: 250_000, subset: None },
        ]
    );
    assert_eq!(rules[0].backends[0].filters.len(), 1);
    assert_eq!(rules[0].matches.as_ref().unwrap()[0].path.as_ref().unwrap().prefix.as_deref(), Some("/p"), "PathPrefix by default");
    // No matches: PathPrefix /; 0s: no timeout; a redirect's status 302.
    assert_eq!(rules[1].matches.as_ref().unwrap()[0].path.as_ref().unwrap().prefix.as_deref(), Some("/"));
    assert_eq!(rules[1].timeout, None);
    assert!(matches!(&rules[1].filters[0], Filter::RequestRedirect(Redirect { status_code: 302, scheme: Some(s), .. }) if s == "https"));
    // An explicitly empty list is "no matches specified" too: every request.
    let s = state(&route_doc("e", None, "  - matches: []\n    backendRefs: [{name: echo-v1, port: 80}]\n"));
    let h = HeaderMap::new();
    let table = RouteTable::from_state(&s);
    let sel = table.select("shop", "echo", &view(&Method::GET, "/anything", &h, "shop"), 0).rule().expect("matches: [] matched nothing");
    assert_eq!(backend(&sel), "echo-v1");
}

#[test]
fn gateway_durations() {
    for (s, d) in [("1s", Some(1000)), ("500ms", Some(500)), ("1h30m", Some(5_400_000)), ("1m1s1ms", Some(61_001)), ("0s", None), ("0ms", None)] {
        assert_eq!(duration(s).unwrap(), d.map(Duration::from_millis), "{s}");
    }
    for bad in ["", "1", "s", "1d", "123456s", "1s1s1s1s1s", "-1s", "1.5s"] {
        assert!(duration(bad).is_err(), "{bad}");
    }
}
