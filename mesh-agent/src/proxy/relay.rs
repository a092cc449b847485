//! The byte relay between two streams (app ↔ tunnel, tunnel ↔ app) that
//! holds **no buffer while a connection is idle**.
//!
//! `tokio::io::copy_bidirectional` keeps two 8 KiB buffers per connection
//! for its whole life: with a thousand mostly idle connections that is 16 MB
//! of an agent's memory doing nothing. Here each direction reads into a
//! scratch buffer on the stack of the poll call and writes it straight on;
//! only when the writer cannot take everything (a slow reader on the other
//! side) does the rest move to a heap buffer of exactly that size, freed
//! once written. Reads are up to 64 KiB, so a bulk stream also makes fewer
//! and larger writes (TLS records of the full 16 KiB).

use std::{
    future::poll_fn,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one read takes.
const SCRATCH: usize = 64 * 1024;

/// One direction of the relay.
#[derive(Default)]
struct OneWay {
    /// Read but not yet written: only while the writer is behind.
    pending: Option<Box<[u8]>>,
    /// Written so far of `pending`.
    pos: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    amount: u64,
}

impl OneWay {
    /// Writes `data` from offset 0 on; what the writer cannot take now is
    /// kept in `pending`. Ready(Ok) when all of it went out.
    fn write_all<W: AsyncWrite + Unpin + ?Sized>(&mut self, cx: &mut Context<'_>, w: &mut W, data: &[u8]) -> Poll<io::Result<()>> {
        let mut off = 0;
        while off < data.len() {
            match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    off += n;
                    self.amount += n as u64;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.pending = Some(data[off..].into());
                    self.pos = 0;
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.amount));
        }
        loop {
            // What the writer could not take last time goes first.
            if let Some(buf) = self.pending.take() {
                let rest = &buf[self.pos..];
                match self.write_all(cx, w, rest) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // `write_all` kept the unwritten tail; flush what
                        // did go out so the peer can make progress.
                        if self.need_flush {
                            ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.amount));
            }
            let mut scratch = [MaybeUninit::<u8>::uninit(); SCRATCH];
            let mut rb = ReadBuf::uninit(&mut scratch);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if self.need_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let data = rb.filled();
                    if data.is_empty() {
                        self.read_done = true;
                        continue;
                    }
                    match self.write_all(cx, w, data) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both have ended (an end of
/// stream read on one side shuts the other side's write half, as
/// `tokio::io::copy_bidirectional` does); returns the bytes copied each way
/// (`a` to `b`, `b` to `a`). The first error ends the relay.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = OneWay::default();
    let mut b_to_a = OneWay::default();
    poll_fn(|cx| {
        let ab = a_to_b.poll_copy(cx, &mut *a, &mut *b)?;
        let ba = b_to_a.poll_copy(cx, &mut *b, &mut *a)?;
        match (ab, ba) {
            (Poll::Ready(ab), Poll::Ready(ba)) => Poll::Ready(Ok((ab, ba))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Writes `data` then ends the write half, while reading everything the
    /// other way; returns what was read.
    async fn talk(io: tokio::io::DuplexStream, data: Vec<u8>) -> Vec<u8> {
        let (mut rd, mut wr) = tokio::io::split(io);
        let w = tokio::spawn(async move {
            wr.write_all(&data).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        w.await.unwrap();
        got
    }

    #[tokio::test]
    async fn copies_both_ways_and_propagates_end_of_stream() {
        // Pipes far smaller than the data and the scratch buffer: the
        // writers fall behind and the relay must keep what they did not take.
        let (client, mut relay_a) = tokio::io::duplex(1024);
        let (mut relay_b, server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { copy_bidirectional(&mut relay_a, &mut relay_b).await });
        let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let client_side = tokio::spawn(talk(client, up.clone()));
        let received = talk(server, down.clone()).await;
        let back = client_side.await.unwrap();
        let (ab, ba) = relay.await.unwrap().unwrap();
        assert!(received == up, "the server got {} bytes, not the {} sent", received.len(), up.len());
        assert!(back == down, "the client got {} bytes, not the {} sent", back.len(), down.len());
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn an_error_on_one_side_ends_the_relay() {
        let (client, mut relay_a) = tokio::io::duplex(1024);
        let (mut relay_b, server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { copy_bidirectional(&mut relay_a, &mut relay_b).await });
        drop(server);
        let mut client = client;
        // Writing towards a side that is gone fails the relay; the client
        // then sees its stream end.
        let _ = client.write_all(b"hello").await;
        assert!(relay.await.unwrap().is_err());
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }
}
