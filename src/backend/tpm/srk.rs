//! The storage root key: its fixed template, making or adopting it, and the Name sessions are
//! salted to, computed from the very public area ESAPI holds (L1).

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::AlgorithmIdentifier;
use tss_esapi::handles::{KeyHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    EccPoint, Public, PublicBuilder, PublicEccParametersBuilder, SymmetricDefinitionObject,
};
use tss_esapi::traits::Marshall;
use tss_esapi::{Context, Error as TssError, WrapperErrorKind};

use super::connection::{wrong_value, FOREIGN_SRK};
use super::errors::{self, During, Failure};

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
pub(super) fn srk_template() -> tss_esapi::Result<Public> {
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

/// Derives the SRK from the owner seed as a transient object.
///
/// The owner hierarchy's authorisation is empty on a provisioned-by-default TPM; a salted session
/// cannot exist before the key that salts it, so the SRK is made with a password session. From
/// here on, a failure drops the context, which flushes the SRK.
///
/// Returns the public area from the TPM2_CreatePrimary response too: ESAPI keeps that one for the
/// handle, and salts sessions to it.
pub(super) fn create_srk(context: &mut Context) -> Result<(KeyHandle, Public), Failure> {
    let created = context
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
        })
        .during("TPM2_CreatePrimary (storage root key)")?;
    Ok((created.key_handle, created.out_public))
}

/// The SRK at the persistent handle `handle`, made and persisted there if the handle is empty.
///
/// An object already at the handle is used only if it has exactly keyhold's SRK template (its
/// unique field aside): another program's key there is an error, never silently adopted. Returns
/// the public area the template was checked on; [`salting_name`] ties it to the one ESAPI holds.
pub(super) fn persistent_srk(
    context: &mut Context,
    handle: u32,
) -> Result<(KeyHandle, Public), Failure> {
    const WHAT: &str = "persistent storage root key";
    let persistent = PersistentTpmHandle::new(handle).during("persistent SRK handle")?;
    let found = context
        .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(persistent)));
    match found {
        Ok(object) => {
            let srk = KeyHandle::from(object);
            let (public, _, _) = context
                .execute_without_session(|c| c.read_public(srk))
                .during("TPM2_ReadPublic (persistent storage root key)")?;
            if !is_srk(&public) {
                return Err(Failure {
                    command: FOREIGN_SRK,
                    error: TssError::WrapperError(WrapperErrorKind::InconsistentParams),
                });
            }
            Ok((srk, public))
        }
        Err(e) if errors::is_missing_handle(e) => {
            let (transient, public) = create_srk(context)?;
            let persisted = context
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.evict_control(
                        Provision::Owner,
                        transient.into(),
                        Persistent::Persistent(persistent),
                    )
                })
                .during("TPM2_EvictControl (persist the storage root key)");
            if let Err(e) = context.flush_context(transient.into()) {
                tracing::debug!("could not flush the transient copy of the SRK: {e}");
            }
            tracing::info!("persisted the storage root key at {handle:#010x}");
            Ok((KeyHandle::from(persisted?), public))
        }
        Err(e) => Err(e).during(WHAT),
    }
}

/// Whether `public` is keyhold's SRK template (whatever its unique field).
pub(super) fn is_srk(public: &Public) -> bool {
    let Ok(template) = srk_template() else {
        return false;
    };
    match (public, &template) {
        (
            Public::Ecc {
                object_attributes,
                name_hashing_algorithm,
                auth_policy,
                parameters,
                ..
            },
            Public::Ecc {
                object_attributes: a,
                name_hashing_algorithm: n,
                auth_policy: p,
                parameters: q,
                ..
            },
        ) => {
            object_attributes == a
                && name_hashing_algorithm == n
                && auth_policy == p
                && parameters == q
        }
        _ => false,
    }
}

/// The Name of a TPM object, computed from its public area: nameAlg ‖ H_nameAlg(TPMT_PUBLIC).
///
/// Computed here rather than taken from the TPM, which can report any Name it likes: only a Name
/// computed from the public key that salts the session says which key that is.
pub(super) fn name_of(public: &Public) -> Result<Vec<u8>, Failure> {
    if public.name_hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err(wrong_value()).during("storage root key (its nameAlg is not SHA-256)");
    }
    let marshalled = public
        .marshall()
        .during("storage root key (marshal its public area)")?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &marshalled);
    let mut name = Vec::with_capacity(2 + digest.as_ref().len());
    name.extend_from_slice(&u16::from(AlgorithmIdentifier::Sha256).to_be_bytes());
    name.extend_from_slice(digest.as_ref());
    Ok(name)
}

/// The Name of the key ESAPI salts sessions to when `srk` is the salt key, checked to be the Name of
/// `public`.
///
/// ESAPI keeps one public area per handle — the one TPM2_CreatePrimary returned, or the one
/// Esys_TR_FromTPMPublic read — and salts to that; a later TPM2_ReadPublic does not replace it.
/// So the Name compared with a pinned one must be this one (Esys_TR_GetName computes it from
/// that public area), not the Name of what another command returned: something between keyhold
/// and the TPM could answer that command with the real SRK and the first with its own key. The
/// Name is computed here from `public` as well, so that `public` (whose template the caller may
/// have checked) is the very key sessions are salted to.
pub(super) fn salting_name(
    context: &mut Context,
    srk: KeyHandle,
    public: &Public,
) -> Result<Vec<u8>, Failure> {
    let held = context
        .tr_get_name(srk.into())
        .during("Esys_TR_GetName (storage root key)")?;
    let name = name_of(public)?;
    if held.value() != name.as_slice() {
        return Err(wrong_value()).during(
            "Esys_TR_GetName (the SRK that sessions would be salted to is not the one checked)",
        );
    }
    Ok(name)
}

#[cfg(test)]
#[cfg(feature = "testing")]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::str::FromStr;

    use tss_esapi::tcti_ldr::TctiNameConf;

    /// L1: the Name compared with a pinned one is the Name of the key ESAPI salts sessions to
    /// (what Esys_TR_GetName reports for the salt handle), not the Name of some public area the
    /// TPM returned for it. ESAPI holding another key for the handle than the public area checked
    /// — what a man-in-the-middle who answers TPM2_CreatePrimary with its own key arranges — is
    /// refused.
    #[test]
    fn the_compared_name_is_the_name_of_the_key_sessions_are_salted_to() {
        let tpm = super::super::fixture::Swtpm::new().unwrap();
        let mut context = Context::new(TctiNameConf::from_str(&tpm.tcti()).unwrap()).unwrap();
        let (srk, public) = create_srk(&mut context).unwrap();
        let name = salting_name(&mut context, srk, &public).unwrap();
        assert_eq!(
            name,
            context.tr_get_name(srk.into()).unwrap().value(),
            "the Name checked is not the one ESAPI holds for the salt key"
        );
        // Another key of the same template (the endorsement hierarchy's), as ESAPI would hold it
        // for the SRK handle after a forged TPM2_CreatePrimary answer, while the public area
        // checked is the genuine SRK's.
        let other = context
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(
                    Hierarchy::Endorsement,
                    srk_template()?,
                    None,
                    None,
                    None,
                    None,
                )
            })
            .unwrap();
        assert_ne!(name_of(&other.out_public).unwrap(), name);
        let refused = salting_name(&mut context, other.key_handle, &public).unwrap_err();
        assert!(
            refused.command.contains("salted to is not the one checked"),
            "{}",
            refused.command
        );
        assert!(matches!(
            refused.error,
            TssError::WrapperError(WrapperErrorKind::WrongValueFromTpm)
        ));
    }
}
