//! HTTP plumbing both roles share: what a layer of the HTTP stacks is
//! ([`HttpService`]), the agents' HTTP server ([`serve`]: limits, how a
//! connection ends, how it drains), the translation between HTTP versions
//! ([`to_app_version`]), hop-by-hop headers, upgrades, and the front door
//! ([`validate`]) every request passes first.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::state::AppHttp;

mod idle;
pub(super) mod validate;

/// The header carrying the verified client identity to the application.
pub const PEER_IDENTITY_HEADER: &str = "x-mesh-peer-identity";

/// Largest request header block accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The server side of the agent's HTTP layers, one per version: HTTP/1.1
/// (with upgrades) or h2c (prior knowledge), header blocks above 64 KiB
/// refused (431), as Envoy's default.
fn http1_server() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.max_buf_size(MAX_HEADER_BYTES);
    builder
}

fn http2_server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// The body of every response the agents' HTTP servers send.
pub(super) type RespBody = BoxBody<Bytes, hyper::Error>;

/// A boxed future: every layer's `call`, so that a stack's type stays a
/// plain nesting of the layers' structs.
pub(super) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a layer's `call` returns.
pub(super) type HttpFuture = BoxFuture<Result<Response<RespBody>, Infallible>>;

/// A layer of an HTTP stack (and a whole stack): a request in, a response
/// out. It never fails: whatever goes wrong below becomes the mesh's own
/// reply ([`super::reply`]) on the way up, so every layer above sees, and
/// counts, an answer. Always ready: the limits (circuit breaker, caps)
/// answer at once instead of applying back-pressure, so a layer calls the
/// one below directly, without `poll_ready`, and does its own part of the
/// work in `call` before it (a pass-through costs no future of its own).
pub(super) trait HttpService:
    tower::Service<Request<Incoming>, Response = Response<RespBody>, Error = Infallible, Future = HttpFuture>
    + Clone
    + Send
    + 'static
{
}

impl<S> HttpService for S where
    S: tower::Service<Request<Incoming>, Response = Response<RespBody>, Error = Infallible, Future = HttpFuture>
        + Clone
        + Send
        + 'static
{
}

/// A layer's `poll_ready`: always ready (see [`HttpService`]).
pub(super) fn ready<E>() -> std::task::Poll<Result<(), E>> {
    std::task::Poll::Ready(Ok(()))
}

/// Serves HTTP/1.1 or h2c on `io` with a connection's stack until the
/// client closes it or the agent drains; `at` and `side` name it in the
/// log. Draining: `Connection: close` on the next HTTP/1.1 response, GOAWAY
/// on HTTP/2, so the client's next request finds the agent that serves next.
pub(super) async fn serve<IO, S>(io: IO, stack: S, draining: &CancellationToken, stats: &super::PodStats, at: SocketAddr, side: &str)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService + Unpin,
{
    let (version, io) = match super::sniff::http_version(io).await {
        Ok(Some(v)) => v,
        Ok(None) => return,
        Err(e) => return tracing::debug!(%at, error = %e, side, "HTTP connection ended before its first request"),
    };
    let svc = Serve { stack: std::cell::RefCell::new(stack), draining: draining.clone(), idle: Default::default() };
    let result = match version {
        AppHttp::Http2 => {
            let conn = http2_server().serve_connection(TokioIo::new(io), svc);
            // Boxed: hyper's HTTP/2 connection is twice the size of its
            // HTTP/1.1 one, and this future is the task of every HTTP
            // connection, most of them HTTP/1.1.
            Box::pin(super::until_drained(conn, draining, |c| c.graceful_shutdown())).await
        }
        // Drains at its next response ([`drain_mark`]); idle, it holds
        // none of hyper's buffers ([`idle`]).
        AppHttp::Http1 => idle::serve(io, svc).await.0,
    };
    count_http_end(result, stats, at, side);
}

/// A connection's stack as hyper's service. hyper calls a service through
/// `&self`, a stack's layers through `&mut self`: the stack sits in a
/// `RefCell` instead of being cloned (every layer's `Arc`s) per request.
/// It is borrowed only inside `call`, which returns a `'static` future
/// without calling back into hyper, so no two borrows overlap.
struct Serve<S> {
    stack: std::cell::RefCell<S>,
    /// The agent's draining token, shared with each response's future.
    draining: CancellationToken,
    /// What says when an HTTP/1.1 connection is between requests.
    idle: std::sync::Arc<idle::Idle>,
}

impl<S: HttpService> hyper::service::Service<Request<Incoming>> for Serve<S> {
    type Response = Response<idle::Tracked>;
    type Error = Infallible;
    type Future = Marked;

    fn call(&self, req: Request<Incoming>) -> Marked {
        let version = req.version();
        let in_flight = self.idle.start(hyper::body::Body::is_end_stream(req.body()));
        let run = self.stack.borrow_mut().call(req);
        Marked { run, version, draining: self.draining.clone(), in_flight: Some(in_flight) }
    }
}

/// The stack's response, marked for draining ([`drain_mark`]) when it
/// comes.
struct Marked {
    run: HttpFuture,
    version: http::Version,
    draining: CancellationToken,
    /// Moves into the response's body.
    in_flight: Option<idle::InFlight>,
}

impl Future for Marked {
    type Output = Result<Response<idle::Tracked>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let res = std::task::ready!(self.run.as_mut().poll(cx))?;
        let in_flight = self.in_flight.take();
        let res = drain_mark(&self.draining, self.version, res).map(|body| idle::Tracked::new(body, in_flight));
        std::task::Poll::Ready(Ok(res))
    }
}

/// Puts a request in the form of the HTTP version the application speaks
/// (RFC 9110 7.2, RFC 9113 8.3.1): to HTTP/1.1 an origin-form target and
/// a `Host` header; to HTTP/2 scheme and `:authority` in the URI and no
/// `Host` (the authority from the URI, else from `Host`, else `fallback`,
/// the address the request goes to). Hop-by-hop headers go first.
pub(super) fn to_app_version(parts: &mut http::request::Parts, version: AppHttp, fallback: SocketAddr) {
    strip_hop_by_hop(&mut parts.headers);
    let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match version {
        AppHttp::Http1 => {
            // A Host the client sent is kept; else the URI's authority,
            // else the address (no copy of the authority on the way).
            if !parts.headers.contains_key(header::HOST) {
                let host = match parts.uri.authority() {
                    Some(a) => HeaderValue::from_str(a.as_str()),
                    None => HeaderValue::from_str(&fallback.to_string()),
                };
                if let Ok(v) = host {
                    parts.headers.insert(header::HOST, v);
                }
            }
            parts.uri = http::Uri::from(pq);
            parts.version = http::Version::HTTP_11;
        }
        AppHttp::Http2 => {
            let authority = match parts.uri.authority() {
                Some(a) => Some(a.clone()),
                None => match parts.headers.get(header::HOST) {
                    Some(h) => h.to_str().map_or_else(|_| fallback.to_string().parse().ok(), |h| h.parse().ok()),
                    None => fallback.to_string().parse().ok(),
                },
            };
            let mut p = http::uri::Parts::default();
            p.scheme = Some(parts.uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP));
            p.authority = authority;
            p.path_and_query = Some(pq);
            if let Ok(uri) = http::Uri::from_parts(p) {
                parts.uri = uri;
            }
            // :authority carries it; a Host that disagreed would be refused
            // by the next front door.
            parts.headers.remove(header::HOST);
            parts.version = http::Version::HTTP_2;
        }
    }
}

/// How a served HTTP connection ended: hyper has already answered a
/// malformed request with 400 (431 for oversized headers) and closed; count
/// it.
fn count_http_end(result: Result<(), hyper::Error>, stats: &super::PodStats, at: SocketAddr, side: &str) {
    let Err(e) = result else { return };
    if e.is_parse() || e.is_parse_too_large() {
        stats.http_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(%at, error = %e, side, "malformed HTTP request refused");
    } else {
        tracing::debug!(%at, error = %e, side, "HTTP connection ended");
    }
}

/// Headers that belong to one hop (RFC 9110 7.6.1) and are not forwarded.
const HOP_BY_HOP: [&str; 7] = ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "proxy-authorization"];

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none of them (a `Connection` naming others is
    // one of them): one pass over the names, not a lookup for each.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(&k.as_str())) {
        return;
    }
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for h in listed.iter().map(String::as_str).chain(HOP_BY_HOP) {
        // `TE: trailers` is how gRPC asks for trailers; keep exactly that.
        if h == "te" && headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers")) {
            continue;
        }
        headers.remove(h);
    }
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Upgrade`).
pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Carries bytes between the two sides of an upgraded exchange.
pub(super) async fn join_upgraded(a: hyper::upgrade::OnUpgrade, b: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(a, b) {
        Ok((a, b)) => {
            let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
            if let Err(e) = super::relay::copy_bidirectional(&mut a, &mut b).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::info!(error = %e, "upgrade did not complete"),
    }
}

/// How an HTTP server connection drains. HTTP/2: GOAWAY at once (hyper's
/// graceful shutdown): in-flight streams finish, the client opens its next
/// ones elsewhere. HTTP/1.1: the next response carries `Connection: close`
/// and the connection closes after it. Closing an idle keep-alive
/// connection at once instead would race the client's next request (it may
/// already be on the wire) and fail it; a connection that stays idle ends
/// at the drain deadline. This is the HTTP/1.x part: while draining, a
/// response (not an upgrade) says the connection closes after it.
fn drain_mark<B>(draining: &CancellationToken, version: http::Version, mut res: http::Response<B>) -> http::Response<B> {
    if draining.is_cancelled() && version < http::Version::HTTP_2 && res.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        res.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::request::Builder) -> http::request::Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn http1_to_http2_moves_host_into_the_authority() {
        let fallback: SocketAddr = "198.51.100.12:8080".parse().unwrap();
        let mut p = parts(Request::get("/a?b=1").header(header::HOST, "web.shop").header(header::CONNECTION, "close"));
        to_app_version(&mut p, AppHttp::Http2, fallback);
        assert_eq!(p.uri.to_string(), "http://web.shop/a?b=1");
        assert_eq!(p.version, http::Version::HTTP_2);
        assert!(!p.headers.contains_key(header::HOST), "{:?}", p.headers);
        assert!(!p.headers.contains_key(header::CONNECTION));
        // No Host at all (HTTP/1.0): the address the request goes to.
        let mut p = parts(Request::get("/").version(http::Version::HTTP_10));
        to_app_version(&mut p, AppHttp::Http2, fallback);
        assert_eq!(p.uri.authority().unwrap().as_str(), "198.51.100.12:8080");
    }

    #[test]
    fn http2_to_http1_sends_origin_form_and_host() {
        let fallback: SocketAddr = "198.51.100.12:8080".parse().unwrap();
        let mut p = parts(Request::get("https://web.shop:8443/x").version(http::Version::HTTP_2));
        to_app_version(&mut p, AppHttp::Http1, fallback);
        assert_eq!(p.uri.to_string(), "/x");
        assert_eq!(p.version, http::Version::HTTP_11);
        assert_eq!(p.headers[header::HOST], "web.shop:8443");
        // A Host the client sent is kept as it is.
        let mut p = parts(Request::get("/y").header(header::HOST, "api.shop"));
        to_app_version(&mut p, AppHttp::Http1, fallback);
        assert_eq!((p.uri.to_string().as_str(), &p.headers[header::HOST]), ("/y", &HeaderValue::from_static("api.shop")));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_but_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("traceparent", HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "traceparent"]);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE));
    }
}
