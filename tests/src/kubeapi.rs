//! [`ApiServer`]: a Kubernetes API server for tests, in-process on loopback.
//!
//! It speaks the real list/watch protocol to real clients (kube-rs) with real
//! object JSON (objects are given as k8s-openapi values or raw JSON):
//!
//! - one global `resourceVersion` counter; every write gets the next value,
//!   lists carry the current one in `metadata.resourceVersion`;
//! - `?watch=true&resourceVersion=N` replays every change after N, then
//!   streams new ones as newline-delimited `WatchEvent`s; an object that
//!   starts or stops matching the watch's selectors arrives as `ADDED` or
//!   `DELETED`, as the real server does;
//! - `allowWatchBookmarks=true` gets `BOOKMARK` events carrying the current
//!   resourceVersion (after the replay and whenever the stream is idle);
//! - [`ApiServer::compact`] forgets history: a watch from an older
//!   resourceVersion gets an `ERROR` event with a `410 Gone` (Expired)
//!   status, which makes clients relist;
//! - [`ApiServer::drop_watches`] ends every open watch stream (clients
//!   resume from their last resourceVersion); `timeoutSeconds` ends one too;
//! - `fieldSelector` (`a.b=v`, `a.b!=v`, comma-separated) and
//!   `labelSelector` (`k=v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`);
//! - [`ApiServer::deny`] makes a verb on a resource answer `403 Forbidden`
//!   with the real server's message shape;
//! - [`ApiServer::set_down`] refuses every request and ends the watches, as
//!   an unreachable API server would look to a client;
//! - merge-patch on the `status` subresource (what the agents write),
//!   and `TokenReview` answered from tokens registered by the test;
//! - GET on the pod proxy subresource, relayed to loopback pod IPs ([`proxy`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, service::service_fn};
use serde_json::{Value, json};
use tokio::sync::broadcast;

mod proxy;
mod select;

/// The kinds the server knows: `(kind, group, version, plural, namespaced)`.
const KINDS: &[(&str, &str, &str, &str, bool)] = &[
    ("Namespace", "", "v1", "namespaces", false),
    ("Pod", "", "v1", "pods", true),
    ("Service", "", "v1", "services", true),
    ("ServiceAccount", "", "v1", "serviceaccounts", true),
    ("ConfigMap", "", "v1", "configmaps", true),
    ("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", true),
    ("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies", true),
    ("PeerAuthentication", "security.istio.io", "v1", "peerauthentications", true),
    ("VirtualService", "networking.istio.io", "v1", "virtualservices", true),
    ("DestinationRule", "networking.istio.io", "v1", "destinationrules", true),
    ("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes", true),
    ("GRPCRoute", "gateway.networking.k8s.io", "v1", "grpcroutes", true),
];

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: &'static str,
    old: Option<Value>,
    /// `None`: deleted (then `old` is the last version).
    new: Option<Value>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// plural -> (namespace, name) -> object
    objects: HashMap<&'static str, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    /// Changes at or below this were compacted away.
    compacted: u64,
    denied: HashSet<(String, String)>,
    /// Resources (plurals) the server does not have, as without their CRD.
    uninstalled: HashSet<String>,
    down: bool,
    tokens: HashMap<String, Value>,
    /// Requests seen, `VERB path?query`, for tests that check what a client did.
    requests: Vec<String>,
    uid_seq: u64,
    /// Open client connections, closed by `set_down`.
    connections: Vec<tokio::task::AbortHandle>,
}

/// A test API server; dropped, it stops.
pub struct ApiServer {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Change>,
    /// Each send ends every open watch.
    cut: broadcast::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

impl ApiServer {
    /// Listens on an ephemeral loopback port. Must run inside a tokio runtime.
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the test API server")?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner::default()));
        let (events, _) = broadcast::channel(4096);
        let (cut, _) = broadcast::channel(16);
        let ctx = Ctx { inner: inner.clone(), events: events.clone(), cut: cut.clone() };
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let ctx = ctx.clone();
                if ctx.inner.lock().expect("poisoned").down {
                    drop(stream); // connection reset: the API is unreachable
                    continue;
                }
                let conns = ctx.inner.clone();
                let task = tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let ctx = ctx.clone();
                        async move { Ok::<_, Infallible>(ctx.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
                let mut g = conns.lock().expect("poisoned");
                g.connections.retain(|c| !c.is_finished());
                g.connections.push(task.abort_handle());
            }
        });
        Ok(Self { addr, inner, events, cut, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig pointing at this server, for a client in another process.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_with_ca(None)
    }

    /// Like [`Self::kubeconfig`], naming a cluster CA file as a real one does
    /// (plain HTTP never uses it; without one kube-rs builds its TLS roots
    /// from the system's, which an image may lack).
    pub fn kubeconfig_with_ca(&self, ca_file: Option<&str>) -> String {
        let ca = ca_file.map(|f| format!(", certificate-authority: \"{f}\"")).unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: test, cluster: {{server: \"{}\"{ca}}}}}]\n\
             users: [{{name: test, user: {{token: test-token}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\ncurrent-context: test\n",
            self.url()
        )
    }

    /// Creates or replaces an object given as a k8s-openapi value.
    pub fn apply<T: serde::Serialize + k8s_openapi::Resource>(&self, obj: &T) -> Result<Value> {
        let mut v = serde_json::to_value(obj)?;
        v["apiVersion"] = T::API_VERSION.into();
        v["kind"] = T::KIND.into();
        self.apply_json(v)
    }

    /// Creates or replaces an object given as JSON (`apiVersion`, `kind`,
    /// `metadata.name` and, for namespaced kinds, `metadata.namespace`
    /// required). The body is stored as given: also objects the real server's
    /// validation would refuse, to test what clients do with them.
    pub fn apply_json(&self, mut v: Value) -> Result<Value> {
        let kind = v["kind"].as_str().context("object without kind")?.to_owned();
        let &(_, _, _, plural, namespaced) = KINDS.iter().find(|k| k.0 == kind).with_context(|| format!("unknown kind {kind}"))?;
        let name = v["metadata"]["name"].as_str().context("object without metadata.name")?.to_owned();
        let ns = v["metadata"]["namespace"].as_str().unwrap_or_default().to_owned();
        if namespaced && ns.is_empty() {
            bail!("{kind} {name}: metadata.namespace is required");
        }
        let mut g = self.inner.lock().expect("poisoned");
        g.rv += 1;
        let rv = g.rv;
        let old = g.objects.get(plural).and_then(|m| m.get(&(ns.clone(), name.clone()))).cloned();
        let spec_changed = old.as_ref().is_some_and(|o| o.get("spec") != v.get("spec"));
        let meta = &mut v["metadata"];
        meta["resourceVersion"] = rv.to_string().into();
        match &old {
            Some(o) => {
                meta["uid"] = o["metadata"]["uid"].clone();
                meta["creationTimestamp"] = o["metadata"]["creationTimestamp"].clone();
                let generation = o["metadata"]["generation"].as_i64().unwrap_or(1);
                meta["generation"] = (if spec_changed { generation + 1 } else { generation }).into();
                if v.get("status").is_none() && o.get("status").is_some() {
                    v["status"] = o["status"].clone();
                }
            }
            None => {
                g.uid_seq += 1;
                // A UID the test chose (to name a pod's cgroup after it) is kept.
                if !meta["uid"].is_string() {
                    meta["uid"] = format!("00000000-0000-4000-8000-{:012x}", g.uid_seq).into();
                }
                // Seconds are all the real server keeps; the sequence keeps creation order.
                meta["creationTimestamp"] = format!("2026-01-01T00:{:02}:{:02}Z", (g.uid_seq / 60) % 60, g.uid_seq % 60).into();
                meta["generation"] = 1.into();
            }
        }
        g.objects.entry(plural).or_default().insert((ns, name), v.clone());
        let change = Change { rv, plural, old, new: Some(v.clone()) };
        g.history.push(change.clone());
        let _ = self.events.send(change);
        Ok(v)
    }

    /// Deletes an object; false if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<bool> {
        let &(_, _, _, plural, _) = KINDS.iter().find(|k| k.0 == kind).with_context(|| format!("unknown kind {kind}"))?;
        let mut g = self.inner.lock().expect("poisoned");
        let Some(mut old) = g.objects.get_mut(plural).and_then(|m| m.remove(&(namespace.to_owned(), name.to_owned()))) else {
            return Ok(false);
        };
        g.rv += 1;
        let rv = g.rv;
        old["metadata"]["resourceVersion"] = rv.to_string().into();
        let change = Change { rv, plural, old: Some(old), new: None };
        g.history.push(change.clone());
        let _ = self.events.send(change);
        Ok(true)
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let &(_, _, _, plural, _) = KINDS.iter().find(|k| k.0 == kind)?;
        let g = self.inner.lock().expect("poisoned");
        g.objects.get(plural)?.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Forgets all history: a watch from any resourceVersion handed out so
    /// far gets `410 Gone` (also one that was up to date, as when the real
    /// server's watch cache has moved on), so clients must relist.
    pub fn compact(&self) {
        let mut g = self.inner.lock().expect("poisoned");
        g.rv += 1;
        g.compacted = g.rv;
        g.history.clear();
    }

    /// Ends every open watch stream.
    pub fn drop_watches(&self) {
        let _ = self.cut.send(());
    }

    /// While down, every open connection is closed and new ones are closed
    /// as soon as they are accepted: what a client sees of an unreachable
    /// API server. (A 503 would not do: clients retry those internally.)
    pub fn set_down(&self, down: bool) {
        let mut g = self.inner.lock().expect("poisoned");
        g.down = down;
        if down {
            for c in g.connections.drain(..) {
                c.abort();
            }
            let _ = self.cut.send(());
        }
    }

    /// `verb` (`list`, `watch`, `patch`, `create`, ...) on `resource`
    /// (plural, `pods/status` for a subresource) answers 403.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.inner.lock().expect("poisoned").denied.insert((verb.into(), resource.into()));
    }

    /// Every request for `resource` (a plural) answers 404, as when its
    /// CRD is not installed; `install` undoes it.
    pub fn uninstall(&self, resource: &str) {
        self.inner.lock().expect("poisoned").uninstalled.insert(resource.into());
    }

    pub fn install(&self, resource: &str) {
        self.inner.lock().expect("poisoned").uninstalled.remove(resource);
    }

    pub fn allow(&self, verb: &str, resource: &str) {
        self.inner.lock().expect("poisoned").denied.remove(&(verb.to_owned(), resource.to_owned()));
    }

    /// A TokenReview of `token` answers `status` (e.g.
    /// `{"authenticated": true, "user": {...}}`); unknown tokens are not
    /// authenticated.
    pub fn set_token(&self, token: &str, status: Value) {
        self.inner.lock().expect("poisoned").tokens.insert(token.into(), status);
    }

    /// The requests seen so far (`GET /api/v1/pods?watch=true&...`).
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().expect("poisoned").requests.clone()
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().expect("poisoned").rv
    }
}

#[derive(Clone)]
struct Ctx {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Change>,
    cut: broadcast::Sender<()>,
}

/// A parsed request path.
struct Target {
    kind: &'static (&'static str, &'static str, &'static str, &'static str, bool),
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, r, more @ ..] => (Some(ns.to_string()), [&[*r][..], more].concat()),
        r => (None, r.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    let kind = KINDS.iter().find(|k| k.1 == group && k.2 == version && k.3 == plural)?;
    Some(Target { kind, namespace, name, subresource: sub })
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a valid response")
}

fn matches(obj: &Value, fields: &select::Fields, labels: &select::Labels, namespace: Option<&str>) -> bool {
    namespace.is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns)) && fields.matches(obj) && labels.matches(obj)
}

impl Ctx {
    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let q = select::query(req.uri().query());
        {
            let mut g = self.inner.lock().expect("poisoned");
            g.requests.push(format!("{method} {}", req.uri()));
            if g.down {
                return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "the API server is down".into());
            }
        }
        if method == hyper::Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            return self.token_review(req).await;
        }
        if let Some(target) = proxy::parse(&path, req.uri().query()) {
            return self.proxy(&method, target).await;
        }
        let Some(t) = parse_path(&path) else {
            return status(StatusCode::NOT_FOUND, "NotFound", format!("the server could not find the requested resource ({path})"));
        };
        if self.inner.lock().expect("poisoned").uninstalled.contains(t.kind.3) {
            return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource".into());
        }
        let watching = q.get("watch").is_some_and(|v| v == "true" || v == "1");
        let verb = match (&method, &t.name, watching) {
            (&hyper::Method::GET, None, true) => "watch",
            (&hyper::Method::GET, None, false) => "list",
            (&hyper::Method::GET, Some(_), _) => "get",
            (&hyper::Method::PATCH, _, _) => "patch",
            (&hyper::Method::PUT, _, _) => "update",
            (&hyper::Method::POST, _, _) => "create",
            (&hyper::Method::DELETE, _, _) => "delete",
            _ => return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{method} is not supported")),
        };
        let resource = match &t.subresource {
            Some(s) => format!("{}/{s}", t.kind.3),
            None => t.kind.3.to_owned(),
        };
        if self.inner.lock().expect("poisoned").denied.contains(&(verb.to_owned(), resource.clone())) {
            let scope = match &t.namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".into(),
            };
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{resource} is forbidden: User \"system:serviceaccount:nodemesh:nodemesh-agent\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
                    t.kind.3, t.kind.1
                ),
            );
        }
        let fields = match select::Fields::parse(q.get("fieldSelector").map(String::as_str).unwrap_or_default()) {
            Ok(f) => f,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
        };
        let labels = match select::Labels::parse(q.get("labelSelector").map(String::as_str).unwrap_or_default()) {
            Ok(l) => l,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
        };
        match verb {
            "list" => self.list(&t, &fields, &labels),
            "watch" => self.watch(&t, &q, fields, labels),
            "get" => {
                let g = self.inner.lock().expect("poisoned");
                let key = (t.namespace.clone().unwrap_or_default(), t.name.clone().unwrap_or_default());
                match g.objects.get(t.kind.3).and_then(|m| m.get(&key)) {
                    Some(o) => respond(StatusCode::OK, o),
                    None => status(StatusCode::NOT_FOUND, "NotFound", format!("{} \"{}\" not found", t.kind.3, key.1)),
                }
            }
            "patch" if t.subresource.as_deref() == Some("status") => self.patch_status(&t, req).await,
            "patch" if t.subresource.is_none() => self.apply_patch(&t, req).await,
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{verb} is not supported by the test server")),
        }
    }

    fn list(&self, t: &Target, fields: &select::Fields, labels: &select::Labels) -> Response<Body> {
        let g = self.inner.lock().expect("poisoned");
        let items: Vec<Value> = g
            .objects
            .get(t.kind.3)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| matches(o, fields, labels, t.namespace.as_deref()))
            .cloned()
            .collect();
        let api_version = if t.kind.1.is_empty() { t.kind.2.to_owned() } else { format!("{}/{}", t.kind.1, t.kind.2) };
        respond(
            StatusCode::OK,
            &json!({
                "apiVersion": api_version,
                "kind": format!("{}List", t.kind.0),
                "metadata": {"resourceVersion": g.rv.to_string()},
                "items": items,
            }),
        )
    }

    fn watch(&self, t: &Target, q: &HashMap<String, String>, fields: select::Fields, labels: select::Labels) -> Response<Body> {
        let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let timeout = q.get("timeoutSeconds").and_then(|v| v.parse().ok()).map(Duration::from_secs);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        let mut live = self.events.subscribe();
        let mut cut = self.cut.subscribe();
        let plural = t.kind.3;
        let ns = t.namespace.clone();
        let api_version = if t.kind.1.is_empty() { t.kind.2.to_owned() } else { format!("{}/{}", t.kind.1, t.kind.2) };
        let kind = t.kind.0;
        // Taken under the lock together with the subscription, so no change
        // falls between the replay and the live stream.
        let (replay, expired, mut last) = {
            let g = self.inner.lock().expect("poisoned");
            let expired = from != 0 && from < g.compacted;
            let replay: Vec<Change> = g.history.iter().filter(|c| c.plural == plural && c.rv > from).cloned().collect();
            (replay, expired, g.rv.max(from))
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let line = |v: Value| Bytes::from(format!("{v}\n"));
            if expired {
                let _ = tx
                    .send(line(json!({"type": "ERROR", "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {from} ({})", last),
                        "reason": "Expired", "code": 410}})))
                    .await;
                return;
            }
            let event = |c: &Change| -> Option<Value> {
                let was = c.old.as_ref().is_some_and(|o| matches(o, &fields, &labels, ns.as_deref()));
                let is = c.new.as_ref().is_some_and(|o| matches(o, &fields, &labels, ns.as_deref()));
                let (ty, mut obj) = match (was, is, &c.new) {
                    (_, true, Some(n)) if !was => ("ADDED", n.clone()),
                    (true, true, Some(n)) => ("MODIFIED", n.clone()),
                    (true, false, _) => ("DELETED", c.new.clone().or_else(|| c.old.clone())?),
                    _ => return None,
                };
                obj["metadata"]["resourceVersion"] = c.rv.to_string().into();
                Some(json!({"type": ty, "object": obj}))
            };
            let bookmark = |rv: u64| {
                line(json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv.to_string()}}}))
            };
            for c in &replay {
                if let Some(e) = event(c)
                    && tx.send(line(e)).await.is_err()
                {
                    return;
                }
            }
            if bookmarks && tx.send(bookmark(last)).await.is_err() {
                return;
            }
            let deadline = async {
                match timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => return,
                    _ = cut.recv() => return,
                    c = live.recv() => match c {
                        Ok(c) if c.plural == plural && c.rv > last => {
                            last = c.rv;
                            if let Some(e) = event(&c) && tx.send(line(e)).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // Too slow a reader: end the watch; the client resumes.
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(Duration::from_millis(500)), if bookmarks => {
                        let rv = inner.lock().expect("poisoned").rv;
                        if rv > last {
                            // Changes of other kinds moved the global counter.
                            last = rv;
                        }
                        if tx.send(bookmark(last)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx)) });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed())
            .expect("a valid response")
    }

    async fn patch_status(&self, t: &Target, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let Ok(body) = req.into_body().collect().await else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body".into());
        };
        let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "the patch is not JSON".into());
        };
        let key = (t.namespace.clone().unwrap_or_default(), t.name.clone().unwrap_or_default());
        let Some(mut obj) = self.inner.lock().expect("poisoned").objects.get(t.kind.3).and_then(|m| m.get(&key)).cloned() else {
            return status(StatusCode::NOT_FOUND, "NotFound", format!("{} \"{}\" not found", t.kind.3, key.1));
        };
        // Only the status changes through this subresource.
        if let Some(s) = patch.get("status") {
            merge(&mut obj["status"], s);
        }
        if let Some(o) = obj.as_object_mut() {
            o.remove("resourceVersion");
        }
        let server = ApiServerHandle { inner: self.inner.clone(), events: self.events.clone() };
        match server.store(obj) {
            Ok(v) => respond(StatusCode::OK, &v),
            Err(e) => status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()),
        }
    }

    /// Server-side apply (and merge patch) of a whole object: the fields
    /// sent replace or create it (field ownership is not modelled).
    async fn apply_patch(&self, t: &Target, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let Ok(body) = req.into_body().collect().await else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body".into());
        };
        let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "the patch is not JSON".into());
        };
        let key = (t.namespace.clone().unwrap_or_default(), t.name.clone().unwrap_or_default());
        let current = self.inner.lock().expect("poisoned").objects.get(t.kind.3).and_then(|m| m.get(&key)).cloned();
        let mut obj = current.unwrap_or_else(|| json!({"metadata": {"name": key.1, "namespace": key.0}}));
        merge(&mut obj, &patch);
        obj["kind"] = t.kind.0.into();
        let server = ApiServerHandle { inner: self.inner.clone(), events: self.events.clone() };
        match server.store(obj) {
            Ok(v) => respond(StatusCode::OK, &v),
            Err(e) => status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()),
        }
    }

    async fn token_review(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        if self.inner.lock().expect("poisoned").denied.contains(&("create".to_owned(), "tokenreviews".to_owned())) {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:nodemesh:nodemesh-ca\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope".into(),
            );
        }
        let Ok(body) = req.into_body().collect().await else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body".into());
        };
        let Ok(mut review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "the TokenReview is not JSON".into());
        };
        let token = review["spec"]["token"].as_str().unwrap_or_default().to_owned();
        let found = self.inner.lock().expect("poisoned").tokens.get(&token).cloned();
        let mut st = found.unwrap_or_else(|| json!({"authenticated": false, "error": "invalid bearer token"}));
        // The real server only authenticates a token for an audience it was issued for.
        let wanted: Vec<Value> = review["spec"]["audiences"].as_array().cloned().unwrap_or_default();
        if st["authenticated"] == true && !wanted.is_empty() {
            let has: Vec<Value> = st["audiences"].as_array().cloned().unwrap_or_default();
            if !wanted.iter().any(|a| has.contains(a)) {
                st = json!({"authenticated": false, "error": "token audiences do not match"});
            }
        }
        review["status"] = st;
        respond(StatusCode::CREATED, &review)
    }
}

/// The write path shared by the test's calls and the status subresource.
struct ApiServerHandle {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Change>,
}

impl ApiServerHandle {
    fn store(&self, mut v: Value) -> Result<Value> {
        let kind = v["kind"].as_str().context("object without kind")?.to_owned();
        let &(_, _, _, plural, _) = KINDS.iter().find(|k| k.0 == kind).context("unknown kind")?;
        let key = (
            v["metadata"]["namespace"].as_str().unwrap_or_default().to_owned(),
            v["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
        );
        let mut g = self.inner.lock().expect("poisoned");
        g.rv += 1;
        let rv = g.rv;
        v["metadata"]["resourceVersion"] = rv.to_string().into();
        let old = g.objects.entry(plural).or_default().insert(key, v.clone());
        let change = Change { rv, plural, old, new: Some(v.clone()) };
        g.history.push(change.clone());
        let _ = self.events.send(change);
        Ok(v)
    }
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}
