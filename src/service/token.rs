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
use super::auth::{Client, Clients, Peer};
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
    Addr(IpAddr),
    /// A peer the kernel did not name.
    Unknown,
    /// Every source the full table has no room for.
    Overflow,
}

impl Source {
    /// Where a connection from `peer` comes from.
    pub fn of(peer: Option<&Peer>) -> Self {
        match peer {
            Some(Peer::Unix { uid: Some(uid) }) => Self::Uid(*uid),
            Some(Peer::Tls {
                addr: Some(addr), ..
            }) => Self::Addr(network_of(*addr)),
            _ => Self::Unknown,
        }
    }
}

/// The source an address counts as: itself for IPv4, its /64 for IPv6 (one host has a whole
/// /64 to send from). An IPv4 peer of a dual-stack listener (`tcp:[::]:PORT`) arrives as an
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), and counts as its IPv4 address: its /64 is the
/// same for every IPv4 peer, and ten wrong tokens from any of them would block them all.
fn network_of(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
        },
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
    /// Its tokens being checked now: each may be one more failure.
    checking: u32,
}

impl Count {
    /// Whether the count says nothing any more at `now`: its window and its block are over.
    fn expired(&self, limits: &Limits, now: Instant) -> bool {
        let window_over = now.duration_since(self.since) >= limits.window;
        window_over && self.blocked_until.is_none_or(|until| now >= until)
    }

    /// A count that says nothing yet, from `now`.
    fn new(now: Instant) -> Self {
        Self {
            since: now,
            failures: 0,
            blocked_until: None,
            checking: 0,
        }
    }
}

/// Whether a source's token may be checked now ([`Limiter::begin`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Begin {
    /// Checked: the caller holds one of the source's checks until [`Limiter::end`].
    Check,
    /// Blocked for this long: 429.
    Blocked(Duration),
    /// As many of its tokens are being checked as it has failures left: wait for one to end.
    Wait,
}

/// The failures of every source.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    counts: Mutex<HashMap<Source, Count>>,
    /// Told when a check ends, for the checks that [`Begin::Wait`].
    ended: tokio::sync::Notify,
}

impl Limiter {
    /// A limiter with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            counts: Mutex::new(HashMap::new()),
            ended: tokio::sync::Notify::new(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<Source, Count>> {
        // A count is a few integers: a panic while holding the lock leaves none half-written.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long `source` must still wait, if it is blocked at `now`: what [`Limiter::begin`]
    /// says, a check it gave ended at once as no failure (for the tests, which so check what
    /// requests meet).
    #[cfg(test)]
    fn blocked(&self, source: Source, now: Instant) -> Option<Duration> {
        match self.begin(source, now) {
            Begin::Blocked(wait) => Some(wait),
            Begin::Check => {
                self.end(source, false, now);
                None
            }
            Begin::Wait => None,
        }
    }

    /// Whether a token of `source` may be checked at `now`. A source has no more of its tokens
    /// checked at once than it has failures left in its window: each check may be a failure,
    /// so however many it sends at once, no more than [`Limits::failures`] wrong tokens are
    /// hashed before it is blocked. A source the table has no room for is checked at once (its
    /// failures are counted with [`Source::Overflow`]'s, never blocked): were it blocked by
    /// that shared count, whoever fills the table with addresses would lock every newcomer out,
    /// right token or not. Guessing stays hopeless without it: a token is 256 random bits.
    pub fn begin(&self, source: Source, now: Instant) -> Begin {
        let limits = self.limits;
        let mut counts = self.counts();
        if !counts.contains_key(&source) && counts.len() >= limits.sources {
            counts.retain(|_, count| !count.expired(&limits, now) || count.checking > 0);
            if counts.len() >= limits.sources {
                return Begin::Check;
            }
        }
        let count = counts.entry(source).or_insert_with(|| Count::new(now));
        if count.checking == 0 && count.expired(&limits, now) {
            *count = Count::new(now);
        }
        if let Some(until) = count.blocked_until.filter(|until| *until > now) {
            return Begin::Blocked(until - now);
        }
        // At least one check at a time, whatever the limit: none would be a source that waits
        // for ever.
        if count.failures.saturating_add(count.checking) >= limits.failures.max(1) {
            return Begin::Wait;
        }
        count.checking += 1;
        Begin::Check
    }

    /// Ends a check [`Limiter::begin`] allowed, a failure if `failed`, and lets the checks that
    /// wait for it go on.
    pub fn end(&self, source: Source, failed: bool, now: Instant) {
        {
            // One lock: a check that ends as a failure is never counted as neither.
            let mut counts = self.counts();
            if let Some(count) = counts.get_mut(&source) {
                count.checking = count.checking.saturating_sub(1);
                // A source that never failed is not kept: the table holds those that did.
                if count.checking == 0 && count.failures == 0 && !failed {
                    counts.remove(&source);
                }
            }
            if failed {
                self.count_failure(&mut counts, source, now);
            }
        }
        self.ended.notify_waiters();
    }

    /// Waits until a check of a source ends ([`Begin::Wait`]). `ended` must have been made,
    /// and enabled, before the [`Limiter::begin`] that said to wait, so that no end is missed.
    pub fn ended(&self) -> tokio::sync::futures::Notified<'_> {
        self.ended.notified()
    }

    /// Counts a wrong token from `source` at `now`. Logs one warning at a source's first failure
    /// in a window, and one when it is blocked: never one per request.
    #[cfg(test)]
    fn failed(&self, source: Source, now: Instant) {
        let mut counts = self.counts();
        self.count_failure(&mut counts, source, now);
    }

    fn count_failure(&self, counts: &mut HashMap<Source, Count>, source: Source, now: Instant) {
        let limits = self.limits;
        let mut source = source;
        if !counts.contains_key(&source) && counts.len() >= limits.sources {
            counts.retain(|_, count| !count.expired(&limits, now) || count.checking > 0);
            if counts.len() >= limits.sources {
                source = Source::Overflow;
            }
        }
        let count = counts.entry(source).or_insert_with(|| Count::new(now));
        if count.expired(&limits, now) {
            *count = Count {
                checking: count.checking,
                ..Count::new(now)
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
    loop {
        // Made before asking, so that a check ending in between is not missed.
        let ended = limiter.ended();
        tokio::pin!(ended);
        ended.as_mut().enable();
        match limiter.begin(source, Instant::now()) {
            Begin::Check => break,
            Begin::Blocked(wait) => return Err(too_many(wait)),
            Begin::Wait => ended.await,
        }
    }
    // The check ends however this returns (a failure only where it says so), even if the
    // request is dropped while the token is looked up.
    let mut check = Check {
        limiter: &limiter,
        source,
        failed: false,
    };
    let Some(token) = bearer(header) else {
        check.failed = true;
        return Err(ApiError::unauthenticated());
    };
    let keystore = Arc::clone(state.keystore());
    let found = tokio::task::spawn_blocking(move || keystore.client_by_token(&token))
        .await
        .map_err(|e| ApiError::internal(format!("the token lookup did not finish: {e}")))?;
    match found {
        // Added while the service runs by someone who read another configuration: two
        // principals would share a name in the audit log and the metrics.
        Ok(Some(client)) if state.clients.is_configured(&client.name) => {
            tracing::error!(
                client = %client.name,
                "a token client has the name of a configured client: its token is refused \
                 (`keyhold client remove` it, or rename the [clients] table)"
            );
            Err(ApiError::unauthenticated())
        }
        Ok(Some(client)) => Ok(Arc::new(client_of(state, client))),
        Ok(None) => {
            check.failed = true;
            Err(ApiError::unauthenticated())
        }
        Err(e) => {
            tracing::error!(error = %e, "a bearer token's client could not be read");
            Err(ApiError::from(e))
        }
    }
}

/// A token check [`Limiter::begin`] allowed, ended when dropped.
struct Check<'a> {
    limiter: &'a Limiter,
    source: Source,
    failed: bool,
}

impl Drop for Check<'_> {
    fn drop(&mut self) {
        self.limiter.end(self.source, self.failed, Instant::now());
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
fn client_of(state: &State, client: TokenClient) -> Client {
    state.clients.token_client(
        client.name,
        ClientConfig {
            uid: None,
            tls_name: None,
            namespaces: client.grant.namespaces,
            operations: client.grant.operations,
            max_concurrent: None,
        },
    )
}

/// Refuses a token client named as a configured client: which one a name means would depend
/// on how it asked.
fn check_names(config: &Config, tokens: &[&str]) -> Result<()> {
    match tokens.iter().find(|t| config.clients.contains_key(**t)) {
        Some(both) => Err(Error::Config(format!(
            "client `{both}` is both a [clients.{both}] of the configuration and a token client of \
             the store: rename the table, or `keyhold client remove {both}`"
        ))),
        None => Ok(()),
    }
}

const NO_CLIENTS: &str = "keyhold serve answers configured clients only, and there is none: \
     the configuration has no [clients.NAME] table with a uid or a tls_name, and the store no \
     token client: add a [clients.NAME] table with uid = N (or tls_name = \"...\") and \
     namespaces = [...], or run `keyhold client add NAME --namespace NS`";

impl Clients {
    /// Refuses, before the store is unsealed, a service nobody could use: no configured client
    /// with a uid, and no token client in the store at `dir` (its rows are counted, not yet
    /// verified: [`Self::for_service`] verifies them).
    ///
    /// # Errors
    /// [`Error::Config`] for a service without clients; the store's errors when it must be read.
    pub fn precheck(config: &Config, dir: &std::path::Path) -> Result<()> {
        let tokens = crate::store::Store::open(dir)?.clients()?;
        let names: Vec<&str> = tokens.iter().map(|t| t.name.as_str()).collect();
        check_names(config, &names)?;
        if Self::from_config(config)?.no_connection_clients() && tokens.is_empty() {
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
        let names: Vec<&str> = tokens.iter().map(|t| t.name.as_str()).collect();
        check_names(config, &names)?;
        if clients.no_connection_clients() && tokens.is_empty() {
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
    fn ipv4_peers_of_a_dual_stack_listener_count_as_their_ipv4_addresses() {
        let source = |a: &str| {
            Source::of(Some(&Peer::Tls {
                names: Vec::new().into(),
                addr: Some(a.parse().unwrap()),
            }))
        };
        // How a listener on [::] sees IPv4 peers: each its own source, as on an IPv4 listener.
        assert_eq!(source("::ffff:192.0.2.1"), source("192.0.2.1"));
        assert_ne!(source("::ffff:192.0.2.1"), source("::ffff:192.0.2.2"));
        // IPv6 peers: one source per /64.
        assert_eq!(source("2001:db8::1"), source("2001:db8::ffff:1"));
        assert_ne!(source("2001:db8::1"), source("2001:db8:0:1::1"));
    }

    #[test]
    fn a_source_has_no_more_tokens_checked_at_once_than_it_has_failures_left() {
        let limiter = Limiter::new(limits());
        let t0 = Instant::now();
        let (a, b) = (Source::Uid(1), Source::Uid(2));
        // A right token: checked, and the source is not kept.
        assert_eq!(limiter.begin(a, t0), Begin::Check);
        limiter.end(a, false, t0);
        assert_eq!(limiter.len(), 0);
        // One failure: two checks left at once; a third waits, another source does not.
        assert_eq!(limiter.begin(a, t0), Begin::Check);
        limiter.end(a, true, t0);
        assert_eq!(limiter.begin(a, t0), Begin::Check);
        assert_eq!(limiter.begin(a, t0), Begin::Check);
        assert_eq!(limiter.begin(a, t0), Begin::Wait);
        assert_eq!(limiter.begin(b, t0), Begin::Check);
        limiter.end(b, false, t0);
        // One ends right: the one waiting goes on.
        limiter.end(a, false, t0);
        assert_eq!(limiter.begin(a, t0), Begin::Check);
        // Both that are under way fail: the third failure blocks the source.
        limiter.end(a, true, t0);
        assert_eq!(limiter.begin(a, t0), Begin::Wait);
        limiter.end(a, true, t0);
        assert_eq!(
            limiter.begin(a, t0 + Duration::from_secs(1)),
            Begin::Blocked(Duration::from_secs(4))
        );
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
    fn the_table_is_bounded_and_sources_past_it_are_never_blocked() {
        let limiter = Limiter::new(limits());
        let t0 = Instant::now();
        for uid in 0..100 {
            limiter.failed(Source::Uid(uid), t0);
        }
        assert!(limiter.len() <= limits().sources + 1, "{}", limiter.len());
        // Review: the sources with no room share a count for the log, and are not blocked by
        // it; else whoever fills the table locks out every newcomer, right token or not.
        assert_eq!(limiter.blocked(Source::Uid(99), t0), None);
        assert_eq!(limiter.blocked(Source::Uid(1000), t0), None);
        // Counted ones keep their own: one failure each, not blocked.
        assert_eq!(limiter.blocked(Source::Uid(0), t0), None);
        // Once the windows are over, expired counts make room again.
        let later = t0 + Duration::from_secs(20);
        limiter.failed(Source::Uid(5000), later);
        assert_eq!(limiter.blocked(Source::Uid(5000), later), None);
        assert!(limiter.len() <= limits().sources + 1);
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let peer = |addr: &str| Peer::Tls {
            names: Arc::from(Vec::new()),
            addr: Some(addr.parse().unwrap()),
        };
        assert_eq!(
            Source::of(Some(&peer("2001:db8:1:2:aaaa::1"))),
            Source::of(Some(&peer("2001:db8:1:2:bbbb::9")))
        );
        assert_ne!(
            Source::of(Some(&peer("2001:db8:1:2::1"))),
            Source::of(Some(&peer("2001:db8:1:3::1")))
        );
        assert_ne!(
            Source::of(Some(&peer("192.0.2.1"))),
            Source::of(Some(&peer("192.0.2.2")))
        );
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
