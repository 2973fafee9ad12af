//! Test fixtures for your own CI: real emulators, set up and torn down for you.
//!
//! Enabled by the `testing` feature; the token fixtures ([`SoftHsm`], [`OpenCryptoki`]) need the
//! `pkcs11` feature as well, [`Swtpm`] the `tpm` feature. [`SoftHsm`] makes a fresh, initialised SoftHSM2 token and gives
//! you a keyhold backend configuration for it:
//!
//! ```no_run
//! # fn main() -> Result<(), keyhold::Error> {
//! use keyhold::testing::SoftHsm;
//! let hsm = SoftHsm::new()?;                  // a new token, deleted on drop
//! let config = hsm.config("hsm");             // [backends.hsm] pointing at it
//! // Keystore::create_with(dir, &sealer, &config)?, then create keys with backend "hsm".
//! # Ok(())
//! # }
//! ```
//!
//! [`OpenCryptoki`] does the same for openCryptoki's soft token, a second PKCS#11 implementation:
//! one token per machine, set up by the first fixture (root and the `opencryptoki` package needed),
//! shared by every test, each fixture isolated by its own namespace and store.
//!
//! SoftHSM2 reads its configuration once, when the module is initialised, so every `SoftHsm` in a
//! process shares one token directory (made on first use, `SOFTHSM2_CONF` pointing at it) and gets
//! its own token in it, labelled uniquely. Create fixtures before opening keystores on other
//! SoftHSM configurations in the same process. Fixtures in parallel threads share that directory
//! safely (each has its own token and label).
//!
//! One caveat for threads: SoftHSM2 takes its configuration from the environment only, so the
//! first `SoftHsm` of a process sets `SOFTHSM2_CONF` with `std::env::set_var` (once per process,
//! under a lock). Rust code reading the environment takes the same lock, but C code in another
//! thread calling `getenv` at that moment (a PKCS#11 module's or TPM library's initialisation, for
//! instance) does not: a data race, the reason `set_var` is `unsafe` in Rust 2024. With
//! cargo-nextest (a process per test) no other test's threads run beside it, so there is none as
//! long as a test makes its first `SoftHsm` before starting threads of its own; under `cargo
//! test`, other tests' threads run meanwhile and there can be. There, run with
//! `--test-threads=1`, or use cargo-nextest.

#[cfg(feature = "pkcs11")]
mod opencryptoki;
#[cfg(feature = "pkcs11")]
mod softhsm;

#[cfg(feature = "tpm")]
pub use crate::backend::tpm::fixture::Swtpm;
#[cfg(any(feature = "pkcs11", feature = "tpm"))]
use crate::config::{BackendConfig, Config};
#[cfg(feature = "pkcs11")]
pub use opencryptoki::{
    OpenCryptoki, OPENCRYPTOKI_LABEL, OPENCRYPTOKI_MODULE, OPENCRYPTOKI_SO_PIN,
    OPENCRYPTOKI_USER_PIN,
};
#[cfg(feature = "pkcs11")]
pub use softhsm::{PinFault, SoftHsm, SOFTHSM_MODULE, TEST_SO_PIN, TEST_USER_PIN};

/// A whole configuration with `backend` as the backend `name`.
#[cfg(any(feature = "pkcs11", feature = "tpm"))]
fn config_with(name: &str, backend: BackendConfig) -> Config {
    let mut config = Config::default();
    config.backends.insert(name.to_owned(), backend);
    config
}

#[cfg(feature = "tpm")]
impl Swtpm {
    /// A whole configuration with this TPM as the backend `name` (fallback refused).
    pub fn config(&self, name: &str) -> Config {
        config_with(
            name,
            BackendConfig::Tpm(crate::config::TpmConfig::with_tcti(self.tcti())),
        )
    }
}

/// What [`reveal_software_key`] gives: secrets a test looks for where they must never be.
#[derive(Debug)]
pub struct Revealed {
    /// The store's root secret.
    pub root: crate::secret::SecretBytes,
    /// The key's material as the software backend seals it: 32 raw bytes for AES and HMAC keys,
    /// PKCS#8 DER for key pairs.
    pub material: crate::secret::SecretBytes,
}

/// The root secret of the passphrase store in `dir` and the material of its software key `id`
/// (current version): for tests that look for key material in outputs, logs and files (a canary).
/// It needs what anyone who can read the key needs anyway (the store and its passphrase); it is
/// here, in the `testing` feature only, so that no production build has it. Never enable
/// `testing` in a build you ship.
///
/// # Errors
/// As [`crate::Keystore::open`]; [`crate::Error::InvalidInput`] for a key of another backend.
pub fn reveal_software_key(
    dir: &std::path::Path,
    passphrase: &str,
    id: &str,
) -> crate::Result<Revealed> {
    let sealer =
        crate::sealer::PassphraseSealer::new(secrecy::SecretString::from(passphrase.to_owned()));
    let (root, material) = crate::keystore::Keystore::reveal_software_key(dir, &sealer, id)?;
    Ok(Revealed { root, material })
}

/// The variable that names a fault point at which a process ends at once, as if killed there:
/// `fault_point`. For crash tests of orderings a random kill rarely hits (a change committed to
/// the store, its counter not yet advanced).
pub const FAULT_VAR: &str = "KEYHOLD_TEST_FAULT";

/// With [`FAULT_VAR`] = `pause-POINT`, the file this variable names is created when the process
/// reaches POINT, which then waits two seconds: another process can act at that very point.
pub const FAULT_MARK_VAR: &str = "KEYHOLD_TEST_FAULT_MARK";

/// Ends the process at once (no destructors, no flushing) when [`FAULT_VAR`] names `point`; with
/// `pause-` before `point`, says so in [`FAULT_MARK_VAR`]'s file and waits two seconds.
pub(crate) fn fault_point(point: &str) {
    let Some(fault) = std::env::var_os(FAULT_VAR) else {
        return;
    };
    if fault == point {
        std::process::abort();
    }
    if fault.to_str().and_then(|f| f.strip_prefix("pause-")) == Some(point) {
        if let Some(mark) = std::env::var_os(FAULT_MARK_VAR) {
            let _ = std::fs::write(mark, point);
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}
