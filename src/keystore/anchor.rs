//! Which counter anchors a store's generation: the TPM of a TPM-sealed store, else the first TPM
//! the configuration names. Without one, the anchor file alone (store/anchor.rs) does.

use std::path::Path;

use crate::config::Config;
use crate::error::Result;
use crate::sealer::Sealer;
use crate::store::{Counter, FileAnchor, Store};

use super::root::DerivedKeys;

/// Binds the store's generation to its TPM's counter, if it has a TPM (see the module docs), and
/// checks it. A store already bound needs its TPM: it does not open without it. One not yet
/// bound opens without it (and is bound at an open that reaches it), with a warning.
///
/// # Errors
/// As [`Store::bind_counter`]; [`crate::Error::Config`] for a bound store whose configuration
/// names no TPM.
#[cfg(feature = "tpm")]
pub(super) fn bind(
    store: &mut Store,
    sealer: Option<&dyn Sealer>,
    config: &Config,
    keys: &DerivedKeys,
) -> Result<()> {
    let bound = store.meta().state.as_ref().and_then(|s| s.counter);
    let Some((counter, index, name)) = counter_for(store, sealer, config, keys)? else {
        return match bound.filter(|b| b.offset.is_some()) {
            Some(binding) => Err(crate::Error::Config(format!(
                "this store's generation is anchored in the NV counter {:#010x} of a TPM, but \
                 no TPM is configured: add the TPM back to the configuration (a [backends.NAME] \
                 table with type = \"tpm\")",
                binding.index
            ))),
            None => Ok(()),
        };
    };
    match store.bind_counter(counter, index) {
        // Only a completed binding makes the TPM necessary: one interrupted (or never begun)
        // waits for an open that reaches the TPM.
        Err(e @ (crate::Error::BackendUnavailable { .. } | crate::Error::Timeout { .. }))
            if bound.is_none_or(|b| b.offset.is_none()) =>
        {
            tracing::info!(
                error = %e,
                "the store's generation is not anchored in TPM `{name}` yet (the TPM is \
                 unavailable): only the anchor file guards against a copy put back"
            );
            Ok(())
        }
        Err(e @ crate::Error::BackendLogin { .. }) if bound.is_none_or(|b| b.offset.is_none()) => {
            tracing::warn!(
                error = %e,
                "the store's generation cannot be anchored in TPM `{name}` (the TPM refused the \
                 owner's authorisation, which defining its counter takes): only the anchor file \
                 guards against a copy put back"
            );
            Ok(())
        }
        other => other,
    }
}

/// A store's counter, its NV index and its TPM's name.
pub(super) type CounterFor = (Box<dyn Counter>, u32, String);

/// The counter that anchors (or would anchor) the store: on the sealer's TPM, else on the
/// configuration's first TPM; at the index the state names, else the store's own; with its
/// index and its TPM's name. `None` without a TPM. Reaches nothing yet.
///
/// # Errors
/// [`crate::Error::Config`] for a TPM the configuration cannot describe.
#[cfg(feature = "tpm")]
pub(super) fn counter_for(
    store: &Store,
    sealer: Option<&dyn Sealer>,
    config: &Config,
    keys: &DerivedKeys,
) -> Result<Option<CounterFor>> {
    use crate::backend::tpm::{counter_index, TpmCounter};
    use crate::config::BackendConfig;
    let bound = store.meta().state.as_ref().and_then(|s| s.counter);
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
    let index = bound.map_or_else(|| counter_index(&store.meta().store_id), |b| b.index);
    let counter = TpmCounter::new(device, &name, index, &keys.counter_auth);
    Ok(Some((Box::new(counter), index, name)))
}

/// Without TPM support there is no counter.
#[cfg(not(feature = "tpm"))]
pub(super) fn counter_for(
    _store: &Store,
    _sealer: Option<&dyn Sealer>,
    _config: &Config,
    _keys: &DerivedKeys,
) -> Result<Option<CounterFor>> {
    Ok(None)
}

/// Without TPM support, a store bound to a TPM counter cannot be checked.
#[cfg(not(feature = "tpm"))]
pub(super) fn bind(
    store: &mut Store,
    _sealer: Option<&dyn Sealer>,
    _config: &Config,
    _keys: &DerivedKeys,
) -> Result<()> {
    match store.meta().state.as_ref().and_then(|s| s.counter) {
        Some(_) => Err(crate::Error::not_built("tpm")),
        None => Ok(()),
    }
}

/// What [`super::Keystore::reanchor`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reanchored {
    /// The generation the store was at.
    pub from_generation: u64,
    /// The generation it is at now: past its anchor file's.
    pub generation: u64,
    /// Whether it is bound to a TPM counter now.
    pub tpm_counter: bool,
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
        let rebind_at =
            counter_for(&store, Some(sealer), config, &keys)?.map(|(_, index, _)| index);
        let generation = store.restart_generation(anchored.saturating_add(1), rebind_at)?;
        if let Some(anchor) = anchor_dir.map(|d| FileAnchor::new(&d, &store.meta().store_id)) {
            anchor.advance(generation)?;
            store.set_anchor(anchor);
        }
        bind(&mut store, Some(sealer), config, &keys)?;
        let tpm_counter = store
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
            if tpm_counter { ", bound to its TPM counter anew" } else { "" }
        );
        Self::with_root(store, &keys, config)?.audit_store_event("store-reanchor")?;
        Ok(Reanchored {
            from_generation,
            generation,
            tpm_counter,
        })
    }
}
