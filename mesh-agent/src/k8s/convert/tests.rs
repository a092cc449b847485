use super::*;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

#[test]
fn pods_without_an_address_or_finished_or_on_the_host_network_are_left_out() {
    let base = serde_json::json!({
        "metadata": {"name": "a", "namespace": "shop", "labels": {"app": "a"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": []},
        "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
    });
    let p = pod(&obj(base.clone()), Some(("/proc/1/ns/net".into(), "/sys/fs/cgroup/x".into()))).unwrap();
    assert_eq!(p.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
    assert_eq!(p.service_account, "web");
    assert_eq!(p.node, "node-a");
    assert_eq!(p.labels.get("app").map(String::as_str), Some("a"));

    let mut v = base.clone();
    v["status"] = serde_json::json!({"phase": "Pending"});
    assert_eq!(pod(&obj(v), None), Err(PodSkipped::NoIp));
    let mut v = base.clone();
    v["status"]["phase"] = "Succeeded".into();
    assert!(matches!(pod(&obj(v), None), Err(PodSkipped::Finished(_))));
    let mut v = base.clone();
    v["spec"]["hostNetwork"] = true.into();
    assert_eq!(pod(&obj(v), None), Err(PodSkipped::HostNetwork));
    let mut v = base;
    v["spec"]["serviceAccountName"] = serde_json::Value::Null;
    assert_eq!(pod(&obj(v), None).unwrap().service_account, "default");
}

#[test]
fn services_resolve_named_ports_and_ready_endpoints_from_slices() {
    let svc: Service = obj(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "web-http", "appProtocol": "http"},
                           {"name": "dns", "port": 53, "protocol": "UDP"}]}
    }));
    let slice: EndpointSlice = obj(serde_json::json!({
        "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.0.0.5"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.6"], "conditions": {"ready": false}},
            {"addresses": ["10.0.0.7"]}
        ]
    }));
    let grouped = slices_by_service([&slice]);
    let s = service(&svc, grouped.get(&("shop".into(), "web".into())).unwrap()).unwrap();
    assert_eq!(s.ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(s.ports.len(), 1, "UDP ports are not the mesh's");
    assert_eq!((s.ports[0].port, s.ports[0].target_port), (80, 8080));
    assert!(s.ports[0].is_http());
    assert_eq!(s.endpoint_ips, Some(vec!["10.0.0.5".parse().unwrap(), "10.0.0.7".parse().unwrap()]));
    // Without slices: the selector decides, as in the local file.
    assert_eq!(service(&svc, &[]).unwrap().endpoint_ips, None);
}

#[test]
fn mesh_objects_are_validated_with_the_local_file_rules() {
    let ap: super::super::istio::AuthorizationPolicy = obj(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop", "annotations": {"nodemesh.io/ignore-path-case": "true"}},
        "spec": {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["70000"]}}]}]}
    }));
    let e = authorization_policy(&ap).unwrap_err();
    assert_eq!(e.refused.reason, "Invalid");
    assert!(e.refused.message.starts_with("spec.rules[0].to[0].operation.ports[0]"), "{}", e.refused.message);
    assert_eq!(e.stand_in.map(|s| (s.action, s.rules.len())), Some((crate::state::AuthzAction::Allow, 0)), "an ALLOW allows nothing");
    let mut deny = ap.clone();
    deny.spec["action"] = "DENY".into();
    let e = authorization_policy(&deny).unwrap_err();
    let s = *e.stand_in.expect("a DENY fails closed");
    assert_eq!((s.action, s.selector, s.refused.is_some()), (crate::state::AuthzAction::Deny, None, true));
    deny.spec["rules"][0]["to"][0]["operation"]["ports"][0] = "8080".into();
    let p = authorization_policy(&deny).unwrap();
    assert!(p.ignore_path_case, "annotations are read");

    let pa: super::super::istio::PeerAuthentication = obj(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "s", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}
    }));
    let e = peer_authentication(&pa).unwrap_err();
    assert!(e.refused.message.starts_with("spec.portLevelMtls"), "{}", e.refused.message);
    assert_eq!(e.stand_in.map(|s| s.mode), Some(crate::state::PeerAuthMode::Strict), "STRICT stays STRICT");
}
