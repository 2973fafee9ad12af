//! The audit log through the real binary on real stores (docs/cli.md, "The audit log"): what each
//! key use and lifecycle change records, that `audit verify` finds each attack on the file and
//! names its line, and how `audit show` filters.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::process::Stdio;

use serde_json::Value;
use support::env::*;

/// A plaintext that must never reach the audit log.
const PLAINTEXT: &str = "audit canary: the safe opens with 31415926-walrus-nebula";

fn audit_log(env: &Env) -> std::path::PathBuf {
    env.store.join(keyhold::audit::FILE)
}

fn lines(env: &Env) -> Vec<String> {
    std::fs::read_to_string(audit_log(env))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn rewrite(env: &Env, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(audit_log(env), text).unwrap();
}

/// `audit show --json` (with `extra` arguments) as its entries.
fn entries(env: &Env, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "show", "--json"];
    args.extend_from_slice(extra);
    let out = env.ok(&args, b"", &format!("{args:?}"));
    match parse_json(&out, "audit show --json") {
        Value::Array(entries) => entries,
        other => panic!("audit show --json: expected an array, got {other}"),
    }
}

/// What an entry says, in a form to compare: (operation, key_id, version, namespace, outcome).
fn summary(e: &Value) -> (String, Option<String>, Option<u64>, Option<String>, String) {
    let text = |k: &str| e[k].as_str().map(str::to_owned);
    (
        text("operation").unwrap(),
        text("key_id"),
        e["version"].as_u64(),
        text("namespace"),
        text("outcome").unwrap(),
    )
}

fn uid() -> u64 {
    u64::from(rustix::process::getuid().as_raw())
}

/// Runs keyhold with `stdin`, returning its output and its process ID (what the entries it makes
/// must name), with the harness's checks for secrets in its output.
fn run_with_pid(env: &Env, args: &[&str], stdin: &[u8]) -> (std::process::Output, u32) {
    use std::io::Write as _;
    let mut child = env
        .command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_no_secrets(&out, &[PASS.to_owned()], &format!("{args:?}"));
    (out, pid)
}

/// Every key use (software backend) and lifecycle change leaves one entry with the operation,
/// the key's ID, version and namespace, the outcome and the caller; failures are recorded with
/// their kind, an ID that fails authentication never is, and nothing secret is in the file.
#[test]
fn every_use_and_lifecycle_change_is_recorded_as_it_happened() {
    let env = Env::init().with_secret(PLAINTEXT);
    // Here even in remote mode: it checks that each entry's caller is the command's own process,
    // and through `keyhold serve` the caller is the service's process (the client is `client=`).
    let env = env.local_only("each entry's caller pid is the command's process");
    let signer = env.create_key("signer", "ed25519", &[]);
    let aes = env.create_key("vault", "aes-256-gcm", &[]);
    let mac = env.create_key("hooks", "hmac-sha256", &["--namespace", "team-a"]);
    let rsa = env.create_key("inbox", "rsa-2048", &["--purpose", "decrypt"]);
    let msg = env.write("msg", PLAINTEXT.as_bytes());

    let (out, sign_pid) = run_with_pid(&env, &["sign", "--key", &signer, "--out", "sig"], b"m");
    assert_ok(&out, "sign");
    env.ok(
        &[
            "verify",
            "--key",
            &signer,
            "--signature",
            "sig",
            "--in",
            "-",
        ],
        b"m",
        "verify",
    );
    let envelope = env.ok(&["encrypt", "--key", &aes, "--in", &msg], b"", "encrypt");
    // Plaintexts to files: the harness looks for the canary in every command's stdout.
    env.ok(
        &["decrypt", "--key", &aes, "--out", "plain"],
        &envelope,
        "decrypt",
    );
    assert_eq!(
        std::fs::read(env.file("plain")).unwrap(),
        PLAINTEXT.as_bytes()
    );
    let tampered = flip(&envelope, envelope.len() - 1);
    assert_fail(
        &env.run(&["decrypt", "--key", &aes], &tampered),
        1,
        "decryption failed",
        "decrypt of a tampered envelope",
    );
    env.ok(
        &["mac", "--key", &mac, "--in", &msg, "--out", "tag"],
        b"",
        "mac",
    );
    env.ok(
        &["mac-verify", "--key", &mac, "--tag", "tag", "--in", &msg],
        b"",
        "mac-verify",
    );
    let bent = env.write("bent", &flip(&std::fs::read(env.file("tag")).unwrap(), 0));
    assert_fail(
        &env.run(
            &["mac-verify", "--key", &mac, "--tag", &bent, "--in", &msg],
            b"",
        ),
        1,
        "tag invalid",
        "mac-verify of a wrong tag",
    );
    let sealed = env.ok(&["encrypt", "--key", &rsa, "--in", &msg], b"", "RSA-OAEP");
    env.ok(
        &["decrypt", "--key", &rsa, "--out", "plain"],
        &sealed,
        "RSA-OAEP decrypt",
    );
    assert_fail(
        &env.run(&["sign", "--key", &aes], b"m"),
        1,
        "cannot sign",
        "sign with an encryption key",
    );
    let forged = format!("{}A", &signer[..signer.len() - 1]);
    let forged = if forged == signer {
        format!("{}B", &signer[..signer.len() - 1])
    } else {
        forged
    };
    assert_fail(
        &env.run(&["sign", "--key", &forged], b"m"),
        3,
        "key ID failed authentication",
        "sign with a modified ID",
    );
    env.ok(
        &["key", "destroy", "--key", &aes, "--now", "--yes"],
        b"",
        "destroy",
    );
    assert_fail(
        &env.run(&["encrypt", "--key", &aes], b"m"),
        9,
        "is destroyed on",
        "encrypt with a destroyed key",
    );

    let all = entries(&env, &[]);
    let some = |s: &str| Some(s.to_owned());
    let v1 = Some(1);
    let default = some("default");
    let expected = vec![
        ("create", some(&signer), v1, default.clone(), "ok"),
        ("create", some(&aes), v1, default.clone(), "ok"),
        ("create", some(&mac), v1, some("team-a"), "ok"),
        ("create", some(&rsa), v1, default.clone(), "ok"),
        ("sign", some(&signer), v1, default.clone(), "ok"),
        ("verify", some(&signer), v1, default.clone(), "ok"),
        ("encrypt", some(&aes), v1, default.clone(), "ok"),
        ("decrypt", some(&aes), v1, default.clone(), "ok"),
        // A use that failed used no version.
        (
            "decrypt",
            some(&aes),
            None,
            default.clone(),
            "decryption_failed",
        ),
        ("mac", some(&mac), v1, some("team-a"), "ok"),
        ("mac-verify", some(&mac), v1, some("team-a"), "ok"),
        (
            "mac-verify",
            some(&mac),
            None,
            some("team-a"),
            "verification_failed",
        ),
        ("encrypt", some(&rsa), v1, default.clone(), "ok"),
        ("decrypt", some(&rsa), v1, default.clone(), "ok"),
        ("sign", some(&aes), None, default.clone(), "wrong_purpose"),
        ("sign", None, None, None, "key_id_authentication"),
        // Destruction in its two steps: the key is marked destroyed (unusable from then on),
        // then its material is erased.
        ("begin-destroy", some(&aes), v1, default.clone(), "ok"),
        ("destroy", some(&aes), v1, default.clone(), "ok"),
        ("encrypt", some(&aes), None, default.clone(), "wrong_state"),
    ];
    let expected: Vec<_> = expected
        .into_iter()
        .map(|(op, id, v, ns, outcome)| (op.to_owned(), id, v, ns, outcome.to_owned()))
        .collect();
    assert_eq!(all.iter().map(summary).collect::<Vec<_>>(), expected);

    // Numbered from 1, each by its caller: this user, and a process of its own per command.
    let mut pids = std::collections::BTreeSet::new();
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["seq"].as_u64(), Some(i as u64 + 1), "{e}");
        assert_eq!(e["caller"]["uid"].as_u64(), Some(uid()), "{e}");
        pids.insert(e["caller"]["pid"].as_u64().unwrap());
    }
    // One process per command, one entry per command but `key destroy`'s two.
    assert_eq!(pids.len(), all.len() - 1, "one command, one process");
    assert_eq!(all[4]["caller"]["pid"].as_u64(), Some(u64::from(sign_pid)));
    assert!(!pids.contains(&u64::from(std::process::id())));

    // The text form: one line per entry, its time in RFC 3339.
    let text = env.ok_text(&["audit", "show"]);
    let text_lines: Vec<&str> = text.lines().collect();
    assert_eq!(text_lines.len(), all.len());
    let time = all[4]["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.len() == 20, "{time}");
    assert_eq!(
        text_lines[4],
        format!(
            "{time} seq=5 sign outcome=ok namespace=default version=1 uid={} pid={sign_pid} \
             key={signer}",
            uid()
        )
    );
    assert!(text_lines[15].contains(" sign outcome=key_id_authentication namespace=- version=- "));
    assert!(text_lines[15].ends_with(" key=-"));

    // Nothing secret in the file: not the plaintext, not the passphrase, not the modified ID.
    let file = std::fs::read(audit_log(&env)).unwrap();
    for secret in [PLAINTEXT, PASS] {
        for (form, text) in secret_forms(secret) {
            assert!(
                !file.windows(text.len()).any(|w| w == text.as_bytes()),
                "the audit log holds {secret:?} as {form}"
            );
        }
    }
    assert!(!String::from_utf8(file.clone()).unwrap().contains(&forged));
    let mode = std::fs::metadata(audit_log(&env)).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let verified = env.ok_text(&["audit", "verify"]);
    let head = keyhold::hex::encode(
        aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            lines(&env).last().unwrap().as_bytes(),
        )
        .as_ref(),
    );
    assert_eq!(
        verified,
        format!("audit log verified: 19 entries, head {head}\n")
    );
    let json = parse_json(
        &env.ok(&["audit", "verify", "--json"], b"", "audit verify --json"),
        "audit verify --json",
    );
    assert_eq!(
        json,
        serde_json::json!({ "entries": 19, "head": head, "cut_short": false })
    );
}

/// A store with a few entries, and its audit log's lines.
fn store_with_entries() -> (Env, Vec<String>) {
    let env = Env::init();
    let id = env.create_key("k", "hmac-sha256", &[]);
    for _ in 0..4 {
        env.ok(&["mac", "--key", &id, "--encoding", "hex"], b"data", "mac");
    }
    env.ok(
        &["key", "destroy", "--key", &id, "--now", "--yes"],
        b"",
        "destroy",
    );
    let lines = lines(&env);
    assert_eq!(lines.len(), 7);
    (env, lines)
}

/// `audit verify` fails with exit 6 and the line and what is wrong with it; with `--json` as
/// an `integrity` error.
fn assert_verify_fails(env: &Env, says: &str, ctx: &str) {
    let out = env.run(&["audit", "verify"], b"");
    assert_fail(&out, 6, &format!("integrity check failed: {says}"), ctx);
    assert!(out.stdout.is_empty(), "{ctx}: {}", show(&out));
    let out = env.run(&["audit", "verify", "--json"], b"");
    assert_eq!(out.status.code(), Some(6), "{ctx}: {}", show(&out));
    let error = parse_json(&out.stderr, ctx);
    assert_eq!(error["error"]["kind"], "integrity", "{ctx}");
    assert_eq!(error["error"]["code"], 6, "{ctx}");
    assert!(
        error["error"]["message"].as_str().unwrap().contains(says),
        "{ctx}: {error}"
    );
}

#[test]
fn an_edited_entry_is_found_by_its_mac() {
    let (env, mut lines) = store_with_entries();
    assert!(lines[2].contains("\"outcome\":\"ok\""));
    lines[2] = lines[2].replace("\"outcome\":\"ok\"", "\"outcome\":\"wrong_purpose\"");
    rewrite(&env, &lines);
    assert_verify_fails(
        &env,
        "audit log line 3: it fails its MAC: it was changed, or written without the store's root",
        "an edited outcome",
    );
    // `show` reads entry by entry and stops at the same line.
    assert_fail(
        &env.run(&["audit", "show"], b""),
        6,
        "audit log line 3: it fails its MAC",
        "audit show of an edited log",
    );
}

#[test]
fn a_removed_entry_is_found_where_it_was() {
    let (env, mut lines) = store_with_entries();
    lines.remove(3);
    rewrite(&env, &lines);
    assert_verify_fails(
        &env,
        "audit log line 4: entry 5 where entry 4 belongs: entries were removed, added or \
         reordered",
        "a removed middle line",
    );
}

#[test]
fn swapped_entries_are_found() {
    let (env, mut lines) = store_with_entries();
    lines.swap(1, 4);
    rewrite(&env, &lines);
    assert_verify_fails(
        &env,
        "audit log line 2: entry 5 where entry 2 belongs",
        "lines 2 and 5 swapped",
    );
}

/// A line forged in the right place, chained to the line before it and numbered right, but
/// MAC'd without the store's root secret.
#[test]
fn a_forged_entry_fails_its_mac() {
    let (env, mut lines) = store_with_entries();
    let prev = keyhold::hex::encode(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, lines[2].as_bytes()).as_ref(),
    );
    let entry = format!(
        "{{\"seq\":4,\"time\":1796000000,\"operation\":\"destroy\",\"key_id\":null,\"version\":1,\
         \"namespace\":\"default\",\"outcome\":\"ok\",\"caller\":{{\"uid\":0,\"pid\":1}},\
         \"prev\":\"{prev}\"}}"
    );
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &[7u8; 32]);
    let mac = keyhold::hex::encode(aws_lc_rs::hmac::sign(&key, entry.as_bytes()).as_ref());
    lines[3] = format!("{{\"entry\":{entry},\"mac\":\"{mac}\"}}");
    rewrite(&env, &lines);
    assert_verify_fails(
        &env,
        "audit log line 4: it fails its MAC",
        "a forged fourth line",
    );
}

/// Key uses are in the log once the command ends, and restoring the file makes it verify again:
/// the attacks above failed for what they did, not for the test's rewriting.
#[test]
fn a_rewritten_but_unchanged_log_verifies() {
    let (env, lines) = store_with_entries();
    rewrite(&env, &lines);
    assert!(env
        .ok_text(&["audit", "verify"])
        .starts_with("audit log verified: 7 entries, head "));
}

#[test]
fn show_keeps_the_entries_of_one_key_or_since_a_time() {
    let env = Env::init();
    let a = env.create_key("a", "hmac-sha256", &[]);
    let b = env.create_key("b", "ed25519", &[]);
    for _ in 0..2 {
        env.ok(&["mac", "--key", &a, "--encoding", "hex"], b"x", "mac");
        env.ok(&["sign", "--key", &b, "--encoding", "hex"], b"x", "sign");
    }
    let of = |args: &[&str]| -> Vec<(String, String)> {
        entries(&env, args)
            .iter()
            .map(|e| {
                (
                    e["operation"].as_str().unwrap().to_owned(),
                    e["key_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let pairs = |op: &str, id: &str, n: usize| -> Vec<(String, String)> {
        std::iter::once(("create".to_owned(), id.to_owned()))
            .chain(std::iter::repeat_n((op.to_owned(), id.to_owned()), n))
            .collect()
    };
    assert_eq!(of(&["--key", &a]), pairs("mac", &a, 2));
    assert_eq!(of(&["--name", "b"]), pairs("sign", &b, 2));
    assert_eq!(of(&[]).len(), 6);

    // --since: from the last entry's second on, nothing after it, everything from the first's.
    let all = entries(&env, &[]);
    let first = all[0]["time"].as_str().unwrap().to_owned();
    let last = all[5]["time"].as_str().unwrap().to_owned();
    assert_eq!(entries(&env, &["--since", &first]).len(), 6);
    let from_last = entries(&env, &["--since", &last]);
    assert!(!from_last.is_empty() && from_last.len() <= 6);
    assert!(from_last
        .iter()
        .all(|e| e["time"].as_str().unwrap() >= last.as_str()));
    assert_eq!(entries(&env, &["--since", "+1h"]).len(), 0);
    assert_eq!(
        entries(&env, &["--since", "2000-01-01T00:00:00Z", "--key", &a]).len(),
        3
    );

    // Refused: a time that is not one, a modified ID, a name with no key, both selectors.
    assert_fail(
        &env.run(&["audit", "show", "--since", "yesterday"], b""),
        1,
        "`yesterday` is not a time",
        "--since yesterday",
    );
    let forged = format!(
        "{}{}",
        &a[..a.len() - 2],
        if a.ends_with("AA") { "BB" } else { "AA" }
    );
    assert_fail(
        &env.run(&["audit", "show", "--key", &forged], b""),
        3,
        "key ID failed authentication",
        "show --key with a modified ID",
    );
    assert_fail(
        &env.run(&["audit", "show", "--name", "nope"], b""),
        5,
        "no key named `nope`",
        "show --name of no key",
    );
    let out = env.run(&["audit", "show", "--key", &a, "--name", "a"], b"");
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

/// A key whose creation the log cannot record is not created: no key exists that the log does
/// not show.
#[test]
fn a_creation_the_log_cannot_record_is_undone() {
    let env = Env::init();
    // A directory where the log belongs: it cannot be opened for appending.
    std::fs::create_dir(audit_log(&env)).unwrap();
    assert_fail(
        &env.run(&["key", "create", "k", "--type", "ed25519"], b""),
        1,
        "open the audit log",
        "key create with an unwritable audit log",
    );
    assert_eq!(
        env.ok_text(&["key", "list"]).lines().count(),
        1,
        "only the header: the key was destroyed again"
    );
    std::fs::remove_dir(audit_log(&env)).unwrap();
    env.create_key("k", "ed25519", &[]);
    assert_eq!(entries(&env, &[]).len(), 1);
}

/// `[audit] enabled = false` writes no log (and `audit verify` still reads one).
#[test]
fn a_disabled_audit_log_records_nothing() {
    let env = Env::init().with_config("[audit]\nenabled = false\n");
    let id = env.create_key("k", "ed25519", &[]);
    env.ok(&["sign", "--key", &id, "--encoding", "hex"], b"x", "sign");
    assert!(!audit_log(&env).exists());
    assert_eq!(
        env.ok_text(&["audit", "verify"]),
        format!("audit log verified: 0 entries, head {}\n", "0".repeat(64))
    );
}

/// The same on a SoftHSM2 token: a token key's uses and lifecycle are recorded as a software
/// key's are (the log is the keystore's, whatever the backend).
#[cfg(feature = "pkcs11")]
#[test]
fn a_token_key_is_recorded_as_any_other() {
    use keyhold::testing::SoftHsm;
    let hsm = SoftHsm::new().unwrap();
    let env = Env::on_softhsm(&hsm);
    env.init_store();
    let ec = env.create_key("t-ec", "ecdsa-p256", &["--backend", "hsm"]);
    let aes = env.create_key("t-aes", "aes-256-gcm", &["--backend", "hsm"]);
    env.ok(&["sign", "--key", &ec, "--encoding", "hex"], b"m", "sign");
    let envelope = env.ok(&["encrypt", "--key", &aes], b"m", "encrypt");
    assert_fail(
        &env.run(
            &["decrypt", "--key", &aes],
            &flip(&envelope, envelope.len() - 1),
        ),
        1,
        "decryption failed",
        "decrypt of a tampered envelope on the token",
    );
    env.ok(
        &["key", "destroy", "--key", &ec, "--now", "--yes"],
        b"",
        "destroy",
    );
    let got: Vec<_> = entries(&env, &[]).iter().map(summary).collect();
    let entry = |op: &str, id: &str, outcome: &str| {
        (
            op.to_owned(),
            Some(id.to_owned()),
            Some(1),
            Some("default".to_owned()),
            outcome.to_owned(),
        )
    };
    assert_eq!(
        got,
        [
            entry("create", &ec, "ok"),
            entry("create", &aes, "ok"),
            entry("sign", &ec, "ok"),
            entry("encrypt", &aes, "ok"),
            (
                "decrypt".to_owned(),
                Some(aes.clone()),
                None,
                Some("default".to_owned()),
                "decryption_failed".to_owned(),
            ),
            entry("begin-destroy", &ec, "ok"),
            entry("destroy", &ec, "ok"),
        ]
    );
    assert!(env
        .ok_text(&["audit", "verify"])
        .starts_with("audit log verified: 7 entries, head "));
}
