//! One TPM, shared by everything in the process that uses it: TPM backends and the TPM sealer.
//!
//! A TPM without a resource manager (swtpm, `/dev/tpm0`) serves one connection at a time, and an
//! ESAPI context must never be used by two threads at once (every tss-esapi method takes
//! `&mut self`). So there is one [`TpmDevice`] per TCTI in a process, holding one connection, and
//! callers take turns on it, the way Parsec serialises its TPM provider. A caller waits at most
//! the configured timeout for its turn and then gets [`Error::Timeout`].
//!
//! The connection is made on first use and rebuilt after it was lost, so a TPM that is not there
//! when the store opens, or that restarts, is picked up again without restarting the process.
//! Every connection must find the same SRK Name as the first, or as the one a store pinned (the
//! `tpm` sealer pins the Name it recorded at init): a different one means the TPM was cleared or
//! replaced, or someone on the way answers in its place. The Name is computed from the SRK's public
//! area and compared before any session is salted to that key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Instant;

use tss_esapi::tcti_ldr::TctiNameConf;

use super::connection::{Connection, Features, Setup, Unverified};
use super::errors::{self, Failure};
use crate::error::{Error, Result};

// In a module of their own, built without the `tpm` feature too: the configuration checks them.
pub use crate::backend::tpm_settings::{DeviceSettings, DEFAULT_MAX_LOADED, DEFAULT_TIMEOUT};

/// A TPM reached through one TCTI.
pub struct TpmDevice {
    tcti: String,
    tcti_conf: TctiNameConf,
    settings: DeviceSettings,
    /// The connection and whether someone is using it. The user takes the connection out of the
    /// slot for its turn, so the lock is held only to hand it over.
    slot: Mutex<Slot>,
    freed: Condvar,
    /// The SRK's Name pinned by a store, else the Name at the first connection: every connection
    /// must find the same.
    srk_name: OnceLock<Vec<u8>>,
    /// Whether `srk_name` was pinned by a store (rather than learnt at the first connection).
    pinned: AtomicBool,
    /// Whether another TPM than the pinned one was found in its place (the `tpm` sealer then
    /// opened the store with its recovery passphrase): connections to it are refused as
    /// unavailable, never salted, for the rest of the process.
    elsewhere: AtomicBool,
    features: OnceLock<Features>,
}

#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    connection: Option<Connection>,
    /// Callers waiting for their turn, first come first served: a thread that just had its turn
    /// must not barge ahead of one that has been waiting.
    queue: std::collections::VecDeque<u64>,
    next_ticket: u64,
}

impl std::fmt::Debug for TpmDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmDevice")
            .field("tcti", &self.tcti)
            .field("settings", &self.settings)
            .field(
                "srk_name",
                &self.srk_name.get().map(|n| crate::hex::encode(n)),
            )
            .finish_non_exhaustive()
    }
}

/// The devices of this process, by TCTI.
fn registry() -> MutexGuard<'static, HashMap<String, Weak<TpmDevice>>> {
    static DEVICES: OnceLock<Mutex<HashMap<String, Weak<TpmDevice>>>> = OnceLock::new();
    DEVICES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// A caller's turn on the device; gives the connection back when dropped.
struct Turn<'d> {
    device: &'d TpmDevice,
    connection: Option<Connection>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        // A panic mid-command leaves the context in an unknown state: start afresh.
        let connection = if std::thread::panicking() {
            None
        } else {
            self.connection.take()
        };
        let mut slot = self.device.lock_slot();
        slot.connection = connection;
        slot.busy = false;
        drop(slot);
        self.device.freed.notify_all();
    }
}

/// A turn on the device held by a test (see [`TpmDevice::hold`]); released on drop.
#[cfg(any(test, feature = "testing"))]
pub struct DeviceHold<'d> {
    _turn: Turn<'d>,
}

#[cfg(any(test, feature = "testing"))]
impl std::fmt::Debug for DeviceHold<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHold").finish_non_exhaustive()
    }
}

impl TpmDevice {
    /// The device for `tcti` in this process, made if nobody holds it. Connects lazily: the TPM
    /// need not be there yet.
    ///
    /// `tcti` must already be checked (see `parse_tcti`). A device already open with other
    /// settings keeps its own; a warning says so.
    pub(super) fn shared(
        tcti: &str,
        tcti_conf: TctiNameConf,
        settings: DeviceSettings,
    ) -> Arc<Self> {
        let mut devices = registry();
        devices.retain(|_, d| d.strong_count() > 0);
        if let Some(device) = devices.get(tcti).and_then(Weak::upgrade) {
            if device.settings != settings {
                tracing::warn!(
                    tcti,
                    "the TPM is already open in this process with other settings; using those"
                );
            }
            return device;
        }
        let device = Arc::new(Self {
            tcti: tcti.to_owned(),
            tcti_conf,
            settings,
            slot: Mutex::default(),
            freed: Condvar::new(),
            srk_name: OnceLock::new(),
            pinned: AtomicBool::new(false),
            elsewhere: AtomicBool::new(false),
            features: OnceLock::new(),
        });
        devices.insert(tcti.to_owned(), Arc::downgrade(&device));
        device
    }

    /// The TCTI this device is reached through.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    fn lock_slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits, at most the timeout, for the connection to be free, and takes it.
    fn turn(&self, who: &str) -> Result<Turn<'_>> {
        let deadline = Instant::now() + self.settings.timeout;
        let mut slot = self.lock_slot();
        if slot.busy || !slot.queue.is_empty() {
            // Waiting for the TPM is not done from memory only: the caller goes where waiting is
            // allowed ([`crate::keystore::may_wait`]).
            crate::keystore::may_wait("its turn on the TPM")?;
        }
        let ticket = slot.next_ticket;
        slot.next_ticket = slot.next_ticket.wrapping_add(1);
        slot.queue.push_back(ticket);
        while slot.busy || slot.queue.front() != Some(&ticket) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                slot.queue.retain(|&t| t != ticket);
                drop(slot);
                // The next in line may be free to go now.
                self.freed.notify_all();
                return Err(Error::Timeout {
                    backend: who.to_owned(),
                    waited: self.settings.timeout,
                    what: "its turn on the TPM, which serves one command at a time".into(),
                });
            }
            slot = self
                .freed
                .wait_timeout(slot, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        slot.queue.pop_front();
        slot.busy = true;
        let connection = slot.connection.take();
        Ok(Turn {
            device: self,
            connection,
        })
    }

    /// Takes a turn on the device and keeps it until the guard is dropped, as a caller in the
    /// middle of a long command (an RSA key generation) would: lets tests check the bounded wait
    /// of everyone else without depending on how long the TPM takes for anything.
    ///
    /// # Errors
    /// [`Error::Timeout`] if the device stays busy past the timeout.
    #[cfg(any(test, feature = "testing"))]
    pub fn hold(&self, who: &str) -> Result<DeviceHold<'_>> {
        Ok(DeviceHold {
            _turn: self.turn(who)?,
        })
    }

    /// A new connection, checked to reach the same TPM as the pinned Name (or the first
    /// connection) says before its session is salted to the SRK.
    fn connect(&self, who: &str) -> Result<Connection> {
        let setup = Setup {
            srk_handle: self.settings.srk_handle,
            max_loaded: self.settings.max_loaded,
        };
        let map = |f| errors::map_connect(who, &self.tcti, self.settings.srk_handle, f);
        super::library::load().map_err(|reason| Error::BackendUnavailable {
            backend: who.to_owned(),
            reason,
        })?;
        let connection = self.open_bounded(who, setup)?.map_err(map)?;
        let first = self.srk_name.get_or_init(|| connection.srk_name().to_vec());
        if connection.srk_name() != first.as_slice() && self.elsewhere.load(Ordering::SeqCst) {
            return Err(self.not_the_store_s(who, first, connection.srk_name()));
        }
        if connection.srk_name() != first.as_slice() && self.pinned.load(Ordering::SeqCst) {
            return Err(self.not_pinned(first, connection.srk_name()));
        }
        if connection.srk_name() != first.as_slice() {
            return Err(Error::BackendUnavailable {
                backend: who.to_owned(),
                reason: format!(
                    "the TPM at `{}` has a different storage root key (Name {} instead of {}): \
                     the TPM was cleared or replaced, and keys made on the old one cannot be used",
                    self.tcti,
                    crate::hex::encode(connection.srk_name()),
                    crate::hex::encode(first)
                ),
            });
        }
        let connection = connection.salt_session().map_err(map)?;
        tracing::debug!(tcti = %self.tcti, "connected to the TPM");
        Ok(connection)
    }

    /// [`Connection::open`], waiting at most the timeout for it. A TPM that accepts the
    /// connection and then does not answer (swtpm serves one client at a time and queues the
    /// rest; a TPM stuck in a long command for another program) would otherwise hold the caller
    /// for as long as that lasts: tss-esapi waits for an answer without a limit. Past the
    /// timeout the opening thread is left to finish on its own (it then drops the connection).
    fn open_bounded(&self, who: &str, setup: Setup) -> Result<Result<Unverified, Failure>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let conf = self.tcti_conf.clone();
        std::thread::Builder::new()
            .name("keyhold-tpm-connect".into())
            .spawn(move || {
                // The caller may have stopped waiting: then nobody wants the connection.
                let _ = tx.send(Connection::open(&conf, setup));
            })
            .map_err(|e| Error::BackendUnavailable {
                backend: who.to_owned(),
                reason: format!("cannot start a thread to connect to the TPM: {e}"),
            })?;
        rx.recv_timeout(self.settings.timeout).map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => Error::Timeout {
                backend: who.to_owned(),
                waited: self.settings.timeout,
                what: format!(
                    "the TPM at `{}` to answer (it accepted the connection: another program may \
                     hold it, and swtpm serves one client at a time)",
                    self.tcti
                ),
            },
            std::sync::mpsc::RecvTimeoutError::Disconnected => Error::BackendUnavailable {
                backend: who.to_owned(),
                reason: "the thread connecting to the TPM ended without an answer".into(),
            },
        })
    }

    fn not_pinned(&self, pinned: &[u8], found: &[u8]) -> Error {
        Error::Unseal {
            reason: format!(
                "the store pinned a TPM whose storage root key has Name {}, but the TPM at `{}` \
                 has {}: it is another TPM, or this one was cleared since (its keys are then gone \
                 too), or something between keyhold and the TPM answers in its place; no session \
                 was salted to that key",
                crate::hex::encode(pinned),
                self.tcti,
                crate::hex::encode(found)
            ),
        }
    }

    /// The TPM here is not the store's, which was opened without it: unavailable, and how to move
    /// the store to it.
    fn not_the_store_s(&self, who: &str, pinned: &[u8], found: &[u8]) -> Error {
        Error::BackendUnavailable {
            backend: who.to_owned(),
            reason: format!(
                "the TPM at `{}` (storage root key Name {}) is not the one the store was sealed \
                 by (Name {}), and keyhold uses no other TPM in its place: an impostor between \
                 keyhold and the TPM would look the same. To move the store to this TPM, open it \
                 with its recovery passphrase: `keyhold store reanchor --yes` if it is refused \
                 for its old TPM's counter, then `keyhold reseal --to passphrase`, then \
                 `keyhold reseal --to tpm`",
                self.tcti,
                crate::hex::encode(found),
                crate::hex::encode(pinned)
            ),
        }
    }

    /// Pins `name` (the SRK Name the store recorded, which another TPM is found in place of):
    /// every connection this process makes to a TPM with another Name is refused as unavailable
    /// ([`Error::BackendUnavailable`]), so that nothing is salted to, sealed by or counted on
    /// it. The store was opened without the TPM (its recovery passphrase).
    ///
    /// # Errors
    /// [`Error::Unseal`] if this device already reached a TPM whose SRK has another Name.
    pub fn pin_elsewhere(&self, name: &[u8]) -> Result<()> {
        self.pin_srk_name(name)?;
        self.elsewhere.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Pins the SRK Name a store recorded: every connection from now on must find an SRK with
    /// this Name (computed from its public area) before a session is salted to it.
    ///
    /// # Errors
    /// [`Error::Unseal`] if this device already reached a TPM whose SRK has another Name.
    pub fn pin_srk_name(&self, name: &[u8]) -> Result<()> {
        let known = self.srk_name.get_or_init(|| name.to_vec());
        if known != name {
            return Err(self.not_pinned(name, known));
        }
        self.pinned.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Makes sure the device has a connection (to the pinned SRK, if one was pinned).
    ///
    /// # Errors
    /// [`Error::Unseal`] for an SRK other than the pinned one; [`Error::BackendUnavailable`].
    pub fn connect_now(&self, who: &str) -> Result<()> {
        self.run(who, |_| Ok(()))
    }

    /// The Name of the SRK of the TPM there now, learnt before any session is salted to it and
    /// without pinning or learning it: how the `tpm` sealer tells a store sealed by another TPM
    /// (or by this one before it was cleared, or an impostor) from a seal this TPM refuses. This process's
    /// connection answers if it has one; otherwise a connection is opened for the question only.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if the TPM cannot be reached; [`Error::Timeout`].
    pub fn present_srk_name(&self, who: &str) -> Result<Vec<u8>> {
        let turn = self.turn(who)?;
        if let Some(connection) = turn.connection.as_ref() {
            return Ok(connection.srk_name().to_vec());
        }
        let setup = Setup {
            srk_handle: self.settings.srk_handle,
            max_loaded: self.settings.max_loaded,
        };
        let map = |f| errors::map_connect(who, &self.tcti, self.settings.srk_handle, f);
        // Dropped unsalted: the context flushes the SRK it made.
        let unverified = self.open_bounded(who, setup)?.map_err(map)?;
        Ok(unverified.srk_name().to_vec())
    }

    /// Runs `op` on this process's connection if it has one (a TPM it never reached, or lost,
    /// holds nothing it loaded); connects to nobody.
    pub(super) fn run_if_connected(
        &self,
        who: &str,
        op: impl FnOnce(&mut Connection) -> Result<(), Failure>,
    ) -> Result<()> {
        let mut turn = self.turn(who)?;
        match turn.connection.as_mut() {
            Some(connection) => op(connection).map_err(|failure| errors::map(who, failure)),
            None => Ok(()),
        }
    }

    /// Runs `op` once, connecting first if there is no connection, never again: for commands
    /// whose repetition would count twice (an NV counter's increment, whose answer may be lost
    /// after the TPM carried it out). A lost connection is dropped, for the next command to
    /// rebuild.
    pub(super) fn run_once<T>(
        &self,
        who: &str,
        op: impl FnOnce(&mut Connection) -> Result<T, Failure>,
    ) -> Result<T> {
        let mut turn = self.turn(who)?;
        let connection = match turn.connection.as_mut() {
            Some(c) => c,
            None => turn.connection.insert(self.connect(who)?),
        };
        op(connection).map_err(|failure| {
            if errors::is_disconnect(failure.error) || errors::is_reset(failure.error) {
                if let Some(stale) = turn.connection.take() {
                    stale.abandon();
                }
            }
            errors::map(who, failure)
        })
    }

    /// Runs `op` on the connection, connecting first if there is none.
    ///
    /// A lost connection, or a TPM that was reset and lost the SRK, session and loaded keys, is
    /// rebuilt and `op` run once more: blobs reload under the re-created SRK. If the TPM is
    /// still not there, the error is [`Error::BackendUnavailable`]. Nothing else is retried: in
    /// particular not a refused authorisation, which would count towards a dictionary-attack
    /// lockout. `who` names the backend (or sealer) in errors.
    pub(super) fn run<T>(
        &self,
        who: &str,
        mut op: impl FnMut(&mut Connection) -> Result<T, Failure>,
    ) -> Result<T> {
        let mut turn = self.turn(who)?;
        let mut lost = None;
        for _attempt in 0..2 {
            let connection = match turn.connection.as_mut() {
                Some(c) => c,
                None => {
                    crate::keystore::may_wait("connect to the TPM")?;
                    turn.connection.insert(self.connect(who)?)
                }
            };
            match op(connection) {
                Ok(value) => return Ok(value),
                Err(failure)
                    if errors::is_disconnect(failure.error) || errors::is_reset(failure.error) =>
                {
                    tracing::warn!(
                        backend = %who,
                        "lost the TPM connection or its objects ({}); reconnecting",
                        failure.command
                    );
                    if let Some(stale) = turn.connection.take() {
                        stale.abandon();
                    }
                    lost = Some(failure);
                }
                Err(failure) => return Err(errors::map(who, failure)),
            }
        }
        Err(match lost {
            Some(failure) => errors::map(who, failure),
            None => Error::crypto("TPM retry loop"),
        })
    }

    /// The SRK's Name, connecting first if needed.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if the TPM cannot be reached.
    pub fn srk_name(&self, who: &str) -> Result<Vec<u8>> {
        if let Some(name) = self.srk_name.get() {
            return Ok(name.clone());
        }
        self.run(who, |connection| Ok(connection.srk_name().to_vec()))
    }

    /// What the TPM supports, asked once.
    pub(super) fn features(&self, who: &str) -> Result<Features> {
        if let Some(f) = self.features.get() {
            return Ok(*f);
        }
        let features = self.run(who, Connection::features)?;
        Ok(*self.features.get_or_init(|| features))
    }
}

#[cfg(test)]
#[cfg(all(feature = "testing", feature = "serve"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keystore::from_memory_only;
    use crate::testing::Swtpm;
    use std::time::Duration;

    /// From memory only (a use `keyhold serve` runs on the thread that read it), a TPM not yet
    /// connected to, or busy with another caller's command, stops the call at once instead of
    /// connecting or waiting for its turn; a connected, free TPM is used.
    #[test]
    fn from_memory_only_an_unconnected_or_busy_tpm_stops_the_call() {
        let tpm = Swtpm::new().unwrap();
        // Long enough for a loaded machine to connect; a wait for the turn would show.
        let settings = DeviceSettings {
            timeout: Duration::from_secs(5),
            ..DeviceSettings::default()
        };
        let device = super::super::device(&tpm.tcti(), settings).unwrap();
        let name = |c: &mut Connection| Ok(c.srk_name().to_vec());
        let stopped = from_memory_only(|| device.run("tpm", name));
        assert!(stopped.is_err(), "connected from memory only");
        let connected = device.run("tpm", name).unwrap();
        let used = from_memory_only(|| device.run("tpm", name));
        assert_eq!(used.unwrap().unwrap(), connected);

        let hold = device.hold("another caller").unwrap();
        let started = Instant::now();
        let stopped = from_memory_only(|| device.run("tpm", name));
        assert!(stopped.is_err(), "waited for its turn: {stopped:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waited for its turn"
        );
        drop(hold);
        assert!(from_memory_only(|| device.run("tpm", name)).is_ok());
    }
}
