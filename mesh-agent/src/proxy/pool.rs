//! Pooled tunnel connections: one mTLS + HTTP/2 connection carries many
//! CONNECT streams. Keyed by (source pod, destination identity, tunnel
//! address): the TLS session authenticates exactly one source workload and
//! verified exactly one destination workload, and the socket lives in the
//! source pod's network namespace.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;

use crate::{identity::SpiffeId, state::PodKey};

/// Streams one pooled connection may carry at once before another opens.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// A pooled connection with no stream for this long is closed: a burst
/// must not leave connections (and the peer's resources) behind forever.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

// The agent's second collection after a storm comes once the pools have
// closed what it left idle (looked at every second).
const _: () = assert!(IDLE_TIMEOUT.as_secs() < crate::memory::FOLLOW_UP_AFTER.as_secs());

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: PodKey,
    pub dst: SpiffeId,
    pub tunnel: SocketAddr,
}

#[derive(Clone)]
pub struct Pooled {
    pub sender: SendRequest<Empty<Bytes>>,
    usage: Arc<Usage>,
}

/// Streams in flight on one connection, and since when it has had none.
struct Usage {
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
}

/// Held for the life of one stream; frees its slot when dropped.
pub struct StreamSlot(Arc<Usage>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self.0.idle_since.lock().expect("poisoned") = Instant::now();
        }
    }
}

#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// One connect at a time per key, so a burst of first streams shares
    /// new connections instead of each opening its own.
    connecting: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Connections opened over the agent's life.
    pub opened: AtomicUsize,
}

impl Pool {
    /// A live pooled connection with a free stream slot, if any.
    pub fn checkout(&self, key: &PoolKey) -> Option<(SendRequest<Empty<Bytes>>, StreamSlot)> {
        let mut conns = self.conns.lock().expect("poisoned");
        let list = conns.get_mut(key)?;
        list.retain(|p| !p.sender.is_closed());
        let p = list
            .iter()
            .find(|p| p.usage.streams.load(Ordering::Relaxed) < MAX_STREAMS_PER_CONNECTION && p.sender.is_ready())?;
        p.usage.streams.fetch_add(1, Ordering::Relaxed);
        Some((p.sender.clone(), StreamSlot(p.usage.clone())))
    }

    /// The lock that serialises connecting for `key`.
    pub fn connect_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        self.connecting.lock().expect("poisoned").entry(key.clone()).or_default().clone()
    }

    /// Drops connections idle for longer than `idle`; hyper closes a client
    /// connection once its last handle is gone.
    pub fn reap(&self, idle: Duration) {
        let mut conns = self.conns.lock().expect("poisoned");
        conns.retain(|_, list| {
            list.retain(|p| {
                crate::memory::kept(
                    !p.sender.is_closed()
                        && (p.usage.streams.load(Ordering::Relaxed) > 0
                            || p.usage.idle_since.lock().expect("poisoned").elapsed() < idle),
                )
            });
            !list.is_empty()
        });
        let live: std::collections::HashSet<&PoolKey> = conns.keys().collect();
        self.connecting
            .lock()
            .expect("poisoned")
            .retain(|k, lock| live.contains(k) || Arc::strong_count(lock) > 1);
    }

    /// Adds a new connection and takes its first stream slot.
    pub fn add(&self, key: PoolKey, sender: SendRequest<Empty<Bytes>>) -> (SendRequest<Empty<Bytes>>, StreamSlot) {
        let usage = Arc::new(Usage { streams: AtomicUsize::new(1), idle_since: Mutex::new(Instant::now()) });
        self.opened.fetch_add(1, Ordering::Relaxed);
        let mut conns = self.conns.lock().expect("poisoned");
        let list = conns.entry(key).or_default();
        list.retain(|p| !p.sender.is_closed());
        list.push(Pooled { sender: sender.clone(), usage: usage.clone() });
        (sender, StreamSlot(usage))
    }

    /// Keys with pooled connections, and keys with a connect lock.
    pub fn entries(&self) -> (usize, usize) {
        (self.conns.lock().expect("poisoned").len(), self.connecting.lock().expect("poisoned").len())
    }

    /// Open pooled connections.
    pub fn open_connections(&self) -> usize {
        let mut conns = self.conns.lock().expect("poisoned");
        conns.retain(|_, list| {
            list.retain(|p| !p.sender.is_closed());
            !list.is_empty()
        });
        conns.values().map(Vec::len).sum()
    }
}
