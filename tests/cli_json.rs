//! The CLI contract of docs/cli.md, against the real binary in temp stores: `--json`: every output's documented members and types, errors as JSON, verification results.
//!
//! Each test builds its own store (Argon2 at the documented minimum, 19 MiB / 2 iterations)
//! through the shared harness (tests/support/env.rs), drives `keyhold` as a subprocess, and checks
//! exit codes, stdout formats and stderr messages exactly; failures must leave the store
//! byte-for-byte unchanged.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use serde_json::Value as Json;
use support::env::*;

// ---------------------------------------------------------------------------------------------
// 14. --json
// ---------------------------------------------------------------------------------------------

#[test]
fn json_outputs_are_json_with_the_documented_fields() {
    let env = Env::new();
    let mut init = vec!["--json"];
    init.extend_from_slice(INIT_ARGS);
    let out = env.ok(&init, b"", "init --json");
    let v = parse_json(&out, "init --json");
    assert_eq!(
        json_keys(&v, "init --json"),
        ["sealer", "store", "store_id"],
        "init --json: {v}"
    );
    assert_eq!(
        v["sealer"].as_str(),
        Some("passphrase"),
        "init --json: expected sealer \"passphrase\""
    );
    assert_eq!(
        v["store"].as_str(),
        Some(env.store_str()),
        "init --json: expected store to be the store directory"
    );
    let store_id = v["store_id"]
        .as_str()
        .expect("store_id is a string")
        .to_owned();

    let out = env.ok(
        &["--json", "key", "create", "jk", "--type", "ecdsa-p256"],
        b"",
        "key create --json",
    );
    let created = parse_json(&out, "key create --json");
    let id = created["id"].as_str().expect("id is a string").to_owned();
    let show_text = env.ok_text(&["key", "show", "--key", &id]);
    assert_key_object(&created, &show_text, None, "key create --json");
    assert_eq!(
        created["name"].as_str(),
        Some("jk"),
        "key create --json: name"
    );
    assert_eq!(
        created["namespace"].as_str(),
        Some("default"),
        "key create --json: namespace"
    );
    assert_eq!(
        created["type"].as_str(),
        Some("ecdsa-p256"),
        "key create --json: type"
    );
    assert_eq!(
        created["purpose"].as_str(),
        Some("sign"),
        "key create --json: purpose"
    );
    assert_eq!(
        created["backend"].as_str(),
        Some("software"),
        "key create --json: backend"
    );
    assert_eq!(
        created["store_id"].as_str(),
        Some(store_id.as_str()),
        "key create --json: store_id equals init's"
    );

    let out = env.ok(
        &["--json", "key", "show", "--key", &id],
        b"",
        "key show --json",
    );
    let shown = parse_json(&out, "key show --json");
    assert_eq!(
        shown, created,
        "key show --json: expected the same object as key create --json"
    );

    env.create_key("second", "hmac-sha256", &[]);
    let out = env.ok(&["--json", "key", "list"], b"", "key list --json");
    let list = parse_json(&out, "key list --json");
    let Some(items) = list.as_array() else {
        panic!("key list --json: expected an array, got {list:?}")
    };
    let names: Vec<&str> = items.iter().filter_map(|o| o["name"].as_str()).collect();
    assert_eq!(
        names,
        ["jk", "second"],
        "key list --json: expected both keys, sorted by name"
    );
    for item in items {
        let id = item["id"].as_str().expect("id is a string");
        let show_text = env.ok_text(&["key", "show", "--key", id]);
        assert_key_object(item, &show_text, None, "key list --json");
    }

    // sign and mac with --json: the value as text (base64, or hex with --encoding hex), the
    // version that made it and the key's state; with --out FILE the bytes go to the file.
    let out = env.ok(&["--json", "sign", "--key", &id], b"payload", "sign --json");
    let v = parse_json(&out, "sign --json");
    assert_eq!(
        json_keys(&v, "sign --json"),
        ["compromised", "signature", "state", "version"],
        "sign --json: {v}"
    );
    assert_eq!(
        (&v["version"], &v["state"], &v["compromised"]),
        (&Json::from(1), &Json::from("active"), &Json::from(false)),
        "sign --json: {v}"
    );
    let sig = b64(v["signature"].as_str().expect("signature is a string"));
    assert_eq!(
        sig.first(),
        Some(&0x30),
        "sign --json: a base64 DER signature"
    );
    let out = env.ok(
        &["--json", "sign", "--key", &id, "--encoding", "hex"],
        b"payload",
        "sign --json --encoding hex",
    );
    let v = parse_json(&out, "sign --json --encoding hex");
    assert!(
        v["signature"].as_str().is_some_and(is_lower_hex),
        "sign --json --encoding hex: {v}"
    );
    let file = env.path_str("sig-file");
    let out = env.ok(
        &["--json", "sign", "--key", &id, "--out", &file],
        b"payload",
        "sign --json --out FILE",
    );
    let v = parse_json(&out, "sign --json --out FILE");
    assert_eq!(
        json_keys(&v, "sign --json --out FILE"),
        ["compromised", "state", "version"],
        "sign --json --out FILE: the value is in the file, not the JSON: {v}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap().first(),
        Some(&0x30),
        "sign --json --out FILE: the raw DER signature in the file"
    );
    let sig_path = env.write("sig", &sig);
    let out = env.ok(
        &["--json", "verify", "--key", &id, "--signature", &sig_path],
        b"payload",
        "verify --json",
    );
    assert_eq!(
        parse_json(&out, "verify --json"),
        serde_json::json!({"valid": true, "version": 1, "state": "active", "compromised": false}),
        "verify --json: expected valid, with the version"
    );

    let mac = env.create_key("m", "hmac-sha256", &[]);
    let out = env.ok(&["--json", "mac", "--key", &mac], b"payload", "mac --json");
    let v = parse_json(&out, "mac --json");
    assert_eq!(
        json_keys(&v, "mac --json"),
        ["compromised", "state", "tag", "version"],
        "mac --json: {v}"
    );
    let tag = b64(v["tag"].as_str().expect("tag is a string"));
    assert_eq!(tag.len(), 32, "mac --json: a base64 32-byte tag");
    let tag_path = env.write("tag", &tag);
    let out = env.ok(
        &["--json", "mac-verify", "--key", &mac, "--tag", &tag_path],
        b"payload",
        "mac-verify --json",
    );
    assert_eq!(
        parse_json(&out, "mac-verify --json"),
        serde_json::json!({"valid": true, "version": 1, "state": "active", "compromised": false}),
        "mac-verify --json: expected valid, with the version"
    );

    let out = env.ok(&["--json", "random", "16"], b"", "random --json");
    let r = parse_json(&out, "random --json");
    assert_eq!(
        json_keys(&r, "random --json"),
        ["hex"],
        "random --json: {r}"
    );
    let hex = r["hex"]
        .as_str()
        .unwrap_or_else(|| panic!("random --json: expected {{\"hex\": ...}}, got {r:?}"));
    assert!(
        hex.len() == 32 && is_lower_hex(hex),
        "random --json 16: expected 32 lowercase hex chars, got {hex:?}"
    );

    let pem = env.ok(
        &["--json", "key", "pubkey", "--key", &id, "--format", "der"],
        b"",
        "pubkey der --json",
    );
    assert_eq!(
        pem.first(),
        Some(&0x30),
        "pubkey --format der --json: expected raw DER, not JSON"
    );
}

#[test]
fn json_errors_verify_results_and_destroyed_state() {
    let env = Env::init();
    let id = env.create_key("signer", "ed25519", &[]);
    let mac = env.create_key("mac", "hmac-sha256", &[]);
    let error_of = |o: &std::process::Output, code: i32, kind: &str, says: &str, ctx: &str| {
        assert_eq!(o.status.code(), Some(code), "{ctx}: exit code\n{}", show(o));
        assert!(
            o.stdout.is_empty(),
            "{ctx}: expected nothing on stdout\n{}",
            show(o)
        );
        let err = stderr(o);
        assert_eq!(
            err.lines().count(),
            1,
            "{ctx}: expected one JSON line on stderr\n{}",
            show(o)
        );
        let v = serde_json::from_str::<Json>(err.trim_end())
            .unwrap_or_else(|e| panic!("{ctx}: not JSON ({e}): {err}"));
        let inner = v
            .get("error")
            .unwrap_or_else(|| panic!("{ctx}: no `error` in {v:?}"));
        assert_eq!(
            inner.get("code"),
            Some(&serde_json::json!(code)),
            "{ctx}: {v:?}"
        );
        assert_eq!(inner["kind"].as_str(), Some(kind), "{ctx}: {v:?}");
        let message = inner["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(says),
            "{ctx}: expected the message to say {says:?}: {v:?}"
        );
    };
    let mut tampered = id.clone();
    tampered.pop();
    error_of(
        &env.run(&["--json", "key", "show", "--key", &tampered], b""),
        3,
        "key_id_authentication",
        "key ID failed authentication",
        "tampered ID",
    );
    error_of(
        &env.run(&["--json", "key", "show", "--key", "signer"], b""),
        2,
        "usage",
        "pass --name signer",
        "a name as --key",
    );
    error_of(
        &env.run(&["--json", "key", "show", "--bogus"], b""),
        2,
        "usage",
        "unexpected argument '--bogus'",
        "clap's usage error",
    );
    error_of(
        &env.run(&["--json", "key", "show", "--name", "gone"], b""),
        5,
        "no_such_key",
        "no key named `gone`",
        "unknown name",
    );
    error_of(
        &env.run(&["--json", "mac", "--key", &id, "--out", "-"], b"m"),
        1,
        "wrong_purpose",
        "cannot",
        "wrong purpose",
    );
    error_of(
        &env.run_with(&["--json", "key", "list"], Some(b""), |c| {
            c.env("KEYHOLD_PASSPHRASE", "wrong");
        }),
        4,
        "unseal",
        "cannot unseal",
        "wrong passphrase",
    );

    // verify / mac-verify: {"valid":false} on stdout and exit 1, nothing on stderr; without
    // --json the text message.
    for (make, check, flag, key, text) in [
        ("sign", "verify", "--signature", &id, "signature invalid"),
        ("mac", "mac-verify", "--tag", &mac, "tag invalid"),
    ] {
        let made = env.ok(&[make, "--key", key, "--out", "-"], b"signed", make);
        let path = env.write("made", &made);
        let o = env.run(&["--json", check, "--key", key, flag, &path], b"other");
        assert_eq!(
            o.status.code(),
            Some(1),
            "{check} --json, invalid\n{}",
            show(&o)
        );
        assert_eq!(
            parse_json(&o.stdout, check),
            serde_json::json!({"valid": false}),
            "{check} --json, invalid"
        );
        assert!(
            o.stderr.is_empty(),
            "{check} --json, invalid: stderr\n{}",
            show(&o)
        );
        let o = env.run(&[check, "--key", key, flag, &path], b"other");
        assert_fail(&o, 1, text, &format!("{check} (text), invalid"));
        let o = env.run(&["--json", check, "--key", key, flag, &path], b"signed");
        assert_ok(&o, &format!("{check} --json, valid"));
        assert_eq!(
            parse_json(&o.stdout, check)["valid"],
            Json::from(true),
            "{check} --json, valid"
        );
    }

    let out = env.ok(
        &["--json", "key", "destroy", "--now", "--yes", "--key", &id],
        b"",
        "destroy --json",
    );
    let v = parse_json(&out, "destroy --json");
    assert_eq!(
        v["state"].as_str(),
        Some("destroyed"),
        "destroy --json: {v:?}"
    );
    assert_eq!(v["name"].as_str(), Some("signer"), "destroy --json: {v:?}");
}
