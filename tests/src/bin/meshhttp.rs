//! HTTP and gRPC clients and a gRPC server for the end-to-end tests, run
//! inside pods. Each command prints one JSON line with its result.
//!
//! - `load --url URL --requests N [--header K:V]... [--interval-ms MS]
//!   [--fresh-every K]`: N sequential GETs on one keep-alive HTTP/1.1
//!   connection (a new one every K requests, and whenever the server closed
//!   it, as a client library does); counts answers by status and by the
//!   `x-backend` response header, and requests that failed.
//! - `multiplex --url URL --streams N`: N concurrent requests on ONE HTTP/2
//!   (h2c, prior knowledge) connection; reports each status.
//! - `grpc-serve --port P --name NAME`: a gRPC server (the standard health
//!   service; NAME is reported as serving).
//! - `grpc-call --addr IP:PORT --service NAME`: one unary `Health/Check`.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

#[derive(Parser)]
#[command(about = "HTTP/gRPC test clients and server for mesh end-to-end tests")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Load {
        #[arg(long)]
        url: String,
        #[arg(long)]
        requests: usize,
        /// `name:value`, repeatable.
        #[arg(long)]
        header: Vec<String>,
        /// Pause between requests.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Open a new connection every K requests (0: only when closed).
        #[arg(long, default_value_t = 0)]
        fresh_every: usize,
        /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1; a GOAWAY
        /// makes the next request use a new connection.
        #[arg(long)]
        http2: bool,
    },
    Multiplex {
        #[arg(long)]
        url: String,
        #[arg(long)]
        streams: usize,
    },
    GrpcServe {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
    },
    GrpcCall {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        service: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Load { url, requests, header, interval_ms, fresh_every, http2 } => {
            load(&url, requests, &header, std::time::Duration::from_millis(interval_ms), fresh_every, http2).await
        }
        Cmd::Multiplex { url, streams } => multiplex(&url, streams).await,
        Cmd::GrpcServe { port, name } => grpc_serve(port, name).await,
        Cmd::GrpcCall { addr, service } => grpc_call(addr, service).await,
    }
}

fn target(url: &str) -> Result<(http::Uri, SocketAddr)> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let auth = uri.authority().context("URL without host:port")?;
    let addr: SocketAddr = auth.as_str().parse().with_context(|| format!("{auth} is not IP:port"))?;
    Ok((uri, addr))
}

/// One client connection, HTTP/1.1 or h2c.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn ready(&mut self) -> bool {
        match self {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s) => s.ready().await.is_ok(),
        }
    }

    async fn send(&mut self, req: http::Request<Empty<Bytes>>) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

async fn connect(addr: SocketAddr, http2: bool) -> Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    if http2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        return Ok(Sender::H2(sender));
    }
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(Sender::H1(sender))
}

async fn load(
    url: &str,
    requests: usize,
    headers: &[String],
    interval: std::time::Duration,
    fresh_every: usize,
    http2: bool,
) -> Result<()> {
    let (uri, addr) = target(url)?;
    let mut sender = Some(connect(addr, http2).await?);
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_backend: BTreeMap<String, u64> = BTreeMap::new();
    let mut replies: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
    let mut reconnects = 0u64;
    for i in 0..requests {
        if i > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        // A connection the server closed (after `Connection: close`, or an
        // error answer) is replaced before the request is sent, as client
        // libraries do: that is not a failed request.
        let fresh = fresh_every > 0 && i > 0 && i % fresh_every == 0;
        let usable = match sender.as_mut() {
            Some(s) if !fresh && !s.is_closed() => s.ready().await,
            _ => false,
        };
        if !usable {
            match connect(addr, http2).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    errors.push(format!("request {i}: {e:#}"));
                    sender = None;
                    continue;
                }
            }
            if i > 0 {
                reconnects += 1;
            }
        }
        let s = sender.as_mut().expect("connected above");
        let mut req = if http2 {
            http::Request::builder().uri(uri.clone())
        } else {
            http::Request::builder()
                .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
                .header(http::header::HOST, addr.to_string())
        };
        for h in headers {
            let (k, v) = h.split_once(':').with_context(|| format!("header {h:?} is not name:value"))?;
            req = req.header(k.trim(), v.trim());
        }
        let res = match s.send(req.body(Empty::<Bytes>::new())?).await {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("request {i}: {e}"));
                sender = None;
                continue;
            }
        };
        *by_status.entry(res.status().as_u16().to_string()).or_default() += 1;
        let header = |n: &str| res.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
        if let Some(b) = header("x-backend") {
            *by_backend.entry(b).or_default() += 1;
        }
        if let Some(r) = header("x-mesh-reply") {
            *replies.entry(r).or_default() += 1;
        }
        if let Err(e) = res.into_body().collect().await {
            errors.push(format!("request {i} body: {e}"));
            sender = None;
        }
    }
    println!(
        "{}",
        json!({"ok": errors.is_empty(), "status": by_status, "backend": by_backend, "meshReply": replies,
               "reconnects": reconnects, "failed": errors.len(), "errors": errors})
    );
    Ok(())
}

async fn multiplex(url: &str, streams: usize) -> Result<()> {
    let (uri, addr) = target(url)?;
    let tcp = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..streams {
        let mut sender = sender.clone();
        let uri = uri.clone();
        tasks.push(tokio::spawn(async move {
            let req = http::Request::builder().uri(format!("{uri}&stream={i}")).body(Empty::<Bytes>::new())?;
            let res = sender.send_request(req).await?;
            let status = res.status().as_u16();
            let backend = res.headers().get("x-backend").and_then(|v| v.to_str().ok()).map(str::to_owned);
            res.into_body().collect().await?;
            anyhow::Ok((status, backend))
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await??.0);
    }
    let ok = statuses.iter().all(|s| *s == 200);
    println!("{}", json!({"ok": ok, "statuses": statuses}));
    if !ok {
        bail!("not every stream got 200: {statuses:?}");
    }
    Ok(())
}

async fn grpc_serve(port: u16, name: String) -> Result<()> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status(&name, tonic_health::ServingStatus::Serving).await;
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    println!("{}", json!({"ok": true, "listening": addr.to_string()}));
    tonic::transport::Server::builder().add_service(service).serve(addr).await?;
    Ok(())
}

async fn grpc_call(addr: SocketAddr, service: String) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let res = client
        .check(tonic_health::pb::HealthCheckRequest { service })
        .await
        .context("Health/Check")?;
    let status = res.get_ref().status;
    let serving = status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    println!("{}", json!({"ok": serving, "status": status}));
    if !serving {
        bail!("service not serving: {status}");
    }
    Ok(())
}
