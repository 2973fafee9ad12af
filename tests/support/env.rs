//! The one harness for the command-line tests: a temp store driven through the real binary.
//!
//! Every command runs as its own process with a clean environment (`env_clear`, then only `PATH`,
//! `HOME` = the temp dir, the passphrase and the variables the test names), a per-command timeout
//! (the child is killed and the test fails naming the command line), its stdin written from a
//! thread so large inputs cannot deadlock against a full stdout pipe, and every command's stdout
//! and stderr are checked for the secrets it was given (passphrase, PIN): none may appear.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_keyhold");

/// The passphrase of every test store; distinctive so a leak into any output is unmistakable.
pub const PASS: &str = "Tr0ub4dor&3-correct-horse-battery-staple";

/// `init` of a passphrase store at the documented Argon2 minimum, so each test's `init` is quick.
pub const INIT_ARGS: &[&str] = &[
    "init",
    "--sealer",
    "passphrase",
    "--argon2-memory-mib",
    "19",
    "--argon2-iterations",
    "2",
];

/// 64 MiB, the documented input limit.
pub const LIMIT: usize = 64 * 1024 * 1024;

/// Generous: the suite runs about ten test processes on two cores, and RSA-4096 key generation or
/// a 64 MiB input can take a while there. A command that takes longer has hung.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(240);

/// Secrets shorter than this are not looked for in output: a 4-digit PIN turns up by chance in
/// binary signatures, token serials and slot numbers. Tests that pass a short secret check its
/// own absence where it matters (e.g. a wrong PIN in the error message).
const MIN_SECRET_LEN: usize = 8;

/// Every file under a store: path relative to the store → bytes, sorted by path.
pub type Snapshot = BTreeMap<String, Vec<u8>>;

/// A temp directory holding a store directory (`DIR/store`, not created until `init`), scratch
/// files (`DIR/*`) and, with [`Env::with_config`], a configuration file passed to every command.
#[derive(Debug)]
pub struct Env {
    /// Remote mode (tests/support/remote.rs), if on. First, so that its service is stopped
    /// before the temp dir holding the store is removed.
    #[cfg(feature = "serve")]
    remote: Option<super::remote::Remote>,
    pub dir: TempDir,
    pub store: PathBuf,
    config: Option<PathBuf>,
    passphrase: Option<String>,
    vars: Vec<(String, String)>,
    secrets: Vec<String>,
    timeout: Duration,
}

impl Env {
    /// A temp dir whose store has not been initialised; commands get the passphrase [`PASS`].
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("keyhold-cli-")
            .tempdir()
            .expect("create a temp dir");
        let store = dir.path().join("store");
        Env {
            #[cfg(feature = "serve")]
            remote: super::remote::enabled().then(super::remote::Remote::new),
            dir,
            store,
            config: None,
            passphrase: Some(PASS.to_owned()),
            vars: Vec::new(),
            secrets: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// A temp dir with an initialised passphrase store.
    pub fn init() -> Self {
        let env = Self::new();
        env.init_store();
        env
    }

    /// Runs [`INIT_ARGS`] (a passphrase store, fast Argon2) and asserts it succeeded.
    pub fn init_store(&self) {
        let out = self.run(INIT_ARGS, b"");
        assert_ok(&out, "keyhold init (fixture)");
    }

    /// Writes `toml` to `DIR/keyhold.toml` and passes `--config` with it to every command.
    pub fn with_config(mut self, toml: &str) -> Self {
        let path = self.dir.path().join("keyhold.toml");
        std::fs::write(&path, toml).expect("write the configuration file");
        self.config = Some(path);
        self
    }

    /// Backend `hsm` is the SoftHSM2 token `label`, reached through `module` (SoftHSM2's, or
    /// pkcs11-spy in front of it), with user PIN `pin`: the configuration ([`hsm_config`] with
    /// `extra`), `SOFTHSM2_CONF` and `KH_TEST_PIN` for every command.
    #[cfg(feature = "pkcs11")]
    pub fn with_softhsm(self, module: &str, label: &str, pin: &str, extra: &str) -> Self {
        let conf = keyhold::testing::SoftHsm::conf_file().expect("SOFTHSM2_CONF");
        self.with_config(&hsm_config(module, label, extra))
            .with_var(
                "SOFTHSM2_CONF",
                conf.to_str().expect("temp paths are UTF-8"),
            )
            .with_var("KH_TEST_PIN", pin)
    }

    /// A new Env whose backend `hsm` is the SoftHSM2 fixture token `hsm`, with its user PIN
    /// [`keyhold::testing::TEST_USER_PIN`] (see [`Env::with_softhsm`]).
    #[cfg(feature = "pkcs11")]
    pub fn on_softhsm(hsm: &keyhold::testing::SoftHsm) -> Self {
        Self::new().with_softhsm(
            keyhold::testing::SOFTHSM_MODULE,
            hsm.label(),
            keyhold::testing::TEST_USER_PIN,
            "",
        )
    }

    /// Sets `name=value` for every command (a later per-command value wins).
    pub fn with_var(mut self, name: &str, value: &str) -> Self {
        self.vars.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Commands get no `KEYHOLD_PASSPHRASE` unless one is given per command ([`Env::run_vars`]).
    pub fn without_passphrase(mut self) -> Self {
        self.passphrase = None;
        self
    }

    /// Another string that must never appear in any command's stdout or stderr (at least 8
    /// characters: a shorter one could turn up by chance).
    pub fn with_secret(mut self, secret: &str) -> Self {
        assert!(
            secret.len() >= MIN_SECRET_LEN,
            "a secret to look for must have {MIN_SECRET_LEN} characters or more: {secret:?}"
        );
        self.secrets.push(secret.to_owned());
        self
    }

    /// Remote mode for this Env whatever `KEYHOLD_TEST_REMOTE` says (tests/support/remote.rs).
    #[cfg(feature = "serve")]
    pub fn remote(mut self) -> Self {
        if self.remote.is_none() {
            self.remote = Some(super::remote::Remote::new());
        }
        self
    }

    /// Every command of this Env runs here, even in remote mode: `why` says what the test shows
    /// that a client of `keyhold serve` cannot (it is kept for the Env's debug output).
    #[allow(unused_mut, unused_variables)]
    pub fn local_only(mut self, why: &'static str) -> Self {
        #[cfg(feature = "serve")]
        if let Some(remote) = &mut self.remote {
            remote.set_local_only(why);
        }
        self
    }

    /// In remote mode, how many times a service was started for this Env (0 otherwise).
    pub fn remote_starts(&self) -> usize {
        #[cfg(feature = "serve")]
        if let Some(remote) = &self.remote {
            return remote.starts();
        }
        0
    }

    /// The per-command timeout (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The configuration file given to every command; panics without [`Env::with_config`].
    pub fn config_path(&self) -> &Path {
        self.config
            .as_deref()
            .expect("this Env has no configuration: build it with .with_config(toml)")
    }

    /// The text of the configuration file.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(self.config_path()).expect("read the configuration file")
    }

    /// The text of the configuration file, or empty without one.
    pub fn config_text_or_empty(&self) -> String {
        self.config
            .as_ref()
            .map_or_else(String::new, |_| self.config_text())
    }

    /// The variables this Env sets for every command (a token's PIN and SoftHSM2 configuration).
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Replaces the configuration file's text (it stays the one passed to every command).
    pub fn set_config(&self, toml: &str) {
        std::fs::write(self.config_path(), toml).expect("write the configuration file");
    }

    pub fn store_str(&self) -> &str {
        self.store.to_str().expect("temp paths are UTF-8")
    }

    /// keyhold in the temp dir with a clean environment: `PATH`, `HOME` (the temp dir), the
    /// passphrase and the Env's variables; no `--store`, no `--config`.
    pub fn bare_command(&self) -> Command {
        self.clean(Command::new(BIN))
    }

    /// `cmd` with the clean environment of [`Env::bare_command`].
    fn clean(&self, mut cmd: Command) -> Command {
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path());
        if let Some(pass) = &self.passphrase {
            cmd.env("KEYHOLD_PASSPHRASE", pass);
        }
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }

    /// The command with `--store`, `--config` (if any), the clean environment and `args`.
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_via(Command::new(BIN), args)
    }

    /// As [`Env::command`], but `cmd` (e.g. `setsid --wait BIN`) is the process to start.
    pub fn command_via(&self, cmd: Command, args: &[&str]) -> Command {
        // Remote mode: a command that will run here may write the store, or need a device the
        // service holds, even if the test starts it itself rather than through run_cmd.
        #[cfg(feature = "serve")]
        if let Some(remote) = &self.remote {
            if !super::remote::may_run_remotely(args) {
                remote.stop(&self.store);
            }
        }
        let mut cmd = self.clean(cmd);
        cmd.arg("--store").arg(&self.store);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(args);
        cmd
    }

    /// Runs `cmd` (built by this Env) with the timeout, then checks that the passphrase it was
    /// given (`KEYHOLD_PASSPHRASE`, as set on the command) and the Env's secrets appear in neither
    /// its stdout nor its stderr.
    pub fn run_cmd(&self, mut cmd: Command, stdin: Option<&[u8]>) -> Output {
        // Held while the command runs: the service stays up for it.
        #[cfg(feature = "serve")]
        let route = self.route(&mut cmd);
        #[cfg(not(feature = "serve"))]
        let _ = &mut cmd;
        let mut secrets = self.secrets.clone();
        secrets.extend(
            cmd.get_envs()
                .filter(|(k, _)| *k == "KEYHOLD_PASSPHRASE")
                .filter_map(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
                .filter(|v| v.len() >= MIN_SECRET_LEN),
        );
        let line = command_line(&cmd);
        let out = run_command_timeout(cmd, stdin, self.timeout);
        assert_no_secrets(&out, &secrets, &line);
        // Through the service, the secrets it holds must stay out of its own log too.
        #[cfg(feature = "serve")]
        if let (Some(super::remote::Route::Remote(address, state)), Some(remote)) =
            (&route, &self.remote)
        {
            remote.settled(state, &self.store);
            let log = remote.log();
            for secret in &secrets {
                assert!(
                    !contains(log.as_bytes(), secret.as_bytes()),
                    "`{line}`: a secret it was given appears in the log of `keyhold serve` at \
                     {address}:\n{log}"
                );
            }
        }
        out
    }

    /// Remote mode: runs `cmd` through the service or here (tests/support/remote.rs).
    #[cfg(feature = "serve")]
    fn route(&self, cmd: &mut Command) -> Option<super::remote::Route<'_>> {
        let remote = self.remote.as_ref()?;
        let mut base = vec![
            ("PATH".to_owned(), std::env::var("PATH").unwrap_or_default()),
            (
                "HOME".to_owned(),
                self.dir
                    .path()
                    .to_str()
                    .expect("temp paths are UTF-8")
                    .to_owned(),
            ),
        ];
        if let Some(pass) = &self.passphrase {
            base.push(("KEYHOLD_PASSPHRASE".to_owned(), pass.clone()));
        }
        base.extend(self.vars.iter().cloned());
        Some(
            remote.route(cmd, &base, &self.store, self.config.as_deref(), || {
                let mut serve = self.bare_command();
                serve.arg("--store").arg(&self.store);
                serve
            }),
        )
    }

    /// Runs keyhold with `args` after `--store`, feeding `stdin`.
    pub fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.run_cmd(self.command(args), Some(stdin))
    }

    /// Runs keyhold with these variables set for this command (stdin /dev/null).
    pub fn run_vars(&self, vars: &[(&str, &str)], args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        cmd.envs(vars.iter().copied());
        self.run_cmd(cmd, None)
    }

    /// Runs keyhold after `adjust` changes the command (environment, stdin source).
    pub fn run_with(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        adjust: impl FnOnce(&mut Command),
    ) -> Output {
        let mut cmd = self.command(args);
        adjust(&mut cmd);
        self.run_cmd(cmd, stdin)
    }

    /// Runs keyhold, asserts exit 0 and a clean stderr, returns stdout.
    pub fn ok(&self, args: &[&str], stdin: &[u8], ctx: &str) -> Vec<u8> {
        let out = self.run(args, stdin);
        assert_ok(&out, ctx);
        out.stdout
    }

    /// Runs keyhold (empty stdin), asserts exit 0 and a clean stderr, returns stdout as text.
    pub fn ok_text(&self, args: &[&str]) -> String {
        let out = self.ok(args, b"", &format!("{args:?}"));
        String::from_utf8(out).unwrap_or_else(|e| panic!("{args:?}: stdout is not UTF-8: {e}"))
    }

    /// Runs keyhold with these variables; asserts exit 0. Returns stdout and stderr.
    pub fn ok_vars(&self, vars: &[(&str, &str)], args: &[&str]) -> (Vec<u8>, String) {
        let out = self.run_vars(vars, args);
        assert_ok(&out, &format!("{args:?} with {:?}", names(vars)));
        let err = stderr(&out);
        (out.stdout, err)
    }

    /// Runs keyhold with these variables; asserts exit `code`, nothing on stdout, `keyhold: `
    /// first on stderr (but for clap's usage errors). Returns stderr.
    pub fn refused(&self, vars: &[(&str, &str)], args: &[&str], code: i32) -> String {
        let out = self.run_vars(vars, args);
        let ctx = format!("{args:?} with {:?}", names(vars));
        assert_fail(&out, code, "", &ctx);
        assert!(
            out.stdout.is_empty(),
            "{ctx}: expected nothing on stdout\n{}",
            show(&out)
        );
        stderr(&out)
    }

    /// Runs keyhold with its stdout on a terminal (a pty from script(1)); stdout and stderr both
    /// arrive in the output's stdout. Panics if script(1) is missing: the test would otherwise
    /// check nothing.
    pub fn on_terminal(&self, args: &[&str]) -> Output {
        self.on_terminal_typing(args, None)
    }

    /// As [`Env::on_terminal`], with `typed` arriving on the terminal as if typed there.
    pub fn on_terminal_typing(&self, args: &[&str], typed: Option<&[u8]>) -> Output {
        let script = require_tool("script", "util-linux: it gives keyhold a terminal");
        let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let mut line = vec![quote(BIN), "--store".into(), quote(self.store_str())];
        if let Some(config) = &self.config {
            line.push("--config".into());
            line.push(quote(config.to_str().expect("temp paths are UTF-8")));
        }
        line.extend(args.iter().map(|a| quote(a)));
        let mut cmd = self.clean(Command::new(script));
        cmd.args(["-qec", &line.join(" "), "/dev/null"]);
        self.run_cmd(cmd, typed)
    }

    /// Runs keyhold in a new session, with no controlling terminal (setsid(1)) and stdin
    /// /dev/null, so that no /dev/tty prompt can appear (or hang). Panics if setsid is missing:
    /// run without it, the test would not check what it says.
    pub fn detached(&self, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Output {
        let setsid = require_tool(
            "setsid",
            "util-linux: it detaches keyhold from the terminal",
        );
        let mut prog = Command::new(setsid);
        prog.arg("--wait").arg(BIN);
        let mut cmd = self.command_via(prog, args);
        adjust(&mut cmd);
        self.run_cmd(cmd, None)
    }

    /// A scratch path outside the store.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a scratch file outside the store and returns its path as a string.
    pub fn write(&self, name: &str, data: &[u8]) -> String {
        let path = self.file(name);
        std::fs::write(&path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path.to_str().expect("temp paths are UTF-8").to_owned()
    }

    pub fn path_str(&self, name: &str) -> String {
        self.file(name)
            .to_str()
            .expect("temp paths are UTF-8")
            .to_owned()
    }

    /// `key create NAME --type TY EXTRA...`; asserts stdout is the ID alone plus a newline.
    pub fn create_key(&self, name: &str, ty: &str, extra: &[&str]) -> String {
        let mut args = vec!["key", "create", name, "--type", ty];
        args.extend_from_slice(extra);
        let out = self.run(&args, b"");
        assert_ok(&out, &format!("key create {name} --type {ty} {extra:?}"));
        parse_id_line(&out.stdout, &format!("key create {name} --type {ty}"))
    }

    /// `key pubkey --key ID` as PEM text.
    pub fn pubkey_pem(&self, id: &str) -> String {
        let out = self.ok(&["key", "pubkey", "--key", id], b"", "key pubkey (PEM)");
        let pem = String::from_utf8(out).expect("PEM output is UTF-8");
        assert!(
            pem.starts_with("-----BEGIN PUBLIC KEY-----\n")
                && pem.trim_end().ends_with("-----END PUBLIC KEY-----"),
            "key pubkey: expected a SubjectPublicKeyInfo PEM (BEGIN/END PUBLIC KEY), got:\n{pem}"
        );
        pem
    }

    /// Every regular file under the store dir. Panics if the store directory does not exist, so
    /// that "unchanged" never holds vacuously: for a store that must not exist, use
    /// [`Env::assert_no_store`].
    pub fn snapshot(&self) -> Snapshot {
        assert!(
            self.store.is_dir(),
            "snapshot of {}: the store directory does not exist (nothing to compare)",
            self.store.display()
        );
        let mut snap = Snapshot::new();
        walk(&self.store, &self.store, &mut snap);
        snap
    }

    /// Asserts that the store's files are byte-for-byte what `before` recorded.
    pub fn assert_unchanged(&self, before: &Snapshot, ctx: &str) {
        assert_snapshots_equal(before, &self.snapshot(), ctx);
    }

    /// Asserts that no store was made: the store directory is absent, or empty.
    pub fn assert_no_store(&self, ctx: &str) {
        let entries: Vec<PathBuf> = match std::fs::read_dir(&self.store) {
            Ok(dir) => dir
                .map(|e| e.expect("read store dir entry").path())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => panic!("{ctx}: read {}: {e}", self.store.display()),
        };
        assert!(
            entries.is_empty(),
            "{ctx}: expected no store to be made, found {entries:?}"
        );
    }

    /// The store's SQLite database file (its name is keyhold's documented one).
    pub fn database_file(&self) -> PathBuf {
        let path = self.store.join(keyhold::store::DB_FILE);
        assert!(
            path.is_file(),
            "expected the database {} in the initialised store",
            path.display()
        );
        path
    }

    /// The bytes of the store's database file.
    pub fn db(&self) -> Vec<u8> {
        std::fs::read(self.database_file()).expect("read the store database")
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

fn names<'a>(vars: &[(&'a str, &str)]) -> Vec<&'a str> {
    vars.iter().map(|(k, _)| *k).collect()
}

/// The path of `tool` on `PATH`; panics (naming `why`) if it is not installed.
pub fn require_tool(tool: &str, why: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{tool}` is not installed ({why}); this test needs it"))
}

fn walk(root: &Path, dir: &Path, snap: &mut Snapshot) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read store dir {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("read store dir entry");
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).expect("stat store entry");
        if meta.is_dir() {
            walk(root, &path, snap);
        } else if path == root.join(keyhold::audit::FILE) {
            // The audit log records every attempt, failed ones too: it grows by design, and
            // tests/cli_audit.rs checks what it holds.
            continue;
        } else {
            let rel = path
                .strip_prefix(root)
                .expect("entry under root")
                .to_string_lossy()
                .into_owned();
            let bytes = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("read store file {}: {e}", path.display()));
            snap.insert(rel, bytes);
        }
    }
}

pub fn assert_snapshots_equal(before: &Snapshot, after: &Snapshot, ctx: &str) {
    if before == after {
        return;
    }
    let mut diffs = Vec::new();
    for (path, bytes) in before {
        match after.get(path) {
            None => diffs.push(format!("{path}: removed")),
            Some(b) if b != bytes => diffs.push(format!(
                "{path}: changed ({} → {} bytes)",
                bytes.len(),
                b.len()
            )),
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        diffs.push(format!("{path}: added"));
    }
    panic!(
        "{ctx}: expected the store to be byte-for-byte unchanged, but: {}",
        diffs.join("; ")
    );
}

/// (path, is a directory, permission bits) of `root` and of everything below it.
pub fn modes_under(root: &Path) -> Vec<(PathBuf, bool, u32)> {
    fn rec(p: &Path, out: &mut Vec<(PathBuf, bool, u32)>) {
        let meta = std::fs::symlink_metadata(p).expect("stat");
        out.push((
            p.to_path_buf(),
            meta.is_dir(),
            meta.permissions().mode() & 0o7777,
        ));
        if meta.is_dir() {
            for e in std::fs::read_dir(p).expect("read dir") {
                rec(&e.expect("dir entry").path(), out);
            }
        }
    }
    let mut out = Vec::new();
    rec(root, &mut out);
    out
}

/// The program and its arguments, as a shell would show them (no environment: it holds secrets).
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts that none of `secrets` appears in the stdout or stderr of `out`.
pub fn assert_no_secrets(out: &Output, secrets: &[String], line: &str) {
    for secret in secrets {
        for (name, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            assert!(
                !contains(bytes, secret.as_bytes()),
                "`{line}`: a secret it was given (passphrase or PIN) appears in its {name}\n{}",
                show(out)
            );
        }
    }
}

/// Every form `secret` could take in a log line or message: as is, hex in either case, the
/// decimal bytes of a `{:?}` of a byte slice, and base64 (standard and URL-safe) as it reads when
/// the secret starts at any of the three byte alignments inside a longer encoded buffer (the
/// encoded characters that mix in neighbouring bytes, and the last group, left out).
pub fn secret_forms(secret: &str) -> Vec<(&'static str, String)> {
    binary_forms(secret.as_bytes())
        .into_iter()
        .map(|(form, bytes)| {
            (
                form,
                String::from_utf8(bytes).expect("a text secret's forms are text"),
            )
        })
        .collect()
}

/// [`secret_forms`] of secret bytes (key material, a root secret): the raw bytes, and each text
/// form as bytes.
pub fn binary_forms(bytes: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    use base64::Engine as _;
    let hex = keyhold::hex::encode(bytes);
    let debug = format!("{bytes:?}");
    let mut forms = vec![
        ("raw", bytes.to_vec()),
        ("hex", hex.clone().into_bytes()),
        ("HEX", hex.to_uppercase().into_bytes()),
        ("bytes", debug.as_bytes()[1..debug.len() - 1].to_vec()),
    ];
    for (skip, offset) in [(0, 0), (2, 1), (3, 2)] {
        let mut buffer = vec![0u8; offset];
        buffer.extend_from_slice(bytes);
        let standard = base64::engine::general_purpose::STANDARD.encode(&buffer);
        let core = standard[skip..standard.len() - 4].to_owned();
        assert!(
            core.len() >= 16,
            "a secret of {} bytes is too short to look for",
            bytes.len()
        );
        forms.push((
            "base64url",
            core.replace('+', "-").replace('/', "_").into_bytes(),
        ));
        forms.push(("base64", core.into_bytes()));
    }
    forms
}

/// Whether `haystack` holds any form of `secret` ([`binary_forms`]); the form found, if any.
pub fn holds_secret(haystack: &[u8], secret: &[u8]) -> Option<&'static str> {
    binary_forms(secret)
        .into_iter()
        .find(|(_, form)| contains(haystack, form))
        .map(|(name, _)| name)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Starts `cmd`, writes `stdin` (or gives it /dev/null), collects stdout and stderr, and kills it
/// after [`DEFAULT_TIMEOUT`]. No secret check: for commands other than keyhold (openssl, …).
pub fn run_command(cmd: Command, stdin: Option<&[u8]>) -> Output {
    run_command_timeout(cmd, stdin, DEFAULT_TIMEOUT)
}

/// As [`run_command`], with this timeout: past it the child is killed and the test fails, naming
/// the command line.
pub fn run_command_timeout(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let line = command_line(&cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    match stdin {
        Some(_) => cmd.stdin(Stdio::piped()),
        None => cmd.stdin(Stdio::null()),
    };
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        // A process that exits before reading all its input gives EPIPE here: that is fine.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{line}`: expected it to finish within {timeout:?}, it hung (killed)");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        status,
        stdout: out_t.join().expect("stdout reader"),
        stderr: err_t.join().expect("stderr reader"),
    }
}

fn preview(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.len() <= 4000 => s.to_owned(),
        _ => format!(
            "<{} bytes, first 64 as hex: {}>",
            bytes.len(),
            keyhold::hex::encode(&bytes[..bytes.len().min(64)])
        ),
    }
}

/// A readable dump of an Output for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ({} bytes) ---\n{}\n--- stderr ---\n{}",
        out.status,
        out.stdout.len(),
        preview(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout_str(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr never leaks the test passphrase and never shows a panic.
pub fn assert_clean_stderr(out: &Output, ctx: &str) {
    let err = stderr(out);
    assert!(
        !err.contains(PASS),
        "{ctx}: expected stderr never to contain the passphrase\n{}",
        show(out)
    );
    assert!(
        !err.contains("panicked"),
        "{ctx}: expected a clean error, not a panic\n{}",
        show(out)
    );
}

pub fn assert_ok(out: &Output, ctx: &str) {
    assert!(
        out.status.success(),
        "{ctx}: expected exit 0\n{}",
        show(out)
    );
    assert_clean_stderr(out, ctx);
}

/// Exact exit code, stderr containing `needle`, `keyhold: ` first (except for clap's usage
/// errors, exit 2), no passphrase, no panic.
pub fn assert_fail(out: &Output, code: i32, needle: &str, ctx: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{ctx}: expected exit {code} with stderr containing {needle:?}\n{}",
        show(out)
    );
    let err = stderr(out);
    assert!(
        err.contains(needle),
        "{ctx}: expected stderr to contain {needle:?}\n{}",
        show(out)
    );
    assert_clean_stderr(out, ctx);
    if code != 2 {
        assert!(
            err.lines().any(|l| l.starts_with("keyhold: ")),
            "{ctx}: expected the error message to start with `keyhold: `\n{}",
            show(out)
        );
    }
}

/// The documented exit `code`, an error message on stderr, no passphrase, no panic.
pub fn assert_clean_failure(out: &Output, code: i32, ctx: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{ctx}: expected exit {code} (docs/cli.md)\n{}",
        show(out)
    );
    assert!(
        !out.stderr.is_empty(),
        "{ctx}: expected an error message on stderr\n{}",
        show(out)
    );
    assert_clean_stderr(out, ctx);
}

/// The ID printed by `key create`: one non-empty token, then exactly one newline.
pub fn parse_id_line(stdout: &[u8], ctx: &str) -> String {
    let s = std::str::from_utf8(stdout).expect("key ID is UTF-8");
    let id = s
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{ctx}: expected the ID followed by a newline, got {s:?}"));
    assert!(
        !id.is_empty() && !id.chars().any(char::is_whitespace),
        "{ctx}: expected stdout to be the key ID alone plus a newline, got {s:?}"
    );
    id.to_owned()
}

/// The JSON document `out` holds (a whole document, nothing after it).
pub fn parse_json(out: &[u8], ctx: &str) -> serde_json::Value {
    serde_json::from_slice(out).unwrap_or_else(|e| {
        panic!(
            "{ctx}: expected valid JSON ({e}), got {:?}",
            String::from_utf8_lossy(out)
        )
    })
}

/// The names of an object's members, sorted; panics if `v` is not an object.
pub fn json_keys(v: &serde_json::Value, ctx: &str) -> Vec<String> {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: expected a JSON object, got {v}"));
    let mut keys: Vec<String> = obj.keys().cloned().collect();
    keys.sort();
    keys
}

/// Runs openssl; returns its Output (not asserted).
pub fn openssl(args: &[&str]) -> Output {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    run_command(cmd, None)
}

/// Runs openssl and asserts it succeeded.
pub fn openssl_ok(args: &[&str], ctx: &str) -> Vec<u8> {
    let out = openssl(args);
    assert!(
        out.status.success(),
        "{ctx}: expected `openssl {}` to succeed\n{}",
        args.join(" "),
        show(&out)
    );
    out.stdout
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Unpadded URL-safe base64 (JWK members, RFC 7518).
pub fn b64url(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap_or_else(|e| panic!("not unpadded base64url ({e}): {s:?}"))
}

/// Padded standard base64.
pub fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("not padded base64 ({e}): {s:?}"))
}

/// The DER bytes inside a PEM block.
pub fn pem_body(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    b64(&body)
}

/// r‖s (fixed width) → DER ECDSA-Sig-Value, to hand raw signatures to openssl. keyhold's own
/// encoder is private to its hardware backends; this one is the tests' (a wrong one here makes
/// openssl refuse, it cannot hide a fault).
pub fn raw_ecdsa_to_der(raw: &[u8]) -> Vec<u8> {
    fn int(bytes: &[u8]) -> Vec<u8> {
        let mut b: Vec<u8> = bytes.iter().copied().skip_while(|&x| x == 0).collect();
        if b.is_empty() || b[0] & 0x80 != 0 {
            b.insert(0, 0);
        }
        let mut out = vec![0x02, u8::try_from(b.len()).expect("short integer")];
        out.extend(b);
        out
    }
    assert!(raw.len() % 2 == 0, "r‖s has an even length: {}", raw.len());
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut body = int(r);
    body.extend(int(s));
    let len = u8::try_from(body.len()).expect("an ECDSA signature is short");
    let mut out = vec![0x30];
    if len >= 0x80 {
        out.push(0x81);
    }
    out.push(len);
    out.extend(body);
    out
}

pub fn flip(data: &[u8], pos: usize) -> Vec<u8> {
    let mut v = data.to_vec();
    v[pos] ^= 0x01;
    v
}

pub fn is_lower_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A configuration whose backend `hsm` is the PKCS#11 token `label` (a TOML string's contents)
/// of `module`, its PIN read from `$KH_TEST_PIN`; then the lines `extra`.
pub fn hsm_config(module: &str, label: &str, extra: &str) -> String {
    format!(
        "[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"{module}\"\ntoken_label = \"{label}\"\n\
         pin_env = \"KH_TEST_PIN\"\n{extra}"
    )
}

/// The members of a key object (docs/cli.md, `--json`), sorted.
pub const KEY_FIELDS: [&str; 21] = [
    "activate_at",
    "algorithm",
    "attributes",
    "backend",
    "created",
    "deactivate_at",
    "destroy_at",
    "destroyed_at",
    "fallback",
    "id",
    "locator",
    "min_decrypt_version",
    "name",
    "namespace",
    "purpose",
    "rotate_after_secs",
    "state",
    "store_id",
    "type",
    "version",
    "versions",
];

/// The members of a key object that are an RFC 3339 time or null.
const KEY_TIMES: [&str; 4] = ["activate_at", "deactivate_at", "destroy_at", "destroyed_at"];

/// A key object has exactly the documented members, each of its type; its `attributes` are those
/// `key show` lists for the key (`show_text`: its output); `fallback` is null, or for a key made
/// in software in place of backend `fallback_for`, exactly `for` (that backend) and `reason`.
pub fn assert_key_object(
    v: &serde_json::Value,
    show_text: &str,
    fallback_for: Option<&str>,
    ctx: &str,
) {
    assert_eq!(json_keys(v, ctx), KEY_FIELDS, "{ctx}: the members of {v}");
    // Every member but these is a string.
    let not_strings = [
        "attributes",
        "fallback",
        "version",
        "versions",
        "min_decrypt_version",
        "rotate_after_secs",
    ];
    for f in KEY_FIELDS
        .iter()
        .filter(|f| !not_strings.contains(f) && !KEY_TIMES.contains(f))
    {
        assert!(v[f].is_string(), "{ctx}: `{f}` is a string in {v}");
    }
    assert!(v["version"].is_u64(), "{ctx}: `version` is a number in {v}");
    assert!(
        v["min_decrypt_version"].is_u64(),
        "{ctx}: `min_decrypt_version` is a number in {v}"
    );
    assert!(
        v["rotate_after_secs"].is_null() || v["rotate_after_secs"].is_u64(),
        "{ctx}: `rotate_after_secs` is a number or null in {v}"
    );
    for f in KEY_TIMES {
        assert!(
            v[f].is_null()
                || v[f]
                    .as_str()
                    .is_some_and(|t| t.len() == 20 && t.ends_with('Z')),
            "{ctx}: `{f}` is an RFC 3339 UTC time or null in {v}"
        );
    }
    let versions = v["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("{ctx}: `versions` is an array in {v}"));
    for (i, version) in versions.iter().enumerate() {
        assert_eq!(
            json_keys(version, ctx),
            ["created", "locator", "version"],
            "{ctx}: a version in {v}"
        );
        assert_eq!(
            version["version"].as_u64(),
            Some(i as u64 + 1),
            "{ctx}: {v}"
        );
    }
    let created = v["created"].as_str().unwrap_or_default();
    assert!(
        created.len() == 20
            && created.ends_with('Z')
            && created.as_bytes()[10] == b'T'
            && created
                .bytes()
                .enumerate()
                .all(|(i, b)| matches!(i, 4 | 7 | 10 | 13 | 16 | 19) || b.is_ascii_digit()),
        "{ctx}: `created` is an RFC 3339 UTC time (YYYY-MM-DDTHH:MM:SSZ): {created:?}"
    );
    let attributes = v["attributes"]
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: `attributes` is an object in {v}"));
    // key show lists them one `attribute NAME: VALUE` line each.
    let from_json: std::collections::BTreeMap<String, String> = attributes
        .iter()
        .map(|(k, v)| {
            let v = v
                .as_str()
                .unwrap_or_else(|| panic!("{ctx}: attribute `{k}` is a string in {v}"));
            (k.clone(), v.to_owned())
        })
        .collect();
    assert_eq!(
        from_json,
        super::attribute_map(show_text),
        "{ctx}: the attributes are key show's"
    );
    match fallback_for {
        None => assert!(
            v["fallback"].is_null(),
            "{ctx}: `fallback` is null for a key made where it was asked for: {v}"
        ),
        Some(backend) => {
            let fallback = &v["fallback"];
            assert_eq!(json_keys(fallback, ctx), ["for", "reason"], "{ctx}: {v}");
            assert_eq!(fallback["for"], backend, "{ctx}: {v}");
            assert!(
                fallback["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{ctx}: `reason` is a non-empty string in {v}"
            );
        }
    }
}

/// A SoftHSM2 fixture token whose user PIN is changed to `pin` with OpenSC's pkcs11-tool: for
/// tests that look for the PIN in outputs (the fixture's `1234` is too short to look for).
#[cfg(feature = "pkcs11")]
pub fn softhsm_with_pin(pin: &str) -> keyhold::testing::SoftHsm {
    use keyhold::testing::{SoftHsm, SOFTHSM_MODULE, TEST_USER_PIN};
    let hsm = SoftHsm::new().expect("a SoftHSM2 fixture token");
    let tool = require_tool("pkcs11-tool", "OpenSC: it changes the token's PIN");
    let mut change = Command::new(tool);
    change
        .args(["--module", SOFTHSM_MODULE, "--token-label", hsm.label()])
        .args([
            "--login",
            "--pin",
            TEST_USER_PIN,
            "--change-pin",
            "--new-pin",
            pin,
        ])
        .env(
            "SOFTHSM2_CONF",
            SoftHsm::conf_file().expect("SOFTHSM2_CONF"),
        );
    let out = run_command(change, None);
    assert!(
        out.status.success(),
        "pkcs11-tool --change-pin\n{}",
        show(&out)
    );
    hsm
}

/// A crash between a change's commit and its counter's increment, twice in a row (the fault
/// point ends `key rotate` there): the next command brings the counter up to the store (logged
/// with `-v`) and both rotations are in; the command after it finds store and counter in step.
#[allow(dead_code)] // used by the counter tests only
pub fn crashes_before_the_counter_are_repaired(env: &Env, id: &str) {
    for round in 0..2 {
        let out = env.run_vars(
            &[(keyhold::testing::FAULT_VAR, "after-commit-before-counter")],
            &["key", "rotate", "--key", id],
        );
        assert!(
            !out.status.success(),
            "round {round}: the fault point ended the process"
        );
    }
    let out = env.run(&["-v", "key", "show", "--key", id], b"");
    assert_ok(&out, "the next command");
    assert!(
        stderr(&out).contains("one change ahead of its counter"),
        "{}",
        stderr(&out)
    );
    let shown = String::from_utf8(out.stdout).unwrap_or_default();
    assert!(
        shown.contains("version: 3"),
        "both rotations are in: {shown}"
    );
    let out = env.run(&["-v", "key", "show", "--key", id], b"");
    assert_ok(&out, "again");
    assert!(
        !stderr(&out).contains("one change ahead"),
        "{}",
        stderr(&out)
    );
}

/// Starts `cmd`, SIGKILLs it after `delay` (if given) if it is still running; its exit code if it
/// ended by itself (`None` when killed), its stdout and its stderr.
pub fn run_killed_after(
    mut cmd: Command,
    delay: Option<Duration>,
) -> (Option<i32>, Vec<u8>, String) {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child: std::process::Child = cmd.spawn().unwrap();
    let deadline = delay.map(|d| std::time::Instant::now() + d);
    let killed = loop {
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            child.kill().unwrap();
            break true;
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let out = child.wait_with_output().unwrap();
    let code = if killed { None } else { out.status.code() };
    (
        code,
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
