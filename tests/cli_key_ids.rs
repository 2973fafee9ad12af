//! The CLI contract of docs/cli.md, against the real binary in temp stores: Authenticated key IDs: a changed, malformed, foreign or destroyed ID is refused with its documented exit code.
//!
//! Each test builds its own store (Argon2 at the documented minimum, 19 MiB / 2 iterations)
//! through the shared harness (tests/support/env.rs), drives `keyhold` as a subprocess, and checks
//! exit codes, stdout formats and stderr messages exactly; failures must leave the store
//! byte-for-byte unchanged.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

// ---------------------------------------------------------------------------------------------
// 7. authenticated key IDs
// ---------------------------------------------------------------------------------------------

fn replacement_for(id: &str, pos: usize) -> Vec<char> {
    let chars: Vec<char> = id.chars().collect();
    let mut alphabet: Vec<char> = chars.clone();
    alphabet.sort_unstable();
    alphabet.dedup();
    let c = chars[pos];
    // Prefer characters the ID's own alphabet uses, so the change is well-formed, not just malformed.
    let mut reps: Vec<char> = alphabet.into_iter().filter(|&x| x != c).collect();
    if reps.is_empty() {
        reps.push(if c == 'a' { 'b' } else { 'a' });
    }
    reps
}

fn with_char(id: &str, pos: usize, rep: char) -> String {
    id.chars()
        .enumerate()
        .map(|(i, c)| if i == pos { rep } else { c })
        .collect()
}

#[test]
fn key_id_with_any_character_changed_fails_authentication() {
    let env = Env::init();
    let id = env.create_key("target", "ecdsa-p256", &[]);
    let _other = env.create_key("bystander", "ecdsa-p256", &[]);
    assert!(
        id.starts_with("kh1_"),
        "expected key IDs to start with `kh1_`, got {id}"
    );
    let before = env.snapshot();
    let n = id.chars().count();
    for pos in 0..n {
        let reps = replacement_for(&id, pos);
        // Three alternatives at the prefix and the last character (whose spare bits a lax
        // decoder could ignore), one elsewhere.
        let tries = if pos < 4 || pos == n - 1 { 3 } else { 1 };
        for rep in reps.iter().take(tries).copied() {
            let bad = with_char(&id, pos, rep);
            let o = env.run(&["key", "show", &format!("--key={bad}")], b"");
            assert_fail(
                &o,
                3,
                "key ID failed authentication",
                &format!("key show with char {pos} of the ID changed to {rep:?} ({bad})"),
            );
            assert!(
                o.stdout.is_empty(),
                "modified ID {bad}: expected nothing on stdout"
            );
        }
    }
    for pos in [0, 2, n / 2, n - 1] {
        let bad = with_char(&id, pos, replacement_for(&id, pos)[0]);
        let o = env.run(&["sign", &format!("--key={bad}")], b"payload");
        assert_fail(
            &o,
            3,
            "key ID failed authentication",
            &format!("sign with char {pos} of the ID changed"),
        );
        assert!(
            o.stdout.is_empty(),
            "sign with modified ID: expected no signature on stdout"
        );
    }
    env.assert_unchanged(&before, "modified key IDs");
    env.ok(
        &["sign", "--key", &id],
        b"payload",
        "the genuine ID still works",
    );
}

#[test]
fn malformed_key_ids_fail_authentication() {
    let env = Env::init();
    let id = env.create_key("target", "ed25519", &[]);
    let before = env.snapshot();
    let half = &id[..id.len() / 2];
    let minus_one = &id[..id.len() - 1];
    let plus_one = format!("{id}A");
    let upper = id.to_uppercase();
    let cases: Vec<(&str, String)> = vec![
        ("truncated by one char", minus_one.to_owned()),
        ("truncated to half", half.to_owned()),
        ("prefix only", "kh1_".to_owned()),
        ("empty", String::new()),
        (
            "garbage with prefix",
            "kh1_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz".to_owned(),
        ),
        ("one char appended", plus_one),
        ("upper-cased", upper),
    ];
    for (what, bad) in cases {
        assert_ne!(bad, id, "{what}: not a change");
        let o = env.run(&["key", "show", &format!("--key={bad}")], b"");
        assert_fail(
            &o,
            3,
            "key ID failed authentication",
            &format!("key show with a {what} ID {bad:?}"),
        );
    }
    // A name (no kh1_ prefix, at most 64 name characters) is not an ID: a usage error (exit 2)
    // that says to pass --name.
    for (what, bad) in [
        ("garbage", "not-a-key-id"),
        ("the name instead of the ID", "target"),
    ] {
        let o = env.run(&["key", "show", &format!("--key={bad}")], b"");
        assert_fail(
            &o,
            2,
            &format!("to use a key by name, pass --name {bad}"),
            what,
        );
    }
    env.assert_unchanged(&before, "malformed IDs");
}

#[test]
fn key_id_from_another_store_fails_authentication() {
    let one = Env::init();
    let two = Env::init();
    let id1 = one.create_key("same-name", "ecdsa-p256", &[]);
    let _id2 = two.create_key("same-name", "ecdsa-p256", &[]);
    let before = two.snapshot();
    let o = two.run(&["key", "show", "--key", &id1], b"");
    assert_fail(
        &o,
        3,
        "key ID failed authentication",
        "key show in store two with store one's ID",
    );
    let o = two.run(&["sign", "--key", &id1], b"payload");
    assert_fail(
        &o,
        3,
        "key ID failed authentication",
        "sign in store two with store one's ID",
    );
    assert!(
        o.stdout.is_empty(),
        "sign with a foreign ID: expected no signature"
    );
    two.assert_unchanged(&before, "foreign ID");
}

#[test]
fn a_destroyed_keys_id_says_when() {
    let env = Env::init();
    let id = env.create_key("doomed", "ecdsa-p256", &[]);
    let keep = env.create_key("keeper", "ecdsa-p256", &[]);
    let out = env.ok(
        &["key", "destroy", "--now", "--yes", "--key", &id],
        b"",
        "key destroy",
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "destroyed default/doomed\n",
        "key destroy: expected `destroyed NS/NAME`"
    );
    let before = env.snapshot();
    let show = String::from_utf8_lossy(&env.ok(&["key", "show", "--key", &id], b"", "key show"))
        .into_owned();
    assert!(show.contains("\nstate: destroyed\n"), "{show}");
    let destroyed = show
        .lines()
        .find_map(|l| l.strip_prefix("destroyed: "))
        .unwrap_or_else(|| panic!("key show of a tombstone names no destruction date: {show}"))
        .to_owned();
    let says = format!("key `default/doomed` is destroyed on {destroyed}");
    let o = env.run(&["sign", "--key", &id], b"payload");
    assert_fail(&o, 9, &says, "sign with a destroyed key");
    assert!(
        o.stdout.is_empty(),
        "sign with a destroyed key: expected no signature"
    );
    let o = env.run(&["key", "pubkey", "--key", &id], b"");
    assert_fail(&o, 9, &says, "pubkey of a destroyed key");
    let o = env.run(&["key", "destroy", "--key", &id], b"");
    assert_fail(&o, 9, &says, "destroying a destroyed key again");
    env.assert_unchanged(&before, "uses of a destroyed key");
    env.ok(
        &["sign", "--key", &keep],
        b"payload",
        "the other key still signs",
    );
}
