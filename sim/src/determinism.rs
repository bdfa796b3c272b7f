//! Seams that make a simulated run bit-for-bit reproducible from its seed.
//!
//! quinn and rustls draw from the OS in several places; each one must be replaced, or two runs with
//! the same seed send different bytes and a failing seed cannot be replayed:
//!
//! | source                           | seam                                                    |
//! |----------------------------------|---------------------------------------------------------|
//! | rustls randoms (hello, tickets)  | [`crypto_provider`]: seeded `secure_random`             |
//! | TLS ephemeral keys (ring uses OS)| [`crypto_provider`]: seeded X25519 `kx_groups`          |
//! | quinn endpoint rng               | [`QuinnSeams::endpoint_config`]: `rng_seed`             |
//! | stateless-reset key              | [`QuinnSeams::endpoint_config`]: reset key              |
//! | local connection ids             | [`QuinnSeams::endpoint_config`]: `cid_generator`        |
//! | client's first destination CID   | [`QuinnSeams::initial_dst_cid_provider`]                |
//! | server token key                 | [`QuinnSeams::token_key`]                               |
//! | token issue times (wall clock)   | [`QuinnSeams::time_source`] ([`SimulatedClock`])        |
//! | TLS ticket ages (wall clock)     | [`SimulatedClock`] as the rustls time provider          |
//!
//! Outside these seams a run also needs `turmoil::Builder::rng_seed`, node keys derived from the
//! seed (Ed25519 only: its signatures are deterministic, ring's ECDSA ones are not) and `biased;`
//! in every `tokio::select!` (or `--cfg tokio_unstable`, which lets turmoil seed tokio).
//!
//! Every seam takes the node's seed and derives its own stream from it with a distinct blake3
//! context, so one seed per node can be passed to all of them. Production keeps the library
//! defaults; only the simulation injects these.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    crypto::{
        ActiveKeyExchange, CryptoProvider, GetRandomFailed, SecureRandom, SharedSecret,
        SupportedKxGroup,
    },
    pki_types::UnixTime,
    NamedGroup, PeerMisbehaved, SupportedCipherSuite,
};
use weft_proto::backoff::SplitMix64;

/// The simulated wall clock starts here (2023-11-14T22:13:20Z): a fixed instant, so that times
/// written into tokens and tickets are the same in every run.
pub const SIMULATED_EPOCH_UNIX_SECS: u64 = 1_700_000_000;

/// Length of the connection ids quinn issues, as with its default generator.
const LOCAL_CID_LEN: usize = 8;

/// Length of the client's first destination connection id, as with quinn's default provider (the
/// RFC 9000 maximum; at least 8 is required).
const INITIAL_DST_CID_LEN: usize = 20;

/// Key material for one seam: 32 bytes that depend on the seed and on the seam's `context` only.
fn derive(seed: u64, context: &str) -> [u8; 32] {
    blake3::derive_key(context, &seed.to_le_bytes())
}

/// A generator for one seam, independent of every other seam's generator.
fn derive_generator(seed: u64, context: &str) -> SplitMix64 {
    let [a, b, c, d, e, f, g, h, ..] = derive(seed, context);
    SplitMix64::new(u64::from_le_bytes([a, b, c, d, e, f, g, h]))
}

/// rustls' ring provider with every source of randomness seeded.
///
/// It replaces `secure_random` (client/server randoms, session ids, ticket contents) and the
/// key-exchange groups: ring creates ephemeral keys from the OS and ignores `secure_random`, so
/// the only group is an X25519 implemented with x25519-dalek over the seeded generator. Only the
/// TLS 1.3 cipher suites are kept. Signing stays ring's; use Ed25519 keys, whose signatures are
/// deterministic.
///
/// Build one provider per node: the generators live in the provider, so nodes sharing one would
/// make their randomness depend on each other's handshakes. rustls wants `&'static` randomness and
/// groups, so each call leaks two small objects (a few dozen bytes).
pub fn crypto_provider(seed: u64) -> Arc<CryptoProvider> {
    let ring = rustls::crypto::ring::default_provider();
    let secure_random: &'static SeededRandom = Box::leak(Box::new(SeededRandom {
        generator: Mutex::new(derive_generator(seed, "weft-sim rustls secure_random")),
    }));
    let x25519: &'static SeededX25519 = Box::leak(Box::new(SeededX25519 {
        generator: Mutex::new(derive_generator(seed, "weft-sim rustls x25519")),
    }));
    Arc::new(CryptoProvider {
        cipher_suites: ring
            .cipher_suites
            .iter()
            .copied()
            .filter(|suite| matches!(suite, SupportedCipherSuite::Tls13(_)))
            .collect(),
        kx_groups: vec![x25519],
        secure_random,
        ..ring
    })
}

/// rustls randomness from a seeded generator: reproducible, and therefore for simulation only.
#[derive(Debug)]
struct SeededRandom {
    generator: Mutex<SplitMix64>,
}

impl SecureRandom for SeededRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        self.generator
            .lock()
            .expect("secure_random generator mutex poisoned")
            .fill(buf);
        Ok(())
    }
}

/// X25519 whose ephemeral secrets come from a seeded generator.
#[derive(Debug)]
struct SeededX25519 {
    generator: Mutex<SplitMix64>,
}

impl SupportedKxGroup for SeededX25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let mut secret = [0u8; 32];
        self.generator
            .lock()
            .expect("x25519 generator mutex poisoned")
            .fill(&mut secret);
        let secret = x25519_dalek::StaticSecret::from(secret);
        let public = x25519_dalek::PublicKey::from(&secret);
        Ok(Box::new(SeededX25519Exchange { secret, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// One handshake's half of an X25519 exchange.
struct SeededX25519Exchange {
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
}

impl ActiveKeyExchange for SeededX25519Exchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let peer: [u8; 32] = peer_pub_key
            .try_into()
            .map_err(|_| PeerMisbehaved::InvalidKeyShare)?;
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        // A low-order peer point forces an all-zero secret; ring refuses it, so do we.
        if !shared.was_contributory() {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        Ok(SharedSecret::from(&shared.as_bytes()[..]))
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_bytes()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// Everything quinn would otherwise seed from the OS or the wall clock, for one node.
///
/// Wiring (all fields are cheap to clone; clone what several endpoints need):
/// - `endpoint_config` → [`quinn::Endpoint::new_with_abstract_socket`] (adjust transport-wide
///   settings on it before use; keep its reset key, rng seed and CID generator);
/// - `initial_dst_cid_provider` → [`quinn::ClientConfig::initial_dst_cid_provider`] on every client
///   config the node dials with;
/// - `token_key` → [`quinn::ServerConfig::new`] (not `ServerConfig::with_crypto`, which draws a
///   random key);
/// - `time_source` → [`quinn::ServerConfig::time_source`]: issue times are written into retry
///   and address-validation tokens.
///
/// The rustls configs need [`crypto_provider`] and, as their time provider, [`SimulatedClock`]
/// (`rustls::{Client,Server}Config::builder_with_details`): ticket ages are read off the clock.
pub struct QuinnSeams {
    /// Seeded endpoint rng, stateless-reset key and connection-id generator.
    pub endpoint_config: quinn::EndpointConfig,
    /// The client's first destination connection id, from a seeded generator.
    pub initial_dst_cid_provider: Arc<dyn Fn() -> quinn::ConnectionId + Send + Sync>,
    /// The server's address-validation and retry token key, derived from the seed.
    pub token_key: Arc<dyn quinn::crypto::HandshakeTokenKey>,
    /// The simulated wall clock, for token issue times.
    pub time_source: Arc<dyn quinn::TimeSource>,
}

impl fmt::Debug for QuinnSeams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuinnSeams")
            .field("endpoint_config", &self.endpoint_config)
            .finish_non_exhaustive()
    }
}

/// The quinn seams for the node with this seed (see [`QuinnSeams`] for where each one goes).
pub fn quinn_seams(seed: u64) -> QuinnSeams {
    let reset_key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &derive(seed, "weft-sim quinn stateless reset key"),
    );
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.rng_seed(Some(derive(seed, "weft-sim quinn endpoint rng")));
    // The factory runs once per endpoint; each endpoint gets its own generator so that two
    // endpoints built from one config do not issue the same ids.
    let generator_seeds = Mutex::new(derive_generator(seed, "weft-sim quinn local cids"));
    endpoint_config.cid_generator(move || {
        let seed = generator_seeds
            .lock()
            .expect("cid generator seeds mutex poisoned")
            .next_u64();
        Box::new(SeededConnectionIdGenerator {
            generator: SplitMix64::new(seed),
        })
    });

    let initial_dst_cids = Mutex::new(derive_generator(seed, "weft-sim quinn initial dst cids"));
    let initial_dst_cid_provider = Arc::new(move || {
        let mut bytes = [0u8; INITIAL_DST_CID_LEN];
        initial_dst_cids
            .lock()
            .expect("initial dst cid generator mutex poisoned")
            .fill(&mut bytes);
        quinn::ConnectionId::new(&bytes)
    });

    let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[])
        .extract(&derive(seed, "weft-sim quinn token key"));

    QuinnSeams {
        endpoint_config,
        initial_dst_cid_provider,
        token_key: Arc::new(token_key),
        time_source: Arc::new(SimulatedClock),
    }
}

/// Connection ids from a seeded generator (quinn's generators draw from the OS).
#[derive(Debug)]
struct SeededConnectionIdGenerator {
    generator: SplitMix64,
}

impl quinn::ConnectionIdGenerator for SeededConnectionIdGenerator {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; LOCAL_CID_LEN];
        self.generator.fill(&mut bytes);
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        LOCAL_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The wall clock of a simulation: [`SIMULATED_EPOCH_UNIX_SECS`] plus turmoil's simulated elapsed
/// time (just the epoch outside a simulation).
///
/// quinn and rustls read `SystemTime::now()` for token issue times and session-ticket ages, which
/// end up on the wire; this clock makes those bytes a function of the seed. turmoil's own
/// `since_epoch` starts at the real time unless the builder sets an epoch, so it is not used.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimulatedClock;

impl SimulatedClock {
    /// Time since the Unix epoch on the simulated clock.
    pub fn since_unix_epoch(&self) -> Duration {
        Duration::from_secs(SIMULATED_EPOCH_UNIX_SECS) + turmoil::sim_elapsed().unwrap_or_default()
    }
}

impl quinn::TimeSource for SimulatedClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + self.since_unix_epoch()
    }
}

impl rustls::time_provider::TimeProvider for SimulatedClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(self.since_unix_epoch()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::TurmoilUdpSocket;
    use quinn::{
        crypto::rustls::{QuicClientConfig, QuicServerConfig},
        udp::{RecvMeta, Transmit},
        AsyncUdpSocket,
    };
    use rustls::{
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::WebPkiSupportedAlgorithms,
        pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer},
        sign::CertifiedKey,
        DigitallySignedStruct, SignatureScheme,
    };
    use std::{
        io::{self, IoSliceMut},
        net::{Ipv4Addr, SocketAddr},
        pin::Pin,
        task::{Context, Poll},
    };

    type Datagrams = Arc<Mutex<Vec<[u8; 32]>>>;

    const SERVER_PORT: u16 = 4433;
    const CONNECTIONS: usize = 2;
    const MESSAGES: u8 = 4;
    const MESSAGE_LEN: usize = 700;

    /// Records a blake3 hash of every datagram (with its sender and destination) before sending.
    #[derive(Debug)]
    struct RecordingSocket {
        inner: Arc<TurmoilUdpSocket>,
        datagrams: Datagrams,
    }

    impl AsyncUdpSocket for RecordingSocket {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
            Arc::clone(&self.inner).create_io_poller()
        }

        fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
            let mut hasher = blake3::Hasher::new();
            hasher.update(self.inner.local_addr()?.to_string().as_bytes());
            hasher.update(transmit.destination.to_string().as_bytes());
            hasher.update(&transmit.segment_size.unwrap_or(0).to_le_bytes());
            hasher.update(transmit.contents);
            self.datagrams
                .lock()
                .expect("datagram log poisoned")
                .push(*hasher.finalize().as_bytes());
            self.inner.try_send(transmit)
        }

        fn poll_recv(
            &self,
            cx: &mut Context,
            bufs: &mut [IoSliceMut<'_>],
            meta: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            self.inner.poll_recv(cx, bufs, meta)
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.inner.local_addr()
        }

        fn may_fragment(&self) -> bool {
            self.inner.may_fragment()
        }
    }

    /// An Ed25519 raw-public-key identity derived from `seed` (PKCS#8 v1 around the seed).
    fn identity(seed: u64) -> Arc<CertifiedKey> {
        const PKCS8_V1_ED25519_PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let mut pkcs8 = PKCS8_V1_ED25519_PREFIX.to_vec();
        pkcs8.extend_from_slice(&derive(seed, "weft-sim test identity"));
        let key = rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(pkcs8))
            .expect("valid Ed25519 PKCS#8");
        let spki = key.public_key().expect("Ed25519 keys have an SPKI");
        Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(spki.to_vec())],
            key,
        ))
    }

    /// Accepts any server raw public key whose handshake signature checks out: plumbing only.
    #[derive(Debug)]
    struct AcceptAnyRawKey {
        algorithms: WebPkiSupportedAlgorithms,
    }

    impl ServerCertVerifier for AcceptAnyRawKey {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is never offered".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature_with_raw_key(
                message,
                &SubjectPublicKeyInfoDer::from(cert.as_ref()),
                dss,
                &self.algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }

        fn requires_raw_public_keys(&self) -> bool {
            true
        }
    }

    fn transport() -> Arc<quinn::TransportConfig> {
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(Duration::from_secs(10).try_into().expect("small")))
            .keep_alive_interval(Some(Duration::from_secs(1)));
        Arc::new(transport)
    }

    fn server_config(seed: u64, seams: &QuinnSeams) -> quinn::ServerConfig {
        let tls = rustls::ServerConfig::builder_with_details(
            crypto_provider(seed),
            Arc::new(SimulatedClock),
        )
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(identity(seed)),
        ));
        let crypto = QuicServerConfig::try_from(tls).expect("QUIC-compatible TLS config");
        let mut config = quinn::ServerConfig::new(Arc::new(crypto), Arc::clone(&seams.token_key));
        config
            .time_source(Arc::clone(&seams.time_source))
            .transport_config(transport());
        config
    }

    fn client_config(seed: u64, seams: &QuinnSeams) -> quinn::ClientConfig {
        let provider = crypto_provider(seed);
        let verifier = AcceptAnyRawKey {
            algorithms: provider.signature_verification_algorithms,
        };
        let tls = rustls::ClientConfig::builder_with_details(provider, Arc::new(SimulatedClock))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is supported")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let crypto = QuicClientConfig::try_from(tls).expect("QUIC-compatible TLS config");
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config
            .initial_dst_cid_provider(Arc::clone(&seams.initial_dst_cid_provider))
            .transport_config(transport());
        config
    }

    /// One simulated run: twice, a client connects (after a Retry), echoes a few messages off a
    /// server over one bi stream and closes. Returns the hash of every datagram sent by either
    /// side, in sending order.
    fn run(seed: u64) -> Vec<[u8; 32]> {
        let datagrams = Datagrams::default();
        let mut node_seeds = SplitMix64::new(seed);
        let server_seed = node_seeds.next_u64();
        let client_seed = node_seeds.next_u64();

        let mut sim = turmoil::Builder::new()
            .rng_seed(seed)
            .simulation_duration(Duration::from_secs(60))
            .min_message_latency(Duration::from_millis(5))
            .max_message_latency(Duration::from_millis(5))
            .build();

        let server_datagrams = Arc::clone(&datagrams);
        sim.host("server", move || {
            let datagrams = Arc::clone(&server_datagrams);
            async move {
                let socket = Arc::new(RecordingSocket {
                    inner: TurmoilUdpSocket::bind((Ipv4Addr::UNSPECIFIED, SERVER_PORT).into())
                        .await?,
                    datagrams,
                });
                let seams = quinn_seams(server_seed);
                let endpoint = quinn::Endpoint::new_with_abstract_socket(
                    seams.endpoint_config.clone(),
                    Some(server_config(server_seed, &seams)),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )?;
                while let Some(incoming) = endpoint.accept().await {
                    // A Retry round trip puts the token key, the clock and the endpoint rng on the
                    // wire.
                    if !incoming.remote_address_validated() {
                        incoming.retry()?;
                        continue;
                    }
                    let connection = incoming.await?;
                    let (mut send, mut recv) = connection.accept_bi().await?;
                    let mut message = [0u8; MESSAGE_LEN];
                    loop {
                        match recv.read_exact(&mut message).await {
                            Ok(()) => send.write_all(&message).await?,
                            Err(quinn::ReadExactError::FinishedEarly(0)) => break,
                            Err(error) => return Err(error.into()),
                        }
                    }
                    send.finish()?;
                    connection.closed().await;
                }
                Ok(())
            }
        });

        let client_datagrams = Arc::clone(&datagrams);
        sim.client("client", async move {
            let socket = Arc::new(RecordingSocket {
                inner: TurmoilUdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0).into()).await?,
                datagrams: client_datagrams,
            });
            let seams = quinn_seams(client_seed);
            let endpoint = quinn::Endpoint::new_with_abstract_socket(
                seams.endpoint_config.clone(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )?;
            let server = SocketAddr::new(turmoil::lookup("server"), SERVER_PORT);
            // One config for both connections, so the second can resume the first's TLS session,
            // which puts ticket ages (the rustls clock) on the wire.
            let config = client_config(client_seed, &seams);
            for _ in 0..CONNECTIONS {
                let connection = endpoint
                    .connect_with(config.clone(), server, "server")?
                    .await?;
                let (mut send, mut recv) = connection.open_bi().await?;
                for index in 0..MESSAGES {
                    let message = [index; MESSAGE_LEN];
                    send.write_all(&message).await?;
                    let mut echo = [0u8; MESSAGE_LEN];
                    recv.read_exact(&mut echo).await?;
                    assert_eq!(echo, message);
                }
                send.finish()?;
                assert!(recv.read_to_end(0).await?.is_empty());
                connection.close(0u32.into(), b"done");
                connection.closed().await;
            }
            endpoint.wait_idle().await;
            Ok(())
        });

        sim.run().expect("simulation failed");
        let datagrams = datagrams.lock().expect("datagram log poisoned");
        datagrams.clone()
    }

    #[test]
    fn same_seed_sends_identical_datagrams_and_another_seed_does_not() {
        let first = run(7);
        let second = run(7);
        let other = run(8);

        // Two handshakes with Retry, eight echoes, acks and closes: far more than a handful.
        assert!(first.len() > 10, "only {} datagrams", first.len());
        if let Some(index) =
            (0..first.len().max(second.len())).find(|&index| first.get(index) != second.get(index))
        {
            panic!(
                "same seed diverged at datagram {index} of {}/{}",
                first.len(),
                second.len()
            );
        }
        assert_ne!(first, other, "another seed sent the same datagrams");
    }

    #[test]
    fn seeded_x25519_agrees_and_repeats() {
        let group = SeededX25519 {
            generator: Mutex::new(SplitMix64::new(1)),
        };
        let alice = group.start().expect("start");
        let bob = group.start().expect("start");
        assert_ne!(alice.pub_key(), bob.pub_key());
        let alice_public = alice.pub_key().to_vec();
        let bob_public = bob.pub_key().to_vec();
        let alice_secret = alice.complete(&bob_public).expect("complete");
        let bob_secret = bob.complete(&alice_public).expect("complete");
        assert_eq!(alice_secret.secret_bytes(), bob_secret.secret_bytes());
        assert!(group.start().expect("start").complete(&[0u8; 32]).is_err());
        assert!(group.start().expect("start").complete(&[9u8; 31]).is_err());

        let replay = SeededX25519 {
            generator: Mutex::new(SplitMix64::new(1)),
        };
        assert_eq!(replay.start().expect("start").pub_key(), &alice_public[..]);
    }
}
