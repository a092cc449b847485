//! Gateway API filters of the selected rule (and backend), as the
//! [`super::Route`] layer applies them: request and response header
//! modifiers, URL rewrites, redirects (a local answer: nothing is
//! forwarded) and mirrors (a copy to another service, fire and forget).
//! The model and its validation are in [`crate::route::gateway`].

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};

use super::{Conn, Outbound};
use crate::{
    route::{BackendService, Filter, HeaderModifier, PathModifier, Redirect},
    state::Destination,
};

/// The request's path after a rewrite: `ReplaceFullPath` replaces it all,
/// `ReplacePrefixMatch` the part the rule's prefix matched (whole
/// segments, so what is left is empty or starts with `/`).
pub(super) fn rewrite_path(path: &str, matched_prefix: Option<&str>, m: &PathModifier) -> String {
    match m {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(with) => {
            let rest = matched_prefix.and_then(|p| path.strip_prefix(p)).unwrap_or(path);
            let with = with.trim_end_matches('/');
            match (with.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_owned(),
                (true, false) => rest.to_owned(),
                (false, _) => format!("{with}{rest}"),
            }
        }
        // A string prefix (matched perhaps without case): its length is
        // what is replaced.
        PathModifier::ReplaceStringPrefix(with) => match matched_prefix.and_then(|p| path.get(p.len()..)) {
            Some(rest) => format!("{with}{rest}"),
            None => with.clone(),
        },
    }
}

/// The `Location` of a redirect: unset parts keep the request's, and a
/// port that is the scheme's well-known one is left out (the spec's
/// rules, with the service port the client dialled as the "listener
/// port").
pub(super) fn location(r: &Redirect, host: &str, listener_port: u16, path: &str, query: Option<&str>, matched_prefix: Option<&str>) -> String {
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let hostname = r.hostname.as_deref().unwrap_or(host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => p,
        (None, Some(s)) if s == "https" => 443,
        (None, Some(_)) => 80,
        (None, None) => listener_port,
    };
    let well_known = (scheme == "http" && port == 80) || (scheme == "https" && port == 443);
    let path = r.path.as_ref().map_or_else(|| path.to_owned(), |m| rewrite_path(path, matched_prefix, m));
    let authority = if well_known { hostname.to_owned() } else { format!("{hostname}:{port}") };
    match query {
        Some(q) => format!("{scheme}://{authority}{path}?{q}"),
        None => format!("{scheme}://{authority}{path}"),
    }
}

/// The host the client asked for, without its port: `:authority`, else
/// `Host`.
pub(super) fn request_host<B>(req: &Request<B>) -> String {
    let raw = req.uri().host().map(str::to_owned).or_else(|| {
        req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(|h| {
            // Strip a port, keeping a bracketed IPv6 literal whole.
            match h.rfind(':') {
                Some(i) if !h[i..].contains(']') => h[..i].to_owned(),
                _ => h.to_owned(),
            }
        })
    });
    raw.unwrap_or_default()
}

/// Applies a header modifier: `set` replaces, `add` appends, `remove`
/// deletes (names were validated when the route was converted).
pub(super) fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (name, value) in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
}

/// The request-side filters, in order: header modifiers and rewrites.
/// `path` is the normalized path the rule matched (a rewrite starts from
/// it, so a prefix replaced is the prefix matched).
pub(super) fn apply_to_request(req: &mut Request<Incoming>, filters: &[Filter], path: &str, query: Option<&str>, matched_prefix: Option<&str>) {
    for f in filters {
        match f {
            Filter::RequestHeaderModifier(m) => modify_headers(req.headers_mut(), m),
            Filter::UrlRewrite { hostname, path: modifier } => {
                let new_path = modifier.as_ref().map(|m| rewrite_path(path, matched_prefix, m));
                rewrite_uri(req, hostname.as_deref(), new_path.as_deref(), query);
            }
            Filter::ResponseHeaderModifier(_) | Filter::RequestRedirect(_) | Filter::RequestMirror { .. } | Filter::Fault(_) => {}
        }
    }
}

fn rewrite_uri(req: &mut Request<Incoming>, hostname: Option<&str>, path: Option<&str>, query: Option<&str>) {
    let mut parts = req.uri().clone().into_parts();
    if let Some(p) = path {
        let pq = match query {
            Some(q) => format!("{p}?{q}"),
            None => p.to_owned(),
        };
        match pq.parse() {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(e) => tracing::warn!(path = %pq, "URLRewrite left out: not a request target: {e}"),
        }
    }
    if let Some(h) = hostname {
        // HTTP/2 names the host in `:authority` (the URI), HTTP/1.1 in
        // `Host`: both are rewritten, keeping no port (the rewrite names a
        // host, the service port stays).
        if parts.authority.is_some()
            && let Ok(a) = h.parse()
        {
            parts.authority = Some(a);
        }
        if let Ok(v) = HeaderValue::from_str(h)
            && (req.headers().contains_key(header::HOST) || parts.authority.is_none())
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    match Uri::from_parts(parts) {
        Ok(u) => *req.uri_mut() = u,
        Err(e) => tracing::warn!("URLRewrite left out: {e}"),
    }
}

/// The response header modifiers of the rule's and the backend's filters.
pub(super) fn response_modifiers<'a>(filters: impl Iterator<Item = &'a Filter>) -> Vec<HeaderModifier> {
    filters
        .filter_map(|f| match f {
            Filter::ResponseHeaderModifier(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

impl Outbound {
    /// Sends a copy of `req` (its head; mirrored only when the request has
    /// no body, which is never buffered for a copy) to one endpoint of
    /// `to`, and forgets it: its answer, or failure, is logged at debug
    /// level and changes nothing for the client.
    pub(super) fn mirror(self: &Arc<Self>, conn: &Arc<Conn>, req: &Request<Incoming>, to: &BackendService, subset: Option<&crate::state::Labels>) {
        if !req.body().is_end_stream() {
            tracing::debug!(mirror = %to, "request with a body not mirrored");
            return;
        }
        let snapshot = self.inputs.state.borrow().clone();
        let Some(target) = snapshot.service_port_target(&to.namespace, &to.name, to.port) else {
            tracing::debug!(mirror = %to, "mirror service gone");
            return;
        };
        let endpoints: Vec<Destination> = target
            .endpoints
            .iter()
            .filter(|e| subset.is_none_or(|s| crate::state::Selector(s).matches(e.labels)))
            .map(|e| e.dest.clone())
            .collect();
        let Some((dest, _)) = self.balancer.pick(&endpoints, &[], None) else {
            tracing::debug!(mirror = %to, "mirror service has no endpoint");
            return;
        };
        let version = target.port.http_version().unwrap_or(conn.version);
        let mut copy = Request::builder().method(req.method().clone()).uri(req.uri().clone()).version(req.version());
        if let Some(h) = copy.headers_mut() {
            *h = req.headers().clone();
        }
        let Ok(copy) = copy.body(()) else { return };
        let (mut parts, ()) = copy.into_parts();
        crate::proxy::http::to_app_version(&mut parts, version, dest.addr());
        let body = http_body_util::Empty::<bytes::Bytes>::new().map_err(|never| match never {}).boxed();
        let copy = Request::from_parts(parts, body);
        let (outbound, conn, to) = (self.clone(), conn.clone(), to.clone());
        let svc = self.services.get(&to.namespace, &to.name);
        tokio::spawn(async move {
            let limits = crate::route::CircuitBreaker::default();
            match outbound.http_try(&conn.pod, &dest, version, &svc, &limits, copy).await {
                Ok(res) => tracing::debug!(mirror = %to, status = res.status().as_u16(), "mirrored"),
                Err(e) => tracing::debug!(mirror = %to, error = %e, "mirror failed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_full_path_rewrites() {
        let prefix = |with: &str| PathModifier::ReplacePrefixMatch(with.into());
        #[rustfmt::skip]
        let cases = [
            ("/prefix/one/two", Some("/prefix/one"), prefix("/one"), "/one/two"),
            ("/strip-prefix/three", Some("/strip-prefix"), prefix("/"), "/three"),
            ("/strip-prefix", Some("/strip-prefix"), prefix("/"), "/"),
            ("/prefix/rewrite-path-and-modify-headers/one", Some("/prefix/rewrite-path-and-modify-headers"), prefix("/prefix"), "/prefix/one"),
            ("/original-prefix/lemon", Some("/original-prefix"), prefix("/replacement-prefix"), "/replacement-prefix/lemon"),
            ("/path-and-host", Some("/path-and-host"), prefix("/replacement-prefix"), "/replacement-prefix"),
            ("/a/b", Some(""), prefix("/x"), "/x/a/b"),
            ("/full/one/two", Some("/full/one"), PathModifier::ReplaceFullPath("/one".into()), "/one"),
            // Istio: the string prefix, not segments; without one, the whole path.
            ("/apix/y", Some("/api"), PathModifier::ReplaceStringPrefix("/v2".into()), "/v2x/y"),
            ("/API/y", Some("/api"), PathModifier::ReplaceStringPrefix("/v2".into()), "/v2/y"),
            ("/reviews/1", Some("/"), PathModifier::ReplaceStringPrefix("/v1/".into()), "/v1/reviews/1"),
            ("/exact", None, PathModifier::ReplaceStringPrefix("/other".into()), "/other"),
        ];
        for (path, matched, m, want) in cases {
            assert_eq!(rewrite_path(path, matched, &m), want, "{path} {m:?}");
        }
    }

    #[test]
    fn redirect_locations_follow_the_port_rules() {
        let r = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(str::to_owned),
            hostname: host.map(str::to_owned),
            path: None,
            port,
            status_code: 302,
        };
        #[rustfmt::skip]
        let cases = [
            (r(None, None, None), 80, "http://echo/p"),
            (r(None, None, None), 8080, "http://echo:8080/p"),
            (r(None, Some("example.org"), None), 80, "http://example.org/p"),
            (r(None, None, Some(8083)), 80, "http://echo:8083/p"),
            (r(Some("https"), None, None), 80, "https://echo/p"),
            (r(Some("https"), None, None), 8080, "https://echo/p"),
            (r(Some("https"), None, Some(8443)), 80, "https://echo:8443/p"),
            (r(Some("http"), None, Some(80)), 8080, "http://echo/p"),
            (r(Some("https"), None, Some(443)), 80, "https://echo/p"),
            (r(Some("http"), Some("example.org"), None), 8080, "http://example.org/p"),
        ];
        for (redirect, listener, want) in cases {
            assert_eq!(location(&redirect, "echo", listener, "/p", None, Some("/p")), want, "{redirect:?}");
        }
        let with_path = Redirect { path: Some(PathModifier::ReplaceFullPath("/new".into())), ..r(None, None, None) };
        assert_eq!(location(&with_path, "echo", 80, "/old/x", Some("a=1"), Some("/old")), "http://echo/new?a=1");
    }

    #[test]
    fn header_modifiers_set_add_remove_without_case() {
        let mut h = HeaderMap::new();
        h.insert("x-header-set", HeaderValue::from_static("old"));
        h.insert("x-header-add", HeaderValue::from_static("first"));
        h.insert("x-header-remove", HeaderValue::from_static("gone"));
        let m = HeaderModifier {
            set: vec![("x-header-set".into(), "new".into())],
            add: vec![("x-header-add".into(), "second".into())],
            remove: vec!["x-header-remove".into()],
        };
        modify_headers(&mut h, &m);
        assert_eq!(h.get_all("x-header-set").iter().collect::<Vec<_>>(), ["new"]);
        assert_eq!(h.get_all("x-header-add").iter().collect::<Vec<_>>(), ["first", "second"]);
        assert!(!h.contains_key("x-header-remove"));
    }
}
