//! The agent's local config file (`localfile` source), generated from a
//! testbed. Field names follow the agent's camelCase YAML contract.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::pod::Pod;
use crate::testbed::ServiceSpec;

/// The namespace label that enrols a namespace, and its value.
pub const ENROLL_LABEL: &str = "nodemesh.io/dataplane-mode";
pub const ENROLL_VALUE: &str = "enabled";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    pub nodes: Vec<NodeEntry>,
    pub namespaces: Vec<NamespaceEntry>,
    pub pods: Vec<PodEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_authentications: Vec<PeerAuthenticationEntry>,
}

/// How an enrolled pod treats plaintext from outside the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PeerAuthMode {
    /// Plaintext inbound is refused (reset); only mTLS tunnel streams pass.
    Strict,
    /// Plaintext inbound is accepted (and counted as such). The default.
    Permissive,
}

/// One `peerAuthentications` entry: namespace-wide without a selector, else
/// for the pods whose labels match (a selecting policy beats a
/// namespace-wide one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationEntry {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: PeerAuthMode,
}

impl PeerAuthenticationEntry {
    /// A namespace-wide policy.
    pub fn namespace_wide(name: impl Into<String>, namespace: impl Into<String>, mode: PeerAuthMode) -> Self {
        PeerAuthenticationEntry {
            name: name.into(),
            namespace: namespace.into(),
            selector: None,
            mode,
        }
    }

    /// A policy for the pods labelled `key: value` in `namespace`.
    pub fn selecting(
        name: impl Into<String>,
        namespace: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<String>,
        mode: PeerAuthMode,
    ) -> Self {
        PeerAuthenticationEntry {
            name: name.into(),
            namespace: namespace.into(),
            selector: Some(BTreeMap::from([(key.into(), value.into())])),
            mode,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeEntry {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceEntry {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodEntry {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub service_account: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePortEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortEntry {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
}

impl LocalConfig {
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("config serializes")
    }
}

pub(crate) fn build(
    nodes: &BTreeSet<String>,
    pods: &[Pod],
    services: &[ServiceSpec],
    peer_authentications: &[PeerAuthenticationEntry],
    enrolled: &[&str],
) -> LocalConfig {
    // Every namespace mentioned anywhere, so enrolling an empty one works.
    let namespaces: BTreeSet<&str> = pods
        .iter()
        .map(|p| p.namespace())
        .chain(services.iter().map(|s| s.namespace.as_str()))
        .chain(peer_authentications.iter().map(|p| p.namespace.as_str()))
        .chain(enrolled.iter().copied())
        .collect();
    LocalConfig {
        trust_domain: None,
        nodes: nodes
            .iter()
            .map(|n| NodeEntry { name: n.clone() })
            .collect(),
        namespaces: namespaces
            .into_iter()
            .map(|ns| NamespaceEntry {
                name: ns.to_string(),
                labels: if enrolled.contains(&ns) {
                    BTreeMap::from([(ENROLL_LABEL.to_string(), ENROLL_VALUE.to_string())])
                } else {
                    BTreeMap::new()
                },
            })
            .collect(),
        pods: pods
            .iter()
            .map(|p| PodEntry {
                name: p.name().to_string(),
                namespace: p.namespace().to_string(),
                node: p.node().to_string(),
                service_account: p.spec().service_account.clone(),
                ip: p.ip(),
                labels: p.spec().labels.clone(),
                netns: p.netns_path(),
                cgroup: p.cgroup_path().to_path_buf(),
            })
            .collect(),
        services: services
            .iter()
            .map(|s| ServiceEntry {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                ip: s.ip,
                selector: s.selector.clone(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServicePortEntry {
                        name: p.name.clone(),
                        port: p.port,
                        target_port: p.target_port,
                    })
                    .collect(),
            })
            .collect(),
        peer_authentications: peer_authentications.to_vec(),
    }
}

/// Write to a sibling temp file, fsync, rename: readers see the old or the
/// new file, never a torn one.
pub fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path.file_name().context("config path has no file name")?;
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{n}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
