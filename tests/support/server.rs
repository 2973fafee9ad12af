//! `keyhold serve` as a real process, and raw HTTP/1.1 to ask it: the harness of tests/serve.rs
//! and tests/serve_transport.rs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::env::Env;

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

/// A running `keyhold serve` on the Env's store, killed (SIGKILL) if the test did not stop it.
pub struct Server {
    child: Option<Child>,
    /// Its Unix socket (the first `unix:` listener).
    pub socket: PathBuf,
}

impl Server {
    /// Starts the service with `clients` (TOML `[clients.*]` tables) as the configuration on
    /// `DIR/keyhold.sock`, and waits until its socket answers.
    pub fn start(env: &Env, clients: &str) -> Self {
        let socket = env.file("keyhold.sock");
        Self::start_with(env, clients, &[&format!("unix:{}", socket.display())], &[])
    }

    /// Starts the service with `clients`, one `--listen` per entry of `listen` (the first is a
    /// `unix:` socket, waited for) and `extra` arguments.
    pub fn start_with(env: &Env, clients: &str, listen: &[&str], extra: &[&str]) -> Self {
        env.set_config(clients);
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
    pub fn spawn(mut cmd: Command, socket: PathBuf) -> Self {
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
        let stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        exchange(stream, method, path, body).unwrap()
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
