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

/// The pods of `state()` each agent enrolls, by name.
fn enrolled(s: &MeshState) -> Vec<&str> {
    s.pods.values().filter(|p| s.is_enrolled(p)).map(|p| p.key.name.as_str()).collect()
}

#[test]
fn the_default_enrollment_label_is_unchanged() {
    let s = state();
    assert_eq!(s.enrollment_label, Enrollment::parse("nodemesh.io/dataplane-mode=enabled").unwrap());
    assert_eq!(s.enrollment_label.to_string(), "nodemesh.io/dataplane-mode=enabled");
    assert_eq!(enrolled(&s), ["a", "b1", "b2"]);
}

#[test]
fn a_custom_enrollment_label_enrolls_and_the_default_one_no_longer_does() {
    let custom = Enrollment::parse("mesh.example.com/member=yes").unwrap();
    let mut s = state().with_enrollment(custom);
    assert!(enrolled(&s).is_empty(), "shop carries only the default label: not enrolled any more");
    s.namespaces.get_mut("legacy").unwrap().labels.insert("mesh.example.com/member".into(), "yes".into());
    assert_eq!(enrolled(&s), ["c"]);
    s.namespaces.get_mut("legacy").unwrap().labels.insert("mesh.example.com/member".into(), "enabled".into());
    assert!(enrolled(&s).is_empty(), "the key with another value does not enroll");
    // The opt-out follows the key: `<key>=disabled` on a pod.
    s.namespaces.get_mut("shop").unwrap().labels.insert("mesh.example.com/member".into(), "yes".into());
    assert_eq!(enrolled(&s), ["a", "b1", "b2", "out"], "the default key's opt-out no longer applies");
    s.pods.values_mut().find(|p| p.key.name == "a").unwrap().labels.insert("mesh.example.com/member".into(), "disabled".into());
    assert_eq!(enrolled(&s), ["b1", "b2", "out"]);
}

#[test]
fn enrollment_labels_that_are_refused() {
    for (bad, why) in [
        ("nodemesh.io/dataplane-mode", "key=value"),
        ("istio.io/dataplane-mode=ambient", "Istio ambient"),
        ("istio.io/dataplane-mode=enabled", "Istio ambient"),
        ("nodemesh.io/dataplane-mode=disabled", "takes a pod out"),
        ("nodemesh.io/dataplane-mode=", "not a label value"),
        ("=enabled", "not a label name"),
        ("Bad_Prefix/x=y", "not a DNS subdomain"),
        ("a/b/c=y", "not a DNS subdomain"),
        ("x=has space", "not a label value"),
    ] {
        let e = Enrollment::parse(bad).unwrap_err();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
    for good in ["member=yes", "mesh.example.com/member=on", "istio-injection=nodemesh", "nodemesh.io/dataplane-mode=enabled"] {
        assert_eq!(Enrollment::parse(good).unwrap().to_string(), good);
    }
}

#[test]
fn pods_istio_ambient_captures_are_never_enrolled() {
    let amb = |s: &mut MeshState, ns: &str, v: &str| {
        s.namespaces.get_mut(ns).unwrap().labels.insert(ISTIO_DATAPLANE_MODE_LABEL.into(), v.into());
    };
    let pod_label = |s: &mut MeshState, name: &str, v: &str| {
        s.pods.values_mut().find(|p| p.key.name == name).unwrap().labels.insert(ISTIO_DATAPLANE_MODE_LABEL.into(), v.into());
    };
    // A pod labelled for ambient, in a namespace of ours: Istio's.
    let mut s = state();
    pod_label(&mut s, "a", "ambient");
    assert_eq!(enrolled(&s), ["b1", "b2"]);
    // A namespace labelled for both meshes: ambient takes its pods...
    amb(&mut s, "shop", "ambient");
    assert!(enrolled(&s).is_empty());
    // ...except those that opt out of ambient (`none`): ours again.
    pod_label(&mut s, "b1", "none");
    assert_eq!(enrolled(&s), ["b1"]);
    // Any other value of Istio's label is not ambient: no effect.
    let mut s = state();
    amb(&mut s, "shop", "sidecar");
    assert_eq!(enrolled(&s), ["a", "b1", "b2"]);
    // An ambient namespace is never ours without our label.
    let mut s = state();
    amb(&mut s, "legacy", "ambient");
    pod_label(&mut s, "c", "none");
    assert_eq!(enrolled(&s), ["a", "b1", "b2"], "legacy's c stays out");
    // Custom labels too: the rule does not depend on our key.
    let mut s = state().with_enrollment(Enrollment::parse("member=yes").unwrap());
    s.namespaces.get_mut("shop").unwrap().labels.insert("member".into(), "yes".into());
    pod_label(&mut s, "b2", "ambient");
    assert_eq!(enrolled(&s), ["a", "b1", "out"]);
    // A destination pod ambient takes is passthrough for us.
    let d = s.resolve("198.51.100.13:8080".parse().unwrap(), |_| 0);
    assert_eq!(d, Destination::Passthrough("198.51.100.13:8080".parse().unwrap()));
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

fn pa(name: &str, ns: &str, selector: Option<&str>, mode: PeerAuthMode, ports: &[(u16, PeerAuthMode)]) -> PeerAuthentication {
    PeerAuthentication {
        name: name.into(),
        namespace: ns.into(),
        selector: selector.map(|app| [("app".to_string(), app.to_string())].into()),
        mode,
        port_level: ports.iter().copied().collect(),
    }
}

#[test]
fn peer_authentication_workload_beats_namespace() {
    use PeerAuthMode::*;
    let key = |n: &str| PodKey { namespace: "shop".into(), name: n.into() };
    let s = state().with_peer_authentications(vec![
        pa("ns", "shop", None, Strict, &[]),
        pa("b", "shop", Some("b"), Permissive, &[(9000, Strict)]),
    ]);
    assert_eq!(s.peer_auth_mode(&key("a"), 80), Strict);
    assert_eq!(s.peer_auth_mode(&key("b1"), 80), Permissive);
    assert_eq!(s.peer_auth_mode(&key("b1"), 9000), Strict, "portLevelMtls");
    let legacy = PodKey { namespace: "legacy".into(), name: "c".into() };
    assert_eq!(s.peer_auth_mode(&legacy, 80), Permissive, "default");
}

/// Istio's precedence: workload (port, then the policy's mode) > namespace >
/// mesh-wide (root namespace, no selector) > PERMISSIVE; UNSET defers.
#[test]
fn peer_authentication_precedence_and_unset() {
    use PeerAuthMode::*;
    let key = |n: &str| PodKey { namespace: "shop".into(), name: n.into() };
    let mesh = |m| pa("default", DEFAULT_ROOT_NAMESPACE, None, m, &[]);
    let s = state().with_peer_authentications(vec![mesh(Strict)]);
    assert_eq!(s.peer_auth_mode(&key("a"), 80), Strict, "mesh-wide applies to every namespace");
    let s = state().with_peer_authentications(vec![mesh(Strict), pa("ns", "shop", None, Disable, &[])]);
    assert_eq!(s.peer_auth_mode(&key("a"), 80), Disable, "namespace beats mesh");
    let s = state().with_peer_authentications(vec![mesh(Strict), pa("ns", "shop", None, Unset, &[])]);
    assert_eq!(s.peer_auth_mode(&key("a"), 80), Strict, "UNSET in the namespace inherits the mesh's");
    let s = state().with_peer_authentications(vec![
        mesh(Permissive),
        pa("ns", "shop", None, Strict, &[]),
        pa("b", "shop", Some("b"), Unset, &[(9000, Disable), (9001, Unset)]),
    ]);
    assert_eq!(s.peer_auth_mode(&key("b1"), 80), Strict, "UNSET workload inherits the namespace's");
    assert_eq!(s.peer_auth_mode(&key("b1"), 9000), Disable);
    assert_eq!(s.peer_auth_mode(&key("b1"), 9001), Strict, "UNSET port inherits");
    // A selector in the root namespace selects only that namespace's pods.
    let s = state().with_peer_authentications(vec![pa("sel", DEFAULT_ROOT_NAMESPACE, Some("a"), Strict, &[])]);
    assert_eq!(s.peer_auth_mode(&key("a"), 80), Permissive);
    // Another root namespace (--root-namespace).
    let scope = Scope { root_namespace: "mesh-root".into(), ..Scope::default() };
    let s = state().with_scope(scope).with_peer_authentications(vec![mesh(Strict), pa("d", "mesh-root", None, Strict, &[])]);
    assert_eq!(s.root_namespace, "mesh-root");
    assert_eq!(s.peer_auth_mode(&key("a"), 80), Strict);
    let s = state().with_scope(Scope { root_namespace: "mesh-root".into(), ..Scope::default() }).with_peer_authentications(vec![mesh(Strict)]);
    assert_eq!(s.peer_auth_mode(&key("a"), 80), Permissive, "istio-system is an ordinary namespace then");
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
