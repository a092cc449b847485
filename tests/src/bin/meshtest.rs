//! `meshtest`: the TCP tool the end-to-end tests run inside pods.
//!
//! Every result is one JSON line on stdout, so tests parse rather than grep;
//! failures also exit non-zero.

// Beside this file, not in a folder of its own: the binary is `meshtest.rs`.
#[path = "meshtest/http_serve.rs"]
mod http_serve;
#[path = "meshtest/idle.rs"]
mod idle;
#[path = "meshtest/rapid_reset.rs"]
mod rapid_reset;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(
    name = "meshtest",
    about = "TCP echo/send/hold tool for mesh end-to-end tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server: echoes every byte until EOF, then shuts down its write
    /// side. Prints `{"listening":..}` once, `{"accepted":"IP:PORT"}` per
    /// connection and `{"closed":"IP:PORT","bytes":N}` when one ends.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Sends N deterministic pseudo-random bytes while reading the echo,
    /// half-closes, reads to EOF and compares SHA-256 of both directions.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Send this string repeated (cleartext a capture can find) instead
        /// of pseudo-random bytes.
        #[arg(long)]
        pattern: Option<String>,
        /// Seconds.
        #[arg(long, default_value_t = 5.0)]
        connect_timeout: f64,
        /// Seconds without progress on a read or write before giving up.
        #[arg(long, default_value_t = 30.0)]
        io_timeout: f64,
    },
    /// A TLS 1.3 client that presents NO certificate (and accepts any
    /// server certificate): handshakes, writes a line, reads until the peer
    /// closes. `ok` means the server refused it (alert, EOF or reset) within
    /// the timeout; `serverCertificate` says whether the server sent one.
    TlsProbe {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        connect_timeout: f64,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Writes raw bytes that are not what the port expects (garbage, a
    /// plaintext line, a cleartext HTTP/2 CONNECT), without half-closing,
    /// then reads until the peer closes. `ok` means the peer closed (EOF or
    /// reset) within the timeout; the line also says what came back.
    Raw {
        #[arg(long)]
        to: SocketAddr,
        #[command(flatten)]
        what: RawWhat,
        #[arg(long, default_value_t = 5.0)]
        connect_timeout: f64,
        /// Seconds to wait for the peer to close.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// `send` on N connections at once; one summary line.
    Burst {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: u32,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 10.0)]
        connect_timeout: f64,
        #[arg(long, default_value_t = 30.0)]
        io_timeout: f64,
    },
    /// Connects, writes a few bytes and aborts with a TCP reset.
    Reset {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        connect_timeout: f64,
    },
    /// Keeps ONE connection and pings through it (16 bytes, read the echo)
    /// every interval until FILE exists or SIGTERM; any error exits non-zero.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long)]
        control: PathBuf,
        #[arg(long, default_value_t = 5.0)]
        connect_timeout: f64,
        #[arg(long, default_value_t = 10.0)]
        io_timeout: f64,
    },
    /// HTTP/1.1 server (hyper) for the benchmark: `--body-bytes` (1 kB) per
    /// response, `GET /bulk?bytes=N` streams N bytes. Prints
    /// `{"listening":..}` once.
    HttpServe {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        /// tokio worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// N concurrent HTTP/1.1 keep-alive connections, one `GET /` each, held
    /// idle until FILE exists or SIGTERM, then one more `GET /` each and
    /// closed; see `meshtest/idle.rs`.
    Idle(idle::Args),
    /// HTTP/2 Rapid Reset flood (HEADERS + RST_STREAM pairs, cleartext,
    /// prior knowledge), reconnecting when closed; see
    /// `meshtest/rapid_reset.rs`.
    RapidReset(rapid_reset::Args),
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct RawWhat {
    /// N pseudo-random bytes (first byte 0xde: no TLS record type).
    #[arg(long)]
    garbage: Option<usize>,
    /// This text, as is (e.g. a plaintext protocol line).
    #[arg(long)]
    text: Option<String>,
    /// The HTTP/2 client preface, SETTINGS and a CONNECT to this
    /// authority, in cleartext (the tunnel's protocol without TLS).
    #[arg(long)]
    h2c_connect: Option<String>,
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Echo { listen } => echo(listen),
        Cmd::Send {
            to,
            bytes,
            seed,
            pattern,
            connect_timeout,
            io_timeout,
        } => {
            let payload = match pattern {
                Some(p) if p.is_empty() => return fail(json!({"reason": "--pattern must not be empty"})),
                Some(p) => Payload::Pattern(p.into_bytes()),
                None => Payload::Random(seed),
            };
            send(to, bytes, payload, secs(connect_timeout), secs(io_timeout))
        }
        Cmd::TlsProbe { to, connect_timeout, timeout } => tls_probe(to, secs(connect_timeout), secs(timeout)),
        Cmd::Raw { to, what, connect_timeout, timeout } => raw(to, what, secs(connect_timeout), secs(timeout)),
        Cmd::Burst { to, connections, bytes, connect_timeout, io_timeout } => {
            burst(to, connections, bytes, secs(connect_timeout), secs(io_timeout))
        }
        Cmd::Reset { to, connect_timeout } => reset(to, secs(connect_timeout)),
        Cmd::Hold {
            to,
            interval_ms,
            control,
            connect_timeout,
            io_timeout,
        } => hold(
            to,
            Duration::from_millis(interval_ms),
            &control,
            secs(connect_timeout),
            secs(io_timeout),
        ),
        Cmd::HttpServe { listen, body_bytes, threads } => http_serve::run(listen, body_bytes, threads),
        Cmd::Idle(args) => idle::run(args),
        Cmd::RapidReset(args) => rapid_reset::run(args),
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.001))
}

fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn fail(mut v: Value) -> ExitCode {
    v["ok"] = json!(false);
    emit(v);
    ExitCode::FAILURE
}

fn echo(listen: SocketAddr) -> ExitCode {
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => return fail(json!({"reason": format!("bind {listen}: {e}")})),
    };
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    emit(json!({"listening": local}));
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                emit(json!({"accepted": peer}));
                std::thread::spawn(move || {
                    let bytes = serve_echo(stream);
                    match bytes {
                        Ok(n) => emit(json!({"closed": peer, "bytes": n})),
                        Err(e) => emit(json!({"closed": peer, "error": e.to_string()})),
                    }
                });
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
    ExitCode::SUCCESS
}

fn serve_echo(stream: TcpStream) -> io::Result<u64> {
    let mut reader = stream.try_clone()?;
    let mut writer = stream;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match read_patient(&mut reader, &mut buf, Duration::from_secs(3600)) {
            Ok(0) => break,
            Ok(k) => {
                writer.write_all(&buf[..k])?;
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    writer.shutdown(Shutdown::Write)?;
    Ok(n)
}

/// SplitMix64: tiny, deterministic, good enough to make payloads that are
/// not trivially compressible or periodic.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fills a buffer with the next bytes of a payload.
type Filler = Box<dyn FnMut(&mut [u8]) + Send>;

/// What `send` writes.
#[derive(Clone)]
enum Payload {
    /// SplitMix64 output from this seed.
    Random(u64),
    /// This string over and over.
    Pattern(Vec<u8>),
}

impl Payload {
    fn generator(&self) -> Filler {
        match self.clone() {
            Payload::Random(seed) => {
                let mut rng = SplitMix(seed);
                Box::new(move |buf| rng.fill(buf))
            }
            Payload::Pattern(p) => {
                let mut at = 0usize;
                Box::new(move |buf| {
                    for b in buf {
                        *b = p[at];
                        at = (at + 1) % p.len();
                    }
                })
            }
        }
    }
}

fn send(to: SocketAddr, n: u64, payload: Payload, connect_timeout: Duration, io_timeout: Duration) -> ExitCode {
    match send_one(to, n, &payload, connect_timeout, io_timeout) {
        Ok(v) => {
            emit(v);
            ExitCode::SUCCESS
        }
        Err(v) => fail(v),
    }
}

/// `send` on N connections at once (one thread each); one summary line.
fn burst(to: SocketAddr, connections: u32, n: u64, connect_timeout: Duration, io_timeout: Duration) -> ExitCode {
    let threads: Vec<_> = (0..connections)
        .map(|i| {
            std::thread::spawn(move || send_one(to, n, &Payload::Random(u64::from(i) + 1), connect_timeout, io_timeout))
        })
        .collect();
    let mut ok = 0u32;
    let mut failures = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(v)) => failures.push(v),
            Err(_) => failures.push(json!({"reason": "thread panicked"})),
        }
    }
    let v = json!({"connections": connections, "succeeded": ok, "bytesEach": n,
                   "failures": failures.iter().take(5).collect::<Vec<_>>()});
    if failures.is_empty() {
        emit(with(v, "ok", json!(true)));
        ExitCode::SUCCESS
    } else {
        fail(v)
    }
}

/// Connects, writes a little, then aborts the connection with a reset
/// (SO_LINGER 0 + close).
fn reset(to: SocketAddr, connect_timeout: Duration) -> ExitCode {
    let mut stream = match TcpStream::connect_timeout(&to, connect_timeout) {
        Ok(s) => s,
        Err(e) => return fail(json!({"reason": format!("connect: {e}")})),
    };
    let _ = stream.write_all(b"about to reset");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid socket fd and a linger struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, (&linger as *const libc::linger).cast(),
                         std::mem::size_of::<libc::linger>() as libc::socklen_t)
    };
    if rc != 0 {
        return fail(json!({"reason": format!("SO_LINGER: {}", io::Error::last_os_error())}));
    }
    drop(stream);
    emit(json!({"ok": true, "reset": to.to_string()}));
    ExitCode::SUCCESS
}

fn send_one(
    to: SocketAddr,
    n: u64,
    payload: &Payload,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<Value, Value> {
    let started = Instant::now();
    let stream = match TcpStream::connect_timeout(&to, connect_timeout) {
        Ok(s) => s,
        Err(e) => {
            return Err(json!({"to": to.to_string(), "sent": 0, "received": 0,
                                     "reason": format!("connect: {e}")}));
        }
    };
    let (local, peer) = endpoints(&stream);
    let base =
        json!({"to": to.to_string(), "local": local, "peer": peer, "sent": 0, "received": 0});
    let setup = stream
        .set_read_timeout(Some(io_timeout))
        .and_then(|_| stream.set_write_timeout(Some(io_timeout)))
        .and_then(|_| stream.try_clone());
    let mut writer = match setup {
        Ok(w) => w,
        Err(e) => return Err(with(base, "reason", json!(format!("socket setup: {e}")))),
    };
    // Writing and reading concurrently: the echo comes back while we send,
    // and neither side's buffers can fill up and deadlock the other.
    let mut fill = payload.generator();
    let write_side = std::thread::spawn(move || -> Result<(u64, Vec<u8>), (u64, io::Error)> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < n {
            let len = (n - sent).min(buf.len() as u64) as usize;
            fill(&mut buf[..len]);
            hasher.update(&buf[..len]);
            writer.write_all(&buf[..len]).map_err(|e| (sent, e))?;
            sent += len as u64;
        }
        writer.shutdown(Shutdown::Write).map_err(|e| (sent, e))?;
        Ok((sent, hasher.finalize().to_vec()))
    });
    let mut reader = stream;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    let read_result = loop {
        match read_patient(&mut reader, &mut buf, io_timeout) {
            Ok(0) => break Ok(()),
            Ok(k) => {
                hasher.update(&buf[..k]);
                received += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let mut v = with(base, "received", json!(received));
    if let Err(e) = read_result {
        // The writer may be blocked; exiting the process ends it.
        return Err(with(
            v,
            "reason",
            json!(format!("read after {received} bytes: {e}")),
        ));
    }
    let (sent, sent_hash) = match write_side.join() {
        Ok(Ok(r)) => r,
        Ok(Err((sent, e))) => {
            v["sent"] = json!(sent);
            return Err(with(
                v,
                "reason",
                json!(format!("write after {sent} bytes: {e}")),
            ));
        }
        Err(_) => return Err(with(v, "reason", json!("writer thread panicked"))),
    };
    let received_hash = hasher.finalize().to_vec();
    v["sent"] = json!(sent);
    v["sha256"] = json!(hex(&sent_hash));
    v["millis"] = json!(started.elapsed().as_millis() as u64);
    if received != sent || received_hash != sent_hash {
        v["receivedSha256"] = json!(hex(&received_hash));
        return Err(with(v, "reason", json!("echo differs from what was sent")));
    }
    v["ok"] = json!(true);
    Ok(v)
}

/// A read that treats `EAGAIN` before `timeout` has passed as "try again",
/// as event-driven programs do. A socket in a sockmap (the mesh's socket
/// acceleration) can wake a blocked reader without data, and the kernel then
/// returns `EAGAIN` even on a blocking socket; see the README. A real timeout
/// (SO_RCVTIMEO) still ends the read with an error.
fn read_patient(s: &mut TcpStream, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
    let start = Instant::now();
    loop {
        match s.read(buf) {
            // A signal (SIGTERM for `hold`) interrupts the read; the caller
            // checks for termination between round trips.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < timeout => {
                let mut fd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(s), events: libc::POLLIN, revents: 0 };
                let left = timeout.saturating_sub(start.elapsed()).as_millis().min(i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut fd, 1, left.max(1)) };
            }
            r => return r,
        }
    }
}

fn read_exact_patient(s: &mut TcpStream, mut buf: &mut [u8], timeout: Duration) -> io::Result<()> {
    while !buf.is_empty() {
        match read_patient(s, buf, timeout)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

/// The cleartext HTTP/2 opening of a CONNECT to `authority`: preface, an
/// empty SETTINGS frame, and HEADERS (stream 1, END_HEADERS) with `:method
/// CONNECT` and `:authority` as HPACK literals without indexing.
fn h2c_connect(authority: &str) -> Vec<u8> {
    fn literal(out: &mut Vec<u8>, static_index: u8, value: &str) {
        out.push(static_index); // 0000xxxx: literal, indexed name
        out.push(value.len() as u8); // H=0, 7-bit length (short values only)
        out.extend_from_slice(value.as_bytes());
    }
    let mut block = Vec::new();
    literal(&mut block, 2, "CONNECT"); // :method
    literal(&mut block, 1, authority); // :authority
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0]); // SETTINGS, empty
    let len = block.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[0x01, 0x04, 0, 0, 0, 1]); // HEADERS, END_HEADERS, stream 1
    out.extend_from_slice(&block);
    out
}

fn raw(to: SocketAddr, what: RawWhat, connect_timeout: Duration, timeout: Duration) -> ExitCode {
    let (kind, bytes) = if let Some(n) = what.garbage {
        let mut b = vec![0u8; n.max(1)];
        SplitMix(7).fill(&mut b);
        b[0] = 0xde;
        ("garbage", b)
    } else if let Some(t) = what.text {
        ("text", t.into_bytes())
    } else if let Some(a) = what.h2c_connect {
        if a.len() > 127 {
            return fail(json!({"reason": "--h2c-connect authority longer than 127 bytes"}));
        }
        ("h2c-connect", h2c_connect(&a))
    } else {
        return fail(json!({"reason": "nothing to send"}));
    };
    let base = json!({"to": to.to_string(), "kind": kind, "sent": 0});
    let mut stream = match TcpStream::connect_timeout(&to, connect_timeout) {
        Ok(s) => s,
        Err(e) => return fail(with(base, "reason", json!(format!("connect: {e}")))),
    };
    if let Err(e) = stream.set_read_timeout(Some(timeout)) {
        return fail(with(base, "reason", json!(format!("socket setup: {e}"))));
    }
    // The peer may close before everything is written: that is an answer too.
    let written = match stream.write_all(&bytes) {
        Ok(()) => bytes.len(),
        Err(_) => 0,
    };
    let mut v = with(base, "sent", json!(written));
    let started = Instant::now();
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(k) => back.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break "reset",
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if started.elapsed() >= timeout {
                    break "open";
                }
            }
            Err(_) => break "error",
        }
    };
    v["closed"] = json!(closed);
    v["bytesBack"] = json!(back.len());
    v["firstBytesHex"] = json!(hex(&back[..back.len().min(16)]));
    // 0x15: a TLS alert record; an HTTP/2 server would start with a frame
    // header whose type byte (offset 3) is SETTINGS (0x04).
    v["tlsAlert"] = json!(back.first() == Some(&0x15));
    v["h2Frames"] = json!(back.len() >= 9 && back[3] == 0x04 && back[0] != 0x15);
    v["millis"] = json!(started.elapsed().as_millis() as u64);
    if closed == "open" {
        return fail(with(v, "reason", json!("the peer kept the connection open")));
    }
    v["ok"] = json!(true);
    emit(v);
    ExitCode::SUCCESS
}

/// Accepts any server certificate: the probe is about the *client* having none.
#[derive(Debug)]
struct AcceptAnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_probe(to: SocketAddr, connect_timeout: Duration, timeout: Duration) -> ExitCode {
    use std::sync::Arc;
    let base = json!({"to": to.to_string(), "kind": "tls-no-client-cert"});
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
    {
        Ok(b) => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
            .with_no_client_auth(),
        Err(e) => return fail(with(base, "reason", json!(format!("TLS config: {e}")))),
    };
    let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
    let mut conn = match rustls::ClientConnection::new(Arc::new(config), name) {
        Ok(c) => c,
        Err(e) => return fail(with(base, "reason", json!(format!("TLS client: {e}")))),
    };
    let mut sock = match TcpStream::connect_timeout(&to, connect_timeout) {
        Ok(s) => s,
        Err(e) => return fail(with(base, "reason", json!(format!("connect: {e}")))),
    };
    if let Err(e) = sock.set_read_timeout(Some(timeout)) {
        return fail(with(base, "reason", json!(format!("socket setup: {e}"))));
    }
    let started = Instant::now();
    let handshake = conn.complete_io(&mut sock).map(|_| ());
    let server_cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
    let mut v = with(base, "serverCertificate", json!(server_cert));
    // In TLS 1.3 the client is done before the server has judged its
    // (empty) certificate: the verdict comes with the first read.
    let outcome = handshake.and_then(|()| {
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        tls.write_all(b"hello from a client without a certificate\n")?;
        let mut buf = [0u8; 1024];
        loop {
            match tls.read(&mut buf) {
                Ok(0) => return Ok("eof"),
                Ok(_) => return Ok("data"),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    });
    v["millis"] = json!(started.elapsed().as_millis() as u64);
    match outcome {
        Ok("data") => fail(with(v, "reason", json!("the server answered a client without a certificate"))),
        Ok(closed) => {
            v["closed"] = json!(closed);
            v["ok"] = json!(true);
            emit(v);
            ExitCode::SUCCESS
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            fail(with(v, "reason", json!("the server kept the connection open")))
        }
        Err(e) => {
            v["closed"] = json!(format!("{e}"));
            v["ok"] = json!(true);
            emit(v);
            ExitCode::SUCCESS
        }
    }
}

/// The connection's local and peer addresses, as text ("" if unknown).
fn endpoints(s: &TcpStream) -> (String, String) {
    let text = |a: io::Result<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    (text(s.local_addr()), text(s.peer_addr()))
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v[key] = val;
    v
}

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

/// SIGTERM sets [`TERMINATED`] instead of killing: the holding commands
/// report what they held before they exit.
fn on_sigterm_set_flag() -> nix::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_sigterm), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only stores to an atomic.
    unsafe { sigaction(Signal::SIGTERM, &action) }.map(drop)
}

fn hold(
    to: SocketAddr,
    interval: Duration,
    control: &Path,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> ExitCode {
    if let Err(e) = on_sigterm_set_flag() {
        return fail(json!({"reason": format!("sigaction: {e}")}));
    }
    let mut stream = match TcpStream::connect_timeout(&to, connect_timeout) {
        Ok(s) => s,
        Err(e) => {
            return fail(json!({"to": to.to_string(), "roundtrips": 0,
                                     "reason": format!("connect: {e}")}));
        }
    };
    if let Err(e) = stream
        .set_read_timeout(Some(io_timeout))
        .and_then(|_| stream.set_write_timeout(Some(io_timeout)))
    {
        return fail(json!({"roundtrips": 0, "reason": format!("socket setup: {e}")}));
    }
    let (local, peer) = endpoints(&stream);
    emit(json!({"connected": peer, "local": local}));
    let mut n = 0u64;
    loop {
        if TERMINATED.load(Ordering::SeqCst) || control.exists() {
            emit(json!({"ok": true, "roundtrips": n, "local": local, "peer": peer}));
            return ExitCode::SUCCESS;
        }
        let mut msg = [0u8; 16];
        msg[..8].copy_from_slice(&n.to_be_bytes());
        msg[8..].copy_from_slice(&(!n).to_be_bytes());
        if let Err(e) = stream.write_all(&msg) {
            return fail(json!({"roundtrips": n, "reason": format!("write: {e}")}));
        }
        let mut back = [0u8; 16];
        if let Err(e) = read_exact_patient(&mut stream, &mut back, io_timeout) {
            return fail(json!({"roundtrips": n, "reason": format!("read: {e}")}));
        }
        if back != msg {
            return fail(json!({"roundtrips": n, "reason": "echo differs from what was sent"}));
        }
        n += 1;
        if n.is_multiple_of(10) {
            emit(json!({"roundtrips": n}));
        }
        let until = Instant::now() + interval;
        while Instant::now() < until && !TERMINATED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10).min(interval));
        }
    }
}
