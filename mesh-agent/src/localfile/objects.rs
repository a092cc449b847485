//! Kubernetes-shaped objects in the local file: the file is a YAML stream,
//! and a document with `apiVersion` and `kind` is an object in the shape
//! the cluster takes (the same YAML works in the demo and in a cluster).
//! Each is dispatched by (API group, kind) through [`KINDS`], the one table
//! a new kind is added to; the one document without `apiVersion` and
//! `kind` is the mesh file itself (nodes, namespaces, pods, services, ...).

use serde::Deserialize;

use crate::route::gateway::api;

/// The objects of a file, by kind, in file order.
#[derive(Debug, Default)]
pub struct Objects {
    pub http_routes: Vec<Object<api::HttpRouteSpec>>,
    pub grpc_routes: Vec<Object<api::GrpcRouteSpec>>,
}

/// One object: where it is in the file (for messages), its metadata and spec.
#[derive(Debug)]
pub struct Object<S> {
    /// `documents[3] (HTTPRoute shop/web)`: the message's location.
    pub at: String,
    pub metadata: Metadata,
    pub spec: S,
}

/// What the mesh reads of `metadata`; the rest (labels, annotations, ...)
/// is accepted and ignored, as the cluster's own fields would be.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    pub namespace: Option<String>,
    /// RFC 3339; orders routes of equal precedence (oldest first).
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// A document that is a Kubernetes object, as read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: serde_yaml::Value,
    /// Ignored: a status in the file is nobody's report.
    #[serde(default)]
    #[allow(dead_code)]
    status: serde_yaml::Value,
}

type Handler = fn(&mut Objects, String, Metadata, serde_yaml::Value) -> Result<(), String>;

/// Every kind the file accepts: (API group, kind, versions, handler).
const KINDS: &[(&str, &str, &[&str], Handler)] = &[
    (api::GROUP, "HTTPRoute", &["v1"], |o, at, m, spec| {
        o.http_routes.push(Object { at, metadata: m, spec: spec_of(spec)? });
        Ok(())
    }),
    (api::GROUP, "GRPCRoute", &["v1"], |o, at, m, spec| {
        o.grpc_routes.push(Object { at, metadata: m, spec: spec_of(spec)? });
        Ok(())
    }),
];

fn spec_of<S: serde::de::DeserializeOwned>(v: serde_yaml::Value) -> Result<S, String> {
    serde_yaml::from_value(v).map_err(|e| format!("spec: {e}"))
}

/// The kinds of [`KINDS`], as `group/version Kind`, for messages.
pub fn kinds() -> Vec<String> {
    KINDS.iter().flat_map(|(g, k, versions, _)| versions.iter().map(move |v| format!("{g}/{v} {k}"))).collect()
}

/// Adds document number `index` (a Kubernetes object) to `objects`.
/// Errors name the document and the field.
pub fn add(objects: &mut Objects, index: usize, doc: serde_yaml::Value) -> Result<(), (String, String)> {
    let doc: Document = serde_yaml::from_value(doc).map_err(|e| (format!("documents[{index}]"), e.to_string()))?;
    let (group, version) = doc.api_version.rsplit_once('/').unwrap_or(("", doc.api_version.as_str()));
    let ns = doc.metadata.namespace.clone().unwrap_or_default();
    let at = format!("documents[{index}] ({} {ns}/{})", doc.kind, doc.metadata.name);
    let Some((_, _, versions, handler)) = KINDS.iter().find(|(g, k, _, _)| *g == group && *k == doc.kind) else {
        let known: Vec<String> = KINDS.iter().map(|(g, k, _, _)| format!("{k}.{g}")).collect();
        return Err((format!("documents[{index}].kind"), format!("{} of {:?} is not a kind the mesh reads here (it reads {})", doc.kind, doc.api_version, known.join(", "))));
    };
    if !versions.contains(&version) {
        return Err((format!("{at}.apiVersion"), format!("{:?}: the mesh reads {group}/{}", doc.api_version, versions.join(", "))));
    }
    if doc.metadata.namespace.as_deref().is_none_or(str::is_empty) {
        return Err((format!("{at}.metadata.namespace"), "an object in the file names its namespace".into()));
    }
    handler(objects, at.clone(), doc.metadata, doc.spec).map_err(|e| match e.split_once(": ") {
        Some((field, reason)) => (format!("{at}.{field}"), reason.to_owned()),
        None => (at, e),
    })
}
