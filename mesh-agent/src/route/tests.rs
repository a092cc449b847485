use std::{path::Path, time::Duration};

use http::{HeaderMap, HeaderValue, Method};

use super::*;
use crate::state::MeshState;

const BASE: &str = r#"
nodes: [{name: node-a}]
namespaces: [{name: shop, labels: {nodemesh.io/dataplane-mode: enabled}}]
services:
  - name: web
    namespace: shop
    selector: {app: web}
    ports: [{name: http, port: 80, targetPort: 8080}]
"#;

const ROUTES: &str = r#"
httpRoutes:
  - name: web
    namespace: shop
    service: web
    rules:
      - matches:
          - headers: [{name: X-Canary, exact: "1"}]
          - cookies: [{name: group, exact: beta}]
        backends: [{subset: {version: v2}}]
      - matches: [{path: {prefix: /api/}, method: get}]
        backends:
          - {subset: {version: v1}, weight: 90}
          - {subset: {version: v2}, weight: 10}
        timeout: 2s
        retries: {attempts: 3, perTryTimeout: 500ms, retryOn: [reset, 502, "504"], allMethods: true}
      - matches: [{path: {exact: /login}}, {headers: [{name: x-debug, present: true}]}]
        backends: [{subset: {version: v3}}]
      - backends: [{subset: {version: v1}, weight: 100}]
    circuitBreaker: {maxRequests: 7}
"#;

fn state() -> MeshState {
    crate::localfile::parse(Path::new("x"), &format!("{BASE}{ROUTES}")).unwrap()
}

fn req<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
    RequestView { method, path, query: None, headers, client_namespace: "shop", port: 80 }
}

fn version(sel: &Selected<'_>) -> String {
    sel.backend.unwrap().subset.as_ref().unwrap()["version"].clone()
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, HeaderValue::from_static(v));
    }
    h
}

#[test]
fn canary_split_is_exact_over_100_values() {
    let table = RouteTable::from_state(&state());
    let h = HeaderMap::new();
    let mut v1 = 0;
    let mut v2 = 0;
    for rand in 0..100u32 {
        let sel = table.select("shop", "web", &req(&Method::GET, "/api/items", &h), rand).rule().unwrap();
        assert_eq!(sel.rule_index, 1);
        assert_eq!(sel.route, "shop/web");
        match version(&sel).as_str() {
            "v1" => v1 += 1,
            "v2" => v2 += 1,
            other => panic!("{other}"),
        }
    }
    assert_eq!((v1, v2), (90, 10));
    // Only the value modulo 100 counts.
    let sel = table.select("shop", "web", &req(&Method::GET, "/api", &h), 1_000_095).rule().unwrap();
    assert_eq!(version(&sel), "v2");
}

#[test]
fn header_and_cookie_route_to_v2_every_time() {
    let table = RouteTable::from_state(&state());
    let by_header = headers(&[("x-canary", "1")]);
    let by_cookie = headers(&[("cookie", "session=abc"), ("cookie", "theme=dark;  group=\"beta\" ; x=1")]);
    for h in [&by_header, &by_cookie] {
        for rand in 0..100 {
            let sel = table.select("shop", "web", &req(&Method::POST, "/api/x", h), rand).rule().unwrap();
            assert_eq!((sel.rule_index, version(&sel).as_str()), (0, "v2"));
        }
    }
    // Near misses fall through to the later rules.
    for h in [
        headers(&[("x-canary", "0")]),
        headers(&[("cookie", "group=betamax")]),
        headers(&[("cookie", "xgroup=beta")]),
        headers(&[("x-group", "group=beta")]),
    ] {
        let sel = table.select("shop", "web", &req(&Method::GET, "/other", &h), 0).rule().unwrap();
        assert_eq!(sel.rule_index, 3, "{h:?}");
    }
}

#[test]
fn cookie_parsing() {
    let h = headers(&[("cookie", "a=1; b=2"), ("cookie", " c = \"3\" ;novalue; =x; d=e=f")]);
    assert_eq!(parse_cookies(&h), vec![("a", "1"), ("b", "2"), ("c", "3"), ("d", "e=f")]);
    assert!(parse_cookies(&HeaderMap::new()).is_empty());
}

#[test]
fn first_matching_rule_wins_in_order() {
    let table = RouteTable::from_state(&state());
    let none = HeaderMap::new();
    let debug = headers(&[("x-debug", "")]);
    let canary = headers(&[("x-canary", "1"), ("x-debug", "1")]);
    #[rustfmt::skip]
    let cases: &[(&Method, &str, &HeaderMap, usize)] = &[
        (&Method::GET, "/api", &none, 1),
        (&Method::GET, "/api/", &none, 1),
        (&Method::GET, "/api/v1?q=1", &none, 1),
        (&Method::GET, "/apix", &none, 3),     // prefixes match whole segments
        (&Method::POST, "/api/x", &none, 3),   // method
        (&Method::from_bytes(b"get").unwrap(), "/api/x", &none, 1), // methods without case
        (&Method::GET, "/login", &none, 2),
        (&Method::GET, "/login/", &none, 3),   // exact is exact
        (&Method::GET, "/api/x", &debug, 1),   // rule 1 comes before rule 2
        (&Method::GET, "/x", &debug, 2),       // present, even empty
        (&Method::GET, "/api/x", &canary, 0),
    ];
    for (i, (m, p, h, want)) in cases.iter().enumerate() {
        let sel = table.select("shop", "web", &req(m, p, h), 0).rule().unwrap();
        assert_eq!(sel.rule_index, *want, "case {i}: {m} {p}");
    }
    assert!(table.select("shop", "other", &req(&Method::GET, "/", &none), 0).rule().is_none());
    assert!(table.select("other", "web", &req(&Method::GET, "/", &none), 0).rule().is_none());
}

#[test]
fn no_matching_rule_selects_nothing() {
    let routes = ROUTES.replace("      - backends: [{subset: {version: v1}, weight: 100}]\n", "");
    let s = crate::localfile::parse(Path::new("x"), &format!("{BASE}{routes}")).unwrap();
    let table = RouteTable::from_state(&s);
    let h = HeaderMap::new();
    assert!(table.select("shop", "web", &req(&Method::GET, "/nothing", &h), 0).rule().is_none());
}

#[test]
fn defaults_and_configured_values() {
    let table = RouteTable::from_state(&state());
    let h = HeaderMap::new();

    let d = table.select("shop", "web", &req(&Method::GET, "/x", &h), 0).rule().unwrap();
    assert_eq!(d.timeout, None);
    assert_eq!(d.retry, &RetryPolicy::default());
    assert_eq!(d.retry, default_retry_policy());
    assert_eq!(d.retry.attempts, 2);
    assert_eq!(d.retry.per_try_timeout, None);
    assert_eq!(d.retry.retry_on, vec![RetryOn::ConnectFailure, RetryOn::Reset, RetryOn::Status(503)]);
    assert_eq!(d.retry.budget_percent, 20);
    assert!(d.retry.allows_method(&Method::GET) && d.retry.allows_method(&Method::DELETE));
    assert!(!d.retry.allows_method(&Method::POST) && !d.retry.allows_method(&Method::PATCH));
    assert!(d.retry.retries_on(RetryOn::Status(503)) && !d.retry.retries_on(RetryOn::Status(500)));

    let c = table.select("shop", "web", &req(&Method::GET, "/api", &h), 0).rule().unwrap();
    assert_eq!(c.timeout, Some(Duration::from_secs(2)));
    assert_eq!(c.retry.attempts, 3);
    assert_eq!(c.retry.per_try_timeout, Some(RouteDuration(Duration::from_millis(500))));
    assert_eq!(c.retry.retry_on, vec![RetryOn::Reset, RetryOn::Status(502), RetryOn::Status(504)]);
    assert!(c.retry.allows_method(&Method::POST));
    assert_eq!(c.retry.budget_percent, 20);

    let sp = table.service_policy("shop", "web");
    assert_eq!(sp.circuit_breaker, CircuitBreaker { max_connections: 1024, max_pending_requests: 1024, max_requests: 7, max_requests_per_connection: None });
    assert_eq!(sp.outlier_detection, OutlierDetection::default());
    assert_eq!(table.service_policy("shop", "nope"), &ServicePolicy::default());
    let od = OutlierDetection::default();
    assert_eq!((od.consecutive_5xx, od.consecutive_connect_failures, od.max_ejection_percent), (5, 5, 50));
    assert_eq!(od.base_ejection_time.0, Duration::from_secs(30));
}

#[test]
fn resilience_helpers() {
    let r = RetryPolicy::default();
    assert_eq!(r.backoff(0, 0), Duration::ZERO);
    assert!(r.backoff(0, u32::MAX) < Duration::from_millis(25));
    assert!(r.backoff(1, u32::MAX) < Duration::from_millis(50) && r.backoff(1, u32::MAX) > Duration::from_millis(49));
    assert!(r.backoff(30, u32::MAX) < Duration::from_millis(250) && r.backoff(30, u32::MAX) > Duration::from_millis(249));
    assert!(r.budget_allows(0, 2) && !r.budget_allows(0, 3)); // minimum concurrency
    assert!(r.budget_allows(100, 19) && !r.budget_allows(100, 20));

    let od = OutlierDetection::default();
    assert_eq!(od.ejection_time(1), Duration::from_secs(30));
    assert_eq!(od.ejection_time(3), Duration::from_secs(90));
    assert_eq!(od.ejection_time(100), Duration::from_secs(300));
    assert_eq!([0, 1, 2, 3, 4, 10].map(|n| od.max_ejected(n)), [0, 0, 1, 1, 2, 5]);
    let all = OutlierDetection { max_ejection_percent: 100, ..od.clone() };
    assert_eq!(all.max_ejected(4), 3, "never all");

    assert!([Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE].iter().all(is_idempotent));
    assert!(![Method::POST, Method::PATCH, Method::CONNECT].iter().any(is_idempotent));

    let mut labels = crate::state::Labels::new();
    labels.insert("version".into(), "v2".into());
    labels.insert("app".into(), "web".into());
    assert!(Backend::default().selects(&labels));
    let v2 = Backend { subset: Some([("version".to_string(), "v2".to_string())].into()), ..Default::default() };
    assert!(v2.selects(&labels));
    labels.insert("version".into(), "v1".into());
    assert!(!v2.selects(&labels));
}

#[test]
fn durations() {
    for (s, d) in [("250ms", Duration::from_millis(250)), ("2s", Duration::from_secs(2)), ("1m", Duration::from_secs(60)), ("1h", Duration::from_secs(3600))] {
        assert_eq!(s.parse::<RouteDuration>().unwrap().0, d);
    }
    for bad in ["", "2", "s", "1.5s", "-1s", "2 s", "2sec", "99999999999999999999s"] {
        assert!(bad.parse::<RouteDuration>().is_err(), "{bad}");
    }
    assert_eq!(RouteDuration(Duration::from_millis(1500)).to_string(), "1500ms");
    assert_eq!(RouteDuration(Duration::from_secs(2)).to_string(), "2s");
}

#[test]
fn invalid_routes_are_left_out_of_the_table() {
    let mut s = state();
    let mut bad = s.routes[0].clone();
    bad.service = "nope".into();
    let dup = s.routes[0].clone();
    s.routes.insert(0, bad);
    s.routes.push(dup);
    let table = RouteTable::from_state(&s);
    assert_eq!(table.len(), 1);
    assert!(table.route("shop", "web").is_some());
}
