//! TLS for Weft connections: TLS 1.3 with raw public keys (RFC 7250), both sides authenticated.
//!
//! A node's identity is its Ed25519 public key ([`NodeId`]), so there is no certificate authority
//! and no X.509: each side presents its bare SubjectPublicKeyInfo and proves it holds the secret
//! key by signing the handshake transcript. What is checked:
//!
//! - **Client side** ([`client_config`]): the dialer already knows which node it wants (from
//!   configuration or discovery), so the server's key is *pinned*: a different key fails the
//!   handshake with "peer presented node X, expected Y". An mDNS record or a stale address can
//!   therefore never route a connection to the wrong node.
//! - **Server side** ([`server_config`]): any node may connect, but it must present an Ed25519 key
//!   and sign with it; [`peer_node_id`] then tells the driver who it is. Whether that node is
//!   welcome is the driver's decision, not TLS's.
//!
//! Both sides use the same verifier type and refuse TLS 1.2, X.509 certificates and keys other
//! than Ed25519. Session resumption is off on both sides: a client config pins one node and is
//! built per dial, so its ticket cache would be dropped with it, and the server would spend
//! memory on a session cache and bytes on tickets that are never used. Weft connections are
//! long-lived and a full Ed25519 handshake is cheap; no resumption also means every connection's
//! peer key was checked by this module, never taken from a stored session.
//!
//! Caveat for the driver: in TLS 1.3 the client finishes its handshake before the server has
//! judged the client's key, so a refused client sees its connection succeed and then close (its
//! first stream fails). Treat a peer as connected only after the application-level hello.
//!
//! The configs take the [`CryptoProvider`] as a parameter so that the simulation can inject
//! seeded randomness and key exchange; production passes
//! `Arc::new(rustls::crypto::ring::default_provider())`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{AlwaysResolvesClientRawPublicKeys, Resumption};
use rustls::crypto::{
    verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{AlwaysResolvesServerRawPublicKeys, NoServerSessionStorage};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, OtherError, PeerIncompatible, SignatureScheme,
};
use weft_proto::frame::ALPN;
use weft_proto::NodeId;

use crate::identity::{node_id_from_spki, Identity};

/// The server name a client passes to `quinn::Endpoint::connect_with`.
///
/// quinn needs a syntactically valid name, but nothing checks it: the pinned key decides who the
/// peer is. SNI is disabled in [`client_config`], so the name is not even sent.
pub const SERVER_NAME: &str = "weft";

/// The TLS configuration for accepting connections: presents `identity`'s raw public key and
/// requires the client to present and prove an Ed25519 key, whatever node it is.
///
/// # Errors
/// [`TlsError`] if `provider` cannot run TLS 1.3 with Ed25519 keys.
pub fn server_config(
    identity: &Identity,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, TlsError> {
    let certified_key = certified_key(identity, &provider)?;
    let verifier = Arc::new(NodeKeyVerifier::new(None, &provider));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Tls13Unsupported)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(
            certified_key,
        )));
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption (see the module doc): keep no session state and issue no tickets.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The TLS configuration for dialling the node `expected`: presents `identity`'s raw public key
/// and accepts only a server that proves it holds `expected`'s key.
///
/// Build one per dial; the pinned id is part of the config.
///
/// # Errors
/// [`TlsError`] if `provider` cannot run TLS 1.3 with Ed25519 keys.
pub fn client_config(
    identity: &Identity,
    expected: NodeId,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_for(identity, Some(expected), provider)
}

/// A client config for dialing an address whose node id is not known yet (a static seed): the
/// server must still present a raw Ed25519 key and prove it with its handshake signature, but any
/// key is accepted; read the id afterwards with [`peer_node_id`].
pub fn client_config_unpinned(
    identity: &Identity,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ClientConfig, TlsError> {
    client_config_for(identity, None, provider)
}

fn client_config_for(
    identity: &Identity,
    expected: Option<NodeId>,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ClientConfig, TlsError> {
    let certified_key = certified_key(identity, &provider)?;
    let verifier = Arc::new(NodeKeyVerifier::new(expected, &provider));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Tls13Unsupported)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(
            certified_key,
        )));
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption (see the module doc), and no SNI: the server name carries no meaning here.
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(config)
}

/// The node at the other end of an established connection, proven by its TLS handshake.
///
/// `None` if the handshake has not finished, or if the connection was not made with this
/// module's configs (so its peer identity is not a raw Ed25519 key).
pub fn peer_node_id(connection: &quinn::Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let certificates = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    node_id_from_spki(certificates.first()?.as_ref())
}

/// Loads `identity`'s key through `provider` and pairs it with its SubjectPublicKeyInfo, which is
/// what a raw-public-key handshake sends in place of a certificate chain.
fn certified_key(
    identity: &Identity,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    if !provider
        .signature_verification_algorithms
        .supported_schemes()
        .contains(&SignatureScheme::ED25519)
    {
        return Err(TlsError::Ed25519Unsupported);
    }
    let signing_key = provider
        .key_provider
        .load_private_key(identity.private_key_der())
        .map_err(TlsError::PrivateKey)?;
    let spki = identity.spki_der();
    debug_assert_eq!(
        signing_key.public_key().as_deref(),
        Some(spki.as_slice()),
        "the provider derived a different public key from the node key"
    );
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(spki)],
        signing_key,
    )))
}

/// Checks a peer's raw public key and handshake signature, as a client (pinning one node) and as
/// a server (accepting any node with an Ed25519 key).
///
/// One type for both sides, so the two cannot drift apart in what they accept.
#[derive(Debug)]
struct NodeKeyVerifier {
    /// The node a client dials; `None` on the server, which accepts any node and lets the driver
    /// read it with [`peer_node_id`].
    expected: Option<NodeId>,
    /// The provider's signature algorithms, used to check the handshake signature.
    algorithms: WebPkiSupportedAlgorithms,
}

impl NodeKeyVerifier {
    fn new(expected: Option<NodeId>, provider: &CryptoProvider) -> Self {
        Self {
            expected,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// The node id in the presented key, if it is an Ed25519 key and (on a client) the pinned
    /// one.
    fn check_key(&self, end_entity: &CertificateDer<'_>) -> Result<NodeId, rustls::Error> {
        let presented = node_id_from_spki(end_entity.as_ref()).ok_or_else(|| {
            tracing::debug!(
                length = end_entity.len(),
                "peer presented a key that is not Ed25519"
            );
            rejected(PeerKeyRejected::NotEd25519 {
                length: end_entity.len(),
            })
        })?;
        match self.expected {
            Some(expected) if expected != presented => {
                tracing::debug!(%presented, %expected, "peer presented the wrong node key");
                Err(rejected(PeerKeyRejected::WrongNode {
                    presented,
                    expected,
                }))
            }
            _ => Ok(presented),
        }
    }

    fn check_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(certificate.as_ref()),
            signature,
            &self.algorithms,
        )
    }
}

impl ServerCertVerifier for NodeKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_key(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _certificate: &CertificateDer<'_>,
        _signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(message, certificate, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for NodeKeyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check_key(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _certificate: &CertificateDer<'_>,
        _signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check_signature(message, certificate, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Why a peer's key was refused. It travels inside a `rustls::Error` and ends up, as text, in the
/// handshake error the dialler sees.
#[derive(Debug, thiserror::Error)]
enum PeerKeyRejected {
    #[error("peer presented node {presented}, expected {expected}")]
    WrongNode { presented: NodeId, expected: NodeId },
    #[error(
        "peer presented a {length}-byte key that is not an Ed25519 public key (not a Weft node)"
    )]
    NotEd25519 { length: usize },
}

/// Wraps a refusal in the `rustls::Error` that keeps its text readable: it prints as
/// "other error: <reason>" (and quinn's handshake error ends with that text).
///
/// `CertificateError::Other` would pick a more specific alert (`certificate_unknown` rather than
/// `handshake_failure`), but rustls prints that variant with `Debug`, burying the message in
/// `Other(OtherError(..))`; the person reading the dialler's error matters more than the alert
/// code the peer receives.
fn rejected(reason: PeerKeyRejected) -> rustls::Error {
    rustls::Error::Other(OtherError(Arc::new(reason)))
}

/// Why a TLS configuration cannot be built. All of these mean the crypto provider lacks
/// something Weft needs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The provider offers no TLS 1.3 cipher suite or key exchange group.
    #[error("the crypto provider cannot run TLS 1.3, which QUIC requires; use rustls::crypto::ring::default_provider()")]
    Tls13Unsupported(#[source] rustls::Error),
    /// The provider cannot verify Ed25519 signatures, so it cannot check any node's handshake.
    #[error("the crypto provider cannot verify Ed25519 signatures, which prove node identities; use rustls::crypto::ring::default_provider()")]
    Ed25519Unsupported,
    /// The provider cannot load the node's Ed25519 key for signing.
    #[error("the crypto provider cannot sign with the node's Ed25519 key; use rustls::crypto::ring::default_provider()")]
    PrivateKey(#[source] rustls::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

    type TestResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

    /// Every network step of a test finishes within this, or the test fails instead of hanging.
    const STEP_TIMEOUT: Duration = Duration::from_secs(10);

    const LOCALHOST: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn server_endpoint(identity: &Identity) -> TestResult<quinn::Endpoint> {
        let crypto = QuicServerConfig::try_from(server_config(identity, provider())?)?;
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        Ok(quinn::Endpoint::server(config, LOCALHOST)?)
    }

    fn quinn_client_config(crypto: rustls::ClientConfig) -> TestResult<quinn::ClientConfig> {
        Ok(quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(crypto)?,
        )))
    }

    /// Accepts one connection; its handshake ends once the server has checked the client's key.
    fn accept_one(
        server: quinn::Endpoint,
    ) -> tokio::task::JoinHandle<Result<quinn::Connection, quinn::ConnectionError>> {
        tokio::spawn(async move {
            match server.accept().await {
                Some(incoming) => incoming.await,
                None => Err(quinn::ConnectionError::LocallyClosed),
            }
        })
    }

    async fn within<F: std::future::Future>(future: F) -> TestResult<F::Output> {
        Ok(tokio::time::timeout(STEP_TIMEOUT, future).await?)
    }

    #[tokio::test]
    async fn pinned_node_connects_and_both_sides_learn_the_peer() -> TestResult {
        let server_identity = Identity::from_seed([1; 32]);
        let client_identity = Identity::from_seed([2; 32]);
        let server = server_endpoint(&server_identity)?;
        let server_address = server.local_addr()?;
        let accepted = accept_one(server.clone());

        let client = quinn::Endpoint::client(LOCALHOST)?;
        let config = quinn_client_config(client_config(
            &client_identity,
            server_identity.node_id(),
            provider(),
        )?)?;
        let connection =
            within(client.connect_with(config, server_address, SERVER_NAME)?).await??;
        assert_eq!(peer_node_id(&connection), Some(server_identity.node_id()));
        let alpn = connection
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol);
        assert_eq!(alpn.as_deref(), Some(ALPN));

        let server_side = within(accepted).await???;
        assert_eq!(peer_node_id(&server_side), Some(client_identity.node_id()));
        connection.close(0u32.into(), b"done");
        server.close(0u32.into(), b"done");
        Ok(())
    }

    #[tokio::test]
    async fn wrong_pinned_node_fails_the_client_connect() -> TestResult {
        let server_identity = Identity::from_seed([1; 32]);
        let client_identity = Identity::from_seed([2; 32]);
        let other_identity = Identity::from_seed([3; 32]);
        let server = server_endpoint(&server_identity)?;
        let server_address = server.local_addr()?;
        let client = quinn::Endpoint::client(LOCALHOST)?;

        // A good connection first: an endpoint that already reached this server must still
        // enforce the pin on the next dial.
        let accepted = accept_one(server.clone());
        let good = quinn_client_config(client_config(
            &client_identity,
            server_identity.node_id(),
            provider(),
        )?)?;
        let connection = within(client.connect_with(good, server_address, SERVER_NAME)?).await??;
        let server_side = within(accepted).await???;
        connection.close(0u32.into(), b"done");
        server_side.close(0u32.into(), b"done");

        let accepted = accept_one(server.clone());
        let wrong = quinn_client_config(client_config(
            &client_identity,
            other_identity.node_id(),
            provider(),
        )?)?;
        let error = within(client.connect_with(wrong, server_address, SERVER_NAME)?)
            .await?
            .expect_err("the client must refuse a server with another key");
        let message = error.to_string();
        let expected_text = format!(
            "peer presented node {}, expected {}",
            server_identity.node_id(),
            other_identity.node_id()
        );
        assert!(message.contains(&expected_text), "{message}");
        // The server sees the client's alert, never a connection.
        assert!(within(accepted).await??.is_err());
        server.close(0u32.into(), b"done");
        Ok(())
    }

    #[tokio::test]
    async fn server_refuses_a_client_key_that_is_not_ed25519() -> TestResult {
        use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

        let server_identity = Identity::from_seed([1; 32]);
        let server = server_endpoint(&server_identity)?;
        let server_address = server.local_addr()?;
        let accepted = accept_one(server.clone());

        // A client presenting a raw P-256 key: valid TLS, but not a node id.
        let random = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &random)
            .map_err(|_| "cannot generate a P-256 key")?;
        let provider = provider();
        let signing_key =
            provider
                .key_provider
                .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
                    pkcs8.as_ref().to_vec().into(),
                ))?;
        let spki = signing_key
            .public_key()
            .ok_or("no public key")?
            .as_ref()
            .to_vec();
        let mut crypto = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NodeKeyVerifier::new(
                Some(server_identity.node_id()),
                &provider,
            )))
            .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(Arc::new(
                CertifiedKey::new(vec![CertificateDer::from(spki)], signing_key),
            ))));
        crypto.alpn_protocols = vec![ALPN.to_vec()];

        let client = quinn::Endpoint::client(LOCALHOST)?;
        let connecting =
            client.connect_with(quinn_client_config(crypto)?, server_address, SERVER_NAME)?;
        // TLS 1.3: the client may finish before the server judges its key; then the connection
        // closes right after.
        if let Ok(connection) = within(connecting).await? {
            within(connection.closed()).await?;
        }
        let error = within(accepted)
            .await??
            .expect_err("the server must refuse the client");
        let message = error.to_string();
        assert!(message.contains("not an Ed25519 public key"), "{message}");
        server.close(0u32.into(), b"done");
        Ok(())
    }

    #[tokio::test]
    async fn server_claiming_a_key_it_cannot_sign_for_is_refused() -> TestResult {
        // The impostor presents the victim's public key but holds only its own secret key, so
        // the pin matches and only the handshake signature check can catch it.
        let victim = Identity::from_seed([1; 32]);
        let impostor = Identity::from_seed([9; 32]);
        let client_identity = Identity::from_seed([2; 32]);
        let provider = provider();
        let impostor_key = provider
            .key_provider
            .load_private_key(impostor.private_key_der())?;
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(NodeKeyVerifier::new(None, &provider)))
            .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(Arc::new(
                CertifiedKey::new(vec![CertificateDer::from(victim.spki_der())], impostor_key),
            ))));
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(crypto)?)),
            LOCALHOST,
        )?;
        let server_address = server.local_addr()?;
        let accepted = accept_one(server.clone());

        let client = quinn::Endpoint::client(LOCALHOST)?;
        let config =
            quinn_client_config(client_config(&client_identity, victim.node_id(), provider)?)?;
        let error = within(client.connect_with(config, server_address, SERVER_NAME)?)
            .await?
            .expect_err("the client must refuse a server that cannot sign for its key");
        let message = error.to_string();
        assert!(message.contains("BadSignature"), "{message}");
        assert!(within(accepted).await??.is_err());
        server.close(0u32.into(), b"done");
        Ok(())
    }

    #[test]
    fn verifier_messages_name_both_nodes() {
        let provider = provider();
        let expected = Identity::from_seed([4; 32]).node_id();
        let presented = Identity::from_seed([5; 32]);
        let verifier = NodeKeyVerifier::new(Some(expected), &provider);
        let certificate = CertificateDer::from(presented.spki_der());
        let error = verifier
            .verify_server_cert(
                &certificate,
                &[],
                &ServerName::try_from(SERVER_NAME).unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "other error: peer presented node {}, expected {expected}",
                presented.node_id()
            )
        );
        let right = CertificateDer::from(crate::identity::spki_der(&expected));
        assert!(verifier
            .verify_server_cert(
                &right,
                &[],
                &ServerName::try_from(SERVER_NAME).unwrap(),
                &[],
                UnixTime::now()
            )
            .is_ok());

        // The server side accepts any Ed25519 key and nothing else.
        let any = NodeKeyVerifier::new(None, &provider);
        assert!(any
            .verify_client_cert(&certificate, &[], UnixTime::now())
            .is_ok());
        let garbage = CertificateDer::from(vec![0u8; 44]);
        let error = any
            .verify_client_cert(&garbage, &[], UnixTime::now())
            .unwrap_err();
        assert!(error.to_string().contains("not an Ed25519"), "{error}");
        assert!(ServerCertVerifier::requires_raw_public_keys(&any));
        assert!(ClientCertVerifier::requires_raw_public_keys(&any));
        assert!(any.client_auth_mandatory());
    }

    #[test]
    fn configs_are_tls13_only_with_weft_alpn_and_no_resumption() {
        let identity = Identity::from_seed([6; 32]);
        let server = server_config(&identity, provider()).unwrap();
        assert_eq!(server.alpn_protocols, vec![ALPN.to_vec()]);
        assert_eq!(server.send_tls13_tickets, 0);
        let client = client_config(&identity, identity.node_id(), provider()).unwrap();
        assert_eq!(client.alpn_protocols, vec![ALPN.to_vec()]);
        assert!(!client.enable_sni);
        // The configs only offer TLS 1.3: a TLS 1.2-only provider cannot build them.
        let no_suites = Arc::new(CryptoProvider {
            cipher_suites: Vec::new(),
            ..rustls::crypto::ring::default_provider()
        });
        assert!(matches!(
            server_config(&identity, no_suites.clone()),
            Err(TlsError::Tls13Unsupported(_))
        ));
        assert!(matches!(
            client_config(&identity, identity.node_id(), no_suites),
            Err(TlsError::Tls13Unsupported(_))
        ));
    }

    #[test]
    fn provider_without_ed25519_is_a_typed_error() {
        let default = rustls::crypto::ring::default_provider();
        let mapping: Vec<_> = default
            .signature_verification_algorithms
            .mapping
            .iter()
            .filter(|(scheme, _)| *scheme != SignatureScheme::ED25519)
            .copied()
            .collect();
        let without_ed25519 = Arc::new(CryptoProvider {
            signature_verification_algorithms: WebPkiSupportedAlgorithms {
                all: default.signature_verification_algorithms.all,
                mapping: Vec::leak(mapping),
            },
            ..default
        });
        let identity = Identity::from_seed([8; 32]);
        let error = server_config(&identity, without_ed25519).unwrap_err();
        assert!(matches!(error, TlsError::Ed25519Unsupported), "{error:?}");
        assert!(error.to_string().contains("default_provider()"));
    }
}
