//! Asking a CA for a workload certificate. The key pair and CSR are made
//! here, on the node; only the CSR goes to the CA.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData as _, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tonic::{
    Status,
    metadata::{Ascii, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use super::{
    SpiffeId, WorkloadCert,
    authority::{Authority, IssueRequest},
    certs_from_pem,
    proto::{self, ca_client},
    x509,
};
use crate::state::{PodKey, Snapshot};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that signs CSRs: the gRPC CA, or an [`Authority`] in-process.
pub trait CaClient: Send + Sync + 'static {
    fn sign(&self, req: proto::SignRequest) -> BoxFuture<'_, Result<proto::SignResponse, Status>>;
    /// Where requests go, for messages.
    fn endpoint(&self) -> &str;
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the CA at {endpoint} is unreachable ({code:?}): {message}: is `mesh-agent ca` running?")]
    Unavailable { endpoint: String, code: tonic::Code, message: String },
    #[error("the CA at {endpoint} refused the certificate for {pod} ({code:?}): {message}")]
    Refused {
        endpoint: String,
        pod: PodKey,
        code: tonic::Code,
        message: String,
    },
    #[error("making a key and CSR for {pod} failed: {source}")]
    Csr { pod: PodKey, source: rcgen::Error },
    #[error("the CA's answer for {pod} is unusable: {reason}")]
    BadResponse { pod: PodKey, reason: String },
    #[error("CA client for {endpoint:?}: {reason}")]
    Config { endpoint: String, reason: String },
}

/// The CA over gRPC + TLS, authenticated as this node by its token.
#[derive(Clone)]
pub struct GrpcCaClient {
    endpoint: String,
    client: ca_client::CaClient<Channel>,
    authorization: MetadataValue<Ascii>,
    /// Read again before each call: a projected service-account token is
    /// rotated by the kubelet.
    token_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for GrpcCaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcCaClient").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl GrpcCaClient {
    /// `endpoint`: `https://HOST:PORT`. `ca_roots_pem`: the roots the CA's
    /// serving certificate chains to (its trust bundle). `tls_name`: the name
    /// to check the CA's certificate against when it differs from HOST.
    /// Connects lazily, so a CA that is down now is not an error; must be
    /// called inside a tokio runtime.
    pub fn new(endpoint: &str, ca_roots_pem: &str, token: &str, tls_name: Option<&str>) -> Result<Self, FetchError> {
        let config = |reason: String| FetchError::Config {
            endpoint: endpoint.to_owned(),
            reason,
        };
        if !endpoint.starts_with("https://") {
            return Err(config("the CA endpoint must be https://HOST:PORT (the CA only speaks TLS)".into()));
        }
        let roots = certs_from_pem(ca_roots_pem).map_err(|e| config(format!("CA roots: {e}")))?;
        if roots.is_empty() {
            return Err(config("no certificate in the CA roots".into()));
        }
        let mut tls = ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca_roots_pem));
        if let Some(name) = tls_name {
            tls = tls.domain_name(name);
        }
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| config(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| config(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        let mut authorization: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| config("the node token may only hold printable ASCII".into()))?;
        authorization.set_sensitive(true);
        Ok(Self {
            endpoint: endpoint.to_owned(),
            client: ca_client::CaClient::new(channel),
            authorization,
            token_file: None,
        })
    }

    /// Reads the token from `path` before every call (a Kubernetes projected
    /// token is rotated in place); the token given to [`Self::new`] is used
    /// while the file cannot be read.
    pub fn reread_token_from(mut self, path: std::path::PathBuf) -> Self {
        self.token_file = Some(path);
        self
    }

    fn authorization(&self) -> MetadataValue<Ascii> {
        let fresh = self.token_file.as_ref().and_then(|p| match std::fs::read_to_string(p) {
            Ok(t) => format!("Bearer {}", t.trim()).parse::<MetadataValue<Ascii>>().ok(),
            Err(e) => {
                tracing::warn!(file = %p.display(), "cannot read the CA token again, using the previous one: {e}");
                None
            }
        });
        let mut value = fresh.unwrap_or_else(|| self.authorization.clone());
        value.set_sensitive(true);
        value
    }
}

impl CaClient for GrpcCaClient {
    fn sign(&self, req: proto::SignRequest) -> BoxFuture<'_, Result<proto::SignResponse, Status>> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(req);
        request.metadata_mut().insert("authorization", self.authorization());
        Box::pin(async move { client.sign(request).await.map(tonic::Response::into_inner) })
    }

    fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// An [`Authority`] in the same process, as one node sees it: the same rules
/// as the gRPC CA without a socket (local development, tests).
#[derive(Clone, Debug)]
pub struct LocalCaClient {
    authority: Arc<Authority>,
    node: String,
    state: watch::Receiver<Snapshot>,
}

impl LocalCaClient {
    pub fn new(authority: Arc<Authority>, node: impl Into<String>, state: watch::Receiver<Snapshot>) -> Self {
        Self {
            authority,
            node: node.into(),
            state,
        }
    }
}

impl CaClient for LocalCaClient {
    fn sign(&self, req: proto::SignRequest) -> BoxFuture<'_, Result<proto::SignResponse, Status>> {
        let state = self.state.borrow().clone();
        let pod = PodKey {
            namespace: req.namespace,
            name: req.pod,
        };
        let result = self
            .authority
            .issue(
                &state,
                &self.node,
                &IssueRequest {
                    csr_pem: &req.csr_pem,
                    pod: &pod,
                    ttl: (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds)),
                },
            )
            .map(|issued| proto::SignResponse {
                cert_chain_pem: issued.cert_chain_pem,
                trust_bundle_pem: issued.trust_bundle_pem,
            })
            .map_err(|e| Status::new(e.code(), e.to_string()));
        Box::pin(std::future::ready(result))
    }

    fn endpoint(&self) -> &str {
        "in-process CA"
    }
}

/// Makes an ECDSA P-256 key, asks `ca` to certify it as `id` for `pod`, and
/// checks the answer: the leaf names exactly `id`, is for our key, and is
/// valid now. `ttl`: `None` for the CA's default.
pub async fn fetch(ca: &dyn CaClient, pod: &PodKey, id: &SpiffeId, ttl: Option<Duration>) -> Result<WorkloadCert, FetchError> {
    let csr_err = |source| FetchError::Csr { pod: pod.clone(), source };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(csr_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    // Naming the expected identity lets the CA refuse, with a clear reason,
    // when its view of the pod differs from ours.
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(csr_err)?)];
    let csr_pem = params.serialize_request(&key).and_then(|csr| csr.pem()).map_err(csr_err)?;
    let response = ca
        .sign(proto::SignRequest {
            csr_pem,
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            ttl_seconds: ttl.map_or(0, |t| t.as_secs().max(1)),
        })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown => {
                FetchError::Unavailable {
                    endpoint: ca.endpoint().to_owned(),
                    code: status.code(),
                    message: status.message().to_owned(),
                }
            }
            code => FetchError::Refused {
                endpoint: ca.endpoint().to_owned(),
                pod: pod.clone(),
                code,
                message: status.message().to_owned(),
            },
        })?;
    let bad = |reason: String| FetchError::BadResponse { pod: pod.clone(), reason };
    let mut chain = Vec::new();
    for pem in &response.cert_chain_pem {
        chain.extend(certs_from_pem(pem).map_err(|e| bad(format!("certificate chain: {e}")))?);
    }
    let mut trust_bundle = Vec::new();
    for pem in &response.trust_bundle_pem {
        trust_bundle.extend(certs_from_pem(pem).map_err(|e| bad(format!("trust bundle: {e}")))?);
    }
    let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
    if trust_bundle.is_empty() {
        return Err(bad("empty trust bundle".into()));
    }
    let info = x509::inspect(leaf).map_err(bad)?;
    if info.uri_sans != [id.to_string()] {
        return Err(bad(format!("the certificate names {:?}, expected {id}", info.uri_sans)));
    }
    if info.spki != key.subject_public_key_info() {
        return Err(bad("the certificate is not for the key in our CSR".into()));
    }
    if info.not_after <= SystemTime::now() {
        return Err(bad(format!("the certificate expired at {}", super::humantime(info.not_after))));
    }
    Ok(WorkloadCert {
        id: id.clone(),
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_before: info.not_before,
        not_after: info.not_after,
        trust_bundle,
        serial: info.serial,
    })
}
