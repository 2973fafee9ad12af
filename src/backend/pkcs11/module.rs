//! PKCS#11 modules: each loaded and `C_Initialize`d once per process, shared by every keystore.
//!
//! `C_Initialize` may be called once per process per module, and `C_Finalize` would pull the module
//! from under every other user, so modules are kept for the life of the process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::slot::Slot;

use crate::config::TokenSelector;
use crate::error::{Error, Result};

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// The loaded, initialised module at `path` (loading it on first use).
///
/// # Errors
/// [`Error::BackendUnavailable`] if the module cannot be loaded or initialised.
pub fn module(backend: &str, path: &Path) -> Result<Pkcs11> {
    let modules = MODULES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut modules = modules
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(module) = modules.get(path) {
        return Ok(module.clone());
    }
    let unavailable = |what: String| Error::BackendUnavailable {
        backend: backend.to_owned(),
        reason: what,
    };
    let module = Pkcs11::new(path).map_err(|e| {
        unavailable(format!(
            "cannot load the PKCS#11 module {}: {e}",
            path.display()
        ))
    })?;
    // OS locking: the module may be called from any thread (sessions are never shared at once).
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        // Another library in this process initialised it first: that is fine, it is initialised.
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => {
            return Err(unavailable(format!(
                "cannot initialise the PKCS#11 module {}: {e}",
                path.display()
            )))
        }
    }
    modules.insert(path.to_path_buf(), module.clone());
    Ok(module)
}

/// Finds the slot holding the selected token. Slot numbers change as tokens come and go, so this
/// runs again after every device error.
///
/// # Errors
/// [`Error::BackendUnavailable`] listing the tokens present when none matches.
pub fn find_token(backend: &str, module: &Pkcs11, selector: &TokenSelector) -> Result<Slot> {
    let unavailable = |reason: String| Error::BackendUnavailable {
        backend: backend.to_owned(),
        reason,
    };
    let slots = module
        .get_slots_with_token()
        .map_err(|e| unavailable(format!("cannot list the module's slots: {e}")))?;
    let mut present = Vec::new();
    for slot in slots {
        let Ok(info) = module.get_token_info(slot) else {
            continue;
        };
        let label = info.label().trim_end().to_owned();
        let serial = info.serial_number().trim_end().to_owned();
        let label_ok = selector.label.as_ref().is_none_or(|l| *l == label);
        let serial_ok = selector.serial.as_ref().is_none_or(|s| *s == serial);
        if !info.token_initialized() {
            continue;
        }
        if label_ok && serial_ok {
            return Ok(slot);
        }
        present.push(format!("`{label}` (serial {serial})"));
    }
    let present = if present.is_empty() {
        "none".to_owned()
    } else {
        present.join(", ")
    };
    Err(unavailable(format!(
        "no {} is present: tokens present: {present}",
        selector.describe()
    )))
}
