use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;

use super::*;

/// Each kind's status, tag and flag, written out: these are what clients,
/// dashboards and the README see.
#[test]
fn every_reply_kind_has_its_status_tag_and_flag() {
    let expected = [
        (ReplyKind::BadRequest, 400, Some("bad-request"), "DPE"),
        (ReplyKind::Denied, 403, Some("denied"), "RBAC"),
        (ReplyKind::NoEndpoint, 503, Some("no-endpoint"), "NR"),
        (ReplyKind::Overflow, 503, Some("overflow"), "UO"),
        (ReplyKind::Timeout, 504, Some("timeout"), "UT"),
        (ReplyKind::ConnectFailure, 503, Some("connect-failure"), "UF"),
        (ReplyKind::Reset, 502, Some("reset"), "UR"),
        (ReplyKind::AppUnavailable, 503, None, "-"),
        (ReplyKind::NoRoute, 404, Some("no-route"), "NR"),
        (ReplyKind::InvalidBackend, 500, Some("invalid-backend"), "NC"),
        (ReplyKind::Redirect, 302, Some("redirect"), "-"),
        (ReplyKind::FaultAbort, 500, Some("fault-abort"), "FI"),
    ];
    assert_eq!(expected.len(), ReplyKind::ALL.len(), "a kind without a row here");
    for (kind, status, tag, flag) in expected {
        assert_eq!((kind.status().as_u16(), kind.tag(), kind.flag()), (status, tag, flag), "{kind:?}");
        if let Some(t) = tag {
            assert_eq!(ReplyKind::from_tag(t.as_bytes()), Some(kind));
        }
    }
    assert_eq!(ReplyKind::from_tag(b"denied "), None);
    assert_eq!(ReplyKind::from_tag(b""), None);
}

/// One reply of each kind through the one builder: status, tag, the kind
/// in the extensions, the reason as the body.
#[tokio::test]
async fn the_builder_gives_status_tag_extension_and_body() {
    let addr: std::net::SocketAddr = "10.0.0.7:8080".parse().unwrap();
    let replies = [
        LocalReply::BadRequest(Violation::Fragment),
        LocalReply::Denied { decision: "denied by shop/deny-admin: a DENY policy matched".into() },
        LocalReply::NotAService { orig: addr },
        LocalReply::NoEndpointForRoute { service: "shop/web".into(), route: "web".into() },
        LocalReply::NoEndpointLeft,
        LocalReply::NoEndpointToUpgrade,
        LocalReply::TooManyRequests { service: "shop/web".into() },
        LocalReply::TooManyPending,
        LocalReply::Timeout { service: "shop/web".into(), timeout: RouteDuration(std::time::Duration::from_millis(250)) },
        LocalReply::ConnectFailure { endpoint: addr, source: ConnectError::TimedOut(addr) },
        LocalReply::Reset { endpoint: addr, cause: ResetCause::PerTryTimeout(RouteDuration(std::time::Duration::from_secs(1))) },
        LocalReply::AppUnavailable { target: addr, source: ConnectError::TimedOut(addr).into() },
        LocalReply::NoRouteMatched { service: "shop/web".into(), route: "shop/web".into() },
        LocalReply::InvalidBackend { service: "shop/web".into(), route: "shop/web".into(), why: "no backend".into() },
        LocalReply::Redirect { status: 302, location: "http://web/x".into() },
        LocalReply::FaultAbort { service: "shop/web".into(), route: "shop/web".into(), status: 500 },
    ];
    let mut kinds = std::collections::HashSet::new();
    for r in &replies {
        let kind = r.kind();
        kinds.insert(format!("{kind:?}"));
        let res = respond(r, Version::HTTP_11);
        assert_eq!(res.status(), kind.status(), "{r}");
        assert_eq!(res.headers().get(REPLY_HEADER).map(|v| v.to_str().unwrap()), kind.tag(), "{r}");
        assert_eq!(res.extensions().get::<MeshReply>(), Some(&MeshReply::Own(kind)), "{r}");
        assert_eq!(flags(&res), kind.flag());
        assert!(res.headers().get(http::header::CONNECTION).is_none(), "{r}");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("{r}\n").as_bytes());
    }
    assert_eq!(kinds.len(), ReplyKind::ALL.len(), "every kind built: {kinds:?}");
    let denied = respond(&replies[1], Version::HTTP_11).into_body().collect().await.unwrap().to_bytes();
    assert_eq!(denied, "RBAC: access denied (denied by shop/deny-admin: a DENY policy matched)\n".as_bytes());
    // Framing in doubt: HTTP/1 closes after the 400; HTTP/2 has nothing to close.
    let doubt = LocalReply::BadRequest(Violation::ContentLengthAndTransferEncoding);
    assert_eq!(respond(&doubt, Version::HTTP_11).headers().get(http::header::CONNECTION).unwrap(), "close");
    assert!(respond(&doubt, Version::HTTP_2).headers().get(http::header::CONNECTION).is_none());
}

type Frames = StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>>;

/// A response as an application (or anyone upstream) might send it:
/// `x-mesh-reply` in its headers and its trailers.
fn claiming(tag: &str) -> Response<Frames> {
    let mut trailers = HeaderMap::new();
    trailers.insert(REPLY_HEADER, tag.parse().unwrap());
    trailers.insert("grpc-status", "7".parse().unwrap());
    let frames = vec![Ok(Frame::data(Bytes::from_static(b"no"))), Ok(Frame::trailers(trailers))];
    let mut res = Response::new(StreamBody::new(futures::stream::iter(frames)));
    *res.status_mut() = StatusCode::FORBIDDEN;
    res.headers_mut().insert(REPLY_HEADER, tag.parse().unwrap());
    res
}

async fn trailers<B: hyper::body::Body<Data = Bytes>>(body: B) -> HeaderMap
where
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().trailers().cloned().expect("trailers")
}

/// What an application claims is never taken for the mesh's word: the
/// header and the trailer are gone, and the flags stay `-`.
#[tokio::test]
async fn an_apps_reply_header_is_removed_and_never_believed() {
    let res = from_app(claiming("denied"));
    assert!(res.headers().get(REPLY_HEADER).is_none());
    assert!(res.extensions().get::<MeshReply>().is_none());
    assert_eq!(flags(&res), "-");
    let t = trailers(res.into_body()).await;
    assert!(t.get(REPLY_HEADER).is_none(), "{t:?}");
    assert_eq!(t.get("grpc-status").unwrap(), "7", "other trailers pass");

    // From an endpoint outside the mesh, at the source: the same.
    let res = from_upstream(claiming("overflow"), false);
    assert!(res.headers().get(REPLY_HEADER).is_none());
    assert_eq!(flags(&res), "-");
    assert!(trailers(res.into_body()).await.get(REPLY_HEADER).is_none());
}

/// Over the verified tunnel the header is the destination agent's own:
/// passed on to the client and known as the peer's reply.
#[tokio::test]
async fn the_peer_agents_reply_header_is_believed() {
    let res = from_upstream(claiming("denied"), true);
    assert_eq!(res.headers().get(REPLY_HEADER).unwrap(), "denied");
    assert_eq!(res.extensions().get::<MeshReply>(), Some(&MeshReply::Peer(ReplyKind::Denied)));
    assert_eq!(flags(&res), "DPE");
    // A tag no agent sends is not believed (but passed on as sent).
    let res = from_upstream(claiming("something-else"), true);
    assert_eq!(flags(&res), "-");
    // Trailers never carry an agent's reply.
    assert!(trailers(from_upstream(claiming("denied"), true).into_body()).await.get(REPLY_HEADER).is_none());
}
