//! The `passphrase` sealer: Argon2id derives a key that seals the root secret with AES-256-GCM.

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sealer::{RootSecret, SealedRoot, Sealer};
use crate::secret::SecretBytes;

const KIND: &str = PassphraseSealer::KIND;
const AAD_DOMAIN: &[u8] = b"keyhold root secret v1\0";
const SALT_LEN: usize = 16;
/// Bounds on parameters read back from a store, so a doctored store cannot make `open` allocate
/// without limit or spin for hours.
const MAX_MEMORY_MIB: u32 = 4096;
const MAX_ITERATIONS: u32 = 64;
const MAX_PARALLELISM: u32 = 64;
/// OWASP's minimum for Argon2id (Password Storage Cheat Sheet: 19 MiB, 2 passes, 1 lane). Below
/// it a stolen store's passphrase is cheap to guess; a store that records less was doctored to
/// make it so (keyhold never wrote less), and is refused before Argon2 runs.
const MIN_MEMORY_MIB: u32 = 19;
const MIN_ITERATIONS: u32 = 2;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory in MiB (at least 19).
    pub memory_mib: u32,
    /// Passes over memory (at least 2).
    pub iterations: u32,
    /// Lanes (at least 1).
    pub parallelism: u32,
}

impl Default for Argon2Params {
    /// RFC 9106, section 4, second recommended option: 64 MiB, 3 passes, 4 lanes.
    fn default() -> Self {
        Self {
            memory_mib: 64,
            iterations: 3,
            parallelism: 4,
        }
    }
}

impl Argon2Params {
    /// Checks the parameters against keyhold's floor and ceiling.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the parameter out of range.
    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, value: u32, min: u32, max: u32| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(Error::InvalidInput(format!(
                    "argon2 {name} must be between {min} and {max}, not {value}"
                )))
            }
        };
        check(
            "memory (MiB)",
            self.memory_mib,
            MIN_MEMORY_MIB,
            MAX_MEMORY_MIB,
        )?;
        check(
            "iterations",
            self.iterations,
            MIN_ITERATIONS,
            MAX_ITERATIONS,
        )?;
        check("parallelism", self.parallelism, 1, MAX_PARALLELISM)
    }
}

/// What the store records about a passphrase seal (all public).
#[derive(Debug, Serialize, Deserialize)]
struct StoredParams {
    kdf: String,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
    salt: String,
}

/// Seals the root secret under a passphrase.
pub struct PassphraseSealer {
    passphrase: SecretString,
    params: Argon2Params,
}

impl std::fmt::Debug for PassphraseSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassphraseSealer")
            .field("passphrase", &"[REDACTED]")
            .field("params", &self.params)
            .finish()
    }
}

impl PassphraseSealer {
    /// The kind recorded in the stores it seals.
    pub const KIND: &'static str = "passphrase";

    /// A sealer for `passphrase` with the default Argon2id parameters (used when sealing; unsealing
    /// reads the parameters from the store).
    pub fn new(passphrase: SecretString) -> Self {
        Self {
            passphrase,
            params: Argon2Params::default(),
        }
    }

    /// Sets the Argon2id parameters used when sealing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if they are out of range.
    pub fn with_params(mut self, params: Argon2Params) -> Result<Self> {
        params.validate()?;
        self.params = params;
        Ok(self)
    }

    fn derive(&self, stored: &StoredParams, salt: &[u8]) -> Result<RandomizedNonceKey> {
        let params = argon2::Params::new(
            stored.memory_kib,
            stored.iterations,
            stored.parallelism,
            Some(32),
        )
        .map_err(|e| Error::Unseal {
            reason: format!("the store's argon2 parameters are invalid: {e}"),
        })?;
        // Argon2's working memory holds values derived from the passphrase; argon2 0.6 frees its
        // own without wiping it, so it works in ours, which is wiped on drop (its `zeroize`
        // feature wipes H0 and the final block; `Zeroizing<Vec<Block>>` compiles only with that
        // feature on, so the build checks that it stays on).
        #[cfg(test)]
        tests::DERIVATIONS.with(|n| n.set(n.get() + 1));
        let mut memory =
            zeroize::Zeroizing::new(vec![argon2::Block::default(); params.block_count()]);
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut kek = SecretBytes::zeroed(32);
        kdf.hash_password_into_with_memory(
            self.passphrase.expose_secret().as_bytes(),
            salt,
            kek.expose_mut(),
            &mut memory[..],
        )
        .map_err(|_| Error::crypto("argon2id key derivation"))?;
        RandomizedNonceKey::new(&AES_256_GCM, kek.expose())
            .map_err(|_| Error::crypto("load the passphrase-derived key"))
    }
}

/// Refuses stored Argon2 parameters outside keyhold's range before Argon2 runs: below the floor
/// they make the passphrase cheap to guess, above the ceiling `open` would allocate or spin
/// without limit. keyhold never writes either, so the store was changed.
fn check_stored(stored: &StoredParams) -> Result<()> {
    let kib = |mib: u32| u64::from(mib) * 1024;
    let memory = u64::from(stored.memory_kib);
    let in_range = (kib(MIN_MEMORY_MIB)..=kib(MAX_MEMORY_MIB)).contains(&memory)
        && (MIN_ITERATIONS..=MAX_ITERATIONS).contains(&stored.iterations)
        && (1..=MAX_PARALLELISM).contains(&stored.parallelism);
    if in_range {
        return Ok(());
    }
    Err(Error::Unseal {
        reason: format!(
            "the store's argon2 parameters were modified ({} KiB, {} passes, {} lanes; keyhold \
             writes at least {MIN_MEMORY_MIB} MiB and {MIN_ITERATIONS} passes): the passphrase \
             was not tried; restore the store from a backup",
            stored.memory_kib, stored.iterations, stored.parallelism
        ),
    })
}

fn aad(store_id: &[u8; 16], params: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 16 + KIND.len() + 1 + params.len());
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(store_id);
    aad.extend_from_slice(KIND.as_bytes());
    aad.push(0);
    aad.extend_from_slice(params);
    aad
}

impl Sealer for PassphraseSealer {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn seal(&self, root: &RootSecret, store_id: &[u8; 16]) -> Result<SealedRoot> {
        if self.passphrase.expose_secret().is_empty() {
            return Err(Error::InvalidInput(
                "the passphrase is empty: choose a long one".into(),
            ));
        }
        let mut salt = [0u8; SALT_LEN];
        aws_lc_rs::rand::fill(&mut salt).map_err(|_| Error::crypto("generate a salt"))?;
        let stored = StoredParams {
            kdf: "argon2id-v19".into(),
            memory_kib: self.params.memory_mib * 1024,
            iterations: self.params.iterations,
            parallelism: self.params.parallelism,
            salt: base64::engine::general_purpose::STANDARD.encode(salt),
        };
        let params = serde_json::to_vec(&stored).map_err(|_| Error::crypto("encode parameters"))?;
        let key = self.derive(&stored, &salt)?;
        let mut buf = Vec::with_capacity(RootSecret::LEN + 16);
        buf.extend_from_slice(root.expose());
        let nonce = key
            .seal_in_place_append_tag(Aad::from(aad(store_id, &params)), &mut buf)
            .map_err(|_| Error::crypto("seal the root secret"))?;
        let mut blob = nonce.as_ref().to_vec();
        blob.extend_from_slice(&buf);
        Ok(SealedRoot {
            sealer: KIND.into(),
            params,
            blob,
        })
    }

    fn unseal(&self, sealed: &SealedRoot, store_id: &[u8; 16]) -> Result<RootSecret> {
        let damaged = |what: &str| Error::Unseal {
            reason: format!("the store's sealed root secret is damaged ({what})"),
        };
        if sealed.sealer != KIND {
            return Err(Error::Unseal {
                reason: format!(
                    "the store is sealed by `{}`, not by a passphrase",
                    sealed.sealer
                ),
            });
        }
        let stored: StoredParams =
            serde_json::from_slice(&sealed.params).map_err(|_| damaged("parameters"))?;
        if stored.kdf != "argon2id-v19" {
            return Err(damaged("unknown KDF"));
        }
        check_stored(&stored)?;
        let salt = base64::engine::general_purpose::STANDARD
            .decode(&stored.salt)
            .ok()
            .filter(|s| s.len() == SALT_LEN)
            .ok_or_else(|| damaged("salt"))?;
        if sealed.blob.len() != NONCE_LEN + RootSecret::LEN + 16 {
            return Err(damaged("length"));
        }
        let key = self.derive(&stored, &salt)?;
        let (nonce, ciphertext) = sealed.blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| damaged("nonce"))?;
        let mut buf = SecretBytes::copy_from(ciphertext);
        let opened = key
            .open_in_place(
                nonce,
                Aad::from(aad(store_id, &sealed.params)),
                buf.expose_mut(),
            )
            .map_err(|_| Error::Unseal {
                reason: "wrong passphrase (or the sealed root secret was modified)".into(),
            })?;
        RootSecret::from_bytes(SecretBytes::copy_from(opened))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Argon2 derivations run on this thread, so a test can tell that a refusal came first.
        pub(super) static DERIVATIONS: Cell<u64> = const { Cell::new(0) };
    }

    /// keyhold's floor: the cheapest parameters it accepts.
    const FAST: Argon2Params = Argon2Params {
        memory_mib: MIN_MEMORY_MIB,
        iterations: MIN_ITERATIONS,
        parallelism: 1,
    };

    fn sealer(pass: &str) -> PassphraseSealer {
        PassphraseSealer::new(SecretString::from(pass.to_owned()))
            .with_params(FAST)
            .unwrap()
    }

    #[test]
    fn seals_and_unseals() {
        let root = RootSecret::generate().unwrap();
        let sealed = sealer("correct horse").seal(&root, &[1; 16]).unwrap();
        let back = sealer("correct horse").unseal(&sealed, &[1; 16]).unwrap();
        assert_eq!(back.expose(), root.expose());
        assert!(!format!("{sealed:?}").contains("correct"));
    }

    fn unseal_reason(sealed: &SealedRoot, store_id: &[u8; 16]) -> String {
        match sealer("correct horse").unseal(sealed, store_id) {
            Err(Error::Unseal { reason }) => reason,
            other => panic!("expected Error::Unseal, got {other:?}"),
        }
    }

    #[test]
    fn refuses_wrong_passphrase_or_store() {
        let root = RootSecret::generate().unwrap();
        let sealed = sealer("correct horse").seal(&root, &[1; 16]).unwrap();
        let err = sealer("wrong horse").unseal(&sealed, &[1; 16]).unwrap_err();
        assert!(
            matches!(&err, Error::Unseal { reason } if reason.starts_with("wrong passphrase")),
            "{err:?}"
        );
        // The store ID is in the AAD: a seal moved to another store does not open there.
        assert!(unseal_reason(&sealed, &[2; 16]).starts_with("wrong passphrase"));
    }

    /// The stored parameters are authenticated (they are in the AAD), not merely used. A change
    /// of cost would be caught anyway (a different cost derives a different key), so this test
    /// changes the parameters' bytes while keeping every value, and with them the derived key:
    /// only the AAD binding can refuse it.
    #[test]
    fn stored_params_are_authenticated_not_just_used() {
        let root = RootSecret::generate().unwrap();
        let sealed = sealer("correct horse").seal(&root, &[1; 16]).unwrap();
        let text = String::from_utf8(sealed.params.clone()).unwrap();
        let reordered: serde_json::Value = serde_json::from_str(&text).unwrap();
        for doctored in [
            text.replacen(',', ", ", 1),
            format!(" {text}"),
            // The same fields in another order, through serde_json's sorted map.
            serde_json::to_string(&reordered).unwrap(),
        ] {
            assert_ne!(doctored.as_bytes(), sealed.params, "{doctored}");
            let same: StoredParams = serde_json::from_str(&doctored).unwrap();
            let orig: StoredParams = serde_json::from_slice(&sealed.params).unwrap();
            assert_eq!(
                (
                    same.memory_kib,
                    same.iterations,
                    same.parallelism,
                    same.salt
                ),
                (
                    orig.memory_kib,
                    orig.iterations,
                    orig.parallelism,
                    orig.salt
                )
            );
            let mut changed = sealed.clone();
            changed.params = doctored.into_bytes();
            let reason = unseal_reason(&changed, &[1; 16]);
            assert_eq!(
                reason, "wrong passphrase (or the sealed root secret was modified)",
                "{reason}"
            );
        }
        // And the untouched seal still opens: the refusals above are the doctoring's doing.
        let back = sealer("correct horse").unseal(&sealed, &[1; 16]).unwrap();
        assert_eq!(back.expose(), root.expose());
    }

    /// The defaults keyhold ships (RFC 9106 §4, second option) are what a default seal records.
    #[test]
    fn default_argon2_params_are_64_mib_3_passes_4_lanes_as_stored() {
        assert_eq!(
            Argon2Params::default(),
            Argon2Params {
                memory_mib: 64,
                iterations: 3,
                parallelism: 4
            }
        );
        let root = RootSecret::generate().unwrap();
        let sealed = PassphraseSealer::new(SecretString::from("correct horse".to_owned()))
            .seal(&root, &[1; 16])
            .unwrap();
        let stored: StoredParams = serde_json::from_slice(&sealed.params).unwrap();
        assert_eq!(
            (
                stored.kdf.as_str(),
                stored.memory_kib,
                stored.iterations,
                stored.parallelism
            ),
            ("argon2id-v19", 64 * 1024, 3, 4)
        );
    }

    #[test]
    fn refuses_empty_passphrase_and_bad_params() {
        let root = RootSecret::generate().unwrap();
        let err = sealer("").seal(&root, &[1; 16]).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidInput(m) if m.contains("passphrase is empty")),
            "{err:?}"
        );
        for (weak, says) in [
            (
                Argon2Params {
                    memory_mib: MIN_MEMORY_MIB - 1,
                    ..FAST
                },
                "argon2 memory (MiB) must be between 19 and 4096, not 18",
            ),
            (
                Argon2Params {
                    iterations: MIN_ITERATIONS - 1,
                    ..FAST
                },
                "argon2 iterations must be between 2 and 64, not 1",
            ),
            (
                Argon2Params {
                    parallelism: 0,
                    ..FAST
                },
                "argon2 parallelism must be between 1 and 64, not 0",
            ),
        ] {
            let err = PassphraseSealer::new(SecretString::from("x".to_owned()))
                .with_params(weak)
                .unwrap_err();
            assert!(
                matches!(&err, Error::InvalidInput(m) if m == says),
                "{err:?}"
            );
        }
    }

    /// A store whose Argon2 parameters were lowered below the floor (to make a stolen copy cheap
    /// to attack, or to learn from timing) is refused before Argon2 runs, with the error that
    /// says they were modified, not "wrong passphrase".
    #[test]
    fn weakened_stored_params_are_refused_before_argon2_runs() {
        let root = RootSecret::generate().unwrap();
        let sealed = sealer("correct horse").seal(&root, &[1; 16]).unwrap();
        let text = String::from_utf8(sealed.params.clone()).unwrap();
        for (from, to) in [
            ("\"memory_kib\":19456", "\"memory_kib\":8192"),
            ("\"iterations\":2", "\"iterations\":1"),
            ("\"memory_kib\":19456", "\"memory_kib\":19455"),
        ] {
            let mut doctored = sealed.clone();
            doctored.params = text.replace(from, to).into_bytes();
            assert_ne!(doctored.params, sealed.params, "{to}");
            let before = DERIVATIONS.with(Cell::get);
            let err = sealer("correct horse")
                .unseal(&doctored, &[1; 16])
                .unwrap_err();
            assert_eq!(DERIVATIONS.with(Cell::get), before, "{to}: argon2 ran");
            match err {
                Error::Unseal { reason } => assert!(
                    reason.contains("argon2 parameters were modified")
                        && reason.contains("passphrase was not tried"),
                    "{to}: {reason}"
                ),
                other => panic!("{to}: expected Error::Unseal, got {other:?}"),
            }
        }
        // The control: the counter does count a derivation that runs.
        let before = DERIVATIONS.with(Cell::get);
        sealer("correct horse").unseal(&sealed, &[1; 16]).unwrap();
        assert_eq!(DERIVATIONS.with(Cell::get), before + 1);
    }
}
