//! What an idle connection costs each agent, in heap bytes, counted
//! exactly: the agents of a two-node mesh run in this process, each on a
//! runtime of its own whose threads tag every allocation they make (the
//! tag rides in front of the block, so a block freed elsewhere is still
//! taken off its agent's count). The client, the apps and the harness run
//! untagged.
//!
//! Each case opens N connections from the client pod (node-a) to the web
//! pod (node-b), makes one exchange on each, and holds them: the bytes
//! the agents hold then, less what they held before, over N, is the
//! per-connection cost, pooled tunnel connections included (one per 100
//! streams). Cases:
//! - `l4`: a TCP port: relayed at both ends;
//! - `l7 at the destination`: an HTTP port reached by pod address: relayed
//!   at the source, HTTP terminated (policy, the app pool) at the
//!   destination, as the bench's `agent-l7` variant;
//! - `l7 at both`: the same port reached by its service address: routed per
//!   request at the source too.
//!
//! The budgets are regression guards: bytes, never time. PROFILE.md in
//! `bench/` says where the bytes go.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    net::SocketAddr,
    sync::atomic::{AtomicIsize, Ordering::Relaxed},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_agent::testing::{Agent, Mesh};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

// ---- the counting allocator ----

/// Tag 0: untagged threads; 1: node-a's runtime; 2: node-b's.
const TAGS: usize = 3;

static LIVE: [AtomicIsize; TAGS] = [const { AtomicIsize::new(0) }; TAGS];
static BLOCKS: [AtomicIsize; TAGS] = [const { AtomicIsize::new(0) }; TAGS];

thread_local! {
    static TAG: Cell<u8> = const { Cell::new(0) };
}

/// The system allocator with each block's tag in the byte before it.
struct Tagged;

/// Room in front of a block for its tag, keeping the block's alignment.
fn front(layout: Layout) -> usize {
    layout.align().max(16)
}

unsafe impl GlobalAlloc for Tagged {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let front = front(layout);
        let Ok(outer) = Layout::from_size_align(layout.size() + front, front) else { return std::ptr::null_mut() };
        // SAFETY: `outer` has a non-zero size.
        let base = unsafe { System.alloc(outer) };
        if base.is_null() {
            return base;
        }
        let tag = TAG.try_with(Cell::get).unwrap_or(0);
        LIVE[tag as usize].fetch_add(layout.size() as isize, Relaxed);
        BLOCKS[tag as usize].fetch_add(1, Relaxed);
        // SAFETY: `front` bytes lie before the block, inside `outer`.
        unsafe {
            let block = base.add(front);
            block.sub(1).write(tag);
            block
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let front = front(layout);
        // SAFETY: `block` came from `alloc` with this layout.
        unsafe {
            let tag = block.sub(1).read() as usize;
            LIVE[tag].fetch_sub(layout.size() as isize, Relaxed);
            BLOCKS[tag].fetch_sub(1, Relaxed);
            System.dealloc(block.sub(front), Layout::from_size_align_unchecked(layout.size() + front, front));
        }
    }
}

#[global_allocator]
static ALLOCATOR: Tagged = Tagged;

/// (bytes, blocks) live with `tag`.
fn live(tag: usize) -> (isize, isize) {
    (LIVE[tag].load(Relaxed), BLOCKS[tag].load(Relaxed))
}

// ---- the mesh ----

const MESH: &str = r#"
nodes: [{name: node-a}, {name: node-b}]
namespaces:
  - name: shop
    labels: {nodemesh.io/dataplane-mode: enabled}
pods:
  - {name: client, namespace: shop, node: node-a, serviceAccount: client, labels: {app: client}, ip: NET.11, netns: /nonexistent, cgroup: /nonexistent}
  - {name: web, namespace: shop, node: node-b, serviceAccount: web, labels: {app: web}, ip: NET.21, netns: /nonexistent, cgroup: /nonexistent}
services:
  - {name: web, namespace: shop, ip: NET.100, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp, port: 9000, targetPort: 9000}]}
authorizationPolicies:
  - name: web
    namespace: shop
    selector: {app: web}
    action: ALLOW
    rules:
      - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/client"]}]
        to: [{methods: [GET]}]
      - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/client"]}]
        to: [{ports: [9000]}]
"#;

/// An agent on a runtime whose threads tag what they allocate.
fn runtime(tag: u8) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(move || TAG.with(|t| t.set(tag)))
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The apps of the web pod: an HTTP server on 8080, a TCP echo on 9000.
async fn apps(mesh: &Mesh) {
    let http = TcpListener::bind(mesh.addr(21, 8080)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = http.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    let tcp = TcpListener::bind(mesh.addr(21, 9000)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tcp.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// One exchange on a new connection to `orig` (an echo, or a GET read to
/// the end of its body), the connection kept.
async fn open(client: &Agent, orig: SocketAddr, http: bool) -> TcpStream {
    let mut s = client.connect("shop/client", orig).await;
    let (ask, answer): (&[u8], &[u8]) = if http { (b"GET / HTTP/1.1\r\nhost: web.shop\r\n\r\n", b"\r\n\r\nok") } else { (b"ping", b"ping") };
    s.write_all(ask).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(answer) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    if http {
        assert!(got.starts_with(b"HTTP/1.1 200 "), "{:?}", String::from_utf8_lossy(&got));
    }
    s
}

/// The counts of both agents once they stop moving (the agents finish
/// what the last exchange started: a pooled connection going idle).
fn settled() -> [(isize, isize); 2] {
    let mut last = [live(1), live(2)];
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let now = [live(1), live(2)];
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Bytes and blocks per connection, (node-a, node-b).
struct PerConnection {
    bytes: [f64; 2],
    blocks: [f64; 2],
}

fn measure(case: &str, n: usize, port: u16, by_service: bool) -> PerConnection {
    let client_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (rt_a, rt_b) = (runtime(1), runtime(2));
    let mesh = Mesh::new(MESH);
    client_rt.block_on(apps(&mesh));
    let a = rt_a.block_on(mesh.agent("node-a"));
    let b = rt_b.block_on(mesh.agent("node-b"));
    let (orig, http) = match (port, by_service) {
        (9000, _) => (mesh.addr(21, 9000), false),
        (_, false) => (mesh.addr(21, 8080), true),
        (_, true) => (mesh.addr(100, 80), true),
    };
    // Warm: the first connection sets up what every later one shares
    // (the app's pooled connection, compiled policies and routes).
    client_rt.block_on(async {
        drop(open(&a, orig, http).await);
    });
    let before = settled();
    let held: Vec<TcpStream> = client_rt.block_on(async {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            held.push(open(&a, orig, http).await);
        }
        held
    });
    let after = client_rt.block_on(async {
        // The client's runtime keeps driving its connections meanwhile.
        tokio::task::spawn_blocking(settled).await.unwrap()
    });
    let per = |i: usize| ((after[i].0 - before[i].0) as f64 / n as f64, (after[i].1 - before[i].1) as f64 / n as f64);
    let (pa, pb) = (per(0), per(1));
    println!("{case:<24} {n:>6} conns: node-a {:>8.0} B {:>5.1} blocks, node-b {:>8.0} B {:>5.1} blocks per connection", pa.0, pa.1, pb.0, pb.1);
    drop(held);
    drop((a, b));
    drop(client_rt);
    rt_a.shutdown_timeout(Duration::from_secs(1));
    rt_b.shutdown_timeout(Duration::from_secs(1));
    PerConnection { bytes: [pa.0, pb.0], blocks: [pa.1, pb.1] }
}

/// Connections per case: enough that the pooled tunnel connections (one
/// per 100 streams) weigh what they weigh at scale.
const N: usize = 1000;

/// The cases: `CONN_MEMORY_CASE` name, label, port, by service address,
/// budget (bytes per held connection, node-a / node-b). Measured (debug and
/// release builds agree within 1%): l4 3.2 kB / 2.7 kB, l7 at the
/// destination 3.3 kB / 4.6 kB, l7 at both 3.7 kB / 0 (its destination
/// shares one pooled connection to the app); an idle HTTP/1.1 connection
/// holds none of hyper's buffers (`proxy::http::idle`; 21.8 kB and
/// 21.2 kB before). About a fifth of headroom;
/// bench/PROFILE.md says where the bytes go.
const CASES: [(&str, &str, u16, bool, [f64; 2]); 3] = [
    ("l4", "l4", 9000, false, [3_900.0, 3_300.0]),
    ("l7-destination", "l7 at the destination", 8080, false, [3_900.0, 5_600.0]),
    ("l7-both", "l7 at both", 8080, true, [4_500.0, 1_000.0]),
];

/// Every case, or only `CONN_MEMORY_CASE=l4|l7-destination|l7-both` (one
/// case alone, for a heap profiler: bench/PROFILE.md), within its budget.
#[test]
fn idle_connections_cost_each_agent_no_more_than_their_budget() {
    let only = std::env::var("CONN_MEMORY_CASE").ok();
    if let Some(o) = &only {
        assert!(CASES.iter().any(|c| c.0 == o), "CONN_MEMORY_CASE={o}: expected l4, l7-destination or l7-both");
    }
    for (key, case, port, by_service, budget) in CASES {
        if only.as_ref().is_some_and(|o| o != key) {
            continue;
        }
        let m = measure(case, N, port, by_service);
        // The count works: each agent that relays or serves the connection
        // holds something for it.
        assert!(m.blocks[0] > 0.0, "{case}: node-a holds nothing per connection: the count is broken");
        if !by_service {
            assert!(m.blocks[1] > 0.0, "{case}: node-b holds nothing per connection: the count is broken");
        }
        for (side, node) in ["node-a", "node-b"].into_iter().enumerate() {
            assert!(m.bytes[side] <= budget[side], "{case}: {node} holds {:.0} B per connection, over its budget of {}", m.bytes[side], budget[side]);
        }
    }
}
