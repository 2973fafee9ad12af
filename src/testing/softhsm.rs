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
        // Set before the module is first loaded: SoftHSM reads it in C_Initialize. Fixtures are
        // made under `TOKEN_INIT`, and this runs once.
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
