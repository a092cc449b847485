use std::time::SystemTime;

use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::*;
use crate::identity::{
    FetchError, GrpcCaClient,
    client::{CaClient, fetch},
    testing::{id, mesh_snapshot, mesh_state, pod},
    to_pem,
};

const TOKEN_A: &str = "node-a-token-0123456789";
const TOKEN_B: &str = "node-b-token-0123456789";

struct Fixture {
    ca: RunningCa,
    authority: Arc<Authority>,
    state: watch::Sender<Snapshot>,
}

impl Fixture {
    async fn start() -> Self {
        let authority = Arc::new(Authority::in_memory().unwrap());
        let tokens = Arc::new(NodeTokens::from_pairs([("node-a", TOKEN_A), ("node-b", TOKEN_B)]).unwrap());
        let (state, rx) = mesh_snapshot();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ca = start(authority.clone(), tokens, rx, listener, &["mesh-ca.test".to_owned()]).unwrap();
        Self { ca, authority, state }
    }

    fn client(&self, token: &str) -> GrpcCaClient {
        GrpcCaClient::new(
            &format!("https://{}", self.ca.addr),
            &self.authority.trust_bundle_pem(),
            token,
            None,
        )
        .unwrap()
    }
}

#[tokio::test]
async fn issues_over_tls_to_the_pods_node() {
    let fx = Fixture::start().await;
    let client = fx.client(TOKEN_A);
    let web_id = id("shop", "web");
    let cert = fetch(&client, &pod("shop", "web"), &web_id, None).await.unwrap();
    assert_eq!(cert.id, web_id);
    assert_eq!(cert.trust_bundle, fx.authority.trust_bundle());
    let (_, leaf) = X509Certificate::from_der(&cert.chain[0]).unwrap();
    let (_, root) = X509Certificate::from_der(fx.authority.root_cert()).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    let lifetime = cert.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(lifetime > Duration::from_secs(23 * 3600), "24 h by default: {lifetime:?}");

    // Node B gets its own pods too, with a short lifetime when it asks.
    let db = fetch(&fx.client(TOKEN_B), &pod("shop", "db"), &id("shop", "db"), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(db.not_after.duration_since(SystemTime::now()).unwrap() <= Duration::from_secs(6));
    assert_eq!(fx.authority.stats().view().issued, 2);
    fx.ca.stop().await.unwrap();
}

fn refused(e: FetchError) -> (tonic::Code, String) {
    match e {
        FetchError::Refused { code, message, .. } => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn refusals_are_clear_grpc_statuses() {
    let fx = Fixture::start().await;
    let a = fx.client(TOKEN_A);

    let (code, msg) = refused(
        fetch(&fx.client("not-a-known-token-at-all"), &pod("shop", "web"), &id("shop", "web"), None)
            .await
            .unwrap_err(),
    );
    assert_eq!((code, msg.as_str()), (tonic::Code::Unauthenticated, "unknown node token"));

    let (code, msg) = refused(fetch(&a, &pod("shop", "db"), &id("shop", "db"), None).await.unwrap_err());
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert_eq!(msg, "node node-a may not obtain a certificate for shop/db: that pod is scheduled on node-b");

    let (code, msg) = refused(fetch(&a, &pod("shop", "ghost"), &id("shop", "ghost"), None).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (tonic::Code::NotFound, "pod shop/ghost is not in the mesh config"));

    // The agent thinks web runs as `admin`: the CA says what it really is.
    let (code, msg) = refused(fetch(&a, &pod("shop", "web"), &id("shop", "admin"), None).await.unwrap_err());
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.contains("the pod's identity is spiffe://cluster.local/ns/shop/sa/web"), "{msg}");

    let status = a
        .sign(proto::SignRequest {
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            namespace: "shop".into(),
            pod: "web".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("malformed CSR for shop/web"), "{}", status.message());

    let status = a
        .sign(proto::SignRequest {
            csr_pem: "x".repeat(MAX_CSR_LEN + 1),
            namespace: "shop".into(),
            pod: "web".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // No credentials at all, and credentials in the wrong form.
    let mut raw = raw_client(&fx).await;
    let req = || proto::SignRequest {
        csr_pem: String::new(),
        namespace: "shop".into(),
        pod: "web".into(),
        ttl_seconds: 0,
    };
    let status = raw.sign(req()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("missing `authorization: Bearer <node token>`"), "{}", status.message());
    let mut basic = tonic::Request::new(req());
    basic.metadata_mut().insert("authorization", format!("Basic {TOKEN_A}").parse().unwrap());
    let status = raw.sign(basic).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    let stats = fx.authority.stats().view();
    assert_eq!(stats.unauthenticated, 3);
    assert_eq!(stats.permission_denied, 1);
    assert_eq!(stats.not_found, 1);
    assert_eq!(stats.invalid_argument, 3);
    assert_eq!(stats.issued, 0);
}

async fn raw_client(fx: &Fixture) -> proto::ca_client::CaClient<tonic::transport::Channel> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(fx.authority.trust_bundle_pem()));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", fx.ca.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    proto::ca_client::CaClient::new(channel)
}

#[tokio::test]
async fn agents_verify_the_cas_certificate() {
    let fx = Fixture::start().await;
    let impostor_roots = to_pem("CERTIFICATE", Authority::in_memory().unwrap().root_cert());
    let client = GrpcCaClient::new(&format!("https://{}", fx.ca.addr), &impostor_roots, TOKEN_A, None).unwrap();
    let err = fetch(&client, &pod("shop", "web"), &id("shop", "web"), None).await.unwrap_err();
    assert!(matches!(err, FetchError::Unavailable { .. }), "{err:?}");
    assert_eq!(fx.authority.stats().view().issued, 0);

    // The serving certificate also names localhost and the configured DNS name.
    let client = GrpcCaClient::new(
        &format!("https://{}", fx.ca.addr),
        &fx.authority.trust_bundle_pem(),
        TOKEN_A,
        Some("mesh-ca.test"),
    )
    .unwrap();
    fetch(&client, &pod("shop", "web"), &id("shop", "web"), None).await.unwrap();
    let client = GrpcCaClient::new(
        &format!("https://{}", fx.ca.addr),
        &fx.authority.trust_bundle_pem(),
        TOKEN_A,
        Some("localhost"),
    )
    .unwrap();
    fetch(&client, &pod("shop", "web"), &id("shop", "web"), None).await.unwrap();
    let client = GrpcCaClient::new(
        &format!("https://{}", fx.ca.addr),
        &fx.authority.trust_bundle_pem(),
        TOKEN_A,
        Some("elsewhere.test"),
    )
    .unwrap();
    let err = fetch(&client, &pod("shop", "web"), &id("shop", "web"), None).await.unwrap_err();
    assert!(matches!(err, FetchError::Unavailable { .. }), "{err:?}");
}

#[tokio::test]
async fn follows_mesh_config_changes() {
    let fx = Fixture::start().await;
    let web = pod("shop", "web");
    fetch(&fx.client(TOKEN_A), &web, &id("shop", "web"), None).await.unwrap();
    let mut moved = mesh_state();
    moved.pods.get_mut(&web).unwrap().node = "node-b".into();
    fx.state.send_replace(Arc::new(moved));
    let (code, _) = refused(fetch(&fx.client(TOKEN_A), &web, &id("shop", "web"), None).await.unwrap_err());
    assert_eq!(code, tonic::Code::PermissionDenied);
    fetch(&fx.client(TOKEN_B), &web, &id("shop", "web"), None).await.unwrap();
}

#[test]
fn tokens_file() {
    let path = Path::new("/etc/mesh/tokens.yaml");
    let tokens = NodeTokens::parse(
        path,
        "nodes:\n  node-a: aaaaaaaaaaaaaaaaaaaa\n  node-b: bbbbbbbbbbbbbbbbbbbb\n",
    )
    .unwrap();
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens.authenticate("aaaaaaaaaaaaaaaaaaaa"), Some("node-a"));
    assert_eq!(tokens.authenticate("bbbbbbbbbbbbbbbbbbbb"), Some("node-b"));
    assert_eq!(tokens.authenticate("aaaaaaaaaaaaaaaaaaa"), None);
    assert_eq!(tokens.authenticate(""), None);
    assert!(!format!("{tokens:?}").contains("aaaa"), "tokens never appear in debug output");

    for (text, expect) in [
        ("nodes:\n  node-a: short\n", "nodes.node-a: the token must be at least 16 characters"),
        (
            "nodes:\n  node-a: aaaaaaaaaaaaaaaaaaaa\n  node-b: aaaaaaaaaaaaaaaaaaaa\n",
            "nodes.node-b: this token is also another node's",
        ),
        ("nodes:\n  Node_A: aaaaaaaaaaaaaaaaaaaa\n", "nodes.Node_A: not a valid node name"),
        ("nodes:\n  node-a: \"aaaaaaaa aaaaaaaaaaaa\"\n", "printable ASCII without spaces"),
        ("tokens: {}\n", "/etc/mesh/tokens.yaml: unknown field `tokens`"),
    ] {
        let err = NodeTokens::parse(path, text).unwrap_err().to_string();
        assert!(err.contains(expect), "{text:?}: {err}");
    }
}

#[test]
fn cli_flags() {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        ca: CaArgs,
    }
    let cli = Cli::try_parse_from([
        "ca", "--config", "/m.yaml", "--state-dir", "/ca", "--tokens", "/t.yaml", "--ttl", "10s", "--dns-name", "ca.mesh",
    ])
    .unwrap();
    assert_eq!(cli.ca.ttl, Duration::from_secs(10));
    assert_eq!(cli.ca.listen, DEFAULT_LISTEN.parse().unwrap());
    assert_eq!(cli.ca.dns_names, ["ca.mesh"]);
    let cli = Cli::try_parse_from(["ca", "--config", "/m.yaml", "--state-dir", "/ca", "--tokens", "/t.yaml"]).unwrap();
    assert_eq!(cli.ca.ttl, Duration::from_secs(24 * 3600));
}
