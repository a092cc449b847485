//! Connection-level (L4) authorization on the inbound side: the destination
//! pod's agent decides, from the verified peer identity (or none, for
//! plaintext) and the destination port, before it connects to the app.
//!
//! A connection to a port that is not HTTP is checked at L4: a DENY rule
//! that names HTTP attributes (methods, paths, headers) denies whole
//! connections to the workloads it selects, and an ALLOW rule that needs
//! them never matches. Enforcement can only be stricter than intended,
//! never looser. When that strictness would refuse a connection to a port
//! nobody declared and the workload's policies do name HTTP attributes,
//! the agent first looks at what the client sends ([`super::sniff`]): an
//! HTTP client is then authorized request by request, anything else is
//! refused as before.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use super::{Inbound, PodHandle};
use crate::{
    policy::{Authorizer, Connection, Peer, WorkloadPolicy},
    state::{PodKey, Snapshot},
};

/// Compiled policies for the current snapshot, and per local workload.
#[derive(Default)]
pub struct Cache {
    inner: Mutex<Option<Compiled>>,
}

struct Compiled {
    snapshot: Snapshot,
    authorizer: Authorizer,
    workloads: HashMap<PodKey, Arc<WorkloadPolicy>>,
}

impl Cache {
    /// The policy of `pod` under `snapshot`, compiled once per snapshot.
    pub(super) fn workload(&self, snapshot: &Snapshot, pod: &PodKey) -> Arc<WorkloadPolicy> {
        let mut inner = self.inner.lock().expect("poisoned");
        if inner.as_ref().is_none_or(|c| !Arc::ptr_eq(&c.snapshot, snapshot)) {
            let authorizer = Authorizer::from_state(snapshot);
            for (name, e) in authorizer.invalid() {
                tracing::error!(policy = %name, error = %e, "authorization policy does not compile: it denies everything it selects");
            }
            *inner = Some(Compiled { snapshot: snapshot.clone(), authorizer, workloads: HashMap::new() });
        }
        let c = inner.as_mut().expect("set above");
        if let Some(w) = c.workloads.get(pod) {
            return w.clone();
        }
        let labels = snapshot.pods.get(pod).map(|p| p.labels.clone()).unwrap_or_default();
        let w = Arc::new(c.authorizer.for_workload(&pod.namespace, &labels));
        c.workloads.insert(pod.clone(), w.clone());
        w
    }
}

/// What policy knows of a connection.
pub(super) fn connection(peer: Option<&Peer>, client: SocketAddr, target: SocketAddr) -> Connection<'_> {
    Connection { peer, port: target.port(), source: client.ip(), destination: target.ip() }
}

/// A connection refused by authorization policy: the decision, as
/// [`crate::policy::Decision`] words it (for the refusal's header and logs).
#[derive(Debug, thiserror::Error)]
#[error("{decision}")]
pub(super) struct Denied {
    decision: String,
}

/// The connection-time verdict for a port that is not declared HTTP.
pub(super) enum L4Verdict {
    Allow,
    /// Refused (already counted and logged), with the reason.
    Deny(Denied),
    /// Refused as a whole connection, but HTTP requests on it might be
    /// allowed one by one: detect the protocol first.
    DependsOnHttp,
}

impl Inbound {
    /// `client` is the peer's address (the source pod's over the tunnel),
    /// `target` the pod's address and port it asked for.
    pub(super) fn check_l4(&self, pod: &PodHandle, peer: Option<&Peer>, client: SocketAddr, target: SocketAddr) -> L4Verdict {
        let snapshot = self.inputs.state.borrow().clone();
        let wp = self.authz.workload(&snapshot, &pod.key);
        if wp.check_connection(&connection(peer, client, target)).allowed {
            L4Verdict::Allow
        } else if wp.uses_http_attributes() {
            L4Verdict::DependsOnHttp
        } else {
            match self.authorize_connection(pod, peer, client, target) {
                Ok(()) => L4Verdict::Allow,
                Err(reason) => L4Verdict::Deny(reason),
            }
        }
    }

    /// `Err` when policy refuses a connection from `peer` (None:
    /// plaintext) to `port` of `pod`; counted and logged with the policy.
    pub(super) fn authorize_connection(&self, pod: &PodHandle, peer: Option<&Peer>, client: SocketAddr, target: SocketAddr) -> Result<(), Denied> {
        let snapshot = self.inputs.state.borrow().clone();
        let wp = self.authz.workload(&snapshot, &pod.key);
        let decision = wp.check_connection(&connection(peer, client, target));
        let port = target.port();
        if let Some(audit) = decision.audit {
            tracing::info!(pod = %pod.key, peer = ?peer.map(Peer::principal), port, %audit, allowed = decision.allowed, "connection audited by authorization policy");
        }
        if decision.allowed {
            return Ok(());
        }
        let policy = decision.policy.unwrap_or("(default deny)").to_owned();
        *pod.stats.inbound_denied.lock().expect("poisoned").entry(policy.clone()).or_default() += 1;
        let who = peer.map(|p| p.principal().to_owned()).unwrap_or_else(|| "plaintext client".into());
        tracing::info!(pod = %pod.key, peer = %who, port, %policy, "connection denied by authorization policy: {decision}");
        Err(Denied { decision: decision.to_string() })
    }
}
