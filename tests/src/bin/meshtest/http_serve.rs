//! `meshtest http-serve`: the benchmark's HTTP/1.1 application. hyper on a
//! small tokio runtime: what a Rust service in a pod would run, fast enough
//! that the server is not what a benchmark of the mesh measures.
//!
//! Every request gets `200` with `--body-bytes` bytes (1 kB by default),
//! except `GET /bulk?bytes=N`, which streams N bytes (for the bulk
//! throughput scenario) without buffering them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// Bytes per frame of a bulk body: large enough that framing is noise.
const BULK_CHUNK: usize = 256 * 1024;

pub fn run(listen: SocketAddr, body_bytes: usize, threads: usize) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::fail(json!({"reason": format!("tokio runtime: {e}")})),
    };
    rt.block_on(serve(listen, body_bytes))
}

async fn serve(listen: SocketAddr, body_bytes: usize) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => return super::fail(json!({"reason": format!("bind {listen}: {e}")})),
    };
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    super::emit(json!({"listening": local}));
    let small = Bytes::from(vec![b'x'; body_bytes]);
    let bulk = Bytes::from(vec![b'y'; BULK_CHUNK]);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: keep serving the connections we have.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (small, bulk) = (small.clone(), bulk.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = match bulk_bytes(req.uri().path(), req.uri().query()) {
                    Some(n) => Repeat::new(bulk.clone(), n),
                    None => Repeat::new(small.clone(), small.len() as u64),
                };
                async move { Ok::<_, Infallible>(Response::new(body)) }
            });
            // Errors here are clients going away mid-request (load
            // generators stop abruptly): nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `/bulk?bytes=N` -> N.
fn bulk_bytes(path: &str, query: Option<&str>) -> Option<u64> {
    if path != "/bulk" {
        return None;
    }
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("bytes="))
        .and_then(|n| n.parse().ok())
}

/// `len` bytes made of `chunk` repeated: a body of any size from one
/// shared buffer, with an exact length (hyper sends `content-length`).
struct Repeat {
    chunk: Bytes,
    left: u64,
}

impl Repeat {
    fn new(chunk: Bytes, len: u64) -> Self {
        Repeat { chunk, left: len }
    }
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_size_comes_from_the_query() {
        assert_eq!(bulk_bytes("/bulk", Some("bytes=1048576")), Some(1 << 20));
        assert_eq!(bulk_bytes("/bulk", Some("x=1&bytes=7")), Some(7));
        assert_eq!(bulk_bytes("/api/items", Some("bytes=7")), None);
        assert_eq!(bulk_bytes("/bulk", None), None);
    }
}
