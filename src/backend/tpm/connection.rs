//! One connection to a TPM: the ESAPI context, the storage root key and the encrypted session.

use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK, TPM2_TRANSIENT_FIRST};
use tss_esapi::constants::{
    AlgorithmIdentifier, CapabilityType, EccCurveIdentifier, PropertyTag, SessionType,
};
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, CapabilityData, CreateKeyResult, Digest, EccPoint, HashcheckTicket, MaxBuffer, Private,
    Public, PublicBuilder, PublicEccParametersBuilder, PublicParameters, Signature,
    SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::UnMarshall;
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, Error as TssError, WrapperErrorKind};

use super::errors::{During, Failure};
use crate::secret::SecretBytes;

/// The command name of a failed connection attempt (mapped to "unavailable").
pub(super) const CONNECT: &str = "connect (Esys_Initialize)";

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
    pub rsa_pss: bool,
    pub rsa_ssa: bool,
    pub hmac: bool,
}

/// A live connection: the ESAPI context with the SRK loaded and the salted session set.
#[derive(Debug)]
pub(super) struct Connection {
    context: Context,
    srk: KeyHandle,
    session: AuthSession,
    srk_name: Vec<u8>,
}

/// The SRK template, modelled on the ECC storage-key template of the TCG TPM v2.0 Provisioning
/// Guidance. A primary key is derived from the owner seed and its template, so the same TPM always
/// gives the same SRK, and its Name identifies the owner seed: **never change this template** — a
/// different SRK cannot load the blobs made under this one.
///
/// - type ECC, nameAlg SHA-256, empty authPolicy, empty unique (x and y of zero length);
/// - attributes fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, noDA, restricted,
///   decrypt (a storage parent: it wraps child keys and cannot sign); empty authValue;
/// - symmetric AES-128-CFB (protects the children's private parts), scheme NULL, curve NIST P-256,
///   KDF NULL.
fn srk_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .with_sign_encrypt(false)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
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

fn wrong_value() -> TssError {
    TssError::WrapperError(WrapperErrorKind::WrongValueFromTpm)
}

impl Connection {
    /// Connects, checks the TPM's self-test result, creates the SRK and starts the session.
    pub(super) fn open(tcti: &TctiNameConf) -> Result<Self, Failure> {
        let mut context = Context::new(tcti.clone()).during(CONNECT)?;
        let (_, tested) = context
            .execute_without_session(|c| c.get_test_result())
            .during("TPM2_GetTestResult")?;
        tested.during("TPM2_GetTestResult (the TPM failed its self-test)")?;

        // The owner hierarchy's authorisation is empty on a provisioned-by-default TPM; a salted
        // session cannot exist before the key that salts it, so the SRK is made with a password
        // session. From here on, a failure drops `context`, which flushes the SRK.
        let srk = context
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
            })
            .during("TPM2_CreatePrimary (storage root key)")?
            .key_handle;
        let (_, name, _) = context
            .execute_without_session(|c| c.read_public(srk))
            .during("TPM2_ReadPublic (storage root key)")?;

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
        Ok(Self {
            context,
            srk,
            session,
            srk_name: name.value().to_vec(),
        })
    }

    /// Closes a connection whose TPM objects are gone (the TPM was reset or the connection lost)
    /// without flushing them: dropping the context would flush the SRK's and the session's
    /// handles, and on a TPM that was reset those numbers may already name someone else's objects.
    pub(super) fn abandon(mut self) {
        self.context.clear_sessions();
        let mut srk = ObjectHandle::from(self.srk);
        let mut session = ObjectHandle::from(SessionHandle::from(self.session));
        for handle in [&mut srk, &mut session] {
            if let Err(e) = self.context.tr_close(handle) {
                tracing::debug!("could not close a stale ESAPI handle: {e}");
            }
        }
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
        let srk = self.srk;
        self.context
            .create(srk, template, Some(auth), None, None, None)
            .during("TPM2_Create")
    }

    /// Loads a key's blob under the SRK; the guard flushes it when dropped.
    pub(super) fn load(
        &mut self,
        public: &[u8],
        private: &[u8],
        auth: &SecretBytes,
    ) -> Result<Loaded<'_>, Failure> {
        let public = Public::unmarshall(public).during("TPM2_Load (unmarshal TPMT_PUBLIC)")?;
        let private = Private::try_from(private).during("TPM2_Load (TPM2B_PRIVATE)")?;
        let auth = Auth::try_from(auth.expose()).during("TPM2_Load (authValue)")?;
        let srk = self.srk;
        let handle = self
            .context
            .load(srk, private, public)
            .during("TPM2_Load")?;
        // The guard exists before anything else can fail, so every path flushes the handle.
        let loaded = Loaded { conn: self, handle };
        // ESAPI does not know a loaded key's authValue; the session's HMAC needs it.
        loaded
            .conn
            .context
            .tr_set_auth(handle.into(), auth)
            .during("Esys_TR_SetAuth")?;
        Ok(loaded)
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
            let rsa2048 = match super::templates::rsa2048_parameters() {
                Ok(parameters) => match c.test_parms(PublicParameters::Rsa(parameters)) {
                    Ok(()) => true,
                    // The TPM's answer "no" is an error from the TPM; any other error is real.
                    Err(TssError::Tss2Error(rc))
                        if super::errors::raw_code(rc).is_some_and(|r| r >> 16 == 0) =>
                    {
                        false
                    }
                    Err(e) => return Err(e).during("TPM2_TestParms (RSA-2048)"),
                },
                Err(e) => return Err(e).during("TPM2_TestParms (RSA-2048 template)"),
            };
            Ok(Features {
                p256: curves.contains(&EccCurveIdentifier::NistP256)
                    && has(AlgorithmIdentifier::EcDsa),
                p384: curves.contains(&EccCurveIdentifier::NistP384)
                    && has(AlgorithmIdentifier::EcDsa),
                rsa2048: rsa2048 && has(AlgorithmIdentifier::Rsa),
                rsa_pss: has(AlgorithmIdentifier::RsaPss),
                rsa_ssa: has(AlgorithmIdentifier::RsaSsa),
                hmac: has(AlgorithmIdentifier::Hmac) && has(AlgorithmIdentifier::KeyedHash),
            })
        })
    }
}

/// A key loaded into the TPM, flushed when the guard is dropped: a TPM holds about three transient
/// objects, so a handle left behind soon stops every other key from loading.
#[derive(Debug)]
pub(super) struct Loaded<'c> {
    conn: &'c mut Connection,
    handle: KeyHandle,
}

impl Loaded<'_> {
    /// Signs `digest` with the key's own (fixed) scheme.
    pub(super) fn sign(&mut self, digest: &[u8]) -> Result<Signature, Failure> {
        let digest = Digest::try_from(digest).during("TPM2_Sign (digest)")?;
        let ticket = null_ticket().during("TPM2_Sign (ticket)")?;
        self.conn
            .context
            .sign(self.handle, digest, SignatureScheme::Null, ticket)
            .during("TPM2_Sign")
    }

    /// HMAC-SHA256 of at most 1024 bytes (`TPM2B_MAX_BUFFER`).
    pub(super) fn hmac(&mut self, data: &[u8]) -> Result<Vec<u8>, Failure> {
        let buffer = MaxBuffer::try_from(data).during("TPM2_HMAC (input)")?;
        let tag = self
            .conn
            .context
            .hmac(self.handle.into(), buffer, HashingAlgorithm::Sha256)
            .during("TPM2_HMAC")?;
        Ok(tag.value().to_vec())
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
        if let Err(e) = self.conn.context.flush_context(self.handle.into()) {
            // After a lost connection the flush fails too, and the context is rebuilt anyway
            // (a restarted TPM has no transient objects left). Otherwise it is a leak to report.
            if super::errors::is_disconnect(e) {
                tracing::debug!("flush of a loaded TPM key failed after the connection was lost");
            } else {
                tracing::warn!("could not flush a loaded TPM key: {e}");
            }
        }
    }
}
