//! The backend configuration: a TOML file with one table per backend instance.
//!
//! ```toml
//! [backends.hsm]
//! type = "pkcs11"
//! module = "/usr/lib/softhsm/libsofthsm2.so"
//! token_label = "keyhold"
//! pin_env = "KEYHOLD_HSM_PIN"
//! ```
//!
//! Secrets never live in this file: PINs come from an environment variable, a file, or a systemd
//! credential, named here. See `hsm-config/` for commented samples.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

mod backends;
mod clients;
mod locate;

pub use backends::{BackendConfig, Fallback, Pkcs11Config, TokenSelector, TpmConfig};
pub use clients::{ClientConfig, Operation};

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Backend instances by name. `software` is always present and is configured in `software`.
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    /// The built-in software backend.
    #[serde(default)]
    pub software: SoftwareConfig,
    /// The store (`[store]`).
    #[serde(default)]
    pub store: StoreConfig,
    /// The key lifecycle (`[lifecycle]`).
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// The audit log (`[audit]`).
    #[serde(default)]
    pub audit: AuditConfig,
    /// The clients of `keyhold serve`, by name (`[clients.NAME]`).
    #[serde(default)]
    pub clients: BTreeMap<String, ClientConfig>,
}

/// The key lifecycle (`[lifecycle]`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// (Optional) How many AES-GCM encryptions one key version makes before the key rotates
    /// itself: at most, and by default, 2^32 (NIST SP 800-38D §8.3 for random 96-bit nonces).
    /// Lower it to rotate sooner.
    #[serde(default)]
    pub gcm_invocation_limit: Option<u64>,
}

impl LifecycleConfig {
    /// The most AES-GCM invocations NIST SP 800-38D allows one key with random nonces.
    pub const MAX_GCM_INVOCATIONS: u64 = 1 << 32;

    /// The limit in force.
    pub fn gcm_limit(&self) -> u64 {
        self.gcm_invocation_limit
            .unwrap_or(Self::MAX_GCM_INVOCATIONS)
    }
}

/// The audit log (`[audit]`): `STORE_DIR/audit.log`, see [`crate::audit`].
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// (Optional) Record every lifecycle change and key use; default `true`. Turned off, nothing
    /// records who used which key, and `keyhold audit verify` cannot tell a gap from a quiet
    /// period: misuse of a key leaves no trace.
    #[serde(default = "AuditConfig::default_enabled")]
    pub enabled: bool,
    /// (Optional) Key uses are written in batches at least this often, in milliseconds: those of
    /// the last `flush_ms` before a crash may be missing from the log (lifecycle changes never
    /// are); 1 to 60000, default 1000.
    #[serde(
        default = "AuditConfig::default_flush_ms",
        deserialize_with = "AuditConfig::flush_ms_in_range"
    )]
    pub flush_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: Self::default_enabled(),
            flush_ms: Self::default_flush_ms(),
        }
    }
}

impl AuditConfig {
    /// The longest `flush_ms` taken: a minute of key uses is as much as may be lost.
    pub const MAX_FLUSH_MS: u64 = 60_000;

    fn default_enabled() -> bool {
        true
    }

    fn default_flush_ms() -> u64 {
        1000
    }

    /// Checked while parsing, so that the error names the line of the value.
    fn flush_ms_in_range<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<u64, D::Error> {
        let ms = u64::deserialize(d)?;
        if !(1..=Self::MAX_FLUSH_MS).contains(&ms) {
            return Err(serde::de::Error::custom(format!(
                "flush_ms must be between 1 and {} (milliseconds), not {ms}",
                Self::MAX_FLUSH_MS
            )));
        }
        Ok(ms)
    }
}

/// The store (`[store]`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// (Optional) How the store's root secret is sealed: `"passphrase"` (the default), `"tpm"` or
    /// `"pkcs11"`; `$KEYHOLD_SEALER` overrides it. The command opens a store only with the sealer
    /// stated here, never with the one the store's own files name: whoever can write those files
    /// could otherwise swap a passphrase seal for a TPM seal of a root secret they chose.
    #[serde(default)]
    pub sealer: Option<SealerKind>,
    /// (Optional) How often long-running processes (the service) verify the whole store, as
    /// `keyhold store verify` does, and log the outcome: a duration such as `"6h"`, `"1d"` or
    /// `"30m"`, at least one second; default: never.
    #[serde(default, deserialize_with = "StoreConfig::interval")]
    pub verify_interval: Option<std::time::Duration>,
    /// (Optional) Where keyhold keeps state outside the store: the anchor files that record each
    /// store's generation, so that a store put back from an older copy is refused. Default:
    /// `$XDG_STATE_HOME/keyhold`, else `~/.local/state/keyhold`. Keep it off the store's disk
    /// where you can: a copy of both together is not detected.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

impl StoreConfig {
    /// The directory of anchor files: `state_dir/anchors`, or the default.
    pub fn anchor_dir(&self) -> Option<PathBuf> {
        match &self.state_dir {
            Some(dir) => Some(dir.join("anchors")),
            None => crate::store::FileAnchor::default_dir(),
        }
    }

    /// Parsed as `keyhold` parses durations everywhere ([`crate::time::parse_duration`]), while
    /// reading, so that the error names the line of the value.
    fn interval<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<std::time::Duration>, D::Error> {
        let text = String::deserialize(d)?;
        let interval = crate::time::parse_duration(&text).map_err(serde::de::Error::custom)?;
        if interval.is_zero() {
            return Err(serde::de::Error::custom(
                "verify_interval must be at least one second (e.g. \"6h\")",
            ));
        }
        Ok(Some(interval))
    }
}

/// A kind of sealer, as the user states it.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SealerKind {
    /// Argon2id from a passphrase: the only sealer that needs the user's secret.
    #[default]
    Passphrase,
    /// A TPM sealed object.
    Tpm,
    /// A non-extractable AES key in a PKCS#11 token.
    Pkcs11,
}

impl SealerKind {
    /// The name the store records for this kind (`passphrase`, `tpm`, `pkcs11`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passphrase => "passphrase",
            Self::Tpm => "tpm",
            Self::Pkcs11 => "pkcs11",
        }
    }
}

/// The built-in software backend (`[software]`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SoftwareConfig {
    /// (Optional) Keep a loaded signing or AES-GCM key this many seconds after its last use
    /// instead of unsealing and loading it for every use; default 0 (never). Loading costs more
    /// than an ECDSA signature or an AES-GCM encryption of a kilobyte, but a kept key lives in
    /// ordinary (unlocked) memory until it expires. HMAC keys are never kept.
    #[serde(default)]
    pub key_cache_secs: u64,
}

impl Config {
    /// Parses a configuration from TOML text.
    ///
    /// # Errors
    /// [`Error::Config`] with the line and column of the offending key (or of the syntax error)
    /// and what is wrong, for syntax errors, unknown keys, wrong types and invalid settings.
    pub fn from_toml(text: &str) -> Result<Self> {
        // toml's Display quotes the offending line, which may hold a PIN someone put there: say
        // where the problem is, never what the line says.
        let config: Config = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| locate::culprit(text, span, e.message()));
            Error::Config(locate::message(text, at, e.message()))
        })?;
        config.validate().map_err(|invalid| {
            let at = locate::key_span(text, &invalid.backend, invalid.key);
            Error::Config(locate::message(text, at, &invalid.message))
        })?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    ///
    /// # Errors
    /// [`Error::Config`] if the file cannot be read or is invalid.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// The checks serde cannot make, each naming the backend and (where one key is to blame) the
    /// key, so that the message can give its line.
    fn validate(&self) -> std::result::Result<(), Invalid> {
        if let Some((name, key, message)) = clients::problems(&self.clients) {
            return Err(Invalid {
                backend: format!("clients.{name}"),
                key: Some(key),
                message: format!("clients.{name}.{key}: {message}"),
            });
        }
        if let Some(limit) = self.lifecycle.gcm_invocation_limit {
            if limit == 0 || limit > LifecycleConfig::MAX_GCM_INVOCATIONS {
                return Err(Invalid {
                    backend: "lifecycle".into(),
                    key: Some("gcm_invocation_limit"),
                    message: format!(
                        "lifecycle.gcm_invocation_limit = {limit}: give 1 to 4294967296 (2^32, \
                         the most NIST SP 800-38D allows with random nonces)"
                    ),
                });
            }
        }
        for (name, backend) in &self.backends {
            let invalid = |key: Option<&'static str>, message: String| Invalid {
                backend: name.clone(),
                key,
                message,
            };
            crate::key::validate_name("backend name", name)
                .map_err(|e| invalid(None, e.to_string()))?;
            if name == crate::backend::software::SoftwareBackend::NAME {
                return Err(invalid(
                    None,
                    "`software` is built in: give the backend another name".into(),
                ));
            }
            match backend {
                BackendConfig::Pkcs11(p) => {
                    p.token_selector().map_err(|e| {
                        let key = p.token_uri.as_ref().map(|_| "token_uri");
                        invalid(key, format!("backends.{name}: {e}"))
                    })?;
                    let sources = [
                        p.pin_env.is_some(),
                        p.pin_file.is_some(),
                        p.pin_credential.is_some(),
                    ];
                    if sources.iter().filter(|s| **s).count() != 1 {
                        return Err(invalid(
                            None,
                            format!(
                                "backends.{name}: give exactly one PIN source: pin_env, pin_file \
                                 or pin_credential (never the PIN itself)"
                            ),
                        ));
                    }
                    if p.max_sessions == Some(0) {
                        return Err(invalid(
                            Some("max_sessions"),
                            format!("backends.{name}: max_sessions must be at least 1"),
                        ));
                    }
                }
                BackendConfig::Tpm(t) => {
                    // Found here rather than when the TPM is first used, so that the message
                    // can name the line.
                    t.settings().map_err(|e| {
                        let message = match e {
                            Error::Config(m) => m,
                            other => other.to_string(),
                        };
                        let key = ["srk_handle", "max_loaded", "timeout_secs"]
                            .into_iter()
                            .find(|k| message.starts_with(k));
                        invalid(key, format!("backends.{name}: {message}"))
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// A setting found invalid after parsing: in the table of `backend`, at `key` if one key is to
/// blame (else the table).
struct Invalid {
    backend: String,
    key: Option<&'static str>,
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commented samples in hsm-config/ and tpm/ are what users copy: each must parse, and
    /// with its `[store]` line uncommented must state the sealer it documents.
    #[test]
    fn every_sample_configuration_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        for dir in ["hsm-config", "tpm"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                    continue;
                }
                let config =
                    Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(config.store.sealer, None, "{}", path.display());
                assert_eq!(config.backends.len(), 1, "{}", path.display());
                let text = std::fs::read_to_string(&path).unwrap();
                let stated = Config::from_toml(&text.replace("#sealer = ", "sealer = "))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let expected = match config.backends.values().next() {
                    Some(BackendConfig::Tpm(_)) => SealerKind::Tpm,
                    _ => SealerKind::Pkcs11,
                };
                assert_eq!(stated.store.sealer, Some(expected), "{}", path.display());
                seen += 1;
            }
        }
        assert_eq!(seen, 5, "hsm-config/ and tpm/ hold five samples");
    }

    #[test]
    fn parses_a_full_pkcs11_backend() {
        let config = Config::from_toml(
            r#"
            [backends.hsm]
            type = "pkcs11"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token_uri = "pkcs11:token=key%20hold;serial=abc;manufacturer=SoftHSM"
            pin_env = "PIN"
            max_sessions = 4
            fallback = "software"
            "#,
        )
        .unwrap();
        let BackendConfig::Pkcs11(p) = &config.backends["hsm"] else {
            panic!("a pkcs11 backend")
        };
        let selector = p.token_selector().unwrap();
        assert_eq!(selector.label.as_deref(), Some("key hold"));
        assert_eq!(selector.serial.as_deref(), Some("abc"));
        assert_eq!(p.fallback, Fallback::Software);
    }

    fn pkcs11(pin: (&str, &str)) -> Pkcs11Config {
        let text = format!(
            "[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"m\"\ntoken_label = \"t\"\n{} = \"{}\"",
            pin.0, pin.1
        );
        let config = Config::from_toml(&text).unwrap();
        let BackendConfig::Pkcs11(p) = config.backends["hsm"].clone() else {
            panic!("a pkcs11 backend")
        };
        p
    }

    #[test]
    fn pins_come_from_a_file_or_a_systemd_credential() {
        use secrecy::ExposeSecret;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pin"), "4321\nignored second line\n").unwrap();
        let file = pkcs11(("pin_file", &dir.path().join("pin").display().to_string()));
        assert_eq!(file.pin().unwrap().expose_secret(), "4321");
        let missing = pkcs11(("pin_file", "/nonexistent/pin"));
        let err = missing.pin().unwrap_err().to_string();
        assert!(
            err.contains("cannot read the PIN file /nonexistent/pin"),
            "{err}"
        );
        let var = pkcs11(("pin_env", "KEYHOLD_TEST_SURELY_UNSET_PIN_VARIABLE"));
        let err = var.pin().unwrap_err().to_string();
        assert!(
            err.contains("KEYHOLD_TEST_SURELY_UNSET_PIN_VARIABLE is not set"),
            "{err}"
        );
        // The environment is the process's, shared by every test thread: give these their own.
        let env = |name: &str| match name {
            "CREDENTIALS_DIRECTORY" => Some(dir.path().as_os_str().to_owned()),
            "KEYHOLD_TEST_PIN" => Some("8765".into()),
            _ => None,
        };
        let var = pkcs11(("pin_env", "KEYHOLD_TEST_PIN"));
        assert_eq!(var.pin_from(env).unwrap().expose_secret(), "8765");
        let cred = pkcs11(("pin_credential", "pin"));
        assert_eq!(cred.pin_from(env).unwrap().expose_secret(), "4321");
        let err = cred.pin_from(|_| None).unwrap_err().to_string();
        assert!(err.contains("needs $CREDENTIALS_DIRECTORY"), "{err}");
        let path = pkcs11(("pin_credential", "../pin"));
        let err = path.pin_from(env).unwrap_err().to_string();
        assert!(err.contains("a name, not a path"), "{err}");
    }

    #[test]
    fn refuses_bad_configs_with_reasons() {
        let cases = [
            ("[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"m\"\npin_env = \"P\"", "exactly one of token_label"),
            ("[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"m\"\ntoken_label = \"t\"", "exactly one PIN source"),
            ("[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"m\"\ntoken_label = \"t\"\npin = \"1234\"", "unknown field `pin`"),
            ("[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"m\"\ntoken_label = \"t\"\npin = \"1234\"", "line 5, column 1: "),
            ("[backends.software]\ntype = \"pkcs11\"\nmodule = \"m\"\ntoken_label = \"t\"\npin_env = \"P\"", "built in"),
            ("[backends.hsm]\ntype = \"nope\"", "unknown variant `nope`"),
            ("[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"m\"\ntoken_uri = \"http://x\"\npin_env = \"P\"", "must start with `pkcs11:`"),
        ];
        for (text, expected) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(
                !err.contains("1234"),
                "a PIN in the file must not be echoed: {err}"
            );
        }
    }

    #[test]
    fn parses_tpm_and_software_settings() {
        let config = Config::from_toml(
            "[software]\nkey_cache_secs = 30\n\n[backends.tpm]\ntype = \"tpm\"\n\
             tcti = \"device:/dev/tpmrm0\"\nfallback = \"software\"\nsrk_handle = 0x81000001\n\
             max_loaded = 3\ntimeout_secs = 5\n",
        )
        .unwrap();
        assert_eq!(config.software.key_cache_secs, 30);
        let Some(BackendConfig::Tpm(tpm)) = config.backends.get("tpm") else {
            panic!("no tpm backend: {config:?}")
        };
        assert_eq!(tpm.fallback, Fallback::Software);
        let settings = tpm.settings().unwrap();
        assert_eq!(settings.srk_handle, Some(0x8100_0001));
        assert_eq!(settings.max_loaded, 3);
        assert_eq!(settings.timeout, std::time::Duration::from_secs(5));
        // Defaults: no cache, a transient SRK, two loaded keys, two minutes.
        let config = Config::from_toml("[backends.tpm]\ntype = \"tpm\"\n").unwrap();
        assert_eq!(config.software.key_cache_secs, 0);
        let Some(BackendConfig::Tpm(tpm)) = config.backends.get("tpm") else {
            panic!("no tpm backend")
        };
        assert_eq!(
            tpm.settings().unwrap(),
            crate::backend::tpm_settings::DeviceSettings::default()
        );
        // Invalid TPM settings are refused when the file is read, at their line.
        for (text, expected) in [
            ("srk_handle = 0x80000001", "not an owner persistent handle"),
            ("max_loaded = 0", "at least 1"),
            ("timeout_secs = 0", "at least 1"),
        ] {
            let err = Config::from_toml(&format!("[backends.tpm]\ntype = \"tpm\"\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(err.contains("line 3, column 1: "), "{text}: {err}");
        }
    }

    #[test]
    fn the_audit_log_is_on_unless_turned_off_and_its_window_is_bounded() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(
            config.audit,
            AuditConfig {
                enabled: true,
                flush_ms: 1000
            }
        );
        let config = Config::from_toml("[audit]\nenabled = false\nflush_ms = 250\n").unwrap();
        assert!(!config.audit.enabled);
        assert_eq!(config.audit.flush_ms, 250);
        for (text, says) in [
            ("flush_ms = 0", "flush_ms must be between 1 and 60000"),
            ("flush_ms = 60001", "flush_ms must be between 1 and 60000"),
            ("flush_ms = -5", ""),
            ("enabled = \"yes\"", "invalid type"),
            ("window = 3", "unknown field `window`"),
        ] {
            let err = Config::from_toml(&format!("\n[audit]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("line 3, column "), "{text}: {err}");
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    /// What each kind of mistake names: (text, line, column, what the message says).
    #[test]
    fn errors_name_the_line_and_column_of_the_offending_key() {
        let hsm = "# keyhold\n\n[backends.hsm]\ntype = \"pkcs11\"\nmodule = \"m\"\n";
        let cases: Vec<(String, usize, usize, &str)> = vec![
            // Unknown key, after and before other keys (serde sees tagged tables whole).
            (format!("{hsm}token_label = \"t\"\npin_env = \"P\"\n  pin = \"1234\"\n"), 8, 3, "unknown field `pin`"),
            (format!("{hsm}colour = 1\ntoken_label = \"t\"\npin_env = \"P\"\n"), 6, 1, "unknown field `colour`"),
            // Wrong types: an optional key and a required one.
            (format!("{hsm}token_label = \"t\"\npin_env = \"P\"\nmax_sessions = \"four\"\n"), 8, 1, "invalid type"),
            ("[backends.hsm]\ntype = \"pkcs11\"\nmodule = 5\ntoken_label = \"t\"\npin_env = \"P\"\n".into(), 3, 1, "invalid type"),
            // An unknown backend type, a bad fallback.
            ("\n[backends.x]\ntype = \"nope\"\n".into(), 3, 8, "unknown variant `nope`"),
            (format!("{hsm}token_label = \"t\"\npin_env = \"P\"\nfallback = \"yes\"\n"), 8, 1, "unknown variant `yes`"),
            // Outside the backends: [software], and a syntax error.
            ("\n[software]\nkey_cache_secs = -1\n".into(), 3, 18, ""),
            ("[software]\nkey_cache_secs = = 3\n".into(), 2, 18, ""),
            // Found after parsing (validate): at the key to blame, else at the backend's table.
            (format!("{hsm}token_label = \"t\"\npin_env = \"P\"\nmax_sessions = 0\n"), 8, 1, "max_sessions must be at least 1"),
            (format!("{hsm}token_uri = \"http://x\"\npin_env = \"P\"\n"), 6, 1, "must start with `pkcs11:`"),
            (format!("{hsm}token_label = \"t\"\n"), 3, 1, "exactly one PIN source"),
            ("[backends.tpm]\ntype = \"tpm\"\n\nmax_loaded = 0\n".into(), 4, 1, "max_loaded must be at least 1"),
            ("\n\n[backends.software]\ntype = \"tpm\"\n".into(), 3, 1, "built in"),
        ];
        let mut wrong = Vec::new();
        for (text, line, column, says) in cases {
            let err = Config::from_toml(&text).unwrap_err().to_string();
            if !(err.contains(&format!("line {line}, column {column}: ")) && err.contains(says)) {
                wrong.push(format!(
                    "{text:?}: expected line {line}, column {column} and {says:?}, got: {err}"
                ));
            }
            assert!(!err.contains("1234"), "a PIN must not be echoed: {err}");
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn a_file_error_names_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[backends.tpm]\ntype = \"tpm\"\nmax_loaded = 0\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "configuration: {}: line 3, column 1: backends.tpm: max_loaded must be at least 1 \
                 (keys are loaded to be used)",
                path.display()
            )
        );
    }

    #[test]
    fn verify_interval_is_a_duration_of_at_least_a_second() {
        let read = |text: &str| Config::from_toml(&format!("[store]\nverify_interval = {text}\n"));
        assert_eq!(Config::default().store.verify_interval, None);
        assert_eq!(
            read("\"6h\"").unwrap().store.verify_interval,
            Some(std::time::Duration::from_secs(6 * 3600))
        );
        assert_eq!(
            read("\"1d 30m\"").unwrap().store.verify_interval,
            Some(std::time::Duration::from_secs(86400 + 1800))
        );
        for (bad, says) in [
            ("\"0s\"", "at least one second"),
            ("\"soon\"", "is not a duration"),
            ("60", "invalid type"),
        ] {
            let err = read(bad).unwrap_err().to_string();
            assert!(err.contains("line 2") && err.contains(says), "{bad}: {err}");
        }
    }
}
