//! `store verify` of a software store of 100k keys, beside the HMAC-SHA256 computations its record
//! checks amount to, made with aws-lc-rs directly.
//!
//! `cargo bench --bench verify --features testing`
//!
//! The store is made once, with keyhold's own `create_key` (a quarter each of ECDSA P-256,
//! Ed25519, AES-256-GCM and HMAC-SHA256 keys, audit log on), in `KEYHOLD_BENCH_DIR` (default
//! `/dev/shm` when it exists, else `TMPDIR`): on tmpfs the 200k `fsync`s of 100k creations (the
//! record's commit and the audit entry's) cost nothing, which is not what is measured; the creation
//! time is printed all the same. Then `Keystore::verify_store` runs once over the whole store
//! (every row's MAC, every software blob decrypted, the audit chain), and the raw side computes
//! HMAC-SHA256 over exactly the bytes the record MACs cover, read from the same store.
//!
//! Environment: `KEYHOLD_VERIFY_KEYS` (default 100000), `KEYHOLD_BENCH_DIR`.
//!
//! Output (stdout): `verify keys N create_s S verify_s S target_s 10 met|missed`, then
//! `raw hmac-sha256 macs N s S`, then `ratio verify/raw R`, then `open keys N open_s S` (an open
//! checks every row too) and `first use ms M, after another keystore wrote ms M` (the first use of
//! a key checks its rows; after another connection wrote, every key's digest is added up again). A missed target does not fail the
//! process: this is a measurement.

mod common;

use std::time::Instant;

use aws_lc_rs::hmac;
use common::{bench_sealer, loadavg, BoxResult};
use keyhold::verify::Status;
use keyhold::{KeyRequest, KeySpec, KeyType, Keystore};

/// The bound on verifying a 100k-key store.
const TARGET_SECS: f64 = 10.0;

fn main() -> BoxResult<()> {
    let keys: usize = match std::env::var("KEYHOLD_VERIFY_KEYS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("KEYHOLD_VERIFY_KEYS={v}: not a number"))?,
        Err(_) => 100_000,
    };
    let base = std::env::var_os("KEYHOLD_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let shm = std::path::Path::new("/dev/shm");
            shm.is_dir().then(|| shm.to_path_buf())
        })
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base)?;
    let path = dir.path().join("store");
    let sealer = bench_sealer()?;
    let config = keyhold::config::Config::default();
    eprintln!(
        "# keyhold verify bench: {keys} software keys in {}; {} CPUs, load average {}",
        base.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );

    let started = Instant::now();
    let mut ed25519 = Vec::new();
    {
        let ks = Keystore::create_with(&path, &sealer, &config)?;
        let types = [
            KeyType::EcdsaP256,
            KeyType::Ed25519,
            KeyType::Aes256Gcm,
            KeyType::HmacSha256,
        ];
        for n in 0..keys {
            let info = ks.create_key(&KeyRequest {
                namespace: format!("ns{}", n % 16),
                name: format!("key{n}"),
                spec: KeySpec::new(types[n % types.len()], None, None)?,
                backend: None,
            })?;
            if types[n % types.len()] == KeyType::Ed25519 && ed25519.len() < 2 {
                ed25519.push(info.id);
            }
            if n > 0 && n % 10_000 == 0 {
                eprintln!("# {n} keys made, {:.0} s", started.elapsed().as_secs_f64());
            }
        }
    }
    let create_s = started.elapsed().as_secs_f64();

    let ks = Keystore::open_with(&path, &sealer, &config)?;
    let started = Instant::now();
    let report = ks.verify_store(&|_| {})?;
    let verify_s = started.elapsed().as_secs_f64();
    if report.status() != Status::Passed || report.keys != keys {
        return Err(format!("expected a clean report of {keys} keys, got {report:?}").into());
    }
    for section in &report.sections {
        eprintln!("# {}: {}", section.kind.as_str(), section.summary);
    }
    println!(
        "verify keys {keys} create_s {create_s:.1} verify_s {verify_s:.2} target_s {TARGET_SECS} \
         {}",
        if verify_s < TARGET_SECS {
            "met"
        } else {
            "missed"
        }
    );

    // The raw side: HMAC-SHA256 over the bytes every record MAC covers, under a key of the same
    // length, with nothing else (no reading, no decoding, no blobs, no audit log).
    let store = keyhold::store::Store::open(&path)?;
    let id = store.meta().store_id;
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    for r in store.keys(None)? {
        inputs.push(r.mac_input(&id).ok_or("a record without a MAC input")?);
    }
    inputs.extend(store.versions(None)?.iter().map(|v| v.mac_input(&id)));
    inputs.extend(store.events(None)?.iter().map(|e| e.mac_input(&id)));
    inputs.extend(store.counters()?.iter().map(|c| c.mac_input(&id)));
    let key = hmac::Key::new(hmac::HMAC_SHA256, &[0x42; 32]);
    let started = Instant::now();
    let mut folded = 0u8;
    for input in &inputs {
        folded ^= hmac::sign(&key, input).as_ref()[0];
    }
    let raw_s = started.elapsed().as_secs_f64();
    println!(
        "raw hmac-sha256 macs {} s {raw_s:.3} (fold {folded:02x})",
        inputs.len()
    );
    println!("ratio verify/raw {:.1}", verify_s / raw_s);

    drop(ks);
    let started = Instant::now();
    let ks = Keystore::open_with(&path, &sealer, &config)?;
    println!(
        "open keys {keys} open_s {:.2}",
        started.elapsed().as_secs_f64()
    );
    let (first, second) = match ed25519.as_slice() {
        [a, b] => (a, b),
        _ => return Err("fewer than two Ed25519 keys were made".into()),
    };
    let started = Instant::now();
    ks.sign(first, b"m", keyhold::SignatureFormat::Raw)?;
    let first_ms = started.elapsed().as_secs_f64() * 1e3;
    let other = Keystore::open_with(&path, &sealer, &config)?;
    other.create_key(&KeyRequest {
        namespace: "bench".into(),
        name: "written-by-another".into(),
        spec: KeySpec::new(KeyType::Ed25519, None, None)?,
        backend: None,
    })?;
    let started = Instant::now();
    ks.sign(second, b"m", keyhold::SignatureFormat::Raw)?;
    let after_ms = started.elapsed().as_secs_f64() * 1e3;
    println!("first use ms {first_ms:.2}, after another keystore wrote ms {after_ms:.1}");
    eprintln!("# load average at the end: {}", loadavg());
    Ok(())
}
