//! The pod proxy subresource, `GET /api/v1/namespaces/NS/pods/NAME[:PORT]/proxy/PATH`:
//! the request goes to `http://POD_IP:PORT/PATH` and the pod's answer
//! (status, content type, body) comes back as it was, as the real API server
//! relays it. A pod that cannot be reached gets the real server's 503
//! (`error trying to reach service: dial tcp ...`). Only loopback pod IPs
//! are dialled: tests address nothing else.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Response, StatusCode};

use super::{Body, Ctx, status};

const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl Ctx {
    /// `pods/NAME:PORT/proxy/PATH`: the pod's answer, or why there is none.
    pub(super) async fn proxy(&self, method: &hyper::Method, target: Result<Target, String>) -> Response<Body> {
        let t = match target {
            Ok(t) => t,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
        };
        if method != hyper::Method::GET {
            return status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{method} on pods/proxy is not supported by the test server"));
        }
        let ip = {
            let g = self.inner.lock().expect("poisoned");
            if g.denied.contains(&("get".to_owned(), "pods/proxy".to_owned())) {
                return status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!(
                        "pods \"{}\" is forbidden: User \"test\" cannot get resource \"pods/proxy\" in API group \"\" in the namespace \"{}\"",
                        t.pod, t.namespace
                    ),
                );
            }
            let Some(pod) = g.objects.get("pods").and_then(|m| m.get(&(t.namespace.clone(), t.pod.clone()))) else {
                return status(StatusCode::NOT_FOUND, "NotFound", format!("pods \"{}\" not found", t.pod));
            };
            pod["status"]["podIP"].as_str().and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        };
        let Some(ip) = ip else {
            return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", format!("pod {} has no IP address", t.pod));
        };
        let Some(port) = t.port else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", format!("pods/{}/proxy: name the port (NAME:PORT)", t.pod));
        };
        match forward(ip, port, &t.path).await {
            Answer::Pod { status: code, content_type, body } => {
                let mut r = Response::builder().status(code);
                if let Some(ct) = content_type {
                    r = r.header(http::header::CONTENT_TYPE, ct);
                }
                r.body(Full::new(body).boxed()).expect("a valid response")
            }
            Answer::Error(code, message) => status(code, "ServiceUnavailable", message),
        }
    }
}

/// A proxy request's target.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub namespace: String,
    pub pod: String,
    pub port: Option<u16>,
    /// What goes to the pod: `/PATH[?QUERY]`.
    pub path: String,
}

/// `Some` for a pod proxy path; the name part may be `NAME`, `NAME:PORT` or
/// `SCHEME:NAME:PORT` (only `http` is served).
pub(super) fn parse(path: &str, query: Option<&str>) -> Option<Result<Target, String>> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (namespace, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("pods/")?;
    let (name, rest) = rest.split_once('/')?;
    let tail = rest.strip_prefix("proxy").filter(|t| t.is_empty() || t.starts_with('/'))?;
    let parts: Vec<&str> = name.split(':').collect();
    let (pod, port) = match parts.as_slice() {
        [pod] => (*pod, None),
        [pod, port] => (*pod, Some(*port)),
        ["http", pod, port] => (*pod, Some(*port)),
        [scheme, _, _] => return Some(Err(format!("scheme {scheme:?}: the test API server proxies http only"))),
        _ => return Some(Err(format!("invalid pod name {name:?}"))),
    };
    let port = match port.map(str::parse::<u16>).transpose() {
        Ok(p) => p,
        Err(_) => return Some(Err(format!("invalid port in {name:?}"))),
    };
    let mut path = if tail.is_empty() { "/".to_owned() } else { tail.to_owned() };
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        path = format!("{path}?{q}");
    }
    Some(Ok(Target { namespace: namespace.to_owned(), pod: pod.to_owned(), port, path }))
}

/// An answer of the pod, or the API server's own error (status, message).
pub(super) enum Answer {
    Pod { status: StatusCode, content_type: Option<http::HeaderValue>, body: Bytes },
    Error(StatusCode, String),
}

/// `GET path` on `ip:port`, the way the API server relays it.
pub(super) async fn forward(ip: IpAddr, port: u16, path: &str) -> Answer {
    if !ip.is_loopback() {
        return Answer::Error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the test API server proxies only to loopback pod IPs, not {ip}"),
        );
    }
    let addr = SocketAddr::new(ip, port);
    let unreachable = |why: String| Answer::Error(StatusCode::SERVICE_UNAVAILABLE, format!("error trying to reach service: dial tcp {addr}: {why}"));
    let stream = match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => return unreachable("i/o timeout".into()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return unreachable("connect: connection refused".into()),
        Ok(Err(e)) => return unreachable(format!("connect: {e}")),
        Ok(Ok(s)) => s,
    };
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let res = sender.send_request(req).await?;
        let status = res.status();
        let content_type = res.headers().get(http::header::CONTENT_TYPE).cloned();
        let body = res.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>(Answer::Pod { status, content_type, body })
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
        Err(_) => unreachable("the pod did not answer in time".into()),
        Ok(Err(e)) => unreachable(e.to_string()),
        Ok(Ok(a)) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_paths() {
        let t = parse("/api/v1/namespaces/nodemesh-system/pods/agent-x:15020/proxy/status", None).unwrap().unwrap();
        assert_eq!(t, Target { namespace: "nodemesh-system".into(), pod: "agent-x".into(), port: Some(15020), path: "/status".into() });
        let t = parse("/api/v1/namespaces/ns/pods/http:p:80/proxy", Some("a=b")).unwrap().unwrap();
        assert_eq!((t.port, t.path.as_str()), (Some(80), "/?a=b"));
        assert_eq!(parse("/api/v1/namespaces/ns/pods/p", None), None);
        assert_eq!(parse("/api/v1/namespaces/ns/pods/p/status", None), None);
        assert!(parse("/api/v1/namespaces/ns/pods/https:p:443/proxy/x", None).unwrap().is_err());
        assert!(parse("/api/v1/namespaces/ns/pods/p:http/proxy/x", None).unwrap().is_err());
    }
}
