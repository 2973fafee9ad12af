//! [`OpenCryptoki`]: openCryptoki's soft token, set up on first use and shared by every test.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::backend::pkcs11::Pkcs11Backend;
use crate::backend::Backend as _;
use crate::config::{BackendConfig, Config, Pkcs11Config};
use crate::error::{Error, Result};

/// Where Debian installs openCryptoki's PKCS#11 module.
pub const OPENCRYPTOKI_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so";
/// The label the soft token is initialised with (the agreed test identity).
pub const OPENCRYPTOKI_LABEL: &str = "keyhold-ock";
/// The soft token's user PIN. Test tokens only: never a real PIN.
pub const OPENCRYPTOKI_USER_PIN: &str = "12345678";
/// The soft token's SO PIN.
pub const OPENCRYPTOKI_SO_PIN: &str = "76543210";

/// The soft token's slot in the package's `/etc/opencryptoki/opencryptoki.conf`.
const SLOT: &str = "3";
/// The SO PIN a never-initialised soft token has.
const FACTORY_SO_PIN: &str = "87654321";
/// The package's tmpfiles entry (lock and data directories).
const TMPFILES: &str = "/usr/lib/tmpfiles.d/opencryptoki.conf";
/// pkcsslotd's run directory.
const RUN_DIR: &str = "/run/opencryptoki";
/// The socket clients reach pkcsslotd on.
const SLOTD_SOCKET: &str = "/run/pkcsslotd.socket";

/// Setup is done once per process; the file lock orders it between processes.
static READY: Mutex<bool> = Mutex::new(false);

fn fixture_error(what: impl std::fmt::Display) -> Error {
    Error::Config(format!("openCryptoki test fixture: {what}"))
}

/// openCryptoki's soft token (slot 3, label [`OPENCRYPTOKI_LABEL`]), ready for keyhold.
///
/// There is one soft token per machine, shared by every process. The first fixture on a machine
/// sets it up as a fresh CI machine needs: it creates openCryptoki's run, lock and data
/// directories, starts `pkcsslotd` if none runs, and initialises the token with the agreed
/// identity ([`OPENCRYPTOKI_SO_PIN`], [`OPENCRYPTOKI_USER_PIN`]) if it is not initialised; later
/// fixtures reuse it. Setup is serialised between processes by a file lock, so tests may run in
/// parallel processes (cargo-nextest).
///
/// Needs: the `opencryptoki` package (`pkcsslotd`, `pkcsconf`, the module at
/// [`OPENCRYPTOKI_MODULE`]), and root the first time (to make the directories and start the
/// daemon). A token already initialised with another label is refused, never re-initialised
/// (re-initialising destroys every object on it). Every failure is an error that says what is
/// missing: a test using this fixture fails, it is never skipped.
///
/// Fixtures share the token, so each isolates its keys: create them in [`Self::namespace`] (and
/// in stores of their own, whose IDs prefix every `CKA_ID`). On drop the fixture destroys the
/// token objects labelled in its namespace.
#[derive(Debug)]
pub struct OpenCryptoki {
    namespace: String,
    pin_file: PathBuf,
}

impl OpenCryptoki {
    /// Sets up the soft token if needed and returns a fixture with a unique namespace.
    ///
    /// # Errors
    /// [`Error::Config`] naming what is missing or failed: the package, root, the daemon, or a
    /// token initialised with another label.
    pub fn new() -> Result<Self> {
        Self::ensure_ready()?;
        let mut suffix = [0u8; 6];
        aws_lc_rs::rand::fill(&mut suffix).map_err(|_| Error::crypto("random namespace"))?;
        let tag = crate::hex::encode(&suffix);
        let pin_file = std::env::temp_dir().join(format!("keyhold-ock-{tag}.pin"));
        std::fs::write(&pin_file, OPENCRYPTOKI_USER_PIN)
            .map_err(|e| fixture_error(format!("write {}: {e}", pin_file.display())))?;
        Ok(Self {
            namespace: format!("ock-{tag}"),
            pin_file,
        })
    }

    /// Sets the token up (once per process) without making a fixture: for a test that opens
    /// the module itself and makes no keys.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn ensure_ready() -> Result<()> {
        let mut ready = READY
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !*ready {
            set_up()?;
            *ready = true;
        }
        Ok(())
    }

    /// The namespace this fixture's keys should be created in (unique per fixture).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A backend configuration for the soft token (PIN from a file; fallback refused).
    pub fn backend_config(&self) -> Pkcs11Config {
        super::softhsm::token_config(OPENCRYPTOKI_MODULE, OPENCRYPTOKI_LABEL, &self.pin_file)
    }

    /// A whole configuration with the soft token as the backend `name`.
    pub fn config(&self, name: &str) -> Config {
        super::config_with(name, BackendConfig::Pkcs11(self.backend_config()))
    }

    /// Destroys the token objects labelled in this fixture's namespace; returns how many keys.
    ///
    /// # Errors
    /// Backend errors from the token.
    pub fn destroy_objects(&self) -> Result<usize> {
        let backend = Pkcs11Backend::new("opencryptoki fixture", &self.backend_config())?;
        let prefix = format!("{}/", self.namespace);
        let mut locators: Vec<String> = backend
            .report()?
            .objects
            .unwrap_or_default()
            .into_iter()
            .filter(|o| o.label.starts_with(&prefix))
            .map(|o| o.locator)
            .collect();
        locators.dedup();
        for locator in &locators {
            backend.destroy_object(locator)?;
        }
        Ok(locators.len())
    }
}

impl Drop for OpenCryptoki {
    fn drop(&mut self) {
        if let Err(e) = self.destroy_objects() {
            tracing::warn!(namespace = %self.namespace, "could not clean up test objects: {e}");
        }
        let _ = std::fs::remove_file(&self.pin_file);
    }
}

/// Makes the directories, starts the daemon and initialises the token, as needed, holding a
/// machine-wide lock.
fn set_up() -> Result<()> {
    for needed in [
        OPENCRYPTOKI_MODULE,
        "/usr/sbin/pkcsslotd",
        "/usr/sbin/pkcsconf",
    ] {
        if !Path::new(needed).exists() {
            return Err(fixture_error(format!(
                "{needed} is missing: install the `opencryptoki` package"
            )));
        }
    }
    let _lock = lock()?;
    make_directories()?;
    if !daemon_serving() {
        // Whatever is there serves nobody: a daemon whose socket a second daemon took with it
        // when it exited, a socket left by a daemon that died, or nothing at all. Start afresh.
        need_root("start pkcsslotd")?;
        let _ = Command::new("pkill").args(["-x", "pkcsslotd"]).status();
        let _ = std::fs::remove_file(SLOTD_SOCKET);
        // It daemonises: its output is not waited for (the daemon would hold a pipe open).
        let status = Command::new("pkcsslotd")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| fixture_error(format!("run pkcsslotd: {e}")))?;
        if !status.success() {
            return Err(fixture_error(format!(
                "pkcsslotd failed to start ({status}); run it by hand to see why"
            )));
        }
        // The daemon's child makes the socket after the parent returns.
        let serving = (0..100).any(|_| {
            daemon_serving() || {
                std::thread::sleep(std::time::Duration::from_millis(100));
                false
            }
        });
        if !serving {
            return Err(fixture_error(format!(
                "pkcsslotd started but did not stay up with its socket {SLOTD_SOCKET} for 10 s"
            )));
        }
    }
    let token = token_state()?;
    if !token.initialized {
        need_root("initialise the soft token")?;
        run(
            "pkcsconf",
            &["-I", "-c", SLOT],
            &format!("{FACTORY_SO_PIN}\n{OPENCRYPTOKI_LABEL}\n"),
        )?;
        run(
            "pkcsconf",
            &["-P", "-c", SLOT],
            &format!("{FACTORY_SO_PIN}\n{OPENCRYPTOKI_SO_PIN}\n{OPENCRYPTOKI_SO_PIN}\n"),
        )?;
    } else if token.label != OPENCRYPTOKI_LABEL {
        return Err(fixture_error(format!(
            "the soft token (slot {SLOT}) is initialised as `{}`, not `{OPENCRYPTOKI_LABEL}`: \
             re-initialising it would destroy its objects, so the fixture will not (see \
             hsm-config/opencryptoki.toml for a fresh token)",
            token.label.escape_default()
        )));
    }
    let token = token_state()?;
    if !token.user_pin_initialized {
        // C_InitPIN as SO sets the user PIN and, in 3.8.1, clears USER_PIN_TO_BE_CHANGED. (A
        // later C_SetPIN to 12345678 is refused with CKR_PIN_INVALID: it is openCryptoki's
        // default user PIN, so the user PIN cannot be changed to it, only set.)
        run(
            "pkcsconf",
            &["-u", "-c", SLOT],
            &format!("{OPENCRYPTOKI_SO_PIN}\n{OPENCRYPTOKI_USER_PIN}\n{OPENCRYPTOKI_USER_PIN}\n"),
        )?;
    }
    let token = token_state()?;
    if !(token.initialized && token.user_pin_initialized && !token.user_pin_to_be_changed) {
        return Err(fixture_error(format!(
            "the soft token is not ready after setup: {token:?}"
        )));
    }
    Ok(())
}

/// An exclusive lock on a file every fixture process uses, held until dropped.
fn lock() -> Result<File> {
    let dir = if Path::new("/run/lock").is_dir() {
        PathBuf::from("/run/lock")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join("keyhold-opencryptoki-fixture.lock");
    // flock needs no write access: another user's lock file (made by a root run) opens read-only.
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| fixture_error(format!("create {}: {e}", path.display())))?,
        Err(e) => return Err(fixture_error(format!("open {}: {e}", path.display()))),
    };
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| fixture_error(format!("lock {}: {e}", path.display())))?;
    Ok(file)
}

fn need_root(to: &str) -> Result<()> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(fixture_error(format!(
            "must run as root to {to} (the first openCryptoki fixture on a machine sets it up)"
        )))
    }
}

/// `/run/opencryptoki` (root:pkcs11, 0770) and the package's tmpfiles directories.
fn make_directories() -> Result<()> {
    let gid = pkcs11_gid()?;
    let run_dir = Path::new(RUN_DIR);
    let ok = std::fs::metadata(run_dir).is_ok_and(|m| {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        m.is_dir() && m.gid() == gid && m.permissions().mode() & 0o7777 == 0o770
    });
    if !ok {
        need_root(&format!("create {RUN_DIR}"))?;
        make_dir(run_dir, 0o770, gid)?;
    }
    let tmpfiles = std::fs::read_to_string(TMPFILES)
        .map_err(|e| fixture_error(format!("read {TMPFILES}: {e} (is opencryptoki installed?)")))?;
    let entries: Vec<(PathBuf, u32)> = tmpfiles
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some("d")).then_some(())?;
            let path = PathBuf::from(fields.next()?);
            let mode = u32::from_str_radix(fields.next()?, 8).ok()?;
            Some((path, mode))
        })
        .collect();
    if entries.iter().all(|(path, _)| path.is_dir()) {
        return Ok(());
    }
    need_root("create openCryptoki's lock and data directories")?;
    if Path::new("/usr/bin/systemd-tmpfiles").exists()
        || Path::new("/bin/systemd-tmpfiles").exists()
    {
        run("systemd-tmpfiles", &["--create", TMPFILES], "").map(drop)
    } else {
        for (path, mode) in &entries {
            make_dir(path, *mode, gid)?;
        }
        Ok(())
    }
}

fn make_dir(path: &Path, mode: u32, gid: u32) -> Result<()> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        fixture_error(format!("{what} {}: {e}", path.display()))
    };
    std::fs::create_dir_all(path).map_err(|e| failed("create", &e))?;
    rustix::fs::chown(
        path,
        Some(rustix::process::Uid::ROOT),
        Some(rustix::process::Gid::from_raw(gid)),
    )
    .map_err(|e| failed("chown root:pkcs11", &e))?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode)).map_err(|e| failed("chmod", &e))
}

/// The `pkcs11` group's ID, from `/etc/group` (the package creates the group).
fn pkcs11_gid() -> Result<u32> {
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| fixture_error(format!("read /etc/group: {e}")))?;
    groups
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some("pkcs11")).then_some(())?;
            fields.nth(1)?.parse().ok()
        })
        .ok_or_else(|| fixture_error("no `pkcs11` group: install the `opencryptoki` package"))
}

/// Whether a live slot daemon has its socket: what every client needs. A process listing alone
/// cannot tell (a daemon whose socket a second daemon took away; a zombie, where nothing reaps
/// it), and trying the socket must not be the test: pkcsslotd 3.8 exits when a client connects
/// and closes without speaking its protocol (seen on Debian 12).
fn daemon_serving() -> bool {
    daemon_alive() && Path::new(SLOTD_SOCKET).exists()
}

/// A `pkcsslotd` process that is not a zombie.
fn daemon_alive() -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        // `/proc/PID/stat` is `PID (comm) STATE …`.
        std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|stat| {
            stat.split_once(" (pkcsslotd) ")
                .is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X']))
        })
    })
}

/// What `pkcsconf -t` says about the soft token.
#[derive(Debug, Default)]
struct TokenState {
    label: String,
    initialized: bool,
    user_pin_initialized: bool,
    user_pin_to_be_changed: bool,
}

fn token_state() -> Result<TokenState> {
    // With other processes using the token, openCryptoki 3.8.1's pkcsconf now and then sees
    // "C_GetSlotList returned 0 slots" for a moment: a read-only query is asked again.
    let mut attempt = 0;
    let out = loop {
        attempt += 1;
        match run("pkcsconf", &["-t", "-c", SLOT], "") {
            Ok(out) => break out,
            Err(_) if attempt < 5 => std::thread::sleep(std::time::Duration::from_millis(200)),
            Err(e) => {
                return Err(fixture_error(format!(
                    "{e} (pkcsslotd runs, but is it the one listening on /run/pkcsslotd.socket? \
                     a second slot daemon started elsewhere replaces that socket)"
                )))
            }
        }
    };
    let mut state = TokenState::default();
    for line in out.lines().map(str::trim) {
        if let Some(label) = line.strip_prefix("Label:") {
            state.label = label.trim().to_owned();
        } else if let Some(flags) = line.strip_prefix("Flags:") {
            let has = |flag: &str| flags.split(['(', '|', ')']).any(|f| f.trim() == flag);
            state.initialized = has("TOKEN_INITIALIZED");
            state.user_pin_initialized = has("USER_PIN_INITIALIZED");
            state.user_pin_to_be_changed = has("USER_PIN_TO_BE_CHANGED");
        }
    }
    Ok(state)
}

/// Runs `program` with `input` on stdin (PINs never go on the command line); its stdout.
fn run(program: &str, args: &[&str], input: &str) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fixture_error(format!("run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A program that reads less than it was given closes the pipe: not an error by itself.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fixture_error(format!("wait for {program}: {e}")))?;
    // pkcsconf reports a refused PKCS#11 call ("Error setting PIN: 0xA1 (CKR_PIN_INVALID)") and
    // still exits 0.
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let refused = |text: &str| text.contains("Error") || text.contains("CKR_");
    if !out.status.success() || refused(&stderr) || refused(&stdout) {
        return Err(fixture_error(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            format!("{stdout}{stderr}").trim()
        )));
    }
    Ok(stdout)
}
