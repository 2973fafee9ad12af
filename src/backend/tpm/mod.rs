//! The TPM 2.0 backend: keys generated inside a TPM, kept outside it only as TPM-wrapped blobs.
//!
//! Each key is made with TPM2_Create under the storage root key (SRK) and never leaves the TPM in
//! clear. What TPM2_Create returns (the public area and the private part, which the TPM encrypted
//! under the SRK) goes into the key's record as its blob, with the key's random authValue sealed
//! under a key derived from the store's root secret (`blob.rs`). Nothing is stored in the TPM: each
//! operation loads the key from its blob, uses it, and flushes it.
//!
//! All commands go through one ESAPI context and one salted HMAC session with parameter encryption
//! (`connection.rs`). When the connection to the TPM is lost (the TPM was killed or reset), the
//! context, SRK and session are rebuilt on the next call; the SRK's Name must not change, or the TPM
//! was cleared or replaced and its keys are gone.
//!
//! Messages are hashed in software; the TPM signs the digest.

mod blob;
mod connection;
mod errors;
#[cfg(feature = "testing")]
pub mod fixture;
mod templates;

use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, OnceLock};

use aws_lc_rs::aead::{RandomizedNonceKey, AES_256_GCM};
use aws_lc_rs::digest;
use tss_esapi::structures::Signature;
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

use self::connection::{Connection, Features};
use self::errors::{During, Failure};
use crate::backend::{
    Backend, BackendReport, Capabilities, GeneratedKey, KeyContext, KeyOptions, KeyRef, Sealed,
};
use crate::der;
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyType, Purpose, SignatureFormat};
use crate::public_key::PublicKey;
use crate::secret::SecretBytes;

/// The most bytes one TPM2_HMAC command takes (`TPM2B_MAX_BUFFER`, 1024 on every TPM seen).
/// tss-esapi 7.7 does not wrap the HMAC sequence commands, so this is the backend's limit.
pub const MAX_HMAC_INPUT: usize = 1024;

/// Signed once after generation, to prove the blob loads with its sealed authValue.
const PCT_MESSAGE: &[u8] = b"keyhold TPM pairwise consistency test";

/// A TPM 2.0 as a keyhold backend.
pub struct TpmBackend {
    name: String,
    tcti: String,
    tcti_conf: TctiNameConf,
    /// Seals each key's authValue in its blob.
    auth_kek: RandomizedNonceKey,
    /// The SRK's Name when the backend was made: every reconnection must find the same.
    srk_name: Vec<u8>,
    /// The one connection, `None` after it was lost. An ESAPI context must never be used by two
    /// threads at once (every tss-esapi method takes `&mut self`), and without a resource manager
    /// (swtpm, `/dev/tpm0`) there may be only one per TPM anyway: callers take turns, the way
    /// Parsec serialises its TPM provider.
    connection: Mutex<Option<Connection>>,
    features: OnceLock<Features>,
}

impl std::fmt::Debug for TpmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmBackend")
            .field("name", &self.name)
            .field("tcti", &self.tcti)
            .field("srk_name", &crate::hex::encode(&self.srk_name))
            .finish_non_exhaustive()
    }
}

/// Parses a TCTI string, refusing those tss-esapi 7.7 would misread.
fn parse_tcti(tcti: &str) -> Result<TctiNameConf> {
    let tcti = tcti.trim();
    if let Some(options) = tcti
        .strip_prefix("swtpm:")
        .or_else(|| tcti.strip_prefix("mssim:"))
    {
        // tss-esapi 7.7 reads only host= and port= and silently ignores anything else: with
        // `path=` it would connect to localhost:2321 instead of the socket named.
        if let Some(bad) = options
            .split(',')
            .find(|o| !o.is_empty() && !o.starts_with("host=") && !o.starts_with("port="))
        {
            let hint = if bad.starts_with("path=") {
                "tss-esapi 7.7 cannot use a Unix socket and would connect to localhost:2321 \
                 instead: run swtpm with `--server type=tcp,port=P --ctrl type=tcp,port=P+1` and \
                 use `swtpm:host=127.0.0.1,port=P`"
            } else {
                "only `host=` and `port=` are understood"
            };
            return Err(Error::Config(format!(
                "TCTI `{tcti}`: option `{bad}` is not supported: {hint}"
            )));
        }
    }
    TctiNameConf::from_str(tcti).map_err(|e| {
        Error::Config(format!(
            "TCTI `{tcti}` is not understood ({e}): use `device:/dev/tpmrm0`, `tabrmd` or \
             `swtpm:host=H,port=P`"
        ))
    })
}

impl TpmBackend {
    /// Connects to the TPM at `tcti` (`device:/dev/tpmrm0`, `tabrmd`, `swtpm:host=H,port=P`),
    /// checks its self-test result, makes the SRK and starts the session. `auth_kek` (32 bytes,
    /// derived from the store's root secret) seals the keys' authValues.
    ///
    /// # Errors
    /// [`Error::Config`] for a TCTI keyhold cannot use (`swtpm:path=…`) or a KEK that is not 32
    /// bytes; [`Error::BackendUnavailable`] if the TPM cannot be reached or failed its self-test.
    pub fn new(name: &str, tcti: &str, auth_kek: &SecretBytes) -> Result<Self> {
        let tcti_conf = parse_tcti(tcti)?;
        if auth_kek.len() != 32 {
            return Err(Error::Config(format!(
                "the TPM backend's key-encryption key must be 32 bytes, not {}",
                auth_kek.len()
            )));
        }
        let auth_kek = RandomizedNonceKey::new(&AES_256_GCM, auth_kek.expose())
            .map_err(|_| Error::crypto("load the TPM key-encryption key"))?;
        let connection =
            Connection::open(&tcti_conf).map_err(|f| errors::map_connect(name, tcti.trim(), f))?;
        Ok(Self {
            name: name.to_owned(),
            tcti: tcti.trim().to_owned(),
            tcti_conf,
            auth_kek,
            srk_name: connection.srk_name().to_vec(),
            connection: Mutex::new(Some(connection)),
            features: OnceLock::new(),
        })
    }

    /// The Name of this TPM's SRK (hex in reports): it identifies the TPM's owner seed.
    pub fn srk_name(&self) -> &[u8] {
        &self.srk_name
    }

    /// How many transient objects the TPM holds now (the SRK included): with keyhold alone on the
    /// TPM, one between operations.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if the TPM cannot be reached.
    pub fn transient_handles(&self) -> Result<usize> {
        self.run(Connection::transient_handles)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Connection>> {
        self.connection.lock().unwrap_or_else(|poisoned| {
            // A thread panicked mid-command: the context's state is unknown, so start afresh.
            let mut slot = poisoned.into_inner();
            *slot = None;
            self.connection.clear_poison();
            slot
        })
    }

    /// A new connection, checked to reach the same TPM as before.
    fn connect(&self) -> Result<Connection> {
        let connection = Connection::open(&self.tcti_conf)
            .map_err(|f| errors::map_connect(&self.name, &self.tcti, f))?;
        if connection.srk_name() != self.srk_name.as_slice() {
            return Err(Error::BackendUnavailable {
                backend: self.name.clone(),
                reason: format!(
                    "the TPM at `{}` has a different storage root key (Name {} instead of {}): the \
                     TPM was cleared or replaced, and keys made on the old one cannot be used",
                    self.tcti,
                    crate::hex::encode(connection.srk_name()),
                    crate::hex::encode(&self.srk_name)
                ),
            });
        }
        tracing::info!(backend = %self.name, "reconnected to the TPM");
        Ok(connection)
    }

    /// Runs `op` on the connection, connecting first if the last one was lost.
    ///
    /// A lost connection, or a TPM that was reset and lost the SRK and session, is rebuilt and `op`
    /// run once more: the blobs reload under the re-created SRK. If the TPM is still not
    /// there, the error is [`Error::BackendUnavailable`]. Nothing else is retried: in particular
    /// not a refused authorisation, which would count towards a dictionary-attack lockout.
    fn run<T>(&self, mut op: impl FnMut(&mut Connection) -> Result<T, Failure>) -> Result<T> {
        let mut slot = self.lock();
        let mut lost = None;
        for _attempt in 0..2 {
            let connection = match slot.as_mut() {
                Some(c) => c,
                None => slot.insert(self.connect()?),
            };
            match op(connection) {
                Ok(value) => return Ok(value),
                Err(failure)
                    if errors::is_disconnect(failure.error) || errors::is_reset(failure.error) =>
                {
                    tracing::warn!(
                        backend = %self.name,
                        "lost the TPM connection or its objects ({}); reconnecting",
                        failure.command
                    );
                    if let Some(stale) = slot.take() {
                        stale.abandon();
                    }
                    lost = Some(failure);
                }
                Err(failure) => return Err(errors::map(&self.name, failure)),
            }
        }
        Err(match lost {
            Some(failure) => errors::map(&self.name, failure),
            None => Error::crypto("TPM retry loop"),
        })
    }

    fn features(&self) -> Result<Features> {
        if let Some(f) = self.features.get() {
            return Ok(*f);
        }
        let features = self.run(Connection::features)?;
        Ok(*self.features.get_or_init(|| features))
    }

    /// Loads the key in `blob` (sealed for `context`) and runs `op` on it; always flushed after.
    fn with_key<T>(
        &self,
        context: &KeyContext<'_>,
        blob: &[u8],
        mut op: impl FnMut(&mut connection::Loaded<'_>) -> Result<T, Failure>,
    ) -> Result<T> {
        let parts = blob::parse(blob)?;
        let auth = parts.auth(&self.auth_kek, context)?;
        self.run(|connection| {
            let mut loaded = connection.load(parts.public, parts.private, &auth)?;
            op(&mut loaded)
        })
    }

    fn key_blob<'k>(&self, key: &KeyRef<'k>) -> Result<&'k [u8]> {
        key.blob.ok_or_else(|| Error::Integrity {
            what: format!(
                "the record of TPM key `{}` has no key blob",
                key.context.label
            ),
        })
    }

    fn sign_blob(
        &self,
        context: &KeyContext<'_>,
        blob: &[u8],
        message: &[u8],
        format: SignatureFormat,
    ) -> Result<Vec<u8>> {
        let algorithm = context.spec.algorithm();
        let digest = match algorithm {
            Algorithm::EcdsaP256Sha256 | Algorithm::RsaPssSha256 | Algorithm::RsaPkcs1Sha256 => {
                digest::digest(&digest::SHA256, message)
            }
            Algorithm::EcdsaP384Sha384 => digest::digest(&digest::SHA384, message),
            other => {
                return Err(Error::InvalidInput(format!(
                    "a {other} key does not make signatures"
                )))
            }
        };
        let signature = self.with_key(context, blob, |key| key.sign(digest.as_ref()))?;
        let unexpected = || Error::crypto("read a signature from the TPM");
        match (signature, algorithm) {
            (Signature::EcDsa(sig), Algorithm::EcdsaP256Sha256 | Algorithm::EcdsaP384Sha384) => {
                let width = templates::field_len(context.spec.key_type()).ok_or_else(unexpected)?;
                let (r, s) = (sig.signature_r().value(), sig.signature_s().value());
                if r.len() > width || s.len() > width {
                    return Err(unexpected());
                }
                // r and s left-padded to the field width: some TPMs strip leading zeros.
                let mut raw = vec![0u8; 2 * width];
                raw[width - r.len()..width].copy_from_slice(r);
                raw[2 * width - s.len()..].copy_from_slice(s);
                match format {
                    SignatureFormat::Raw => Ok(raw),
                    SignatureFormat::Der => der::ecdsa_raw_to_der(&raw),
                }
            }
            (Signature::RsaPss(sig), Algorithm::RsaPssSha256)
            | (Signature::RsaSsa(sig), Algorithm::RsaPkcs1Sha256) => {
                Ok(sig.signature().value().to_vec())
            }
            _ => Err(unexpected()),
        }
    }

    fn compute_capabilities(&self) -> Result<Capabilities> {
        let f = self.features()?;
        let not_yet = "keyhold's TPM backend does not make these keys yet";
        let mut supported = Vec::new();
        let mut missing = Vec::new();
        for key_type in KeyType::ALL {
            for &purpose in key_type.purposes() {
                let lacks: Option<String> = match (key_type, purpose) {
                    (KeyType::EcdsaP256, _) => (!f.p256).then(|| "ECDSA on NIST P-256".into()),
                    (KeyType::EcdsaP384, _) => (!f.p384).then(|| "ECDSA on NIST P-384".into()),
                    (KeyType::Rsa2048, Purpose::Sign) => {
                        if !f.rsa2048 {
                            Some("2048-bit RSA keys".into())
                        } else if !(f.rsa_pss && f.rsa_ssa) {
                            Some("RSASSA-PSS and RSASSA-PKCS1-v1_5".into())
                        } else {
                            None
                        }
                    }
                    (KeyType::HmacSha256, _) => (!f.hmac).then(|| "HMAC keys".into()),
                    (KeyType::Ed25519, _) => Some("Ed25519 (TPM 2.0 does not define it)".into()),
                    (KeyType::Aes256Gcm, _) => Some("AES-GCM (TPM 2.0 does not define it)".into()),
                    (KeyType::Rsa2048, _) => Some(format!("RSA-OAEP decryption: {not_yet}")),
                    (KeyType::Rsa3072 | KeyType::Rsa4096, _) => {
                        Some(format!("{key_type} keys: {not_yet}"))
                    }
                };
                match lacks {
                    None => supported.push((key_type, purpose)),
                    Some(what) => missing.push((key_type, purpose, what)),
                }
            }
        }
        Ok(Capabilities::new(supported).with_missing(missing))
    }
}

impl Backend for TpmBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Result<Capabilities> {
        self.compute_capabilities()
    }

    fn generate(&self, context: KeyContext<'_>, options: &KeyOptions) -> Result<GeneratedKey> {
        let (key_type, purpose) = (context.spec.key_type(), context.spec.purpose());
        self.capabilities()?
            .require(&self.name, key_type, purpose)?;
        if options.extractable {
            return Err(Error::Unsupported {
                backend: self.name.clone(),
                what: "extractable keys: TPM keys are fixedTPM and never leave the TPM".into(),
            });
        }
        let algorithm = context.spec.algorithm();
        let template = templates::template(algorithm).ok_or_else(|| Error::Unsupported {
            backend: self.name.clone(),
            what: format!("{algorithm} keys"),
        })?;
        let template = template
            .during("TPM2_Create (template)")
            .map_err(|f| errors::map(&self.name, f))?;
        let mut auth = SecretBytes::zeroed(32);
        aws_lc_rs::rand::fill(auth.expose_mut())
            .map_err(|_| Error::crypto("make a TPM key's authValue"))?;
        let created = self.run(|connection| connection.create(template.clone(), &auth))?;
        let public = created
            .out_public
            .marshall()
            .during("marshal TPMT_PUBLIC")
            .map_err(|f| errors::map(&self.name, f))?;
        let blob = blob::seal(
            &self.auth_kek,
            &context,
            &public,
            created.out_private.value(),
            &auth,
        )?;
        drop(auth);

        let public_key = if key_type.is_asymmetric() {
            let public_key = templates::public_key(&created.out_public, key_type, algorithm)?;
            // The pairwise consistency test, through the same path every later use takes: it
            // proves the blob loads with its sealed authValue and signs for this public key.
            let sig = self.sign_blob(&context, &blob, PCT_MESSAGE, SignatureFormat::Der)?;
            public_key
                .verify(PCT_MESSAGE, &sig, SignatureFormat::Der)
                .map_err(|_| Error::ConsistencyTest {
                    key_type: key_type.as_str(),
                })?;
            Some(public_key)
        } else {
            self.with_key(&context, &blob, |key| key.hmac(PCT_MESSAGE))?;
            None
        };
        let mut locator = [0u8; 16];
        aws_lc_rs::rand::fill(&mut locator).map_err(|_| Error::crypto("make a locator"))?;
        Ok(GeneratedKey {
            locator: crate::hex::encode(&locator),
            blob: Some(blob),
            public_key,
            attributes: vec![
                ("srk_name".into(), crate::hex::encode(&self.srk_name)),
                ("never_extractable".into(), "true".into()),
            ],
        })
    }

    fn public_key(&self, key: KeyRef<'_>) -> Result<PublicKey> {
        let spec = key.context.spec;
        if !spec.key_type().is_asymmetric() {
            return Err(crate::backend::no_public_key(spec.key_type()));
        }
        let blob = self.key_blob(&key)?;
        let public = self.with_key(&key.context, blob, |loaded| loaded.public())?;
        templates::public_key(&public, spec.key_type(), spec.algorithm())
    }

    fn sign(&self, key: KeyRef<'_>, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>> {
        let blob = self.key_blob(&key)?;
        self.sign_blob(&key.context, blob, message, format)
    }

    fn encrypt(&self, key: KeyRef<'_>, _plaintext: &[u8], _aad: &[u8]) -> Result<Sealed> {
        Err(Error::Unsupported {
            backend: self.name.clone(),
            what: format!("encryption with a {} key", key.context.spec.key_type()),
        })
    }

    fn decrypt(&self, key: KeyRef<'_>, _sealed: &Sealed, _aad: &[u8]) -> Result<SecretBytes> {
        Err(Error::Unsupported {
            backend: self.name.clone(),
            what: format!("decryption with a {} key", key.context.spec.key_type()),
        })
    }

    fn mac(&self, key: KeyRef<'_>, data: &[u8]) -> Result<Vec<u8>> {
        if key.context.spec.algorithm() != Algorithm::HmacSha256 {
            return Err(Error::crypto("MAC with a non-HMAC key"));
        }
        if data.len() > MAX_HMAC_INPUT {
            return Err(Error::InvalidInput(format!(
                "a TPM HMAC key takes at most {MAX_HMAC_INPUT} bytes per message (the TPM's \
                 TPM2_HMAC input limit) and the input is {} bytes: MAC a digest of the data, or \
                 use a software HMAC key",
                data.len()
            )));
        }
        let blob = self.key_blob(&key)?;
        self.with_key(&key.context, blob, |loaded| loaded.hmac(data))
    }

    fn report(&self) -> Result<BackendReport> {
        let (manufacturer, vendor, handles) = self.run(|connection| {
            let (manufacturer, vendor) = connection.vendor()?;
            Ok((manufacturer, vendor, connection.transient_handles()?))
        })?;
        Ok(BackendReport {
            kind: "tpm".into(),
            details: vec![
                ("tcti".into(), self.tcti.clone()),
                ("manufacturer".into(), manufacturer),
                ("vendor".into(), vendor),
                ("SRK name".into(), crate::hex::encode(&self.srk_name)),
                ("transient handles".into(), handles.to_string()),
                (
                    "keys".into(),
                    "TPM-wrapped blobs in the store's records; none are stored in the TPM".into(),
                ),
            ],
            // TPM keys live in their records, not on the device: there is nothing to list.
            objects: None,
        })
    }

    fn destroy_object(&self, locator: &str) -> Result<()> {
        Err(Error::InvalidInput(format!(
            "backend `{}` keeps no key objects in the TPM (keys are blobs in their records): \
             there is no object `{locator}` to destroy",
            self.name
        )))
    }

    fn destroy(&self, _key: KeyRef<'_>) -> Result<()> {
        // Nothing of the key is stored in the TPM: it exists only as the blob in its record, and
        // the keystore deleting the record destroys it. (Without the SRK's seed the blob is
        // useless; a TPM clear destroys every key at once.)
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unix_socket_tcti_is_refused_with_the_reason() {
        let e = parse_tcti("swtpm:path=/tmp/x/swtpm.sock").err();
        let text = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("localhost:2321"), "{text}");
        assert!(text.contains("swtpm:host=127.0.0.1,port=P"), "{text}");
        assert!(parse_tcti("mssim:host=x,bogus=1").is_err());
        assert!(parse_tcti("swtpm:host=127.0.0.1,port=2321").is_ok());
        assert!(parse_tcti("device:/dev/tpmrm0").is_ok());
    }

    /// The guard flushes a loaded key when the TPM refuses the command that uses it.
    #[cfg(feature = "testing")]
    #[test]
    fn a_failed_command_still_flushes_the_key() {
        use crate::key::KeySpec;
        let tpm = fixture::Swtpm::new().unwrap();
        let backend =
            TpmBackend::new("tpm", &tpm.tcti(), &SecretBytes::copy_from(&[3; 32])).unwrap();
        let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
        let (store, uuid) = ([1u8; 16], [2u8; 16]);
        let context = KeyContext {
            store_id: &store,
            uuid: &uuid,
            label: "t/k",
            spec: &spec,
        };
        let key = backend.generate(context, &KeyOptions::new()).unwrap();
        let blob = key.blob.unwrap();
        assert_eq!(backend.transient_handles().unwrap(), 1);
        for _ in 0..10 {
            // A 31-byte digest for a SHA-256 scheme: TPM2_Sign fails after TPM2_Load succeeded.
            let err = backend
                .with_key(&context, &blob, |key| key.sign(&[0u8; 31]))
                .unwrap_err();
            assert!(matches!(err, Error::Backend { .. }), "{err:?}");
        }
        assert_eq!(backend.transient_handles().unwrap(), 1);
    }
}
