//! Typed view of the agent's `GET /status`. Lenient on purpose (defaults
//! for missing fields, unknown fields ignored): tests assert on the values
//! they care about, not on the exact shape of the whole document.

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
        }
    }
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
    }
}
