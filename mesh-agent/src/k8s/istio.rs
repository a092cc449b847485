//! Istio's `security.istio.io/v1` and `networking.istio.io/v1` kinds as the watchers store them: the
//! metadata, and the spec as raw JSON so that an object that does not read
//! (an unknown field, a wrong type) is still stored and judged by
//! [`crate::objects`], which can then fail closed on it. The cluster's CRDs
//! are Istio's own; none is generated from these types.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Serialize};

use crate::objects::{istio::SECURITY_GROUP, istio_traffic::NETWORKING_GROUP};

/// The version watched (v1beta1 objects are served as v1 by the API).
pub const VERSION: &str = "v1";

macro_rules! istio_kind {
    ($ty:ident, $group:ident, $kind:literal, $plural:literal) => {
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        pub struct $ty {
            pub metadata: ObjectMeta,
            /// `Null` when absent.
            #[serde(default)]
            pub spec: serde_json::Value,
        }

        impl Resource for $ty {
            type DynamicType = ();
            type Scope = kube::core::NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }
            fn group(_: &()) -> Cow<'_, str> {
                $group.into()
            }
            fn version(_: &()) -> Cow<'_, str> {
                VERSION.into()
            }
            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

istio_kind!(AuthorizationPolicy, SECURITY_GROUP, "AuthorizationPolicy", "authorizationpolicies");
istio_kind!(PeerAuthentication, SECURITY_GROUP, "PeerAuthentication", "peerauthentications");
istio_kind!(VirtualService, NETWORKING_GROUP, "VirtualService", "virtualservices");
istio_kind!(DestinationRule, NETWORKING_GROUP, "DestinationRule", "destinationrules");
