//! Generations seen from the wire: a client writing raw bytes (so that it
//! controls how requests are split and pipelined) against the agent's
//! HTTP/1.1 server, with an app stack that answers each request with what
//! it saw. Every exchange must read exactly as it would from one hyper
//! connection; the count of parks says the buffers were let go.

use std::{convert::Infallible, task::Poll, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio_util::sync::CancellationToken;

use super::super::{HttpFuture, RespBody, Serve};
use crate::proxy::sniff;

fn body(s: impl Into<Bytes>) -> RespBody {
    Full::new(s.into()).map_err(|never| match never {}).boxed()
}

/// The app: `/echo` answers with the request's method, path and body;
/// `/early` answers before reading the body and drops it; `/late` answers
/// at once and reads the body afterwards; `/head` answers 204; `/upgrade`
/// switches to an echo of raw bytes.
#[derive(Clone)]
struct App;

impl tower::Service<Request<Incoming>> for App {
    type Response = Response<RespBody>;
    type Error = Infallible;
    type Future = HttpFuture;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        super::super::ready()
    }

    fn call(&mut self, mut req: Request<Incoming>) -> HttpFuture {
        Box::pin(async move {
            let what = format!("{} {}", req.method(), req.uri().path());
            Ok(match req.uri().path() {
                "/early" => Response::new(body(what)),
                "/late" => {
                    let (_, incoming) = req.into_parts();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = incoming.collect().await;
                    });
                    Response::new(body(what))
                }
                "/head" => Response::builder().status(StatusCode::NO_CONTENT).body(body("")).unwrap(),
                "/upgrade" => {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(up) = on.await {
                            let mut up = hyper_util::rt::TokioIo::new(up);
                            let mut b = [0u8; 64];
                            while let Ok(n @ 1..) = up.read(&mut b).await {
                                if up.write_all(&b[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    });
                    Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(body(""))
                        .unwrap()
                }
                _ => {
                    let got = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    Response::new(body(format!("{what} {}", String::from_utf8_lossy(&got))))
                }
            })
        })
    }
}

/// A served connection: the client's end and the server's outcome (its
/// result as text, and how many times it parked).
struct Wire {
    io: DuplexStream,
    buf: Vec<u8>,
    server: tokio::task::JoinHandle<(Result<(), String>, u32)>,
}

fn serve_with(draining: CancellationToken) -> Wire {
    let (io, server) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let Some((_, io)) = sniff::http_version(server).await.unwrap() else { return (Ok(()), 0) };
        let svc = Serve { stack: std::cell::RefCell::new(App), draining, idle: Default::default() };
        let (result, parks) = super::serve(io, svc).await;
        (result.map_err(|e| e.to_string()), parks)
    });
    Wire { io, buf: Vec::new(), server }
}

fn serve() -> Wire {
    serve_with(CancellationToken::new())
}

impl Wire {
    async fn send(&mut self, bytes: &str) {
        self.io.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// The next response: its head (lowercased) and body; `None` at the
    /// end of the stream.
    async fn response(&mut self) -> Option<(String, String)> {
        self.read_response(false).await
    }

    /// The same, for a response that has no body whatever its length says
    /// (to HEAD).
    async fn read_response(&mut self, to_head: bool) -> Option<(String, String)> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill().await {
                assert!(self.buf.is_empty(), "stream ended inside a response head: {:?}", String::from_utf8_lossy(&self.buf));
                return None;
            }
        };
        let head = String::from_utf8(self.buf.drain(..head_end).collect()).unwrap().to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap())
            * usize::from(!to_head);
        while self.buf.len() < len {
            assert!(self.fill().await, "stream ended inside a body");
        }
        let body = String::from_utf8(self.buf.drain(..len).collect()).unwrap();
        Some((head, body))
    }

    async fn fill(&mut self) -> bool {
        let mut b = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut b)).await.expect("the server answers").unwrap();
        self.buf.extend_from_slice(&b[..n]);
        n > 0
    }

    async fn body_of(&mut self, request: &str) -> String {
        self.send(request).await;
        let (head, body) = self.response().await.expect("a response");
        assert!(head.starts_with("http/1.1 200"), "{head}");
        body
    }

    /// Closes the client's side; the server's result and parks.
    async fn close(mut self) -> (Result<(), String>, u32) {
        self.io.shutdown().await.unwrap();
        assert_eq!(self.response().await, None, "nothing more comes");
        self.server.await.unwrap()
    }
}

const GET_A: &str = "GET /a HTTP/1.1\r\nhost: web\r\n\r\n";
const GET_B: &str = "GET /b HTTP/1.1\r\nhost: web\r\n\r\n";

#[tokio::test]
async fn parks_after_every_exchange_and_serves_the_next_request() {
    let mut w = serve();
    assert_eq!(w.body_of(GET_A).await, "GET /a ");
    assert_eq!(w.body_of(GET_B).await, "GET /b ");
    assert_eq!(w.body_of(GET_A).await, "GET /a ");
    assert_eq!(w.close().await, (Ok(()), 3));
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let mut w = serve();
    w.send(&format!("{GET_A}{GET_B}{GET_A}")).await;
    for want in ["GET /a ", "GET /b ", "GET /a "] {
        assert_eq!(w.response().await.unwrap().1, want);
    }
    let (result, parks) = w.close().await;
    assert_eq!(result, Ok(()));
    assert!(parks >= 1, "{parks}");
}

/// The next request's first bytes read with the previous one go to the
/// next generation, and a head that arrives in pieces while parked is
/// put together.
#[tokio::test]
async fn a_request_split_across_a_park_is_put_together() {
    let mut w = serve();
    w.send(&format!("{GET_A}GET /b HT")).await;
    assert_eq!(w.response().await.unwrap().1, "GET /a ");
    tokio::time::sleep(Duration::from_millis(20)).await;
    w.send("TP/1.1\r\nho").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    w.send("st: web\r\n\r\n").await;
    assert_eq!(w.response().await.unwrap().1, "GET /b ");
    // Parked with nothing read ahead, then a head in pieces.
    w.send("GET /c HTTP/1.1\r\n").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    w.send("host: web\r\n\r\n").await;
    assert_eq!(w.response().await.unwrap().1, "GET /c ");
    assert_eq!(w.close().await, (Ok(()), 3));
}

/// A request with a body keeps its generation (its body may still be
/// arriving); the next request without one lets it park.
#[tokio::test]
async fn requests_with_bodies_park_only_after_a_bodiless_one() {
    let mut w = serve();
    assert_eq!(w.body_of("POST /p HTTP/1.1\r\nhost: web\r\ncontent-length: 5\r\n\r\nhello").await, "POST /p hello");
    assert_eq!(w.body_of("POST /p HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").await, "POST /p abc");
    assert_eq!(w.body_of(GET_A).await, "GET /a ");
    assert_eq!(w.close().await, (Ok(()), 1));
}

/// A body still arriving after its response was sent is never read as the
/// next request, whether the app reads it later or drops it: hyper reads
/// it to its end first, or closes the connection.
#[tokio::test]
async fn a_body_after_its_response_is_never_the_next_request() {
    let smuggled = "GET /smuggled HTTP/1.1\r\nhost: web\r\n\r\n";
    for path in ["/late", "/early"] {
        let mut w = serve();
        assert_eq!(w.body_of(GET_A).await, "GET /a ");
        w.send(&format!("POST {path} HTTP/1.1\r\nhost: web\r\ncontent-length: {}\r\n\r\nGET /", smuggled.len())).await;
        assert_eq!(w.response().await.unwrap().1, format!("POST {path}"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The server may have closed already (`/early`).
        let _ = w.io.write_all(&smuggled.as_bytes()[5..]).await;
        let _ = w.io.write_all(GET_B.as_bytes()).await;
        match w.response().await {
            Some((head, body)) => assert_eq!((head.starts_with("http/1.1 200"), body.as_str()), (true, "GET /b "), "{path}: {head}"),
            // hyper gave up on the body: the connection closed.
            None => assert_eq!(path, "/early"),
        }
        let _ = w.io.shutdown().await;
        let (result, _) = w.server.await.unwrap();
        assert!(result.is_ok(), "{path}: {result:?}");
    }
}

#[tokio::test]
async fn responses_without_a_body_park_too() {
    let mut w = serve();
    w.send("GET /head HTTP/1.1\r\nhost: web\r\n\r\n").await;
    assert!(w.response().await.unwrap().0.starts_with("http/1.1 204"));
    w.send("HEAD /a HTTP/1.1\r\nhost: web\r\n\r\n").await;
    let (head, body) = w.read_response(true).await.unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, "", "HEAD has no body on the wire");
    assert_eq!(w.body_of(GET_A).await, "GET /a ");
    assert_eq!(w.close().await, (Ok(()), 3));
}

#[tokio::test]
async fn an_upgrade_after_a_park_carries_raw_bytes() {
    let mut w = serve();
    assert_eq!(w.body_of(GET_A).await, "GET /a ");
    w.send("GET /upgrade HTTP/1.1\r\nhost: web\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n").await;
    let (head, _) = w.response().await.unwrap();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    w.send("raw bytes").await;
    while w.buf.len() < 9 {
        assert!(w.fill().await);
    }
    assert_eq!(w.buf, b"raw bytes");
    w.io.shutdown().await.unwrap();
    assert_eq!(w.server.await.unwrap(), (Ok(()), 1));
}

/// A connection the client closes: while parked, or by `Connection:
/// close`, or as HTTP/1.0 does; the last two never park.
#[tokio::test]
async fn closes_as_an_ordinary_connection_does() {
    let mut w = serve();
    assert_eq!(w.body_of(GET_A).await, "GET /a ");
    assert_eq!(w.close().await, (Ok(()), 1));

    for request in ["GET /a HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n", "GET /a HTTP/1.0\r\n\r\n"] {
        let mut w = serve();
        w.send(request).await;
        let (head, body) = w.response().await.unwrap();
        assert_eq!(body, "GET /a ", "{head}");
        assert_eq!(w.response().await, None, "{request:?}: the server closes");
        assert_eq!(w.server.await.unwrap(), (Ok(()), 0), "{request:?}");
    }
}

/// Draining while parked: the next request is served and says the
/// connection closes after it.
#[tokio::test]
async fn a_parked_connection_drains_at_its_next_response() {
    let draining = CancellationToken::new();
    let mut w = serve_with(draining.clone());
    assert_eq!(w.body_of(GET_A).await, "GET /a ");
    draining.cancel();
    w.send(GET_B).await;
    let (head, body) = w.response().await.unwrap();
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "GET /b ");
    assert_eq!(w.response().await, None);
    assert_eq!(w.server.await.unwrap(), (Ok(()), 1));
}
