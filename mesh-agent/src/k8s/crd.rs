//! The mesh's custom resources, group `nodemesh.io`, version `v1alpha1`.
//!
//! The specs reuse the local file's schema types ([`crate::state`] for
//! authorization and peer authentication, [`crate::route`] for routes), so a
//! policy means the same thing whichever source carries it, and the same
//! validation ([`crate::policy::validate`], [`crate::route::validate`])
//! applies. Name and namespace come from the object's metadata.
//!
//! The CRD YAML in `deploy/crds.yaml` is generated from these types
//! (`cargo xtask crds`), and a test fails when it drifts.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    route::{CircuitBreaker, OutlierDetection, RouteRule},
    state::{AuthzAction, AuthzRule, Labels, PeerAuthMode},
};

pub const GROUP: &str = "nodemesh.io";
pub const VERSION: &str = "v1alpha1";

/// Who may do what to the selected workloads: Istio AuthorizationPolicy
/// semantics (ALLOW and DENY, DENY first, default deny once an ALLOW selects
/// a workload).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "nodemesh.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "MeshStatus",
    shortname = "nmauthz",
    category = "nodemesh",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Pod labels of the workloads the policy applies to; omitted: the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    pub action: AuthzAction,
    /// The policy matches when any rule matches; no rules: it matches nothing.
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
    /// Compare paths ASCII case-insensitively.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_path_case: bool,
}

/// Whether the selected workloads accept plaintext from outside the mesh.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "nodemesh.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "MeshStatus",
    shortname = "nmpeerauth",
    category = "nodemesh",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Pod labels of the workloads the policy applies to; omitted: the whole namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    pub mode: PeerAuthMode,
}

/// HTTP routing for one service of the namespace: ordered rules, weighted
/// backends over pod-label subsets, timeouts, retries, circuit breaking and
/// outlier detection. (Our own kind rather than Gateway API HTTPRoute: see
/// the README, "Kubernetes".)
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "nodemesh.io",
    version = "v1alpha1",
    kind = "MeshHTTPRoute",
    plural = "meshhttproutes",
    namespaced,
    status = "MeshStatus",
    shortname = "nmroute",
    category = "nodemesh",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshHTTPRouteSpec {
    /// The service of this namespace whose traffic the route steers.
    pub service: String,
    pub rules: Vec<RouteRule>,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    #[serde(default)]
    pub load_balancer: crate::route::LoadBalancer,
}

/// What the agents report on each object: one `Accepted` condition (True,
/// or False with the reason the object is ignored).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The CRDs, in the order `deploy/crds.yaml` lists them.
pub fn definitions() -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    vec![AuthorizationPolicy::crd(), PeerAuthentication::crd(), MeshHTTPRoute::crd()]
}

/// `deploy/crds.yaml`: every CRD as one multi-document YAML, with a header
/// saying where it comes from.
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Generated by `cargo xtask crds` from mesh-agent/src/k8s/crd.rs: do not edit.\n",
    );
    for crd in definitions() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("a CRD serializes"));
    }
    out
}

/// Labels as the API gives them (`None` for no labels).
pub fn labels(map: &Option<BTreeMap<String, String>>) -> Labels {
    map.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in YAML is exactly what the types generate.
    #[test]
    fn deploy_crds_match_the_types() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds.yaml");
        let checked_in = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask crds`)", path.display()));
        assert!(
            checked_in == crds_yaml(),
            "{} is out of date with mesh-agent/src/k8s/crd.rs: run `cargo xtask crds` and commit the result",
            path.display()
        );
    }

    #[test]
    fn schemas_are_structural() {
        for crd in definitions() {
            let v = serde_json::to_value(&crd).unwrap();
            let text = v.to_string();
            // Kubernetes refuses these in a structural schema.
            assert!(!text.contains("\"additionalProperties\":false"), "{}", crd.spec.names.kind);
            assert!(!text.contains("\"$ref\""), "{}", crd.spec.names.kind);
            assert!(!text.contains("\"oneOf\""), "{}", crd.spec.names.kind);
        }
    }

    #[test]
    fn objects_parse_with_the_local_file_schema() {
        let yaml = r#"
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: shop}
spec:
  selector: {app: server}
  action: ALLOW
  rules:
    - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/client"]}]
      to: [{ports: [9000], methods: [GET]}]
"#;
        let p: AuthorizationPolicy = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(p.spec.action, AuthzAction::Allow);
        let bad = yaml.replace("action: ALLOW", "action: ALLOW\n  colour: blue");
        let e = serde_yaml::from_str::<AuthorizationPolicy>(&bad).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
