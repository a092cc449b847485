//! The in-memory mesh state: namespaces, pods, services, policies. Pure data,
//! no I/O.
//!
//! Control-plane sources (the local file now, Kubernetes later) build a whole
//! [`MeshState`] and publish it as an immutable snapshot; the data path reads
//! the latest snapshot and never waits on the control plane.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use serde::Serialize;

pub mod route;
pub mod traffic;

/// The default enrollment label (`--enrollment-label`): on a namespace, with
/// the value [`DATAPLANE_MODE_ENABLED`], it puts the namespace's pods in the
/// mesh; on a pod, the value [`DATAPLANE_MODE_DISABLED`] takes one pod out.
pub const DATAPLANE_MODE_LABEL: &str = "nodemesh.io/dataplane-mode";
pub const DATAPLANE_MODE_ENABLED: &str = "enabled";
/// The opt-out value, on a pod, of whichever key enrolls.
pub const DATAPLANE_MODE_DISABLED: &str = "disabled";

/// Istio ambient's enrollment label: `ambient` on a namespace or a pod hands
/// the pods to ztunnel, `none` on a pod keeps one out. A pod Istio ambient
/// captures is never enrolled here ([`MeshState::is_enrolled`]), and this key
/// cannot be our enrollment label ([`Enrollment::parse`]), so the two meshes
/// never both take a pod.
pub const ISTIO_DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const ISTIO_DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const ISTIO_DATAPLANE_MODE_NONE: &str = "none";

/// The namespace label `key=value` that enrolls a namespace's pods
/// (`--enrollment-label`); a pod opts out with `key=disabled`. The same on
/// every agent of a mesh: an agent also uses it to tell whether a
/// destination pod on another node is in the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Enrollment {
    pub key: String,
    pub value: String,
}

impl Default for Enrollment {
    fn default() -> Self {
        Self { key: DATAPLANE_MODE_LABEL.into(), value: DATAPLANE_MODE_ENABLED.into() }
    }
}

/// Istio's default cluster id, for `--cluster-id`.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Istio's default root namespace, for `--root-namespace`: policies there
/// (authorization, peer authentication) apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// What the agent's flags, not the source, decide of a state: which label
/// enrolls, the cluster's name in metrics, and the namespace whose policies
/// apply mesh-wide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub enrollment: Enrollment,
    /// `source_cluster` / `destination_cluster` of the pods (`--cluster-id`).
    pub cluster_id: String,
    /// `--root-namespace`, as Istio's `rootNamespace` mesh setting.
    pub root_namespace: String,
}

impl Default for Scope {
    fn default() -> Self {
        Self {
            enrollment: Enrollment::default(),
            cluster_id: DEFAULT_CLUSTER_ID.into(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
        }
    }
}

impl std::fmt::Display for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

impl Serialize for Enrollment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Enrollment {
    /// `key=value`: a Kubernetes label key (`[prefix/]name`) and value.
    /// Refused: Istio ambient's key (both meshes would take the same pods),
    /// and the value `disabled` (the pods' opt-out).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (key, value) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected key=value, e.g. {}", Enrollment::default()))?;
        let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
        if let Some(p) = prefix
            && !valid_dns_subdomain(p)
        {
            return Err(format!("{s:?}: the key's prefix {p:?} is not a DNS subdomain"));
        }
        if name.is_empty() || !valid_label_value(name) {
            return Err(format!("{s:?}: the key's name {name:?} is not a label name (at most 63 letters, digits, '-', '_', '.', alphanumeric at both ends)"));
        }
        if value.is_empty() || !valid_label_value(value) {
            return Err(format!("{s:?}: {value:?} is not a label value (at most 63 letters, digits, '-', '_', '.', alphanumeric at both ends)"));
        }
        if key == ISTIO_DATAPLANE_MODE_LABEL {
            return Err(format!(
                "{s:?}: {ISTIO_DATAPLANE_MODE_LABEL} is Istio ambient's enrollment label: both meshes would take the same pods; choose a label of your own (README: Enrollment)"
            ));
        }
        if value == DATAPLANE_MODE_DISABLED {
            return Err(format!("{s:?}: {DATAPLANE_MODE_DISABLED:?} is the value that takes a pod out of the mesh; it cannot enroll"));
        }
        Ok(Self { key: key.into(), value: value.into() })
    }
}

fn valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn valid_dns_subdomain(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 253
        && p.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Namespace label that sets its pods' failure policy, overriding the
/// agent's `--failure-policy`: what happens to an enrolled pod's connections
/// while no agent serves it (restart, crash). `closed` (the default): they
/// are refused; `open`: they go direct, unauthenticated and unpoliced.
pub const FAILURE_POLICY_LABEL: &str = "nodemesh.io/failure-policy";

pub type Labels = BTreeMap<String, String>;

/// A label selector: it matches labels that carry every one of its pairs,
/// so the empty selector matches everything (where "no selector" means
/// something else, as for a [`Service`], the caller says so). The one
/// place in the agent where labels are matched: services, peer
/// authentication, authorization policies, route subsets, metrics.
#[derive(Clone, Copy, Debug)]
pub struct Selector<'a>(pub &'a Labels);

impl Selector<'_> {
    pub fn matches(self, labels: &Labels) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub key: PodKey,
    pub node: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    /// Path of the pod's network namespace (e.g. `/run/netns/x` or `/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// Absolute path of the pod's cgroup v2 directory.
    pub cgroup: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    /// Kubernetes `appProtocol`, if declared.
    pub app_protocol: Option<String>,
}

/// The HTTP version an application serves on a declared HTTP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppHttp {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), including gRPC.
    Http2,
}

impl ServicePort {
    /// HTTP by declaration: `appProtocol` http/http2/grpc (or `kubernetes.io/h2c`),
    /// or a port name `http`, `http2`, `grpc` or one of those followed by `-...`
    /// (Istio's convention).
    pub fn is_http(&self) -> bool {
        self.http_version().is_some()
    }

    /// The HTTP version the application speaks on this port, if HTTP.
    pub fn http_version(&self) -> Option<AppHttp> {
        let kind = |p: &str| match p {
            "http" | "grpc-web" => Some(AppHttp::Http1),
            "http2" | "grpc" | "kubernetes.io/h2c" => Some(AppHttp::Http2),
            _ => None,
        };
        if let Some(p) = &self.app_protocol {
            return kind(&p.to_ascii_lowercase());
        }
        let name = self.name.to_ascii_lowercase();
        let prefix = name.split_once('-').map_or(name.as_str(), |(p, _)| p);
        kind(prefix).filter(|_| prefix != "grpc-web")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
    /// Kubernetes (EndpointSlices): the addresses of the service's ready
    /// endpoints; only pods with one of them are endpoints. `None` (the
    /// local file): every pod the selector matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_ips: Option<Vec<IpAddr>>,
}

impl Service {
    /// Whether the service selects `pod`: a pod of its namespace that its
    /// selector matches. A service without a selector selects no pod (in
    /// Kubernetes its endpoints are managed by hand).
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.key.namespace == self.namespace && !self.selector.is_empty() && Selector(&self.selector).matches(&pod.labels)
    }
}

/// How a workload accepts inbound connections that do not come through the
/// mesh tunnel (plaintext, captured on the agent's 15006 listener), Istio's
/// `PeerAuthentication` modes. Mesh peers always come over the mutual-TLS
/// tunnel, whatever the mode: this mesh never downgrades its own tunnel, so
/// `DISABLE` only means what `PERMISSIVE` does for plaintext from outside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerAuthMode {
    /// Plaintext accepted (and labelled as such); mTLS from mesh peers too.
    #[default]
    Permissive,
    /// Only mTLS from mesh peers; plaintext is refused.
    Strict,
    /// Plaintext accepted, as `PERMISSIVE` (mesh peers still use the tunnel).
    Disable,
    /// Inherit: the namespace's policy, then the mesh-wide one (root
    /// namespace), else `PERMISSIVE`. Never the effective mode of a pod.
    Unset,
}

/// A peer-authentication policy: namespace-wide, or for the pods its
/// selector matches; in the root namespace without a selector, mesh-wide.
/// Precedence: workload > namespace > mesh (see [`MeshState::peer_auth_mode`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: Option<Labels>,
    pub mode: PeerAuthMode,
    /// Per target port of the workload (Istio `portLevelMtls`); only with a
    /// selector.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level: BTreeMap<u16, PeerAuthMode>,
}

/// What an authorization policy does with the requests its rules match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    Allow,
    Deny,
    /// Never changes a decision: a matching AUDIT policy is reported with it
    /// (Istio's AUDIT, with the decision's log line as the audit sink).
    Audit,
}

/// An authorization policy, Istio `AuthorizationPolicy`-like: namespace-wide,
/// or for the pods its selector matches. Semantics (evaluation order, L4
/// context, wildcards) live in [`crate::policy`]; this is the data only.
///
/// Also the config schema of `authorizationPolicies` in the local file, hence
/// `Deserialize` with unknown fields refused. In every list, `None` is "not
/// set" (no constraint); an empty list is rejected by validation because
/// "match nothing" and "match anything" are both plausible readings of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    pub action: AuthzAction,
    /// A policy matches when any rule matches; no rules: it matches nothing.
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
    /// Compare `paths`/`notPaths` ASCII case-insensitively (Istio compares
    /// them case-sensitively, the default here too). For backends whose
    /// routing ignores case, where `/ADMIN` would otherwise escape a DENY.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_path_case: bool,
    /// The services of the namespace whose pods the policy applies to
    /// (Istio `targetRefs` of kind Service), instead of `selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_services: Option<Vec<String>>,
    /// Set by a source for a refused object that still stands, failing
    /// closed (a DENY that could not be read denies everything it selects):
    /// why it was refused. Decisions by it say so.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// A rule matches when every part it sets matches: any `from` entry, any
/// `to` entry, and all `when` conditions. The empty rule `{}` matches all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<AuthzSource>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<AuthzOperation>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Vec<AuthzCondition>>,
}

/// Who the peer is (from its verified SPIFFE ID, and its address). Every set
/// field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzSource {
    /// The peer's address (the source pod's over the tunnel, the client's
    /// for plaintext): IPs or CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ip_blocks: Option<Vec<String>>,
    /// Istio's original-client address (X-Forwarded-For, proxy protocol):
    /// the mesh trusts neither, so the original client is the peer, and
    /// these are `ipBlocks` by another name (both must match when both set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_remote_ip_blocks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_principals: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_namespaces: Option<Vec<String>>,
}

/// What is asked for. Every set field must match; all but the ports are
/// HTTP-only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzOperation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_hosts: Option<Vec<String>>,
    /// The workload's own (target) ports. Wider than `u16` so that an
    /// out-of-range value gets a validation message, not a parse error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ports: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_paths: Option<Vec<String>>,
}

/// A condition: on a request header (`header`, HTTP-only), or on one of
/// Istio's condition keys (`key`: `request.headers[NAME]`, `source.ip`,
/// `remote.ip`, `source.namespace`, `source.principal`, `destination.ip`,
/// `destination.port`). Exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzCondition {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub header: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_values: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshState {
    pub trust_domain: String,
    pub nodes: Vec<String>,
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<PodKey, Pod>,
    pub services: Vec<Service>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// In config order, which is also the order decisions report matches in.
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// HTTP routes, in config order; semantics in [`crate::route`].
    pub routes: Vec<route::HttpRoute>,
    /// Istio `VirtualService`s, resolved into routes by [`crate::route::istio`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub virtual_services: Vec<traffic::VirtualService>,
    /// Istio `DestinationRule`s: subsets and service-level policies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_rules: Vec<traffic::DestinationRule>,
    /// The label that enrolls a namespace (`--enrollment-label`).
    pub enrollment_label: Enrollment,
    /// The cluster its pods are in, as metrics name it (`--cluster-id`).
    pub cluster_id: String,
    /// Policies of this namespace apply mesh-wide (`--root-namespace`).
    pub root_namespace: String,
    #[serde(skip)]
    by_ip: HashMap<IpAddr, PodKey>,
}

/// Where a connection to some address should go, as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A pod in the mesh: reach it through its node's agent.
    MeshPod { pod: PodKey, addr: SocketAddr },
    /// Anything else, including pods of namespaces outside the mesh.
    Passthrough(SocketAddr),
}

impl MeshState {
    pub fn new(
        trust_domain: String,
        nodes: Vec<String>,
        namespaces: Vec<Namespace>,
        pods: Vec<Pod>,
        services: Vec<Service>,
    ) -> Self {
        let by_ip = pods
            .iter()
            .flat_map(|p| p.ips.iter().map(|ip| (*ip, p.key.clone())))
            .collect();
        Self {
            trust_domain,
            nodes,
            namespaces: namespaces.into_iter().map(|n| (n.name.clone(), n)).collect(),
            pods: pods.into_iter().map(|p| (p.key.clone(), p)).collect(),
            services,
            peer_authentications: Vec::new(),
            authorization_policies: Vec::new(),
            routes: Vec::new(),
            virtual_services: Vec::new(),
            destination_rules: Vec::new(),
            enrollment_label: Enrollment::default(),
            cluster_id: DEFAULT_CLUSTER_ID.into(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            by_ip,
        }
    }

    pub fn with_peer_authentications(mut self, policies: Vec<PeerAuthentication>) -> Self {
        self.peer_authentications = policies;
        self
    }

    pub fn with_authorization_policies(mut self, policies: Vec<AuthorizationPolicy>) -> Self {
        self.authorization_policies = policies;
        self
    }

    pub fn with_routes(mut self, routes: Vec<route::HttpRoute>) -> Self {
        self.routes = routes;
        self
    }

    pub fn with_istio_traffic(mut self, virtual_services: Vec<traffic::VirtualService>, destination_rules: Vec<traffic::DestinationRule>) -> Self {
        self.virtual_services = virtual_services;
        self.destination_rules = destination_rules;
        self
    }

    pub fn with_enrollment(mut self, enrollment: Enrollment) -> Self {
        self.enrollment_label = enrollment;
        self
    }

    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.enrollment_label = scope.enrollment;
        self.cluster_id = scope.cluster_id;
        self.root_namespace = scope.root_namespace;
        self
    }

    /// The HTTP version `pod` serves on `port`, as a service selecting it
    /// declares; `None` for L4.
    pub fn app_http(&self, pod: &PodKey, port: u16) -> Option<AppHttp> {
        let p = self.pods.get(pod)?;
        self.services
            .iter()
            .filter(|svc| svc.selects(p))
            .flat_map(|svc| svc.ports.iter())
            .find(|sp| sp.target_port == port && sp.is_http())
            .and_then(ServicePort::http_version)
    }

    /// The peer-authentication mode for connections to `port` (a target
    /// port) of `pod`, as Istio resolves it: the first policy of the pod's
    /// namespace whose selector matches it (its `portLevel` entry for the
    /// port, else its mode), then the namespace-wide policy, then the
    /// mesh-wide one (root namespace, no selector), else PERMISSIVE; `UNSET`
    /// at any level defers to the next. Never returns `Unset`.
    pub fn peer_auth_mode(&self, pod: &PodKey, port: u16) -> PeerAuthMode {
        let Some(p) = self.pods.get(pod) else {
            return PeerAuthMode::default();
        };
        let set = |m: PeerAuthMode| (m != PeerAuthMode::Unset).then_some(m);
        fn in_ns<'a>(all: &'a [PeerAuthentication], ns: &'a str) -> impl Iterator<Item = &'a PeerAuthentication> + 'a {
            all.iter().filter(move |a| a.namespace == ns)
        }
        let all = &self.peer_authentications;
        let workload = in_ns(all, &pod.namespace)
            .find(|a| a.selector.as_ref().is_some_and(|sel| Selector(sel).matches(&p.labels)))
            .and_then(|a| a.port_level.get(&port).copied().and_then(set).or_else(|| set(a.mode)));
        let namespace_wide = |ns: &str| in_ns(all, ns).find(|a| a.selector.is_none()).and_then(|a| set(a.mode));
        workload
            .or_else(|| namespace_wide(&pod.namespace))
            .or_else(|| namespace_wide(&self.root_namespace))
            .unwrap_or_default()
    }

    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.by_ip.get(&ip.to_canonical()).and_then(|k| self.pods.get(k))
    }

    /// A pod is in the mesh when its namespace carries the enrollment label
    /// ([`Enrollment`]), the pod does not opt out (`<key>=disabled`), and
    /// Istio ambient does not capture it: a pod labelled
    /// `istio.io/dataplane-mode=ambient`, or in a namespace so labelled
    /// unless the pod says `istio.io/dataplane-mode=none`. Ambient wins such
    /// a pod even when our label is on its namespace too: it is Istio's, not
    /// ours, and never both.
    pub fn is_enrolled(&self, pod: &Pod) -> bool {
        let e = &self.enrollment_label;
        let ns_labels = self.namespaces.get(&pod.key.namespace).map(|ns| &ns.labels);
        let ns_enabled = ns_labels.and_then(|l| l.get(&e.key)).is_some_and(|v| *v == e.value);
        let pod_opt_out = pod.labels.get(&e.key).is_some_and(|v| v == DATAPLANE_MODE_DISABLED);
        ns_enabled && !pod_opt_out && !ambient_captures(ns_labels, &pod.labels)
    }

    /// Whether `pod`'s failure policy is `open`: its namespace's
    /// [`FAILURE_POLICY_LABEL`] (`open` / `closed`), else `default_open`. Any
    /// other value means closed: a typo must not open the mesh.
    pub fn fails_open(&self, pod: &Pod, default_open: bool) -> bool {
        match self.namespaces.get(&pod.key.namespace).and_then(|ns| ns.labels.get(FAILURE_POLICY_LABEL)) {
            Some(v) => v == "open",
            None => default_open,
        }
    }

    pub fn pods_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.values().filter(move |p| p.node == node)
    }

    /// Pods selected by a service, in a stable order.
    pub fn endpoints<'a>(&'a self, svc: &'a Service) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods.values().filter(move |p| {
            svc.selects(p)
                && svc.endpoint_ips.as_ref().is_none_or(|eps| p.ips.iter().any(|ip| eps.contains(ip)))
        })
    }

    /// Resolves an original destination. A service address picks one of the
    /// service's endpoints with `pick` (given the number of endpoints); a pod
    /// address names that pod. Either is a mesh destination only when the pod
    /// is enrolled.
    pub fn resolve(&self, dst: SocketAddr, pick: impl FnOnce(usize) -> usize) -> Destination {
        let mut all = self.resolve_all(dst);
        let i = pick(all.len()) % all.len();
        all.swap_remove(i)
    }

    /// Every place an original destination may go: the endpoints of a
    /// service address (in a stable order), else the one pod or address.
    /// Never empty.
    pub fn resolve_all(&self, dst: SocketAddr) -> Vec<Destination> {
        let ip = dst.ip().to_canonical();
        if let Some(pod) = self.pod_by_ip(ip) {
            return vec![self.destination(pod, SocketAddr::new(ip, dst.port()))];
        }
        match self.service_target(dst) {
            Some(t) if !t.endpoints.is_empty() => t.endpoints.into_iter().map(|e| e.dest).collect(),
            _ => vec![Destination::Passthrough(SocketAddr::new(ip, dst.port()))],
        }
    }

    /// The service port an address names (a service IP and one of its
    /// ports), with the endpoints behind it in a stable order.
    pub fn service_target(&self, dst: SocketAddr) -> Option<ServiceTarget<'_>> {
        let ip = dst.ip().to_canonical();
        let svc = self.services.iter().find(|s| s.ips.contains(&ip))?;
        let port = svc.ports.iter().find(|p| p.port == dst.port())?;
        Some(self.target(svc, port, ip.is_ipv4()))
    }

    /// A service port by name (a Gateway API backendRef), with its
    /// endpoints in a stable order (IPv4 addresses preferred).
    pub fn service_port_target(&self, ns: &str, name: &str, port: u16) -> Option<ServiceTarget<'_>> {
        let svc = self.services.iter().find(|s| s.namespace == ns && s.name == name)?;
        let port = svc.ports.iter().find(|p| p.port == port)?;
        Some(self.target(svc, port, true))
    }

    fn target<'a>(&'a self, svc: &'a Service, port: &'a ServicePort, v4: bool) -> ServiceTarget<'a> {
        let endpoints = self
            .endpoints(svc)
            .filter(|p| !p.ips.is_empty())
            .map(|pod| {
                let pod_ip = pod.ips.iter().find(|a| a.is_ipv4() == v4).unwrap_or(&pod.ips[0]);
                Endpoint { dest: self.destination(pod, SocketAddr::new(*pod_ip, port.target_port)), labels: &pod.labels }
            })
            .collect();
        ServiceTarget { service: svc, port, endpoints }
    }

    /// A pod as a destination: through the mesh when it is enrolled.
    fn destination(&self, pod: &Pod, addr: SocketAddr) -> Destination {
        if self.is_enrolled(pod) {
            Destination::MeshPod { pod: pod.key.clone(), addr }
        } else {
            Destination::Passthrough(addr)
        }
    }
}

/// Whether Istio ambient takes the pod (its ztunnel, not us): the pod's own
/// `istio.io/dataplane-mode` decides (`ambient` in, `none` out), else its
/// namespace's (`ambient`).
fn ambient_captures(ns_labels: Option<&Labels>, pod_labels: &Labels) -> bool {
    match pod_labels.get(ISTIO_DATAPLANE_MODE_LABEL).map(String::as_str) {
        Some(ISTIO_DATAPLANE_MODE_AMBIENT) => true,
        Some(ISTIO_DATAPLANE_MODE_NONE) => false,
        _ => ns_labels.and_then(|l| l.get(ISTIO_DATAPLANE_MODE_LABEL)).is_some_and(|v| v == ISTIO_DATAPLANE_MODE_AMBIENT),
    }
}

/// A service port reached through the service's address.
#[derive(Clone, Debug)]
pub struct ServiceTarget<'a> {
    pub service: &'a Service,
    pub port: &'a ServicePort,
    pub endpoints: Vec<Endpoint<'a>>,
}

/// One pod behind a service port.
#[derive(Clone, Debug)]
pub struct Endpoint<'a> {
    pub dest: Destination,
    pub labels: &'a Labels,
}

impl Destination {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Destination::MeshPod { addr, .. } | Destination::Passthrough(addr) => *addr,
        }
    }
}

pub type Snapshot = Arc<MeshState>;

#[cfg(test)]
mod tests;
