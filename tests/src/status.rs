//! Typed view of the agent's `GET /status`. Lenient on purpose (defaults
//! for missing fields, unknown fields ignored): tests assert on the values
//! they care about, not on the exact shape of the whole document.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Status {
    pub node: String,
    pub ready: bool,
    pub config: ConfigStatus,
    pub ebpf: EbpfStatus,
    pub pods: Vec<PodStatus>,
    /// The tunnel's handshake counters (absent before mTLS).
    pub tls: Option<TlsStatus>,
}

/// The agent's TLS handshake counters (`TlsStatsView` in the agent).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsStatus {
    /// Peer certificates accepted, as client and as server.
    pub verified: u64,
    /// Peer certificates refused, by reason (`expired`, `untrusted_root`...).
    pub rejected: BTreeMap<String, u64>,
    /// TLS clients that presented no certificate.
    pub no_client_certificate: u64,
    /// Handshakes refused because the local workload had no certificate.
    pub no_local_certificate: u64,
    /// Any further counters the agent reports, by their JSON name.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl TlsStatus {
    /// Every failure counter summed: rejections, missing certificates and
    /// every other numeric counter except `verified`. Monotonic, so a delta
    /// counts handshakes that failed in between, whatever the reason.
    pub fn failures(&self) -> u64 {
        self.rejected.values().sum::<u64>()
            + self.no_client_certificate
            + self.no_local_certificate
            + self.other.values().map(sum_numbers).sum::<u64>()
    }
}

fn sum_numbers(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::Number(n) => n.as_u64().unwrap_or(0),
        serde_json::Value::Object(m) => m.values().map(sum_numbers).sum(),
        _ => 0,
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConfigStatus {
    pub path: String,
    pub generation: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EbpfStatus {
    pub loaded: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodStatus {
    pub name: String,
    pub namespace: String,
    pub ip: String,
    pub enrolled: bool,
    pub attached: bool,
    pub ebpf: PodEbpf,
    pub proxy: PodProxy,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: Option<String>,
    /// The pod's workload certificate (absent before mTLS).
    pub certificate: Option<CertificateStatus>,
}

/// A pod's workload certificate as the agent holds it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CertificateStatus {
    /// RFC 3339; `None` while the pod has no certificate.
    pub not_after: Option<String>,
    /// As the agent prints it (string or number).
    pub serial: serde_json::Value,
    /// Certificates obtained from the CA so far (first one and rotations).
    pub fetched: u64,
    /// Failed requests to the CA.
    pub errors: u64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodEbpf {
    pub redirected: u64,
    pub passed_through: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PodProxy {
    pub outbound: u64,
    pub outbound_tunneled: u64,
    pub outbound_direct: u64,
    pub inbound: u64,
    pub inbound_plaintext: u64,
    /// Plaintext connections refused because the pod is under STRICT.
    pub inbound_plaintext_refused: u64,
    /// Tunnel connections refused (failed mTLS handshake, bad stream).
    pub inbound_refused: u64,
    /// Client identities verified on tunnel streams delivered to this pod.
    pub inbound_peers: BTreeMap<String, u64>,
    /// Server identities this pod's outbound tunnels verified.
    pub outbound_peers: BTreeMap<String, u64>,
}

/// A pod's counters flattened, so snapshots can be subtracted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// connect() calls redirected to the agent by the eBPF hook.
    pub redirected: u64,
    /// connect() calls the hook saw and left alone.
    pub passed_through: u64,
    /// Connections the agent accepted from the pod (outbound listener).
    pub outbound: u64,
    /// ... relayed through the destination pod's agent (port 15008).
    pub outbound_tunneled: u64,
    /// ... sent straight to a destination outside the mesh.
    pub outbound_direct: u64,
    /// Tunnel connections this agent delivered to the pod.
    pub inbound: u64,
    /// Plaintext connections from outside the mesh captured by `sk_lookup`
    /// on the pod's plaintext listener (15006) and delivered to the pod.
    pub inbound_plaintext: u64,
    /// ... and refused instead, because the pod is under STRICT mTLS.
    pub inbound_plaintext_refused: u64,
}

impl Status {
    pub fn from_value(v: &serde_json::Value) -> Result<Status> {
        Status::deserialize(v).context("agent /status does not match the expected shape")
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodStatus> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }
}

impl PodStatus {
    pub fn counters(&self) -> PodCounters {
        PodCounters {
            redirected: self.ebpf.redirected,
            passed_through: self.ebpf.passed_through,
            outbound: self.proxy.outbound,
            outbound_tunneled: self.proxy.outbound_tunneled,
            outbound_direct: self.proxy.outbound_direct,
            inbound: self.proxy.inbound,
            inbound_plaintext: self.proxy.inbound_plaintext,
            inbound_plaintext_refused: self.proxy.inbound_plaintext_refused,
        }
    }
}

/// `after - before` per key, keeping only keys that grew: the peers seen in
/// between (for `inboundPeers` / `outboundPeers`).
pub fn peers_since(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

impl PodCounters {
    /// `self - before`, per counter (0 if a counter went backwards, e.g.
    /// after an agent restart).
    pub fn since(&self, before: &PodCounters) -> PodCounters {
        PodCounters {
            redirected: self.redirected.saturating_sub(before.redirected),
            passed_through: self.passed_through.saturating_sub(before.passed_through),
            outbound: self.outbound.saturating_sub(before.outbound),
            outbound_tunneled: self
                .outbound_tunneled
                .saturating_sub(before.outbound_tunneled),
            outbound_direct: self.outbound_direct.saturating_sub(before.outbound_direct),
            inbound: self.inbound.saturating_sub(before.inbound),
            inbound_plaintext: self.inbound_plaintext.saturating_sub(before.inbound_plaintext),
            inbound_plaintext_refused: self
                .inbound_plaintext_refused
                .saturating_sub(before.inbound_plaintext_refused),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let v = serde_json::json!({"node":"node-a","ready":true,
            "config":{"path":"/x","generation":2,"accepted":2,"rejected":1,"lastError":null},
            "ebpf":{"loaded":true},
            "pods":[{"name":"shop-client","namespace":"shop","ip":"198.51.100.11","enrolled":true,
                "attached":true,"ebpf":{"redirected":3,"passedThrough":1},
                "proxy":{"outbound":3,"outboundTunneled":2,"outboundDirect":1,"inbound":0}}]});
        let s = Status::from_value(&v).unwrap();
        assert_eq!(s.config.rejected, 1);
        let c = s.pod("shop", "shop-client").unwrap().counters();
        assert_eq!(
            (
                c.redirected,
                c.passed_through,
                c.outbound_tunneled,
                c.outbound_direct
            ),
            (3, 1, 2, 1)
        );
        assert_eq!(c.since(&PodCounters { redirected: 1, ..c }).redirected, 2);
        let p = s.pod("shop", "shop-client").unwrap();
        assert!(p.identity.is_none() && p.certificate.is_none() && s.tls.is_none());
    }

    #[test]
    fn parses_the_mtls_fields() {
        let v = serde_json::json!({"node":"node-b",
            "tls":{"verified":4,"rejected":{"expired":1,"untrusted_root":0},"noClientCertificate":2,
                   "noLocalCertificate":0,"handshakeFailed":3},
            "pods":[{"name":"shop-server","namespace":"shop",
                "identity":"spiffe://cluster.local/ns/shop/sa/shop-server",
                "certificate":{"notAfter":"2030-01-01T00:00:00Z","serial":"0a1b","fetched":3,"errors":1,"lastError":"x"},
                "proxy":{"inbound":2,"inboundPlaintextRefused":1,
                    "inboundPeers":{"spiffe://cluster.local/ns/shop/sa/shop-client":2},"outboundPeers":{}}}]});
        let s = Status::from_value(&v).unwrap();
        let tls = s.tls.as_ref().unwrap();
        assert_eq!((tls.verified, tls.failures()), (4, 6));
        let p = s.pod("shop", "shop-server").unwrap();
        assert_eq!(p.identity.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/shop-server"));
        let c = p.certificate.as_ref().unwrap();
        assert_eq!((c.fetched, c.errors, c.last_error.as_deref()), (3, 1, Some("x")));
        assert_eq!(p.counters().inbound_plaintext_refused, 1);
        let before = BTreeMap::from([("spiffe://cluster.local/ns/shop/sa/shop-client".to_string(), 1)]);
        assert_eq!(peers_since(&p.proxy.inbound_peers, &before).values().sum::<u64>(), 1);
        let null_cert = serde_json::json!({"pods":[{"name":"x","namespace":"y","certificate":{"notAfter":null}}]});
        assert!(Status::from_value(&null_cert).unwrap().pods[0].certificate.as_ref().unwrap().not_after.is_none());
    }
}
