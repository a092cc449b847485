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
            *inner = Some(Compiled { snapshot: snapshot.clone(), authorizer: compile(snapshot), workloads: HashMap::new() });
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

impl Cache {
    /// Compiles `snapshot`'s policies, for the workloads the cache served
    /// under the snapshot before, off the data path: the first connection
    /// after a config change then finds its policy ready instead of
    /// compiling it (milliseconds per workload with thousands of rules).
    /// Compiled outside the lock and installed only while `snapshot` is
    /// still the current one (`current`) and nobody compiled it first, so
    /// a connection never waits for it nor sees an older snapshot's policy.
    /// Returns whether it installed.
    pub(super) fn warm(&self, snapshot: &Snapshot, current: impl Fn() -> bool) -> bool {
        let pods: Vec<PodKey> = match &*self.inner.lock().expect("poisoned") {
            Some(c) if Arc::ptr_eq(&c.snapshot, snapshot) => return false,
            Some(c) => c.workloads.keys().cloned().collect(),
            None => Vec::new(),
        };
        let authorizer = compile(snapshot);
        let workloads = pods
            .into_iter()
            .filter_map(|k| {
                let labels = &snapshot.pods.get(&k)?.labels;
                let w = Arc::new(authorizer.for_workload(&k.namespace, labels));
                Some((k, w))
            })
            .collect();
        let mut inner = self.inner.lock().expect("poisoned");
        if !current() || inner.as_ref().is_some_and(|c| Arc::ptr_eq(&c.snapshot, snapshot)) {
            return false;
        }
        *inner = Some(Compiled { snapshot: snapshot.clone(), authorizer, workloads });
        true
    }
}

fn compile(snapshot: &Snapshot) -> Authorizer {
    let authorizer = Authorizer::from_state(snapshot);
    for (name, e) in authorizer.invalid() {
        tracing::error!(policy = %name, error = %e, "authorization policy does not compile: it denies everything it selects");
    }
    authorizer
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

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(policies: &str) -> Snapshot {
        let yaml = format!(
            "nodes: [{{name: node-a}}]\nnamespaces: [{{name: shop, labels: {{nodemesh.io/dataplane-mode: enabled}}}}]\npods:\n  - {{name: web, namespace: shop, node: node-a, ip: 198.51.100.11, labels: {{app: web}}, netns: /x, cgroup: /y}}\n{policies}"
        );
        Arc::new(crate::localfile::parse(std::path::Path::new("x"), &yaml).expect("a valid file"))
    }

    const DENY_ALL: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: shop}\nspec: {action: DENY, rules: [{}]}\n";

    /// The warm-up compiles the new snapshot for the workloads served
    /// before, installs it only while it is current and nobody compiled it
    /// first, and what it installed is what a connection then gets.
    #[test]
    fn warming_compiles_ahead_and_never_installs_a_stale_snapshot() {
        let web = PodKey { namespace: "shop".into(), name: "web".into() };
        let cache = Cache::default();
        let old = snapshot("");
        let conn = connection(None, "198.51.100.12:1234".parse().unwrap(), "198.51.100.11:80".parse().unwrap());
        assert!(cache.workload(&old, &web).check_connection(&conn).allowed, "no policy: allowed");
        let before = cache.workload(&old, &web);
        let new = snapshot(DENY_ALL);
        // Not current any more (a newer snapshot came): nothing installed.
        assert!(!cache.warm(&new, || false));
        assert!(Arc::ptr_eq(&cache.workload(&old, &web), &before));
        // Current: installed, the served workload compiled in advance.
        assert!(cache.warm(&new, || true));
        {
            let inner = cache.inner.lock().unwrap();
            let c = inner.as_ref().unwrap();
            assert!(Arc::ptr_eq(&c.snapshot, &new));
            assert!(c.workloads.contains_key(&web), "the workload served before is ready");
        }
        let warmed = cache.workload(&new, &web);
        assert!(!warmed.check_connection(&conn).allowed, "the new policy is the one enforced");
        // Already compiled for this snapshot: nothing to do.
        assert!(!cache.warm(&new, || true));
        assert!(Arc::ptr_eq(&cache.workload(&new, &web), &warmed));
    }
}
