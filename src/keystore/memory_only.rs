//! Calls that answer from memory or not at all: what lets `keyhold serve` run a quick use of a
//! software key on the thread that read its request, which must not wait, and a short use of a
//! device there, which waits for nothing but the device's answer.
//!
//! Inside [`from_memory_only`], a keystore call that would have to wait (read a key's record or
//! write the store, read whether the store changed while another thread or process holds its
//! lock, run a key's due work, take the lock another thread reserves AES-GCM invocations under,
//! write a backlogged audit log; for a device, find a token, wait for one of its sessions or open
//! one, ask whether a token that refused a use is still there, wait for a TPM's turn or connect
//! to it) stops there instead, before it has done anything that shows: no key is used to any
//! effect (a device use that failed, and would be retried or looked into, stops there, and the
//! call made again repeats it), nothing is audited, no invocation is taken.
//! The scope then answers [`WouldWait`], and the caller makes the same call again where waiting
//! is allowed. The places that may wait call [`may_wait`].
// Only `keyhold serve` opens a scope; without it, every call is free to wait.
#![cfg_attr(not(feature = "serve"), allow(dead_code))]

use std::cell::Cell;

use crate::error::{Error, Result};

/// What this thread's keystore calls may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Anything: the default.
    Free,
    /// Only what memory answers.
    MemoryOnly,
    /// Only what memory answers, and a call found it would have to wait.
    WouldWait,
}

thread_local! {
    static SCOPE: Cell<Scope> = const { Cell::new(Scope::Free) };
}

/// A call made by [`from_memory_only`] would have had to wait: it stopped before doing anything
/// that shows, and is to be made again where waiting is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WouldWait;

/// Runs `f` with this thread's keystore calls answering from memory only: its result, or
/// [`WouldWait`] if a call in it stopped where it would have waited (its error is dropped).
pub(crate) fn from_memory_only<T>(f: impl FnOnce() -> T) -> std::result::Result<T, WouldWait> {
    /// Puts the thread's scope back as it was, even if `f` panics.
    struct Restore(Scope);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPE.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCOPE.with(|s| s.replace(Scope::MemoryOnly)));
    let done = f();
    if SCOPE.with(Cell::get) == Scope::WouldWait {
        Err(WouldWait)
    } else {
        Ok(done)
    }
}

/// Whether this thread answers from memory only.
pub(crate) fn in_scope() -> bool {
    SCOPE.with(Cell::get) != Scope::Free
}

/// Whether a call of this thread's memory-only scope found it would have to wait: what it
/// returns is then not an outcome (not to be audited or counted).
pub(crate) fn would_wait() -> bool {
    SCOPE.with(Cell::get) == Scope::WouldWait
}

/// At a place where a call may wait for `what`: `Ok` unless this thread answers from memory only,
/// where the call is to stop with this error (which its scope drops).
pub(crate) fn may_wait(what: &'static str) -> Result<()> {
    SCOPE.with(|s| match s.get() {
        Scope::Free => Ok(()),
        Scope::MemoryOnly | Scope::WouldWait => {
            s.set(Scope::WouldWait);
            Err(Error::Timeout {
                backend: "keystore".into(),
                waited: std::time::Duration::ZERO,
                what: what.into(),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_says_whether_a_call_would_have_waited_and_is_undone_after() {
        assert!(!in_scope());
        assert!(
            may_wait("the store").is_ok(),
            "outside a scope, waiting is allowed"
        );
        assert_eq!(from_memory_only(|| 7), Ok(7));
        assert_eq!(
            from_memory_only(|| may_wait("the store").map(|()| 7)).map(|r| r.is_err()),
            Err(WouldWait)
        );
        assert!(!would_wait());
        assert!(
            may_wait("the store").is_ok(),
            "the scope ended with its call"
        );
        // A scope within a scope answers for its own calls only.
        let outer = from_memory_only(|| {
            let inner = from_memory_only(|| may_wait("the store").is_err());
            assert_eq!(inner, Err(WouldWait));
            assert!(in_scope() && !would_wait());
            7
        });
        assert_eq!(outer, Ok(7));
        // A panic in the scope leaves the thread as it was.
        let panicked = std::panic::catch_unwind(|| {
            from_memory_only(|| {
                let _ = may_wait("the store");
                panic!("in the scope")
            })
        });
        assert!(panicked.is_err());
        assert!(may_wait("the store").is_ok());
    }
}
