//! Upstream HTTP connections of the source-side HTTP layer, pooled per
//! (source pod, endpoint, HTTP version).
//!
//! To a mesh endpoint the connection is a CONNECT stream of the pooled mTLS
//! tunnel (the destination agent authorizes each request on it); to an
//! endpoint outside the mesh it is a TCP connection from the pod's
//! namespace. Either way it speaks what the application speaks on that port:
//! HTTP/2 connections are shared by every request, HTTP/1.1 connections
//! carry one request at a time and go back to an idle list when the
//! response has been read. Connections idle for [`IDLE_TIMEOUT`] are closed.
//! The service's circuit breaker bounds the connections (`maxConnections`):
//! past it, a request waits for one to free up, as a pending request
//! (`maxPendingRequests`), or fails fast.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Instant,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{
    Outbound, PodHandle,
    connect::{ConnectError, Upstream},
    pool::IDLE_TIMEOUT,
    reply::ResetCause,
    services::{self, ServiceState},
};
use crate::{
    route::CircuitBreaker,
    state::{AppHttp, Destination, PodKey},
};

pub type ReqBody = BoxBody<Bytes, hyper::Error>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: PodKey,
    endpoint: SocketAddr,
    version: AppHttp,
}

struct Idle<S> {
    sender: S,
    since: Instant,
    /// Requests the connection has carried (`maxRequestsPerConnection`).
    used: u32,
}

#[derive(Default)]
pub struct HttpClients {
    h2: Mutex<HashMap<Key, Idle<http2::SendRequest<ReqBody>>>>,
    h1: Mutex<HashMap<Key, Vec<Idle<http1::SendRequest<ReqBody>>>>>,
}

/// Why a try got no response.
#[derive(Debug, thiserror::Error)]
pub enum TryError {
    /// No connection to the endpoint could be made.
    #[error("{0}")]
    Connect(#[from] ConnectError),
    /// The connection or stream failed before the response head.
    #[error("{0}")]
    Reset(#[from] ResetCause),
    /// The circuit breaker's pending-request limit.
    #[error("too many pending requests")]
    Overflow,
    /// Every endpoint of the backend is ejected or excluded.
    #[error("no endpoint left to try")]
    NoEndpointLeft,
}

fn reset(e: hyper::Error) -> TryError {
    TryError::Reset(ResetCause::Http(e))
}

impl HttpClients {
    /// Closes connections nobody used for [`IDLE_TIMEOUT`] (dropping the
    /// pool's handle closes an HTTP/2 connection once no request holds it).
    pub fn reap(&self) {
        let now = Instant::now();
        self.h2.lock().expect("poisoned").retain(|_, c| crate::memory::kept(!c.sender.is_closed() && now - c.since < IDLE_TIMEOUT));
        let mut h1 = self.h1.lock().expect("poisoned");
        for list in h1.values_mut() {
            list.retain(|c| crate::memory::kept(!c.sender.is_closed() && now - c.since < IDLE_TIMEOUT));
        }
        h1.retain(|_, l| !l.is_empty());
    }

    /// Drops the pool's connections from pods or to endpoints gone from the
    /// mesh state (requests on them finish; hyper closes an HTTP/2
    /// connection once its last handle is gone).
    pub fn retain(&self, keep: impl Fn(&PodKey, SocketAddr) -> bool) {
        self.h2.lock().expect("poisoned").retain(|k, _| keep(&k.src, k.endpoint));
        self.h1.lock().expect("poisoned").retain(|k, _| keep(&k.src, k.endpoint));
    }

    /// Keys with a pooled connection (HTTP/2, HTTP/1.1).
    pub fn entries(&self) -> (usize, usize) {
        (self.h2.lock().expect("poisoned").len(), self.h1.lock().expect("poisoned").len())
    }

    /// An idle HTTP/1.1 connection and the requests it has carried.
    fn idle_h1(&self, key: &Key) -> Option<(http1::SendRequest<ReqBody>, u32)> {
        let mut h1 = self.h1.lock().expect("poisoned");
        let list = h1.get_mut(key)?;
        while let Some(c) = list.pop() {
            if c.sender.is_ready() {
                return Some((c.sender, c.used));
            }
        }
        None
    }
}

impl Outbound {
    /// Sends one try of a request to `dest` on a pooled connection (opening
    /// one if needed) and returns the response head.
    pub(super) async fn http_try(
        self: &Arc<Self>,
        pod: &PodHandle,
        dest: &Destination,
        version: AppHttp,
        svc: &Arc<ServiceState>,
        limits: &CircuitBreaker,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, TryError> {
        let key = Key { src: pod.key.clone(), endpoint: dest.addr(), version };
        match version {
            AppHttp::Http2 => {
                let spent = |used: u32| limits.max_requests_per_connection.is_some_and(|m| used >= m);
                let existing = {
                    let mut h2 = self.http_clients.h2.lock().expect("poisoned");
                    match h2.get_mut(&key) {
                        Some(c) if !c.sender.is_closed() => {
                            c.since = Instant::now();
                            c.used += 1;
                            let sender = c.sender.clone();
                            // Its last request: new ones open another
                            // connection; this one closes when it ends.
                            if spent(c.used) {
                                h2.remove(&key);
                            }
                            Some(sender)
                        }
                        _ => None,
                    }
                };
                let mut sender = match existing {
                    Some(s) => s,
                    None => {
                        let s = self.connect_h2(pod, dest, svc, limits).await?;
                        if !spent(1) {
                            self.http_clients
                                .h2
                                .lock()
                                .expect("poisoned")
                                .insert(key, Idle { sender: s.clone(), since: Instant::now(), used: 1 });
                        }
                        s
                    }
                };
                sender.ready().await.map_err(reset)?;
                sender.send_request(req).await.map_err(reset)
            }
            AppHttp::Http1 => {
                let (mut sender, used) = match self.http_clients.idle_h1(&key) {
                    Some(s) => s,
                    None => self.connect_h1(pod, dest, svc, limits, &key).await?,
                };
                let res = sender.send_request(req).await.map_err(reset)?;
                let used = used + 1;
                // Back to the idle list once the response has been read,
                // unless it has carried its share: dropped, it closes and
                // frees its slot.
                if limits.max_requests_per_connection.is_some_and(|m| used >= m) {
                    return Ok(res);
                }
                let clients = self.clone();
                let svc = svc.clone();
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        clients
                            .http_clients
                            .h1
                            .lock()
                            .expect("poisoned")
                            .entry(key)
                            .or_default()
                            .push(Idle { sender, since: Instant::now(), used });
                        svc.connection_freed.notify_waiters();
                    }
                });
                Ok(res)
            }
        }
    }

    /// A new HTTP/1.1 connection, or an idle one that freed up while this
    /// request waited for the connection limit.
    async fn connect_h1(
        &self,
        pod: &PodHandle,
        dest: &Destination,
        svc: &Arc<ServiceState>,
        limits: &CircuitBreaker,
        key: &Key,
    ) -> Result<(http1::SendRequest<ReqBody>, u32), TryError> {
        let _pending = pending_request(svc, limits)?;
        loop {
            let freed = svc.connection_freed.notified();
            if let Some(s) = self.http_clients.idle_h1(key) {
                return Ok(s);
            }
            if let Some(slot) = self.connection_slot(svc, limits) {
                let io = self.upstream_io(pod, dest).await?;
                let (sender, conn) = http1::handshake(io).await.map_err(ConnectError::Handshake)?;
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
                    }
                });
                return Ok((sender, 0));
            }
            freed.await;
        }
    }

    async fn connect_h2(
        &self,
        pod: &PodHandle,
        dest: &Destination,
        svc: &Arc<ServiceState>,
        limits: &CircuitBreaker,
    ) -> Result<http2::SendRequest<ReqBody>, TryError> {
        let _pending = pending_request(svc, limits)?;
        let slot = loop {
            let freed = svc.connection_freed.notified();
            if let Some(slot) = self.connection_slot(svc, limits) {
                break slot;
            }
            freed.await;
        };
        let io = self.upstream_io(pod, dest).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW)
            .max_frame_size(super::FRAME_SIZE)
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }

    /// A slot under the service's connection limit; closing the connection
    /// (dropping the slot) wakes requests waiting for one.
    fn connection_slot(&self, svc: &Arc<ServiceState>, limits: &CircuitBreaker) -> Option<ConnectionSlot> {
        let g = services::acquire(&svc.connections, limits.max_connections)?;
        std::mem::forget(g);
        Some(ConnectionSlot(svc.clone()))
    }

    /// Boxed: connecting (TCP, the mTLS handshake, the tunnel's HTTP/2
    /// handshake) is a large future that most requests, on a pooled
    /// connection, never run; inline, every request's future, boxed and
    /// moved layer by layer, would carry its size.
    pub(super) async fn upstream_io(&self, pod: &PodHandle, dest: &Destination) -> Result<TokioIo<Upstream>, ConnectError> {
        let trust_domain = self.inputs.state.borrow().trust_domain.clone();
        Box::pin(self.establish(pod, dest, &trust_domain)).await.map(TokioIo::new)
    }
}

/// A request waiting for a connection, counted against the service's
/// `maxPendingRequests` (past it: overflow, counted).
fn pending_request<'a>(svc: &'a ServiceState, limits: &CircuitBreaker) -> Result<services::Gauge<'a>, TryError> {
    services::acquire(&svc.pending, limits.max_pending_requests).ok_or_else(|| {
        svc.overflow_pending.fetch_add(1, Ordering::Relaxed);
        TryError::Overflow
    })
}

/// One upstream connection counted against the service's limit.
struct ConnectionSlot(Arc<ServiceState>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.connection_freed.notify_waiters();
    }
}
