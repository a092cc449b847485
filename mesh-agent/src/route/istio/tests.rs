//! VirtualService and DestinationRule from local-file YAML (the objects a
//! cluster holds), through the route table.

use std::{path::Path as FsPath, time::Duration};

use http::{HeaderMap, HeaderValue, Method};

use crate::route::{Filter, LoadBalancer, PathModifier, RequestView, RetryOn, RouteTable, Selected, Selection};

const BASE: &str = r#"
nodes: [{name: node-a}]
namespaces:
  - {name: default, labels: {nodemesh.io/dataplane-mode: enabled}}
  - {name: other, labels: {nodemesh.io/dataplane-mode: enabled}}
services:
  - {name: reviews, namespace: default, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
  - {name: ratings, namespace: default, selector: {app: ratings}, ports: [{name: http, port: 9080}, {name: http-admin, port: 9090}]}
  - {name: db, namespace: default, selector: {app: db}, ports: [{name: tcp, port: 5432}]}
"#;

const DR_REVIEWS: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
  - name: v3
    labels: {version: v3}
"#;

fn parse(objects: &str) -> Result<crate::state::MeshState, String> {
    crate::localfile::parse(FsPath::new("x"), &format!("{BASE}{objects}")).map_err(|e| e.to_string())
}

fn table(objects: &str) -> RouteTable {
    RouteTable::from_state(&parse(objects).unwrap())
}

fn vs(name: &str, created: Option<&str>, spec: &str) -> String {
    let created = created.map(|c| format!(", creationTimestamp: \"{c}\"")).unwrap_or_default();
    format!("\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: default{created}}}\nspec:\n{spec}")
}

struct Req {
    method: Method,
    path: &'static str,
    query: Option<&'static str>,
    headers: HeaderMap,
    client: &'static str,
}

fn req(path: &'static str) -> Req {
    Req { method: Method::GET, path, query: None, headers: HeaderMap::new(), client: "default" }
}

impl Req {
    fn header(mut self, n: &'static str, v: &'static str) -> Self {
        self.headers.append(n, HeaderValue::from_static(v));
        self
    }
    fn view(&self) -> RequestView<'_> {
        RequestView { method: &self.method, path: self.path, query: self.query, headers: &self.headers, client_namespace: self.client, port: 9080 }
    }
}

fn pick<'a>(t: &'a RouteTable, r: &Req, rand: u32) -> Option<Selected<'a>> {
    t.select("default", "reviews", &r.view(), rand).rule()
}

/// The subset a request goes to, or why none.
fn subset(t: &RouteTable, r: &Req) -> String {
    match pick(t, r, 0) {
        None => "(no rule)".into(),
        Some(s) => match s.backend {
            None => "(no backend)".into(),
            Some(b) if b.invalid.is_some() => format!("invalid: {}", b.invalid.as_ref().unwrap()),
            Some(b) => b.subset_name.clone().unwrap_or_else(|| "(all)".into()),
        },
    }
}

/// Istio's request routing task: `end-user: jason` to v2, the rest to v1.
#[test]
fn request_routing_by_header_and_subsets() {
    let t = table(&format!(
        "{DR_REVIEWS}{}",
        vs(
            "reviews",
            None,
            "  hosts: [reviews]\n  http:\n  - match:\n    - headers:\n        end-user:\n          exact: jason\n    route:\n    - destination: {host: reviews, subset: v2}\n  - route:\n    - destination: {host: reviews, subset: v1}\n"
        )
    ));
    assert_eq!(subset(&t, &req("/reviews/0").header("end-user", "jason")), "v2");
    assert_eq!(subset(&t, &req("/reviews/0").header("end-user", "jasonx")), "v1");
    assert_eq!(subset(&t, &req("/")), "v1");
    let s = pick(&t, &req("/"), 0).unwrap();
    assert_eq!(s.backend.unwrap().subset.as_ref().unwrap().get("version").map(String::as_str), Some("v1"));
    assert_eq!(s.backend.unwrap().service, None, "the routed service itself, on the dialled port");
    assert_eq!(s.route, "default/reviews");
}

/// Traffic shifting: 50/50 over the uniform draw, then 100.
#[test]
fn weights_split_the_draw() {
    let route = |w1: u32, w3: u32| {
        vs(
            "reviews",
            None,
            &format!("  hosts: [reviews.default.svc.cluster.local]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: v1}}\n      weight: {w1}\n    - destination: {{host: reviews, subset: v3}}\n      weight: {w3}\n"),
        )
    };
    let t = table(&format!("{DR_REVIEWS}{}", route(50, 50)));
    let counts = (0..100).fold([0; 2], |mut c, r| {
        let b = pick(&t, &req("/"), r).unwrap().backend.unwrap();
        c[usize::from(b.subset_name.as_deref() == Some("v3"))] += 1;
        c
    });
    assert_eq!(counts, [50, 50]);
    let t = table(&format!("{DR_REVIEWS}{}", route(0, 100)));
    assert!((0..100).all(|r| pick(&t, &req("/"), r).unwrap().backend.unwrap().subset_name.as_deref() == Some("v3")));
}

#[test]
fn matches_follow_istio() {
    let t = table(&format!(
        "{DR_REVIEWS}{}",
        vs(
            "reviews",
            None,
            r#"  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {exact: /Exact}, ignoreUriCase: true}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {regex: "/r/[0-9]+"}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{queryParams: {q: {exact: "1"}}, method: {exact: POST}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{withoutHeaders: {x-skip: {}}, sourceNamespace: other}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{headers: {x-p: {prefix: ab}}}, {headers: {x-present: {}}}]
    route: [{destination: {host: reviews, subset: v3}}]
"#
        )
    ));
    // A string prefix, not segments.
    assert_eq!(subset(&t, &req("/apix")), "v1");
    assert_eq!(subset(&t, &req("/exact")), "v2");
    assert_eq!(subset(&t, &req("/EXACT")), "v2");
    assert_eq!(subset(&t, &req("/exact/x")), "(no rule)");
    assert_eq!(subset(&t, &req("/r/12")), "v3");
    assert_eq!(subset(&t, &req("/r/12x")), "(no rule)");
    let post = Req { method: Method::POST, query: Some("q=1"), ..req("/x") };
    assert_eq!(subset(&t, &post), "v1");
    let get = Req { query: Some("q=1"), ..req("/x") };
    assert_eq!(subset(&t, &get), "(no rule)");
    assert_eq!(subset(&t, &Req { client: "other", ..req("/x") }), "v2");
    assert_eq!(subset(&t, &Req { client: "other", ..req("/x") }.header("x-skip", "1")), "(no rule)");
    assert_eq!(subset(&t, &req("/x").header("x-p", "abc")), "v3");
    assert_eq!(subset(&t, &req("/x").header("x-present", "")), "v3");
    assert_eq!(subset(&t, &req("/x").header("x-p", "b")), "(no rule)");
    // Istio: no rule matching is a 404 (no route), not any endpoint.
    assert_eq!(t.select("default", "reviews", &req("/x").view(), 0), Selection::Unmatched { route: "default/reviews" });
}

#[test]
fn unknown_subsets_and_hosts_are_invalid_backends() {
    let t = table(&format!(
        "{DR_REVIEWS}{}",
        vs("reviews", None, "  hosts: [reviews]\n  http:\n  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: reviews, subset: v9}}]\n  - route: [{destination: {host: nowhere}}]\n")
    ));
    assert_eq!(subset(&t, &req("/a")), "invalid: subset \"v9\" is not defined by DestinationRule default/reviews");
    assert_eq!(subset(&t, &req("/b")), "invalid: host nowhere is not a service of the mesh");
    // Several HTTP ports: a destination to another service names one.
    let t = table(&vs("reviews", None, "  hosts: [reviews]\n  http:\n  - route: [{destination: {host: ratings}}]\n"));
    assert!(subset(&t, &req("/")).contains("several HTTP ports"), "{}", subset(&t, &req("/")));
    let t = table(&vs("reviews", None, "  hosts: [reviews]\n  http:\n  - route: [{destination: {host: ratings, port: {number: 9090}}}]\n"));
    let b = pick(&t, &req("/"), 0).unwrap().backend.unwrap();
    assert_eq!(b.service.as_ref().map(|s| (s.name.as_str(), s.port)), Some(("ratings", 9090)));
    // A host that is no service, or one without an HTTP port, routes nothing.
    let t = table(&vs("x", None, "  hosts: [db, unknown.example.com]\n  http:\n  - route: [{destination: {host: db}}]\n"));
    assert!(t.is_empty());
}

#[test]
fn precedence_oldest_virtual_service_local_form_and_gateway_api() {
    let a = vs("a", Some("2024-02-01T00:00:00Z"), "  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v1}}]\n");
    let b = vs("b", Some("2024-01-01T00:00:00Z"), "  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v2}}]\n");
    let t = table(&format!("{DR_REVIEWS}{a}{b}"));
    assert_eq!(subset(&t, &req("/")), "v2", "the older wins");
    // The local file's own httpRoutes entry wins over a VirtualService.
    let local = "\nhttpRoutes:\n  - {name: local, namespace: default, service: reviews, rules: [{backends: [{subset: {version: v3}}]}]}\n";
    let s = parse(&format!("{DR_REVIEWS}{a}")).unwrap();
    let with_local = crate::localfile::parse(FsPath::new("x"), &format!("{BASE}{local}{DR_REVIEWS}{a}")).unwrap();
    assert_eq!(RouteTable::from_state(&s).route("default", "reviews").unwrap().name, "a");
    assert_eq!(RouteTable::from_state(&with_local).route("default", "reviews").unwrap().name, "local");
    // An HTTPRoute attached to the service decides before the VirtualService.
    let http_route = "\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: gw, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: reviews}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /gw}}]\n    backendRefs: [{name: reviews, port: 9080}]\n";
    let t = table(&format!("{DR_REVIEWS}{a}{http_route}"));
    assert_eq!(pick(&t, &req("/gw"), 0).unwrap().route, "default/gw");
    assert!(matches!(t.select("default", "reviews", &req("/other").view(), 0), Selection::Unmatched { .. }));
}

#[test]
fn destination_rule_policies_by_service_subset_and_port() {
    let dr = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}
    loadBalancer: {simple: RANDOM}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {http: {http2MaxRequests: 7}}
"#;
    let t = table(dr);
    let p = t.service_policy("default", "ratings");
    assert_eq!((p.circuit_breaker.max_connections, p.circuit_breaker.max_pending_requests, p.circuit_breaker.max_requests_per_connection), (1, 1, Some(1)));
    assert_eq!(p.circuit_breaker.max_requests, 1024, "unset: the mesh default");
    assert_eq!((p.outlier_detection.consecutive_5xx, p.outlier_detection.consecutive_connect_failures), (1, 1));
    assert_eq!(p.outlier_detection.base_ejection_time.0, Duration::from_secs(180));
    assert_eq!(p.outlier_detection.max_ejection_percent, 100);
    assert_eq!(p.load_balancer, LoadBalancer::Random);
    assert_eq!(t.policy_for("default", "ratings", 9080, None), (p, None));
    let (port, key) = t.policy_for("default", "ratings", 9090, None);
    assert_eq!((port.load_balancer, key), (LoadBalancer::RoundRobin, Some("ratings:9090")));
    assert_eq!(port.circuit_breaker.max_connections, 1, "the sections the port does not set stay");
    let (v2, key) = t.policy_for("default", "ratings", 9080, Some("v2"));
    assert_eq!((v2.circuit_breaker.max_requests, v2.circuit_breaker.max_connections, key), (7, 1024, Some("ratings/v2")), "the subset's section replaces the whole section");
    assert_eq!(v2.load_balancer, LoadBalancer::Random);
    let (v2_admin, key) = t.policy_for("default", "ratings", 9090, Some("v2"));
    assert_eq!((v2_admin.load_balancer, v2_admin.circuit_breaker.max_requests, key), (LoadBalancer::RoundRobin, 7, Some("ratings:9090/v2")));
    assert_eq!(t.policy_for("default", "ratings", 9080, Some("v1")), (p, None), "v1 has no policy of its own");
    // No VirtualService: no rule, the policies alone.
    assert!(matches!(t.select("default", "ratings", &req("/").view(), 0), Selection::NoRoute));
}

#[test]
fn rule_settings_become_filters_timeouts_and_retries() {
    let t = table(&format!(
        "{DR_REVIEWS}{}",
        vs(
            "reviews",
            None,
            r#"  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /old}}]
    rewrite: {uri: /new, authority: reviews.example}
    timeout: 0.5s
    retries: {attempts: 3, perTryTimeout: 250ms, retryOn: "gateway-error,retriable-4xx,418,unavailable"}
    fault:
      delay: {fixedDelay: 7s, percentage: {value: 100}}
      abort: {httpStatus: 500, percentage: {value: 12.5}}
    headers:
      request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
      response: {set: {x-d: "3"}}
    mirror: {host: reviews, subset: v3}
    mirrorPercentage: {value: 50}
    route:
    - destination: {host: reviews, subset: v1}
      headers: {request: {set: {x-e: "4"}}}
  - match: [{uri: {exact: /moved}}]
    redirect: {uri: /there, authority: example.org, redirectCode: 308}
"#
        )
    ));
    let s = pick(&t, &req("/old/x"), 0).unwrap();
    assert_eq!(s.matched_prefix, Some("/old"));
    assert_eq!(s.timeout, Some(Duration::from_millis(500)));
    assert_eq!((s.retry.attempts, s.retry.per_try_timeout.map(|d| d.0)), (3, Some(Duration::from_millis(250))));
    for on in [RetryOn::ConnectFailure, RetryOn::Reset, RetryOn::Status(502), RetryOn::Status(503), RetryOn::Status(504), RetryOn::Status(409), RetryOn::Status(418)] {
        assert!(s.retry.retries_on(on), "{on:?}");
    }
    assert!(!s.retry.retries_on(RetryOn::Status(500)));
    let fault = s.rule.filters.iter().find_map(|f| if let Filter::Fault(f) = f { Some(f) } else { None }).unwrap();
    assert_eq!(fault.delay.as_ref().map(|d| (d.fixed.0, d.per_million)), Some((Duration::from_secs(7), 1_000_000)));
    assert_eq!(fault.abort.as_ref().map(|a| (a.status, a.per_million)), Some((500, 125_000)));
    assert!(s.rule.filters.iter().any(|f| matches!(f, Filter::UrlRewrite { hostname: Some(h), path: Some(PathModifier::ReplaceStringPrefix(p)) } if h == "reviews.example" && p == "/new")));
    assert!(s.rule.filters.iter().any(|f| matches!(f, Filter::RequestHeaderModifier(m) if m.set == [("x-a".to_owned(), "1".to_owned())] && m.remove == ["x-c"])));
    assert!(s.rule.filters.iter().any(|f| matches!(f, Filter::ResponseHeaderModifier(m) if m.set == [("x-d".to_owned(), "3".to_owned())])));
    let mirror = s.rule.filters.iter().find_map(|f| if let Filter::RequestMirror { backend, per_million, subset } = f { Some((backend, per_million, subset)) } else { None }).unwrap();
    assert_eq!((mirror.0.name.as_str(), mirror.0.port, *mirror.1), ("reviews", 9080, 500_000));
    assert_eq!(mirror.2.as_ref().and_then(|l| l.get("version")).map(String::as_str), Some("v3"));
    assert!(matches!(&s.backend.unwrap().filters[..], [Filter::RequestHeaderModifier(m)] if m.set[0].0 == "x-e"));
    let r = pick(&t, &req("/moved"), 0).unwrap();
    assert!(r.backend.is_none());
    assert!(r.rule.filters.iter().any(|f| matches!(f, Filter::RequestRedirect(x) if x.status_code == 308 && x.hostname.as_deref() == Some("example.org"))));
    // No rule match written: Istio's implicit prefix `/`.
    let t = table(&format!("{DR_REVIEWS}{}", vs("reviews", None, "  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n")));
    let s = pick(&t, &req("/x"), 0).unwrap();
    assert_eq!(s.matched_prefix, Some("/"));
    assert_eq!(s.retry, crate::route::default_retry_policy(), "no retries written: the mesh's defaults");
    assert_eq!(s.timeout, None);
}

/// Each unsupported or invalid field: refused with its path, nothing of
/// the file applied.
#[test]
fn refusals_name_the_field() {
    let http = |rule: &str| vs("r", None, &format!("  hosts: [reviews]\n  http:\n  - {rule}\n"));
    let dr = |spec: &str| format!("\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: default}}\nspec:\n  host: reviews\n{spec}");
    #[rustfmt::skip]
    let cases = [
        (http("corsPolicy: {allowOrigins: [{exact: x}]}\n    route: [{destination: {host: reviews}}]"), "spec.http[0].corsPolicy: not implemented"),
        (http("match: [{port: 9080}]\n    route: [{destination: {host: reviews}}]"), "spec.http[0].match[0].port: not implemented"),
        (http("match: [{uri: {prefix: /a, exact: /b}}]\n    route: [{destination: {host: reviews}}]"), "spec.http[0].match[0].uri: set only one"),
        (http("match: [{uri: {regex: \"(\"}}]\n    route: [{destination: {host: reviews}}]"), "spec.http[0].match[0].uri.regex"),
        (http("match: [{queryParams: {q: {prefix: a}}}]\n    route: [{destination: {host: reviews}}]"), "spec.http[0].match[0].queryParams.q.prefix"),
        (http("match: [{withoutHeaders: {x: {exact: a}}}]\n    route: [{destination: {host: reviews}}]"), "spec.http[0].match[0].withoutHeaders.x.exact"),
        (http("timeout: 5x\n    route: [{destination: {host: reviews}}]"), "spec.http[0].timeout: \"5x\" is not a duration"),
        (http("retries: {attempts: 2, retryOn: bogus}\n    route: [{destination: {host: reviews}}]"), "spec.http[0].retries.retryOn: \"bogus\""),
        (http("fault: {abort: {grpcStatus: UNAVAILABLE}}\n    route: [{destination: {host: reviews}}]"), "spec.http[0].fault.abort.grpcStatus"),
        (http("fault: {delay: {fixedDelay: 1s, percentage: {value: 101}}}\n    route: [{destination: {host: reviews}}]"), "spec.http[0].fault.delay.percentage.value: 101"),
        (http("route: [{destination: {host: \"*.default.svc.cluster.local\"}}]"), "spec.http[0].route[0].destination.host: \"*.default.svc.cluster.local\": wildcard"),
        (http("redirect: {uri: /x}\n    route: [{destination: {host: reviews}}]"), "spec.http[0].redirect: a rule either redirects or routes"),
        (http("route: [{destination: {host: reviews}, bogus: 1}]"), "spec.http[0].route[0].bogus: unknown field `bogus`"),
        (vs("r", None, "  hosts: [reviews]\n  tcp: [{route: [{destination: {host: reviews}}]}]\n"), "spec.tcp: TCP and TLS routes are not implemented"),
        (vs("r", None, "  hosts: [reviews]\n  exportTo: [\".\"]\n"), "spec.exportTo: visibility"),
        (dr("  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x}}}\n"), "spec.trafficPolicy.loadBalancer.consistentHash"),
        (dr("  trafficPolicy: {connectionPool: {tcp: {maxConnections: 0}}}\n"), "spec.trafficPolicy.connectionPool.tcp.maxConnections: 0"),
        (dr("  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n"), "spec.trafficPolicy.tls: not implemented"),
        (dr("  subsets: [{name: v1, labels: {version: v1}}, {name: v1}]\n"), "spec.subsets[1].name: subset \"v1\" is defined twice"),
        (dr("  workloadSelector: {matchLabels: {app: x}}\n"), "spec.workloadSelector"),
    ];
    for (doc, want) in cases {
        let e = parse(&doc).unwrap_err();
        assert!(e.contains(want), "{want}\n  got: {e}");
    }
}

#[test]
fn gateway_only_rules_are_not_mesh_traffic() {
    let gw_only = vs("r", None, "  hosts: [reviews]\n  gateways: [istio-system/ingress]\n  http:\n  - route: [{destination: {host: reviews, subset: v1}}]\n");
    let t = table(&format!("{DR_REVIEWS}{gw_only}"));
    assert!(matches!(t.select("default", "reviews", &req("/").view(), 0), Selection::NoRoute));
    let both = vs("r", None, "  hosts: [reviews]\n  gateways: [mesh, istio-system/ingress]\n  http:\n  - match: [{gateways: [istio-system/ingress], uri: {prefix: /gw}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - route: [{destination: {host: reviews, subset: v1}}]\n");
    let t = table(&format!("{DR_REVIEWS}{both}"));
    assert_eq!(subset(&t, &req("/gw")), "v1", "the gateway-only match is dropped");
}

#[test]
fn durations_as_istio_writes_them() {
    use crate::objects::istio_traffic::parse_duration;
    for (s, ms) in [("2s", 2000), ("0.5s", 500), ("250ms", 250), ("1m30s", 90_000), ("3m", 180_000), ("1h", 3_600_000), ("1.5s", 1500)] {
        assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
    }
    for s in ["", "5", "s", "1x", "-1s", "1s2", ".s"] {
        assert!(parse_duration(s).is_err(), "{s}");
    }
}

/// The fuzz target's seed for these kinds is a file the mesh accepts, so
/// fuzzing starts from the conversion, not from its first refusal.
#[test]
fn the_fuzz_seed_is_a_valid_file() {
    let path = FsPath::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/localfile/istio-traffic.yaml");
    let s = crate::localfile::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!((s.virtual_services.len(), s.destination_rules.len()), (1, 1));
    let t = RouteTable::from_state(&s);
    assert_eq!(t.route("default", "reviews").map(|r| r.rules.len()), Some(3));
}
