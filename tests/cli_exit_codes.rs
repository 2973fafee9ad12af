//! Exit codes 6 (integrity) and 7 (a backend unavailable) produced through the real binary, with
//! the documented messages and `--json` kinds (docs/cli.md, "Exit codes"). The mapping of every
//! error to its code is unit-tested in src/cli/mod.rs; here the codes come from real failures.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

#[cfg(feature = "tpm")]
use support::claims::*;
use support::env::*;

/// Runs `args` with `--json` and asserts the one-line JSON error of docs/cli.md: exit `code`,
/// `kind`, a message containing `needle`, nothing on stdout.
fn assert_json_error(env: &Env, args: &[&str], code: i32, kind: &str, needle: &str) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = env.run(&all, b"");
    assert_eq!(out.status.code(), Some(code), "{all:?}\n{}", show(&out));
    assert!(out.stdout.is_empty(), "{all:?}\n{}", show(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{all:?}: one line\n{err}");
    let json = parse_json(err.as_bytes(), &format!("{all:?}"));
    assert_eq!(json["error"]["code"], code, "{json}");
    assert_eq!(json["error"]["kind"], kind, "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "{all:?}: {message}");
}

/// Runs an SQL statement on the store's database, as someone who can write the store would.
fn tamper(env: &Env, sql: &str) {
    let db = rusqlite::Connection::open(env.database_file()).unwrap();
    assert_eq!(db.execute(sql, []).unwrap(), 1, "{sql}");
}

/// A key record changed outside keyhold (its creation time, so the record still decodes and
/// only its MAC can tell): every command that opens the store exits 6 with `integrity check
/// failed`, names how many records fail, writes nothing, and `--json` says `integrity`. The
/// untouched record's key is refused too: the store is checked as a whole at open. With the
/// original database back, both keys work, so the refusal was the tamper's doing.
#[test]
fn a_record_changed_outside_keyhold_is_exit_6() {
    let env = Env::init();
    let changed = env.create_key("changed", "hmac-sha256", &[]);
    let other = env.create_key("other", "hmac-sha256", &[]);
    let tags: Vec<Vec<u8>> = [&changed, &other]
        .iter()
        .map(|id| env.ok(&["mac", "--key", id], b"data", "mac"))
        .collect();
    let original = env.db();
    tamper(
        &env,
        "UPDATE keys SET created_at = created_at + 1 WHERE name = 'changed'",
    );
    let before = env.snapshot();
    let message = "integrity check failed: 1 of the store's 2 key records fail their MAC";
    for id in [&changed, &other] {
        let out = env.run(&["mac", "--key", id], b"data");
        assert_fail(&out, 6, message, "mac with a changed record in the store");
        assert!(
            stderr(&out).contains("restore it from a backup"),
            "{}",
            show(&out)
        );
        assert!(out.stdout.is_empty(), "{}", show(&out));
    }
    assert_fail(
        &env.run(&["key", "list"], b""),
        6,
        message,
        "key list with a changed record",
    );
    assert_json_error(
        &env,
        &["key", "show", "--key", &other],
        6,
        "integrity",
        message,
    );
    env.assert_unchanged(&before, "refused commands");

    std::fs::write(env.database_file(), original).unwrap();
    for (id, tag) in [&changed, &other].iter().zip(&tags) {
        assert_eq!(
            &env.ok(&["mac", "--key", id], b"data", "mac, restored"),
            tag
        );
    }
}

/// The store's metadata (here its creation time, next to the sealer's parameters) changed
/// outside keyhold: exit 6, `integrity check failed: the store's sealer metadata …`, nothing
/// written.
#[test]
fn store_metadata_changed_outside_keyhold_is_exit_6() {
    let env = Env::init();
    let id = env.create_key("k", "ed25519", &[]);
    tamper(
        &env,
        "UPDATE meta SET value = CAST(CAST(CAST(CAST(value AS TEXT) AS INTEGER) + 1 AS TEXT) \
         AS BLOB) WHERE key = 'created_at'",
    );
    let before = env.snapshot();
    let out = env.run(&["sign", "--key", &id], b"data");
    assert_fail(
        &out,
        6,
        "integrity check failed: the store's sealer metadata",
        "sign with changed store metadata",
    );
    assert!(out.stdout.is_empty(), "{}", show(&out));
    assert_json_error(&env, &["key", "list"], 6, "integrity", "sealer metadata");
    env.assert_unchanged(&before, "refused commands");
}

/// A TPM that cannot be reached, through the CLI: exit 7 with docs/cli.md's ``backend `tpm
/// sealer` is unavailable: cannot reach the TPM at `TCTI` `` (or backend `tpm` for a key), kind
/// `backend_unavailable`, and nothing made.
///
/// The TCTI names 127.0.0.1 port 1: a privileged port (no test fixture or unprivileged program
/// can listen there) on which nothing listens on a test machine, so the connection is refused at
/// once. A port that is merely free now could be taken by a parallel test's swtpm meanwhile.
#[cfg(feature = "tpm")]
#[test]
fn an_unreachable_tpm_is_exit_7() {
    let tcti = "swtpm:host=127.0.0.1,port=1";
    let env = Env::new().with_config(&format!(
        "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{tcti}\"\n"
    ));
    let sealer = format!("backend `tpm sealer` is unavailable: cannot reach the TPM at `{tcti}`");
    let out = env.run(&["init", "--sealer", "tpm"], b"");
    assert_fail(&out, 7, &sealer, "init --sealer tpm, TPM unreachable");
    assert!(
        stderr(&out).contains("check that it is running"),
        "{}",
        show(&out)
    );
    env.assert_no_store("init against an unreachable TPM");
    assert_json_error(
        &env,
        &["init", "--sealer", "tpm"],
        7,
        "backend_unavailable",
        &sealer,
    );
    env.assert_no_store("init --json against an unreachable TPM");

    // A passphrase store (no TPM needed to open it), a key asked of the TPM backend.
    env.init_store();
    let before = env.snapshot();
    let backend = format!("backend `tpm` is unavailable: cannot reach the TPM at `{tcti}`");
    let create = CREATE_TPM_KEY;
    assert_fail(
        &env.run(create, b""),
        7,
        &backend,
        "key create --backend tpm",
    );
    assert_json_error(&env, create, 7, "backend_unavailable", &backend);
    env.assert_unchanged(&before, "key create against an unreachable TPM");
}

/// A TPM-sealed store whose TPM went away (swtpm killed, as a TPM that stops answering): exit 7,
/// store untouched; once the TPM is back (restarted on the same state: a reboot), the same
/// command works, with no restart of anything else.
#[cfg(feature = "tpm")]
#[test]
fn a_tpm_sealed_store_whose_tpm_is_gone_is_exit_7_until_it_is_back() {
    let mut tpm = keyhold::testing::Swtpm::new().unwrap();
    // Here even in remote mode: a service started before the TPM went away has the store
    // unsealed already, so it names the `tpm` backend, not the sealer (exit 7 all the same).
    let env = tpm_env(Env::new(), &tpm.tcti(), "").local_only("the TPM goes away under it");
    env.ok_text(&["init", "--sealer", "tpm"]);
    let id = parse_id_line(env.ok_text(CREATE_TPM_KEY).as_bytes(), "key create");
    let sign = ["sign", "--key", &id];
    env.ok(&sign, b"before", "sign");

    tpm.kill().unwrap();
    let before = env.snapshot();
    let out = env.run(&sign, b"while the TPM is gone");
    assert_fail(
        &out,
        7,
        &format!(
            "backend `tpm sealer` is unavailable: cannot reach the TPM at `{}`",
            tpm.tcti()
        ),
        "sign with the TPM gone",
    );
    assert!(out.stdout.is_empty(), "{}", show(&out));
    assert_json_error(
        &env,
        &["key", "list"],
        7,
        "backend_unavailable",
        "cannot reach the TPM",
    );
    env.assert_unchanged(&before, "commands with the TPM gone");

    tpm.restart().unwrap();
    env.ok(&sign, b"after", "sign once the TPM is back");
}

/// docs/cli.md: exit 7 also when a backend "stayed busy past its timeout" (`backend … is busy`),
/// and README: swtpm serves one client connection at a time. Here another client holds swtpm's
/// one connection (a raw TCP connection that sends nothing) while keyhold, configured with
/// `timeout_secs = 2`, opens a TPM-sealed store: swtpm accepts keyhold's connection and never
/// answers it, so without a bound on the connection keyhold would wait for as long as the other
/// client stays (it did, before the bound: killed by the harness' timeout). It exits 7 instead,
/// and the store is left as it was; once the other client is gone, the store opens.
#[cfg(feature = "tpm")]
#[test]
fn a_tpm_held_by_another_client_is_exit_7_busy_after_the_timeout() {
    let tpm = keyhold::testing::Swtpm::new().unwrap();
    let env = tpm_env(
        Env::new().with_timeout(std::time::Duration::from_secs(60)),
        &tpm.tcti(),
        "timeout_secs = 2",
    );
    env.ok_text(&["init", "--sealer", "tpm"]);
    let before = env.snapshot();
    let holder = std::net::TcpStream::connect(("127.0.0.1", tpm.port())).unwrap();
    let out = env.run(&["key", "list"], b"");
    drop(holder);
    assert_fail(
        &out,
        7,
        "backend `tpm sealer` is busy: waited 2s for the TPM at `",
        "key list while another client holds the TPM",
    );
    assert!(
        stderr(&out).contains("another program may hold it"),
        "{}",
        show(&out)
    );
    env.assert_unchanged(&before, "key list while the TPM was held");
    env.ok_text(&["key", "list"]);
}
