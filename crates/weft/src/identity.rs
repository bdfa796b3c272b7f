//! A node's long-term identity: one Ed25519 key pair, kept in `<data dir>/node.key`.
//!
//! The public key *is* the node id ([`NodeId`]): the TLS handshake proves possession of the secret
//! key (see [`crate::tls`]), so peers never need a certificate authority or a name to trust. That
//! makes the key file precious: losing it changes the node's identity, and leaking it lets anyone
//! impersonate the node. Hence the rules in [`Identity::load_or_create`]: written once, atomically,
//! readable by the owner only, and never overwritten, even when it looks broken.
//!
//! # File format
//!
//! `node.key` holds the 48-byte PKCS#8 v1 DER document of RFC 8410 (the same bytes that
//! `openssl genpkey -algorithm ed25519 -outform DER` writes), so standard tools can inspect it:
//! `openssl pkey -inform DER -in node.key -pubout`. rustls takes the same document as its private
//! key, so no conversion happens at start-up.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use weft_proto::id::{NodeId, NODE_ID_LEN};

/// Name of the key file inside the data directory.
pub const KEY_FILE_NAME: &str = "node.key";

/// Length of an Ed25519 seed (the secret key) in bytes.
pub const SEED_LEN: usize = 32;

/// The fixed DER header of an Ed25519 PKCS#8 v1 document (RFC 8410 section 7): SEQUENCE, version 0,
/// AlgorithmIdentifier id-Ed25519 (1.3.101.112), then an OCTET STRING wrapping the 32-byte seed.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Length of the PKCS#8 document, and therefore of a valid key file.
pub const PKCS8_LEN: usize = PKCS8_V1_PREFIX.len() + SEED_LEN;

/// The fixed DER header of an Ed25519 SubjectPublicKeyInfo (RFC 8410 section 4): SEQUENCE,
/// AlgorithmIdentifier id-Ed25519, then a BIT STRING with no unused bits holding the 32-byte key.
/// With raw public keys (RFC 7250) this document is exactly what a peer sends in place of a
/// certificate.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Length of an Ed25519 SubjectPublicKeyInfo document.
pub const SPKI_LEN: usize = SPKI_PREFIX.len() + NODE_ID_LEN;

/// Permission bits that must be clear on the key file: any access by group or others.
const GROUP_OTHER_MODE_BITS: u32 = 0o077;

/// How many bytes of a key file are read at most: a valid file is [`PKCS8_LEN`] bytes, so one
/// more is enough to tell that a file is too long without reading a large file into memory.
const KEY_FILE_READ_MAX: u64 = PKCS8_LEN as u64 + 1;

/// A node's Ed25519 key pair, ready for TLS.
///
/// The secret is kept once, as the seed inside its PKCS#8 document: one copy in memory, and the
/// exact bytes that rustls loads and the key file stores. `Clone` is cheap (80 bytes). `Debug`
/// prints the node id only, never the secret, so an identity can sit in structs that are logged.
#[derive(Clone)]
pub struct Identity {
    /// The public key, computed once because every log line and handshake needs it.
    node_id: NodeId,
    /// The secret key (the 32-byte seed everything derives from) wrapped as PKCS#8 v1.
    pkcs8: [u8; PKCS8_LEN],
}

impl Identity {
    /// Creates a fresh identity from the operating system's random number generator.
    ///
    /// # Errors
    /// [`IdentityError::Random`] if the OS cannot provide randomness.
    pub fn generate() -> Result<Identity, IdentityError> {
        let mut seed = [0u8; SEED_LEN];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| IdentityError::Random)?;
        Ok(Identity::from_seed(seed))
    }

    /// Builds the identity whose secret key is `seed`.
    ///
    /// Ed25519 key derivation and signatures are deterministic, so the simulation derives every
    /// node's seed from its run seed and gets the same node ids, and the same handshake bytes, on
    /// every run.
    pub fn from_seed(seed: [u8; SEED_LEN]) -> Identity {
        // ring only rejects seeds of the wrong length, which the array type rules out.
        let key_pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .expect("every 32-byte seed is a valid Ed25519 secret key");
        let mut public = [0u8; NODE_ID_LEN];
        public.copy_from_slice(key_pair.public_key().as_ref());
        let mut pkcs8 = [0u8; PKCS8_LEN];
        pkcs8[..PKCS8_V1_PREFIX.len()].copy_from_slice(&PKCS8_V1_PREFIX);
        pkcs8[PKCS8_V1_PREFIX.len()..].copy_from_slice(&seed);
        Identity {
            node_id: NodeId::from_bytes(public),
            pkcs8,
        }
    }

    /// Loads the identity kept in `<data_dir>/node.key`, or creates it on first start.
    ///
    /// On first start the directory is created if needed (mode 0700 for directories this call
    /// creates) and a new key is written to a temporary file with mode 0600, flushed to disk, then
    /// linked into place and the directory flushed, so a crash leaves either no key file or a
    /// complete one. If another process creates the file at the same moment, its key wins and is
    /// loaded.
    ///
    /// On later starts the file is read back. A file that is not a valid key is reported, never
    /// replaced: replacing it would silently give the node a new identity.
    ///
    /// # Errors
    /// - [`IdentityError::PermissionsTooOpen`] if group or others may access the key file;
    /// - [`IdentityError::InvalidKey`] if the file is not a 48-byte Ed25519 PKCS#8 document;
    /// - [`IdentityError::CreateDirectory`], [`IdentityError::Read`], [`IdentityError::Write`] for
    ///   I/O failures, [`IdentityError::Random`] if no randomness is available.
    pub fn load_or_create(data_dir: &Path) -> Result<Identity, IdentityError> {
        let path = data_dir.join(KEY_FILE_NAME);
        match fs::symlink_metadata(&path) {
            Ok(_) => Identity::load(&path),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Identity::create(data_dir, &path)
            }
            Err(source) => Err(IdentityError::Read { path, source }),
        }
    }

    /// The node id: the Ed25519 public key.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The secret key as a PKCS#8 v1 DER document, the form rustls loads.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The secret key as rustls' private key type, for
    /// [`KeyProvider::load_private_key`](rustls::crypto::KeyProvider::load_private_key).
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.to_vec()))
    }

    /// The public key as a SubjectPublicKeyInfo DER document: what this node presents in the TLS
    /// handshake in place of a certificate (RFC 7250 raw public key).
    pub fn spki_der(&self) -> Vec<u8> {
        spki_der(&self.node_id)
    }

    /// Reads and checks an existing key file.
    fn load(path: &Path) -> Result<Identity, IdentityError> {
        let read_error = |source| IdentityError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_error)?;
        // Metadata from the open handle describes the file we read, not whatever sits at the path
        // by now.
        let metadata = file.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(IdentityError::InvalidKey {
                path: path.to_path_buf(),
                reason: "it is not a regular file".to_owned(),
            });
        }
        let mode = metadata.permissions().mode();
        if mode & GROUP_OTHER_MODE_BITS != 0 {
            return Err(IdentityError::PermissionsTooOpen {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        let mut bytes = Vec::with_capacity(PKCS8_LEN);
        file.take(KEY_FILE_READ_MAX)
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        let seed = parse_pkcs8(&bytes).map_err(|reason| IdentityError::InvalidKey {
            path: path.to_path_buf(),
            reason,
        })?;
        let identity = Identity::from_seed(seed);
        tracing::debug!(
            node_id = %identity.node_id,
            path = %path.display(),
            "loaded node identity"
        );
        Ok(identity)
    }

    /// Writes a new key file; see [`Identity::load_or_create`] for the steps and why.
    fn create(data_dir: &Path, path: &Path) -> Result<Identity, IdentityError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|source| IdentityError::CreateDirectory {
                path: data_dir.to_path_buf(),
                source,
            })?;
        let identity = Identity::generate()?;

        // The process id keeps two processes sharing a data directory off each other's file.
        let temporary = data_dir.join(format!("{KEY_FILE_NAME}.tmp.{}", std::process::id()));
        let write_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Write { path, source }
        };
        // A leftover from a crash of an earlier process with the same id would make `create_new`
        // fail; it never became the key file, so it is safe to drop.
        match fs::remove_file(&temporary) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(write_error(&temporary)(source)),
        }
        // `mode` applies at creation, so the secret is never readable by others, not even for a
        // moment; the umask can only remove bits.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(write_error(&temporary))?;
        file.write_all(identity.pkcs8_der())
            .and_then(|()| file.sync_all())
            .map_err(write_error(&temporary))?;
        drop(file);

        // `hard_link` fails if the key file appeared meanwhile, where `rename` would replace it.
        let linked = fs::hard_link(&temporary, path);
        let outcome = match linked {
            Ok(()) => Ok(identity),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                tracing::info!(
                    path = %path.display(),
                    "another process created the node key first; using it"
                );
                Identity::load(path)
            }
            // File systems without hard links: fall back to rename, which is atomic too.
            Err(_) => fs::rename(&temporary, path)
                .map(|()| identity)
                .map_err(write_error(path)),
        };
        match fs::remove_file(&temporary) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(
                    path = %temporary.display(),
                    %error,
                    "cannot remove temporary key file"
                );
            }
        }
        let identity = outcome?;
        File::open(data_dir)
            .and_then(|directory| directory.sync_all())
            .map_err(write_error(data_dir))?;
        tracing::info!(
            node_id = %identity.node_id,
            path = %path.display(),
            "created a new node identity"
        );
        Ok(identity)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// The SubjectPublicKeyInfo DER document of `node_id`'s Ed25519 key.
pub fn spki_der(node_id: &NodeId) -> Vec<u8> {
    let mut spki = Vec::with_capacity(SPKI_LEN);
    spki.extend_from_slice(&SPKI_PREFIX);
    spki.extend_from_slice(node_id.as_bytes());
    spki
}

/// The node id in an Ed25519 SubjectPublicKeyInfo DER document, or `None` if `spki` is anything
/// else (another key type, trailing bytes, a truncated document).
///
/// Ed25519 has exactly one DER encoding of its SubjectPublicKeyInfo, so a byte comparison is a
/// complete parse: no ASN.1 parser touches bytes a peer chose.
pub fn node_id_from_spki(spki: &[u8]) -> Option<NodeId> {
    let key = spki.strip_prefix(SPKI_PREFIX.as_slice())?;
    let key: [u8; NODE_ID_LEN] = key.try_into().ok()?;
    Some(NodeId::from_bytes(key))
}

/// The seed inside a key file's bytes, or why they are not a key.
fn parse_pkcs8(bytes: &[u8]) -> Result<[u8; SEED_LEN], String> {
    if bytes.len() > PKCS8_LEN {
        return Err(format!(
            "it is longer than the {PKCS8_LEN} bytes of a node key"
        ));
    }
    if bytes.len() < PKCS8_LEN {
        return Err(format!(
            "it holds {} bytes, a node key holds {PKCS8_LEN}",
            bytes.len()
        ));
    }
    let seed = bytes
        .strip_prefix(PKCS8_V1_PREFIX.as_slice())
        .ok_or_else(|| "it is not an Ed25519 PKCS#8 v1 document".to_owned())?;
    seed.try_into()
        .map_err(|_| "it is not an Ed25519 PKCS#8 v1 document".to_owned())
}

/// Why a node identity cannot be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed; check that getrandom or /dev/urandom works in this environment")]
    Random,
    /// The data directory does not exist and cannot be created.
    #[error("cannot create the data directory {}; check that its parent exists and this user may write to it", .path.display())]
    CreateDirectory {
        /// The directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The key file exists but cannot be read.
    #[error("cannot read the node key file {}; check that this user owns it and may read it", .path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// A new key file cannot be written.
    #[error("cannot write the node key file {}; check that the data directory is writable and the disk is not full", .path.display())]
    Write {
        /// The file or directory that failed.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The key file holds something other than a node key. It is left untouched: replacing it
    /// would give the node a new identity.
    #[error("{} is not a valid node key ({reason}); restore the original file, or move it away to start this node with a new identity", .path.display())]
    InvalidKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its content.
        reason: String,
    },
    /// Group or others may access the key file, so another user could read the secret key and
    /// impersonate the node.
    #[error("the node key file {} has mode {mode:03o}, which lets other users read the secret key; run `chmod 600 {}`", .path.display(), .path.display())]
    PermissionsTooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "weft-identity-{name}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn create_then_load_gives_the_same_identity() {
        let dir = TempDir::new("round-trip");
        let data_dir = dir.0.join("nested").join("data");
        let created = Identity::load_or_create(&data_dir).unwrap();
        let loaded = Identity::load_or_create(&data_dir).unwrap();
        assert_eq!(created.node_id(), loaded.node_id());
        assert_eq!(created.pkcs8_der(), loaded.pkcs8_der());
        let path = data_dir.join(KEY_FILE_NAME);
        assert_eq!(fs::read(&path).unwrap(), created.pkcs8_der());
        // Only the key file is left behind, no temporary file.
        let entries: Vec<_> = fs::read_dir(&data_dir).unwrap().collect();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn key_file_has_mode_0600_and_new_directory_0700() {
        let dir = TempDir::new("mode");
        Identity::load_or_create(&dir.0).unwrap();
        let mode = fs::metadata(dir.0.join(KEY_FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&dir.0).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
    }

    #[test]
    fn corrupt_key_file_is_a_typed_error_and_is_not_overwritten() {
        let dir = TempDir::new("corrupt");
        fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join(KEY_FILE_NAME);
        for content in [
            b"not a key".to_vec(),
            vec![0u8; PKCS8_LEN],
            vec![0u8; 10_000],
            Vec::new(),
        ] {
            fs::write(&path, &content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let error = Identity::load_or_create(&dir.0).unwrap_err();
            match &error {
                IdentityError::InvalidKey { path: reported, .. } => assert_eq!(reported, &path),
                other => panic!("expected InvalidKey, got {other:?}"),
            }
            assert!(error.to_string().contains(&path.display().to_string()));
            assert_eq!(
                fs::read(&path).unwrap(),
                content,
                "the file must be left alone"
            );
        }
    }

    #[test]
    fn key_file_readable_by_others_is_a_typed_error() {
        let dir = TempDir::new("open-mode");
        let created = Identity::load_or_create(&dir.0).unwrap();
        let path = dir.0.join(KEY_FILE_NAME);
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let error = Identity::load_or_create(&dir.0).unwrap_err();
            let reported = match &error {
                IdentityError::PermissionsTooOpen { mode, .. } => *mode,
                other => panic!("expected PermissionsTooOpen, got {other:?}"),
            };
            assert_eq!(reported, mode);
            let message = error.to_string();
            assert!(
                message.contains(&format!("chmod 600 {}", path.display())),
                "{message}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        let loaded = Identity::load_or_create(&dir.0).unwrap();
        assert_eq!(loaded.node_id(), created.node_id());
    }

    #[test]
    fn from_seed_is_deterministic_and_matches_rfc_8032() {
        // RFC 8032 section 7.1, test 1.
        let seed: [u8; 32] =
            hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .try_into()
                .unwrap();
        let public = hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let identity = Identity::from_seed(seed);
        assert_eq!(identity.node_id().as_bytes().as_slice(), public.as_slice());
        assert_eq!(Identity::from_seed(seed).node_id(), identity.node_id());
        assert_ne!(Identity::from_seed([7; 32]).node_id(), identity.node_id());
    }

    #[test]
    fn generate_gives_distinct_identities() {
        let first = Identity::generate().unwrap();
        let second = Identity::generate().unwrap();
        assert_ne!(first.node_id(), second.node_id());
    }

    #[test]
    fn rustls_and_ring_accept_the_pkcs8_document() {
        let identity = Identity::from_seed([42; 32]);
        let PrivateKeyDer::Pkcs8(pkcs8) = identity.private_key_der() else {
            panic!("expected PKCS#8");
        };
        let signing_key = rustls::crypto::ring::sign::any_eddsa_type(&pkcs8).unwrap();
        assert_eq!(signing_key.algorithm(), rustls::SignatureAlgorithm::ED25519);
        let spki = signing_key.public_key().unwrap();
        assert_eq!(spki.as_ref(), identity.spki_der().as_slice());
        // The provider's generic loader, which the TLS configs use, accepts it too.
        rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(identity.private_key_der())
            .unwrap();
        // ring's strict parser too, so the key file is a standard document.
        let key_pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(identity.pkcs8_der()).unwrap();
        assert_eq!(
            key_pair.public_key().as_ref(),
            identity.node_id().as_bytes().as_slice()
        );
    }

    #[test]
    fn spki_round_trips_and_rejects_other_documents() {
        let identity = Identity::from_seed([3; 32]);
        let spki = identity.spki_der();
        assert_eq!(spki.len(), SPKI_LEN);
        assert_eq!(node_id_from_spki(&spki), Some(identity.node_id()));
        assert_eq!(node_id_from_spki(&spki[..SPKI_LEN - 1]), None);
        let mut longer = spki.clone();
        longer.push(0);
        assert_eq!(node_id_from_spki(&longer), None);
        let mut other_algorithm = spki.clone();
        other_algorithm[8] = 0x71; // id-Ed448
        assert_eq!(node_id_from_spki(&other_algorithm), None);
        assert_eq!(node_id_from_spki(&[]), None);
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let identity = Identity::from_seed([0xab; 32]);
        let text = format!("{identity:?}");
        assert!(text.contains("node_id"), "{text}");
        assert!(!text.contains("171"), "{text}"); // 0xab in decimal
        assert!(!text.to_lowercase().contains("abab"), "{text}");
        assert!(!text.contains("seed") && !text.contains("pkcs8"), "{text}");
    }
}
