//! `mesh-agent status --all-nodes`: every agent of the cluster, read through
//! the API server. The agent pods are found by the DaemonSet's label
//! selector; each one's `/status` is read through the pod proxy subresource
//! (`/api/v1/namespaces/NS/pods/NAME:PORT/proxy/status`), so the operator
//! needs only a kubeconfig (and `get` on `pods/proxy`), no network path to
//! the nodes. The port is the one the pod's own `--metrics` flag names:
//! the admin listener is loopback-only, and the metrics listener serves
//! `/status` (read-only; it holds no secret) next to `/metrics`.

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use crate::status_view::Agent;

/// The agent DaemonSet's namespace and pod label (`deploy/agent.yaml`; a
/// test checks they agree).
pub const NAMESPACE: &str = "nodemesh-system";
pub const SELECTOR: &str = "app.kubernetes.io/name=nodemesh-agent";
/// When a pod's spec names no `--metrics` port.
pub const DEFAULT_PORT: u16 = 15020;
/// How long one agent may take to answer through the proxy.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot list the agent pods ({selector}) in namespace {namespace}: {source}")]
    List { namespace: String, selector: String, source: kube::Error },
    #[error("no agent pods match {selector} in namespace {namespace}: is the mesh installed (kubectl apply -f deploy/install.yaml)?")]
    NoAgents { namespace: String, selector: String },
}

/// Every agent pod matching `selector` in `namespace`, each with its
/// `/status` or the reason it could not be read. `port` overrides the
/// port read from each pod's `--metrics` flag.
pub async fn statuses(client: kube::Client, namespace: &str, selector: &str, port: Option<u16>) -> Result<Vec<Agent>, Error> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|source| Error::List { namespace: namespace.into(), selector: selector.into(), source })?;
    if pods.items.is_empty() {
        return Err(Error::NoAgents { namespace: namespace.into(), selector: selector.into() });
    }
    let reads = pods.items.iter().map(|pod| {
        let client = client.clone();
        async move {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_else(|| "(unscheduled)".into());
            let port = port.unwrap_or_else(|| metrics_port(pod));
            let status = match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some("Running") => read(client, namespace, &name, port).await,
                phase => Err(format!("pod is {}", phase.unwrap_or("Unknown"))),
            };
            Agent { node, pod: name, status }
        }
    });
    Ok(join_all(reads).await)
}

/// `GET .../pods/NAME:PORT/proxy/status`, parsed.
async fn read(client: kube::Client, namespace: &str, name: &str, port: u16) -> Result<serde_json::Value, String> {
    let path = format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy/status");
    let req = http::Request::get(&path).body(Vec::new()).map_err(|e| e.to_string())?;
    let text = match tokio::time::timeout(TIMEOUT, client.request_text(req)).await {
        Err(_) => return Err(format!("no answer within {TIMEOUT:?} through the API server's pod proxy")),
        Ok(Err(kube::Error::Api(s))) if s.code == 403 => {
            return Err(format!("forbidden: the kubeconfig's user may not get pods/proxy in {namespace} ({})", s.message));
        }
        Ok(Err(kube::Error::Api(s))) => return Err(format!("HTTP {}: {}", s.code, s.message)),
        Ok(Err(e)) => return Err(crate::error_chain(&e)),
        Ok(Ok(text)) => text,
    };
    serde_json::from_str(&text).map_err(|e| format!("port {port} did not answer /status with JSON ({e}): is it the agent's --metrics port?"))
}

/// The port of the agent container's `--metrics=ADDR` (or `--metrics ADDR`).
fn metrics_port(pod: &Pod) -> u16 {
    let args = pod.spec.iter().flat_map(|s| &s.containers).flat_map(|c| c.args.iter().flatten());
    let mut prev_flag = false;
    for a in args {
        let value = match a.strip_prefix("--metrics=") {
            Some(v) => Some(v),
            None if prev_flag => Some(a.as_str()),
            None => None,
        };
        prev_flag = a == "--metrics";
        if let Some(port) = value.and_then(|v| v.parse::<std::net::SocketAddr>().ok()) {
            return port.port();
        }
    }
    DEFAULT_PORT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(args: &[&str]) -> Pod {
        serde_json::from_value(serde_json::json!({"spec": {"containers": [{"name": "agent", "args": args}]}})).unwrap()
    }

    #[test]
    fn reads_the_port_of_the_metrics_flag() {
        assert_eq!(metrics_port(&pod(&["run", "--metrics=0.0.0.0:15999"])), 15999);
        assert_eq!(metrics_port(&pod(&["run", "--metrics", "127.0.0.1:4000"])), 4000);
        assert_eq!(metrics_port(&pod(&["run"])), DEFAULT_PORT);
    }

    #[test]
    fn the_selector_is_the_daemonsets() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.yaml");
        let ds: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(ds["metadata"]["namespace"].as_str(), Some(NAMESPACE));
        let (k, v) = SELECTOR.split_once('=').unwrap();
        assert_eq!(ds["spec"]["selector"]["matchLabels"][k].as_str(), Some(v));
        let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].as_sequence().unwrap();
        assert!(args.iter().any(|a| a.as_str() == Some(&format!("--metrics=0.0.0.0:{DEFAULT_PORT}"))));
    }
}
