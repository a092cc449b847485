//! rustls configurations for the tunnel between agents (port 15008): TLS 1.3
//! only, ALPN `h2`, mutual authentication with workload certificates.
//!
//! The client presents the *source* workload's certificate and checks that
//! the server is the expected *destination* workload; the server presents the
//! destination workload's certificate (read from its [`CertWatch`] at each
//! handshake, so rotations need no restart) and accepts any workload of the
//! trust domain: what a peer may do is policy's business, not TLS's.
//!
//! Both sides check the peer's certificate the same way ([`verify`]): it
//! chains to the trust bundle and is valid now (webpki), is not a CA, carries
//! exactly one URI SAN, a workload SPIFFE ID of our trust domain. Each
//! failure has its own [`Reason`], log line and counter in [`TlsStats`].

use std::sync::{Arc, Mutex, OnceLock};

use rustls::{
    ClientConfig, CommonState, ServerConfig,
    crypto::CryptoProvider,
    pki_types::ServerName,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::identity::{CertWatch, SpiffeId, WorkloadCert, x509};

pub mod verify;
pub use verify::{Reason, TlsStats, TlsStatsView, VerifyError};

/// The tunnel speaks HTTP/2 inside TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// Which server a client accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// The destination workload's identity: the normal case.
    Exactly(SpiffeId),
    /// Any workload of our trust domain (diagnostics, tests).
    AnyInTrustDomain,
}

impl From<SpiffeId> for ExpectedPeer {
    fn from(id: SpiffeId) -> Self {
        Self::Exactly(id)
    }
}

impl From<&SpiffeId> for ExpectedPeer {
    fn from(id: &SpiffeId) -> Self {
        Self::Exactly(id.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the certificate of {id} cannot be used for TLS: {source}")]
    Certificate { id: Box<SpiffeId>, source: rustls::Error },
    #[error("the trust bundle of {id} is unusable: certificate {index}: {reason}")]
    TrustBundle { id: Box<SpiffeId>, index: usize, reason: String },
    #[error("TLS 1.3 with the ring provider is unavailable: {0}")]
    Protocol(rustls::Error),
}

/// Why a handshake failed, as the side that ran it sees it.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("rejected the peer's certificate: {0}")]
    PeerRejected(VerifyError),
    #[error("the TLS client presented no certificate: mesh peers must authenticate with their workload certificate")]
    NoClientCertificate,
    #[error("the peer aborted the handshake with a {0:?} alert: did it reject our certificate?")]
    Alert(rustls::AlertDescription),
    #[error("TLS handshake failed: {0}")]
    Tls(rustls::Error),
    #[error("TLS handshake failed: {0}")]
    Io(std::io::Error),
    #[error("the handshake completed without a peer identity")]
    NoPeerIdentity,
}

/// The one crypto provider: ring (aws-lc-rs needs cmake and clang to build).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// Client side of the tunnel: presents `cert` (the source workload's) and
/// accepts only a server that passes [`verify`] and is `expected`. SNI is
/// off: the identity is checked from the certificate, and SNI would put the
/// destination's name on the wire in clear text.
pub fn client_config(
    cert: &WorkloadCert,
    expected: impl Into<ExpectedPeer>,
    stats: Arc<TlsStats>,
) -> Result<Arc<ClientConfig>, Error> {
    let verifier = verify::SpiffeServerVerifier::new(cert, expected.into(), stats)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Protocol)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(|source| Error::Certificate {
            id: Box::new(cert.id.clone()),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// Server side of the tunnel for one workload: presents the latest
/// certificate in `certs` at each handshake (existing connections keep the
/// one they started with) and requires a client certificate that passes
/// [`verify`] against that certificate's trust bundle and trust domain.
pub fn server_config(certs: CertWatch, stats: Arc<TlsStats>) -> Result<Arc<ServerConfig>, Error> {
    let verifier = verify::SpiffeClientVerifier::new(certs.clone(), stats.clone());
    let resolver = WatchResolver {
        certs,
        stats,
        cache: Mutex::new(None),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Protocol)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The verified SPIFFE ID of the peer, once the handshake is done.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    let info = x509::inspect(leaf).ok()?;
    match info.uri_sans.as_slice() {
        [uri] => uri.parse().ok(),
        _ => None,
    }
}

/// Runs the client handshake; returns the stream and the server's identity.
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    io: IO,
) -> Result<(tokio_rustls::client::TlsStream<IO>, SpiffeId), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // Not sent (SNI is off) and not checked (the verifier checks the SPIFFE
    // ID); rustls just needs a name.
    let name = ServerName::try_from("mesh.invalid").expect("a valid DNS name");
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, io)
        .await
        .map_err(classify)?;
    let id = peer_identity(stream.get_ref().1).ok_or(HandshakeError::NoPeerIdentity)?;
    Ok((stream, id))
}

/// Runs the server handshake; returns the stream and the client's identity.
/// A client without a certificate is counted in `stats` here (rustls refuses
/// it before any verifier runs).
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    io: IO,
    stats: &TlsStats,
) -> Result<(tokio_rustls::server::TlsStream<IO>, SpiffeId), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let result = tokio_rustls::TlsAcceptor::from(config).accept(io).await.map_err(classify);
    let stream = match result {
        Ok(s) => s,
        Err(HandshakeError::NoClientCertificate) => {
            stats.count_no_client_certificate();
            tracing::info!("refused a TLS client without a certificate");
            return Err(HandshakeError::NoClientCertificate);
        }
        // Certificate rejections were counted by reason in the verifier.
        Err(e @ HandshakeError::PeerRejected(_)) => return Err(e),
        Err(e) => {
            stats.handshake_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(e);
        }
    };
    let id = peer_identity(stream.get_ref().1).ok_or(HandshakeError::NoPeerIdentity)?;
    Ok((stream, id))
}

fn classify(e: std::io::Error) -> HandshakeError {
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return HandshakeError::Io(e);
    };
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            match other.0.downcast_ref::<VerifyError>() {
                Some(v) => HandshakeError::PeerRejected(v.clone()),
                None => HandshakeError::Tls(tls.clone()),
            }
        }
        rustls::Error::NoCertificatesPresented => HandshakeError::NoClientCertificate,
        rustls::Error::AlertReceived(alert) => HandshakeError::Alert(*alert),
        other => HandshakeError::Tls(other.clone()),
    }
}

/// Serves the latest certificate of one workload. The rustls key is built
/// once per certificate, not per handshake.
#[derive(Debug)]
struct WatchResolver {
    certs: CertWatch,
    stats: Arc<TlsStats>,
    cache: Mutex<Option<(Arc<WorkloadCert>, Arc<CertifiedKey>)>>,
}

impl ResolvesServerCert for WatchResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(cert) = self.certs.borrow().clone() else {
            self.stats.count_no_local_certificate();
            tracing::warn!("refused a tunnel handshake: this workload has no certificate (not issued yet, or expired while the CA is unreachable)");
            return None;
        };
        let mut cache = self.cache.lock().expect("poisoned");
        if let Some((c, key)) = cache.as_ref()
            && Arc::ptr_eq(c, &cert)
        {
            return Some(key.clone());
        }
        match CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &provider()) {
            Ok(key) => {
                let key = Arc::new(key);
                *cache = Some((cert, key.clone()));
                Some(key)
            }
            Err(e) => {
                self.stats.count_no_local_certificate();
                tracing::error!(id = %cert.id, error = %e, "refused a tunnel handshake: the workload's certificate cannot be used");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
