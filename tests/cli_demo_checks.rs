//! What ci/demo.sh checked and no test did:
//! - OpenSC's pkcs11-tool, an independent PKCS#11 client, sees a key made with `keyhold key
//!   create --backend hsm` as README describes it: labelled `namespace/name`, `CKA_ID` = the
//!   locator `key show` prints, sensitive, always sensitive and never extractable; with
//!   `--extractable`, extractable (but still sensitive); and the key pairs are all keyhold put on
//!   the token.
//! - A TPM key's `key show` names the SRK it was made under (`srk_name`, as doctor shows it), and
//!   `doctor` lists the TPM's TCTI, the key types it makes and those it cannot, with why.
//!
//! (The reseal WARN line the demo checked is checked in cli_tpm.rs and cli_reseal.rs. The demo's
//! OpenSSL-encrypts-for-a-TPM-key step is covered in two halves: cli_encrypt.rs shows OpenSSL's
//! envelope with the documented label decrypts, and the conformance suite that the TPM decrypts
//! keyhold's envelopes, whose label does not depend on the backend.)
#![cfg(any(feature = "pkcs11", feature = "tpm"))]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;
use support::field;

/// The objects on the token as `pkcs11-tool -O` lists them (logged in, so private objects too):
/// each a header line (`Private Key Object; EC`) with its indented `name: value` lines.
#[cfg(feature = "pkcs11")]
fn token_objects(hsm: &keyhold::testing::SoftHsm) -> Vec<String> {
    use keyhold::testing::{SoftHsm, SOFTHSM_MODULE, TEST_USER_PIN};
    let tool = require_tool("pkcs11-tool", "OpenSC: the independent view of the token");
    let mut cmd = std::process::Command::new(tool);
    cmd.args(["--module", SOFTHSM_MODULE, "--token-label", hsm.label()])
        .args(["--login", "--pin", TEST_USER_PIN, "--list-objects"])
        .env("SOFTHSM2_CONF", SoftHsm::conf_file().unwrap());
    let out = run_command(cmd, None);
    assert!(out.status.success(), "pkcs11-tool -O\n{}", show(&out));
    stdout_str(&out)
        .split_inclusive('\n')
        .fold(Vec::new(), |mut objects: Vec<String>, line| {
            match objects.last_mut() {
                Some(last) if line.starts_with(char::is_whitespace) => last.push_str(line),
                _ => objects.push(line.to_owned()),
            }
            objects
        })
}

/// The value of `name:` in one listed object.
#[cfg(feature = "pkcs11")]
fn value<'a>(object: &'a str, name: &str) -> &'a str {
    object
        .lines()
        .find_map(|l| l.trim().strip_prefix(name).map(str::trim))
        .unwrap_or_else(|| panic!("no `{name}` in:\n{object}"))
}

#[cfg(feature = "pkcs11")]
#[test]
fn pkcs11_tool_sees_a_keyhold_token_key_as_never_extractable() {
    use keyhold::testing::{SoftHsm, SOFTHSM_MODULE, TEST_USER_PIN};
    let hsm = SoftHsm::new().unwrap();
    let env = Env::new().with_softhsm(SOFTHSM_MODULE, hsm.label(), TEST_USER_PIN, "");
    env.init_store();
    let web = env.create_key("web", "ecdsa-p256", &["--backend", "hsm"]);
    let wrap = env.create_key("wrap", "ecdsa-p256", &["--backend", "hsm", "--extractable"]);
    let locator =
        |id: &str| field(&env.ok_text(&["key", "show", "--key", id]), "locator").to_owned();

    let objects = token_objects(&hsm);
    assert_eq!(
        objects.len(),
        4,
        "two key pairs and nothing else on the token:\n{}",
        objects.concat()
    );
    for (id, name, private_access) in [
        (
            &web,
            "web",
            "sensitive, always sensitive, never extractable, local",
        ),
        (
            &wrap,
            "wrap",
            "sensitive, always sensitive, extractable, local",
        ),
    ] {
        let label = format!("default/{name}");
        let locator = locator(id);
        for (kind, usage, access) in [
            ("Private Key Object; EC", "sign", private_access),
            ("Public Key Object; EC", "verify", "local"),
        ] {
            let object = objects
                .iter()
                .find(|o| o.starts_with(kind) && value(o, "label:") == label)
                .unwrap_or_else(|| panic!("no {kind} labelled {label}:\n{}", objects.concat()));
            assert_eq!(value(object, "ID:"), locator, "{object}");
            assert_eq!(value(object, "Usage:"), usage, "{object}");
            assert_eq!(value(object, "Access:"), access, "{object}");
        }
    }
}

#[cfg(feature = "tpm")]
#[test]
fn a_tpm_key_names_its_srk_and_doctor_shows_what_the_tpm_makes() {
    let tpm = keyhold::testing::Swtpm::new().unwrap();
    let env = support::claims::tpm_env(Env::new(), &tpm.tcti(), "fallback = \"software\"");
    env.ok_text(&["init", "--sealer", "tpm"]);
    let id = parse_id_line(
        env.ok_text(support::claims::CREATE_TPM_KEY).as_bytes(),
        "key create",
    );
    let shown = env.ok_text(&["key", "show", "--key", &id]);
    assert_eq!(field(&shown, "backend"), "tpm");
    let attributes = support::attributes(&shown);
    let srk = attributes
        .strip_prefix("never_extractable=true, srk_name=")
        .unwrap_or_else(|| panic!("attributes: {attributes}"));
    // A TPM2B_NAME of a SHA-256 Name: the algorithm (0x000b) and the 32-byte digest.
    assert!(
        srk.len() == 68 && srk.starts_with("000b") && is_lower_hex(srk),
        "srk_name: {srk}"
    );

    let doctor = env.ok_text(&["doctor"]);
    let section: Vec<&str> = doctor
        .split("\n\n")
        .find(|s| s.starts_with("backend tpm\n"))
        .unwrap_or_else(|| panic!("no `backend tpm` in doctor:\n{doctor}"))
        .lines()
        .map(str::trim)
        .collect();
    for line in [
        format!("tcti: {}", tpm.tcti()),
        format!("SRK name: {srk}"),
        "key types: ecdsa-p256/sign, ecdsa-p384/sign, rsa-2048/sign, rsa-2048/decrypt, \
         rsa-3072/sign, rsa-3072/decrypt, hmac-sha256/mac"
            .to_owned(),
        "cannot: ed25519/sign (Ed25519 (TPM 2.0 does not define it))".to_owned(),
        "cannot: aes-256-gcm/encrypt (AES-GCM (TPM 2.0 does not define it))".to_owned(),
    ] {
        assert!(
            section.contains(&line.as_str()),
            "doctor's TPM section lacks {line:?}:\n{doctor}"
        );
    }
}
