//! The root secret: the keys derived from it, unsealing it, and checking the store under it
//! (metadata MAC and every record) before the store is used.

use aws_lc_rs::{constant_time, hkdf, hmac};

use crate::error::{Error, Result};
use crate::sealer::{RootSecret, Sealer};
use crate::secret::SecretBytes;
use crate::store::{KeyRecord, Store, StoreMeta};

/// Keys derived from the root secret, each for one job (HKDF-SHA256, salt = store ID).
pub(super) struct DerivedKeys {
    pub(super) key_id_mac: SecretBytes,
    pub(super) record_mac: SecretBytes,
    pub(super) software_kek: SecretBytes,
    pub(super) tpm_auth_kek: SecretBytes,
    pub(super) meta_mac: SecretBytes,
    pub(super) audit_mac: SecretBytes,
}

pub(super) fn derive_keys(root: &RootSecret, store_id: &[u8; 16]) -> Result<DerivedKeys> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, store_id).extract(root.expose());
    let expand = |info: &'static [u8]| -> Result<SecretBytes> {
        let mut out = SecretBytes::zeroed(32);
        prk.expand(&[info], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(out.expose_mut()))
            .map_err(|_| Error::crypto("derive the store's keys"))?;
        Ok(out)
    };
    Ok(DerivedKeys {
        key_id_mac: expand(b"keyhold v1 key-id mac")?,
        record_mac: expand(b"keyhold v1 record mac")?,
        software_kek: expand(b"keyhold v1 software kek")?,
        tpm_auth_kek: expand(b"keyhold v1 tpm auth kek")?,
        meta_mac: expand(b"keyhold v1 store meta mac")?,
        audit_mac: expand(b"keyhold v1 audit mac")?,
    })
}

/// The MAC of a store's metadata under the key derived for it.
pub(super) fn meta_mac(keys: &DerivedKeys, meta: &StoreMeta) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, keys.meta_mac.expose());
    hmac::sign(&key, &meta.mac_input()).as_ref().to_vec()
}

/// Whether `record` carries its MAC under `key` (the record-MAC key) for store `store_id`.
pub(super) fn record_mac_ok(key: &hmac::Key, store_id: &[u8; 16], record: &KeyRecord) -> bool {
    record
        .mac_input(store_id)
        .is_some_and(|input| mac_ok(key, &input, &record.mac))
}

/// Whether `mac` is the MAC of `input` under `key`, compared in constant time.
pub(super) fn mac_ok(key: &hmac::Key, input: &[u8], mac: &[u8]) -> bool {
    let expected = hmac::sign(key, input);
    constant_time::verify_slices_are_equal(expected.as_ref(), mac).is_ok()
}

/// Checks, right after unsealing and before anything is written or re-sealed, that the root
/// secret is the one the store's records were made under and that the metadata (sealer kind and
/// parameters: PCRs, SRK Name, recovery seal, KDF settings) is what keyhold wrote.
///
/// Whoever can write the store directory can put in a seal of a root they chose, and a MAC under
/// it: the metadata MAC alone cannot tell that seal from ours. The records can: they were MAC'd
/// under the old root, so under a replaced one none of them verifies. Every record is checked
/// (an HMAC each), and any failure refuses the store: a replaced root with one record forged
/// under it must not open either, or new keys would be made under a key-encryption key the
/// intruder knows. (A replaced root in a store whose records were all deleted cannot be told
/// from a new store; the sealer the user states, not the store, is the defence there.)
pub(super) fn check_store(store: &Store, keys: &DerivedKeys) -> Result<()> {
    let meta = store.meta();
    let record_mac = hmac::Key::new(hmac::HMAC_SHA256, keys.record_mac.expose());
    let records = store.keys(None)?;
    let failed: Vec<&KeyRecord> = records
        .iter()
        .filter(|r| !record_mac_ok(&record_mac, &meta.store_id, r))
        .collect();
    // Every record failing means a root the records were not made under, unless the seal is one
    // only the user's secret opens: a passphrase seal that opened is genuine, so its records
    // were changed.
    if !records.is_empty()
        && failed.len() == records.len()
        && meta.sealed_root.sealer != crate::sealer::PassphraseSealer::KIND
    {
        return Err(Error::Unseal {
            reason: format!(
                "none of the store's {} key records verifies under the root secret the `{}` \
                 sealer gave back: its sealed root secret was replaced (someone who can write \
                 the store directory and use the device put in a seal of their own), or every \
                 record was changed; do not create keys in this store, and restore it from a \
                 backup",
                records.len(),
                meta.sealed_root.sealer
            ),
        });
    }
    let expected = meta_mac(keys, meta);
    if meta.mac.is_empty() || constant_time::verify_slices_are_equal(&expected, &meta.mac).is_err()
    {
        return Err(Error::Integrity {
            what: format!(
                "the store's sealer metadata (sealer `{}`, its parameters such as PCRs, SRK Name \
                 and recovery seal) {}; keyhold changed nothing: restore the store from a backup",
                meta.sealed_root.sealer,
                if meta.mac.is_empty() {
                    "carries no MAC (stores made by development builds before the metadata MAC \
                     lack one and do not open with this version; a store made since always has \
                     one, so a missing MAC was removed)"
                } else {
                    "failed its MAC"
                }
            ),
        });
    }
    // The lifecycle's rows: a key's later versions, its history, its AES-GCM counters.
    let bad: Vec<String> = super::verify::failing_rows(
        &record_mac,
        &meta.store_id,
        &store.versions(None)?,
        &store.events(None)?,
        &store.counters()?,
    )
    .iter()
    .map(ToString::to_string)
    .collect();
    if let Some(first) = bad.first() {
        return Err(Error::Integrity {
            what: format!(
                "{} of the store's version, history and counter rows fail their MAC (the first: \
                 {first})",
                bad.len()
            ),
        });
    }
    if let Some(first) = failed.first() {
        return Err(Error::Integrity {
            what: format!(
                "{} of the store's {} key records fail their MAC (the first: key {}): they were \
                 changed outside keyhold, or the sealed root secret was replaced and records \
                 were added under it",
                failed.len(),
                records.len(),
                crate::hex::encode(&first.uuid)
            ),
        });
    }
    Ok(())
}

/// Unseals `store`'s root secret with `sealer`, which must be the kind that sealed it, and checks
/// the store against it ([`check_store`]).
///
/// The caller's sealer is the expectation the store cannot forge: a store that records another
/// kind is refused before anything is unsealed, whatever its metadata says.
pub(super) fn unseal_root(store: &Store, sealer: &dyn Sealer) -> Result<(RootSecret, DerivedKeys)> {
    let (root, keys) = unseal_unchecked(store, sealer)?;
    check_store(store, &keys)?;
    Ok((root, keys))
}

/// [`unseal_root`] without [`check_store`]: for `store verify` alone, which reports every record
/// that fails rather than refusing the store at the first, and writes nothing.
pub(super) fn unseal_unchecked(
    store: &Store,
    sealer: &dyn Sealer,
) -> Result<(RootSecret, DerivedKeys)> {
    let meta = store.meta();
    if meta.sealed_root.sealer != sealer.kind() {
        return Err(Error::Unseal {
            reason: format!(
                "the store records a `{}` seal, but the caller expects a `{}` seal: keyhold does \
                 not follow a change of sealer it did not make (`keyhold reseal` makes one); if \
                 nobody changed it, its sealed root secret was replaced",
                meta.sealed_root.sealer,
                sealer.kind()
            ),
        });
    }
    let root = sealer.unseal(&meta.sealed_root, &meta.store_id)?;
    let keys = derive_keys(&root, &meta.store_id)?;
    Ok((root, keys))
}
