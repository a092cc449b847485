//! The local YAML source: one file declaring nodes, namespaces, pods,
//! services, policies and HTTP routes, parsed, validated and published into the mesh state. Watched by
//! polling its content, which also follows the symlink swaps a Kubernetes
//! ConfigMap volume does (inotify on the file would miss those). An invalid
//! edit is rejected with a message naming the file, the field and the reason,
//! and the last good state keeps serving.
//!
//! The file is a YAML stream: at most one document without `apiVersion` is
//! the mesh file (nodes, namespaces, pods, services, and the compact
//! `authorizationPolicies` / `peerAuthentications` / `httpRoutes`); every
//! document with `apiVersion` and `kind` is a Kubernetes object of a kind
//! [`crate::objects::KINDS`] lists (Istio's AuthorizationPolicy and
//! PeerAuthentication), converted by the same code as in a cluster, so the
//! YAML a user applies with kubectl works here unchanged. Unlike the
//! cluster, a refused object rejects the whole edit (the last good state
//! keeps serving), DENY policies included.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::watch;

use crate::state::{self, Labels, MeshState, PodKey};

mod objects;
mod watch_file;
pub use watch_file::{ReloadStats, watch};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {field}: {reason}")]
    Invalid { file: PathBuf, field: String, reason: String },
    #[error("{file} {message}")]
    Node { file: PathBuf, message: String },
    /// A Kubernetes object of the stream (`document` counts from 1).
    #[error("{file}: document {document} ({kind} {name}): {message}")]
    Object { file: PathBuf, document: usize, kind: String, name: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    #[serde(default = "default_trust_domain")]
    trust_domain: String,
    #[serde(default)]
    nodes: Vec<NodeSpec>,
    #[serde(default)]
    namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    pods: Vec<PodSpec>,
    #[serde(default)]
    services: Vec<ServiceSpec>,
    #[serde(default)]
    peer_authentications: Vec<PeerAuthSpec>,
    /// The state type is the schema (camelCase, unknown fields refused);
    /// `policy::validate` checks what serde cannot.
    #[serde(default)]
    authorization_policies: Vec<state::AuthorizationPolicy>,
    /// Schema and checks in [`crate::route`].
    #[serde(default)]
    http_routes: Vec<crate::route::HttpRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerAuthSpec {
    name: String,
    namespace: String,
    #[serde(default)]
    selector: Option<Labels>,
    mode: state::PeerAuthMode,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_service_account() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeSpec {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NamespaceSpec {
    name: String,
    #[serde(default)]
    labels: Labels,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodSpec {
    name: String,
    namespace: String,
    node: String,
    #[serde(default = "default_service_account")]
    service_account: String,
    ip: IpAddr,
    #[serde(default)]
    ip6: Option<IpAddr>,
    #[serde(default)]
    labels: Labels,
    netns: PathBuf,
    cgroup: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    namespace: String,
    #[serde(default)]
    ip: Option<IpAddr>,
    #[serde(default)]
    selector: Labels,
    ports: Vec<ServicePortSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServicePortSpec {
    #[serde(default)]
    name: String,
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
    #[serde(default)]
    app_protocol: Option<String>,
}

/// Reads and validates the file, for the enrollment label and cluster id
/// of `scope` (`--enrollment-label`, `--cluster-id`).
pub fn load(path: &Path, scope: &state::Scope) -> Result<MeshState, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        file: path.to_owned(),
        source,
    })?;
    parse_with(path, &text, scope)
}

/// Parses and validates file content with the default enrollment label;
/// `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<MeshState, Error> {
    parse_with(path, text, &state::Scope::default())
}

/// Parses and validates file content; a namespace's value of the
/// enrollment label's key must be its value or `disabled`.
pub fn parse_with(path: &Path, text: &str, scope: &state::Scope) -> Result<MeshState, Error> {
    let parse_error = |message: String| Error::Parse { file: path.to_owned(), message };
    let is_object = |v: &serde_yaml::Value| v.get("apiVersion").is_some() || v.get("kind").is_some();
    // One mesh document alone (the usual file), or text that is not YAML,
    // is read from the text as it always was, so that messages keep their
    // line and column.
    let stream_error = match documents(text) {
        Ok(docs) if docs.len() > 1 || docs.iter().any(|(_, v)| is_object(v)) => Ok(docs),
        Ok(_) => Err(None),
        Err(e) => Err(Some(e)),
    };
    let docs = match stream_error {
        Ok(docs) => docs,
        Err(stream) => {
            let file: File = serde_yaml::from_str(text).map_err(|e| match stream {
                // A stream of several documents, one of them broken: say which.
                Some(s) if e.to_string().contains("more than one document") => parse_error(s.to_string()),
                _ => parse_error(e.to_string()),
            })?;
            return build(path, file, Vec::new(), objects::Objects::default(), scope);
        }
    };
    let mut mesh_docs = docs.iter().filter(|(_, v)| !is_object(v));
    let mesh_doc = mesh_docs.next();
    if let Some((n, _)) = mesh_docs.next() {
        return Err(parse_error(format!(
            "document {n}: a second document without `apiVersion`: a file holds at most one mesh document, and Kubernetes objects with `apiVersion` and `kind`"
        )));
    }
    let file: File = match mesh_doc {
        Some((n, v)) => serde_path_to_error::deserialize(v.clone()).map_err(|e| parse_error(format!("document {n}: {}: {}", e.path(), e.inner())))?,
        None => serde_yaml::from_value(serde_yaml::Value::Mapping(Default::default())).expect("every field has a default"),
    };
    // Istio's kinds convert through [`crate::objects`] (shared with the
    // Kubernetes source); Gateway API's through [`objects`], whose
    // messages number documents from 0 (`documents[i]`).
    let mut istio = Vec::new();
    let mut gateway = objects::Objects::default();
    for (n, v) in docs.iter().filter(|(_, v)| is_object(v)) {
        let api_version = v.get("apiVersion").and_then(serde_yaml::Value::as_str).unwrap_or_default();
        if api_version.starts_with(GATEWAY_API_PREFIX) {
            objects::add(&mut gateway, n - 1, v.clone()).map_err(|(field, reason)| Error::Invalid { file: path.to_owned(), field, reason })?;
        } else {
            istio.push(object(path, *n, v)?);
        }
    }
    build(path, file, istio, gateway, scope)
}

/// Objects of this API group are Gateway API routes ([`objects`]).
const GATEWAY_API_PREFIX: &str = "gateway.networking.k8s.io/";

/// The stream's non-empty documents, numbered from 1; the first error ends
/// it (serde_yaml's document iterator does not end after one).
fn documents(text: &str) -> Result<Vec<(usize, serde_yaml::Value)>, serde_yaml::Error> {
    let mut docs = Vec::new();
    for (i, d) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = serde_yaml::Value::deserialize(d)?;
        if !v.is_null() {
            docs.push((i + 1, v));
        }
    }
    Ok(docs)
}

/// A Kubernetes object of the stream, converted.
struct Object {
    document: usize,
    kind: &'static str,
    namespace: String,
    name: String,
    value: crate::objects::Converted,
}

/// What the local file reads of an object: Kubernetes' envelope; `status`
/// is allowed (an object copied from a cluster) and ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: ObjectMetadata,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default)]
    #[allow(dead_code)]
    status: serde_json::Value,
}

/// Labels and the like are allowed and ignored; the namespace is required
/// (there is no `kubectl -n` here).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMetadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    /// RFC 3339; orders VirtualServices of one host (oldest first).
    #[serde(default)]
    creation_timestamp: Option<String>,
}

fn object(path: &Path, document: usize, v: &serde_yaml::Value) -> Result<Object, Error> {
    let s = |k: &str| v.get(k).and_then(serde_yaml::Value::as_str).unwrap_or_default().to_owned();
    let m = |k: &str| v.get("metadata").and_then(|m| m.get(k)).and_then(serde_yaml::Value::as_str).unwrap_or_default().to_owned();
    let fail = |message: String| Error::Object {
        file: path.to_owned(),
        document,
        kind: s("kind"),
        name: format!("{}/{}", m("namespace"), m("name")),
        message,
    };
    let env: Envelope = serde_path_to_error::deserialize(v.clone()).map_err(|e| fail(format!("{}: {}", e.path(), e.inner())))?;
    let kind = crate::objects::find(&env.api_version, &env.kind).map_err(|e| match e.strip_suffix(')') {
        // An unknown kind: the list of what is read names Gateway API's too.
        Some(list) if e.contains("is not a kind the mesh reads") => fail(format!("{list}, {})", objects::kinds().join(", "))),
        _ => fail(e),
    })?;
    for (field, value) in [("metadata.name", &env.metadata.name), ("metadata.namespace", &env.metadata.namespace)] {
        check_dns_label(field, value).map_err(|r| fail(format!("{field}: {r}")))?;
    }
    let meta = crate::objects::Meta {
        name: &env.metadata.name,
        namespace: &env.metadata.namespace,
        annotations: &env.metadata.annotations,
        created: env.metadata.creation_timestamp.as_deref(),
    };
    let value = kind.convert(&meta, &env.spec).map_err(|r| fail(r.message))?;
    Ok(Object { document, kind: kind.kind, namespace: env.metadata.namespace, name: env.metadata.name, value })
}

fn build(path: &Path, file: File, istio: Vec<Object>, gateway: objects::Objects, scope: &state::Scope) -> Result<MeshState, Error> {
    let enrollment = &scope.enrollment;
    let invalid = |field: String, reason: String| Error::Invalid {
        file: path.to_owned(),
        field,
        reason,
    };

    check_dns_label("trustDomain", &file.trust_domain.replace('.', "-")).map_err(|r| invalid("trustDomain".into(), r))?;

    let mut nodes = Vec::new();
    for (i, n) in file.nodes.iter().enumerate() {
        let field = format!("nodes[{i}].name");
        check_dns_label(&field, &n.name).map_err(|r| invalid(field.clone(), r))?;
        if nodes.contains(&n.name) {
            return Err(invalid(field, format!("node {:?} is declared twice", n.name)));
        }
        nodes.push(n.name.clone());
    }

    let mut namespaces = Vec::new();
    let mut ns_names = HashSet::new();
    for (i, ns) in file.namespaces.iter().enumerate() {
        let field = format!("namespaces[{i}].name");
        check_dns_label(&field, &ns.name).map_err(|r| invalid(field.clone(), r))?;
        if !ns_names.insert(ns.name.clone()) {
            return Err(invalid(field, format!("namespace {:?} is declared twice", ns.name)));
        }
        if let Some(v) = ns.labels.get(&enrollment.key)
            && *v != enrollment.value
            && v != state::DATAPLANE_MODE_DISABLED
        {
            return Err(invalid(
                format!("namespaces[{i}].labels.{}", enrollment.key),
                format!("{v:?} is not one of {:?}, {:?}", enrollment.value, state::DATAPLANE_MODE_DISABLED),
            ));
        }
        namespaces.push(state::Namespace {
            name: ns.name.clone(),
            labels: ns.labels.clone(),
        });
    }

    let mut pods = Vec::new();
    let mut ips: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut keys = HashSet::new();
    for (i, p) in file.pods.iter().enumerate() {
        let at = |f: &str| format!("pods[{i}].{f}");
        check_dns_label(&at("name"), &p.name).map_err(|r| invalid(at("name"), r))?;
        let key = PodKey {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        };
        if !keys.insert(key.clone()) {
            return Err(invalid(at("name"), format!("pod {key} is declared twice")));
        }
        if !ns_names.contains(&p.namespace) {
            return Err(invalid(
                at("namespace"),
                format!("namespace {:?} is not declared under `namespaces`", p.namespace),
            ));
        }
        if !nodes.contains(&p.node) {
            return Err(invalid(at("node"), format!("node {:?} is not declared under `nodes`", p.node)));
        }
        if !p.ip.is_ipv4() {
            return Err(invalid(at("ip"), format!("{} is not an IPv4 address (use ip6 for IPv6)", p.ip)));
        }
        let mut pod_ips = vec![p.ip];
        if let Some(ip6) = p.ip6 {
            if !ip6.is_ipv6() {
                return Err(invalid(at("ip6"), format!("{ip6} is not an IPv6 address")));
            }
            pod_ips.push(ip6);
        }
        for ip in &pod_ips {
            if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                return Err(invalid(at("ip"), format!("{ip} cannot be a pod address")));
            }
            if let Some(other) = ips.insert(*ip, key.to_string()) {
                return Err(invalid(at("ip"), format!("{ip} is already the address of pod {other}")));
            }
        }
        for (f, path) in [("netns", &p.netns), ("cgroup", &p.cgroup)] {
            if !path.is_absolute() {
                return Err(invalid(at(f), format!("{} is not an absolute path", path.display())));
            }
        }
        pods.push(state::Pod {
            key,
            node: p.node.clone(),
            service_account: p.service_account.clone(),
            ips: pod_ips,
            labels: p.labels.clone(),
            netns: p.netns.clone(),
            cgroup: p.cgroup.clone(),
        });
    }

    let mut services = Vec::new();
    let mut svc_keys = HashSet::new();
    for (i, s) in file.services.iter().enumerate() {
        let at = |f: &str| format!("services[{i}].{f}");
        check_dns_label(&at("name"), &s.name).map_err(|r| invalid(at("name"), r))?;
        if !ns_names.contains(&s.namespace) {
            return Err(invalid(
                at("namespace"),
                format!("namespace {:?} is not declared under `namespaces`", s.namespace),
            ));
        }
        if !svc_keys.insert((s.namespace.clone(), s.name.clone())) {
            return Err(invalid(at("name"), format!("service {}/{} is declared twice", s.namespace, s.name)));
        }
        if let Some(ip) = s.ip
            && let Some(other) = ips.insert(ip, format!("service {}/{}", s.namespace, s.name))
        {
            return Err(invalid(at("ip"), format!("{ip} is already the address of {other}")));
        }
        if s.ports.is_empty() {
            return Err(invalid(at("ports"), "a service needs at least one port".into()));
        }
        let mut ports = Vec::new();
        for (j, sp) in s.ports.iter().enumerate() {
            if sp.port == 0 || sp.target_port == Some(0) {
                return Err(invalid(format!("services[{i}].ports[{j}]"), "port 0 is not a valid port".into()));
            }
            if ports.iter().any(|p: &state::ServicePort| p.port == sp.port) {
                return Err(invalid(format!("services[{i}].ports[{j}].port"), format!("port {} is declared twice", sp.port)));
            }
            ports.push(state::ServicePort {
                name: sp.name.clone(),
                port: sp.port,
                target_port: sp.target_port.unwrap_or(sp.port),
                app_protocol: sp.app_protocol.clone(),
            });
        }
        services.push(state::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            ips: s.ip.into_iter().collect(),
            selector: s.selector.clone(),
            ports,
            endpoint_ips: None,
        });
    }

    let mut peer_auths = Vec::new();
    let mut pa_keys = HashSet::new();
    // Policies may be in the root namespace (mesh-wide) without declaring it.
    let policy_ns = |ns: &str| ns_names.contains(ns) || ns == scope.root_namespace;
    for (i, pa) in file.peer_authentications.iter().enumerate() {
        let at = |f: &str| format!("peerAuthentications[{i}].{f}");
        check_dns_label(&at("name"), &pa.name).map_err(|r| invalid(at("name"), r))?;
        if !policy_ns(&pa.namespace) {
            return Err(invalid(
                at("namespace"),
                format!("namespace {:?} is not declared under `namespaces`", pa.namespace),
            ));
        }
        if !pa_keys.insert((pa.namespace.clone(), pa.name.clone())) {
            return Err(invalid(at("name"), format!("policy {}/{} is declared twice", pa.namespace, pa.name)));
        }
        if pa.selector.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(invalid(at("selector"), "an empty selector is ambiguous: omit it for a namespace-wide policy".into()));
        }
        peer_auths.push(state::PeerAuthentication {
            name: pa.name.clone(),
            namespace: pa.namespace.clone(),
            selector: pa.selector.clone(),
            mode: pa.mode,
            port_level: BTreeMap::new(),
        });
    }

    let mut authz_keys = HashSet::new();
    for (i, ap) in file.authorization_policies.iter().enumerate() {
        let at = |f: &str| format!("authorizationPolicies[{i}].{f}");
        check_dns_label(&at("name"), &ap.name).map_err(|r| invalid(at("name"), r))?;
        if !policy_ns(&ap.namespace) {
            return Err(invalid(
                at("namespace"),
                format!("namespace {:?} is not declared under `namespaces`", ap.namespace),
            ));
        }
        if !authz_keys.insert((ap.namespace.clone(), ap.name.clone())) {
            return Err(invalid(at("name"), format!("policy {}/{} is declared twice", ap.namespace, ap.name)));
        }
        crate::policy::validate(ap).map_err(|e| invalid(at(&e.field), e.reason))?;
    }

    let mut authorization_policies = file.authorization_policies;
    let (mut vs_keys, mut dr_keys) = (HashSet::new(), HashSet::new());
    let (mut virtual_services, mut destination_rules) = (Vec::new(), Vec::new());
    for o in istio {
        let fail = |message: String| Error::Object {
            file: path.to_owned(),
            document: o.document,
            kind: o.kind.into(),
            name: format!("{}/{}", o.namespace, o.name),
            message,
        };
        if !policy_ns(&o.namespace) {
            return Err(fail(format!("metadata.namespace: namespace {:?} is not declared under `namespaces`", o.namespace)));
        }
        let keys = match o.value {
            crate::objects::Converted::AuthorizationPolicy(_) => &mut authz_keys,
            crate::objects::Converted::PeerAuthentication(_) => &mut pa_keys,
            crate::objects::Converted::VirtualService(_) => &mut vs_keys,
            crate::objects::Converted::DestinationRule(_) => &mut dr_keys,
        };
        if !keys.insert((o.namespace.clone(), o.name.clone())) {
            return Err(fail(format!("metadata.name: {} {}/{} is declared twice", o.kind, o.namespace, o.name)));
        }
        match o.value {
            crate::objects::Converted::AuthorizationPolicy(p) => authorization_policies.push(p),
            crate::objects::Converted::PeerAuthentication(p) => peer_auths.push(p),
            crate::objects::Converted::VirtualService(v) => virtual_services.push(v),
            crate::objects::Converted::DestinationRule(d) => destination_rules.push(d),
        }
    }

    let mut route_keys = HashSet::new();
    let mut routed: BTreeMap<(String, String), String> = BTreeMap::new();
    for (i, r) in file.http_routes.iter().enumerate() {
        let at = |f: &str| format!("httpRoutes[{i}].{f}");
        check_dns_label(&at("name"), &r.name).map_err(|e| invalid(at("name"), e))?;
        if !ns_names.contains(&r.namespace) {
            return Err(invalid(
                at("namespace"),
                format!("namespace {:?} is not declared under `namespaces`", r.namespace),
            ));
        }
        if !route_keys.insert((r.namespace.clone(), r.name.clone())) {
            return Err(invalid(at("name"), format!("route {}/{} is declared twice", r.namespace, r.name)));
        }
        crate::route::validate(r, &services).map_err(|e| invalid(at(&e.field), e.reason))?;
        if let Some(other) = routed.insert((r.namespace.clone(), r.service.clone()), r.name.clone()) {
            return Err(invalid(
                at("service"),
                format!("service {}/{} is already routed by route {other} (one route per service)", r.namespace, r.service),
            ));
        }
    }

    let mut routes = file.http_routes;
    routes.extend(gateway_routes(&gateway, &ns_names, &services).map_err(|(f, r)| invalid(f, r))?);

    Ok(MeshState::new(file.trust_domain, nodes, namespaces, pods, services)
        .with_peer_authentications(peer_auths)
        .with_authorization_policies(authorization_policies)
        .with_routes(routes)
        .with_istio_traffic(virtual_services, destination_rules)
        .with_scope(scope.clone()))
}

/// The Gateway API routes of the file, converted as the cluster's are
/// ([`crate::route::gateway::convert`]). A route not accepted for one of
/// its Service parents is an invalid file (the last good state keeps
/// serving); unresolved backends are applied as Gateway API says (500 for
/// their share) and logged.
fn gateway_routes(objects: &objects::Objects, ns_names: &HashSet<String>, services: &[state::Service]) -> Result<Vec<crate::route::HttpRoute>, (String, String)> {
    use crate::route::gateway::{RouteObject, Spec, convert};
    let mut out = Vec::new();
    let mut keys = HashSet::new();
    let http = objects.http_routes.iter().map(|o| (&o.at, &o.metadata, Spec::Http(&o.spec)));
    let grpc = objects.grpc_routes.iter().map(|o| (&o.at, &o.metadata, Spec::Grpc(&o.spec)));
    for (at, meta, spec) in http.chain(grpc) {
        let ns = meta.namespace.as_deref().unwrap_or_default();
        check_dns_label("metadata.name", &meta.name).map_err(|r| (format!("{at}.metadata.name"), r))?;
        if !ns_names.contains(ns) {
            return Err((format!("{at}.metadata.namespace"), format!("namespace {ns:?} is not declared under `namespaces`")));
        }
        if !keys.insert((spec.kind(), ns.to_owned(), meta.name.clone())) {
            return Err((format!("{at}.metadata.name"), format!("{} {ns}/{} is declared twice", spec.kind(), meta.name)));
        }
        let obj = RouteObject { namespace: ns, name: &meta.name, created: meta.creation_timestamp.clone(), spec };
        let converted = convert(&obj, services);
        if let Some(p) = converted.parents.iter().find(|p| !p.accepted.status) {
            return Err((format!("{at}.spec.parentRefs"), format!("{}: {}", p.accepted.reason, p.accepted.message)));
        }
        if let Some(p) = converted.parents.iter().find(|p| !p.resolved_refs.status) {
            tracing::warn!(route = %at, reason = p.resolved_refs.reason, "{}", p.resolved_refs.message);
        }
        out.extend(converted.routes);
    }
    Ok(out)
}

/// Kubernetes object names are DNS labels (RFC 1123): lower-case
/// alphanumerics and '-', at most 63 characters, alphanumeric at both ends.
fn check_dns_label(_field: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name (lower-case letters, digits and '-', at most 63 characters)"
        ))
    }
}

/// An agent for `node` has something to serve: the file declares nodes and
/// `node` among them (a typo in `--node` or an empty file would otherwise
/// start an agent that manages nothing, silently).
pub fn check_node(path: &Path, state: &MeshState, node: &str) -> Result<(), Error> {
    if state.nodes.is_empty() {
        return Err(Error::Node { file: path.to_owned(), message: "declares no nodes: there is nothing for an agent to serve".into() });
    }
    if !state.nodes.iter().any(|n| n == node) {
        return Err(Error::Node {
            file: path.to_owned(),
            message: format!("has no node {node:?} (--node); its nodes: {}", state.nodes.join(", ")),
        });
    }
    Ok(())
}

/// Loads the file once and publishes it; then the returned future watches it.
pub async fn start(
    path: PathBuf,
    poll: Duration,
    scope: state::Scope,
) -> Result<(watch::Receiver<state::Snapshot>, Arc<ReloadStats>, impl Future<Output = ()>), Error> {
    let first = std::fs::read(&path).map_err(|source| Error::Read {
        file: path.clone(),
        source,
    })?;
    let state = parse_with(&path, &String::from_utf8_lossy(&first), &scope)?;
    let (tx, rx) = watch::channel(Arc::new(state));
    let stats = Arc::new(ReloadStats::new(path.clone()));
    let fut = watch(path, poll, first, tx, stats.clone(), scope);
    Ok((rx, stats, fut))
}

#[cfg(test)]
mod tests;
