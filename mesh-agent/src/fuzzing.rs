//! Entry points for `cargo fuzz` (`fuzz/`, feature `fuzzing`): the agent's
//! parsers where hostile bytes come in, as pure functions. Each panics
//! only on a bug (a broken invariant asserted here or a crash below).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::OnceLock,
};

// Documentation addresses for the policy checks.
const FUZZ_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const FUZZ_DESTINATION: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 20));

use crate::{
    identity::{Authority, SpiffeId, WorkloadCert},
    policy::{Connection, Peer, Request, WorkloadPolicy, normalize_path},
    state::PodKey,
};

/// The mesh the front door and the CA see: one pod, policies with paths,
/// hosts, headers and principals, so decisions take every branch.
const MESH: &str = r#"
nodes: [{name: node-a}]
namespaces:
  - name: shop
    labels: {nodemesh.io/dataplane-mode: enabled}
pods:
  - {name: web, namespace: shop, node: node-a, serviceAccount: web, labels: {app: web}, ip: 198.51.100.11, netns: /proc/self/ns/net, cgroup: /sys/fs/cgroup/web}
authorizationPolicies:
  - name: deny-admin
    namespace: shop
    selector: {app: web}
    action: DENY
    rules:
      - to: [{paths: ["/admin", "/admin/*", "*/secret"], hosts: ["admin.shop"]}]
      - when: [{header: x-debug, values: ["1"]}]
  - name: allow-shop
    namespace: shop
    selector: {app: web}
    action: ALLOW
    rules:
      - from: [{principals: ["spiffe://cluster.local/ns/shop/*"]}]
        to: [{methods: [GET, POST], paths: ["/api/*", "/"], ports: [8080]}]
"#;

fn mesh() -> &'static crate::state::MeshState {
    static MESH_STATE: OnceLock<crate::state::MeshState> = OnceLock::new();
    MESH_STATE.get_or_init(|| crate::localfile::parse(Path::new("fuzz.yaml"), MESH).expect("the fuzz mesh parses"))
}

fn policy() -> &'static WorkloadPolicy {
    static POLICY: OnceLock<WorkloadPolicy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let state = mesh();
        let pod = state.pods.values().next().expect("one pod");
        crate::policy::Authorizer::from_state(state).for_workload(&pod.key.namespace, &pod.labels)
    })
}

/// HTTP/1 bytes through the front door, then an authorization decision.
pub fn front_door(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else { return };
    let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("a SPIFFE ID");
    let peer = Peer::new(&id);
    crate::proxy::fuzz_hooks::front_door(rest, usize::from(split % 64) + 1, &|req, path| {
        let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
        let conn = Connection { peer: Some(&peer), port: 8080, source: FUZZ_SOURCE, destination: FUZZ_DESTINATION };
        let _ = policy().check_http(&conn, &Request { method: req.method().as_str(), path, host, headers: req.headers() });
        let _ = policy().check_http(&Connection { peer: None, port: 8080, source: FUZZ_SOURCE, destination: FUZZ_DESTINATION }, &Request { method: req.method().as_str(), path, host, headers: req.headers() });
    });
}

/// A request target through path normalization: normalizing is idempotent
/// and the result has no dot segments left.
pub fn path(target: &str) {
    let Ok(once) = normalize_path(target) else { return };
    let twice = normalize_path(once.as_str()).expect("a normalized path normalizes again");
    assert_eq!(once.as_str(), twice.as_str(), "normalization is idempotent");
    let p = once.path();
    assert!(p.starts_with('/'), "{p:?}");
    assert!(!p.split('/').any(|s| s == "." || s == ".."), "dot segments left in {p:?}");
}

/// A CONNECT `:authority` (as h2 accepts it) through the tunnel's parser:
/// what it accepts is an IP:port that prints back as what was sent, up to
/// the canonical text of the address.
pub fn connect_authority(data: &[u8]) {
    let Ok(authority) = http::uri::Authority::try_from(data) else { return };
    if let Some(addr) = crate::proxy::fuzz_hooks::connect_authority(authority.as_str()) {
        let again: SocketAddr = addr.to_string().parse().expect("a SocketAddr prints as one");
        assert_eq!(addr, again);
        assert!(!authority.as_str().contains('@'), "userinfo accepted: {authority}");
    }
}

/// The local config file: any text parses or is refused with an error.
pub fn localfile(text: &str) {
    if let Ok(state) = crate::localfile::parse(Path::new("fuzz.yaml"), text) {
        // What was accepted is usable: resolving and authorizing over it
        // must not panic either.
        let _ = crate::policy::Authorizer::from_state(&state);
        // Routes, Istio's resolved against the services included.
        let _ = crate::route::RouteTable::from_state(&state);
        for pod in state.pods.values() {
            let _ = state.peer_auth_mode(&pod.key, 8080);
        }
    }
}

fn ca() -> &'static (Authority, WorkloadCert) {
    static CA: OnceLock<(Authority, WorkloadCert)> = OnceLock::new();
    CA.get_or_init(|| {
        let ca = Authority::in_memory().expect("an in-memory CA");
        let id = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("a SPIFFE ID");
        let ours = ca.mint(&id, std::time::Duration::from_secs(3600)).expect("a workload certificate");
        (ca, ours)
    })
}

/// Certificates and CSRs: the first byte picks what the rest is: a peer's
/// leaf (DER) at either end of the tunnel, or a CSR (DER, or PEM text) for
/// the CA's issuance checks.
pub fn certificates(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    let (ca, ours) = ca();
    match kind % 4 {
        0 | 1 => {
            let now = rustls::pki_types::UnixTime::now();
            let _ = crate::tls::verify::fuzz_peer_certificate(ours, rest, kind % 4 == 0, now);
        }
        _ => {
            let pem;
            let csr_pem = if kind % 4 == 2 {
                pem = format!("-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n", base64(rest));
                pem.as_str()
            } else {
                match std::str::from_utf8(rest) {
                    Ok(t) => t,
                    Err(_) => return,
                }
            };
            let pod = PodKey { namespace: "shop".into(), name: "web".into() };
            let req = crate::identity::authority::IssueRequest { csr_pem, pod: &pod, ttl: None };
            if let Ok(issued) = ca.issue(mesh(), "node-a", &req) {
                assert_eq!(issued.id.to_string(), "spiffe://cluster.local/ns/shop/sa/web", "the identity comes from the mesh, never the CSR");
            }
        }
    }
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for (i, chunk) in data.chunks(3).enumerate() {
        if i > 0 && i % 16 == 0 {
            out.push('\n');
        }
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for j in 0..4 {
            if j <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * j) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn every_entry_point_takes_its_seeds() {
        super::front_door(b"\x07GET /api/x HTTP/1.1\r\nHost: web.shop\r\n\r\n");
        super::path("/a/./b/../c%2e%2E/d?q");
        super::connect_authority(b"198.51.100.11:8080");
        super::localfile(super::MESH);
        super::certificates(b"\x00garbage");
        super::certificates(b"\x02garbage");
    }
}
