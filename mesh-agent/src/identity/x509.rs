//! The few facts about a certificate the mesh cares about, read with
//! x509-parser (webpki checks chains but does not expose URI SANs).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

#[derive(Debug)]
pub(crate) struct Leaf {
    pub uri_sans: Vec<String>,
    /// basicConstraints CA:true.
    pub is_ca: bool,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    /// SubjectPublicKeyInfo, DER: to check that a certificate is for our key.
    pub spki: Vec<u8>,
}

pub(crate) fn inspect(der: &[u8]) -> Result<Leaf, String> {
    let (rest, cert) =
        x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| format!("not a DER X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("invalid subjectAltName extension: {e}"))?;
    let uri_sans = sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| format!("invalid basicConstraints extension: {e}"))?
        .is_some_and(|bc| bc.value.ca);
    let v = cert.validity();
    Ok(Leaf {
        uri_sans,
        is_ca,
        not_before: to_system_time(v.not_before.timestamp()),
        not_after: to_system_time(v.not_after.timestamp()),
        serial: cert.raw_serial_as_string().replace(':', ""),
        spki: cert.public_key().raw.to_vec(),
    })
}

fn to_system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs()),
    }
}
