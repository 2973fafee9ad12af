//! [`SoftHsm`]: SoftHSM2 tokens for tests (the `pkcs11` feature).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use secrecy::SecretString;

use super::config_with;
use crate::config::{BackendConfig, Config, Fallback, Pkcs11Config};
use crate::error::{Error, Result};

/// Where Debian (and most distributions) install SoftHSM2's module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The user PIN of every fixture token. Test tokens only: never a real PIN.
pub const TEST_USER_PIN: &str = "1234";
/// The SO PIN of every fixture token.
pub const TEST_SO_PIN: &str = "5678";

static HOME: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
static TOKEN_INIT: Mutex<()> = Mutex::new(());

fn fixture_error(what: impl std::fmt::Display) -> Error {
    Error::Config(format!("SoftHSM test fixture: {what}"))
}

/// The process's SoftHSM directory (config file and tokens), made on first use.
fn home() -> Result<&'static Path> {
    let home = HOME.get_or_init(|| {
        let base = std::env::temp_dir();
        remove_stale_homes(&base);
        let dir = base.join(format!("keyhold-softhsm-{}", std::process::id()));
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens)
            .map_err(|e| format!("create {}: {e}", tokens.display()))?;
        let conf = dir.join("softhsm2.conf");
        let text = format!(
            "# keyhold::testing::SoftHsm, process {}\ndirectories.tokendir = {}\n\
             objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            std::process::id(),
            tokens.display()
        );
        std::fs::write(&conf, text).map_err(|e| format!("write {}: {e}", conf.display()))?;
        // Set before the module is first loaded: SoftHSM reads it in C_Initialize, and from the
        // environment only (no C_Initialize argument names a configuration). This runs once per
        // process, under `TOKEN_INIT`: no two fixtures write it. It is still a write to the
        // environment while other threads may run (the test harness's), which races with a
        // C-level getenv in one of them; see the module docs (`testing.rs`) for what that means
        // under `cargo test` and how to avoid it.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        Ok(dir)
    });
    home.as_deref().map_err(fixture_error)
}

/// Removes the directories of fixture processes that have exited.
fn remove_stale_homes(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("keyhold-softhsm-"))
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A user-PIN state no SoftHSM2 token can be brought into (SoftHSM2 never locks a PIN), which a
/// fixture token can be made to report to keyhold: see [`SoftHsm::report_pin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinFault {
    /// `CKF_USER_PIN_FINAL_TRY`: one more wrong PIN would lock it.
    FinalTry,
    /// `CKF_USER_PIN_LOCKED`.
    Locked,
}

/// A fresh SoftHSM2 token, initialised with [`TEST_USER_PIN`] and [`TEST_SO_PIN`], deleted on drop.
#[derive(Debug)]
pub struct SoftHsm {
    label: String,
    pin_file: PathBuf,
}

impl SoftHsm {
    /// Initialises a new token with a unique label.
    ///
    /// # Errors
    /// [`Error::Config`] or [`Error::BackendUnavailable`] if SoftHSM2 is not installed or the
    /// token cannot be initialised.
    pub fn new() -> Result<Self> {
        let mut suffix = [0u8; 6];
        aws_lc_rs::rand::fill(&mut suffix).map_err(|_| Error::crypto("random label"))?;
        Self::with_label(&format!("keyhold-test-{}", crate::hex::encode(&suffix)))
    }

    /// Initialises a new token labelled `label` (at most 32 bytes, any bytes: tests of how
    /// keyhold shows hostile labels). A label with a NUL cannot be named to `softhsm2-util`, so
    /// such a token is not deleted on drop; it goes with the process's token directory, which
    /// the next fixture process removes.
    ///
    /// # Errors
    /// As [`SoftHsm::new`].
    pub fn with_label(label: &str) -> Result<Self> {
        let _one_at_a_time = TOKEN_INIT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let home = home()?;
        crate::backend::pkcs11::init_token(
            Path::new(SOFTHSM_MODULE),
            label,
            &SecretString::from(TEST_SO_PIN.to_owned()),
            &SecretString::from(TEST_USER_PIN.to_owned()),
        )?;
        let mut name = [0u8; 6];
        aws_lc_rs::rand::fill(&mut name).map_err(|_| Error::crypto("random file name"))?;
        let pin_file = home.join(format!("{}.pin", crate::hex::encode(&name)));
        std::fs::write(&pin_file, TEST_USER_PIN)
            .map_err(|e| fixture_error(format!("write {}: {e}", pin_file.display())))?;
        Ok(Self {
            label: label.to_owned(),
            pin_file,
        })
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The `SOFTHSM2_CONF` file this process uses.
    ///
    /// # Errors
    /// As [`SoftHsm::new`].
    pub fn conf_file() -> Result<PathBuf> {
        Ok(home()?.join("softhsm2.conf"))
    }

    /// A backend configuration for this token (PIN from a file; fallback refused).
    pub fn backend_config(&self) -> Pkcs11Config {
        token_config(SOFTHSM_MODULE, &self.label, &self.pin_file)
    }

    /// A whole configuration with this token as the backend `name`.
    pub fn config(&self, name: &str) -> Config {
        config_with(name, BackendConfig::Pkcs11(self.backend_config()))
    }

    /// From now on keyhold, in this process, reads this token's info with `fault`'s flag set as
    /// well (`None`: as the token reports it). Only keyhold's reading of `C_GetTokenInfo` is
    /// changed, nothing on the token: the PIN still works, and other PKCS#11 users see nothing.
    /// This is fault injection for what real tokens do and SoftHSM2 cannot be made to do (report
    /// a PIN on its final try, or locked); it ends when the fixture is dropped.
    pub fn report_pin(&self, fault: Option<PinFault>) {
        let flags = match fault {
            None => 0,
            Some(PinFault::FinalTry) => cryptoki_sys::CKF_USER_PIN_FINAL_TRY,
            Some(PinFault::Locked) => cryptoki_sys::CKF_USER_PIN_LOCKED,
        };
        crate::backend::pkcs11::fault::add_token_flags(&self.label, flags);
    }

    /// Makes a token with this fixture's label and PINs again, in the module's free slot: after
    /// [`SoftHsm::delete_token`], a token that comes back in this process (blank, as a wiped or
    /// replacement device does). The keys cannot come back with it: SoftHSM2 never takes back a
    /// token whose files went away while the process ran (that slot stays invalid until the
    /// process ends; returned files are not read again), and a new token's objects are encrypted
    /// under a key of its own.
    ///
    /// # Errors
    /// As [`SoftHsm::new`].
    pub fn init_again(&self) -> Result<()> {
        let _one_at_a_time = TOKEN_INIT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::backend::pkcs11::init_token(
            Path::new(SOFTHSM_MODULE),
            &self.label,
            &SecretString::from(TEST_SO_PIN.to_owned()),
            &SecretString::from(TEST_USER_PIN.to_owned()),
        )
    }

    /// Deletes the token now, as `softhsm2-util --delete-token` does (for token-loss tests).
    ///
    /// # Errors
    /// [`Error::Config`] if `softhsm2-util` fails.
    pub fn delete_token(&self) -> Result<()> {
        let conf = Self::conf_file()?;
        let out = Command::new("softhsm2-util")
            .args(["--delete-token", "--token", &self.label])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .map_err(|e| fixture_error(format!("run softhsm2-util: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(fixture_error(format!(
                "softhsm2-util --delete-token failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

impl Drop for SoftHsm {
    fn drop(&mut self) {
        self.report_pin(None);
        let _ = self.delete_token();
        let _ = std::fs::remove_file(&self.pin_file);
    }
}

/// A configuration of the token `label` of `module`, PIN from `pin_file`, fallback refused.
pub(super) fn token_config(module: &str, label: &str, pin_file: &Path) -> Pkcs11Config {
    Pkcs11Config {
        module: PathBuf::from(module),
        token_label: Some(label.to_owned()),
        token_serial: None,
        token_uri: None,
        pin_env: None,
        pin_file: Some(pin_file.to_path_buf()),
        pin_credential: None,
        max_sessions: None,
        fallback: Fallback::Refuse,
    }
}
