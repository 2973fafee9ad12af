//! Which counter anchors a store's generation: the TPM of a TPM-sealed store, else the first TPM
//! the configuration names, else the token of a token-sealed store (backend/pkcs11/counter.rs).
//! Without one, the anchor file alone (store/anchor.rs) does.

use std::path::Path;

use crate::config::Config;
use crate::error::Result;
use crate::sealer::Sealer;
use crate::store::{Counter, CounterAt, FileAnchor, Store};

use super::root::DerivedKeys;

/// Binds the store's generation to its counter, if it has one (see [`counter_for`]), and checks
/// it. A store already bound needs that device: it does not open without it. One not yet bound
/// opens without it (and is bound at an open that reaches it), with a warning.
///
/// # Errors
/// As [`Store::bind_counter`]; [`crate::Error::Config`] for a bound store whose counter's device
/// is not there to ask.
pub(super) fn bind(
    store: &mut Store,
    sealer: Option<&dyn Sealer>,
    config: &Config,
    keys: &DerivedKeys,
) -> Result<()> {
    let bound = store.meta().state.as_ref().and_then(|s| s.counter);
    let completed = bound.filter(|b| b.offset.is_some());
    let tolerated = |e: &crate::Error| {
        completed.is_none()
            && matches!(
                e,
                crate::Error::BackendUnavailable { .. }
                    | crate::Error::Timeout { .. }
                    | crate::Error::BackendLogin { .. }
            )
    };
    let counter = match counter_for(store, sealer, config, keys) {
        Ok(Some(counter)) => counter,
        Ok(None) => {
            return match completed {
                Some(binding) => Err(crate::Error::Config(format!(
                    "this store's generation is anchored in {}, but {}",
                    binding.at,
                    match binding.at {
                        CounterAt::TpmNv(_) => {
                            "no TPM is configured: add the TPM back to the configuration (a \
                             [backends.NAME] table with type = \"tpm\")"
                        }
                        CounterAt::Token => {
                            "the store is not opened with that token's sealer (`pkcs11`), or \
                             this build has no PKCS#11 support"
                        }
                    }
                ))),
                None => Ok(()),
            }
        }
        Err(e) if tolerated(&e) => {
            tracing::warn!(error = %e, "the store's generation cannot be anchored in a counter now: only the anchor file guards against a copy put back");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let describe = counter.describe();
    match store.bind_counter(counter) {
        // Only a completed binding makes the device necessary: one interrupted (or never begun)
        // waits for an open that reaches it.
        Err(e @ (crate::Error::BackendUnavailable { .. } | crate::Error::Timeout { .. }))
            if completed.is_none() =>
        {
            tracing::info!(
                error = %e,
                "the store's generation is not anchored in {describe} yet (it is unavailable): \
                 only the anchor file guards against a copy put back"
            );
            Ok(())
        }
        Err(e @ crate::Error::BackendLogin { .. }) if completed.is_none() => {
            tracing::warn!(
                error = %e,
                "the store's generation cannot be anchored in {describe} (the device refused \
                 the authorisation that making the counter takes): only the anchor file guards \
                 against a copy put back"
            );
            Ok(())
        }
        other => other,
    }
}

/// The counter that anchors (or would anchor) the store. A completed binding names its device
/// (and TPM NV index). Otherwise, the first that is there: the sealer's TPM, else the
/// configuration's first TPM (at the store's own index), else the token of a `pkcs11`-sealed
/// store. (A token that only holds keys is not used: binding would make the store refuse to open
/// while the token is away, which its software keys do not need.) `None` without one. Reaches
/// nothing yet.
///
/// # Errors
/// [`crate::Error::Config`] for a TPM the configuration cannot describe.
pub(super) fn counter_for(
    store: &Store,
    sealer: Option<&dyn Sealer>,
    config: &Config,
    keys: &DerivedKeys,
) -> Result<Option<Box<dyn Counter>>> {
    let completed = store
        .meta()
        .state
        .as_ref()
        .and_then(|s| s.counter)
        .filter(|b| b.offset.is_some());
    match completed.map(|b| b.at) {
        Some(CounterAt::TpmNv(index)) => tpm_counter(store, sealer, config, keys, Some(index)),
        Some(CounterAt::Token) => Ok(token_counter(store, sealer, keys)),
        None => match tpm_counter(store, sealer, config, keys, None)? {
            Some(counter) => Ok(Some(counter)),
            None => Ok(token_counter(store, sealer, keys)),
        },
    }
}

/// The store's counter on the sealer's TPM, else on the configuration's first TPM; at `index`,
/// else the store's own.
#[cfg(feature = "tpm")]
fn tpm_counter(
    store: &Store,
    sealer: Option<&dyn Sealer>,
    config: &Config,
    keys: &DerivedKeys,
    index: Option<u32>,
) -> Result<Option<Box<dyn Counter>>> {
    use crate::backend::tpm::{counter_index, TpmCounter};
    use crate::config::BackendConfig;
    let tpm = match sealer.and_then(Sealer::tpm) {
        Some(tpm) => Some(tpm),
        None => config
            .backends
            .iter()
            .find_map(|(name, backend)| match backend {
                BackendConfig::Tpm(t) => Some((name, t)),
                _ => None,
            })
            .map(|(name, t)| -> Result<_> {
                Ok((
                    crate::backend::tpm::device(&t.tcti(), t.settings()?)?,
                    name.clone(),
                ))
            })
            .transpose()?,
    };
    let Some((device, name)) = tpm else {
        return Ok(None);
    };
    let index = index.unwrap_or_else(|| counter_index(&store.meta().store_id));
    Ok(Some(Box::new(TpmCounter::new(
        device,
        &name,
        index,
        &keys.counter_auth,
    ))))
}

#[cfg(not(feature = "tpm"))]
fn tpm_counter(
    _store: &Store,
    _sealer: Option<&dyn Sealer>,
    _config: &Config,
    _keys: &DerivedKeys,
    _index: Option<u32>,
) -> Result<Option<Box<dyn Counter>>> {
    Ok(None)
}

/// The store's counter object on the token of a `pkcs11`-sealed store.
#[cfg(feature = "pkcs11")]
fn token_counter(
    store: &Store,
    sealer: Option<&dyn Sealer>,
    keys: &DerivedKeys,
) -> Option<Box<dyn Counter>> {
    let backend = sealer.and_then(Sealer::pkcs11)?;
    Some(Box::new(crate::backend::pkcs11::TokenCounter::new(
        backend,
        &store.meta().store_id,
        &keys.token_counter_mac,
    )))
}

#[cfg(not(feature = "pkcs11"))]
fn token_counter(
    _store: &Store,
    _sealer: Option<&dyn Sealer>,
    _keys: &DerivedKeys,
) -> Option<Box<dyn Counter>> {
    None
}

/// What [`super::Keystore::reanchor`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reanchored {
    /// The generation the store was at.
    pub from_generation: u64,
    /// The generation it is at now: past its anchor file's.
    pub generation: u64,
    /// Whether it is bound to a counter (a TPM's, or its token's) now.
    pub counter: bool,
}

impl super::Keystore {
    /// Accepts the store in `dir` as it is now and anchors it afresh: for a store refused because
    /// its TPM counter is gone (the TPM was cleared or replaced) or its anchor is ahead of it (a
    /// copy put back on purpose). Everything else is checked as at every open — the sealer, every
    /// row's MAC, the commitment — and only the anchors are not: the store's generation is taken
    /// past its anchor file's, its counter binding dropped and, where there is a TPM, bound to its
    /// counter anew. An audit entry (`store-reanchor`) records it.
    ///
    /// This is the one way to accept an older copy as current: use it only for a copy you put
    /// back yourself, or for a TPM you know was cleared.
    ///
    /// # Errors
    /// As [`Self::open_with`], but for the anchors.
    pub fn reanchor(dir: &Path, sealer: &dyn Sealer, config: &Config) -> Result<Reanchored> {
        let mut store = Store::open(dir)?;
        let (_root, keys) = super::root::unseal_unchecked(&store, sealer)?;
        let checked = super::root::check_store(&store, &keys, None)?;
        // The commitment, not the anchors.
        super::root::settle(&mut store, &keys, checked)?;
        let from_generation = store.meta().state.as_ref().map_or(0, |s| s.generation);
        let anchor_dir = config.store.anchor_dir();
        let anchored = anchor_dir
            .as_ref()
            .and_then(|d| {
                FileAnchor::new(d, &store.meta().store_id)
                    .read()
                    .ok()
                    .flatten()
            })
            .unwrap_or(0);
        // With a TPM, the binding is made pending at the store's index: accepted as it is, the
        // store is bound to the counter wherever it now stands.
        let rebind_at = counter_for(&store, Some(sealer), config, &keys)?.map(|c| c.at());
        let generation = store.restart_generation(anchored.saturating_add(1), rebind_at)?;
        store.reload_state()?;
        if let Some(anchor) = anchor_dir.map(|d| FileAnchor::new(&d, &store.meta().store_id)) {
            anchor.advance(generation)?;
            store.set_anchor(anchor);
        }
        bind(&mut store, Some(sealer), config, &keys)?;
        let counter = store
            .meta()
            .state
            .as_ref()
            .is_some_and(|s| s.counter.is_some_and(|b| b.offset.is_some()))
            || store.counter().is_some();
        tracing::warn!(
            store = %dir.display(),
            from_generation,
            generation,
            "re-anchored the store: accepted as it is, its generation past its anchor file's{}",
            if counter { ", bound to its counter anew" } else { "" }
        );
        Self::with_root(store, &keys, config)?.audit_store_event("store-reanchor")?;
        Ok(Reanchored {
            from_generation,
            generation,
            counter,
        })
    }
}
