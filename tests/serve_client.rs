//! One application, two keystores: the same code, written against `KeyService`, runs on a
//! keystore open in this process and on a `keyhold serve` (a real process on a temporary
//! socket) through `RemoteKeystore`, and sees the same results and the same kinds of error.
#![cfg(feature = "serve")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::time::Duration;

use keyhold::backend::KeyOptions;
use keyhold::service::{Remote, RemoteKeystore};
use keyhold::{
    Algorithm, Error, KeyRequest, KeyService, KeySpec, KeyState, KeyType, PolicyChange,
    SignatureFormat, Transition, UseOptions,
};
use support::serve::{client, connections_served, env, metrics_reader, Server};

fn request(namespace: &str, name: &str, key_type: KeyType) -> KeyRequest {
    KeyRequest {
        namespace: namespace.into(),
        name: name.into(),
        spec: KeySpec::new(key_type, None, None).unwrap(),
        backend: None,
    }
}

fn kind<T: std::fmt::Debug>(outcome: keyhold::Result<T>) -> &'static str {
    outcome.unwrap_err().kind()
}

/// What an application does with its keys, through either keystore.
fn application(ks: &dyn KeyService, ns: &str) {
    let none = UseOptions::new();
    // A signing key, with a rotation schedule from the start.
    let options = KeyOptions::new().rotate_after(Some(Duration::from_secs(86_400 * 90)));
    let signer = ks
        .create_key_with(&request(ns, "signer", KeyType::EcdsaP256), &options)
        .unwrap();
    assert_eq!(signer.rotate_after, Some(86_400 * 90));
    assert_eq!(
        kind(ks.create_key_with(&request(ns, "signer", KeyType::EcdsaP256), &options)),
        "key_exists"
    );
    let id = signer.id.as_str();
    let signed = ks
        .sign_with(id, b"message", SignatureFormat::Der, &none)
        .unwrap();
    assert_eq!((signed.version, signed.state), (1, KeyState::Active));
    let public = ks.public_key_version(id, None).unwrap();
    assert!(support::openssl_verifies(
        &public.to_pem(),
        Algorithm::EcdsaP256Sha256,
        b"message",
        &signed.output
    ));
    ks.verify_with(id, b"message", &signed.output, SignatureFormat::Der, &none)
        .unwrap();
    assert!(matches!(
        ks.verify_with(id, b"other", &signed.output, SignatureFormat::Der, &none),
        Err(Error::VerificationFailed { what: "signature" })
    ));

    // Rotation: the old version still verifies, and its public key is kept.
    let rotated = ks.rotate_key(id, Some("yearly")).unwrap();
    assert_eq!(rotated.version, 2);
    assert_eq!(ks.public_key_version(id, Some(1)).unwrap(), public);
    let old = ks
        .verify_with(id, b"message", &signed.output, SignatureFormat::Der, &none)
        .unwrap();
    assert_eq!(old.version, 1);

    // Envelopes, rewrap, MACs.
    let aes = ks
        .create_key_with(&request(ns, "box", KeyType::Aes256Gcm), &KeyOptions::new())
        .unwrap();
    let sealed = ks.encrypt_with(&aes.id, b"secret", b"ctx", &none).unwrap();
    let opened = ks
        .decrypt_with(&aes.id, &sealed.output, b"ctx", &none)
        .unwrap();
    assert_eq!(opened.output.expose(), b"secret");
    assert_eq!(
        kind(ks.decrypt_with(&aes.id, &sealed.output, b"other", &none)),
        "decryption_failed"
    );
    ks.rotate_key(&aes.id, None).unwrap();
    let rewrapped = ks.rewrap(&aes.id, &sealed.output, b"ctx", &none).unwrap();
    assert_eq!(rewrapped.version, 2);
    let hmac = ks
        .create_key_with(
            &request(ns, "tags", KeyType::HmacSha256),
            &KeyOptions::new(),
        )
        .unwrap();
    let tag = ks.mac_with(&hmac.id, b"data", &none).unwrap();
    ks.verify_mac_with(&hmac.id, b"data", &tag.output, &none)
        .unwrap();
    assert!(matches!(
        ks.verify_mac_with(&hmac.id, b"datum", &tag.output, &none),
        Err(Error::VerificationFailed { what: "tag" })
    ));
    assert_eq!(kind(ks.mac_with(&aes.id, b"data", &none)), "wrong_purpose");

    // States, policy, destruction, history.
    let suspended = ks
        .change_state(id, Transition::Suspend, Some("audit"))
        .unwrap();
    assert_eq!(suspended.state, KeyState::Suspended);
    assert_eq!(
        kind(ks.sign_with(id, b"m", SignatureFormat::Der, &none)),
        "wrong_state"
    );
    ks.change_state(id, Transition::Resume, None).unwrap();
    let set = ks
        .set_policy(
            id,
            &PolicyChange::new()
                .rotate_after(None)
                .min_decrypt_version(2),
            None,
        )
        .unwrap();
    assert_eq!((set.rotate_after, set.min_decrypt_version), (None, 2));
    let at = keyhold::time::now() + 3600;
    assert_eq!(
        ks.schedule_destroy(id, at, None).unwrap().destroy_at,
        Some(at)
    );
    assert_eq!(
        ks.cancel_destroy(id, Some("kept")).unwrap().destroy_at,
        None
    );
    let events: Vec<String> = ks
        .history(id)
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(
        events,
        [
            "created",
            "rotated",
            "suspended",
            "resumed",
            "policy-changed",
            "destroy-scheduled",
            "destroy-cancelled"
        ]
    );
    ks.schedule_destroy(&hmac.id, keyhold::time::now(), None)
        .unwrap();

    // Finding keys.
    assert_eq!(ks.key_info_by_name(ns, "box").unwrap().unwrap().id, aes.id);
    assert!(ks.key_info_by_name(ns, "nothing").unwrap().is_none());
    assert_eq!(
        ks.key_info(&aes.id).unwrap(),
        ks.key_info_by_name(ns, "box").unwrap().unwrap()
    );
    let names =
        |keys: Vec<keyhold::KeyInfo>| -> Vec<String> { keys.into_iter().map(|k| k.name).collect() };
    assert_eq!(names(ks.list_keys(Some(ns)).unwrap()), ["box", "signer"]);
    assert_eq!(
        names(ks.list_all_keys(Some(ns)).unwrap()),
        ["box", "signer", "tags"]
    );
    let mut tampered = aes.id.clone();
    tampered.replace_range(12..13, if &aes.id[12..13] == "A" { "B" } else { "A" });
    assert_eq!(kind(ks.key_info(&tampered)), "key_id_authentication");
    assert_eq!(ks.random(16).unwrap().len(), 16);
}

#[test]
fn the_same_application_runs_on_a_local_keystore_and_through_the_service() {
    let local = support::TestStore::new();
    application(&local.ks, "app");

    let env = env();
    let server = Server::start(&env, &client("\"app\"", ""));
    let remote = RemoteKeystore::new(Remote::Unix(server.socket.clone())).unwrap();
    assert_eq!(remote.health().unwrap(), "app");
    application(&remote, "app");

    // The service's own refusals: a namespace the client does not see, an operation it may not.
    let theirs = env.create_key("theirs", "ed25519", &["--namespace", "other"]);
    assert_eq!(kind(remote.key_info(&theirs)), "no_such_key");
    assert_eq!(
        kind(remote.create_key_with(&request("other", "x", KeyType::Ed25519), &KeyOptions::new())),
        "remote"
    );
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    // No service: said so, naming where it was looked for.
    let gone = remote.key_info(&theirs).unwrap_err();
    assert!(matches!(gone, Error::Io { .. }), "{gone:?}");
    assert!(
        gone.to_string()
            .contains("connect to keyhold serve at unix:"),
        "{gone}"
    );
}

/// The service on a socket of `env`, for a client of namespace `app`, with `--header-timeout`.
fn with_header_timeout(env: &support::env::Env, timeout: &str) -> Server {
    let socket = env.file("keyhold.sock");
    Server::start_listening(
        env,
        &client("\"app\"", ""),
        &[&format!("unix:{}", socket.display())],
        &["--header-timeout", timeout],
    )
}

#[test]
fn a_kept_connection_the_service_closed_is_replaced_and_the_call_goes_through() {
    let env = env();
    let reader = metrics_reader(&env);
    let server = with_header_timeout(&env, "1s");
    let before = connections_served(&server, &reader);
    let remote = RemoteKeystore::new(Remote::Unix(server.socket.clone())).unwrap();
    for _ in 0..3 {
        assert_eq!(remote.health().unwrap(), "app");
    }
    // Three calls, one connection (and the reading's own).
    assert_eq!(connections_served(&server, &reader), before + 2);
    // Idle past its header timeout, the kept connection is closed by the service. The client
    // has not waited for that: the answers said `Keep-Alive: timeout=1`, and a connection idle
    // past half of it is not used again. It connects anew, once. (What finds a connection the
    // service closed within that half, `still_open`, is not reached here.)
    std::thread::sleep(Duration::from_millis(2500));
    for _ in 0..3 {
        assert_eq!(remote.health().unwrap(), "app");
    }
    assert_eq!(connections_served(&server, &reader), before + 4);
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
}

/// A service whose header timeout is shorter than the client's default idle reuse (5 s) says so
/// (`Keep-Alive: timeout=2`), and the client uses a connection idle for half of that at most: a
/// request sent as the service closes the connection would be lost (it is never sent again).
#[test]
fn a_connection_idle_for_half_what_the_service_keeps_it_is_not_used_again() {
    let env = env();
    let reader = metrics_reader(&env);
    let server = with_header_timeout(&env, "2s");
    let answer = server.request("GET", "/v1/health", &[], None);
    assert_eq!(answer.header("keep-alive"), Some("timeout=2"));
    let before = connections_served(&server, &reader);
    let remote = RemoteKeystore::new(Remote::Unix(server.socket.clone())).unwrap();
    for _ in 0..2 {
        assert_eq!(remote.health().unwrap(), "app");
    }
    assert_eq!(connections_served(&server, &reader), before + 2);
    // Idle 1.3 s: the service would keep it for 0.7 s more, but the client no longer uses it.
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(remote.health().unwrap(), "app");
    assert_eq!(connections_served(&server, &reader), before + 4);
    // Used again at once, it is kept.
    assert_eq!(remote.health().unwrap(), "app");
    assert_eq!(connections_served(&server, &reader), before + 5);
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn a_tokio_application_calls_the_client_from_its_blocking_pool_or_a_task_and_may_drop_it_in_one() {
    let env = env();
    let server = Server::start(&env, &client("\"app\"", ""));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let socket = server.socket.clone();
    let names = runtime.block_on(async move {
        let remote = std::sync::Arc::new(RemoteKeystore::new(Remote::Unix(socket)).unwrap());
        // As the documentation says to: through spawn_blocking (a thread in tokio's context).
        let shared = std::sync::Arc::clone(&remote);
        let first = tokio::task::spawn_blocking(move || shared.health())
            .await
            .unwrap()
            .unwrap();
        let shared = std::sync::Arc::clone(&remote);
        let second = tokio::task::spawn_blocking(move || shared.random(8))
            .await
            .unwrap()
            .unwrap();
        // Against the documentation, but it must not panic ("cannot start a runtime from within
        // a runtime"): called in an async task on a worker, and in the future block_on runs.
        let shared = std::sync::Arc::clone(&remote);
        let in_task = tokio::spawn(async move { shared.health() })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(in_task, "app");
        assert_eq!(remote.health().unwrap(), "app");
        // The last handle dropped inside an async task: its runtimes shut down, no panic.
        drop(remote);
        (first, second.len())
    });
    assert_eq!(names, ("app".to_owned(), 8));
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
}

#[test]
fn a_token_a_header_cannot_carry_is_refused_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    // No service there: had the request been sent, the error would be the connection's.
    let remote = RemoteKeystore::new(Remote::Unix(dir.path().join("none.sock")))
        .unwrap()
        .with_token(secrecy::SecretString::from(
            "kh-token\r\nX-Injected: 1".to_owned(),
        ));
    let refused = remote.health().unwrap_err();
    assert!(
        matches!(&refused, Error::InvalidInput(m) if m.contains("header cannot carry")),
        "{refused:?}"
    );
    assert!(!format!("{refused}").contains("kh-token"), "{refused}");
}

/// An input the service would refuse as too large is refused by the client before it is sent:
/// 64 MiB would otherwise cross the socket as 85 MiB of base64 only to be turned away. No
/// service is there, so a request sent would fail on the connection instead; at the limit
/// itself (checked for one operation of each limit: each takes seconds in a debug build), it does.
#[test]
fn an_oversized_input_is_refused_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let remote = RemoteKeystore::new(Remote::Unix(dir.path().join("none.sock"))).unwrap();
    let (id, opts, der) = ("kh1-any", UseOptions::default(), SignatureFormat::Der);
    let over = vec![0x5a_u8; keyhold::MAX_ENVELOPE + 1];
    let (input_over, envelope_over) = (&over[..=keyhold::MAX_INPUT], &over[..]);
    type Call<'a> = Box<dyn Fn(&[u8]) -> keyhold::Result<()> + 'a>;
    let calls: Vec<(&str, &[u8], Call)> = vec![
        (
            "sign",
            input_over,
            Box::new(|d| remote.sign_with(id, d, der, &opts).map(drop)),
        ),
        (
            "verify",
            input_over,
            Box::new(|d| remote.verify_with(id, d, b"s", der, &opts).map(drop)),
        ),
        (
            "encrypt",
            input_over,
            Box::new(|d| remote.encrypt_with(id, d, b"", &opts).map(drop)),
        ),
        (
            "mac",
            input_over,
            Box::new(|d| remote.mac_with(id, d, &opts).map(drop)),
        ),
        (
            "mac-verify",
            input_over,
            Box::new(|d| remote.verify_mac_with(id, d, b"t", &opts).map(drop)),
        ),
        (
            "decrypt",
            envelope_over,
            Box::new(|d| remote.decrypt_with(id, d, b"", &opts).map(drop)),
        ),
        (
            "rewrap",
            envelope_over,
            Box::new(|d| remote.rewrap(id, d, b"", &opts).map(drop)),
        ),
    ];
    for (what, too_big, call) in &calls {
        let refused = call(too_big).unwrap_err();
        assert!(
            matches!(&refused, Error::InvalidInput(m) if m.contains("larger than the 64 MiB limit")),
            "{what} of {} bytes: {refused:?}",
            too_big.len()
        );
        if matches!(*what, "sign" | "decrypt") {
            let sent = call(&too_big[..too_big.len() - 1]).unwrap_err();
            assert!(
                matches!(sent, Error::Io { .. }),
                "{what} at the limit: {sent:?}"
            );
        }
    }
    // An input within its limit with an `aad` that takes the request past the service's.
    let aad = vec![0x5a_u8; keyhold::MAX_INPUT + 64 * 1024];
    let refused = remote.encrypt_with(id, b"small", &aad, &opts).unwrap_err();
    assert!(
        matches!(&refused, Error::InvalidInput(m) if m.contains("more than keyhold serve reads")
            && m.contains("nothing was sent")),
        "{refused:?}"
    );
    let sent = remote
        .encrypt_with(id, b"small", &aad[..keyhold::MAX_INPUT / 2], &opts)
        .unwrap_err();
    assert!(matches!(sent, Error::Io { .. }), "{sent:?}");
}

/// A fake service on a Unix socket of the test: each connection it accepts is handed to
/// `answer`, with its number (from 0); the number of connections accepted so far is counted.
fn fake_service(
    answer: impl Fn(usize, std::os::unix::net::UnixStream) + Send + 'static,
) -> (
    tempfile::TempDir,
    RemoteKeystore,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            answer(n, stream.unwrap());
        }
    });
    (
        dir,
        RemoteKeystore::new(Remote::Unix(path)).unwrap(),
        accepted,
    )
}

/// Reads one request's head and body (`Content-Length`) from `stream`.
fn read_request(stream: &mut std::os::unix::net::UnixStream) {
    use std::io::Read as _;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "{got:?}");
        got.push(byte[0]);
    }
    let head = String::from_utf8(got).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
}

/// A service that reads the request and never answers: the call gives up at the client's
/// timeout with `Error::Timeout`, and the next call does not read the late answer on that
/// connection: it connects anew.
#[test]
fn a_call_the_service_never_answers_times_out_and_its_connection_is_not_reused() {
    let (_dir, remote, accepted) = fake_service(|_, mut stream| {
        read_request(&mut stream);
        // Held open, unanswered, until the test ends.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(60));
            drop(stream);
        });
    });
    let remote = remote.with_timeout(Duration::from_millis(300));
    for call in 1..=2 {
        let started = std::time::Instant::now();
        let refused = remote.health().unwrap_err();
        assert!(matches!(refused, Error::Timeout { .. }), "{refused:?}");
        // Well under the default (120 s): the given timeout ended it.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), call);
    }
}

/// Answers framed as HTTP/1.1 allows: chunked, with `Connection: close` (the client reads it
/// whole and connects anew for the next call), then with a length on a kept connection (reused).
#[test]
fn chunked_and_closing_answers_are_read_whole_and_a_closed_connection_is_not_reused() {
    use std::io::Write as _;
    let (_dir, remote, accepted) = fake_service(|n, mut stream| {
        std::thread::spawn(move || {
            if n == 0 {
                read_request(&mut stream);
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: \
                          chunked\r\nConnection: close\r\n\r\n9\r\n{\"client\"\r\n\
                          a;x=1\r\n:\"chunked\"\r\n1\r\n}\r\n0\r\nTrailer: t\r\n\r\n",
                    )
                    .unwrap();
                // Left open: only its `Connection: close` says not to use it again.
                std::thread::sleep(Duration::from_secs(60));
                return;
            }
            // Kept alive: every request on it answered with a length.
            for _ in 0..2 {
                read_request(&mut stream);
                let body = br#"{"client":"kept"}"#;
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .unwrap();
                stream.write_all(body).unwrap();
            }
        });
    });
    let count = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(remote.health().unwrap(), "chunked");
    assert_eq!(count(), 1);
    assert_eq!(remote.health().unwrap(), "kept");
    assert_eq!(count(), 2, "a connection the service closed is not reused");
    assert_eq!(remote.health().unwrap(), "kept");
    assert_eq!(count(), 2, "a kept connection is reused");
}

/// A service that refuses a request before reading its body (as `keyhold serve` refuses a bad
/// token: it answers 401, `Connection: close`, and closes) is heard: the call fails with the
/// service's error, not with the broken pipe its large body met.
#[test]
fn an_answer_sent_before_the_whole_request_was_read_is_the_calls_error() {
    use std::io::{Read as _, Write as _};
    let (_dir, remote, _) = fake_service(|_, mut stream| {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).unwrap(), 1);
            head.push(byte[0]);
        }
        let body = br#"{"error":{"code":"unauthenticated","message":"no such token"}}"#;
        write!(
            stream,
            "HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        drop(stream);
    });
    // 8 MiB: far more than the socket's buffers hold, so the write meets the closed socket.
    let large = vec![7u8; 8 << 20];
    let refused = remote
        .encrypt_with("kh1_any", &large, b"", &UseOptions::default())
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Remote { status: 401, message, .. }
            if message == "no such token"),
        "{refused:?}"
    );
}

/// A service whose queue of connections to accept is full (it stopped accepting): connecting
/// waits, and the call's timeout ends the wait (without it, the connect would wait for ever).
#[test]
fn connecting_to_a_service_that_accepts_nothing_ends_at_the_timeout() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sock");
    let address = SocketAddrUnix::new(&path).unwrap();
    let listener = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&listener, &address).unwrap();
    rustix::net::listen(&listener, 0).unwrap();
    // Connections that do not wait, until the queue takes no more: nothing is ever accepted.
    let mut queued = Vec::new();
    loop {
        let socket = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        match rustix::net::connect(&socket, &address) {
            Ok(()) => queued.push(socket),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(queued.len() < 1000, "the queue never filled");
    }
    let remote = RemoteKeystore::new(Remote::Unix(path))
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let refused = remote.health().unwrap_err();
    assert!(matches!(refused, Error::Timeout { .. }), "{refused:?}");
    // It waited (a connect refused at once would not test the wait), and the given timeout,
    // well under the default (120 s), ended it.
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(30)).contains(&waited),
        "{waited:?}"
    );
}

/// A call that took most of its time leaves the next call on its connection the whole of its
/// own: the socket's timeout, narrowed as the first call's deadline neared, is widened again.
#[test]
fn a_slow_answer_does_not_shorten_the_next_calls_time() {
    use std::io::Write as _;
    let (_dir, remote, accepted) = fake_service(|_, mut stream| {
        std::thread::spawn(move || {
            let body = br#"{"client":"slow"}"#;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            // The first answer in two parts, its body when less than 7/8 of the time is left.
            read_request(&mut stream);
            std::thread::sleep(Duration::from_millis(300));
            stream.write_all(head.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            stream.write_all(body).unwrap();
            // The second after 450 ms: past the time the first left, within the call's own.
            read_request(&mut stream);
            std::thread::sleep(Duration::from_millis(450));
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(body).unwrap();
            std::thread::sleep(Duration::from_secs(5));
        });
    });
    let remote = remote.with_timeout(Duration::from_millis(600));
    assert_eq!(remote.health().unwrap(), "slow");
    assert_eq!(remote.health().unwrap(), "slow");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Large answers are read whole, however framed: a length beyond what the client reserves
/// before the body arrives (8 MiB), and thousands of chunks.
#[test]
fn large_answers_are_read_whole_by_length_and_in_many_chunks() {
    use std::io::Write as _;
    // 20 MiB of JSON, the same answer both ways.
    let name: String = (0..20 << 20)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body = format!(r#"{{"client":"{name}"}}"#).into_bytes();
    let sent = body.clone();
    let (_dir, remote, accepted) = fake_service(move |_, mut stream| {
        let body = sent.clone();
        std::thread::spawn(move || {
            read_request(&mut stream);
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .unwrap();
            stream.write_all(&body).unwrap();
            read_request(&mut stream);
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap();
            // Chunks of 1 to 4093 bytes: about 10000 of them.
            let mut rest = &body[..];
            let mut n = 0usize;
            while !rest.is_empty() {
                let (chunk, after) = rest.split_at(rest.len().min(1 + n * 37 % 4093));
                write!(stream, "{:x}\r\n", chunk.len()).unwrap();
                stream.write_all(chunk).unwrap();
                stream.write_all(b"\r\n").unwrap();
                rest = after;
                n += 1;
            }
            assert!(n > 5000, "{n} chunks");
            stream.write_all(b"0\r\n\r\n").unwrap();
            std::thread::sleep(Duration::from_secs(5));
        });
    });
    // Compared, not printed: 20 MiB in a failure's message would bury it.
    let by_length = remote.health().unwrap();
    assert!(
        by_length == name,
        "by length: {} bytes read",
        by_length.len()
    );
    let chunked = remote.health().unwrap();
    assert!(chunked == name, "in chunks: {} bytes read", chunked.len());
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A use's answer is read straight from its bytes: one that is not JSON says so and names the
/// service; JSON without a valid output (here a signature of another type, or none) is a
/// malformed answer naming the field. Nothing panics, and the connection serves the next call.
#[test]
fn a_use_answered_with_other_than_its_json_is_a_clear_error() {
    use std::io::Write as _;
    let answers: [&[u8]; 3] = [
        b"not json at all",
        br#"{"signature":7,"version":1,"state":"active"}"#,
        br#"{"version":1,"state":"active"}"#,
    ];
    let (_dir, remote, _) = fake_service(move |_, mut stream| {
        for body in answers {
            read_request(&mut stream);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(body).unwrap();
        }
    });
    let id = "kh1_AAAA";
    let opts = UseOptions::new();
    let said = |e: Error| e.to_string();
    let not_json = said(
        remote
            .sign_with(id, b"m", SignatureFormat::Raw, &opts)
            .unwrap_err(),
    );
    assert!(
        not_json.contains("is not JSON") && not_json.contains("fake.sock"),
        "{not_json}"
    );
    for _ in 0..2 {
        let malformed = said(
            remote
                .sign_with(id, b"m", SignatureFormat::Raw, &opts)
                .unwrap_err(),
        );
        assert!(
            malformed.contains("has no valid `signature`"),
            "{malformed}"
        );
    }
}
