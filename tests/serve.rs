//! `keyhold serve` as a real process on a temporary Unix socket, asked over raw HTTP/1.1
//! (docs/service.md): who may ask (peer credentials → configured client, else 401), what a client
//! sees (its namespaces: other keys are 404 as keys that do not exist) and may do (403), every
//! operation's round trip (signatures checked by OpenSSL), bad bodies answered 4xx with the
//! server still answering, and SIGTERM ending it cleanly.
#![cfg(feature = "serve")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::env::*;
use support::serve::{b64, client, env, uid, unb64, AsNobody, Server};

#[test]
fn a_client_creates_signs_verifies_encrypts_and_decrypts_in_its_namespace() {
    let env = env();
    let server = Server::start(&env, &client("\"app\"", ""));
    assert_eq!(
        server.ask("GET", "/v1/health", None),
        (
            200,
            json!({"status": "ok", "client": "app", "sealer": "passphrase"})
        )
    );
    let (status, key) = server.ask(
        "POST",
        "/v1/keys",
        Some(&json!({"namespace": "app", "name": "signer", "type": "ecdsa-p256"})),
    );
    assert_eq!(status, 201, "{key}");
    let id = key["id"].as_str().unwrap().to_owned();
    assert_eq!(key["namespace"], "app");

    let message = b"served, not held";
    let (status, signed) = server.ask(
        "POST",
        &format!("/v1/keys/{id}/sign"),
        Some(&json!({"data": b64(message)})),
    );
    assert_eq!(status, 200, "{signed}");
    let signature = unb64(&signed["signature"]);
    let (status, public) = server.ask("GET", &format!("/v1/keys/{id}/public"), None);
    assert_eq!(status, 200, "{public}");
    assert!(support::openssl_verifies(
        public["pem"].as_str().unwrap(),
        keyhold::Algorithm::EcdsaP256Sha256,
        message,
        &signature
    ));
    for (data, valid) in [(&message[..], true), (&b"another message"[..], false)] {
        let (status, verdict) = server.ask(
            "POST",
            &format!("/v1/keys/{id}/verify"),
            Some(&json!({"data": b64(data), "signature": b64(&signature)})),
        );
        assert_eq!(
            (status, &verdict["valid"]),
            (200, &json!(valid)),
            "{verdict}"
        );
    }

    let (_, aes) = server.ask(
        "POST",
        "/v1/keys",
        Some(&json!({"namespace": "app", "name": "box", "type": "aes-256-gcm"})),
    );
    let aes = aes["id"].as_str().unwrap().to_owned();
    let (status, sealed) = server.ask(
        "POST",
        &format!("/v1/keys/{aes}/encrypt"),
        Some(&json!({"plaintext": b64(b"secret"), "aad": b64(b"context")})),
    );
    assert_eq!(status, 200, "{sealed}");
    let (status, opened) = server.ask(
        "POST",
        &format!("/v1/keys/{aes}/decrypt"),
        Some(&json!({"envelope": sealed["envelope"], "aad": b64(b"context")})),
    );
    assert_eq!(
        (status, unb64(&opened["plaintext"])),
        (200, b"secret".to_vec())
    );
    // The envelope is the CLI's: `keyhold decrypt` opens it too.
    let envelope = env.write("envelope", &unb64(&sealed["envelope"]));
    let plain = env.ok(
        &[
            "decrypt", "--key", &aes, "--in", &envelope, "--aad", "context", "--out", "-",
        ],
        b"",
        "keyhold decrypt of the service's envelope",
    );
    assert_eq!(plain, b"secret");

    let (status, listed) = server.ask("GET", "/v1/keys", None);
    assert_eq!(status, 200);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let (status, random) = server.ask("POST", "/v1/random", Some(&json!({"bytes": 32})));
    assert_eq!((status, unb64(&random["data"]).len()), (200, 32));

    let (status, err) = server.stop();
    assert!(
        status.success(),
        "SIGTERM ends the service cleanly: {status:?}\n{err}"
    );
    assert!(!env.file("keyhold.sock").exists(), "the socket is removed");
}

#[test]
fn another_namespace_s_key_is_a_key_that_does_not_exist_and_operations_are_granted() {
    let env = env();
    let other = env.create_key("theirs", "ed25519", &["--namespace", "other"]);
    let gone = env.create_key("gone", "ed25519", &["--namespace", "app"]);
    env.ok(
        &["key", "destroy", "--key", &gone, "--now", "--yes"],
        b"",
        "destroy",
    );
    let server = Server::start(
        &env,
        &client("\"app\"", "operations = [\"sign\", \"list\"]"),
    );
    let sign = |id: &str| {
        server.ask(
            "POST",
            &format!("/v1/keys/{id}/sign"),
            Some(&json!({"data": b64(b"m")})),
        )
    };
    // Another namespace's key: the answer for a key that does not exist, word for word.
    let (status, theirs) = sign(&other);
    assert_eq!(
        (status, theirs),
        (
            404,
            json!({"error": {"code": "no_such_key", "message": "no such key"}})
        )
    );
    // A destroyed key of its own namespace exists, and says why it cannot sign.
    let (status, gone) = sign(&gone);
    assert_eq!(
        (status, &gone["error"]["code"]),
        (409, &json!("wrong_state")),
        "{gone}"
    );
    // A key of another namespace is not listed, nor listable by name.
    let (_, listed) = server.ask("GET", "/v1/keys?namespace=other", None);
    assert_eq!(listed, json!([]));
    // Operations not granted: 403, naming the client and the operation.
    let (status, refused) = server.ask("POST", "/v1/random", Some(&json!({"bytes": 8})));
    assert_eq!(status, 403, "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("client `app` may not random"));
    // A tampered ID is refused as such.
    let mut tampered = other.clone();
    tampered.replace_range(10..11, if &other[10..11] == "A" { "B" } else { "A" });
    let (status, err) = sign(&tampered);
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("key_id_authentication"))
    );
    // Making a key is not granted: refused, and audited with the client.
    let (status, refused) = server.ask(
        "POST",
        "/v1/keys",
        Some(&json!({"namespace": "app", "name": "new", "type": "ed25519"})),
    );
    assert_eq!(status, 403, "{refused}");
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    assert!(
        created_refused(&env, ""),
        "the refused creation is in the audit log"
    );
}

/// Whether the audit log records a creation that client `app` was refused (`forbidden`), in
/// `namespace` (empty: refused before its body was read).
fn created_refused(env: &Env, namespace: &str) -> bool {
    let log = env.ok(&["--json", "audit", "show"], b"", "audit show");
    let entries: Vec<Value> = serde_json::from_slice(&log).unwrap();
    entries.iter().any(|e| {
        e["operation"] == "create"
            && e["outcome"] == "forbidden"
            && e["client"] == "app"
            && e.get("namespace").and_then(Value::as_str).unwrap_or("") == namespace
    })
}

/// A key made in a namespace the client does not see: 403, nothing made, and the refusal
/// audited with the client and the namespace.
#[test]
fn a_key_made_in_another_namespace_is_refused_and_audited() {
    let env = env();
    let server = Server::start(&env, &client("\"app\"", ""));
    let (status, refused) = server.ask(
        "POST",
        "/v1/keys",
        Some(&json!({"namespace": "other", "name": "new", "type": "ed25519"})),
    );
    assert_eq!(
        (status, &refused["error"]["code"]),
        (403, &json!("forbidden")),
        "{refused}"
    );
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    let listed = env.ok(
        &["--json", "--namespace", "other", "key", "list"],
        b"",
        "key list",
    );
    assert_eq!(serde_json::from_slice::<Value>(&listed).unwrap(), json!([]));
    assert!(created_refused(&env, "other"), "the refusal is audited");
}

#[test]
fn a_connection_from_no_configured_client_is_401_and_bad_bodies_are_4xx() {
    let env = env();
    // The only client is another user: this process is nobody to the service.
    let server = Server::start(
        &env,
        &format!(
            "[clients.someone]\nuid = {}\nnamespaces = [\"x\"]\n",
            uid().wrapping_add(4242)
        ),
    );
    let (status, err) = server.ask("GET", "/v1/health", None);
    assert_eq!(
        (status, &err["error"]["code"]),
        (401, &json!("unauthenticated"))
    );
    drop(server);

    let server = Server::start(&env, &client("\"default\"", ""));
    let id = env.create_key("k", "ed25519", &[]);
    let path = format!("/v1/keys/{id}/sign");
    for (body, what) in [
        (&b"{not json"[..], "malformed JSON"),
        (&br#"{"data": 5}"#[..], "a number for bytes"),
        (&br#"{"data": "not base64!"}"#[..], "bad base64"),
        (&br#"{"data": "", "extra": 1}"#[..], "an unknown field"),
    ] {
        let (status, answer) = server.raw("POST", &path, Some(body));
        assert!(
            (400..500).contains(&status) && answer["error"]["message"].is_string(),
            "{what}: expected 4xx with a JSON error, got {status} {answer}"
        );
    }
    let big = vec![b'a'; keyhold::service::MAX_BODY + 1];
    let (status, answer) = server.raw("POST", &path, Some(&big));
    assert_eq!(
        (status, &answer["error"]["code"]),
        (413, &json!("too_large")),
        "an oversized body: {answer}"
    );
    // Still answering.
    assert_eq!(server.ask("GET", "/v1/health", None).0, 200);
    let (status, err) = server.ask("GET", "/elsewhere", None);
    assert_eq!(
        (status, &err["error"]["code"]),
        (404, &json!("no_such_endpoint"))
    );
}

/// Review (serve, first): a key of another namespace is not looked up at all, so its due
/// schedule is not run by a client that does not see it; a wrong method and an unknown path are
/// JSON errors, and only for a client.
#[test]
fn a_key_the_client_does_not_see_is_not_touched_and_every_refusal_is_json() {
    let env = env();
    let theirs = env.create_key(
        "theirs",
        "hmac-sha256",
        &["--namespace", "other", "--rotate-after", "1s"],
    );
    std::thread::sleep(Duration::from_millis(1100));
    let server = Server::start(&env, &client("\"app\"", ""));
    let (status, _) = server.ask(
        "POST",
        &format!("/v1/keys/{theirs}/sign"),
        Some(&json!({"data": b64(b"m")})),
    );
    assert_eq!(status, 404);
    // Read from the database itself: `key show` would run the due rotation.
    let db = rusqlite::Connection::open(env.database_file()).unwrap();
    let later: i64 = db
        .query_row("SELECT count(*) FROM key_versions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        later, 0,
        "the other namespace's key was rotated by the request"
    );
    let (status, err) = server.ask("GET", "/v1/random", None);
    assert_eq!(
        (status, &err["error"]["code"]),
        (405, &json!("method_not_allowed"))
    );
    let (status, err) = server.ask("GET", "/v1/keys/%FF%FE/public", None);
    assert!(
        (400..500).contains(&status) && err["error"]["code"].is_string(),
        "{err}"
    );
}

/// The socket answers any local user's connection, and the service tells users apart by their
/// peer credentials: a configured client of another uid (`nobody`, through setpriv) is served.
#[test]
fn another_user_s_configured_client_is_served_over_the_socket() {
    let env = env();
    // The socket's directory must let the other user reach the socket.
    let nobody = AsNobody::new(&env);
    let server = Server::start(
        &env,
        "[clients.nobody]\nuid = 65534\nnamespaces = [\"app\"]\n",
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&server.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666);
    assert_eq!(
        nobody.get(&server, "/v1/health", &[]),
        r#"{"client":"nobody","sealer":"passphrase","status":"ok"}"#
    );
    // This process (root) is no client of it.
    assert_eq!(server.ask("GET", "/v1/health", None).0, 401);
}

#[test]
fn serve_refuses_a_configuration_without_clients_and_a_path_that_is_not_a_socket() {
    let env = env();
    env.set_config("");
    let out = env.run(&["serve", "--listen", "unix:/nonexistent/x.sock"], b"");
    assert_fail(
        &out,
        1,
        "keyhold serve answers configured clients only",
        "no clients",
    );
    env.set_config(&client("\"default\"", ""));
    let file = env.write("not-a-socket", b"keep me");
    let out = env.run(&["serve", "--listen", &format!("unix:{file}")], b"");
    assert_fail(&out, 1, "exists and is not a socket", "a regular file");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let out = env.run(&["serve", "--listen", "tcp:127.0.0.1:1"], b"");
    assert_fail(&out, 2, "TCP is served with TLS only", "plain TCP");
    let out = env.run(&["serve", "--listen", "udp:127.0.0.1:1"], b"");
    assert_fail(&out, 1, "give unix:PATH", "neither unix nor tcp");
}
