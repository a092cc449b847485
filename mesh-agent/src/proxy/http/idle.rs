//! Idle HTTP/1.1 connections without hyper's buffers.
//!
//! hyper's HTTP/1.1 server connection holds an 8 KiB read buffer and an
//! 8 KiB header buffer for its whole life, idle or not: at the agent's L7
//! destination they were three quarters of what an idle keep-alive
//! connection cost (bench/PROFILE.md, "Memory per connection"). So an
//! HTTP/1.1 connection is served in *generations*: when it goes idle after
//! an exchange, its hyper connection ends without touching the stream
//! (`Connection: close` is never sent, nothing is shut down), the stream and
//! the connection's stack are kept, and the next request's first bytes
//! start a new hyper connection on them. Parked, a connection holds its
//! stream, its stack and a few words.
//!
//! Ending hyper's connection is safe only when hyper is between requests:
//! its graceful shutdown then closes at once, and hyper hands back the
//! stream with whatever it had read past the last request (a next request's
//! first bytes), which the next generation reads first. Called at any other
//! time it only turns keep-alive off, so the exact condition matters. hyper
//! does not expose its state; it is derived from what the agent sees:
//! - at least one request was handed to the stack in this generation (a
//!   new hyper connection counts as busy until its first exchange ends);
//! - every response, future and body, is done (hyper drops a response body
//!   once it has written its end);
//! - the latest request had no body (HTTP/1.1 reads requests in order, so
//!   every earlier body was read to its end before it; a request whose body
//!   may still be arriving keeps its generation busy);
//! - the last write-side call hyper made on the stream was a flush that
//!   completed (hyper flushes after every write pass, and moves a finished
//!   exchange to idle as that flush completes);
//! - hyper's poll returned pending (it has nothing left to do).
//!
//! If the condition were ever wrong, hyper would not close on the spot: the
//! generation then stays, keep-alive off, and the connection closes after
//! its exchange as an ordinary one does; it is never resumed mid-message.
//! Connections whose every request carries a body (a POST-only client) stay
//! in one generation.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    future::Future,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{HttpService, RespBody, Serve};
use crate::proxy::sniff::Prefixed;

/// What a connection's generation has seen, shared by its stack's service
/// (requests and responses), its stream (writes and flushes) and the loop
/// that serves it.
#[derive(Debug)]
pub(in crate::proxy) struct Idle {
    /// Requests handed to the stack in this generation.
    calls: AtomicUsize,
    /// Responses not yet written to their end.
    in_flight: AtomicUsize,
    /// Whether the latest request came without a body.
    last_bodyless: AtomicBool,
    /// Whether the last write-side call was a completed flush.
    flushed: AtomicBool,
    /// Set while a generation ends to park: its shutdown of the stream is
    /// skipped.
    parking: AtomicBool,
}

impl Default for Idle {
    fn default() -> Self {
        Self {
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            last_bodyless: AtomicBool::new(false),
            flushed: AtomicBool::new(true),
            parking: AtomicBool::new(false),
        }
    }
}

impl Idle {
    /// A request handed to the stack: busy until its response is written.
    pub(super) fn start(self: &Arc<Self>, bodyless: bool) -> InFlight {
        self.calls.fetch_add(1, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
        self.last_bodyless.store(bodyless, Relaxed);
        InFlight(self.clone())
    }

    /// Whether hyper is between requests (the module's condition).
    fn between_requests(&self) -> bool {
        self.calls.load(Relaxed) > 0 && self.in_flight.load(Relaxed) == 0 && self.last_bodyless.load(Relaxed) && self.flushed.load(Relaxed)
    }
}

/// A response not yet written; dropped with its body (or with its future,
/// if the connection ends first).
pub(super) struct InFlight(Arc<Idle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A response body that says when it is gone.
pub(in crate::proxy) struct Tracked {
    body: RespBody,
    _in_flight: Option<InFlight>,
}

impl Tracked {
    pub(super) fn new(body: RespBody, in_flight: Option<InFlight>) -> Self {
        Self { body, _in_flight: in_flight }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The stream as a generation's hyper connection sees it: its writes and
/// flushes noted, its shutdown skipped when the generation parks.
struct Watched<IO> {
    io: Prefixed<IO>,
    idle: Arc<Idle>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.idle.flushed.store(false, Relaxed);
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.idle.flushed.store(false, Relaxed);
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        this.idle.flushed.store(true, Relaxed);
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.idle.parking.load(Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

type Conn<IO, S> = hyper::server::conn::http1::UpgradeableConnection<TokioIo<Watched<IO>>, Serve<S>>;

/// Serves HTTP/1.1 on `io` in generations (the module's doc) until the
/// connection ends; resolves to how it ended and how many times it parked.
pub(super) fn serve<IO, S>(io: Prefixed<IO>, svc: Serve<S>) -> Http1<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService + Unpin,
{
    let idle = svc.idle.clone();
    Http1 { state: State::Serving(generation(io, svc, &idle)), idle, parks: 0 }
}

/// The connection's task: a state machine written out, so that a parked
/// connection holds its stream and stack once, and hyper's connection
/// (boxed, a kilobyte) only while a generation runs.
pub(super) struct Http1<IO, S: HttpService> {
    state: State<IO, S>,
    idle: Arc<Idle>,
    parks: u32,
}

enum State<IO, S: HttpService> {
    Serving(Box<Conn<IO, S>>),
    /// Parked: waiting for the next request's first bytes.
    Waiting(Prefixed<IO>, Serve<S>),
    /// The client closed while parked: so does the agent, as hyper does.
    Closing(Prefixed<IO>),
    Done,
}

/// A new generation's hyper connection.
fn generation<IO, S>(io: Prefixed<IO>, svc: Serve<S>, idle: &Arc<Idle>) -> Box<Conn<IO, S>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService + Unpin,
{
    idle.calls.store(0, Relaxed);
    Box::new(super::http1_server().serve_connection(TokioIo::new(Watched { io, idle: idle.clone() }), svc).with_upgrades())
}

impl<IO, S> Future for Http1<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService + Unpin,
{
    type Output = (Result<(), hyper::Error>, u32);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Serving(conn) => {
                    let (result, parked) = ready!(poll_generation(conn, &this.idle, cx));
                    let State::Serving(conn) = std::mem::replace(&mut this.state, State::Done) else { unreachable!() };
                    let parts = match result {
                        Ok(()) if parked => conn.into_parts(),
                        r => return Poll::Ready((r, this.parks)),
                    };
                    // `None`: upgraded, the upgrade has the stream.
                    let Some(hyper::server::conn::http1::Parts { io, read_buf, service, .. }) = parts else {
                        return Poll::Ready((Ok(()), this.parks));
                    };
                    this.parks += 1;
                    // What it freed goes back to the kernel once such
                    // exchanges settle.
                    crate::memory::note_churn();
                    let mut io = io.into_inner().io;
                    this.state = if read_buf.is_empty() {
                        State::Waiting(io, service)
                    } else {
                        // Part of the next request is here already: serve
                        // it now.
                        io.unread(&read_buf);
                        State::Serving(generation(io, service, &this.idle))
                    };
                }
                State::Waiting(io, _) => {
                    let more = ready!(io.poll_fill(cx));
                    let State::Waiting(io, svc) = std::mem::replace(&mut this.state, State::Done) else { unreachable!() };
                    match more {
                        Ok(true) => this.state = State::Serving(generation(io, svc, &this.idle)),
                        Ok(false) => this.state = State::Closing(io),
                        Err(e) => {
                            tracing::debug!(error = %e, "idle HTTP connection failed");
                            return Poll::Ready((Ok(()), this.parks));
                        }
                    }
                }
                State::Closing(io) => {
                    let _ = ready!(Pin::new(io).poll_shutdown(cx));
                    this.state = State::Done;
                    return Poll::Ready((Ok(()), this.parks));
                }
                State::Done => panic!("an HTTP/1.1 connection polled after its end"),
            }
        }
    }
}

/// Polls a generation; when it ends, its result and whether it parked.
fn poll_generation<IO, S>(conn: &mut Conn<IO, S>, idle: &Idle, cx: &mut Context<'_>) -> Poll<(Result<(), hyper::Error>, bool)>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService + Unpin,
{
    let result = match Pin::new(&mut *conn).poll(cx) {
        Poll::Ready(r) => r,
        Poll::Pending => {
            if !idle.between_requests() {
                return Poll::Pending;
            }
            idle.parking.store(true, Relaxed);
            Pin::new(&mut *conn).graceful_shutdown();
            // Between requests, hyper has closed: this poll ends it.
            match Pin::new(&mut *conn).poll(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    // Not between requests after all: keep-alive is off,
                    // the connection ends after its exchange.
                    idle.parking.store(false, Relaxed);
                    tracing::debug!("HTTP connection was not idle when it seemed so; it closes after its exchange");
                    return Poll::Pending;
                }
            }
        }
    };
    Poll::Ready((result, idle.parking.swap(false, Relaxed)))
}

#[cfg(test)]
mod tests;
