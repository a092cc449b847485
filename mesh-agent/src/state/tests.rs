use super::*;

fn pod(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        key: PodKey { namespace: ns.into(), name: name.into() },
        node: "node-a".into(),
        service_account: "default".into(),
        ips: vec![ip.parse().unwrap()],
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        netns: "/run/netns/x".into(),
        cgroup: "/sys/fs/cgroup/x".into(),
    }
}

fn ns(name: &str, enrolled: bool) -> Namespace {
    let mut labels = Labels::new();
    if enrolled {
        labels.insert(DATAPLANE_MODE_LABEL.into(), DATAPLANE_MODE_ENABLED.into());
    }
    Namespace { name: name.into(), labels }
}

fn state() -> MeshState {
    MeshState::new(
        "cluster.local".into(),
        vec!["node-a".into()],
        vec![ns("shop", true), ns("legacy", false)],
        vec![
            pod("shop", "a", "198.51.100.11", &[("app", "a")]),
            pod("shop", "b1", "198.51.100.12", &[("app", "b")]),
            pod("shop", "b2", "198.51.100.13", &[("app", "b")]),
            pod("shop", "out", "198.51.100.14", &[(DATAPLANE_MODE_LABEL, DATAPLANE_MODE_DISABLED)]),
            pod("legacy", "c", "198.51.100.21", &[("app", "c")]),
        ],
        vec![Service {
            name: "b".into(),
            namespace: "shop".into(),
            ips: vec!["198.51.100.250".parse().unwrap()],
            selector: [("app".to_string(), "b".to_string())].into(),
            ports: vec![ServicePort { name: "http".into(), port: 80, target_port: 8080, app_protocol: None }],
            endpoint_ips: None,
        }],
    )
}

#[test]
fn enrollment_follows_namespace_label_and_pod_opt_out() {
    let s = state();
    let get = |ip: &str| s.pod_by_ip(ip.parse().unwrap()).unwrap();
    assert!(s.is_enrolled(get("198.51.100.11")));
    assert!(!s.is_enrolled(get("198.51.100.14")), "pod opt-out label wins");
    assert!(!s.is_enrolled(get("198.51.100.21")));
}

#[test]
fn failure_policy_is_the_namespace_label_else_the_mesh_default() {
    let mut s = state();
    let a = s.pods.values().find(|p| p.key.name == "a").unwrap().clone();
    assert!(!s.fails_open(&a, false));
    assert!(s.fails_open(&a, true), "no label: the mesh-wide default");
    for (value, open) in [("open", true), ("closed", false), ("Open", false), ("", false)] {
        s.namespaces.get_mut("shop").unwrap().labels.insert(FAILURE_POLICY_LABEL.into(), value.into());
        assert_eq!(s.fails_open(&a, true), open, "label {value:?} (anything but `open` is closed)");
    }
}

#[test]
fn resolve_pods_and_services() {
    let s = state();
    let d = s.resolve("198.51.100.12:9000".parse().unwrap(), |_| 0);
    assert!(matches!(d, Destination::MeshPod { ref pod, .. } if pod.name == "b1"));
    let d = s.resolve("198.51.100.21:9000".parse().unwrap(), |_| 0);
    assert_eq!(d, Destination::Passthrough("198.51.100.21:9000".parse().unwrap()));
    let d = s.resolve("198.51.100.250:80".parse().unwrap(), |n| n - 1);
    assert_eq!(
        d,
        Destination::MeshPod {
            pod: PodKey { namespace: "shop".into(), name: "b2".into() },
            addr: "198.51.100.13:8080".parse().unwrap()
        }
    );
    // A port the service does not declare is not the service.
    let d = s.resolve("198.51.100.250:81".parse().unwrap(), |_| 0);
    assert_eq!(d, Destination::Passthrough("198.51.100.250:81".parse().unwrap()));
    // v4-mapped addresses resolve like IPv4.
    let d = s.resolve("[::ffff:198.51.100.11]:1".parse().unwrap(), |_| 0);
    assert!(matches!(d, Destination::MeshPod { .. }));
}

#[test]
fn peer_authentication_workload_beats_namespace() {
    let key = |n: &str| PodKey { namespace: "shop".into(), name: n.into() };
    let s = state().with_peer_authentications(vec![
        PeerAuthentication { name: "ns".into(), namespace: "shop".into(), selector: None, mode: PeerAuthMode::Strict },
        PeerAuthentication {
            name: "b".into(),
            namespace: "shop".into(),
            selector: Some([("app".to_string(), "b".to_string())].into()),
            mode: PeerAuthMode::Permissive,
        },
    ]);
    assert_eq!(s.peer_auth_mode(&key("a")), PeerAuthMode::Strict);
    assert_eq!(s.peer_auth_mode(&key("b1")), PeerAuthMode::Permissive);
    let legacy = PodKey { namespace: "legacy".into(), name: "c".into() };
    assert_eq!(s.peer_auth_mode(&legacy), PeerAuthMode::Permissive, "default");
}

#[test]
fn http_ports_by_declaration() {
    let s = state();
    let b1 = PodKey { namespace: "shop".into(), name: "b1".into() };
    assert!(s.app_http(&b1, 8080).is_some(), "port named http");
    assert!(s.app_http(&b1, 80).is_none(), "service port, not target port");
    let a = PodKey { namespace: "shop".into(), name: "a".into() };
    assert!(s.app_http(&a, 8080).is_none(), "not selected");
    let p = |name: &str, proto: Option<&str>| ServicePort { name: name.into(), port: 1, target_port: 1, app_protocol: proto.map(Into::into) };
    assert!(p("http-web", None).is_http());
    assert!(p("grpc", None).is_http());
    assert!(!p("tcp", None).is_http());
    assert!(!p("httpx", None).is_http());
    assert!(p("tcp", Some("HTTP")).is_http());
    assert!(!p("http", Some("tcp")).is_http(), "appProtocol wins");
    assert_eq!(p("grpc-api", None).http_version(), Some(AppHttp::Http2));
    assert_eq!(p("http-web", None).http_version(), Some(AppHttp::Http1));
    assert_eq!(p("x", Some("kubernetes.io/h2c")).http_version(), Some(AppHttp::Http2));
}
