use std::sync::atomic::AtomicBool;

use tokio::net::TcpListener;
use tonic::Status;

use super::*;
use crate::identity::{
    Authority, GrpcCaClient, LocalCaClient,
    client::BoxFuture,
    proto,
    testing::{id, mesh_snapshot, pod},
};
use crate::ca::{self as server, NodeTokens};

/// Generous: these tests wait for real (short) certificate lifetimes.
const DEADLINE: Duration = Duration::from_secs(60);

/// A CA that can be switched off.
struct Switch {
    inner: Arc<dyn CaClient>,
    down: AtomicBool,
}

impl CaClient for Switch {
    fn sign(&self, req: proto::SignRequest) -> BoxFuture<'_, Result<proto::SignResponse, Status>> {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(Status::unavailable("the CA is down (test)"))));
        }
        self.inner.sign(req)
    }

    fn endpoint(&self) -> &str {
        "switchable test CA"
    }
}

fn local_ca() -> (Arc<Authority>, Arc<dyn CaClient>, tokio::sync::watch::Sender<crate::state::Snapshot>) {
    let authority = Arc::new(Authority::in_memory().unwrap());
    let (tx, rx) = mesh_snapshot();
    let client: Arc<dyn CaClient> = Arc::new(LocalCaClient::new(authority.clone(), "node-a", rx));
    (authority, client, tx)
}

fn fast(ttl_secs: u64) -> ManagerConfig {
    ManagerConfig {
        ttl: Some(Duration::from_secs(ttl_secs)),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(300),
    }
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_cert(rx: &mut CertWatch, what: &str, pred: impl Fn(&WorkloadCert) -> bool) -> Arc<WorkloadCert> {
    let fut = rx.wait_for(|c| c.as_deref().is_some_and(&pred));
    let cert = tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the manager keeps the channel open");
    cert.clone().expect("matched Some")
}

#[tokio::test]
async fn rotates_at_half_life() {
    let (_authority, ca, _state) = local_ca();
    let manager = CertManager::new(ca, fast(2));
    let web = pod("shop", "web");
    let mut rx = manager.ensure(&web, &id("shop", "web"));
    let mut serials = Vec::new();
    let mut last_not_after = SystemTime::UNIX_EPOCH;
    while serials.len() < 4 {
        let cert = next_cert(&mut rx, "a rotation", |c| !serials.contains(&c.serial)).await;
        assert_eq!(cert.id, id("shop", "web"));
        assert!(cert.not_after >= last_not_after);
        last_not_after = cert.not_after;
        serials.push(cert.serial.clone());
    }
    let stats = manager.stats(&web).unwrap();
    assert!(stats.fetched.load(Ordering::Relaxed) >= 4);
    assert_eq!(stats.errors.load(Ordering::Relaxed), 0);
    let status = manager.status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
    assert!(status[0].not_after.is_some());
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json[0]["pod"]["name"], "web");
    assert!(json[0]["notAfter"].is_string());
    // `ensure` again is a no-op: same channel, no restart.
    let again = manager.ensure(&web, &id("shop", "web"));
    assert!(again.borrow().is_some());
}

#[tokio::test]
async fn ca_down_keeps_the_cached_certificate_and_recovers() {
    let authority = Arc::new(Authority::in_memory().unwrap());
    let tokens = Arc::new(NodeTokens::from_pairs([("node-a", "node-a-token-0123456789")]).unwrap());
    let (_state_tx, state) = mesh_snapshot();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ca = server::start(authority.clone(), tokens.clone(), state.clone(), listener, &[]).unwrap();
    let addr = ca.addr;
    let client = GrpcCaClient::new(
        &format!("https://{addr}"),
        &authority.trust_bundle_pem(),
        "node-a-token-0123456789",
        None,
    )
    .unwrap();
    let manager = CertManager::new(Arc::new(client), fast(8));
    let web = pod("shop", "web");
    let mut rx = manager.ensure(&web, &id("shop", "web"));
    let first = next_cert(&mut rx, "the first certificate", |_| true).await;

    tokio::time::timeout(DEADLINE, ca.stop()).await.expect("the CA stops").unwrap();
    let stats = manager.stats(&web).unwrap();
    wait_for("failed renewals", || (stats.errors.load(Ordering::Relaxed) >= 2).then_some(())).await;
    {
        let current = rx.borrow().clone();
        if SystemTime::now() < first.not_after {
            let current = current.expect("the cached certificate keeps serving");
            assert_eq!(current.serial, first.serial);
        }
    }
    let status = manager.status();
    let last_error = status[0].last_error.clone().expect("the failure is reported");
    assert!(last_error.contains("unreachable"), "{last_error}");

    // The CA comes back on the same address.
    let listener = wait_for("the CA's port to be free", || std::net::TcpListener::bind(addr).ok()).await;
    listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    let ca = server::start(authority.clone(), tokens, state, listener, &[]).unwrap();
    let renewed = next_cert(&mut rx, "a renewed certificate", |c| c.serial != first.serial).await;
    assert!(renewed.not_after > first.not_after);
    assert!(manager.status()[0].last_error.is_none());
    ca.stop().await.unwrap();
}

#[tokio::test]
async fn expired_certificate_is_withdrawn_and_replaced_when_the_ca_returns() {
    let (_authority, inner, _state) = local_ca();
    let switch = Arc::new(Switch {
        inner,
        down: AtomicBool::new(false),
    });
    let manager = CertManager::new(switch.clone(), fast(2));
    let web = pod("shop", "web");
    let mut rx = manager.ensure(&web, &id("shop", "web"));
    let first = next_cert(&mut rx, "the first certificate", |_| true).await;
    switch.down.store(true, Ordering::SeqCst);
    // Once expired, it is no longer offered.
    tokio::time::timeout(DEADLINE, rx.wait_for(|c| c.is_none())).await.unwrap().unwrap();
    assert!(SystemTime::now() >= first.not_after, "withdrawn only after expiry");
    assert_eq!(manager.stats(&web).unwrap().not_after.load(Ordering::Relaxed), 0);
    switch.down.store(false, Ordering::SeqCst);
    let back = next_cert(&mut rx, "a certificate after the outage", |_| true).await;
    assert_ne!(back.serial, first.serial);
}

#[tokio::test]
async fn forget_stops_managing_the_workload() {
    let (_authority, ca, _state) = local_ca();
    let manager = CertManager::new(ca, fast(60));
    let web = pod("shop", "web");
    let mut rx = manager.ensure(&web, &id("shop", "web"));
    next_cert(&mut rx, "the first certificate", |_| true).await;
    assert!(manager.forget(&web));
    assert!(!manager.forget(&web));
    assert!(manager.watch(&web).is_none());
    assert!(rx.borrow_and_update().is_none());
    // The rotation task is gone with its sender: the channel closes.
    tokio::time::timeout(DEADLINE, async {
        while rx.changed().await.is_ok() {}
    })
    .await
    .expect("the channel closes");
    assert!(manager.status().is_empty());
}

#[tokio::test]
async fn identity_mismatch_is_retried_and_replaced() {
    let (_authority, ca, _state) = local_ca();
    let manager = CertManager::new(ca, fast(60));
    let web = pod("shop", "web");
    // The agent's view is wrong: the CA refuses, and says why.
    let mut rx = manager.ensure(&web, &id("shop", "admin"));
    let stats = manager.stats(&web).unwrap();
    wait_for("a refusal", || (stats.errors.load(Ordering::Relaxed) >= 1).then_some(())).await;
    let err = stats.last_error.lock().unwrap().clone().unwrap();
    assert!(err.contains("the pod's identity is spiffe://cluster.local/ns/shop/sa/web"), "{err}");
    assert!(rx.borrow().is_none());
    // The view is corrected: same channel, right certificate.
    let _ = manager.ensure(&web, &id("shop", "web"));
    let cert = next_cert(&mut rx, "the corrected certificate", |_| true).await;
    assert_eq!(cert.id, id("shop", "web"));
}
