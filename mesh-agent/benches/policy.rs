//! Authorization policy: one check against 10,000 rules, and path
//! normalization. `cargo bench -p mesh-agent --bench policy`.
//!
//! The rule mix is a guess at a large real config for one workload: mostly
//! per-caller ALLOW rules (exact principal, a few paths and methods), some
//! namespace and principal-prefix ALLOWs, port rules, DENYs on paths and on
//! callers, host and header rules, and 0.1% of rules the index cannot file
//! (negations only), which every request scans. A last bench shows the worst
//! case: every rule unfileable, i.e. the cost of a linear scan.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, header};
use mesh_agent::{
    identity::SpiffeId,
    policy::{Authorizer, Connection, Peer, Request, normalize_path},
    state::{AuthorizationPolicy, AuthzAction, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource, Labels},
};

const RULES_PER_POLICY: usize = 10;
const TD: &str = "spiffe://cluster.local";

fn strings(v: &[String]) -> Option<Vec<String>> {
    Some(v.to_vec())
}

// Documentation addresses: the source pod's and the workload's.
const SOURCE: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));
const DESTINATION: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 20));

fn policy(i: usize, action: AuthzAction, rules: Vec<AuthzRule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: format!("p{i}"),
        namespace: "shop".into(),
        // DENYs on HTTP fields alone select only `app: api`: at L4 they deny every
        // connection (see the policy module doc), so the L4 benches use
        // `app: tcp`, which every other policy selects.
        selector: (action == AuthzAction::Deny && ((80..88).contains(&(i % 100)) || i == 999))
            .then(|| [("app".to_string(), "api".to_string())].into()),
        action,
        rules,
        ignore_path_case: false,
        target_services: None,
        refused: None,
    }
}

fn from_principals(p: &[String]) -> Option<Vec<AuthzSource>> {
    Some(vec![AuthzSource {
        principals: strings(p),
        ..Default::default()
    }])
}

/// 1,000 policies of 10 rules, every one selecting the `app: api` workload.
fn mix() -> Vec<AuthorizationPolicy> {
    (0..1000)
        .map(|i| {
            let rules = |f: &dyn Fn(usize) -> AuthzRule| (0..RULES_PER_POLICY).map(f).collect::<Vec<_>>();
            let k = |j: usize| i * RULES_PER_POLICY + j;
            match i % 100 {
                // 60%: a caller may use a few methods on its service's paths.
                0..60 => policy(
                    i,
                    AuthzAction::Allow,
                    rules(&|j| AuthzRule {
                        from: from_principals(&[format!("{TD}/ns/ns{}/sa/sa{}", k(j) % 50, k(j))]),
                        to: Some(vec![AuthzOperation {
                            methods: strings(&["GET".into(), "HEAD".into()]),
                            paths: strings(&[
                                format!("/api/v1/svc{}/items", k(j)),
                                format!("/api/v1/svc{}/items/*", k(j)),
                            ]),
                            ..Default::default()
                        }]),
                        when: None,
                    }),
                ),
                // 10%: a namespace on a port.
                60..70 => policy(
                    i,
                    AuthzAction::Allow,
                    rules(&|j| AuthzRule {
                        from: Some(vec![AuthzSource {
                            namespaces: strings(&[format!("team{}", k(j))]),
                            ..Default::default()
                        }]),
                        to: Some(vec![AuthzOperation {
                            ports: Some(vec![9000 + (k(j) % 100) as u32]),
                            ..Default::default()
                        }]),
                        when: None,
                    }),
                ),
                // 10%: every workload of a namespace, on a path prefix.
                70..80 => policy(
                    i,
                    AuthzAction::Allow,
                    rules(&|j| AuthzRule {
                        from: from_principals(&[format!("{TD}/ns/batch{}/*", k(j))]),
                        to: Some(vec![AuthzOperation {
                            paths: strings(&[format!("/jobs/{}/*", k(j))]),
                            ..Default::default()
                        }]),
                        when: None,
                    }),
                ),
                // 8%: DENY paths.
                80..88 => policy(
                    i,
                    AuthzAction::Deny,
                    rules(&|j| AuthzRule {
                        from: None,
                        to: Some(vec![AuthzOperation {
                            paths: strings(&[format!("/admin/x{}", k(j)), format!("/internal/{}/*", k(j))]),
                            ..Default::default()
                        }]),
                        when: None,
                    }),
                ),
                // 5%: DENY callers.
                88..93 => policy(
                    i,
                    AuthzAction::Deny,
                    rules(&|j| AuthzRule {
                        from: from_principals(&[format!("{TD}/ns/banned/sa/sa{}", k(j))]),
                        to: None,
                        when: None,
                    }),
                ),
                // 6%: ports open to any mTLS peer.
                93..99 => policy(
                    i,
                    AuthzAction::Allow,
                    rules(&|j| AuthzRule {
                        from: from_principals(&["*".into()]),
                        to: Some(vec![AuthzOperation {
                            ports: Some(vec![20000 + k(j) as u32]),
                            ..Default::default()
                        }]),
                        when: None,
                    }),
                ),
                // 0.9%: hosts and a header (filed by host).
                _ if i != 999 => policy(
                    i,
                    AuthzAction::Allow,
                    rules(&|j| AuthzRule {
                        from: None,
                        to: Some(vec![AuthzOperation {
                            hosts: strings(&[format!("*.zone{}.example", k(j))]),
                            paths: strings(&[format!("*.bak{}", k(j)), "*~".into()]),
                            ..Default::default()
                        }]),
                        when: Some(vec![AuthzCondition {
                            header: "x-debug".into(),
                            key: None,
                            values: strings(&[format!("on-{}", k(j))]),
                            not_values: None,
                        }]),
                    }),
                ),
                // 0.1%: what no index helps with (negations only): every
                // request evaluates these; each costs what one rule of the
                // linear-scan bench below costs.
                _ => policy(
                    i,
                    AuthzAction::Deny,
                    rules(&|j| AuthzRule {
                        from: Some(vec![AuthzSource {
                            not_namespaces: strings(&[format!("ns{}", k(j) % 50)]),
                            ..Default::default()
                        }]),
                        to: Some(vec![AuthzOperation {
                            not_methods: strings(&["GET".into(), "HEAD".into(), "POST".into()]),
                            not_paths: strings(&["/api/*".into()]),
                            ..Default::default()
                        }]),
                        when: None,
                    }),
                ),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let ps = mix();
    assert_eq!(ps.iter().map(|p| p.rules.len()).sum::<usize>(), 10_000);
    let authz = Authorizer::new(&ps);
    assert!(authz.invalid().is_empty(), "{:?}", authz.invalid());
    let labels: Labels = [("app".to_string(), "api".to_string())].into();
    c.bench_function("policy/for_workload (10k rules)", |b| {
        b.iter(|| authz.for_workload("shop", black_box(&labels)))
    });
    let wp = authz.for_workload("shop", &labels);

    let mut headers = HeaderMap::new();
    headers.insert(header::USER_AGENT, HeaderValue::from_static("curl/8.5.0"));
    headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    headers.insert(
        "x-request-id",
        HeaderValue::from_static("5b1f3b0e-9c1a-4a52-8f1e-2d6f1c9a7e11"),
    );
    let caller = Peer::new(&SpiffeId::new("cluster.local", "ns7", "sa4207").unwrap());
    let stranger = Peer::new(&SpiffeId::new("cluster.local", "elsewhere", "nobody").unwrap());
    let ok_path = normalize_path("/api/v1/svc4207/items/42?limit=10").unwrap();
    let admin_path = normalize_path("/admin/x8805").unwrap();
    let conn = Connection {
        peer: Some(&caller),
        port: 8080,
        source: SOURCE,
        destination: DESTINATION,
    };
    let stranger_conn = Connection {
        peer: Some(&stranger),
        port: 8080,
        source: SOURCE,
        destination: DESTINATION,
    };
    let req = |method, path| Request {
        method,
        path,
        host: "api.shop.svc.cluster.local:8080",
        headers: &headers,
    };

    let cases = [
        ("allowed (ALLOW matched)", conn, req("GET", &ok_path), true),
        ("denied (no ALLOW matched)", conn, req("POST", &ok_path), false),
        ("denied (DENY matched)", conn, req("GET", &admin_path), false),
        ("denied (unknown caller)", stranger_conn, req("GET", &ok_path), false),
    ];
    for (name, conn, req, allowed) in cases {
        assert_eq!(
            wp.check_http(&conn, &req).allowed,
            allowed,
            "{name}: {}",
            wp.check_http(&conn, &req)
        );
        c.bench_function(&format!("policy/check_http 10k rules, {name}"), |b| {
            b.iter(|| wp.check_http(black_box(&conn), black_box(&req)).allowed)
        });
    }
    let tcp_labels: Labels = [("app".to_string(), "tcp".to_string())].into();
    let tcp_wp = authz.for_workload("shop", &tcp_labels);
    let tcp = Connection {
        peer: Some(&caller),
        port: 20_950,
        source: SOURCE,
        destination: DESTINATION,
    };
    assert!(
        tcp_wp.check_connection(&tcp).allowed,
        "{}",
        tcp_wp.check_connection(&tcp)
    );
    let n = tcp_wp.rule_count();
    c.bench_function(&format!("policy/check_connection {n} rules, allowed"), |b| {
        b.iter(|| tcp_wp.check_connection(black_box(&tcp)).allowed)
    });
    assert!(!tcp_wp.check_connection(&stranger_conn).allowed);
    c.bench_function(&format!("policy/check_connection {n} rules, denied"), |b| {
        b.iter(|| tcp_wp.check_connection(black_box(&stranger_conn)).allowed)
    });

    // The worst case: 10,000 rules the index cannot file, all scanned.
    let flat: Vec<_> = (0..1000)
        .map(|i| {
            policy(
                i,
                AuthzAction::Allow,
                (0..RULES_PER_POLICY)
                    .map(|j| AuthzRule {
                        from: None,
                        to: Some(vec![AuthzOperation {
                            not_paths: strings(&["/api/*".into(), format!("/p{}", i * RULES_PER_POLICY + j)]),
                            ..Default::default()
                        }]),
                        when: None,
                    })
                    .collect(),
            )
        })
        .collect();
    let flat = Authorizer::new(&flat).for_workload("shop", &labels);
    let (conn, req) = (conn, req("GET", &ok_path));
    assert!(!flat.check_http(&conn, &req).allowed);
    c.bench_function("policy/check_http 10k unindexable rules (linear scan), denied", |b| {
        b.iter(|| flat.check_http(black_box(&conn), black_box(&req)).allowed)
    });

    c.bench_function("policy/normalize_path typical (already normal)", |b| {
        b.iter(|| normalize_path(black_box("/api/v1/svc4207/items/42?limit=10")).map(|p| p.path().len()))
    });
    c.bench_function("policy/normalize_path rewritten", |b| {
        b.iter(|| normalize_path(black_box("/api//v1/./svc4207/%69tems/x/../42?limit=10")).map(|p| p.path().len()))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
