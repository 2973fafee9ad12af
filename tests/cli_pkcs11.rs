//! The command line with a PKCS#11 backend: the real binary against a real SoftHSM2 token.
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::testing::SoftHsm;
use keyhold::Algorithm;
use support::env::*;
use support::{attributes, field, openssl_verifies};

/// A fresh SoftHSM2 token, and a store configured with it as backend `hsm` (PIN from
/// `KH_TEST_PIN`). The token lives as long as the returned `SoftHsm`.
fn setup() -> (SoftHsm, Env) {
    let hsm = SoftHsm::new().unwrap();
    let env = Env::on_softhsm(&hsm);
    (hsm, env)
}

/// `setup` with an initialised passphrase store.
fn setup_init() -> (SoftHsm, Env) {
    let (hsm, env) = setup();
    env.init_store();
    (hsm, env)
}

/// Signs `message` with `id` (DER) and asks openssl to verify it with the key's public PEM.
fn openssl_verifies_signature(env: &Env, id: &str) {
    let msg = env.write("msg", b"signed inside the token");
    let sig_path = env.path_str("sig");
    env.ok_text(&["sign", "--key", id, "--in", &msg, "--out", &sig_path]);
    let sig = std::fs::read(&sig_path).unwrap();
    let pem = env.pubkey_pem(id);
    let alg = Algorithm::EcdsaP256Sha256;
    assert!(
        openssl_verifies(&pem, alg, b"signed inside the token", &sig),
        "openssl rejected the token's signature"
    );
    assert!(!openssl_verifies(&pem, alg, b"something else", &sig));
}

#[test]
fn a_token_key_signs_and_openssl_dgst_verifies() {
    let (_hsm, env) = setup_init();
    let id = env.ok_text(&[
        "key",
        "create",
        "web",
        "--type",
        "ecdsa-p256",
        "--backend",
        "hsm",
    ]);
    let id = id.trim_end();
    let show = env.ok_text(&["key", "show", "--key", id]);
    assert_eq!(field(&show, "backend"), "hsm");
    assert_eq!(
        attributes(&show),
        "always_sensitive=true, copyable=false, destroyable=true, extractable=false, local=true, \
         modifiable=false, never_extractable=true, private=true, public_usages=verify, \
         sensitive=true, usages=sign"
    );
    openssl_verifies_signature(&env, id);
}

#[test]
fn an_extractable_key_is_recorded_as_such() {
    let (_hsm, env) = setup_init();
    let id = env.ok_text(&[
        "key",
        "create",
        "wrap-me",
        "--type",
        "aes-256-gcm",
        "--backend",
        "hsm",
        "--extractable",
    ]);
    let show = env.ok_text(&["key", "show", "--key", id.trim_end()]);
    assert_eq!(
        attributes(&show),
        "always_sensitive=true, copyable=false, destroyable=true, extractable=true, local=true, \
         modifiable=false, never_extractable=false, private=true, sensitive=true, \
         usages=encrypt+decrypt, wrap_with_trusted=true"
    );
}

#[test]
fn what_the_token_cannot_do_is_refused_with_the_reason() {
    let (hsm, env) = setup_init();
    let before = env.snapshot();
    let out = env.run(
        &[
            "key",
            "create",
            "dec",
            "--type",
            "rsa-2048",
            "--purpose",
            "decrypt",
            "--backend",
            "hsm",
        ],
        b"",
    );
    assert_fail(&out, 1, "OAEP", "an RSA decrypt key on SoftHSM");
    assert!(stderr(&out).contains(hsm.label()), "{}", show(&out));
    env.assert_unchanged(&before, "a refused key must change nothing");
}

#[test]
fn a_wrong_pin_is_exit_7_and_changes_nothing() {
    let (_hsm, env) = setup_init();
    env.create_key("k", "ed25519", &["--backend", "hsm"]);
    let before = env.snapshot();
    let stderr = env.refused(
        &[("KH_TEST_PIN", "0000")],
        &[
            "key",
            "create",
            "k2",
            "--type",
            "ed25519",
            "--backend",
            "hsm",
        ],
        7,
    );
    assert!(stderr.contains("wrong user PIN"), "{stderr}");
    assert!(
        !stderr.contains("0000"),
        "the PIN must not be echoed: {stderr}"
    );
    env.assert_unchanged(&before, "a refused login");
}

#[test]
fn a_store_sealed_by_the_token_opens_only_with_it() {
    let (_hsm, env) = setup();
    let out = env.ok_text(&["init", "--sealer", "pkcs11", "--backend", "hsm"]);
    assert!(out.contains("sealer pkcs11"), "{out}");
    // keyhold opens a store only with the sealer the user states.
    env.set_config(&format!(
        "{}\n[store]\nsealer = \"pkcs11\"\n",
        env.config_text()
    ));
    let id = env.create_key("sw", "hmac-sha256", &[]);
    let show = env.ok_text(&["key", "show", "--key", &id]);
    assert_eq!(field(&show, "backend"), "software (sealed by pkcs11)");
    let data = env.write("data", b"data");
    let tag = env.ok(&["mac", "--key", &id, "--in", &data], b"", "mac");
    assert_eq!(tag.len(), 32, "an HMAC-SHA256 tag");
    // Without the backend's configuration the store cannot be unsealed, and says why.
    let mut cmd = env.bare_command();
    cmd.arg("--store")
        .arg(&env.store)
        .args(["key", "list"])
        .env("KEYHOLD_SEALER", "pkcs11");
    let out = env.run_cmd(cmd, None);
    assert_fail(
        &out,
        1,
        "sealed by the PKCS#11 backend `hsm`",
        "no --config",
    );
    // With the wrong PIN: one refused login, exit 7.
    let stderr = env.refused(&[("KH_TEST_PIN", "0000")], &["key", "list"], 7);
    assert!(
        stderr.contains("cannot log in to backend `hsm`: wrong user PIN"),
        "{stderr}"
    );
}

#[test]
fn doctor_shows_the_token_and_no_orphans() {
    let (hsm, env) = setup_init();
    env.create_key("k", "ecdsa-p384", &["--backend", "hsm"]);
    let report = env.ok_text(&["doctor"]);
    assert!(
        report.contains(&format!("token: `{}`", hsm.label())),
        "{report}"
    );
    assert!(report.contains("user PIN: initialised"), "{report}");
    // SoftHSM's RSA-OAEP is SHA-1 only, which no mechanism flag tells: doctor says so.
    assert!(
        report.contains("RSA-OAEP with SHA-256: not known until an RSA decrypt key is made"),
        "{report}"
    );
    // …and does not promise RSA decryption: it is listed apart, as not known until tried.
    let types = report
        .lines()
        .find(|l| l.trim_start().starts_with("key types:") && !l.contains("rsa-2048/decrypt"));
    assert!(types.is_some(), "{report}");
    assert!(
        report.contains("not known until tried: rsa-2048/decrypt (RSA-OAEP with SHA-256: "),
        "{report}"
    );
    assert!(report.contains("orphaned objects: 0"), "{report}");
    assert!(report.contains("missing objects: 0"), "{report}");
    let value = parse_json(
        &env.ok(&["--json", "doctor"], b"", "doctor --json"),
        "doctor --json",
    );
    assert_eq!(value["orphans"], serde_json::json!([]), "{value}");
}

#[test]
fn an_absent_token_is_exit_7_naming_the_tokens_present() {
    let (hsm, env) = setup_init();
    env.set_config(&env.config_text().replace(hsm.label(), "no-such-token"));
    let stderr = env.refused(
        &[],
        &[
            "key",
            "create",
            "k",
            "--type",
            "ed25519",
            "--backend",
            "hsm",
        ],
        7,
    );
    assert!(
        stderr.contains("no token labelled `no-such-token`"),
        "{stderr}"
    );
    assert!(stderr.contains(hsm.label()), "{stderr}");
    // Software keys still work with the token gone.
    env.create_key("sw", "ed25519", &[]);
}

/// Eight `keyhold sign` processes at once, each opening the token, logging in and unsealing a
/// pkcs11-sealed store: every one succeeds. SoftHSM2 rewrites its token file on every login and
/// another process reading it meanwhile finds no token (SoftHSMv2 issue #757); keyhold serialises
/// its processes' token opening and login per module, so none of them sees that.
#[test]
fn concurrent_processes_on_one_token_all_succeed() {
    const PROCESSES: usize = 8;
    const RUNS: usize = 12;
    let (_hsm, env) = setup();
    let env = env.local_only("each process opens the token itself");
    env.ok_text(&["init", "--sealer", "pkcs11", "--backend", "hsm"]);
    env.set_config(&format!(
        "{}\n[store]\nsealer = \"pkcs11\"\n",
        env.config_text()
    ));
    let id = env.create_key("web", "ecdsa-p256", &["--backend", "hsm"]);
    let msg = env.write("msg", b"signed by many processes");
    let batches: Vec<Vec<std::process::Command>> = (0..PROCESSES)
        .map(|_| {
            (0..RUNS)
                .map(|_| env.command(&["sign", "--key", &id, "--in", &msg, "--encoding", "base64"]))
                .collect()
        })
        .collect();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = batches
            .into_iter()
            .map(|batch| {
                scope.spawn(move || {
                    batch
                        .into_iter()
                        .filter_map(|mut cmd| {
                            let out = cmd.output().unwrap();
                            (!out.status.success()).then(|| {
                                format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr))
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} runs failed, the first: {}",
        failures.len(),
        PROCESSES * RUNS,
        failures[0]
    );
}
