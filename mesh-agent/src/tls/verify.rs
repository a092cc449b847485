//! The SPIFFE certificate checks, for both ends of the tunnel, their
//! distinct failure reasons, and the counters.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use serde::Serialize;
use webpki::KeyUsage;

use super::{Error, ExpectedPeer, provider};
use crate::identity::{CertWatch, SpiffeId, WorkloadCert, humantime, x509};

/// Why a peer's certificate was refused: one counter and label each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    Expired,
    NotYetValid,
    WrongTrustDomain,
    NoUriSan,
    MultipleUriSans,
    LeafIsCa,
    /// keyCertSign or cRLSign on a leaf: a workload key must not be able to
    /// sign certificates or revocation lists (SPIFFE X.509-SVID §4.3).
    LeafSignsCertificates,
    /// No keyUsage, or one without digitalSignature (SPIFFE X.509-SVID
    /// §4.3: a leaf SVID must have it, TLS 1.3 signs with it).
    NoDigitalSignature,
    /// An extendedKeyUsage without the purpose this end needs (serverAuth
    /// for a server, clientAuth for a client).
    WrongExtendedKeyUsage,
    UntrustedRoot,
    NotSpiffe,
    UnexpectedIdentity,
    /// Anything else webpki refuses (bad encoding, unsupported algorithm...).
    Malformed,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::Expired,
        Reason::NotYetValid,
        Reason::WrongTrustDomain,
        Reason::NoUriSan,
        Reason::MultipleUriSans,
        Reason::LeafIsCa,
        Reason::LeafSignsCertificates,
        Reason::NoDigitalSignature,
        Reason::WrongExtendedKeyUsage,
        Reason::UntrustedRoot,
        Reason::NotSpiffe,
        Reason::UnexpectedIdentity,
        Reason::Malformed,
    ];

    /// Metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::WrongTrustDomain => "wrong_trust_domain",
            Reason::NoUriSan => "no_uri_san",
            Reason::MultipleUriSans => "multiple_uri_sans",
            Reason::LeafIsCa => "leaf_is_ca",
            Reason::LeafSignsCertificates => "leaf_signs_certificates",
            Reason::NoDigitalSignature => "no_digital_signature",
            Reason::WrongExtendedKeyUsage => "wrong_extended_key_usage",
            Reason::UntrustedRoot => "untrusted_root",
            Reason::NotSpiffe => "not_spiffe",
            Reason::UnexpectedIdentity => "unexpected_identity",
            Reason::Malformed => "malformed",
        }
    }
}

/// A refused peer certificate, with what an operator needs to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the certificate expired at {not_after} (now {now})")]
    Expired { not_after: String, now: String },
    #[error("the certificate is not valid before {not_before} (now {now}): is a clock wrong?")]
    NotYetValid { not_before: String, now: String },
    #[error("the peer {id} is in trust domain {got:?}, this mesh is {expected:?}")]
    WrongTrustDomain { id: Box<SpiffeId>, got: String, expected: String },
    #[error("the certificate has no URI SAN: a mesh certificate carries its SPIFFE ID there")]
    NoUriSan,
    #[error("the certificate has {} URI SANs {sans:?}: a mesh certificate carries exactly one", sans.len())]
    MultipleUriSans { sans: Vec<String> },
    #[error("the leaf certificate is a CA (basicConstraints CA:true)")]
    LeafIsCa,
    #[error("the leaf certificate's keyUsage allows {usages}: a workload certificate must not sign certificates or CRLs")]
    LeafSignsCertificates { usages: String },
    #[error("the leaf certificate {detail}: a workload certificate needs digitalSignature")]
    NoDigitalSignature { detail: String },
    #[error("the certificate's extendedKeyUsage does not allow {purpose}")]
    WrongExtendedKeyUsage { purpose: &'static str },
    #[error("the certificate does not chain to the mesh trust bundle ({detail})")]
    UntrustedRoot { detail: String },
    #[error("the URI SAN {uri:?} is not a workload SPIFFE ID: {reason}")]
    NotSpiffe { uri: String, reason: String },
    #[error("the peer is {got}, expected {expected}")]
    UnexpectedIdentity { got: Box<SpiffeId>, expected: Box<SpiffeId> },
    #[error("the certificate is invalid: {detail}")]
    Malformed { detail: String },
}

impl VerifyError {
    pub fn reason(&self) -> Reason {
        match self {
            Self::Expired { .. } => Reason::Expired,
            Self::NotYetValid { .. } => Reason::NotYetValid,
            Self::WrongTrustDomain { .. } => Reason::WrongTrustDomain,
            Self::NoUriSan => Reason::NoUriSan,
            Self::MultipleUriSans { .. } => Reason::MultipleUriSans,
            Self::LeafIsCa => Reason::LeafIsCa,
            Self::LeafSignsCertificates { .. } => Reason::LeafSignsCertificates,
            Self::NoDigitalSignature { .. } => Reason::NoDigitalSignature,
            Self::WrongExtendedKeyUsage { .. } => Reason::WrongExtendedKeyUsage,
            Self::UntrustedRoot { .. } => Reason::UntrustedRoot,
            Self::NotSpiffe { .. } => Reason::NotSpiffe,
            Self::UnexpectedIdentity { .. } => Reason::UnexpectedIdentity,
            Self::Malformed { .. } => Reason::Malformed,
        }
    }

    /// As rustls carries it: the handshake fails with this error inside, and
    /// [`super::HandshakeError::PeerRejected`] gets it back out.
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// Handshake counters of one agent (or one listener), for status and metrics.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Peer certificates accepted, as client and as server.
    pub verified: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    /// TLS clients that presented no certificate.
    pub no_client_certificate: AtomicU64,
    /// Handshakes refused because the local workload had no usable certificate.
    pub no_local_certificate: AtomicU64,
    /// Inbound handshakes that failed for any other reason: not TLS at all
    /// (garbage, plaintext on the tunnel port), wrong version, peer alerts.
    pub handshake_failed: AtomicU64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsStatsView {
    pub verified: u64,
    /// By [`Reason::as_str`]; every reason is present.
    pub rejected: BTreeMap<&'static str, u64>,
    pub no_client_certificate: u64,
    pub no_local_certificate: u64,
    pub handshake_failed: u64,
}

impl TlsStats {
    pub fn rejected(&self, reason: Reason) -> u64 {
        self.rejected[reason as usize].load(Ordering::Relaxed)
    }

    pub fn view(&self) -> TlsStatsView {
        TlsStatsView {
            verified: self.verified.load(Ordering::Relaxed),
            rejected: Reason::ALL.iter().map(|r| (r.as_str(), self.rejected(*r))).collect(),
            no_client_certificate: self.no_client_certificate.load(Ordering::Relaxed),
            no_local_certificate: self.no_local_certificate.load(Ordering::Relaxed),
            handshake_failed: self.handshake_failed.load(Ordering::Relaxed),
        }
    }

    pub(super) fn count_no_client_certificate(&self) {
        self.no_client_certificate.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_no_local_certificate(&self) {
        self.no_local_certificate.fetch_add(1, Ordering::Relaxed);
    }

    fn record(&self, peer: &'static str, result: &Result<SpiffeId, VerifyError>) {
        match result {
            Ok(_) => {
                self.verified.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.rejected[e.reason() as usize].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer, reason = e.reason().as_str(), "rejected the {peer}'s certificate: {e}");
            }
        }
    }
}

/// Trust anchors and trust domain, parsed from one certificate's bundle.
#[derive(Debug)]
struct Trust {
    trust_domain: String,
    anchors: Vec<TrustAnchor<'static>>,
}

impl Trust {
    fn from_cert(cert: &WorkloadCert) -> Result<Self, Error> {
        let anchors = cert
            .trust_bundle
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| Error::TrustBundle {
                        id: Box::new(cert.id.clone()),
                        index,
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if anchors.is_empty() {
            return Err(Error::TrustBundle {
                id: Box::new(cert.id.clone()),
                index: 0,
                reason: "the bundle is empty".into(),
            });
        }
        Ok(Self {
            trust_domain: cert.id.trust_domain().to_owned(),
            anchors,
        })
    }

    /// The checks, in the order an operator would want them reported: is the
    /// certificate genuine and current (chain, dates), then is it a
    /// workload certificate, then is it the right workload.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
        purpose: &'static str,
        expected: &ExpectedPeer,
    ) -> Result<SpiffeId, VerifyError> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| VerifyError::Malformed { detail: e.to_string() })?;
        cert.verify_for_usage(
            provider().signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| from_webpki(e, purpose))?;
        let leaf = x509::inspect(end_entity).map_err(|detail| VerifyError::Malformed { detail })?;
        if leaf.is_ca {
            return Err(VerifyError::LeafIsCa);
        }
        check_key_usage(end_entity)?;
        let uri = match leaf.uri_sans.as_slice() {
            [] => return Err(VerifyError::NoUriSan),
            [uri] => uri,
            sans => return Err(VerifyError::MultipleUriSans { sans: sans.to_vec() }),
        };
        let id: SpiffeId = uri.parse().map_err(|e: crate::identity::SpiffeIdError| VerifyError::NotSpiffe {
            uri: uri.chars().take(300).collect(),
            reason: e.to_string(),
        })?;
        if id.trust_domain() != self.trust_domain {
            return Err(VerifyError::WrongTrustDomain {
                got: id.trust_domain().to_owned(),
                expected: self.trust_domain.clone(),
                id: Box::new(id),
            });
        }
        if let ExpectedPeer::Exactly(want) = expected
            && *want != id
        {
            return Err(VerifyError::UnexpectedIdentity {
                got: Box::new(id),
                expected: Box::new(want.clone()),
            });
        }
        Ok(id)
    }
}

/// SPIFFE X.509-SVID §4.3 for a leaf: keyUsage present, digitalSignature
/// set, neither keyCertSign nor cRLSign. (webpki ignores keyUsage on end
/// entities; the extendedKeyUsage it does check.)
fn check_key_usage(der: &[u8]) -> Result<(), VerifyError> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| VerifyError::Malformed { detail: format!("not a DER X.509 certificate: {e}") })?;
    let ku = cert
        .key_usage()
        .map_err(|e| VerifyError::Malformed { detail: format!("invalid keyUsage extension: {e}") })?;
    let Some(ku) = ku else {
        return Err(VerifyError::NoDigitalSignature { detail: "has no keyUsage extension".into() });
    };
    let signs: Vec<&str> = [(ku.value.key_cert_sign(), "keyCertSign"), (ku.value.crl_sign(), "cRLSign")]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
    if !signs.is_empty() {
        return Err(VerifyError::LeafSignsCertificates { usages: signs.join(" and ") });
    }
    if !ku.value.digital_signature() {
        return Err(VerifyError::NoDigitalSignature { detail: format!("has keyUsage {} without digitalSignature", ku.value) });
    }
    Ok(())
}

/// A webpki error in words: its variant's name split into lower-case words
/// (`UnsupportedCriticalExtension` -> "unsupported critical extension"),
/// for errors that have no better sentence; webpki's own Display is its
/// Debug.
fn webpki_words(e: &webpki::Error) -> String {
    let debug = format!("{e:?}");
    let name: String = debug.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
    let mut words = String::new();
    for c in name.chars() {
        if c.is_ascii_uppercase() && !words.is_empty() {
            words.push(' ');
        }
        words.push(c.to_ascii_lowercase());
    }
    words
}

fn from_webpki(e: webpki::Error, purpose: &'static str) -> VerifyError {
    match e {
        webpki::Error::CertExpired { time, not_after } => VerifyError::Expired {
            not_after: unix_text(not_after),
            now: unix_text(time),
        },
        webpki::Error::CertNotValidYet { time, not_before } => VerifyError::NotYetValid {
            not_before: unix_text(not_before),
            now: unix_text(time),
        },
        webpki::Error::CaUsedAsEndEntity => VerifyError::LeafIsCa,
        // A root with the same name but another key lands on the signature
        // check rather than on the issuer lookup.
        webpki::Error::UnknownIssuer => VerifyError::UntrustedRoot {
            detail: "its issuer is none of the trusted roots".into(),
        },
        webpki::Error::InvalidSignatureForPublicKey => VerifyError::UntrustedRoot {
            detail: "its signature does not verify with the trusted root of that name".into(),
        },
        #[allow(deprecated)]
        webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_) => VerifyError::WrongExtendedKeyUsage { purpose },
        other => VerifyError::Malformed { detail: webpki_words(&other) },
    }
}

fn unix_text(t: UnixTime) -> String {
    humantime(UNIX_EPOCH + Duration::from_secs(t.as_secs()))
}

fn verify_tls13(message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
}

fn schemes() -> Vec<SignatureScheme> {
    provider().signature_verification_algorithms.supported_schemes()
}

/// The client's check of the server: trust bundle and trust domain of the
/// client's own certificate, fixed when the config is built.
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    trust: Trust,
    expected: ExpectedPeer,
    stats: Arc<TlsStats>,
}

impl SpiffeServerVerifier {
    pub(super) fn new(cert: &WorkloadCert, expected: ExpectedPeer, stats: Arc<TlsStats>) -> Result<Self, Error> {
        Ok(Self {
            trust: Trust::from_cert(cert)?,
            expected,
            stats,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let result = self
            .trust
            .verify(end_entity, intermediates, now, KeyUsage::server_auth(), "serverAuth", &self.expected);
        self.stats.record("server", &result);
        result.map(|_| ServerCertVerified::assertion()).map_err(VerifyError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs allow TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// The server's check of clients: trust bundle and trust domain of the
/// workload's *current* certificate, so a rotated bundle (a new root) is
/// picked up without rebuilding the config.
#[derive(Debug)]
pub(super) struct SpiffeClientVerifier {
    certs: CertWatch,
    stats: Arc<TlsStats>,
    cache: Mutex<Option<(Arc<WorkloadCert>, Arc<Trust>)>>,
}

impl SpiffeClientVerifier {
    pub(super) fn new(certs: CertWatch, stats: Arc<TlsStats>) -> Self {
        Self {
            certs,
            stats,
            cache: Mutex::new(None),
        }
    }

    fn trust(&self) -> Result<Arc<Trust>, VerifyError> {
        let Some(cert) = self.certs.borrow().clone() else {
            return Err(VerifyError::UntrustedRoot {
                detail: "this workload has no certificate, hence no trust bundle, yet".into(),
            });
        };
        let mut cache = self.cache.lock().expect("poisoned");
        if let Some((c, trust)) = cache.as_ref()
            && Arc::ptr_eq(c, &cert)
        {
            return Ok(trust.clone());
        }
        let trust = Arc::new(Trust::from_cert(&cert).map_err(|e| VerifyError::UntrustedRoot { detail: e.to_string() })?);
        *cache = Some((cert, trust.clone()));
        Ok(trust)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Clients have exactly one certificate; hints would only leak names.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let result = self.trust().and_then(|trust| {
            trust.verify(
                end_entity,
                intermediates,
                now,
                KeyUsage::client_auth(),
                "clientAuth",
                &ExpectedPeer::AnyInTrustDomain,
            )
        });
        self.stats.record("client", &result);
        result.map(|_| ClientCertVerified::assertion()).map_err(VerifyError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// `cargo fuzz` entry (`fuzz/`): a peer's leaf certificate (DER) checked
/// as the server (`server`) or client end would, against the trust of
/// `ours`; and the leaf checks after the chain (which a fuzzer cannot
/// reach through a signature) on their own. Returns the verified identity.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn fuzz_peer_certificate(ours: &WorkloadCert, der: &[u8], server: bool, now: UnixTime) -> Option<SpiffeId> {
    if let Ok(leaf) = x509::inspect(der) {
        let _ = check_key_usage(der);
        for uri in &leaf.uri_sans {
            let _ = uri.parse::<SpiffeId>();
        }
    }
    let trust = Trust::from_cert(ours).ok()?;
    let (usage, purpose) = if server { (KeyUsage::server_auth(), "serverAuth") } else { (KeyUsage::client_auth(), "clientAuth") };
    let cert = CertificateDer::from(der);
    trust.verify(&cert, &[], now, usage, purpose, &ExpectedPeer::AnyInTrustDomain).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webpki_errors_read_as_words_not_debug_values() {
        assert_eq!(webpki_words(&webpki::Error::UnsupportedCriticalExtension), "unsupported critical extension");
        assert_eq!(webpki_words(&webpki::Error::BadDer), "bad der");
        let e = from_webpki(webpki::Error::UnsupportedCriticalExtension, "serverAuth");
        assert_eq!(e.to_string(), "the certificate is invalid: unsupported critical extension");
        #[allow(deprecated)]
        let eku = from_webpki(webpki::Error::RequiredEkuNotFound, "clientAuth");
        assert_eq!(eku.reason(), Reason::WrongExtendedKeyUsage);
        assert_eq!(eku.to_string(), "the certificate's extendedKeyUsage does not allow clientAuth");
    }
}
