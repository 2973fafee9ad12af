//! The service's metrics, in Prometheus' text format (`GET /v1/metrics`): requests answered by
//! operation, backend, client and outcome, and their latency as a histogram by operation,
//! backend and client; where the service ran its keystore calls; connections served, and open.
//!
//! The label sets are bounded: operations and outcomes are fixed names, backends and clients
//! come from the configuration (and the store's token clients), so memory does not grow with
//! traffic. Written by hand: the format is a few lines of text, and a metrics crate would bring
//! a registry this does not need.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// What is counted for one operation on one backend for one client.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    operation: &'static str,
    backend: Arc<str>,
    client: Arc<str>,
}

#[derive(Debug, Default)]
struct Stats {
    /// Answers by outcome (`ok` or the error's code).
    outcomes: BTreeMap<&'static str, u64>,
    /// Answers by latency bucket (not cumulative; the last counts those over every bound).
    buckets: [u64; BUCKETS.len() + 1],
    count: u64,
    sum: f64,
}

/// Where a keystore call (a request's, or a run of a batch's operations) ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    /// On the thread that read its request, from memory only (a quick use of a key, or a short
    /// device use alone in the service).
    Here,
    /// Begun there, stopped before it would have waited, and run again where waiting is
    /// allowed (as [`Ran::Pool`]).
    Moved,
    /// Where waiting is allowed from the start: on the blocking pool, or, for a call alone in
    /// the service, on the thread that read it after it handed its other tasks away.
    Pool,
}

impl Ran {
    const ALL: [Ran; 3] = [Ran::Here, Ran::Moved, Ran::Pool];

    fn name(self) -> &'static str {
        match self {
            Ran::Here => "here",
            Ran::Moved => "moved",
            Ran::Pool => "pool",
        }
    }
}

/// The service's counters and histograms.
#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<Series, Stats>>,
    /// Keystore calls by where they ran, indexed by [`Ran`] (declared in the order of
    /// [`Ran::ALL`]).
    ran: [AtomicU64; Ran::ALL.len()],
    /// Connections served: accepted and, on TCP, past the TLS handshake.
    connections: AtomicU64,
    /// Of those, the ones open now.
    open: AtomicU64,
}

/// A connection being served: counted as open until dropped.
#[derive(Debug)]
pub struct Connection(Arc<Metrics>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts one answer to `client` for `operation` on `backend` (`-` for none), its outcome
    /// (`ok` or the error's code) and how long it took.
    pub fn record(
        &self,
        operation: &'static str,
        backend: &Arc<str>,
        client: &Arc<str>,
        outcome: &'static str,
        took: Duration,
    ) {
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(BUCKETS.len());
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        // The names are shared, not copied: a lookup allocates nothing.
        let stats = series
            .entry(Series {
                operation,
                backend: Arc::clone(backend),
                client: Arc::clone(client),
            })
            .or_default();
        *stats.outcomes.entry(outcome).or_default() += 1;
        stats.buckets[bucket] += 1;
        stats.count += 1;
        stats.sum += secs;
    }

    /// Counts a keystore call that ran where `ran` says.
    pub fn ran(&self, ran: Ran) {
        self.ran[ran as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connection served, open as long as the value returned is kept.
    pub fn connection(self: &Arc<Self>) -> Connection {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        Connection(Arc::clone(self))
    }

    /// Everything counted so far, in Prometheus' text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        out.push_str(
            "# HELP keyhold_requests_total Requests answered, by operation, backend, client and \
             outcome (ok, or the error's code).\n# TYPE keyhold_requests_total counter\n",
        );
        for (s, stats) in series.iter() {
            for (outcome, n) in &stats.outcomes {
                let _ = writeln!(
                    out,
                    "keyhold_requests_total{{{},outcome=\"{outcome}\"}} {n}",
                    labels(s)
                );
            }
        }
        out.push_str(
            "# HELP keyhold_request_duration_seconds How long requests took to answer, by \
             operation, backend and client.\n# TYPE keyhold_request_duration_seconds histogram\n",
        );
        for (s, stats) in series.iter() {
            let labels = labels(s);
            let mut cumulative = 0;
            for (bound, n) in BUCKETS.iter().zip(stats.buckets) {
                cumulative += n;
                let _ = writeln!(
                    out,
                    "keyhold_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "keyhold_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\n\
                 keyhold_request_duration_seconds_sum{{{labels}}} {}\n\
                 keyhold_request_duration_seconds_count{{{labels}}} {}",
                stats.count, stats.sum, stats.count
            );
        }
        out.push_str(
            "# HELP keyhold_keystore_calls_total Keystore calls (a request's, or a run of a \
             batch's operations), by where they ran: here (on the thread that read the request, \
             from memory only), moved (begun there, stopped before it would have waited, run \
             again where waiting is allowed), pool (where waiting is allowed from the start: the \
             blocking pool, or a thread that handed its other tasks away).\n\
             # TYPE keyhold_keystore_calls_total counter\n",
        );
        for ran in Ran::ALL {
            let _ = writeln!(
                out,
                "keyhold_keystore_calls_total{{ran=\"{}\"}} {}",
                ran.name(),
                self.ran[ran as usize].load(Ordering::Relaxed)
            );
        }
        let _ = write!(
            out,
            "# HELP keyhold_connections_total Connections served: accepted and, on TCP, past the \
             TLS handshake.\n# TYPE keyhold_connections_total counter\n\
             keyhold_connections_total {}\n\
             # HELP keyhold_connections_open Connections open now.\n\
             # TYPE keyhold_connections_open gauge\nkeyhold_connections_open {}\n",
            self.connections.load(Ordering::Relaxed),
            self.open.load(Ordering::Relaxed)
        );
        out
    }
}

/// `operation="…",backend="…",client="…"`, escaped as the format asks.
fn labels(s: &Series) -> String {
    format!(
        "operation=\"{}\",backend=\"{}\",client=\"{}\"",
        escape(s.operation),
        escape(&s.backend),
        escape(&s.client)
    )
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_outcomes_and_buckets_cumulatively_with_escaped_labels() {
        let metrics = Metrics::default();
        let web: Arc<str> = Arc::from("we\"b");
        let software: Arc<str> = Arc::from("software");
        metrics.record("sign", &software, &web, "ok", Duration::from_micros(50));
        metrics.record("sign", &software, &web, "ok", Duration::from_millis(3));
        metrics.record(
            "sign",
            &software,
            &web,
            "no_such_key",
            Duration::from_secs(9),
        );
        let text = metrics.render();
        let labels = r#"operation="sign",backend="software",client="we\"b""#;
        assert!(text.contains(&format!(
            "keyhold_requests_total{{{labels},outcome=\"ok\"}} 2\n"
        )));
        assert!(text.contains(&format!(
            "keyhold_requests_total{{{labels},outcome=\"no_such_key\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "keyhold_request_duration_seconds_bucket{{{labels},le=\"0.0001\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "keyhold_request_duration_seconds_bucket{{{labels},le=\"0.005\"}} 2\n"
        )));
        assert!(text.contains(&format!(
            "keyhold_request_duration_seconds_bucket{{{labels},le=\"5\"}} 2\n"
        )));
        assert!(text.contains(&format!(
            "keyhold_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 3\n"
        )));
        assert!(text.contains(&format!(
            "keyhold_request_duration_seconds_count{{{labels}}} 3\n"
        )));
    }

    #[test]
    fn counts_keystore_calls_by_where_they_ran() {
        let metrics = Metrics::default();
        metrics.ran(Ran::Here);
        metrics.ran(Ran::Here);
        metrics.ran(Ran::Pool);
        let text = metrics.render();
        for line in [
            "keyhold_keystore_calls_total{ran=\"here\"} 2",
            "keyhold_keystore_calls_total{ran=\"moved\"} 0",
            "keyhold_keystore_calls_total{ran=\"pool\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in {text}");
        }
    }

    #[test]
    fn counts_connections_served_and_open() {
        let metrics = Arc::new(Metrics::default());
        let first = metrics.connection();
        let second = metrics.connection();
        drop(first);
        let text = metrics.render();
        assert!(text.contains("\nkeyhold_connections_total 2\n"), "{text}");
        assert!(text.contains("\nkeyhold_connections_open 1\n"), "{text}");
        drop(second);
        assert!(metrics.render().contains("\nkeyhold_connections_open 0\n"));
    }
}
