//! Protocol detection for ports nobody declared: the first bytes a client
//! sends tell HTTP/1.x (a request line starting with a method and a space)
//! from HTTP/2 with prior knowledge (the connection preface) from anything
//! else. The bytes read are replayed to whoever serves the connection next.
//!
//! A client that sends nothing within the timeout (a server-first protocol
//! such as SMTP or MySQL), closes, or sends anything else, is not HTTP.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use crate::state::AppHttp;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"CONNECT "];

/// What the first bytes say, or `None` when more are needed.
fn classify(buf: &[u8]) -> Option<Option<AppHttp>> {
    if buf.len() >= PREFACE.len() && buf.starts_with(PREFACE) {
        return Some(Some(AppHttp::Http2));
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        return Some(Some(AppHttp::Http1));
    }
    let could_be = PREFACE.starts_with(buf) || METHODS.iter().any(|m| m.starts_with(buf));
    if could_be { None } else { Some(None) }
}

/// Reads the first bytes of `io` (for at most `timeout`) and says whether
/// they are HTTP; the returned stream replays them.
pub async fn detect<IO: AsyncRead + Unpin>(mut io: IO, timeout: Duration) -> (Option<AppHttp>, Prefixed<IO>) {
    let mut buf = Vec::with_capacity(PREFACE.len());
    let deadline = tokio::time::Instant::now() + timeout;
    let verdict = loop {
        if let Some(v) = classify(&buf) {
            break v;
        }
        let mut chunk = [0u8; PREFACE.len()];
        let want = PREFACE.len() - buf.len().min(PREFACE.len());
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..want.max(1)])).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            // EOF, an error or the timeout: not HTTP (the error, if any,
            // shows again on the next read).
            _ => break None,
        }
    };
    (verdict, Prefixed::new(buf, io))
}

/// The most the first read of [`http_version`] takes: a request's first
/// segment, usually all of it.
const FIRST_READ: usize = 4096;

/// Which HTTP version a client speaks (h2c with prior knowledge sends the
/// connection preface first, RFC 9113 3.4; anything else is HTTP/1.x, for
/// its server to accept or refuse), from the bytes of its first read (more
/// only while they could still be the preface), with the stream replaying
/// them. Read on the stack and kept exactly, so that the HTTP server's
/// first read gets them all at once: given a few bytes first (as hyper's
/// own version detection gives them), its read buffer grows to twice its
/// size and stays so for the connection's life. `None`: the client closed
/// before sending anything.
pub async fn http_version<IO: AsyncRead + Unpin>(mut io: IO) -> std::io::Result<Option<(AppHttp, Prefixed<IO>)>> {
    let mut prefix = Vec::new();
    let version = std::future::poll_fn(|cx| {
        loop {
            if std::task::ready!(poll_segment(&mut io, cx, &mut prefix))? == 0 {
                return Poll::Ready(Ok::<_, std::io::Error>(None));
            }
            if prefix.len() >= PREFACE.len() || !PREFACE.starts_with(&prefix) {
                let h2 = prefix.starts_with(PREFACE);
                return Poll::Ready(Ok(Some(if h2 { AppHttp::Http2 } else { AppHttp::Http1 })));
            }
        }
    })
    .await?;
    Ok(version.map(|v| (v, Prefixed::new(prefix, io))))
}

/// Reads what `io` has (a segment, at most [`FIRST_READ`] bytes) on the
/// stack and appends exactly that to `into`; 0 at the end of the stream.
fn poll_segment<IO: AsyncRead + Unpin>(io: &mut IO, cx: &mut Context<'_>, into: &mut Vec<u8>) -> Poll<std::io::Result<usize>> {
    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
    let mut rb = ReadBuf::uninit(&mut scratch);
    std::task::ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    into.extend_from_slice(rb.filled());
    Poll::Ready(Ok(rb.filled().len()))
}

/// A stream whose first bytes were already read: they come out first (and
/// their buffer is freed once they have).
pub struct Prefixed<IO> {
    prefix: Vec<u8>,
    pos: usize,
    io: IO,
    /// An error of the read that followed the last of the prefix in the
    /// same call, for the next call (that one returned the prefix).
    deferred: Option<std::io::Error>,
}

impl<IO> Prefixed<IO> {
    fn new(prefix: Vec<u8>, io: IO) -> Self {
        Self { prefix, pos: 0, io, deferred: None }
    }

    /// Puts `bytes` back in front of what is still to be read.
    pub fn unread(&mut self, bytes: &[u8]) {
        let mut prefix = Vec::with_capacity(bytes.len() + self.prefix.len() - self.pos);
        prefix.extend_from_slice(bytes);
        prefix.extend_from_slice(&self.prefix[self.pos..]);
        (self.prefix, self.pos) = (prefix, 0);
    }
}

impl<IO: AsyncRead + Unpin> Prefixed<IO> {
    /// Polls for the stream's next bytes and keeps them in front, read as
    /// [`http_version`] reads (kept exactly, so that the next reader gets
    /// them all at once); `false`: the stream ended.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        if let Some(e) = self.deferred.take() {
            return Poll::Ready(Err(e));
        }
        if self.pos > 0 {
            self.prefix.drain(..self.pos);
            self.pos = 0;
        }
        let n = std::task::ready!(poll_segment(&mut self.io, cx, &mut self.prefix))?;
        Poll::Ready(Ok(n > 0))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.deferred.take() {
            return Poll::Ready(Err(e));
        }
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos < this.prefix.len() {
                return Poll::Ready(Ok(()));
            }
            (this.prefix, this.pos) = (Vec::new(), 0);
            // What has arrived since goes in the same read: a reader that
            // grows its buffer after a short read (hyper does) gets the
            // whole first segment at once.
            if buf.remaining() > 0
                && let Poll::Ready(Err(e)) = Pin::new(&mut this.io).poll_read(cx, buf)
            {
                this.deferred = Some(e);
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Some(AppHttp::Http1)));
        assert_eq!(classify(b"OPTIONS "), Some(Some(AppHttp::Http1)));
        assert_eq!(classify(PREFACE), Some(Some(AppHttp::Http2)));
        // Not yet decidable.
        for partial in [&b""[..], b"G", b"GE", b"GET", b"PRI * HTTP/2", b"OPTION"] {
            assert_eq!(classify(partial), None, "{partial:?}");
        }
        // Not HTTP: TLS, SSH, lowercase methods, a method without a space.
        for other in [&b"\x16\x03\x01\x02\x00"[..], b"SSH-2.0-x", b"get / HTTP/1.1", b"GETX", b"PRI * HTTP/1.1"] {
            assert_eq!(classify(other), Some(None), "{other:?}");
        }
    }

    #[tokio::test]
    async fn replays_what_it_read_and_gives_up_on_silence() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b"GE").await.unwrap();
        let sniff = tokio::spawn(detect(server, Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"T /x HTTP/1.1\r\n\r\n").await.unwrap();
        let (verdict, mut stream) = sniff.await.unwrap();
        assert_eq!(verdict, Some(AppHttp::Http1));
        let mut all = vec![0u8; 19];
        stream.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"GET /x HTTP/1.1\r\n\r\n");

        // A server-first protocol: the client waits, detection times out.
        let (_client, server) = tokio::io::duplex(1024);
        let (verdict, _) = detect(server, Duration::from_millis(50)).await;
        assert_eq!(verdict, None);
    }

    /// The client's version from its first bytes, handed on whole in one
    /// read (what keeps the HTTP server's read buffer at its first size);
    /// a preface split over reads still says HTTP/2; a client that closes
    /// first says nothing.
    #[tokio::test]
    async fn tells_the_clients_version_and_hands_its_first_bytes_on_whole() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let request = b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n";
        client.write_all(request).await.unwrap();
        let (version, mut stream) = http_version(server).await.unwrap().unwrap();
        assert_eq!(version, AppHttp::Http1);
        let mut buf = [0u8; 8192];
        let mut rb = ReadBuf::new(&mut buf);
        std::future::poll_fn(|cx| Pin::new(&mut stream).poll_read(cx, &mut rb)).await.unwrap();
        assert_eq!(rb.filled(), request, "one read gives all of it");
        assert!(stream.prefix.capacity() == 0, "the replayed bytes' buffer is freed");
        client.write_all(b"more").await.unwrap();
        let mut more = [0u8; 4];
        stream.read_exact(&mut more).await.unwrap();
        assert_eq!(&more, b"more");

        let (mut client, server) = tokio::io::duplex(1024);
        let version = tokio::spawn(http_version(server));
        client.write_all(&PREFACE[..9]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(&PREFACE[9..]).await.unwrap();
        let (version, mut stream) = version.await.unwrap().unwrap().unwrap();
        assert_eq!(version, AppHttp::Http2);
        let mut all = [0u8; 24];
        stream.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..], PREFACE);

        let (client, server) = tokio::io::duplex(1024);
        drop(client);
        assert!(http_version(server).await.unwrap().is_none());

        // After detection's short read, the replay carries what has
        // arrived since in the same read.
        let (mut client, server) = tokio::io::duplex(1024);
        let request = b"GET /y HTTP/1.1\r\nhost: b\r\n\r\n";
        client.write_all(request).await.unwrap();
        let (verdict, mut stream) = detect(server, Duration::from_secs(5)).await;
        assert_eq!(verdict, Some(AppHttp::Http1));
        assert!(stream.prefix.len() < request.len(), "detection reads only what it needs");
        let mut rb = ReadBuf::new(&mut buf);
        std::future::poll_fn(|cx| Pin::new(&mut stream).poll_read(cx, &mut rb)).await.unwrap();
        assert_eq!(rb.filled(), request);
    }
}
