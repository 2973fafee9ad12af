//! The TPM 2.0 backend: keys generated inside a TPM, kept outside it only as TPM-wrapped blobs.
//!
//! Each key is made with TPM2_Create under the storage root key (SRK) and never leaves the TPM in
//! clear. What TPM2_Create returns (the public area and the private part, which the TPM encrypted
//! under the SRK) goes into the key's record as its blob, with the SRK's Name and the key's random
//! authValue sealed under a key derived from the store's root secret (`blob.rs`). Nothing is
//! stored in the TPM: a key is loaded from its blob when it is used and stays loaded in a small
//! LRU (`max_loaded`, two by default: a TPM holds about three transient objects) until a newer key
//! needs the room; every handle is flushed by a guard or by the LRU.
//!
//! All commands go through one ESAPI context per TPM and one salted HMAC session with parameter
//! encryption (`connection.rs`), shared by every backend and sealer of the process that uses the
//! TPM (`device.rs`): callers take turns, waiting at most `timeout_secs`. When the connection to
//! the TPM is lost (the TPM was killed or reset), the context, SRK and session are rebuilt on the
//! next call; the SRK's Name must not change, or the TPM was cleared or replaced and its keys are
//! gone.
//!
//! Messages are hashed in software; the TPM signs the digest.

mod blob;
mod connection;
pub mod device;
mod errors;
#[cfg(feature = "testing")]
pub mod fixture;
mod import;
mod library;
mod nv;
mod srk;
mod templates;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aws_lc_rs::aead::{RandomizedNonceKey, AES_256_GCM};
use aws_lc_rs::digest;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Signature};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

use self::connection::{CacheKey, Connection};
use self::device::{DeviceSettings, TpmDevice};
use self::errors::{During, Failure};
pub use self::nv::{counter_index, TpmCounter};
use crate::backend::{
    Backend, BackendReport, Capabilities, GeneratedKey, KeyContext, KeyOptions, KeyRef, Sealed,
    Wrapping,
};
use crate::der;
use crate::error::{Error, Result};
use crate::key::{Algorithm, KeyType, Purpose, SignatureFormat};
use crate::public_key::PublicKey;
use crate::secret::SecretBytes;

/// The most bytes one TPM2_HMAC command takes (`TPM2B_MAX_BUFFER`, 1024 on every TPM seen).
/// tss-esapi 7.7 does not wrap the HMAC sequence commands, so this is the backend's limit.
pub const MAX_HMAC_INPUT: usize = 1024;

/// The longest RSA-OAEP label a TPM takes (`TPM2B_DATA`), terminating 0x00 included.
pub const MAX_OAEP_LABEL: usize = 64;

/// Signed once after generation, to prove the blob loads with its sealed authValue.
const PCT_MESSAGE: &[u8] = b"keyhold TPM pairwise consistency test";

/// A new key's authValue: 32 random bytes.
fn new_auth() -> Result<SecretBytes> {
    let mut auth = SecretBytes::zeroed(32);
    aws_lc_rs::rand::fill(auth.expose_mut())
        .map_err(|_| Error::crypto("make a TPM key's authValue"))?;
    Ok(auth)
}

/// Tells the backend instances apart in the shared cache of loaded keys.
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// A TPM 2.0 as a keyhold backend.
pub struct TpmBackend {
    name: String,
    device: Arc<TpmDevice>,
    /// Seals each key's authValue in its blob.
    auth_kek: RandomizedNonceKey,
    /// This instance's mark on the keys it keeps loaded.
    owner: u64,
}

impl std::fmt::Debug for TpmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmBackend")
            .field("name", &self.name)
            .field("device", &self.device)
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

/// The TPM at `tcti`, shared with everything else in the process that uses it. Connects lazily.
///
/// # Errors
/// [`Error::Config`] for a TCTI keyhold cannot use (`swtpm:path=…`).
pub fn device(tcti: &str, settings: DeviceSettings) -> Result<Arc<TpmDevice>> {
    let conf = parse_tcti(tcti)?;
    Ok(TpmDevice::shared(tcti.trim(), conf, settings))
}

/// A selection of SHA-256 PCRs for sealing.
fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList> {
    let slots = pcrs
        .iter()
        .map(|&i| {
            if i > 23 {
                return Err(Error::InvalidInput(format!(
                    "PCR {i} does not exist: a TPM 2.0 has PCRs 0 to 23"
                )));
            }
            PcrSlot::try_from(1u32 << i)
                .map_err(|_| Error::InvalidInput(format!("PCR {i} cannot be selected")))
        })
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| Error::InvalidInput(format!("PCR selection {pcrs:?}: {e}")))
}

/// How many sessions this process has salted to a TPM's storage root key: lets tests check that
/// a TPM whose SRK is not the one a store pinned never gets a session.
#[cfg(feature = "testing")]
pub fn salted_sessions() -> u64 {
    connection::salted_sessions()
}

/// How many times this process flushed its cached keys and loaded a key again because the TPM
/// was out of object memory (another program's objects filled it).
#[cfg(feature = "testing")]
pub fn object_memory_retries() -> u64 {
    connection::object_memory_retries()
}

/// The parts of a TPM key's blob: the SRK Name it was made under, its public area (a marshalled
/// TPMT_PUBLIC) and its TPM-wrapped private part (the TPM2B_PRIVATE contents), for tests that
/// load it with other tools and read its attributes back.
///
/// # Errors
/// [`Error::Integrity`] for a blob that does not parse.
#[cfg(feature = "testing")]
pub fn key_blob_parts(blob: &[u8]) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let parts = blob::parse(blob)?;
    Ok((
        parts.srk_name.to_vec(),
        parts.public.to_vec(),
        parts.private.to_vec(),
    ))
}

/// keyhold's TPM templates, for benches and tests that drive a TPM directly the way keyhold does
/// (a copy could drift from what keyhold really uses).
#[cfg(feature = "testing")]
pub mod raw_templates {
    use crate::key::{Algorithm, KeyType};
    use tss_esapi::structures::Public;

    /// The storage root key's template (see `connection.rs`).
    ///
    /// # Errors
    /// As tss-esapi's builders.
    pub fn srk() -> tss_esapi::Result<Public> {
        super::srk::srk_template()
    }

    /// The template of keyhold's keys of `key_type` and `algorithm`; `None` if the TPM backend
    /// does not make them.
    pub fn key(key_type: KeyType, algorithm: Algorithm) -> Option<tss_esapi::Result<Public>> {
        super::templates::template(key_type, algorithm)
    }
}

/// What the TPM sealer keeps: a sealed-data object's public area and TPM-wrapped private part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedObject {
    /// The marshalled TPMT_PUBLIC (it carries the PCR policy digest).
    pub public: Vec<u8>,
    /// The TPM2B_PRIVATE contents, encrypted by the TPM under the SRK.
    pub private: Vec<u8>,
}

impl TpmDevice {
    /// Seals `secret` (at most 128 bytes) to this TPM; with `pcrs` (SHA-256 bank), only while
    /// those PCRs keep their current values. `who` names the caller in errors.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad PCR list; [`Error::BackendUnavailable`] and backend
    /// errors from the TPM.
    pub fn seal(&self, who: &str, secret: &SecretBytes, pcrs: &[u8]) -> Result<SealedObject> {
        let selection = (!pcrs.is_empty())
            .then(|| pcr_selection(pcrs))
            .transpose()?;
        let (public, private) = self.run(who, |connection| {
            connection.seal(secret, selection.as_ref())
        })?;
        Ok(SealedObject { public, private })
    }

    /// Unseals what [`Self::seal`] sealed with the same `pcrs`; `None` when the TPM refused
    /// because those PCRs no longer hold the values they had at sealing.
    ///
    /// # Errors
    /// [`Error::Unseal`] if the object was made on another TPM (or before this one was cleared);
    /// [`Error::BackendUnavailable`] if the TPM is not there.
    pub fn unseal(
        &self,
        who: &str,
        sealed: &SealedObject,
        pcrs: &[u8],
    ) -> Result<Option<SecretBytes>> {
        let selection = (!pcrs.is_empty())
            .then(|| pcr_selection(pcrs))
            .transpose()?;
        let mut refused = None;
        let result = self.run(who, |connection| {
            connection
                .unseal(&sealed.public, &sealed.private, selection.as_ref())
                .inspect_err(|f| {
                    if errors::is_policy_failure(f.error) {
                        refused = Some(true);
                    } else if errors::is_integrity(f.error) {
                        refused = Some(false);
                    }
                })
        });
        match (result, refused) {
            (Ok(secret), _) => Ok(Some(secret)),
            (Err(_), Some(true)) => Ok(None),
            (Err(_), Some(false)) => Err(Error::Unseal {
                reason: "the TPM refused the sealed root secret as made under another storage \
                         key: it was sealed by another TPM, or this TPM was cleared since"
                    .into(),
            }),
            (Err(e), None) => Err(e),
        }
    }

    /// Extends PCR `index` (SHA-256 bank) with `data`'s digest: for tests of PCR-bound sealing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a PCR that does not exist; TPM errors.
    #[cfg(feature = "testing")]
    pub fn extend_pcr(&self, index: u8, data: &[u8]) -> Result<()> {
        pcr_selection(&[index])?;
        let digest = digest::digest(&digest::SHA256, data);
        self.run("tpm", |connection| {
            connection.extend_pcr(index, digest.as_ref())
        })
    }

    /// How many transient objects the TPM holds now (the SRK and the cached keys included).
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if the TPM cannot be reached.
    pub fn transient_handles(&self) -> Result<usize> {
        self.run("tpm", Connection::transient_handles)
    }
}

impl TpmBackend {
    /// A backend on the TPM at `tcti` (`device:/dev/tpmrm0`, `tabrmd`, `swtpm:host=H,port=P`),
    /// with default settings. `auth_kek` (32 bytes, derived from the store's root secret) seals
    /// the keys' authValues. The TPM is reached on first use.
    ///
    /// # Errors
    /// [`Error::Config`] for a TCTI keyhold cannot use (`swtpm:path=…`) or a KEK that is not 32
    /// bytes.
    pub fn new(name: &str, tcti: &str, auth_kek: &SecretBytes) -> Result<Self> {
        Self::with_device(name, device(tcti, DeviceSettings::default())?, auth_kek)
    }

    /// A backend on `device`.
    ///
    /// # Errors
    /// [`Error::Config`] for a KEK that is not 32 bytes.
    pub fn with_device(name: &str, device: Arc<TpmDevice>, auth_kek: &SecretBytes) -> Result<Self> {
        if auth_kek.len() != 32 {
            return Err(Error::Config(format!(
                "the TPM backend's key-encryption key must be 32 bytes, not {}",
                auth_kek.len()
            )));
        }
        let auth_kek = RandomizedNonceKey::new(&AES_256_GCM, auth_kek.expose())
            .map_err(|_| Error::crypto("load the TPM key-encryption key"))?;
        Ok(Self {
            name: name.to_owned(),
            device,
            auth_kek,
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The TPM this backend uses.
    pub fn device(&self) -> &Arc<TpmDevice> {
        &self.device
    }

    /// The Name of this TPM's SRK: it identifies the TPM's owner seed. Connects if needed.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if the TPM cannot be reached.
    pub fn srk_name(&self) -> Result<Vec<u8>> {
        self.device.srk_name(&self.name)
    }

    /// How many transient objects the TPM holds now: the SRK (unless persistent) and the keys
    /// kept loaded, at most `max_loaded`.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if the TPM cannot be reached.
    pub fn transient_handles(&self) -> Result<usize> {
        self.device.transient_handles()
    }

    /// Loads the key in `blob` (sealed for `context`), or finds it still loaded, and runs `op`
    /// on it.
    fn with_key<T>(
        &self,
        context: &KeyContext<'_>,
        blob: &[u8],
        mut op: impl FnMut(&mut connection::Loaded<'_>) -> Result<T, Failure>,
    ) -> Result<T> {
        let parts = blob::parse(blob)?;
        // The authValue decrypts only under this store's key and for this record (SRK Name
        // included): every use proves both, cached key or not.
        let auth = parts.auth(&self.auth_kek, context)?;
        let current = self.device.srk_name(&self.name)?;
        if parts.srk_name != current.as_slice() {
            return Err(Error::BackendUnavailable {
                backend: self.name.clone(),
                reason: format!(
                    "key `{}` was made under the storage root key {}, but the TPM at `{}` now \
                     has {}: the TPM was cleared or replaced, and the key is gone with its old \
                     owner seed",
                    context.label,
                    crate::hex::encode(parts.srk_name),
                    self.device.tcti(),
                    crate::hex::encode(&current)
                ),
            });
        }
        let cache = CacheKey {
            owner: self.owner,
            digest: cache_digest(context, blob),
        };
        self.device.run(&self.name, |connection| {
            let mut loaded = connection.key(Some(cache), parts.public, parts.private, &auth)?;
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

    /// The blob of a key the TPM made or imported: its public area, its private part under
    /// the SRK, and its authValue sealed for `context`.
    fn seal_blob(
        &self,
        context: &KeyContext<'_>,
        srk_name: &[u8],
        public: &tss_esapi::structures::Public,
        private: &[u8],
        auth: &SecretBytes,
    ) -> Result<Vec<u8>> {
        let public = public
            .marshall()
            .during("marshal TPMT_PUBLIC")
            .map_err(|f| errors::map(&self.name, f))?;
        blob::seal(&self.auth_kek, context, srk_name, &public, private, auth)
    }

    /// Proves a new key works through the same path every later use takes: the blob loads with
    /// its sealed authValue, and the key signs for (or decrypts to) its public key.
    fn consistency_test(
        &self,
        context: &KeyContext<'_>,
        blob: &[u8],
        public_key: &PublicKey,
    ) -> Result<()> {
        let failed = || Error::ConsistencyTest {
            key_type: context.spec.key_type().as_str(),
        };
        if context.spec.algorithm() == Algorithm::RsaOaepSha256 {
            let label = oaep_label(b"keyhold TPM pairwise consistency test");
            let ciphertext = public_key.encrypt_oaep(PCT_MESSAGE, &label)?;
            let plain =
                self.with_key(context, blob, |key| key.oaep_decrypt(&ciphertext, &label))?;
            return match plain {
                Some(plain) if plain.expose() == PCT_MESSAGE => Ok(()),
                _ => Err(failed()),
            };
        }
        let sig = self.sign_blob(context, blob, PCT_MESSAGE, SignatureFormat::Der)?;
        public_key
            .verify(PCT_MESSAGE, &sig, SignatureFormat::Der)
            .map_err(|_| failed())
    }

    fn compute_capabilities(&self) -> Result<Capabilities> {
        let f = self.device.features(&self.name)?;
        let mut supported = Vec::new();
        let mut missing = Vec::new();
        for key_type in KeyType::ALL {
            for &purpose in key_type.purposes() {
                let rsa = |size: bool, bits: &str| -> Option<String> {
                    if !size {
                        Some(format!("{bits}-bit RSA keys"))
                    } else if purpose == Purpose::Sign && !(f.rsa_pss && f.rsa_ssa) {
                        Some("RSASSA-PSS and RSASSA-PKCS1-v1_5".into())
                    } else if purpose == Purpose::Decrypt && !f.rsa_oaep {
                        Some("RSA-OAEP".into())
                    } else {
                        None
                    }
                };
                let lacks: Option<String> = match key_type {
                    KeyType::EcdsaP256 => (!f.p256).then(|| "ECDSA on NIST P-256".into()),
                    KeyType::EcdsaP384 => (!f.p384).then(|| "ECDSA on NIST P-384".into()),
                    KeyType::Rsa2048 => rsa(f.rsa2048, "2048"),
                    KeyType::Rsa3072 => rsa(f.rsa3072, "3072"),
                    KeyType::HmacSha256 => (!f.hmac).then(|| "HMAC keys".into()),
                    KeyType::Ed25519 => Some("Ed25519 (TPM 2.0 does not define it)".into()),
                    KeyType::Aes256Gcm => Some("AES-GCM (TPM 2.0 does not define it)".into()),
                    KeyType::Rsa4096 => {
                        Some("4096-bit RSA keys (TPM 2.0 devices stop at 2048 or 3072 bits)".into())
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

/// Which cached loaded key serves a blob: the blob and the record it belongs to.
fn cache_digest(context: &KeyContext<'_>, blob: &[u8]) -> [u8; 32] {
    let mut d = digest::Context::new(&digest::SHA256);
    d.update(b"keyhold tpm loaded key\0");
    d.update(context.store_id);
    d.update(context.uuid);
    d.update(context.spec.algorithm().as_str().as_bytes());
    d.update(&[0]);
    d.update(blob);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.finish().as_ref());
    out
}

/// The RSA-OAEP label keyhold uses for `binding` (see `keystore::envelope`): the TPM takes a label
/// only if it ends in 0x00 and is at most 64 bytes, so the binding is hashed into one.
pub(crate) fn oaep_label(binding: &[u8]) -> Vec<u8> {
    crate::keystore::oaep_label(binding)
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
        let template =
            templates::template(key_type, algorithm).ok_or_else(|| Error::Unsupported {
                backend: self.name.clone(),
                what: format!("{algorithm} keys"),
            })?;
        let template = template
            .during("TPM2_Create (template)")
            .map_err(|f| errors::map(&self.name, f))?;
        let auth = new_auth()?;
        let srk_name = self.srk_name()?;
        let created = self.device.run(&self.name, |connection| {
            connection.create(template.clone(), &auth)
        })?;
        let blob = self.seal_blob(
            &context,
            &srk_name,
            &created.out_public,
            created.out_private.value(),
            &auth,
        )?;
        drop(auth);

        let public_key = if key_type.is_asymmetric() {
            let public_key = templates::public_key(&created.out_public, key_type, algorithm)?;
            // The pairwise consistency test, through the same path every later use takes: it
            // proves the blob loads with its sealed authValue and signs for this public key.
            self.consistency_test(&context, &blob, &public_key)?;
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
                ("srk_name".into(), crate::hex::encode(&srk_name)),
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

    fn decrypt(&self, key: KeyRef<'_>, sealed: &Sealed, label: &[u8]) -> Result<SecretBytes> {
        if key.context.spec.algorithm() != Algorithm::RsaOaepSha256 {
            return Err(Error::Unsupported {
                backend: self.name.clone(),
                what: format!("decryption with a {} key", key.context.spec.key_type()),
            });
        }
        if label.len() > MAX_OAEP_LABEL || label.last().is_some_and(|&b| b != 0) {
            return Err(Error::crypto(
                "a TPM RSA-OAEP label must end in 0x00, within 64 bytes",
            ));
        }
        let bits = key.context.spec.key_type().rsa_bits().unwrap_or(0);
        if sealed.ciphertext.len() != bits / 8 {
            return Err(Error::DecryptionFailed {
                reason: "the ciphertext, its AAD or the key does not match",
            });
        }
        let blob = self.key_blob(&key)?;
        self.with_key(&key.context, blob, |loaded| {
            loaded.oaep_decrypt(&sealed.ciphertext, label)
        })?
        // Says no more than software does about why: it does not decrypt.
        .ok_or(Error::DecryptionFailed {
            reason: "the ciphertext, its AAD or the key does not match",
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
        let srk_name = self.srk_name()?;
        let (manufacturer, vendor, handles) = self.device.run(&self.name, |connection| {
            let (manufacturer, vendor) = connection.vendor()?;
            Ok((manufacturer, vendor, connection.transient_handles()?))
        })?;
        Ok(BackendReport {
            kind: "tpm".into(),
            details: vec![
                ("tcti".into(), self.device.tcti().to_owned()),
                ("manufacturer".into(), manufacturer),
                ("vendor".into(), vendor),
                ("SRK name".into(), crate::hex::encode(&srk_name)),
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

    fn check_key(&self, key: KeyRef<'_>) -> Result<()> {
        // Loading proves the blob: its authValue decrypts under this store's key for this record,
        // it was made under this TPM's SRK, and the TPM accepts its integrity.
        let blob = self.key_blob(&key)?;
        self.with_key(&key.context, blob, |loaded| loaded.public().map(drop))
    }

    fn destroy_object(&self, locator: &str) -> Result<()> {
        Err(Error::InvalidInput(format!(
            "backend `{}` keeps no key objects in the TPM (keys are blobs in their records): \
             there is no object `{locator}` to destroy",
            self.name
        )))
    }

    fn destroy(&self, key: KeyRef<'_>) -> Result<()> {
        // Nothing of the key is stored in the TPM: it exists as the blob in its record, which the
        // keystore erases, and, while this process keeps it loaded for its next use, as a
        // transient object, flushed here. (Without the SRK's seed the blob is useless; a TPM
        // clear destroys every key at once.)
        let Some(blob) = key.blob else {
            return Ok(());
        };
        let cached = CacheKey {
            owner: self.owner,
            digest: cache_digest(&key.context, blob),
        };
        self.device
            .run_if_connected(&self.name, |connection| connection.forget(cached))
    }

    fn wrap_key(&self, _key: KeyRef<'_>, _wrapping: Wrapping<'_>) -> Result<Vec<u8>> {
        Err(Error::Unsupported {
            backend: self.name.clone(),
            what: "exporting keys: keyhold's TPM keys are fixedTPM and fixedParent, so the TPM \
                   never lets them out, wrapped or not (TPM2_Duplicate refuses them)"
                .into(),
        })
    }

    fn unwrap_key(&self, _unwrapping: KeyRef<'_>, _wrapped: &[u8]) -> Result<SecretBytes> {
        Err(Error::Unsupported {
            backend: self.name.clone(),
            what: "unwrapping into this process: a TPM key decrypts only keyhold envelopes; \
                   unwrap with a software key"
                .into(),
        })
    }

    fn import_key(
        &self,
        context: KeyContext<'_>,
        material: &SecretBytes,
        options: &KeyOptions,
    ) -> Result<GeneratedKey> {
        let spec = context.spec;
        let (key_type, algorithm) = (spec.key_type(), spec.algorithm());
        self.capabilities()?
            .require(&self.name, key_type, spec.purpose())?;
        if options.extractable {
            return Err(Error::Unsupported {
                backend: self.name.clone(),
                what: "exportable keys: a key imported into the TPM stays in it".into(),
            });
        }
        let fresh =
            crate::backend::software::imported_material(key_type, algorithm, material.expose())?;
        let auth = new_auth()?;
        let prepared = import::prepare(&self.name, key_type, algorithm, &fresh.material, &auth)?;
        let srk_name = self.srk_name()?;
        let private = self.device.run(&self.name, |connection| {
            connection.import(prepared.public.clone(), prepared.duplicate.clone())
        })?;
        let blob = self.seal_blob(
            &context,
            &srk_name,
            &prepared.public,
            private.value(),
            &auth,
        )?;
        drop(auth);
        // Used once through the path every later use takes, and checked against the material.
        match &fresh.public {
            Some(expected) => {
                let public_key = templates::public_key(&prepared.public, key_type, algorithm)?;
                if &public_key != expected {
                    return Err(Error::ConsistencyTest {
                        key_type: key_type.as_str(),
                    });
                }
                self.consistency_test(&context, &blob, &public_key)?;
            }
            None => {
                let tag = self.with_key(&context, &blob, |key| key.hmac(PCT_MESSAGE))?;
                let key = aws_lc_rs::hmac::Key::new(
                    aws_lc_rs::hmac::HMAC_SHA256,
                    fresh.material.expose(),
                );
                aws_lc_rs::hmac::verify(&key, PCT_MESSAGE, &tag).map_err(|_| {
                    Error::ConsistencyTest {
                        key_type: key_type.as_str(),
                    }
                })?;
            }
        }
        let mut locator = [0u8; 16];
        aws_lc_rs::rand::fill(&mut locator).map_err(|_| Error::crypto("make a locator"))?;
        Ok(GeneratedKey {
            locator: crate::hex::encode(&locator),
            blob: Some(blob),
            public_key: fresh.public,
            attributes: vec![
                ("srk_name".into(), crate::hex::encode(&srk_name)),
                ("fixed_tpm".into(), "false".into()),
            ],
        })
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
        let err = parse_tcti("mssim:host=x,bogus=1").unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("option `bogus=1` is not supported")
                && m.contains("only `host=` and `port=` are understood")),
            "{err:?}"
        );
        let err = parse_tcti("no-such-tcti-form:::").unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("is not understood")),
            "{err:?}"
        );
        parse_tcti("swtpm:host=127.0.0.1,port=2321").unwrap();
        parse_tcti("device:/dev/tpmrm0").unwrap();
    }

    /// A failed command leaves no handle behind: the key stays cached (one handle), and nothing
    /// else stays loaded.
    #[cfg(feature = "testing")]
    #[test]
    fn a_failed_command_leaks_no_handle() {
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
        // The SRK and the new key, cached by its consistency test.
        assert_eq!(backend.transient_handles().unwrap(), 2);
        for _ in 0..10 {
            // A 31-byte digest for a SHA-256 scheme: TPM2_Sign fails after TPM2_Load succeeded.
            let err = backend
                .with_key(&context, &blob, |key| key.sign(&[0u8; 31]))
                .unwrap_err();
            assert!(
                matches!(&err, Error::Backend { operation, .. } if operation.starts_with("TPM2_Sign")),
                "{err:?}"
            );
        }
        assert_eq!(backend.transient_handles().unwrap(), 2);
    }
}
