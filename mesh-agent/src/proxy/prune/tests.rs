//! Churn leaves the tables where they started: 5,000 endpoints (each its
//! own pod, workload and service) come into the mesh state, are used
//! (balanced, reported on, counted in metrics), and leave again.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{super::observe::Parties, *};
use crate::{
    access_log::AccessLog,
    identity::{Authority, CertManager, LocalCaClient, ManagerConfig},
    metrics::Metrics,
    proxy::{OrigDstLookup, Ports, balance::Outcome, observe::Telemetry},
    state::{Destination, Namespace, Pod, PodKey, Service, ServicePort, Snapshot},
    telemetry::trace::Tracer,
};

const N: u32 = 5_000;

fn pod_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn state(n: u32) -> MeshState {
    let labels = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
    let pods = (0..n)
        .map(|i| Pod {
            key: PodKey { namespace: "churn".into(), name: format!("p{i}") },
            node: "node-b".into(),
            service_account: format!("sa{i}"),
            ips: vec![pod_ip(i)],
            labels: labels(&[("app", &format!("w{i}"))]),
            netns: PathBuf::from("/nonexistent"),
            cgroup: PathBuf::from("/nonexistent"),
        })
        .collect();
    let services = (0..n)
        .map(|i| Service {
            name: format!("s{i}"),
            namespace: "churn".into(),
            ips: vec![IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i))],
            selector: labels(&[("app", &format!("w{i}"))]),
            ports: vec![ServicePort { name: "http".into(), port: 80, target_port: 8080, app_protocol: None }],
            endpoint_ips: None,
        })
        .collect();
    let ns = Namespace { name: "churn".into(), labels: labels(&[("nodemesh.io/dataplane-mode", "enabled")]) };
    MeshState::new("cluster.local".into(), vec!["node-a".into(), "node-b".into()], vec![ns], pods, services)
}

struct NoOrigDst;
impl OrigDstLookup for NoOrigDst {
    fn take(&self, _: SocketAddr) -> Option<SocketAddr> {
        None
    }
}

pub(crate) fn proxy(initial: Snapshot) -> (Arc<Proxy>, tokio::sync::watch::Sender<Snapshot>, tempdir::Dir) {
    let (tx, rx) = tokio::sync::watch::channel(initial);
    let ca = Arc::new(Authority::in_memory().unwrap());
    let certs = CertManager::new(Arc::new(LocalCaClient::new(ca, "node-a", rx.clone())), ManagerConfig::default());
    let dir = tempdir::Dir::new();
    let access_log = Arc::new(AccessLog::start(&crate::access_log::Target::File(dir.0.join("access.log"))).unwrap());
    let telemetry = Arc::new(Telemetry { metrics: Arc::new(Metrics::default()), access_log, tracer: Tracer::disabled() });
    let p = Proxy::new(rx, Arc::new(NoOrigDst), certs, Arc::default(), Ports::default(), tokio::runtime::Handle::current(), telemetry);
    (p, tx, dir)
}

pub(crate) mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let d = std::env::temp_dir().join(format!("prune-test-{}-{:?}", std::process::id(), std::thread::current().id()));
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A local pod handle (its sockets on 127.0.0.1).
pub(crate) fn pod_handle() -> super::super::PodHandle {
    let ca = Authority::in_memory().unwrap();
    let id = crate::identity::testing::id("churn", "web");
    let (tx, cert) = crate::identity::testing::cert_watch(ca.mint(&id, Duration::from_secs(3600)).unwrap());
    std::mem::forget(tx);
    super::super::PodHandle {
        key: PodKey { namespace: "churn".into(), name: "web".into() },
        id,
        ips: vec![pod_ip(0)],
        sockets: Arc::new(crate::proxy::Loopback::new(std::net::Ipv4Addr::LOCALHOST.into())),
        stats: Arc::default(),
        cert,
    }
}

/// Uses endpoint `i` the way traffic does: balanced to (and a failure
/// reported), its service's HTTP state, and request and TCP series from
/// a local pod to it.
fn use_endpoint(p: &Proxy, snapshot: &MeshState, i: u32) {
    let key = PodKey { namespace: "churn".into(), name: format!("p{i}") };
    let dest = Destination::MeshPod { pod: key.clone(), addr: SocketAddr::new(pod_ip(i), 8080) };
    let candidates = [dest.clone()];
    let (picked, held) = p.outbound.balancer.pick(&candidates, &[], None).expect("one candidate");
    assert_eq!(picked, dest);
    drop(held);
    p.outbound.balancer.report(dest.addr(), Outcome::ConnectFailure, super::super::balance::l4_outlier_detection(), &candidates);
    let _svc = p.outbound.services.get("churn", &format!("s{i}"));
    let name = format!("s{i}");
    let parties = Parties {
        state: snapshot,
        reporter: "source",
        src_pod: None,
        src_ip: None,
        src_id: None,
        dst_pod: Some(&key),
        dst_addr: Some(dest.addr()),
        service: Some(("churn", &name)),
        mtls: true,
    };
    let m = &p.inputs.telemetry.metrics;
    m.request_series(parties.labels("http")).record(Duration::from_millis(1), 1, 1);
    let tcp = parties.labels("tcp");
    m.tcp_opened(tcp.clone());
    m.tcp_closed(&tcp, 1, 1);
}

#[tokio::test]
async fn five_thousand_endpoints_come_and_go_and_the_tables_are_back_where_they_started() {
    let base: Snapshot = Arc::new(state(0));
    let (p, tx, _dir) = proxy(base.clone());
    let baseline = p.table_sizes();

    let full: Snapshot = Arc::new(state(N));
    tx.send(full.clone()).unwrap();
    for i in 0..N {
        use_endpoint(&p, &full, i);
    }
    // Connections to addresses outside the mesh state leave records too.
    for port in 1..=100 {
        let d = [Destination::Passthrough(SocketAddr::from(([203, 0, 113, 7], port)))];
        drop(p.outbound.balancer.pick(&d, &[], None));
    }
    let grown = p.table_sizes();
    assert_eq!(grown.endpoints, baseline.endpoints + N as usize + 100);
    assert_eq!(grown.services, baseline.services + N as usize);
    assert_eq!(grown.metric_series, baseline.metric_series + 2 * N as usize);

    // While they are in the state, only the bare addresses are forgotten.
    let now = Instant::now();
    p.prune_at(Duration::ZERO, now);
    p.prune_at(Duration::ZERO, now);
    let live = p.table_sizes();
    assert_eq!(live.endpoints, baseline.endpoints + N as usize);
    assert_eq!(live.services, grown.services);
    assert_eq!(live.metric_series, grown.metric_series);

    // They leave the mesh: a snapshot without them.
    tx.send(base.clone()).unwrap();
    // Series stay while they may not have been scraped yet ...
    p.prune_at(SERIES_IDLE, now);
    let gone = p.table_sizes();
    assert_eq!(gone.endpoints, baseline.endpoints);
    assert_eq!(gone.services, baseline.services);
    assert_eq!(gone.metric_series, grown.metric_series);
    // ... and go once unchanged for the idle time.
    p.prune_at(SERIES_IDLE, now + SERIES_IDLE);
    assert_eq!(p.table_sizes(), baseline);
    let text = p.inputs.telemetry.metrics.encode();
    assert!(!text.contains("churn"), "no series of a workload gone from the mesh is exported");
}

#[tokio::test]
async fn in_use_entries_outlive_their_endpoint_until_released_and_live_series_stay() {
    let full: Snapshot = Arc::new(state(2));
    let (p, tx, _dir) = proxy(full.clone());
    use_endpoint(&p, &full, 0);
    use_endpoint(&p, &full, 1);
    let d = [Destination::MeshPod { pod: PodKey { namespace: "churn".into(), name: "p1".into() }, addr: SocketAddr::new(pod_ip(1), 8080) }];
    let held = p.outbound.balancer.pick(&d, &[], None).unwrap();
    let svc = p.outbound.services.get("churn", "s1");
    // p1 and s1 leave; p0 and s0 stay.
    let mut s = state(1);
    s.trust_domain = full.trust_domain.clone();
    tx.send(Arc::new(s)).unwrap();
    let now = Instant::now();
    p.prune_at(Duration::ZERO, now);
    p.prune_at(Duration::ZERO, now);
    let t = p.table_sizes();
    assert_eq!((t.endpoints, t.services), (2, 2), "a connection and a request still hold them");
    assert_eq!(t.metric_series, 2, "p0's series stay, p1's (unchanged, gone) are dropped");
    // A cached series handle is looked up again after a drop.
    let generation = p.inputs.telemetry.metrics.generation();
    assert_ne!(generation, 0);
    drop(held);
    drop(svc);
    p.prune_at(Duration::ZERO, now);
    let t = p.table_sizes();
    assert_eq!((t.endpoints, t.services, t.metric_series), (1, 1, 2));
}

/// A rollout that changes a pod's `version` label (the workload stays):
/// the old version's series go once idle, the new one's stay.
#[tokio::test]
async fn series_of_a_version_no_pod_carries_any_more_are_pruned() {
    let mut v1 = state(1);
    let p0 = PodKey { namespace: "churn".into(), name: "p0".into() };
    v1.pods.get_mut(&p0).unwrap().labels.insert("version".into(), "v1".into());
    let v1: Snapshot = Arc::new(v1);
    let (p, tx, _dir) = proxy(v1.clone());
    use_endpoint(&p, &v1, 0);
    assert_eq!(p.table_sizes().metric_series, 2);
    let now = Instant::now();
    p.prune_at(Duration::ZERO, now);
    p.prune_at(Duration::ZERO, now);
    assert_eq!(p.table_sizes().metric_series, 2, "v1 is live");

    let mut v2 = (*v1).clone();
    v2.pods.get_mut(&p0).unwrap().labels.insert("version".into(), "v2".into());
    let v2: Snapshot = Arc::new(v2);
    tx.send(v2.clone()).unwrap();
    use_endpoint(&p, &v2, 0);
    assert_eq!(p.table_sizes().metric_series, 4);
    p.prune_at(Duration::ZERO, now);
    p.prune_at(Duration::ZERO, now);
    assert_eq!(p.table_sizes().metric_series, 2, "v1's series are dropped, v2's stay");
    let text = p.inputs.telemetry.metrics.encode();
    assert!(text.contains("destination_version=\"v2\"") && !text.contains("destination_version=\"v1\""), "{text}");
}
