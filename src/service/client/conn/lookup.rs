//! Name lookups of the service's host, one at a time.
//!
//! `getaddrinfo` cannot be given a deadline, so a lookup runs on a thread of its own and a call
//! waits for it only until the call's deadline. A resolver that does not answer (a DNS outage)
//! would otherwise leave one thread per call behind, each waiting for as long as the resolver
//! takes; here a lookup under way is shared by every call that needs one, so an outage holds
//! one thread, however many calls time out waiting for it. A lookup that ended is not kept: the
//! next connection looks the name up again.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// What a lookup found: the addresses, or why there are none.
type Found = std::io::Result<Vec<SocketAddr>>;

/// A resolver: `(host, port)` to addresses.
type Resolve = fn(&str, u16) -> Found;

/// The lookup under way, if any, of one client.
pub(in crate::service::client) struct Lookups {
    current: Mutex<Option<Arc<Lookup>>>,
    resolve: Resolve,
}

/// One lookup of `host:port`, and its answer once there.
struct Lookup {
    host: String,
    port: u16,
    found: Mutex<Option<Found>>,
    done: Condvar,
}

impl Lookup {
    fn found(&self) -> MutexGuard<'_, Option<Found>> {
        self.found.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// std's resolver (`getaddrinfo`).
fn system(host: &str, port: u16) -> Found {
    use std::net::ToSocketAddrs as _;
    (host, port).to_socket_addrs().map(Iterator::collect)
}

impl Lookups {
    pub(in crate::service::client) fn new() -> Self {
        Self::with(system)
    }

    fn with(resolve: Resolve) -> Self {
        Self {
            current: Mutex::new(None),
            resolve,
        }
    }

    /// The addresses of `host:port`, from the lookup under way or a new one; `None` if none
    /// came by `deadline`. `Err` only if no thread could be started for the lookup.
    pub(in crate::service::client) fn addresses(
        &self,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> std::io::Result<Option<Found>> {
        let lookup = {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            match &*current {
                // Under way: shared. Ended: not used again, so a name's addresses are never
                // older than the connection that needs them.
                Some(l) if l.host == host && l.port == port && l.found().is_none() => Arc::clone(l),
                _ => {
                    let lookup = Arc::new(Lookup {
                        host: host.to_owned(),
                        port,
                        found: Mutex::new(None),
                        done: Condvar::new(),
                    });
                    self.start(Arc::clone(&lookup))?;
                    *current = Some(Arc::clone(&lookup));
                    lookup
                }
            }
        };
        let mut found = lookup.found();
        loop {
            if let Some(answer) = &*found {
                return Ok(Some(copy(answer)));
            }
            let time = deadline.saturating_duration_since(Instant::now());
            if time.is_zero() {
                return Ok(None);
            }
            found = lookup
                .done
                .wait_timeout(found, time)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Runs `lookup` on a thread of its own, which holds it (not these lookups: the client may
    /// be dropped first).
    fn start(&self, lookup: Arc<Lookup>) -> std::io::Result<()> {
        let resolve = self.resolve;
        std::thread::Builder::new()
            .name("keyhold-resolve".into())
            .spawn(move || {
                let answer = resolve(&lookup.host, lookup.port);
                *lookup.found() = Some(answer);
                lookup.done.notify_all();
            })
            .map(drop)
    }
}

/// The same answer again (an `io::Error` is not `Clone`).
fn copy(found: &Found) -> Found {
    match found {
        Ok(addresses) => Ok(addresses.clone()),
        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A resolver that does not answer until the test lets it (a DNS outage), counting its
    /// lookups.
    static SLOW_CALLS: AtomicUsize = AtomicUsize::new(0);
    static GATE: Mutex<bool> = Mutex::new(false);
    static OPENED: Condvar = Condvar::new();

    fn slow(_: &str, port: u16) -> Found {
        SLOW_CALLS.fetch_add(1, Ordering::SeqCst);
        let mut open = GATE.lock().unwrap();
        while !*open {
            open = OPENED.wait(open).unwrap();
        }
        Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
    }

    #[test]
    fn calls_during_an_outage_share_one_lookup_and_give_up_at_their_deadlines() {
        let lookups = Lookups::with(slow);
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..20 {
                s.spawn(|| {
                    let deadline = Instant::now() + Duration::from_millis(100);
                    let found = lookups.addresses("kms.example", 8443, deadline).unwrap();
                    assert!(found.is_none(), "answered during the outage");
                });
            }
        });
        // Every call gave up at its own deadline, and one thread looked the name up for all.
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(SLOW_CALLS.load(Ordering::SeqCst), 1);
        // The resolver answers: a call waiting then gets the addresses.
        *GATE.lock().unwrap() = true;
        OPENED.notify_all();
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = lookups.addresses("kms.example", 8443, deadline).unwrap();
        assert_eq!(
            found.unwrap().unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 8443))]
        );
        // A lookup that ended is not reused: the next call looks the name up again.
        let before = SLOW_CALLS.load(Ordering::SeqCst);
        lookups.addresses("kms.example", 8443, deadline).unwrap();
        assert_eq!(SLOW_CALLS.load(Ordering::SeqCst), before + 1);
    }

    fn unknown(host: &str, _: u16) -> Found {
        std::thread::sleep(Duration::from_millis(50));
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no such host `{host}`"),
        ))
    }

    #[test]
    fn a_failed_lookup_is_every_waiting_calls_error() {
        let lookups = Lookups::with(unknown);
        let deadline = Instant::now() + Duration::from_secs(10);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let e = lookups
                        .addresses("gone.example", 443, deadline)
                        .unwrap()
                        .unwrap()
                        .unwrap_err();
                    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
                    assert_eq!(e.to_string(), "no such host `gone.example`");
                });
            }
        });
    }
}
