//! The Kubernetes source: the mesh's CRDs, and kube-rs watchers that build
//! the same [`crate::state::MeshState`] the local file does. The only module
//! that imports kube.
//!
//! | module | job |
//! | --- | --- |
//! | [`agents`] | `mesh-agent status --all-nodes`: every agent's `/status` through the API server's pod proxy |
//! | [`crd`] | the status type of the `Accepted` condition; `deploy/crds.yaml` (the mesh ships no CRD of its own any more) is generated from it |
//! | [`istio`] | Istio's `security.istio.io` kinds as stored (raw spec; the CRDs are Istio's) |
//! | [`convert`] | Kubernetes objects to state values (pure; Istio's through [`crate::objects`]) |
//! | [`gateway`] | Gateway API `HTTPRoute` / `GRPCRoute` as kube resources, their route status (`status.parents`) |
//! | [`source`] | watchers + reflectors, the state builder, `/status` numbers |
//! | [`status`] | the `Accepted` condition on the mesh's objects |
//! | [`podpaths`] | a pod's netns and cgroup on a real node, from /proc and the runtime's cgroup layout |
//! | [`tokenreview`] | the CA's check of an agent's projected service-account token |

pub mod agents;
pub mod convert;
pub mod crd;
pub mod gateway;
pub mod istio;
pub mod podpaths;
pub mod source;
pub mod status;
pub mod tokenreview;

#[cfg(test)]
mod deploy_tests;

pub use source::{Options, PodLocator, Stats, start};

/// A client for the cluster the agent runs in (in-cluster service account),
/// or the one `KUBECONFIG` / `~/.kube/config` names.
pub async fn client() -> Result<kube::Client, kube::Error> {
    kube::Client::try_default().await
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--kubeconfig {path}")]
    Kubeconfig { path: std::path::PathBuf, source: kube::config::KubeconfigError },
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("no kubeconfig (--kubeconfig, KUBECONFIG, ~/.kube/config) and not in a cluster")]
    Infer(#[source] Box<kube::config::InferConfigError>),
}

/// A client from a kubeconfig file, or [`client`] without one.
pub async fn client_from(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, ClientError> {
    let Some(path) = kubeconfig else { return Ok(client().await?) };
    Ok(kube::Client::try_from(kubeconfig_config(path).await?)?)
}

/// A client for a one-shot query (`mesh-agent status --all-nodes`): like
/// [`client_from`], without kube-rs's retries of 429/503/504 (up to 15,
/// backing off): an agent that does not answer through the pod proxy is
/// reported at once, not minutes later.
pub async fn query_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, ClientError> {
    let mut config = match kubeconfig {
        Some(path) => kubeconfig_config(path).await?,
        None => kube::Config::infer().await.map_err(|e| ClientError::Infer(Box::new(e)))?,
    };
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

async fn kubeconfig_config(path: &std::path::Path) -> Result<kube::Config, ClientError> {
    let bad = |source| ClientError::Kubeconfig { path: path.to_owned(), source };
    let file = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
    kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default()).await.map_err(bad)
}

/// The ConfigMap key holding the CA's trust bundle.
pub const ROOTS_KEY: &str = "roots.pem";

/// Publishes the CA's trust bundle in a ConfigMap (`namespace/name`), which
/// the agent DaemonSet mounts to verify the CA (server-side apply, so a
/// restart with the same roots changes nothing).
pub async fn publish_roots(client: kube::Client, configmap: &str, pem: &str) -> Result<(), String> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams};
    let (ns, name) = configmap.split_once('/').ok_or_else(|| format!("--roots-configmap {configmap:?} is not NAMESPACE/NAME"))?;
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns},
        "data": {ROOTS_KEY: pem},
    });
    kube::Api::<ConfigMap>::namespaced(client, ns)
        .patch(name, &PatchParams::apply("nodemesh-ca").force(), &Patch::Apply(&cm))
        .await
        .map(|_| ())
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 403 => format!(
                "cannot publish the trust bundle: the CA's service account may not patch configmap {ns}/{name}; grant `get`, `create` and `patch` on configmaps in {ns} (deploy/rbac.yaml). API server said: {}",
                s.message
            ),
            e => format!("cannot publish the trust bundle to configmap {ns}/{name}: {}", crate::error_chain(&e)),
        })
}
