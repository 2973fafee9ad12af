//! Bearer tokens: `Authorization: Bearer TOKEN` names a token client (`keyhold client add`),
//! whatever the connection's peer credentials say, and repeated failures are rate limited.
//!
//! Every token is looked up in the store, on the blocking pool, at every request that presents
//! one ([`Keystore::client_by_token`]: a keyed hash, the row found by it and checked against the
//! store's commitment, compared in constant time, its MAC verified). A client added or removed
//! while the service runs so counts from the next request, with nothing cached to go stale.
//!
//! A source (the peer's uid on a Unix socket; its address over TCP) that presents
//! [`Limits::failures`] wrong tokens within [`Limits::window`] gets 429 `rate_limited`, with
//! `Retry-After`, for [`Limits::block`], before its tokens are even hashed. Each source counts
//! for itself: one source's failures or successes change no other's. The table of sources is
//! bounded; once full, sources it has no room for share one count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::header::HeaderValue;
use zeroize::Zeroizing;

use super::api::ApiError;
use super::auth::{Client, Clients};
use super::routes::State;
use crate::config::{ClientConfig, Config};
use crate::error::{Error, Result};
use crate::keystore::{Keystore, TokenClient};

/// Where a request comes from, as the rate limit counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A Unix-socket peer's user ID (`SO_PEERCRED`).
    Uid(u32),
    /// A TCP peer's address.
    #[allow(dead_code)] // made by the TCP listener, which comes with TLS (issue 12)
    Addr(IpAddr),
    /// A peer the kernel did not name.
    Unknown,
    /// Every source the full table has no room for.
    Overflow,
}

impl Source {
    /// The source of a Unix-socket peer whose uid is `uid`.
    pub fn of_uid(uid: Option<u32>) -> Self {
        uid.map_or(Self::Unknown, Self::Uid)
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::Addr(addr) => write!(f, "address {addr}"),
            Self::Unknown => f.write_str("a peer without credentials"),
            Self::Overflow => f.write_str("sources past the rate limit's table"),
        }
    }
}

/// How many wrong tokens a source may present, and what happens then.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Wrong tokens within one window that get a source blocked.
    pub failures: u32,
    /// The window, from a source's first failure.
    pub window: Duration,
    /// How long a blocked source's tokens are refused with 429.
    pub block: Duration,
    /// The most sources counted one by one.
    pub sources: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            failures: 10,
            window: Duration::from_secs(60),
            block: Duration::from_secs(60),
            sources: 4096,
        }
    }
}

/// One source's count.
#[derive(Debug, Clone, Copy)]
struct Count {
    since: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

impl Count {
    /// Whether the count says nothing any more at `now`: its window and its block are over.
    fn expired(&self, limits: &Limits, now: Instant) -> bool {
        let window_over = now.duration_since(self.since) >= limits.window;
        window_over && self.blocked_until.is_none_or(|until| now >= until)
    }
}

/// The failures of every source.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    counts: Mutex<HashMap<Source, Count>>,
}

impl Limiter {
    /// A limiter with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<Source, Count>> {
        // A count is a few integers: a panic while holding the lock leaves none half-written.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long `source` must still wait, if it is blocked at `now`.
    pub fn blocked(&self, source: Source, now: Instant) -> Option<Duration> {
        let counts = self.counts();
        let count = counts.get(&source).or_else(|| {
            (counts.len() >= self.limits.sources)
                .then(|| counts.get(&Source::Overflow))
                .flatten()
        })?;
        count
            .blocked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Counts a wrong token from `source` at `now`. Logs one warning at a source's first failure
    /// in a window, and one when it is blocked: never one per request.
    pub fn failed(&self, source: Source, now: Instant) {
        let limits = self.limits;
        let mut counts = self.counts();
        let mut source = source;
        if !counts.contains_key(&source) && counts.len() >= limits.sources {
            counts.retain(|_, count| !count.expired(&limits, now));
            if counts.len() >= limits.sources {
                source = Source::Overflow;
            }
        }
        let count = counts.entry(source).or_insert(Count {
            since: now,
            failures: 0,
            blocked_until: None,
        });
        if count.expired(&limits, now) {
            *count = Count {
                since: now,
                failures: 0,
                blocked_until: None,
            };
        }
        count.failures = count.failures.saturating_add(1);
        if count.failures == 1 {
            tracing::warn!(
                %source,
                "refused a bearer token that is no client's (more from this source in the next {} \
                 are counted, not logged)",
                humantime::format_duration(limits.window)
            );
        }
        if count.failures >= limits.failures && count.blocked_until.is_none() {
            count.blocked_until = Some(now + limits.block);
            tracing::warn!(
                %source,
                failures = count.failures,
                "too many wrong bearer tokens: this source's tokens are refused (429) for {}",
                humantime::format_duration(limits.block)
            );
        }
    }

    /// How many sources are counted one by one (for tests of the bound).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts().len()
    }
}

/// The client a request's `Authorization` header names, or the refusal: 429 for a blocked
/// source, 401 for anything that is not the bearer token of a token client (counted against
/// `source`), the store's error (500) for a client's row that is not what keyhold wrote.
pub(super) async fn authenticate(
    state: &State,
    source: Source,
    header: &HeaderValue,
) -> std::result::Result<Arc<Client>, ApiError> {
    let limiter = Arc::clone(&state.clients.limiter);
    if let Some(wait) = limiter.blocked(source, Instant::now()) {
        return Err(too_many(wait));
    }
    let refuse = || {
        limiter.failed(source, Instant::now());
        ApiError::unauthenticated()
    };
    let Some(token) = bearer(header) else {
        return Err(refuse());
    };
    let keystore = Arc::clone(state.keystore());
    let found = tokio::task::spawn_blocking(move || keystore.client_by_token(&token))
        .await
        .map_err(|e| ApiError::internal(format!("the token lookup did not finish: {e}")))?;
    match found {
        Ok(Some(client)) => Ok(Arc::new(client_of(client))),
        Ok(None) => Err(refuse()),
        Err(e) => {
            tracing::error!(error = %e, "a bearer token's client could not be read");
            Err(ApiError::from(e))
        }
    }
}

/// The token of `Authorization: Bearer TOKEN` (the scheme in any case), copied into memory that
/// is zeroized on drop.
fn bearer(header: &HeaderValue) -> Option<Zeroizing<String>> {
    let text = header.to_str().ok()?;
    let (scheme, token) = text.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| Zeroizing::new(token.trim().to_owned()))
}

/// 429 with `Retry-After` in whole seconds (at least 1).
fn too_many(wait: Duration) -> ApiError {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    ApiError::rate_limited(
        format!("too many wrong bearer tokens from this source: try again in {secs} s"),
        secs,
    )
}

/// A token client as the routes see a configured one.
fn client_of(client: TokenClient) -> Client {
    Client::new(
        client.name,
        ClientConfig {
            uid: None,
            namespaces: client.grant.namespaces,
            operations: client.grant.operations,
        },
    )
}

const NO_CLIENTS: &str = "keyhold serve answers configured clients only, and there is none: \
     the configuration has no [clients.NAME] table with a uid, and the store no token client: \
     add a [clients.NAME] table with uid = N and namespaces = [...], or run `keyhold client add \
     NAME --namespace NS`";

impl Clients {
    /// Refuses, before the store is unsealed, a service nobody could use: no configured client
    /// with a uid, and no token client in the store at `dir` (its rows are counted, not yet
    /// verified: [`Self::for_service`] verifies them).
    ///
    /// # Errors
    /// [`Error::Config`] for a service without clients; the store's errors when it must be read.
    pub fn precheck(config: &Config, dir: &std::path::Path) -> Result<()> {
        if Self::from_config(config)?.by_uid.is_empty()
            && crate::store::Store::open(dir)?.clients()?.is_empty()
        {
            return Err(Error::Config(NO_CLIENTS.into()));
        }
        Ok(())
    }

    /// The clients of the service: the configuration's, and the token clients `keystore` holds
    /// (looked up at each request; at least one of either is needed). A token client must not
    /// carry the name of a configured one.
    ///
    /// # Errors
    /// [`Error::Config`] without clients, or for a name that is both; the store's errors.
    pub fn for_service(config: &Config, keystore: &Keystore) -> Result<Self> {
        let clients = Self::from_config(config)?;
        let tokens = keystore.clients()?;
        if let Some(both) = tokens.iter().find(|t| config.clients.contains_key(&t.name)) {
            return Err(Error::Config(format!(
                "client `{0}` is both a [clients.{0}] of the configuration and a token client of \
                 the store: rename the table, or `keyhold client remove {0}`",
                both.name
            )));
        }
        if clients.by_uid.is_empty() && tokens.is_empty() {
            return Err(Error::Config(NO_CLIENTS.into()));
        }
        Ok(clients)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits() -> Limits {
        Limits {
            failures: 3,
            window: Duration::from_secs(10),
            block: Duration::from_secs(5),
            sources: 4,
        }
    }

    #[test]
    fn a_source_is_blocked_after_its_failures_and_others_are_not() {
        let limiter = Limiter::new(limits());
        let t0 = Instant::now();
        let (a, b) = (Source::Uid(1), Source::Uid(2));
        limiter.failed(a, t0);
        limiter.failed(a, t0);
        limiter.failed(b, t0);
        assert_eq!(limiter.blocked(a, t0), None, "two of three");
        limiter.failed(a, t0 + Duration::from_secs(1));
        let wait = limiter.blocked(a, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(wait, Duration::from_secs(4));
        assert_eq!(limiter.blocked(b, t0 + Duration::from_secs(2)), None);
        // The block ends; the window too, so the count starts over.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(limiter.blocked(a, later), None);
        limiter.failed(a, later);
        assert_eq!(limiter.blocked(a, later), None, "a new window");
    }

    #[test]
    fn failures_spread_over_windows_do_not_add_up() {
        let limiter = Limiter::new(limits());
        let t0 = Instant::now();
        let a = Source::Addr("192.0.2.1".parse().unwrap());
        for i in 0..6 {
            limiter.failed(a, t0 + Duration::from_secs(6 * i));
        }
        assert_eq!(limiter.blocked(a, t0 + Duration::from_secs(31)), None);
    }

    #[test]
    fn the_table_is_bounded_and_sources_past_it_share_one_count() {
        let limiter = Limiter::new(limits());
        let t0 = Instant::now();
        for uid in 0..100 {
            limiter.failed(Source::Uid(uid), t0);
        }
        assert!(limiter.len() <= limits().sources + 1, "{}", limiter.len());
        // The sources with no room share the overflow count, which is now blocked for all.
        assert!(limiter.blocked(Source::Uid(99), t0).is_some());
        assert!(limiter.blocked(Source::Uid(1000), t0).is_some());
        // Counted ones keep their own: one failure each, not blocked.
        assert_eq!(limiter.blocked(Source::Uid(0), t0), None);
        // Once the windows are over, expired counts make room again.
        let later = t0 + Duration::from_secs(20);
        limiter.failed(Source::Uid(5000), later);
        assert_eq!(limiter.blocked(Source::Uid(5000), later), None);
        assert!(limiter.len() <= limits().sources + 1);
    }

    #[test]
    fn only_a_bearer_header_gives_a_token() {
        let value = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(
            bearer(&value("Bearer kht1_abc"))
                .as_deref()
                .map(String::as_str),
            Some("kht1_abc")
        );
        assert_eq!(
            bearer(&value("bearer  kht1_abc "))
                .as_deref()
                .map(String::as_str),
            Some("kht1_abc")
        );
        assert!(bearer(&value("Basic dXNlcjpwYXNz")).is_none());
        assert!(bearer(&value("kht1_abc")).is_none());
    }
}
