//! The CLI harness (tests/support/env.rs) itself: each of its checks fails when it should, so
//! that a CLI test passing through it means something.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::process::Command;
use std::time::Duration;

use support::env::*;

/// "Unchanged" must not hold for a store that was never made.
#[test]
#[should_panic(expected = "the store directory does not exist")]
fn a_snapshot_of_a_missing_store_panics() {
    Env::new().snapshot();
}

#[test]
fn assert_no_store_holds_only_without_a_store() {
    let env = Env::new();
    env.assert_no_store("before init");
    env.init_store();
    let made = std::panic::catch_unwind(|| env.assert_no_store("after init"));
    assert!(made.is_err(), "assert_no_store passed on a made store");
}

/// A command that outlives its timeout is killed and fails the test, naming the command line.
#[test]
#[should_panic(expected = "`sleep 30`: expected it to finish within 200ms, it hung (killed)")]
fn a_command_past_its_timeout_is_killed_and_fails() {
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    run_command_timeout(cmd, None, Duration::from_millis(200));
}

/// The passphrase a command is given must not come back in its output.
#[test]
#[should_panic(expected = "a secret it was given (passphrase or PIN) appears in its stdout")]
fn a_passphrase_in_the_output_fails_the_test() {
    let env = Env::new();
    let mut sh = Command::new("sh");
    sh.args(["-c", "echo \"$KEYHOLD_PASSPHRASE\""]);
    // `sh -c SCRIPT --store DIR`: the harness' arguments become $0 and $1, unused.
    env.run_cmd(env.command_via(sh, &[]), None);
}

/// The environment is clean: nothing of the test process' own reaches keyhold.
#[test]
fn commands_start_with_a_clean_environment() {
    let env = Env::new().with_var("KH_EXTRA", "set");
    let mut sh = Command::new("sh");
    sh.args(["-c", "env | cut -d= -f1 | sort"]);
    // The test process has CARGO_*, NEXTEST_*, RUST_* variables and more: none may pass.
    let out = env.run_cmd(env.command_via(sh, &[]), None);
    assert_ok(&out, "env");
    let names: Vec<String> = stdout_str(&out)
        .lines()
        .map(str::to_owned)
        // sh itself sets these.
        .filter(|n| !["PWD", "SHLVL", "_", "OLDPWD"].contains(&n.as_str()))
        .collect();
    assert_eq!(
        names,
        ["HOME", "KEYHOLD_PASSPHRASE", "KH_EXTRA", "PATH"],
        "{}",
        show(&out)
    );
}

/// A test that needs setsid or script fails when they are missing, rather than running without.
#[test]
#[should_panic(expected = "`keyhold-no-such-tool` is not installed")]
fn a_missing_tool_fails_the_test() {
    require_tool("keyhold-no-such-tool", "a test of the harness");
}

#[test]
fn with_config_passes_the_file_to_every_command() {
    let env = Env::new().with_config("[software]\nkey_cache_secs = 0\n");
    env.init_store();
    env.set_config("[software]\nkey_cache_secs = \"soon\"\n");
    let out = env.run(&["key", "list"], b"");
    let path = env.config_path().display().to_string();
    assert_fail(
        &out,
        1,
        &format!("{path}: line 2, column 18"),
        "an invalid --config",
    );
}

/// The audit log's entries (`audit show`, run here), one line each.
#[cfg(feature = "serve")]
fn audit_lines(env: &Env) -> Vec<String> {
    env.ok_text(&["audit", "show"])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Remote mode (tests/support/remote.rs) really goes through `keyhold serve`: key and
/// cryptographic commands are in the audit log as the harness's client (only the service writes
/// `client=`), the others (and those with a flag or a variable of their own) are not; a command
/// here stops the service, the next remote one starts it again on the store as it is.
#[cfg(feature = "serve")]
#[test]
fn remote_mode_runs_key_and_cryptographic_commands_through_the_service() {
    let env = Env::init().remote();
    assert_eq!(env.remote_starts(), 0, "init runs here: no service yet");
    let id = env.create_key("served", "ecdsa-p256", &[]);
    assert_eq!(env.remote_starts(), 1, "the first key command starts it");
    let message = env.write("m", b"through the service");
    let sig = env.path_str("sig");
    env.ok(
        &["sign", "--key", &id, "--in", &message, "--out", &sig],
        b"",
        "sign",
    );
    // A variable of its own, and -v: both here.
    env.ok_vars(&[("RUST_LOG", "warn")], &["key", "show", "--key", &id]);
    env.ok(&["-v", "key", "list"], b"", "key list -v");
    let lines = audit_lines(&env);
    let client = format!(" client={} ", support::remote::CLIENT);
    let by_client: Vec<&String> = lines.iter().filter(|l| l.contains(&client)).collect();
    assert_eq!(
        by_client.len(),
        2,
        "create and sign by the client: {lines:#?}"
    );
    assert!(
        by_client[0].contains(" create ") && by_client[1].contains(" sign "),
        "{by_client:#?}"
    );
    // key show and list are not audited; create's and sign's entries are the only ones.
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&client) || l.contains(" init ")),
        "nothing else was audited, and nothing by the service without its client: {lines:#?}"
    );
    // `audit show` and the local commands stopped the service; a key command restarts it.
    let second = env.create_key("after", "ed25519", &[]);
    assert_eq!(
        env.remote_starts(),
        2,
        "started again after the local commands"
    );
    let last = audit_lines(&env).pop().unwrap();
    assert!(
        last.contains(" create ") && last.contains(&client) && last.contains(&second),
        "{last}"
    );
}

/// `KEYHOLD_TEST_REMOTE=1` turns remote mode on for every Env, without a word from the test:
/// a key made by a plain Env is in the audit log with the harness's client then, and without
/// one otherwise. Run both ways by CI (ci/test.sh), it cannot pass with the harness silently
/// running everything here.
#[cfg(feature = "serve")]
#[test]
fn keyhold_test_remote_sends_every_env_through_the_service() {
    let env = Env::init();
    let id = env.create_key("k", "ed25519", &[]);
    let lines = audit_lines(&env);
    let created = lines
        .iter()
        .find(|l| l.contains(" create ") && l.contains(&id))
        .unwrap();
    let client = format!(" client={} ", support::remote::CLIENT);
    assert_eq!(
        created.contains(&client),
        support::remote::enabled(),
        "KEYHOLD_TEST_REMOTE={:?}: {created}",
        std::env::var(support::remote::VAR).ok()
    );
}
