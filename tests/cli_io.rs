//! The CLI contract of docs/cli.md, against the real binary in temp stores: Inputs and outputs: the 64 MiB limit, `random`, binary output and terminals, encodings, `-` for stdin/stdout, and `--out` files.
//!
//! Each test builds its own store (Argon2 at the documented minimum, 19 MiB / 2 iterations)
//! through the shared harness (tests/support/env.rs), drives `keyhold` as a subprocess, and checks
//! exit codes, stdout formats and stderr messages exactly; failures must leave the store
//! byte-for-byte unchanged.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

// ---------------------------------------------------------------------------------------------
// 12. input limits
// ---------------------------------------------------------------------------------------------

/// An ECDSA, an AES and an HMAC key, and the paths of a signature and a tag of `x`.
fn keys(env: &Env) -> (String, String, String, String, String) {
    let ec = env.create_key("ec", "ecdsa-p256", &[]);
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    let mac = env.create_key("mac", "hmac-sha256", &[]);
    let sig = env.ok(&["sign", "--key", &ec], b"x", "sign");
    let tag = env.ok(&["mac", "--key", &mac], b"x", "mac");
    let (sig_path, tag_path) = (env.write("sig", &sig), env.write("tag", &tag));
    (ec, aes, mac, sig_path, tag_path)
}

#[test]
fn empty_input_is_refused() {
    let env = Env::init();
    let (ec, aes, mac, sig_path, tag_path) = keys(&env);
    let empty = env.write("empty", b"");
    let before = env.snapshot();
    for (args, op) in [
        (vec!["sign", "--key", ec.as_str()], "sign"),
        (vec!["encrypt", "--key", aes.as_str()], "encrypt"),
        (vec!["decrypt", "--key", aes.as_str()], "decrypt"),
        (vec!["mac", "--key", mac.as_str()], "mac"),
    ] {
        let o = env.run(&args, b"");
        assert_fail(
            &o,
            1,
            &format!("input is empty: nothing to {op}"),
            &format!("{op} of empty stdin"),
        );
        assert!(
            o.stdout.is_empty(),
            "{op} of empty input: expected nothing on stdout"
        );
        let mut with_file = args.clone();
        with_file.extend(["--in", empty.as_str()]);
        let o = env.run(&with_file, b"");
        assert_fail(
            &o,
            1,
            "input is empty",
            &format!("{op} of an empty --in file"),
        );
    }
    let o = env.run(&["verify", "--key", &ec, "--signature", &sig_path], b"");
    assert_fail(&o, 1, "input is empty", "verify of an empty message");
    let o = env.run(&["mac-verify", "--key", &mac, "--tag", &tag_path], b"");
    assert_fail(&o, 1, "input is empty", "mac-verify of an empty message");
    env.assert_unchanged(&before, "empty inputs");
}

#[test]
fn input_over_64_mib_is_refused() {
    let env = Env::init();
    let (ec, aes, mac, sig_path, tag_path) = keys(&env);
    let mut big = vec![0x5au8; LIMIT + 1];
    big[LIMIT] = 0xa5;
    let big_path = env.write("big", &big);
    let before = env.snapshot();
    let cases: Vec<Vec<&str>> = vec![
        vec!["sign", "--key", &ec, "--in", &big_path],
        vec!["encrypt", "--key", &aes, "--in", &big_path],
        vec!["mac", "--key", &mac, "--in", &big_path],
        vec![
            "verify",
            "--key",
            &ec,
            "--signature",
            &sig_path,
            "--in",
            &big_path,
        ],
        vec![
            "mac-verify",
            "--key",
            &mac,
            "--tag",
            &tag_path,
            "--in",
            &big_path,
        ],
    ];
    for args in cases {
        let o = env.run(&args, b"");
        assert_fail(
            &o,
            1,
            "input is larger than the 64 MiB limit",
            &format!("{args:?} with 64 MiB + 1 byte"),
        );
        assert!(
            o.stdout.is_empty(),
            "{args:?} over the limit: expected nothing on stdout"
        );
    }
    // From stdin as well.
    let o = env.run(&["mac", "--key", &mac], &big);
    assert_fail(&o, 1, "64 MiB limit", "mac of 64 MiB + 1 byte on stdin");
    env.assert_unchanged(&before, "oversized inputs");
}

/// docs/cli.md: *every* operation refuses input over 64 MiB, `decrypt` included (kept apart so a
/// different rule for envelopes shows up on its own).
#[test]
fn decrypt_input_over_the_envelope_limit_is_refused() {
    let env = Env::init();
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    // A genuine envelope's header followed by filler: one byte more than the largest envelope
    // (64 MiB of plaintext + 1 KiB of framing) that decrypt takes.
    let mut big = env.ok(&["encrypt", "--key", &aes], b"x", "encrypt");
    big.resize(LIMIT + 1024 + 1, 0x5a);
    let big_path = env.write("big", &big);
    let before = env.snapshot();
    let o = env.run(&["decrypt", "--key", &aes, "--in", &big_path], b"");
    assert_fail(
        &o,
        1,
        "input is larger than the 64 MiB limit",
        "decrypt with 64 MiB + 1 KiB + 1 byte of input",
    );
    assert!(
        o.stdout.is_empty(),
        "decrypt over the limit: expected nothing on stdout"
    );
    env.assert_unchanged(&before, "oversized decrypt");
}

#[test]
fn input_of_exactly_64_mib_is_accepted() {
    let env = Env::init();
    let ec = env.create_key("ec", "ecdsa-p256", &[]);
    let path = env.write("exact", &vec![0x11u8; LIMIT]);
    let sig_path = env.path_str("sig");
    env.ok(
        &["sign", "--key", &ec, "--in", &path, "--out", &sig_path],
        b"",
        "sign exactly 64 MiB",
    );
    env.ok(
        &[
            "verify",
            "--key",
            &ec,
            "--signature",
            &sig_path,
            "--in",
            &path,
        ],
        b"",
        "verify exactly 64 MiB",
    );
}

// ---------------------------------------------------------------------------------------------
// 13. random
// ---------------------------------------------------------------------------------------------

#[test]
fn random_prints_lowercase_hex_and_checks_bounds() {
    let env = Env::init();
    let hex_of = |n: &str| -> String {
        let out = env.ok(&["random", n], b"", &format!("random {n}"));
        let s = String::from_utf8(out).expect("random output is UTF-8");
        let hex = s
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("random {n}: expected a trailing newline, got {s:?}"));
        assert!(
            is_lower_hex(hex),
            "random {n}: expected lowercase hex only, got {hex:?}"
        );
        hex.to_owned()
    };
    let a = hex_of("32");
    assert_eq!(a.len(), 64, "random 32: expected 64 hex characters");
    let b = hex_of("32");
    assert_ne!(a, b, "random 32 twice: expected different output");
    assert_eq!(hex_of("1").len(), 2, "random 1: expected 2 hex characters");
    assert_eq!(
        hex_of("65536").len(),
        131072,
        "random 65536: expected 131072 hex characters"
    );
    // Out of range: refused by keyhold (exit 1); not a number: a usage error (exit 2).
    for (n, code, says) in [
        ("0", 1, "ask for between 1 and 65536 random bytes, not 0"),
        (
            "65537",
            1,
            "ask for between 1 and 65536 random bytes, not 65537",
        ),
        ("-1", 2, "unexpected argument '-1' found"),
        ("abc", 2, "invalid value 'abc'"),
    ] {
        let o = env.run(&["random", n], b"");
        assert_fail(&o, code, says, &format!("random {n}: expected an error"));
        assert!(o.stdout.is_empty(), "random {n}: expected no output");
    }
}

#[test]
fn binary_output_to_a_terminal_is_refused_unless_out_is_given() {
    let env = Env::init();
    let sig = env.create_key("sig", "ed25519", &[]);
    let mac = env.create_key("mac", "hmac-sha256", &[]);
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    let msg = env.write("msg", b"to the terminal");
    let envelope = env.ok(
        &["encrypt", "--key", &aes, "--in", &msg, "--out", "-"],
        b"",
        "encrypt",
    );
    let env_path = env.write("envelope", &envelope);
    for (args, what) in [
        (vec!["sign", "--key", &sig, "--in", &msg], "signature"),
        (vec!["mac", "--key", &mac, "--in", &msg], "tag"),
        (vec!["encrypt", "--key", &aes, "--in", &msg], "envelope"),
        (
            vec!["decrypt", "--key", &aes, "--in", &env_path],
            "plaintext",
        ),
        (
            vec!["key", "pubkey", "--key", &sig, "--format", "der"],
            "DER public key",
        ),
    ] {
        // Refused before anything is done: not even an AES-GCM invocation is reserved.
        let before = env.snapshot();
        let o = env.on_terminal(&args);
        env.assert_unchanged(&before, "refused terminal output");
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?} on a terminal\n{}",
            show(&o)
        );
        let text = stdout_str(&o);
        assert!(
            text.contains(&format!(
                "keyhold: refusing to write the {what} (binary) to a terminal: pass --out FILE"
            )),
            "{args:?}: {text}"
        );
        // With --out - the user says stdout is meant.
        let mut insist = args.clone();
        insist.extend(["--out", "-"]);
        let o = env.on_terminal(&insist);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{insist:?} on a terminal\n{}",
            show(&o)
        );
    }
    // Text encodings are not binary.
    let o = env.on_terminal(&["mac", "--key", &mac, "--in", &msg, "--encoding", "hex"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "mac --encoding hex on a terminal\n{}",
        show(&o)
    );
    let o = env.on_terminal(&["key", "pubkey", "--key", &sig]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "pubkey PEM on a terminal\n{}",
        show(&o)
    );
}

#[test]
fn sign_and_mac_encodings_and_dash_for_stdin_and_stdout() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let env = Env::init();
    // Ed25519 and HMAC are deterministic: every encoding holds the same bytes.
    for (ty, op, check, check_flag, invalid) in [
        (
            "ed25519",
            "sign",
            "verify",
            "--signature",
            "signature invalid",
        ),
        ("hmac-sha256", "mac", "mac-verify", "--tag", "tag invalid"),
    ] {
        let id = env.create_key(ty, ty, &[]);
        let msg = env.write("msg", b"encoded");
        let raw = env.ok(&[op, "--key", &id, "--in", &msg], b"", &format!("{op} raw"));
        let hex = env.ok(
            &[op, "--key", &id, "--in", "-", "--encoding", "hex"],
            b"encoded",
            &format!("{op} hex"),
        );
        let hex = String::from_utf8(hex).expect("hex is text");
        assert_eq!(
            hex,
            format!("{}\n", keyhold::hex::encode(&raw)),
            "{op} --encoding hex"
        );
        let base64 = env.ok(
            &[op, "--key", &id, "--encoding", "base64", "--out", "-"],
            b"encoded",
            &format!("{op} base64"),
        );
        assert_eq!(
            String::from_utf8_lossy(&base64),
            format!("{}\n", b64.encode(&raw)),
            "{op} --encoding base64"
        );
        let out_file = env.path_str("encoded.out");
        env.ok(
            &[
                op,
                "--key",
                &id,
                "--in",
                &msg,
                "--encoding",
                "base64",
                "--out",
                &out_file,
            ],
            b"",
            "--out FILE",
        );
        assert_eq!(std::fs::read(&out_file).expect("read --out"), base64);

        // Verified in each encoding, from a file or from stdin (`-`, the message then from --in).
        for (encoding, bytes) in [
            ("raw", raw.clone()),
            ("hex", hex.clone().into_bytes()),
            ("base64", base64.clone()),
        ] {
            let file = env.write("check", &bytes);
            let from_file = [
                check,
                "--key",
                &id,
                check_flag,
                &file,
                "--encoding",
                encoding,
            ];
            env.ok(&from_file, b"encoded", &format!("{check} {encoding}"));
            env.ok(
                &[
                    check,
                    "--key",
                    &id,
                    check_flag,
                    "-",
                    "--in",
                    &msg,
                    "--encoding",
                    encoding,
                ],
                &bytes,
                &format!("{check} {encoding} from stdin"),
            );
            let o = env.run(&from_file, b"changed");
            assert_fail(
                &o,
                1,
                invalid,
                &format!("{check} {encoding}, changed message"),
            );
        }
        let o = env.run(&[check, "--key", &id, check_flag, "-"], &raw);
        assert_fail(
            &o,
            2,
            "cannot both come from stdin: pass --in FILE",
            "both on stdin",
        );
        let not_hex = env.write("nothex", b"zz\n");
        let o = env.run(
            &[
                check,
                "--key",
                &id,
                check_flag,
                &not_hex,
                "--encoding",
                "hex",
            ],
            b"encoded",
        );
        assert_fail(&o, 1, "is not hex (--encoding hex)", "not hex");
    }
}

#[test]
fn out_files_are_private_and_never_follow_links() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::init();
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    let envelope = env.ok(&["encrypt", "--key", &aes], b"top secret", "encrypt");
    let env_path = env.write("envelope", &envelope);
    // An existing world-readable file becomes owner-only when plaintext is written into it.
    let out = env.path_str("plain.txt");
    std::fs::write(&out, b"old").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.ok(
        &["decrypt", "--key", &aes, "--in", &env_path, "--out", &out],
        b"",
        "decrypt",
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"top secret");
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "decrypt --out: expected an owner-only file");
    // A symbolic link planted at --out is not followed.
    let target = env.path_str("elsewhere");
    let link = env.path_str("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = env.run(
        &["decrypt", "--key", &aes, "--in", &env_path, "--out", &link],
        b"",
    );
    assert_fail(
        &o,
        1,
        &format!("keyhold: cannot write {link}: "),
        "decrypt --out onto a symlink must fail",
    );
    assert!(
        !std::path::Path::new(&target).exists(),
        "the link's target was written"
    );
}
