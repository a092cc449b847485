//! Workload identity: the certificate authority's rules, and the agent's
//! certificates. SPIFFE IDs themselves are [`crate::spiffe`] (re-exported
//! here); the CA process, `mesh-agent ca`, is [`crate::ca`].
//!
//! | module | job |
//! | --- | --- |
//! | [`authority`] | the CA's root store and issuance rules; also the in-process file CA |
//! | [`client`] | asking a CA for a certificate (gRPC or in-process); key + CSR made here |
//! | [`manager`] | one certificate per local workload, rotated at half-life, in a `watch` |
//!
//! Private keys are generated where they are used and never travel: the CA
//! only ever sees CSRs.

use std::{fmt, time::SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

pub mod authority;
pub mod client;
pub mod manager;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub(crate) mod x509;

pub use authority::{Authority, CaStats, IssueError};
pub use client::{CaClient, FetchError, GrpcCaClient, LocalCaClient};
pub use manager::{CertManager, CertWatch, ManagerConfig};
pub use crate::spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};

/// The CA's gRPC API, generated from `proto/ca.proto`.
pub mod proto {
    tonic::include_proto!("nodemesh.ca.v1");
}

/// A workload's X.509 SVID with its private key, ready for rustls.
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The roots peers' certificates must chain to (two during a rotation).
    pub trust_bundle: Vec<CertificateDer<'static>>,
    /// The leaf's serial number, hex, for logs.
    pub serial: String,
}

impl WorkloadCert {
    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// The leaf as PEM (for files and for tonic's `Identity`).
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| to_pem("CERTIFICATE", c)).collect()
    }

    /// The private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        to_pem("PRIVATE KEY", self.key.secret_der())
    }

    pub fn trust_bundle_pem(&self) -> String {
        self.trust_bundle.iter().map(|c| to_pem("CERTIFICATE", c)).collect()
    }
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
            trust_bundle: self.trust_bundle.clone(),
            serial: self.serial.clone(),
        }
    }
}

impl fmt::Debug for WorkloadCert {
    // Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .field("not_before", &humantime(self.not_before))
            .field("not_after", &humantime(self.not_after))
            .field("chain_len", &self.chain.len())
            .field("trust_bundle_len", &self.trust_bundle.len())
            .finish_non_exhaustive()
    }
}

/// Every certificate in a PEM text (other PEM sections are skipped).
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect()
}

pub(crate) fn to_pem(label: &str, der: &[u8]) -> String {
    use std::fmt::Write as _;
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).expect("base64 is ASCII"));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

/// RFC 3339 in UTC, for logs and status (seconds precision).
pub fn humantime(t: SystemTime) -> String {
    let odt = time::OffsetDateTime::from(t);
    odt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{odt}"))
}

/// Parses "90s", "30m", "24h", "7d" (and "500ms").
pub fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("{s:?}: missing unit (s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: not a number"))?;
    let secs = |mul: u64| n.checked_mul(mul).map(Duration::from_secs).ok_or_else(|| format!("{s:?}: too large"));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (s, m, h or d)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        for len in 1..70u32 {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let pem = to_pem("CERTIFICATE", &der);
            let back = certs_from_pem(&pem).unwrap();
            assert_eq!(back.len(), 1, "len {len}");
            assert_eq!(back[0].as_ref(), &der[..], "len {len}");
        }
    }

    #[test]
    fn ttls() {
        use std::time::Duration;
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_ttl("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172800)));
        assert!(parse_ttl("24").is_err());
        assert!(parse_ttl("1y").is_err());
    }
}
