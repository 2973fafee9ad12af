//! Where a keystore call runs ([`Placement`]): on the thread that read its request, from memory
//! only, or handed over (the blocking pool, or this thread once its other work is handed away),
//! behind its backend's gate; and how long each backend's device uses take ([`UseTimes`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::{State, PER_BACKEND};
use crate::config::Operation;
use crate::keystore::Keystore;
use crate::service::api::ApiError;
use crate::service::auth::Caller;
use crate::service::metrics::Ran;
use crate::KeyType;

/// A call whose JSON is larger than this is not quick, whatever it asks ([`Placement::quick`]):
/// hashing, encrypting or encoding 64 KiB takes tens of microseconds, 64 MiB tens of
/// milliseconds.
pub(super) const QUICK_BODY: usize = 64 * 1024;

/// Device uses whose keystore calls took longer than this on average ([`UseTimes`]) are not run
/// on the thread that read their request: that thread's other tasks would wait for them. Handing
/// over costs 65–110 µs of CPU here, whether the call goes to the blocking pool or, alone, stays
/// on this thread while its other work goes to another (`block_in_place`): in the serve bench, a
/// SoftHSM2 signature at one client cost 160 and 243 µs of CPU (client and service) run here
/// without either, 271 and 308 µs with `block_in_place`, 240 and 308 µs on the pool.
const SHORT_USE: Duration = Duration::from_micros(500);

/// A backend's gate, whether it computes in process ([`crate::Backend::computes_in_process`]),
/// and how long its device uses have taken of late.
#[derive(Debug)]
pub(super) struct Gate {
    pub(super) turns: Arc<Semaphore>,
    pub(super) in_process: bool,
    uses: Arc<UseTimes>,
}

impl Gate {
    pub(super) fn new(in_process: bool) -> Self {
        Self {
            turns: Arc::new(Semaphore::new(PER_BACKEND)),
            in_process,
            uses: Arc::new(UseTimes(AtomicU64::new(u64::MAX))),
        }
    }
}

/// How long a backend's device uses have taken of late: a moving average of their durations,
/// in nanoseconds, each new one weighing a quarter; `u64::MAX` until one is measured.
#[derive(Debug)]
struct UseTimes(AtomicU64);

impl UseTimes {
    /// Whether they have taken less than [`SHORT_USE`] (none measured: no).
    fn are_short(&self) -> bool {
        u128::from(self.0.load(Ordering::Relaxed)) < SHORT_USE.as_nanos()
    }

    /// Counts one that took `took`.
    fn took(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX - 1);
        // The closure always gives a value: the update cannot fail.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == u64::MAX {
                    took
                } else {
                    old - old / 4 + took / 4
                })
            });
    }
}

/// A device use under way on the blocking pool: counted in its backend's [`UseTimes`] when
/// dropped, however it ended.
struct Measured(Arc<UseTimes>, Instant);

impl Drop for Measured {
    fn drop(&mut self) {
        self.0.took(self.1.elapsed());
    }
}

/// Where a keystore call runs: behind its backend's gate (if it is about a key), and, if
/// `quick`, first on the thread that serves its request; if `device_use`, there too when nothing
/// else is under way.
///
/// A call is quick when it is one use of a key (sign, verify, encrypt, decrypt, MAC, data key;
/// not rewrap, which is two) held by a backend that computes in process, by an algorithm that takes microseconds
/// (every key type but RSA, whose private operations take milliseconds), on at most
/// [`QUICK_BODY`] of JSON. Handing such a call to another thread and its answer back costs more
/// than the call. It runs where it was read, from memory only
/// ([`crate::keystore::from_memory_only`]): it reads whether the store changed (at most once a
/// millisecond) only if that can be done at once, and if it would have to wait for anything (read
/// a key's record the keystore has not cached, that read while this process's connection is in
/// use or another process's lock is in the way, run the key's due work, reserve
/// AES-GCM invocations or wait for the thread that does, write a backlogged audit log), it stops
/// before it has done anything and runs on the blocking pool as any other call.
///
/// A signature check is quick whoever holds the key: it uses the recorded public key.
///
/// A device use is any other such use of a key held by a device (a backend that does not
/// compute in process), on at most [`QUICK_BODY`] of JSON. It waits for the device, so it runs
/// on the thread that read it only when no other call is under way in the service (quick calls,
/// which never wait, are not counted; nor are the periodic verification's thread and bearer
/// tokens' lookups), its backend's device uses have taken under [`SHORT_USE`] of late (their
/// whole keystore calls), and the runtime has another worker to serve the other connections
/// meanwhile; from memory only as a quick call, the device's answer aside: a device that would
/// first have to be waited for (a session of a token, or one opened and logged in; a TPM's turn
/// or connection), or asked whether it is still there after it refused the use, stops it there,
/// as the store would. Otherwise it is handed over as any other call (and measured there). A
/// batch's runs never run there: a run holds many uses.
///
/// Everything else (RSA, lifecycle changes, key generation, listing and showing keys) goes to the
/// blocking pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Placement {
    pub(super) backend: Option<Arc<str>>,
    pub(super) quick: bool,
    pub(super) device_use: bool,
}

impl Placement {
    /// A call on the blocking pool, behind `backend`'s gate if any.
    pub(super) fn pool(backend: Option<Arc<str>>) -> Self {
        Self {
            backend,
            quick: false,
            device_use: false,
        }
    }

    /// The same, limited to a body of `len` bytes: larger than [`QUICK_BODY`], not run here.
    pub(super) fn for_body(self, len: usize) -> Self {
        let small = len <= QUICK_BODY;
        Self {
            quick: self.quick && small,
            device_use: self.device_use && small,
            ..self
        }
    }
}

/// Whether `operation` is a use of a key of `key_type` quick enough to run where it is, on a
/// backend that computes in process ([`Placement`]).
pub(super) fn quick_use(operation: Operation, key_type: KeyType) -> bool {
    let key_use = matches!(
        operation,
        Operation::Sign
            | Operation::Verify
            | Operation::Encrypt
            | Operation::Decrypt
            | Operation::Mac
            | Operation::MacVerify
            | Operation::Datakey
            | Operation::DatakeyWrapped
    );
    key_use && key_type.rsa_bits().is_none()
}

/// One keystore call under way, counted in [`State::in_flight`] until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `work` on the keystore where `placement` says, behind its backend's gate (if any), on
/// behalf of `client`, holding the client's turn and the gate until it ends. A quick call, and a
/// short device use alone in the service ([`Placement`]), runs here from memory only
/// ([`crate::keystore::from_memory_only`]); if it would have had to wait, it stopped before
/// doing anything, and runs again off the executor as any other call.
pub(super) async fn run_blocking<T: Send + 'static>(
    state: &State,
    client: &Caller,
    placement: Placement,
    mut work: impl FnMut(&Keystore) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let who = client.name_arc();
    let client_turn = client.turn();
    let gate = placement.backend.as_ref().and_then(|b| state.gates.get(b));
    let backend_turn = match gate {
        // The gate is never closed: acquiring fails only if it were.
        Some(gate) => Some(
            Arc::clone(&gate.turns)
                .acquire_owned()
                .await
                .map_err(|_| ApiError::internal("the backend's gate closed".into()))?,
        ),
        None => None,
    };
    let keystore = Arc::clone(&state.keystore);
    if placement.quick {
        if let Some(done) = here_or_moved(state, &keystore, &who, &mut work, None) {
            return done;
        }
    }
    let alone = state.in_flight.fetch_add(1, Ordering::Relaxed) == 0;
    let in_flight = InFlight(Arc::clone(&state.in_flight));
    let uses = gate
        .filter(|_| placement.device_use)
        .map(|g| Arc::clone(&g.uses));
    match &uses {
        Some(uses) if alone && uses.are_short() && another_worker() => {
            if let Some(done) = here_or_moved(state, &keystore, &who, &mut work, Some(uses)) {
                return done;
            }
        }
        _ if !placement.quick => state.metrics.ran(Ran::Pool),
        _ => {}
    }
    let blocking = move || {
        let _turns = (client_turn, backend_turn, in_flight);
        // Measured however the call ends, a panic included; dropped first, before the turns.
        let _measured = uses.map(|uses| Measured(uses, Instant::now()));
        crate::audit::on_behalf_of(&who, || work(&keystore))
    };
    // Work alone in the service runs on this thread, which hands its other tasks to another
    // worker for as long as it blocks: no thread is woken to carry the work there and its
    // answer back (in the serve bench, one client's p50 fell from about 130 to 80 us). Work
    // beside other work goes to the blocking pool, whose threads, kept busy, take it without a
    // hand-over per call: measured (benches/serve.rs, CPU per operation) a quarter cheaper
    // than handing the executor over each time. A runtime of one thread cannot hand its tasks
    // over: there, always the pool.
    if alone
        && tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
    {
        tokio::task::block_in_place(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(blocking))
        })
        .map_err(|_| panicked())
    } else {
        tokio::task::spawn_blocking(blocking)
            .await
            .map_err(|e| ApiError::internal(format!("the operation did not finish: {e}")))
    }
}

/// Runs `work` on this thread from memory only ([`crate::keystore::from_memory_only`]), on
/// behalf of `who`, counted in the metrics (and, a device use, in `uses`): its outcome (a panic
/// is a 500), or `None` if it stopped where it would have waited, to be handed over.
fn here_or_moved<T>(
    state: &State,
    keystore: &Keystore,
    who: &Arc<str>,
    work: &mut impl FnMut(&Keystore) -> T,
    uses: Option<&UseTimes>,
) -> Option<Result<T, ApiError>> {
    let started = Instant::now();
    let here = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::keystore::from_memory_only(|| crate::audit::on_behalf_of(who, || work(keystore)))
            .ok()
    }));
    let done = match here {
        Ok(None) => {
            state.metrics.ran(Ran::Moved);
            return None;
        }
        Ok(Some(done)) => Ok(done),
        Err(_) => Err(panicked()),
    };
    if let Some(uses) = uses {
        uses.took(started.elapsed());
    }
    state.metrics.ran(Ran::Here);
    Some(done)
}

/// A panic in a call: the request's 500, as the pool makes it, not its connection's end.
fn panicked() -> ApiError {
    ApiError::internal("the operation did not finish: it panicked".into())
}

/// Whether this runtime has another worker to serve connections while this one's thread waits.
fn another_worker() -> bool {
    let runtime = tokio::runtime::Handle::current();
    runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        && runtime.metrics().num_workers() >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uses_of_keys_but_rsa_keys_are_quick() {
        use KeyType::{Aes256Gcm, EcdsaP256, EcdsaP384, Ed25519, HmacSha256, Rsa2048, Rsa4096};
        let quick = [
            (Operation::Sign, EcdsaP256),
            (Operation::Sign, EcdsaP384),
            (Operation::Verify, Ed25519),
            (Operation::Encrypt, Aes256Gcm),
            (Operation::Decrypt, Aes256Gcm),
            (Operation::Datakey, Aes256Gcm),
            (Operation::DatakeyWrapped, Aes256Gcm),
            (Operation::Mac, HmacSha256),
            (Operation::MacVerify, HmacSha256),
        ];
        for (operation, key_type) in quick {
            assert!(quick_use(operation, key_type), "{operation:?} {key_type:?}");
        }
        let pooled = [
            // RSA's private operations take milliseconds; its public ones go along.
            (Operation::Sign, Rsa2048),
            (Operation::Verify, Rsa2048),
            (Operation::Decrypt, Rsa4096),
            (Operation::Encrypt, Rsa4096),
            // A rewrap is two uses, a decryption audited before the encryption, which may have
            // to wait: not quick.
            (Operation::Rewrap, Aes256Gcm),
            // Not uses: they write the store, make keys or read it.
            (Operation::Rotate, EcdsaP256),
            (Operation::State, Aes256Gcm),
            (Operation::Destroy, HmacSha256),
            (Operation::Policy, EcdsaP256),
            (Operation::Create, EcdsaP256),
            (Operation::Show, EcdsaP256),
            (Operation::Pubkey, EcdsaP256),
            (Operation::History, Aes256Gcm),
            // A wrapping is two uses, each audited; an import writes the store.
            (Operation::Export, Aes256Gcm),
            (Operation::Import, EcdsaP256),
        ];
        for (operation, key_type) in pooled {
            assert!(
                !quick_use(operation, key_type),
                "{operation:?} {key_type:?}"
            );
        }
    }

    #[test]
    fn device_uses_are_short_while_their_average_is_under_the_bound() {
        let uses = UseTimes(AtomicU64::new(u64::MAX));
        assert!(!uses.are_short(), "none measured");
        uses.took(Duration::from_micros(100));
        assert!(uses.are_short(), "the first measured is the average");
        // One slow use weighs a quarter: 100 µs + (80 ms - 100 µs) / 4 is about 20 ms.
        uses.took(Duration::from_millis(80));
        assert!(!uses.are_short());
        let mut after = 0;
        while !uses.are_short() {
            uses.took(Duration::from_micros(100));
            after += 1;
        }
        // 100 µs + (20.08 ms - 100 µs) * (3/4)^n < 500 µs from n = 14.
        assert_eq!(after, 14, "short again after that many short ones");
        uses.took(Duration::from_micros(SHORT_USE.as_micros() as u64 * 9));
        assert!(!uses.are_short(), "one use 9 times the bound");
    }

    #[test]
    fn a_body_over_the_quick_limit_runs_nowhere_but_the_pool() {
        let placement = Placement {
            backend: Some(Arc::from("hsm")),
            quick: false,
            device_use: true,
        };
        assert!(placement.clone().for_body(QUICK_BODY).device_use);
        assert!(!placement.for_body(QUICK_BODY + 1).device_use);
        let placement = Placement {
            backend: None,
            quick: true,
            device_use: false,
        };
        assert!(placement.clone().for_body(QUICK_BODY).quick);
        assert!(!placement.for_body(QUICK_BODY + 1).quick);
    }
}
