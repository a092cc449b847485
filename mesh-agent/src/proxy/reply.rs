//! The answers the mesh makes itself, in one place: what each one is
//! ([`ReplyKind`]: its HTTP status, `x-mesh-reply` tag and Istio response
//! flag), why it was made ([`LocalReply`], a typed error with the text an
//! operator reads in the body), and the one builder that turns it into a
//! response ([`respond`]).
//!
//! Within an agent a reply is known by its [`MeshReply`] in the response's
//! extensions, never by reading `x-mesh-reply` back: the header is for the
//! client and the operator. Across agents it is the only thing the source
//! agent can go by, so it is believed only where nobody else can write it:
//! - the destination agent removes any `x-mesh-reply` an application sends
//!   (headers and trailers, [`from_app`]), so on a response from a
//!   destination agent the header is that agent's own;
//! - the source agent believes it only on a response that came over the mTLS
//!   tunnel from a verified peer agent ([`from_upstream`]); on a response
//!   from an endpoint outside the mesh it is removed like the app's.
//!
//! Without this an application could make its own 403 look like a mesh
//! policy denial, or its 503 like a circuit breaker's, in the client's eyes
//! and in both agents' metrics.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, SizeHint};

use super::{
    connect::{AppError, ConnectError},
    http::validate::Violation,
};
use crate::route::RouteDuration;

/// The header naming why the agent answered itself.
pub const REPLY_HEADER: &str = "x-mesh-reply";

/// The body of the agents' HTTP servers.
pub(super) type ReplyBody = BoxBody<Bytes, hyper::Error>;

/// Every kind of answer an agent makes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// The front door refused the request (either agent).
    BadRequest,
    /// Authorization policy denied the request (destination agent).
    Denied,
    /// No endpoint for the request (source agent).
    NoEndpoint,
    /// A circuit breaker limit (source agent).
    Overflow,
    /// The route's timeout (source agent).
    Timeout,
    /// No connection to the endpoint (source agent).
    ConnectFailure,
    /// The endpoint's connection failed before the response (source agent).
    Reset,
    /// The application did not answer (destination agent).
    AppUnavailable,
    /// Gateway API routes are attached to the service and none matched
    /// (source agent).
    NoRoute,
    /// The selected rule's backend is an invalid reference, or the rule has
    /// none (source agent; Gateway API requires a 500).
    InvalidBackend,
    /// A Gateway API `RequestRedirect` (source agent): the status is the
    /// filter's (301, 302, 303, 307, 308), `Location` the target.
    Redirect,
    /// An Istio fault injection abort (source agent): the status is the
    /// fault's `httpStatus`.
    FaultAbort,
}

impl ReplyKind {
    pub const ALL: [ReplyKind; 12] = [
        Self::BadRequest,
        Self::Denied,
        Self::NoEndpoint,
        Self::Overflow,
        Self::Timeout,
        Self::ConnectFailure,
        Self::Reset,
        Self::AppUnavailable,
        Self::NoRoute,
        Self::InvalidBackend,
        Self::Redirect,
        Self::FaultAbort,
    ];

    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Denied => StatusCode::FORBIDDEN,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Reset => StatusCode::BAD_GATEWAY,
            Self::NoEndpoint | Self::Overflow | Self::ConnectFailure | Self::AppUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::InvalidBackend => StatusCode::INTERNAL_SERVER_ERROR,
            // The filter's default; the reply carries its own.
            Self::Redirect => StatusCode::FOUND,
            // Likewise the fault's.
            Self::FaultAbort => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `x-mesh-reply` value. The destination agent's 503 for an app
    /// that did not answer has never carried one (the source retries it as
    /// any 503), and still does not.
    pub fn tag(self) -> Option<&'static str> {
        Some(match self {
            Self::BadRequest => "bad-request",
            Self::Denied => "denied",
            Self::NoEndpoint => "no-endpoint",
            Self::Overflow => "overflow",
            Self::Timeout => "timeout",
            Self::ConnectFailure => "connect-failure",
            Self::Reset => "reset",
            Self::NoRoute => "no-route",
            Self::InvalidBackend => "invalid-backend",
            Self::Redirect => "redirect",
            Self::FaultAbort => "fault-abort",
            Self::AppUnavailable => return None,
        })
    }

    /// The kind a tag names.
    pub fn from_tag(tag: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.tag().is_some_and(|t| t.as_bytes() == tag))
    }

    /// The `response_flags` the agent that made the reply reports (Envoy's
    /// names; `-` where today's metrics have never flagged it).
    pub fn flag(self) -> &'static str {
        match self {
            Self::BadRequest => "DPE",
            Self::Denied => "RBAC",
            Self::NoEndpoint => "NR",
            Self::Overflow => "UO",
            Self::Timeout => "UT",
            Self::ConnectFailure => "UF",
            Self::Reset => "UR",
            Self::NoRoute => "NR",
            Self::InvalidBackend => "NC",
            Self::FaultAbort => "FI",
            Self::Redirect | Self::AppUnavailable => "-",
        }
    }
}

/// In a response's extensions: the mesh, not an application, answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshReply {
    /// This agent answered.
    Own(ReplyKind),
    /// The destination agent answered, over the mTLS tunnel.
    Peer(ReplyKind),
}

impl MeshReply {
    /// The `response_flags` this agent reports for the response.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Own(kind) => kind.flag(),
            // The source agent has always reported its peer's answers (a
            // denial, a refused request) as DPE; the destination agent's
            // own report carries the precise flag.
            Self::Peer(_) => "DPE",
        }
    }
}

/// The `response_flags` of a response: `-` unless the mesh answered.
pub(super) fn flags<B>(res: &Response<B>) -> &'static str {
    res.extensions().get::<MeshReply>().map_or("-", |r| r.flag())
}

/// An answer the agent makes itself, and why: its text is the reply's body.
#[derive(Debug, thiserror::Error)]
pub enum LocalReply {
    #[error("bad request: {0}")]
    BadRequest(#[from] Violation),
    /// `decision`: the policy decision, as policy words it.
    #[error("RBAC: access denied ({decision})")]
    Denied { decision: String },
    #[error("{orig} is no longer a service address")]
    NotAService { orig: SocketAddr },
    #[error("no endpoint of {service} for route {route}")]
    NoEndpointForRoute { service: String, route: String },
    #[error("no endpoint left to try")]
    NoEndpointLeft,
    #[error("no endpoint to upgrade to")]
    NoEndpointToUpgrade,
    #[error("{service}: too many requests (maxRequests)")]
    TooManyRequests { service: String },
    #[error("too many pending requests (maxPendingRequests)")]
    TooManyPending,
    #[error("{service}: no response within {timeout}")]
    Timeout { service: String, timeout: RouteDuration },
    #[error("upstream connect to {endpoint} failed: {source}")]
    ConnectFailure { endpoint: SocketAddr, source: ConnectError },
    #[error("upstream {endpoint} reset before the response: {cause}")]
    Reset { endpoint: SocketAddr, cause: ResetCause },
    #[error("upgrade to {endpoint} failed: {source}")]
    UpgradeFailed { endpoint: SocketAddr, source: hyper::Error },
    #[error("upstream {target} unavailable: {source}")]
    AppUnavailable { target: SocketAddr, source: AppError },
    #[error("no rule of the routes of {service} matches (route {route})")]
    NoRouteMatched { service: String, route: String },
    #[error("route {route} of {service}: {why}")]
    InvalidBackend { service: String, route: String, why: String },
    /// `status` is one of 301, 302, 303, 307, 308 (validated with the route).
    #[error("redirected to {location}")]
    Redirect { status: u16, location: String },
    /// `status` is 200-599 (validated with the VirtualService).
    #[error("fault filter abort ({service}, route {route})")]
    FaultAbort { service: String, route: String, status: u16 },
}

/// Why an upstream exchange ended before its response head.
#[derive(Debug, thiserror::Error)]
pub enum ResetCause {
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("no response within the per-try timeout {0}")]
    PerTryTimeout(RouteDuration),
}

impl LocalReply {
    pub fn kind(&self) -> ReplyKind {
        match self {
            Self::BadRequest(_) => ReplyKind::BadRequest,
            Self::Denied { .. } => ReplyKind::Denied,
            Self::NotAService { .. } | Self::NoEndpointForRoute { .. } | Self::NoEndpointLeft | Self::NoEndpointToUpgrade => ReplyKind::NoEndpoint,
            Self::TooManyRequests { .. } | Self::TooManyPending => ReplyKind::Overflow,
            Self::Timeout { .. } => ReplyKind::Timeout,
            Self::ConnectFailure { .. } => ReplyKind::ConnectFailure,
            Self::Reset { .. } | Self::UpgradeFailed { .. } => ReplyKind::Reset,
            Self::AppUnavailable { .. } => ReplyKind::AppUnavailable,
            Self::NoRouteMatched { .. } => ReplyKind::NoRoute,
            Self::InvalidBackend { .. } => ReplyKind::InvalidBackend,
            Self::Redirect { .. } => ReplyKind::Redirect,
            Self::FaultAbort { .. } => ReplyKind::FaultAbort,
        }
    }

    /// The kind's status, or the redirect's own.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Redirect { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND),
            Self::FaultAbort { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            _ => self.kind().status(),
        }
    }

    /// The connection cannot be trusted to frame the next request.
    fn closes(&self) -> bool {
        matches!(self, Self::BadRequest(v) if v.closes())
    }
}

/// The one builder of the agent's own answers: the kind's status, the
/// reason as a text body, `x-mesh-reply` for the client, [`MeshReply`] for
/// this agent's metrics, and `Connection: close` on HTTP/1 when the
/// request's framing is in doubt.
pub(super) fn respond(reply: &LocalReply, version: Version) -> Response<ReplyBody> {
    let kind = reply.kind();
    let body = Full::new(Bytes::from(format!("{reply}\n"))).map_err(|never| match never {}).boxed();
    let mut r = Response::new(body);
    *r.status_mut() = reply.status();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let LocalReply::Redirect { location, .. } = reply
        && let Ok(v) = HeaderValue::from_str(location)
    {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(tag) = kind.tag() {
        r.headers_mut().insert(REPLY_HEADER, HeaderValue::from_static(tag));
    }
    if reply.closes() && version <= Version::HTTP_11 {
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r.extensions_mut().insert(MeshReply::Own(kind));
    r
}

/// The 400 for `v` (`Connection: close` on HTTP/1 when the framing is in
/// doubt), counted in `stats` and logged.
pub(in crate::proxy) fn refuse(v: &Violation, version: Version, stats: &super::PodStats, side: &str) -> Response<ReplyBody> {
    stats.http_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(side, reason = %v, "request refused: malformed or ambiguous");
    respond(&LocalReply::BadRequest(v.clone()), version)
}

/// An application's response on its way to the client: whatever
/// `x-mesh-reply` it claims is removed, from its headers now and from its
/// trailers as they pass.
pub(super) fn from_app<B>(mut res: Response<B>) -> Response<NoReplyTrailers<B>> {
    if res.headers_mut().remove(REPLY_HEADER).is_some() {
        tracing::debug!("x-mesh-reply sent by an application removed");
    }
    res.map(|inner| NoReplyTrailers { inner })
}

/// A response from an upstream of the source agent. `from_peer_agent`: it
/// came over the mTLS tunnel from the destination's agent (whose
/// certificate was verified), so its `x-mesh-reply` is that agent's own and
/// says what it answered; from anyone else the header is removed.
pub(super) fn from_upstream<B>(mut res: Response<B>, from_peer_agent: bool) -> Response<NoReplyTrailers<B>> {
    if !from_peer_agent {
        return from_app(res);
    }
    if let Some(kind) = res.headers().get(REPLY_HEADER).and_then(|v| ReplyKind::from_tag(v.as_bytes())) {
        res.extensions_mut().insert(MeshReply::Peer(kind));
    }
    res.map(|inner| NoReplyTrailers { inner })
}

/// A response body whose trailers lose any `x-mesh-reply` (no agent sends
/// one there, so only an application can have).
pub(super) struct NoReplyTrailers<B> {
    inner: B,
}

impl<B: Body<Data = Bytes> + Unpin> Body for NoReplyTrailers<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) if frame.is_trailers() => {
                let mut trailers: HeaderMap = frame.into_trailers().unwrap_or_default();
                trailers.remove(REPLY_HEADER);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
