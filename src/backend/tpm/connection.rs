//! One connection to a TPM: the ESAPI context, the storage root key and the encrypted session.

use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK, TPM2_TRANSIENT_FIRST};
use tss_esapi::constants::{
    AlgorithmIdentifier, CapabilityType, EccCurveIdentifier, PropertyTag, SessionType,
};
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, CapabilityData, CreateKeyResult, Data, Digest, HashScheme, HashcheckTicket,
    KeyedHashScheme, MaxBuffer, PcrSelectionList, Private, Public, PublicBuilder, PublicKeyRsa,
    PublicKeyedHashParameters, PublicParameters, RsaDecryptionScheme, SensitiveData, Signature,
    SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, Error as TssError, WrapperErrorKind};

use super::errors::{self, During, Failure};
use super::srk::{create_srk, persistent_srk, salting_name};
use crate::secret::SecretBytes;

/// The command name of a failed connection attempt (mapped to "unavailable").
pub(super) const CONNECT: &str = "connect (Esys_Initialize)";

/// The failure of finding another object than keyhold's SRK at the configured SRK handle.
pub(super) const FOREIGN_SRK: &str = "TPM2_ReadPublic (the object at the SRK handle)";

// The backend keeps its `Connection` in a `Mutex`, so the context must be able to move between
// threads. tss-esapi declares nothing itself: this fails to build if the bindings ever change that.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Context>();
};

/// What the TPM offers that keyhold's TPM key types need.
#[derive(Debug, Clone, Copy)]
pub(super) struct Features {
    pub p256: bool,
    pub p384: bool,
    pub rsa2048: bool,
    pub rsa3072: bool,
    pub rsa_pss: bool,
    pub rsa_ssa: bool,
    pub rsa_oaep: bool,
    pub hmac: bool,
}

/// How a connection is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Setup {
    /// Keep the SRK at this persistent handle (made there on first use) instead of re-deriving a
    /// transient copy at every connection.
    pub srk_handle: Option<u32>,
    /// The most keys kept loaded between operations.
    pub max_loaded: usize,
}

/// Which loaded key a cached handle is: the backend instance that loaded it (each has its own
/// key-encryption key, so one instance's cached key is never another's), and a digest of the
/// key's blob and record context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CacheKey {
    pub owner: u64,
    pub digest: [u8; 32],
}

#[derive(Debug)]
struct Cached {
    key: CacheKey,
    handle: KeyHandle,
}

/// A live connection: the ESAPI context with the SRK loaded and the salted session set.
#[derive(Debug)]
pub(super) struct Connection {
    context: Context,
    /// The SRK: transient, or persistent when the configuration names a handle.
    srk: KeyHandle,
    session: AuthSession,
    srk_name: Vec<u8>,
    /// Keys kept loaded, least recently used first; at most `max_loaded`.
    loaded: Vec<Cached>,
    max_loaded: usize,
}

/// The ticket for signing a digest the TPM did not compute: the NULL ticket, which unrestricted
/// keys accept (only restricted keys need proof that the TPM hashed the message itself).
fn null_ticket() -> tss_esapi::Result<HashcheckTicket> {
    HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
}

pub(super) fn wrong_value() -> TssError {
    TssError::WrapperError(WrapperErrorKind::WrongValueFromTpm)
}

/// How many sessions this process has salted to an SRK: lets tests see that a TPM whose SRK is not
/// the pinned one never got a session.
static SALTED_SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The number of sessions salted to an SRK in this process so far.
#[cfg(feature = "testing")]
pub(super) fn salted_sessions() -> u64 {
    SALTED_SESSIONS.load(std::sync::atomic::Ordering::SeqCst)
}

/// How many loads this process retried after flushing its cached keys because the TPM was out
/// of object memory: lets tests see the retry happen. Process-wide, so exact counts hold where
/// one test runs per process (nextest).
#[cfg(feature = "testing")]
static OBJECT_MEMORY_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The number of loads retried after TPM_RC_OBJECT_MEMORY in this process so far.
#[cfg(feature = "testing")]
pub(super) fn object_memory_retries() -> u64 {
    OBJECT_MEMORY_RETRIES.load(std::sync::atomic::Ordering::SeqCst)
}

/// A connection whose SRK is loaded but not yet trusted: no session is salted to it until the
/// caller has compared [`Unverified::srk_name`] with the Name it expects.
#[derive(Debug)]
pub(super) struct Unverified {
    context: Context,
    srk: KeyHandle,
    srk_name: Vec<u8>,
    max_loaded: usize,
}

impl Unverified {
    /// The Name of the SRK that sessions will be salted to (see [`salting_name`]).
    pub(super) fn srk_name(&self) -> &[u8] {
        &self.srk_name
    }
}

impl Connection {
    /// Connects, checks the TPM's self-test result and creates (or finds) the SRK; the caller
    /// verifies the SRK's Name, then [`Unverified::salt_session`] starts the session.
    pub(super) fn open(tcti: &TctiNameConf, setup: Setup) -> Result<Unverified, Failure> {
        let mut context = Context::new(tcti.clone()).during(CONNECT)?;
        let (_, tested) = context
            .execute_without_session(|c| c.get_test_result())
            .during("TPM2_GetTestResult")?;
        tested.during("TPM2_GetTestResult (the TPM failed its self-test)")?;

        let (srk, public) = match setup.srk_handle {
            None => create_srk(&mut context)?,
            Some(handle) => persistent_srk(&mut context, handle)?,
        };
        let srk_name = salting_name(&mut context, srk, &public)?;
        Ok(Unverified {
            context,
            srk,
            srk_name,
            max_loaded: setup.max_loaded.max(1),
        })
    }
}

impl Unverified {
    /// Starts the session salted to the SRK, which the caller has verified.
    pub(super) fn salt_session(self) -> Result<Connection, Failure> {
        let Self {
            mut context,
            srk,
            srk_name,
            max_loaded,
        } = self;
        // One session for every command, kept for the life of the connection (a new session per
        // command costs a third of the signing rate). Salted with the SRK, so its session key is
        // secret from anyone on the bus; AES-128-CFB parameter encryption in both directions, so
        // authValues, HMAC input and results cross the bus encrypted. Bound to the SRK too (its
        // authValue is empty, so the binding adds no secret, but TPM2_Create and TPM2_Load
        // authorise the SRK through the session's own key). ESAPI clears the encrypt/decrypt
        // flags by itself for commands whose first parameter is not a sized buffer.
        let session = context
            .execute_without_session(|c| {
                c.start_auth_session(
                    Some(srk),
                    Some(srk.into()),
                    None,
                    SessionType::Hmac,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .during("TPM2_StartAuthSession")?
            .ok_or_else(wrong_value)
            .during("TPM2_StartAuthSession")?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        context
            .tr_sess_set_attributes(session, attributes, mask)
            .during("Esys_TRSess_SetAttributes")?;
        context.set_sessions((Some(session), None, None));
        SALTED_SESSIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Connection {
            context,
            srk,
            session,
            srk_name,
            loaded: Vec::new(),
            max_loaded,
        })
    }
}

impl Connection {
    /// Closes a connection whose TPM objects are gone (the TPM was reset or the connection lost)
    /// without flushing them: dropping the context would flush the SRK's and the session's
    /// handles, and on a TPM that was reset those numbers may already name someone else's objects.
    pub(super) fn abandon(mut self) {
        self.context.clear_sessions();
        let mut handles: Vec<ObjectHandle> = self
            .loaded
            .drain(..)
            .map(|c| ObjectHandle::from(c.handle))
            .collect();
        handles.push(ObjectHandle::from(self.srk));
        handles.push(ObjectHandle::from(SessionHandle::from(self.session)));
        for handle in &mut handles {
            if let Err(e) = self.context.tr_close(handle) {
                tracing::debug!("could not close a stale ESAPI handle: {e}");
            }
        }
    }

    /// The ESAPI context, for commands kept in their own module (nv.rs).
    pub(super) fn context_mut(&mut self) -> &mut Context {
        &mut self.context
    }

    /// The SRK's Name (nameAlg ‖ SHA-256 of its public area): the identity of this TPM's owner seed.
    pub(super) fn srk_name(&self) -> &[u8] {
        &self.srk_name
    }

    /// Creates a key under the SRK with `auth` as its authValue; nothing stays loaded.
    pub(super) fn create(
        &mut self,
        template: Public,
        auth: &SecretBytes,
    ) -> Result<CreateKeyResult, Failure> {
        let auth = Auth::try_from(auth.expose()).during("TPM2_Create (authValue)")?;
        // TPM2_Create needs a free object slot for the key it makes.
        self.make_room(1)?;
        let srk = self.srk;
        self.context
            .create(srk, template, Some(auth), None, None, None)
            .during("TPM2_Create")
    }

    /// Flushes least recently used keys until `free` more can be loaded.
    fn make_room(&mut self, free: usize) -> Result<(), Failure> {
        while !self.loaded.is_empty() && self.loaded.len() + free > self.max_loaded {
            let oldest = self.loaded.remove(0);
            self.context
                .flush_context(oldest.handle.into())
                .during("TPM2_FlushContext (least recently used key)")?;
        }
        Ok(())
    }

    /// Flushes the cached key `key` if it is loaded (its key was destroyed).
    pub(super) fn forget(&mut self, key: CacheKey) -> Result<(), Failure> {
        if let Some(at) = self.loaded.iter().position(|c| c.key == key) {
            let gone = self.loaded.remove(at);
            self.context
                .flush_context(gone.handle.into())
                .during("TPM2_FlushContext (a destroyed key)")?;
        }
        Ok(())
    }

    /// Flushes every cached key (when the TPM ran out of object memory).
    pub(super) fn flush_cached(&mut self) -> Result<(), Failure> {
        let keep = self.max_loaded;
        self.max_loaded = 0;
        let flushed = self.make_room(0);
        self.max_loaded = keep;
        flushed
    }

    /// The key of a blob, loaded under the SRK: from the cache of loaded keys when `cache` names
    /// one, else loaded now (and cached under `cache`, or flushed when the guard drops).
    pub(super) fn key(
        &mut self,
        cache: Option<CacheKey>,
        public: &[u8],
        private: &[u8],
        auth: &SecretBytes,
    ) -> Result<Loaded<'_>, Failure> {
        if let Some(wanted) = cache {
            if let Some(at) = self.loaded.iter().position(|c| c.key == wanted) {
                let hit = self.loaded.remove(at);
                let handle = hit.handle;
                self.loaded.push(hit);
                return Ok(Loaded {
                    conn: self,
                    handle,
                    cached: cache,
                    flush: false,
                });
            }
        }
        let public = Public::unmarshall(public).during("TPM2_Load (unmarshal TPMT_PUBLIC)")?;
        let private = Private::try_from(private).during("TPM2_Load (TPM2B_PRIVATE)")?;
        let auth = Auth::try_from(auth.expose()).during("TPM2_Load (authValue)")?;
        self.make_room(1)?;
        let srk = self.srk;
        let handle = match self.context.load(srk, private.clone(), public.clone()) {
            Ok(handle) => handle,
            // Another program's objects fill the TPM: give back every cached key and try once more.
            Err(e) if errors::is_object_memory(e) && !self.loaded.is_empty() => {
                #[cfg(feature = "testing")]
                OBJECT_MEMORY_RETRIES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.flush_cached()?;
                self.context
                    .load(srk, private, public)
                    .during("TPM2_Load")?
            }
            Err(e) => return Err(e).during("TPM2_Load"),
        };
        // The guard exists before anything else can fail, so every path flushes the handle.
        let mut loaded = Loaded {
            conn: self,
            handle,
            cached: None,
            flush: true,
        };
        // ESAPI does not know a loaded key's authValue; the session's HMAC needs it.
        loaded
            .conn
            .context
            .tr_set_auth(handle.into(), auth)
            .during("Esys_TR_SetAuth")?;
        if let Some(key) = cache {
            loaded.conn.loaded.push(Cached { key, handle });
            loaded.cached = cache;
            loaded.flush = false;
        }
        Ok(loaded)
    }

    /// Seals `secret` (at most 128 bytes) under the SRK; with `pcrs`, only a policy session that
    /// finds those PCRs as they are now can unseal it. Returns the marshalled public area and the
    /// TPM-wrapped private part.
    pub(super) fn seal(
        &mut self,
        secret: &SecretBytes,
        pcrs: Option<&PcrSelectionList>,
    ) -> Result<(Vec<u8>, Vec<u8>), Failure> {
        let policy = match pcrs {
            Some(selection) => Some(self.pcr_policy_digest(selection)?),
            None => None,
        };
        // A sealed-data object: KeyedHash, NULL scheme, neither sign nor decrypt. With a PCR
        // policy, userWithAuth is clear so that no authValue can stand in for the policy.
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .with_user_with_auth(policy.is_none())
            .build()
            .during("TPM2_Create (sealed object attributes)")?;
        let template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_auth_policy(policy.unwrap_or_default())
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .during("TPM2_Create (sealed object template)")?;
        let data = SensitiveData::try_from(secret.expose()).during("TPM2_Create (data to seal)")?;
        self.make_room(1)?;
        let srk = self.srk;
        let created = self
            .context
            .create(srk, template, None, Some(data), None, None)
            .during("TPM2_Create (sealed object)")?;
        let public = created
            .out_public
            .marshall()
            .during("marshal TPMT_PUBLIC")?;
        Ok((public, created.out_private.value().to_vec()))
    }

    /// Unseals what [`Self::seal`] sealed, through a salted policy session when it is bound to
    /// `pcrs` (the TPM answers `TPM_RC_POLICY_FAIL` once they changed).
    pub(super) fn unseal(
        &mut self,
        public: &[u8],
        private: &[u8],
        pcrs: Option<&PcrSelectionList>,
    ) -> Result<SecretBytes, Failure> {
        let empty = SecretBytes::zeroed(0);
        let object = self.key(None, public, private, &empty)?;
        let handle = object.handle;
        let conn = &mut *object.conn;
        let data = match pcrs {
            None => conn.context.unseal(handle.into()).during("TPM2_Unseal")?,
            Some(selection) => {
                let srk = conn.srk;
                let session = conn
                    .context
                    .execute_without_session(|c| {
                        c.start_auth_session(
                            Some(srk),
                            None,
                            None,
                            SessionType::Policy,
                            SymmetricDefinition::AES_128_CFB,
                            HashingAlgorithm::Sha256,
                        )
                    })
                    .during("TPM2_StartAuthSession (policy)")?
                    .ok_or_else(wrong_value)
                    .during("TPM2_StartAuthSession (policy)")?;
                let unsealed = conn.unseal_in_policy(session, handle, selection);
                if let Err(e) = conn
                    .context
                    .flush_context(SessionHandle::from(session).into())
                {
                    tracing::warn!("could not flush a policy session: {e}");
                }
                unsealed?
            }
        };
        drop(object);
        Ok(SecretBytes::copy_from(data.value()))
    }

    fn unseal_in_policy(
        &mut self,
        session: AuthSession,
        object: KeyHandle,
        selection: &PcrSelectionList,
    ) -> Result<SensitiveData, Failure> {
        // The unsealed secret comes back encrypted under the salted session's key.
        let (attributes, mask) = SessionAttributesBuilder::new().with_encrypt(true).build();
        self.context
            .tr_sess_set_attributes(session, attributes, mask)
            .during("Esys_TRSess_SetAttributes (policy)")?;
        let policy = PolicySession::try_from(session).during("TPM2_PolicyPCR")?;
        self.context
            .execute_without_session(|c| c.policy_pcr(policy, Digest::default(), selection.clone()))
            .during("TPM2_PolicyPCR")?;
        self.context
            .execute_with_session(Some(session), |c| c.unseal(object.into()))
            .during("TPM2_Unseal")
    }

    /// The policy digest of "these PCRs hold the values they hold now", from a trial session.
    fn pcr_policy_digest(&mut self, selection: &PcrSelectionList) -> Result<Digest, Failure> {
        let trial = self
            .context
            .execute_without_session(|c| {
                c.start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Trial,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .during("TPM2_StartAuthSession (trial)")?
            .ok_or_else(wrong_value)
            .during("TPM2_StartAuthSession (trial)")?;
        let digest = PolicySession::try_from(trial)
            .and_then(|policy| {
                self.context.execute_without_session(|c| {
                    c.policy_pcr(policy, Digest::default(), selection.clone())?;
                    c.policy_get_digest(policy)
                })
            })
            .during("TPM2_PolicyPCR (trial)");
        if let Err(e) = self
            .context
            .flush_context(SessionHandle::from(trial).into())
        {
            tracing::warn!("could not flush a trial session: {e}");
        }
        digest
    }

    /// Extends PCR `index` of the SHA-256 bank with `digest` (tests of PCR-bound sealing).
    #[cfg(feature = "testing")]
    pub(super) fn extend_pcr(&mut self, index: u8, digest: &[u8]) -> Result<(), Failure> {
        use tss_esapi::handles::PcrHandle;
        use tss_esapi::structures::DigestValues;
        let handle = PcrHandle::try_from(u32::from(index)).during("TPM2_PCR_Extend (index)")?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest).during("TPM2_PCR_Extend (digest)")?,
        );
        self.context
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.pcr_extend(handle, values)
            })
            .during("TPM2_PCR_Extend")
    }

    /// How many transient objects the TPM holds (all of them without a resource manager; this
    /// connection's own behind `/dev/tpmrm0` or tabrmd).
    pub(super) fn transient_handles(&mut self) -> Result<usize, Failure> {
        let (data, _more) = self
            .context
            .execute_without_session(|c| {
                c.get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 254)
            })
            .during("TPM2_GetCapability (transient handles)")?;
        match data {
            CapabilityData::Handles(list) => Ok(list.len()),
            _ => Err(wrong_value()).during("TPM2_GetCapability (transient handles)"),
        }
    }

    /// The manufacturer code and vendor string, as the TPM reports them.
    pub(super) fn vendor(&mut self) -> Result<(String, String), Failure> {
        let manufacturer = self
            .context
            .get_tpm_property(PropertyTag::Manufacturer)
            .during("TPM2_GetCapability (manufacturer)")?
            .map(|m| {
                m.to_be_bytes()
                    .iter()
                    .filter(|b| b.is_ascii_graphic())
                    .map(|&b| char::from(b))
                    .collect::<String>()
            })
            .unwrap_or_default();
        let vendor = tss_esapi::utils::get_tpm_vendor(&mut self.context)
            .during("TPM2_GetCapability (vendor strings)")?;
        Ok((
            manufacturer,
            vendor.trim_end_matches('\0').trim().to_owned(),
        ))
    }

    /// Asks the TPM which curves and algorithms it has, and whether it makes RSA-2048 keys.
    pub(super) fn features(&mut self) -> Result<Features, Failure> {
        self.context.execute_without_session(|c| {
            let curves = match c
                .get_capability(CapabilityType::EccCurves, 0, 64)
                .during("TPM2_GetCapability (ECC curves)")?
                .0
            {
                CapabilityData::EccCurves(list) => list.to_vec(),
                _ => Vec::new(),
            };
            let algorithms = match c
                .get_capability(CapabilityType::Algorithms, 0, 127)
                .during("TPM2_GetCapability (algorithms)")?
                .0
            {
                CapabilityData::Algorithms(list) => list,
                _ => return Err(wrong_value()).during("TPM2_GetCapability (algorithms)"),
            };
            let has = |a: AlgorithmIdentifier| algorithms.find(a).is_some();
            let mut rsa = |bits| -> Result<bool, Failure> {
                let parameters = super::templates::rsa_parameters(bits)
                    .during("TPM2_TestParms (RSA template)")?;
                match c.test_parms(PublicParameters::Rsa(parameters)) {
                    Ok(()) => Ok(true),
                    // The TPM's answer "no" is an error from the TPM; any other error is real.
                    Err(TssError::Tss2Error(rc))
                        if errors::raw_code(rc).is_some_and(|r| r >> 16 == 0) =>
                    {
                        Ok(false)
                    }
                    Err(e) => Err(e).during("TPM2_TestParms (RSA)"),
                }
            };
            let rsa2048 = rsa(RsaKeyBits::Rsa2048)?;
            let rsa3072 = rsa(RsaKeyBits::Rsa3072)?;
            Ok(Features {
                p256: curves.contains(&EccCurveIdentifier::NistP256)
                    && has(AlgorithmIdentifier::EcDsa),
                p384: curves.contains(&EccCurveIdentifier::NistP384)
                    && has(AlgorithmIdentifier::EcDsa),
                rsa2048: rsa2048 && has(AlgorithmIdentifier::Rsa),
                rsa3072: rsa3072 && has(AlgorithmIdentifier::Rsa),
                rsa_pss: has(AlgorithmIdentifier::RsaPss),
                rsa_ssa: has(AlgorithmIdentifier::RsaSsa),
                rsa_oaep: has(AlgorithmIdentifier::Oaep),
                hmac: has(AlgorithmIdentifier::Hmac) && has(AlgorithmIdentifier::KeyedHash),
            })
        })
    }
}

/// A key loaded into the TPM. A cached key stays loaded for the next operation; any other is
/// flushed when the guard is dropped (a TPM holds about three transient objects, so a handle left
/// behind soon stops every other key from loading). A cached key the TPM refused the authValue of
/// is flushed and forgotten too.
#[derive(Debug)]
pub(super) struct Loaded<'c> {
    conn: &'c mut Connection,
    handle: KeyHandle,
    cached: Option<CacheKey>,
    flush: bool,
}

impl Loaded<'_> {
    /// Marks the key for flushing if the TPM refused its authorisation.
    fn checked<T>(&mut self, result: Result<T, Failure>) -> Result<T, Failure> {
        if let Err(failure) = &result {
            if errors::is_auth_failure(failure.error) {
                self.flush = true;
            }
        }
        result
    }

    /// Signs `digest` with the key's own (fixed) scheme.
    pub(super) fn sign(&mut self, digest: &[u8]) -> Result<Signature, Failure> {
        let digest = Digest::try_from(digest).during("TPM2_Sign (digest)")?;
        let ticket = null_ticket().during("TPM2_Sign (ticket)")?;
        let handle = self.handle;
        let signed = self
            .conn
            .context
            .sign(handle, digest, SignatureScheme::Null, ticket)
            .during("TPM2_Sign");
        self.checked(signed)
    }

    /// RSA-OAEP (SHA-256) decryption; `label` must be empty or end in 0x00, at most 64 bytes.
    /// `None` when the ciphertext does not decrypt (wrong key, label or damaged ciphertext).
    pub(super) fn oaep_decrypt(
        &mut self,
        ciphertext: &[u8],
        label: &[u8],
    ) -> Result<Option<SecretBytes>, Failure> {
        let ciphertext =
            PublicKeyRsa::try_from(ciphertext).during("TPM2_RSA_Decrypt (ciphertext)")?;
        let label = Data::try_from(label).during("TPM2_RSA_Decrypt (label)")?;
        let scheme = RsaDecryptionScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256));
        let handle = self.handle;
        let plain = self
            .conn
            .context
            .rsa_decrypt(handle, ciphertext, scheme, label)
            .during("TPM2_RSA_Decrypt");
        match self.checked(plain) {
            Ok(plain) => Ok(Some(SecretBytes::copy_from(plain.value()))),
            Err(f) if errors::is_value(f.error) => Ok(None),
            // libtpms answers a ciphertext whose OAEP padding does not check with
            // TPM_RC_FAILURE, as if it had failed itself; its self-test result tells the two apart.
            Err(f) if errors::is_failure(f.error) => {
                let (_, tested) = self
                    .conn
                    .context
                    .execute_without_session(|c| c.get_test_result())
                    .during("TPM2_GetTestResult")?;
                match tested {
                    Ok(()) => Ok(None),
                    Err(_) => Err(f),
                }
            }
            Err(f) => Err(f),
        }
    }

    /// HMAC-SHA256 of at most 1024 bytes (`TPM2B_MAX_BUFFER`).
    pub(super) fn hmac(&mut self, data: &[u8]) -> Result<Vec<u8>, Failure> {
        let buffer = MaxBuffer::try_from(data).during("TPM2_HMAC (input)")?;
        let handle = self.handle;
        let tag = self
            .conn
            .context
            .hmac(handle.into(), buffer, HashingAlgorithm::Sha256)
            .during("TPM2_HMAC");
        Ok(self.checked(tag)?.value().to_vec())
    }

    /// The key's public area as the TPM holds it.
    pub(super) fn public(&mut self) -> Result<Public, Failure> {
        let handle = self.handle;
        let (public, _, _) = self
            .conn
            .context
            .execute_without_session(|c| c.read_public(handle))
            .during("TPM2_ReadPublic")?;
        Ok(public)
    }
}

impl Drop for Loaded<'_> {
    fn drop(&mut self) {
        if !self.flush {
            return;
        }
        if let Some(key) = self.cached {
            self.conn.loaded.retain(|c| c.key != key);
        }
        if let Err(e) = self.conn.context.flush_context(self.handle.into()) {
            // After a lost connection the flush fails too, and the context is rebuilt anyway
            // (a restarted TPM has no transient objects left). Otherwise it is a leak to report.
            if errors::is_disconnect(e) {
                tracing::debug!("flush of a loaded TPM key failed after the connection was lost");
            } else {
                tracing::warn!("could not flush a loaded TPM key: {e}");
            }
        }
    }
}
