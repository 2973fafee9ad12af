//! The store verified now and then by a long-running process, each outcome logged.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::{Status, VerifyReport};
use crate::error::{Error, Result};
use crate::keystore::Keystore;

impl Keystore {
    /// Verifies the store ([`Self::verify_store`]) and logs the outcome: one `INFO` line when every
    /// check passed; otherwise an `ERROR` line per failure and a `WARN` line per key left
    /// unchecked, each naming its key (the first 50; then one line says how many more), then a
    /// summary at the level of the worst. For
    /// long-running processes ([`Self::spawn_periodic_verify`], or their own loop).
    ///
    /// # Errors
    /// As [`Self::verify_store`] (logged at `ERROR` too).
    pub fn verify_store_and_log(&self) -> Result<VerifyReport> {
        let report = self.verify_store(&|_| {});
        match &report {
            Ok(report) => log_report(report),
            Err(e) => {
                tracing::error!(store = %self.dir().display(), "store verify could not run: {e}")
            }
        }
        report
    }

    /// Verifies this keystore every `interval` on a thread of its own, logging each outcome
    /// ([`Self::verify_store_and_log`]) and handing it to `observe`; the first run is one interval
    /// after the call. The returned handle stops the thread when dropped (waiting for a run
    /// under way to end). `[store] verify_interval` in the configuration is meant for this.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a zero interval; [`Error::Io`] if the thread cannot start.
    pub fn spawn_periodic_verify(
        self: &Arc<Self>,
        interval: Duration,
        mut observe: impl FnMut(&Result<VerifyReport>) + Send + 'static,
    ) -> Result<PeriodicVerify> {
        if interval.is_zero() {
            return Err(Error::InvalidInput(
                "the verify interval must be at least one second".into(),
            ));
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let keystore = Arc::clone(self);
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("keyhold-verify".into())
            .spawn(move || {
                let (flag, wake) = &*stopped;
                let mut stop = flag.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    let deadline = std::time::Instant::now() + interval;
                    // Woken early only to stop; spurious wake-ups wait out the rest.
                    while !*stop {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        stop = wake
                            .wait_timeout(stop, left)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                    if *stop {
                        return;
                    }
                    drop(stop);
                    observe(&keystore.verify_store_and_log());
                    stop = flag.lock().unwrap_or_else(PoisonError::into_inner);
                }
            })
            .map_err(|e| Error::io("start the periodic store verification thread", e))?;
        Ok(PeriodicVerify {
            stop,
            thread: Some(thread),
        })
    }
}

/// The most findings one periodic run logs a line each for: a replaced root fails every record,
/// and 100k lines every interval would bury the log, not inform it.
const MAX_LOGGED: usize = 50;

/// Logs a report: see [`Keystore::verify_store_and_log`].
fn log_report(report: &VerifyReport) {
    for (check, finding) in report.findings().take(MAX_LOGGED) {
        let key = finding.key.as_ref();
        let label = key.map_or("", |k| k.label.as_str());
        let uuid = key.map_or("", |k| k.uuid.as_str());
        let version = key.and_then(|k| k.version);
        let version = version.map_or_else(String::new, |v| v.to_string());
        match finding.status {
            Status::Failed => tracing::error!(
                check = check.as_str(),
                key = label,
                uuid,
                version,
                "store verify: {}",
                finding.what
            ),
            _ => tracing::warn!(
                check = check.as_str(),
                key = label,
                uuid,
                version,
                "store verify: {}",
                finding.what
            ),
        }
    }
    let (failed, unchecked) = report
        .findings()
        .fold((0, 0), |(f, u), (_, finding)| match finding.status {
            Status::Failed => (f + 1, u),
            _ => (f, u + 1),
        });
    let total = failed + unchecked;
    if total > MAX_LOGGED {
        tracing::error!(
            "store verify: {} more findings not logged (run `keyhold store verify` for all)",
            total - MAX_LOGGED
        );
    }
    match report.status() {
        Status::Passed => tracing::info!(
            store_id = %report.store_id, keys = report.keys,
            "store verify: every check passed"
        ),
        Status::Unchecked => tracing::warn!(
            store_id = %report.store_id, keys = report.keys,
            "store verify: nothing failed, but {unchecked} items could not be checked"
        ),
        Status::Failed => tracing::error!(
            store_id = %report.store_id, keys = report.keys,
            "store verify: {failed} problems found, {unchecked} items unchecked"
        ),
    }
}

/// The thread of [`Keystore::spawn_periodic_verify`]; stops it when dropped.
#[derive(Debug)]
pub struct PeriodicVerify {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for PeriodicVerify {
    fn drop(&mut self) {
        let (flag, wake) = &*self.stop;
        *flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the periodic store verification thread panicked");
            }
        }
    }
}
