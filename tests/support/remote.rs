//! The CLI tests' remote mode (`KEYHOLD_TEST_REMOTE=1`, or [`super::env::Env::remote`]): every
//! command a test runs that may run through `keyhold --remote` (`runs_remotely()` in
//! src/cli/mod.rs: key commands, the cryptographic ones, `audit`, `store verify`, `maintain` and
//! `client list`)
//! goes through a
//! real `keyhold serve` holding the test's store, so that the tests' assertions on output and exit
//! codes hold for the remote CLI too (issue 12: "the CLI's whole test suite also run through
//! `--remote`").
//!
//! - The service starts at the Env's first remote command, with the Env's store, passphrase and
//!   variables, and the Env's configuration plus one client (`[clients.harness]`, this user,
//!   every operation but `metrics`, the namespaces the Env's commands named so far); the command gets
//!   `KEYHOLD_REMOTE=unix:SOCKET` (the documented default of `--remote`, for those commands
//!   only). It is stopped (SIGTERM, so backends close cleanly) when the Env drops.
//! - Before any other command of the Env runs, the service is stopped, and it starts again at the
//!   next remote command: the command may write the store (init, reseal, restore, recovery,
//!   backup…) or need a device the service holds open (a TPM, a token
//!   session), and a service started on the store as it is now is, to a client, the same as
//!   the store. Stopping before rather than after also keeps the two from ever running at once,
//!   and flushes the key uses the service buffers for the audit log (`[audit] flush_ms`) before
//!   a command here reads it. A new configuration text or a new namespace restarts it too.
//! - A store changed behind the service's back (a test that edits, deletes or copies back its
//!   files: each file's length, mtime and inode differ from when the service last left it)
//!   restarts the service at the next remote command. A service that cannot open the store, then
//!   or at any start (a record that fails its MAC, a wrong passphrase after a reseal, a TPM gone
//!   or busy, PCRs changed), lets that command run here, which is what the test is about (said
//!   on the test's stderr, and counted apart in the statistics below); before a command
//!   here, such a service is killed rather than stopped, so that the key uses it still buffers
//!   are not written over the change (run here, they would have been in the files before it).
//! - A command whose test shows what only a process holding the store can show runs locally:
//!   another program than keyhold (a pty, setsid), flags that point elsewhere or change how the
//!   store is unlocked or logged (`--store`, `--config`, `--passphrase-file`, `--remote`,
//!   `--token-file`, `-v`), a variable set for that command only (a wrong or new passphrase,
//!   a fault point, another sealer or PIN, logging), an Env whose commands log (`RUST_LOG`: the
//!   test reads each command's own log), a store not made yet, a configuration keyhold does not
//!   load (the test is about its error) or that has its own `[clients.*]` (the test runs its own
//!   service), or an Env that opted out with [`super::env::Env::local_only`], saying why.
//! - Through the service, the Env's secrets must not reach the service's log either.
//! - `KEYHOLD_TEST_REMOTE_STATS=FILE` appends, per Env, how many commands ran through the
//!   service and how many here, by reason.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Once, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The variable that turns remote mode on for every Env.
pub const VAR: &str = "KEYHOLD_TEST_REMOTE";

/// A file to which each Env appends how many of its commands ran through the service and how
/// many here, by reason (to see what remote mode covers).
pub const STATS_VAR: &str = "KEYHOLD_TEST_REMOTE_STATS";

/// The name of the harness's client in the service's configuration (the audit log's `client=`).
pub const CLIENT: &str = "harness";

/// The harness client's operations: every one but `metrics` (src/config/clients.rs), those
/// granted by name only too, so that `key export`, `key import`, `audit`, `store verify`,
/// `maintain` and `client list` run through the service.
const GRANTED: [&str; 24] = [
    "create",
    "list",
    "show",
    "pubkey",
    "sign",
    "verify",
    "encrypt",
    "decrypt",
    "random",
    "mac",
    "mac-verify",
    "rewrap",
    "datakey",
    "datakey-wrapped",
    "rotate",
    "state",
    "destroy",
    "policy",
    "history",
    "export",
    "import",
    "audit",
    "maintain",
    "admin",
];

/// The commands that run through `--remote` (src/cli/mod.rs `runs_remotely`), but `key`,
/// `audit`, `store verify`, `maintain` and `client list`.
const REMOTE_COMMANDS: [&str; 8] = [
    "sign",
    "verify",
    "encrypt",
    "decrypt",
    "rewrap",
    "mac",
    "mac-verify",
    "random",
];

/// Global flags whose value follows them (`--namespace NS`): skipped to find the command.
const VALUE_FLAGS: [&str; 6] = [
    "--namespace",
    "--store",
    "--config",
    "--passphrase-file",
    "--remote",
    "--token-file",
];

/// Flags that make a command run locally: they name another store, configuration, passphrase
/// source or service, ask for the local process's logs (which a client does not have), or
/// never reach a store (clap's help and version).
const LOCAL_FLAGS: [&str; 11] = [
    "--store",
    "--config",
    "--passphrase-file",
    "--remote",
    "--token-file",
    "-v",
    "-vv",
    "--verbose",
    "--help",
    "-h",
    "--version",
];

/// What a service was started with: a request asking for more restarts it.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Wanted {
    config: String,
    namespaces: BTreeSet<String>,
}

pub struct Running {
    child: Child,
    socket: PathBuf,
    wanted: Wanted,
    /// The store's files as the service left them: another change is one made behind its back.
    seen: std::sync::Mutex<Fingerprint>,
}

/// Each file under a store: its length, modification time and inode.
type Fingerprint = std::collections::BTreeMap<PathBuf, (u64, i64, i64, u64)>;

fn fingerprint(store: &Path) -> Fingerprint {
    fn walk(dir: &Path, out: &mut Fingerprint) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                walk(&path, out);
            } else {
                out.insert(
                    path,
                    (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()),
                );
            }
        }
    }
    let mut out = Fingerprint::new();
    walk(store, &mut out);
    out
}

impl Running {
    fn current(&self, wanted: &Wanted, store: &Path) -> bool {
        self.wanted == *wanted
            && *self.seen.lock().unwrap_or_else(|e| e.into_inner()) == fingerprint(store)
    }
}

#[derive(Default)]
pub struct State {
    running: Option<Running>,
    /// Every namespace the Env's commands named: granted to the client.
    namespaces: BTreeSet<String>,
    starts: usize,
}

/// One Env's remote mode: its service (if running) and what it needs.
pub struct Remote {
    dir: TempDir,
    state: RwLock<State>,
    /// Why the Env's commands all run locally, if a test said so.
    local_only: Option<&'static str>,
    /// How many commands ran where, and why here: for `KEYHOLD_TEST_REMOTE_STATS`.
    counts: std::sync::Mutex<std::collections::BTreeMap<&'static str, usize>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("dir", &self.dir.path())
            .field("local_only", &self.local_only)
            .finish_non_exhaustive()
    }
}

/// How an Env's command runs.
pub enum Route<'a> {
    Local,
    /// Through the service at this `unix:` address; the guard keeps it running meanwhile.
    Remote(String, RwLockReadGuard<'a, State>),
}

/// Whether `KEYHOLD_TEST_REMOTE` asks for remote mode (`1`, or any value but `0` and empty).
pub fn enabled() -> bool {
    std::env::var(VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

impl Remote {
    pub fn new() -> Self {
        static SAID: Once = Once::new();
        SAID.call_once(|| {
            eprintln!(
                "keyhold test harness: remote mode: the commands that may run through \
                 `keyhold --remote` go through a `keyhold serve` on the test's store"
            );
        });
        let dir = tempfile::Builder::new()
            .prefix("kh-remote-")
            .tempdir()
            .expect("create the remote harness's temp dir");
        Self {
            dir,
            state: RwLock::new(State::default()),
            local_only: None,
            counts: std::sync::Mutex::default(),
        }
    }

    pub fn set_local_only(&mut self, why: &'static str) {
        self.local_only = Some(why);
    }

    /// How many times a service was started for the Env.
    pub fn starts(&self) -> usize {
        self.read().starts
    }

    /// The service's stderr so far (its log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the service, if one runs: another command is about to run on the store here.
    /// If the store changed behind the service's back (the test changed its files), the service
    /// is killed, not asked to stop: the key uses it still buffers for the audit log (written
    /// within `[audit] flush_ms`) would have been in the files before the change had the
    /// commands run here, and must not be written over it.
    pub fn stop(&self, store: &Path) {
        let running = self.write().running.take();
        if let Some(mut running) = running {
            if *running.seen.lock().unwrap_or_else(|e| e.into_inner()) != fingerprint(store) {
                let _ = running.child.kill();
                let _ = running.child.wait();
            } else {
                stop(running);
            }
        }
    }

    /// Decides how `cmd` runs (see the module's documentation) and prepares it: stops the
    /// service before a local command, starts it for a remote one. `base` is the environment
    /// the Env gives every command (name → value), `store` and `config` its own, `serve` a
    /// `keyhold serve` command with that environment and store (no `--config`, no arguments).
    pub fn route<'a>(
        &'a self,
        cmd: &mut Command,
        base: &[(String, String)],
        store: &Path,
        config: Option<&Path>,
        serve: impl Fn() -> Command,
    ) -> Route<'a> {
        let args: Vec<&OsStr> = cmd.get_args().collect();
        for ns in namespaces(&args, cmd) {
            self.write().namespaces.insert(ns);
        }
        let local = if let Some(why) = self.local_only {
            Some(why)
        } else if cmd.get_program() != OsStr::new(super::env::BIN) {
            Some("another program (a pty, setsid)")
        } else if !store.join(keyhold::store::DB_FILE).is_file() {
            Some("no store yet")
        } else if !own_args(&args, store, config)
            .and_then(|own| own.iter().map(|a| a.to_str()).collect::<Option<Vec<_>>>())
            .is_some_and(|own| may_run_remotely(&own))
        {
            Some("not a remote command, or a flag of its own")
        } else if base.iter().any(|(name, _)| name == "RUST_LOG") {
            Some("the test reads each command's own log (RUST_LOG)")
        } else if !only_env_vars(cmd, base) {
            Some("a variable of its own")
        } else if config.is_some_and(|c| {
            keyhold::config::Config::load(c).is_err()
                || std::fs::read_to_string(c).is_ok_and(|text| text.contains("[clients."))
        }) {
            Some("a configuration with errors or clients")
        } else {
            None
        };
        if let Some(why) = local {
            self.count(why);
            self.stop(store);
            return Route::Local;
        }
        let config_text = config
            .map(|c| std::fs::read_to_string(c).expect("read the Env's configuration"))
            .unwrap_or_default();
        loop {
            {
                let state = self.read();
                let wanted = Wanted {
                    config: config_text.clone(),
                    namespaces: state.namespaces.clone(),
                };
                if let Some(running) = &state.running {
                    if running.current(&wanted, store) {
                        let address = format!("unix:{}", running.socket.display());
                        cmd.env("KEYHOLD_REMOTE", &address);
                        self.count("remote");
                        return Route::Remote(address, state);
                    }
                }
            }
            let mut state = self.write();
            let wanted = Wanted {
                config: config_text.clone(),
                namespaces: state.namespaces.clone(),
            };
            if state
                .running
                .as_ref()
                .is_some_and(|r| r.current(&wanted, store))
            {
                continue;
            }
            if let Some(old) = state.running.take() {
                stop(old);
            }
            match self.start(wanted, serve(), store) {
                Ok(running) => {
                    state.running = Some(running);
                    state.starts += 1;
                }
                // What the command would find opening the store here (a wrong passphrase, a
                // store changed behind keyhold's back, a TPM gone or busy, PCRs changed): it is
                // what the test is about, and only a command run here shows it.
                Err(why) => {
                    eprintln!(
                        "remote test mode: `keyhold serve` could not open the store ({why}): \
                         this command runs here"
                    );
                    self.count("the service cannot open the store");
                    return Route::Local;
                }
            }
        }
    }

    /// After a command through the service: the store as it left it.
    pub fn settled(&self, state: &State, store: &Path) {
        if let Some(running) = &state.running {
            *running.seen.lock().unwrap_or_else(|e| e.into_inner()) = fingerprint(store);
        }
    }

    fn count(&self, what: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(what)
            .or_default() += 1;
    }

    /// Starts `keyhold serve` (`serve`) on a socket in the harness's directory, with the Env's
    /// configuration and the harness's client, and waits until it answers.
    fn start(&self, wanted: Wanted, mut serve: Command, store: &Path) -> Result<Running, String> {
        let dir = self.dir.path();
        let socket = dir.join("s.sock");
        let _ = std::fs::remove_file(&socket);
        let config = dir.join("serve.toml");
        let namespaces: Vec<String> = std::iter::once("default".to_owned())
            .chain(wanted.namespaces.iter().cloned())
            .collect::<BTreeSet<_>>()
            .iter()
            .map(|ns| serde_json::Value::from(ns.as_str()).to_string())
            .collect();
        // TOML basic strings take JSON's escapes.
        let text = format!(
            "{}\n[clients.{CLIENT}]\nuid = {}\nnamespaces = [{}]\noperations = [{}]\n",
            wanted.config,
            rustix::process::geteuid().as_raw(),
            namespaces.join(", "),
            GRANTED
                .iter()
                .map(|op| format!("\"{op}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::fs::write(&config, text).expect("write the service's configuration");
        let log_path = dir.join("serve.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open the service's log");
        serve
            .arg("--config")
            .arg(&config)
            .args(["serve", "--listen"])
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = serve.spawn().expect("start keyhold serve");
        let deadline = Instant::now() + Duration::from_secs(60);
        while UnixStream::connect(&socket).is_err() {
            if let Some(status) = child.try_wait().expect("wait for keyhold serve") {
                let log = self.log();
                return Err(format!(
                    "{status}: {}",
                    log.lines().last().unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("remote test mode: `keyhold serve` never listened");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Running {
            child,
            socket,
            wanted,
            seen: std::sync::Mutex::new(fingerprint(store)),
        })
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(running) = self.write().running.take() {
            stop(running);
        }
        // One line per Env: the test, then how many of its commands ran where (and why here).
        if let Some(path) = std::env::var_os(STATS_VAR) {
            let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            let line = format!(
                "{}\tstarts={}\t{}\n",
                std::thread::current().name().unwrap_or("?"),
                self.read().starts,
                counts
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("\t")
            );
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
        }
    }
}

/// SIGTERM (the service drains and closes its backends), then SIGKILL if it has not ended
/// within a generous while.
fn stop(mut running: Running) {
    let pid = rustix::process::Pid::from_raw(running.child.id() as i32).expect("a child's pid");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match running.child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() > deadline => {
                let _ = running.child.kill();
                let _ = running.child.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The test's own arguments: those after the Env's `--store DIR [--config FILE]`, if the
/// command starts with them.
fn own_args<'a, 'b>(
    args: &'b [&'a OsStr],
    store: &Path,
    config: Option<&Path>,
) -> Option<&'b [&'a OsStr]> {
    let rest = match args {
        [flag, dir, rest @ ..] if *flag == "--store" && Path::new(dir) == store => rest,
        _ => return None,
    };
    match config {
        None => Some(rest),
        Some(config) => match rest {
            [flag, file, rest @ ..] if *flag == "--config" && Path::new(file) == config => {
                Some(rest)
            }
            _ => None,
        },
    }
}

/// Whether the test's arguments (after the Env's `--store`) are a command that runs through
/// `--remote`, with no flag that keeps it local.
pub fn may_run_remotely(text: &[&str]) -> bool {
    let local_flag = |a: &str| {
        LOCAL_FLAGS
            .iter()
            .any(|f| a == *f || a.starts_with(&format!("{f}=")))
            || (a.starts_with("-v") && a[1..].bytes().all(|b| b == b'v'))
    };
    // Only up to `--`: what follows is an operand.
    if text
        .iter()
        .take_while(|a| **a != "--")
        .any(|a| local_flag(a))
    {
        return false;
    }
    let mut words = text.iter().copied();
    let command = loop {
        match words.next() {
            Some(flag) if VALUE_FLAGS.contains(&flag) => {
                words.next();
            }
            Some(flag) if flag.starts_with('-') => {}
            Some(word) => break word,
            None => return false,
        }
    };
    match command {
        "key" => {
            let sub = words.find(|w| !w.starts_with('-'));
            sub.is_some()
        }
        "audit" => words.any(|w| w == "verify" || w == "show"),
        "store" => words.find(|w| !w.starts_with('-')) == Some("verify"),
        "maintain" => true,
        "client" => words.find(|w| !w.starts_with('-')) == Some("list"),
        other => REMOTE_COMMANDS.contains(&other),
    }
}

/// The namespaces `cmd` names: `--namespace NS`, `--namespace=NS`, `KEYHOLD_NAMESPACE`.
fn namespaces(args: &[&OsStr], cmd: &Command) -> Vec<String> {
    let mut found = Vec::new();
    let mut words = args.iter().filter_map(|a| a.to_str());
    while let Some(word) = words.next() {
        if word == "--" {
            break;
        }
        if word == "--namespace" {
            if let Some(ns) = words.next() {
                found.push(ns.to_owned());
            }
        } else if let Some(ns) = word.strip_prefix("--namespace=") {
            found.push(ns.to_owned());
        }
    }
    for (name, value) in cmd.get_envs() {
        if name == "KEYHOLD_NAMESPACE" {
            if let Some(ns) = value.and_then(OsStr::to_str) {
                found.push(ns.to_owned());
            }
        }
    }
    found
}

/// Whether `cmd`'s environment is the Env's own (`base`), but for a namespace: a variable set
/// or removed for this command alone changes what a process holding the store does (its
/// passphrase, sealer, PIN, fault point, logging), which a service started before it cannot
/// take.
fn only_env_vars(cmd: &Command, base: &[(String, String)]) -> bool {
    cmd.get_envs().all(|(name, value)| {
        let Some(name) = name.to_str() else {
            return false;
        };
        if name == "KEYHOLD_NAMESPACE" {
            return true;
        }
        let value = value.and_then(OsStr::to_str);
        // The last value given for a name is the one the command gets.
        base.iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            == value
    })
}
