//! A bounded pool of sessions on one token, logged in once, recovering from lost sessions.
//!
//! A cryptoki `Session` is `Send` but not `Sync`: each is leased to one thread at a time and comes
//! back to the pool when the lease drops. PKCS#11 login state belongs to the application, not the
//! session, so one `C_Login` serves every session; it is never repeated after a PIN failure,
//! because real tokens lock the PIN after a few.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::{ExposeSecret, SecretString};

use super::module::{find_token, Module};
use crate::config::TokenSelector;
use crate::error::{Error, Result};

/// How long a caller waits for a free session before giving up.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(30);

/// What to do after a PKCS#11 error.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Disposition {
    /// The session is gone (closed, invalidated): use a new one.
    NewSession,
    /// The token forgot our login (e.g. after all sessions closed): log in again, once.
    Relogin,
    /// The token or device is gone: drop everything and report "unavailable".
    DeviceGone,
    /// A cached object handle went stale: find the object again.
    StaleHandle,
    /// Anything else: report it.
    Fail,
}

pub(super) fn disposition(e: &CkError) -> Disposition {
    match e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::SessionHandleInvalid | RvError::SessionClosed => Disposition::NewSession,
            RvError::UserNotLoggedIn => Disposition::Relogin,
            RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::DeviceError
            | RvError::SlotIdInvalid
            | RvError::CryptokiNotInitialized => Disposition::DeviceGone,
            RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Disposition::StaleHandle,
            _ => Disposition::Fail,
        },
        _ => Disposition::Fail,
    }
}

struct State {
    /// The token's slot and the session bound for it, found once per connection to the token.
    slot: Option<(Slot, usize)>,
    idle: Vec<Session>,
    open: usize,
    logged_in: bool,
    /// Bumped when the device goes away: sessions from an older generation are closed, not reused.
    generation: u64,
    /// Set after a PIN failure: no further `C_Login` until the process restarts.
    login_refused: Option<String>,
    /// Callers waiting for a session (so a test can see one is held back, without a sleep).
    #[cfg(test)]
    waiting: usize,
}

/// The session pool of one token.
pub(super) struct Pool {
    pub(super) backend: String,
    module: Module,
    selector: TokenSelector,
    pin: SecretString,
    max: usize,
    state: Mutex<State>,
    available: Condvar,
    login_lock: Mutex<()>,
    login_attempts: AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("backend", &self.backend)
            .field("token", &self.selector.describe())
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// A session leased from the pool; returned (or closed, if broken) on drop.
pub(super) struct Lease<'a> {
    pool: &'a Pool,
    session: Option<Session>,
    generation: u64,
    broken: bool,
}

impl Lease<'_> {
    pub(super) fn session(&self) -> &Session {
        // Present from checkout until drop.
        self.session
            .as_ref()
            .expect("a lease holds its session until dropped")
    }

    /// Marks the session unusable: it is closed instead of returned.
    pub(super) fn discard(&mut self) {
        self.broken = true;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let mut state = self.pool.lock();
        if self.broken || self.generation != state.generation {
            state.open = state.open.saturating_sub(1);
            // PKCS#11 logs the application out when its last session closes.
            if state.open == 0 {
                state.logged_in = false;
            }
            drop(state);
            drop(session); // C_CloseSession; errors on a dead token are irrelevant
        } else {
            state.idle.push(session);
            drop(state);
        }
        self.pool.available.notify_one();
    }
}

impl Pool {
    pub(super) fn new(
        backend: String,
        module: Module,
        selector: TokenSelector,
        pin: SecretString,
        max: usize,
    ) -> Self {
        Self {
            backend,
            module,
            selector,
            pin,
            max,
            state: Mutex::new(State {
                slot: None,
                idle: Vec::new(),
                open: 0,
                logged_in: false,
                generation: 0,
                login_refused: None,
                #[cfg(test)]
                waiting: 0,
            }),
            available: Condvar::new(),
            login_lock: Mutex::new(()),
            login_attempts: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn module(&self) -> &Module {
        &self.module
    }

    /// How many times `C_Login` was called (for tests and `doctor`).
    pub(super) fn login_attempts(&self) -> u64 {
        self.login_attempts.load(Ordering::SeqCst)
    }

    /// The token's slot, looked up again after the device went away.
    pub(super) fn slot(&self) -> Result<Slot> {
        self.slot_and_max().map(|(slot, _)| slot)
    }

    /// The slot and the session bound, computed once: `C_GetTokenInfo` costs more than a token
    /// HMAC on SoftHSM, so it is not asked on every checkout.
    fn slot_and_max(&self) -> Result<(Slot, usize)> {
        if let Some(found) = self.lock().slot {
            return Ok(found);
        }
        // Asking the module for its slots is a device's wait ([`crate::keystore::may_wait`]).
        crate::keystore::may_wait("find the token")?;
        let slot = find_token(&self.backend, &self.module, &self.selector)?;
        let found = (slot, self.effective_max(slot));
        self.lock().slot = Some(found);
        Ok(found)
    }

    /// The most sessions this pool opens: the configured bound, capped by the token's own limit.
    pub(super) fn effective_max(&self, slot: Slot) -> usize {
        let token_max = self
            .module
            .token_info(slot)
            .ok()
            .and_then(|info| info.session_limit());
        token_max.map_or(self.max, |t| t.min(self.max))
    }

    /// Leases a logged-in session, opening one if the pool is below its bound, waiting otherwise.
    pub(super) fn checkout(&self) -> Result<Lease<'_>> {
        let (slot, max) = self.slot_and_max()?;
        let mut state = self.lock();
        loop {
            if let Some(msg) = &state.login_refused {
                return Err(Error::BackendLogin {
                    backend: self.backend.clone(),
                    reason: msg.clone(),
                });
            }
            if let Some(session) = state.idle.pop() {
                let generation = state.generation;
                drop(state);
                return Ok(Lease {
                    pool: self,
                    session: Some(session),
                    generation,
                    broken: false,
                });
            }
            // Opening a session (and logging in, under the token's cross-process turn) or waiting
            // for one is not done from memory only: the caller goes where waiting is allowed.
            crate::keystore::may_wait("a session of the token")?;
            if state.open < max {
                state.open += 1;
                let generation = state.generation;
                drop(state);
                return match self.open_session(slot) {
                    Ok(session) => Ok(Lease {
                        pool: self,
                        session: Some(session),
                        generation,
                        broken: false,
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.available.notify_one();
                        Err(e)
                    }
                };
            }
            #[cfg(test)]
            {
                state.waiting += 1;
            }
            let (next, timeout) = self
                .available
                .wait_timeout(state, CHECKOUT_TIMEOUT)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state = next;
            #[cfg(test)]
            {
                state.waiting -= 1;
            }
            if timeout.timed_out() && state.idle.is_empty() && state.open >= max {
                return Err(Error::BackendUnavailable {
                    backend: self.backend.clone(),
                    reason: format!(
                        "all {max} sessions were busy for {} s",
                        CHECKOUT_TIMEOUT.as_secs()
                    ),
                });
            }
        }
    }

    fn open_session(&self, slot: Slot) -> Result<Session> {
        let session = self.module.pkcs11().open_rw_session(slot).map_err(|e| {
            if disposition(&e) == Disposition::DeviceGone {
                self.device_gone();
            }
            super::errors::map(&self.backend, "open a session (C_OpenSession)", e)
        })?;
        self.ensure_login(&session)?;
        Ok(session)
    }

    /// Logs in once for the whole application, never after a PIN failure.
    pub(super) fn ensure_login(&self, session: &Session) -> Result<()> {
        let _one_at_a_time = self
            .login_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        {
            let state = self.lock();
            if let Some(msg) = &state.login_refused {
                return Err(Error::BackendLogin {
                    backend: self.backend.clone(),
                    reason: msg.clone(),
                });
            }
            if state.logged_in {
                return Ok(());
            }
        }
        let token = self.selector.describe();
        let refuse = |msg: String| {
            self.lock().login_refused = Some(msg.clone());
            Err(Error::BackendLogin {
                backend: self.backend.clone(),
                reason: msg,
            })
        };
        // Spend no try the token cannot afford: another process (or an earlier run) may already
        // have entered wrong PINs, and the token's flags say so before any C_Login.
        if self.pin.expose_secret().is_empty() {
            return refuse("the configured PIN is empty: keyhold will not send it".into());
        }
        // The token's flags and the login in one turn: a software token may rewrite its state
        // on disk as it logs in, and another process must not read it meanwhile.
        let _turn = self.module.turn();
        let flags = self
            .lock()
            .slot
            .and_then(|(slot, _)| self.module.token_info(slot).ok());
        if let Some(info) = flags {
            if info.user_pin_locked() {
                return refuse(format!(
                    "the user PIN of the {token} is locked: unlock it with the SO PIN \
                     (e.g. `pkcs11-tool --login --login-type so --init-pin`)"
                ));
            }
            if info.user_pin_final_try() {
                return refuse(format!(
                    "one more wrong PIN would lock the {token}: keyhold will not try; check \
                     the PIN source, then log in once by hand (e.g. `pkcs11-tool --login --test`)"
                ));
            }
        }
        self.login_attempts.fetch_add(1, Ordering::SeqCst);
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                self.lock().logged_in = true;
                Ok(())
            }
            Err(CkError::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            )) => refuse(format!(
                "wrong user PIN for the {token}: keyhold will not try again (tokens lock PINs); \
                     fix the PIN source in the configuration and restart"
            )),
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => refuse(format!(
                "the user PIN of the {token} is locked: unlock it with the SO PIN \
                 (e.g. `pkcs11-tool --login --login-type so --init-pin`)"
            )),
            Err(CkError::Pkcs11(RvError::PinExpired, _)) => refuse(format!(
                "the user PIN of the {token} has expired: set a new one"
            )),
            Err(e) => {
                if disposition(&e) == Disposition::DeviceGone {
                    self.device_gone();
                }
                Err(super::errors::map(&self.backend, "log in (C_Login)", e))
            }
        }
    }

    /// Forgets the login, so that the next session logs in again (after `CKR_USER_NOT_LOGGED_IN`).
    pub(super) fn forget_login(&self) {
        self.lock().logged_in = false;
    }

    /// Whether the selected token still answers in its slot. Some modules report a vanished token
    /// only as `CKR_GENERAL_ERROR` (SoftHSM after `--delete-token`), so failures are checked here.
    pub(super) fn token_present(&self) -> bool {
        let Some((slot, _)) = self.lock().slot else {
            return false;
        };
        self.module.token_info(slot).is_ok_and(|info| {
            let label_ok = self
                .selector
                .label
                .as_ref()
                .is_none_or(|l| *l == info.label);
            let serial_ok = self
                .selector
                .serial
                .as_ref()
                .is_none_or(|s| *s == info.serial);
            label_ok && serial_ok
        })
    }

    /// Closes every idle session (after one turned out dead, the others likely are too).
    pub(super) fn close_idle(&self) {
        let idle = {
            let mut state = self.lock();
            state.open = state.open.saturating_sub(state.idle.len());
            if state.open == 0 {
                state.logged_in = false;
            }
            std::mem::take(&mut state.idle)
        };
        drop(idle);
        self.available.notify_all();
    }

    /// The token went away: forget the slot, the login and every session.
    pub(super) fn device_gone(&self) {
        let idle = {
            let mut state = self.lock();
            state.slot = None;
            state.logged_in = false;
            state.generation += 1;
            state.open = state.open.saturating_sub(state.idle.len());
            std::mem::take(&mut state.idle)
        };
        drop(idle);
        self.available.notify_all();
    }
}

#[cfg(test)]
#[cfg(feature = "testing")]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::testing::{SoftHsm, SOFTHSM_MODULE, TEST_USER_PIN};

    fn pool(hsm: &SoftHsm, max: usize) -> Pool {
        let module =
            super::super::module::module("test", std::path::Path::new(SOFTHSM_MODULE)).unwrap();
        let selector = TokenSelector {
            label: Some(hsm.label().to_owned()),
            serial: None,
        };
        Pool::new(
            "hsm".into(),
            module,
            selector,
            SecretString::from(TEST_USER_PIN.to_owned()),
            max,
        )
    }

    /// The bound holds against a caller beyond it: with both sessions of a two-session pool leased,
    /// a third caller waits (seen through the pool's waiting count, not a sleep) and then gets the
    /// session that came back, not a new one; one login served all three.
    #[test]
    fn a_caller_beyond_the_bound_waits_for_a_returned_session() {
        let hsm = SoftHsm::new().unwrap();
        let pool = pool(&hsm, 2);
        let first = pool.checkout().unwrap();
        let second = pool.checkout().unwrap();
        assert_ne!(first.session().handle(), second.session().handle());
        assert_eq!(pool.lock().open, 2);
        let returned = second.session().handle();
        std::thread::scope(|s| {
            let third = s.spawn(|| pool.checkout().map(|lease| lease.session().handle()));
            // Until it waits or (wrongly) returns: a condition, not a time.
            while pool.lock().waiting == 0 && !third.is_finished() {
                std::thread::yield_now();
            }
            assert!(!third.is_finished(), "a third session was handed out");
            assert_eq!(pool.lock().open, 2);
            drop(second);
            assert_eq!(third.join().unwrap().unwrap(), returned);
        });
        assert_eq!(pool.lock().open, 2);
        assert_eq!(pool.login_attempts(), 1);
        drop(first);
    }

    /// From memory only (a use `keyhold serve` runs on the thread that read it), a session is
    /// taken only if one is idle: finding the token, opening a session (and logging in) or
    /// waiting for one stops the call instead, before anything is opened.
    #[cfg(feature = "serve")]
    #[test]
    fn from_memory_only_a_session_is_taken_only_if_one_is_idle() {
        use crate::keystore::from_memory_only;
        let hsm = SoftHsm::new().unwrap();
        let pool = pool(&hsm, 1);
        let handle = |pool: &Pool| pool.checkout().map(|lease| lease.session().handle());
        assert!(from_memory_only(|| handle(&pool)).is_err(), "token found");
        pool.slot_and_max().unwrap();
        assert!(
            from_memory_only(|| handle(&pool)).is_err(),
            "session opened"
        );
        assert_eq!((pool.lock().open, pool.login_attempts()), (0, 0));
        let lease = pool.checkout().unwrap();
        let first = lease.session().handle();
        assert!(from_memory_only(|| handle(&pool)).is_err(), "waited");
        drop(lease);
        assert_eq!(from_memory_only(|| handle(&pool).unwrap()), Ok(first));
        assert_eq!((pool.lock().open, pool.login_attempts()), (1, 1));
    }

    /// Past the bound a caller gets the session another thread returns, and the count of open
    /// sessions never passes the bound however many threads ask.
    #[test]
    fn many_threads_share_a_bounded_pool() {
        const MAX: usize = 3;
        let hsm = SoftHsm::new().unwrap();
        let pool = pool(&hsm, MAX);
        let handles = Mutex::new(std::collections::BTreeSet::new());
        std::thread::scope(|s| {
            for _ in 0..4 * MAX {
                s.spawn(|| {
                    for _ in 0..50 {
                        let lease = pool.checkout().unwrap();
                        assert!(pool.lock().open <= MAX);
                        lease.session().get_session_info().unwrap();
                        handles.lock().unwrap().insert(lease.session().handle());
                    }
                });
            }
        });
        let handles = handles.into_inner().unwrap();
        assert!(
            (1..=MAX).contains(&handles.len()),
            "sessions used: {handles:?}"
        );
        assert_eq!(pool.login_attempts(), 1);
    }
}
