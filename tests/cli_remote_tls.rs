//! `keyhold --remote https://HOST:PORT` and `RemoteKeystore` over TLS: a real `keyhold serve`
//! listening on TCP with TLS 1.3 (certificates made per test with the openssl command), reached
//! with a bearer token or a client certificate; the service's certificate checked against
//! `--remote-ca` and for the host connected to; a client certificate of another CA refused;
//! remotes and TLS files that cannot be used refused before anything is sent.
#![cfg(feature = "serve")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use keyhold::service::{ClientTls, Remote, RemoteKeystore};
use keyhold::{KeyService, SignatureFormat, UseOptions};
use support::env::*;
use support::serve::{
    connections_served, env, metrics_reader, pki, start_tls, token_client, uid, Ca, Pki,
};

/// `app` is this process's user on the Unix socket and `app.example` by certificate.
fn clients() -> String {
    format!(
        "[clients.app]\nuid = {}\ntls_name = \"app.example\"\nnamespaces = [\"app\"]\n",
        uid()
    )
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// `--remote REMOTE --remote-ca CA` and `tls` (more TLS flags), then `args`.
fn over<'a>(remote: &'a str, ca: &'a str, tls: &[&'a str], args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--remote", remote, "--remote-ca", ca];
    all.extend_from_slice(tls);
    all.extend_from_slice(args);
    all
}

/// `local` and `served` exit 0 with the same stdout.
fn assert_same(local: &std::process::Output, served: &std::process::Output, what: &str) {
    assert_eq!(local.status.code(), Some(0), "{what} here\n{}", show(local));
    assert_eq!(
        (served.status.code(), &served.stdout),
        (local.status.code(), &local.stdout),
        "{what}: here\n{}\nover https\n{}",
        show(local),
        show(served)
    );
}

/// `verify --key ID --in INPUT --signature SIG`.
fn verify<'a>(id: &'a str, input: &'a str, sig: &'a str) -> [&'a str; 7] {
    ["verify", "--key", id, "--in", input, "--signature", sig]
}

/// The JSON error kind of a `--json` run.
fn kind(out: &std::process::Output) -> String {
    let err: serde_json::Value = serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|_| panic!("not a JSON error\n{}", show(out)));
    err["error"]["kind"].as_str().unwrap().to_owned()
}

#[test]
fn commands_over_https_with_a_token_give_the_output_they_give_here() {
    let env = env();
    let token = token_client(&env, "ci", "default");
    let token_file = env.write("token", format!("{token}\n").as_bytes());
    let pki = pki(&env);
    // No client CA: a TLS client is known by its token only.
    let (server, addr) = start_tls(&env, &pki, &clients(), false);
    let remote = format!("https://localhost:{}", addr.port());
    let ca = path(&pki.server_ca.pem());
    let with_token = ["--token-file", token_file.as_str()];

    // A key made over https is the store's: listed, shown, used the same both ways.
    let made = env.ok(
        &over(
            &remote,
            &ca,
            &with_token,
            &["key", "create", "web", "--type", "ed25519"],
        ),
        b"",
        "create over https",
    );
    let id = parse_id_line(&made, "web");
    let message = env.write("message", b"signed over TLS");
    for args in [
        &["key", "list"][..],
        &["--json", "key", "show", "--key", &id],
        &["key", "pubkey", "--key", &id],
    ] {
        let local = env.run(args, b"");
        let served = env.run(&over(&remote, &ca, &with_token, args), b"");
        assert_same(&local, &served, &format!("{args:?}"));
    }
    // Ed25519 signatures are deterministic: the same bytes both ways, and each verifies the
    // other way.
    let (here, there) = (env.path_str("sig-here"), env.path_str("sig-there"));
    env.ok(
        &["sign", "--key", &id, "--in", &message, "--out", &here],
        b"",
        "sign here",
    );
    env.ok(
        &over(
            &remote,
            &ca,
            &with_token,
            &["sign", "--key", &id, "--in", &message, "--out", &there],
        ),
        b"",
        "sign over https",
    );
    assert_eq!(
        std::fs::read(&here).unwrap(),
        std::fs::read(&there).unwrap()
    );
    let verify_here = verify(&id, &message, &here);
    let verify_there = verify(&id, &message, &there);
    let served = env.run(&over(&remote, &ca, &with_token, &verify_here), b"");
    assert_same(&env.run(&verify_there, b""), &served, "verify");
    assert_eq!(
        String::from_utf8_lossy(&served.stdout).trim(),
        "signature valid"
    );
    // An invalid signature: exit 1 both ways.
    let other = env.write("other", b"not what was signed");
    let bad = verify(&id, &other, &here);
    let out = env.run(&over(&remote, &ca, &with_token, &bad), b"");
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(env.run(&bad, b"").status.code(), Some(1));

    // Everything from the environment: KEYHOLD_REMOTE, KEYHOLD_REMOTE_CA, KEYHOLD_TOKEN.
    let (listed, _) = env.ok_vars(
        &[
            ("KEYHOLD_REMOTE", &remote),
            ("KEYHOLD_REMOTE_CA", &ca),
            ("KEYHOLD_TOKEN", &token),
        ],
        &["key", "list"],
    );
    assert_eq!(listed, env.ok(&["key", "list"], b"", "key list"));

    // Without the token, TLS alone names no client: the service's 401, exit 1.
    let out = env.run(&over(&remote, &ca, &[], &["key", "list"]), b"");
    assert_fail(&out, 1, "no client", "TLS without a token");
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn a_client_certificate_names_the_client_over_https_and_one_of_another_ca_is_refused() {
    let env = env();
    let pki = pki(&env);
    let (_server, addr) = start_tls(&env, &pki, &clients(), true);
    let remote = format!("https://localhost:{}", addr.port());
    let ca = path(&pki.server_ca.pem());
    let (cert, key) = pki
        .client_ca
        .issue("app", "someone", "DNS:app.example", "clientAuth");
    let (cert, key) = (path(&cert), path(&key));
    let mtls = ["--remote-cert", cert.as_str(), "--remote-key", key.as_str()];

    let made = env.ok(
        &over(
            &remote,
            &ca,
            &mtls,
            &[
                "key",
                "create",
                "k",
                "--type",
                "ecdsa-p256",
                "--namespace",
                "app",
            ],
        ),
        b"",
        "create over mutual TLS",
    );
    let id = parse_id_line(&made, "k");
    let list = ["--namespace", "app", "key", "list"];
    assert_same(
        &env.run(&list, b""),
        &env.run(&over(&remote, &ca, &mtls, &list), b""),
        "key list",
    );
    // A signature made over mutual TLS verifies here and by OpenSSL.
    let message = env.write("message", b"mutual");
    let sig = env.path_str("sig");
    env.ok(
        &over(
            &remote,
            &ca,
            &mtls,
            &["sign", "--key", &id, "--in", &message, "--out", &sig],
        ),
        b"",
        "sign over mutual TLS",
    );
    assert!(support::openssl_verifies(
        &env.pubkey_pem(&id),
        keyhold::Algorithm::EcdsaP256Sha256,
        b"mutual",
        &std::fs::read(&sig).unwrap()
    ));
    env.ok(
        &[
            "verify",
            "--key",
            &id,
            "--in",
            &message,
            "--signature",
            &sig,
        ],
        b"",
        "verify here",
    );
    // The certificate and key from the environment.
    let (listed, _) = env.ok_vars(
        &[
            ("KEYHOLD_REMOTE", &remote),
            ("KEYHOLD_REMOTE_CA", &ca),
            ("KEYHOLD_REMOTE_CERT", &cert),
            ("KEYHOLD_REMOTE_KEY", &key),
        ],
        &list,
    );
    assert_eq!(listed, env.ok(&list, b"", "key list"));

    // A certificate of another CA, naming the same client: the service refuses the handshake,
    // and the client says so.
    let stranger = Ca::new(env.dir.path(), "stranger-ca");
    let (forged_cert, forged_key) =
        stranger.issue("forged", "app.example", "DNS:app.example", "clientAuth");
    let (forged_cert, forged_key) = (path(&forged_cert), path(&forged_key));
    let forged = [
        "--remote-cert",
        forged_cert.as_str(),
        "--remote-key",
        forged_key.as_str(),
    ];
    let mut args = vec!["--json"];
    args.extend(over(&remote, &ca, &forged, &list));
    let out = env.run(&args, b"");
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(kind(&out), "io", "{}", show(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("keyhold serve at {remote}"))
            && err.contains("refused this client's certificate"),
        "{}",
        show(&out)
    );
    assert!(!err.contains("\"kind\":\"cli\""), "{err}");

    // A key others can read is refused before anything is sent, as the server's --tls-key.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.run(&over(&remote, &ca, &mtls, &list), b"");
    assert_fail(
        &out,
        1,
        &format!("--remote-key {key} is open to others (mode 644)"),
        "a client key others read",
    );
    assert!(stderr(&out).contains("chmod 600"), "{}", show(&out));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Another key than the certificate's.
    let mismatched = [
        "--remote-cert",
        cert.as_str(),
        "--remote-key",
        forged_key.as_str(),
    ];
    let out = env.run(&over(&remote, &ca, &mismatched, &list), b"");
    assert_fail(
        &out,
        1,
        "the certificate must be the key's",
        "a key of another certificate",
    );
    // One of the two only: clap's usage error.
    let out = env.run(&over(&remote, &ca, &["--remote-cert", &cert], &list), b"");
    assert_fail(&out, 2, "--remote-key", "a certificate without its key");
    // Still served.
    env.ok(&over(&remote, &ca, &mtls, &list), b"", "after the refusals");
}

#[test]
fn a_service_certificate_of_another_ca_or_for_another_name_is_refused() {
    let env = env();
    let pki = pki(&env);
    // The service's certificate names elsewhere.example only; it is reached as 127.0.0.1.
    let (cert, key) = pki.server_ca.issue(
        "elsewhere",
        "elsewhere.example",
        "DNS:elsewhere.example",
        "serverAuth",
    );
    let pki = Pki {
        server_cert: cert,
        server_key: key,
        ..pki
    };
    let token = token_client(&env, "ci", "default");
    let (_server, addr) = start_tls(&env, &pki, &clients(), false);
    let remote = format!("https://127.0.0.1:{}", addr.port());
    let vars = [("KEYHOLD_TOKEN", token.as_str())];

    // A CA that did not issue the service's certificate.
    let wrong_ca = path(&pki.client_ca.pem());
    let out = env.run_vars(
        &vars,
        &over(&remote, &wrong_ca, &["--json"], &["key", "list"]),
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(kind(&out), "io");
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "TLS handshake with keyhold serve at {remote} failed: its certificate is not issued \
             by the CA this client trusts (--remote-ca)"
        )),
        "{}",
        show(&out)
    );

    // The right CA, but the certificate is not for the address connected to.
    let ca = path(&pki.server_ca.pem());
    let out = env.run_vars(&vars, &over(&remote, &ca, &[], &["key", "list"]));
    assert_fail(
        &out,
        1,
        &format!(
            "TLS handshake with keyhold serve at {remote} failed: its certificate is not for \
             `127.0.0.1`"
        ),
        "a certificate for another name",
    );

    // Through the library: the same refusal, as Error::Io.
    let keys = RemoteKeystore::new(Remote::parse(&remote).unwrap())
        .unwrap()
        .with_tls(ClientTls::load(&pki.server_ca.pem(), None).unwrap());
    let refused = keys.health().unwrap_err();
    assert!(matches!(refused, keyhold::Error::Io { .. }), "{refused:?}");
    assert!(
        refused
            .to_string()
            .contains("its certificate is not for `127.0.0.1`"),
        "{refused}"
    );
}

#[test]
fn remote_keystore_over_https_with_a_client_certificate() {
    let env = env();
    let pki = pki(&env);
    let reader = metrics_reader(&env);
    let (server, addr) = start_tls(&env, &pki, &clients(), true);
    let remote = Remote::parse(&format!("https://localhost:{}", addr.port())).unwrap();
    assert_eq!(
        remote,
        Remote::Https {
            host: "localhost".into(),
            port: addr.port()
        }
    );
    let (cert, key) = pki
        .client_ca
        .issue("app", "someone", "DNS:app.example", "clientAuth");

    // An https remote without TLS settings: refused at the first call, saying what to give.
    let bare = RemoteKeystore::new(remote.clone()).unwrap();
    let refused = bare.health().unwrap_err();
    assert!(
        matches!(&refused, keyhold::Error::InvalidInput(m) if m.contains("reached over TLS: give the CA")),
        "{refused:?}"
    );

    let tls = ClientTls::load(&pki.server_ca.pem(), Some((&cert, &key))).unwrap();
    let keys = RemoteKeystore::new(remote.clone())
        .unwrap()
        .with_tls(tls.clone());
    assert_eq!(keys.health().unwrap(), "app");
    // A second client with the same TLS settings makes its own full handshake (no session is
    // resumed): the service knows it by its certificate.
    let resumed = RemoteKeystore::new(remote).unwrap().with_tls(tls);
    assert_eq!(resumed.health().unwrap(), "app");
    let spec = keyhold::KeySpec::new(keyhold::KeyType::EcdsaP256, None, None).unwrap();
    let info = keys
        .create_key_with(
            &keyhold::KeyRequest {
                namespace: "app".into(),
                name: "lib".into(),
                spec,
                backend: None,
            },
            &keyhold::backend::KeyOptions::new(),
        )
        .unwrap();
    let none = UseOptions::new();
    // Several calls: the kept-alive TLS connection is reused.
    let before = connections_served(&server, &reader);
    for message in [&b"one"[..], b"two", b"three"] {
        let signed = keys
            .sign_with(&info.id, message, SignatureFormat::Der, &none)
            .unwrap();
        keys.verify_with(
            &info.id,
            message,
            &signed.output,
            SignatureFormat::Der,
            &none,
        )
        .unwrap();
    }
    assert_eq!(keys.list_keys(Some("app")).unwrap().len(), 1);
    // Seven calls, and no new connection but the reading's own: the kept one served them.
    assert_eq!(connections_served(&server, &reader), before + 1);

    // Without a client certificate the service knows no client (401 on its connection).
    let anonymous = RemoteKeystore::new(keys.remote().clone())
        .unwrap()
        .with_tls(ClientTls::load(&pki.server_ca.pem(), None).unwrap());
    assert_eq!(anonymous.health().unwrap_err().kind(), "remote");

    // A client key others may read is refused by the library too.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o604)).unwrap();
    let open = ClientTls::load(&pki.server_ca.pem(), Some((&cert, &key))).unwrap_err();
    assert!(
        matches!(&open, keyhold::Error::InvalidInput(m) if m.contains("is open to others (mode 604)")),
        "{open:?}"
    );
}

#[test]
fn remotes_parse_and_print_back_the_same() {
    for (text, parsed, shown) in [
        (
            "https://kms.example:8443",
            Remote::Https {
                host: "kms.example".into(),
                port: 8443,
            },
            "https://kms.example:8443",
        ),
        (
            "https://kms.example",
            Remote::Https {
                host: "kms.example".into(),
                port: 443,
            },
            "https://kms.example:443",
        ),
        (
            "https://127.0.0.1:1/",
            Remote::Https {
                host: "127.0.0.1".into(),
                port: 1,
            },
            "https://127.0.0.1:1",
        ),
        (
            "https://[::1]:8443",
            Remote::Https {
                host: "::1".into(),
                port: 8443,
            },
            "https://[::1]:8443",
        ),
        (
            "HTTPS://[0:0::1]",
            Remote::Https {
                host: "::1".into(),
                port: 443,
            },
            "https://[::1]:443",
        ),
        (
            "unix:/run/keyhold/keyhold.sock",
            Remote::Unix("/run/keyhold/keyhold.sock".into()),
            "unix:/run/keyhold/keyhold.sock",
        ),
    ] {
        let remote = Remote::parse(text).unwrap();
        assert_eq!(remote, parsed, "{text}");
        assert_eq!(remote.to_string(), shown, "{text}");
        assert_eq!(Remote::parse(shown).unwrap(), parsed, "{shown}");
    }
}

#[test]
fn plaintext_and_malformed_remotes_and_missing_tls_files_are_usage_errors() {
    let env = Env::new();
    for (remote, says) in [
        (
            "http://127.0.0.1:8443",
            "plaintext HTTP over TCP is not offered",
        ),
        ("HTTP://localhost", "plaintext HTTP over TCP is not offered"),
        (
            "https://localhost:8443/v1/keys",
            "no path, query or fragment",
        ),
        ("https://localhost:8443?x=1", "no path, query or fragment"),
        ("https://user:pw@localhost:8443", "no user or password"),
        ("https://::1:8443", "an IPv6 address goes in brackets"),
        ("https://[::1:8443", "is not closed"),
        ("https://[not-v6]:8443", "`not-v6` is not an IPv6 address"),
        ("https://localhost:0", "`0` is not a port"),
        ("https://localhost:65536", "`65536` is not a port"),
        ("https://:8443", "no host"),
        (
            "https://bad_host!:8443",
            "is not a host name or an IP address",
        ),
        ("tcp:127.0.0.1:8443", "give unix:PATH"),
    ] {
        let out = env.run(&["--remote", remote, "key", "list"], b"");
        assert_fail(&out, 2, says, remote);
        assert!(
            stderr(&out).contains(&format!("remote `{remote}`")),
            "{remote}: {}",
            show(&out)
        );
    }
    // An https remote without a CA (said which flag, and that the system's roots are not used);
    // TLS files for no remote, or for a Unix socket: usage errors. A CA file that is not there:
    // exit 1, naming it.
    let https = "https://localhost:8443";
    for (args, code, says) in [
        (
            &["--remote", https][..],
            2,
            "needs --remote-ca FILE (or $KEYHOLD_REMOTE_CA): the CA certificate (PEM) the \
             service's certificate must chain to; the system's CA roots are not used",
        ),
        (
            &["--remote-ca", "/nonexistent"],
            2,
            "are for --remote https://HOST:PORT",
        ),
        (
            &["--remote", "unix:/x.sock", "--remote-ca", "/nonexistent"],
            2,
            "unix:/x.sock is a local socket",
        ),
        (
            &["--remote", https, "--remote-ca", "/nonexistent/ca.pem"],
            1,
            "--remote-ca /nonexistent/ca.pem",
        ),
    ] {
        let mut all = args.to_vec();
        all.extend(["key", "list"]);
        assert_fail(&env.run(&all, b""), code, says, &format!("{args:?}"));
    }
}

/// Inputs and answers far larger than a TLS record (16 KiB) cross the connection whole, in
/// both directions, and the connection is kept for the next call.
#[test]
fn large_inputs_and_answers_cross_many_tls_records_on_one_kept_connection() {
    let env = env();
    let token = token_client(&env, "ci", "default");
    let reader = metrics_reader(&env);
    let pki = pki(&env);
    let (server, addr) = start_tls(&env, &pki, &clients(), false);
    let keys =
        RemoteKeystore::new(Remote::parse(&format!("https://127.0.0.1:{}", addr.port())).unwrap())
            .unwrap()
            .with_tls(ClientTls::load(&pki.server_ca.pem(), None).unwrap())
            .with_token(token.into());
    let create = |name: &str, key_type| {
        keys.create_key_with(
            &keyhold::KeyRequest {
                namespace: "default".into(),
                name: name.into(),
                spec: keyhold::KeySpec::new(key_type, None, None).unwrap(),
                backend: None,
            },
            &keyhold::backend::KeyOptions::new(),
        )
        .unwrap()
        .id
    };
    let aes = create("box", keyhold::KeyType::Aes256Gcm);
    let ecdsa = create("signer", keyhold::KeyType::EcdsaP256);
    let before = connections_served(&server, &reader);
    let none = UseOptions::new();
    // 3 MiB, every byte value, not a repeating record's worth.
    let large: Vec<u8> = (0u32..3 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for size in [16 * 1024 - 1, 16 * 1024 + 1, 1 << 20, large.len()] {
        let plaintext = &large[..size];
        let sealed = keys.encrypt_with(&aes, plaintext, b"aad", &none).unwrap();
        assert!(sealed.output.len() > size);
        let opened = keys
            .decrypt_with(&aes, &sealed.output, b"aad", &none)
            .unwrap();
        assert!(
            opened.output.expose() == plaintext,
            "{size} bytes came back changed"
        );
        let signed = keys
            .sign_with(&ecdsa, plaintext, SignatureFormat::Der, &none)
            .unwrap();
        keys.verify_with(
            &ecdsa,
            plaintext,
            &signed.output,
            SignatureFormat::Der,
            &none,
        )
        .unwrap();
    }
    // Sixteen calls on the one kept connection; the reading's own is the only new one.
    assert_eq!(connections_served(&server, &reader), before + 1);
}

/// A TLS handshake the service never answers (a TCP listener that accepts and says nothing)
/// ends at the call's timeout, not the default's two minutes, and the next call tries again.
#[test]
fn a_tls_handshake_nobody_answers_ends_at_the_timeout() {
    let env = env();
    let pki = pki(&env);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Held open, silent: the client's hello is read by nobody.
            held.push(stream.unwrap());
        }
    });
    let keys = RemoteKeystore::new(Remote::parse(&format!("https://127.0.0.1:{port}")).unwrap())
        .unwrap()
        .with_tls(ClientTls::load(&pki.server_ca.pem(), None).unwrap())
        .with_timeout(std::time::Duration::from_millis(300));
    for call in 1..=2 {
        let started = std::time::Instant::now();
        let refused = keys.health().unwrap_err();
        assert!(
            matches!(refused, keyhold::Error::Timeout { .. }),
            "{refused:?}"
        );
        let waited = started.elapsed();
        assert!(
            (std::time::Duration::from_millis(250)..std::time::Duration::from_secs(30))
                .contains(&waited),
            "{waited:?}"
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), call);
    }
}
