//! `keyhold serve`'s transport as a real process (docs/service.md, "TLS", "Limits and timeouts",
//! "systemd"): TLS 1.3 with and without client certificates (made per test with the openssl
//! command), several listeners at once, the timeouts and limits a client cannot escape, SIGTERM's
//! drain and its deadline, the socket path's lock, and socket activation.
#![cfg(feature = "serve")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::env::*;
use support::serve::{env, exchange, pki, start_tls, uid, Ca, Pki, Server};

/// `app` is this process's user on the Unix socket and `app.example` with a certificate.
fn clients(extra: &str) -> String {
    format!(
        "[clients.app]\nuid = {}\ntls_name = \"app.example\"\nnamespaces = [\"app\"]\n{extra}\n",
        uid()
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// One request over TLS 1.3 to `addr`, trusting the server CA, showing `client` (certificate
/// and key files) if given.
fn ask_tls(
    addr: SocketAddr,
    pki: &Pki,
    client: Option<&(PathBuf, PathBuf)>,
    path: &str,
) -> Result<(u16, Value), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pki.server_ca.pem()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(cert).unwrap()],
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connection =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    exchange(rustls::StreamOwned::new(connection, tcp), "GET", path, None)
}

#[test]
fn mutual_tls_names_clients_by_certificate_beside_the_unix_socket() {
    let env = env();
    let pki = pki(&env);
    let (server, addr) = start_tls(
        &env,
        &pki,
        &clients("[clients.other]\ntls_name = \"spiffe://example/other\"\nnamespaces = [\"o\"]"),
        true,
    );
    let socket = server.socket.clone();
    // Both listeners, one process: the Unix socket by peer credentials…
    assert_eq!(
        server.ask("GET", "/v1/health", None),
        (
            200,
            json!({"status": "ok", "client": "app", "sealer": "passphrase"})
        )
    );
    // …TCP by the certificate's DNS name, URI name, or common name.
    let app = pki
        .client_ca
        .issue("app", "someone", "DNS:app.example", "clientAuth");
    let health = ask_tls(addr, &pki, Some(&app), "/v1/health").unwrap();
    assert_eq!(
        health,
        (
            200,
            json!({"status": "ok", "client": "app", "sealer": "passphrase"})
        )
    );
    let other = pki
        .client_ca
        .issue("other", "x", "URI:spiffe://example/other", "clientAuth");
    assert_eq!(
        ask_tls(addr, &pki, Some(&other), "/v1/health").unwrap().1["client"],
        "other"
    );
    let by_cn = pki.client_ca.issue(
        "by-cn",
        "app.example",
        "DNS:unrelated.example",
        "clientAuth",
    );
    assert_eq!(
        ask_tls(addr, &pki, Some(&by_cn), "/v1/health").unwrap().1["client"],
        "app"
    );
    // A certificate of the CA naming no client, and no certificate at all: no client (401).
    let nobody = pki
        .client_ca
        .issue("nobody", "nobody", "DNS:nobody.example", "clientAuth");
    for client in [Some(&nobody), None] {
        let (status, err) = ask_tls(addr, &pki, client, "/v1/health").unwrap();
        assert_eq!(
            (status, &err["error"]["code"]),
            (401, &json!("unauthenticated"))
        );
    }
    // A certificate that names two clients names none.
    let both = pki.client_ca.issue(
        "both",
        "x",
        "DNS:app.example,URI:spiffe://example/other",
        "clientAuth",
    );
    assert_eq!(
        ask_tls(addr, &pki, Some(&both), "/v1/health").unwrap().0,
        401
    );
    // A certificate of another CA, naming a client: refused in the handshake.
    let stranger = Ca::new(env.dir.path(), "stranger-ca");
    let forged = stranger.issue("forged", "app.example", "DNS:app.example", "clientAuth");
    // (The client reads the server's alert, or finds the connection closed on it already.)
    let refused = ask_tls(addr, &pki, Some(&forged), "/v1/health");
    assert!(
        refused.is_err(),
        "a certificate of another CA got an HTTP answer: {refused:?}"
    );
    // Still answering.
    assert_eq!(
        ask_tls(addr, &pki, Some(&app), "/v1/health").unwrap().0,
        200
    );
    let (status, err) = server.stop();
    assert!(status.success(), "{status:?}\n{err}");
    assert!(!socket.exists());
}

#[test]
fn tls_without_a_client_ca_is_401_and_tls_1_2_is_refused() {
    let env = env();
    let pki = pki(&env);
    let (_server, addr) = start_tls(&env, &pki, &clients(""), false);
    let (status, _) = ask_tls(addr, &pki, None, "/v1/health").unwrap();
    assert_eq!(
        status, 401,
        "TLS without a client certificate is no client yet"
    );
    let s_client = |version: &str| {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                version,
                "-connect",
                &addr.to_string(),
                "-CAfile",
            ])
            .arg(pki.server_ca.pem())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"Q\n").unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = s_client("-tls1_3");
    assert!(ok && text.contains("TLSv1.3"), "TLS 1.3 is served: {text}");
    let (ok, text) = s_client("-tls1_2");
    assert!(
        !ok && text.contains("alert protocol version"),
        "TLS 1.2 is refused: {text}"
    );
}

#[test]
fn tls_files_are_checked_before_the_store_is_opened() {
    let env = env();
    let pki = pki(&env);
    env.set_config(&clients(""));
    let key = pki.server_key.display().to_string();
    let cert = pki.server_cert.display().to_string();
    let base = [
        "serve",
        "--listen",
        "tcp:127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    std::fs::set_permissions(&pki.server_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = env.run(&base, b"");
    assert_fail(&out, 1, "is open to others (mode 644)", "a key others read");
    std::fs::set_permissions(&pki.server_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Another key than the certificate's.
    let (_, other_key) = pki.client_ca.issue("x", "x", "DNS:x", "clientAuth");
    let other_key = other_key.display().to_string();
    let mut args = base.to_vec();
    args[6] = &other_key;
    let out = env.run(&args, b"");
    assert_fail(
        &out,
        1,
        "the certificate must be the key's",
        "a key of another cert",
    );
    // TLS without TCP.
    let out = env.run(
        &[
            "serve",
            "--listen",
            "unix:/nonexistent/x.sock",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        b"",
    );
    assert_fail(&out, 2, "--tls-cert is for TCP", "TLS on a Unix socket");
}

/// The service on `DIR/keyhold.sock` with `extra` arguments, client `app` configured.
fn start_unix(env: &Env, extra: &[&str]) -> Server {
    let socket = env.file("keyhold.sock");
    Server::start_listening(
        env,
        &clients(""),
        &[&format!("unix:{}", socket.display())],
        extra,
    )
}

/// A connection sending half a request head on a Unix socket.
fn stall_head(socket: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: keyhold\r\n")
        .unwrap();
    stream
}

/// A connection that sent a request head and half its body (`POST /v1/random`, 12 bytes),
/// given a moment to be read: its request is in flight.
fn stall_body(socket: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .write_all(
            b"POST /v1/random HTTP/1.1\r\nHost: keyhold\r\nContent-Type: application/json\r\n\
              Content-Length: 12\r\nConnection: close\r\n\r\n{\"byt",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    stream
}

/// The rest of [`stall_body`]'s request, and the answer's status line.
fn finish_body(mut stream: UnixStream) -> String {
    stream.write_all(b"es\": 8}").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.lines().next().unwrap_or_default().to_owned()
}

/// How long until the server closes `stream` (reads give EOF or an error).
fn closed_after(mut stream: UnixStream, limit: Duration) -> Duration {
    let start = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the connection is still open after {limit:?}")
            }
            Err(_) => return start.elapsed(),
        }
    }
}

#[test]
fn a_slowloris_connection_is_closed_by_the_header_timeout_while_others_are_served() {
    let env = env();
    let server = start_unix(&env, &["--header-timeout", "2s"]);
    let socket = server.socket.clone();
    let stalled = stall_head(&socket);
    let start = Instant::now();
    // Served meanwhile, at once.
    for _ in 0..5 {
        assert_eq!(server.ask("GET", "/v1/health", None).0, 200);
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    let closed = closed_after(stalled, Duration::from_secs(10));
    assert!(
        closed >= Duration::from_millis(1500),
        "closed after {closed:?}, before the header timeout"
    );
    assert_eq!(server.ask("GET", "/v1/health", None).0, 200);
}

#[test]
fn sigterm_finishes_a_request_in_flight_and_exits_0() {
    let env = env();
    let server = Server::start(&env, &clients(""));
    let socket = server.socket.clone();
    let in_flight = stall_body(&socket);
    server.terminate();
    // New connections are refused as soon as the service stops accepting.
    let deadline = Instant::now() + Duration::from_secs(5);
    while UnixStream::connect(&socket).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(finish_body(in_flight), "HTTP/1.1 200 OK");
    let (status, err) = server.finish();
    assert!(status.success(), "{status:?}\n{err}");
    assert!(!err.contains("dropped"), "{err}");
}

#[test]
fn sigterm_with_a_stalled_request_exits_0_at_the_drain_deadline() {
    let env = env();
    let server = start_unix(&env, &["--drain-timeout", "2s", "--body-timeout", "1m"]);
    let socket = server.socket.clone();
    let _stalled = stall_body(&socket);
    let start = Instant::now();
    server.terminate();
    let (status, err) = server.finish();
    let took = start.elapsed();
    assert!(status.success(), "{status:?}\n{err}");
    assert!(
        (Duration::from_millis(1800)..Duration::from_secs(6)).contains(&took),
        "exited after {took:?}, the drain deadline is 2 s"
    );
    assert!(err.contains("WARN") && err.contains("dropped"), "{err}");
}

#[test]
fn a_stalled_body_is_refused_at_the_body_timeout() {
    let env = env();
    let _server = start_unix(&env, &["--body-timeout", "1s"]);
    let socket = _server.socket.clone();
    // Counted from before the head is sent: the timeout runs from the head's arrival, so at least
    // as long, whatever the machine's load does to the steps between.
    let start = Instant::now();
    let mut stalled = stall_body(&socket);
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    let _ = stalled.read_to_string(&mut answer);
    assert!(
        start.elapsed() >= Duration::from_millis(950),
        "{:?}",
        start.elapsed()
    );
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("did not arrive within 1s"),
        "{answer}"
    );
}

#[test]
fn a_second_service_on_the_same_socket_is_refused_and_the_first_keeps_its_socket() {
    let env = env();
    let socket = env.file("keyhold.sock");
    let server = Server::start(&env, &clients(""));
    let inode = std::fs::metadata(&socket).unwrap().ino();
    let out = env.run(
        &["serve", "--listen", &format!("unix:{}", socket.display())],
        b"",
    );
    assert_fail(
        &out,
        1,
        "is served by another keyhold serve",
        "a second service",
    );
    assert_eq!(std::fs::metadata(&socket).unwrap().ino(), inode);
    assert_eq!(server.ask("GET", "/v1/health", None).0, 200);
    // The socket is removed at exit only while it is the one the service made.
    std::fs::remove_file(&socket).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    assert!(socket.exists(), "another's socket was removed");
    drop(other);
}

#[test]
fn a_client_over_its_max_concurrent_is_answered_429_busy() {
    let env = env();
    let server = Server::start(&env, &clients("max_concurrent = 1"));
    let held = stall_body(&server.socket);
    let (status, err) = server.ask("GET", "/v1/health", None);
    assert_eq!(
        (status, &err["error"]["code"]),
        (429, &json!("busy")),
        "{err}"
    );
    assert_eq!(finish_body(held), "HTTP/1.1 200 OK");
    assert_eq!(server.ask("GET", "/v1/health", None).0, 200);
}

#[test]
fn a_socket_systemd_passes_is_served_and_left_in_place() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let env = env();
    env.set_config(&clients(""));
    let socket = env.file("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    // `sh` sets LISTEN_PID to its own PID, which `exec` hands to keyhold.
    let mut sh = Command::new("sh");
    sh.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$@\"", "sh"])
        .arg(env!("CARGO_BIN_EXE_keyhold"));
    let mut cmd = env.command_via(sh, &["serve"]);
    // SAFETY: between fork and exec only dup2 and fcntl, async-signal-safe system calls, run on
    // descriptors this test made: the listener becomes descriptor 3, open across exec, as
    // systemd passes it. Descriptor 3 is borrowed as owned and forgotten, never closed.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            use rustix::fd::{BorrowedFd, FromRawFd, OwnedFd};
            let mut three = std::mem::ManuallyDrop::new(OwnedFd::from_raw_fd(3));
            if fd != 3 {
                rustix::io::dup2(BorrowedFd::borrow_raw(fd), &mut three)?;
            }
            rustix::io::fcntl_setfd(&*three, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    let server = Server::spawn(cmd, socket.clone());
    drop(listener);
    assert_eq!(
        server.ask("GET", "/v1/health", None),
        (
            200,
            json!({"status": "ok", "client": "app", "sealer": "passphrase"})
        )
    );
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    assert!(socket.exists(), "systemd's socket is systemd's to remove");
}

/// Whether this process may lock all its memory: CAP_IPC_LOCK, or no RLIMIT_MEMLOCK.
fn may_lock_all() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    let ipc_lock = 1u64 << 14;
    effective & ipc_lock != 0
        || rustix::process::getrlimit(rustix::process::Resource::Memlock)
            .current
            .is_none()
}

/// Where it is permitted the service locks its memory (VmLck); without CAP_IPC_LOCK and with a
/// finite RLIMIT_MEMLOCK it warns and serves all the same.
#[test]
fn memory_is_locked_where_permitted_and_a_warning_says_why_not_otherwise() {
    let setpriv = require_tool("setpriv", "util-linux: it drops CAP_IPC_LOCK");
    let env = env();
    env.set_config(&clients(""));
    let socket = env.file("keyhold.sock");
    let listen = format!("unix:{}", socket.display());
    let locked_kib = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let server = Server::spawn(env.command(&["serve", "--listen", &listen]), socket.clone());
    let locked = locked_kib(server.pid());
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    if may_lock_all() {
        assert!(
            locked > 1024,
            "VmLck {locked} kB where mlockall is permitted\n{err}"
        );
        assert!(!err.contains("memory not locked"), "{err}");
    } else {
        assert!(err.contains("memory not locked: RLIMIT_MEMLOCK"), "{err}");
    }
    // Without CAP_IPC_LOCK, under this process's limit.
    let finite = rustix::process::getrlimit(rustix::process::Resource::Memlock)
        .current
        .is_some();
    let mut cmd = Command::new(setpriv);
    cmd.args(["--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"])
        .arg(env!("CARGO_BIN_EXE_keyhold"));
    let server = Server::spawn(
        env.command_via(cmd, &["serve", "--listen", &listen]),
        socket,
    );
    assert_eq!(server.ask("GET", "/v1/health", None).0, 200);
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    assert_eq!(
        err.contains("memory not locked: RLIMIT_MEMLOCK"),
        finite,
        "a warning exactly when the limit is finite: {err}"
    );
}

/// The heap mappings of process `pid` (`[heap]` and anonymous private writable ones, where
/// malloc's arenas are) that are not locked (no `lo` in their VmFlags, /proc/PID/smaps): their
/// header lines. Droppable mappings (`dp`: glibc's getrandom state, which the kernel never locks)
/// are not the heap. Panics if it finds no heap at all: then it would not be looking.
fn heap_unlocked(pid: u32) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut header: Option<&str> = None;
    let mut heaps = 0;
    let mut found = Vec::new();
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let is_header = fields.first().is_some_and(|r| {
            r.split_once('-').is_some_and(|(a, b)| {
                usize::from_str_radix(a, 16).is_ok() && usize::from_str_radix(b, 16).is_ok()
            })
        });
        if is_header {
            // ADDRESS PERMS OFFSET DEV INODE [PATH]
            let heap = fields.get(1) == Some(&"rw-p")
                && (fields.len() == 5 || fields.get(5) == Some(&"[heap]"));
            header = heap.then_some(line);
        } else if let (Some(flags), Some(mapping)) = (line.strip_prefix("VmFlags:"), header) {
            let flags: Vec<&str> = flags.split_whitespace().collect();
            if flags.contains(&"dp") {
                continue;
            }
            heaps += 1;
            if !flags.contains(&"lo") {
                found.push(mapping.to_owned());
            }
        }
    }
    assert!(heaps > 0, "no heap mapping found in /proc/{pid}/smaps");
    found
}

/// In a service whose memory is locked whole (mlockall), secrets come and go (decrypted
/// plaintexts among them) and the memory stays locked: a secret's own
/// `munlock` would take its pages, and whatever else the allocator put on them, out of the
/// process-wide lock.
#[test]
fn secrets_dropped_in_a_locked_service_leave_its_memory_locked() {
    if !may_lock_all() {
        eprintln!(
            "skipped: mlockall is not permitted here (no CAP_IPC_LOCK, finite RLIMIT_MEMLOCK)"
        );
        return;
    }
    let env = env();
    env.set_config(&clients(""));
    let aes = env.create_key("box", "aes-256-gcm", &["--namespace", "app"]);
    let socket = env.file("keyhold.sock");
    let listen = format!("unix:{}", socket.display());
    let server = Server::spawn(env.command(&["serve", "--listen", &listen]), socket);
    let before = heap_unlocked(server.pid());
    for i in 0..200 {
        let plaintext = support::serve::b64(format!("plaintext {i}").as_bytes());
        let (status, sealed) = server.ask(
            "POST",
            &format!("/v1/keys/{aes}/encrypt"),
            Some(&json!({ "plaintext": plaintext })),
        );
        assert_eq!(status, 200, "{sealed}");
        let (status, opened) = server.ask(
            "POST",
            &format!("/v1/keys/{aes}/decrypt"),
            Some(&json!({ "envelope": sealed["envelope"] })),
        );
        assert_eq!(status, 200, "{opened}");
        assert_eq!(opened["plaintext"], json!(plaintext));
    }
    let after = heap_unlocked(server.pid());
    let (status, err) = server.stop();
    assert!(status.success(), "{err}");
    // Locked whole in the first place, or the rest says nothing.
    assert!(!err.contains("memory not locked"), "{err}");
    assert!(
        before.is_empty(),
        "heap unlocked before any request: {before:#?}"
    );
    assert!(
        after.is_empty(),
        "heap unlocked after 200 decryptions: {after:#?}"
    );
}
