use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

use super::*;
use crate::identity::{
    Authority,
    testing::{Defect, cert_watch, id, mint_defective},
};

const TTL: Duration = Duration::from_secs(3600);

struct Handshake {
    client: Result<(tokio_rustls::client::TlsStream<tokio::io::DuplexStream>, SpiffeId), HandshakeError>,
    server: Result<(tokio_rustls::server::TlsStream<tokio::io::DuplexStream>, SpiffeId), HandshakeError>,
}

async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>, server_stats: &TlsStats) -> Handshake {
    let (c, s) = duplex(64 * 1024);
    let (client, server) = tokio::join!(connect(client, c), accept(server, s, server_stats));
    Handshake { client, server }
}

fn stats() -> Arc<TlsStats> {
    Arc::new(TlsStats::default())
}

/// Every counter but `reason` is zero, and `reason` is one.
fn only(stats: &TlsStats, reason: Reason) {
    for r in Reason::ALL {
        assert_eq!(stats.rejected(r), u64::from(r == reason), "counter {}", r.as_str());
    }
    assert_eq!(stats.verified.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn mutual_tls_shows_each_side_the_other_identity() {
    let ca = Authority::in_memory().unwrap();
    let web = ca.mint(&id("shop", "web"), TTL).unwrap();
    let db = ca.mint(&id("shop", "db"), TTL).unwrap();
    let (client_stats, server_stats) = (stats(), stats());
    let (_tx, db_certs) = cert_watch(db);
    let client = client_config(&web, id("shop", "db"), client_stats.clone()).unwrap();
    let server = server_config(db_certs, server_stats.clone()).unwrap();

    let hs = handshake(client, server, &server_stats).await;
    let (mut c, server_seen_by_client) = hs.client.unwrap();
    let (mut s, client_seen_by_server) = hs.server.unwrap();
    assert_eq!(server_seen_by_client, id("shop", "db"), "the client verified the destination");
    assert_eq!(client_seen_by_server, id("shop", "web"), "the server knows the source");
    assert_eq!(peer_identity(c.get_ref().1), Some(id("shop", "db")));
    assert_eq!(peer_identity(s.get_ref().1), Some(id("shop", "web")));
    let states: [&CommonState; 2] = [c.get_ref().1, s.get_ref().1];
    for conn in states {
        assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    }
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    assert_eq!(client_stats.view().verified, 1);
    assert_eq!(server_stats.view().verified, 1);
    assert!(client_stats.view().rejected.values().all(|n| *n == 0));
}

fn expected_reason(defect: Defect) -> Reason {
    match defect {
        Defect::Expired => Reason::Expired,
        Defect::NotYetValid => Reason::NotYetValid,
        Defect::WrongTrustDomain => Reason::WrongTrustDomain,
        Defect::NoUriSan => Reason::NoUriSan,
        Defect::TwoUriSans => Reason::MultipleUriSans,
        Defect::LeafIsCa => Reason::LeafIsCa,
        Defect::UntrustedRoot => Reason::UntrustedRoot,
        Defect::NotSpiffe => Reason::NotSpiffe,
        Defect::KeyCertSign | Defect::CrlSign => Reason::LeafSignsCertificates,
        Defect::NoDigitalSignature | Defect::NoKeyUsage => Reason::NoDigitalSignature,
        Defect::WrongExtendedKeyUsage => Reason::WrongExtendedKeyUsage,
    }
}

#[tokio::test]
async fn client_rejects_each_bad_server_certificate_with_its_reason() {
    let ca = Authority::in_memory().unwrap();
    let web = ca.mint(&id("shop", "web"), TTL).unwrap();
    for defect in Defect::ALL {
        let bad = mint_defective(&ca, &id("shop", "db"), defect);
        let (client_stats, server_stats) = (stats(), stats());
        let (_tx, certs) = cert_watch(bad);
        let client = client_config(&web, id("shop", "db"), client_stats.clone()).unwrap();
        let server = server_config(certs, server_stats.clone()).unwrap();
        let hs = handshake(client, server, &server_stats).await;
        let err = hs.client.err().unwrap_or_else(|| panic!("{defect:?}: the client accepted"));
        let HandshakeError::PeerRejected(v) = &err else {
            panic!("{defect:?}: expected a certificate rejection, got {err:?}");
        };
        assert_eq!(v.reason(), expected_reason(defect), "{defect:?}: {v}");
        only(&client_stats, expected_reason(defect));
        // The log line is a sentence, not a Rust value.
        let text = v.to_string();
        assert!(!text.contains(" { ") && !text.contains("Context"), "{defect:?}: {text}");
        assert!(hs.server.is_err(), "{defect:?}: the server saw the handshake fail");
        println!("{defect:?}: {err}");
    }
}

#[tokio::test]
async fn server_rejects_each_bad_client_certificate_with_its_reason() {
    let ca = Authority::in_memory().unwrap();
    let db = ca.mint(&id("shop", "db"), TTL).unwrap();
    for defect in Defect::ALL {
        let bad = mint_defective(&ca, &id("shop", "web"), defect);
        let (client_stats, server_stats) = (stats(), stats());
        let (_tx, certs) = cert_watch(db.clone());
        let client = client_config(&bad, id("shop", "db"), client_stats.clone()).unwrap();
        let server = server_config(certs, server_stats.clone()).unwrap();
        let hs = handshake(client, server, &server_stats).await;
        let err = hs.server.err().unwrap_or_else(|| panic!("{defect:?}: the server accepted"));
        let HandshakeError::PeerRejected(v) = &err else {
            panic!("{defect:?}: expected a certificate rejection, got {err:?}");
        };
        assert_eq!(v.reason(), expected_reason(defect), "{defect:?}: {v}");
        only(&server_stats, expected_reason(defect));
        // In TLS 1.3 the client finishes before the server has judged its
        // certificate; it learns of the refusal at its first read.
        if let Ok((mut c, _)) = hs.client {
            let mut buf = [0; 1];
            let read = c.read(&mut buf).await;
            assert!(!matches!(read, Ok(n) if n > 0), "{defect:?}: the connection must not carry data");
        }
    }
}

#[tokio::test]
async fn client_refuses_a_valid_but_unexpected_server() {
    let ca = Authority::in_memory().unwrap();
    let web = ca.mint(&id("shop", "web"), TTL).unwrap();
    let cart = ca.mint(&id("shop", "cart"), TTL).unwrap();
    let (client_stats, server_stats) = (stats(), stats());
    let (_tx, certs) = cert_watch(cart);
    let client = client_config(&web, id("shop", "db"), client_stats.clone()).unwrap();
    let server = server_config(certs, server_stats.clone()).unwrap();
    let hs = handshake(client, server, &server_stats).await;
    let Err(HandshakeError::PeerRejected(v)) = hs.client else {
        panic!("expected a rejection");
    };
    assert_eq!(
        v,
        VerifyError::UnexpectedIdentity {
            got: Box::new(id("shop", "cart")),
            expected: Box::new(id("shop", "db"))
        }
    );
    assert_eq!(
        v.to_string(),
        "the peer is spiffe://cluster.local/ns/shop/sa/cart, expected spiffe://cluster.local/ns/shop/sa/db"
    );
    only(&client_stats, Reason::UnexpectedIdentity);

    // Any workload of the trust domain, when asked for.
    let client = client_config(&web, ExpectedPeer::AnyInTrustDomain, client_stats.clone()).unwrap();
    let (_tx, certs) = cert_watch(ca.mint(&id("shop", "cart"), TTL).unwrap());
    let hs = handshake(client, server_config(certs, server_stats.clone()).unwrap(), &server_stats).await;
    assert_eq!(hs.client.unwrap().1, id("shop", "cart"));
}

#[tokio::test]
async fn server_refuses_a_client_without_a_certificate() {
    let ca = Authority::in_memory().unwrap();
    let web = ca.mint(&id("shop", "web"), TTL).unwrap();
    let db = ca.mint(&id("shop", "db"), TTL).unwrap();
    let client_stats = stats();
    let verifier = verify::SpiffeServerVerifier::new(&web, id("shop", "db").into(), client_stats).unwrap();
    let mut anonymous = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![ALPN_H2.to_vec()];
    let server_stats = stats();
    let (_tx, certs) = cert_watch(db);
    let hs = handshake(Arc::new(anonymous), server_config(certs, server_stats.clone()).unwrap(), &server_stats).await;
    let Err(err) = hs.server else { panic!("the server accepted a client without a certificate") };
    assert!(matches!(err, HandshakeError::NoClientCertificate), "{err:?}");
    assert!(err.to_string().contains("presented no certificate"));
    assert_eq!(server_stats.view().no_client_certificate, 1);
    assert_eq!(server_stats.view().verified, 0);
}

#[tokio::test]
async fn garbage_is_refused_without_a_peer_identity() {
    let ca = Authority::in_memory().unwrap();
    let (_tx, certs) = cert_watch(ca.mint(&id("shop", "db"), TTL).unwrap());
    let server_stats = stats();
    let server = server_config(certs, server_stats.clone()).unwrap();
    let (mut c, s) = duplex(4096);
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let Err(err) = accept(server, s, &server_stats).await else { panic!("the server accepted garbage") };
    assert!(matches!(err, HandshakeError::Tls(_)), "{err:?}");
}

#[tokio::test]
async fn server_certificate_hot_swaps_without_dropping_connections() {
    let ca = Authority::in_memory().unwrap();
    let web = ca.mint(&id("shop", "web"), TTL).unwrap();
    let first = ca.mint(&id("shop", "db"), TTL).unwrap();
    let first_serial = first.serial.clone();
    let (tx, certs) = cert_watch(first);
    let server_stats = stats();
    let server = server_config(certs, server_stats.clone()).unwrap();
    let client = client_config(&web, id("shop", "db"), stats()).unwrap();

    let serial_seen = |c: &tokio_rustls::client::TlsStream<tokio::io::DuplexStream>| {
        let der = &c.get_ref().1.peer_certificates().unwrap()[0];
        crate::identity::x509::inspect(der).unwrap().serial
    };
    let hs = handshake(client.clone(), server.clone(), &server_stats).await;
    let (mut old_c, _) = hs.client.unwrap();
    let (mut old_s, _) = hs.server.unwrap();
    assert_eq!(serial_seen(&old_c), first_serial);

    let second = ca.mint(&id("shop", "db"), TTL).unwrap();
    let second_serial = second.serial.clone();
    tx.send_replace(Some(Arc::new(second)));
    let hs = handshake(client.clone(), server.clone(), &server_stats).await;
    assert_eq!(serial_seen(&hs.client.unwrap().0), second_serial, "new handshakes present the new certificate");

    // The connection made before the swap still works.
    old_s.write_all(b"still here").await.unwrap();
    let mut buf = [0; 10];
    old_c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");

    // No certificate (not issued yet, or expired while the CA was down):
    // refused, and counted.
    tx.send_replace(None);
    let hs = handshake(client, server, &server_stats).await;
    assert!(hs.client.is_err() && hs.server.is_err());
    assert_eq!(server_stats.view().no_local_certificate, 1);
}

#[tokio::test]
async fn trust_bundle_with_two_roots_verifies_certificates_from_both() {
    let dir = crate::identity::testing::TempDir::new("tls-two-roots");
    let old_ca = Authority::load_or_create(dir.path()).unwrap();
    let mut old_web = old_ca.mint(&id("shop", "web"), TTL).unwrap();
    Authority::rotate_root(dir.path()).unwrap();
    let new_ca = Authority::load_or_create(dir.path()).unwrap();
    let new_db = new_ca.mint(&id("shop", "db"), TTL).unwrap();
    assert_eq!(new_db.trust_bundle.len(), 2);

    // Before web renews, its bundle only has the old root: it refuses the
    // new root's certificates. That is why both roots stay in the bundle
    // until every agent has renewed.
    let (client_stats, server_stats) = (stats(), stats());
    let (_tx, certs) = cert_watch(new_db.clone());
    let hs = handshake(
        client_config(&old_web, id("shop", "db"), client_stats.clone()).unwrap(),
        server_config(certs, server_stats.clone()).unwrap(),
        &server_stats,
    )
    .await;
    assert!(matches!(hs.client, Err(HandshakeError::PeerRejected(VerifyError::UntrustedRoot { .. }))));

    // With the new bundle, an old-root certificate and a new-root one
    // accept each other, in both directions.
    old_web.trust_bundle = new_ca.trust_bundle().to_vec();
    let (client_stats, server_stats) = (stats(), stats());
    let (_tx, certs) = cert_watch(new_db.clone());
    let hs = handshake(
        client_config(&old_web, id("shop", "db"), client_stats.clone()).unwrap(),
        server_config(certs, server_stats.clone()).unwrap(),
        &server_stats,
    )
    .await;
    assert_eq!(hs.client.unwrap().1, id("shop", "db"));
    assert_eq!(hs.server.unwrap().1, id("shop", "web"));

    let (_tx, certs) = cert_watch(old_web.clone());
    let hs = handshake(
        client_config(&new_db, id("shop", "web"), stats()).unwrap(),
        server_config(certs, server_stats.clone()).unwrap(),
        &server_stats,
    )
    .await;
    assert_eq!(hs.client.unwrap().1, id("shop", "web"));
    assert_eq!(hs.server.unwrap().1, id("shop", "db"));
}

#[tokio::test]
async fn stats_view_lists_every_reason() {
    let s = TlsStats::default();
    let view = s.view();
    assert_eq!(view.rejected.len(), Reason::ALL.len());
    let json = serde_json::to_value(&view).unwrap();
    assert_eq!(json["rejected"]["wrong_trust_domain"], 0);
    assert_eq!(json["noClientCertificate"], 0);
}
