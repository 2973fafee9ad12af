//! Buffers for secret bytes: zeroized on drop, locked in memory where the OS allows, never printed.
//!
//! This is the crate's one module with `unsafe`: `mlock`/`munlock` take raw pointers.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once, PoisonError};

use zeroize::Zeroizing;

/// Secret bytes (key material, a root secret, a derived key).
///
/// The heap allocation is fixed at creation, locked with `mlock` when the OS allows it (so it is not
/// written to swap), zeroized and unlocked on drop. In a process whose memory is locked whole
/// ([`lock_all_memory`]) it takes no lock of its own and releases none. `Debug` prints only the
/// length.
pub struct SecretBytes {
    bytes: Zeroizing<Vec<u8>>,
    /// How it is locked, if it is.
    locked: Option<Lock>,
}

/// How a secret's pages are kept in memory.
#[derive(Debug, Clone, Copy)]
enum Lock {
    /// By this secret's own `mlock` of these pages.
    Pages(Pages),
    /// By the process's `mlockall` ([`lock_all_memory`]).
    Process,
}

/// Set once [`lock_all_memory`] has locked the process's memory, now and to come; never unset.
/// Set, and read where a page lock is released, under [`page_locks`]'s mutex, so that no secret
/// unlocks a page after `mlockall`; read without it where a secret is made (a secret that misses
/// it only locks its own pages, which is harmless).
static ALL_LOCKED: AtomicBool = AtomicBool::new(false);

/// Locks all of this process's memory, now and to come (`mlockall` with `MCL_CURRENT`,
/// `MCL_FUTURE` and `MCL_ONFAULT`: pages are locked as they are first touched, so thread stacks
/// cost what they use), so that nothing it holds (keys, plaintexts in buffers, PINs) is written to
/// swap.
///
/// From then on [`SecretBytes`] take no lock of their own and, above all, release none: a
/// `munlock` would take a secret's pages, and whatever else the allocator put on them, out of the
/// process-wide lock (and every lock and unlock splits and merges the process's mappings). Call it
/// before starting threads that make secrets.
///
/// It needs `CAP_IPC_LOCK` or an unlimited `RLIMIT_MEMLOCK`: under a finite limit, a process
/// locked with `MCL_FUTURE` has its allocations fail once it reaches the limit, so check that
/// first (as `keyhold serve` does).
///
/// What keeps the memory locked afterwards is the process's own conduct: an `munlock` or
/// `munlockall` by other code in it (a PKCS#11 module, say) unlocks pages without keyhold
/// knowing, and a child made by `fork` without `exec` inherits no memory locks.
///
/// # Errors
/// The OS's refusal of `mlockall` (nothing is changed then); `Unsupported` outside Linux.
#[cfg(target_os = "linux")]
pub fn lock_all_memory() -> std::io::Result<()> {
    use rustix::mm::{mlockall, MlockAllFlags};
    // Under the map's mutex: a secret dropped on another thread meanwhile either unlocks its
    // pages before `mlockall` (which locks them again) or sees the flag and leaves them.
    let _locks = page_locks();
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)?;
    // Release: a secret that sees the flag without the mutex sees `mlockall` done.
    ALL_LOCKED.store(true, Ordering::Release);
    Ok(())
}

/// Outside Linux there is no `MCL_ONFAULT`: the process's memory is not locked whole, and
/// secrets keep locking their own pages.
///
/// # Errors
/// Always `Unsupported`.
#[cfg(not(target_os = "linux"))]
pub fn lock_all_memory() -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "locking the whole process's memory is implemented on Linux only",
    ))
}

/// A run of whole pages: the first page's address and how many.
#[derive(Debug, Clone, Copy)]
struct Pages {
    first: usize,
    count: usize,
}

impl Pages {
    fn covering(addr: usize, len: usize) -> Self {
        let size = rustix::param::page_size();
        let first = addr & !(size - 1);
        let end = (addr + len).div_ceil(size) * size;
        Self {
            first,
            count: (end - first) / size,
        }
    }

    fn addresses(self) -> impl Iterator<Item = usize> {
        let size = rustix::param::page_size();
        (0..self.count).map(move |i| self.first + i * size)
    }
}

/// How many live secrets lock each page, process-wide.
///
/// Locks do not nest in the kernel: one `munlock` unlocks a page however many `mlock`s it had.
/// Small secrets share pages (the allocator packs them), so dropping one must unlock only the
/// pages no other secret still holds.
fn page_locks() -> std::sync::MutexGuard<'static, BTreeMap<usize, usize>> {
    static LOCKS: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());
    // The map is consistent after every statement: a panic elsewhere cannot leave it half-made.
    LOCKS.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SecretBytes {
    /// A zero-filled secret of `len` bytes, to be filled in place.
    pub fn zeroed(len: usize) -> Self {
        let bytes = Zeroizing::new(vec![0u8; len]);
        let mut secret = Self {
            bytes,
            locked: None,
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
            locked: None,
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

    /// Whether the pages are locked in memory: by this secret's own `mlock` (false where
    /// `RLIMIT_MEMLOCK` or the OS refused it), or, for a secret made after
    /// [`lock_all_memory`], by the process's lock (true for as long as that lock holds: see
    /// there).
    pub fn is_locked(&self) -> bool {
        self.locked.is_some()
    }

    /// Locks the pages of the allocation and counts this secret as one of their holders, unless
    /// the whole process is locked.
    #[allow(unsafe_code)]
    fn lock(&mut self) -> Option<Lock> {
        if self.bytes.capacity() == 0 {
            return None;
        }
        // Without the mutex: a secret that misses the flag as it is set locks its own pages,
        // which is harmless (its drop, under the mutex, sees the flag and leaves them locked).
        if ALL_LOCKED.load(Ordering::Acquire) {
            return Some(Lock::Process);
        }
        let mut locks = page_locks();
        let pages = Pages::covering(self.bytes.as_ptr() as usize, self.bytes.capacity());
        let size = rustix::param::page_size();
        // SAFETY: the range is whole pages that hold part of one live allocation owned by
        // `self.bytes`, whose buffer never moves or changes size (no method grows or shrinks the
        // vector) until `drop` releases the lock. mlock only changes paging, never memory
        // contents, and locking a page that is already locked is a no-op; the map is held so that
        // no other secret unlocks these pages in between.
        let locked =
            unsafe { rustix::mm::mlock(pages.first as *mut std::ffi::c_void, pages.count * size) };
        if locked.is_err() {
            return None;
        }
        for page in pages.addresses() {
            *locks.entry(page).or_insert(0) += 1;
        }
        Some(Lock::Pages(pages))
    }
}

impl Drop for SecretBytes {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        use zeroize::Zeroize;
        // Zeroize clears the full capacity and frees nothing: the pages are unlocked below (unless
        // the whole process is locked), before the vector's buffer goes back to the allocator.
        self.bytes.zeroize();
        let Some(Lock::Pages(pages)) = self.locked.take() else {
            return;
        };
        let mut locks = page_locks();
        // A secret made before the whole process was locked: its count goes, its pages stay
        // locked (an munlock now would unlock them for everything on them).
        let all_locked = ALL_LOCKED.load(Ordering::Relaxed);
        let size = rustix::param::page_size();
        for page in pages.addresses() {
            let Some(count) = locks.get_mut(&page) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                locks.remove(&page);
                if all_locked {
                    continue;
                }
                // SAFETY: one whole page that this secret locked and that no live secret holds
                // any more (the count, under the map's lock, says so); munlock only changes
                // paging, never memory contents.
                let _ = unsafe { rustix::mm::munlock(page as *mut std::ffi::c_void, size) };
            }
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.bytes.len())
    }
}

/// Makes the process non-dumpable and sets a hard `RLIMIT_CORE` of 0, once per process.
///
/// A process that holds unsealed secrets should not write them to a core file or let other users'
/// debuggers attach. The `keyhold` command calls this first thing. The library never does: it
/// changes the whole host process for good (a hard limit cannot be raised again, and a
/// non-dumpable process has no core dumps for its own crashes either), which is the application's
/// choice to make. An application embedding [`crate::Keystore`] opts in by calling this before
/// it opens a store, ideally before it starts threads. Failures are logged and ignored: this is
/// defence in depth, not a precondition.
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
        assert!(page_is_locked(s.expose().as_ptr() as usize));
    }

    /// Whether the kernel reports the page holding `addr` as locked: the `Locked:` size of the
    /// mapping that contains it in /proc/self/smaps (mlock splits mappings at lock boundaries).
    fn page_is_locked(addr: usize) -> bool {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| {
                    Some((
                        usize::from_str_radix(a, 16).ok()?,
                        usize::from_str_radix(b, 16).ok()?,
                    ))
                });
            // A mapping's header line starts with its address range; its fields do not.
            if let Some((start, end)) = range {
                inside = (start..end).contains(&addr);
                continue;
            }
            if inside {
                if let Some(kb) = line.strip_prefix("Locked:") {
                    let kb: usize = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                    return kb > 0;
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    /// Two secrets on one page: dropping one leaves the page locked for the other (one munlock
    /// would unlock it for both, and the survivor could be swapped out).
    #[test]
    fn dropping_one_secret_keeps_a_shared_page_locked() {
        let page = rustix::param::page_size();
        let mut kept = Vec::new();
        let pair = loop {
            let a = SecretBytes::zeroed(32);
            let b = SecretBytes::zeroed(32);
            let page_of = |s: &SecretBytes| s.expose().as_ptr() as usize / page;
            if page_of(&a) == page_of(&b) {
                break (a, b);
            }
            kept.push((a, b));
            assert!(
                kept.len() < 1000,
                "the allocator never put two secrets on one page"
            );
        };
        let (a, b) = pair;
        assert!(a.is_locked() && b.is_locked());
        let addr = b.expose().as_ptr() as usize;
        assert!(page_is_locked(addr));
        drop(a);
        assert!(
            page_is_locked(addr),
            "dropping a secret unlocked another's page"
        );
        drop(b);
    }
}
