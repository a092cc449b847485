//! The certificate authority proper: its root key and trust bundle on disk,
//! and the issuance rules. No network here: `server` serves these rules over
//! gRPC, and tests or local tools call [`Authority::issue`] in-process.
//!
//! State directory layout:
//!
//! ```text
//! DIR/root-key.pem    the active root's private key (mode 0600)
//! DIR/root-cert.pem   the active root's certificate
//! DIR/roots/*.pem     the trust bundle: every root peers accept
//! ```
//!
//! The bundle is separate from the active root so that it can hold two roots
//! during a rotation: the new one signs, the old one stays trusted until the
//! last certificate it signed has expired, then its file is deleted.

use std::{
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;

use super::{SpiffeId, SpiffeIdError, WorkloadCert, certs_from_pem, humantime, to_pem, x509};
use crate::state::{MeshState, PodKey};

/// Workload certificate lifetime when neither the CA nor the request says.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Short lifetimes are allowed (tests rotate every few seconds); zero is not.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Leaves start this far in the past so that a peer whose clock is a little
/// behind the CA's does not see a certificate that is not valid yet.
pub const BACKDATE: Duration = Duration::from_secs(60);
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The CA's own serving certificate is re-issued at every start.
const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

pub const ROOT_KEY_FILE: &str = "root-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOTS_DIR: &str = "roots";

/// Problems with the CA's state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: cannot write: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{dir}: has only one of {ROOT_KEY_FILE} and {ROOT_CERT_FILE}: restore the missing one, or move both away to start a new root (every workload certificate will then be re-issued)"
    )]
    HalfRoot { dir: PathBuf },
    #[error("{dir}: no root to rotate: run the CA once to create one")]
    NoRoot { dir: PathBuf },
    #[error("generating a root certificate failed: {0}")]
    Generate(rcgen::Error),
}

/// Why a certificate was not issued. Each maps to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("pod {pod} is not in the mesh config")]
    UnknownPod { pod: PodKey },
    #[error("node {node} may not obtain a certificate for {pod}: that pod is scheduled on {pod_node}")]
    ForeignPod { node: String, pod: PodKey, pod_node: String },
    #[error("pod {pod} has no valid SPIFFE identity: {source}")]
    Identity { pod: PodKey, source: SpiffeIdError },
    #[error("malformed CSR for {pod}: {reason}")]
    MalformedCsr { pod: PodKey, reason: String },
    #[error("the CSR for {pod} asks for subject alternative names {asked:?}, but the pod's identity is {id}: a CSR may only name the pod's own SPIFFE ID")]
    WrongSan { pod: PodKey, asked: Vec<String>, id: Box<SpiffeId> },
    #[error("signing the certificate for {id} failed: {source}")]
    Sign { id: SpiffeId, source: rcgen::Error },
}

impl IssueError {
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::UnknownPod { .. } => tonic::Code::NotFound,
            Self::ForeignPod { .. } => tonic::Code::PermissionDenied,
            Self::Identity { .. } => tonic::Code::FailedPrecondition,
            Self::MalformedCsr { .. } | Self::WrongSan { .. } => tonic::Code::InvalidArgument,
            Self::Sign { .. } => tonic::Code::Internal,
        }
    }
}

/// Issuance and refusal counters, by outcome.
#[derive(Debug, Default)]
pub struct CaStats {
    pub issued: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub permission_denied: AtomicU64,
    pub not_found: AtomicU64,
    pub invalid_argument: AtomicU64,
    pub failed_precondition: AtomicU64,
    pub internal: AtomicU64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatsView {
    pub issued: u64,
    pub unauthenticated: u64,
    pub permission_denied: u64,
    pub not_found: u64,
    pub invalid_argument: u64,
    pub failed_precondition: u64,
    pub internal: u64,
}

impl CaStats {
    pub fn view(&self) -> CaStatsView {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CaStatsView {
            issued: l(&self.issued),
            unauthenticated: l(&self.unauthenticated),
            permission_denied: l(&self.permission_denied),
            not_found: l(&self.not_found),
            invalid_argument: l(&self.invalid_argument),
            failed_precondition: l(&self.failed_precondition),
            internal: l(&self.internal),
        }
    }

    fn count(&self, e: &IssueError) {
        let c = match e.code() {
            tonic::Code::NotFound => &self.not_found,
            tonic::Code::PermissionDenied => &self.permission_denied,
            tonic::Code::FailedPrecondition => &self.failed_precondition,
            tonic::Code::InvalidArgument => &self.invalid_argument,
            _ => &self.internal,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A request as the rules see it, whatever transport it came by.
#[derive(Clone, Debug)]
pub struct IssueRequest<'a> {
    pub csr_pem: &'a str,
    pub pod: &'a PodKey,
    /// `None`: the CA's lifetime. Longer requests are cut to it.
    pub ttl: Option<Duration>,
}

/// An issued certificate, PEM, as it goes back to the agent.
#[derive(Clone, Debug)]
pub struct Issued {
    pub id: SpiffeId,
    pub cert_chain_pem: Vec<String>,
    pub trust_bundle_pem: Vec<String>,
    pub not_after: SystemTime,
    pub serial: String,
}

struct Root {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
}

pub struct Authority {
    root: Root,
    bundle: Vec<CertificateDer<'static>>,
    /// Default and maximum lifetime of workload certificates.
    ttl: Duration,
    stats: Arc<CaStats>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("roots", &self.bundle.len())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Loads the root from `dir`, or creates and persists one on first run.
    pub fn load_or_create(dir: &Path) -> Result<Self, StoreError> {
        let key_path = dir.join(ROOT_KEY_FILE);
        let cert_path = dir.join(ROOT_CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => {}
            (false, false) => {
                create_dir(dir)?;
                let (key, cert) = new_root()?;
                write_root(dir, &key, &cert)?;
                tracing::info!(dir = %dir.display(), serial = %serial_of(&cert), "created a new CA root");
            }
            _ => return Err(StoreError::HalfRoot { dir: dir.to_owned() }),
        }
        Self::load(dir)
    }

    /// A root that lives only in memory: tests and throwaway local setups.
    pub fn in_memory() -> Result<Self, StoreError> {
        let (key, cert) = new_root()?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(StoreError::Generate)?;
        Ok(Self {
            root: Root { issuer, cert: cert.clone() },
            bundle: vec![cert],
            ttl: DEFAULT_TTL,
            stats: Arc::default(),
        })
    }

    fn load(dir: &Path) -> Result<Self, StoreError> {
        let key_path = dir.join(ROOT_KEY_FILE);
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_pem = read(&key_path)?;
        if let Ok(meta) = fs::metadata(&key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(file = %key_path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "the CA root key is readable by other users: chmod 600 it");
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| StoreError::Invalid {
            path: key_path.clone(),
            reason: format!("not a usable private key: {e}"),
        })?;
        let cert = one_cert(&cert_path)?;
        let leaf = x509::inspect(&cert).map_err(|reason| StoreError::Invalid { path: cert_path.clone(), reason })?;
        if !leaf.is_ca {
            return Err(StoreError::Invalid { path: cert_path, reason: "not a CA certificate".into() });
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| StoreError::Invalid {
            path: cert_path.clone(),
            reason: format!("cannot sign with this root: {e}"),
        })?;
        let mut bundle = load_bundle(&dir.join(ROOTS_DIR))?;
        if !bundle.contains(&cert) {
            // A root that signs but that peers do not trust would break every
            // handshake; trust it, and say so, since the operator's bundle
            // directory is then out of date.
            tracing::warn!(dir = %dir.join(ROOTS_DIR).display(), "the active root is not in the trust bundle directory; trusting it anyway");
            bundle.push(cert.clone());
        }
        tracing::info!(dir = %dir.display(), serial = %serial_of(&cert), roots = bundle.len(), "loaded the CA root");
        Ok(Self {
            root: Root { issuer, cert },
            bundle,
            ttl: DEFAULT_TTL,
            stats: Arc::default(),
        })
    }

    /// Makes a new active root; the old one stays in the trust bundle. Peers
    /// learn the new bundle with their next certificate; delete the old
    /// root's file from `roots/` once every certificate it signed has expired.
    pub fn rotate_root(dir: &Path) -> Result<PathBuf, StoreError> {
        let old = Self::load(dir).map_err(|e| match e {
            StoreError::Read { .. } => StoreError::NoRoot { dir: dir.to_owned() },
            e => e,
        })?;
        let (key, cert) = new_root()?;
        let file = write_root(dir, &key, &cert)?;
        tracing::info!(old = %serial_of(&old.root.cert), new = %serial_of(&cert), "rotated the CA root; the old root stays trusted");
        Ok(file)
    }

    /// Default and maximum lifetime of the certificates this CA issues.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(MIN_TTL);
        self
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn stats(&self) -> &Arc<CaStats> {
        &self.stats
    }

    /// The active root, which signs.
    pub fn root_cert(&self) -> &CertificateDer<'static> {
        &self.root.cert
    }

    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    pub fn trust_bundle_pem(&self) -> String {
        self.bundle.iter().map(|c| to_pem("CERTIFICATE", c)).collect()
    }

    /// The issuance rules: the caller's node must be the pod's node; the
    /// identity comes from the mesh config, never from the CSR; the CSR must
    /// be well-formed, correctly signed, and name no other identity.
    pub fn issue(&self, state: &MeshState, node: &str, req: &IssueRequest<'_>) -> Result<Issued, IssueError> {
        let result = self.try_issue(state, node, req);
        match &result {
            Ok(issued) => {
                self.stats.issued.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%node, pod = %req.pod, id = %issued.id, serial = %issued.serial, not_after = %humantime(issued.not_after), "issued a workload certificate");
            }
            Err(e) => {
                self.stats.count(e);
                match e {
                    IssueError::ForeignPod { .. } | IssueError::Sign { .. } => {
                        tracing::warn!(%node, pod = %req.pod, code = ?e.code(), "certificate refused: {e}");
                    }
                    _ => tracing::info!(%node, pod = %req.pod, code = ?e.code(), "certificate refused: {e}"),
                }
            }
        }
        result
    }

    fn try_issue(&self, state: &MeshState, node: &str, req: &IssueRequest<'_>) -> Result<Issued, IssueError> {
        let pod_key = req.pod;
        let pod = state.pods.get(pod_key).ok_or_else(|| IssueError::UnknownPod { pod: pod_key.clone() })?;
        if pod.node != node {
            return Err(IssueError::ForeignPod {
                node: node.to_owned(),
                pod: pod_key.clone(),
                pod_node: pod.node.clone(),
            });
        }
        let id = SpiffeId::new(&state.trust_domain, &pod_key.namespace, &pod.service_account).map_err(|source| {
            IssueError::Identity {
                pod: pod_key.clone(),
                source,
            }
        })?;
        let csr = CertificateSigningRequestParams::from_pem(req.csr_pem).map_err(|e| IssueError::MalformedCsr {
            pod: pod_key.clone(),
            reason: csr_reason(&e),
        })?;
        let wanted = SanType::URI(id.to_string().try_into().map_err(|source| IssueError::Sign {
            id: id.clone(),
            source,
        })?);
        let asked = &csr.params.subject_alt_names;
        if !asked.is_empty() && asked.as_slice() != [wanted] {
            return Err(IssueError::WrongSan {
                pod: pod_key.clone(),
                asked: asked.iter().map(san_text).collect(),
                id: Box::new(id),
            });
        }
        let ttl = req.ttl.map_or(self.ttl, |t| t.clamp(MIN_TTL, self.ttl));
        let (der, not_after, serial) = self
            .sign_leaf(&id, &csr.public_key, ttl)
            .map_err(|source| IssueError::Sign { id: id.clone(), source })?;
        Ok(Issued {
            id,
            cert_chain_pem: vec![to_pem("CERTIFICATE", &der)],
            trust_bundle_pem: self.bundle.iter().map(|c| to_pem("CERTIFICATE", c)).collect(),
            not_after,
            serial,
        })
    }

    /// A certificate for `id` with a key made here, bypassing the issuance
    /// rules: for local development and tests that need a workload's
    /// certificate without a mesh config.
    pub fn mint(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, IssueError> {
        let sign = |source| IssueError::Sign { id: id.clone(), source };
        let key = KeyPair::generate().map_err(sign)?;
        let (der, _, serial) = self.sign_leaf(id, &key, ttl.max(MIN_TTL)).map_err(sign)?;
        let leaf = x509::inspect(&der).expect("a certificate made here parses");
        Ok(WorkloadCert {
            id: id.clone(),
            chain: vec![der],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            trust_bundle: self.bundle.clone(),
            serial,
        })
    }

    fn sign_leaf(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
    ) -> Result<(CertificateDer<'static>, SystemTime, String), rcgen::Error> {
        let now = SystemTime::now();
        let mut params = workload_params(id)?;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        let serial = random_serial();
        let serial_hex = hex(&serial.to_bytes());
        params.serial_number = Some(serial);
        let cert = params.signed_by(public_key, &self.root.issuer)?;
        // X.509 keeps whole seconds.
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(params.not_after.unix_timestamp().max(0) as u64);
        Ok((cert.der().clone(), not_after, serial_hex))
    }

    /// Signs arbitrary parameters with the active root: deliberately broken
    /// certificates for tests.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn sign_params(&self, params: &CertificateParams, key: &KeyPair) -> Result<CertificateDer<'static>, rcgen::Error> {
        Ok(params.signed_by(key, &self.root.issuer)?.der().clone())
    }

    /// The CA's own TLS certificate and key (PEM), for its gRPC listener:
    /// issued from the root so that agents need only the trust bundle.
    pub fn serving_cert(&self, ips: &[IpAddr], dns_names: &[String]) -> Result<(String, String), rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "nodemesh CA");
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        for name in dns_names {
            params.subject_alt_names.push(SanType::DnsName(name.clone().try_into()?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + SERVING_VALIDITY).into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.root.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// What every workload certificate carries: exactly one URI SAN (the SPIFFE
/// ID), CA:false, digitalSignature (+ keyEncipherment), serverAuth +
/// clientAuth (the same certificate is a client on the source side of the
/// tunnel and a server on the destination side). The subject is empty: the
/// SAN is the identity (RFC 5280 then makes the SAN critical).
pub(crate) fn workload_params(id: &SpiffeId) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn new_root() -> Result<(KeyPair, CertificateDer<'static>), StoreError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(StoreError::Generate)?;
    let now = SystemTime::now();
    let serial = random_serial();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "nodemesh");
    // Distinct names keep two roots apart in a bundle and in messages.
    params.distinguished_name.push(
        DnType::CommonName,
        format!("nodemesh root CA {} {}", humantime(now), &hex(&serial.to_bytes())[..8]),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_VALIDITY).into();
    params.serial_number = Some(serial);
    let cert = params.self_signed(&key).map_err(StoreError::Generate)?;
    Ok((key, cert.der().clone()))
}

/// Writes the root into the bundle, then (atomically) as the active root.
fn write_root(dir: &Path, key: &KeyPair, cert: &CertificateDer<'_>) -> Result<PathBuf, StoreError> {
    let roots = dir.join(ROOTS_DIR);
    create_dir(&roots)?;
    let pem = to_pem("CERTIFICATE", cert);
    let bundle_file = roots.join(format!("root-{}.pem", serial_of(cert)));
    write_atomic(&bundle_file, pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join(ROOT_KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&dir.join(ROOT_CERT_FILE), pem.as_bytes(), 0o644)?;
    Ok(bundle_file)
}

fn load_bundle(roots: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let entries = match fs::read_dir(roots) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StoreError::Read { path: roots.to_owned(), source }),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .collect();
    files.sort();
    let mut bundle = Vec::new();
    for path in files {
        let pem = read(&path)?;
        let certs = certs_from_pem(&pem).map_err(|e| StoreError::Invalid {
            path: path.clone(),
            reason: format!("not PEM certificates: {e}"),
        })?;
        if certs.is_empty() {
            return Err(StoreError::Invalid { path, reason: "no certificate in the file".into() });
        }
        for cert in certs {
            let info = x509::inspect(&cert).map_err(|reason| StoreError::Invalid { path: path.clone(), reason })?;
            if !info.is_ca {
                return Err(StoreError::Invalid {
                    path,
                    reason: "a trust bundle may only hold CA certificates".into(),
                });
            }
            if !bundle.contains(&cert) {
                bundle.push(cert);
            }
        }
    }
    Ok(bundle)
}

fn one_cert(path: &Path) -> Result<CertificateDer<'static>, StoreError> {
    let pem = read(path)?;
    let mut certs = certs_from_pem(&pem).map_err(|e| StoreError::Invalid {
        path: path.to_owned(),
        reason: format!("not a PEM certificate: {e}"),
    })?;
    if certs.len() != 1 {
        return Err(StoreError::Invalid {
            path: path.to_owned(),
            reason: format!("expected one certificate, found {}", certs.len()),
        });
    }
    Ok(certs.remove(0))
}

fn read(path: &Path) -> Result<String, StoreError> {
    fs::read_to_string(path).map_err(|source| StoreError::Read { path: path.to_owned(), source })
}

fn create_dir(dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(|source| StoreError::Write { path: dir.to_owned(), source })
}

/// Write to a temporary file with its final mode, then rename, so that a
/// crash never leaves a truncated key and the key is never briefly readable.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let err = |source| StoreError::Write { path: path.to_owned(), source };
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and 16 bytes on the wire (no leading zero byte to strip).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn serial_of(cert: &CertificateDer<'_>) -> String {
    x509::inspect(cert).map(|l| l.serial).unwrap_or_else(|_| "?".into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::URI(u) => u.as_str().to_owned(),
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

fn csr_reason(e: &rcgen::Error) -> String {
    match e {
        rcgen::Error::CouldNotParseCertificationRequest => "not a PEM-encoded PKCS#10 certificate request".into(),
        rcgen::Error::InvalidCertificationRequestSignature => "its signature does not verify".into(),
        rcgen::Error::UnsupportedExtension => "it requests an extension the CA does not support".into(),
        rcgen::Error::UnsupportedSignatureAlgorithm => "its key or signature algorithm is not supported".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
