//! Retries: the request is put in the application's HTTP version once, its
//! body kept when it may be sent again, and each try handed to the layers
//! below ([`super::endpoint`]) until one answers or the route's retry
//! policy says stop.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Incoming};

use super::{Conn, MAX_RETRY_BODY, Outbound, Routed, answered, local, routed};
use crate::{
    proxy::{
        http::{HttpFuture, RespBody, ready, strip_hop_by_hop, to_app_version, validate::{BodyFault, ClientBody, Violation}},
        http_client::{ReqBody, TryError},
        reply::{self, LocalReply},
        services,
    },
    route::RetryOn,
    state::Destination,
};

/// One try of a request, for the layers under [`Retry`].
pub(super) struct Try {
    pub req: Request<ReqBody>,
    /// Endpoints not to pick (tried already, while untried ones remain).
    pub exclude: Vec<SocketAddr>,
    pub routed: Arc<Routed>,
    /// Set when the client's body broke under way: then the failure is the
    /// client's, not the endpoint's.
    pub fault: BodyFault,
}

/// A try's response head, and the endpoint that sent it.
pub(super) struct Answer {
    pub res: Response<Incoming>,
    pub dest: Destination,
}

/// Why a try got no response, and the endpoint it went to (none: no
/// endpoint was left to pick).
pub(super) struct Failure {
    pub error: TryError,
    pub dest: Option<Destination>,
}

/// What the layers under [`Retry`] are: a try in, an answer or a failure
/// out.
pub(super) trait TryService:
    tower::Service<Try, Response = Answer, Error = Failure, Future = crate::proxy::http::BoxFuture<Result<Answer, Failure>>> + Clone + Send + 'static
{
}

impl<S> TryService for S where
    S: tower::Service<Try, Response = Answer, Error = Failure, Future = crate::proxy::http::BoxFuture<Result<Answer, Failure>>>
        + Clone
        + Send
        + 'static
{
}

/// Sends a request's tries and decides, after each, whether another one
/// may follow: retryable outcome, attempts left, budget, a kept body.
#[derive(Clone)]
pub(super) struct Retry<S> {
    outbound: Arc<Outbound>,
    conn: Arc<Conn>,
    inner: S,
}

impl<S> Retry<S> {
    pub(super) fn layer(outbound: Arc<Outbound>, conn: Arc<Conn>) -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(move |inner| Retry { outbound: outbound.clone(), conn: conn.clone(), inner })
    }
}

impl<S: TryService> tower::Service<Request<Incoming>> for Retry<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, req: Request<Incoming>) -> HttpFuture {
        let (outbound, conn, inner) = (self.outbound.clone(), self.conn.clone(), self.inner.clone());
        Box::pin(async move { Ok(send(&outbound, &conn, inner, req).await) })
    }
}

async fn send<S: TryService>(outbound: &Outbound, conn: &Conn, mut inner: S, req: Request<Incoming>) -> Response<RespBody> {
    let r = routed(&req);
    let retry = &r.retry;
    let (mut parts, body) = req.into_parts();
    let client_version = parts.version;
    to_app_version(&mut parts, conn.version, conn.orig);
    // Keep the body for retries when it is small and the method may be
    // retried at all; otherwise stream it through once.
    let len = body.size_hint().upper();
    let keep = retry.allows_method(&parts.method) && len.is_some_and(|l| l <= MAX_RETRY_BODY);
    let mut streamed = None;
    let fault = BodyFault::default();
    let kept = if keep {
        match body.collect().await {
            Ok(b) => Some(b.to_bytes()),
            Err(e) => return reply::refuse(&Violation::Body(crate::error_chain(&e)), client_version, &conn.pod.stats, "outbound"),
        }
    } else {
        streamed = Some(ClientBody::new(body, fault.clone(), false));
        None
    };
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retries = 0u32;
    let mut _retrying: Option<services::Gauge<'_>> = None;
    loop {
        let body: ReqBody = match (&kept, streamed.take()) {
            (Some(b), _) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
            (None, Some(s)) => s.boxed(),
            (None, None) => unreachable!("a streamed body is only sent once: retries need a kept body"),
        };
        let mut req = Request::from_parts(parts.clone(), body);
        *req.extensions_mut() = http::Extensions::new();
        // A retry prefers an endpoint not tried yet.
        let exclude = if tried.len() < r.endpoints.len() { tried.clone() } else { Vec::new() };
        let result = inner.call(Try { req, exclude, routed: r.clone(), fault: fault.clone() }).await;
        let dest = match &result {
            Ok(a) => Some(a.dest.clone()),
            Err(f) => f.dest.clone(),
        };
        let Some(dest) = dest else {
            return local(LocalReply::NoEndpointLeft);
        };
        tried.push(dest.addr());
        // The client's body broke under way: its fault, not the
        // endpoint's (no retry, no 5xx).
        if result.is_err()
            && let Some(v) = fault.get()
        {
            return answered(reply::refuse(&v, client_version, &conn.pod.stats, "outbound"), Some(dest));
        }
        let (cause, outcome) = match result {
            Ok(a) => (RetryOn::Status(u32::from(a.res.status().as_u16())), Ok(a.res)),
            Err(Failure { error: TryError::Overflow, .. }) => {
                tracing::info!(endpoint = %dest.addr(), "circuit breaker: too many pending requests");
                return answered(local(LocalReply::TooManyPending), Some(dest));
            }
            Err(Failure { error: TryError::Connect(source), .. }) => {
                (RetryOn::ConnectFailure, Err(LocalReply::ConnectFailure { endpoint: dest.addr(), source }))
            }
            Err(Failure { error: TryError::Reset(cause), .. }) => (RetryOn::Reset, Err(LocalReply::Reset { endpoint: dest.addr(), cause })),
            Err(Failure { error: TryError::NoEndpointLeft, .. }) => return answered(local(LocalReply::NoEndpointLeft), Some(dest)),
        };
        let may_retry = kept.is_some()
            && retries < retry.attempts
            && retry.retries_on(cause)
            && retry.budget_allows(r.svc.active.load(Ordering::Relaxed), r.svc.retries_in_flight.load(Ordering::Relaxed));
        if !may_retry {
            let res = match outcome {
                Ok(mut res) => {
                    strip_hop_by_hop(res.headers_mut());
                    super::upstream_response(res, &dest)
                }
                Err(r) => local(r),
            };
            return answered(res, Some(dest));
        }
        drop(outcome);
        r.svc.retries.fetch_add(1, Ordering::Relaxed);
        _retrying = Some(services::enter(&r.svc.retries_in_flight));
        tracing::debug!(endpoint = %dest.addr(), %cause, retry = retries + 1, "retrying");
        let pause: Duration = retry.backoff(retries, outbound.balancer.random() as u32);
        tokio::time::sleep(pause).await;
        retries += 1;
    }
}
