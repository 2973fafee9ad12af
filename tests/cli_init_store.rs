//! The CLI contract of docs/cli.md, against the real binary in temp stores: `init`, where the store is, the passphrase sources, and missing or corrupt stores.
//!
//! Each test builds its own store (Argon2 at the documented minimum, 19 MiB / 2 iterations)
//! through the shared harness (tests/support/env.rs), drives `keyhold` as a subprocess, and checks
//! exit codes, stdout formats and stderr messages exactly; failures must leave the store
//! byte-for-byte unchanged.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

// ---------------------------------------------------------------------------------------------
// 1. init
// ---------------------------------------------------------------------------------------------

#[test]
fn init_creates_private_store_and_refuses_a_second_init() {
    let env = Env::new();
    let out = env.run(INIT_ARGS, b"");
    assert_ok(&out, "init");
    let line = stdout_str(&out);
    let prefix = format!("initialised keyhold store {} (store id ", env.store_str());
    assert!(
        line.starts_with(&prefix) && line.ends_with(", sealer passphrase)\n") && line.lines().count() == 1,
        "init: expected `initialised keyhold store DIR (store id HEX, sealer passphrase)`, got {line:?}"
    );
    let hex = &line[prefix.len()..line.len() - ", sealer passphrase)\n".len()];
    assert!(
        is_lower_hex(hex),
        "init: expected the store id to be lowercase hex, got {hex:?}"
    );

    let check_modes = |when: &str| {
        let modes = modes_under(&env.store);
        assert!(
            modes.len() > 1,
            "{when}: expected files inside the store dir"
        );
        for (path, is_dir, mode) in modes {
            let want = if is_dir { 0o700 } else { 0o600 };
            assert_eq!(
                mode,
                want,
                "{when}: expected {} to have mode {want:o}, got {mode:o}",
                path.display()
            );
        }
    };
    check_modes("after init");

    let before = env.snapshot();
    let again = env.run(INIT_ARGS, b"");
    assert_fail(&again, 1, "already exists", "second init on the same store");
    env.assert_unchanged(&before, "second init");

    // Files created later (keys) are private too.
    env.create_key("k", "ecdsa-p256", &[]);
    env.create_key("h", "hmac-sha256", &[]);
    check_modes("after key create");
}

/// The Argon2id cost keyhold ships (RFC 9106 §4, second option): `init` without cost options
/// seals at 64 MiB, 3 passes, 4 lanes, and the store opens with it.
#[test]
fn init_without_cost_options_seals_at_the_shipped_argon2_defaults() {
    let env = Env::new();
    env.ok(&["init", "--sealer", "passphrase"], b"", "init");
    let store = keyhold::store::Store::open(&env.store).unwrap();
    let params: serde_json::Value =
        serde_json::from_slice(&store.meta().sealed_root.params).unwrap();
    assert_eq!(params["kdf"], "argon2id-v19", "{params}");
    assert_eq!(params["memory_kib"], 64 * 1024, "{params}");
    assert_eq!(params["iterations"], 3, "{params}");
    assert_eq!(params["parallelism"], 4, "{params}");
    env.create_key("k", "hmac-sha256", &[]);
}

#[test]
fn init_refuses_argon2_memory_below_19_mib() {
    let env = Env::new();
    let out = env.run(
        &[
            "init",
            "--sealer",
            "passphrase",
            "--argon2-memory-mib",
            "18",
            "--argon2-iterations",
            "2",
        ],
        b"",
    );
    assert_fail(
        &out,
        1,
        "argon2 memory (MiB) must be between 19 and 4096, not 18",
        "init with 18 MiB Argon2 memory (minimum is 19)",
    );
    env.assert_no_store("init with 18 MiB Argon2 memory");
}

/// `--store`, else `$KEYHOLD_STORE`, else `$XDG_DATA_HOME/keyhold`, else `~/.local/share/keyhold`.
#[test]
fn store_location_follows_the_documented_order() {
    let env = Env::new();
    let home = env.dir.path();
    // No --store here: the harness' `command` always passes one.
    let run_init = |vars: &[(&str, &std::path::Path)], store_flag: Option<&std::path::Path>| {
        let mut cmd = env.bare_command();
        if let Some(dir) = store_flag {
            cmd.arg("--store").arg(dir);
        }
        cmd.args(INIT_ARGS);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = env.run_cmd(cmd, Some(b""));
        assert_ok(&out, &format!("init with {vars:?}, --store {store_flag:?}"));
    };
    let has_store = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    };

    run_init(&[], None);
    let default = home.join(".local/share/keyhold");
    assert!(
        has_store(&default),
        "no --store, KEYHOLD_STORE or XDG_DATA_HOME: expected the store in ~/.local/share/keyhold"
    );

    let xdg = home.join("xdg");
    run_init(&[("XDG_DATA_HOME", &xdg)], None);
    assert!(
        has_store(&xdg.join("keyhold")),
        "XDG_DATA_HOME set: expected the store in $XDG_DATA_HOME/keyhold"
    );

    let ks = home.join("ks");
    let xdg2 = home.join("xdg2");
    run_init(&[("KEYHOLD_STORE", &ks), ("XDG_DATA_HOME", &xdg2)], None);
    assert!(
        has_store(&ks),
        "KEYHOLD_STORE set: expected the store there"
    );
    assert!(
        !xdg2.join("keyhold").exists(),
        "KEYHOLD_STORE set: expected XDG_DATA_HOME to be ignored"
    );

    let flag = home.join("flag");
    let ks2 = home.join("ks2");
    run_init(&[("KEYHOLD_STORE", &ks2)], Some(&flag));
    assert!(has_store(&flag), "--store given: expected the store there");
    assert!(
        !ks2.exists(),
        "--store given: expected KEYHOLD_STORE to be ignored"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. passphrases
// ---------------------------------------------------------------------------------------------

#[test]
fn wrong_passphrase_cannot_unseal() {
    let env = Env::init();
    let id = env.create_key("k", "ecdsa-p256", &[]);
    let aes = env.create_key("a", "aes-256-gcm", &[]);
    let envlp = env.ok(&["encrypt", "--key", &aes], b"secret", "encrypt");
    let before = env.snapshot();
    let wrong = "not-the-passphrase-9f3c";
    let cases: Vec<(Vec<&str>, &[u8])> = vec![
        (
            vec!["key", "create", "new", "--type", "ecdsa-p256"],
            &b""[..],
        ),
        (vec!["sign", "--key", &id], &b"payload"[..]),
        (vec!["decrypt", "--key", &aes], &envlp[..]),
        (vec!["encrypt", "--key", &aes], &b"payload"[..]),
    ];
    for (args, input) in &cases {
        let o = env.run_with(args, Some(input), |c| {
            c.env("KEYHOLD_PASSPHRASE", wrong);
        });
        assert_fail(
            &o,
            4,
            "cannot unseal the store",
            &format!("{args:?} with the wrong passphrase"),
        );
        assert!(
            !stderr(&o).contains(wrong),
            "{args:?}: expected the wrong passphrase not to be echoed"
        );
        assert!(
            o.stdout.is_empty(),
            "{args:?} wrong passphrase: expected nothing on stdout"
        );
    }
    let wrong_file = env.write("wrong.pass", format!("{wrong}\n").as_bytes());
    let o = env.run(
        &["--passphrase-file", &wrong_file, "sign", "--key", &id],
        b"payload",
    );
    assert_fail(
        &o,
        4,
        "cannot unseal the store",
        "sign with a wrong --passphrase-file",
    );
    env.assert_unchanged(&before, "wrong passphrase");
}

/// With no passphrase source: all three named (docs/cli.md).
const NO_PASSPHRASE: &str = "keyhold: no passphrase: set KEYHOLD_PASSPHRASE, pass \
                             --passphrase-file FILE, or run keyhold in a terminal\n";

#[test]
fn no_passphrase_source_names_keyhold_passphrase() {
    let env = Env::init();
    let id = env.create_key("k", "ecdsa-p256", &[]);
    let msg = env.write("msg", b"payload");
    let before = env.snapshot();
    // Detached from any terminal (new session, stdin /dev/null), no env, no file.
    let run_detached = |env: &Env, args: &[&str]| {
        env.detached(args, |c| {
            c.env_remove("KEYHOLD_PASSPHRASE");
        })
    };
    for args in [
        vec!["sign", "--key", id.as_str(), "--in", msg.as_str()],
        vec!["key", "create", "x", "--type", "ed25519"],
    ] {
        let o = run_detached(&env, &args);
        assert_fail(
            &o,
            1,
            NO_PASSPHRASE,
            &format!("{args:?} with no passphrase source"),
        );
    }
    env.assert_unchanged(&before, "no passphrase");

    let fresh = Env::new();
    let o = run_detached(&fresh, INIT_ARGS);
    assert_fail(&o, 1, NO_PASSPHRASE, "init with no passphrase source");
    fresh.assert_no_store("init without passphrase");
}

#[test]
fn passphrase_file_works_and_comes_first() {
    let env = Env::new();
    let pass_file = env.write(
        "pass",
        format!("{PASS}\nsecond line is ignored\n").as_bytes(),
    );
    let mut init = vec!["--passphrase-file", pass_file.as_str()];
    init.extend_from_slice(INIT_ARGS);
    let o = env.run_with(&init, Some(b""), |c| {
        c.env_remove("KEYHOLD_PASSPHRASE");
    });
    assert_ok(&o, "init with --passphrase-file only");
    // Created with the file, used with the environment variable: same passphrase.
    let id = env.create_key("k", "ecdsa-p256", &[]);
    let o = env.run_with(
        &["--passphrase-file", &pass_file, "sign", "--key", &id],
        Some(b"payload"),
        |c| {
            c.env_remove("KEYHOLD_PASSPHRASE");
        },
    );
    assert_ok(&o, "sign with --passphrase-file only");
    let o = env.run_with(
        &["--passphrase-file", &pass_file, "sign", "--key", &id],
        Some(b"payload"),
        |c| {
            c.env("KEYHOLD_PASSPHRASE", "wrong-env-passphrase");
        },
    );
    assert_ok(
        &o,
        "--passphrase-file (right) takes precedence over KEYHOLD_PASSPHRASE (wrong)",
    );
    let wrong = env.write("wrong", b"wrong-file-passphrase\n");
    let o = env.run(
        &["--passphrase-file", &wrong, "sign", "--key", &id],
        b"payload",
    );
    assert_fail(
        &o,
        4,
        "cannot unseal the store",
        "--passphrase-file (wrong) over KEYHOLD_PASSPHRASE (right)",
    );
}

// ---------------------------------------------------------------------------------------------
// 9. missing and corrupt stores
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_store_says_to_run_keyhold_init() {
    let env = Env::new();
    for args in [
        vec!["key", "list"],
        vec!["key", "create", "k", "--type", "ed25519"],
        vec!["sign", "--key", "kh1_x"],
    ] {
        let o = env.run(&args, b"payload");
        assert_clean_failure(&o, 1, &format!("{args:?} without a store"));
        assert!(
            stderr(&o).contains("keyhold init"),
            "{args:?} without a store: expected the message to mention `keyhold init`\n{}",
            show(&o)
        );
        assert!(
            !env.store.exists(),
            "{args:?} without a store: expected the store dir not to be created"
        );
    }
}

#[test]
fn corrupt_database_is_a_clean_error() {
    for (what, garbage) in [("garbage", pseudo_random(8192, 99)), ("empty", Vec::new())] {
        let env = Env::init();
        let id = env.create_key("k", "ecdsa-p256", &[]);
        let db = env.database_file();
        std::fs::write(&db, &garbage).expect("overwrite database");
        let before = env.snapshot();
        for args in [
            vec!["key", "list"],
            vec!["sign", "--key", id.as_str()],
            vec!["key", "create", "n", "--type", "ed25519"],
        ] {
            let o = env.run(&args, b"payload");
            assert_clean_failure(
                &o,
                1,
                &format!("{args:?} on a database overwritten with {what}"),
            );
            assert!(
                stderr(&o).lines().any(|l| l.starts_with("keyhold: ")),
                "{args:?} corrupt store: expected a `keyhold: ` message\n{}",
                show(&o)
            );
            assert!(
                o.stdout.is_empty(),
                "{args:?} corrupt store: expected nothing on stdout"
            );
        }
        env.assert_unchanged(
            &before,
            &format!("commands on a database overwritten with {what} (must not re-create it)"),
        );
    }
}
