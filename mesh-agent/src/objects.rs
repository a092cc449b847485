//! Kubernetes-shaped objects of the kinds the mesh reads, turned into state
//! values: the one conversion both sources use, the Kubernetes API
//! ([`crate::k8s`]) and the local file ([`crate::localfile`], documents with
//! `apiVersion` and `kind`), so the same YAML means the same thing in a
//! cluster and in the demo. Pure: no I/O, no kube.
//!
//! [`KINDS`] is the table of what is understood, keyed by (group, kind);
//! a new kind is one row and one conversion function.

use std::collections::BTreeMap;

use crate::state;

pub mod istio;
pub mod istio_traffic;

#[cfg(test)]
mod schema_tests;
#[cfg(test)]
mod tests;

/// On an Istio AuthorizationPolicy, `"true"` compares its paths without
/// ASCII case (the compact form's `ignorePathCase`), for backends that route
/// without case: Istio has no such field.
pub const IGNORE_PATH_CASE_ANNOTATION: &str = "nodemesh.io/ignore-path-case";

/// What a conversion needs of an object besides its spec.
#[derive(Clone, Copy, Debug)]
pub struct Meta<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub annotations: &'a BTreeMap<String, String>,
    /// `metadata.creationTimestamp` (RFC 3339), where precedence goes by age.
    pub created: Option<&'a str>,
}

/// The state value an object becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Converted {
    AuthorizationPolicy(state::AuthorizationPolicy),
    PeerAuthentication(state::PeerAuthentication),
    VirtualService(state::traffic::VirtualService),
    DestinationRule(state::traffic::DestinationRule),
}

/// Why an object is refused. `message` names the field from the object's
/// root (`spec.rules[0].to[0].operation.methods[1]: ...`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// One CamelCase word for a status condition: `Invalid` (the object
    /// cannot mean anything), `Unsupported` (it means something this mesh
    /// does not do).
    pub reason: &'static str,
    pub message: String,
    /// What enforces in its place so that refusing it opens nothing: a
    /// DENY (or CUSTOM) policy that cannot be used as written denies more
    /// (see [`istio`]), a STRICT peer authentication stays STRICT. `None`:
    /// the object is simply left out.
    pub stand_in: Option<Box<Converted>>,
}

impl Refused {
    pub(crate) fn invalid(message: String) -> Self {
        Self { reason: "Invalid", message, stand_in: None }
    }

    pub(crate) fn unsupported(message: String) -> Self {
        Self { reason: "Unsupported", message, stand_in: None }
    }
}

/// One kind the mesh understands.
#[derive(Debug)]
pub struct Kind {
    pub group: &'static str,
    /// Versions accepted, the preferred (watched) one first.
    pub versions: &'static [&'static str],
    pub kind: &'static str,
    convert: fn(&Meta<'_>, &serde_json::Value) -> Result<Converted, Refused>,
}

impl Kind {
    /// Converts an object's `spec` (`Null` when absent).
    pub fn convert(&self, meta: &Meta<'_>, spec: &serde_json::Value) -> Result<Converted, Refused> {
        (self.convert)(meta, spec)
    }

    pub fn api_version(&self) -> String {
        format!("{}/{}", self.group, self.versions[0])
    }
}

/// Every kind the mesh reads, by (group, kind).
pub const KINDS: &[Kind] = &[
    // v1beta1 has the same schema as v1 (Istio serves both).
    Kind { group: istio::SECURITY_GROUP, versions: &["v1", "v1beta1"], kind: "AuthorizationPolicy", convert: istio::authorization_policy },
    Kind { group: istio::SECURITY_GROUP, versions: &["v1", "v1beta1"], kind: "PeerAuthentication", convert: istio::peer_authentication },
    // v1alpha3 and v1beta1 have the same schema as v1 (Istio serves all three).
    Kind { group: istio_traffic::NETWORKING_GROUP, versions: &["v1", "v1beta1", "v1alpha3"], kind: "VirtualService", convert: istio_traffic::virtual_service },
    Kind { group: istio_traffic::NETWORKING_GROUP, versions: &["v1", "v1beta1", "v1alpha3"], kind: "DestinationRule", convert: istio_traffic::destination_rule },
];

/// The kind an object's `apiVersion` and `kind` name, or why none.
pub fn find(api_version: &str, kind: &str) -> Result<&'static Kind, String> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let Some(k) = KINDS.iter().find(|k| k.group == group && k.kind == kind) else {
        let known: Vec<String> = KINDS.iter().map(|k| format!("{} {}", k.api_version(), k.kind)).collect();
        return Err(format!("{api_version} {kind} is not a kind the mesh reads (it reads: {})", known.join(", ")));
    };
    if !k.versions.contains(&version) {
        return Err(format!("{kind}: version {version:?} of {group} is not supported (supported: {})", k.versions.join(", ")));
    }
    Ok(k)
}
