//! The admin listener keeps answering when the process has no descriptor
//! left: checked in a child process (this test binary again) whose
//! descriptors are all used up, so the limit never touches other tests.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    process::{Command, Stdio},
    sync::Arc,
};

use super::*;

const CHILD: &str = "MESH_TEST_FD_EXHAUSTED_CHILD";
const NAME: &str = "admin::tests::admin_answers_when_the_process_is_out_of_descriptors";

struct Source;
impl AdminSource for Source {
    fn ready(&self) -> bool {
        true
    }
    fn status(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    fn metrics(&self) -> String {
        String::new()
    }
    fn config_dump(&self) -> serde_json::Value {
        serde_json::json!({})
    }
}

/// The child: an admin listener, then every descriptor used up.
fn child() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, Arc::new(Source), Scope::Admin));
        tokio::task::yield_now().await;
        let lim = libc::rlimit { rlim_cur: 128, rlim_max: 128 };
        // SAFETY: setrlimit reads the struct we pass.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
        let mut held = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => held.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EMFILE));
                    break;
                }
            }
        }
        println!("exhausted {addr}");
        std::io::stdout().flush().unwrap();
        // Until the parent is done (it kills us), or a minute.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), task).await;
        drop(held);
    });
}

fn get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // A hung admin fails the test instead of hanging it.
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn admin_answers_when_the_process_is_out_of_descriptors() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let mut c = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the child reports its admin address").unwrap();
        // The harness may print the test's name on the same line first.
        if let Some((_, a)) = line.split_once("exhausted ") {
            break a.trim().to_owned();
        }
    };
    // Several times: the spare is given up once, then each closed
    // connection frees the slot the next one takes.
    for _ in 0..3 {
        let reply = get(&addr, "/healthz");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("ok\n"), "{reply}");
    }
    c.kill().unwrap();
    c.wait().unwrap();
}
