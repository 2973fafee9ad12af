//! What the benches share: result types, round settings, and the small helpers of the report.
#![allow(dead_code)] // each bench uses its own part of this

use std::error::Error as StdError;
use std::time::Duration;

pub type BoxResult<T> = Result<T, Box<dyn StdError>>;
/// One timed operation: a failure is counted and reported, not fatal (this is a measurement).
pub type OpResult = Result<(), String>;

/// Rounds per side (alternating with the other side); the median is reported.
pub const ROUNDS: usize = 3;
/// keyhold's AES-GCM AAD is its 25-byte envelope header (`src/keystore/envelope.rs`: magic 4,
/// algorithm 1, key UUID 16, key version 4) followed by the caller's AAD; the raw side
/// authenticates an AAD of the same length.
pub const ENVELOPE_HEADER_LEN: usize = 25;
pub const USER_AAD: &[u8] = b"keyhold-bench";

/// `KEYHOLD_BENCH_SECS` (measured seconds per side and case, split over the rounds; default 3),
/// the length of one round, and of the warm-up.
pub fn round_and_warmup() -> BoxResult<(f64, Duration, Duration)> {
    let secs: f64 = match std::env::var("KEYHOLD_BENCH_SECS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("KEYHOLD_BENCH_SECS={v}: not a number"))?,
        Err(_) => 3.0,
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err("KEYHOLD_BENCH_SECS must be positive".into());
    }
    Ok((
        secs,
        Duration::from_secs_f64(secs / ROUNDS as f64),
        Duration::from_secs_f64((secs / 10.0).clamp(0.02, 0.3)),
    ))
}

/// An error with its source, for the report.
pub fn describe(e: &dyn StdError) -> String {
    match e.source() {
        Some(source) => format!("{e} [{source:?}]"),
        None => e.to_string(),
    }
}

/// The median of `v` (NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
