//! The backend tables: `type = "pkcs11"` (a token: module, token, PIN source) and
//! `type = "tpm"` (a TPM: TCTI, SRK, limits), with the fallback of each.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// One backend instance.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum BackendConfig {
    /// A PKCS#11 token.
    Pkcs11(Pkcs11Config),
    /// A TPM 2.0.
    Tpm(TpmConfig),
}

/// A TPM 2.0.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// (Optional) The TCTI, as tpm2-tools spells it (`device:/dev/tpmrm0`, `tabrmd`,
    /// `swtpm:host=127.0.0.1,port=2321`); default `$TPM2TOOLS_TCTI`, else `$TCTI`, else
    /// `device:/dev/tpmrm0`.
    pub tcti: Option<String>,
    /// (Optional) What to do with key types the TPM cannot make; default `refuse`.
    #[serde(default)]
    pub fallback: Fallback,
    /// (Optional) Keep the storage root key at this persistent handle (`0x81000001` by
    /// convention), made there on first use; default: derive a transient SRK per connection.
    #[serde(default)]
    pub srk_handle: Option<u32>,
    /// (Optional) How many keys stay loaded between operations; default 2 (a TPM holds about
    /// three transient objects, the SRK among them).
    #[serde(default)]
    pub max_loaded: Option<usize>,
    /// (Optional) The longest a caller waits for its turn on the TPM, in seconds; default 120.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

impl TpmConfig {
    /// A configuration for the TPM at `tcti` with every other setting at its default.
    pub fn with_tcti(tcti: impl Into<String>) -> Self {
        Self {
            tcti: Some(tcti.into()),
            fallback: Fallback::Refuse,
            srk_handle: None,
            max_loaded: None,
            timeout_secs: None,
        }
    }

    /// The device settings this configuration asks for.
    ///
    /// # Errors
    /// [`Error::Config`] for a handle outside the owner's persistent range, no loaded keys, or a
    /// zero timeout.
    pub fn settings(&self) -> Result<crate::backend::tpm_settings::DeviceSettings> {
        let mut settings = crate::backend::tpm_settings::DeviceSettings::default();
        if let Some(handle) = self.srk_handle {
            if !(0x8100_0000..=0x817F_FFFF).contains(&handle) {
                return Err(Error::Config(format!(
                    "srk_handle {handle:#010x} is not an owner persistent handle \
                     (0x81000000-0x817FFFFF; 0x81000001 is the SRK's by convention)"
                )));
            }
            settings.srk_handle = Some(handle);
        }
        if let Some(n) = self.max_loaded {
            if n == 0 {
                return Err(Error::Config(
                    "max_loaded must be at least 1 (keys are loaded to be used)".into(),
                ));
            }
            settings.max_loaded = n;
        }
        if let Some(secs) = self.timeout_secs {
            if secs == 0 {
                return Err(Error::Config("timeout_secs must be at least 1".into()));
            }
            settings.timeout = std::time::Duration::from_secs(secs);
        }
        Ok(settings)
    }

    /// The TCTI to use: the configured one, else the tpm2-tools environment variables, else the
    /// kernel's resource manager.
    pub fn tcti(&self) -> String {
        self.tcti
            .clone()
            .or_else(|| std::env::var("TPM2TOOLS_TCTI").ok())
            .or_else(|| std::env::var("TCTI").ok())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "device:/dev/tpmrm0".into())
    }
}

/// What to do when a backend is asked for a key type it cannot make.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Refuse with an "unsupported" error naming the backend and what it lacks.
    #[default]
    Refuse,
    /// Create the key in the software backend, sealed by the store's sealer; its record says so.
    Software,
}

/// A PKCS#11 token.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// (Required) The module's path, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label. One of `token_label`, `token_serial`, `token_uri` is required.
    pub token_label: Option<String>,
    /// The token's serial number.
    pub token_serial: Option<String>,
    /// An RFC 7512 URI selecting the token (`pkcs11:token=keyhold;serial=…`).
    pub token_uri: Option<String>,
    /// The environment variable holding the user PIN. One PIN source is required.
    pub pin_env: Option<String>,
    /// A file whose first line is the user PIN.
    pub pin_file: Option<PathBuf>,
    /// A systemd credential name, read from `$CREDENTIALS_DIRECTORY/<name>`.
    pub pin_credential: Option<String>,
    /// (Optional) The most sessions keyhold opens on the token; default 8, capped by the token.
    pub max_sessions: Option<usize>,
    /// (Optional) What to do with key types the token cannot make; default `refuse`.
    #[serde(default)]
    pub fallback: Fallback,
}

/// How a token is picked: never by slot number, which changes as tokens are added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSelector {
    /// Label to match, if given.
    pub label: Option<String>,
    /// Serial to match, if given.
    pub serial: Option<String>,
}

impl TokenSelector {
    /// A human description, for errors.
    pub fn describe(&self) -> String {
        match (&self.label, &self.serial) {
            (Some(l), Some(s)) => format!("token labelled `{l}` with serial `{s}`"),
            (Some(l), None) => format!("token labelled `{l}`"),
            (None, Some(s)) => format!("token with serial `{s}`"),
            (None, None) => "any token".into(),
        }
    }
}

impl Pkcs11Config {
    /// The token selector from `token_label`, `token_serial` or `token_uri`.
    ///
    /// # Errors
    /// [`Error::Config`] unless exactly one way is given, or if the URI cannot be parsed.
    pub fn token_selector(&self) -> Result<TokenSelector> {
        match (&self.token_label, &self.token_serial, &self.token_uri) {
            (Some(label), None, None) => Ok(TokenSelector {
                label: Some(label.clone()),
                serial: None,
            }),
            (None, Some(serial), None) => Ok(TokenSelector {
                label: None,
                serial: Some(serial.clone()),
            }),
            (None, None, Some(uri)) => parse_token_uri(uri),
            _ => Err(Error::Config(
                "give exactly one of token_label, token_serial, token_uri".into(),
            )),
        }
    }

    /// Reads the user PIN from its one configured source.
    ///
    /// # Errors
    /// [`Error::Config`] unless exactly one source is configured and readable.
    pub fn pin(&self) -> Result<SecretString> {
        self.pin_from(|name| std::env::var_os(name))
    }

    /// [`Self::pin`] with the environment given: tests pass their own instead of changing the
    /// process's, which other threads read.
    pub(super) fn pin_from(
        &self,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<SecretString> {
        match (&self.pin_env, &self.pin_file, &self.pin_credential) {
            (Some(var), None, None) => {
                let value = env(var).and_then(|v| v.into_string().ok()).ok_or_else(|| {
                    Error::Config(format!("the PIN variable {var} is not set (or not UTF-8)"))
                })?;
                Ok(SecretString::from(value))
            }
            (None, Some(path), None) => read_pin_file(path),
            (None, None, Some(name)) => {
                let dir = env("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    Error::Config(format!(
                        "pin_credential `{name}` needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)"
                    ))
                })?;
                if name.contains('/') {
                    return Err(Error::Config(format!(
                        "pin_credential `{name}` must be a name, not a path"
                    )));
                }
                read_pin_file(&Path::new(&dir).join(name))
            }
            _ => Err(Error::Config(
                "give exactly one PIN source: pin_env, pin_file or pin_credential".into(),
            )),
        }
    }
}

fn read_pin_file(path: &Path) -> Result<SecretString> {
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read the PIN file {}: {e}", path.display()))
        })?);
    let line = text.lines().next().unwrap_or("");
    Ok(SecretString::from(line.to_owned()))
}

/// Parses the token part of an RFC 7512 URI: `token` and `serial` attributes, percent-decoded.
fn parse_token_uri(uri: &str) -> Result<TokenSelector> {
    let bad = |why: &str| Error::Config(format!("token_uri `{uri}`: {why}"));
    let path = uri
        .strip_prefix("pkcs11:")
        .ok_or_else(|| bad("it must start with `pkcs11:`"))?;
    let path = path.split('?').next().unwrap_or("");
    let mut selector = TokenSelector {
        label: None,
        serial: None,
    };
    for attr in path.split(';').filter(|a| !a.is_empty()) {
        let (key, value) = attr
            .split_once('=')
            .ok_or_else(|| bad("each attribute must be name=value"))?;
        let value = percent_decode(value).ok_or_else(|| bad("bad percent-encoding"))?;
        match key {
            "token" => selector.label = Some(value),
            "serial" => selector.serial = Some(value),
            // Other attributes (manufacturer, model, object, …) do not select a token here.
            _ => {}
        }
    }
    if selector.label.is_none() && selector.serial.is_none() {
        return Err(bad("it names neither `token` nor `serial`"));
    }
    Ok(selector)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
