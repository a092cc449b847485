//! The `Accepted` condition on the mesh's objects: `True`, or `False` with
//! the reason the object is ignored. Every agent judges every object the same
//! way; each writes a condition only when its verdict for that object
//! version changes, and an identical patch is a no-op for the API server.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use super::{convert::Refused, istio};

pub const CONDITION: &str = "Accepted";

/// The verdict on one object version.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub kind: &'static str,
    pub meta: ObjectMeta,
    pub refused: Option<Refused>,
    /// Refused, with no earlier valid version, and enforced in a
    /// fail-closed form instead of being left out.
    pub fails_closed: bool,
}

impl Verdict {
    pub fn describe(&self) -> String {
        format!(
            "{} {}/{}",
            self.kind,
            self.meta.namespace.as_deref().unwrap_or_default(),
            self.meta.name.as_deref().unwrap_or_default()
        )
    }

    /// `(status, reason, message)` of the condition.
    pub fn condition(&self) -> (&'static str, &'static str, String) {
        match &self.refused {
            None => ("True", "Accepted", "applied by the mesh agents".to_owned()),
            Some(r) if self.fails_closed => ("False", r.reason, format!("{}; until it is fixed it fails closed as this message says", r.message)),
            Some(r) => ("False", r.reason, format!("{}; the object is ignored (an earlier valid version, if any, stays in force)", r.message)),
        }
    }
}

type Key = (&'static str, String, String, String, i64);

pub struct Writer {
    client: Client,
    enabled: bool,
    written: Arc<Mutex<BTreeMap<Key, (&'static str, String)>>>,
}

impl Writer {
    pub fn new(client: Client, enabled: bool) -> Self {
        Self { client, enabled, written: Arc::default() }
    }

    /// Logs new refusals and writes the conditions that changed.
    pub fn report(&self, verdicts: Vec<Verdict>) {
        let mut written = self.written.lock().expect("poisoned");
        let mut live = BTreeMap::new();
        for v in verdicts {
            let key: Key = (
                v.kind,
                v.meta.namespace.clone().unwrap_or_default(),
                v.meta.name.clone().unwrap_or_default(),
                v.meta.uid.clone().unwrap_or_default(),
                v.meta.generation.unwrap_or_default(),
            );
            let (status, reason, message) = v.condition();
            let entry = (reason, message.clone());
            if written.get(&key) == Some(&entry) {
                live.insert(key, entry);
                continue;
            }
            if v.refused.is_some() {
                tracing::warn!(object = %v.describe(), reason, "mesh object refused: {message}");
            }
            live.insert(key.clone(), entry);
            if self.enabled {
                tokio::spawn(patch(self.client.clone(), v, status, reason, message));
            }
        }
        *written = live;
    }
}

async fn patch(client: Client, v: Verdict, status: &'static str, reason: &'static str, message: String) {
    let (Some(ns), Some(name)) = (v.meta.namespace.clone(), v.meta.name.clone()) else {
        return;
    };
    let body = serde_json::json!({
        "status": {
            "conditions": [{
                "type": CONDITION,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": v.meta.generation,
                "lastTransitionTime": Time(jiff_now()),
            }]
        }
    });
    let pp = PatchParams::default();
    let patch = Patch::Merge(&body);
    let istio = crate::objects::istio::SECURITY_GROUP;
    let networking = crate::objects::istio_traffic::NETWORKING_GROUP;
    let (group, resource, result) = match v.kind {
        "AuthorizationPolicy" => (istio, "authorizationpolicies", Api::<istio::AuthorizationPolicy>::namespaced(client, &ns).patch_status(&name, &pp, &patch).await.map(|_| ())),
        "VirtualService" => (networking, "virtualservices", Api::<istio::VirtualService>::namespaced(client, &ns).patch_status(&name, &pp, &patch).await.map(|_| ())),
        "DestinationRule" => (networking, "destinationrules", Api::<istio::DestinationRule>::namespaced(client, &ns).patch_status(&name, &pp, &patch).await.map(|_| ())),
        _ => (istio, "peerauthentications", Api::<istio::PeerAuthentication>::namespaced(client, &ns).patch_status(&name, &pp, &patch).await.map(|_| ())),
    };
    match result {
        Ok(()) => {}
        Err(kube::Error::Api(s)) if s.code == 403 => tracing::warn!(
            object = %v.describe(),
            "cannot report the object's status: the agent's service account may not patch {resource}/status (API group {group:?}); grant `patch` on {resource}/status in its ClusterRole",
        ),
        Err(e) => tracing::warn!(object = %v.describe(), "cannot report the object's status: {}", crate::error_chain(&e)),
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
