use std::os::unix::fs::PermissionsExt as _;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData as _, SanType};
use rustls::pki_types::pem::PemObject as _;
use x509_parser::{
    extensions::{GeneralName, ParsedExtension},
    prelude::{FromDer as _, X509Certificate},
};

use super::*;
use crate::identity::testing::{TempDir, id, mesh_state, pod};

fn csr(key: &KeyPair, sans: Vec<SanType>) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn request<'a>(csr_pem: &'a str, pod: &'a PodKey) -> IssueRequest<'a> {
    IssueRequest { csr_pem, pod, ttl: None }
}

fn leaf_der(issued: &Issued) -> CertificateDer<'static> {
    certs_from_pem(&issued.cert_chain_pem[0]).unwrap().remove(0)
}

#[test]
fn issued_leaf_has_exactly_the_required_extensions() {
    let ca = Authority::in_memory().unwrap();
    let state = mesh_state();
    let key = KeyPair::generate().unwrap();
    let web = pod("shop", "web");
    let before = SystemTime::now();
    let issued = ca.issue(&state, "node-a", &request(&csr(&key, vec![]), &web)).unwrap();
    assert_eq!(issued.id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(issued.cert_chain_pem.len(), 1);
    assert_eq!(issued.trust_bundle_pem.len(), 1);

    let der = leaf_der(&issued);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let root_der = ca.root_cert().clone();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    cert.verify_signature(Some(root.public_key())).expect("signed by the root");
    assert_eq!(cert.issuer(), root.subject());
    assert_eq!(cert.public_key().raw, key.subject_public_key_info().as_slice(), "certifies the CSR's key");
    assert_eq!(cert.version(), x509_parser::x509::X509Version::V3);

    let mut seen = Vec::new();
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                let names: Vec<_> = san.general_names.iter().collect();
                assert_eq!(names.len(), 1, "exactly one SAN: {names:?}");
                assert!(matches!(names[0], GeneralName::URI(u) if *u == "spiffe://cluster.local/ns/shop/sa/web"));
                // The subject is empty, so RFC 5280 wants the SAN critical.
                assert!(ext.critical);
                seen.push("san");
            }
            ParsedExtension::BasicConstraints(bc) => {
                assert!(!bc.ca, "leaf must not be a CA");
                assert!(bc.path_len_constraint.is_none());
                seen.push("bc");
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ku.digital_signature());
                assert!(!ku.key_cert_sign() && !ku.crl_sign(), "{ku:?}");
                seen.push("ku");
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                assert!(!eku.any && !eku.code_signing && !eku.email_protection && !eku.time_stamping && !eku.ocsp_signing);
                assert!(eku.other.is_empty());
                seen.push("eku");
            }
            ParsedExtension::AuthorityKeyIdentifier(_) => seen.push("aki"),
            ParsedExtension::SubjectKeyIdentifier(_) => seen.push("ski"),
            other => panic!("unexpected extension {other:?}"),
        }
    }
    seen.sort();
    seen.dedup();
    for required in ["bc", "eku", "ku", "san"] {
        assert!(seen.contains(&required), "missing {required}: {seen:?}");
    }

    let v = cert.validity();
    let nb = v.not_before.timestamp();
    let na = v.not_after.timestamp();
    let t0 = before.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(nb <= t0 - BACKDATE.as_secs() as i64 + 1 && nb >= t0 - BACKDATE.as_secs() as i64 - 5, "backdated a little");
    assert!((na - t0 - DEFAULT_TTL.as_secs() as i64).abs() <= 5, "24 h by default");
    assert_eq!(ca.stats().view().issued, 1);
}

#[test]
fn node_cannot_obtain_a_certificate_for_another_nodes_pod() {
    let ca = Authority::in_memory().unwrap();
    let state = mesh_state();
    let key = KeyPair::generate().unwrap();
    let db = pod("shop", "db");
    let err = ca.issue(&state, "node-a", &request(&csr(&key, vec![]), &db)).unwrap_err();
    assert!(matches!(err, IssueError::ForeignPod { .. }), "{err:?}");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        err.to_string(),
        "node node-a may not obtain a certificate for shop/db: that pod is scheduled on node-b"
    );
    // The right node may.
    ca.issue(&state, "node-b", &request(&csr(&key, vec![]), &db)).unwrap();
    // A node the config does not know gets nothing either.
    let err = ca.issue(&state, "node-z", &request(&csr(&key, vec![]), &db)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let stats = ca.stats().view();
    assert_eq!((stats.issued, stats.permission_denied), (1, 2));
}

#[test]
fn unknown_pod_is_not_found() {
    let ca = Authority::in_memory().unwrap();
    let key = KeyPair::generate().unwrap();
    let ghost = pod("shop", "ghost");
    let err = ca.issue(&mesh_state(), "node-a", &request(&csr(&key, vec![]), &ghost)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(err.to_string(), "pod shop/ghost is not in the mesh config");
    assert_eq!(ca.stats().view().not_found, 1);
}

#[test]
fn malformed_csrs_are_invalid_arguments() {
    let ca = Authority::in_memory().unwrap();
    let state = mesh_state();
    let web = pod("shop", "web");
    let key = KeyPair::generate().unwrap();
    let good = csr(&key, vec![]);

    // A correctly framed CSR whose signature no longer matches its content.
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let tampered = to_pem("CERTIFICATE REQUEST", &bytes);
    // A certificate is not a CSR.
    let a_cert = to_pem("CERTIFICATE", ca.root_cert());

    for (what, text, reason) in [
        ("empty", String::new(), "not a PEM-encoded PKCS#10"),
        ("garbage", "hello".to_owned(), "not a PEM-encoded PKCS#10"),
        ("truncated", good[..good.len() / 2].to_owned(), "not a PEM-encoded PKCS#10"),
        ("a certificate", a_cert, "not a PEM-encoded PKCS#10"),
        ("bad signature", tampered, "signature does not verify"),
    ] {
        let err = ca.issue(&state, "node-a", &request(&text, &web)).unwrap_err();
        assert!(matches!(err, IssueError::MalformedCsr { .. }), "{what}: {err:?}");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}");
        assert!(err.to_string().contains(reason), "{what}: {err}");
    }
    assert_eq!(ca.stats().view().invalid_argument, 5);
    assert_eq!(ca.stats().view().issued, 0);
}

#[test]
fn csr_may_only_ask_for_the_pods_own_identity() {
    let ca = Authority::in_memory().unwrap();
    let state = mesh_state();
    let web = pod("shop", "web");
    let key = KeyPair::generate().unwrap();
    let own = "spiffe://cluster.local/ns/shop/sa/web";

    for sans in [
        vec![uri("spiffe://cluster.local/ns/shop/sa/db")],
        vec![uri("spiffe://other.example/ns/shop/sa/web")],
        vec![uri(own), uri("spiffe://cluster.local/ns/shop/sa/admin")],
        vec![uri(own), SanType::DnsName("web.shop.svc".try_into().unwrap())],
        vec![SanType::DnsName("web.shop.svc".try_into().unwrap())],
    ] {
        let err = ca.issue(&state, "node-a", &request(&csr(&key, sans.clone()), &web)).unwrap_err();
        assert!(matches!(err, IssueError::WrongSan { .. }), "{sans:?}: {err:?}");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("the pod's identity is spiffe://cluster.local/ns/shop/sa/web"), "{err}");
    }
    // Exactly its own identity, or nothing: the CA fills it in.
    let issued = ca.issue(&state, "node-a", &request(&csr(&key, vec![uri(own)]), &web)).unwrap();
    assert_eq!(issued.id.to_string(), own);
}

#[test]
fn identity_comes_from_the_config_not_the_csr() {
    let ca = Authority::in_memory().unwrap();
    let mut state = mesh_state();
    state.trust_domain = "prod.example".into();
    let cart = pod("shop", "cart");
    let key = KeyPair::generate().unwrap();
    let issued = ca.issue(&state, "node-a", &request(&csr(&key, vec![]), &cart)).unwrap();
    assert_eq!(issued.id.to_string(), "spiffe://prod.example/ns/shop/sa/default");
    let leaf = x509::inspect(&leaf_der(&issued)).unwrap();
    assert_eq!(leaf.uri_sans, ["spiffe://prod.example/ns/shop/sa/default"]);

    // A service account that cannot form a SPIFFE ID is refused, not mangled.
    state.pods.get_mut(&cart).unwrap().service_account = "Not_Valid".into();
    let err = ca.issue(&state, "node-a", &request(&csr(&key, vec![]), &cart)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.to_string().contains("Not_Valid"), "{err}");
}

#[test]
fn lifetime_is_the_request_capped_by_the_ca() {
    let ca = Authority::in_memory().unwrap().with_ttl(Duration::from_secs(3600));
    let state = mesh_state();
    let web = pod("shop", "web");
    let key = KeyPair::generate().unwrap();
    let csr = csr(&key, vec![]);
    let lifetime = |ttl: Option<Duration>| {
        let now = SystemTime::now();
        let issued = ca.issue(&state, "node-a", &IssueRequest { csr_pem: &csr, pod: &web, ttl }).unwrap();
        let secs = issued.not_after.duration_since(now).unwrap_or_default().as_secs_f64();
        let leaf = x509::inspect(&leaf_der(&issued)).unwrap();
        assert_eq!(leaf.not_after, issued.not_after);
        assert_eq!(leaf.serial, issued.serial);
        secs
    };
    assert!((lifetime(None) - 3600.0).abs() < 5.0);
    assert!((lifetime(Some(Duration::from_secs(5))) - 5.0).abs() < 2.0, "short lifetimes are allowed");
    assert!((lifetime(Some(Duration::from_secs(48 * 3600))) - 3600.0).abs() < 5.0, "capped");
}

#[test]
fn root_is_persisted_across_restarts() {
    let dir = TempDir::new("ca-persist");
    let state_dir = dir.path().join("ca");
    let first = Authority::load_or_create(&state_dir).unwrap();
    let key_mode = fs::metadata(state_dir.join(ROOT_KEY_FILE)).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600, "the root key is private");
    assert!(fs::read_to_string(state_dir.join(ROOT_KEY_FILE)).unwrap().contains("PRIVATE KEY"));
    assert_eq!(first.trust_bundle(), [first.root_cert().clone()]);

    let second = Authority::load_or_create(&state_dir).unwrap();
    assert_eq!(second.root_cert(), first.root_cert(), "loaded, not regenerated");
    assert_eq!(second.trust_bundle(), first.trust_bundle());
    // And it signs with the same key: a certificate from the restarted CA
    // verifies against the first run's root.
    let cert = second.mint(&id("shop", "web"), Duration::from_secs(60)).unwrap();
    let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
    let (_, root) = X509Certificate::from_der(first.root_cert()).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();

    // Half a root is an error with a way out, never a silent new root.
    fs::remove_file(state_dir.join(ROOT_CERT_FILE)).unwrap();
    let err = Authority::load_or_create(&state_dir).unwrap_err();
    assert!(matches!(err, StoreError::HalfRoot { .. }), "{err:?}");
    assert!(err.to_string().contains("restore the missing one"), "{err}");
}

#[test]
fn rotation_keeps_the_old_root_trusted() {
    let dir = TempDir::new("ca-rotate");
    let old = Authority::load_or_create(dir.path()).unwrap();
    let old_cert = old.mint(&id("shop", "web"), Duration::from_secs(60)).unwrap();
    Authority::rotate_root(dir.path()).unwrap();
    let new = Authority::load_or_create(dir.path()).unwrap();
    assert_ne!(new.root_cert(), old.root_cert(), "a new root signs");
    assert_eq!(new.trust_bundle().len(), 2);
    assert!(new.trust_bundle().contains(old.root_cert()));
    assert!(new.trust_bundle().contains(new.root_cert()));
    let new_cert = new.mint(&id("shop", "db"), Duration::from_secs(60)).unwrap();
    assert_eq!(new_cert.trust_bundle.len(), 2, "issued certificates carry both roots");
    // The old certificate is signed by the old root, the new by the new one.
    let verifies = |cert: &WorkloadCert, root: &CertificateDer<'_>| {
        let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
        let (_, root) = X509Certificate::from_der(root).unwrap();
        leaf.verify_signature(Some(root.public_key())).is_ok()
    };
    assert!(verifies(&old_cert, old.root_cert()));
    assert!(verifies(&new_cert, new.root_cert()));
    assert!(!verifies(&new_cert, old.root_cert()));
}

#[test]
fn rotating_without_a_root_is_an_error() {
    let dir = TempDir::new("ca-norotate");
    let err = Authority::rotate_root(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::NoRoot { .. }), "{err:?}");
}

#[test]
fn bundle_files_must_hold_ca_certificates() {
    let dir = TempDir::new("ca-bundle");
    let ca = Authority::load_or_create(dir.path()).unwrap();
    let leaf = ca.mint(&id("shop", "web"), Duration::from_secs(60)).unwrap();
    fs::write(dir.path().join(ROOTS_DIR).join("leaf.pem"), leaf.chain_pem()).unwrap();
    let err = Authority::load_or_create(dir.path()).unwrap_err();
    assert!(err.to_string().contains("only hold CA certificates"), "{err}");
}
