//! Buffers for secret bytes: zeroized on drop, locked in memory where the OS allows, never printed.
//!
//! This is the crate's one module with `unsafe`: `mlock`/`munlock` take raw pointers.

use std::fmt;
use std::sync::Once;

use zeroize::Zeroizing;

/// Secret bytes (key material, a root secret, a derived key).
///
/// The heap allocation is fixed at creation, locked with `mlock` when the OS allows it (so it is not
/// written to swap), zeroized and unlocked on drop. `Debug` prints only the length.
pub struct SecretBytes {
    bytes: Zeroizing<Vec<u8>>,
    locked: bool,
}

impl SecretBytes {
    /// A zero-filled secret of `len` bytes, to be filled in place.
    pub fn zeroed(len: usize) -> Self {
        let bytes = Zeroizing::new(vec![0u8; len]);
        let mut secret = Self {
            bytes,
            locked: false,
        };
        secret.locked = secret.lock();
        secret
    }

    /// Copies `data` into a new secret. The caller stays responsible for zeroizing `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut secret = Self::zeroed(data.len());
        secret.bytes.copy_from_slice(data);
        secret
    }

    /// Takes ownership of a zeroizing vector (its allocation is then locked).
    pub fn from_zeroizing(bytes: Zeroizing<Vec<u8>>) -> Self {
        let mut secret = Self {
            bytes,
            locked: false,
        };
        secret.locked = secret.lock();
        secret
    }

    /// The secret bytes. Keep the borrow short.
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// The secret bytes, mutably, for filling in place.
    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Whether the pages are locked in memory (false where `RLIMIT_MEMLOCK` or the OS refused).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    #[allow(unsafe_code)]
    fn lock(&mut self) -> bool {
        if self.bytes.is_empty() {
            return false;
        }
        let ptr = self.bytes.as_mut_ptr().cast::<std::ffi::c_void>();
        // SAFETY: `ptr..ptr+len` is one live allocation owned by `self.bytes`; its length never
        // changes (no method grows or shrinks the vector), and it is unlocked in `drop` before the
        // vector is freed. mlock only changes paging, never the bytes.
        unsafe { rustix::mm::mlock(ptr, self.bytes.len()) }.is_ok()
    }
}

impl Drop for SecretBytes {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.bytes.zeroize();
        if self.locked {
            let ptr = self.bytes.as_mut_ptr().cast::<std::ffi::c_void>();
            // SAFETY: the same live allocation that `lock` locked; it is freed only after this.
            // `zeroize` on a Vec clears its full capacity but does not free it.
            let _ = unsafe { rustix::mm::munlock(ptr, self.bytes.capacity()) };
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.bytes.len())
    }
}

/// Makes the process non-dumpable and turns core dumps off, once per process.
///
/// Called by the keystore before it unseals anything: from then on the process holds secrets, so a
/// crash must not write them to a core file and other users' debuggers must not attach. Failures are
/// logged and ignored: this is defence in depth, not a precondition.
pub fn harden_process() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(target_os = "linux")]
        if let Err(e) =
            rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        {
            tracing::warn!("could not make the process non-dumpable: {e}");
        }
        let no_core = rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        };
        if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Core, no_core) {
            tracing::warn!("could not turn core dumps off: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = SecretBytes::copy_from(b"hunter2-hunter2");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("15"));
        assert_eq!(s.expose(), b"hunter2-hunter2");
    }

    #[test]
    fn small_secrets_are_locked() {
        // RLIMIT_MEMLOCK is at least 64 KiB on every Linux we target.
        let s = SecretBytes::zeroed(32);
        assert!(s.is_locked());
    }
}
