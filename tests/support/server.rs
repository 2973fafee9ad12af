//! A `keyhold serve` process on a temporary Unix socket, asked over raw HTTP/1.1: what the
//! service tests share.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use super::env::Env;

/// A running `keyhold serve` on the Env's store, killed (SIGKILL) if the test did not stop it.
pub struct Server {
    pub child: Option<Child>,
    pub socket: PathBuf,
}

impl Server {
    /// Starts the service with `clients` (TOML `[clients.*]` tables) as the configuration, and
    /// waits until its socket answers.
    pub fn start(env: &Env, clients: &str) -> Self {
        Self::start_with(env, "", clients)
    }

    /// [`Server::start`] with `base` (backends, …) in the configuration before the clients.
    pub fn start_with(env: &Env, base: &str, clients: &str) -> Self {
        env.set_config(&format!("{base}\n{clients}"));
        let socket = env.file("keyhold.sock");
        let mut cmd = env.command(&["serve", "--listen", &format!("unix:{}", socket.display())]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        let server = Self {
            child: Some(child),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&server.socket).is_err() {
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
        let (status, text) =
            self.exchange(method, path, "Content-Type: application/json\r\n", body);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `METHOD path` with `headers` (each line ending in CRLF) and `body`: the status and the
    /// answer's body as text.
    pub fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &str,
        body: Option<&[u8]>,
    ) -> (u16, String) {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let body = body.unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: keyhold\r\n{headers}\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        // A server that answers before the whole body is read may close the connection first.
        let _ = stream.write_all(body);
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        let text = String::from_utf8_lossy(&answer);
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in: {text}"));
        (status, rest.to_owned())
    }

    /// SIGTERM, then its exit status and stderr.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
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

pub fn client(namespaces: &str, extra: &str) -> String {
    format!(
        "[clients.app]\nuid = {}\nnamespaces = [{namespaces}]\n{extra}\n",
        uid()
    )
}
