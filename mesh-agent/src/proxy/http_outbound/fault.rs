//! Istio fault injection (`VirtualService` `http[].fault`), applied by the
//! source agent as Envoy's fault filter is by the client's sidecar: for
//! the abort's share of requests the fault's status is answered here
//! (`fault-abort`, flag `FI`) and nothing is forwarded; for the delay's
//! share the request waits `fixedDelay` first. Each share is drawn on its
//! own, so a request can be delayed and then aborted.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use hyper::body::Incoming;

use super::{Outbound, Routed, local};
use crate::proxy::{
    http::{HttpFuture, HttpService, RespBody, ready},
    reply::LocalReply,
};

#[derive(Clone)]
pub(super) struct Fault<S> {
    outbound: Arc<Outbound>,
    inner: S,
}

impl<S> Fault<S> {
    pub(super) fn layer(outbound: Arc<Outbound>) -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(move |inner| Fault { outbound: outbound.clone(), inner })
    }
}

impl<S: HttpService + Clone> tower::Service<Request<Incoming>> for Fault<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, req: Request<Incoming>) -> HttpFuture {
        // Most rules inject nothing: that costs one look at the decision.
        let Some(r) = req.extensions().get::<Arc<Routed>>().filter(|r| r.fault.is_some()).cloned() else {
            return self.inner.call(req);
        };
        let fault = r.fault.as_ref().expect("filtered above");
        let balancer = &self.outbound.balancer;
        let delay = fault.delay.as_ref().filter(|d| balancer.chance(d.per_million)).map(|d| d.fixed.0);
        let abort = fault.abort.as_ref().filter(|a| balancer.chance(a.per_million)).map(|a| a.status);
        let answer = abort.map(|status| {
            tracing::debug!(service = %r.service, route = %r.route, status, "fault injection: abort");
            LocalReply::FaultAbort { service: r.service.clone(), route: r.route.clone(), status }
        });
        match (delay, answer) {
            (None, None) => self.inner.call(req),
            (None, Some(a)) => Box::pin(async move { Ok(local(a)) }),
            (Some(d), answer) => {
                // The inner service is called after the pause: a clone, so
                // this one stays ready for the connection's next request.
                let mut inner = self.inner.clone();
                Box::pin(async move {
                    tracing::debug!(delay = ?d, "fault injection: delay");
                    tokio::time::sleep(d).await;
                    match answer {
                        Some(a) => Ok(local(a)),
                        None => inner.call(req).await,
                    }
                })
            }
        }
    }
}
