//! The bottom of the outbound stack, once per try: pick an endpoint and
//! report how it did ([`Balance`]), bound the try ([`PerTryTimeout`]),
//! send it ([`EndpointClient`]).

use std::{
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use http::{Request, Response};
use hyper::body::Incoming;

use super::{
    Conn, Outbound, Routed,
    retry::{Answer, Failure, Try},
};
use crate::{
    proxy::{
        balance::Outcome,
        http::{BoxFuture, ready},
        http_client::{ReqBody, TryError},
        reply::ResetCause,
    },
    state::Destination,
};

/// A try with its endpoint chosen.
pub(super) struct Picked {
    pub req: Request<ReqBody>,
    pub dest: Destination,
    pub routed: Arc<Routed>,
}

type PickedFuture = BoxFuture<Result<Response<Incoming>, TryError>>;

/// What the layers under [`Balance`] are.
pub(super) trait PickedService:
    tower::Service<Picked, Response = Response<Incoming>, Error = TryError, Future = PickedFuture> + Clone + Send + 'static
{
}

impl<S> PickedService for S where
    S: tower::Service<Picked, Response = Response<Incoming>, Error = TryError, Future = PickedFuture> + Clone + Send + 'static
{
}

/// Picks the try's endpoint (least requests of two, or round robin; ejected
/// endpoints skipped), holds it as in use for the try, and reports the
/// outcome to outlier detection.
#[derive(Clone)]
pub(super) struct Balance<S> {
    outbound: Arc<Outbound>,
    inner: S,
}

impl<S> Balance<S> {
    pub(super) fn layer(outbound: Arc<Outbound>) -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(move |inner| Balance { outbound: outbound.clone(), inner })
    }
}

impl<S: PickedService> tower::Service<Try> for Balance<S> {
    type Response = Answer;
    type Error = Failure;
    type Future = BoxFuture<Result<Answer, Failure>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        ready()
    }

    fn call(&mut self, t: Try) -> Self::Future {
        let (outbound, mut inner) = (self.outbound.clone(), self.inner.clone());
        Box::pin(async move {
            let r = t.routed;
            let Some((dest, _in_use)) = outbound.balancer.pick_by(&r.endpoints, &t.exclude, r.policy.load_balancer, &r.svc.cursor) else {
                return Err(Failure { error: TryError::NoEndpointLeft, dest: None });
            };
            let result = inner.call(Picked { req: t.req, dest: dest.clone(), routed: r.clone() }).await;
            // A try the client's broken body ended says nothing of the
            // endpoint.
            if !(result.is_err() && t.fault.get().is_some())
                && let Some(o) = outcome(&result)
            {
                if let Err(e) = &result {
                    tracing::info!(endpoint = %dest.addr(), error = %e, "upstream try failed");
                }
                if outbound.balancer.report(dest.addr(), o, &r.policy.outlier_detection, &r.endpoints).is_some() {
                    r.svc.ejections.fetch_add(1, Ordering::Relaxed);
                }
            }
            match result {
                Ok(res) => Ok(Answer { res, dest }),
                Err(error) => Err(Failure { error, dest: Some(dest) }),
            }
        })
    }
}

/// Outcome of a try for outlier detection: a 5xx counts against the
/// endpoint, like a failed connection.
fn outcome(result: &Result<Response<Incoming>, TryError>) -> Option<Outcome> {
    match result {
        Ok(res) if res.status().is_server_error() => Some(Outcome::ServerError),
        Ok(_) => Some(Outcome::Success),
        Err(TryError::Connect(_) | TryError::Reset(_)) => Some(Outcome::ConnectFailure),
        // The service's own limit, not the endpoint's health.
        Err(TryError::Overflow | TryError::NoEndpointLeft) => None,
    }
}

/// The rule's per-try timeout: a try without a response head in time is a
/// reset (retried like one).
#[derive(Clone)]
pub(super) struct PerTryTimeout<S> {
    inner: S,
}

impl<S> PerTryTimeout<S> {
    pub(super) fn layer() -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(|inner| PerTryTimeout { inner })
    }
}

impl<S: PickedService> tower::Service<Picked> for PerTryTimeout<S> {
    type Response = Response<Incoming>;
    type Error = TryError;
    type Future = PickedFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), TryError>> {
        ready()
    }

    fn call(&mut self, p: Picked) -> PickedFuture {
        let limit = p.routed.retry.per_try_timeout;
        let run = self.inner.call(p);
        match limit {
            None => run,
            Some(t) => Box::pin(async move { tokio::time::timeout(t.0, run).await.unwrap_or(Err(TryError::Reset(ResetCause::PerTryTimeout(t)))) }),
        }
    }
}

/// Sends the try on a pooled connection to the endpoint, in the
/// application's HTTP version, within the service's connection limits
/// ([`Outbound::http_try`]).
#[derive(Clone)]
pub(super) struct EndpointClient {
    pub outbound: Arc<Outbound>,
    pub conn: Arc<Conn>,
}

impl tower::Service<Picked> for EndpointClient {
    type Response = Response<Incoming>;
    type Error = TryError;
    type Future = PickedFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), TryError>> {
        ready()
    }

    fn call(&mut self, p: Picked) -> PickedFuture {
        let (outbound, conn) = (self.outbound.clone(), self.conn.clone());
        Box::pin(async move {
            let r = &p.routed;
            outbound.http_try(&conn.pod, &p.dest, conn.version, &r.svc, &r.policy.circuit_breaker, p.req).await
        })
    }
}
