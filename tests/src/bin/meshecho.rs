//! The Gateway API conformance echo app for the end-to-end tests, and the
//! client that talks to it from inside a pod.
//!
//! - `serve --pod NAME --namespace NS --port P...`: on every port, HTTP/1.1
//!   and h2c (prior knowledge) on the same socket; every request is answered
//!   `200` with a JSON body saying what arrived, in the shape of the
//!   conformance echo server (`echo-basic`): `pod`, `namespace`, `method`,
//!   `path` (with the query), `host`, `proto` (`HTTP/1.1`, `HTTP/2.0`) and
//!   `headers` (name, lower case -> every value, in order). A gRPC request
//!   (`content-type: application/grpc`, any method) gets the same JSON as the
//!   `message` (field 1) of its one response message, with `grpc-status: 0`
//!   in the trailers: enough for `proto.EchoTestService/Echo` clients.
//!   Prints `{"listening":[ports]}` once every port is bound. Two request
//!   headers make it play a part of an application: `x-echo-hold: PATH`
//!   holds the answer until the file PATH exists (a test decides when a
//!   request ends); `x-echo-forward: IP:PORT` (with `x-echo-forward-host`)
//!   first sends the same GET there, through the pod's mesh agent, with the
//!   request's other headers (`end-user`, ...), and reports that answer as
//!   `upstream` (`status`, `body`), as Bookinfo's reviews calls ratings.
//! - `request --batch JSON`: sends each request of a JSON array
//!   (`to` IP:port, `host`, `method`, `path`, `headers` as `[[name, value]]`,
//!   `grpc`: bool) in order, HTTP/1.1 on one keep-alive connection per
//!   target (h2c for gRPC), never following redirects; prints one JSON array
//!   of answers: `status`, `headers` (name -> values), `body` (the echo's
//!   JSON when it parses, else the text) and for gRPC `grpcStatus`. A
//!   request that fails to connect or is reset answers `status: 0` with the
//!   `error`. A `Host` among `headers` replaces the one `host` names
//!   (HTTP/1.1), as a client sending to one address with another name does.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
};

use anyhow::{Context, Result, bail};
use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Gateway API conformance echo server and its in-pod client")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        /// The pod name reported (as Kubernetes' downward API would give it).
        #[arg(long, env = "POD_NAME")]
        pod: String,
        #[arg(long, env = "NAMESPACE")]
        namespace: String,
        /// Repeatable.
        #[arg(long, required = true)]
        port: Vec<u16>,
    },
    Request {
        /// A JSON array of requests.
        #[arg(long)]
        batch: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Serve { pod, namespace, port } => serve(pod, namespace, port).await,
        Cmd::Request { batch } => request(&batch).await,
    }
}

// --- server ---

async fn serve(pod: String, namespace: String, ports: Vec<u16>) -> Result<()> {
    let mut listeners = Vec::new();
    for p in &ports {
        let l = tokio::net::TcpListener::bind(("0.0.0.0", *p)).await.with_context(|| format!("binding port {p}"))?;
        listeners.push(l);
    }
    println!("{}", json!({ "listening": ports }));
    let who = std::sync::Arc::new((pod, namespace));
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let who = who.clone();
        tasks.spawn(async move {
            loop {
                let Ok((stream, _)) = l.accept().await else { continue };
                // Small frames (gRPC: headers, message, trailers) without
                // waiting for the peer's delayed ACKs.
                let _ = stream.set_nodelay(true);
                let who = who.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let who = who.clone();
                        async move { Ok::<_, Infallible>(answer(&who.0, &who.1, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

type ServerBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(pod: &str, namespace: &str, req: Request<Incoming>) -> Response<ServerBody> {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers.entry(k.as_str().to_owned()).or_default().push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let proto = match req.version() {
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    };
    let grpc = req.headers().get(http::header::CONTENT_TYPE).is_some_and(|c| c.as_bytes().starts_with(b"application/grpc"));
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(path) = header("x-echo-hold") {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !std::path::Path::new(&path).exists() && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let upstream = match header("x-echo-forward") {
        None => Value::Null,
        Some(to) => {
            let forwarded: Vec<(String, String)> = req
                .headers()
                .iter()
                .filter(|(k, _)| !k.as_str().starts_with("x-echo-") && !matches!(k.as_str(), "host" | "content-length" | "connection" | "transfer-encoding"))
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect();
            let r = Req {
                to: to.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
                host: header("x-echo-forward-host").unwrap_or_else(|| to.clone()),
                method: "GET".into(),
                path: req.uri().path_and_query().map_or("/".into(), |p| p.as_str().to_owned()),
                headers: forwarded,
                grpc: false,
            };
            match one(&mut HashMap::new(), &r).await {
                Ok(a) => json!({ "status": a["status"], "body": a["body"], "headers": a["headers"] }),
                Err(e) => json!({ "status": 0, "error": format!("{e:#}") }),
            }
        }
    };
    let mut seen = json!({
        "pod": pod,
        "namespace": namespace,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": host,
        "proto": proto,
        "headers": headers,
    });
    if !upstream.is_null() {
        seen["upstream"] = upstream;
    }
    // Read the whole request body (a gRPC request message, mostly empty).
    let _ = req.into_body().collect().await;
    if grpc {
        return grpc_answer(seen.to_string());
    }
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(seen.to_string())).boxed())
        .expect("static response")
}

/// One gRPC message: `EchoResponse { message = 1 }`, then `grpc-status: 0`.
fn grpc_answer(message: String) -> Response<ServerBody> {
    let mut pb = BytesMut::new();
    pb.put_u8(0x0a); // field 1, length-delimited
    put_varint(&mut pb, message.len() as u64);
    pb.put_slice(message.as_bytes());
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(pb.len() as u32);
    frame.put_slice(&pb);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = futures::stream::iter([
        Ok::<_, Infallible>(hyper::body::Frame::data(frame.freeze())),
        Ok(hyper::body::Frame::trailers(trailers)),
    ]);
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(http_body_util::StreamBody::new(frames).boxed())
        .expect("static response")
}

fn put_varint(b: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

fn get_varint(b: &mut Bytes) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !b.has_remaining() {
            return None;
        }
        let byte = b.get_u8();
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

// --- client ---

#[derive(Deserialize)]
struct Req {
    to: SocketAddr,
    host: String,
    #[serde(default = "get")]
    method: String,
    #[serde(default = "root")]
    path: String,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    grpc: bool,
}

fn get() -> String {
    "GET".into()
}

fn root() -> String {
    "/".into()
}

enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(addr: SocketAddr, h2: bool) -> Result<Conn> {
    let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let _ = tcp.set_nodelay(true);
    if h2 {
        let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(c);
        return Ok(Conn::H2(s));
    }
    let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(c);
    Ok(Conn::H1(s))
}

async fn request(batch: &str) -> Result<()> {
    let reqs: Vec<Req> = serde_json::from_str(batch).context("--batch is not a JSON array of requests")?;
    let mut conns: HashMap<(SocketAddr, bool), Conn> = HashMap::new();
    let mut out = Vec::new();
    for r in &reqs {
        let answer = match one(&mut conns, r).await {
            Ok(a) => a,
            Err(e) => {
                conns.remove(&(r.to, r.grpc));
                json!({ "status": 0, "error": format!("{e:#}") })
            }
        };
        out.push(answer);
    }
    println!("{}", Value::Array(out));
    Ok(())
}

async fn one(conns: &mut HashMap<(SocketAddr, bool), Conn>, r: &Req) -> Result<Value> {
    let key = (r.to, r.grpc);
    let closed = match conns.get_mut(&key) {
        Some(Conn::H1(s)) => s.ready().await.is_err(),
        Some(Conn::H2(s)) => s.ready().await.is_err(),
        None => true,
    };
    if closed {
        conns.insert(key, connect(r.to, r.grpc).await?);
    }
    let mut b = http::Request::builder().method(r.method.as_str());
    let body = if r.grpc {
        b = b
            .uri(format!("http://{}/proto.EchoTestService/Echo", r.host))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers");
        // An empty `EchoRequest`.
        Bytes::from_static(&[0, 0, 0, 0, 0])
    } else {
        b = b.uri(r.path.as_str());
        // A `Host` among the headers replaces the one the URL names.
        if !r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            b = b.header(http::header::HOST, r.host.as_str());
        }
        Bytes::new()
    };
    for (k, v) in &r.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let req = b.body(Full::new(body)).context("building the request")?;
    let resp = match conns.get_mut(&key).expect("inserted") {
        Conn::H1(s) => s.send_request(req).await?,
        Conn::H2(s) => s.send_request(req).await?,
    };
    let status = resp.status().as_u16();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in resp.headers() {
        headers.entry(k.as_str().to_owned()).or_default().push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let collected = resp.into_body().collect().await.context("reading the body")?;
    let trailers = collected.trailers().cloned();
    let mut data = collected.to_bytes();
    let mut answer = json!({ "status": status, "headers": headers });
    if r.grpc {
        let grpc_status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or(headers_get(&answer, "grpc-status").as_ref())
            .and_then(|v| v.to_str().ok().map(str::to_owned));
        answer["grpcStatus"] = json!(grpc_status);
        let message = grpc_message(&mut data).unwrap_or_default();
        answer["body"] = serde_json::from_str(&message).unwrap_or(Value::String(message));
    } else {
        let text = String::from_utf8_lossy(&data).into_owned();
        answer["body"] = serde_json::from_str(&text).unwrap_or(Value::String(text));
    }
    Ok(answer)
}

fn headers_get(answer: &Value, name: &str) -> Option<http::HeaderValue> {
    answer["headers"][name][0].as_str().and_then(|s| http::HeaderValue::from_str(s).ok())
}

/// Field 1 of the first gRPC message in `data`.
fn grpc_message(data: &mut Bytes) -> Result<String> {
    if data.len() < 5 {
        bail!("no gRPC message");
    }
    let _compressed = data.get_u8();
    let len = data.get_u32() as usize;
    let mut msg = data.split_to(len.min(data.len()));
    while msg.has_remaining() {
        let tag = get_varint(&mut msg).context("bad tag")?;
        let wire = tag & 7;
        match wire {
            2 => {
                let n = get_varint(&mut msg).context("bad length")? as usize;
                let v = msg.split_to(n.min(msg.len()));
                if tag >> 3 == 1 {
                    return Ok(String::from_utf8_lossy(&v).into_owned());
                }
            }
            0 => {
                get_varint(&mut msg);
            }
            _ => bail!("unexpected wire type {wire}"),
        }
    }
    bail!("no message field")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u64::from(u32::MAX), u64::MAX] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(get_varint(&mut b.freeze()), Some(v), "{v}");
        }
        assert_eq!(get_varint(&mut Bytes::from_static(&[0x80])), None, "truncated");
    }

    #[test]
    fn a_grpc_answer_carries_the_json_as_field_one() {
        let json = "x".repeat(300); // a two-byte length
        let resp = grpc_answer(json.clone());
        assert_eq!(resp.headers()[http::header::CONTENT_TYPE], "application/grpc");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let collected = rt.block_on(resp.into_body().collect()).unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        let mut data = collected.to_bytes();
        assert_eq!(grpc_message(&mut data).unwrap(), json);
        // Other fields before it are skipped; no field 1 is an error.
        let mut other = Bytes::from_static(&[0, 0, 0, 0, 7, 0x08, 0x05, 0x0a, 0x02, b'h', b'i', 0x00]);
        assert_eq!(grpc_message(&mut other).unwrap(), "hi");
        assert!(grpc_message(&mut Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01])).is_err());
        assert!(grpc_message(&mut Bytes::from_static(&[0, 0])).is_err());
    }
}
