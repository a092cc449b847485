//! Polls the config file and publishes each valid new version.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::watch::Sender;

use crate::state::Snapshot;

/// What the admin endpoint reports about config reloads.
#[derive(Debug)]
pub struct ReloadStats {
    pub path: PathBuf,
    pub generation: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadStatsView {
    path: PathBuf,
    generation: u64,
    accepted: u64,
    rejected: u64,
    last_error: Option<String>,
}

impl ReloadStats {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            generation: AtomicU64::new(1),
            accepted: AtomicU64::new(1),
            rejected: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn view(&self) -> ReloadStatsView {
        ReloadStatsView {
            path: self.path.clone(),
            generation: self.generation.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            last_error: self.last_error.lock().expect("poisoned").clone(),
        }
    }
}

pub async fn watch(
    path: PathBuf,
    poll: Duration,
    mut last: Vec<u8>,
    tx: Sender<Snapshot>,
    stats: Arc<ReloadStats>,
    scope: crate::state::Scope,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                // A file being replaced can be missing for an instant; keep
                // serving and look again on the next tick.
                tracing::debug!(file = %path.display(), error = %e, "config file not readable, keeping last good config");
                continue;
            }
        };
        if bytes == last {
            continue;
        }
        last = bytes;
        match super::parse_with(&path, &String::from_utf8_lossy(&last), &scope) {
            Ok(state) => {
                let generation = stats.generation.fetch_add(1, Ordering::Relaxed) + 1;
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().expect("poisoned") = None;
                tracing::info!(file = %path.display(), generation, pods = state.pods.len(), "config reloaded");
                if tx.send(Arc::new(state)).is_err() {
                    return;
                }
            }
            Err(e) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                *stats.last_error.lock().expect("poisoned") = Some(e.to_string());
                tracing::error!(error = %e, "config edit rejected; the last good config keeps serving");
            }
        }
    }
}
