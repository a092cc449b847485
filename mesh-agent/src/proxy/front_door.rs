//! The first layer under telemetry on both sides: the front door
//! ([`super::http::validate`]) refuses, with 400, what a server must not
//! guess at (two `Host`s, no `Host`, `Host` against `:authority`,
//! `Content-Length` with `Transfer-Encoding`, a `#fragment`), before any
//! layer reads the request.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http::Request;
use hyper::body::Incoming;

use super::{
    PodStats,
    http::{HttpFuture, HttpService, ready, validate::FrontDoor},
    reply,
};

/// Refuses what the connection's [`FrontDoor`] saw to be ambiguous.
#[derive(Clone)]
pub(super) struct CheckFrontDoor<S> {
    /// The connection's own: it read the raw request heads.
    door: FrontDoor,
    stats: Arc<PodStats>,
    /// `inbound` or `outbound`, for the log.
    side: &'static str,
    inner: S,
}

impl<S> CheckFrontDoor<S> {
    pub(super) fn layer(door: FrontDoor, stats: Arc<PodStats>, side: &'static str) -> impl tower::Layer<S, Service = Self> + Clone {
        tower::layer::layer_fn(move |inner| CheckFrontDoor { door: door.clone(), stats: stats.clone(), side, inner })
    }
}

impl<S: HttpService> tower::Service<Request<Incoming>> for CheckFrontDoor<S> {
    type Response = http::Response<super::http::RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, req: Request<Incoming>) -> HttpFuture {
        if let Err(v) = self.door.check(&req) {
            let res = reply::refuse(&v, req.version(), &self.stats, self.side);
            return Box::pin(async move { Ok(res) });
        }
        self.inner.call(req)
    }
}
