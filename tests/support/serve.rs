//! A real `keyhold serve` on a temporary Unix socket, asked over raw HTTP/1.1: what the service's
//! tests (tests/serve*.rs) share. And its TLS listener with certificates made per test with the
//! openssl command (tests/serve_transport.rs, tests/cli_remote_tls.rs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use super::env::{require_tool, Env};

/// A running `keyhold serve` on the Env's store, killed (SIGKILL) if the test did not stop it.
pub struct Server {
    child: Option<Child>,
    pub socket: PathBuf,
}

/// An answer: its status, its headers (lowercase names), its body as text and as JSON (null
/// if it is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub text: String,
    pub body: Value,
}

impl Answer {
    /// The value of header `name` (lowercase), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Server {
    /// Starts the service with `clients` (TOML `[clients.*]` tables) as the configuration on
    /// `DIR/keyhold.sock`, and waits until its socket answers.
    pub fn start(env: &Env, clients: &str) -> Self {
        Self::start_with(env, "", clients)
    }

    /// [`Server::start`] with `base` (backends, …) in the configuration before the clients.
    pub fn start_with(env: &Env, base: &str, clients: &str) -> Self {
        let socket = env.file("keyhold.sock");
        Self::start_listening(
            env,
            &format!("{base}\n{clients}"),
            &[&format!("unix:{}", socket.display())],
            &[],
        )
    }

    /// Starts the service with `config`, one `--listen` per entry of `listen` (the first is a
    /// `unix:` socket, waited for) and `extra` arguments.
    pub fn start_listening(env: &Env, config: &str, listen: &[&str], extra: &[&str]) -> Self {
        env.set_config(config);
        let mut args = vec!["serve"];
        for l in listen {
            args.extend(["--listen", l]);
        }
        args.extend(extra);
        let socket = listen
            .first()
            .and_then(|l| l.strip_prefix("unix:"))
            .map(PathBuf::from)
            .expect("the first listener is a unix: socket");
        Self::spawn(env.command(&args), socket)
    }

    /// Spawns `cmd` (a `keyhold serve` command) and waits until `socket` answers.
    pub fn spawn(mut cmd: std::process::Command, socket: PathBuf) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        let mut server = Self {
            child: Some(child),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&server.socket).is_err() {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                let (_, err) = server.finish();
                panic!("the service ended ({status}) before it listened:\n{err}");
            }
            assert!(Instant::now() < deadline, "the service never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `METHOD path` with a JSON `body`: the status and the JSON answer.
    pub fn ask(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(Value::to_string);
        self.raw(method, path, body.as_deref().map(str::as_bytes))
    }

    /// `METHOD path` with `body` sent as it is (JSON content type).
    pub fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        let answer = self.request(method, path, &[], body);
        (answer.status, answer.body)
    }

    /// `METHOD path` with `headers` (`Name: value` lines) and `body` (JSON content type).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: Option<&[u8]>,
    ) -> Answer {
        self.request_as(method, path, "application/json", headers, body)
    }

    /// [`Server::request`] with `body` sent as `content_type`.
    pub fn request_as(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        headers: &[&str],
        body: Option<&[u8]>,
    ) -> Answer {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let body = body.unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: keyhold\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        // One write: a server that refuses the request before reading its body reads it with
        // the head, rather than closing the connection on unread bytes (a reset).
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        // A server that answers before the whole body is read may close the connection first.
        let _ = stream.write_all(&request);
        let mut answer = Vec::new();
        // A reset after the answer (a body not read) keeps what was read; no answer at all is
        // reported below.
        let _ = stream.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in: {text}"));
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Answer {
            status,
            headers,
            text: rest.to_owned(),
            body: serde_json::from_str(rest).unwrap_or(Value::Null),
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// `POST /v1/keys` with `body`, answered 201: the new key's ID.
    pub fn create(&self, body: &Value) -> String {
        let (status, key) = self.ask("POST", "/v1/keys", Some(body));
        assert_eq!(status, 201, "{key}");
        key["id"].as_str().unwrap().to_owned()
    }

    /// `POST /v1/batch` of `operations`, each of them answered 200: the results.
    pub fn batch_ok(&self, operations: &[Value]) -> Vec<Value> {
        let (status, batch) = self.ask(
            "POST",
            "/v1/batch",
            Some(&serde_json::json!({ "operations": operations })),
        );
        assert_eq!(status, 200, "{batch}");
        let results = batch["results"].as_array().unwrap().clone();
        assert_eq!(results.len(), operations.len(), "{batch}");
        assert!(results.iter().all(|r| r["status"] == 200), "{batch}");
        results
    }

    /// The service's `keyhold_keystore_calls_total` by `ran`: (here, moved, pool).
    pub fn calls_ran(&self) -> (u64, u64, u64) {
        let metrics = self.request("GET", "/v1/metrics", &[], None);
        assert_eq!(metrics.status, 200, "{}", metrics.text);
        let count = |ran: &str| {
            let name = format!("keyhold_keystore_calls_total{{ran=\"{ran}\"}} ");
            let line = metrics
                .text
                .lines()
                .find_map(|l| l.strip_prefix(name.as_str()));
            line.and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no `{name}` in:\n{}", metrics.text))
        };
        (count("here"), count("moved"), count("pool"))
    }

    /// SIGTERM, then its exit status and stderr.
    pub fn stop(self) -> (std::process::ExitStatus, String) {
        self.terminate();
        self.finish()
    }

    /// Waits for the process to end: its exit status and stderr.
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let status = child.wait().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// curl run as `nobody` (uid 65534, through setpriv) against a service's socket: another
/// source than this process. Making it lets other users reach the socket's directory.
pub struct AsNobody {
    setpriv: PathBuf,
    curl: PathBuf,
}

impl AsNobody {
    /// Needs setpriv and curl; opens `env`'s socket directory to other users (0755).
    pub fn new(env: &Env) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let setpriv = require_tool("setpriv", "util-linux: it runs a client as another user");
        let curl = require_tool(
            "curl",
            "it speaks HTTP over a Unix socket as the other user",
        );
        let dir = env.file("keyhold.sock").parent().unwrap().to_path_buf();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { setpriv, curl }
    }

    /// `GET path` with `headers` (`Name: value`): curl's stdout (the body), or its stderr as
    /// the failure's report.
    pub fn get(&self, server: &Server, path: &str, headers: &[&str]) -> String {
        let mut cmd = std::process::Command::new(&self.setpriv);
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&self.curl)
            .args(["-s", "--unix-socket"])
            .arg(&server.socket);
        for header in headers {
            cmd.args(["-H", header]);
        }
        let out = cmd.arg(format!("http://keyhold{path}")).output().unwrap();
        assert!(
            out.status.success(),
            "curl as nobody: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(value: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().unwrap())
        .unwrap()
}

/// This process's user: the client the tests configure.
pub fn uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// An initialised store whose commands get a configuration file (empty until a server starts).
pub fn env() -> Env {
    let env = Env::new().with_config("");
    env.init_store();
    env
}

/// A token client `name` of the store granted `namespace` (`keyhold client add`): its token.
pub fn token_client(env: &Env, name: &str, namespace: &str) -> String {
    token_client_with(env, name, namespace, &[])
}

/// [`token_client`] with more `client add` arguments (`--operations …`).
fn token_client_with(env: &Env, name: &str, namespace: &str, extra: &[&str]) -> String {
    let mut args = vec!["--json", "client", "add", name, "--namespace", namespace];
    args.extend_from_slice(extra);
    let json = env.ok(&args, b"", "client add");
    serde_json::from_slice::<Value>(&json).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A token client `metrics-reader` of the store allowed only `metrics`: its token. Reading the
/// metrics with it adds no request of the client under test.
pub fn metrics_reader(env: &Env) -> String {
    token_client_with(env, "metrics-reader", "app", &["--operations", "metrics"])
}

/// The connections the service has served (`keyhold_connections_total`), read over its Unix
/// socket with `token` ([`metrics_reader`]): the reading's own connection is counted.
pub fn connections_served(server: &Server, token: &str) -> u64 {
    let answer = server.request(
        "GET",
        "/v1/metrics",
        &[&format!("Authorization: Bearer {token}")],
        None,
    );
    assert_eq!(answer.status, 200, "GET /v1/metrics: {}", answer.text);
    answer
        .text
        .lines()
        .find_map(|line| line.strip_prefix("keyhold_connections_total "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no keyhold_connections_total in:\n{}", answer.text))
}

/// `[clients.app]`: this process's user, seeing `namespaces` (TOML strings), with `extra`.
pub fn client(namespaces: &str, extra: &str) -> String {
    format!(
        "[clients.app]\nuid = {}\nnamespaces = [{namespaces}]\n{extra}\n",
        uid()
    )
}

/// One request on `stream` (which the server closes after it: `Connection: close`): the status
/// and the JSON answer, or what went wrong reading it.
pub fn exchange(
    mut stream: impl Read + Write,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Value), String> {
    let body = body.unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: keyhold\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    // A server that answers before the whole body is read may close the connection first.
    let _ = stream.write_all(body);
    let _ = stream.flush();
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("reading the answer: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in: {text:?}"))?;
    Ok((status, serde_json::from_str(rest).unwrap_or(Value::Null)))
}

/// A TCP port nobody listens on now.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority in `dir`: NAME.pem and NAME.key (P-256).
pub struct Ca {
    pub dir: PathBuf,
    pub name: String,
}

/// `openssl req` arguments for a new, unencrypted ECDSA P-256 key.
const NEW_P256_KEY: &[&str] = &[
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Self {
        let (key, pem, subject) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN={name}"),
        );
        openssl(
            dir,
            &[
                &["req", "-x509"],
                NEW_P256_KEY,
                &[
                    "-keyout", &key, "-out", &pem, "-subj", &subject, "-days", "2",
                ],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        );
        Self {
            dir: dir.to_path_buf(),
            name: name.into(),
        }
    }

    pub fn pem(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A certificate this CA signs: NAME.pem and NAME.key (mode 0600), for `usage`
    /// (`serverAuth` or `clientAuth`), with subject CN `cn` and subject alternative names `san`.
    pub fn issue(&self, name: &str, cn: &str, san: &str, usage: &str) -> (PathBuf, PathBuf) {
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage={usage}\nsubjectAltName={san}\n"
            ),
        )
        .unwrap();
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subject = format!("/CN={cn}");
        openssl(
            &self.dir,
            &[
                &["req", "-new"],
                NEW_P256_KEY,
                &["-keyout", &key, "-out", &csr, "-subj", &subject],
            ]
            .concat(),
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &format!("{}.pem", self.name),
                "-CAkey",
                &format!("{}.key", self.name),
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
        let key = self.dir.join(key);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (self.dir.join(pem), key)
    }
}

/// The server's PKI: a CA for clients, a server certificate for localhost.
pub struct Pki {
    pub client_ca: Ca,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub server_ca: Ca,
}

pub fn pki(env: &Env) -> Pki {
    let dir = env.dir.path();
    let server_ca = Ca::new(dir, "server-ca");
    let (server_cert, server_key) = server_ca.issue(
        "server",
        "localhost",
        "DNS:localhost,IP:127.0.0.1",
        "serverAuth",
    );
    Pki {
        client_ca: Ca::new(dir, "client-ca"),
        server_cert,
        server_key,
        server_ca,
    }
}

pub fn tls_args(pki: &Pki, client_ca: bool) -> Vec<String> {
    let mut args = vec![
        "--tls-cert".into(),
        pki.server_cert.display().to_string(),
        "--tls-key".into(),
        pki.server_key.display().to_string(),
    ];
    if client_ca {
        args.extend([
            "--client-ca".into(),
            pki.client_ca.pem().display().to_string(),
        ]);
    }
    args
}

/// The service on `DIR/keyhold.sock` and on a free TCP port with TLS (mutual with
/// `client_ca`), once both answer: the server and the TCP address.
pub fn start_tls(env: &Env, pki: &Pki, clients: &str, client_ca: bool) -> (Server, SocketAddr) {
    let addr = free_port();
    let socket = env.file("keyhold.sock");
    let args = tls_args(pki, client_ca);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_listening(
        env,
        clients,
        &[
            &format!("unix:{}", socket.display()),
            &format!("tcp:{addr}"),
        ],
        &args,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "tcp:{addr} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, addr)
}
