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
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;

use crate::{identity::SpiffeId, state::PodKey};

/// Streams one pooled connection may carry at once before another opens.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: PodKey,
    pub dst: SpiffeId,
    pub tunnel: SocketAddr,
}

#[derive(Clone)]
pub struct Pooled {
    pub sender: SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicUsize>,
}

/// Held for the life of one stream; frees its slot when dropped.
pub struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
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
            .find(|p| p.streams.load(Ordering::Relaxed) < MAX_STREAMS_PER_CONNECTION && p.sender.is_ready())?;
        p.streams.fetch_add(1, Ordering::Relaxed);
        Some((p.sender.clone(), StreamSlot(p.streams.clone())))
    }

    /// Adds a new connection and takes its first stream slot.
    pub fn add(&self, key: PoolKey, sender: SendRequest<Empty<Bytes>>) -> (SendRequest<Empty<Bytes>>, StreamSlot) {
        let streams = Arc::new(AtomicUsize::new(1));
        self.opened.fetch_add(1, Ordering::Relaxed);
        let mut conns = self.conns.lock().expect("poisoned");
        let list = conns.entry(key).or_default();
        list.retain(|p| !p.sender.is_closed());
        list.push(Pooled { sender: sender.clone(), streams: streams.clone() });
        (sender, StreamSlot(streams))
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
