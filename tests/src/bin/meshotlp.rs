//! A real OTLP/gRPC trace receiver for the end-to-end tests (the protos'
//! `TraceService`, see `mesh_e2e::otlp`).
//!
//! `meshotlp [--listen IP:PORT] [--delay-ms N]` prints
//! `{"event":"listening","addr":"IP:PORT"}` once it accepts connections
//! (port 0 picks a free one), then one JSON line per received span:
//! `traceId`, `spanId`, `parentSpanId` (hex; empty for a root), `name`,
//! `kind` (`SERVER`, `CLIENT`, ...), `attributes`, `serviceName`, `error`,
//! `startUnixNano`, `endUnixNano`. `--delay-ms` answers every export that
//! much later (a slow collector); spans are printed when answered.

use std::{io::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
#[command(about = "OTLP/gRPC trace receiver printing spans as JSON lines")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Delay before answering each export, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = tokio::spawn(mesh_e2e::otlp::serve_otlp(
        listener,
        Duration::from_millis(args.delay_ms),
        tx,
    ));
    print_line(&json!({"event": "listening", "addr": addr.to_string()}).to_string())?;
    while let Some(span) = rx.recv().await {
        print_line(&serde_json::to_string(&span)?)?;
    }
    // The sender lives in the server: it ended.
    server.await.context("the OTLP server task panicked")?
}

fn print_line(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}
