//! The CLI contract of docs/cli.md, against the real binary in temp stores: the key lifecycle —
//! rotation and versions, states, scheduled destruction, policy, history, `rewrap` and `maintain`,
//! on the software backend, a SoftHSM2 token and a TPM (swtpm).
//!
//! Schedules are tested with real time: a key is given a schedule one second ahead and the test
//! waits generously (over two seconds) before it expects the work done; nothing asserts that
//! work is *not* done within a wall-clock bound, except for schedules an hour away.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::time::Duration;

use serde_json::Value as Json;
use support::env::*;
use support::field;

/// Longer than any one-second schedule, with room for a loaded machine.
const PAST_ONE_SECOND: Duration = Duration::from_millis(2500);

/// Encrypts `plain` with `key` into the scratch file `name`; returns its path.
fn encrypt(env: &Env, key: &str, plain: &[u8], name: &str) -> String {
    let path = env.path_str(name);
    env.ok(
        &["encrypt", "--key", key, "--out", &path],
        plain,
        &format!("encrypt into {name}"),
    );
    path
}

/// Decrypts the envelope at `path` with `key`, with `--json`; the plaintext and the version the
/// report names (the report is on stderr, as the plaintext is on stdout).
fn decrypt(env: &Env, key: &str, path: &str, extra: &[&str]) -> (Vec<u8>, u64) {
    let mut args = vec![
        "--json", "decrypt", "--key", key, "--in", path, "--out", "-",
    ];
    args.extend_from_slice(extra);
    let out = env.run(&args, b"");
    assert_ok(&out, &format!("decrypt {path}"));
    // The report is stderr's JSON line (a compromised key's WARN line comes before it).
    let err = stderr(&out);
    let line = err
        .lines()
        .rfind(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("decrypt --json: no report on stderr:\n{err}"));
    let report = parse_json(line.as_bytes(), "decrypt --json report on stderr");
    let version = report["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("decrypt --json: no version in {report}"));
    (out.stdout, version)
}

/// The version a `--json` report on stdout names (sign, mac, verify, mac-verify).
fn version_of(out: &[u8], ctx: &str) -> u64 {
    let v = parse_json(out, ctx);
    v["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("{ctx}: no version in {v}"))
}

fn show(env: &Env, key: &str) -> String {
    env.ok_text(&["key", "show", "--key", key])
}

#[test]
fn rotation_keeps_the_id_and_every_older_output_still_works() {
    let env = Env::init();
    let aes = env.create_key("vault", "aes-256-gcm", &[]);
    let sig = env.create_key("signer", "ecdsa-p256", &[]);
    let mac = env.create_key("mac", "hmac-sha256", &[]);
    let e1 = encrypt(&env, &aes, b"first secret", "e1");
    let s1 = env.ok(&["sign", "--key", &sig, "--out", "-"], b"doc", "sign v1");
    let s1 = env.write("s1", &s1);
    let t1 = env.ok(&["mac", "--key", &mac, "--out", "-"], b"doc", "mac v1");
    let t1 = env.write("t1", &t1);

    for (key, name) in [(&aes, "vault"), (&sig, "signer"), (&mac, "mac")] {
        let out = env.ok_text(&["key", "rotate", "--key", key, "--reason", "yearly rotation"]);
        assert_eq!(out, format!("rotated default/{name} to version 2\n"));
    }
    // --json: the key object, same ID, version 3.
    let v = parse_json(
        &env.ok(
            &["--json", "key", "rotate", "--name", "vault"],
            b"",
            "rotate --json",
        ),
        "rotate --json",
    );
    assert_eq!(
        v["id"].as_str(),
        Some(aes.as_str()),
        "rotation keeps the ID: {v}"
    );
    assert_eq!(v["version"], 3, "{v}");
    let versions: Vec<u64> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2, 3], "{v}");
    let shown = show(&env, &aes);
    assert_eq!(field(&shown, "id"), aes);
    assert_eq!(field(&shown, "version"), "3");
    assert_eq!(
        field(&shown, "versions").matches(" (").count(),
        3,
        "{shown}"
    );
    let list = env.ok_text(&["key", "list"]);
    assert_eq!(
        list.lines().count(),
        4,
        "one row per key, not per version:\n{list}"
    );

    // The old envelope decrypts (version 1), rewrap moves it to the newest version.
    let (plain, version) = decrypt(&env, &aes, &e1, &[]);
    assert_eq!((plain.as_slice(), version), (&b"first secret"[..], 1));
    let e3 = env.path_str("e3");
    let out = env.run(
        &["--json", "rewrap", "--key", &aes, "--in", &e1, "--out", &e3],
        b"",
    );
    assert_ok(&out, "rewrap --json --out FILE");
    assert_eq!(
        parse_json(&out.stdout, "rewrap report on stdout"),
        serde_json::json!({"version": 3, "state": "active", "compromised": false})
    );
    let (plain, version) = decrypt(&env, &aes, &e3, &[]);
    assert_eq!((plain.as_slice(), version), (&b"first secret"[..], 3));
    // A rewrap with the wrong AAD authenticates nothing and writes nothing.
    let e_bad = env.path_str("e-bad");
    let o = env.run(
        &[
            "rewrap", "--key", &aes, "--aad", "other", "--in", &e1, "--out", &e_bad,
        ],
        b"",
    );
    assert_fail(&o, 1, "", "rewrap with another AAD");
    assert!(
        !std::path::Path::new(&e_bad).exists(),
        "rewrap wrote an envelope"
    );

    // The old signature and tag verify, and say with which version; new ones use version 2.
    for (check, key, flag, path, made) in [
        ("verify", &sig, "--signature", &s1, "sign"),
        ("mac-verify", &mac, "--tag", &t1, "mac"),
    ] {
        let out = env.ok(&["--json", check, "--key", key, flag, path], b"doc", check);
        assert_eq!(version_of(&out, check), 1, "{check} of a version-1 output");
        let out = env.ok(&["--json", made, "--key", key], b"doc", made);
        assert_eq!(version_of(&out, made), 2, "{made} uses the newest version");
        // --version 2 checks with version 2 only: the version-1 output is invalid there.
        let o = env.run(&[check, "--key", key, flag, path, "--version", "2"], b"doc");
        assert_fail(
            &o,
            1,
            "invalid",
            &format!("{check} --version 2 of a v1 output"),
        );
        env.ok(
            &[check, "--key", key, flag, path, "--version", "1"],
            b"doc",
            check,
        );
    }

    // min decrypt version: out of range is refused (exit 1); 2 retires version 1 (exit 9).
    let o = env.run(
        &["key", "set", "--key", &aes, "--min-decrypt-version", "4"],
        b"",
    );
    assert_fail(
        &o,
        1,
        "has versions 1 to 3",
        "min decrypt version above the current",
    );
    let o = env.run(
        &["key", "set", "--key", &aes, "--min-decrypt-version", "0"],
        b"",
    );
    assert_fail(&o, 1, "must be one of them", "min decrypt version 0");
    let out = env.ok_text(&["key", "set", "--key", &aes, "--min-decrypt-version", "2"]);
    assert_eq!(out, "updated default/vault: min decrypt version 2\n");
    assert_eq!(field(&show(&env, &aes), "min decrypt version"), "2");
    let before = env.snapshot();
    let o = env.run(&["decrypt", "--key", &aes, "--in", &e1, "--out", "-"], b"");
    assert_fail(
        &o,
        9,
        "is retired below version 2",
        "a v1 envelope under min 2",
    );
    assert!(o.stdout.is_empty(), "no plaintext");
    env.assert_unchanged(&before, "a refused decryption");
    let o = env.run(&["rewrap", "--key", &aes, "--in", &e1, "--out", "-"], b"");
    assert_fail(
        &o,
        9,
        "is retired below version 2",
        "rewrap of a retired version",
    );
    env.ok(
        &["key", "set", "--key", &sig, "--min-decrypt-version", "2"],
        b"",
        "set",
    );
    let o = env.run(
        &[
            "verify",
            "--key",
            &sig,
            "--signature",
            &s1,
            "--version",
            "1",
        ],
        b"doc",
    );
    assert_fail(
        &o,
        9,
        "is retired below version 2",
        "verify --version 1 under min 2",
    );
    let o = env.run(&["verify", "--key", &sig, "--signature", &s1], b"doc");
    assert_fail(&o, 1, "signature invalid", "a v1 signature under min 2");
    // Versions above the current one are not the key's.
    let o = env.run(
        &[
            "verify",
            "--key",
            &sig,
            "--signature",
            &s1,
            "--version",
            "9",
        ],
        b"doc",
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "verify --version 9\n{}",
        support::env::show(&o)
    );
}

#[test]
fn each_state_allows_only_its_uses_and_says_which_state_refused() {
    let env = Env::init();
    let key = env.create_key("k", "aes-256-gcm", &[]);
    let e1 = encrypt(&env, &key, b"plain", "e1");

    let out = env.ok_text(&[
        "key",
        "suspend",
        "--key",
        &key,
        "--reason",
        "audit in progress",
    ]);
    assert_eq!(out, "suspended default/k\n");
    assert_eq!(field(&show(&env, &key), "state"), "suspended");
    let before = env.snapshot();
    let o = env.run(&["encrypt", "--key", &key, "--out", "-"], b"x");
    assert_fail(
        &o,
        9,
        "key `default/k` is suspended: it cannot encrypt",
        "encrypt, suspended",
    );
    assert!(o.stdout.is_empty());
    env.assert_unchanged(&before, "a refused encryption");
    assert_eq!(
        decrypt(&env, &key, &e1, &[]).0,
        b"plain",
        "a suspended key decrypts"
    );
    let o = env.run(&["--json", "encrypt", "--key", &key, "--out", "-"], b"x");
    let err = parse_json(&o.stderr, "encrypt --json, suspended");
    assert_eq!(err["error"]["kind"], "wrong_state", "{err}");
    assert_eq!(err["error"]["code"], 9, "{err}");
    let o = env.run(&["key", "suspend", "--key", &key], b"");
    assert_fail(&o, 9, "is suspended", "suspend a suspended key");

    assert_eq!(
        env.ok_text(&["key", "resume", "--key", &key]),
        "resumed default/k\n"
    );
    encrypt(&env, &key, b"plain", "e2");
    let o = env.run(&["key", "resume", "--key", &key], b"");
    assert_fail(&o, 9, "key `default/k` is active", "resume an active key");

    let out = env.ok_text(&["key", "deactivate", "--key", &key]);
    assert_eq!(out, "deactivated default/k\n");
    let o = env.run(&["encrypt", "--key", &key, "--out", "-"], b"x");
    assert_fail(&o, 9, "is deactivated", "encrypt, deactivated");
    assert_eq!(
        decrypt(&env, &key, &e1, &[]).0,
        b"plain",
        "a deactivated key decrypts"
    );
    let o = env.run(&["key", "rotate", "--key", &key], b"");
    assert_fail(&o, 9, "is deactivated", "rotate a deactivated key");
    let o = env.run(&["key", "resume", "--key", &key], b"");
    assert_fail(&o, 9, "is deactivated", "resume a deactivated key");

    // A reason is the operator's text: control characters are refused, and what may pass (a
    // bidirectional override, which reorders what a terminal shows) is escaped in the history.
    let o = env.run(
        &[
            "key",
            "compromise",
            "--key",
            &key,
            "--reason",
            "a\u{1b}[2Jb",
        ],
        b"",
    );
    assert_fail(
        &o,
        1,
        "without control characters",
        "a reason with an escape",
    );
    env.ok_text(&[
        "key",
        "compromise",
        "--key",
        &key,
        "--reason",
        "lost \u{202e}txt.exe",
    ]);
    let history = env.ok_text(&["key", "history", "--key", &key]);
    let last = history.lines().last().unwrap();
    assert!(
        last.contains(" compromised ") && last.ends_with("  lost \\u{202e}txt.exe"),
        "the override escaped in the text history:\n{history}"
    );
    let v = parse_json(
        &env.ok(&["--json", "key", "history", "--key", &key], b"", "h"),
        "h",
    );
    let reasons: Vec<&Json> = v.as_array().unwrap().iter().map(|e| &e["reason"]).collect();
    assert_eq!(
        reasons.last().copied(),
        Some(&Json::from("lost \u{202e}txt.exe")),
        "JSON keeps the reason as given (escaped by JSON's own rules)"
    );
}

#[test]
fn a_compromised_key_processes_only_when_allowed_and_every_output_says_so() {
    let env = Env::init();
    let sig = env.create_key("s", "ed25519", &[]);
    let aes = env.create_key("a", "aes-256-gcm", &[]);
    let s1 = env.write(
        "s1",
        &env.ok(&["sign", "--key", &sig, "--out", "-"], b"m", "sign"),
    );
    let e1 = encrypt(&env, &aes, b"plain", "e1");
    for (key, name) in [(&sig, "s"), (&aes, "a")] {
        let out = env.ok_text(&[
            "key",
            "compromise",
            "--key",
            key,
            "--reason",
            "laptop stolen",
        ]);
        assert_eq!(out, format!("marked default/{name} compromised\n"));
    }
    let o = env.run(&["sign", "--key", &sig, "--out", "-"], b"m");
    assert_fail(&o, 9, "is compromised: it cannot sign", "sign, compromised");
    let o = env.run(&["verify", "--key", &sig, "--signature", &s1], b"m");
    assert_fail(
        &o,
        9,
        "pass --allow-compromised",
        "verify, compromised, not allowed",
    );
    let o = env.run(&["decrypt", "--key", &aes, "--in", &e1, "--out", "-"], b"");
    assert_fail(
        &o,
        9,
        "pass --allow-compromised",
        "decrypt, compromised, not allowed",
    );
    assert!(o.stdout.is_empty());

    let o = env.run(
        &[
            "verify",
            "--key",
            &sig,
            "--signature",
            &s1,
            "--allow-compromised",
        ],
        b"m",
    );
    assert_ok(&o, "verify --allow-compromised");
    assert_eq!(stdout_str(&o), "signature valid\n");
    let err = stderr(&o);
    assert!(
        err.contains("WARN") && err.contains("compromised") && err.contains("default/s"),
        "a warning naming the compromised key at the default log level:\n{err}"
    );
    let out = env.ok(
        &[
            "--json",
            "verify",
            "--key",
            &sig,
            "--signature",
            &s1,
            "--allow-compromised",
        ],
        b"m",
        "verify --json --allow-compromised",
    );
    assert_eq!(
        parse_json(&out, "verify --json"),
        serde_json::json!({"valid": true, "version": 1, "state": "compromised", "compromised": true})
    );
    let (plain, _) = decrypt(&env, &aes, &e1, &["--allow-compromised"]);
    assert_eq!(plain, b"plain");
    let o = env.run(
        &[
            "--json",
            "decrypt",
            "--key",
            &aes,
            "--in",
            &e1,
            "--out",
            "-",
            "--allow-compromised",
        ],
        b"",
    );
    let report = stderr(&o);
    assert!(
        report.contains("\"compromised\":true") && report.contains("WARN"),
        "decrypt --json of a compromised key: flagged on stderr:\n{report}"
    );
    // Compromised is for good.
    let o = env.run(&["key", "resume", "--key", &aes], b"");
    assert_fail(&o, 9, "is compromised", "resume a compromised key");
}

#[test]
fn destruction_is_scheduled_shown_refuses_protection_and_can_be_cancelled() {
    let env = Env::init();
    let key = env.create_key("k", "aes-256-gcm", &[]);
    let e1 = encrypt(&env, &key, b"plain", "e1");
    let o = env.run(&["key", "cancel-destroy", "--key", &key], b"");
    assert_fail(
        &o,
        1,
        "is not scheduled for destruction",
        "cancel with nothing scheduled",
    );

    let out = env.ok_text(&["key", "destroy", "--key", &key, "--reason", "project ended"]);
    let date = out
        .strip_prefix("default/k will be destroyed on ")
        .and_then(|rest| rest.split_once(' '))
        .map(|(date, rest)| {
            assert_eq!(
                rest,
                format!("(keyhold key cancel-destroy --key {key} keeps it)\n")
            );
            date.to_owned()
        })
        .unwrap_or_else(|| panic!("key destroy: {out}"));
    // The 7-day default: the date is 7 days after the key's creation (give or take a minute).
    let v = parse_json(
        &env.ok(&["--json", "key", "show", "--key", &key], b"", "show"),
        "show",
    );
    assert_eq!(v["destroy_at"].as_str(), Some(date.as_str()), "{v}");
    assert!(v["destroyed_at"].is_null(), "{v}");
    let at = |t: &str| humantime_secs(t);
    let wait = at(&date) - at(v["created"].as_str().unwrap());
    assert!(
        (7 * 86_400..7 * 86_400 + 120).contains(&wait),
        "default destruction {wait} s after creation"
    );
    assert_eq!(
        field(&show(&env, &key), "state"),
        format!("active, destruction scheduled for {date}")
    );
    let list = env.ok_text(&["key", "list"]);
    assert_eq!(
        list.lines().nth(1).unwrap().split_whitespace().nth(4),
        Some("destroy-pending"),
        "{list}"
    );
    let o = env.run(&["encrypt", "--key", &key, "--out", "-"], b"x");
    assert_fail(
        &o,
        9,
        &format!("is scheduled for destruction on {date}"),
        "encrypt, pending",
    );
    assert_eq!(
        decrypt(&env, &key, &e1, &[]).0,
        b"plain",
        "a pending key decrypts"
    );
    let o = env.run(&["key", "rotate", "--key", &key], b"");
    assert_fail(&o, 9, "scheduled for destruction", "rotate, pending");

    let out = env.ok_text(&[
        "key",
        "cancel-destroy",
        "--key",
        &key,
        "--reason",
        "still needed",
    ]);
    assert_eq!(out, "kept default/k: its destruction is cancelled\n");
    assert_eq!(field(&show(&env, &key), "state"), "active");
    encrypt(&env, &key, b"again", "e2");

    // --after: its own delay; 0s would skip --now's confirmation.
    let out = env.ok_text(&["key", "destroy", "--key", &key, "--after", "30d"]);
    assert!(out.starts_with("default/k will be destroyed on "), "{out}");
    let v = parse_json(
        &env.ok(&["--json", "key", "show", "--key", &key], b"", "show"),
        "show",
    );
    let wait = at(v["destroy_at"].as_str().unwrap()) - at(v["created"].as_str().unwrap());
    assert!(
        (30 * 86_400..30 * 86_400 + 120).contains(&wait),
        "--after 30d: {wait}"
    );
    env.ok_text(&["key", "cancel-destroy", "--key", &key]);
    let o = env.run(&["key", "destroy", "--key", &key, "--after", "0s"], b"");
    assert_fail(&o, 2, "pass --now", "--after 0s");
    let o = env.run(
        &["key", "destroy", "--key", &key, "--after", "1d", "--now"],
        b"",
    );
    assert_fail(&o, 2, "cannot be used with", "--after with --now");

    // The history: every transition, with its reason (text and JSON).
    let history = env.ok_text(&["key", "history", "--key", &key]);
    let events: Vec<Vec<&str>> = history
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let names: Vec<&str> = events.iter().map(|e| e[2]).collect();
    assert_eq!(
        names,
        [
            "created",
            "destroy-scheduled",
            "destroy-cancelled",
            "destroy-scheduled",
            "destroy-cancelled"
        ],
        "{history}"
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e[0], (i + 1).to_string(), "SEQ: {history}");
        assert_eq!((e[4], e[6]), ("->", "v1"), "FROM -> TO  vN: {history}");
    }
    assert!(
        history
            .lines()
            .nth(1)
            .unwrap()
            .ends_with("  v1  project ended"),
        "{history}"
    );
    assert!(
        history
            .lines()
            .nth(2)
            .unwrap()
            .ends_with("  v1  still needed"),
        "{history}"
    );
    let v = parse_json(
        &env.ok(&["--json", "key", "history", "--key", &key], b"", "h"),
        "h",
    );
    assert_eq!(v[1]["event"], "destroy-scheduled", "{v}");
    assert_eq!(v[1]["reason"], "project ended", "{v}");
    assert_eq!(v[0]["reason"], Json::Null, "{v}");
    // The entry that made the key comes from no state: null (it said "none"), as the service's.
    assert_eq!(v[0]["from"], Json::Null, "{v}");
    assert_eq!(v[1]["from"], "active", "{v}");
    assert_eq!(
        json_keys(&v[0], "history"),
        ["at", "event", "from", "reason", "seq", "to", "version"]
    );
}

/// Seconds since the epoch of an RFC 3339 UTC time.
fn humantime_secs(t: &str) -> i64 {
    keyhold::time::parse_instant(t, 0).unwrap_or_else(|e| panic!("{t}: {e}"))
}

#[test]
fn destroy_now_asks_on_a_terminal_and_needs_yes_without_one() {
    let env = Env::init();
    let key = env.create_key("doomed", "ecdsa-p256", &[]);
    let before = env.snapshot();
    let o = env.detached(&["key", "destroy", "--now", "--key", &key], |_| {});
    assert_fail(
        &o,
        2,
        "pass --yes",
        "--now without a terminal and without --yes",
    );
    env.assert_unchanged(&before, "a refused --now");
    let o = env.run(&["key", "destroy", "--yes", "--key", &key], b"");
    assert_fail(&o, 2, "--now", "--yes without --now");

    // On a terminal: the wrong name keeps the key, its name destroys it.
    let on_terminal = |answer: &[u8]| {
        env.on_terminal_typing(&["key", "destroy", "--now", "--key", &key], Some(answer))
    };
    let o = on_terminal(b"keeper\n");
    assert_ne!(
        o.status.code(),
        Some(0),
        "wrong name\n{}",
        support::env::show(&o)
    );
    assert!(
        stdout_str(&o).contains("type its name to confirm"),
        "{}",
        stdout_str(&o)
    );
    assert!(
        stdout_str(&o).contains("was not destroyed"),
        "{}",
        stdout_str(&o)
    );
    env.assert_unchanged(&before, "a wrong name typed");
    let o = on_terminal(b"doomed\n");
    assert_ok(&o, "the name typed");
    assert!(
        stdout_str(&o).contains("destroyed default/doomed"),
        "{}",
        stdout_str(&o)
    );

    // A tombstone: hidden from the list but --all, its ID says when.
    let shown = show(&env, &key);
    assert_eq!(field(&shown, "state"), "destroyed");
    let when = field(&shown, "destroyed").to_owned();
    assert_eq!(field(&shown, "versions"), "-");
    let list = env.ok_text(&["key", "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    let all = env.ok_text(&["key", "list", "--all"]);
    assert!(
        all.lines()
            .nth(1)
            .is_some_and(|l| l.contains(" destroyed ")),
        "{all}"
    );
    let v = parse_json(
        &env.ok(&["--json", "key", "list", "--all"], b"", "list"),
        "list",
    );
    assert_eq!(v[0]["destroyed_at"].as_str(), Some(when.as_str()), "{v}");
    assert_eq!(v[0]["state"], "destroyed", "{v}");
    let says = format!("is destroyed on {when}");
    let o = env.run(&["key", "cancel-destroy", "--key", &key], b"");
    assert_fail(&o, 9, &says, "cancel after destruction");
    let o = env.run(&["sign", "--key", &key, "--out", "-"], b"m");
    assert_fail(&o, 9, &says, "sign with a tombstone");
    // The name is free again.
    env.create_key("doomed", "ecdsa-p256", &[]);
}

#[test]
fn due_work_is_done_by_maintain_and_by_any_command_on_the_key() {
    let env = Env::init();
    assert_eq!(env.ok_text(&["maintain"]), "nothing due\n");
    assert_eq!(env.ok_text(&["--json", "maintain"]), "[]\n");
    let by_maintain = env.create_key("m", "aes-256-gcm", &[]);
    let by_use = env.create_key("u", "aes-256-gcm", &[]);
    let e1 = encrypt(&env, &by_use, b"plain", "e1");
    let expiring = env.create_key("x", "aes-256-gcm", &["--deactivate-at", "+1s"]);
    let shown_expiring = env.create_key("y", "aes-256-gcm", &["--deactivate-at", "+1s"]);
    let rotating = env.create_key("r", "hmac-sha256", &["--rotate-after", "1s"]);
    let shown = show(&env, &rotating);
    assert_eq!(field(&shown, "rotate after"), "1s");
    for key in [&by_maintain, &by_use] {
        env.ok_text(&["key", "destroy", "--key", key, "--after", "1s"]);
    }
    std::thread::sleep(PAST_ONE_SECOND);

    // A command on the key does its due work first.
    let o = env.run(
        &["decrypt", "--key", &by_use, "--in", &e1, "--out", "-"],
        b"",
    );
    assert_fail(
        &o,
        9,
        "key `default/u` is destroyed on ",
        "decrypt after the schedule",
    );
    let o = env.run(&["encrypt", "--key", &expiring, "--out", "-"], b"x");
    assert_fail(&o, 9, "is deactivated", "encrypt after --deactivate-at");
    // key show too: it tells the key as it is now, not as its record was.
    assert_eq!(field(&show(&env, &shown_expiring), "state"), "deactivated");
    let out = env.ok(
        &["--json", "mac", "--key", &rotating],
        b"m",
        "mac after rotate-after",
    );
    assert!(version_of(&out, "mac") >= 2, "rotate-after rotated on use");

    let out = env.ok_text(&["maintain"]);
    assert!(
        out.lines().any(|l| l == "default/m: destroyed"),
        "maintain:\n{out}\nhistory of m:\n{}",
        env.ok_text(&["key", "history", "--key", &by_maintain])
    );
    assert!(
        !out.contains("default/u"),
        "done already by the decrypt:\n{out}"
    );
    assert!(
        !out.contains("default/x") && !out.contains("default/y"),
        "done already by the encrypt and the key show:\n{out}"
    );

    let history = env.ok_text(&["key", "history", "--key", &rotating]);
    assert!(
        history
            .lines()
            .any(|l| l.contains(" rotated ") && l.ends_with("rotate-after reached")),
        "{history}"
    );
    let history = env.ok_text(&["key", "history", "--key", &expiring]);
    assert!(
        history
            .lines()
            .any(|l| l.contains(" expired ") && l.contains("active -> deactivated")),
        "{history}"
    );
    let list = env.ok_text(&["key", "list", "--all"]);
    for name in ["m", "u"] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(&format!("{name} ")) && l.contains(" destroyed ")),
            "{list}"
        );
    }
    env.ok_text(&["key", "set", "--key", &rotating, "--rotate-after", "never"]);
    assert_eq!(field(&show(&env, &rotating), "rotate after"), "never");
}

#[test]
fn an_activation_time_holds_every_use_until_then() {
    let env = Env::init();
    let key = env.create_key("later", "aes-256-gcm", &["--activate-at", "+1h"]);
    let shown = show(&env, &key);
    assert_eq!(field(&shown, "state"), "pre-activation");
    let at = field(&shown, "activate at").to_owned();
    let o = env.run(&["encrypt", "--key", &key, "--out", "-"], b"x");
    assert_fail(
        &o,
        9,
        &format!("key `default/later` is in pre-activation until {at}"),
        "encrypt before activation",
    );
    // --activate-at on an active key is refused; on this one it moves the time.
    let active = env.create_key("now", "aes-256-gcm", &[]);
    let o = env.run(
        &["key", "set", "--key", &active, "--activate-at", "+1s"],
        b"",
    );
    assert_fail(
        &o,
        1,
        "only a key in pre-activation",
        "activate-at on an active key",
    );
    env.ok_text(&["key", "set", "--key", &key, "--activate-at", "+1s"]);
    std::thread::sleep(PAST_ONE_SECOND);
    encrypt(&env, &key, b"plain", "e1");
    assert_eq!(field(&show(&env, &key), "state"), "active");
    let history = env.ok_text(&["key", "history", "--key", &key]);
    assert!(
        history
            .lines()
            .any(|l| l.contains(" activated ") && l.ends_with("activation time reached")),
        "{history}"
    );
    // Bad values are refused before anything changes.
    let before = env.snapshot();
    for (args, code, says) in [
        (vec!["--rotate-after", "soon"], 1, "is not a duration"),
        (vec!["--deactivate-at", "tomorrow"], 1, "is not a time"),
        (vec![], 2, "nothing to set"),
    ] {
        let mut all = vec!["key", "set", "--key", &key];
        all.extend(args);
        let o = env.run(&all, b"");
        assert_fail(&o, code, says, &format!("{all:?}"));
    }
    let o = env.run(
        &[
            "key",
            "create",
            "bad",
            "--type",
            "aes-256-gcm",
            "--activate-at",
            "x",
        ],
        b"",
    );
    assert_fail(&o, 1, "is not a time", "create --activate-at x");
    env.assert_unchanged(&before, "refused settings");
}

#[test]
fn the_gcm_invocation_limit_rotates_before_it_is_passed() {
    let env = Env::new().with_config("[lifecycle]\ngcm_invocation_limit = 3\n");
    env.init_store();
    let key = env.create_key("k", "aes-256-gcm", &[]);
    let mut versions = Vec::new();
    let mut envelopes = Vec::new();
    for i in 0..4 {
        let path = env.path_str(&format!("e{i}"));
        let out = env.ok(
            &["--json", "encrypt", "--key", &key, "--out", &path],
            format!("plain {i}").as_bytes(),
            "encrypt",
        );
        versions.push(version_of(&out, "encrypt --json --out FILE"));
        envelopes.push(path);
    }
    assert_eq!(versions, [1, 1, 1, 2], "the 4th encryption rotates");
    assert_eq!(field(&show(&env, &key), "id"), key);
    for (i, path) in envelopes.iter().enumerate() {
        let (plain, version) = decrypt(&env, &key, path, &[]);
        assert_eq!(plain, format!("plain {i}").as_bytes());
        assert_eq!(version, versions[i]);
    }
}

#[cfg(feature = "pkcs11")]
#[test]
fn a_token_key_rotates_in_the_token_and_destruction_removes_every_version() {
    use keyhold::testing::SoftHsm;
    let hsm = SoftHsm::new().unwrap();
    let env = Env::on_softhsm(&hsm);
    env.init_store();
    let key = env.create_key("t", "ecdsa-p256", &["--backend", "hsm"]);
    let aes = env.create_key("ta", "aes-256-gcm", &["--backend", "hsm"]);
    let s1 = env.write(
        "s1",
        &env.ok(&["sign", "--key", &key, "--out", "-"], b"m", "sign"),
    );
    let e1 = encrypt(&env, &aes, b"token plain", "e1");
    let session = support::pkcs11::raw_session(hsm.label());
    let count = |label: &str| support::pkcs11::objects(&session, label, None).len();
    let (ec_v1, aes_v1) = (count("default/t"), count("default/ta"));
    assert!(
        ec_v1 >= 2 && aes_v1 >= 1,
        "objects before rotation: {ec_v1}, {aes_v1}"
    );

    for (k, name) in [(&key, "t"), (&aes, "ta")] {
        let out = env.ok_text(&["key", "rotate", "--key", k]);
        assert_eq!(out, format!("rotated default/{name} to version 2\n"));
        assert_eq!(field(&show(&env, k), "id"), k.as_str());
    }
    assert_eq!(
        count("default/t"),
        2 * ec_v1,
        "version 2 is made in the token"
    );
    assert_eq!(
        count("default/ta"),
        2 * aes_v1,
        "version 2 is made in the token"
    );
    let out = env.ok(
        &["--json", "verify", "--key", &key, "--signature", &s1],
        b"m",
        "verify",
    );
    assert_eq!(version_of(&out, "verify"), 1);
    let out = env.ok(&["--json", "sign", "--key", &key], b"m", "sign v2");
    assert_eq!(version_of(&out, "sign"), 2);
    let (plain, version) = decrypt(&env, &aes, &e1, &[]);
    assert_eq!((plain.as_slice(), version), (&b"token plain"[..], 1));
    let e2 = env.path_str("e2");
    env.ok(
        &["rewrap", "--key", &aes, "--in", &e1, "--out", &e2],
        b"",
        "rewrap",
    );
    assert_eq!(decrypt(&env, &aes, &e2, &[]), (b"token plain".to_vec(), 2));

    for k in [&key, &aes] {
        env.ok_text(&["key", "destroy", "--now", "--yes", "--key", k]);
    }
    assert_eq!(count("default/t"), 0, "every version's objects destroyed");
    assert_eq!(count("default/ta"), 0, "every version's objects destroyed");
}

#[cfg(feature = "tpm")]
#[test]
fn a_tpm_key_rotates_in_the_tpm_and_old_signatures_verify() {
    let tpm = keyhold::testing::Swtpm::new().unwrap();
    let env = Env::new()
        .with_config(&format!(
            "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\n",
            tpm.tcti()
        ))
        .with_var("TSS2_LOG", "all+none");
    env.init_store();
    let key = env.create_key("t", "ecdsa-p256", &["--backend", "tpm"]);
    let s1 = env.write(
        "s1",
        &env.ok(&["sign", "--key", &key, "--out", "-"], b"m", "sign"),
    );
    let out = env.ok_text(&["key", "rotate", "--key", &key, "--reason", "tpm rotation"]);
    assert_eq!(out, "rotated default/t to version 2\n");
    let shown = show(&env, &key);
    assert_eq!(
        (field(&shown, "id"), field(&shown, "backend")),
        (key.as_str(), "tpm")
    );
    let out = env.ok(
        &["--json", "verify", "--key", &key, "--signature", &s1],
        b"m",
        "verify",
    );
    assert_eq!(version_of(&out, "verify"), 1);
    let s2 = env.ok(&["--json", "sign", "--key", &key], b"m", "sign v2");
    assert_eq!(version_of(&s2, "sign"), 2);
    let s2 = b64(parse_json(&s2, "sign")["signature"].as_str().unwrap());
    let s2 = env.write("s2", &s2);
    let out = env.ok(
        &["--json", "verify", "--key", &key, "--signature", &s2],
        b"m",
        "verify",
    );
    assert_eq!(version_of(&out, "verify"), 2);
    env.ok_text(&["key", "destroy", "--now", "--yes", "--key", &key]);
    let o = env.run(&["verify", "--key", &key, "--signature", &s1], b"m");
    assert_fail(&o, 9, "is destroyed on", "verify with a destroyed TPM key");
}

/// `--after 1s` counts from when the key is scheduled, not from when the command started: a
/// store slow to unseal (here: a passphrase that arrives 1.5 s late through a FIFO) must not turn
/// a scheduled destruction into an immediate one.
#[test]
fn a_delay_counts_from_when_the_store_is_open() {
    let env = Env::init();
    let key = env.create_key("k", "aes-256-gcm", &[]);
    let fifo = env.file("passphrase.fifo");
    let made = std::process::Command::new(require_tool("mkfifo", "coreutils: a slow passphrase"))
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            std::fs::write(&fifo, format!("{PASS}\n")).unwrap();
        })
    };
    let fifo_arg = fifo.to_str().unwrap();
    let out = env.run(
        &[
            "--json",
            "--passphrase-file",
            fifo_arg,
            "key",
            "destroy",
            "--key",
            &key,
            "--after",
            "1s",
        ],
        b"",
    );
    writer.join().unwrap();
    assert_ok(&out, "key destroy --after 1s with a slow unseal");
    // The key as the command left it: scheduled, not destroyed.
    let v = parse_json(&out.stdout, "key destroy --json");
    assert_eq!(v["state"], "active", "{v}");
    assert!(
        v["destroyed_at"].is_null() && v["destroy_at"].is_string(),
        "{v}"
    );
}

/// openCryptoki's soft token (shared, machine-wide: this test works in a namespace of its own,
/// and the fixture destroys what is left in it): an RSA key rotates to a second key pair made in
/// the token under the same ID, the old signature verifies, and destruction removes both pairs.
#[cfg(feature = "pkcs11")]
#[test]
fn an_opencryptoki_key_rotates_in_the_token() {
    use keyhold::testing::{OpenCryptoki, OPENCRYPTOKI_LABEL, OPENCRYPTOKI_MODULE};
    let ock = OpenCryptoki::new().unwrap();
    let ns = ock.namespace().to_owned();
    let env = Env::new()
        .with_config(&hsm_config(OPENCRYPTOKI_MODULE, OPENCRYPTOKI_LABEL, ""))
        .with_var("KH_TEST_PIN", keyhold::testing::OPENCRYPTOKI_USER_PIN)
        .with_var("KEYHOLD_NAMESPACE", &ns);
    env.init_store();
    let id = env.create_key("r", "rsa-2048", &["--backend", "hsm"]);
    let s1 = env.write(
        "s1",
        &env.ok(&["sign", "--key", &id, "--out", "-"], b"m", "sign"),
    );
    let session = support::pkcs11::ock_raw_session();
    let label = format!("{ns}/r");
    let count = || support::pkcs11::objects(&session, &label, None).len();
    let v1 = count();
    assert!(v1 >= 2, "the key pair is on the token: {v1}");
    let out = env.ok_text(&["key", "rotate", "--key", &id]);
    assert_eq!(out, format!("rotated {ns}/r to version 2\n"));
    assert_eq!(count(), 2 * v1, "version 2 is a key pair made in the token");
    let out = env.ok(
        &["--json", "verify", "--key", &id, "--signature", &s1],
        b"m",
        "verify v1",
    );
    assert_eq!(version_of(&out, "verify"), 1);
    let out = env.ok(&["--json", "sign", "--key", &id], b"m", "sign v2");
    assert_eq!(version_of(&out, "sign"), 2);
    env.ok_text(&["key", "destroy", "--now", "--yes", "--key", &id]);
    assert_eq!(count(), 0, "every version's objects destroyed");
}
