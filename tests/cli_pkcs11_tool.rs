//! What ci/demo.sh checked and no test did: OpenSC's pkcs11-tool, an independent PKCS#11
//! client, sees a key made with `keyhold key create --backend hsm` as README describes it:
//! labelled `namespace/name`, `CKA_ID` = the locator `key show` prints, sensitive, always
//! sensitive and never extractable; with `--extractable`, extractable (but still sensitive);
//! and the key pair is all keyhold put on the token.
#![cfg(feature = "pkcs11")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::process::Command;

use keyhold::testing::{SoftHsm, SOFTHSM_MODULE, TEST_USER_PIN};
use support::env::*;
use support::field;

/// The objects on the token as `pkcs11-tool -O` lists them (logged in, so private objects too):
/// each a header line (`Private Key Object; EC`) with its indented `name: value` lines.
fn token_objects(hsm: &SoftHsm) -> Vec<String> {
    let tool = require_tool("pkcs11-tool", "OpenSC: the independent view of the token");
    let mut cmd = Command::new(tool);
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
fn value<'a>(object: &'a str, name: &str) -> &'a str {
    object
        .lines()
        .find_map(|l| l.trim().strip_prefix(name).map(str::trim))
        .unwrap_or_else(|| panic!("no `{name}` in:\n{object}"))
}

#[test]
fn pkcs11_tool_sees_a_keyhold_token_key_as_never_extractable() {
    let hsm = SoftHsm::new().unwrap();
    let env = Env::new()
        .with_config(&format!(
            "[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"{SOFTHSM_MODULE}\"\n\
             token_label = \"{}\"\npin_env = \"KH_TEST_PIN\"\n",
            hsm.label()
        ))
        .with_var(
            "SOFTHSM2_CONF",
            SoftHsm::conf_file().unwrap().to_str().unwrap(),
        )
        .with_var("KH_TEST_PIN", TEST_USER_PIN);
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
