//! `meshtest idle`: many concurrent, idle HTTP/1.1 keep-alive connections,
//! for the tests and benchmark rows about what a connection costs the mesh
//! (descriptors, memory) and what happens when there are more than it may
//! hold.
//!
//! Each connection makes one `GET /` (so it reached the app through whatever
//! carries it), then sits idle until the control file exists or SIGTERM;
//! then each still-open connection makes a second `GET /` (it survived the
//! idle time) and all are closed. Lines: `{"held":N,"failed":M,..}` once
//! opened, `{"ok":..,"held":N,"second":K,..}` at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long)]
    connections: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    parallel: usize,
    /// Hold until this file exists (or SIGTERM).
    #[arg(long)]
    control: PathBuf,
    /// The path each request asks for.
    #[arg(long, default_value = "/")]
    path: String,
    /// Seconds for each connect and each request.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Exit 0 even when some connections failed (a test that expects the
    /// mesh to refuse some); the counts are in the lines either way.
    #[arg(long)]
    allow_failures: bool,
}

type Conn = (SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>);

pub fn run(a: Args) -> ExitCode {
    // 10,000 connections need more than the usual soft limit of 1,024.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    if let Err(e) = super::on_sigterm_set_flag() {
        return super::fail(json!({"reason": format!("sigaction: {e}")}));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return super::fail(json!({"reason": format!("tokio runtime: {e}")})),
    };
    rt.block_on(idle(a))
}

async fn idle(a: Args) -> ExitCode {
    let timeout = super::secs(a.timeout);
    let started = Instant::now();
    let results: Vec<Result<Conn, String>> = futures::stream::iter(0..a.connections)
        .map(|_| open(a.to, &a.path, timeout))
        .buffer_unordered(a.parallel.max(1))
        .collect()
        .await;
    let mut conns = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for r in results {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    let held = conns.len();
    let failed = a.connections - held;
    super::emit(json!({"held": held, "failed": failed, "errors": errors,
                       "openSecs": started.elapsed().as_secs_f64()}));

    while !super::TERMINATED.load(Ordering::SeqCst) && !a.control.exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every held connection again, all at once: still there after idling.
    let mut second_errors: BTreeMap<String, u64> = BTreeMap::new();
    let path = a.path.as_str();
    let again: Vec<(Conn, Result<(), String>)> = futures::stream::iter(conns)
        .map(|mut c| async move {
            let r = get(&mut c.0, a.to, path, timeout).await;
            (c, r)
        })
        .buffer_unordered(a.parallel.max(1))
        .collect()
        .await;
    let mut second = 0;
    let mut tasks = Vec::new();
    for ((send, task), r) in again {
        match r {
            Ok(()) => second += 1,
            Err(e) => *second_errors.entry(e).or_default() += 1,
        }
        // Dropping the sender ends the connection task: the socket closes.
        drop(send);
        tasks.push(task);
    }
    for t in tasks {
        let _ = tokio::time::timeout(timeout, t).await;
    }
    let ok = a.allow_failures || (failed == 0 && second == held);
    super::emit(json!({"ok": ok, "held": held, "failed": failed, "second": second,
                       "secondErrors": second_errors}));
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

async fn open(to: SocketAddr, path: &str, timeout: Duration) -> Result<Conn, String> {
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(to)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {}", kind(&e))),
        Err(_) => return Err("connect: timed out".into()),
    };
    let _ = stream.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    get(&mut send, to, path, timeout).await?;
    Ok((send, task))
}

async fn get(send: &mut SendRequest<Empty<Bytes>>, to: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let req = http::Request::get(path)
        .header(http::header::HOST, to.to_string())
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let exchange = async {
        send.ready().await.map_err(|e| format!("not ready: {e}"))?;
        let resp = send.send_request(req).await.map_err(|e| format!("request: {}", hyper_kind(&e)))?;
        let status = resp.status();
        resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
        if status != http::StatusCode::OK {
            return Err(format!("status {status}"));
        }
        Ok(())
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or_else(|_| Err("request: timed out".into()))
}

/// An error's kind, not its text with addresses: errors are counted by it.
fn kind(e: &std::io::Error) -> String {
    format!("{:?}", e.kind())
}

fn hyper_kind(e: &hyper::Error) -> String {
    if e.is_incomplete_message() {
        "connection closed before the response".into()
    } else if e.is_canceled() {
        "canceled".into()
    } else {
        e.to_string()
    }
}
