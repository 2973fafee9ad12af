//! keyhold against raw cryptoki on one SoftHSM2 token, in the same run.
//!
//! `cargo bench --bench pkcs11 --features testing`
//!
//! For every case the same work is timed twice: once through keyhold's [`Keystore`] (authenticated
//! key ID, record lookup, session pool, the backend) and once as a program using cryptoki directly
//! would do it (its own logged-in session per thread, its own key of the same kind on the same
//! token, no bookkeeping). Both sides run with 1 and 2 threads; raw and keyhold rounds alternate
//! (raw first, then keyhold first, ...) so that drift of the machine affects both, and each side's
//! result is the median of its rounds. Ops/s = total operations of all threads / wall time.
//!
//! Environment:
//! - `KEYHOLD_BENCH_SECS`: measured seconds per side, per case and thread count (split over
//!   the rounds; default 3, so the whole bench takes about 2 minutes).
//! - `KEYHOLD_BENCH_CASES`: comma-separated substrings; only cases whose name contains one run.
//! - `KEYHOLD_BENCH_BREAKDOWN=1`: afterwards, time the pieces of a keyhold operation on their own
//!   (the PKCS#11 call, the `C_GetTokenInfo` of a session checkout, key ID resolution) to show
//!   where keyhold's time goes.
//!
//! The fixture's token and the keystore live in `TMPDIR` (default `/tmp`): SoftHSM's file object
//! store re-reads object files on every operation and rewrites them on every change, so the
//! filesystem matters (`TMPDIR=/dev/shm` takes the disk out).
//!
//! Output (stdout): a header line, one line per case `name keyhold_ops_per_s raw_ops_per_s ratio`,
//! then the 2-thread/1-thread scaling of each side, the targets and whether they are met; then
//! (unless `KEYHOLD_BENCH_CASES` leaves out `audit`) keyhold with its audit log on beside keyhold
//! with it off, one line per case `audit NAME on_ops_per_s off_ops_per_s ratio`. A missed
//! target does not fail the process: this is a measurement.

mod common;

use common::{
    audit_on_and_off, compare_audit, describe, encrypted, loadavg, median, round_and_warmup,
    signed, AuditCase, BoxResult, OpResult, ENVELOPE_HEADER_LEN, ROUNDS, USER_AAD,
};

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use aws_lc_rs::{digest, rand, signature};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use keyhold::testing::{SoftHsm, SOFTHSM_MODULE, TEST_USER_PIN};
use keyhold::{
    Argon2Params, KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer, SignatureFormat,
};
use secrecy::SecretString;

/// The keyhold backend name of the fixture token.
const BACKEND: &str = "hsm";
/// DER of the P-256 curve OID (`CKA_EC_PARAMS`).
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const THREAD_COUNTS: [usize; 2] = [1, 2];
const RATIO_TARGET: f64 = 0.95;
const SCALING_TARGET: f64 = 1.8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    /// Raw: `C_Sign(CKM_ECDSA)` of a 32-byte digest. keyhold has no prehashed API: it signs a
    /// 32-byte message, so its side includes one SHA-256 of 32 bytes.
    SignDigest32,
    /// Both: SHA-256 of 1 KiB in software + `C_Sign(CKM_ECDSA)`, raw r||s out.
    SignMsg1k,
    /// As `SignMsg1k`, with the signature converted to DER (raw side: the same conversion here).
    SignMsg1kDer,
    /// Both: random 12-byte IV + `C_Encrypt(CKM_AES_GCM)` of 1 KiB.
    Aes1k,
    /// Both: random 12-byte IV + `C_Encrypt(CKM_AES_GCM)` of 1 MiB.
    Aes1m,
    /// Both: `C_Sign(CKM_SHA256_HMAC)` of 1 KiB.
    Hmac1k,
    /// Both: a token P-256 key pair (`C_GenerateKeyPair`) and its public point. keyhold also reads
    /// two attributes, finds the public object, writes and MACs a SQLite record, and issues an ID.
    /// Keys are destroyed after each round, outside the timed loop, on both sides.
    KeygenP256,
}

impl Case {
    const ALL: [Case; 7] = [
        Case::SignDigest32,
        Case::SignMsg1k,
        Case::SignMsg1kDer,
        Case::Aes1k,
        Case::Aes1m,
        Case::Hmac1k,
        Case::KeygenP256,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::SignDigest32 => "ecdsa-p256-sign-digest32",
            Case::SignMsg1k => "ecdsa-p256-sign-msg1k",
            Case::SignMsg1kDer => "ecdsa-p256-sign-msg1k-der",
            Case::Aes1k => "aes256gcm-encrypt-1k",
            Case::Aes1m => "aes256gcm-encrypt-1m",
            Case::Hmac1k => "hmac-sha256-1k",
            Case::KeygenP256 => "p256-keygen",
        }
    }
}

/// Inputs shared by every thread.
struct Inputs {
    msg32: Vec<u8>,
    digest32: Vec<u8>,
    msg1k: Vec<u8>,
    data1m: Vec<u8>,
    /// The AAD the raw side gives the token: as long as keyhold's header + `USER_AAD`.
    raw_aad: Vec<u8>,
}

impl Inputs {
    fn new() -> BoxResult<Self> {
        let random = |n: usize| -> BoxResult<Vec<u8>> {
            let mut v = vec![0u8; n];
            rand::fill(&mut v).map_err(|_| "rng")?;
            Ok(v)
        };
        let msg32 = random(32)?;
        let digest32 = digest::digest(&digest::SHA256, &msg32).as_ref().to_vec();
        let mut raw_aad = vec![0x4b; ENVELOPE_HEADER_LEN];
        raw_aad.extend_from_slice(USER_AAD);
        Ok(Self {
            msg32,
            digest32,
            msg1k: random(1024)?,
            data1m: random(1024 * 1024)?,
            raw_aad,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Raw cryptoki side

struct RawKeys {
    ec_private: ObjectHandle,
    ec_public: ObjectHandle,
    aes: ObjectHandle,
    hmac: ObjectHandle,
}

/// One thread's raw state: its own logged-in session, and the key pairs it generated this round.
struct RawWorker {
    session: Session,
    generated: Vec<(ObjectHandle, ObjectHandle)>,
}

fn find_slot(ctx: &Pkcs11, label: &str) -> BoxResult<Slot> {
    for slot in ctx.get_slots_with_token()? {
        if ctx.get_token_info(slot)?.label().trim_end() == label {
            return Ok(slot);
        }
    }
    Err(format!("no token labelled {label}").into())
}

fn raw_session(ctx: &Pkcs11, slot: Slot) -> BoxResult<Session> {
    let session = ctx.open_rw_session(slot)?;
    let pin = SecretString::from(TEST_USER_PIN.to_owned());
    match session.login(UserType::User, Some(&pin)) {
        // PKCS#11 login state is per application: keyhold (or the other session) logged in already.
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
            Ok(session)
        }
        Err(e) => Err(e.into()),
    }
}

fn random_id() -> Vec<u8> {
    let mut id = vec![0u8; 16];
    rand::fill(&mut id).expect("rng");
    id
}

/// The templates keyhold uses (token, private, sensitive, non-extractable, CKA_ID, label).
fn private_template(id: &[u8], label: &str, usage: Vec<Attribute>) -> Vec<Attribute> {
    let mut attrs = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Id(id.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    attrs.extend(usage);
    attrs
}

fn public_template(id: &[u8], label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Id(id.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Verify(true),
        Attribute::EcParams(P256_OID.to_vec()),
    ]
}

fn raw_generate_p256(
    session: &Session,
    label: &str,
) -> cryptoki::error::Result<(ObjectHandle, ObjectHandle)> {
    let id = random_id();
    session.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &public_template(&id, label),
        &private_template(&id, label, vec![Attribute::Sign(true)]),
    )
}

fn raw_secret_key(session: &Session, aes: bool, label: &str) -> BoxResult<ObjectHandle> {
    let id = random_id();
    let (mechanism, key_type, usage) = if aes {
        (
            Mechanism::AesKeyGen,
            CkKeyType::AES,
            vec![Attribute::Encrypt(true), Attribute::Decrypt(true)],
        )
    } else {
        (
            Mechanism::GenericSecretKeyGen,
            CkKeyType::GENERIC_SECRET,
            vec![Attribute::Sign(true), Attribute::Verify(true)],
        )
    };
    let mut attrs = private_template(&id, label, usage);
    attrs.push(Attribute::Class(ObjectClass::SECRET_KEY));
    attrs.push(Attribute::KeyType(key_type));
    attrs.push(Attribute::ValueLen(32.into()));
    Ok(session.generate_key(&mechanism, &attrs)?)
}

/// The uncompressed EC point of a public key object (`CKA_EC_POINT` is a DER OCTET STRING).
fn raw_ec_point(session: &Session, public: ObjectHandle) -> cryptoki::error::Result<Vec<u8>> {
    let attrs = session.get_attributes(public, &[AttributeType::EcPoint])?;
    Ok(attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .unwrap_or_default())
}

fn strip_octet_string(point: &[u8]) -> &[u8] {
    if point.len() == 67 && point[0] == 0x04 && point[1] == 65 {
        &point[2..]
    } else {
        point
    }
}

fn raw_gcm_encrypt(
    session: &Session,
    key: ObjectHandle,
    aad: &[u8],
    data: &[u8],
) -> cryptoki::error::Result<(Vec<u8>, [u8; 12])> {
    let mut nonce = [0u8; 12];
    rand::fill(&mut nonce).expect("rng");
    let mut iv = nonce;
    let params = GcmParams::new(&mut iv, aad, 128.into())?;
    let ct = session.encrypt(&Mechanism::AesGcm(params), key, data)?;
    Ok((ct, nonce))
}

/// X9.62 `SEQUENCE { INTEGER r, INTEGER s }` from fixed-width r||s (what keyhold does for DER).
fn ecdsa_raw_to_der(sig: &[u8]) -> Vec<u8> {
    fn integer(v: &[u8], out: &mut Vec<u8>) {
        let start = v.iter().position(|&b| b != 0).unwrap_or(v.len() - 1);
        let v = &v[start..];
        let pad = v[0] & 0x80 != 0;
        out.push(0x02);
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    let (r, s) = sig.split_at(sig.len() / 2);
    let mut body = Vec::with_capacity(72);
    integer(r, &mut body);
    integer(s, &mut body);
    let mut out = Vec::with_capacity(body.len() + 2);
    out.push(0x30);
    out.push(body.len() as u8);
    out.extend_from_slice(&body);
    out
}

/// A keyhold error with its cause (the PKCS#11 return value), briefly.
fn raw_op(case: Case, w: &mut RawWorker, keys: &RawKeys, inputs: &Inputs) -> OpResult {
    let s = &w.session;
    let result = match case {
        Case::SignDigest32 => s
            .sign(&Mechanism::Ecdsa, keys.ec_private, &inputs.digest32)
            .map(drop),
        Case::SignMsg1k => {
            let d = digest::digest(&digest::SHA256, &inputs.msg1k);
            s.sign(&Mechanism::Ecdsa, keys.ec_private, d.as_ref())
                .map(drop)
        }
        Case::SignMsg1kDer => {
            let d = digest::digest(&digest::SHA256, &inputs.msg1k);
            s.sign(&Mechanism::Ecdsa, keys.ec_private, d.as_ref())
                .map(|sig| drop(ecdsa_raw_to_der(&sig)))
        }
        Case::Aes1k => raw_gcm_encrypt(s, keys.aes, &inputs.raw_aad, &inputs.msg1k).map(drop),
        Case::Aes1m => raw_gcm_encrypt(s, keys.aes, &inputs.raw_aad, &inputs.data1m).map(drop),
        Case::Hmac1k => s
            .sign(&Mechanism::Sha256Hmac, keys.hmac, &inputs.msg1k)
            .map(drop),
        Case::KeygenP256 => {
            raw_generate_p256(s, "bench/raw-keygen").and_then(|(public, private)| {
                // Every application needs the public half of a new key pair: keyhold returns it too.
                raw_ec_point(s, public)?;
                w.generated.push((public, private));
                Ok(())
            })
        }
    };
    result.map_err(|e| format!("{e:?}"))
}

/// Destroys the key pairs generated in a round; returns what could not be destroyed.
fn raw_cleanup(workers: &mut [RawWorker]) -> Vec<String> {
    let mut failures = Vec::new();
    for w in workers {
        for (public, private) in w.generated.drain(..) {
            for handle in [public, private] {
                if let Err(e) = w.session.destroy_object(handle) {
                    failures.push(format!("C_DestroyObject: {e:?}"));
                }
            }
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// keyhold side

struct KhKeys {
    ec: String,
    aes: String,
    hmac: String,
}

/// One thread's keyhold state: the shared keystore, a name counter, the keys it created.
struct KhWorker {
    ks: Arc<Keystore>,
    thread: usize,
    counter: u64,
    created: Vec<String>,
}

fn kh_request(name: String, key_type: KeyType) -> BoxResult<KeyRequest> {
    Ok(KeyRequest {
        namespace: "bench".into(),
        name,
        spec: KeySpec::new(key_type, None, None)?,
        backend: Some(BACKEND.into()),
    })
}

fn kh_op(case: Case, w: &mut KhWorker, keys: &KhKeys, inputs: &Inputs) -> OpResult {
    let ks = &w.ks;
    let result = match case {
        // keyhold has no digest API: it hashes the 32 bytes (SHA-256) before C_Sign.
        Case::SignDigest32 => ks
            .sign(&keys.ec, &inputs.msg32, SignatureFormat::Raw)
            .map(drop),
        Case::SignMsg1k => ks
            .sign(&keys.ec, &inputs.msg1k, SignatureFormat::Raw)
            .map(drop),
        Case::SignMsg1kDer => ks
            .sign(&keys.ec, &inputs.msg1k, SignatureFormat::Der)
            .map(drop),
        Case::Aes1k => ks.encrypt(&keys.aes, &inputs.msg1k, USER_AAD).map(drop),
        Case::Aes1m => ks.encrypt(&keys.aes, &inputs.data1m, USER_AAD).map(drop),
        Case::Hmac1k => ks.mac(&keys.hmac, &inputs.msg1k).map(drop),
        Case::KeygenP256 => {
            w.counter += 1;
            let name = format!("kg-{}-{}", w.thread, w.counter);
            let request = kh_request(name, KeyType::EcdsaP256).map_err(|e| e.to_string())?;
            ks.create_key(&request).map(|info| w.created.push(info.id))
        }
    };
    result.map_err(|e| describe(&e))
}

/// Destroys the keys created in a round (a few tries each: a pooled session may be unusable);
/// returns what could not be destroyed.
fn kh_cleanup(workers: &mut [KhWorker]) -> Vec<String> {
    let mut failures = Vec::new();
    for w in workers {
        for id in w.created.drain(..) {
            let mut last = None;
            for _ in 0..4 {
                match w.ks.destroy_key(&id) {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(describe(&e)),
                }
            }
            failures.extend(last.map(|e| format!("destroy_key: {e}")));
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// Timing

/// What one timed run gave.
struct Round {
    /// Successful operations of all threads / (last end − first start).
    rate: f64,
    failed: u64,
    first_error: Option<String>,
}

/// Runs `op` on every worker, one thread each, started together, each for `duration`.
fn timed<W: Send>(
    workers: &mut [W],
    duration: Duration,
    op: &(dyn Fn(&mut W) -> OpResult + Sync),
) -> Round {
    let barrier = Barrier::new(workers.len());
    type Span = (Instant, Instant, u64, u64, Option<String>);
    let spans: Vec<Span> = std::thread::scope(|scope| {
        let barrier = &barrier;
        let handles: Vec<_> = workers
            .iter_mut()
            .map(|w| {
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let deadline = start + duration;
                    let (mut ops, mut failed, mut first_error) = (0u64, 0u64, None);
                    loop {
                        match op(w) {
                            Ok(()) => ops += 1,
                            Err(e) => {
                                failed += 1;
                                first_error.get_or_insert(e);
                            }
                        }
                        let now = Instant::now();
                        if now >= deadline {
                            return (start, now, ops, failed, first_error);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("benchmark thread panicked"))
            .collect()
    });
    let first = spans
        .iter()
        .map(|s| s.0)
        .min()
        .expect("at least one thread");
    let last = spans
        .iter()
        .map(|s| s.1)
        .max()
        .expect("at least one thread");
    let ops: u64 = spans.iter().map(|s| s.2).sum();
    Round {
        rate: ops as f64 / last.duration_since(first).as_secs_f64(),
        failed: spans.iter().map(|s| s.3).sum(),
        first_error: spans.into_iter().find_map(|s| s.4),
    }
}

struct Bench<'a> {
    inputs: &'a Inputs,
    raw_keys: &'a RawKeys,
    raw_workers: Vec<RawWorker>,
    kh_keys: &'a KhKeys,
    kh_workers: Vec<KhWorker>,
    round: Duration,
    warmup: Duration,
    /// Failed operations and clean-ups, for the report.
    errors: Vec<String>,
}

impl Bench<'_> {
    fn note(&mut self, what: String, round: Round, cleanup: Vec<String>) -> f64 {
        if round.failed > 0 {
            self.errors.push(format!(
                "{what}: {} operations failed, first: {}",
                round.failed,
                round.first_error.unwrap_or_default()
            ));
        }
        if let Some(first) = cleanup.first() {
            self.errors.push(format!(
                "{what}: {} clean-ups failed, first: {first}",
                cleanup.len()
            ));
        }
        round.rate
    }

    fn raw_round(&mut self, case: Case, threads: usize, d: Duration, what: &str) -> f64 {
        let (keys, inputs) = (self.raw_keys, self.inputs);
        let round = timed(&mut self.raw_workers[..threads], d, &|w| {
            raw_op(case, w, keys, inputs)
        });
        let cleanup = raw_cleanup(&mut self.raw_workers);
        self.note(
            format!("{}/{threads}t raw {what}", case.name()),
            round,
            cleanup,
        )
    }

    fn kh_round(&mut self, case: Case, threads: usize, d: Duration, what: &str) -> f64 {
        let (keys, inputs) = (self.kh_keys, self.inputs);
        let round = timed(&mut self.kh_workers[..threads], d, &|w| {
            kh_op(case, w, keys, inputs)
        });
        let cleanup = kh_cleanup(&mut self.kh_workers);
        self.note(
            format!("{}/{threads}t keyhold {what}", case.name()),
            round,
            cleanup,
        )
    }

    /// (keyhold ops/s, raw ops/s), medians of `ROUNDS` alternating rounds after a warm-up.
    fn measure(&mut self, case: Case, threads: usize) -> (f64, f64) {
        self.raw_round(case, threads, self.warmup, "warm-up");
        self.kh_round(case, threads, self.warmup, "warm-up");
        let (mut kh, mut raw) = (Vec::new(), Vec::new());
        for r in 0..ROUNDS {
            let what = format!("round {}", r + 1);
            if r % 2 == 0 {
                raw.push(self.raw_round(case, threads, self.round, &what));
                kh.push(self.kh_round(case, threads, self.round, &what));
            } else {
                kh.push(self.kh_round(case, threads, self.round, &what));
                raw.push(self.raw_round(case, threads, self.round, &what));
            }
        }
        eprintln!(
            "#   {}/{threads}t rounds: keyhold {:?} raw {:?}",
            case.name(),
            kh.iter().map(|x| x.round()).collect::<Vec<_>>(),
            raw.iter().map(|x| x.round()).collect::<Vec<_>>()
        );
        (median(kh), median(raw))
    }
}

// ---------------------------------------------------------------------------------------------
// Setup and report

fn sanity_checks(
    ks: &Keystore,
    kh: &KhKeys,
    session: &Session,
    raw: &RawKeys,
    inputs: &Inputs,
) -> BoxResult<()> {
    // keyhold signatures verify under the recorded public key, in both formats.
    for (msg, format) in [
        (&inputs.msg32, SignatureFormat::Raw),
        (&inputs.msg1k, SignatureFormat::Raw),
        (&inputs.msg1k, SignatureFormat::Der),
    ] {
        let sig = ks.sign(&kh.ec, msg, format)?;
        ks.verify(&kh.ec, msg, &sig, format)?;
    }
    // Raw signatures verify under the token's public point, in both encodings.
    let point = raw_ec_point(session, raw.ec_public)?;
    let point = strip_octet_string(&point);
    let fixed = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point);
    let asn1 = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, point);
    let sig = session.sign(&Mechanism::Ecdsa, raw.ec_private, &inputs.digest32)?;
    fixed
        .verify(&inputs.msg32, &sig)
        .map_err(|_| "raw digest signature does not verify")?;
    let d = digest::digest(&digest::SHA256, &inputs.msg1k);
    let sig = session.sign(&Mechanism::Ecdsa, raw.ec_private, d.as_ref())?;
    fixed
        .verify(&inputs.msg1k, &sig)
        .map_err(|_| "raw 1 KiB signature does not verify")?;
    asn1.verify(&inputs.msg1k, &ecdsa_raw_to_der(&sig))
        .map_err(|_| "raw DER signature does not verify")?;
    // AES-GCM round trips on both sides.
    let env = ks.encrypt(&kh.aes, &inputs.msg1k, USER_AAD)?;
    if ks.decrypt(&kh.aes, &env, USER_AAD)?.expose() != inputs.msg1k.as_slice() {
        return Err("keyhold AES-GCM round trip".into());
    }
    let (ct, mut nonce) = raw_gcm_encrypt(session, raw.aes, &inputs.raw_aad, &inputs.msg1k)?;
    let params = GcmParams::new(&mut nonce, &inputs.raw_aad, 128.into())?;
    if session.decrypt(&Mechanism::AesGcm(params), raw.aes, &ct)? != inputs.msg1k {
        return Err("raw AES-GCM round trip".into());
    }
    // HMAC tags: 32 bytes, keyhold's checks out.
    let tag = ks.mac(&kh.hmac, &inputs.msg1k)?;
    ks.verify_mac(&kh.hmac, &inputs.msg1k, &tag)?;
    let raw_tag = session.sign(&Mechanism::Sha256Hmac, raw.hmac, &inputs.msg1k)?;
    if tag.len() != 32 || raw_tag.len() != 32 {
        return Err("HMAC tag length".into());
    }
    Ok(())
}

/// Times the pieces of keyhold's operations on their own, with 1 and 2 threads.
fn breakdown(bench: &mut Bench<'_>, ctx: &Pkcs11, slot: Slot, d: Duration) {
    type RawStep<'a> = Box<dyn Fn(&mut RawWorker) -> OpResult + Sync + 'a>;
    type KhStep<'a> = Box<dyn Fn(&mut KhWorker) -> OpResult + Sync + 'a>;
    let (rk, kk, inputs) = (bench.raw_keys, bench.kh_keys, bench.inputs);
    // What keyhold's session checkout does every time (`Pool::effective_max`).
    let token_info = move || {
        ctx.get_token_info(slot)
            .map(drop)
            .map_err(|e| format!("{e:?}"))
    };
    let raw_steps: Vec<(&str, RawStep<'_>)> = vec![
        (
            "raw C_Sign(CKM_ECDSA) of a digest",
            Box::new(move |w| raw_op(Case::SignDigest32, w, rk, inputs)),
        ),
        ("raw C_GetTokenInfo", Box::new(move |_| token_info())),
        (
            "raw C_GetTokenInfo + SHA-256(32 B) + C_Sign(CKM_ECDSA)",
            Box::new(move |w| {
                token_info()?;
                let d = digest::digest(&digest::SHA256, &inputs.msg32);
                w.session
                    .sign(&Mechanism::Ecdsa, rk.ec_private, d.as_ref())
                    .map(drop)
                    .map_err(|e| format!("{e:?}"))
            }),
        ),
        (
            "raw C_Sign(CKM_SHA256_HMAC) 1 KiB",
            Box::new(move |w| raw_op(Case::Hmac1k, w, rk, inputs)),
        ),
        (
            "raw C_GetTokenInfo + C_Sign(CKM_SHA256_HMAC) 1 KiB",
            Box::new(move |w| {
                token_info()?;
                raw_op(Case::Hmac1k, w, rk, inputs)
            }),
        ),
        (
            "raw C_Encrypt(CKM_AES_GCM) 1 KiB",
            Box::new(move |w| raw_op(Case::Aes1k, w, rk, inputs)),
        ),
        (
            "raw C_GetTokenInfo + C_Encrypt(CKM_AES_GCM) 1 KiB",
            Box::new(move |w| {
                token_info()?;
                raw_op(Case::Aes1k, w, rk, inputs)
            }),
        ),
    ];
    let kh_steps: Vec<(&str, KhStep<'_>)> = vec![
        (
            "keyhold public_key(id): key ID resolution only, no token",
            Box::new(move |w| w.ks.public_key(&kk.ec).map(drop).map_err(|e| describe(&e))),
        ),
        (
            "keyhold key_info(id): resolution + key ID re-encoding, no token",
            Box::new(move |w| w.ks.key_info(&kk.hmac).map(drop).map_err(|e| describe(&e))),
        ),
        (
            "keyhold sign(32 B, raw)",
            Box::new(move |w| kh_op(Case::SignDigest32, w, kk, inputs)),
        ),
        (
            "keyhold mac(1 KiB)",
            Box::new(move |w| kh_op(Case::Hmac1k, w, kk, inputs)),
        ),
        (
            "keyhold encrypt(1 KiB)",
            Box::new(move |w| kh_op(Case::Aes1k, w, kk, inputs)),
        ),
    ];
    println!();
    println!("breakdown (step: us/op 1 thread, wall us/op 2 threads, ops/s 1t, ops/s 2t)");
    let report = |name: &str, one: Round, two: Round| {
        let failed = one.failed + two.failed;
        let errors = match one.first_error.or(two.first_error) {
            Some(e) if failed > 0 => format!(" ({failed} failed: {e})"),
            _ => String::new(),
        };
        println!(
            "  {name}: {:.1} us, {:.1} us, {:.0}/s, {:.0}/s{errors}",
            1e6 / one.rate,
            1e6 / two.rate,
            one.rate,
            two.rate
        );
    };
    for (name, step) in &raw_steps {
        let one = timed(&mut bench.raw_workers[..1], d, step.as_ref());
        let two = timed(&mut bench.raw_workers[..2], d, step.as_ref());
        report(name, one, two);
    }
    for (name, step) in &kh_steps {
        let one = timed(&mut bench.kh_workers[..1], d, step.as_ref());
        let two = timed(&mut bench.kh_workers[..2], d, step.as_ref());
        report(name, one, two);
    }
}

/// Whether `KEYHOLD_BENCH_CASES` is unset or names `what`.
fn cases_asked(what: &str) -> bool {
    match std::env::var("KEYHOLD_BENCH_CASES") {
        Ok(filter) if !filter.trim().is_empty() => filter.split(',').any(|f| f.trim() == what),
        _ => true,
    }
}

/// keyhold with its audit log on beside keyhold with it off, on the same token: signing and
/// AES-GCM (1 KiB) on one thread, each store with its own token keys.
fn audit_on_off(
    hsm: &SoftHsm,
    inputs: &Inputs,
    round: Duration,
    warmup: Duration,
) -> BoxResult<()> {
    let dir = tempfile::tempdir()?;
    let (on, off) = audit_on_and_off(dir.path(), &hsm.config(BACKEND))?;
    let keys = |ks: &Keystore| -> BoxResult<(String, String)> {
        Ok((
            ks.create_key(&kh_request("audit-ec".into(), KeyType::EcdsaP256)?)?
                .id,
            ks.create_key(&kh_request("audit-aes".into(), KeyType::Aes256Gcm)?)?
                .id,
        ))
    };
    let ((on_ec, on_aes), (off_ec, off_aes)) = (keys(&on)?, keys(&off)?);
    let cases = vec![
        AuditCase {
            name: "pkcs11-ecdsa-p256-sign-32",
            on: Box::new(|| signed(&on, &on_ec, &inputs.msg32)),
            off: Box::new(|| signed(&off, &off_ec, &inputs.msg32)),
        },
        AuditCase {
            name: "pkcs11-aes256gcm-encrypt-1k",
            on: Box::new(|| encrypted(&on, &on_aes, &inputs.msg1k)),
            off: Box::new(|| encrypted(&off, &off_aes, &inputs.msg1k)),
        },
    ];
    compare_audit(cases, round, warmup);
    println!(
        "audit log of the audit-on store: {} entries, verified",
        on.verify_audit()?.entries
    );
    for ks in [&on, &off] {
        for info in ks.list_keys(None)? {
            ks.destroy_key(&info.id)?;
        }
    }
    Ok(())
}

fn selected_cases() -> Vec<Case> {
    match std::env::var("KEYHOLD_BENCH_CASES") {
        Ok(filter) if !filter.trim().is_empty() => Case::ALL
            .into_iter()
            .filter(|c| filter.split(',').any(|f| c.name().contains(f.trim())))
            .collect(),
        _ => Case::ALL.to_vec(),
    }
}

fn main() -> BoxResult<()> {
    let (secs, round, warmup) = round_and_warmup()?;
    let cases = selected_cases();

    // One token; one keystore on it (the fixture must come first: it sets SOFTHSM2_CONF).
    let hsm = SoftHsm::new()?;
    let dir = tempfile::tempdir()?;
    let sealer = PassphraseSealer::new(SecretString::from("keyhold bench passphrase".to_owned()))
        .with_params(Argon2Params {
        memory_mib: 19,
        iterations: 2,
        parallelism: 1,
    })?;
    let ks = Arc::new(Keystore::create_with(
        dir.path(),
        &sealer,
        &hsm.config(BACKEND),
    )?);
    let kh_keys = KhKeys {
        ec: ks
            .create_key(&kh_request("ec".into(), KeyType::EcdsaP256)?)?
            .id,
        aes: ks
            .create_key(&kh_request("aes".into(), KeyType::Aes256Gcm)?)?
            .id,
        hmac: ks
            .create_key(&kh_request("hmac".into(), KeyType::HmacSha256)?)?
            .id,
    };

    // The raw side: the same module, already initialised by keyhold in this process.
    let ctx = Pkcs11::new(SOFTHSM_MODULE)?;
    let init = match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => "initialised here",
        Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            "already initialised by keyhold (CKR_CRYPTOKI_ALREADY_INITIALIZED)"
        }
        Err(e) => return Err(e.into()),
    };
    let slot = find_slot(&ctx, hsm.label())?;
    let max_threads = THREAD_COUNTS.iter().copied().max().unwrap_or(1);
    let mut raw_workers = Vec::new();
    for _ in 0..max_threads {
        raw_workers.push(RawWorker {
            session: raw_session(&ctx, slot)?,
            generated: Vec::new(),
        });
    }
    let raw_keys = {
        let s = &raw_workers[0].session;
        let (ec_public, ec_private) = raw_generate_p256(s, "bench/raw-ec")?;
        RawKeys {
            ec_private,
            ec_public,
            aes: raw_secret_key(s, true, "bench/raw-aes")?,
            hmac: raw_secret_key(s, false, "bench/raw-hmac")?,
        }
    };
    let inputs = Inputs::new()?;
    sanity_checks(&ks, &kh_keys, &raw_workers[0].session, &raw_keys, &inputs)?;

    let kh_workers = (0..max_threads)
        .map(|thread| KhWorker {
            ks: Arc::clone(&ks),
            thread,
            counter: 0,
            created: Vec::new(),
        })
        .collect();
    let mut bench = Bench {
        inputs: &inputs,
        raw_keys: &raw_keys,
        raw_workers,
        kh_keys: &kh_keys,
        kh_workers,
        round,
        warmup,
        errors: Vec::new(),
    };

    eprintln!(
        "# keyhold PKCS#11 bench: SoftHSM2 token `{}` in {}, module {init}; {} CPUs, load \
         average {}; {secs} s per side per case and thread count ({ROUNDS} alternating rounds \
         of {:.2} s, median; warm-up {:.2} s)",
        hsm.label(),
        std::env::temp_dir().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        round.as_secs_f64(),
        warmup.as_secs_f64()
    );
    println!("name keyhold_ops_per_s raw_ops_per_s ratio");
    let mut results: Vec<(Case, usize, f64, f64)> = Vec::new();
    for &case in &cases {
        for threads in THREAD_COUNTS {
            let (kh, raw) = bench.measure(case, threads);
            println!(
                "{}/{threads}t {kh:.0} {raw:.0} {:.2}",
                case.name(),
                kh / raw
            );
            results.push((case, threads, kh, raw));
        }
    }

    let lookup = |case: Case, threads: usize| {
        results
            .iter()
            .find(|r| r.0 == case && r.1 == threads)
            .map(|r| (r.2, r.3))
    };
    println!();
    println!("scaling keyhold_2t/1t raw_2t/1t");
    let mut scaling = Vec::new();
    for &case in &cases {
        if let (Some(one), Some(two)) = (lookup(case, 1), lookup(case, 2)) {
            let (kh, raw) = (two.0 / one.0, two.1 / one.1);
            println!("{} {kh:.2} {raw:.2}", case.name());
            scaling.push((case, kh, raw));
        }
    }

    println!();
    println!("targets: ratio >= {RATIO_TARGET} on 1 thread; keyhold 2t >= {SCALING_TARGET}x 1t");
    let missed_ratio: Vec<String> = results
        .iter()
        .filter(|r| r.1 == 1 && r.2 / r.3 < RATIO_TARGET)
        .map(|r| format!("{} ({:.2})", r.0.name(), r.2 / r.3))
        .collect();
    let missed_scaling: Vec<String> = scaling
        .iter()
        .filter(|s| s.1 < SCALING_TARGET)
        .map(|s| format!("{} ({:.2}; raw {:.2})", s.0.name(), s.1, s.2))
        .collect();
    let verdict = |missed: &[String]| {
        if missed.is_empty() {
            "met".to_owned()
        } else {
            format!("MISSED by {}", missed.join(", "))
        }
    };
    println!("ratio   >= {RATIO_TARGET}: {}", verdict(&missed_ratio));
    println!("scaling >= {SCALING_TARGET}: {}", verdict(&missed_scaling));
    if bench.errors.is_empty() {
        println!("errors: none");
    } else {
        println!(
            "errors: {} rounds had failures (rates count successful operations only):",
            bench.errors.len()
        );
        for e in &bench.errors {
            println!("  {e}");
        }
    }
    println!(
        "notes: ecdsa-p256-sign-digest32: raw signs a 32-byte digest, keyhold (no digest API) signs \
         a 32-byte message and so also hashes it; aes: the raw AAD has keyhold's length (25-byte \
         envelope header + caller AAD); p256-keygen: raw = C_GenerateKeyPair + CKA_EC_POINT read, \
         keyhold also reads two attributes and the public key's point, and writes a SQLite \
         record per key; keys destroyed outside the timed loop on both sides"
    );

    if std::env::var("KEYHOLD_BENCH_BREAKDOWN").is_ok_and(|v| v == "1") {
        breakdown(&mut bench, &ctx, slot, round);
    }
    if cases_asked("audit") {
        audit_on_off(&hsm, &inputs, round, warmup)?;
    }
    eprintln!("# load average at the end: {}", loadavg());

    // Close the raw sessions before the keystore and the token go.
    drop(bench);
    Ok(())
}
