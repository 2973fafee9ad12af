//! PKCS#11 modules: each loaded and `C_Initialize`d once per process, shared by every keystore.
//!
//! `C_Initialize` may be called once per process per module, and `C_Finalize` would pull the module
//! from under every other user, so modules are kept for the life of the process.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cryptoki::context::Function;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, Rv, RvError};
use cryptoki::slot::Slot;

use super::ffi::RawModule;
use super::token_info::TokenInfo;
use crate::config::TokenSelector;
use crate::error::{Error, Result};

/// A loaded, initialised module: cryptoki for everything but token info, which keyhold reads
/// itself (see `ffi.rs`).
#[derive(Clone, Debug)]
pub(super) struct Module {
    pkcs11: Pkcs11,
    raw: Arc<RawModule>,
    path: Arc<Path>,
}

impl Module {
    /// This caller's turn at the module's token state, across processes (see [`Turn`]).
    pub(super) fn turn(&self) -> Turn {
        Turn::take(&self.path)
    }

    /// The cryptoki context.
    pub(super) fn pkcs11(&self) -> &Pkcs11 {
        &self.pkcs11
    }

    /// `C_GetTokenInfo` for `slot`, parsed without failing on any field's content.
    ///
    /// # Errors
    /// The PKCS#11 error the module returned, as cryptoki reports errors.
    pub(super) fn token_info(&self, slot: Slot) -> std::result::Result<TokenInfo, CkError> {
        let turn = self.turn();
        let info = self.raw.token_info(slot.id());
        drop(turn);
        match info {
            #[cfg(any(test, feature = "testing"))]
            Ok(raw) => Ok(fault::apply(TokenInfo::parse(&raw))),
            #[cfg(not(any(test, feature = "testing")))]
            Ok(raw) => Ok(TokenInfo::parse(&raw)),
            Err(rv) => Err(match Rv::from(rv) {
                Rv::Error(e) => CkError::Pkcs11(e, Function::GetTokenInfo),
                // Not reached: the raw call reports only failures.
                Rv::Ok => CkError::Pkcs11(RvError::GeneralError, Function::GetTokenInfo),
            }),
        }
    }
}

/// A fault no test token produces on demand: a token reporting its user PIN on its final try or
/// locked. SoftHSM2 never sets either flag (it does not lock PINs), and locking openCryptoki's one
/// soft token would break every other test on the machine. Tests name a token by label and the
/// flags it should report; `C_GetTokenInfo` still runs, and only those flags are added to what
/// the token said.
#[cfg(any(test, feature = "testing"))]
pub(crate) mod fault {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::TokenInfo;

    /// Token label -> `CKF_` flags added to its token info. Keyed by label, so that tests in
    /// parallel threads, each with its own token, do not see each other's faults.
    static FLAGS: Mutex<Option<HashMap<String, cryptoki_sys::CK_FLAGS>>> = Mutex::new(None);

    fn flags() -> std::sync::MutexGuard<'static, Option<HashMap<String, cryptoki_sys::CK_FLAGS>>> {
        FLAGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// From now on the token labelled `label` reports `added` in its flags too; `0` ends that.
    pub(crate) fn add_token_flags(label: &str, added: cryptoki_sys::CK_FLAGS) {
        let mut flags = flags();
        let map = flags.get_or_insert_with(HashMap::new);
        if added == 0 {
            map.remove(label);
        } else {
            map.insert(label.to_owned(), added);
        }
    }

    pub(super) fn apply(info: TokenInfo) -> TokenInfo {
        match flags().as_ref().and_then(|m| m.get(&info.label)) {
            Some(&added) => info.with_flags(added),
            None => info,
        }
    }
}

/// How long a process waits for another's turn at a module (see [`Turn`]).
const TURN_WAIT: Duration = Duration::from_secs(10);

/// One caller's turn at a module's token state, across processes: an exclusive `flock` on the
/// module's own file (opened read-only), held while keyhold calls what may read or rewrite the
/// token's state on disk: `C_Initialize` (a software token loads every token there),
/// `C_InitToken`, the slot scan and `C_Login`.
///
/// SoftHSM2 rewrites its token file on every login, and a process reading that file meanwhile
/// finds no token or a broken one (SoftHSMv2 issue #757): of 96 `keyhold sign` runs from 8
/// processes at once on one token, 18 failed so. A hardware token does not need this and pays only a
/// short wait when processes start together. The lock needs no file of its own, and every
/// process loading the same module shares it. It is a mitigation, never a condition: where the
/// file cannot be locked (a file system without `flock`, or another process holding it for
/// [`TURN_WAIT`]) keyhold goes on without it, and says so in the log.
#[must_use = "the turn ends when it is dropped"]
pub(super) struct Turn {
    /// The locked file; `None` when this thread already had a turn, or the lock was not taken.
    lock: Option<File>,
    /// Whether this is the thread's outermost turn (the one that ends it).
    outermost: bool,
    /// A turn is its thread's: the nesting below is counted per thread.
    _not_send: std::marker::PhantomData<std::rc::Rc<()>>,
}

thread_local! {
    /// Whether this thread is in a turn: a nested one takes no second lock (which, on another
    /// descriptor of the same file, would wait for the first).
    static IN_TURN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Turn {
    /// Waits (at most [`TURN_WAIT`]) for the turn at the module at `path`.
    fn take(path: &Path) -> Self {
        if IN_TURN.with(std::cell::Cell::get) {
            return Turn {
                lock: None,
                outermost: false,
                _not_send: std::marker::PhantomData,
            };
        }
        IN_TURN.with(|t| t.set(true));
        Turn {
            lock: Self::lock(path),
            outermost: true,
            _not_send: std::marker::PhantomData,
        }
    }

    fn lock(path: &Path) -> Option<File> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) => {
                tracing::debug!("no turn at {}: {e}", path.display());
                return None;
            }
        };
        match crate::audit::lock_exclusive(&file, TURN_WAIT) {
            Ok(()) => Some(file),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tracing::warn!(
                    "another process held the lock on {} for {} s: going on without it",
                    path.display(),
                    TURN_WAIT.as_secs()
                );
                None
            }
            Err(e) => {
                tracing::debug!("cannot lock {}: {e}", path.display());
                None
            }
        }
    }

    /// Whether this turn holds the lock (not when nested, or when it could not be taken).
    #[cfg(test)]
    fn locked(&self) -> bool {
        self.lock.is_some()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // Closing the file releases its lock.
        drop(self.lock.take());
        if self.outermost {
            IN_TURN.with(|t| t.set(false));
        }
    }
}

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Module>>> = OnceLock::new();

/// The loaded, initialised module at `path` (loading it on first use).
///
/// # Errors
/// [`Error::BackendUnavailable`] if the module cannot be loaded or initialised.
pub(super) fn module(backend: &str, path: &Path) -> Result<Module> {
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
    let pkcs11 = Pkcs11::new(path).map_err(|e| {
        unavailable(format!(
            "cannot load the PKCS#11 module {}: {e}",
            path.display()
        ))
    })?;
    // OS locking: the module may be called from any thread (sessions are never shared at once).
    let turn = Turn::take(path);
    let initialized = pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
    drop(turn);
    match initialized {
        Ok(()) => {}
        // Another library in this process initialised it first: that is fine, it is initialised.
        Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(unavailable(format!(
                "cannot initialise the PKCS#11 module {}: {e}",
                path.display()
            )))
        }
    }
    let raw = RawModule::open(path)
        .map_err(|why| unavailable(format!("PKCS#11 module {}: {why}", path.display())))?;
    let module = Module {
        pkcs11,
        raw: Arc::new(raw),
        path: Arc::from(path),
    };
    modules.insert(path.to_path_buf(), module.clone());
    Ok(module)
}

/// Finds the slot holding the selected token. Slot numbers change as tokens come and go, so this
/// runs again after every device error.
///
/// A token whose info has odd fields is still matched by label and serial. When several tokens
/// match, none is chosen: the PIN is never sent to a token picked by chance.
///
/// # Errors
/// [`Error::BackendUnavailable`] when no token matches, naming the tokens present and every token
/// that was passed over with the reason; or when more than one matches, naming their serials.
pub(super) fn find_token(backend: &str, module: &Module, selector: &TokenSelector) -> Result<Slot> {
    let unavailable = |reason: String| Error::BackendUnavailable {
        backend: backend.to_owned(),
        reason,
    };
    let _turn = module.turn();
    let slots = module
        .pkcs11()
        .get_slots_with_token()
        .map_err(|e| unavailable(format!("cannot list the module's slots: {e}")))?;
    let mut matches = Vec::new();
    let mut present = Vec::new();
    let mut skipped = Vec::new();
    for slot in slots {
        let info = match module.token_info(slot) {
            Ok(info) => info,
            Err(e) => {
                let why = match &e {
                    CkError::Pkcs11(rv, _) => format!("C_GetTokenInfo: {rv:?}"),
                    other => other.to_string(),
                };
                skipped.push(format!("slot {}: token info unreadable ({why})", slot.id()));
                continue;
            }
        };
        if !info.initialized() {
            skipped.push(format!("slot {}: token not initialised", slot.id()));
            continue;
        }
        let label_ok = selector.label.as_ref().is_none_or(|l| *l == info.label);
        let serial_ok = selector.serial.as_ref().is_none_or(|s| *s == info.serial);
        if label_ok && serial_ok {
            matches.push((slot, info));
        } else {
            present.push(format!("`{}` (serial {})", info.label, info.serial));
        }
    }
    match matches.as_slice() {
        [(slot, _)] => return Ok(*slot),
        [] => {}
        several => {
            let serials: Vec<String> = several
                .iter()
                .map(|(slot, info)| format!("`{}` (slot {})", info.serial, slot.id()))
                .collect();
            return Err(unavailable(format!(
                "{} tokens match the {}: serials {}; keyhold sends the PIN to none of them: \
                 select one by `token_serial` (or a `token_uri` with serial=)",
                several.len(),
                selector.describe(),
                serials.join(", ")
            )));
        }
    }
    let present = if present.is_empty() {
        "none".to_owned()
    } else {
        present.join(", ")
    };
    let skipped = if skipped.is_empty() {
        String::new()
    } else {
        format!("; passed over: {}", skipped.join(", "))
    };
    Err(unavailable(format!(
        "no {} is present: tokens present: {present}{skipped}",
        selector.describe()
    )))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::Turn;

    #[test]
    fn a_nested_turn_takes_no_second_lock_and_the_outer_one_ends_it() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let outer = Turn::take(file.path());
        assert!(outer.locked());
        // A second lock on another descriptor would wait for the first: this returns at once.
        let inner = Turn::take(file.path());
        assert!(!inner.locked());
        drop(inner);
        drop(outer);
        let again = Turn::take(file.path());
        assert!(again.locked(), "the thread's turn ended with the outer one");
    }

    #[test]
    fn a_turn_waits_for_another_holders_turn() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_path_buf();
        let first = Turn::take(&path);
        assert!(first.locked());
        let got = Arc::new(AtomicBool::new(false));
        let waiter = {
            let got = Arc::clone(&got);
            std::thread::spawn(move || {
                let turn = Turn::take(&path);
                got.store(true, Ordering::SeqCst);
                turn.locked()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !got.load(Ordering::SeqCst),
            "a second turn began while the first was held"
        );
        drop(first);
        assert!(waiter.join().unwrap(), "the waiter got the lock");
        assert!(got.load(Ordering::SeqCst));
    }

    #[test]
    fn without_a_lockable_file_the_turn_goes_on_unlocked() {
        let dir = tempfile::tempdir().unwrap();
        let turn = Turn::take(&dir.path().join("no-such-module.so"));
        assert!(!turn.locked());
    }
}
