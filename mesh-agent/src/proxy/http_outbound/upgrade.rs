//! HTTP/1.1 `Upgrade` (WebSocket and the like) to an HTTP/1.1 application:
//! sent once, on a connection of its own; on `101` the two upgraded
//! connections are joined and carry bytes until either side closes. No
//! retries and no route timeout (the exchange is long-lived by nature), so
//! this layer sits above both and takes upgrades out of the stack.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::{Conn, Outbound, answered, local, routed, upstream_response};
use crate::{
    proxy::{
        http::{HttpFuture, HttpService, RespBody, is_upgrade, join_upgraded, ready, to_app_version},
        reply::LocalReply,
    },
    state::AppHttp,
};

#[derive(Clone)]
pub(super) struct Upgrades<S> {
    outbound: Arc<Outbound>,
    conn: Arc<Conn>,
    inner: S,
}

impl<S> Upgrades<S> {
    pub(super) fn layer(outbound: Arc<Outbound>, conn: Arc<Conn>) -> impl tower::Layer<S, Service = Self> {
        tower::layer::layer_fn(move |inner| Upgrades { outbound: outbound.clone(), conn: conn.clone(), inner })
    }
}

impl<S: HttpService> tower::Service<Request<Incoming>> for Upgrades<S> {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        ready()
    }

    fn call(&mut self, req: Request<Incoming>) -> HttpFuture {
        if !(is_upgrade(&req) && self.conn.version == AppHttp::Http1) {
            return self.inner.call(req);
        }
        let (outbound, conn) = (self.outbound.clone(), self.conn.clone());
        Box::pin(async move { Ok(upgrade(&outbound, &conn, req).await) })
    }
}

async fn upgrade(outbound: &Arc<Outbound>, conn: &Conn, mut req: Request<Incoming>) -> Response<RespBody> {
    let r = routed(&req);
    let Some((dest, _in_use)) = outbound.balancer.pick_by(&r.endpoints, &[], r.policy.load_balancer, &r.svc.cursor) else {
        return local(LocalReply::NoEndpointToUpgrade);
    };
    let downstream = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    to_app_version(&mut parts, conn.version, conn.orig);
    if let Some(p) = protocol {
        parts.headers.insert(header::UPGRADE, p);
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let io = match outbound.upstream_io(&conn.pod, &dest).await {
        Ok(io) => io,
        Err(source) => return answered(local(LocalReply::ConnectFailure { endpoint: dest.addr(), source }), Some(dest)),
    };
    let sent = async {
        let (mut sender, c) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(c.with_upgrades());
        sender.send_request(Request::from_parts(parts, body.boxed())).await
    };
    let mut res = match sent.await {
        Ok(r) => r,
        Err(source) => return answered(local(LocalReply::UpgradeFailed { endpoint: dest.addr(), source }), Some(dest)),
    };
    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut res);
        outbound.inputs.connections.spawn(join_upgraded(downstream, upstream));
    }
    answered(upstream_response(res, &dest), Some(dest))
}
