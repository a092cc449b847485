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
    let n = io::copy(&mut reader, &mut writer)?;
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

fn send(
    to: SocketAddr,
    n: u64,
    seed: u64,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> ExitCode {
    let started = Instant::now();
    let stream = match TcpStream::connect_timeout(&to, connect_timeout) {
        Ok(s) => s,
        Err(e) => {
            return fail(json!({"to": to.to_string(), "sent": 0, "received": 0,
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
        Err(e) => return fail(with(base, "reason", json!(format!("socket setup: {e}")))),
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
        match reader.read(&mut buf) {
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
        return fail(with(
            v,
            "reason",
            json!(format!("read after {received} bytes: {e}")),
        ));
    }
    let (sent, sent_hash) = match write_side.join() {
        Ok(Ok(r)) => r,
        Ok(Err((sent, e))) => {
            v["sent"] = json!(sent);
            return fail(with(
                v,
                "reason",
                json!(format!("write after {sent} bytes: {e}")),
            ));
        }
        Err(_) => return fail(with(v, "reason", json!("writer thread panicked"))),
    };
    let received_hash = hasher.finalize().to_vec();
    v["sent"] = json!(sent);
    v["sha256"] = json!(hex(&sent_hash));
    v["millis"] = json!(started.elapsed().as_millis() as u64);
    if received != sent || received_hash != sent_hash {
        v["receivedSha256"] = json!(hex(&received_hash));
        return fail(with(v, "reason", json!("echo differs from what was sent")));
    }
    v["ok"] = json!(true);
    emit(v);
    ExitCode::SUCCESS
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
        if let Err(e) = stream.read_exact(&mut back) {
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
