//! SPIFFE IDs of workloads: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//!
//! Parsing is strict on purpose: an ID is compared byte for byte when a peer
//! is authenticated, so two spellings of one identity (upper case, a port, a
//! trailing slash) must not both be accepted.

use std::{fmt, str::FromStr};

/// The trust domain when the mesh config names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";
/// The SPIFFE spec's limits.
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Kubernetes: namespaces are DNS labels, service accounts DNS subdomains.
const MAX_NAMESPACE_LEN: usize = 63;
const MAX_SERVICE_ACCOUNT_LEN: usize = 253;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("{id:?} is not a SPIFFE ID: it must start with \"spiffe://\" (lower case)")]
    Scheme { id: String },
    #[error("{id:?} is not a valid SPIFFE ID: it is longer than {MAX_ID_LEN} bytes")]
    TooLong { id: String },
    #[error("{id:?} is not a valid SPIFFE ID: a query or fragment ('?', '#') is not allowed")]
    QueryOrFragment { id: String },
    #[error("{id:?} is not a valid SPIFFE ID: user info ('@') is not allowed in the trust domain")]
    UserInfo { id: String },
    #[error("{id:?} is not a valid SPIFFE ID: a port is not allowed in the trust domain")]
    Port { id: String },
    #[error("trust domain {trust_domain:?} is invalid: {reason}")]
    TrustDomain { trust_domain: String, reason: &'static str },
    #[error("{id:?} is not a workload SPIFFE ID: the path must be /ns/<namespace>/sa/<service account>")]
    Path { id: String },
    #[error("namespace {namespace:?} is invalid: {reason}")]
    Namespace { namespace: String, reason: &'static str },
    #[error("service account {service_account:?} is invalid: {reason}")]
    ServiceAccount { service_account: String, reason: &'static str },
}

/// A workload identity. Constructed only through validation, so a value in
/// hand is always well-formed and prints as its canonical URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeIdError> {
        let id = Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        validate_trust_domain(&id.trust_domain)?;
        validate_namespace(&id.namespace)?;
        validate_service_account(&id.service_account)?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err_id = || s.chars().take(300).collect::<String>();
        let rest = s.strip_prefix(SCHEME).ok_or_else(|| SpiffeIdError::Scheme { id: err_id() })?;
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { id: err_id() });
        }
        if s.contains(['?', '#']) {
            return Err(SpiffeIdError::QueryOrFragment { id: err_id() });
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(SpiffeIdError::UserInfo { id: err_id() });
        }
        if authority.contains(':') {
            return Err(SpiffeIdError::Port { id: err_id() });
        }
        validate_trust_domain(authority)?;
        let mut segs = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) =
            (segs.next(), segs.next(), segs.next(), segs.next(), segs.next())
        else {
            return Err(SpiffeIdError::Path { id: err_id() });
        };
        Self::new(authority, ns, sa)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A DNS-style name: dot-separated labels of lower-case letters, digits, '-'
/// and '_' (the SPIFFE trust-domain alphabet), no empty label, no label
/// starting or ending with '-'.
fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let bad = |reason| {
        Err(SpiffeIdError::TrustDomain {
            trust_domain: td.chars().take(300).collect(),
            reason,
        })
    };
    if td.is_empty() {
        return bad("it is empty");
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return bad("it is longer than 255 bytes");
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return bad("it must be lower case");
    }
    if !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.') {
        return bad("only lower-case letters, digits, '-', '_' and '.' are allowed");
    }
    for label in td.split('.') {
        if label.is_empty() {
            return bad("it has an empty label (leading, trailing or doubled '.')");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 bytes");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
    }
    Ok(())
}

/// A Kubernetes namespace name: an RFC 1123 DNS label.
fn validate_namespace(ns: &str) -> Result<(), SpiffeIdError> {
    let bad = |reason| {
        Err(SpiffeIdError::Namespace {
            namespace: ns.chars().take(300).collect(),
            reason,
        })
    };
    if ns.is_empty() {
        return bad("it is empty");
    }
    if ns.len() > MAX_NAMESPACE_LEN {
        return bad("it is longer than 63 bytes");
    }
    if !ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return bad("only lower-case letters, digits and '-' are allowed");
    }
    if ns.starts_with('-') || ns.ends_with('-') {
        return bad("it starts or ends with '-'");
    }
    Ok(())
}

/// A Kubernetes service account name: an RFC 1123 DNS subdomain.
fn validate_service_account(sa: &str) -> Result<(), SpiffeIdError> {
    let bad = |reason| {
        Err(SpiffeIdError::ServiceAccount {
            service_account: sa.chars().take(300).collect(),
            reason,
        })
    };
    if sa.is_empty() {
        return bad("it is empty");
    }
    if sa.len() > MAX_SERVICE_ACCOUNT_LEN {
        return bad("it is longer than 253 bytes");
    }
    if !sa.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
        return bad("only lower-case letters, digits, '-' and '.' are allowed");
    }
    for label in sa.split('.') {
        if label.is_empty() || label.starts_with('-') || label.ends_with('-') {
            return bad("each '.'-separated part must start and end with a letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(SpiffeId::new("cluster.local", "shop", "web").unwrap(), id);
        let id: SpiffeId = "spiffe://prod_1.example-corp.com/ns/a-1/sa/svc.v2".parse().unwrap();
        assert_eq!(id.service_account(), "svc.v2");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"spiffe://prod_1.example-corp.com/ns/a-1/sa/svc.v2\"");
    }

    #[test]
    fn rejects_malformed_ids() {
        use SpiffeIdError as E;
        let long_td = format!("spiffe://{}.local/ns/a/sa/b", "a".repeat(64));
        let long_id = format!("spiffe://cluster.local/ns/a/sa/{}", "a.".repeat(1100));
        type Check = fn(&E) -> bool;
        #[rustfmt::skip]
        let table: &[(&str, Check)] = &[
            ("", |e| matches!(e, E::Scheme { .. })),
            ("cluster.local/ns/a/sa/b", |e| matches!(e, E::Scheme { .. })),
            ("SPIFFE://cluster.local/ns/a/sa/b", |e| matches!(e, E::Scheme { .. })),
            ("https://cluster.local/ns/a/sa/b", |e| matches!(e, E::Scheme { .. })),
            ("spiffe:/cluster.local/ns/a/sa/b", |e| matches!(e, E::Scheme { .. })),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", |e| matches!(e, E::QueryOrFragment { .. })),
            ("spiffe://cluster.local/ns/a/sa/b#frag", |e| matches!(e, E::QueryOrFragment { .. })),
            ("spiffe://user@cluster.local/ns/a/sa/b", |e| matches!(e, E::UserInfo { .. })),
            ("spiffe://cluster.local:443/ns/a/sa/b", |e| matches!(e, E::Port { .. })),
            ("spiffe://Cluster.Local/ns/a/sa/b", |e| matches!(e, E::TrustDomain { .. })),
            ("spiffe:///ns/a/sa/b", |e| matches!(e, E::TrustDomain { .. })),
            ("spiffe://cluster..local/ns/a/sa/b", |e| matches!(e, E::TrustDomain { .. })),
            ("spiffe://.cluster.local/ns/a/sa/b", |e| matches!(e, E::TrustDomain { .. })),
            ("spiffe://-cluster.local/ns/a/sa/b", |e| matches!(e, E::TrustDomain { .. })),
            ("spiffe://clu%73ter.local/ns/a/sa/b", |e| matches!(e, E::TrustDomain { .. })),
            (&long_td, |e| matches!(e, E::TrustDomain { .. })),
            ("spiffe://cluster.local", |e| matches!(e, E::Path { .. })),
            ("spiffe://cluster.local/", |e| matches!(e, E::Path { .. })),
            ("spiffe://cluster.local/ns/a", |e| matches!(e, E::Path { .. })),
            ("spiffe://cluster.local/ns/a/sa/b/", |e| matches!(e, E::Path { .. })),
            ("spiffe://cluster.local/ns/a/sa/b/c", |e| matches!(e, E::Path { .. })),
            ("spiffe://cluster.local//ns/a/sa/b", |e| matches!(e, E::Path { .. })),
            ("spiffe://cluster.local/sa/b/ns/a", |e| matches!(e, E::Path { .. })),
            ("spiffe://cluster.local/ns//sa/b", |e| matches!(e, E::Namespace { .. })),
            ("spiffe://cluster.local/ns/Shop/sa/b", |e| matches!(e, E::Namespace { .. })),
            ("spiffe://cluster.local/ns/a.b/sa/b", |e| matches!(e, E::Namespace { .. })),
            ("spiffe://cluster.local/ns/../sa/b", |e| matches!(e, E::Namespace { .. })),
            ("spiffe://cluster.local/ns/a/sa/", |e| matches!(e, E::ServiceAccount { .. })),
            ("spiffe://cluster.local/ns/a/sa/..", |e| matches!(e, E::ServiceAccount { .. })),
            ("spiffe://cluster.local/ns/a/sa/Web", |e| matches!(e, E::ServiceAccount { .. })),
            ("spiffe://cluster.local/ns/a/sa/we%20b", |e| matches!(e, E::ServiceAccount { .. })),
            ("spiffe://cluster.local/ns/a/sa/-web", |e| matches!(e, E::ServiceAccount { .. })),
            (&long_id, |e| matches!(e, E::TooLong { .. })),
        ];
        for (input, expect) in table {
            let err = input.parse::<SpiffeId>().expect_err(input);
            assert!(expect(&err), "{input:?}: unexpected error {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn messages_name_the_problem() {
        let e = "spiffe://cluster.local:8443/ns/a/sa/b".parse::<SpiffeId>().unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        let e = SpiffeId::new("cluster.local", "shop", "Web_1").unwrap_err();
        assert!(e.to_string().contains("service account \"Web_1\""), "{e}");
    }
}
