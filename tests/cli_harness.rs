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
