//! The Kubernetes source: the mesh's CRDs, and kube-rs watchers that build
//! the same [`crate::state::MeshState`] the local file does. The only module
//! that imports kube.
//!
//! | module | job |
//! | --- | --- |
//! | [`crd`] | the custom resources as Rust types; `deploy/crds.yaml` is generated from them |

pub mod crd;
