//! [`Cluster`]: Gateway API's mesh conformance base, `manifests.yaml`,
//! applied to the test API server ([`crate::kubeapi`]) with real pods of the
//! namespaced harness and real agents (`--source kube`, eBPF) on two nodes.
//!
//! The harness plays the parts of a cluster that are not the API server:
//!
//! | part | what it does here |
//! | --- | --- |
//! | the suite's namespace labels | the manifest's Namespaces get the enrollment label (`nodemesh.io/dataplane-mode=enabled`) as upstream's `--namespace-labels` adds a mesh's label |
//! | the Service IP allocator | a Service without `clusterIP` gets the next free address of `198.51.100.100`.. |
//! | the Deployment controller, scheduler, kubelet | each Deployment's template becomes `replicas` (default 1) harness pods with the template's labels, on `node-a` and `node-b` in turn, each running the echo app ([`crate::meshecho_bin`]) on every `containerPort`; published as Pod objects (`spec.nodeName`, `status.podIP`, phase Running, the UID the pod's cgroup is named after) |
//! | the EndpointSlice controller | one slice per Service with a selector: the selected pods, ready, and the Service's ports resolved to target ports |
//!
//! Everything else of the file is applied as it is. A case's route file is
//! applied verbatim with [`Cluster::apply_file`]; [`Cluster::wait_accepted`]
//! waits for every route's `status.parents` to say `Accepted`. Requests go
//! from a pod through the mesh with [`Cluster::send`]: names are resolved as
//! cluster DNS would (`echo`, `echo-v1.gateway-conformance-mesh`,
//! `echo-v2:8080`, `IP:PORT`) and the `Host` is the name as written.
//!
//! Each cluster has its own API server, testbed (fabric netns, pod netns,
//! cgroups), CA and agents, so tests using one each run in parallel; pod
//! UIDs carry the test process's id and a counter, since agents find pods
//! by UID across the whole host.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{Agent, Ca, ENROLL_LABEL, ENROLL_VALUE, Pod, PodProcess, PodSpec, Testbed, kubeapi::ApiServer, wait_until};

/// How long the cluster may take to converge (enrollment, route status,
/// a route in force).
pub const SETTLE: Duration = Duration::from_secs(30);

const NODES: [&str; 2] = ["node-a", "node-b"];

static CLUSTERS: AtomicU64 = AtomicU64::new(0);

/// One replica of a Deployment: a harness pod running the echo app.
pub struct EchoPod {
    /// The Kubernetes name (`<deployment>-<hash>-<n>`), which the echo app reports.
    pub name: String,
    pub namespace: String,
    pub deployment: String,
    pub pod: Pod,
    _echo: PodProcess,
}

/// What one request answered ([`Cluster::send`]).
#[derive(Clone, Debug)]
pub struct Answer {
    /// `0`: the request failed (see `error`).
    pub status: u16,
    /// Response headers, lower-case names.
    pub headers: BTreeMap<String, Vec<String>>,
    /// The echo app's JSON (pod, namespace, method, path, host, proto,
    /// headers), or the body as a string.
    pub body: Value,
    pub grpc_status: Option<String>,
    pub error: Option<String>,
}

impl Answer {
    /// A response header's values joined with `,`.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(&name.to_ascii_lowercase()).map(|v| v.join(","))
    }

    /// A request header the backend saw, its values joined with `,`.
    pub fn seen_header(&self, name: &str) -> Option<String> {
        let hs = self.body.get("headers")?.as_object()?;
        let vals: Vec<&str> = hs
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.as_array().into_iter().flatten().filter_map(Value::as_str))
            .collect();
        (!vals.is_empty()).then(|| vals.join(","))
    }

    /// The pod that answered (the echo app's `pod`).
    pub fn pod(&self) -> Option<&str> {
        self.body.get("pod").and_then(Value::as_str)
    }
}

/// A request from a pod ([`Cluster::send`]).
#[derive(Clone, Debug)]
pub struct Request {
    /// As the client would write it in a URL: `echo`, `echo-v1:8080`,
    /// `echo-v1.gateway-conformance-mesh`, `198.51.100.12:8080`.
    pub host: String,
    pub method: String,
    /// With the query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// One unary gRPC call (h2c) instead of an HTTP/1.1 request.
    pub grpc: bool,
}

pub struct Cluster {
    pub api: ApiServer,
    pub agents: Vec<Agent>,
    pub pods: Vec<EchoPod>,
    /// `(namespace, name)` -> cluster IP.
    pub services: BTreeMap<(String, String), Ipv4Addr>,
    _ca: Ca,
    // Dropped after the API server (which runs on it) and the processes.
    _rt: tokio::runtime::Runtime,
    pub tb: Testbed,
}

fn docs(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(d).context("parsing a YAML document")?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

impl Cluster {
    /// Applies `manifests` (the conformance base) and starts the agents;
    /// returns once every pod is enrolled with its certificate.
    pub fn start(test: &str, manifests: &Path) -> Result<Cluster> {
        Self::start_with(test, manifests, None)
    }

    /// [`Self::start`] with every Deployment at `replicas` pods instead of
    /// its `spec.replicas`.
    pub fn start_with(test: &str, manifests: &Path, replicas: Option<u64>) -> Result<Cluster> {
        let text = std::fs::read_to_string(manifests).with_context(|| format!("reading {}", manifests.display()))?;
        let objects = docs(&text)?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let api = rt.block_on(ApiServer::start())?;
        let mut tb = Testbed::new(test)?;
        let cluster_n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let mut services = BTreeMap::new();
        let mut pods = Vec::new();
        let mut next_service_ip = 100u8;
        // Pods' k8s names by harness pod name, for the CA's file.
        let mut k8s_names = BTreeMap::new();
        // The Services as applied, and each pod's labels.
        let mut service_objs = Vec::new();
        let mut pod_labels = Vec::new();
        for mut obj in objects {
            let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
            match kind.as_str() {
                "Namespace" => {
                    obj["metadata"]["labels"][ENROLL_LABEL] = ENROLL_VALUE.into();
                    api.apply_json(obj)?;
                }
                "Service" => {
                    let key = (
                        obj["metadata"]["namespace"].as_str().unwrap_or("default").to_owned(),
                        obj["metadata"]["name"].as_str().context("Service without a name")?.to_owned(),
                    );
                    let ip = match obj["spec"]["clusterIP"].as_str() {
                        Some(ip) => ip.parse().with_context(|| format!("Service {key:?}: clusterIP {ip}"))?,
                        None => {
                            let ip = Ipv4Addr::new(198, 51, 100, next_service_ip);
                            next_service_ip += 1;
                            obj["spec"]["clusterIP"] = ip.to_string().into();
                            obj["spec"]["clusterIPs"] = json!([ip.to_string()]);
                            ip
                        }
                    };
                    obj["spec"]["type"] = obj["spec"]["type"].as_str().unwrap_or("ClusterIP").into();
                    api.apply_json(obj.clone())?;
                    services.insert(key, ip);
                    service_objs.push(obj);
                }
                "Deployment" => {
                    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default").to_owned();
                    let deployment = obj["metadata"]["name"].as_str().context("Deployment without a name")?.to_owned();
                    let template = &obj["spec"]["template"];
                    let labels: BTreeMap<String, String> =
                        serde_json::from_value(template["metadata"]["labels"].clone()).unwrap_or_default();
                    let ports: Vec<u16> = template["spec"]["containers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                        .filter_map(|p| p["containerPort"].as_u64().and_then(|n| u16::try_from(n).ok()))
                        .collect();
                    ensure!(!ports.is_empty(), "Deployment {ns}/{deployment}: no containerPort to serve");
                    let replicas = replicas.or(obj["spec"]["replicas"].as_u64()).unwrap_or(1);
                    for r in 0..replicas {
                        let i = pods.len();
                        let uid = format!("{:08x}-{:04x}-4000-8000-{:012x}", std::process::id(), cluster_n & 0xffff, i);
                        let name = format!("{deployment}-6d5f8c9b7-{r}");
                        let node = NODES[i % NODES.len()];
                        let ip = Ipv4Addr::new(198, 51, 100, 11 + u8::try_from(i)?);
                        let harness_name = format!("pod{uid}");
                        let pod = tb.add_pod(PodSpec::new(harness_name.clone(), ns.clone(), node, ip).labels(labels.clone()))?;
                        let mut args = vec!["serve".to_string(), "--pod".into(), name.clone(), "--namespace".into(), ns.clone()];
                        for p in &ports {
                            args.extend(["--port".to_string(), p.to_string()]);
                        }
                        let echo = pod.spawn("meshecho", &args)?;
                        echo.wait_for_stdout(Duration::from_secs(10), |l| l.contains("\"listening\""))
                            .with_context(|| format!("echo app in pod {name}: {}", echo.stderr()))?;
                        let mut spec = template["spec"].clone();
                        spec["nodeName"] = node.into();
                        spec["serviceAccountName"] = "default".into();
                        api.apply_json(json!({
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "metadata": { "name": name, "namespace": ns, "uid": uid, "labels": labels },
                            "spec": spec,
                            "status": {
                                "phase": "Running",
                                "podIP": ip.to_string(),
                                "podIPs": [{ "ip": ip.to_string() }],
                                "conditions": [{ "type": "Ready", "status": "True" }],
                            },
                        }))?;
                        k8s_names.insert(harness_name, name.clone());
                        pod_labels.push(labels.clone());
                        pods.push(EchoPod { name, namespace: ns.clone(), deployment: deployment.clone(), pod, _echo: echo });
                    }
                }
                other => bail!("{}: kind {other} is not part of the conformance base this harness knows", manifests.display()),
            }
        }
        // The EndpointSlice controller: one slice per Service with a
        // selector, its ready endpoints the pods it selects.
        for kind_obj in &service_objs {
            let (ns, svc) = (kind_obj["metadata"]["namespace"].as_str().unwrap_or("default"), kind_obj["metadata"]["name"].as_str().unwrap_or_default());
            let Some(selector) = kind_obj["spec"]["selector"].as_object() else { continue };
            let endpoints: Vec<Value> = pods
                .iter()
                .zip(&pod_labels)
                .filter(|(p, labels)| {
                    p.namespace == ns && selector.iter().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
                })
                .map(|(p, _)| {
                    json!({
                        "addresses": [p.pod.ip().to_string()],
                        "conditions": { "ready": true, "serving": true, "terminating": false },
                        "nodeName": p.pod.node(),
                        "targetRef": { "kind": "Pod", "namespace": p.namespace, "name": p.name },
                    })
                })
                .collect();
            let ports: Vec<Value> = kind_obj["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|sp| {
                    let target = sp["targetPort"].as_u64().or_else(|| sp["port"].as_u64());
                    let mut port = json!({ "name": sp["name"], "port": target, "protocol": "TCP" });
                    if let Some(ap) = sp["appProtocol"].as_str() {
                        port["appProtocol"] = ap.into();
                    }
                    port
                })
                .collect();
            api.apply_json(json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": { "name": format!("{svc}-8x2kq"), "namespace": ns, "labels": { "kubernetes.io/service-name": svc } },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": ports,
            }))?;
        }
        // The CA (file mode) authorizes certificates by pod name, namespace
        // and node: its file names the pods as the API does.
        let mut config = tb.config(&[]);
        for p in &mut config.pods {
            if let Some(n) = k8s_names.get(&p.name) {
                p.name = n.clone();
            }
        }
        std::fs::write(tb.config_path(), serde_yaml::to_string(&config)?)?;
        let ca = tb.start_ca()?;
        let kubeconfig = tb.dir().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig())?;
        let kubeconfig = kubeconfig.to_str().context("utf-8 path")?.to_owned();
        let args = ["--source", "kube", "--kubeconfig", &kubeconfig, "--reconcile-interval", "500ms", "--drain-timeout", "2s"];
        // One after the other from this thread: an agent dies with the
        // thread that spawned it (parent-death signal).
        let agents = NODES.iter().map(|n| tb.start_agent_args(n, &args)).collect::<Result<Vec<_>>>()?;
        let c = Cluster { api, agents, pods, services, _ca: ca, _rt: rt, tb };
        for p in &c.pods {
            let agent = c.agent_of(p);
            wait_until(SETTLE, || {
                let s = agent.status()?;
                let e = s["pods"].as_array().and_then(|ps| ps.iter().find(|e| e["namespace"] == p.namespace && e["name"] == p.name).cloned());
                Ok(e.is_some_and(|e| {
                    e["enrolled"] == true && e["attached"] == true && e["error"].is_null() && e["certificate"]["notAfter"].is_string()
                }))
            })
            .with_context(|| format!("{}/{} never enrolled on {}: {}", p.namespace, p.name, agent.node(), agent.log()))?;
        }
        Ok(c)
    }

    pub fn agent_of(&self, p: &EchoPod) -> &Agent {
        self.agents.iter().find(|a| a.node() == p.pod.node()).expect("every pod is on a node with an agent")
    }

    /// The first pod of `deployment` in `namespace` (upstream's
    /// `ConnectToApp`: the client runs in an echo pod).
    pub fn pod(&self, namespace: &str, deployment: &str) -> Result<&EchoPod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.deployment == deployment)
            .with_context(|| format!("no pod of {namespace}/{deployment}"))
    }

    /// Applies every object of a route file as it is; returns `(kind,
    /// namespace, name)` of each.
    pub fn apply_file(&self, path: &Path) -> Result<Vec<(String, String, String)>> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut out = Vec::new();
        for mut obj in docs(&text)? {
            // As `kubectl apply` in the `default` namespace.
            if obj["metadata"]["namespace"].as_str().is_none_or(str::is_empty) {
                obj["metadata"]["namespace"] = "default".into();
            }
            let id = (
                obj["kind"].as_str().unwrap_or_default().to_owned(),
                obj["metadata"]["namespace"].as_str().unwrap_or("default").to_owned(),
                obj["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            );
            self.api.apply_json(obj)?;
            out.push(id);
        }
        Ok(out)
    }

    /// Waits until every route's `status.parents` has an entry with
    /// `Accepted: True` for each of its `parentRefs`; returns the routes'
    /// statuses.
    pub fn wait_accepted(&self, routes: &[(String, String, String)]) -> Result<Vec<Value>> {
        let mut last = Vec::new();
        wait_until(SETTLE, || {
            last.clear();
            let mut all = true;
            for (kind, ns, name) in routes {
                let obj = self.api.get(kind, ns, name).with_context(|| format!("{kind} {ns}/{name} is gone"))?;
                let refs = obj["spec"]["parentRefs"].as_array().map_or(0, Vec::len);
                let accepted = obj["status"]["parents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| {
                        p["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Accepted" && c["status"] == "True")
                    })
                    .count();
                all &= accepted >= refs && refs > 0;
                last.push(obj["status"].clone());
            }
            Ok(all)
        })
        .with_context(|| format!("routes {routes:?} never Accepted: {last:?}"))?;
        Ok(last)
    }

    /// Where a client in `from_ns` connects for `host` (cluster DNS: a
    /// Service name, optionally `.namespace[.svc...]`, or an IP; port 80
    /// unless given).
    pub fn resolve(&self, from_ns: &str, host: &str) -> Result<SocketAddr> {
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) => (n, p.parse::<u16>().with_context(|| format!("port of {host}"))?),
            None => (host, 80),
        };
        if let Ok(ip) = name.parse::<Ipv4Addr>() {
            return Ok((ip, port).into());
        }
        let name = name.trim_end_matches(".cluster.local").trim_end_matches(".svc");
        let (svc, ns) = name.split_once('.').unwrap_or((name, from_ns));
        let ip = self.services.get(&(ns.to_owned(), svc.to_owned())).with_context(|| format!("no Service {ns}/{svc} for {host}"))?;
        Ok((*ip, port).into())
    }

    /// Sends `reqs` in order from `from` (the echo app's client, in the
    /// pod, through its agent): one answer per request.
    pub fn send(&self, from: &EchoPod, reqs: &[Request]) -> Result<Vec<Answer>> {
        let mut batch = Vec::new();
        for r in reqs {
            batch.push(json!({
                "to": self.resolve(&from.namespace, &r.host)?.to_string(),
                "host": r.host,
                "method": r.method,
                "path": r.path,
                "headers": r.headers,
                "grpc": r.grpc,
            }));
        }
        let batch = Value::Array(batch).to_string();
        let out = from.pod.run("meshecho", ["request", "--batch", batch.as_str()])?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "meshecho request in {}: {} {}", from.name, stdout, String::from_utf8_lossy(&out.stderr));
        let answers: Vec<Value> = serde_json::from_str(stdout.trim()).with_context(|| format!("meshecho printed {stdout}"))?;
        Ok(answers
            .into_iter()
            .map(|a| Answer {
                status: a["status"].as_u64().and_then(|s| u16::try_from(s).ok()).unwrap_or(0),
                headers: serde_json::from_value(a["headers"].clone()).unwrap_or_default(),
                grpc_status: a["grpcStatus"].as_str().map(str::to_owned),
                error: a["error"].as_str().map(str::to_owned),
                body: a["body"].clone(),
            })
            .collect())
    }

    /// The agents' logs, for a failure message.
    pub fn logs(&self) -> String {
        self.agents.iter().map(|a| format!("--- {} ---\n{}", a.node(), a.log())).collect()
    }
}
