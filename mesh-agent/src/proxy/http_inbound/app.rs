//! The bottom of the inbound stack: the request delivered to the pod's
//! application, on connections the agent keeps to it ([`AppConnections`]),
//! in the version the application speaks.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Conn;
use crate::{
    proxy::{
        Inbound,
        connect::AppError,
        http::{HttpFuture, RespBody, is_upgrade, join_upgraded, ready, to_app_version, validate::{BodyFault, ClientBody}},
        reply::{self, LocalReply},
    },
    state::AppHttp,
};

/// Connections from the agent to the apps of this node's pods, shared by
/// every downstream connection (an app sees a few keep-alive connections
/// from its agent rather than one per client connection): per (pod network
/// namespace, app address), one HTTP/2 connection for all requests, or
/// HTTP/1.1 connections carrying one request at a time that go back to an
/// idle list once the response has been read. Idle for
/// [`crate::proxy::pool::IDLE_TIMEOUT`]: closed.
#[derive(Default)]
pub(in crate::proxy) struct AppConnections {
    h2: std::sync::Mutex<HashMap<AppKey, H2Sender>>,
    /// Idle connections, each with the time it went idle.
    h1: std::sync::Mutex<HashMap<AppKey, Vec<(H1Sender, Instant)>>>,
}

type H1Sender = hyper::client::conn::http1::SendRequest<ClientBody>;
type H2Sender = hyper::client::conn::http2::SendRequest<ClientBody>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AppKey {
    /// The pod's network ([`crate::proxy::PodSockets::network`]): a pod
    /// re-created with the same address is another key.
    network: u64,
    target: SocketAddr,
}

impl AppConnections {
    /// Closes HTTP/1.1 connections idle for too long, and forgets closed
    /// HTTP/2 ones.
    pub fn reap(&self) {
        let now = Instant::now();
        self.h2.lock().expect("poisoned").retain(|_, s| !s.is_closed());
        let mut h1 = self.h1.lock().expect("poisoned");
        for list in h1.values_mut() {
            list.retain(|(s, since)| crate::memory::kept(!s.is_closed() && now - *since < crate::proxy::pool::IDLE_TIMEOUT));
        }
        h1.retain(|_, l| !l.is_empty());
    }

    /// Keys with a pooled connection (HTTP/2, HTTP/1.1).
    pub fn entries(&self) -> (usize, usize) {
        (self.h2.lock().expect("poisoned").len(), self.h1.lock().expect("poisoned").len())
    }

    fn idle_h1(&self, key: &AppKey) -> Option<H1Sender> {
        let mut h1 = self.h1.lock().expect("poisoned");
        let list = h1.get_mut(key)?;
        while let Some((s, _)) = list.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }
}

/// Forwards the request to the application and its response back: an
/// upgrade joined on `101`, the app's `x-mesh-reply` removed, 503
/// `app-unavailable` when it does not answer (400 when the client's body
/// broke instead).
#[derive(Clone)]
pub(super) struct App {
    pub inbound: Arc<Inbound>,
    pub conn: Arc<Conn>,
}

impl tower::Service<Request<Incoming>> for App {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, mut req: Request<Incoming>) -> HttpFuture {
        let (inbound, conn) = (self.inbound.clone(), self.conn.clone());
        Box::pin(async move {
            let downstream = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
            let version = req.version();
            let fault = BodyFault::default();
            let req = req.map(|b| ClientBody::new(b, fault.clone(), true));
            Ok(match inbound.forward(&conn, req).await {
                Ok(mut res) => {
                    if let Some(down) = downstream
                        && res.status() == StatusCode::SWITCHING_PROTOCOLS
                    {
                        let up = hyper::upgrade::on(&mut res);
                        inbound.inputs.connections.spawn(join_upgraded(down, up));
                    }
                    reply::from_app(res).map(|b| b.boxed())
                }
                // The client's body broke (bad chunk syntax, or it went away):
                // the app is not to blame.
                Err(source) => match fault.get() {
                    Some(v) => reply::refuse(&v, version, &conn.pod.stats, "inbound"),
                    None => {
                        tracing::info!(pod = %conn.pod.key, target = %conn.target, error = %source, "the application did not answer");
                        reply::respond(&LocalReply::AppUnavailable { target: conn.target, source }, version)
                    }
                },
            })
        })
    }
}

impl Inbound {
    async fn forward(self: &Arc<Self>, conn: &Conn, req: Request<ClientBody>) -> Result<Response<Incoming>, AppError> {
        // An upgrade keeps the header that asks for it (hop-by-hop, so
        // the translation drops it).
        let upgrade = (conn.app == AppHttp::Http1 && is_upgrade(&req)).then(|| req.headers().get(http::header::UPGRADE).cloned()).flatten();
        let (mut parts, body) = req.into_parts();
        to_app_version(&mut parts, conn.app, conn.target);
        if let Some(protocol) = upgrade {
            parts.headers.insert(http::header::UPGRADE, protocol);
            parts.headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("upgrade"));
        }
        let req = Request::from_parts(parts, body);
        let key = AppKey { network: conn.pod.sockets.network(), target: conn.target };
        let apps = &self.app_connections;
        if conn.app == AppHttp::Http2 {
            let existing = apps.h2.lock().expect("poisoned").get(&key).filter(|s| !s.is_closed()).cloned();
            let mut s = match existing {
                Some(s) => s,
                None => {
                    let (tcp, slot) = self.connect_app(&conn.pod, conn.target).await?;
                    let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
                    tokio::spawn(async move {
                        let _slot = slot;
                        let _ = c.await;
                    });
                    apps.h2.lock().expect("poisoned").insert(key, s.clone());
                    s
                }
            };
            s.ready().await?;
            return Ok(s.send_request(req).await?);
        }
        let mut s = match apps.idle_h1(&key) {
            Some(s) => s,
            None => {
                let (tcp, slot) = self.connect_app(&conn.pod, conn.target).await?;
                let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(async move {
                    let _slot = slot;
                    let _ = c.with_upgrades().await;
                });
                s
            }
        };
        let res = s.send_request(req).await?;
        // Back to the idle list once the response has been read (an
        // upgraded connection never is: it belongs to its client).
        let this = self.clone();
        tokio::spawn(async move {
            if s.ready().await.is_ok() {
                this.app_connections.h1.lock().expect("poisoned").entry(key).or_default().push((s, Instant::now()));
            }
        });
        Ok(res)
    }
}
