//! Gateway API's mesh conformance profile end to end: one test per case of
//! `tests/conformance-mesh/` (the upstream manifests, unchanged). Each test
//! applies the base `manifests.yaml` to its own test API server, with the
//! echo Deployments as real pods on two nodes, each node's agent a real
//! process (`--source kube`, eBPF), then applies the case's route file,
//! waits for the routes' `Accepted` status and sends the case's requests
//! from an echo pod through the mesh ([`mesh_e2e::conformance`]).
//!
//! The expectation tables are ours, written from what each upstream test
//! (`conformance/tests/mesh/*.go` in kubernetes-sigs/gateway-api) states:
//! the status code, which backend answered (pod name prefix and namespace),
//! the path, host, method and headers the backend saw, response headers and
//! a redirect's `Location`; and that each request a backend answered came
//! through the mesh (its agent names the client's SPIFFE identity). As upstream, a table must pass as a whole while
//! the routes come into force ("eventually consistent"): here twice in a
//! row within [`SETTLE`]. Weighted splits are checked statistically as
//! upstream does (500 requests, each backend within 5 points of its share,
//! up to 10 tries), with no timing thresholds.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use mesh_e2e::conformance::{Answer, Cluster, EchoPod, Request, SETTLE};

const MESH: &str = "gateway-conformance-mesh";
const CONSUMER: &str = "gateway-conformance-mesh-consumer";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance-mesh")
}

/// One row of a table: a request and what upstream expects of its answer.
#[derive(Clone, Debug)]
struct Case {
    req: Request,
    status: u16,
    /// Pod name prefix (the Deployment) and namespace of the backend that
    /// must answer; `None`: no backend (a local reply such as a 404 or a
    /// redirect).
    backend: Option<(&'static str, &'static str)>,
    /// The path (with query) the backend must see; default: as sent.
    saw_path: Option<String>,
    /// Request headers the backend must see, values joined with `,`.
    saw: Vec<(String, String)>,
    /// Request headers the backend must not see.
    absent: Vec<String>,
    resp: Vec<(String, String)>,
    resp_absent: Vec<String>,
    location: Option<String>,
}

fn get(path: &str) -> Case {
    Case {
        req: Request { host: "echo".into(), method: "GET".into(), path: path.into(), headers: Vec::new(), grpc: false },
        status: 200,
        backend: None,
        saw_path: None,
        saw: Vec::new(),
        absent: Vec::new(),
        resp: Vec::new(),
        resp_absent: Vec::new(),
        location: None,
    }
}

/// One unary gRPC call to `host` (`proto.EchoTestService/Echo`).
fn grpc(host: &str) -> Case {
    let mut c = get("/proto.EchoTestService/Echo");
    c.req.host = host.into();
    c.req.method = "POST".into();
    c.req.grpc = true;
    c
}

impl Case {
    fn host(mut self, h: &str) -> Self {
        self.req.host = h.into();
        self
    }
    fn header(mut self, k: &str, v: &str) -> Self {
        self.req.headers.push((k.into(), v.into()));
        self
    }
    fn backend(mut self, deployment: &'static str) -> Self {
        self.backend = Some((deployment, MESH));
        self
    }
    fn status(mut self, s: u16) -> Self {
        self.status = s;
        self
    }
    fn saw_path(mut self, p: &str) -> Self {
        self.saw_path = Some(p.into());
        self
    }
    fn saw(mut self, k: &str, v: &str) -> Self {
        self.saw.push((k.into(), v.into()));
        self
    }
    fn absent(mut self, k: &str) -> Self {
        self.absent.push(k.into());
        self
    }
    fn resp(mut self, k: &str, v: &str) -> Self {
        self.resp.push((k.into(), v.into()));
        self
    }
    fn resp_absent(mut self, k: &str) -> Self {
        self.resp_absent.push(k.into());
        self
    }
    fn redirect(mut self, status: u16, location: &str) -> Self {
        self.status = status;
        self.location = Some(location.into());
        self
    }

    fn label(&self) -> String {
        let hs: Vec<String> = self.req.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("{} {}{} {hs:?}", self.req.method, self.req.host, if self.req.grpc { " (gRPC)" } else { &self.req.path })
    }

    /// Every way `a` differs from what this row expects.
    fn check(&self, a: &Answer) -> Vec<String> {
        let mut bad = Vec::new();
        if a.status != self.status {
            bad.push(format!("status {} (want {}){}", a.status, self.status, a.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()));
            return bad;
        }
        if self.req.grpc && a.grpc_status.as_deref() != Some("0") {
            bad.push(format!("grpc-status {:?} (want 0)", a.grpc_status));
        }
        if let Some(want) = &self.location {
            let got = a.header("location");
            if got.as_deref() != Some(want.as_str()) {
                bad.push(format!("Location {got:?} (want {want})"));
            }
        }
        for (k, v) in &self.resp {
            let got = a.header(k);
            if got.as_deref() != Some(v.as_str()) {
                bad.push(format!("response header {k}: {got:?} (want {v})"));
            }
        }
        for k in &self.resp_absent {
            if let Some(got) = a.header(k) {
                bad.push(format!("response header {k}: {got} (want none)"));
            }
        }
        let Some((deployment, ns)) = self.backend else {
            if a.pod().is_some() {
                bad.push(format!("answered by backend {:?} (want a reply of the mesh)", a.pod()));
            }
            return bad;
        };
        match a.pod() {
            Some(p) if p.starts_with(&format!("{deployment}-")) => {}
            other => bad.push(format!("answered by {other:?} (want {deployment})")),
        }
        if a.body["namespace"] != ns {
            bad.push(format!("backend namespace {} (want {ns})", a.body["namespace"]));
        }
        if !self.req.grpc {
            let want = self.saw_path.as_deref().unwrap_or(&self.req.path);
            if a.body["path"] != want {
                bad.push(format!("backend saw path {} (want {want})", a.body["path"]));
            }
            let host = self.req.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("host")).map_or(&self.req.host, |(_, v)| v);
            if a.body["host"] != host.as_str() {
                bad.push(format!("backend saw host {} (want {host})", a.body["host"]));
            }
        }
        if a.body["method"] != self.req.method.as_str() {
            bad.push(format!("backend saw method {} (want {})", a.body["method"], self.req.method));
        }
        for (k, v) in &self.saw {
            let got = a.seen_header(k);
            if got.as_deref() != Some(v.as_str()) {
                bad.push(format!("backend saw {k}: {got:?} (want {v})"));
            }
        }
        for k in &self.absent {
            if let Some(got) = a.seen_header(k) {
                bad.push(format!("backend saw {k}: {got} (want none)"));
            }
        }
        bad
    }
}

/// Starts the base, applies `file`, waits for `Accepted`; every parent
/// entry must also say `ResolvedRefs: True` (all backendRefs of the set
/// exist, but for `grpcroute-weight.yaml`'s `echo-v3`: `False`,
/// `BackendNotFound`, as the spec says for a missing Service).
fn cluster(test: &str, file: &str) -> Result<Cluster> {
    cluster_with(test, file, None)
}

/// [`cluster`] with `replicas` pods per Deployment.
fn cluster_with(test: &str, file: &str, replicas: Option<u64>) -> Result<Cluster> {
    let c = Cluster::start_with(test, &dir().join("manifests.yaml"), replicas)?;
    let routes = c.apply_file(&dir().join(file))?;
    let statuses = c.wait_accepted(&routes)?;
    let want = if file == "grpcroute-weight.yaml" { ("False", "BackendNotFound") } else { ("True", "ResolvedRefs") };
    for (route, status) in routes.iter().zip(&statuses) {
        for parent in status["parents"].as_array().into_iter().flatten() {
            let resolved = parent["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "ResolvedRefs");
            let got = resolved.map(|c| (c["status"].as_str().unwrap_or_default(), c["reason"].as_str().unwrap_or_default()));
            if got != Some(want) {
                bail!("{route:?}: ResolvedRefs {got:?} (want {want:?}) in {status}");
            }
        }
    }
    Ok(c)
}

/// Sends the table from `from` until it passes as a whole twice in a row.
fn expect(c: &Cluster, from: &EchoPod, cases: &[Case]) -> Result<()> {
    let reqs: Vec<Request> = cases.iter().map(|c| c.req.clone()).collect();
    let deadline = std::time::Instant::now() + SETTLE;
    let mut passes = 0;
    loop {
        let answers = c.send(from, &reqs)?;
        // Through the mesh: the backend's agent names the client's identity
        // (mTLS from the client's agent) on every request it delivers.
        let identity = format!("spiffe://cluster.local/ns/{}/sa/default", from.namespace);
        let bad: Vec<String> = cases
            .iter()
            .zip(&answers)
            .flat_map(|(case, a)| {
                let mut bad = case.check(a);
                if bad.is_empty() && case.backend.is_some() && a.seen_header("x-mesh-peer-identity").as_deref() != Some(identity.as_str()) {
                    bad.push(format!("backend saw x-mesh-peer-identity {:?} (want {identity})", a.seen_header("x-mesh-peer-identity")));
                }
                bad.into_iter().map(move |b| format!("{}: {b}\n    answer: {} {:?} {}", case.label(), a.status, a.headers, a.body))
            })
            .collect();
        if bad.is_empty() {
            passes += 1;
            if passes == 2 {
                return Ok(());
            }
            continue;
        }
        passes = 0;
        if std::time::Instant::now() > deadline {
            bail!("from {}/{}:\n{}\n{}", from.namespace, from.name, bad.join("\n"), c.logs());
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

fn table(test: &str, file: &str, cases: &[Case]) -> Result<()> {
    let c = cluster(test, file)?;
    expect(&c, c.pod(MESH, "echo-v1")?, cases)
}

/// Upstream's weight check: `total` requests, only the weighted backends
/// answer, each within 5 points of its share; up to 10 tries.
fn weights(c: &Cluster, from: &EchoPod, probe: Case, want: &[(&str, f64)]) -> Result<()> {
    // Answered by some echo pod first (either Deployment's name starts so).
    let mut probe = probe;
    probe.backend = Some(("echo", MESH));
    expect(c, from, std::slice::from_ref(&probe))?;
    const TOTAL: usize = 500;
    let mut last = String::new();
    for attempt in 1..=10 {
        let t = std::time::Instant::now();
        let answers = c.send(from, &vec![probe.req.clone(); TOTAL])?;
        eprintln!("weights: try {attempt}: {TOTAL} requests in {:?}", t.elapsed());
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        let mut bad = Vec::new();
        for a in &answers {
            let pod = a.pod().unwrap_or_default();
            match want.iter().find(|(d, _)| pod.starts_with(&format!("{d}-"))) {
                Some((d, _)) if a.status == 200 => *seen.entry((*d).to_owned()).or_default() += 1,
                _ => bad.push(format!("{} {:?} {:?}", a.status, a.pod(), a.error)),
            }
        }
        let off: Vec<String> = want
            .iter()
            .filter_map(|(d, share)| {
                let got = *seen.get(*d).unwrap_or(&0) as f64 / TOTAL as f64;
                ((got - share).abs() > 0.05).then(|| format!("{d}: {got:.3} (want {share} +/- 0.05)"))
            })
            .collect();
        if bad.is_empty() && off.is_empty() {
            return Ok(());
        }
        last = format!("unexpected answers {bad:?}; shares off {off:?}; seen {seen:?}");
        eprintln!("weights: try {attempt}: {last}");
    }
    bail!("weighted distribution never within tolerance: {last}")
}

// --- the cases ---

#[test]
fn mesh_httproute_simple_same_namespace() -> Result<()> {
    table("gw-simple", "httproute-simple-same-namespace.yaml", &[get("/").backend("echo-v1")])
}

#[test]
fn mesh_httproute_matching() -> Result<()> {
    table(
        "gw-matching",
        "httproute-matching.yaml",
        &[
            get("/").backend("echo-v1"),
            get("/example").backend("echo-v1"),
            get("/").header("Version", "one").backend("echo-v1"),
            get("/v2").backend("echo-v2"),
            get("/v2/example").backend("echo-v2"),
            get("/").header("Version", "two").backend("echo-v2"),
            get("/v2/").backend("echo-v2"),
            // Not a segment prefix of /v2.
            get("/v2example").backend("echo-v1"),
            get("/foo/v2/example").backend("echo-v1"),
        ],
    )
}

#[test]
fn mesh_httproute_query_param_matching() -> Result<()> {
    table(
        "gw-query",
        "httproute-query-param-matching.yaml",
        &[
            get("/?animal=whale").backend("echo-v1"),
            get("/?animal=dolphin").backend("echo-v2"),
            get("/?animal=whale&otherparam=irrelevant").backend("echo-v1"),
            get("/?animal=dolphin&color=yellow").backend("echo-v2"),
            get("/?color=blue").status(404),
            get("/?animal=dog").status(404),
            get("/?animal=whaledolphin").status(404),
            get("/").status(404),
            // With the core match types.
            get("/path1?animal=whale").backend("echo-v1"),
            get("/?animal=whale").header("version", "one").backend("echo-v2"),
            // ORed matches: either one.
            get("/path3?animal=shark").backend("echo-v1"),
            get("/path4?animal=kraken").header("version", "three").backend("echo-v1"),
            // ANDed conditions: a subset does not match.
            get("/?animal=shark").status(404),
            get("/path4?animal=kraken").status(404),
            // Precedence: a path match beats a query match.
            get("/path5?animal=hydra").backend("echo-v1"),
        ],
    )
}

#[test]
fn mesh_httproute_weight() -> Result<()> {
    // Two pods per Deployment: the split is between Services, whichever pod.
    let c = cluster_with("gw-weight", "httproute-weight.yaml", Some(2))?;
    weights(&c, c.pod(MESH, "echo-v1")?, get("/"), &[("echo-v1", 0.7), ("echo-v2", 0.3)])
}

fn header_modifier_cases() -> Vec<Case> {
    vec![
        get("/set").header("Some-Other-Header", "val").backend("echo-v1").saw("Some-Other-Header", "val").saw("X-Header-Set", "set-overwrites-values"),
        get("/set")
            .header("Some-Other-Header", "val")
            .header("X-Header-Set", "some-other-value")
            .backend("echo-v1")
            .saw("Some-Other-Header", "val")
            .saw("X-Header-Set", "set-overwrites-values"),
        get("/add").header("Some-Other-Header", "val").backend("echo-v1").saw("Some-Other-Header", "val").saw("X-Header-Add", "add-appends-values"),
        get("/add")
            .header("Some-Other-Header", "val")
            .header("X-Header-Add", "some-other-value")
            .backend("echo-v1")
            .saw("Some-Other-Header", "val")
            .saw("X-Header-Add", "some-other-value,add-appends-values"),
        get("/remove").header("X-Header-Remove", "val").backend("echo-v1").absent("X-Header-Remove"),
        get("/multiple")
            .header("X-Header-Set-2", "set-val-2")
            .header("X-Header-Add-2", "add-val-2")
            .header("X-Header-Remove-2", "remove-val-2")
            .header("Another-Header", "another-header-val")
            .backend("echo-v1")
            .saw("X-Header-Set-1", "header-set-1")
            .saw("X-Header-Set-2", "header-set-2")
            .saw("X-Header-Add-1", "header-add-1")
            .saw("X-Header-Add-2", "add-val-2,header-add-2")
            .saw("X-Header-Add-3", "header-add-3")
            .saw("Another-Header", "another-header-val")
            .absent("X-Header-Remove-1")
            .absent("X-Header-Remove-2"),
        // The filter names headers in canonical case, the request in lower case.
        get("/case-insensitivity")
            .header("x-header-set", "original-val-set")
            .header("x-header-add", "original-val-add")
            .header("x-header-remove", "original-val-remove")
            .header("Another-Header", "another-header-val")
            .backend("echo-v1")
            .saw("X-Header-Set", "header-set")
            .saw("X-Header-Add", "original-val-add,header-add")
            .saw("Another-Header", "another-header-val")
            .absent("X-Header-Remove"),
    ]
}

#[test]
fn mesh_httproute_request_header_modifier() -> Result<()> {
    table("gw-reqhdr", "httproute-request-header-modifier.yaml", &header_modifier_cases())
}

#[test]
fn mesh_httproute_backend_request_header_modifier() -> Result<()> {
    table("gw-backhdr", "httproute-request-header-modifier-backend.yaml", &header_modifier_cases())
}

#[test]
fn mesh_httproute_redirect_host_and_status() -> Result<()> {
    table(
        "gw-redirhost",
        "httproute-redirect-host-and-status.yaml",
        &[
            get("/hostname-redirect").redirect(302, "http://example.org/hostname-redirect"),
            get("/host-and-status").redirect(301, "http://example.org/host-and-status"),
        ],
    )
}

#[test]
fn mesh_httproute_303_redirect() -> Result<()> {
    table("gw-303", "httproute-303-redirect.yaml", &[get("/redirect").redirect(303, "http://echo/redirect")])
}

#[test]
fn mesh_httproute_307_redirect() -> Result<()> {
    table("gw-307", "httproute-307-redirect.yaml", &[get("/temporary").redirect(307, "http://echo/temporary")])
}

#[test]
fn mesh_httproute_308_redirect() -> Result<()> {
    table("gw-308", "httproute-308-redirect.yaml", &[get("/permanent").redirect(308, "http://echo/permanent")])
}

#[test]
fn mesh_httproute_redirect_path() -> Result<()> {
    table(
        "gw-redirpath",
        "httproute-redirect-path.yaml",
        &[
            get("/original-prefix/lemon").redirect(302, "http://echo/replacement-prefix/lemon"),
            get("/full/path/original").redirect(302, "http://echo/full-path-replacement"),
            get("/path-and-host").redirect(302, "http://example.org/replacement-prefix"),
            get("/path-and-status").redirect(301, "http://echo/replacement-prefix"),
            get("/full-path-and-host").redirect(302, "http://example.org/replacement-full"),
            get("/full-path-and-status").redirect(301, "http://echo/replacement-full"),
        ],
    )
}

#[test]
fn mesh_httproute_redirect_port() -> Result<()> {
    table(
        "gw-redirport",
        "httproute-redirect-port.yaml",
        &[
            get("/port").redirect(302, "http://echo:8083/port"),
            get("/port-and-host").redirect(302, "http://example.org:8083/port-and-host"),
            get("/port-and-status").redirect(301, "http://echo:8083/port-and-status"),
            get("/port-and-host-and-status").redirect(302, "http://example.org:8083/port-and-host-and-status"),
        ],
    )
}

#[test]
fn mesh_httproute_redirect_scheme() -> Result<()> {
    // A new scheme without a port: its well-known port, left out of Location.
    table(
        "gw-redirscheme",
        "httproute-redirect-scheme.yaml",
        &[
            get("/scheme").redirect(302, "https://echo/scheme"),
            get("/scheme-and-host").redirect(302, "https://example.org/scheme-and-host"),
            get("/scheme-and-status").redirect(301, "https://echo/scheme-and-status"),
            get("/scheme-and-host-and-status").redirect(302, "https://example.org/scheme-and-host-and-status"),
        ],
    )
}

#[test]
fn mesh_httproute_rewrite_path() -> Result<()> {
    table(
        "gw-rewrite",
        "httproute-rewrite-path.yaml",
        &[
            get("/prefix/one/two").backend("echo-v1").saw_path("/one/two"),
            get("/strip-prefix/three").backend("echo-v1").saw_path("/three"),
            get("/strip-prefix").backend("echo-v1").saw_path("/"),
            get("/full/one/two").backend("echo-v1").saw_path("/one"),
            get("/full/rewrite-path-and-modify-headers/test")
                .header("X-Header-Remove", "remove-val")
                .header("X-Header-Add-Append", "append-val-1")
                .header("X-Header-Set", "set-val")
                .backend("echo-v1")
                .saw_path("/test")
                .saw("X-Header-Add", "header-val-1")
                .saw("X-Header-Add-Append", "append-val-1,header-val-2")
                .saw("X-Header-Set", "set-overwrites-values")
                .absent("X-Header-Remove"),
            get("/prefix/rewrite-path-and-modify-headers/one")
                .header("X-Header-Remove", "remove-val")
                .header("X-Header-Add-Append", "append-val-1")
                .header("X-Header-Set", "set-val")
                .backend("echo-v1")
                .saw_path("/prefix/one")
                .saw("X-Header-Add", "header-val-1")
                .saw("X-Header-Add-Append", "append-val-1,header-val-2")
                .saw("X-Header-Set", "set-overwrites-values")
                .absent("X-Header-Remove"),
        ],
    )
}

#[test]
fn mesh_httproute_named_rule() -> Result<()> {
    table(
        "gw-named",
        "httproute-named-rule.yaml",
        &[get("/named").backend("echo-v1"), get("/unnamed").backend("echo-v2")],
    )
}

#[test]
fn mesh_consumer_route() -> Result<()> {
    let c = cluster("gw-consumer", "mesh-consumer-route.yaml")?;
    let to_v1 = || get("/").host("echo-v1.gateway-conformance-mesh").backend("echo-v1");
    // From the route's namespace: the route applies.
    expect(&c, c.pod(CONSUMER, "echo-v1")?, &[to_v1().resp("X-Header-Set", "set")])?;
    // From the Service's own namespace: it does not.
    expect(&c, c.pod(MESH, "echo-v1")?, &[to_v1().resp_absent("X-Header-Set")])
}

#[test]
fn mesh_frontend() -> Result<()> {
    let c = cluster("gw-frontend", "mesh-frontend.yaml")?;
    let v2 = c.pod(MESH, "echo-v2")?.pod.ip();
    expect(
        &c,
        c.pod(MESH, "echo-v1")?,
        &[
            // Through the Service: the route applies.
            get("/").host("echo-v2").backend("echo-v2").resp("X-Header-Set", "set"),
            // To the pod directly: it does not.
            get("/").host(&format!("{v2}:8080")).backend("echo-v2").resp_absent("X-Header-Set"),
        ],
    )
}

#[test]
fn mesh_basic() -> Result<()> {
    // No route at all: the Service's endpoints (both Deployments) answer.
    let c = Cluster::start("gw-basic", &dir().join("manifests.yaml"))?;
    let mut any = get("/");
    any.backend = Some(("echo", MESH));
    expect(&c, c.pod(MESH, "echo-v1")?, &[any])
}

#[test]
fn mesh_frontend_hostname() -> Result<()> {
    // The parentRef matches the Service address dialled, not the Host.
    let c = cluster("gw-fronthost", "mesh-frontend.yaml")?;
    expect(
        &c,
        c.pod(MESH, "echo-v1")?,
        &[
            get("/").host("echo-v2").header("Host", "echo-v1").backend("echo-v2").resp("X-Header-Set", "set"),
            get("/").host("echo-v1").header("Host", "echo-v2").backend("echo-v1").resp_absent("X-Header-Set"),
        ],
    )
}

#[test]
fn mesh_ports() -> Result<()> {
    table(
        "gw-ports",
        "mesh-ports.yaml",
        &[
            // parentRef port 80: only that port.
            get("/").host("echo-v1").backend("echo-v1").resp("X-Header-Set", "v1"),
            get("/").host("echo-v1:8080").backend("echo-v1").resp_absent("X-Header-Set"),
            // No port: every port.
            get("/").host("echo-v2").backend("echo-v2").resp("X-Header-Set", "v2"),
            get("/").host("echo-v2:8080").backend("echo-v2").resp("X-Header-Set", "v2"),
        ],
    )
}

#[test]
fn mesh_split() -> Result<()> {
    table("gw-split", "mesh-split.yaml", &[get("/v1").backend("echo-v1"), get("/v2").backend("echo-v2")])
}

#[test]
fn mesh_grpcroute_request_header_modifier() -> Result<()> {
    let c = cluster("gw-grpchdr", "grpcroute-request-header-modifier.yaml")?;
    let call = |case: &str| grpc("echo:7070").header("x-test-case", case).saw("x-test-case", case);
    expect(
        &c,
        c.pod(MESH, "echo-v1")?,
        &[
            call("set")
                .header("some-other-header", "this-header-should-be-set")
                .header("x-header-set", "this-value-should-be-overwritten")
                .backend("echo-v1")
                .saw("some-other-header", "this-header-should-be-set")
                .saw("x-header-set", "set-overwrites-values"),
            call("add")
                .header("x-header-add", "this-value-should-be-appended")
                .backend("echo-v1")
                .saw("x-header-add", "this-value-should-be-appended,add-appends-values"),
            call("remove").header("x-header-remove", "this-should-be-removed").backend("echo-v1").absent("x-header-remove"),
        ],
    )
    .context("from echo-v1")?;
    expect(
        &c,
        c.pod(MESH, "echo-v2")?,
        &[call("multi")
            .header("x-header-set-2", "set-header-2")
            .header("x-header-add-2", "add-header-2")
            .header("x-header-remove-2", "should-be-removed-2")
            .backend("echo-v2")
            .saw("x-header-set-1", "header-set-1")
            .saw("x-header-set-2", "header-set-2")
            .saw("x-header-add-1", "header-add-1")
            .saw("x-header-add-2", "add-header-2,header-add-2")
            .absent("x-header-remove-1")
            .absent("x-header-remove-2")],
    )
    .context("from echo-v2")
}

#[test]
fn mesh_grpcroute_weight() -> Result<()> {
    let c = cluster_with("gw-grpcweight", "grpcroute-weight.yaml", Some(2))?;
    // echo-v3 (weight 0) does not exist and must never be picked.
    weights(&c, c.pod(MESH, "echo-v1")?, grpc("echo:7070"), &[("echo-v1", 0.7), ("echo-v2", 0.3)])
}

/// Every route file of the set has its test above (a new upstream case
/// added to the directory fails here until it has one).
#[test]
fn every_case_has_a_test() -> Result<()> {
    let src = include_str!("gateway_conformance.rs");
    let mut missing = Vec::new();
    for e in std::fs::read_dir(dir())? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "manifests.yaml" && !src.contains(&format!("\"{name}\"")) {
            missing.push(name);
        }
    }
    missing.sort();
    if !missing.is_empty() {
        bail!("route files without a test: {missing:?}");
    }
    Ok(())
}
