//! Input, output, the passphrase, and opening the keystore.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use std::sync::Arc;

use keyhold::backend::pkcs11::Pkcs11Backend;
use keyhold::backend::tpm::device::TpmDevice;
use keyhold::config::{BackendConfig, TpmConfig};
use keyhold::{Keystore, PassphraseSealer, Pkcs11Sealer, TpmSealer, MAX_ENVELOPE, MAX_INPUT};
use secrecy::SecretString;
use zeroize::Zeroizing;

use super::{Context, Failure};

/// The message a broken pipe turns into; `main` treats it as success.
pub const BROKEN_PIPE: &str = "broken pipe";

/// Reads the whole input (a file, or stdin for `None`), at most one byte past the limit so that the
/// library can refuse oversized input with its own message. Inputs may be plaintexts: the buffer
/// is zeroized on drop, and so is every smaller buffer it outgrew on the way.
pub fn read_input(path: Option<&Path>) -> Result<Zeroizing<Vec<u8>>, Failure> {
    read_limited(path, MAX_INPUT)
}

/// Reads an envelope for `decrypt`, which may be a little larger than [`MAX_INPUT`].
pub fn read_envelope(path: Option<&Path>) -> Result<Zeroizing<Vec<u8>>, Failure> {
    read_limited(path, MAX_ENVELOPE)
}

fn read_limited(path: Option<&Path>, max: usize) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let limit = max as u64 + 1;
    match path {
        Some(p) => {
            let file = File::open(p)
                .map_err(|e| Failure::Cli(format!("cannot read {}: {e}", p.display())))?;
            // A regular file says how big it is: one allocation, never outgrown.
            let hint = file.metadata().map_or(0, |m| m.len().min(limit) as usize);
            read_zeroizing(file.take(limit), hint)
                .map_err(|e| Failure::Cli(format!("cannot read {}: {e}", p.display())))
        }
        None => read_zeroizing(std::io::stdin().lock().take(limit), 0)
            .map_err(|e| Failure::Cli(format!("cannot read stdin: {e}"))),
    }
}

/// `read_to_end` into a zeroizing buffer that grows by copying into a larger zeroizing buffer, so
/// no abandoned allocation keeps a copy of what was read.
fn read_zeroizing(mut reader: impl Read, hint: usize) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let mut data = Zeroizing::new(Vec::with_capacity(hint.max(8192)));
    let mut chunk = Zeroizing::new([0u8; 64 * 1024]);
    loop {
        let n = match reader.read(&mut chunk[..]) {
            Ok(0) => return Ok(data),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if data.len() + n > data.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(
                (data.len() + n).max(2 * data.capacity()),
            ));
            bigger.extend_from_slice(&data);
            data = bigger;
        }
        data.extend_from_slice(&chunk[..n]);
    }
}

/// Reads a small file named by an option (a signature, a tag).
pub fn read_small_file(path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut data))
        .map_err(|e| Failure::Cli(format!("cannot read the {what} {}: {e}", path.display())))?;
    Ok(data)
}

/// Writes output to a file (created private by the umask) or to stdout.
pub fn write_output(path: Option<&Path>, data: &[u8]) -> Result<(), Failure> {
    match path {
        Some(p) => write_private(p, data)
            .map_err(|e| Failure::Cli(format!("cannot write {}: {e}", p.display()))),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(data).and_then(|()| out.flush()).map_err(|e| {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    Failure::Cli(BROKEN_PIPE.into())
                } else {
                    Failure::Cli(format!("cannot write to stdout: {e}"))
                }
            })
        }
    }
}

/// Writes `data` to `path` readable by the owner only, whatever mode an existing file had, and
/// never through a symbolic link (plaintexts go through here).
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(data)?;
    file.flush()
}

/// A `--in`/`--out` path, with `-` meaning stdin or stdout (`None`).
pub fn std_or(path: Option<&Path>) -> Option<&Path> {
    path.filter(|p| *p != Path::new("-"))
}

/// Refuses, before anything is done, to write binary output (`what`) to a terminal: it would
/// garble the terminal and shows nothing useful. `--out FILE` writes a file; `--out -` says stdout
/// is meant, terminal or not.
pub fn check_binary_output(
    out: Option<&Path>,
    what: &str,
    text_option: &str,
) -> Result<(), Failure> {
    use std::io::IsTerminal;
    if out.is_none() && std::io::stdout().is_terminal() {
        return Err(Failure::Usage(format!(
            "refusing to write the {what} (binary) to a terminal: pass --out FILE, or --out - to \
             write it to stdout anyway{text_option}"
        )));
    }
    Ok(())
}

/// How a signature or tag is written and read: as is, or as text.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub enum Encoding {
    /// The bytes as they are
    #[default]
    Raw,
    /// Lowercase hex and a newline (either case when read)
    Hex,
    /// Standard base64 with padding and a newline (padding optional when read)
    Base64,
}

const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Hex => "hex",
            Self::Base64 => "base64",
        }
    }

    /// Whether the output is binary (refused on a terminal).
    pub fn is_binary(self) -> bool {
        matches!(self, Self::Raw)
    }

    /// `bytes` in this encoding, text ones with a newline.
    pub fn encode(self, bytes: &[u8]) -> Vec<u8> {
        use base64::Engine as _;
        let text = match self {
            Self::Raw => return bytes.to_vec(),
            Self::Hex => keyhold::hex::encode(bytes),
            Self::Base64 => BASE64.encode(bytes),
        };
        let mut out = text.into_bytes();
        out.push(b'\n');
        out
    }

    /// Decodes a signature or tag (`what`) read from a file; surrounding whitespace is ignored in
    /// the text encodings.
    pub fn decode(self, data: Vec<u8>, what: &str) -> Result<Vec<u8>, Failure> {
        use base64::Engine as _;
        let text = || {
            std::str::from_utf8(&data).map(str::trim).map_err(|_| {
                Failure::Cli(format!(
                    "the {what} is not text, as --encoding {} expects",
                    self.name()
                ))
            })
        };
        match self {
            Self::Raw => Ok(data),
            Self::Hex => keyhold::hex::decode(text()?).ok_or_else(|| {
                Failure::Cli(format!(
                    "the {what} is not hex (--encoding hex): expected an even number of 0-9a-f"
                ))
            }),
            Self::Base64 => BASE64.decode(text()?).map_err(|e| {
                Failure::Cli(format!("the {what} is not base64 (--encoding base64): {e}"))
            }),
        }
    }
}

/// Prints one line of text output.
pub fn print_line(line: &str) -> Result<(), Failure> {
    let mut text = String::with_capacity(line.len() + 1);
    text.push_str(line);
    text.push('\n');
    write_output(None, text.as_bytes())
}

/// Prints a JSON value on one line.
pub fn print_json(value: &serde_json::Value) -> Result<(), Failure> {
    print_line(&value.to_string())
}

/// Finds the passphrase: `--passphrase-file`, then `$KEYHOLD_PASSPHRASE`, then the terminal.
pub fn passphrase(ctx: &Context, confirm: bool) -> Result<SecretString, Failure> {
    passphrase_from(ctx.passphrase_file.as_deref(), confirm)
}

/// [`passphrase`] with the file given directly.
pub fn passphrase_from(file: Option<&Path>, confirm: bool) -> Result<SecretString, Failure> {
    if let Some(path) = file {
        let file = File::open(path).map_err(|e| {
            Failure::Cli(format!(
                "cannot read the passphrase file {}: {e}",
                path.display()
            ))
        })?;
        let mut line = Zeroizing::new(String::new());
        BufReader::new(file)
            .read_line(&mut line)
            .map_err(|e| Failure::Cli(format!("cannot read {}: {e}", path.display())))?;
        return Ok(SecretString::from(trim_newline(&line).to_owned()));
    }
    if let Some(value) = std::env::var_os("KEYHOLD_PASSPHRASE") {
        let value = Zeroizing::new(
            value
                .into_string()
                .map_err(|_| Failure::Cli("KEYHOLD_PASSPHRASE is not valid UTF-8".into()))?,
        );
        return Ok(SecretString::from(value.as_str().to_owned()));
    }
    prompt(confirm)
}

fn trim_newline(line: &str) -> &str {
    line.strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(line)
}

/// Asks on the controlling terminal with echo off; twice when `confirm`.
fn prompt(confirm: bool) -> Result<SecretString, Failure> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let no_source = || {
        Failure::Cli(
            "no passphrase: set KEYHOLD_PASSPHRASE, pass --passphrase-file FILE, \
             or run keyhold in a terminal"
                .into(),
        )
    };
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| no_source())?;
    let saved = tcgetattr(&tty).map_err(|_| no_source())?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    quiet.local_modes.insert(LocalModes::ECHONL);
    let ask = |label: &str| -> Result<Zeroizing<String>, Failure> {
        let mut out = &tty;
        let _ = out.write_all(label.as_bytes());
        tcsetattr(&tty, OptionalActions::Flush, &quiet)
            .map_err(|e| Failure::Cli(format!("cannot turn terminal echo off: {e}")))?;
        let mut line = Zeroizing::new(String::new());
        let read = BufReader::new(&tty).read_line(&mut line);
        let _ = tcsetattr(&tty, OptionalActions::Flush, &saved);
        read.map_err(|e| Failure::Cli(format!("cannot read the passphrase: {e}")))?;
        Ok(Zeroizing::new(trim_newline(&line).to_owned()))
    };
    let first = ask("keyhold passphrase: ")?;
    if confirm {
        let second = ask("repeat the passphrase: ")?;
        if *first != *second {
            return Err(Failure::Cli(
                "the passphrases differ: nothing was changed".into(),
            ));
        }
    }
    Ok(SecretString::from(first.as_str().to_owned()))
}

/// Opens and unseals the store named by the context, with the sealer the store was made with.
pub fn open_keystore(ctx: &Context) -> Result<Keystore, Failure> {
    // Look for the store (and its sealer) before asking for a passphrase nobody can use.
    let sealed = keyhold::store::Store::open(&ctx.store)?
        .meta()
        .sealed_root
        .clone();
    match sealed.sealer.as_str() {
        "pkcs11" => {
            let name = Pkcs11Sealer::backend_of(&sealed)?;
            let sealer = Pkcs11Sealer::new(Arc::new(pkcs11_backend(ctx, &name)?));
            Ok(Keystore::open_with(&ctx.store, &sealer, &ctx.config)?)
        }
        "tpm" => {
            let name = TpmSealer::backend_of(&sealed)?;
            let (device, name) = tpm_device(ctx, name.as_deref(), true)?;
            let sealer = TpmSealer::new(device, name);
            Ok(Keystore::open_with(&ctx.store, &sealer, &ctx.config)?)
        }
        _ => {
            let sealer = PassphraseSealer::new(passphrase(ctx, false)?);
            Ok(Keystore::open_with(&ctx.store, &sealer, &ctx.config)?)
        }
    }
}

/// The TPM for the `tpm` sealer, and the name of the configured backend it came from: backend
/// `name`; without a name, the configuration's only TPM backend, else (none configured) the TPM
/// that `$TPM2TOOLS_TCTI`, `$TCTI` or `/dev/tpmrm0` names. `sealed` says the store already names
/// the backend (or none), so no other is guessed.
pub fn tpm_device(
    ctx: &Context,
    name: Option<&str>,
    sealed: bool,
) -> Result<(Arc<TpmDevice>, Option<String>), Failure> {
    let tpms: Vec<(&String, &TpmConfig)> = ctx
        .config
        .backends
        .iter()
        .filter_map(|(n, b)| match b {
            BackendConfig::Tpm(t) => Some((n, t)),
            _ => None,
        })
        .collect();
    let (name, config) = match name {
        Some(name) => match ctx.config.backends.get(name) {
            Some(BackendConfig::Tpm(t)) => (Some(name.to_owned()), t.clone()),
            Some(_) => {
                return Err(Failure::Cli(format!(
                    "backend `{name}` is not a TPM backend: the tpm sealer needs one"
                )))
            }
            None => {
                return Err(Failure::Cli(format!(
                    "the store is sealed by the TPM of backend `{name}`, which the configuration \
                     does not define: pass --config (or set KEYHOLD_CONFIG) with [backends.{name}]"
                )))
            }
        },
        None if sealed => (None, TpmConfig::default()),
        None => match tpms.as_slice() {
            [] => (None, TpmConfig::default()),
            [(name, config)] => (Some((*name).clone()), (*config).clone()),
            _ => {
                return Err(Failure::Cli(
                    "the configuration has several TPM backends: name the one that seals the \
                     store with --backend NAME"
                        .into(),
                ))
            }
        },
    };
    let device = keyhold::backend::tpm::device(&config.tcti(), config.settings()?)?;
    Ok((device, name))
}

/// The configured PKCS#11 backend `name`, for the `pkcs11` sealer.
pub fn pkcs11_backend(ctx: &Context, name: &str) -> Result<Pkcs11Backend, Failure> {
    match ctx.config.backends.get(name) {
        Some(BackendConfig::Pkcs11(p)) => Ok(Pkcs11Backend::new(name, p)?),
        Some(_) => Err(Failure::Cli(format!(
            "backend `{name}` is not a PKCS#11 backend: the pkcs11 sealer needs one"
        ))),
        None => Err(Failure::Cli(format!(
            "the store is sealed by the PKCS#11 backend `{name}`, which the configuration does \
             not define: pass --config (or set KEYHOLD_CONFIG) with [backends.{name}]"
        ))),
    }
}
