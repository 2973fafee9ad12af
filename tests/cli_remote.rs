//! `keyhold --remote unix:PATH`: the command line's key and cryptographic commands, and for an
//! admin client the store's checks and audit log, through a running `keyhold serve`, which
//! holds the store. Each is run both ways on the same store: the
//! output and exit code through the service are the command's own, and what one way makes the
//! other uses (signatures, envelopes, tags, lifecycle changes).
#![cfg(feature = "serve")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::process::Output;

use support::env::*;
use support::serve::{client, env, Server};

/// `--remote unix:SOCKET` then `args`.
fn remote_args<'a>(remote: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--remote", remote];
    all.extend_from_slice(args);
    all
}

/// Runs `args` here and through the service: both outputs.
fn both(env: &Env, remote: &str, args: &[&str], stdin: &[u8]) -> (Output, Output) {
    (
        env.run(args, stdin),
        env.run(&remote_args(remote, args), stdin),
    )
}

/// `args` give the same exit code and stdout both ways.
fn same(env: &Env, remote: &str, args: &[&str]) -> String {
    let (local, served) = both(env, remote, args, b"");
    assert_eq!(
        (local.status.code(), &local.stdout),
        (served.status.code(), &served.stdout),
        "{args:?}: here\n{}\nthrough the service\n{}",
        show(&local),
        show(&served)
    );
    String::from_utf8(local.stdout).unwrap()
}

/// `args` exit with `code` both ways, with the same JSON error kind.
fn same_refusal(env: &Env, remote: &str, args: &[&str], code: i32) {
    let mut json = vec!["--json"];
    json.extend_from_slice(args);
    let (local, served) = both(env, remote, &json, b"");
    let kind = |out: &Output| -> serde_json::Value {
        let err: serde_json::Value = serde_json::from_slice(&out.stderr)
            .unwrap_or_else(|_| panic!("{args:?}: not a JSON error\n{}", show(out)));
        err["error"]["kind"].clone()
    };
    assert_eq!(
        local.status.code(),
        Some(code),
        "{args:?}\n{}",
        show(&local)
    );
    assert_eq!(
        served.status.code(),
        Some(code),
        "{args:?}\n{}",
        show(&served)
    );
    assert_eq!(kind(&local), kind(&served), "{args:?}");
}

#[test]
fn key_and_cryptographic_commands_run_through_the_service_with_the_same_output_and_exit_codes() {
    let env = env();
    let server = Server::start(&env, &client("\"default\"", ""));
    let remote = format!("unix:{}", server.socket.display());
    let r = remote.as_str();

    // Keys made either way are the same store's keys.
    let here = parse_id_line(
        &env.ok(
            &["key", "create", "here", "--type", "ecdsa-p256"],
            b"",
            "create",
        ),
        "here",
    );
    let there = parse_id_line(
        &env.ok(
            &remote_args(r, &["key", "create", "there", "--type", "ecdsa-p256"]),
            b"",
            "create --remote",
        ),
        "there",
    );
    for args in [
        &["key", "list"][..],
        &["--json", "key", "list"],
        &["key", "show", "--name", "there"],
        &["--json", "key", "show", "--key", &here],
        &["key", "id", "here"],
        &["key", "pubkey", "--key", &there],
    ] {
        same(&env, r, args);
    }

    // Signatures made one way verify the other way, and by OpenSSL.
    let message = env.write("message", b"signed through the service");
    let signature = env.path_str("sig");
    env.ok(
        &remote_args(
            r,
            &[
                "sign", "--key", &there, "--in", &message, "--out", &signature,
            ],
        ),
        b"",
        "sign --remote",
    );
    let pem = env.pubkey_pem(&there);
    assert!(support::openssl_verifies(
        &pem,
        keyhold::Algorithm::EcdsaP256Sha256,
        b"signed through the service",
        &std::fs::read(&signature).unwrap()
    ));
    let verify = [
        "verify",
        "--key",
        &there,
        "--in",
        &message,
        "--signature",
        &signature,
    ];
    same(&env, r, &verify);
    let other = env.write("other", b"not what was signed");
    let forged = [
        "verify",
        "--key",
        &there,
        "--in",
        &other,
        "--signature",
        &signature,
    ];
    same(&env, r, &forged);
    let mut json = vec!["--json"];
    json.extend_from_slice(&forged);
    assert_eq!(same(&env, r, &json).trim(), r#"{"valid":false}"#);

    // Envelopes and tags, across.
    let aes = parse_id_line(
        &env.ok(
            &remote_args(r, &["key", "create", "box", "--type", "aes-256-gcm"]),
            b"",
            "aes",
        ),
        "box",
    );
    let plain = env.write("plain", b"a secret");
    let sealed = env.path_str("sealed");
    env.ok(
        &remote_args(
            r,
            &[
                "encrypt", "--key", &aes, "--aad", "ctx", "--in", &plain, "--out", &sealed,
            ],
        ),
        b"",
        "encrypt --remote",
    );
    let opened = same(
        &env,
        r,
        &[
            "decrypt", "--key", &aes, "--aad", "ctx", "--in", &sealed, "--out", "-",
        ],
    );
    assert_eq!(opened, "a secret");
    same_refusal(
        &env,
        r,
        &[
            "decrypt", "--key", &aes, "--aad", "other", "--in", &sealed, "--out", "-",
        ],
        1,
    );
    let hmac = parse_id_line(
        &env.ok(
            &["key", "create", "tags", "--type", "hmac-sha256"],
            b"",
            "hmac",
        ),
        "tags",
    );
    let tag = same(
        &env,
        r,
        &["mac", "--key", &hmac, "--in", &plain, "--encoding", "hex"],
    );
    let tag_file = env.write("tag", tag.trim().as_bytes());
    same(
        &env,
        r,
        &[
            "mac-verify",
            "--key",
            &hmac,
            "--in",
            &plain,
            "--tag",
            &tag_file,
            "--encoding",
            "hex",
        ],
    );

    // The lifecycle through the service, seen here.
    env.ok(
        &remote_args(r, &["key", "rotate", "--key", &aes, "--reason", "yearly"]),
        b"",
        "rotate",
    );
    let rewrapped = env.path_str("rewrapped");
    env.ok(
        &remote_args(
            r,
            &[
                "rewrap", "--key", &aes, "--aad", "ctx", "--in", &sealed, "--out", &rewrapped,
            ],
        ),
        b"",
        "rewrap --remote",
    );
    assert_eq!(
        same(
            &env,
            r,
            &["decrypt", "--key", &aes, "--aad", "ctx", "--in", &rewrapped, "--out", "-"]
        ),
        "a secret"
    );
    env.ok(
        &remote_args(r, &["key", "suspend", "--key", &there]),
        b"",
        "suspend",
    );
    same_refusal(
        &env,
        r,
        &[
            "sign", "--key", &there, "--in", &message, "--out", &signature,
        ],
        9,
    );
    env.ok(
        &remote_args(r, &["key", "resume", "--key", &there]),
        b"",
        "resume",
    );
    env.ok(
        &remote_args(r, &["key", "set", "--key", &there, "--rotate-after", "90d"]),
        b"",
        "set",
    );
    env.ok(
        &remote_args(r, &["key", "destroy", "--key", &here, "--after", "1h"]),
        b"",
        "destroy",
    );
    env.ok(
        &remote_args(r, &["key", "cancel-destroy", "--key", &here]),
        b"",
        "cancel",
    );
    same(&env, r, &["key", "history", "--key", &there]);
    same(&env, r, &["--json", "key", "history", "--key", &here]);
    same(&env, r, &["key", "show", "--key", &there]);

    // Refusals exit as they would here.
    same_refusal(&env, r, &["key", "show", "--name", "nothing"], 5);
    let mut tampered = there.clone();
    tampered.replace_range(12..13, if &there[12..13] == "A" { "B" } else { "A" });
    same_refusal(&env, r, &["key", "show", "--key", &tampered], 3);
    same_refusal(&env, r, &["mac", "--key", &aes, "--in", &plain], 1);

    // Random bytes from the service.
    let random = env.ok_text(&remote_args(r, &["random", "16"]));
    assert_eq!(random.trim().len(), 32);

    // The commands on the whole store need operations granted by name only, which this
    // client (the default grant) lacks.
    for (args, operation) in [
        (&["store", "verify"][..], "audit"),
        (&["audit", "show"], "audit"),
        (&["audit", "verify"], "audit"),
        (&["maintain"], "maintain"),
        (&["client", "list"], "admin"),
    ] {
        let out = env.run(&remote_args(r, args), b"");
        assert_fail(
            &out,
            1,
            &format!("may not {operation}"),
            &format!("{args:?}"),
        );
    }
    // Changing the store as a whole is not for a client: exit 2, naming why.
    for args in [
        &["doctor"][..],
        &["reseal"],
        &["backup", "--to", "x"],
        &["client", "add", "x", "--namespace", "default"],
    ] {
        let out = env.run(&remote_args(r, args), b"");
        assert_fail(&out, 2, "runs where the store is", &format!("{args:?}"));
    }
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    // No service: said so, exit 1.
    let out = env.run(&remote_args(r, &["key", "list"]), b"");
    assert_fail(&out, 1, "connect to keyhold serve at unix:", "no service");
}

/// `audit verify`, `audit show`, `store verify`, `maintain` and `client list` through the
/// service, for a client granted `audit`, `maintain` and `admin`: what the store's own commands say, and the entries of the service's key uses name
/// their client.
#[test]
fn the_store_wide_commands_run_through_the_service_for_a_client_granted_them() {
    let env = env();
    let signer = env.create_key("signer", "ecdsa-p256", &[]);
    let other = env.create_key("other", "hmac-sha256", &[]);
    let server = Server::start(
        &env,
        &client(
            "\"default\"",
            "operations = [\"admin\", \"audit\", \"maintain\", \"sign\", \"list\"]",
        ),
    );
    let remote = format!("unix:{}", server.socket.display());
    let r = remote.as_str();
    std::fs::write(env.file("msg"), b"m").unwrap();
    let msg = env.path_str("msg");
    // In a later second than the keys' creations, for `--since` to tell them apart.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    env.ok(
        &remote_args(r, &["sign", "--key", &signer, "--in", &msg, "--out", "-"]),
        b"",
        "sign",
    );

    // Through the service first (it writes out the key uses it buffers), then here.
    let entries = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["--json", "audit", "show"];
        all.extend_from_slice(args);
        let served = env.ok(&remote_args(r, &all), b"", "audit show, served");
        let here = env.ok(&all, b"", "audit show, here");
        assert_eq!(
            String::from_utf8_lossy(&served),
            String::from_utf8_lossy(&here),
            "{args:?}"
        );
        serde_json::from_slice(&served).unwrap()
    };
    let all = entries(&[]);
    assert!(
        all.iter().any(|e| e["operation"] == "sign"
            && e["key_id"] == signer.as_str()
            && e["client"] == "app"),
        "{all:?}"
    );
    let of_signer = entries(&["--key", &signer]);
    assert!(!of_signer.is_empty());
    assert!(of_signer.iter().all(|e| e["key_id"] == signer.as_str()));
    assert_eq!(entries(&["--name", "signer"]), of_signer);
    assert!(entries(&["--key", &other])
        .iter()
        .all(|e| e["key_id"] == other.as_str()));
    assert_eq!(
        entries(&["--since", "+1d"]),
        Vec::<serde_json::Value>::new()
    );
    // From the signature's second on: the signature, not the creations before it.
    let signed = all.iter().find(|e| e["operation"] == "sign").unwrap();
    let since = entries(&["--since", signed["time"].as_str().unwrap()]);
    assert!(since.contains(signed), "{since:?}");
    assert!(
        since.len() < all.len() && since.iter().all(|e| e["operation"] != "create"),
        "{since:?}"
    );
    // The text form too.
    same(&env, r, &["audit", "show", "--key", &signer]);
    same(&env, r, &["--json", "audit", "verify"]);
    same(&env, r, &["audit", "verify"]);

    // The whole store: every check passes, as here; the report names the service.
    let verify = |args: &[&str]| -> serde_json::Value {
        let out = env.ok(args, b"", "store verify");
        serde_json::from_slice(&out).unwrap()
    };
    let served = verify(&remote_args(r, &["--json", "store", "verify"]));
    let here = verify(&["--json", "store", "verify"]);
    for field in ["status", "healthy", "store_id", "keys"] {
        assert_eq!(served[field], here[field], "{field}: {served}");
    }
    assert_eq!(served["status"], "passed", "{served}");
    let kinds = |report: &serde_json::Value| -> Vec<serde_json::Value> {
        report["sections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["kind"].clone())
            .collect()
    };
    assert_eq!(kinds(&served), kinds(&here));
    let text = env.ok_text(&remote_args(r, &["store", "verify"]));
    assert!(text.starts_with(&format!("store: {r} (id ")), "{text}");
    assert!(
        text.ends_with("store verify: every check passed\n"),
        "{text}"
    );

    // The store's token clients (the service's configured one is not the store's).
    env.ok(
        &[
            "client",
            "add",
            "reader",
            "--namespace",
            "default",
            "--operations",
            "list,show",
        ],
        b"",
        "client add",
    );
    env.ok(
        &["client", "add", "any", "--namespace", "x"],
        b"",
        "client add",
    );
    let listed = same(&env, r, &["client", "list"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(
        listed.starts_with("any namespaces=x operations=default created="),
        "{listed}"
    );
    same(&env, r, &["--json", "client", "list"]);

    // Due work: none, then a key's scheduled destruction, done by the service.
    assert_eq!(env.ok_text(&remote_args(r, &["maintain"])), "nothing due\n");
    let doomed = env.create_key("doomed", "aes-256-gcm", &[]);
    env.ok(
        &["key", "destroy", "--key", &doomed, "--after", "1s"],
        b"",
        "destroy",
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let done = env.ok(&remote_args(r, &["--json", "maintain"]), b"", "maintain");
    let done: serde_json::Value = serde_json::from_slice(&done).unwrap();
    assert_eq!(
        done,
        serde_json::json!([{"key": "default/doomed", "action": "destroyed"}])
    );
    same(&env, r, &["maintain"]);
    // The text form of work done.
    let doomed = env.create_key("doomed-too", "aes-256-gcm", &[]);
    env.ok(
        &["key", "destroy", "--key", &doomed, "--after", "1s"],
        b"",
        "destroy",
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(
        env.ok_text(&remote_args(r, &["maintain"])),
        "default/doomed-too: destroyed\n"
    );

    // A tampered key ID is refused as here (exit 3).
    let mut tampered = signer.clone();
    tampered.replace_range(12..13, if &signer[12..13] == "A" { "B" } else { "A" });
    same_refusal(&env, r, &["audit", "show", "--key", &tampered], 3);
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
}

/// Due work that fails through the service fails as it does here: a key scheduled for
/// destruction whose token is gone exits 7 (`backend_unavailable`) both ways, and the service
/// says which key.
#[cfg(feature = "pkcs11")]
#[test]
fn due_work_that_fails_through_the_service_exits_as_here() {
    let hsm = keyhold::testing::SoftHsm::new().unwrap();
    let env = Env::on_softhsm(&hsm);
    env.init_store();
    let doomed = env.create_key("doomed", "hmac-sha256", &["--backend", "hsm"]);
    env.ok(
        &["key", "destroy", "--key", &doomed, "--after", "1s"],
        b"",
        "destroy",
    );
    let base = env.config_text();
    hsm.delete_token().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let server = Server::start_with(
        &env,
        &base,
        &client("\"default\"", "operations = [\"maintain\"]"),
    );
    let remote = format!("unix:{}", server.socket.display());
    // The key's failure is logged, the first one's error is the command's (its JSON last).
    let (local, served) = both(&env, &remote, &["--json", "maintain"], b"");
    for out in [&local, &served] {
        assert_eq!(out.status.code(), Some(7), "{}", show(out));
        assert_eq!(out.stdout, b"[]\n", "{}", show(out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("default/doomed: its due work failed"), "{err}");
        let last: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
        assert_eq!(last["error"]["kind"], "backend_unavailable", "{err}");
    }
    let (status, answer) = server.ask("POST", "/v1/maintain", None);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["done"], serde_json::json!([]), "{answer}");
    assert_eq!(answer["failed"][0]["key"], "default/doomed", "{answer}");
    assert_eq!(answer["failed"][0]["status"], 503, "{answer}");
    assert_eq!(
        answer["failed"][0]["error"]["code"], "backend_unavailable",
        "{answer}"
    );
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
}

/// A client known by a bearer token: from `--token-file` or `$KEYHOLD_TOKEN`, never the command
/// line; a wrong one is refused as unauthenticated.
#[test]
fn a_token_client_reaches_the_service_with_a_token_file_or_keyhold_token() {
    let env = env();
    let json = env.ok(
        &["--json", "client", "add", "ci", "--namespace", "default"],
        b"",
        "client add",
    );
    let token = serde_json::from_slice::<serde_json::Value>(&json).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // A configuration with no uid client: only the token lets this process in.
    let server = Server::start(&env, "");
    let remote = format!("unix:{}", server.socket.display());
    let token_file = env.write("token", format!("{token}\n").as_bytes());
    let listed = env.ok_text(&[
        "--remote",
        &remote,
        "--token-file",
        &token_file,
        "key",
        "list",
    ]);
    assert!(listed.starts_with("NAME "), "{listed}");
    let (made, _) = env.ok_vars(
        &[("KEYHOLD_TOKEN", &token)],
        &[
            "--remote", &remote, "key", "create", "ci-key", "--type", "ed25519",
        ],
    );
    parse_id_line(&made, "ci-key");
    let out = env.run(&["--remote", &remote, "key", "list"], b"");
    assert_fail(&out, 1, "no client", "no token, and this user is no client");
    let out = env.run_vars(
        &[("KEYHOLD_TOKEN", "kht1_not-a-token")],
        &["--remote", &remote, "key", "list"],
    );
    assert_fail(&out, 1, "no client", "a wrong token");
}

/// A compromised key used with `--allow-compromised` through the service: the command warns on
/// its own stderr, naming the key, as it does run here (the keystore that logs the warning is
/// the service's; before, a remote `verify` or `decrypt` said nothing).
#[test]
fn a_compromised_key_used_through_the_service_is_warned_about_on_the_commands_stderr() {
    let env = env();
    let server = Server::start(&env, &client("\"default\"", ""));
    let remote = format!("unix:{}", server.socket.display());
    let r = remote.as_str();
    let sig = env.create_key("s", "ed25519", &[]);
    let aes = env.create_key("a", "aes-256-gcm", &[]);
    let signature = env.ok(&["sign", "--key", &sig, "--out", "-"], b"m", "sign");
    let signature = env.write("sig", &signature);
    let sealed = env.ok(
        &["encrypt", "--key", &aes, "--out", "-"],
        b"plain",
        "encrypt",
    );
    let sealed = env.write("sealed", &sealed);
    for key in [&sig, &aes] {
        env.ok_text(&["key", "compromise", "--key", key, "--reason", "lost"]);
    }
    for (args, name) in [
        (
            vec![
                "verify",
                "--key",
                &sig,
                "--signature",
                &signature,
                "--allow-compromised",
            ],
            "default/s",
        ),
        (
            vec![
                "decrypt",
                "--key",
                &aes,
                "--in",
                &sealed,
                "--out",
                "-",
                "--allow-compromised",
            ],
            "default/a",
        ),
    ] {
        let (local, served) = both(&env, r, &args, b"m");
        assert_ok(&local, "here");
        assert_ok(&served, "through the service");
        assert_eq!(local.stdout, served.stdout, "{args:?}");
        for out in [&local, &served] {
            let err = stderr(out);
            assert!(
                err.contains("WARN")
                    && err.contains("used a compromised key")
                    && err.contains(name),
                "{args:?}: a warning naming {name}:\n{}",
                show(out)
            );
        }
    }
}
