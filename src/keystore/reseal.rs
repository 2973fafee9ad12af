//! Changing how a store's root secret is sealed: re-binding a TPM seal to PCRs, moving a store to
//! another sealer or passphrase, and break-glass recovery from Shamir shares of the root secret.
//!
//! Every path ends the same way ([`replace_seal`]): the root secret, checked against the store
//! (its metadata and records verify under it), is sealed with the new sealer, the new seal is
//! unsealed once and must give back the same root, and only then does one transaction replace
//! the old seal. Keys, records and key IDs never change: they hang off the root secret, not off
//! its seal.

use std::path::Path;

use aws_lc_rs::{constant_time, hmac};

use super::root::DerivedKeys;
use super::root::{check_and_settle, derive_keys, mac_ok, meta_mac, record_mac_ok, unseal_root};
use super::{anchor, Keystore};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::sealer::shares::{self, Share};
use crate::sealer::{RootSecret, SealedRoot, Sealer};
use crate::store::{Store, StoreMeta};

impl Keystore {
    /// Re-seals the root secret of the store in `dir`: unseals it with `unsealer`, builds the new
    /// sealer with `resealer`, seals with it, checks that it unseals the new seal, and only then
    /// replaces the old one (in one transaction). Keys, records and key IDs are unchanged. Used to
    /// re-bind a TPM seal to PCRs after an intended change, or to move a store to another sealer
    /// (or passphrase, or Argon2 cost).
    ///
    /// The store's metadata and records are checked under the unsealed root before anything is
    /// sealed: parameters changed behind keyhold's back (a PCR list) are refused, never re-sealed
    /// to. `resealer` is given the old seal from that authenticated metadata, read in the same
    /// open: whatever the new seal keeps of the old one (its PCR list, its recovery seal) must come
    /// from there, never from an earlier read of the store, which someone who can write the store
    /// may have answered differently. It returns the new sealer and what the caller wants to know
    /// of the old seal (returned once the new seal is in place).
    ///
    /// # Errors
    /// As [`Self::open`] for the unsealing; the errors of `resealer`; sealer errors;
    /// [`Error::Unseal`] if the new seal does not unseal (nothing is changed then); storage errors.
    pub fn reseal<S: Sealer, T>(
        dir: &Path,
        unsealer: &dyn Sealer,
        resealer: impl FnOnce(&SealedRoot) -> Result<(S, T)>,
    ) -> Result<T> {
        Self::reseal_with(dir, unsealer, &Config::default(), resealer)
    }

    /// [`Self::reseal`] with the configuration the store is used with: its anchors (the anchor
    /// file's directory, the TPM whose counter follows the store's generation) are checked
    /// before, and the store is anchored again after, with the new sealer.
    ///
    /// # Errors
    /// As [`Self::reseal`].
    pub fn reseal_with<S: Sealer, T>(
        dir: &Path,
        unsealer: &dyn Sealer,
        config: &Config,
        resealer: impl FnOnce(&SealedRoot) -> Result<(S, T)>,
    ) -> Result<T> {
        let mut store = Store::open(dir)?;
        let (root, keys) = unseal_root(&mut store, unsealer, config.store.anchor_dir().as_deref())?;
        anchor::bind(&mut store, Some(unsealer), config, &keys)?;
        let (resealer, told) = resealer(&store.meta().sealed_root)?;
        replace_seal(&mut store, &root, &keys, &resealer)?;
        anchor::bind(&mut store, Some(&resealer), config, &keys)?;
        Self::with_root(store, &keys, config)?.audit_store_event("store-reseal")?;
        Ok(told)
    }

    /// Splits the root secret of the store in `dir`, unsealed with `unsealer` (and the store
    /// checked under it, as [`Self::open`] does), into `count` recovery shares, any `threshold`
    /// of which rebuild it ([`Self::recover`]). Nothing is written to the store.
    ///
    /// # Errors
    /// As [`Self::open`]; [`Error::InvalidInput`] unless `2 <= threshold <= count`.
    pub fn split_root(
        dir: &Path,
        unsealer: &dyn Sealer,
        config: &Config,
        count: u8,
        threshold: u8,
    ) -> Result<Vec<Share>> {
        let mut store = Store::open(dir)?;
        let (root, keys) = unseal_root(&mut store, unsealer, config.store.anchor_dir().as_deref())?;
        anchor::bind(&mut store, Some(unsealer), config, &keys)?;
        shares::split(&root, &store.meta().store_id, count, threshold)
    }

    /// Break-glass recovery: rebuilds the root secret of the store in `dir` from recovery
    /// `shares` (without its old sealer, whose device may be gone), checks it against the store,
    /// and seals it with `resealer` as [`Self::reseal`] does.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for shares that are mistyped, of another store or split, repeated,
    /// or too few; [`Error::Unseal`] if the shares rebuild a root secret under which the store
    /// does not verify (nothing is changed then); [`Error::Integrity`] for a store changed outside
    /// keyhold; sealer and storage errors.
    ///
    /// The store's commitment and anchor file are checked as at every open; its TPM counter is
    /// not (the TPM may be the thing that died): the store is anchored afresh, to the new
    /// sealer's TPM or the configuration's, if any.
    pub fn recover(
        dir: &Path,
        shares: &[Share],
        resealer: &dyn Sealer,
        config: &Config,
    ) -> Result<()> {
        let mut store = Store::open(dir)?;
        let root = shares::combine(shares, &store.meta().store_id)?;
        let keys = derive_keys(&root, &store.meta().store_id)?;
        check_rebuilt_root(&store, &keys)?;
        check_and_settle(&mut store, &keys, config.store.anchor_dir().as_deref())?;
        replace_seal(&mut store, &root, &keys, resealer)?;
        anchor::bind(&mut store, Some(resealer), config, &keys)?;
        Self::with_root(store, &keys, config)?.audit_store_event("store-recover")
    }
}

/// Refuses a root rebuilt from shares unless the store was made under it: its metadata MAC, or
/// else one of its key records, verifies. (Wrong but well-formed shares give a root secret all
/// the same, just not this store's; [`check_store`] would then blame the store.)
fn check_rebuilt_root(store: &Store, keys: &DerivedKeys) -> Result<()> {
    let meta = store.meta();
    let meta_key = hmac::Key::new(hmac::HMAC_SHA256, keys.meta_mac.expose());
    if [2, 1]
        .into_iter()
        .any(|format| mac_ok(&meta_key, &meta.mac_input(format), &meta.mac))
    {
        return Ok(());
    }
    let record_key = hmac::Key::new(hmac::HMAC_SHA256, keys.record_mac.expose());
    let records = store.keys(None)?;
    if records
        .iter()
        .any(|r| record_mac_ok(&record_key, &meta.store_id, r))
    {
        return Ok(());
    }
    Err(Error::Unseal {
        reason: format!(
            "the recovery shares do not rebuild this store's root secret: neither its metadata \
             nor any of its {} key records verifies under what they give (a share was changed \
             in a way its checksum cannot tell, or the store was replaced since the split); \
             nothing was changed",
            records.len()
        ),
    })
}

/// Seals `root` (checked against `store`) with `resealer`, unseals the new seal to check it gives
/// back `root`, and only then replaces the old seal and the metadata MAC in one transaction.
fn replace_seal(
    store: &mut Store,
    root: &RootSecret,
    keys: &DerivedKeys,
    resealer: &dyn Sealer,
) -> Result<()> {
    let meta = store.meta().clone();
    let sealed = resealer.seal(root, &meta.store_id)?;
    let check = resealer.unseal(&sealed, &meta.store_id)?;
    if constant_time::verify_slices_are_equal(check.expose(), root.expose()).is_err() {
        return Err(Error::Unseal {
            reason: "the new seal did not give back the root secret: nothing was changed".into(),
        });
    }
    let new_meta = StoreMeta {
        sealed_root: sealed,
        ..meta
    };
    store.replace_sealed_root(&new_meta.sealed_root, &meta_mac(keys, &new_meta))?;
    tracing::info!(
        store = %store.dir().display(),
        sealer = resealer.kind(),
        "re-sealed the store"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sealer::{Argon2Params, PassphraseSealer};
    use secrecy::SecretString;

    fn passphrase(p: &str) -> PassphraseSealer {
        let cheap = Argon2Params {
            memory_mib: 19,
            iterations: 2,
            parallelism: 1,
        };
        PassphraseSealer::new(SecretString::from(p.to_owned()))
            .with_params(cheap)
            .unwrap()
    }

    /// A sealer whose seals unseal to another root secret: the fault the check before the
    /// replacement exists for (a device that answers wrongly), which no real sealer gives on
    /// demand.
    #[derive(Debug)]
    struct Forgetful(PassphraseSealer);

    impl Sealer for Forgetful {
        fn kind(&self) -> &'static str {
            PassphraseSealer::KIND
        }
        fn seal(&self, root: &RootSecret, store_id: &[u8; 16]) -> Result<SealedRoot> {
            self.0.seal(root, store_id)
        }
        fn unseal(&self, sealed: &SealedRoot, store_id: &[u8; 16]) -> Result<RootSecret> {
            self.0.unseal(sealed, store_id)?;
            RootSecret::generate()
        }
    }

    /// A new seal is unsealed before it replaces the old one: one that gives back another root
    /// is refused, the database is byte for byte as it was, and the old passphrase still opens
    /// the store while the new one does not.
    #[test]
    fn a_new_seal_that_does_not_give_back_the_root_replaces_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        drop(Keystore::create(&path, &passphrase("the old one")).unwrap());
        let db = path.join(crate::store::DB_FILE);
        let before = std::fs::read(&db).unwrap();
        let err = Keystore::reseal(&path, &passphrase("the old one"), |_| {
            Ok((Forgetful(passphrase("the new one")), ()))
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::Unseal { reason }
                if reason == "the new seal did not give back the root secret: nothing was changed"),
            "{err:?}"
        );
        assert_eq!(std::fs::read(&db).unwrap(), before);
        Keystore::open(&path, &passphrase("the old one")).unwrap();
        let err = Keystore::open(&path, &passphrase("the new one")).unwrap_err();
        assert!(
            matches!(&err, Error::Unseal { reason } if reason.starts_with("wrong passphrase")),
            "{err:?}"
        );
        // The control: the same reseal with an honest sealer does replace the seal.
        Keystore::reseal(&path, &passphrase("the old one"), |_| {
            Ok((passphrase("the new one"), ()))
        })
        .unwrap();
        Keystore::open(&path, &passphrase("the new one")).unwrap();
    }
}
