//! The CLI contract of docs/cli.md, against the real binary in temp stores: `mac` / `mac-verify` with HMAC-SHA256.
//!
//! Each test builds its own store (Argon2 at the documented minimum, 19 MiB / 2 iterations)
//! through the shared harness (tests/support/env.rs), drives `keyhold` as a subprocess, and checks
//! exit codes, stdout formats and stderr messages exactly; failures must leave the store
//! byte-for-byte unchanged.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

// ---------------------------------------------------------------------------------------------
// 6. HMAC
// ---------------------------------------------------------------------------------------------

#[test]
fn hmac_mac_and_mac_verify() {
    let env = Env::init();
    let id = env.create_key("mac", "hmac-sha256", &[]);
    let msg = b"message to authenticate".to_vec();
    let tag = env.ok(&["mac", "--key", &id], &msg, "mac");
    assert_eq!(tag.len(), 32, "mac: expected a 32-byte binary tag");
    assert_eq!(
        env.ok(&["mac", "--key", &id], &msg, "mac again"),
        tag,
        "mac: expected HMAC to be deterministic"
    );
    let msg_path = env.write("msg", &msg);
    let tag_path = env.write("tag", &tag);
    let out_path = env.path_str("tag.out");
    let o = env.ok(
        &["mac", "--key", &id, "--in", &msg_path, "--out", &out_path],
        b"",
        "mac --in --out",
    );
    assert!(o.is_empty(), "mac --out: expected nothing on stdout");
    assert_eq!(
        std::fs::read(&out_path).expect("read tag"),
        tag,
        "mac --out: expected the same tag in the file"
    );

    let v = env.ok(
        &[
            "mac-verify",
            "--key",
            &id,
            "--tag",
            &tag_path,
            "--in",
            &msg_path,
        ],
        b"",
        "mac-verify",
    );
    assert_eq!(
        String::from_utf8_lossy(&v),
        "tag valid\n",
        "mac-verify: expected stdout `tag valid`"
    );
    env.ok(
        &["mac-verify", "--key", &id, "--tag", &tag_path],
        &msg,
        "mac-verify message on stdin",
    );

    let before = env.snapshot();
    for pos in [0, 15, 31] {
        let bad = env.write("tag.bad", &flip(&tag, pos));
        let o = env.run(
            &["mac-verify", "--key", &id, "--tag", &bad, "--in", &msg_path],
            b"",
        );
        assert_fail(
            &o,
            1,
            "tag invalid",
            &format!("mac-verify with tag byte {pos} flipped"),
        );
        assert!(
            !stdout_str(&o).contains("tag valid"),
            "mac-verify bad tag: expected no `tag valid`"
        );
    }
    let short = env.write("tag.short", &tag[..31]);
    let o = env.run(
        &[
            "mac-verify",
            "--key",
            &id,
            "--tag",
            &short,
            "--in",
            &msg_path,
        ],
        b"",
    );
    assert_fail(&o, 1, "tag invalid", "mac-verify with a 31-byte tag");
    let o = env.run(
        &["mac-verify", "--key", &id, "--tag", &tag_path],
        &flip(&msg, 3),
    );
    assert_fail(&o, 1, "tag invalid", "mac-verify of a modified message");
    env.assert_unchanged(&before, "failed mac-verify");
    let other = env.create_key("mac2", "hmac-sha256", &[]);
    let o = env.run(
        &[
            "mac-verify",
            "--key",
            &other,
            "--tag",
            &tag_path,
            "--in",
            &msg_path,
        ],
        b"",
    );
    assert_fail(&o, 1, "tag invalid", "mac-verify with another HMAC key");
    let tag2 = env.ok(&["mac", "--key", &other], &msg, "mac with the other key");
    assert_ne!(tag2, tag, "expected two HMAC keys to give different tags");
}
