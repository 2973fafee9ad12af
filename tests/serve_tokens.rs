//! Bearer-token clients of `keyhold serve` (docs/service.md, Tokens), with the real binary on a
//! temporary socket: `keyhold client add` prints a token once and the service serves exactly
//! its grant; a wrong token is 401 whoever the peer is; clients added and removed while the
//! service runs count from the next request; a token client's row changed or put back in the
//! database is refused; repeated failures are rate limited per source (the peer's uid) while
//! other sources are served; the token is never in the audit log, `client list` or the
//! service's log.
#![cfg(feature = "serve")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use base64::Engine;
use serde_json::{json, Value};
use support::env::*;
use support::serve::{Answer, AsNobody, Server};

/// This process's user.
fn uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// An initialised store; the service logs keyhold's debug lines too (so that "never logged" is
/// checked against everything it says).
fn env() -> Env {
    let env = Env::new()
        .with_config("")
        .with_var("RUST_LOG", "keyhold=debug");
    env.init_store();
    env
}

/// `client add NAME ARGS…`: the token, the only line on stdout.
fn add_client(env: &Env, name: &str, args: &[&str]) -> String {
    let mut all = vec!["client", "add", name];
    all.extend_from_slice(args);
    let out = env.run(&all, b"");
    assert_ok(&out, &format!("client add {name}"));
    let stdout = stdout_str(&out);
    let token = stdout.strip_suffix('\n').unwrap().to_owned();
    assert!(
        token.starts_with("kht1_") && !token.contains('\n'),
        "{stdout}"
    );
    token
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// `METHOD path` with `token` and a JSON `body`.
fn ask(server: &Server, token: &str, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let body = body.map(Value::to_string);
    server.request(
        method,
        path,
        &[&bearer(token)],
        body.as_deref().map(str::as_bytes),
    )
}

fn sign(server: &Server, token: &str, id: &str) -> Answer {
    let data = base64::engine::general_purpose::STANDARD.encode(b"m");
    ask(
        server,
        token,
        "POST",
        &format!("/v1/keys/{id}/sign"),
        Some(&json!({ "data": data })),
    )
}

fn health(server: &Server, token: &str) -> Answer {
    ask(server, token, "GET", "/v1/health", None)
}

fn code(answer: &Answer) -> (u16, &Value) {
    (answer.status, &answer.body["error"]["code"])
}

/// Asserts that `token` is nowhere in `text` (nor the part after the prefix).
fn assert_absent(text: &str, token: &str, what: &str) {
    let body = token.strip_prefix("kht1_").unwrap();
    assert!(!text.contains(body), "the token is in {what}:\n{text}");
}

#[test]
fn a_token_client_is_served_its_namespaces_and_operations_and_nothing_else() {
    let env = env();
    let mine = env.create_key("mine", "ed25519", &["--namespace", "app"]);
    let second = env.create_key("second", "ed25519", &["--namespace", "more"]);
    let theirs = env.create_key("theirs", "ed25519", &["--namespace", "other"]);
    let token = add_client(
        &env,
        "app",
        &[
            "--namespace",
            "app",
            "--namespace",
            "more",
            "--operations",
            "sign,list",
        ],
    );
    // No uid client in the configuration: the token client alone lets the service start.
    let server = Server::start(&env, "");
    let answer = health(&server, &token);
    assert_eq!(
        (answer.status, &answer.body),
        (
            200,
            &json!({"status": "ok", "client": "app", "sealer": "passphrase"})
        )
    );
    for id in [&mine, &second] {
        let signed = sign(&server, &token, id);
        assert_eq!(signed.status, 200, "{:?}", signed.body);
    }
    // Another namespace's key: the answer for a key that does not exist.
    assert_eq!(
        sign(&server, &token, &theirs).body,
        json!({"error": {"code": "no_such_key", "message": "no such key"}})
    );
    let listed = ask(&server, &token, "GET", "/v1/keys", None);
    let names: Vec<&str> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mine", "second"]);
    // Operations not granted: 403 naming the client.
    let random = ask(
        &server,
        &token,
        "POST",
        "/v1/random",
        Some(&json!({"bytes": 8})),
    );
    assert_eq!(code(&random), (403, &json!("forbidden")));
    let public = ask(
        &server,
        &token,
        "GET",
        &format!("/v1/keys/{mine}/public"),
        None,
    );
    assert_eq!(public.status, 403);
    assert!(public.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("client `app` may not pubkey"));
    // Without the token, this process is nobody to the service.
    assert_eq!(server.ask("GET", "/v1/health", None).0, 401);

    let (status, err) = server.stop();
    assert!(status.success(), "{status:?}\n{err}");
    assert_absent(&err, &token, "the service's stderr");
    let list = env.ok_text(&["client", "list"]);
    assert_eq!(
        list.split_whitespace().take(3).collect::<Vec<_>>(),
        ["app", "namespaces=app,more", "operations=sign,list"],
        "{list}"
    );
    assert_absent(&list, &token, "client list");
    let json_list = String::from_utf8(env.ok(&["--json", "client", "list"], b"", "list")).unwrap();
    assert_absent(&json_list, &token, "client list --json");
    let audit = std::fs::read_to_string(env.store.join("audit.log")).unwrap();
    assert!(audit.contains("client-add"), "{audit}");
    assert_absent(&audit, &token, "the audit log");
    // Nor is the token anywhere in the store's files.
    let db = env.db();
    assert!(support::env::holds_secret(&db, token.as_bytes()).is_none());
}

#[test]
fn a_wrong_token_is_401_even_from_a_configured_uid_and_no_header_is_the_uid_s_client() {
    let env = env();
    let token = add_client(&env, "tok", &["--namespace", "app"]);
    let server = Server::start(
        &env,
        &format!("[clients.local]\nuid = {}\nnamespaces = [\"app\"]\n", uid()),
    );
    // No header: the peer credentials, as before tokens.
    assert_eq!(
        server.ask("GET", "/v1/health", None).1["client"],
        json!("local")
    );
    assert_eq!(health(&server, &token).body["client"], json!("tok"));
    let mut wrong = token.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    for header in [
        bearer(&wrong),
        bearer("kht1_short"),
        bearer(""),
        "Authorization: Basic dXNlcjpwYXNz".to_owned(),
        format!("Authorization: {token}"),
    ] {
        let answer = server.request("GET", "/v1/health", &[&header], None);
        assert_eq!(
            code(&answer),
            (401, &json!("unauthenticated")),
            "{header}: a configured uid does not rescue a wrong token"
        );
    }
}

#[test]
fn clients_added_and_removed_while_the_service_runs_count_from_the_next_request() {
    let env = env();
    let first = add_client(&env, "first", &["--namespace", "app"]);
    let server = Server::start(&env, "");
    assert_eq!(health(&server, &first).status, 200);

    let second = add_client(&env, "second", &["--namespace", "app"]);
    assert_eq!(
        health(&server, &second).body["client"],
        json!("second"),
        "added while running, served without a restart"
    );
    let removed = env.ok_text(&["client", "remove", "first"]);
    assert!(
        removed.contains("removed token client `first`"),
        "{removed}"
    );
    assert_eq!(
        code(&health(&server, &first)),
        (401, &json!("unauthenticated")),
        "removed: refused at the next request"
    );
    assert_eq!(
        health(&server, &second).status,
        200,
        "the other still served"
    );
    let audit = env.ok_text(&["audit", "show"]);
    assert_eq!(audit.matches(" client-add ").count(), 2, "{audit}");
    assert_eq!(audit.matches(" client-remove ").count(), 1, "{audit}");
    let (status, err) = server.stop();
    assert!(status.success(), "{status:?}\n{err}");
    for token in [&first, &second] {
        assert_absent(&err, token, "the service's stderr");
        assert_absent(&audit, token, "audit show");
    }
}

#[test]
fn a_token_client_s_row_changed_in_the_database_is_refused() {
    let env = env();
    let id = env.create_key("k", "ed25519", &["--namespace", "other"]);
    let token = add_client(&env, "app", &["--namespace", "app"]);
    let server = Server::start(&env, "");
    assert_eq!(sign(&server, &token, &id).status, 404, "not its namespace");
    // The intruder widens the grant: the row no longer carries its MAC.
    let db = rusqlite::Connection::open(env.database_file()).unwrap();
    let changed = db
        .execute(
            "UPDATE clients SET namespaces = '[\"app\",\"other\"]' WHERE name = 'app'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(db);
    let refused = sign(&server, &token, &id);
    assert_eq!(
        code(&refused),
        (500, &json!("integrity")),
        "{:?}",
        refused.body
    );
    assert_eq!(health(&server, &token).status, 500, "nothing served to it");
    let out = env.run(&["client", "list"], b"");
    assert_fail(&out, 6, "token client", "a changed row, at the next open");
    drop(server);
}

#[test]
fn a_removed_client_put_back_from_an_older_copy_is_refused_as_tampering() {
    let env = env();
    let keep = add_client(&env, "keep", &["--namespace", "app"]);
    let gone = add_client(&env, "gone", &["--namespace", "app"]);
    let db = rusqlite::Connection::open(env.database_file()).unwrap();
    let row: Vec<rusqlite::types::Value> = db
        .query_row("SELECT * FROM clients WHERE name = 'gone'", [], |r| {
            (0..7).map(|i| r.get(i)).collect()
        })
        .unwrap();
    drop(db);
    env.ok_text(&["client", "remove", "gone"]);
    let server = Server::start(&env, "");
    assert_eq!(health(&server, &gone).status, 401);
    // The revoked client's row, which carries a genuine MAC, put back.
    let db = rusqlite::Connection::open(env.database_file()).unwrap();
    db.execute(
        "INSERT INTO clients VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        rusqlite::params_from_iter(row),
    )
    .unwrap();
    drop(db);
    let refused = health(&server, &gone);
    assert_eq!(
        code(&refused),
        (500, &json!("store_tampered")),
        "{:?}",
        refused.body
    );
    drop(server);
    let out = env.run(&["client", "list"], b"");
    assert_fail(
        &out,
        10,
        "token client",
        "a removed client put back, at the next open",
    );
    let _ = keep;
}

#[test]
fn repeated_wrong_tokens_are_rate_limited_per_source_and_other_sources_are_served() {
    let env = env();
    let nobody = AsNobody::new(&env);
    let mine = add_client(&env, "mine", &["--namespace", "app"]);
    let theirs = add_client(&env, "theirs", &["--namespace", "app"]);
    let server = Server::start(
        &env,
        &format!("[clients.local]\nuid = {}\nnamespaces = [\"app\"]\n", uid()),
    );
    let wrong = format!("kht1_{}", "A".repeat(43));
    for n in 1..=10 {
        assert_eq!(health(&server, &wrong).status, 401, "failure {n}");
    }
    // Blocked: even its right token is not checked.
    for token in [&wrong, &mine] {
        let answer = health(&server, token);
        assert_eq!(
            code(&answer),
            (429, &json!("rate_limited")),
            "{:?}",
            answer.body
        );
        let retry: u64 = answer.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "Retry-After: {retry}");
    }
    // Its peer-credential client is not what was guessed: still served.
    assert_eq!(server.ask("GET", "/v1/health", None).0, 200);
    // Another source (uid 65534) with its token is served, one of its own failures notwithstanding.
    let as_nobody = |token: &str| nobody.get(&server, "/v1/health", &[&bearer(token)]);
    assert!(as_nobody(&wrong).contains("unauthenticated"));
    assert_eq!(
        as_nobody(&theirs),
        r#"{"client":"theirs","sealer":"passphrase","status":"ok"}"#
    );
    let (status, err) = server.stop();
    assert!(status.success(), "{status:?}\n{err}");
    // One warning at the source's first failure and one when it is blocked, not one per request.
    let warnings = err
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("bearer token"))
        .collect::<Vec<_>>();
    assert_eq!(
        warnings.len(),
        3,
        "uid 0: first failure and block; uid 65534: first failure\n{err}"
    );
    assert_eq!(
        warnings.iter().filter(|l| l.contains("uid 0")).count(),
        2,
        "{err}"
    );
    for token in [&mine, &theirs] {
        assert_absent(&err, token, "the service's stderr");
    }
}

/// The race a reviewer found: wrong tokens sent at once all passed the block check before the
/// first failure was counted, so a source got as many guesses per window as it had connections.
#[test]
fn wrong_tokens_sent_at_once_are_no_more_guesses_than_the_limit() {
    let env = env();
    let server = Server::start(
        &env,
        &format!("[clients.local]\nuid = {}\nnamespaces = [\"app\"]\n", uid()),
    );
    let wrong = format!("kht1_{}", "B".repeat(43));
    let at_once = 40;
    let start = std::sync::Barrier::new(at_once);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let asks: Vec<_> = (0..at_once)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    health(&server, &wrong).status
                })
            })
            .collect();
        asks.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let checked = statuses.iter().filter(|&&s| s == 401).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!((checked, limited), (10, at_once - 10), "{statuses:?}");
    let (status, err) = server.stop();
    assert!(status.success(), "{status:?}\n{err}");
}

#[test]
fn names_are_kept_apart_and_a_service_needs_some_client() {
    let env = env();
    env.set_config(&format!(
        "[clients.web]\nuid = {}\nnamespaces = [\"web\"]\n",
        uid()
    ));
    let out = env.run(&["client", "add", "web", "--namespace", "web"], b"");
    assert_fail(
        &out,
        1,
        "is a [clients.web] of the configuration",
        "a configured name",
    );
    add_client(&env, "api", &["--namespace", "api"]);
    let out = env.run(&["client", "add", "api", "--namespace", "x"], b"");
    assert_fail(
        &out,
        1,
        "a token client named `api` exists already",
        "twice",
    );
    let out = env.run(
        &[
            "client",
            "add",
            "x",
            "--namespace",
            "a",
            "--operations",
            "sing",
        ],
        b"",
    );
    assert_fail(&out, 1, "no operation `sing`", "a misspelt operation");
    let out = env.run(&["client", "remove", "nobody"], b"");
    assert_fail(&out, 1, "no token client named `nobody`", "remove nobody");

    // A token client that carries a configured client's name (the configuration changed
    // since) stops the service from starting.
    env.set_config(&format!(
        "[clients.api]\nuid = {}\nnamespaces = [\"web\"]\n",
        uid()
    ));
    let out = env.run(&["serve", "--listen", "unix:/nonexistent/x.sock"], b"");
    assert_fail(
        &out,
        1,
        "is both a [clients.api] of the configuration and a token client",
        "a clash",
    );
    // Neither a uid client nor a token client: refused, before the store is unsealed.
    env.set_config("");
    env.ok_text(&["client", "remove", "api"]);
    let out = env.run(&["serve", "--listen", "unix:/nonexistent/x.sock"], b"");
    assert_fail(
        &out,
        1,
        "keyhold serve answers configured clients only",
        "no clients",
    );
}

/// Review: `GET /v1/clients` listed the configured clients only. It lists the token clients too
/// (never a token or its hash), each saying how it authenticates; `GET /v1/namespaces` lists the
/// namespaces that hold keys, with their counts. Both are for `admin` only.
#[test]
fn an_admin_lists_every_client_and_the_namespaces_with_their_keys() {
    let env = env();
    let token = add_client(
        &env,
        "web",
        &["--namespace", "web", "--operations", "sign,pubkey"],
    );
    let everything = add_client(&env, "ops", &["--namespace", "app", "--namespace", "web"]);
    for (name, ns) in [("a", "app"), ("b", "app"), ("c", "web"), ("d", "web")] {
        env.create_key(name, "ed25519", &["--namespace", ns]);
    }
    let gone = env.create_key("gone", "ed25519", &["--namespace", "old"]);
    env.ok(
        &["key", "destroy", "--now", "--yes", "--key", &gone],
        b"",
        "destroy",
    );
    let server = Server::start(
        &env,
        &format!(
            "[clients.admin]\nuid = {}\nnamespaces = [\"app\"]\noperations = [\"admin\"]\n\
             [clients.edge]\ntls_name = \"edge.example\"\nnamespaces = [\"web\"]\n",
            uid()
        ),
    );
    let listed = server.request("GET", "/v1/clients", &[], None);
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(
        listed.body,
        json!([
            {"name": "admin", "authenticates_by": ["uid"], "uid": uid(), "tls_name": null,
             "namespaces": ["app"], "operations": ["admin"], "added": null},
            {"name": "edge", "authenticates_by": ["tls_name"], "uid": null,
             "tls_name": "edge.example", "namespaces": ["web"], "operations": null,
             "added": null},
            {"name": "ops", "authenticates_by": ["token"], "uid": null, "tls_name": null,
             "namespaces": ["app", "web"], "operations": null,
             "added": listed.body[2]["added"]},
            {"name": "web", "authenticates_by": ["token"], "uid": null, "tls_name": null,
             "namespaces": ["web"], "operations": ["sign", "pubkey"],
             "added": listed.body[3]["added"]},
        ]),
        "{}",
        listed.text
    );
    for added in [&listed.body[2]["added"], &listed.body[3]["added"]] {
        keyhold::time::parse_instant(added.as_str().unwrap(), 0).unwrap();
    }
    // Never the token, nor anything of its hash.
    for secret in [&token, &everything] {
        assert!(!listed.text.contains(&secret[5..]), "{}", listed.text);
    }
    assert!(!listed.text.contains("hash"), "{}", listed.text);

    let (status, namespaces) = server.ask("GET", "/v1/namespaces", None);
    assert_eq!(
        (status, namespaces),
        (
            200,
            json!([
                {"namespace": "app", "keys": 2, "destroyed": 0},
                {"namespace": "old", "keys": 0, "destroyed": 1},
                {"namespace": "web", "keys": 2, "destroyed": 0},
            ])
        )
    );
    // Without `admin`: 403, whatever else the client may do.
    for path in ["/v1/clients", "/v1/namespaces"] {
        let refused = ask(&server, &everything, "GET", path, None);
        assert_eq!(code(&refused), (403, &json!("forbidden")), "{path}");
        assert!(
            refused.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("may not admin"),
            "{}",
            refused.text
        );
    }
}
