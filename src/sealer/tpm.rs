//! The `tpm` sealer: the root secret is a TPM sealed-data object under the SRK, optionally bound
//! to PCR values, unsealed at open through a salted, encrypted session.
//!
//! What the store keeps: the sealed object's public area (in the parameters, with the SRK's Name
//! and the PCR list) and its TPM-wrapped private part (the blob). Only this TPM can unseal it, and
//! with PCRs only while they hold the values they had at sealing. The sealed data is the root
//! secret followed by the store ID, so a seal copied into another store is refused.
//!
//! A PCR-bound seal breaks, by design, when firmware or boot configuration changes. To re-bind
//! after an intended change, the root secret must come from somewhere else: a **recovery
//! passphrase** (Argon2id, exactly as the `passphrase` sealer) whose seal is kept beside the TPM's.
//! `keyhold reseal` uses it when the TPM refuses. A store sealed to PCRs without a recovery
//! passphrase is lost when those PCRs change, and `keyhold init` says so.

use std::sync::Arc;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::backend::tpm::device::TpmDevice;
use crate::backend::tpm::SealedObject;
use crate::error::{Error, Result};
use crate::hex;
use crate::sealer::{PassphraseSealer, RootSecret, SealedRoot, Sealer};
use crate::secret::SecretBytes;

const KIND: &str = "tpm";
const WHO: &str = "tpm sealer";

/// What the store records about a TPM seal (public). The TPM binds the public area and its policy
/// to the private part; the rest (PCR list, SRK Name, backend, recovery seal) is covered by the
/// store's metadata MAC, checked once the root secret is unsealed and before any re-seal.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredParams {
    /// The configured TPM backend whose TCTI reaches the TPM, if one was named.
    backend: Option<String>,
    /// The SRK's Name when sealed: identifies the TPM (and its owner seed). Pinned at unseal: a TPM
    /// whose SRK has another Name gets no session.
    srk_name: String,
    /// PCRs of the SHA-256 bank the seal is bound to; empty for none.
    pcrs: Vec<u8>,
    /// The sealed object's public area (hex).
    public: String,
    /// The recovery seal, if any.
    recovery: Option<RecoverySeal>,
}

/// The root secret sealed by a recovery passphrase (the `passphrase` sealer's output, hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverySeal {
    params: String,
    blob: String,
}

/// Asks for the recovery passphrase, only when it is needed.
pub type RecoveryPrompt = Box<dyn Fn() -> Result<SecretString> + Send + Sync>;

/// How a seal can be recovered when the TPM refuses it.
enum Recovery {
    /// No recovery: sealing records none, unsealing has none to try.
    None,
    /// The recovery passphrase: sealing makes a new recovery seal, unsealing falls back to it.
    Passphrase(PassphraseSealer),
    /// Unsealing asks for the recovery passphrase if the TPM refuses; sealing records none.
    Prompt(RecoveryPrompt),
    /// As `Prompt`, but only on another TPM than the one that sealed the store: changed PCRs
    /// are for `keyhold reseal`, which re-binds them.
    PromptOnAnotherTpm(RecoveryPrompt),
    /// Sealing keeps this recovery seal as it is (re-binding to PCRs without the passphrase).
    Keep(RecoverySeal),
}

impl std::fmt::Debug for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "None",
            Self::Passphrase(_) => "Passphrase",
            Self::Prompt(_) => "Prompt",
            Self::PromptOnAnotherTpm(_) => "PromptOnAnotherTpm",
            Self::Keep(_) => "Keep",
        })
    }
}

/// Seals the root secret in a TPM.
#[derive(Debug)]
pub struct TpmSealer {
    device: Arc<TpmDevice>,
    backend: Option<String>,
    pcrs: Vec<u8>,
    recovery: Recovery,
}

fn damaged() -> Error {
    Error::Unseal {
        reason: "the store's tpm seal parameters are damaged".into(),
    }
}

fn parse_params(sealed: &SealedRoot) -> Result<StoredParams> {
    serde_json::from_slice(&sealed.params).map_err(|_| damaged())
}

/// PCRs that software at locality 0 can reset to zero (the PC Client profile's debug PCR 16 and
/// application PCR 23): whoever resets one and extends it with the recorded values recreates the
/// state a seal is bound to, so binding to it protects nothing.
pub const RESETTABLE_PCRS: [u8; 2] = [16, 23];

/// Refuses PCRs that do not exist or that anyone can reset.
fn check_pcrs(pcrs: &[u8]) -> Result<()> {
    if let Some(bad) = pcrs.iter().find(|&&p| p > 23) {
        return Err(Error::InvalidInput(format!(
            "PCR {bad} does not exist: a TPM 2.0 has PCRs 0 to 23"
        )));
    }
    if let Some(bad) = pcrs.iter().find(|p| RESETTABLE_PCRS.contains(p)) {
        return Err(Error::InvalidInput(format!(
            "PCR {bad} can be reset by any program on the machine (TPM2_PCR_Reset from locality 0), \
             so a seal bound to it protects nothing: bind to PCRs that only a boot can reset, such \
             as 0-7 (firmware, boot loader) or 8-15 (the operating system's)"
        )));
    }
    Ok(())
}

/// Parses a PCR list such as `0,7` (sorted, duplicates removed).
///
/// # Errors
/// [`Error::InvalidInput`] for anything but numbers 0 to 23 separated by commas.
pub fn parse_pcrs(list: &str) -> Result<Vec<u8>> {
    let mut pcrs = list
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<u8>()
                .ok()
                .filter(|&i| i <= 23)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "PCR list `{list}`: `{}` is not a PCR number 0-23 (write e.g. `0,7`)",
                        p.trim()
                    ))
                })
        })
        .collect::<Result<Vec<u8>>>()?;
    pcrs.sort_unstable();
    pcrs.dedup();
    Ok(pcrs)
}

impl TpmSealer {
    /// A sealer on `device`, reached through the configured backend `backend` (recorded so the
    /// store can be opened again), sealing without PCRs and without recovery.
    pub fn new(device: Arc<TpmDevice>, backend: Option<String>) -> Self {
        Self {
            device,
            backend,
            pcrs: Vec::new(),
            recovery: Recovery::None,
        }
    }

    /// Binds new seals to these PCRs (SHA-256 bank).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a PCR above 23, or a resettable one ([`RESETTABLE_PCRS`]).
    pub fn with_pcrs(mut self, pcrs: &[u8]) -> Result<Self> {
        check_pcrs(pcrs)?;
        let mut pcrs = pcrs.to_vec();
        pcrs.sort_unstable();
        pcrs.dedup();
        self.pcrs = pcrs;
        Ok(self)
    }

    /// Adds a recovery passphrase: new seals carry a recovery seal, and unsealing falls back to
    /// it when the TPM refuses because the PCRs changed.
    pub fn with_recovery(mut self, passphrase: PassphraseSealer) -> Self {
        self.recovery = Recovery::Passphrase(passphrase);
        self
    }

    /// When the TPM refuses because the PCRs changed, unsealing asks `prompt` for the recovery
    /// passphrase (and only then).
    pub fn with_recovery_prompt(mut self, prompt: RecoveryPrompt) -> Self {
        self.recovery = Recovery::Prompt(prompt);
        self
    }

    /// On another TPM than the one that sealed the store (restored on another machine, or this
    /// TPM cleared), unsealing asks `prompt` for the recovery passphrase (and only then).
    pub fn with_recovery_prompt_on_another_tpm(mut self, prompt: RecoveryPrompt) -> Self {
        self.recovery = Recovery::PromptOnAnotherTpm(prompt);
        self
    }

    /// New seals keep `seal` as their recovery seal (no passphrase needed to re-bind).
    pub fn keeping_recovery(mut self, seal: Option<RecoverySeal>) -> Self {
        self.recovery = seal.map_or(Recovery::None, Recovery::Keep);
        self
    }

    /// The configured backend a `tpm`-sealed store names, if any.
    ///
    /// # Errors
    /// [`Error::Unseal`] if the parameters are damaged.
    pub fn backend_of(sealed: &SealedRoot) -> Result<Option<String>> {
        Ok(parse_params(sealed)?.backend)
    }

    /// The PCRs a `tpm`-sealed store is bound to.
    ///
    /// # Errors
    /// [`Error::Unseal`] if the parameters are damaged.
    pub fn pcrs_of(sealed: &SealedRoot) -> Result<Vec<u8>> {
        Ok(parse_params(sealed)?.pcrs)
    }

    /// The recovery seal of a `tpm`-sealed store, if it has one.
    ///
    /// # Errors
    /// [`Error::Unseal`] if the parameters are damaged.
    pub fn recovery_of(sealed: &SealedRoot) -> Result<Option<RecoverySeal>> {
        Ok(parse_params(sealed)?.recovery)
    }

    /// Unseals the recovery seal, for the reason `why`: the PCRs changed, or (`another_tpm`) the
    /// TPM here is not the one that sealed the store.
    fn recover(
        &self,
        params: &StoredParams,
        store_id: &[u8; 16],
        why: String,
        another_tpm: bool,
    ) -> Result<RootSecret> {
        // A prompt that gets no passphrase says why one was asked for.
        let asked = |ask: &RecoveryPrompt| {
            ask().map(PassphraseSealer::new).map_err(|e| match e {
                Error::Unseal { reason } => Error::Unseal {
                    reason: format!("{why}: {reason}"),
                },
                other => other,
            })
        };
        let prompted;
        let passphrase = match &self.recovery {
            Recovery::Passphrase(p) => Some(p),
            Recovery::Prompt(ask) if params.recovery.is_some() => {
                prompted = asked(ask)?;
                Some(&prompted)
            }
            Recovery::PromptOnAnotherTpm(ask) if another_tpm && params.recovery.is_some() => {
                prompted = asked(ask)?;
                Some(&prompted)
            }
            _ => None,
        };
        let (Some(passphrase), Some(seal)) = (passphrase, &params.recovery) else {
            let hint = if another_tpm {
                "give the recovery passphrase (on the terminal, or with --passphrase-file or \
                 $KEYHOLD_PASSPHRASE); to move the store to this TPM, then run `keyhold reseal \
                 --to passphrase` and `keyhold reseal --to tpm`"
            } else if params.recovery.is_some() {
                "run `keyhold reseal`: it asks for the recovery passphrase and re-binds the store \
                 to the PCRs as they are now"
            } else {
                "this store has no recovery passphrase, so its keys cannot be recovered; restore \
                 the PCR values (boot the previous firmware or configuration) to open it"
            };
            return Err(Error::Unseal {
                reason: format!("{why}: {hint}"),
            });
        };
        let recovery = SealedRoot {
            sealer: passphrase.kind().to_owned(),
            params: hex::decode(&seal.params).ok_or_else(damaged)?,
            blob: hex::decode(&seal.blob).ok_or_else(damaged)?,
        };
        tracing::warn!("{why}: unsealing with the recovery passphrase");
        passphrase.unseal(&recovery, store_id)
    }
}

impl Sealer for TpmSealer {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn tpm(&self) -> Option<(Arc<TpmDevice>, String)> {
        Some((
            Arc::clone(&self.device),
            self.backend.clone().unwrap_or_else(|| "tpm".to_owned()),
        ))
    }

    fn seal(&self, root: &RootSecret, store_id: &[u8; 16]) -> Result<SealedRoot> {
        let mut data = SecretBytes::zeroed(RootSecret::LEN + store_id.len());
        data.expose_mut()[..RootSecret::LEN].copy_from_slice(root.expose());
        data.expose_mut()[RootSecret::LEN..].copy_from_slice(store_id);
        let srk_name = self.device.srk_name(WHO)?;
        let object = self.device.seal(WHO, &data, &self.pcrs)?;
        let recovery = match &self.recovery {
            Recovery::None | Recovery::Prompt(_) | Recovery::PromptOnAnotherTpm(_) => None,
            Recovery::Keep(seal) => Some(seal.clone()),
            Recovery::Passphrase(passphrase) => {
                let sealed = passphrase.seal(root, store_id)?;
                Some(RecoverySeal {
                    params: hex::encode(&sealed.params),
                    blob: hex::encode(&sealed.blob),
                })
            }
        };
        let params = StoredParams {
            backend: self.backend.clone(),
            srk_name: hex::encode(&srk_name),
            pcrs: self.pcrs.clone(),
            public: hex::encode(&object.public),
            recovery,
        };
        Ok(SealedRoot {
            sealer: KIND.to_owned(),
            params: serde_json::to_vec(&params)
                .map_err(|_| Error::crypto("encode the tpm seal parameters"))?,
            blob: object.private,
        })
    }

    fn unseal(&self, sealed: &SealedRoot, store_id: &[u8; 16]) -> Result<RootSecret> {
        let params = parse_params(sealed)?;
        // The Name recorded at init is the only way to know the key a session is salted to is
        // this TPM's SRK and not one an intermediary made. It is read before the root is unsealed
        // (and authenticated with the rest of the metadata right after): a changed Name can only
        // make the unseal fail, never succeed with another TPM's SRK.
        let pinned = hex::decode(&params.srk_name).ok_or_else(damaged)?;
        // Another TPM (another machine, this TPM cleared, or an impostor on the way to it)
        // cannot unseal the root: with a recovery seal, the recovery passphrase opens the store
        // instead. The TPM found is then refused for the rest of the process (nothing is salted
        // to it, sealed by it or counted on it): moving the store to it is an explicit step,
        // `reseal --to passphrase` and then `reseal --to tpm` as for a new store.
        if params.recovery.is_some() {
            let present = self.device.present_srk_name(WHO)?;
            if present != pinned {
                let why = format!(
                    "the TPM here (storage root key Name {}) is not the one that sealed the store \
                     (Name {}): another machine's, this one's before it was cleared, or \
                     something between keyhold and the TPM answering in its place",
                    hex::encode(&present),
                    hex::encode(&pinned)
                );
                self.device.pin_elsewhere(&pinned)?;
                return self.recover(&params, store_id, why, true);
            }
        }
        self.device.pin_srk_name(&pinned)?;
        self.device.connect_now(WHO)?;
        let object = SealedObject {
            public: hex::decode(&params.public).ok_or_else(damaged)?,
            private: sealed.blob.clone(),
        };
        let Some(data) = self.device.unseal(WHO, &object, &params.pcrs)? else {
            let why = format!(
                "the TPM refused to unseal the root secret: PCRs {} no longer hold the values \
                 they had when it was sealed (firmware, boot loader or configuration changed)",
                params
                    .pcrs
                    .iter()
                    .map(u8::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            );
            return self.recover(&params, store_id, why, false);
        };
        let bytes = data.expose();
        if bytes.len() != RootSecret::LEN + store_id.len()
            || bytes[RootSecret::LEN..] != store_id[..]
        {
            return Err(Error::Unseal {
                reason: "the TPM unsealed a secret that belongs to another store".into(),
            });
        }
        RootSecret::from_bytes(SecretBytes::copy_from(&bytes[..RootSecret::LEN]))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn resettable_pcrs_are_refused_with_the_reason() {
        for pcrs in [&[16][..], &[0, 23], &[7, 16, 23]] {
            let err = check_pcrs(pcrs).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidInput(m) if m.contains("can be reset by any program")),
                "{pcrs:?}: {err:?}"
            );
        }
        check_pcrs(&[0, 7, 8, 15]).unwrap();
    }

    #[test]
    fn pcr_lists_parse_strictly() {
        assert_eq!(parse_pcrs("7,0, 7").unwrap(), vec![0, 7]);
        assert_eq!(parse_pcrs("23").unwrap(), vec![23]);
        for bad in ["", "24", "0,,7", "a", "-1", "0;7"] {
            let err = parse_pcrs(bad).unwrap_err();
            assert!(err.to_string().contains("PCR list"), "{bad}: {err}");
        }
    }
}
