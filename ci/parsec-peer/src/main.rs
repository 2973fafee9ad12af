//! Parsec's Rust client (`parsec-client`) signing from threads: the peer of keyhold's
//! `RemoteKeystore` in `cargo bench --bench serve` (issue 12), run by ci/bench.sh.
//!
//! `keyhold-parsec-peer KEY_NAME SECONDS` with `PARSEC_SERVICE_ENDPOINT=unix:PATH`: for 1, 4 and
//! 16 threads, each with its own `BasicClient` (made before the clock starts), `psa_sign_hash`
//! of a 32-byte digest with the ECDSA P-256 key KEY_NAME for SECONDS; prints
//! `parsec-client ecdsa-p256-sign/Nc OPS_PER_S P50_US P99_US` per thread count. A failed call is
//! counted and reported, not fatal. The digest is fixed: keyhold's side hashes its 32-byte
//! message, a SHA-256 of 32 bytes (well under a microsecond).

use std::sync::Barrier;
use std::time::{Duration, Instant};

use parsec_client::core::interface::operations::psa_algorithm::{AsymmetricSignature, Hash};
use parsec_client::BasicClient;

const CLIENTS: [usize; 3] = [1, 4, 16];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(key), Some(secs)) = (args.next(), args.next()) else {
        return Err("usage: keyhold-parsec-peer KEY_NAME SECONDS".into());
    };
    let secs: f64 = secs.parse()?;
    let alg = AsymmetricSignature::Ecdsa {
        hash_alg: Hash::Sha256.into(),
    };
    let digest = [0x5a_u8; 32];
    // One signature first: the key and the service work.
    BasicClient::new(Some("keyhold-bench".into()))?.psa_sign_hash(&key, &digest, alg)?;
    for threads in CLIENTS {
        let clients = (0..threads)
            .map(|_| BasicClient::new(Some("keyhold-bench".into())))
            .collect::<Result<Vec<_>, _>>()?;
        let barrier = Barrier::new(threads);
        let d = Duration::from_secs_f64(secs);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = clients
                .iter()
                .map(|client| {
                    let (barrier, key) = (&barrier, &key);
                    s.spawn(move || {
                        barrier.wait();
                        let start = Instant::now();
                        let (mut latencies, mut failed, mut first_error) = (Vec::new(), 0u64, None);
                        loop {
                            let t0 = Instant::now();
                            let outcome = client.psa_sign_hash(key, &digest, alg);
                            let now = Instant::now();
                            match outcome {
                                Ok(_) => latencies.push(now.duration_since(t0).as_secs_f64() * 1e6),
                                Err(e) => {
                                    failed += 1;
                                    first_error.get_or_insert_with(|| e.to_string());
                                }
                            }
                            if now.duration_since(start) >= d {
                                return (start, now, latencies, failed, first_error);
                            }
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut all = Vec::new();
        let (mut first, mut last, mut failed, mut first_error) = (None, None, 0, None);
        for result in results {
            let (start, end, latencies, f, e) = result.map_err(|_| "a client thread panicked")?;
            first = Some(first.map_or(start, |t: Instant| t.min(start)));
            last = Some(last.map_or(end, |t: Instant| t.max(end)));
            all.extend(latencies);
            failed += f;
            first_error = first_error.or(e);
        }
        let wall = match (first, last) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => f64::NAN,
        };
        all.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            let rank = ((p * all.len() as f64).ceil() as usize).clamp(1, all.len().max(1));
            all.get(rank - 1).copied().unwrap_or(f64::NAN)
        };
        let errors = match first_error {
            Some(e) => format!(" ({failed} failed, first: {e})"),
            None => String::new(),
        };
        println!(
            "parsec-client ecdsa-p256-sign/{threads}c {:.0} {:.0} {:.0}{errors}",
            all.len() as f64 / wall,
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}
