//! keyhold's software backend with its audit log on, beside itself with it off, in the same run.
//!
//! `cargo bench --bench software --features testing`
//!
//! Two stores in `TMPDIR` (default `/tmp`), one recording every key use in its audit log (the
//! default: key uses buffered, written by a background thread every second as one batch with one
//! `fsync`), one with `[audit] enabled = false`, each with its own key of every kind. Each case
//! runs on one thread; on and off rounds alternate (off first, then on first, ...) after a
//! warm-up, and each side's result is the median of its 9 rounds.
//!
//! Environment: `KEYHOLD_BENCH_SECS` (measured seconds per side and case, split over the rounds;
//! default 3).
//!
//! Output (stdout): one line per case `audit NAME on_ops_per_s off_ops_per_s ratio`, then
//! whether every ratio meets the target (0.9). A missed target does not fail the process: this
//! is a measurement.

mod common;

use common::{audit_on_and_off, compare_audit, encrypted, loadavg, round_and_warmup, signed};
use common::{AuditCase, BoxResult, AUDIT_ROUNDS, USER_AAD};

use keyhold::{KeyRequest, KeySpec, KeyType, Keystore, SignatureFormat};

/// The keys of one store: signing keys of two kinds and an AES-GCM key.
struct Keys {
    ed25519: String,
    p256: String,
    aes: String,
}

fn keys_of(ks: &Keystore) -> BoxResult<Keys> {
    let create = |name: &str, key_type| -> BoxResult<String> {
        Ok(ks
            .create_key(&KeyRequest {
                namespace: "bench".into(),
                name: name.into(),
                spec: KeySpec::new(key_type, None, None)?,
                backend: None,
            })?
            .id)
    };
    Ok(Keys {
        ed25519: create("ed25519", KeyType::Ed25519)?,
        p256: create("p256", KeyType::EcdsaP256)?,
        aes: create("aes", KeyType::Aes256Gcm)?,
    })
}

fn main() -> BoxResult<()> {
    let (secs, round, warmup) = round_and_warmup()?;
    let dir = tempfile::tempdir()?;
    let (on, off) = audit_on_and_off(dir.path(), &keyhold::config::Config::default())?;
    let (on_keys, off_keys) = (keys_of(&on)?, keys_of(&off)?);
    let msg32 = [0x5au8; 32];
    let msg64 = [0xa5u8; 64];

    // Both sides work: signatures verify, envelopes open, and only one store has a log.
    for (ks, keys) in [(&on, &on_keys), (&off, &off_keys)] {
        for id in [&keys.ed25519, &keys.p256] {
            let sig = ks.sign(id, &msg32, SignatureFormat::Der)?;
            ks.verify(id, &msg32, &sig, SignatureFormat::Der)?;
        }
        let env = ks.encrypt(&keys.aes, &msg64, USER_AAD)?;
        if ks.decrypt(&keys.aes, &env, USER_AAD)?.expose() != msg64.as_slice() {
            return Err("AES-GCM round trip".into());
        }
    }
    if on.verify_audit()?.entries == 0 || off.verify_audit()?.entries != 0 {
        return Err("expected entries in the audit-on store's log only".into());
    }

    eprintln!(
        "# keyhold software bench, audit on/off: stores in {}; {} CPUs, load average {}; {secs} s \
         per side per case ({AUDIT_ROUNDS} alternating rounds of {:.2} s, median; warm-up {:.2} \
         s)",
        std::env::temp_dir().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        round.as_secs_f64() / 3.0,
        warmup.as_secs_f64()
    );
    let cases = vec![
        AuditCase {
            name: "ed25519-sign-32",
            on: Box::new(|| signed(&on, &on_keys.ed25519, &msg32)),
            off: Box::new(|| signed(&off, &off_keys.ed25519, &msg32)),
        },
        AuditCase {
            name: "ecdsa-p256-sign-32",
            on: Box::new(|| signed(&on, &on_keys.p256, &msg32)),
            off: Box::new(|| signed(&off, &off_keys.p256, &msg32)),
        },
        AuditCase {
            name: "aes256gcm-encrypt-64",
            on: Box::new(|| encrypted(&on, &on_keys.aes, &msg64)),
            off: Box::new(|| encrypted(&off, &off_keys.aes, &msg64)),
        },
    ];
    compare_audit(cases, round, warmup);
    let entries = on.verify_audit()?.entries;
    println!("audit log of the audit-on store: {entries} entries, verified");
    eprintln!("# load average at the end: {}", loadavg());
    Ok(())
}
