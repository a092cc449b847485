//! Test helpers: a two-node mesh, and workload certificates with exactly one
//! defect each, for proving that every defect is refused. Behind the
//! `testing` feature so that the e2e harness can use them too.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

use super::{Authority, CertWatch, SpiffeId, WorkloadCert, authority::workload_params, x509};
use crate::state::{MeshState, PodKey, Snapshot};

/// Two nodes; `shop/web` (service account `web`) on node-a, `shop/db`
/// (`db`) on node-b, `shop/cart` (`default`) on node-a.
pub const MESH_YAML: &str = r#"
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  - name: shop
    labels: {nodemesh.io/dataplane-mode: enabled}
pods:
  - {name: web, namespace: shop, node: node-a, serviceAccount: web, ip: 198.51.100.11, netns: /run/netns/web, cgroup: /sys/fs/cgroup/web}
  - {name: cart, namespace: shop, node: node-a, ip: 198.51.100.12, netns: /run/netns/cart, cgroup: /sys/fs/cgroup/cart}
  - {name: db, namespace: shop, node: node-b, serviceAccount: db, ip: 198.51.100.21, netns: /run/netns/db, cgroup: /sys/fs/cgroup/db}
"#;

pub fn mesh_state() -> MeshState {
    crate::localfile::parse(Path::new("testing::MESH_YAML"), MESH_YAML).expect("the fixture parses")
}

pub fn mesh_snapshot() -> (watch::Sender<Snapshot>, watch::Receiver<Snapshot>) {
    watch::channel(Arc::new(mesh_state()))
}

pub fn pod(namespace: &str, name: &str) -> PodKey {
    PodKey {
        namespace: namespace.into(),
        name: name.into(),
    }
}

pub fn id(namespace: &str, service_account: &str) -> SpiffeId {
    SpiffeId::new(super::DEFAULT_TRUST_DOMAIN, namespace, service_account).expect("a valid fixture id")
}

/// A channel holding one certificate, as the manager would publish it.
pub fn cert_watch(cert: WorkloadCert) -> (watch::Sender<Option<Arc<WorkloadCert>>>, CertWatch) {
    watch::channel(Some(Arc::new(cert)))
}

/// One thing wrong with a certificate (everything else as issued).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defect {
    Expired,
    NotYetValid,
    WrongTrustDomain,
    NoUriSan,
    TwoUriSans,
    LeafIsCa,
    /// Signed by a root that is not in the bundle.
    UntrustedRoot,
    /// A URI SAN that is not a SPIFFE ID.
    NotSpiffe,
    /// A non-CA leaf whose keyUsage includes keyCertSign.
    KeyCertSign,
    /// A non-CA leaf whose keyUsage includes cRLSign.
    CrlSign,
    /// keyUsage without digitalSignature (keyEncipherment only).
    NoDigitalSignature,
    /// No keyUsage extension at all.
    NoKeyUsage,
    /// extendedKeyUsage codeSigning only: neither serverAuth nor clientAuth.
    WrongExtendedKeyUsage,
}

impl Defect {
    pub const ALL: [Defect; 13] = [
        Defect::Expired,
        Defect::NotYetValid,
        Defect::WrongTrustDomain,
        Defect::NoUriSan,
        Defect::TwoUriSans,
        Defect::LeafIsCa,
        Defect::UntrustedRoot,
        Defect::NotSpiffe,
        Defect::KeyCertSign,
        Defect::CrlSign,
        Defect::NoDigitalSignature,
        Defect::NoKeyUsage,
        Defect::WrongExtendedKeyUsage,
    ];
}

/// A certificate claiming to be `id`, with `defect`, and `ca`'s trust bundle
/// (so it can be presented, and can itself verify well-formed peers).
pub fn mint_defective(ca: &Authority, id: &SpiffeId, defect: Defect) -> WorkloadCert {
    let key = KeyPair::generate().expect("key generation");
    let mut params = workload_params(id).expect("valid params");
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + Duration::from_secs(3600)).into();
    let uri = |s: &str| SanType::URI(s.try_into().expect("an IA5 string"));
    let mut signer = ca;
    let other;
    match defect {
        Defect::Expired => {
            params.not_before = (now - Duration::from_secs(7200)).into();
            params.not_after = (now - Duration::from_secs(3600)).into();
        }
        Defect::NotYetValid => {
            params.not_before = (now + Duration::from_secs(3600)).into();
            params.not_after = (now + Duration::from_secs(7200)).into();
        }
        Defect::WrongTrustDomain => {
            let foreign = SpiffeId::new("other.example", id.namespace(), id.service_account()).expect("valid");
            params.subject_alt_names = vec![uri(&foreign.to_string())];
        }
        Defect::NoUriSan => {
            params.subject_alt_names = vec![SanType::DnsName("web.shop.svc".try_into().expect("IA5"))];
        }
        Defect::TwoUriSans => {
            params.subject_alt_names.push(uri(&format!(
                "spiffe://{}/ns/{}/sa/admin",
                id.trust_domain(),
                id.namespace()
            )));
        }
        Defect::LeafIsCa => params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
        Defect::UntrustedRoot => {
            other = Authority::in_memory().expect("a second root");
            signer = &other;
        }
        Defect::NotSpiffe => params.subject_alt_names = vec![uri("https://shop.example/web")],
        Defect::KeyCertSign => params.key_usages.push(KeyUsagePurpose::KeyCertSign),
        Defect::CrlSign => params.key_usages.push(KeyUsagePurpose::CrlSign),
        Defect::NoDigitalSignature => params.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
        Defect::NoKeyUsage => params.key_usages = vec![],
        Defect::WrongExtendedKeyUsage => params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning],
    }
    let der = signer.sign_params(&params, &key).expect("signing");
    let info = x509::inspect(&der).expect("parses");
    WorkloadCert {
        id: id.clone(),
        chain: vec![der],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_before: info.not_before,
        not_after: info.not_after,
        trust_bundle: ca.trust_bundle().to_vec(),
        serial: info.serial,
    }
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "mesh-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
