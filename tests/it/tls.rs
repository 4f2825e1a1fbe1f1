//! TLS on its own listener, with certificates made by the test (rcgen): the client verifies the
//! server against the CA; with a client CA configured the server requires client certificates;
//! the plain listener keeps working beside it.

use std::path::Path;
use std::sync::Arc;

use cmqd::client::{Account, ClientConfig, QueueAttributeSet};
use cmqd::server::{Server, ServerOptions};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};

use crate::support::ALICE;

/// Certificates for a test: a server CA and a server certificate for localhost and 127.0.0.1,
/// a client CA with a client certificate, and a stranger's CA and certificate (also used by the
/// HTTPS tests of the HTTP API).
pub struct Pki {
    dir: tempfile::TempDir,
}

fn ca(name: &str) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    (params.self_signed(&key).unwrap(), key)
}

fn leaf(
    names: &[&str],
    purpose: ExtendedKeyUsagePurpose,
    issuer: &(Certificate, KeyPair),
) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![purpose];
    (params.signed_by(&key, &issuer.0, &issuer.1).unwrap(), key)
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let server_ca = ca("cmqd test server CA");
        let client_ca = ca("cmqd test client CA");
        let other_ca = ca("someone else's CA");
        let server = leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &server_ca,
        );
        let client = leaf(&["alice"], ExtendedKeyUsagePurpose::ClientAuth, &client_ca);
        let stranger = leaf(&["mallory"], ExtendedKeyUsagePurpose::ClientAuth, &other_ca);
        write("server-ca.pem", server_ca.0.pem());
        write("client-ca.pem", client_ca.0.pem());
        write("other-ca.pem", other_ca.0.pem());
        write("server.pem", server.0.pem());
        write("server.key", server.1.serialize_pem());
        write("client.pem", client.0.pem());
        write("client.key", client.1.serialize_pem());
        write("stranger.pem", stranger.0.pem());
        write("stranger.key", stranger.1.serialize_pem());
        Self { dir }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

async fn start(pki: &Pki, client_ca: Option<&Path>) -> (cmqd::server::RunningServer, String) {
    let options = ServerOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        limits: Default::default(),
        accounts: vec![cmqd::config::AccountConfig {
            name: "alice".into(),
            secret_id: ALICE.0.into(),
            secret_key: ALICE.1.into(),
        }],
    };
    let mut server = Server::bind(options).await.unwrap();
    let config =
        cmqd::tls::server_config(&pki.path("server.pem"), &pki.path("server.key"), client_ca)
            .unwrap();
    let tls_addr = server
        .listen_tls("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    (server.spawn().unwrap(), tls_addr.to_string())
}

fn client(pki: &Pki, ca: &str, cert: Option<(&str, &str)>) -> ClientConfig {
    let cert_paths = cert.map(|(c, k)| (pki.path(c), pki.path(k)));
    let config = cmqd::tls::client_config(
        &pki.path(ca),
        cert_paths.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .unwrap();
    ClientConfig::default()
        .tls(Arc::clone(&config), "localhost")
        .unwrap()
}

#[tokio::test]
async fn messages_flow_over_tls_and_plaintext_stays_available() {
    let pki = Pki::new();
    let (server, tls_addr) = start(&pki, None).await;
    let account = Account::connect(
        &tls_addr,
        ALICE.0,
        ALICE.1,
        client(&pki, "server-ca.pem", None),
    )
    .await
    .unwrap();
    let queue = account.queue("secure");
    queue.create(&QueueAttributeSet::default()).await.unwrap();
    let id = queue.send_message("over tls", 0).await.unwrap();
    // The same queue through the plain listener.
    let plain = Account::connect(
        &server.addr().to_string(),
        ALICE.0,
        ALICE.1,
        ClientConfig::default(),
    )
    .await
    .unwrap();
    let got = plain
        .queue("secure")
        .receive_message(Some(0))
        .await
        .unwrap();
    assert_eq!((got.msg_id, &got.body[..]), (id, &b"over tls"[..]));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_server_the_client_cannot_verify_is_refused() {
    let pki = Pki::new();
    let (server, tls_addr) = start(&pki, None).await;
    let err = Account::connect(
        &tls_addr,
        ALICE.0,
        ALICE.1,
        client(&pki, "other-ca.pem", None),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), cmqd::client::ErrorKind::Connection, "{err}");
    // Plaintext spoken to the TLS port does not get through either.
    let err = Account::connect(&tls_addr, ALICE.0, ALICE.1, ClientConfig::default())
        .await
        .unwrap_err();
    assert_ne!(err.kind(), cmqd::client::ErrorKind::Cmq, "{err}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_client_ca() {
    let pki = Pki::new();
    let (server, tls_addr) = start(&pki, Some(&pki.path("client-ca.pem"))).await;
    let ok = Account::connect(
        &tls_addr,
        ALICE.0,
        ALICE.1,
        client(&pki, "server-ca.pem", Some(("client.pem", "client.key"))),
    )
    .await
    .unwrap();
    ok.ping().await.unwrap();
    for cert in [None, Some(("stranger.pem", "stranger.key"))] {
        let refused = Account::connect(
            &tls_addr,
            ALICE.0,
            ALICE.1,
            client(&pki, "server-ca.pem", cert),
        )
        .await;
        assert!(
            refused.is_err(),
            "a client without a good certificate got in"
        );
    }
    server.shutdown().await.unwrap();
}
