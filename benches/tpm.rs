//! keyhold's TPM backend against raw tss-esapi on one swtpm, and keyhold's software backend against
//! raw aws-lc-rs (with `openssl speed` beside it as an outside reference), in the same run.
//!
//! `cargo bench --bench tpm --features testing`
//!
//! Every case times the same work twice: once through keyhold's [`Keystore`] (authenticated key
//! ID, record lookup, the backend) and once as a program using the library directly would do it.
//! Raw and keyhold rounds alternate (raw first, then keyhold first, ...) so that drift of the
//! machine affects both; each side's result is the median of its rounds, after one warm-up round
//! per side. Every round also makes one untimed operation before its clock starts. Everything is
//! single-threaded: a TPM executes one command at a time. Ops/s = successful operations / wall
//! time; a failed operation is counted and reported, never fatal.
//!
//! **TPM: ECDSA P-256 signatures** on one swtpm started by [`Swtpm`]. Raw tss-esapi 7.7 is set up
//! the way keyhold's `connection.rs` is: the same SRK template (ECC P-256 storage key in the owner
//! hierarchy), a salted HMAC session (salted with and bound to the SRK, AES-128-CFB parameter
//! encryption in both directions, SHA-256), and a signing key made with keyhold's template (P-256,
//! fixed ECDSA-SHA256 scheme, noDA, a random 32-byte authValue). Signing is TPM2_Sign of the SHA-256
//! digest (computed in the timed loop) with a NULL hashcheck ticket; the result is turned into
//! left-padded r‖s bytes as keyhold returns it. Three raw variants:
//! - *reused session*: one session for every signature; the key is loaded once per round (before
//!   the clock starts) and stays loaded. Per signature: SHA-256, TPM2_Sign.
//! - *session per command*: the key is loaded once per round and stays loaded; per signature:
//!   SHA-256, TPM2_StartAuthSession (salted: an ephemeral ECDH on the client and on the TPM, bound
//!   to the SRK), Esys_TRSess_SetAttributes (continueSession, decrypt, encrypt; no TPM command),
//!   TPM2_Sign through that session, TPM2_FlushContext of the session. Flushing explicitly is what a
//!   program that keeps no session would do; it is one TPM command more than clearing
//!   continueSession would cost.
//! - *load per signature* (informational): one reused session; per signature: SHA-256, TPM2_Load
//!   of the key's blobs, Esys_TR_SetAuth, TPM2_Sign, TPM2_FlushContext of the key: what keyhold
//!   did before it kept keys loaded, and what it does when more keys are in use than its LRU holds.
//!
//! keyhold signs a 32-byte message with `Keystore::sign(id, msg, SignatureFormat::Raw)` (it hashes
//! in software) on its one reused session; the key is loaded by the first signature and stays in
//! keyhold's LRU of loaded keys (two by default), so the TPM work per signature is TPM2_Sign, as in
//! the reused-session variant, and keyhold/reused-session is what keyhold itself adds (key ID
//! resolution, unsealing the authValue, the turn on the device, blob parsing).
//!
//! swtpm's TCP server serves one client at a time: while one connection is open, a second client's
//! connect succeeds (the kernel's listen backlog) but its first command waits, with no error, until
//! the first client disconnects (checked with `tpm2_getrandom` while another socket was held open:
//! it hung until killed). keyhold holds its TPM connection for the life of the [`Keystore`], so the
//! two sides must never be open at once: every TPM round opens its own connection and closes it at
//! the end (raw: a new `Context`, SRK and session, key loaded; keyhold: `Keystore::open_with`, then
//! dropped). Connecting is outside the timed loop on both sides.
//!
//! **Software backend** (`backend: None`): AES-256-GCM encryption of 1 MiB (keyhold `encrypt`
//! against aws-lc-rs `RandomizedNonceKey::seal_in_place_append_tag` into a fresh buffer, since
//! keyhold's API leaves its input untouched and returns a new one, with an AAD as long as keyhold's
//! 25-byte envelope header + caller AAD), and ECDSA P-256 signing of 1 KiB with DER output (keyhold
//! `sign(.., SignatureFormat::Der)` against `EcdsaKeyPair::sign` with
//! `ECDSA_P256_SHA256_ASN1_SIGNING`, the key parsed once from PKCS#8). keyhold signs twice: as
//! configured by default (the key unsealed and parsed for every signature) and with
//! `[software] key_cache_secs = 60` (the parsed key kept). Afterwards, `openssl speed -seconds 2`
//! for AES-256-GCM (16 KiB and 1 MiB blocks, each run with `-bytes N` alone: the same loop as that
//! column of the full sweep) and for ECDSA P-256 signing (which signs a 20-byte buffer, no hashing)
//! gives an outside reference; if openssl is missing, that is printed and the bench goes on.
//!
//! Before timing, one signature of each side is verified with its public key (keyhold's recorded
//! one, also checked with aws-lc-rs; the raw TPM key's point from its public area), and both AES
//! sides round-trip. A failed check is reported, not fatal.
//!
//! Environment:
//! - `KEYHOLD_BENCH_SECS`: measured seconds per side, per case (split over the rounds; default 3:
//!   the whole bench takes about 40 s: 4 TPM sides and 4 software sides of 3 s plus warm-ups and
//!   connection set-ups, then 8 s of `openssl speed`).
//! - `KEYHOLD_BENCH_CASES`: comma-separated substrings; only cases whose name contains one run
//!   (`tpm`, `sw`, `session`, ...). The keyhold TPM rounds run if any TPM case is selected.
//!
//! Output (stdout): a header line with the load average, one line per case
//! `name keyhold_ops_per_s raw_ops_per_s ratio`, AES throughput in MB/s (10^6 bytes), the openssl
//! reference, then the targets and whether they are met. A missed target does not fail the process:
//! this is a measurement.

mod common;

use common::{
    describe, loadavg, median, round_and_warmup, BoxResult, OpResult, ENVELOPE_HEADER_LEN, ROUNDS,
    USER_AAD,
};

use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM};
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use aws_lc_rs::{digest, rand};
use keyhold::config::Config;
use keyhold::testing::Swtpm;
use keyhold::{
    Algorithm, Argon2Params, KeyRequest, KeySpec, KeyType, Keystore, PassphraseSealer,
    SignatureFormat,
};
use secrecy::SecretString;
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, Digest, HashcheckTicket, Private, Public, Signature, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::{Context, WrapperErrorKind};

/// The keyhold backend name of the fixture TPM.
const BACKEND: &str = "tpm";
/// An envelope is the header, a nonce-length byte, the 12-byte nonce, the ciphertext, the tag.
const ENVELOPE_OVERHEAD: usize = ENVELOPE_HEADER_LEN + 1 + 12 + 16;
const AES_LEN: usize = 1024 * 1024;
/// keyhold/raw with a reused session; keyhold keeps one session, so it should cost nothing more.
const TPM_TARGET: f64 = 0.95;
const SOFTWARE_TARGET: f64 = 0.85;
/// `openssl speed -seconds`.
const OPENSSL_SECS: &str = "2";
/// P-256 field width: r and s are left-padded to it.
const P256_LEN: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    /// keyhold TPM signing against raw tss-esapi with one reused session.
    TpmReused,
    /// keyhold TPM signing against raw tss-esapi with a new salted session per signature.
    TpmPerCommand,
    /// keyhold TPM signing against raw tss-esapi doing what keyhold does today: one session, the
    /// key loaded and flushed around every signature. keyhold/this is keyhold's own overhead.
    TpmLoadPerSignature,
    /// Software AES-256-GCM encryption of 1 MiB.
    SwAes1m,
    /// Software ECDSA P-256 signature of 1 KiB, DER (keyhold's default: the key is unsealed and
    /// parsed for every signature).
    SwSign1kDer,
    /// The same with `[software] key_cache_secs = 60`: keyhold keeps the parsed key.
    SwSign1kDerCached,
}

impl Case {
    const ALL: [Case; 6] = [
        Case::TpmReused,
        Case::TpmPerCommand,
        Case::TpmLoadPerSignature,
        Case::SwAes1m,
        Case::SwSign1kDer,
        Case::SwSign1kDerCached,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::TpmReused => "tpm-ecdsa-p256-sign/reused-session",
            Case::TpmPerCommand => "tpm-ecdsa-p256-sign/session-per-command",
            Case::TpmLoadPerSignature => "tpm-ecdsa-p256-sign/load-per-signature",
            Case::SwAes1m => "sw-aes256gcm-encrypt-1m",
            Case::SwSign1kDer => "sw-ecdsa-p256-sign-msg1k-der",
            Case::SwSign1kDerCached => "sw-ecdsa-p256-sign-msg1k-der/key-cache",
        }
    }

    fn target(self) -> Option<f64> {
        match self {
            Case::TpmReused => Some(TPM_TARGET),
            // A program that pays for a salted session per signature is not what keyhold competes
            // with; the line shows what keeping the session is worth.
            Case::TpmPerCommand => None,
            // The same work as keyhold's today: shows what keyhold adds to it, and what a cache
            // of loaded keys can win (the reused-session line).
            Case::TpmLoadPerSignature => None,
            Case::SwAes1m | Case::SwSign1kDer | Case::SwSign1kDerCached => Some(SOFTWARE_TARGET),
        }
    }
}

/// Inputs shared by both sides.
struct Inputs {
    msg32: Vec<u8>,
    msg1k: Vec<u8>,
    data1m: Vec<u8>,
    /// The AAD the raw side authenticates: as long as keyhold's header + `USER_AAD`.
    raw_aad: Vec<u8>,
}

fn random(n: usize) -> BoxResult<Vec<u8>> {
    let mut v = vec![0u8; n];
    rand::fill(&mut v).map_err(|_| "rng")?;
    Ok(v)
}

impl Inputs {
    fn new() -> BoxResult<Self> {
        let mut raw_aad = vec![0x4b; ENVELOPE_HEADER_LEN];
        raw_aad.extend_from_slice(USER_AAD);
        Ok(Self {
            msg32: random(32)?,
            msg1k: random(1024)?,
            data1m: random(AES_LEN)?,
            raw_aad,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Raw tss-esapi side

/// keyhold's own SRK template, so that both sides salt with the same kind of key: ECC P-256
/// restricted decryption key, AES-128-CFB, SHA-256 name, empty auth and unique.
fn srk_template() -> tss_esapi::Result<Public> {
    keyhold::backend::tpm::raw_templates::srk()
}

/// keyhold's own P-256 signing key template: unrestricted, fixed ECDSA-SHA256 scheme, noDA.
fn signing_template() -> tss_esapi::Result<Public> {
    keyhold::backend::tpm::raw_templates::key(KeyType::EcdsaP256, Algorithm::EcdsaP256Sha256)
        .unwrap_or(Err(tss_esapi::Error::WrapperError(
            WrapperErrorKind::InvalidParam,
        )))
}

/// The NULL hashcheck ticket: unrestricted keys sign digests the TPM did not compute.
fn null_ticket() -> tss_esapi::Result<HashcheckTicket> {
    HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
}

/// A salted HMAC session as keyhold's: salted with and bound to the SRK, AES-128-CFB parameter
/// encryption both ways, continueSession.
fn start_salted_session(context: &mut Context, srk: KeyHandle) -> tss_esapi::Result<AuthSession> {
    let session = context
        .execute_without_session(|c| {
            c.start_auth_session(
                Some(srk),
                Some(srk.into()),
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
        })?
        .ok_or(tss_esapi::Error::WrapperError(
            WrapperErrorKind::WrongValueFromTpm,
        ))?;
    let (attributes, mask) = SessionAttributesBuilder::new()
        .with_continue_session(true)
        .with_decrypt(true)
        .with_encrypt(true)
        .build();
    context.tr_sess_set_attributes(session, attributes, mask)?;
    Ok(session)
}

/// Left-pads `value` to `width` bytes, or `None` if it is longer.
fn left_pad(value: &[u8], width: usize) -> Option<Vec<u8>> {
    let pad = width.checked_sub(value.len())?;
    let mut out = vec![0u8; pad];
    out.extend_from_slice(value);
    Some(out)
}

/// r‖s, each left-padded to the field width: the bytes keyhold's `SignatureFormat::Raw` returns.
fn ecdsa_fixed(signature: &Signature) -> Result<Vec<u8>, String> {
    let Signature::EcDsa(sig) = signature else {
        return Err(format!("not an ECDSA signature: {signature:?}"));
    };
    let r = left_pad(sig.signature_r().value(), P256_LEN).ok_or("r longer than 32 bytes")?;
    let s = left_pad(sig.signature_s().value(), P256_LEN).ok_or("s longer than 32 bytes")?;
    Ok([r, s].concat())
}

/// The uncompressed point `04‖x‖y` of an ECC public area.
fn ecc_point(public: &Public) -> Option<Vec<u8>> {
    let Public::Ecc { unique, .. } = public else {
        return None;
    };
    let mut point = vec![0x04];
    point.extend(left_pad(unique.x().value(), P256_LEN)?);
    point.extend(left_pad(unique.y().value(), P256_LEN)?);
    Some(point)
}

/// The raw side's signing key, made once under the SRK: its blobs and its authValue.
struct RawTpmKey {
    public: Public,
    private: Private,
    auth: Vec<u8>,
}

/// How the raw side uses its session and key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RawMode {
    /// One session for every signature; the key loaded once.
    ReusedSession,
    /// A new salted session per signature; the key loaded once.
    SessionPerCommand,
    /// One session; the key loaded and flushed around every signature (keyhold before its LRU).
    LoadPerSignature,
}

impl RawMode {
    const ALL: [RawMode; 3] = [
        RawMode::ReusedSession,
        RawMode::SessionPerCommand,
        RawMode::LoadPerSignature,
    ];

    fn name(self) -> &'static str {
        match self {
            RawMode::ReusedSession => "raw reused-session",
            RawMode::SessionPerCommand => "raw session-per-command",
            RawMode::LoadPerSignature => "raw load-per-signature",
        }
    }

    fn case(self) -> Case {
        match self {
            RawMode::ReusedSession => Case::TpmReused,
            RawMode::SessionPerCommand => Case::TpmPerCommand,
            RawMode::LoadPerSignature => Case::TpmLoadPerSignature,
        }
    }
}

/// One raw tss-esapi connection: the SRK, and (when loaded) the signing key. Dropping it flushes
/// every handle it made and closes the connection (tss-esapi's `Context` does both).
struct RawTpm {
    context: Context,
    srk: KeyHandle,
    /// The reused session, set on the context; `None` in session-per-command mode.
    session: Option<AuthSession>,
    /// The key loaded for the round; `None` in load-per-signature mode.
    key: Option<KeyHandle>,
}

impl RawTpm {
    /// Connects, makes the SRK (password session, as keyhold does) and starts the salted session.
    fn connect(tcti: &TctiNameConf) -> tss_esapi::Result<Self> {
        let mut context = Context::new(tcti.clone())?;
        let srk = context
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
            })?
            .key_handle;
        let session = start_salted_session(&mut context, srk)?;
        context.set_sessions((Some(session), None, None));
        Ok(Self {
            context,
            srk,
            session: Some(session),
            key: None,
        })
    }

    /// Makes a signing key under the SRK with a random 32-byte authValue; nothing stays loaded.
    fn create_key(&mut self) -> BoxResult<RawTpmKey> {
        let auth = random(32)?;
        let created = self.context.create(
            self.srk,
            signing_template()?,
            Some(Auth::try_from(auth.clone())?),
            None,
            None,
            None,
        )?;
        Ok(RawTpmKey {
            public: created.out_public,
            private: created.out_private,
            auth,
        })
    }

    /// Loads `key` under the SRK (through the salted session) and gives ESAPI its authValue.
    fn load(&mut self, key: &RawTpmKey) -> tss_esapi::Result<KeyHandle> {
        let handle = self
            .context
            .load(self.srk, key.private.clone(), key.public.clone())?;
        if let Err(e) = Auth::try_from(key.auth.clone())
            .and_then(|auth| self.context.tr_set_auth(handle.into(), auth))
        {
            // Never leave a key behind: swtpm holds about three objects.
            self.context.flush_context(handle.into())?;
            return Err(e);
        }
        Ok(handle)
    }

    /// Prepares the connection for `mode`: loads the key for the round, or not; keeps the
    /// setup session, or flushes it.
    fn prepare(&mut self, mode: RawMode, key: &RawTpmKey) -> tss_esapi::Result<()> {
        if mode != RawMode::LoadPerSignature {
            self.key = Some(self.load(key)?);
        }
        if mode == RawMode::SessionPerCommand {
            self.context.clear_sessions();
            if let Some(session) = self.session.take() {
                self.context
                    .flush_context(SessionHandle::from(session).into())?;
            }
        }
        Ok(())
    }

    /// SHA-256 of `message`, signed by `key` in `mode`; r‖s out.
    fn sign(&mut self, mode: RawMode, key: &RawTpmKey, message: &[u8]) -> Result<Vec<u8>, String> {
        let d = digest::digest(&digest::SHA256, message);
        let digest = Digest::try_from(d.as_ref()).map_err(|e| e.to_string())?;
        let ticket = null_ticket().map_err(|e| e.to_string())?;
        let loaded = || "the key is not loaded".to_owned();
        let signature = match mode {
            RawMode::ReusedSession => {
                let handle = self.key.ok_or_else(loaded)?;
                self.context
                    .sign(handle, digest, SignatureScheme::Null, ticket)
            }
            RawMode::SessionPerCommand => {
                let handle = self.key.ok_or_else(loaded)?;
                let session = start_salted_session(&mut self.context, self.srk)
                    .map_err(|e| format!("TPM2_StartAuthSession: {e}"))?;
                let signature = self.context.execute_with_session(Some(session), |c| {
                    c.sign(handle, digest, SignatureScheme::Null, ticket)
                });
                // Flushed whether or not the signature was made: swtpm holds few sessions.
                self.context
                    .flush_context(SessionHandle::from(session).into())
                    .map_err(|e| format!("TPM2_FlushContext (session): {e}"))?;
                signature
            }
            RawMode::LoadPerSignature => {
                let handle = self.load(key).map_err(|e| format!("TPM2_Load: {e}"))?;
                let signature = self
                    .context
                    .sign(handle, digest, SignatureScheme::Null, ticket);
                self.context
                    .flush_context(handle.into())
                    .map_err(|e| format!("TPM2_FlushContext (key): {e}"))?;
                signature
            }
        };
        ecdsa_fixed(&signature.map_err(|e| format!("TPM2_Sign: {e}"))?)
    }
}

// ---------------------------------------------------------------------------------------------
// Timing

/// What one timed run gave.
struct Round {
    /// Successful operations / wall time.
    rate: f64,
    failed: u64,
    first_error: Option<String>,
}

impl Round {
    /// A round whose setup (connection, key load, keystore open) failed: nothing was timed.
    fn setup_failed(error: String) -> Self {
        Self {
            rate: 0.0,
            failed: 1,
            first_error: Some(format!("round setup: {error}")),
        }
    }
}

/// One untimed call of `op`, then calls for `duration`.
fn timed(duration: Duration, op: &mut dyn FnMut() -> OpResult) -> Round {
    let (mut ops, mut failed, mut first_error) = (0u64, 0u64, None);
    let mut record = |result: OpResult, ops: &mut u64| match result {
        Ok(()) => *ops += 1,
        Err(e) => {
            failed += 1;
            first_error.get_or_insert(e);
        }
    };
    let mut untimed = 0;
    record(op(), &mut untimed);
    let start = Instant::now();
    let deadline = start + duration;
    let end = loop {
        record(op(), &mut ops);
        let now = Instant::now();
        if now >= deadline {
            break now;
        }
    };
    Round {
        rate: ops as f64 / end.duration_since(start).as_secs_f64(),
        failed,
        first_error,
    }
}

/// Failed operations and checks, for the report.
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    fn note(&mut self, what: &str, round: Round) -> f64 {
        if round.failed > 0 {
            self.0.push(format!(
                "{what}: {} operations failed, first: {}",
                round.failed,
                round.first_error.unwrap_or_default()
            ));
        }
        round.rate
    }
}

/// Rounds of every side in `sides`: one warm-up round each, then `ROUNDS` rounds, the order of the
/// sides reversed every other round. Returns each side's rates, in the order of `sides`.
fn alternate<S: Copy>(
    sides: &[S],
    warmup: Duration,
    round: Duration,
    mut run: impl FnMut(S, Duration, &str) -> f64,
) -> Vec<Vec<f64>> {
    for &side in sides {
        run(side, warmup, "warm-up");
    }
    let mut rates = vec![Vec::new(); sides.len()];
    for r in 0..ROUNDS {
        let what = format!("round {}", r + 1);
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            rates[i].push(run(sides[i], round, &what));
        }
    }
    rates
}

fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.round()).collect()
}

// ---------------------------------------------------------------------------------------------
// TPM rounds

/// What a TPM round needs; every round connects on its own and disconnects at its end.
struct TpmEnv<'a> {
    tcti: TctiNameConf,
    raw_key: RawTpmKey,
    dir: &'a Path,
    sealer: &'a PassphraseSealer,
    config: &'a Config,
    kh_id: &'a str,
    msg32: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TpmSide {
    Keyhold,
    Raw(RawMode),
}

impl TpmSide {
    fn name(self) -> &'static str {
        match self {
            TpmSide::Keyhold => "keyhold",
            TpmSide::Raw(mode) => mode.name(),
        }
    }
}

/// A raw connection prepared for `mode`.
fn raw_connect(env: &TpmEnv<'_>, mode: RawMode) -> tss_esapi::Result<RawTpm> {
    let mut tpm = RawTpm::connect(&env.tcti)?;
    tpm.prepare(mode, &env.raw_key)?;
    Ok(tpm)
}

fn tpm_round(side: TpmSide, env: &TpmEnv<'_>, d: Duration) -> Round {
    let result = match side {
        TpmSide::Raw(mode) => raw_connect(env, mode)
            .map_err(|e| e.to_string())
            .map(|mut tpm| {
                timed(d, &mut || tpm.sign(mode, &env.raw_key, env.msg32).map(drop))
                // `tpm` is dropped here: key, session and SRK flushed, the connection closed.
            }),
        TpmSide::Keyhold => Keystore::open_with(env.dir, env.sealer, env.config)
            .map_err(|e| describe(&e))
            .map(|ks| {
                timed(d, &mut || {
                    ks.sign(env.kh_id, env.msg32, SignatureFormat::Raw)
                        .map(drop)
                        .map_err(|e| describe(&e))
                })
                // `ks` is dropped here, and with it keyhold's TPM connection.
            }),
    };
    result.unwrap_or_else(Round::setup_failed)
}

// ---------------------------------------------------------------------------------------------
// Software rounds

/// The raw aws-lc-rs side's keys.
struct SwRaw {
    aes: RandomizedNonceKey,
    ec: EcdsaKeyPair,
    rng: rand::SystemRandom,
}

#[derive(Clone, Copy, Debug)]
enum SwSide {
    Raw,
    Keyhold,
}

struct SwKeyhold {
    aes: String,
    ec: String,
}

fn raw_aes_encrypt(raw: &SwRaw, aad: &[u8], data: &[u8]) -> Result<(Nonce, Vec<u8>), String> {
    // keyhold leaves the caller's input alone and returns a new buffer: so does this.
    let mut buf = Vec::with_capacity(data.len() + AES_256_GCM.tag_len());
    buf.extend_from_slice(data);
    let nonce = raw
        .aes
        .seal_in_place_append_tag(Aad::from(aad), &mut buf)
        .map_err(|_| "AES-GCM seal".to_owned())?;
    Ok((nonce, buf))
}

fn sw_raw_op(case: Case, raw: &SwRaw, inputs: &Inputs) -> OpResult {
    match case {
        Case::SwAes1m => raw_aes_encrypt(raw, &inputs.raw_aad, &inputs.data1m).map(drop),
        Case::SwSign1kDer | Case::SwSign1kDerCached => raw
            .ec
            .sign(&raw.rng, &inputs.msg1k)
            .map(drop)
            .map_err(|_| "ECDSA sign".to_owned()),
        Case::TpmReused | Case::TpmPerCommand | Case::TpmLoadPerSignature => {
            Err("not a software case".into())
        }
    }
}

fn sw_kh_op(case: Case, ks: &Keystore, keys: &SwKeyhold, inputs: &Inputs) -> OpResult {
    let result = match case {
        Case::SwAes1m => ks.encrypt(&keys.aes, &inputs.data1m, USER_AAD).map(drop),
        Case::SwSign1kDer | Case::SwSign1kDerCached => ks
            .sign(&keys.ec, &inputs.msg1k, SignatureFormat::Der)
            .map(drop),
        Case::TpmReused | Case::TpmPerCommand | Case::TpmLoadPerSignature => {
            return Err("not a software case".into())
        }
    };
    result.map_err(|e| describe(&e))
}

// ---------------------------------------------------------------------------------------------
// Sanity checks (before timing; a failure is reported, not fatal)

fn check(checks: &mut Vec<(String, Result<(), String>)>, name: &str, result: BoxResult<()>) {
    checks.push((name.to_owned(), result.map_err(|e| e.to_string())));
}

/// A keyhold signature verifies under the recorded public key, with keyhold and with aws-lc-rs.
fn check_kh_signature(
    ks: &Keystore,
    id: &str,
    msg: &[u8],
    format: SignatureFormat,
) -> BoxResult<()> {
    let sig = ks.sign(id, msg, format)?;
    let public = ks.public_key(id)?;
    public.verify(msg, &sig, format)?;
    let alg = match format {
        SignatureFormat::Raw => &signature::ECDSA_P256_SHA256_FIXED,
        SignatureFormat::Der => &signature::ECDSA_P256_SHA256_ASN1,
    };
    signature::UnparsedPublicKey::new(alg, public.spki_der())
        .verify(msg, &sig)
        .map_err(|_| "aws-lc-rs rejects keyhold's signature".into())
}

/// A raw TPM signature verifies under the point in the key's public area.
fn check_raw_tpm(env: &TpmEnv<'_>, mode: RawMode) -> BoxResult<()> {
    let mut tpm = raw_connect(env, mode)?;
    let sig = tpm.sign(mode, &env.raw_key, env.msg32)?;
    let point = ecc_point(&env.raw_key.public).ok_or("the raw key's public area has no point")?;
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(env.msg32, &sig)
        .map_err(|_| "the raw TPM signature does not verify".into())
}

fn check_kh_aes(ks: &Keystore, id: &str, inputs: &Inputs) -> BoxResult<()> {
    let env = ks.encrypt(id, &inputs.data1m, USER_AAD)?;
    if env.len() != inputs.data1m.len() + ENVELOPE_OVERHEAD {
        return Err(format!(
            "envelope of {} bytes for {} bytes: keyhold's envelope format changed, check \
             ENVELOPE_HEADER_LEN",
            env.len(),
            inputs.data1m.len()
        )
        .into());
    }
    if ks.decrypt(id, &env, USER_AAD)?.expose() != inputs.data1m.as_slice() {
        return Err("keyhold AES-GCM round trip gives other bytes".into());
    }
    Ok(())
}

fn check_raw_aes(raw: &SwRaw, inputs: &Inputs) -> BoxResult<()> {
    let (nonce, mut ct) = raw_aes_encrypt(raw, &inputs.raw_aad, &inputs.data1m)?;
    let pt = raw
        .aes
        .open_in_place(nonce, Aad::from(inputs.raw_aad.as_slice()), &mut ct)
        .map_err(|_| "raw AES-GCM does not open")?;
    if pt != inputs.data1m.as_slice() {
        return Err("raw AES-GCM round trip gives other bytes".into());
    }
    Ok(())
}

fn check_raw_ecdsa(raw: &SwRaw, inputs: &Inputs) -> BoxResult<()> {
    let sig = raw
        .ec
        .sign(&raw.rng, &inputs.msg1k)
        .map_err(|_| "raw ECDSA sign")?;
    signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        raw.ec.public_key().as_ref(),
    )
    .verify(&inputs.msg1k, sig.as_ref())
    .map_err(|_| "the raw ECDSA signature does not verify".into())
}

// ---------------------------------------------------------------------------------------------
// openssl speed

/// Runs `openssl speed -seconds 2 ARGS` and returns its stdout.
fn openssl_speed(args: &[&str]) -> Result<String, String> {
    let out = Command::new("openssl")
        .arg("speed")
        .args(["-seconds", OPENSSL_SECS])
        .args(args)
        .output()
        .map_err(|e| format!("could not run openssl ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "`openssl speed {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Bytes/s from the `AES-256-GCM  12345.67k` row (openssl counts in 1000s of bytes).
fn parse_aes(stdout: &str) -> Option<f64> {
    let row = stdout.lines().find(|l| l.starts_with("AES-256-GCM"))?;
    let kilobytes: f64 = row
        .split_whitespace()
        .last()?
        .strip_suffix('k')?
        .parse()
        .ok()?;
    Some(kilobytes * 1000.0)
}

/// Signatures/s from the ` 256 bits ecdsa (nistp256)  sign verify sign/s verify/s` row.
fn parse_ecdsa_sign(stdout: &str) -> Option<f64> {
    let row = stdout.lines().find(|l| l.contains("ecdsa (nistp256)"))?;
    let fields: Vec<&str> = row.split_whitespace().collect();
    fields.get(fields.len().checked_sub(2)?)?.parse().ok()
}

/// Prints keyhold's figure beside openssl's (`parse` reads it from openssl's stdout), or why
/// there is none.
fn reference(
    name: &str,
    kh: f64,
    args: &[&str],
    parse: fn(&str) -> Option<f64>,
    errors: &mut Errors,
) {
    let figure = openssl_speed(args).and_then(|out| {
        parse(&out).ok_or_else(|| format!("no figure in its output: {}", out.trim()))
    });
    match figure {
        Ok(openssl) => println!("{name} {kh:.0} {openssl:.0} {:.2}", kh / openssl),
        Err(e) => {
            println!("{name}: openssl speed failed: {e}");
            errors.0.push(format!("{name}: {e}"));
        }
    }
}

/// keyhold's AES-256-GCM MB/s and software signatures/s beside `openssl speed`'s, when measured.
fn openssl_reference(aes_kh: Option<f64>, sign_kh: Option<f64>, errors: &mut Errors) {
    if aes_kh.is_none() && sign_kh.is_none() {
        return;
    }
    println!();
    let version = match Command::new("openssl").arg("version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(e) => {
            println!("reference: openssl not found ({e}): no external reference");
            return;
        }
    };
    println!(
        "reference: openssl speed -seconds {OPENSSL_SECS} ({version}), not a target: name \
         keyhold openssl ratio"
    );
    if let Some(kh) = aes_kh {
        for (name, bytes) in [
            ("ref-aes256gcm-MB_per_s/keyhold-1m-vs-openssl-16k", "16384"),
            ("ref-aes256gcm-MB_per_s/keyhold-1m-vs-openssl-1m", "1048576"),
        ] {
            let args = ["-evp", "aes-256-gcm", "-bytes", bytes];
            let mb_per_s = |out: &str| parse_aes(out).map(|b| b / 1e6);
            reference(name, kh, &args, mb_per_s, errors);
        }
    }
    if let Some(kh) = sign_kh {
        let name = "ref-ecdsa-p256-sign_per_s/keyhold-1k-der-vs-openssl";
        reference(name, kh, &["ecdsap256"], parse_ecdsa_sign, errors);
    }
}

// ---------------------------------------------------------------------------------------------
// Setup and report

fn selected_cases() -> Vec<Case> {
    match std::env::var("KEYHOLD_BENCH_CASES") {
        Ok(filter) if !filter.trim().is_empty() => Case::ALL
            .into_iter()
            .filter(|c| filter.split(',').any(|f| c.name().contains(f.trim())))
            .collect(),
        _ => Case::ALL.to_vec(),
    }
}

fn request(name: &str, key_type: KeyType, backend: Option<&str>) -> BoxResult<KeyRequest> {
    Ok(KeyRequest {
        namespace: "bench".into(),
        name: name.into(),
        spec: KeySpec::new(key_type, None, None)?,
        backend: backend.map(Into::into),
    })
}

fn mb_per_s(ops_per_s: f64, bytes: usize) -> f64 {
    ops_per_s * bytes as f64 / 1e6
}

fn main() -> BoxResult<()> {
    let started = Instant::now();
    let (secs, round, warmup) = round_and_warmup()?;
    let cases = selected_cases();
    let selected = |c: Case| cases.contains(&c);
    let mut errors = Errors::default();
    let mut checks = Vec::new();
    let inputs = Inputs::new()?;

    // One TPM; one keystore with its TPM key and its software keys.
    let swtpm = Swtpm::new()?;
    let config = swtpm.config(BACKEND);
    let dir = tempfile::tempdir()?;
    let sealer = PassphraseSealer::new(SecretString::from("keyhold bench passphrase".to_owned()))
        .with_params(Argon2Params {
        memory_mib: 19,
        iterations: 2,
        parallelism: 1,
    })?;
    let (kh_tpm, kh_sw) = {
        let ks = Keystore::create_with(dir.path(), &sealer, &config)?;
        let tpm = ks
            .create_key(&request("tpm-ec", KeyType::EcdsaP256, Some(BACKEND))?)?
            .id;
        let sw = SwKeyhold {
            aes: ks
                .create_key(&request("sw-aes", KeyType::Aes256Gcm, None)?)?
                .id,
            ec: ks
                .create_key(&request("sw-ec", KeyType::EcdsaP256, None)?)?
                .id,
        };
        let raw = SignatureFormat::Raw;
        let der = SignatureFormat::Der;
        check(
            &mut checks,
            "keyhold TPM signature verifies",
            check_kh_signature(&ks, &tpm, &inputs.msg32, raw),
        );
        check(
            &mut checks,
            "keyhold software signature (DER) verifies",
            check_kh_signature(&ks, &sw.ec, &inputs.msg1k, der),
        );
        check(
            &mut checks,
            "keyhold AES-GCM round trip, envelope length",
            check_kh_aes(&ks, &sw.aes, &inputs),
        );
        (tpm, sw)
        // `ks` is dropped here: the raw side may connect to the TPM now.
    };

    // The raw side's TPM key, made over its own connection.
    let raw_key = {
        let mut tpm = RawTpm::connect(&TctiNameConf::from_str(&swtpm.tcti())?)?;
        tpm.create_key()?
    };
    let env = TpmEnv {
        tcti: TctiNameConf::from_str(&swtpm.tcti())?,
        raw_key,
        dir: dir.path(),
        sealer: &sealer,
        config: &config,
        kh_id: &kh_tpm,
        msg32: &inputs.msg32,
    };
    for mode in RawMode::ALL {
        check(
            &mut checks,
            &format!("{} TPM signature verifies", mode.name()),
            check_raw_tpm(&env, mode),
        );
    }

    let sw_raw = SwRaw {
        aes: RandomizedNonceKey::new(&AES_256_GCM, &random(32)?).map_err(|_| "AES key")?,
        // Loaded once from PKCS#8 v1, as a program that stores its key would (and as keyhold
        // stores software keys): a key parsed from PKCS#8 signs about 7% slower in aws-lc than
        // the freshly generated one (measured here: 38.1k/s against 41.6k/s).
        ec: {
            let fresh = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_ASN1_SIGNING)
                .map_err(|_| "ECDSA key")?;
            let pkcs8 = fresh.to_pkcs8v1().map_err(|_| "ECDSA key to PKCS#8")?;
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
                .map_err(|_| "ECDSA key from PKCS#8")?
        },
        rng: rand::SystemRandom::new(),
    };
    check(
        &mut checks,
        "raw AES-GCM round trip",
        check_raw_aes(&sw_raw, &inputs),
    );
    check(
        &mut checks,
        "raw software signature (DER) verifies",
        check_raw_ecdsa(&sw_raw, &inputs),
    );

    println!(
        "# keyhold TPM bench: swtpm `{}` (fixture, state in {}), {} CPUs, load average {}; {secs} s \
         per side per case ({ROUNDS} alternating rounds of {:.2} s, median; warm-up {:.2} s); \
         single-threaded",
        swtpm.tcti(),
        std::env::temp_dir().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg(),
        round.as_secs_f64(),
        warmup.as_secs_f64()
    );
    for (name, result) in &checks {
        match result {
            Ok(()) => println!("# sanity: {name}: ok"),
            Err(e) => {
                println!("# sanity: {name}: FAILED: {e}");
                errors.0.push(format!("sanity check `{name}`: {e}"));
            }
        }
    }
    println!("name keyhold_ops_per_s raw_ops_per_s ratio");
    let mut results: Vec<(Case, f64, f64)> = Vec::new();

    // TPM: only one side's connection exists at a time (see the module documentation).
    let mut tpm_sides: Vec<TpmSide> = RawMode::ALL
        .into_iter()
        .filter(|m| selected(m.case()))
        .map(TpmSide::Raw)
        .collect();
    if !tpm_sides.is_empty() {
        // Last, so that the raw sides go first in round 1, as in the PKCS#11 bench.
        tpm_sides.push(TpmSide::Keyhold);
        let rates = alternate(&tpm_sides, warmup, round, |side, d, what| {
            let r = tpm_round(side, &env, d);
            errors.note(&format!("tpm {} {what}", side.name()), r)
        });
        let medians: Vec<f64> = rates.iter().map(|r| median(r.clone())).collect();
        let rate_of = |side: TpmSide| {
            tpm_sides
                .iter()
                .position(|&s| s == side)
                .map(|i| medians[i])
        };
        for (side, r) in tpm_sides.iter().zip(&rates) {
            eprintln!("#   tpm {} rounds: {:?}", side.name(), rounded(r));
        }
        let kh = rate_of(TpmSide::Keyhold).unwrap_or(f64::NAN);
        for mode in RawMode::ALL {
            if let Some(raw) = rate_of(TpmSide::Raw(mode)) {
                let case = mode.case();
                println!("{} {kh:.0} {raw:.0} {:.2}", case.name(), kh / raw);
                results.push((case, kh, raw));
            }
        }
    }

    // Software backend: keyhold's keystore stays open (its TPM connection is idle).
    let sw_cases: Vec<Case> = [Case::SwAes1m, Case::SwSign1kDer, Case::SwSign1kDerCached]
        .into_iter()
        .filter(|&c| selected(c))
        .collect();
    if !sw_cases.is_empty() {
        let plain = Keystore::open_with(dir.path(), &sealer, &config)?;
        let mut cached_config = config.clone();
        cached_config.software.key_cache_secs = 60;
        let cached = Keystore::open_with(dir.path(), &sealer, &cached_config)?;
        for &case in &sw_cases {
            let ks = if case == Case::SwSign1kDerCached {
                &cached
            } else {
                &plain
            };
            let sides = [SwSide::Raw, SwSide::Keyhold];
            let rates = alternate(&sides, warmup, round, |side, d, what| {
                let (name, r) = match side {
                    SwSide::Raw => ("raw", timed(d, &mut || sw_raw_op(case, &sw_raw, &inputs))),
                    SwSide::Keyhold => (
                        "keyhold",
                        timed(d, &mut || sw_kh_op(case, ks, &kh_sw, &inputs)),
                    ),
                };
                errors.note(&format!("{} {name} {what}", case.name()), r)
            });
            eprintln!(
                "#   {} rounds: raw {:?} keyhold {:?}",
                case.name(),
                rounded(&rates[0]),
                rounded(&rates[1])
            );
            let (raw, kh) = (median(rates[0].clone()), median(rates[1].clone()));
            println!("{} {kh:.0} {raw:.0} {:.2}", case.name(), kh / raw);
            results.push((case, kh, raw));
        }
    }
    let result_of = |case: Case| results.iter().find(|r| r.0 == case).map(|r| (r.1, r.2));
    if let Some((kh, raw)) = result_of(Case::SwAes1m) {
        println!();
        println!("throughput_MB_per_s (10^6 bytes) keyhold raw");
        println!(
            "{} {:.0} {:.0}",
            Case::SwAes1m.name(),
            mb_per_s(kh, AES_LEN),
            mb_per_s(raw, AES_LEN)
        );
    }

    // openssl speed, after everything else: it must not share the CPUs with a timed loop.
    openssl_reference(
        result_of(Case::SwAes1m).map(|r| mb_per_s(r.0, AES_LEN)),
        result_of(Case::SwSign1kDer).map(|r| r.0),
        &mut errors,
    );

    println!();
    println!("targets (keyhold/raw):");
    for &(case, kh, raw) in &results {
        let ratio = kh / raw;
        match case.target() {
            Some(target) if ratio >= target => {
                println!("  {} >= {target}: met ({ratio:.2})", case.name());
            }
            Some(target) => println!("  {} >= {target}: MISSED ({ratio:.2})", case.name()),
            None => println!("  {}: no target ({ratio:.2})", case.name()),
        }
    }
    if errors.0.is_empty() {
        println!("errors: none");
    } else {
        println!(
            "errors: {} (rates count successful operations only):",
            errors.0.len()
        );
        for e in &errors.0 {
            println!("  {e}");
        }
    }
    println!(
        "notes: tpm: raw signs SHA-256(msg) computed in the loop, keyhold signs the 32-byte msg \
         (hashing it); keyhold keeps its key loaded (LRU) and uses one reused session; \
         session-per-command = StartAuthSession (salted, bound) + SetAttributes + Sign + \
         FlushContext per signature, key kept loaded; load-per-signature = Load + SetAuth + Sign + \
         FlushContext(key) per signature on one session; each TPM round \
         has its own connection (swtpm serves one client at a time); sw aes: raw AAD as long as keyhold's 25-byte header + \
         caller AAD, raw copies the input into a new buffer as keyhold does; openssl ecdsap256 \
         signs 20 bytes with no hashing or DER"
    );
    eprintln!(
        "# load average at the end: {}; took {:.0} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
