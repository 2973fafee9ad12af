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

/// The machine's CPU time so far, from the first line of `/proc/stat`, in clock ticks: (steal,
/// all). Steal is time the hypervisor ran something else while this machine wanted its CPUs.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, counted in user and nice]
    Some((*fields.get(7)?, fields.iter().take(8).sum()))
}

/// The share of the CPU time between two [`machine_ticks`] readings that the host took (steal), in
/// percent; `None` where `/proc/stat` could not be read or no time passed.
pub fn steal_percent(from: Option<(u64, u64)>, to: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (from?, to?);
    let all = t1.checked_sub(t0).filter(|&t| t > 0)?;
    Some(100.0 * s1.saturating_sub(s0) as f64 / all as f64)
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Ratio target of keyhold with its audit log on against the same with it off (issue 10).
pub const AUDIT_RATIO_TARGET: f64 = 0.9;

/// Rounds per side of the audit comparison.
pub const AUDIT_ROUNDS: usize = 3 * ROUNDS;

/// Successful operations per second of `op` run in a loop on this thread for `d`, the failures
/// and the first failure.
pub fn rate_of(op: &mut dyn FnMut() -> OpResult, d: Duration) -> (f64, u64, Option<String>) {
    let start = std::time::Instant::now();
    let deadline = start + d;
    let (mut ops, mut failed, mut first_error) = (0u64, 0u64, None);
    loop {
        match op() {
            Ok(()) => ops += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return (
                ops as f64 / now.duration_since(start).as_secs_f64(),
                failed,
                first_error,
            );
        }
    }
}

/// One case of the audit comparison: the same operation through two keystores, one recording
/// every use in its audit log, one with `[audit] enabled = false`.
pub struct AuditCase<'a> {
    pub name: &'static str,
    pub on: Box<dyn FnMut() -> OpResult + 'a>,
    pub off: Box<dyn FnMut() -> OpResult + 'a>,
}

/// Times each case on one thread, audit on and off in alternating rounds after a warm-up
/// (medians of [`AUDIT_ROUNDS`] rounds of a third of `round` each: the same time per side as
/// the other benches, cut finer so that a load that comes and goes on a shared machine falls on
/// both sides alike), prints `name audit_on_ops_per_s audit_off_ops_per_s ratio` per case
/// and whether every ratio meets [`AUDIT_RATIO_TARGET`]; failures are listed, not fatal.
pub fn compare_audit(cases: Vec<AuditCase<'_>>, round: Duration, warmup: Duration) {
    let round = round / 3;
    println!();
    println!("audit name audit_on_ops_per_s audit_off_ops_per_s ratio");
    let (mut missed, mut errors) = (Vec::new(), Vec::new());
    for mut case in cases {
        let mut note = |side: &str, (rate, failed, first): (f64, u64, Option<String>)| {
            if failed > 0 {
                errors.push(format!(
                    "{} audit {side}: {failed} failed, first: {}",
                    case.name,
                    first.unwrap_or_default()
                ));
            }
            rate
        };
        note("on", rate_of(&mut case.on, warmup));
        note("off", rate_of(&mut case.off, warmup));
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for r in 0..AUDIT_ROUNDS {
            if r % 2 == 0 {
                off.push(note("off", rate_of(&mut case.off, round)));
                on.push(note("on", rate_of(&mut case.on, round)));
            } else {
                on.push(note("on", rate_of(&mut case.on, round)));
                off.push(note("off", rate_of(&mut case.off, round)));
            }
        }
        eprintln!(
            "#   audit {} rounds: on {:?} off {:?}",
            case.name,
            on.iter().map(|x| x.round()).collect::<Vec<_>>(),
            off.iter().map(|x| x.round()).collect::<Vec<_>>()
        );
        let (on, off) = (median(on), median(off));
        let ratio = on / off;
        println!("audit {} {on:.0} {off:.0} {ratio:.2}", case.name);
        if ratio < AUDIT_RATIO_TARGET {
            missed.push(format!("{} ({ratio:.2})", case.name));
        }
    }
    if missed.is_empty() {
        println!("audit ratio >= {AUDIT_RATIO_TARGET}: met");
    } else {
        println!(
            "audit ratio >= {AUDIT_RATIO_TARGET}: MISSED by {}",
            missed.join(", ")
        );
    }
    for e in &errors {
        println!("  audit error: {e}");
    }
}

/// The passphrase of every bench store.
pub const BENCH_PASSPHRASE: &str = "keyhold bench passphrase";

/// A passphrase sealer at Argon2's documented minimum: the benches time keys, not unsealing.
pub fn bench_sealer() -> BoxResult<keyhold::PassphraseSealer> {
    Ok(
        keyhold::PassphraseSealer::new(secrecy::SecretString::from(BENCH_PASSPHRASE.to_owned()))
            .with_params(keyhold::Argon2Params {
                memory_mib: 19,
                iterations: 2,
                parallelism: 1,
            })?,
    )
}

/// Two stores under `dir` with the backends of `config`: the first records every key use in its
/// audit log (`[audit]` as configured, on by default), the second has `enabled = false`.
pub fn audit_on_and_off(
    dir: &std::path::Path,
    config: &keyhold::config::Config,
) -> BoxResult<(keyhold::Keystore, keyhold::Keystore)> {
    let sealer = bench_sealer()?;
    let mut off = config.clone();
    off.audit.enabled = false;
    Ok((
        keyhold::Keystore::create_with(&dir.join("audit-on"), &sealer, config)?,
        keyhold::Keystore::create_with(&dir.join("audit-off"), &sealer, &off)?,
    ))
}

/// `sign` of `msg` (raw format) with the key `id`, for [`AuditCase`].
pub fn signed(ks: &keyhold::Keystore, id: &str, msg: &[u8]) -> OpResult {
    ks.sign(id, msg, keyhold::SignatureFormat::Raw)
        .map(drop)
        .map_err(|e| describe(&e))
}

/// `encrypt` of `msg` (AAD [`USER_AAD`]) with the key `id`, for [`AuditCase`].
pub fn encrypted(ks: &keyhold::Keystore, id: &str, msg: &[u8]) -> OpResult {
    ks.encrypt(id, msg, USER_AAD)
        .map(drop)
        .map_err(|e| describe(&e))
}
