//! The CLI contract of docs/cli.md, against the real binary in temp stores: Key management: types and purposes, names and namespaces, `key list` / `key show`, and keys named with `--name`.
//!
//! Each test builds its own store (Argon2 at the documented minimum, 19 MiB / 2 iterations)
//! through the shared harness (tests/support/env.rs), drives `keyhold` as a subprocess, and checks
//! exit codes, stdout formats and stderr messages exactly; failures must leave the store
//! byte-for-byte unchanged.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

// ---------------------------------------------------------------------------------------------
// 11. purposes, types and names
// ---------------------------------------------------------------------------------------------

#[test]
fn operations_refuse_a_key_of_the_wrong_purpose() {
    let env = Env::init();
    // Neutral names, so a purpose found in the message is not just part of the key's name.
    let ec = env.create_key("k1", "ecdsa-p256", &[]);
    let ed = env.create_key("k2", "ed25519", &[]);
    let aes = env.create_key("k3", "aes-256-gcm", &[]);
    let mac = env.create_key("k4", "hmac-sha256", &[]);
    let rsa_sign = env.create_key("k5", "rsa-2048", &[]);
    let rsa_dec = env.create_key("k6", "rsa-2048", &["--purpose", "decrypt"]);
    let sig_path = env.write("sig", &[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01]);
    let before = env.snapshot();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["encrypt", "--key", &ec], "sign"),
        (vec!["decrypt", "--key", &ec], "sign"),
        (vec!["mac", "--key", &ed], "sign"),
        (vec!["sign", "--key", &aes], "encrypt"),
        (vec!["mac", "--key", &aes], "encrypt"),
        (
            vec!["verify", "--key", &aes, "--signature", &sig_path],
            "encrypt",
        ),
        (vec!["sign", "--key", &mac], "mac"),
        (vec!["encrypt", "--key", &mac], "mac"),
        (vec!["encrypt", "--key", &rsa_sign], "sign"),
        (vec!["decrypt", "--key", &rsa_sign], "sign"),
        (vec!["sign", "--key", &rsa_dec], "decrypt"),
        (vec!["mac", "--key", &rsa_dec], "decrypt"),
    ];
    for (args, purpose) in cases {
        let o = env.run(&args, b"KHE1 some input that is not empty");
        assert_fail(
            &o,
            1,
            purpose,
            &format!(
                "{args:?}: wrong purpose, expected a message naming the key's purpose `{purpose}`"
            ),
        );
        assert!(o.stdout.is_empty(), "{args:?}: expected nothing on stdout");
    }
    env.assert_unchanged(&before, "wrong-purpose operations");
}

fn listed_names(env: &Env, extra_global: &[&str]) -> Vec<String> {
    let mut args = extra_global.to_vec();
    args.extend(["key", "list"]);
    let out = env.ok(&args, b"", "key list");
    let text = String::from_utf8(out).expect("key list is UTF-8");
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn invalid_type_and_purpose_combinations_are_refused() {
    let env = Env::init();
    let before = env.snapshot();
    for (ty, purpose) in [
        ("ed25519", "decrypt"),
        ("aes-256-gcm", "sign"),
        ("ecdsa-p256", "encrypt"),
        ("hmac-sha256", "sign"),
        ("ecdsa-p384", "mac"),
    ] {
        let o = env.run(
            &["key", "create", "bad", "--type", ty, "--purpose", purpose],
            b"",
        );
        // Not a usage error (exit 2 is for what the command line cannot parse, docs/cli.md):
        // a combination keyhold refuses, exit 1.
        assert_clean_failure(
            &o,
            1,
            &format!("key create --type {ty} --purpose {purpose}"),
        );
        assert!(
            stderr(&o).contains(purpose),
            "{ty}/{purpose}: expected the message to name the refused purpose\n{}",
            show(&o)
        );
    }
    let o = env.run(&["key", "create", "bad", "--type", "foo"], b"");
    assert_fail(
        &o,
        2,
        "foo",
        "key create --type foo: expected a usage error (exit 2)",
    );
    let o = env.run(&["key", "create", "bad"], b"");
    assert_fail(
        &o,
        2,
        "required arguments were not provided:\n  --type <TYPE>",
        "key create without --type: expected a usage error (exit 2)",
    );
    let o = env.run(&["frobnicate"], b"");
    assert_fail(
        &o,
        2,
        "unrecognized subcommand 'frobnicate'",
        "unknown command: expected a usage error (exit 2)",
    );
    env.assert_unchanged(&before, "refused key creations");
    assert!(
        listed_names(&env, &[]).is_empty(),
        "expected no key to have been created by refused commands"
    );
}

#[test]
fn duplicate_key_name_is_refused_and_first_key_still_works() {
    let env = Env::init();
    let first = env.create_key("dup", "ecdsa-p256", &[]);
    let before = env.snapshot();
    for ty in ["ecdsa-p256", "hmac-sha256"] {
        let o = env.run(&["key", "create", "dup", "--type", ty], b"");
        assert_fail(&o, 1, "dup", &format!("second key named `dup` ({ty})"));
        assert!(
            o.stdout.is_empty(),
            "duplicate name: expected no ID on stdout"
        );
    }
    env.assert_unchanged(&before, "duplicate name");
    let sig = env.ok(
        &["sign", "--key", &first],
        b"payload",
        "first `dup` key signs",
    );
    let sig_path = env.write("sig", &sig);
    env.ok(
        &["verify", "--key", &first, "--signature", &sig_path],
        b"payload",
        "first `dup` key verifies",
    );
    // The same name in another namespace is fine.
    env.ok(
        &[
            "--namespace",
            "other",
            "key",
            "create",
            "dup",
            "--type",
            "ecdsa-p256",
        ],
        b"",
        "same name, other namespace",
    );
}

#[test]
fn bad_names_and_namespaces_are_refused() {
    let env = Env::init();
    let long65 = "a".repeat(65);
    let before = env.snapshot();
    for name in [
        "../x",
        "",
        long65.as_str(),
        "a/b",
        "a b",
        ".hidden",
        "x\u{e9}",
        "x;y",
        "-dash",
    ] {
        let args = if name.starts_with('-') {
            vec!["key", "create", "--type", "ed25519", "--", name]
        } else {
            vec!["key", "create", name, "--type", "ed25519"]
        };
        let o = env.run(&args, b"");
        assert_fail(
            &o,
            1,
            "keyhold: invalid key name `",
            &format!("key create with bad name {name:?}"),
        );
        assert!(
            o.stdout.is_empty(),
            "bad name {name:?}: expected no ID on stdout"
        );
    }
    for ns in ["../ns", "", long65.as_str(), "a/b", ".ns"] {
        let o = env.run(
            &["--namespace", ns, "key", "create", "k", "--type", "ed25519"],
            b"",
        );
        assert_fail(
            &o,
            1,
            "keyhold: invalid namespace `",
            &format!("key create in bad namespace {ns:?}"),
        );
    }
    env.assert_unchanged(&before, "bad names");
    assert!(
        listed_names(&env, &[]).is_empty(),
        "expected no key created with a bad name"
    );

    // The edges that are allowed.
    let long64 = "Z".repeat(64);
    for name in ["a", long64.as_str(), "A-z_0.9-x", "0start"] {
        env.create_key(name, "ed25519", &[]);
    }
    env.ok(
        &[
            "--namespace",
            &long64,
            "key",
            "create",
            "k",
            "--type",
            "ed25519",
        ],
        b"",
        "64-char namespace",
    );
}

// ---------------------------------------------------------------------------------------------
// 15. list, show, namespaces
// ---------------------------------------------------------------------------------------------

#[test]
fn key_list_is_a_table_sorted_by_name() {
    let env = Env::init();
    let z = env.create_key("zeta", "ed25519", &[]);
    let a = env.create_key("alpha", "aes-256-gcm", &[]);
    let m = env.create_key("mid", "rsa-2048", &["--purpose", "decrypt"]);
    let out = env.ok(&["key", "list"], b"", "key list");
    let text = String::from_utf8(out).expect("UTF-8");
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("a header line")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "TYPE", "PURPOSE", "BACKEND", "STATE", "ID"],
        "key list: expected the documented header"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let expected = [
        ("alpha", "aes-256-gcm", "encrypt", &a),
        ("mid", "rsa-2048", "decrypt", &m),
        ("zeta", "ed25519", "sign", &z),
    ];
    assert_eq!(rows.len(), 3, "key list: expected three rows, got:\n{text}");
    for (row, (name, ty, purpose, id)) in rows.iter().zip(expected) {
        assert_eq!(row.len(), 6, "key list: expected 6 columns in {row:?}");
        assert_eq!(
            (row[0], row[1], row[2], row[3], row[5]),
            (name, ty, purpose, "software", id.as_str()),
            "key list row (sorted by name)"
        );
    }
}

#[test]
fn key_show_prints_the_documented_fields() {
    let env = Env::init();
    let id = env.create_key("shown", "ecdsa-p384", &[]);
    let out = env.ok(&["key", "show", "--key", &id], b"", "key show");
    let text = String::from_utf8(out).expect("UTF-8");
    let fields: Vec<(&str, &str)> = text
        .lines()
        .map(|l| {
            l.split_once(": ")
                .unwrap_or_else(|| panic!("key show: expected `field: value` lines, got {l:?}"))
        })
        .collect();
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.trim()).collect();
    assert_eq!(
        names,
        [
            "id",
            "store",
            "namespace",
            "name",
            "type",
            "purpose",
            "algorithm",
            "backend",
            "locator",
            "state",
            "version",
            "versions",
            "min decrypt version",
            "rotate after",
            "activate at",
            "deactivate at",
            "created",
        ],
        "key show: expected the documented fields in order"
    );
    let get = |k: &str| {
        fields
            .iter()
            .find(|(f, _)| f.trim() == k)
            .map(|(_, v)| v.trim())
            .unwrap_or_default()
    };
    assert_eq!(get("id"), id, "key show: id");
    assert_eq!(get("namespace"), "default", "key show: namespace");
    assert_eq!(get("name"), "shown", "key show: name");
    assert_eq!(get("type"), "ecdsa-p384", "key show: type");
    assert_eq!(get("purpose"), "sign", "key show: purpose");
    assert_eq!(
        get("backend"),
        "software (sealed by passphrase)",
        "key show: backend"
    );
    assert!(
        !text.contains("\nattribute "),
        "key show: a software key has no attributes\n{text}"
    );
    assert_eq!(get("state"), "active", "key show: state");
    assert_eq!(get("version"), "1", "key show: version");
    assert_eq!(
        get("min decrypt version"),
        "1",
        "key show: min decrypt version"
    );
    assert_eq!(get("rotate after"), "never", "key show: rotate after");
    assert_eq!(get("deactivate at"), "never", "key show: deactivate at");
    assert!(!text.contains(PASS), "key show: expected no passphrase");
}

#[test]
fn namespaces_isolate_listing() {
    let env = Env::init();
    let ida = env.ok(
        &[
            "--namespace",
            "a",
            "key",
            "create",
            "only-in-a",
            "--type",
            "ed25519",
        ],
        b"",
        "create in namespace a",
    );
    let ida = parse_id_line(&ida, "create in a");
    env.ok(
        &[
            "--namespace",
            "b",
            "key",
            "create",
            "only-in-b",
            "--type",
            "ed25519",
        ],
        b"",
        "create in namespace b",
    );
    env.create_key("in-default", "ed25519", &[]);
    assert_eq!(
        listed_names(&env, &["--namespace", "a"]),
        ["only-in-a"],
        "namespace a: expected only its own key"
    );
    assert_eq!(
        listed_names(&env, &["--namespace", "b"]),
        ["only-in-b"],
        "namespace b: expected only its own key"
    );
    assert_eq!(
        listed_names(&env, &[]),
        ["in-default"],
        "default namespace: expected only its own key"
    );
    let o = env.run_with(&["key", "list"], Some(b""), |c| {
        c.env("KEYHOLD_NAMESPACE", "a");
    });
    assert_ok(&o, "key list with KEYHOLD_NAMESPACE=a");
    let names: Vec<String> = stdout_str(&o)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert_eq!(
        names,
        ["only-in-a"],
        "KEYHOLD_NAMESPACE=a: expected namespace a's key"
    );
    let out = env.ok(
        &[
            "--namespace",
            "a",
            "key",
            "destroy",
            "--now",
            "--yes",
            "--key",
            &ida,
        ],
        b"",
        "destroy in a",
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "destroyed a/only-in-a\n",
        "key destroy: expected `destroyed NS/NAME`"
    );
}

// ---------------------------------------------------------------------------------------------
// 16. What a new user trips over first (issue 8 §4)
// ---------------------------------------------------------------------------------------------

/// The exact message for a name given where an ID goes.
fn not_an_id_message(name: &str) -> String {
    format!("keyhold: `{name}` is not a key ID (IDs start with kh1_): to use a key by name, pass --name {name}\n")
}

#[test]
fn a_name_given_as_key_is_a_usage_error_that_says_to_pass_name() {
    let env = Env::init();
    let id = env.create_key("web-tls", "ecdsa-p256", &[]);
    let before = env.snapshot();
    for args in [
        vec!["key", "show", "--key", "web-tls"],
        vec!["key", "pubkey", "--key", "web-tls"],
        vec!["key", "destroy", "--key", "web-tls"],
        vec!["sign", "--key", "web-tls", "--out", "sig"],
        vec!["mac", "--key", "web-tls", "--out", "tag"],
        vec!["encrypt", "--key", "web-tls", "--out", "env"],
    ] {
        let o = env.run(&args, b"data");
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: expected exit 2\n{}",
            show(&o)
        );
        assert_eq!(stderr(&o), not_an_id_message("web-tls"), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}: expected nothing on stdout");
    }
    // Something that is not a name is checked as an ID.
    let o = env.run(&["key", "show", "--key", "no such/thing"], b"");
    assert_fail(&o, 3, "key ID failed authentication", "a non-name");
    // A modified ID is still an authentication failure (exit 3), not a usage error.
    let mut tampered = id.clone();
    tampered.pop();
    let o = env.run(&["key", "show", "--key", &tampered], b"");
    assert_fail(&o, 3, "key ID failed authentication", "a truncated ID");
    env.assert_unchanged(&before, "names given as --key");
}

#[test]
fn keys_can_be_named_with_name_and_key_id() {
    let env = Env::init();
    let id = env.create_key("web-tls", "ed25519", &[]);
    let mac = env.create_key("session", "hmac-sha256", &[]);
    let other = env.ok(
        &[
            "--namespace",
            "other",
            "key",
            "create",
            "web-tls",
            "--type",
            "ecdsa-p256",
        ],
        b"",
        "create web-tls in namespace other",
    );
    let other = parse_id_line(&other, "create in other");

    // key id NAME prints the ID, resolved in --namespace.
    let out = env.ok(&["key", "id", "web-tls"], b"", "key id web-tls");
    assert_eq!(String::from_utf8_lossy(&out), format!("{id}\n"));
    let out = env.ok(
        &["--namespace", "other", "key", "id", "web-tls"],
        b"",
        "key id in other",
    );
    assert_eq!(String::from_utf8_lossy(&out), format!("{other}\n"));
    let out = env.ok(&["--json", "key", "id", "web-tls"], b"", "key id --json");
    let v = parse_json(&out, "key id --json");
    assert_eq!(v["id"].as_str(), Some(id.as_str()), "key id --json: {v:?}");
    assert_eq!(
        v["namespace"].as_str(),
        Some("default"),
        "key id --json: {v:?}"
    );
    let o = env.run(&["--namespace", "third", "key", "id", "web-tls"], b"");
    assert_fail(
        &o,
        5,
        "there is no key named `web-tls` in namespace `third`",
        "key id elsewhere",
    );
    let o = env.run(&["key", "show", "--name", "nope"], b"");
    assert_fail(
        &o,
        5,
        "there is no key named `nope` in namespace `default`",
        "show --name nope",
    );

    // --name wherever --key is taken; the same results as with the ID.
    let by_id = env.ok(&["key", "show", "--key", &id], b"", "show --key");
    let by_name = env.ok(&["key", "show", "--name", "web-tls"], b"", "show --name");
    assert_eq!(
        by_name, by_id,
        "key show --name: expected the same record as --key"
    );
    assert_eq!(
        env.ok(
            &["key", "pubkey", "--name", "web-tls"],
            b"",
            "pubkey --name"
        ),
        env.ok(&["key", "pubkey", "--key", &id], b"", "pubkey --key")
    );
    for (make, check, flag, name, id) in [
        ("sign", "verify", "--signature", "web-tls", &id),
        ("mac", "mac-verify", "--tag", "session", &mac),
    ] {
        let made = env.ok(&[make, "--name", name, "--out", "-"], b"msg", make);
        let path = env.write("made", &made);
        env.ok(&[check, "--key", id, flag, &path], b"msg", check);
        env.ok(&[check, "--name", name, flag, &path], b"msg", check);
    }
    let aes = env.create_key("files", "aes-256-gcm", &[]);
    let envelope = env.ok(
        &["encrypt", "--name", "files", "--out", "-"],
        b"secret",
        "encrypt --name",
    );
    let plain = env.ok(
        &["decrypt", "--key", &aes, "--out", "-"],
        &envelope,
        "decrypt --key",
    );
    assert_eq!(plain, b"secret");
    let plain = env.ok(
        &["decrypt", "--name", "files", "--out", "-"],
        &envelope,
        "decrypt --name",
    );
    assert_eq!(plain, b"secret");

    // Exactly one of --key and --name.
    let o = env.run(&["key", "show", "--key", &id, "--name", "web-tls"], b"");
    assert_fail(&o, 2, "cannot be used with", "--key and --name");
    let o = env.run(&["key", "show"], b"");
    assert_fail(
        &o,
        2,
        "--key <ID>|--name <NAME>",
        "neither --key nor --name",
    );

    let out = env.ok(
        &[
            "--namespace",
            "other",
            "key",
            "destroy",
            "--now",
            "--yes",
            "--name",
            "web-tls",
        ],
        b"",
        "destroy --name",
    );
    assert_eq!(String::from_utf8_lossy(&out), "destroyed other/web-tls\n");
    let o = env.run(&["sign", "--key", &other], b"m");
    assert_fail(
        &o,
        9,
        "key `other/web-tls` is destroyed on ",
        "the destroyed key's ID",
    );
    env.ok(
        &["key", "show", "--name", "web-tls"],
        b"",
        "the default namespace's web-tls stays",
    );
}

/// Someone who can write the store swaps two records' names: `--name` finds the record by name,
/// but checks its MAC before using the ID it makes, so the swap is refused, not followed.
#[test]
fn a_name_resolves_only_through_an_authenticated_record() {
    let env = Env::init();
    env.create_key("web-tls", "ed25519", &[]);
    env.create_key("attacker", "ed25519", &[]);
    // An untouched record: with every record failing, the store reads as one whose sealed root
    // was replaced (exit 4), a different refusal.
    env.create_key("bystander", "ed25519", &[]);
    let db = rusqlite::Connection::open(env.database_file()).expect("open the store's database");
    db.execute_batch(
        "UPDATE keys SET name = 'swap' WHERE name = 'web-tls';
         UPDATE keys SET name = 'web-tls' WHERE name = 'attacker';
         UPDATE keys SET name = 'attacker' WHERE name = 'swap';",
    )
    .expect("swap the names");
    drop(db);
    for args in [
        vec!["key", "id", "web-tls"],
        vec!["sign", "--name", "web-tls", "--out", "-"],
        vec!["key", "show", "--name", "web-tls"],
    ] {
        let o = env.run(&args, b"msg");
        assert_fail(
            &o,
            6,
            "integrity check failed: 2 of the store's 3 key records fail their MAC",
            &format!("{args:?}"),
        );
        assert!(
            o.stdout.is_empty(),
            "{args:?}: expected no output\n{}",
            show(&o)
        );
    }
}
