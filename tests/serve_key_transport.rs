//! Key transport through `keyhold serve` as a real process on a temporary socket
//! (`POST /v1/keys/{id}/export`, `POST /v1/keys/import`; docs/service.md): a key leaves only
//! wrapped and comes back the same key; a wrapping or unwrapping key of a namespace the client
//! does not see is one that does not exist (and the refusal is audited); an import into such a
//! namespace is forbidden, and each refusal is audited; the grants, by name only, are checked
//! before the body is read; bad requests are refused and leave nothing behind.
#![cfg(feature = "serve")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use serde_json::{json, Value};
use support::env::Env;
use support::serve::{b64, client, env, unb64, Server};

fn act(server: &Server, id: &str, action: &str, body: Value) -> (u16, Value) {
    server.ask("POST", &format!("/v1/keys/{id}/{action}"), Some(&body))
}

fn import(server: &Server, body: Value) -> (u16, Value) {
    server.ask("POST", "/v1/keys/import", Some(&body))
}

fn error_code(answer: &(u16, Value)) -> (u16, &str) {
    (answer.0, answer.1["error"]["code"].as_str().unwrap_or("-"))
}

fn mac(server: &Server, id: &str, data: &[u8]) -> Vec<u8> {
    let (status, answer) = act(server, id, "mac", json!({"data": b64(data)}));
    assert_eq!(status, 200, "mac: {answer}");
    unb64(&answer["mac"])
}

/// The names of the keys of namespace `app`, as the store lists them.
fn names(env: &Env) -> Vec<String> {
    let out = env.ok(
        &["--json", "--namespace", "app", "key", "list"],
        b"",
        "key list",
    );
    let keys: Vec<Value> = serde_json::from_slice(&out).unwrap();
    keys.iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The store's audit log, as `keyhold audit show --json` gives it.
fn audit_entries(env: &Env) -> Vec<Value> {
    let log = env.ok(&["--json", "audit", "show"], b"", "audit show");
    serde_json::from_slice(&log).unwrap()
}

/// Whether an entry of client `app` records `operation` with `outcome`, its `field` `value`.
fn has_entry(
    entries: &[Value],
    operation: &str,
    (field, value): (&str, &str),
    outcome: &str,
) -> bool {
    entries.iter().any(|e| {
        e["operation"] == operation
            && e[field] == value
            && e["outcome"] == outcome
            && e["client"] == "app"
    })
}

/// HMAC-SHA256 of `data` under `key`, by the openssl command (not by keyhold).
fn openssl_hmac(env: &Env, key: &[u8], data: &[u8]) -> Vec<u8> {
    let input = env.file("hmac-input");
    std::fs::write(&input, data).unwrap();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let out = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-binary", "-mac", "HMAC", "-macopt"])
        .arg(format!("hexkey:{hex}"))
        .arg(&input)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn a_key_leaves_wrapped_and_comes_back_the_same_key_within_the_clients_namespaces() {
    let env = env();
    let theirs = env.create_key("theirs-kek", "aes-256-gcm", &["--namespace", "other"]);
    // A key wrapped under the other tenant's key, there: what an unwrap with it would open.
    let their_secret = env.create_key(
        "their-secret",
        "hmac-sha256",
        &["--namespace", "other", "--exportable"],
    );
    let under_theirs = env.file("under-theirs");
    env.ok(
        &[
            "key",
            "export",
            "--key",
            &their_secret,
            "--wrap-with",
            &theirs,
            "--out",
            under_theirs.to_str().unwrap(),
        ],
        b"",
        "export there",
    );
    let under_theirs = std::fs::read(&under_theirs).unwrap();
    let server = Server::start(
        &env,
        &client(
            "\"app\"",
            "operations = [\"create\", \"mac\", \"export\", \"import\", \"list\"]",
        ),
    );
    let hmac = server.create(&json!({
        "namespace": "app", "name": "tags", "type": "hmac-sha256", "extractable": true
    }));
    let kek = server.create(&json!({"namespace": "app", "name": "kek", "type": "aes-256-gcm"}));

    // Out under the client's own key, and in again with it: the same key (the same tags).
    let (status, wrapped) = act(&server, &hmac, "export", json!({"wrap_with": kek}));
    assert_eq!(status, 200, "{wrapped}");
    let wrapped = unb64(&wrapped["wrapped"]);
    let (status, back) = import(
        &server,
        json!({"namespace": "app", "name": "tags-again", "type": "hmac-sha256",
               "key": b64(&wrapped), "unwrap_with": kek}),
    );
    assert_eq!(status, 201, "{back}");
    assert_eq!(back["namespace"], "app");
    let again = back["id"].as_str().unwrap();
    assert_eq!(mac(&server, again, b"m"), mac(&server, &hmac, b"m"));

    // A raw secret in plaintext: the key openssl computes with.
    let raw: Vec<u8> = (0u8..32).collect();
    let (status, plain) = import(
        &server,
        json!({"namespace": "app", "name": "raw", "type": "hmac-sha256", "key": b64(&raw)}),
    );
    assert_eq!(status, 201, "{plain}");
    assert_eq!(
        mac(&server, plain["id"].as_str().unwrap(), b"data"),
        openssl_hmac(&env, &raw, b"data")
    );

    // Another namespace's wrapping key is, to this client, no key; so is its unwrapping key.
    let answer = act(&server, &hmac, "export", json!({"wrap_with": theirs}));
    assert_eq!(error_code(&answer), (404, "no_such_key"), "{}", answer.1);
    let answer = import(
        &server,
        json!({"namespace": "app", "name": "smuggled", "type": "hmac-sha256",
               "key": b64(&under_theirs), "unwrap_with": theirs}),
    );
    assert_eq!(error_code(&answer), (404, "no_such_key"), "{}", answer.1);
    // And a key cannot be brought into a namespace the client does not see.
    let answer = import(
        &server,
        json!({"namespace": "other", "name": "planted", "type": "hmac-sha256",
               "key": b64(&raw)}),
    );
    assert_eq!(error_code(&answer), (403, "forbidden"), "{}", answer.1);

    // A tampered wrapping key ID fails authentication, as the key's own would.
    let mut tampered = kek.clone();
    tampered.replace_range(12..13, if &kek[12..13] == "A" { "B" } else { "A" });
    let answer = act(&server, &hmac, "export", json!({"wrap_with": tampered}));
    assert_eq!(
        error_code(&answer),
        (400, "key_id_authentication"),
        "{}",
        answer.1
    );

    // Exactly one way to wrap; a key not created exportable does not leave.
    for body in [
        json!({}),
        json!({"wrap_with": kek, "wrap_with_trusted": "label"}),
    ] {
        let answer = act(&server, &hmac, "export", body.clone());
        assert_eq!(
            error_code(&answer),
            (422, "invalid_input"),
            "{body}: {}",
            answer.1
        );
    }
    let answer = act(&server, &kek, "export", json!({"wrap_with": kek}));
    assert_eq!(error_code(&answer), (400, "invalid_input"), "{}", answer.1);
    assert!(
        answer.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not exportable"),
        "{}",
        answer.1
    );
    // A wrapped key changed by one bit does not unwrap, and nothing is recorded.
    let mut changed = wrapped.clone();
    changed[5] ^= 1;
    let answer = import(
        &server,
        json!({"namespace": "app", "name": "changed", "type": "hmac-sha256",
               "key": b64(&changed), "unwrap_with": kek}),
    );
    assert_eq!(answer.0 / 100, 4, "{}", answer.1);

    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    let mut listed = names(&env);
    listed.sort();
    assert_eq!(listed, ["kek", "raw", "tags", "tags-again"]);
    // The refusals are in the audit log, with the client, and so is the export that was done.
    let entries = audit_entries(&env);
    for (operation, field, value, outcome) in [
        ("wrap", "key_id", theirs.as_str(), "no_such_key"),
        ("unwrap", "key_id", theirs.as_str(), "no_such_key"),
        // The import into a namespace the client does not see.
        ("import", "namespace", "other", "forbidden"),
        // The export and import the other tenant's keys were refused for.
        ("export", "key_id", hmac.as_str(), "no_such_key"),
        ("import", "namespace", "app", "no_such_key"),
        ("export", "key_id", hmac.as_str(), "ok"),
    ] {
        assert!(
            has_entry(&entries, operation, (field, value), outcome),
            "{operation} {field}={value} {outcome}: {entries:?}"
        );
    }
}

/// Export and import are granted by name only: a client with the default grant has neither, in
/// a batch either.
#[test]
fn export_and_import_need_their_grants_and_are_refused_before_the_body_is_read() {
    let env = env();
    let server = Server::start(&env, &client("\"app\"", ""));
    let hmac = server.create(&json!({
        "namespace": "app", "name": "tags", "type": "hmac-sha256", "extractable": true
    }));
    // Not JSON at all: refused for the grant, not for the body.
    let answer = server.raw(
        "POST",
        &format!("/v1/keys/{hmac}/export"),
        Some(b"{ not json"),
    );
    assert_eq!(error_code(&answer), (403, "forbidden"), "{}", answer.1);
    let answer = server.raw("POST", "/v1/keys/import", Some(b"{ not json"));
    assert_eq!(error_code(&answer), (403, "forbidden"), "{}", answer.1);
    // In a batch: that operation is refused, the others run.
    let (status, answer) = server.ask(
        "POST",
        "/v1/batch",
        Some(&json!({"operations": [
            {"op": "export", "key": hmac, "wrap_with": hmac},
            {"op": "mac", "key": hmac, "data": b64(b"m")},
        ]})),
    );
    assert_eq!(status, 200, "{answer}");
    let results = &answer["results"];
    assert_eq!(
        (&results[0]["status"], &results[0]["error"]["code"]),
        (&json!(403), &json!("forbidden")),
        "{answer}"
    );
    assert_eq!(results[1]["status"], 200, "{answer}");
    assert!(results[0].get("result").is_none(), "{answer}");
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    assert_eq!(names(&env), ["tags"]);
    let entries = audit_entries(&env);
    for operation in ["export", "import"] {
        assert!(
            has_entry(&entries, operation, ("client", "app"), "forbidden"),
            "{operation}: {entries:?}"
        );
    }
    // The export refused alone and the one refused in the batch.
    let exports = entries
        .iter()
        .filter(|e| e["operation"] == "export" && e["outcome"] == "forbidden")
        .count();
    assert_eq!(exports, 2, "{entries:?}");
}
