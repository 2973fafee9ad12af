//! `keyhold serve`'s whole key surface as a real process on a temporary socket: MACs, rewrap,
//! data keys, the lifecycle (rotate, states, policy, destruction, history), lookup by name, a
//! key's older public key; batches; grants checked before a body is read; the client named in
//! the audit log and counted in the metrics; 16 clients at once.
#![cfg(feature = "serve")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use serde_json::{json, Value};
use support::env::Env;
use support::serve::{b64, client, env, unb64, Server};

/// `POST /v1/keys/{id}/{action}` with `body`.
fn act(server: &Server, id: &str, action: &str, body: Value) -> (u16, Value) {
    server.ask("POST", &format!("/v1/keys/{id}/{action}"), Some(&body))
}

/// A key made through the service: its ID.
fn create(server: &Server, name: &str, ty: &str) -> String {
    let (status, key) = server.ask(
        "POST",
        "/v1/keys",
        Some(&json!({"namespace": "app", "name": name, "type": ty})),
    );
    assert_eq!(status, 201, "{key}");
    key["id"].as_str().unwrap().to_owned()
}

fn error_code(answer: &(u16, Value)) -> (u16, &str) {
    (answer.0, answer.1["error"]["code"].as_str().unwrap_or("-"))
}

#[test]
fn macs_rewrap_data_keys_and_the_lifecycle_run_through_the_service() {
    let env = env();
    let server = Server::start(&env, &client("\"app\"", ""));

    // MAC and its check, with the version that made the tag.
    let hmac = create(&server, "tags", "hmac-sha256");
    let (status, tagged) = act(&server, &hmac, "mac", json!({"data": b64(b"m")}));
    assert_eq!((status, &tagged["version"]), (200, &json!(1)), "{tagged}");
    let (_, good) = act(
        &server,
        &hmac,
        "mac-verify",
        json!({"data": b64(b"m"), "mac": tagged["mac"]}),
    );
    assert_eq!(
        (&good["valid"], &good["version"]),
        (&json!(true), &json!(1))
    );
    let (_, bad) = act(
        &server,
        &hmac,
        "mac-verify",
        json!({"data": b64(b"other"), "mac": tagged["mac"]}),
    );
    assert_eq!(bad, json!({"valid": false}));

    // Rotation, then an old envelope rewrapped under the new version.
    let aes = create(&server, "box", "aes-256-gcm");
    let (_, old) = act(&server, &aes, "encrypt", json!({"plaintext": b64(b"kept")}));
    assert_eq!(old["version"], 1);
    let (status, rotated) = act(&server, &aes, "rotate", json!({"reason": "yearly"}));
    assert_eq!((status, &rotated["version"]), (200, &json!(2)), "{rotated}");
    let (status, rewrapped) = act(
        &server,
        &aes,
        "rewrap",
        json!({"envelope": old["envelope"]}),
    );
    assert_eq!(
        (status, &rewrapped["version"]),
        (200, &json!(2)),
        "{rewrapped}"
    );
    let (_, opened) = act(
        &server,
        &aes,
        "decrypt",
        json!({"envelope": rewrapped["envelope"]}),
    );
    assert_eq!(
        (unb64(&opened["plaintext"]), &opened["version"]),
        (b"kept".to_vec(), &json!(2))
    );

    // Data keys: 32 fresh bytes, and the envelope that gives them back; wrapped-only has none.
    let (status, datakey) = act(&server, &aes, "datakey", json!({"aad": b64(b"file 7")}));
    assert_eq!(status, 200, "{datakey}");
    let plain = unb64(&datakey["plaintext"]);
    assert_eq!(plain.len(), 32);
    let (_, again) = act(&server, &aes, "datakey", json!({}));
    assert_ne!(unb64(&again["plaintext"]), plain, "each data key is fresh");
    let (_, unwrapped) = act(
        &server,
        &aes,
        "decrypt",
        json!({"envelope": datakey["envelope"], "aad": b64(b"file 7")}),
    );
    assert_eq!(unb64(&unwrapped["plaintext"]), plain);
    let (status, wrapped) = act(&server, &aes, "datakey-wrapped", json!({}));
    assert_eq!(status, 200, "{wrapped}");
    assert!(wrapped.get("plaintext").is_none(), "{wrapped}");
    let (_, unwrapped) = act(
        &server,
        &aes,
        "decrypt",
        json!({"envelope": wrapped["envelope"]}),
    );
    assert_eq!(unb64(&unwrapped["plaintext"]).len(), 32);

    // The key's history, found by name, and an older version's public key.
    let (status, history) = server.ask("GET", &format!("/v1/keys/{aes}/history"), None);
    assert_eq!(status, 200, "{history}");
    let events: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["created", "rotated"]);
    assert_eq!(history[1]["reason"], "yearly");
    let (_, found) = server.ask("GET", "/v1/keys?namespace=app&name=box", None);
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["id"], aes.as_str());
    let (_, none) = server.ask("GET", "/v1/keys?namespace=app&name=nothing", None);
    assert_eq!(none, json!([]));
    assert_eq!(
        error_code(&server.ask("GET", "/v1/keys?name=box", None)),
        (400, "invalid_input")
    );
    let signer = create(&server, "signer", "ecdsa-p256");
    let first = server
        .ask("GET", &format!("/v1/keys/{signer}/public"), None)
        .1;
    act(&server, &signer, "rotate", json!({}));
    let v1 = server
        .ask("GET", &format!("/v1/keys/{signer}/public?version=1"), None)
        .1;
    let v2 = server
        .ask("GET", &format!("/v1/keys/{signer}/public"), None)
        .1;
    assert_eq!(v1["pem"], first["pem"]);
    assert_ne!(v2["pem"], first["pem"]);

    // States: a suspended key does not sign until resumed.
    let (status, suspended) = act(&server, &signer, "suspend", json!({}));
    assert_eq!((status, &suspended["state"]), (200, &json!("suspended")));
    let sign = || act(&server, &signer, "sign", json!({"data": b64(b"m")}));
    assert_eq!(error_code(&sign()), (409, "wrong_state"));
    act(&server, &signer, "resume", json!({}));
    assert_eq!(sign().0, 200);

    // Policy: a change is made; none is refused.
    let (status, set) = act(&server, &signer, "policy", json!({"rotate_after": "90d"}));
    assert_eq!(
        (status, &set["rotate_after_secs"]),
        (200, &json!(7_776_000))
    );
    assert_eq!(
        error_code(&act(&server, &signer, "policy", json!({}))),
        (400, "invalid_input")
    );

    // Destruction: scheduled, cancelled, then at once.
    let (_, scheduled) = act(&server, &signer, "destroy", json!({"after": "1h"}));
    assert!(scheduled["destroy_at"].is_string(), "{scheduled}");
    let (_, kept) = act(&server, &signer, "cancel-destroy", json!({}));
    assert!(kept["destroy_at"].is_null(), "{kept}");
    assert_eq!(
        error_code(&act(&server, &signer, "destroy", json!({"after": "0s"}))),
        (400, "invalid_input")
    );
    let (_, destroyed) = act(&server, &signer, "destroy", json!({"now": true}));
    assert_eq!(destroyed["state"], "destroyed");
    assert_eq!(error_code(&sign()), (409, "wrong_state"));

    // A compromised key opens only when the client accepts it, and the answer says so.
    act(
        &server,
        &aes,
        "compromise",
        json!({"reason": "laptop lost"}),
    );
    let open = |allow: bool| {
        act(
            &server,
            &aes,
            "decrypt",
            json!({"envelope": rewrapped["envelope"], "allow_compromised": allow}),
        )
    };
    assert_eq!(error_code(&open(false)).0, 409);
    let (status, opened) = open(true);
    assert_eq!(
        (status, &opened["compromised"], unb64(&opened["plaintext"])),
        (200, &json!(true), b"kept".to_vec())
    );

    assert_eq!(
        error_code(&act(&server, &aes, "bake", json!({}))),
        (404, "no_such_endpoint")
    );
    assert_eq!(
        error_code(&server.ask("GET", &format!("/v1/keys/{aes}/secret"), None)),
        (404, "no_such_endpoint")
    );
}

/// A client is refused an operation it was not granted, and a key it does not see, before its
/// body is read: a body that is not even JSON gets the refusal, not a parse error.
#[test]
fn grants_are_checked_before_the_body_and_a_wrapped_only_client_never_sees_a_data_key() {
    let env = env();
    let mine = env.create_key("box", "aes-256-gcm", &["--namespace", "app"]);
    let theirs = env.create_key("theirs", "aes-256-gcm", &["--namespace", "other"]);
    let server = Server::start(
        &env,
        &client("\"app\"", "operations = [\"datakey-wrapped\", \"show\"]"),
    );
    let garbage = Some(&b"{ this is not json"[..]);
    let path = |id: &str, action: &str| format!("/v1/keys/{id}/{action}");
    let refused = server.raw("POST", &path(&mine, "datakey"), garbage);
    assert_eq!(error_code(&refused), (403, "forbidden"), "{}", refused.1);
    assert_eq!(
        error_code(&server.raw("POST", &path(&mine, "sign"), garbage)),
        (403, "forbidden")
    );
    assert_eq!(
        error_code(&server.raw("POST", &path(&theirs, "datakey-wrapped"), garbage)),
        (404, "no_such_key")
    );
    // Granted, the same body is then read and refused as what it is.
    assert_eq!(
        error_code(&server.raw("POST", &path(&mine, "datakey-wrapped"), garbage)),
        (400, "invalid_input")
    );
    let (status, wrapped) = act(&server, &mine, "datakey-wrapped", json!({}));
    assert_eq!(status, 200, "{wrapped}");
    assert!(wrapped.get("plaintext").is_none());
    // Not granted by default: what looks past the client's namespaces.
    assert_eq!(
        error_code(&server.ask("GET", "/v1/clients", None)),
        (403, "forbidden")
    );
    let server2_env = env;
    drop(server);
    let server = Server::start(&server2_env, &client("\"app\"", ""));
    assert_eq!(
        error_code(&server.ask("GET", "/v1/metrics", None)),
        (403, "forbidden")
    );
    assert_eq!(
        error_code(&server.ask("GET", "/v1/clients", None)),
        (403, "forbidden")
    );
}

#[test]
fn a_batch_answers_each_operation_in_order_as_its_own_request_would() {
    let env = env();
    let signer = env.create_key("signer", "ecdsa-p256", &["--namespace", "app"]);
    let aes = env.create_key("box", "aes-256-gcm", &["--namespace", "app"]);
    let theirs = env.create_key("theirs", "ed25519", &["--namespace", "other"]);
    let server = Server::start(
        &env,
        &client(
            "\"app\"",
            "operations = [\"sign\", \"verify\", \"decrypt\"]",
        ),
    );
    let (status, answer) = server.ask(
        "POST",
        "/v1/batch",
        Some(&json!({"operations": [
            {"op": "sign", "key": signer, "data": b64(b"one")},
            {"op": "sign", "key": theirs, "data": b64(b"one")},
            {"op": "encrypt", "key": aes, "plaintext": b64(b"x")},
            {"op": "sign", "key": signer, "data": 5},
            {"op": "bake", "key": signer},
            {"key": signer, "data": b64(b"one")},
            {"op": "sign", "key": signer, "data": b64(b"two"), "format": "raw"},
        ]})),
    );
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 404, 403, 422, 404, 400, 200], "{answer}");
    assert_eq!(results[1]["error"]["code"], "no_such_key");
    assert_eq!(results[2]["error"]["code"], "forbidden");
    assert_eq!(unb64(&results[6]["result"]["signature"]).len(), 64);
    // Each signature is the key's: checked by a batch of verifications and by OpenSSL.
    let public = env.pubkey_pem(&signer);
    assert!(support::openssl_verifies(
        &public,
        keyhold::Algorithm::EcdsaP256Sha256,
        b"one",
        &unb64(&results[0]["result"]["signature"])
    ));
    let (_, checked) = server.ask(
        "POST",
        "/v1/batch",
        Some(&json!({"operations": [
            {"op": "verify", "key": signer, "data": b64(b"one"),
             "signature": results[0]["result"]["signature"]},
            {"op": "verify", "key": signer, "data": b64(b"not one"),
             "signature": results[0]["result"]["signature"]},
        ]})),
    );
    assert_eq!(checked["results"][0]["result"]["valid"], true, "{checked}");
    assert_eq!(checked["results"][1]["result"]["valid"], false, "{checked}");

    // Too many operations: refused whole, and nothing is signed.
    let many: Vec<Value> = (0..1001)
        .map(|_| json!({"op": "sign", "key": signer, "data": b64(b"m")}))
        .collect();
    let too_many = server.ask("POST", "/v1/batch", Some(&json!({ "operations": many })));
    assert_eq!(
        error_code(&too_many),
        (422, "invalid_input"),
        "{}",
        too_many.1
    );
    assert!(too_many.1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 1000 operations"));
    assert_eq!(
        error_code(&server.ask("POST", "/v1/batch", Some(&json!({"ops": []})))),
        (422, "invalid_input")
    );
}

#[test]
fn the_audit_log_names_the_client_and_the_metrics_count_its_answers() {
    let env = env();
    let made_here = env.create_key("signer", "ecdsa-p256", &["--namespace", "app"]);
    let server = Server::start(
        &env,
        &client(
            "\"app\"",
            "operations = [\"sign\", \"create\", \"metrics\", \"admin\"]",
        ),
    );
    for _ in 0..3 {
        assert_eq!(
            act(&server, &made_here, "sign", json!({"data": b64(b"m")})).0,
            200
        );
    }
    assert_eq!(
        error_code(&act(&server, &made_here, "sign", json!({"data": "%%%"}))),
        (400, "invalid_input")
    );
    let made_there = create(&server, "served", "ed25519");
    let metrics = server.request("GET", "/v1/metrics", &[], None);
    let (status, text) = (metrics.status, metrics.text);
    assert_eq!(status, 200, "{text}");
    let labels = r#"operation="sign",backend="software",client="app""#;
    for line in [
        format!("keyhold_requests_total{{{labels},outcome=\"ok\"}} 3"),
        format!("keyhold_requests_total{{{labels},outcome=\"invalid_input\"}} 1"),
        format!("keyhold_request_duration_seconds_count{{{labels}}} 4"),
        format!("keyhold_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 4"),
        r#"keyhold_requests_total{operation="create",backend="-",client="app",outcome="ok"} 1"#
            .to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
    }
    let (_, clients) = server.ask("GET", "/v1/clients", None);
    assert_eq!(clients[0]["name"], "app");
    assert_eq!(
        clients[0]["operations"],
        json!(["sign", "create", "metrics", "admin"])
    );

    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    let log = env.ok(&["--json", "audit", "show"], b"", "audit show");
    let entries: Vec<Value> = serde_json::from_slice(&log).unwrap();
    let client_of = |operation: &str, key: &str| -> Vec<Value> {
        entries
            .iter()
            .filter(|e| e["operation"] == operation && e["key_id"] == key)
            .map(|e| e["client"].clone())
            .collect()
    };
    assert_eq!(client_of("sign", &made_here), vec![json!("app"); 3]);
    assert_eq!(client_of("create", &made_there), [json!("app")]);
    assert_eq!(
        client_of("create", &made_here),
        [Value::Null],
        "made by the CLI"
    );
    env.ok(&["audit", "verify"], b"", "the log with clients verifies");
    let text = String::from_utf8(env.ok(&["audit", "show"], b"", "audit show")).unwrap();
    assert!(text
        .lines()
        .any(|l| l.contains(" sign ") && l.contains(" client=app ")));
}

/// 16 clients at once, 500 requests each, over the socket: every one answered, every signature
/// good.
#[test]
fn sixteen_clients_times_500_requests_get_no_error() {
    let env: Env = env();
    let signer = env.create_key("signer", "ecdsa-p256", &["--namespace", "app"]);
    let server = Server::start(&env, &client("\"app\"", ""));
    let failures: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..16)
            .map(|t| {
                let (server, signer) = (&server, &signer);
                s.spawn(move || {
                    (0..500)
                        .filter(|i| {
                            let data = b64(format!("client {t} request {i}").as_bytes());
                            let (status, signed) =
                                act(server, signer, "sign", json!({ "data": data }));
                            status != 200 || unb64(&signed["signature"]).is_empty()
                        })
                        .count()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    assert_eq!(failures, 0, "requests of 8000 that failed");
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
}

/// A request refused before its body is read (no client, operation not granted, key not seen,
/// no such path) has its body read and dropped all the same: a connection closed on a body left
/// unread is reset, and the client sees that instead of the answer.
#[test]
fn a_request_refused_before_its_body_is_read_gets_its_answer_not_a_reset() {
    let env = env();
    let theirs = env.create_key("theirs", "ed25519", &["--namespace", "other"]);
    // Larger than what the server reads with the headers, smaller than the socket's buffer: the
    // client has sent it all when the answer comes, and without the drain most of it would be
    // unread when the connection closes.
    // (A stranger's body is read up to 64 KiB only: this one is under that.)
    let body = json!({ "data": b64(&[7; 12 * 1024]) }).to_string();
    let server = Server::start(&env, &client("\"app\"", "operations = [\"sign\"]"));
    for _ in 0..5 {
        for (path, refused) in [
            (format!("/v1/keys/{theirs}/sign"), (404, "no_such_key")),
            ("/v1/random".to_owned(), (403, "forbidden")),
            ("/v1/keys".to_owned(), (403, "forbidden")),
            ("/v1/nowhere".to_owned(), (404, "no_such_endpoint")),
        ] {
            let answer = server.raw("POST", &path, Some(body.as_bytes()));
            assert_eq!(error_code(&answer), refused, "{path}");
        }
    }
    drop(server);
    // Nobody to the service: 401, after the body.
    let other = format!(
        "[clients.someone]\nuid = {}\nnamespaces = [\"x\"]\n",
        support::serve::uid().wrapping_add(4242)
    );
    let server = Server::start(&env, &other);
    for _ in 0..5 {
        let refused = server.raw("POST", "/v1/keys", Some(body.as_bytes()));
        assert_eq!(error_code(&refused), (401, "unauthenticated"));
    }
}

/// Review: a time past 9999 was committed and then made every answer about the key panic
/// (listing the namespace too). Such times are refused before anything changes.
#[test]
fn times_past_the_year_9999_are_refused_and_the_namespace_still_lists() {
    let env = env();
    let server = Server::start(&env, &client("\"app\"", ""));
    let made = server.ask(
        "POST",
        "/v1/keys",
        Some(
            &json!({"namespace": "app", "name": "far", "type": "aes-256-gcm",
                     "deactivate_at": "+10000y"}),
        ),
    );
    assert_eq!(error_code(&made), (400, "invalid_input"), "{}", made.1);
    let aes = create(&server, "box", "aes-256-gcm");
    for body in [
        json!({"deactivate_at": "+10000y"}),
        json!({"deactivate_at": "10000-01-01T00:00:00Z"}),
    ] {
        let set = act(&server, &aes, "policy", body);
        assert_eq!(error_code(&set).0, 400, "{}", set.1);
    }
    let destroy = act(&server, &aes, "destroy", json!({"at": 253_402_300_800_i64}));
    assert_eq!(
        error_code(&destroy),
        (400, "invalid_input"),
        "{}",
        destroy.1
    );
    // The last second that can be written is kept, and written.
    let (status, set) = act(
        &server,
        &aes,
        "policy",
        json!({"deactivate_at": "9999-12-31T23:59:59Z"}),
    );
    assert_eq!(
        (status, &set["deactivate_at"]),
        (200, &json!("9999-12-31T23:59:59Z"))
    );
    let (status, listed) = server.ask("GET", "/v1/keys", None);
    assert_eq!((status, listed.as_array().map(Vec::len)), (200, Some(1)));
    env.ok(&["key", "list", "--namespace", "app"], b"", "key list");
}

/// Review: a refusal made by the service (an operation not granted, a key of a namespace the
/// client does not see) never reached the keystore, so the audit log and the metrics missed it.
#[test]
fn refusals_by_the_service_are_in_the_audit_log_and_the_metrics() {
    let env = env();
    let theirs = env.create_key("theirs", "ed25519", &["--namespace", "other"]);
    let mine = env.create_key("mine", "ed25519", &["--namespace", "app"]);
    let server = Server::start(
        &env,
        &client("\"app\"", "operations = [\"sign\", \"metrics\"]"),
    );
    let sign = |id: &str| act(&server, id, "sign", json!({"data": b64(b"m")}));
    assert_eq!(error_code(&sign(&theirs)), (404, "no_such_key"));
    assert_eq!(
        error_code(&act(&server, &mine, "decrypt", json!({"envelope": ""}))),
        (403, "forbidden")
    );
    let metrics = server.request("GET", "/v1/metrics", &[], None).text;
    for line in [
        r#"keyhold_requests_total{operation="sign",backend="-",client="app",outcome="no_such_key"} 1"#,
        r#"keyhold_requests_total{operation="decrypt",backend="-",client="app",outcome="forbidden"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in:\n{metrics}"
        );
    }
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    let log = env.ok(&["--json", "audit", "show"], b"", "audit show");
    let entries: Vec<Value> = serde_json::from_slice(&log).unwrap();
    let refused = |operation: &str, key: &str, outcome: &str| {
        entries.iter().any(|e| {
            e["operation"] == operation
                && e["key_id"] == key
                && e["outcome"] == outcome
                && e["client"] == "app"
        })
    };
    assert!(refused("sign", &theirs, "no_such_key"), "{entries:?}");
    assert!(refused("decrypt", &mine, "forbidden"), "{entries:?}");
}

/// Review: a client that went away before its answer freed its turn (and the backend's gate)
/// while the work it asked for still ran, so a client could start work without bound.
#[test]
fn a_client_that_goes_away_keeps_its_turn_until_its_work_ends() {
    use std::io::Write;
    let env = env();
    let server = Server::start(&env, &client("\"app\"", "max_concurrent = 1"));
    // RSA-4096 generation takes a while (seconds in a debug build).
    let body = json!({"namespace": "app", "name": "big", "type": "rsa-4096"}).to_string();
    let mut stream = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    write!(
        stream,
        "POST /v1/keys HTTP/1.1\r\nHost: keyhold\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    drop(stream);
    std::thread::sleep(std::time::Duration::from_millis(100));
    // Its work still runs: the client's one turn is still taken.
    let busy = server.ask("GET", "/v1/health", None);
    assert_eq!(error_code(&busy), (429, "busy"), "{}", busy.1);
    // Once it ends, the key is made and the turn free again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while server.ask("GET", "/v1/health", None).0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the turn never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, found) = server.ask("GET", "/v1/keys?namespace=app&name=big", None);
    assert_eq!(found.as_array().map(Vec::len), Some(1), "{found}");
}
