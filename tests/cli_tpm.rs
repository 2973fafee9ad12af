//! The command line with a TPM: the real binary against a real swtpm, sealing the store in the
//! TPM, making keys in it, falling back to software, and re-sealing after a PCR change.
#![cfg(feature = "tpm")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use keyhold::backend::tpm::device::DeviceSettings;
use keyhold::testing::Swtpm;
use keyhold::Algorithm;
use support::env::*;
use support::{field, openssl_verifies};

/// The recovery passphrase of PCR-bound stores (read like a store passphrase).
const RECOVERY: &str = "cli tpm recovery passphrase";

/// `KEYHOLD_PASSPHRASE` set to [`RECOVERY`].
const WITH_RECOVERY: &[(&str, &str)] = &[("KEYHOLD_PASSPHRASE", RECOVERY)];

/// The configuration's TPM backend, with the store's sealer stated as `tpm`.
fn config(tpm: &Swtpm) -> String {
    format!(
        "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\nfallback = \"software\"\n\n\
         [store]\nsealer = \"tpm\"\n",
        tpm.tcti()
    )
}

/// A fresh swtpm and an Env configured with it as backend `tpm` (the sealer stated as `tpm`),
/// no passphrase unless a command is given one, and tpm2-tss's own logging off. The TPM lives as
/// long as the returned `Swtpm`.
fn setup() -> (Swtpm, Env) {
    let tpm = Swtpm::new().unwrap();
    let env = Env::new()
        .with_config(&config(&tpm))
        .without_passphrase()
        .with_secret(RECOVERY)
        .with_var("TSS2_LOG", "all+none");
    (tpm, env)
}

/// `key create NAME --backend tpm ARGS…`; returns the ID.
fn create(env: &Env, name: &str, args: &[&str]) -> String {
    let mut all = vec!["key", "create", name, "--backend", "tpm"];
    all.extend_from_slice(args);
    parse_id_line(env.ok_text(&all).as_bytes(), name)
}

/// Encrypts a message to `key` with `aad`, decrypts it, checks it comes back, and returns the
/// envelope's path.
fn round_trip(env: &Env, key: &str, aad: &str) -> String {
    let plain = env.write("plain", b"encrypted under a TPM-sealed store");
    let (envelope, back) = (env.path_str("env"), env.path_str("back"));
    for (op, from, to) in [
        ("encrypt", &plain, &envelope),
        ("decrypt", &envelope, &back),
    ] {
        env.ok_text(&[op, "--key", key, "--aad", aad, "--in", from, "--out", to]);
    }
    assert_eq!(
        std::fs::read(&back).unwrap(),
        b"encrypted under a TPM-sealed store"
    );
    envelope
}

/// Extends PCR `pcr` between keyhold runs (swtpm serves one connection at a time). Not 16: that
/// one anybody can reset, and keyhold refuses to bind to it.
fn extend_pcr(tpm: &Swtpm, pcr: u8, data: &[u8]) {
    keyhold::backend::tpm::device(&tpm.tcti(), DeviceSettings::default())
        .unwrap()
        .extend_pcr(pcr, data)
        .unwrap();
}

/// `init` sealed to PCR 8 with the recovery passphrase [`RECOVERY`].
fn init_pcr_bound(env: &Env) {
    env.ok_vars(
        WITH_RECOVERY,
        &[
            "init",
            "--sealer",
            "tpm",
            "--pcrs",
            "8",
            "--argon2-memory-mib",
            "19",
            "--argon2-iterations",
            "2",
        ],
    );
}

/// The configuration without the `[store]` statement of the sealer.
fn unstate_sealer(env: &Env) {
    let text = env.config_text();
    let (backends, _) = text.split_once("[store]").unwrap();
    env.set_config(backends);
}

#[test]
fn a_tpm_sealed_store_with_a_tpm_key_and_a_software_fallback() {
    let (_tpm, env) = setup();
    let out = env.ok_text(&["init", "--sealer", "tpm"]);
    assert!(out.contains("sealer tpm"), "{out}");

    // A key made in the TPM: signed there, verified by openssl.
    let ec = create(&env, "web", &["--type", "ecdsa-p256"]);
    let shown = env.ok_text(&["key", "show", "--key", &ec]);
    assert_eq!(field(&shown, "backend"), "tpm");
    assert!(
        support::attributes(&shown).contains("never_extractable=true"),
        "{shown}"
    );
    let msg = env.write("msg", b"signed inside the TPM");
    let sig_path = env.path_str("sig");
    env.ok_text(&["sign", "--key", &ec, "--in", &msg, "--out", &sig_path]);
    let sig = std::fs::read(&sig_path).unwrap();
    let pem = env.pubkey_pem(&ec);
    let alg = Algorithm::EcdsaP256Sha256;
    assert!(
        openssl_verifies(&pem, alg, b"signed inside the TPM", &sig),
        "openssl rejected it"
    );
    assert!(!openssl_verifies(&pem, alg, b"something else", &sig));

    // AES-GCM is not a TPM algorithm: with fallback = "software" it is made in software, under
    // the root secret the TPM sealed.
    let aes = create(&env, "data", &["--type", "aes-256-gcm"]);
    let shown = env.ok_text(&["key", "show", "--key", &aes]);
    assert_eq!(
        field(&shown, "backend"),
        "software (sealed by tpm; fallback for tpm)"
    );
    round_trip(&env, &aes, "");

    // RSA-OAEP decryption inside the TPM.
    let rsa = create(
        &env,
        "unwrap",
        &["--type", "rsa-2048", "--purpose", "decrypt"],
    );
    let envelope = round_trip(&env, &rsa, "ctx");
    let out = env.run(
        &[
            "decrypt", "--key", &rsa, "--aad", "other", "--in", &envelope,
        ],
        b"",
    );
    assert_fail(&out, 1, "decryption failed", "decrypt with another --aad");
    assert!(out.stdout.is_empty(), "{}", show(&out));

    let list = env.ok_text(&["key", "list"]);
    assert_eq!(list.lines().count(), 4, "{list}");
    let doctor = env.ok_text(&["doctor"]);
    assert!(doctor.contains("SRK name"), "{doctor}");
}

#[test]
fn a_pcr_bound_store_is_refused_after_a_change_until_reseal() {
    let (tpm, env) = setup();
    // Here even in remote mode: PCR 8 changes behind keyhold's back, and a service started
    // before has the store unsealed already (it does not unseal again until restarted).
    let env = env.local_only("PCRs change under a running service");
    init_pcr_bound(&env);
    let ec = create(&env, "ec", &["--type", "ecdsa-p384"]);
    env.ok_text(&["key", "list"]);

    extend_pcr(&tpm, 8, b"new firmware");
    let before = env.snapshot();
    let stderr = env.refused(&[], &["key", "list"], 4);
    assert!(
        stderr.contains("PCRs 8 ") && stderr.contains("keyhold reseal"),
        "{stderr}"
    );

    // Without the recovery passphrase reseal cannot unseal, says so, and changes nothing.
    let stderr = env.refused(
        &[("KEYHOLD_PASSPHRASE", "not the recovery passphrase")],
        &["reseal"],
        4,
    );
    assert!(
        stderr.contains("keyhold: cannot unseal the store: wrong passphrase"),
        "{stderr}"
    );
    env.assert_unchanged(&before, "reseal with a wrong recovery passphrase");

    let (out, stderr) = env.ok_vars(WITH_RECOVERY, &["reseal"]);
    // The whole documented line (docs/cli.md, `reseal`), and the WARN that the recovery
    // passphrase was used.
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "re-sealed keyhold store {} to the TPM: PCRs 8 → 8\n",
            env.store_str()
        )
    );
    let warnings: Vec<&str> = stderr.lines().collect();
    assert_eq!(warnings.len(), 1, "one WARN line:\n{stderr}");
    assert!(
        warnings[0].contains("WARN")
            && warnings[0].contains("PCRs 8 no longer hold the values")
            && warnings[0].ends_with("unsealing with the recovery passphrase"),
        "{stderr}"
    );
    let msg = env.write("msg", b"after the reseal");
    let sig = env.path_str("sig");
    env.ok_text(&["sign", "--key", &ec, "--in", &msg, "--out", &sig]);
}

#[test]
fn bad_sealer_arguments_are_refused_and_create_nothing() {
    let (_tpm, env) = setup();
    for (args, code, text) in [
        (
            vec!["init", "--sealer", "tpm", "--pcrs", "24"],
            1,
            "PCR list `24`: `24` is not a PCR number 0-23",
        ),
        (
            vec!["init", "--sealer", "tpm", "--pcrs", "0;7"],
            1,
            "PCR list `0;7`: `0;7` is not a PCR number 0-23",
        ),
        (
            vec!["init", "--sealer", "tpm", "--pcrs", "16"],
            1,
            "PCR 16 can be reset by any program",
        ),
        (
            vec!["init", "--sealer", "tpm", "--pcrs", "0,23"],
            1,
            "PCR 23 can be reset by any program",
        ),
        (
            vec!["init", "--sealer", "passphrase", "--pcrs", "7"],
            1,
            "--pcrs, --recovery and --no-recovery go with --sealer tpm",
        ),
        (
            vec!["init", "--sealer", "passphrase", "--recovery"],
            1,
            "--pcrs, --recovery and --no-recovery go with --sealer tpm",
        ),
        // Usage errors (clap): `--no-recovery` requires `--pcrs`; `--recovery` is the default
        // with `--pcrs`, and contradicts `--no-recovery`.
        (
            vec!["init", "--sealer", "tpm", "--no-recovery"],
            2,
            "--pcrs",
        ),
        (
            vec!["init", "--sealer", "tpm", "--pcrs", "7", "--recovery"],
            2,
            "--recovery",
        ),
        (
            vec!["init", "--sealer", "tpm", "--backend", "nope"],
            1,
            "nope",
        ),
    ] {
        let out = env.run_vars(WITH_RECOVERY, &args);
        assert_fail(&out, code, text, &format!("{args:?}"));
        env.assert_no_store(&format!("{args:?}"));
    }
    // reseal is for TPM-sealed stores.
    env.ok_vars(
        WITH_RECOVERY,
        &[
            "init",
            "--sealer",
            "passphrase",
            "--argon2-memory-mib",
            "19",
        ],
    );
    let out = env.run_vars(WITH_RECOVERY, &["reseal"]);
    assert_fail(
        &out,
        1,
        "sealed by `passphrase`",
        "reseal of a passphrase store",
    );
}

/// tpm2-tss logs `ERROR:esys:…` lines of its own for errors keyhold handles and reports itself
/// (here the PCR policy that no longer holds): keyhold quiets it unless the user set TSS2_LOG.
#[test]
fn tpm2_tss_is_quiet_unless_the_user_sets_tss2_log() {
    let (tpm, env) = setup();
    env.ok_text(&["init", "--sealer", "tpm", "--pcrs", "8", "--no-recovery"]);
    extend_pcr(&tpm, 8, b"another boot loader");
    let run = |tss2_log: Option<&str>| {
        env.run_with(&["key", "list"], None, |c| {
            c.env_remove("TSS2_LOG");
            if let Some(level) = tss2_log {
                c.env("TSS2_LOG", level);
            }
        })
    };
    let out = run(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("PCRs 8 "), "{stderr}");
    assert!(!stderr.contains("ERROR:esys"), "tpm2-tss spoke:\n{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "only keyhold's message:\n{stderr}"
    );
    // The user's TSS2_LOG is left alone: the same failure, with tpm2-tss's lines.
    let out = run(Some("esys+error"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("ERROR:esys"),
        "TSS2_LOG=esys+error:\n{stderr}"
    );
}

/// M1 end to end: a passphrase store whose sealed root secret an intruder replaced with a TPM seal
/// of a root they chose (and a metadata MAC forged under it). keyhold refuses it with exit 4,
/// whether the user states nothing (passphrase, the default) or is talked into stating `tpm`;
/// nothing is written, and with the original seal back every key is intact.
#[test]
fn a_passphrase_store_whose_root_was_replaced_by_a_tpm_seal_is_refused() {
    let pass = [("KEYHOLD_PASSPHRASE", "cli m1 store passphrase")];
    let (tpm, env) = setup();
    unstate_sealer(&env);
    env.ok_vars(
        &pass,
        &[
            "init",
            "--sealer",
            "passphrase",
            "--argon2-memory-mib",
            "19",
        ],
    );
    let (id, _) = env.ok_vars(&pass, &["key", "create", "k", "--type", "hmac-sha256"]);
    let id = parse_id_line(&id, "key create");
    let data = env.write("data", b"m1");
    let mac = ["mac", "--key", &id, "--in", &data];
    let (tag, _) = env.ok_vars(&pass, &mac);

    let original = support::snapshot(&env.store);
    support::replace_root_with_tpm_seal(&env.store, &tpm.tcti(), Some("tpm"));
    let attacked = env.snapshot();
    // Nothing stated: keyhold expects a passphrase seal and does not follow the store's `tpm`.
    for vars in [&[][..], &pass[..]] {
        let stderr = env.refused(vars, &mac, 4);
        assert!(
            stderr.contains("records a `tpm` seal")
                && stderr.contains("replaced its sealed root secret"),
            "{stderr}"
        );
    }
    // Stated `tpm` (a user talked into it): the TPM unseals the intruder's root, under which no
    // record verifies; no key is made under it.
    let stated = [("KEYHOLD_SEALER", "tpm")];
    let stderr = env.refused(
        &stated,
        &["key", "create", "new", "--type", "hmac-sha256"],
        4,
    );
    assert!(
        stderr.contains("sealed root secret was replaced"),
        "{stderr}"
    );
    env.assert_unchanged(&attacked, "a refused open wrote to the store");

    support::restore(&env.store, &original);
    assert_eq!(env.ok_vars(&pass, &mac).0, tag, "the key changed");
}

/// A TPM store opened without the user stating its sealer: refused (exit 4), with exactly what to
/// set; `init` says so up front. Stated through the environment, it opens.
#[test]
fn a_tpm_store_tells_its_user_what_to_set() {
    let (_tpm, env) = setup();
    unstate_sealer(&env);
    let (_, note) = env.ok_vars(&[], &["init", "--sealer", "tpm"]);
    assert!(note.contains("KEYHOLD_SEALER=tpm"), "{note}");
    let stderr = env.refused(&[], &["key", "list"], 4);
    assert!(
        stderr.contains("KEYHOLD_SEALER=tpm")
            && stderr.contains("sealer = \"tpm\"")
            && stderr.contains("[store]"),
        "{stderr}"
    );
    env.ok_vars(&[("KEYHOLD_SEALER", "tpm")], &["key", "list"]);
}

/// M2 end to end: the PCR list in the store is changed behind keyhold's back (to a resettable PCR,
/// or to another one): the TPM refuses the seal, `reseal` unseals with the recovery passphrase
/// and then refuses the metadata (exit 6). The new seal is built only from the authenticated
/// metadata, so the doctored list is never carried over, whatever it is. Nothing is re-sealed.
#[test]
fn reseal_refuses_a_pcr_list_changed_behind_its_back() {
    let (_tpm, env) = setup();
    init_pcr_bound(&env);
    env.ok_text(&["key", "list"]);

    let original = support::edit_seal_params(&env.store, |p| p["pcrs"] = serde_json::json!([16]));
    for doctored in [16, 9] {
        support::edit_seal_params(&env.store, |p| p["pcrs"] = serde_json::json!([doctored]));
        let before = env.snapshot();
        let refused = env.refused(&[], &["key", "list"], 4);
        assert!(
            refused.starts_with("keyhold: cannot unseal the store: "),
            "{refused}"
        );
        let stderr = env.refused(WITH_RECOVERY, &["reseal"], 6);
        assert!(
            stderr.contains("sealer metadata") && stderr.contains("keyhold changed nothing"),
            "{stderr}"
        );
        env.assert_unchanged(&before, "reseal wrote to the store");
    }

    // A resettable PCR asked for at reseal is refused too.
    support::set_seal_params(&env.store, &original);
    let stderr = env.refused(WITH_RECOVERY, &["reseal", "--pcrs", "23"], 1);
    assert!(stderr.contains("PCR 23 can be reset"), "{stderr}");
    env.ok_text(&["key", "list"]);
}

/// tpm2-tss, and the OpenSSL it links, are loaded when a TPM is first used, not when keyhold
/// starts (src/backend/tpm/library.rs; issue 12: every process paid about 3.4 ms for them).
/// The dynamic loader names each library it loads (`LD_DEBUG=libs`, on stderr): signing with a
/// software key loads none of tpm2-tss; initialising a TPM-sealed store loads it.
#[test]
fn tpm2_tss_is_loaded_only_when_a_tpm_is_used() {
    const LOADER_REPORT: &[(&str, &str)] = &[("LD_DEBUG", "libs")];
    const WHY: &str = "the loader reports on the process it runs in, not on a service's";
    let software = Env::init().local_only(WHY);
    let ec = software.create_key("ec", "ecdsa-p256", &[]);
    let msg = software.write("msg", b"signed in software");
    for args in [
        &["--version"][..],
        &["sign", "--key", &ec, "--in", &msg][..],
    ] {
        let out = software.run_vars(LOADER_REPORT, args);
        assert!(out.status.success(), "{args:?}\n{}", show(&out));
        let report = stderr(&out);
        assert!(
            report.contains("libc.so.6"),
            "{args:?}: the loader reported nothing (LD_DEBUG ignored?):\n{report}"
        );
        assert!(
            !report.contains("libtss2"),
            "{args:?} loaded tpm2-tss without using a TPM:\n{report}"
        );
    }

    let (_tpm, env) = setup();
    let env = env.local_only(WHY);
    let out = env.run_vars(LOADER_REPORT, &["init", "--sealer", "tpm"]);
    assert!(out.status.success(), "init --sealer tpm\n{}", show(&out));
    let report = stderr(&out);
    for library in [
        "libtss2-esys.so.0",
        "libtss2-tctildr.so.0",
        "libtss2-mu.so.0",
    ] {
        assert!(
            report.contains(library),
            "init --sealer tpm did not load {library}:\n{report}"
        );
    }
}

/// Where tpm2-tss cannot be loaded, keyhold still starts and signs with software keys, and a
/// command that needs the TPM says what is missing: backend unavailable (exit 7), no store
/// made. The library is hidden from one command by an empty `libtss2-esys.so.0` in a directory
/// of `LD_LIBRARY_PATH`, which the dynamic loader searches first ("file too short").
#[test]
fn without_tpm2_tss_software_keys_work_and_a_tpm_command_says_what_is_missing() {
    const WHY: &str = "the library is hidden from the process run here, not from a service";
    let software = Env::init().local_only(WHY);
    let broken = software.file("broken-libs");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("libtss2-esys.so.0"), b"").unwrap();
    let hidden: &[(&str, &str)] = &[("LD_LIBRARY_PATH", broken.to_str().unwrap())];

    let ec = software.create_key("ec", "ecdsa-p256", &[]);
    let msg = software.write("msg", b"signed without tpm2-tss");
    let out = software.run_vars(hidden, &["sign", "--key", &ec, "--in", &msg]);
    assert!(
        out.status.success(),
        "sign without tpm2-tss\n{}",
        show(&out)
    );

    let (_tpm, env) = setup();
    let env = env.local_only(WHY);
    let out = env.run_vars(hidden, &["init", "--sealer", "tpm"]);
    assert_fail(
        &out,
        7,
        "tpm2-tss cannot be loaded",
        "init --sealer tpm without tpm2-tss",
    );
    let err = stderr(&out);
    assert!(
        err.contains("libtss2-esys.so.0") && err.contains("install its runtime libraries"),
        "{err}"
    );
    env.assert_no_store("init --sealer tpm without tpm2-tss");
    // The same Env, with the library where it was: the TPM is used.
    env.ok_text(&["init", "--sealer", "tpm"]);
}
