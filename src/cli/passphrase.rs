//! The passphrase (and the new one of `reseal --to`): from a file, the environment, or the
//! terminal with echo off; never kept longer than it is needed.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use secrecy::SecretString;
use zeroize::Zeroizing;

use super::io::read_zeroizing;
use super::{Context, Failure};

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

/// The bearer token of `--remote`: `--token-file`, then `$KEYHOLD_TOKEN`, else none (the
/// service then knows the caller by its user). Never from the command line, where other users
/// see it; read as [`passphrase_from`] reads a passphrase.
#[cfg(feature = "serve")]
const TOKEN: PassphraseSource = PassphraseSource {
    variable: "KEYHOLD_TOKEN",
    what: "bearer token",
    file_option: "--token-file",
};

/// The bearer token for `--remote`, if one is given ([`TOKEN`]).
#[cfg(feature = "serve")]
pub fn token(file: Option<&Path>) -> Result<Option<SecretString>, Failure> {
    given(&TOKEN, file)
}

fn read_passphrase(
    source: &PassphraseSource,
    file: Option<&Path>,
    confirm: bool,
) -> Result<SecretString, Failure> {
    match given(source, file)? {
        Some(secret) => Ok(secret),
        None => prompt(source, confirm),
    }
}

/// The secret from `file`, else from the source's variable (removed once read), else none.
fn given(source: &PassphraseSource, file: Option<&Path>) -> Result<Option<SecretString>, Failure> {
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
        })
        .map(Some);
    }
    if let Some(value) = std::env::var_os(source.variable) {
        // The variable is read once per process. Removing it is sound only while no other
        // thread reads the environment: the command reads the passphrase before it starts any
        // (backends, which may, are built after the store is unsealed).
        std::env::remove_var(source.variable);
        let value = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(value));
        return secret_from_utf8(&value, || format!("{} is not valid UTF-8", source.variable))
            .map(Some);
    }
    Ok(None)
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

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

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
