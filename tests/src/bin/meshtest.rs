//! `meshtest`: the TCP tool the end-to-end tests run inside pods.
//!
//! Every result is one JSON line on stdout, so tests parse rather than grep;
//! failures also exit non-zero.

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
        /// Seconds.
        #[arg(long, default_value_t = 5.0)]
        connect_timeout: f64,
        /// Seconds without progress on a read or write before giving up.
        #[arg(long, default_value_t = 30.0)]
        io_timeout: f64,
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
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Echo { listen } => echo(listen),
        Cmd::Send {
            to,
            bytes,
            seed,
            connect_timeout,
            io_timeout,
        } => send(to, bytes, seed, secs(connect_timeout), secs(io_timeout)),
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

fn send(to: SocketAddr, n: u64, seed: u64, connect_timeout: Duration, io_timeout: Duration) -> ExitCode {
    match send_one(to, n, seed, connect_timeout, io_timeout) {
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
        .map(|i| std::thread::spawn(move || send_one(to, n, u64::from(i) + 1, connect_timeout, io_timeout)))
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
    seed: u64,
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
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
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
    let write_side = std::thread::spawn(move || -> Result<(u64, Vec<u8>), (u64, io::Error)> {
        let mut rng = SplitMix(seed);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < n {
            let len = (n - sent).min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..len]);
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

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v[key] = val;
    v
}

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

fn hold(
    to: SocketAddr,
    interval: Duration,
    control: &Path,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> ExitCode {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_sigterm),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic.
    if let Err(e) = unsafe { sigaction(Signal::SIGTERM, &action) } {
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
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
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
