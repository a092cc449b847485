//! The admin listener: `/healthz`, `/ready`, `/status`, `/metrics`
//! (OpenMetrics text; Prometheus reads it), `/config_dump` (the mesh state
//! the agent enforces, as JSON: it holds no private key, only public
//! certificate facts), `/logging` (GET: the log filter; POST `?level=SPEC`:
//! change it, see [`crate::logging`]). Loopback only by default, on the control runtime so a
//! busy data plane cannot starve it (nor it the data plane).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the admin endpoints show; implemented by the app.
pub trait AdminSource: Send + Sync + 'static {
    fn ready(&self) -> bool;
    fn status(&self) -> serde_json::Value;
    fn metrics(&self) -> String;
    fn config_dump(&self) -> serde_json::Value;
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// What a listener serves: everything (loopback admin), or only what a
/// scraper, the kubelet and `mesh-agent status --all-nodes` (through the
/// API server's pod proxy) need (`--metrics`, reachable from the network).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Admin,
    /// GET `/metrics`, `/healthz`, `/ready`, `/status`.
    Public,
}

static ADMIN_ACCEPT_LOG: crate::fdlimit::RateLimited = crate::fdlimit::RateLimited::new(std::time::Duration::from_secs(5));

pub async fn serve(listener: TcpListener, source: Arc<dyn AdminSource>, scope: Scope) {
    // A spare descriptor, so the admin still answers when the data plane
    // has used every descriptor the process may have.
    let mut reserve = crate::fdlimit::Reserve::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                reserve.refill();
                stream
            }
            Err(e) if crate::fdlimit::is_exhaustion(&e) && reserve.release() => {
                // The spare's slot is free now: take the waiting connection.
                continue;
            }
            Err(e) => {
                if let Some(suppressed) = ADMIN_ACCEPT_LOG.hit(std::time::Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "admin listener: accept failed; backing off");
                }
                tokio::time::sleep(crate::fdlimit::EXHAUSTED_BACKOFF).await;
                reserve.refill();
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let source = source.clone();
                async move {
                    // Read-only and secret-free; changing the log filter and
                    // the config dump stay on loopback.
                    let public = req.method() == http::Method::GET && matches!(req.uri().path(), "/metrics" | "/healthz" | "/ready" | "/status");
                    if scope == Scope::Public && !public {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"not found: this port serves GET /metrics, /healthz, /ready and /status\n")));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        return Ok::<_, Infallible>(r);
                    }
                    Ok::<_, Infallible>(route(&req, &*source))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn route(req: &Request<Incoming>, source: &dyn AdminSource) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &str| {
        let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
        *r.status_mut() = status;
        r
    };
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&http::Method::GET, "/ready") => {
            if source.ready() {
                text(StatusCode::OK, "ready")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready")
            }
        }
        (&http::Method::GET, "/status") => json(&source.status()),
        (&http::Method::GET, "/config_dump") => json(&source.config_dump()),
        (&http::Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(source.metrics())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        (&http::Method::GET, "/logging") => text(StatusCode::OK, &crate::logging::level().unwrap_or_default()),
        (&http::Method::POST, "/logging") => {
            let level = req
                .uri()
                .query()
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("level="));
            match level {
                None => text(StatusCode::BAD_REQUEST, "POST /logging?level=SPEC (e.g. debug, or info,mesh_agent::proxy=debug)"),
                Some(l) => {
                    let l = l.replace("%2C", ",").replace("%3A", ":").replace("%3D", "=");
                    match crate::logging::set_level(&l) {
                        Ok(()) => text(StatusCode::OK, &l),
                        Err(e) => text(StatusCode::BAD_REQUEST, &e),
                    }
                }
            }
        }
        (_, "/healthz" | "/ready" | "/status" | "/config_dump" | "/metrics" | "/logging") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /ready, /status, /metrics, /config_dump, /logging"),
    }
}

#[cfg(test)]
mod tests;
