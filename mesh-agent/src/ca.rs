//! `mesh-agent ca`: the issuance rules of [`Authority`] served over gRPC and
//! TLS, with node authentication by bearer token.
//!
//! Local mode authenticates nodes with a tokens file (`nodes: {node-a:
//! <token>}`); the Kubernetes mode will verify service-account tokens instead
//! and feed the same rules. The mesh config is the agents' own YAML, watched,
//! so the CA and the agents agree on which pod runs where.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::{net::TcpListener, sync::watch};
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::identity::{
    authority::{Authority, IssueRequest, StoreError},
    parse_ttl,
    proto::{self, ca_server::CaServer},
};
use crate::{
    localfile,
    state::{PodKey, Snapshot},
};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:15012";
pub const DEFAULT_TTL: &str = "24h";
pub const DEFAULT_CONFIG_POLL: &str = "500ms";
/// A guessable token would let anyone obtain certificates for that node's pods.
pub const MIN_TOKEN_LEN: usize = 16;
/// A P-256 CSR is well under 1 KiB; anything this large is not one.
const MAX_CSR_LEN: usize = 16 * 1024;

/// `mesh-agent ca` flags.
#[derive(Clone, Debug, clap::Args)]
pub struct CaArgs {
    /// Where nodes and pods come from: the local file with node tokens, or
    /// the Kubernetes API with TokenReview of the agents' projected tokens.
    #[arg(long, default_value = "file", value_parser = ["file", "kube"])]
    pub source: String,
    /// The mesh config (the agents' local YAML), watched: it says which pod
    /// is on which node. Required with `--source file`.
    #[arg(long, required_if_eq("source", "file"))]
    pub config: Option<PathBuf>,
    /// Where the root key and trust bundle live (created on first run).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// gRPC + TLS listener.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Node credentials: YAML `nodes: {node-a: <token>, ...}`. Required with
    /// `--source file`.
    #[arg(long, required_if_eq("source", "file"))]
    pub tokens: Option<PathBuf>,
    /// `--source kube`: the audience the agents' projected tokens are minted for.
    #[arg(long, default_value = crate::k8s::tokenreview::DEFAULT_AUDIENCE)]
    pub audience: String,
    /// `--source kube`: the node agents' service account, NAMESPACE/NAME.
    #[arg(long, default_value = "nodemesh-system/nodemesh-agent")]
    pub agent_service_account: String,
    /// `--source kube`: where the trust bundle is published for the agents, NAMESPACE/NAME.
    #[arg(long, default_value = "nodemesh-system/nodemesh-ca-roots")]
    pub roots_configmap: String,
    /// `--source kube`: the SPIFFE trust domain.
    #[arg(long, default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Default and maximum lifetime of workload certificates (e.g. 24h, 30m, 10s).
    #[arg(long, default_value = DEFAULT_TTL, value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Extra DNS names in the CA's serving certificate (besides `localhost` and the listen IP).
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
    /// How often the mesh config is checked for changes.
    #[arg(long, default_value = DEFAULT_CONFIG_POLL, value_parser = parse_ttl)]
    pub config_poll: Duration,
    /// Make a new active root (the old one stays in the trust bundle) and exit.
    #[arg(long)]
    pub rotate_root: bool,
    /// The agents' `--enrollment-label`: the local file is validated as
    /// they validate it.
    #[command(flatten)]
    pub enrollment: crate::config::EnrollmentArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tokens(#[from] TokenError),
    #[error("mesh config: {0}")]
    Config(#[from] localfile::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("issuing the CA's serving certificate failed: {0}")]
    ServingCert(rcgen::Error),
    #[error("the CA's TLS setup failed: {0}")]
    Tls(tonic::transport::Error),
    #[error("the CA's gRPC server failed: {0}")]
    Serve(tonic::transport::Error),
    #[error("starting the runtime failed: {0}")]
    Runtime(std::io::Error),
    #[error("--ttl {0:?}: must be between 1s and 365d")]
    Ttl(Duration),
    #[error("{0}")]
    Publish(String),
    #[error("--config and --tokens are required unless --source kube")]
    FileModeArgs,
    #[error("--agent-service-account: {0}")]
    AgentAccount(String),
    #[error("cannot set up the Kubernetes client (in-cluster service account or KUBECONFIG)")]
    Kube(#[from] kube::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: nodes.{node}: {reason}")]
    Invalid { path: PathBuf, node: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    nodes: std::collections::BTreeMap<String, String>,
}

/// Node credentials. Only SHA-256 digests are kept, and a presented token is
/// compared with every one in constant time, so neither timing nor a memory
/// dump reveals a token.
pub struct NodeTokens {
    entries: Vec<([u8; 32], String)>,
}

impl std::fmt::Debug for NodeTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTokens")
            .field("nodes", &self.entries.iter().map(|(_, n)| n).collect::<Vec<_>>())
            .finish()
    }
}

impl NodeTokens {
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TokenError> {
        let file: TokensFile = serde_yaml::from_str(text).map_err(|e| TokenError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_pairs(file.nodes).map_err(|(node, reason)| TokenError::Invalid {
            path: path.to_owned(),
            node,
            reason,
        })
    }

    /// `(node, token)` pairs; an error names the node and the reason.
    pub fn from_pairs(
        pairs: impl IntoIterator<Item = (impl Into<String>, impl AsRef<str>)>,
    ) -> Result<Self, (String, String)> {
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        for (node, token) in pairs {
            let node = node.into();
            let token = token.as_ref();
            if node.is_empty() || !node.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                return Err((node, "not a valid node name".into()));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err((node, format!("the token must be at least {MIN_TOKEN_LEN} characters")));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((node, "the token may only hold printable ASCII without spaces".into()));
            }
            let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            if !seen.insert(digest) {
                return Err((node, "this token is also another node's: every node needs its own".into()));
            }
            entries.push((digest, node));
        }
        Ok(Self { entries })
    }

    /// The node a token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        // No early exit: every entry costs the same.
        for (d, node) in &self.entries {
            if bool::from(d.ct_eq(&digest)) {
                found = Some(node.as_str());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// How the CA tells which node is calling.
pub enum Authn {
    /// Local mode: a token per node from a file.
    Tokens(Arc<NodeTokens>),
    /// In a cluster: a TokenReview of the agent's projected token.
    Kube(Arc<crate::k8s::tokenreview::TokenReviewer>),
}

/// The gRPC service.
#[derive(Clone)]
pub struct CaService {
    authority: Arc<Authority>,
    authn: Arc<Authn>,
    state: watch::Receiver<Snapshot>,
}

impl CaService {
    pub fn new(authority: Arc<Authority>, tokens: Arc<NodeTokens>, state: watch::Receiver<Snapshot>) -> Self {
        Self::with_authn(authority, Authn::Tokens(tokens), state)
    }

    pub fn with_authn(authority: Arc<Authority>, authn: Authn, state: watch::Receiver<Snapshot>) -> Self {
        Self { authority, authn: Arc::new(authn), state }
    }

    async fn node_of(&self, md: &MetadataMap, peer: Option<SocketAddr>) -> Result<String, Status> {
        let tokens = match &*self.authn {
            Authn::Tokens(t) => t.clone(),
            Authn::Kube(reviewer) => {
                let token = bearer(md).map_err(|msg| self.refused(peer, msg))?;
                return match reviewer.node_of(token.trim()).await {
                    Ok(node) => Ok(node),
                    Err(e @ (crate::k8s::tokenreview::ReviewError::Forbidden(_) | crate::k8s::tokenreview::ReviewError::Api(_))) => {
                        tracing::error!(peer = ?peer, "{e}");
                        Err(Status::unavailable(e.to_string()))
                    }
                    Err(e) => Err(self.refused(peer, &e.to_string())),
                };
            }
        };
        self.authenticate(&tokens, md, peer).map(str::to_owned)
    }

    fn refused(&self, peer: Option<SocketAddr>, msg: &str) -> Status {
        self.authority.stats().unauthenticated.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = ?peer, "certificate refused: {msg}");
        Status::unauthenticated(msg)
    }

    fn authenticate<'t>(&self, tokens: &'t NodeTokens, md: &MetadataMap, peer: Option<SocketAddr>) -> Result<&'t str, Status> {
        let refuse = |msg: &str| {
            self.authority.stats().unauthenticated.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = ?peer, "certificate refused: {msg}");
            Err(Status::unauthenticated(msg))
        };
        let Some(value) = md.get("authorization") else {
            return refuse("missing `authorization: Bearer <node token>` metadata");
        };
        let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
            return refuse("the authorization metadata is not `Bearer <node token>`");
        };
        match tokens.authenticate(token.trim()) {
            Some(node) => Ok(node),
            None => refuse("unknown node token"),
        }
    }
}

#[tonic::async_trait]
impl proto::ca_server::Ca for CaService {
    async fn sign(&self, request: Request<proto::SignRequest>) -> Result<Response<proto::SignResponse>, Status> {
        let peer = request.remote_addr();
        let node = self.node_of(request.metadata(), peer).await?;
        let req = request.into_inner();
        let pod = PodKey {
            namespace: req.namespace,
            name: req.pod,
        };
        if req.csr_pem.len() > MAX_CSR_LEN {
            self.authority.stats().invalid_argument.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%node, %pod, len = req.csr_pem.len(), "certificate refused: CSR too large");
            return Err(Status::invalid_argument(format!(
                "malformed CSR for {pod}: larger than {MAX_CSR_LEN} bytes"
            )));
        }
        let state = self.state.borrow().clone();
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds));
        let issued = self
            .authority
            .issue(
                &state,
                &node,
                &IssueRequest {
                    csr_pem: &req.csr_pem,
                    pod: &pod,
                    ttl,
                },
            )
            .map_err(|e| Status::new(e.code(), e.to_string()))?;
        Ok(Response::new(proto::SignResponse {
            cert_chain_pem: issued.cert_chain_pem,
            trust_bundle_pem: issued.trust_bundle_pem,
        }))
    }
}

/// The bearer token of a request.
fn bearer(md: &MetadataMap) -> Result<&str, &'static str> {
    let value = md.get("authorization").ok_or("missing `authorization: Bearer <token>` metadata")?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("the authorization metadata is not `Bearer <token>`")
}

/// A CA serving on a socket; dropped or [`RunningCa::stop`]ped, it stops.
#[derive(Debug)]
pub struct RunningCa {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningCa {
    /// Stops accepting, lets in-flight calls finish, and waits.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r.map_err(ServerError::Serve),
            Err(_) => Ok(()),
        }
    }
}

impl Drop for RunningCa {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves the CA on `listener` with a serving certificate issued from its
/// root for `localhost`, the listener's IP (unless unspecified) and
/// `dns_names`. Must run inside a tokio runtime.
pub fn start(
    authority: Arc<Authority>,
    tokens: Arc<NodeTokens>,
    state: watch::Receiver<Snapshot>,
    listener: TcpListener,
    dns_names: &[String],
) -> Result<RunningCa, ServerError> {
    start_with(authority, Authn::Tokens(tokens), state, listener, dns_names)
}

/// [`start`] with any way of authenticating nodes.
pub fn start_with(
    authority: Arc<Authority>,
    authn: Authn,
    state: watch::Receiver<Snapshot>,
    listener: TcpListener,
    dns_names: &[String],
) -> Result<RunningCa, ServerError> {
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let mut ips = Vec::new();
    if !addr.ip().is_unspecified() {
        ips.push(addr.ip());
    }
    let mut names = vec!["localhost".to_owned()];
    names.extend(dns_names.iter().filter(|n| n.as_str() != "localhost").cloned());
    let (cert_pem, key_pem) = authority.serving_cert(&ips, &names).map_err(ServerError::ServingCert)?;
    let tls = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
    let service = CaService::with_authn(authority, authn, state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(ServerError::Tls)?
        .add_service(CaServer::new(service));
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = rx.await;
    }));
    tracing::info!(%addr, names = ?names, "CA serving gRPC over TLS");
    Ok(RunningCa {
        addr,
        shutdown: Some(tx),
        task,
    })
}

/// `mesh-agent ca`: runs until SIGTERM or Ctrl-C. Prints one JSON line,
/// `{"event":"ready","ca":"IP:PORT"}`, on stdout once serving.
pub fn run(args: CaArgs) -> Result<(), ServerError> {
    if args.rotate_root {
        let file = Authority::rotate_root(&args.state_dir)?;
        println!(
            "new active root written; the trust bundle now also holds it ({}). Delete the old root's file from {} once every certificate it signed has expired (at most --ttl).",
            file.display(),
            args.state_dir.join(crate::identity::authority::ROOTS_DIR).display()
        );
        return Ok(());
    }
    if args.source != "kube" && (args.config.is_none() || args.tokens.is_none()) {
        return Err(ServerError::FileModeArgs);
    }
    if args.ttl < crate::identity::authority::MIN_TTL || args.ttl > Duration::from_secs(365 * 86400) {
        return Err(ServerError::Ttl(args.ttl));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    rt.block_on(async move {
        // Every input is checked before anything is written: a bad tokens
        // file or config must not leave a fresh root key behind.
        let file_inputs = match (&args.config, &args.tokens) {
            (Some(config), Some(tokens_file)) if args.source != "kube" => {
                let tokens = NodeTokens::load(tokens_file)?;
                localfile::load(config, &args.enrollment.scope())?;
                Some((config.clone(), tokens_file.clone(), tokens))
            }
            _ => None,
        };
        let authority = Arc::new(Authority::load_or_create(&args.state_dir)?.with_ttl(args.ttl));
        let (state, authn, source) = if args.source == "kube" {
            let client = crate::k8s::client().await?;
            let client_for_roots = client.clone();
            let reviewer = crate::k8s::tokenreview::TokenReviewer::new(client.clone(), &args.audience, &args.agent_service_account)
                .map_err(ServerError::AgentAccount)?;
            // Every pod of the cluster (and namespaces), nothing else: no
            // node of its own, no policies, no status to report.
            let (state, _stats, watchers) = crate::k8s::start(
                client,
                crate::k8s::Options {
                    node: String::new(),
                    trust_domain: args.trust_domain.clone(),
                    locator: Arc::new(crate::k8s::source::NoPods),
                    write_status: false,
                    pods_only: true,
                    scope: args.enrollment.scope(),
                },
            );
            tokio::spawn(watchers);
            crate::k8s::publish_roots(client_for_roots, &args.roots_configmap, &authority.trust_bundle_pem())
                .await
                .map_err(ServerError::Publish)?;
            (state, Authn::Kube(Arc::new(reviewer)), format!("kubernetes (audience {})", args.audience))
        } else {
            let Some((config, tokens_file, tokens)) = file_inputs else {
                return Err(ServerError::FileModeArgs);
            };
            let tokens = Arc::new(tokens);
            if tokens.is_empty() {
                tracing::warn!(file = %tokens_file.display(), "no node tokens: every request will be refused");
            }
            let (state, _reload_stats, watch_config) = localfile::start(config.clone(), args.config_poll, args.enrollment.scope()).await?;
            tokio::spawn(watch_config);
            let source = format!("{} ({} node tokens)", config.display(), tokens.len());
            (state, Authn::Tokens(tokens), source)
        };
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|source| ServerError::Bind { addr: args.listen, source })?;
        let ca = start_with(authority.clone(), authn, state, listener, &args.dns_names)?;
        tracing::info!(
            addr = %ca.addr,
            ttl = ?args.ttl,
            state_dir = %args.state_dir.display(),
            source = %source,
            "CA ready"
        );
        {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", serde_json::json!({"event": "ready", "ca": ca.addr.to_string()}));
            let _ = out.flush();
        }
        shutdown_signal().await;
        tracing::info!(stats = ?authority.stats().view(), "CA shutting down");
        ca.stop().await
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests;
