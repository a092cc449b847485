//! The front door of both HTTP servers (the source agent's outbound one and
//! the destination agent's inbound one): what RFC 9112 / 9110 / 9113 make a
//! server refuse, refused **before** routing or authorization looks at the
//! request, so that both only ever see a request whose meaning is not in
//! doubt, and the app receives exactly what they saw.
//!
//! hyper's parser (httparse) refuses most malformed syntax itself (400), but
//! it resolves a few ambiguities silently, and those are the request
//! smuggling and policy-confusion classics:
//!
//! - `Content-Length` *and* `Transfer-Encoding`: hyper drops the length
//!   (RFC 9112 §6.3 allows that); we refuse (RFC 9112 §6.1: a server *may*
//!   reject, and a proxy in front of another parser should);
//! - a `#fragment` in the request target: the `http` crate cuts it off, so
//!   nobody downstream can even tell it was there;
//! - more than one `Host` line: hyper keeps both, the first wins for some
//!   readers, the last for others;
//! - no `Host` on HTTP/1.1 (RFC 9112 §3.2: 400);
//! - HTTP/2: `:authority` and a `host` that disagree (RFC 9113 §8.3.1).
//!
//! The first two leave no trace in the parsed request, so the HTTP/1 bytes
//! are read a second time on their way into hyper ([`Inspected`]): the same
//! parser on the same bytes, following the same framing, notes per request
//! head what it saw; the service takes the note of each request it gets
//! ([`FrontDoor::check`]) and checks that it belongs to that request (same
//! method and target), refusing when it cannot tell.
//!
//! A request body that breaks its framing (bad chunk syntax) is the client's
//! fault: [`ClientBody`] remembers it, and the layers that forward the body
//! answer 400 rather than blaming the upstream (no 502/503, no outlier
//! ejection, no 5xx in the backend's metrics).
//!
//! Client-sent headers that claim an identity ([`IDENTITY_HEADERS`]) are
//! removed from the request's headers and from its trailers before the
//! destination agent authorizes it ([`strip_identity`]).

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request, Version, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Headers that claim who the client is. A client never gets to say that:
/// they are removed from every request (headers and trailers) the
/// destination agent receives, before authorization, and the agent then
/// sets `x-mesh-peer-identity` from the verified peer certificate only.
/// Names compare canonicalized: case-insensitively, with `_` as `-` (many
/// servers, CGI among them, read `x_mesh_peer_identity` as
/// `x-mesh-peer-identity`). Extend the list here.
pub const IDENTITY_HEADERS: &[&str] = &[
    super::PEER_IDENTITY_HEADER,
    "x-envoy-peer-metadata",
    "x-envoy-peer-metadata-id",
    "x-istio-attributes",
    "x-spiffe-id",
    "x-client-cert",
    "x-ssl-client-cert",
    "x-forwarded-client-cert",
];

/// Why a request was refused at the front door. Each is a 400 with
/// `x-mesh-reply: bad-request`, counted in `httpRejected`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("more than one Host header ({0})")]
    DuplicateHost(usize),
    #[error("an HTTP/1.1 request without a Host header")]
    MissingHost,
    #[error("an HTTP/2 request with neither :authority nor Host")]
    MissingAuthority,
    #[error("invalid Host header {0:?}")]
    InvalidHost(String),
    #[error("Host {host:?} disagrees with the request's authority {authority:?}")]
    HostMismatch { host: String, authority: String },
    #[error("both Content-Length and Transfer-Encoding")]
    ContentLengthAndTransferEncoding,
    #[error("a fragment (#) in the request target")]
    Fragment,
    #[error("bad request target: {0}")]
    Target(String),
    #[error("the request head could not be checked as it was sent")]
    Unverified,
    #[error("invalid request body: {0}")]
    Body(String),
}

impl Violation {
    /// The connection cannot be trusted to frame the next request.
    pub(in crate::proxy) fn closes(&self) -> bool {
        matches!(self, Self::ContentLengthAndTransferEncoding | Self::Unverified | Self::Body(_))
    }
}

/// The front door of one connection: the notes [`Inspected`] took on its
/// HTTP/1 request heads.
#[derive(Clone, Default)]
pub(in crate::proxy) struct FrontDoor {
    heads: Arc<Mutex<VecDeque<Head>>>,
}

/// What the raw bytes of one HTTP/1 request head said, beyond what hyper
/// passes on.
#[derive(Debug)]
struct Head {
    method: String,
    /// The target as sent (fragment included).
    target: String,
    violation: Option<Violation>,
}

impl FrontDoor {
    /// Wraps a connection's I/O so that its HTTP/1 request heads are read
    /// for this front door.
    pub fn inspect<IO>(&self, io: IO) -> Inspected<IO> {
        Inspected { io, scan: Scanner::default(), heads: self.heads.clone() }
    }

    /// Everything the front door refuses, for one request as hyper parsed it.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), Violation> {
        if req.version() <= Version::HTTP_11 {
            self.raw_head(req)?;
        }
        let headers = req.headers();
        let hosts = headers.get_all(header::HOST).iter().count();
        if hosts > 1 {
            return Err(Violation::DuplicateHost(hosts));
        }
        let host = headers.get(header::HOST);
        let authority = req.uri().authority();
        if host.is_none() {
            if req.version() == Version::HTTP_11 {
                return Err(Violation::MissingHost);
            }
            if req.version() == Version::HTTP_2 && authority.is_none() && req.method() != http::Method::CONNECT {
                return Err(Violation::MissingAuthority);
            }
        }
        if let Some(h) = host {
            let text = || String::from_utf8_lossy(h.as_bytes()).into_owned();
            // RFC 9110 §7.2: uri-host [":" port] (empty when the target has
            // no authority), never userinfo.
            let valid = h.is_empty() || h.to_str().ok().and_then(|s| s.parse::<http::uri::Authority>().ok()).is_some_and(|a| !a.as_str().contains('@'));
            if !valid {
                return Err(Violation::InvalidHost(text()));
            }
            if let Some(a) = authority
                && !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes())
            {
                return Err(Violation::HostMismatch { host: text(), authority: a.to_string() });
            }
        }
        // hyper never passes both on, and h2 refuses Transfer-Encoding; a
        // second line of defence should either ever change.
        if headers.contains_key(header::CONTENT_LENGTH) && headers.contains_key(header::TRANSFER_ENCODING) {
            return Err(Violation::ContentLengthAndTransferEncoding);
        }
        Ok(())
    }

    /// The note on this request's head: it must be there, and be this
    /// request's (the scanner and hyper framed the bytes alike).
    fn raw_head<B>(&self, req: &Request<B>) -> Result<(), Violation> {
        let Some(head) = self.heads.lock().expect("poisoned").pop_front() else {
            return Err(Violation::Unverified);
        };
        let sent = head.target.split('#').next().unwrap_or_default();
        let same_target = req.uri().path_and_query().is_none_or(|pq| sent.ends_with(pq.as_str()));
        if head.method != req.method().as_str() || !same_target {
            tracing::warn!(method = %req.method(), uri = %req.uri(), noted = ?head, "the front door and hyper framed a request differently");
            return Err(Violation::Unverified);
        }
        head.violation.map_or(Ok(()), Err)
    }
}

/// A connection's I/O, its incoming HTTP/1 bytes read a second time
/// (without copying them, but for heads and chunk-size lines) by
/// [`Scanner`].
pub(in crate::proxy) struct Inspected<IO> {
    io: IO,
    scan: Scanner,
    heads: Arc<Mutex<VecDeque<Head>>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Inspected<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if !this.scan.done() {
            let heads = &this.heads;
            this.scan.feed(&buf.filled()[before..], &mut |h| heads.lock().expect("poisoned").push_back(h));
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Inspected<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Largest head (or chunk-size or trailer line) the scanner keeps: hyper
/// refuses larger heads anyway (431).
const MAX_SCAN: usize = super::MAX_HEADER_BYTES + 1024;
/// More header lines than hyper accepts (100).
const MAX_HEADERS: usize = 128;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Follows HTTP/1 request framing over the bytes of one connection, with
/// httparse, as hyper does. Where the two could part ways (bytes hyper will
/// refuse, an upgraded connection, HTTP/2), it stops: later heads get no
/// note, and [`FrontDoor::check`] refuses a request it has no note for.
#[derive(Debug, Default)]
struct Scanner {
    state: State,
    /// The bytes of the head or line being read.
    buf: Vec<u8>,
    heads_seen: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Head,
    /// A body of this many more bytes.
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    /// Not HTTP/1 any more (or never was): nothing left to read.
    Done,
}

impl Scanner {
    fn done(&self) -> bool {
        self.state == State::Done
    }

    fn feed(&mut self, mut bytes: &[u8], note: &mut dyn FnMut(Head)) {
        while !bytes.is_empty() && self.state != State::Done {
            match self.state {
                State::Body(n) | State::ChunkData(n) => {
                    let take = (bytes.len() as u64).min(n);
                    bytes = &bytes[take as usize..];
                    let left = n - take;
                    self.state = match self.state {
                        State::Body(_) if left == 0 => State::Head,
                        State::Body(_) => State::Body(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                }
                State::Head => {
                    // The head may end anywhere in `bytes`: parse what we
                    // have, and give back what follows the head.
                    let old = self.buf.len();
                    self.buf.extend_from_slice(bytes);
                    match self.head(note) {
                        Some(used) => {
                            let rest = used.saturating_sub(old);
                            bytes = &bytes[rest.min(bytes.len())..];
                            self.buf.clear();
                        }
                        None => {
                            bytes = &[];
                            if self.buf.len() > MAX_SCAN {
                                self.state = State::Done;
                            }
                        }
                    }
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => {
                    let Some(lf) = bytes.iter().position(|b| *b == b'\n') else {
                        self.buf.extend_from_slice(bytes);
                        if self.buf.len() > MAX_SCAN {
                            self.state = State::Done;
                        }
                        return;
                    };
                    self.buf.extend_from_slice(&bytes[..=lf]);
                    bytes = &bytes[lf + 1..];
                    let line = std::mem::take(&mut self.buf);
                    self.line(&line);
                }
                State::Done => {}
            }
        }
    }

    /// One line of a chunked body (with its LF).
    fn line(&mut self, line: &[u8]) {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        self.state = match self.state {
            State::ChunkSize => {
                let digits = text.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                match std::str::from_utf8(&text[..digits]).ok().and_then(|d| u64::from_str_radix(d, 16).ok()) {
                    Some(0) => State::Trailers,
                    Some(n) => State::ChunkData(n),
                    // hyper refuses the body: the connection ends.
                    None => State::Done,
                }
            }
            State::ChunkEnd if text.is_empty() => State::ChunkSize,
            State::Trailers if text.is_empty() => State::Head,
            State::Trailers => State::Trailers,
            _ => State::Done,
        };
    }

    /// Parses the head in `buf`; `Some(length)` once it is complete.
    fn head(&mut self, note: &mut dyn FnMut(Head)) -> Option<usize> {
        if self.heads_seen == 0 && H2_PREFACE.starts_with(&self.buf[..self.buf.len().min(H2_PREFACE.len())]) {
            if self.buf.len() >= H2_PREFACE.len() {
                self.state = State::Done;
            }
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let used = match req.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                // hyper refuses it too (400) and closes.
                self.state = State::Done;
                return None;
            }
        };
        self.heads_seen += 1;
        let target = req.path.unwrap_or_default();
        let mut lengths = 0;
        let mut length = None;
        let mut encodings = 0;
        let mut chunked = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                encodings += 1;
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
        }
        let violation = if lengths > 0 && encodings > 0 {
            Some(Violation::ContentLengthAndTransferEncoding)
        } else if target.contains('#') {
            Some(Violation::Fragment)
        } else {
            None
        };
        note(Head { method: req.method.unwrap_or_default().to_owned(), target: target.to_owned(), violation });
        // The framing hyper applies (RFC 9112 §6.3): chunked wins over a
        // length; a request without either has no body.
        self.state = if encodings > 0 {
            if chunked { State::ChunkSize } else { State::Done }
        } else if lengths > 0 {
            match length {
                Some(0) => State::Head,
                Some(n) => State::Body(n),
                None => State::Done,
            }
        } else {
            State::Head
        };
        Some(used)
    }
}

/// Compares a header name to one of [`IDENTITY_HEADERS`]: ASCII
/// case-insensitive, `_` and `-` alike.
fn same_canonical(name: &str, listed: &str) -> bool {
    let canon = |b: u8| if b == b'_' { b'-' } else { b.to_ascii_lowercase() };
    name.len() == listed.len() && name.bytes().zip(listed.bytes()).all(|(a, b)| canon(a) == canon(b))
}

pub(in crate::proxy) fn is_identity_header(name: &HeaderName) -> bool {
    IDENTITY_HEADERS.iter().any(|l| same_canonical(name.as_str(), l))
}

/// Removes every header that claims an identity ([`IDENTITY_HEADERS`]).
pub(in crate::proxy) fn strip_identity(headers: &mut HeaderMap) {
    let found: Vec<HeaderName> = headers.keys().filter(|n| is_identity_header(n)).cloned().collect();
    for name in found {
        tracing::debug!(header = %name, "client-sent identity header removed");
        headers.remove(&name);
    }
}

/// Why a client's request body failed, once it has.
#[derive(Clone, Default)]
pub(in crate::proxy) struct BodyFault(Arc<OnceLock<String>>);

impl BodyFault {
    /// The client's body failed (bad framing, or the client went away):
    /// whatever the upstream then did is not the upstream's fault.
    pub fn get(&self) -> Option<Violation> {
        self.0.get().map(|e| Violation::Body(e.clone()))
    }
}

/// A client's request body on its way upstream: its errors recorded in a
/// [`BodyFault`], and (at the destination) identity headers removed from
/// its trailers.
pub(in crate::proxy) struct ClientBody {
    inner: Incoming,
    fault: BodyFault,
    strip_trailers: bool,
}

impl ClientBody {
    pub fn new(inner: Incoming, fault: BodyFault, strip_trailers: bool) -> Self {
        Self { inner, fault, strip_trailers }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) if this.strip_trailers && frame.is_trailers() => {
                let mut trailers = frame.into_trailers().unwrap_or_default();
                strip_identity(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Some(Err(e)) => {
                let _ = this.fault.0.set(crate::error_chain(&e));
                Poll::Ready(Some(Err(e)))
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

/// `cargo fuzz` entry (`fuzz/`): the bytes of a connection, read by the
/// scanner in one piece and in pieces of `chunk` bytes (the notes must be
/// the same), then the first head as hyper would frame it checked by the
/// front door, its target normalized and given to `decide`.
#[cfg(feature = "fuzzing")]
pub(in crate::proxy) fn fuzz_front_door(data: &[u8], chunk: usize, decide: &dyn Fn(&Request<()>, &crate::policy::NormalizedPath<'_>)) {
    let notes = |chunk: usize| {
        let mut scan = Scanner::default();
        let mut heads = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            scan.feed(piece, &mut |h| heads.push(h));
        }
        heads
    };
    let whole = notes(data.len());
    let pieces = notes(chunk);
    let text = |hs: &[Head]| hs.iter().map(|h| format!("{h:?}")).collect::<Vec<_>>();
    assert_eq!(text(&whole), text(&pieces), "the scanner's notes depend on how the bytes arrived");
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(data) else { return };
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else { return };
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let mut builder = Request::builder().method(method).uri(target).version(version);
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(req) = builder.body(()) else { return };
    let door = FrontDoor::default();
    door.heads.lock().expect("poisoned").extend(whole);
    if door.check(&req).is_err() {
        return;
    }
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    if let Ok(path) = crate::policy::normalize_path(target) {
        decide(&req, &path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(bytes: &[&[u8]]) -> (Vec<Head>, State) {
        let mut s = Scanner::default();
        let mut heads = Vec::new();
        for b in bytes {
            s.feed(b, &mut |h| heads.push(h));
        }
        (heads, s.state)
    }

    #[test]
    fn scanner_follows_lengths_chunks_and_pipelining_in_any_split() {
        let wire: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /zGET /b#f HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nGET\r\n0\r\nx-t: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        // Every split point, and byte by byte.
        for cut in 0..wire.len() {
            let (heads, state) = scan(&[&wire[..cut], &wire[cut..]]);
            let got: Vec<_> = heads.iter().map(|h| (h.target.as_str(), h.violation.clone())).collect();
            assert_eq!(
                got,
                [("/a", None), ("/b#f", Some(Violation::Fragment)), ("/c", None), ("/d", Some(Violation::ContentLengthAndTransferEncoding))],
                "split at {cut}"
            );
            assert_eq!(state, State::Head);
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(scan(&bytes).0.len(), 4);
    }

    #[test]
    fn scanner_stops_at_http2_and_at_what_hyper_refuses() {
        assert_eq!(scan(&[H2_PREFACE, b"\0\0\0\x04"]).1, State::Done);
        assert_eq!(scan(&[b"PRI * HTTP/2.0\r\n"]).1, State::Head, "still could be either");
        assert_eq!(scan(&[b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"]).1, State::Done);
        let (heads, state) = scan(&[b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]);
        assert_eq!((heads.len(), state), (1, State::Done));
    }

    #[test]
    fn identity_headers_compare_canonicalized() {
        for name in ["x-mesh-peer-identity", "x_mesh_peer_identity", "X-Forwarded_Client-Cert", "x-spiffe-id"] {
            let n = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert!(is_identity_header(&n), "{name}");
        }
        for name in ["x-mesh-peer", "x-mesh-peer-identityx", "traceparent"] {
            assert!(!is_identity_header(&HeaderName::from_bytes(name.as_bytes()).unwrap()), "{name}");
        }
    }
}
