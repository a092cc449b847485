//! HTTP plumbing both roles share: the agents' HTTP server (limits,
//! how a connection ends, how it drains), hop-by-hop headers, upgrades,
//! and the front door ([`validate`]) every request passes first.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use http::{HeaderMap, Request, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

pub(super) mod validate;

/// The header carrying the verified client identity to the application.
pub const PEER_IDENTITY_HEADER: &str = "x-mesh-peer-identity";

/// Largest request header block accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The server side of the agent's HTTP layers: HTTP/1.1 or h2c (prior
/// knowledge), header blocks above 64 KiB refused (431), as Envoy's default.
pub(super) fn http_server() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(MAX_HEADER_BYTES);
    builder.http2().max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// How a served HTTP connection ended: hyper has already answered a
/// malformed request with 400 (431 for oversized headers) and closed; count
/// it.
pub(super) fn count_http_end(result: Result<(), Box<dyn std::error::Error + Send + Sync>>, stats: &super::PodStats, at: SocketAddr, side: &str) {
    let Err(e) = result else { return };
    let malformed = e
        .downcast_ref::<hyper::Error>()
        .is_some_and(|h| h.is_parse() || h.is_parse_too_large());
    if malformed {
        stats.http_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(%at, error = %e, side, "malformed HTTP request refused");
    } else {
        tracing::debug!(%at, error = %e, side, "HTTP connection ended");
    }
}

/// Headers that belong to one hop (RFC 9110 7.6.1) and are not forwarded.
const HOP_BY_HOP: [&str; 7] = ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "proxy-authorization"];

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
/// at the drain deadline.
#[derive(Clone, Default)]
pub(crate) struct DrainHttp(Arc<std::sync::atomic::AtomicBool>);

impl DrainHttp {
    /// Notes the request's version (HTTP/2 seen: the connection is h2).
    pub(crate) fn saw<B>(&self, req: &http::Request<B>) -> http::Version {
        if req.version() == http::Version::HTTP_2 {
            self.0.store(true, Ordering::Relaxed);
        }
        req.version()
    }

    /// While draining, an HTTP/1.x response (not an upgrade) says the
    /// connection closes after it.
    pub(crate) fn mark<B>(&self, draining: &CancellationToken, version: http::Version, mut res: http::Response<B>) -> http::Response<B> {
        if draining.is_cancelled() && version < http::Version::HTTP_2 && res.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            res.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        res
    }

    /// Whether the connection speaks HTTP/2: it gets GOAWAY when draining
    /// starts (an HTTP/1.1 one waits for its next response instead).
    pub(crate) fn is_h2(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

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
