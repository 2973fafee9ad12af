//! Crash safety (issue 10): `keyhold` processes are SIGKILLed at random points of multi-step
//! changes — key creation and import (backend, then record), rotation, state changes, destruction, AES-GCM
//! encryption (which reserves invocations in the store) — in a loop, on the software backend and
//! on a SoftHSM2 token. After every kill: the store opens (every MAC checks), the audit log
//! verifies, every key whose creation or rotation was acknowledged works at its newest
//! acknowledged version or later, every acknowledged envelope decrypts, a destruction begun is
//! finished by `maintain`, and every device object of the store is either a recorded version or
//! an orphan `doctor` reports (and removes).
//!
//! The kill lands after a random delay, uniform over the command's own running time (measured
//! from the runs that were not killed), so it falls anywhere in it: during the unsealing, the
//! device's work, or the writes. Set `KEYHOLD_CRASH_SEED` to replay a run; the seed is printed.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use keyhold::config::Config;
use keyhold::{KeyState, Keystore, PassphraseSealer, SignatureFormat, UseOptions};
use secrecy::SecretString;
use support::env::{run_killed_after, Env, PASS};

/// Kill-loop iterations per backend.
const ITERATIONS: usize = 150;

/// A small PRNG for the schedule (xorshift64*): reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("KEYHOLD_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        println!("KEYHOLD_CRASH_SEED={seed}");
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Create,
    Rotate,
    Suspend,
    Resume,
    Encrypt,
    Destroy,
    /// `key import` of key material from a file: a creation, as far as the checks go.
    Import,
}

const OPS: [Op; 7] = [
    Op::Create,
    Op::Import,
    Op::Rotate,
    Op::Suspend,
    Op::Resume,
    Op::Encrypt,
    Op::Destroy,
];

/// What the test knows of one key: what was acknowledged (the command exited 0).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Tracked {
    name: String,
    /// Known once its creation was acknowledged or the key was found after a killed creation.
    id: Option<String>,
    aes: bool,
    /// The newest version an acknowledged command reported (0: none acknowledged).
    acked_version: u32,
    /// The state (its name) the last acknowledged command on the key left, if the last command
    /// on it was acknowledged.
    expected: Option<String>,
    /// Envelopes acknowledged, with their plaintexts.
    envelopes: Vec<(Vec<u8>, Vec<u8>)>,
    destroyed: bool,
}

#[derive(Debug, Default)]
struct Tally {
    killed: HashMap<&'static str, usize>,
    completed: HashMap<&'static str, usize>,
    orphans_found: usize,
    destructions_finished: usize,
    /// SoftHSM2 token records a kill left empty, put back (see `Loop::iteration`).
    token_records_restored: usize,
}

struct Loop<'a> {
    env: &'a Env,
    backend: Option<&'a str>,
    rng: Rng,
    keys: Vec<Tracked>,
    /// Each command kind's last uninterrupted running time.
    durations: HashMap<Op, Duration>,
    tally: Tally,
    /// The SoftHSM2 token's label, for a token store.
    token: Option<String>,
    /// The swtpm's TCTI, for a TPM-anchored store: a killed process leaves its transient objects
    /// and sessions in a TPM reached without a resource manager (the kernel's /dev/tpmrm0
    /// flushes them when the process dies), so they are flushed after each kill.
    tpm: Option<String>,
}

/// Fresh key material of type `ty` for `key import`: PKCS#8 DER for a private key, 32 raw
/// bytes for an AES key.
fn material(ty: &str) -> Vec<u8> {
    use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let rng = aws_lc_rs::rand::SystemRandom::new();
    match ty {
        "ecdsa-p256" => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec(),
        "ed25519" => Ed25519KeyPair::generate_pkcs8(&rng)
            .unwrap()
            .as_ref()
            .to_vec(),
        _ => {
            let mut key = vec![0u8; 32];
            aws_lc_rs::rand::fill(&mut key).unwrap();
            key
        }
    }
}

fn name_of(op: Op) -> &'static str {
    match op {
        Op::Create => "create",
        Op::Rotate => "rotate",
        Op::Suspend => "suspend",
        Op::Resume => "resume",
        Op::Encrypt => "encrypt",
        Op::Destroy => "destroy",
        Op::Import => "import",
    }
}

impl Loop<'_> {
    fn sealer() -> PassphraseSealer {
        PassphraseSealer::new(SecretString::from(PASS.to_owned()))
    }

    fn run(mut self) -> Tally {
        for i in 0..ITERATIONS {
            self.iteration(i);
        }
        self.tally
    }

    fn iteration(&mut self, i: usize) {
        let live: Vec<usize> = (0..self.keys.len())
            .filter(|&k| !self.keys[k].destroyed && self.keys[k].id.is_some())
            .collect();
        let op = if live.len() < 2 {
            Op::Create
        } else {
            OPS[self.rng.below(OPS.len())]
        };
        let target = (!live.is_empty()).then(|| live[self.rng.below(live.len())]);
        let (args, key, op) = self.command(op, i, target);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let plaintext = format!("plaintext {i}").into_bytes();
        let msg = self.env.write("msg", &plaintext);
        let mut cmd = self.env.command(&args);
        if op == Op::Encrypt {
            cmd.args(["--in", &msg, "--out", "-"]);
        }
        // The first run of each kind is not killed: it measures how long the kind takes. Later
        // ones are killed after a delay uniform over twice that (anywhere in the run, about half
        // complete and are checked as acknowledged), or, every other time, uniform over its last
        // third and a little after, where the backend's work and the store's writes are (the
        // unsealing comes first).
        let near_the_end = self.rng.below(2) == 0;
        let spread = self.rng.unit();
        let delay = self.durations.get(&op).map(|typical| {
            typical.mul_f64(if near_the_end {
                0.67 + 0.45 * spread
            } else {
                2.0 * spread
            })
        });
        // SoftHSM2 (its file store) rewrites a token's record in place, truncating it first: a
        // process killed in between leaves it empty, and the whole token is gone, every key with
        // it. Real tokens write atomically; keyhold cannot make SoftHSM2 do so. So the record is
        // kept before each command and put back if a kill emptied it — what an atomic write
        // would have left — and counted.
        let token_record = self.token.as_ref().and_then(|_| token_record(self.env));
        let record_before = token_record.as_ref().map(|p| std::fs::read(p).unwrap());
        let started = Instant::now();
        let (acked, stdout, stderr) = run_killed_after(cmd, delay);
        if let (Some(path), Some(before)) = (&token_record, &record_before) {
            let after = std::fs::read(path).unwrap();
            if after.is_empty() {
                assert!(
                    acked.is_none(),
                    "{op:?} completed and left SoftHSM2's token record empty"
                );
                std::fs::write(path, before).unwrap();
                self.tally.token_records_restored += 1;
            }
        }
        if acked.is_some() {
            self.durations.insert(op, started.elapsed());
        } else if let Some(tcti) = &self.tpm {
            for what in ["-t", "-l", "-s"] {
                let out = Command::new("tpm2_flushcontext")
                    .args([what, "-T", tcti])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "tpm2_flushcontext {what}: {out:?}");
            }
        }
        let tally = if acked.is_some() {
            &mut self.tally.completed
        } else {
            &mut self.tally.killed
        };
        *tally.entry(name_of(op)).or_default() += 1;
        self.learn(op, key, acked, &stdout, &stderr, plaintext);
        self.check(i, op);
    }

    /// The command line of `op` (on the key `target`), which tracked key it concerns, and the
    /// operation it is (an encryption asked of a signing key is a rotation).
    fn command(&mut self, op: Op, i: usize, target: Option<usize>) -> (Vec<String>, usize, Op) {
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        if matches!(op, Op::Create | Op::Import) {
            let aes = self.rng.below(2) == 0;
            let name = format!("k{i}");
            let ty = match (aes, self.backend.is_some()) {
                (true, _) => "aes-256-gcm",
                (false, true) => "ecdsa-p256",
                (false, false) => "ed25519",
            };
            let mut args = s(&["key", "create", &name, "--type", ty]);
            if op == Op::Import {
                let file = self.env.write("import.key", &material(ty));
                args = s(&["key", "import", &name, "--type", ty, "--in", &file]);
            }
            if let Some(b) = self.backend {
                args.extend(s(&["--backend", b]));
            }
            self.keys.push(Tracked {
                name,
                id: None,
                aes,
                acked_version: 0,
                expected: None,
                envelopes: Vec::new(),
                destroyed: false,
            });
            return (args, self.keys.len() - 1, op);
        }
        let k = target.expect("a live key");
        let id = self.keys[k].id.clone().expect("a live key has an ID");
        let op = if op == Op::Encrypt && !self.keys[k].aes {
            Op::Rotate
        } else {
            op
        };
        let args = match op {
            Op::Rotate => s(&["key", "rotate", "--key", &id]),
            Op::Suspend => s(&["key", "suspend", "--key", &id]),
            Op::Resume => s(&["key", "resume", "--key", &id]),
            Op::Encrypt => s(&["encrypt", "--key", &id]),
            Op::Destroy => s(&["key", "destroy", "--key", &id, "--now", "--yes"]),
            Op::Create | Op::Import => unreachable!("handled above"),
        };
        (args, k, op)
    }

    /// Updates what is known after `op` on key `k` ended (`acked`: its exit code, `None` when
    /// killed).
    fn learn(
        &mut self,
        op: Op,
        k: usize,
        acked: Option<i32>,
        stdout: &[u8],
        stderr: &str,
        plaintext: Vec<u8>,
    ) {
        let key = &mut self.keys[k];
        let text = String::from_utf8_lossy(stdout).into_owned();
        match acked {
            None => key.expected = None,
            // Refused (a state that does not allow it: resume an active key, rotate a
            // suspended one): refusals change nothing, so what was expected stays.
            Some(code) if code != 0 => {
                assert_eq!(code, 9, "{op:?} on {} failed: {stderr}", key.name);
            }
            Some(_) => match op {
                Op::Create | Op::Import => {
                    key.id = Some(text.trim().to_owned());
                    key.acked_version = 1;
                    key.expected = Some("active".into());
                }
                Op::Rotate => {
                    let version: u32 = text
                        .trim()
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("rotate said `{text}`"));
                    key.acked_version = key.acked_version.max(version);
                }
                Op::Suspend => key.expected = Some("suspended".into()),
                Op::Resume => key.expected = Some("active".into()),
                Op::Encrypt => key.envelopes.push((stdout.to_vec(), plaintext)),
                Op::Destroy => {
                    key.destroyed = true;
                    key.expected = Some("destroyed".into());
                }
            },
        }
    }

    /// Everything that must hold after any kill, checked in this process for the software
    /// backend and in a fresh one for a token. (SoftHSM2 keeps a process's view of its token
    /// files: after another process was killed writing them, a process that had the token open
    /// before can find it unreadable, while any process that opens it afresh reads it whole — as
    /// after a real crash, where every process starts anew.)
    fn check(&mut self, i: usize, op: Op) {
        let request = CheckRequest {
            context: format!("iteration {i} ({op:?})"),
            store: self.env.store.clone(),
            config: self.env.config_text_or_empty(),
            token: self.token.clone(),
            keys: std::mem::take(&mut self.keys),
        };
        // A process of its own for a token (see `check_in_a_fresh_process`) and for a TPM (its
        // connection, session and SRK go when it ends, not held across the loop's kills).
        let answer = if request.token.is_some() || self.tpm.is_some() {
            check_in_a_fresh_process(self.env, &request)
        } else {
            check_here(request)
        };
        self.keys = answer.keys;
        self.tally.orphans_found += answer.orphans_removed;
        self.tally.destructions_finished += answer.destructions_finished;
    }
}

/// What the checker is given: where the store is, and what the test knows of each key.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CheckRequest {
    context: String,
    store: std::path::PathBuf,
    /// The configuration file's text (empty: none).
    config: String,
    /// The SoftHSM2 token's label, for a token store.
    token: Option<String>,
    keys: Vec<Tracked>,
}

/// What the checker found, with the keys as it now knows them (a killed creation found or not).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CheckAnswer {
    keys: Vec<Tracked>,
    orphans_removed: usize,
    destructions_finished: usize,
}

/// Runs [`check_here`] in a new process: this test binary's ignored entry point
/// `checker_process`, given the request in a file.
fn check_in_a_fresh_process(env: &Env, request: &CheckRequest) -> CheckAnswer {
    let path = env.dir.path().join("check-request.json");
    let answer_path = env.dir.path().join("check-answer.json");
    let _ = std::fs::remove_file(&answer_path);
    std::fs::write(&path, serde_json::to_vec(request).unwrap()).unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--ignored", "--exact", "checker_process", "--nocapture"])
        .env(CHECK_REQUEST, &path)
        .env(CHECK_ANSWER, &answer_path)
        .envs(env.vars());
    let out = support::env::run_command(cmd, None);
    if !out.status.success() {
        // What the token directory held then.
        let tokens = env
            .vars()
            .find(|(k, _)| *k == "SOFTHSM2_CONF")
            .and_then(|(_, conf)| std::fs::read_to_string(conf).ok())
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("directories.tokendir = "))
                    .map(str::to_owned)
            });
        let listing = tokens.map(|dir| {
            let mut ls = Command::new("ls");
            ls.args(["-laR", &dir]);
            String::from_utf8_lossy(&support::env::run_command(ls, None).stdout).into_owned()
        });
        panic!(
            "{}: the checker failed\n{}\ntoken directory: {listing:?}",
            request.context,
            support::env::show(&out)
        );
    }
    serde_json::from_slice(&std::fs::read(&answer_path).unwrap()).unwrap()
}

const CHECK_REQUEST: &str = "KEYHOLD_CRASH_CHECK_REQUEST";
const CHECK_ANSWER: &str = "KEYHOLD_CRASH_CHECK_ANSWER";

/// The checker's process: run by the kill-loop tests with a request (it fails without one).
#[test]
#[ignore = "the kill loop's checker process: the kill-loop tests run it with a request"]
fn checker_process() {
    let request = std::env::var_os(CHECK_REQUEST).expect("run by the kill-loop tests");
    let answer = std::env::var_os(CHECK_ANSWER).expect("run by the kill-loop tests");
    let request: CheckRequest = serde_json::from_slice(&std::fs::read(request).unwrap()).unwrap();
    let found = check_here(request);
    std::fs::write(answer, serde_json::to_vec(&found).unwrap()).unwrap();
}

/// The checks themselves (see the module's documentation).
fn check_here(request: CheckRequest) -> CheckAnswer {
    let ctx = &request.context;
    let config = if request.config.is_empty() {
        Config::default()
    } else {
        Config::from_toml(&request.config).unwrap()
    };
    let ks = Keystore::open_with(&request.store, &Loop::sealer(), &config)
        .unwrap_or_else(|e| panic!("{ctx}: the store does not open: {e}"));
    ks.verify_audit()
        .unwrap_or_else(|e| panic!("{ctx}: the audit log does not verify: {e}"));
    // A destruction begun and killed is finished by maintenance.
    let unfinished = ks
        .list_all_keys(None)
        .unwrap()
        .iter()
        .filter(|k| k.state == KeyState::Destroyed && k.destroyed_at.is_none())
        .count();
    if unfinished > 0 {
        let report = ks
            .maintain()
            .unwrap_or_else(|e| panic!("{ctx}: maintain: {e}"));
        assert!(
            report.failed.is_empty(),
            "{ctx}: maintain: {:?}",
            report.failed
        );
    }
    let options = UseOptions::new();
    let mut keys = request.keys;
    for key in &mut keys {
        if key.destroyed && key.id.is_none() {
            continue;
        }
        if key.id.is_none() {
            // A killed creation: the key may or may not have been recorded.
            key.id = ks
                .key_info_by_name("default", &key.name)
                .unwrap()
                .filter(|info| info.state != KeyState::Destroyed)
                .map(|info| info.id);
            if key.id.is_none() {
                key.destroyed = true;
                continue;
            }
        }
        let id = key.id.as_deref().unwrap();
        let info = ks
            .key_info(id)
            .unwrap_or_else(|e| panic!("{ctx}: key {}: {e}", key.name));
        assert!(
            info.version >= key.acked_version,
            "{ctx}: {} is at version {} but version {} was acknowledged",
            key.name,
            info.version,
            key.acked_version
        );
        if let Some(expected) = &key.expected {
            assert_eq!(info.state.as_str(), expected, "{ctx}: {}", key.name);
        }
        if info.state == KeyState::Destroyed {
            assert!(
                info.destroyed_at.is_some(),
                "{ctx}: {} half-destroyed",
                key.name
            );
            key.destroyed = true;
            continue;
        }
        for (envelope, plaintext) in &key.envelopes {
            let opened = ks
                .decrypt_with(id, envelope, b"", &options)
                .unwrap_or_else(|e| panic!("{ctx}: {} envelope: {e}", key.name));
            assert_eq!(opened.output.expose(), plaintext.as_slice());
        }
        if info.state == KeyState::Active {
            let used = if key.aes {
                ks.encrypt_with(id, b"check", b"", &options)
                    .map(|u| u.version)
            } else {
                ks.sign_with(id, b"check", SignatureFormat::Der, &options)
                    .map(|u| u.version)
            };
            let used = used.unwrap_or_else(|e| panic!("{ctx}: {}: {e}", key.name));
            assert_eq!(
                used, info.version,
                "{ctx}: {} used an old version",
                key.name
            );
        }
    }
    let orphans_removed = check_device(&ks, request.token.as_deref(), ctx);
    CheckAnswer {
        keys,
        orphans_removed,
        destructions_finished: unfinished,
    }
}

/// Every device object of this store is a recorded version or an orphan doctor reports (and
/// then removes); no recorded key lacks an object. How many orphans there were.
#[cfg(feature = "pkcs11")]
fn check_device(ks: &Keystore, token: Option<&str>, ctx: &str) -> usize {
    let Some(token) = token else {
        return 0;
    };
    let doctor = ks.doctor().unwrap();
    assert!(doctor.missing.is_empty(), "{ctx}: {:?}", doctor.missing);
    let recorded: Vec<String> = ks
        .list_keys(None)
        .unwrap()
        .into_iter()
        .flat_map(|k| k.versions.into_iter().map(|v| v.locator))
        .collect();
    let prefix = &ks.store_id()[..16];
    let orphans: Vec<String> = doctor.orphans.iter().map(|o| o.locator.clone()).collect();
    for locator in token_ids(token) {
        if !locator.starts_with(prefix) {
            continue;
        }
        assert!(
            recorded.contains(&locator) || orphans.contains(&locator),
            "{ctx}: object {locator} on the token is neither recorded nor reported\n\
             doctor's reports: {:?}\nrecorded: {recorded:?}\nall keys: {:?}",
            doctor
                .backends
                .iter()
                .map(|b| b
                    .report
                    .as_ref()
                    .map(|r| (r.objects.clone(), r.details.clone())))
                .collect::<Vec<_>>(),
            ks.list_all_keys(None)
                .unwrap()
                .iter()
                .map(|k| (&k.name, k.state, k.destroyed_at, &k.versions))
                .collect::<Vec<_>>()
        );
    }
    for orphan in &doctor.orphans {
        ks.remove_orphan(&orphan.backend, &orphan.locator).unwrap();
    }
    doctor.orphans.len()
}

#[cfg(not(feature = "pkcs11"))]
fn check_device(_ks: &Keystore, _token: Option<&str>, _ctx: &str) -> usize {
    0
}

/// The CKA_IDs (hex) of every object on the SoftHSM2 token `label`.
#[cfg(feature = "pkcs11")]
fn token_ids(label: &str) -> Vec<String> {
    use cryptoki::object::{Attribute, AttributeType};
    let session = support::pkcs11::raw_session(label);
    let mut ids: Vec<String> = session
        .find_objects(&[])
        .unwrap()
        .into_iter()
        .filter_map(|h| {
            session
                .get_attributes(h, &[AttributeType::Id])
                .ok()?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Id(id) => Some(keyhold::hex::encode(&id)),
                    _ => None,
                })
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The SoftHSM2 token directory's `token.object` (the token's own record: label, PINs, flags),
/// from the `SOFTHSM2_CONF` the commands get.
fn token_record(env: &Env) -> Option<std::path::PathBuf> {
    let conf = env.vars().find(|(k, _)| *k == "SOFTHSM2_CONF")?.1;
    let text = std::fs::read_to_string(conf).ok()?;
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("directories.tokendir = "))?;
    let token = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.path().is_dir())?;
    Some(token.path().join("token.object"))
}

fn report(backend: &str, tally: &Tally) {
    let total = |m: &HashMap<&str, usize>| m.values().sum::<usize>();
    println!(
        "{backend}: {ITERATIONS} iterations, {} killed {:?}, {} completed {:?}, {} orphans \
         reported and removed, {} destructions finished by maintain, {} SoftHSM2 token records \
         emptied by a kill and put back",
        total(&tally.killed),
        tally.killed,
        total(&tally.completed),
        tally.completed,
        tally.orphans_found,
        tally.destructions_finished,
        tally.token_records_restored
    );
    assert!(
        total(&tally.killed) >= ITERATIONS / 4,
        "too few kills landed ({}): the loop tested little",
        total(&tally.killed)
    );
}

#[test]
fn killed_at_random_points_the_software_backend_loses_nothing_acknowledged() {
    let env = Env::init();
    let tally = Loop {
        env: &env,
        backend: None,
        rng: Rng::new(),
        keys: Vec::new(),
        durations: HashMap::new(),
        tally: Tally::default(),
        token: None,
        tpm: None,
    }
    .run();
    report("software", &tally);
}

#[cfg(feature = "pkcs11")]
#[test]
fn killed_at_random_points_a_token_loses_nothing_acknowledged_and_leaks_nothing_unreported() {
    let hsm = keyhold::testing::SoftHsm::new().unwrap();
    let env = Env::on_softhsm(&hsm);
    env.init_store();
    let tally = Loop {
        env: &env,
        backend: Some("hsm"),
        rng: Rng::new(),
        keys: Vec::new(),
        durations: HashMap::new(),
        tally: Tally::default(),
        token: Some(hsm.label().to_owned()),
        tpm: None,
    }
    .run();
    report("SoftHSM2", &tally);
}

/// The loop on software keys in a store whose generation is anchored in a TPM's NV counter
/// (swtpm): kills land before a change's commit, between its commit and the counter's increment,
/// and after; every check opens the store, so a counter left one behind is repaired there and any
/// other gap refuses the store (and fails the test).
#[cfg(feature = "tpm")]
#[test]
fn killed_at_random_points_a_tpm_anchored_store_stays_in_step_with_its_counter() {
    let tpm = keyhold::testing::Swtpm::new().unwrap();
    let env = Env::new().with_config(&format!(
        "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\n",
        tpm.tcti()
    ));
    env.init_store();
    let tally = Loop {
        env: &env,
        backend: None,
        rng: Rng::new(),
        keys: Vec::new(),
        durations: HashMap::new(),
        tally: Tally::default(),
        token: None,
        tpm: Some(tpm.tcti()),
    }
    .run();
    report("software keys, TPM-anchored store", &tally);
}
