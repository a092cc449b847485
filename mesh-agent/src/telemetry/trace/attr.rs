//! Span attribute keys, so both agents and every call site name things the
//! same way. Where OpenTelemetry's semantic conventions have a key it is
//! used (tracing backends render those specially); the mesh's own facts
//! carry a `mesh.` prefix.

pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
pub const URL_PATH: &str = "url.path";
/// `http` or `https` as the application spoke it (`http` inside the mesh).
pub const URL_SCHEME: &str = "url.scheme";
/// `1.1`, `2`.
pub const NETWORK_PROTOCOL_VERSION: &str = "network.protocol.version";
/// The `Host`/`:authority` the application asked for.
pub const SERVER_ADDRESS: &str = "server.address";
pub const SERVER_PORT: &str = "server.port";
/// The other end of the connection, as an IP.
pub const NETWORK_PEER_ADDRESS: &str = "network.peer.address";
pub const NETWORK_PEER_PORT: &str = "network.peer.port";
pub const ERROR_TYPE: &str = "error.type";

/// `namespace/pod` of the workload that sent the request.
pub const MESH_SOURCE_WORKLOAD: &str = "mesh.source.workload";
/// `namespace/pod` of the workload that received it.
pub const MESH_DESTINATION_WORKLOAD: &str = "mesh.destination.workload";
/// The peer's verified SPIFFE ID (mutual TLS), if any.
pub const MESH_PEER_PRINCIPAL: &str = "mesh.peer.principal";
/// Whether the hop between the agents was mutual TLS.
pub const MESH_MTLS: &str = "mesh.mtls";
/// `allow` or `deny`, and the policy that decided.
pub const MESH_POLICY_DECISION: &str = "mesh.policy.decision";
pub const MESH_POLICY_NAME: &str = "mesh.policy.name";
/// The route and backend subset the source agent picked.
pub const MESH_ROUTE: &str = "mesh.route";
pub const MESH_RETRIES: &str = "mesh.retries";
