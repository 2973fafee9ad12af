//! A TPM NV counter (`TPM_NT_COUNTER`): the anchor of a store's generation.
//!
//! A counter only goes up, and a counter defined anew starts at the highest count any counter on
//! the TPM ever had (TPM 2.0 Part 1, §37.2.3.4): deleting it (which takes the owner's
//! authorisation) and defining it again cannot bring it back down. Reading and incrementing take
//! the index's own authValue, which keyhold derives from the store's root secret, so only keyhold
//! with the store unsealed advances it. `TPMA_NV_NO_DA`: that authValue is a 256-bit key, and
//! a wrong guess must not count towards the TPM's dictionary-attack lockout, which would lock
//! every other user of the TPM out too.

use tss_esapi::attributes::{NvIndexAttributes, NvIndexAttributesBuilder};
use tss_esapi::constants::NvIndexType;
use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::structures::{Auth, NvPublic, NvPublicBuilder};
use tss_esapi::Context;

use std::sync::Arc;

use super::connection::Connection;
use super::device::TpmDevice;
use super::errors::{self, During, Failure};
use crate::error::Result;
use crate::secret::SecretBytes;
use crate::store::{Counter, CounterValue};

/// The owner's range of NV indices (TCG "Registry of Reserved TPM 2.0 Handles and Localities"):
/// 0x01000000 to 0x013FFFFF.
const OWNER_FIRST: u32 = 0x0100_0000;
const OWNER_MASK: u32 = 0x003F_FFFF;

/// The NV index keyhold uses for the store `store_id`: in the owner's range, from a digest of the
/// store ID (so every store on a TPM has its own, and finds it again without recording it).
pub fn counter_index(store_id: &[u8; 16]) -> u32 {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &[b"keyhold nv counter index\0".as_slice(), store_id].concat(),
    );
    let mut word = [0u8; 4];
    word.copy_from_slice(&digest.as_ref()[..4]);
    OWNER_FIRST | (u32::from_be_bytes(word) & OWNER_MASK)
}

/// A store's counter on a TPM: the [`Counter`] the store's generation follows.
pub struct TpmCounter {
    device: Arc<TpmDevice>,
    who: String,
    index: u32,
    auth: SecretBytes,
}

impl std::fmt::Debug for TpmCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmCounter")
            .field("who", &self.who)
            .field("index", &format_args!("{:#010x}", self.index))
            .finish_non_exhaustive()
    }
}

impl TpmCounter {
    /// The counter at `index` on `device` (named `who` in messages), authorised by `auth` (32
    /// bytes derived from the store's root).
    pub fn new(device: Arc<TpmDevice>, who: &str, index: u32, auth: &SecretBytes) -> Self {
        Self {
            device,
            who: who.to_owned(),
            index,
            auth: SecretBytes::copy_from(auth.expose()),
        }
    }
}

impl Counter for TpmCounter {
    fn describe(&self) -> String {
        format!("the NV counter {:#010x} of TPM `{}`", self.index, self.who)
    }

    fn at(&self) -> crate::store::CounterAt {
        crate::store::CounterAt::TpmNv(self.index)
    }

    fn gone_how(&self) -> &'static str {
        "it was deleted with the TPM owner's authorisation, or the TPM was cleared"
    }

    fn foreign_how(&self) -> &'static str {
        "other attributes, or an authorisation value keyhold did not set"
    }

    fn read(&self) -> Result<CounterValue> {
        let state = self
            .device
            .run(&self.who, |c| c.counter_read(self.index, &self.auth))?;
        Ok(match state {
            CounterState::Absent => CounterValue::Absent,
            CounterState::Foreign => CounterValue::Foreign,
            CounterState::Count(n) => CounterValue::Count(n),
        })
    }

    fn create(&self) -> Result<()> {
        self.device
            .run_once(&self.who, |c| c.counter_define(self.index, &self.auth))
    }

    fn increment(&self) -> Result<()> {
        self.device
            .run_once(&self.who, |c| c.counter_increment(self.index, &self.auth))
    }
}

/// What an NV index holds, as seen with keyhold's authValue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterState {
    /// Nothing is defined at the index.
    Absent,
    /// Something is, but not keyhold's counter: other attributes, or an authValue other than
    /// keyhold's.
    Foreign,
    /// keyhold's counter, at this count.
    Count(u64),
}

/// The counter's public area at `index`.
fn counter_public(index: NvIndexTpmHandle) -> tss_esapi::Result<NvPublic> {
    NvPublicBuilder::new()
        .with_nv_index(index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(counter_attributes()?)
        .with_data_area_size(8)
        .build()
}

fn counter_attributes() -> tss_esapi::Result<NvIndexAttributes> {
    NvIndexAttributesBuilder::new()
        .with_nv_index_type(NvIndexType::Counter)
        .with_auth_write(true)
        .with_auth_read(true)
        .with_no_da(true)
        .build()
}

/// Whether `public` is keyhold's counter at `index` (the `written` bit aside).
fn is_ours(public: &NvPublic, index: NvIndexTpmHandle) -> bool {
    let Ok(expected) = counter_public(index) else {
        return false;
    };
    // TPMA_NV_WRITTEN (bit 29) is set by the first increment.
    const WRITTEN: u32 = 1 << 29;
    let raw = |a: NvIndexAttributes| tss_esapi::tss2_esys::TPMA_NV::try_from(a).ok();
    matches!(
        (raw(public.attributes()), raw(expected.attributes())),
        (Some(found), Some(ours)) if found & !WRITTEN == ours
    ) && public.name_algorithm() == expected.name_algorithm()
        && public.data_size() == expected.data_size()
        && public.authorization_policy().is_empty()
}

/// The index handle, in the owner's range.
pub(super) fn index_handle(index: u32) -> Result<NvIndexTpmHandle, Failure> {
    NvIndexTpmHandle::new(index).during("the NV index handle")
}

/// Runs `op` on the ESAPI handle of `index`, with `auth` set, and closes it.
fn with_index<T>(
    context: &mut Context,
    index: NvIndexTpmHandle,
    auth: &SecretBytes,
    op: impl FnOnce(&mut Context, NvIndexHandle) -> Result<T, Failure>,
) -> Result<Option<T>, Failure> {
    let object = match context
        .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(index)))
    {
        Ok(object) => object,
        Err(e) if errors::is_missing_handle(e) => return Ok(None),
        Err(e) => {
            return Err(Failure {
                command: "TPM2_NV_ReadPublic (the anchor's counter)",
                error: e,
            })
        }
    };
    let handle = NvIndexHandle::from(object);
    let result = Auth::try_from(auth.expose())
        .and_then(|a| context.tr_set_auth(object, a))
        .during("Esys_TR_SetAuth (the anchor's counter)")
        .and_then(|()| op(context, handle));
    let mut object: ObjectHandle = handle.into();
    if let Err(e) = context.tr_close(&mut object) {
        tracing::debug!("could not close the NV index's ESAPI handle: {e}");
    }
    result.map(Some)
}

impl Connection {
    /// The counter at `index`, read with `auth`.
    pub(super) fn counter_read(
        &mut self,
        index: u32,
        auth: &SecretBytes,
    ) -> Result<CounterState, Failure> {
        let index = index_handle(index)?;
        let read = with_index(self.context_mut(), index, auth, |context, handle| {
            let (public, _) = context
                .execute_without_session(|c| c.nv_read_public(handle))
                .during("TPM2_NV_ReadPublic (the anchor's counter)")?;
            if !is_ours(&public, index) {
                return Ok(CounterState::Foreign);
            }
            if !public.attributes().written() {
                // Defined, never incremented (a crash right after the definition).
                return Ok(CounterState::Count(0));
            }
            match context.nv_read(NvAuth::NvIndex(handle), handle, 8, 0) {
                Ok(data) => {
                    let bytes: [u8; 8] = data.as_slice().try_into().map_err(|_| Failure {
                        command: "TPM2_NV_Read (the anchor's counter)",
                        error: super::connection::wrong_value(),
                    })?;
                    Ok(CounterState::Count(u64::from_be_bytes(bytes)))
                }
                Err(e) if errors::is_auth_failure(e) => Ok(CounterState::Foreign),
                Err(e) => Err(Failure {
                    command: "TPM2_NV_Read (the anchor's counter)",
                    error: e,
                }),
            }
        })?;
        Ok(read.unwrap_or(CounterState::Absent))
    }

    /// Defines the counter at `index` with `auth` (the owner's authorisation, normally empty)
    /// and increments it once, which makes it readable.
    pub(super) fn counter_define(&mut self, index: u32, auth: &SecretBytes) -> Result<(), Failure> {
        let index = index_handle(index)?;
        let public = counter_public(index).during("the anchor counter's public area")?;
        let auth_value = Auth::try_from(auth.expose()).during("the anchor counter's authValue")?;
        let handle = self
            .context_mut()
            .nv_define_space(Provision::Owner, Some(auth_value), public)
            .during("TPM2_NV_DefineSpace (the anchor's counter)")?;
        let mut object: ObjectHandle = handle.into();
        let _ = self.context_mut().tr_close(&mut object);
        self.counter_increment_at(index, auth)
    }

    /// Increments the counter at `index`.
    pub(super) fn counter_increment(
        &mut self,
        index: u32,
        auth: &SecretBytes,
    ) -> Result<(), Failure> {
        self.counter_increment_at(index_handle(index)?, auth)
    }

    fn counter_increment_at(
        &mut self,
        index: NvIndexTpmHandle,
        auth: &SecretBytes,
    ) -> Result<(), Failure> {
        let done = with_index(self.context_mut(), index, auth, |context, handle| {
            context
                .nv_increment(NvAuth::NvIndex(handle), handle)
                .during("TPM2_NV_Increment (the anchor's counter)")
        })?;
        done.ok_or(Failure {
            command: "TPM2_NV_Increment (the anchor's counter is not defined)",
            error: super::connection::wrong_value(),
        })
    }
}
