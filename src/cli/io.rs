//! Input, output, the passphrase, and opening the keystore.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use keyhold::config::SealerKind;
use keyhold::sealer::{SealedRoot, Sealer};
use keyhold::{Keystore, PassphraseSealer, MAX_ENVELOPE, MAX_INPUT};
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

    /// `bytes` as a JSON string: hex with `--encoding hex`, base64 otherwise (JSON holds text).
    pub fn json_text(self, bytes: &[u8]) -> String {
        use base64::Engine as _;
        match self {
            Self::Hex => keyhold::hex::encode(bytes),
            Self::Raw | Self::Base64 => BASE64.encode(bytes),
        }
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

/// The longest passphrase read from a file or the terminal.
const MAX_PASSPHRASE: usize = 4096;

/// Where one passphrase comes from, and how the terminal asks for it.
struct PassphraseSource {
    /// The environment variable read when no file is given.
    variable: &'static str,
    /// What the prompt and messages call it.
    what: &'static str,
    /// The option naming its file.
    file_option: &'static str,
}

/// The store's passphrase (or a TPM store's recovery passphrase).
const CURRENT: PassphraseSource = PassphraseSource {
    variable: "KEYHOLD_PASSPHRASE",
    what: "passphrase",
    file_option: "--passphrase-file",
};

/// The passphrase a store is re-sealed under (`reseal --to`, `recovery restore --to`).
const NEW: PassphraseSource = PassphraseSource {
    variable: "KEYHOLD_NEW_PASSPHRASE",
    what: "new passphrase",
    file_option: "--new-passphrase-file",
};

/// [`passphrase`] with the file given directly.
///
/// No copy is left behind: the file and the terminal are read without a `BufReader` (whose buffer
/// would keep the bytes after it is freed) into zeroizing buffers, and `KEYHOLD_PASSPHRASE` is
/// removed from the process environment once read, so that nothing started later inherits it.
pub fn passphrase_from(file: Option<&Path>, confirm: bool) -> Result<SecretString, Failure> {
    read_passphrase(&CURRENT, file, confirm)
}

/// The new passphrase of `reseal --to passphrase` (or the recovery passphrase of `--to tpm
/// --pcrs`): `--new-passphrase-file`, then `$KEYHOLD_NEW_PASSPHRASE`, then the terminal (asked
/// twice), read as [`passphrase_from`] reads the current one. An empty one is refused here,
/// before anything is unsealed.
pub fn new_passphrase(file: Option<&Path>) -> Result<SecretString, Failure> {
    let passphrase = read_passphrase(&NEW, file, true)?;
    if secrecy::ExposeSecret::expose_secret(&passphrase).is_empty() {
        return Err(keyhold::Error::InvalidInput(
            "the new passphrase is empty: choose a long one; nothing was changed".into(),
        )
        .into());
    }
    Ok(passphrase)
}

fn read_passphrase(
    source: &PassphraseSource,
    file: Option<&Path>,
    confirm: bool,
) -> Result<SecretString, Failure> {
    let what = source.what;
    if let Some(path) = file {
        let file = File::open(path).map_err(|e| {
            Failure::Cli(format!(
                "cannot read the {what} file {}: {e}",
                path.display()
            ))
        })?;
        // One byte past the limit tells a passphrase that fits from one that would be cut short.
        let data = read_zeroizing(file.take(MAX_PASSPHRASE as u64 + 1), MAX_PASSPHRASE + 1)
            .map_err(|e| Failure::Cli(format!("cannot read {}: {e}", path.display())))?;
        let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
        if line.len() > MAX_PASSPHRASE {
            return Err(Failure::Cli(format!(
                "the {what} in {} is longer than {MAX_PASSPHRASE} bytes",
                path.display()
            )));
        }
        return secret_from_utf8(line, || {
            format!("the {what} file {} is not valid UTF-8", path.display())
        });
    }
    if let Some(value) = std::env::var_os(source.variable) {
        // The variable is read once per process. Removing it is sound only while no other
        // thread reads the environment: the command reads the passphrase before it starts any
        // (backends, which may, are built after the store is unsealed).
        std::env::remove_var(source.variable);
        let value = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(value));
        return secret_from_utf8(&value, || format!("{} is not valid UTF-8", source.variable));
    }
    prompt(source, confirm)
}

/// A passphrase from bytes (without a trailing `\r`), copied once into its `SecretString`.
fn secret_from_utf8(
    bytes: &[u8],
    not_utf8: impl FnOnce() -> String,
) -> Result<SecretString, Failure> {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|_| Failure::Cli(not_utf8()))?;
    Ok(SecretString::from(text))
}

/// Reads one line from the terminal a byte at a time into a buffer allocated once and zeroized
/// on drop (the terminal gives the line in one go; a `BufReader` would keep its own copy).
fn read_secret_line(mut tty: &File) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let mut line = Zeroizing::new(Vec::with_capacity(MAX_PASSPHRASE));
    let mut byte = [0u8; 1];
    loop {
        match tty.read(&mut byte) {
            Ok(0) => return Ok(line),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) if line.len() == MAX_PASSPHRASE => {
                return Err(std::io::Error::other(format!(
                    "the passphrase is longer than {MAX_PASSPHRASE} bytes"
                )))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Asks on the controlling terminal with echo off; twice when `confirm`.
fn prompt(source: &PassphraseSource, confirm: bool) -> Result<SecretString, Failure> {
    let what = source.what;
    let no_source = || {
        Failure::Cli(format!(
            "no {what}: set {}, pass {} FILE, or run keyhold in a terminal",
            source.variable, source.file_option
        ))
    };
    let tty = HiddenTerminal::open().ok_or_else(no_source)?;
    let first = tty.ask(&format!("keyhold {what}: "), what)?;
    if confirm {
        let second = tty.ask(&format!("repeat the {what}: "), what)?;
        if *first != *second {
            return Err(Failure::Cli(
                "the passphrases differ: nothing was changed".into(),
            ));
        }
    }
    secret_from_utf8(&first, || format!("the {what} is not valid UTF-8"))
}

/// The controlling terminal, for reading secrets with echo off.
pub struct HiddenTerminal {
    tty: File,
    saved: rustix::termios::Termios,
    quiet: rustix::termios::Termios,
}

impl HiddenTerminal {
    /// The controlling terminal, or `None` when there is none (or it is not a terminal).
    pub fn open() -> Option<Self> {
        use rustix::termios::{tcgetattr, LocalModes};
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")
            .ok()?;
        let saved = tcgetattr(&tty).ok()?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        quiet.local_modes.insert(LocalModes::ECHONL);
        Some(Self { tty, saved, quiet })
    }

    /// Shows `label` and reads one line with echo off (`what` names it in errors).
    pub fn ask(&self, label: &str, what: &str) -> Result<Zeroizing<Vec<u8>>, Failure> {
        use rustix::termios::{tcsetattr, OptionalActions};
        // Echo off (and what was typed ahead, echoed, discarded) before the label shows: once it
        // shows, what is typed is read, unseen.
        tcsetattr(&self.tty, OptionalActions::Flush, &self.quiet)
            .map_err(|e| Failure::Cli(format!("cannot turn terminal echo off: {e}")))?;
        let mut out = &self.tty;
        let _ = out.write_all(label.as_bytes());
        let read = read_secret_line(&self.tty);
        let _ = tcsetattr(&self.tty, OptionalActions::Flush, &self.saved);
        read.map_err(|e| Failure::Cli(format!("cannot read the {what}: {e}")))
    }
}

impl std::fmt::Debug for HiddenTerminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HiddenTerminal")
    }
}

/// Whether there is a controlling terminal to ask on.
pub fn has_terminal() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .is_ok()
}

/// Asks `question` on the controlling terminal (echo on) and returns the line typed, or `None`
/// when there is no terminal to ask on.
pub fn ask_terminal(question: &str) -> Result<Option<String>, Failure> {
    let Ok(tty) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
    else {
        return Ok(None);
    };
    let mut out = &tty;
    out.write_all(question.as_bytes())
        .map_err(|e| Failure::Cli(format!("cannot write to the terminal: {e}")))?;
    // The answer is not secret; the passphrase reader's bounds serve it as well.
    let line =
        read_secret_line(&tty).map_err(|e| Failure::Cli(format!("cannot read the answer: {e}")))?;
    let line = line.strip_suffix(b"\r").unwrap_or(&line);
    Ok(Some(String::from_utf8_lossy(line).into_owned()))
}

/// The sealer the user states for the store: `$KEYHOLD_SEALER`, else `sealer` under `[store]` in
/// the configuration, else `passphrase`, and where that came from (for messages).
///
/// Never the sealer the store's own files name: whoever can write them could swap a passphrase
/// seal for a TPM seal of a root secret they chose, and keyhold would open the store without the
/// passphrase, making every new key under a key-encryption key they know. A statement outside
/// the store is what they cannot change; passphrase, the one sealer that needs the user's secret,
/// is the default.
pub fn stated_sealer(ctx: &Context) -> Result<(SealerKind, &'static str), Failure> {
    sealer_statement(ctx, std::env::var_os("KEYHOLD_SEALER"))
}

/// [`stated_sealer`] given `$KEYHOLD_SEALER` (tests pass it instead of changing the process's
/// environment, which every test thread shares).
fn sealer_statement(
    ctx: &Context,
    variable: Option<std::ffi::OsString>,
) -> Result<(SealerKind, &'static str), Failure> {
    if let Some(value) = variable.filter(|v| !v.is_empty()) {
        let kind = match value.to_str() {
            Some("passphrase") => SealerKind::Passphrase,
            Some("tpm") => SealerKind::Tpm,
            Some("pkcs11") => SealerKind::Pkcs11,
            _ => {
                return Err(Failure::Cli(format!(
                    "KEYHOLD_SEALER is `{}`: set it to passphrase, tpm or pkcs11",
                    value.to_string_lossy()
                )))
            }
        };
        return Ok((kind, "KEYHOLD_SEALER"));
    }
    match ctx.config.store.sealer {
        Some(kind) => Ok((kind, "the configuration's [store] sealer")),
        None => Ok((
            SealerKind::Passphrase,
            "the default, as no sealer was stated",
        )),
    }
}

/// The stated sealer, if the store records the same; else a refusal saying what to set if the
/// store is genuinely sealed the way it records.
pub fn check_stated_sealer(ctx: &Context, recorded: &str) -> Result<SealerKind, Failure> {
    same_sealer(recorded, stated_sealer(ctx)?)
}

fn same_sealer(
    recorded: &str,
    (stated, source): (SealerKind, &'static str),
) -> Result<SealerKind, Failure> {
    if recorded == stated.as_str() {
        return Ok(stated);
    }
    Err(keyhold::Error::Unseal {
        reason: format!(
            "the store records a `{recorded}` seal, but keyhold expects a `{}` seal ({source}). \
             If you made this store with `keyhold init --sealer {recorded}`, say so: set \
             KEYHOLD_SEALER={recorded}, or put `sealer = \"{recorded}\"` under [store] in the \
             configuration file. If you did not, someone who can write the store directory \
             replaced its sealed root secret: do not use the store; restore it from a backup",
            stated.as_str()
        ),
    }
    .into())
}

/// Opens and unseals the store named by the context, with the sealer the user stated (see
/// [`stated_sealer`]); a store that records another kind is refused.
pub fn open_keystore(ctx: &Context) -> Result<Keystore, Failure> {
    // Look for the store (and its sealer) before asking for a passphrase nobody can use.
    let sealed = keyhold::store::Store::open(&ctx.store)?
        .meta()
        .sealed_root
        .clone();
    let sealer = unsealer(ctx, &sealed)?;
    let _notice = UnlockingNotice::start(&sealed);
    Ok(Keystore::open_with(
        &ctx.store,
        sealer.as_ref(),
        &ctx.config,
    )?)
}

/// The sealer that unseals the store sealed as `sealed` says, of the kind the user stated (see
/// [`stated_sealer`]): a store that records another kind is refused. Asks for the passphrase of a
/// passphrase store.
pub fn unsealer(ctx: &Context, sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    let stated = check_stated_sealer(ctx, &sealed.sealer)?;
    // Which backend reaches the token or TPM comes from the store's parameters: they choose only
    // among the configured backends, and are authenticated with the rest of the metadata once the
    // root is unsealed.
    Ok(match stated {
        SealerKind::Pkcs11 => pkcs11_unsealer(ctx, sealed)?,
        SealerKind::Tpm => tpm_unsealer(ctx, sealed)?,
        SealerKind::Passphrase => Box::new(PassphraseSealer::new(passphrase(ctx, false)?)),
    })
}

/// How long unsealing may take before a terminal is told `unlocking…`.
const UNLOCKING_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// While alive, says `keyhold: unlocking…` on stderr if unsealing a passphrase store (its Argon2
/// cost) takes longer than [`UNLOCKING_AFTER`] — only when stderr is a terminal: a script's
/// captured stderr gets nothing.
#[derive(Debug)]
pub struct UnlockingNotice {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UnlockingNotice {
    /// The notice for unsealing `sealed` (none unless it is a passphrase seal).
    pub fn start(sealed: &SealedRoot) -> Self {
        use std::io::IsTerminal;
        let terminal = sealed.sealer == PassphraseSealer::KIND && std::io::stderr().is_terminal();
        Self::start_with(terminal, unlocking_after(), || {
            Box::new(std::io::stderr()) as Box<dyn Write + Send>
        })
    }

    /// The notice written to `out` after `after`, if `terminal`; at once if `after` is zero.
    fn start_with(
        terminal: bool,
        after: std::time::Duration,
        out: impl FnOnce() -> Box<dyn Write + Send> + Send + 'static,
    ) -> Self {
        let say = |out: Box<dyn Write + Send>| {
            let mut out = out;
            let _ = out.write_all("keyhold: unlocking…\n".as_bytes());
            let _ = out.flush();
        };
        if !terminal {
            return Self {
                done: None,
                thread: None,
            };
        }
        if after.is_zero() {
            say(out());
            return Self {
                done: None,
                thread: None,
            };
        }
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("unlocking notice".into())
            .spawn(move || {
                // Dropping the sender (unsealing finished) ends the wait early, with nothing said.
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(after) {
                    say(out());
                }
            })
            .ok();
        Self {
            done: Some(done),
            thread,
        }
    }
}

impl Drop for UnlockingNotice {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// [`UNLOCKING_AFTER`]; test builds take `KEYHOLD_TEST_UNLOCKING_AFTER_MS` instead, so that tests
/// need no store slow to open to see (or not see) the notice.
fn unlocking_after() -> std::time::Duration {
    #[cfg(feature = "testing")]
    if let Some(ms) = std::env::var("KEYHOLD_TEST_UNLOCKING_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return std::time::Duration::from_millis(ms);
    }
    UNLOCKING_AFTER
}

/// The `pkcs11` sealer that opens the store sealed as `sealed` says.
#[cfg(feature = "pkcs11")]
fn pkcs11_unsealer(ctx: &Context, sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    let name = keyhold::Pkcs11Sealer::backend_of(sealed)?;
    let backend = std::sync::Arc::new(pkcs11_backend(ctx, &name)?);
    Ok(Box::new(keyhold::Pkcs11Sealer::new(backend)))
}

#[cfg(not(feature = "pkcs11"))]
fn pkcs11_unsealer(_ctx: &Context, _sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    Err(keyhold::Error::not_built("pkcs11").into())
}

/// The `tpm` sealer that opens the store sealed as `sealed` says.
#[cfg(feature = "tpm")]
fn tpm_unsealer(ctx: &Context, sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    let name = keyhold::TpmSealer::backend_of(sealed)?;
    let (device, name) = tpm_device(ctx, name.as_deref(), true)?;
    let file = ctx.passphrase_file.clone();
    Ok(Box::new(
        keyhold::TpmSealer::new(device, name).with_recovery_prompt_on_another_tpm(Box::new(
            move || {
                passphrase_from(file.as_deref(), false).map_err(|f| keyhold::Error::Unseal {
                    reason: format!("the recovery passphrase is needed: {f}"),
                })
            },
        )),
    ))
}

#[cfg(not(feature = "tpm"))]
fn tpm_unsealer(_ctx: &Context, _sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    Err(keyhold::Error::not_built("tpm").into())
}

/// The TPM for the `tpm` sealer, and the name of the configured backend it came from: backend
/// `name`; without a name, the configuration's only TPM backend, else (none configured) the TPM
/// that `$TPM2TOOLS_TCTI`, `$TCTI` or `/dev/tpmrm0` names. `sealed` says the store already names
/// the backend (or none), so no other is guessed.
#[cfg(feature = "tpm")]
pub fn tpm_device(
    ctx: &Context,
    name: Option<&str>,
    sealed: bool,
) -> Result<
    (
        std::sync::Arc<keyhold::backend::tpm::device::TpmDevice>,
        Option<String>,
    ),
    Failure,
> {
    use keyhold::config::{BackendConfig, TpmConfig};
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
#[cfg(feature = "pkcs11")]
pub fn pkcs11_backend(
    ctx: &Context,
    name: &str,
) -> Result<keyhold::backend::pkcs11::Pkcs11Backend, Failure> {
    use keyhold::backend::pkcs11::Pkcs11Backend;
    use keyhold::config::BackendConfig;
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

/// `text` with control characters escaped (`\u{1b}`), so that a token's label cannot move the
/// cursor, retitle the window or hide text; NUL padding (a run of NULs before the end, a space,
/// a backtick or a parenthesis, where fields end) is dropped, any other NUL escaped.
pub fn terminal_safe(text: &str) -> String {
    terminal_safe_keeping(text, &[])
}

/// [`terminal_safe`], leaving the control characters in `keep` (an error message's line breaks).
fn terminal_safe_keeping(text: &str, keep: &[char]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\0' {
            let mut rest = chars.clone();
            while rest.peek() == Some(&'\0') {
                rest.next();
            }
            if matches!(rest.peek(), None | Some(' ' | '`' | ')' | ',')) {
                chars = rest;
                continue;
            }
        }
        // Bidirectional overrides reorder what the terminal shows: escaped like controls.
        if (c.is_control() && !keep.contains(&c))
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// An error message as it may reach a terminal: [`terminal_safe`], but line breaks and tabs kept.
pub fn terminal_safe_message(text: &str) -> String {
    terminal_safe_keeping(text, &['\n', '\t'])
}

#[cfg(test)]
mod passphrase_tests {
    use clap::Parser;
    use secrecy::ExposeSecret;

    use super::super::{Args, Context};
    use super::*;

    fn context(config: Option<&str>) -> (tempfile::TempDir, Context) {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "keyhold".to_owned(),
            "--store".into(),
            "/nonexistent".into(),
        ];
        if let Some(text) = config {
            let path = dir.path().join("keyhold.toml");
            std::fs::write(&path, text).unwrap();
            args.extend(["--config".into(), path.display().to_string()]);
        }
        args.extend(["key".into(), "list".into()]);
        let ctx = Context::from_args(&Args::try_parse_from(args).unwrap()).unwrap();
        (dir, ctx)
    }

    /// L4: `KEYHOLD_PASSPHRASE` is read once and gone from the environment afterwards, so nothing
    /// keyhold starts later inherits it. The one test that changes the process's environment
    /// (that is what it checks). No other test reads this variable, and Rust's own environment
    /// calls are serialised; C code reading the environment in another test's thread is not
    /// (see the README on `cargo test`): run under nextest, as `ci/test.sh` does, or one thread.
    #[test]
    fn the_passphrase_variable_is_removed_once_read() {
        std::env::set_var("KEYHOLD_PASSPHRASE", "from the environment");
        let secret = passphrase_from(None, false).unwrap();
        assert_eq!(secret.expose_secret(), "from the environment");
        assert_eq!(std::env::var_os("KEYHOLD_PASSPHRASE"), None);
        // The new passphrase's variable too (`reseal --to`, `recovery restore --to`).
        std::env::set_var("KEYHOLD_NEW_PASSPHRASE", "the new one");
        let secret = new_passphrase(None).unwrap();
        assert_eq!(secret.expose_secret(), "the new one");
        assert_eq!(std::env::var_os("KEYHOLD_NEW_PASSPHRASE"), None);
    }

    /// `--new-passphrase-file` is read as `--passphrase-file` is (its first line); an empty new
    /// passphrase is refused before anything is sealed.
    #[test]
    fn a_new_passphrase_file_gives_its_first_line_and_empty_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new");
        std::fs::write(&path, b"new one\r\nignored\n").unwrap();
        assert_eq!(
            new_passphrase(Some(&path)).unwrap().expose_secret(),
            "new one"
        );
        std::fs::write(&path, b"\nsecond line\n").unwrap();
        match new_passphrase(Some(&path)) {
            Err(Failure::Keyhold(keyhold::Error::InvalidInput(m))) => assert_eq!(
                m,
                "the new passphrase is empty: choose a long one; nothing was changed"
            ),
            other => panic!(
                "expected a refusal, got {:?}",
                other.map(|_| "a passphrase")
            ),
        }
    }

    /// The file's first line, without its line ending (a CRLF file too), and nothing after it.
    #[test]
    fn a_passphrase_file_gives_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        std::fs::write(&path, b"first line\r\nsecond line\n").unwrap();
        let secret = passphrase_from(Some(&path), false).unwrap();
        assert_eq!(secret.expose_secret(), "first line");
        std::fs::write(&path, b"no newline").unwrap();
        let secret = passphrase_from(Some(&path), false).unwrap();
        assert_eq!(secret.expose_secret(), "no newline");
    }

    /// M1: the sealer is the user's statement: `$KEYHOLD_SEALER`, else `[store] sealer`, else
    /// passphrase; never the store's.
    #[test]
    fn the_stated_sealer_comes_from_the_environment_then_the_configuration() {
        let (_d, plain) = context(None);
        let unset = |ctx| sealer_statement(ctx, None).unwrap();
        assert_eq!(
            unset(&plain),
            (
                SealerKind::Passphrase,
                "the default, as no sealer was stated"
            )
        );
        let err = same_sealer("tpm", unset(&plain)).unwrap_err();
        assert!(err.to_string().contains("KEYHOLD_SEALER=tpm"), "{err}");
        let (_d, stated) = context(Some("[store]\nsealer = \"tpm\"\n"));
        assert_eq!(same_sealer("tpm", unset(&stated)).unwrap(), SealerKind::Tpm);
        assert_eq!(
            unset(&stated),
            (SealerKind::Tpm, "the configuration's [store] sealer")
        );
        // Set but empty counts as unset.
        assert_eq!(
            sealer_statement(&stated, Some("".into())).unwrap().0,
            SealerKind::Tpm
        );
        assert_eq!(
            sealer_statement(&stated, Some("pkcs11".into())).unwrap(),
            (SealerKind::Pkcs11, "KEYHOLD_SEALER")
        );
        let err = sealer_statement(&stated, Some("tmp".into())).unwrap_err();
        assert!(
            err.to_string().contains("passphrase, tpm or pkcs11"),
            "{err}"
        );
    }

    #[test]
    fn messages_reach_the_terminal_without_control_characters() {
        let hostile = "no token labelled `evil\u{1b}]0;owned\u{7}\u{202e}txt` is present:\nnext";
        assert_eq!(
            terminal_safe_message(hostile),
            "no token labelled `evil\\u{1b}]0;owned\\u{7}\\u{202e}txt` is present:\nnext"
        );
        assert_eq!(terminal_safe("a\nb\0\0"), "a\\u{a}b");
    }

    /// A writer the notice thread can own while the test reads what it wrote.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
        fn out(&self) -> impl FnOnce() -> Box<dyn Write + Send> + Send + 'static {
            let me = self.clone();
            move || Box::new(me) as Box<dyn Write + Send>
        }
    }

    /// The timing decision, with the threshold injected: unsealing that outlasts it says
    /// `unlocking…` (a zero threshold: at once, no clock involved), unsealing that ends first
    /// says nothing (an hour's threshold, ended at once), and without a terminal nothing is said
    /// and no thread waits, whatever the threshold.
    #[test]
    fn unlocking_is_said_on_a_terminal_only_once_the_threshold_passes() {
        let out = Shared::default();
        drop(UnlockingNotice::start_with(
            true,
            std::time::Duration::ZERO,
            out.out(),
        ));
        assert_eq!(out.text(), "keyhold: unlocking…\n");

        let out = Shared::default();
        let hour = std::time::Duration::from_secs(3600);
        let notice = UnlockingNotice::start_with(true, hour, out.out());
        assert!(
            notice.thread.is_some(),
            "a terminal waits for the threshold"
        );
        drop(notice);
        assert_eq!(out.text(), "", "unsealing ended before the threshold");

        let out = Shared::default();
        let notice = UnlockingNotice::start_with(false, std::time::Duration::ZERO, out.out());
        assert!(notice.thread.is_none() && notice.done.is_none());
        drop(notice);
        assert_eq!(out.text(), "", "not a terminal: silent");

        // And a waiting notice does speak once its threshold passes (polled, not timed: the
        // thread may be slow to run on a loaded machine, never too fast).
        let out = Shared::default();
        let notice =
            UnlockingNotice::start_with(true, std::time::Duration::from_millis(1), out.out());
        while out.text().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(notice);
        assert_eq!(out.text(), "keyhold: unlocking…\n");
    }

    #[test]
    fn a_passphrase_file_too_long_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        std::fs::write(&path, vec![b'a'; MAX_PASSPHRASE]).unwrap();
        let fits = passphrase_from(Some(&path), false).unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&fits).len(),
            MAX_PASSPHRASE
        );
        std::fs::write(&path, vec![b'a'; MAX_PASSPHRASE + 1]).unwrap();
        match passphrase_from(Some(&path), false) {
            Err(Failure::Cli(msg)) => assert!(msg.contains("longer than 4096 bytes"), "{msg}"),
            other => panic!(
                "expected a refusal, got {:?}",
                other.map(|_| "a passphrase")
            ),
        }
    }
}
