//! Input and output: files, standard streams, encodings, JSON lines, text safe for a terminal.
//! The passphrase is read in `passphrase.rs`, the keystore opened in `open.rs`; both are
//! re-exported here, where every command finds them.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use keyhold::{MAX_ENVELOPE, MAX_INPUT};
use zeroize::Zeroizing;

use super::Failure;

pub use super::open::*;
pub use super::passphrase::*;

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
pub(super) fn read_zeroizing(
    mut reader: impl Read,
    hint: usize,
) -> std::io::Result<Zeroizing<Vec<u8>>> {
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
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_terminal_without_control_characters() {
        let hostile = "no token labelled `evil\u{1b}]0;owned\u{7}\u{202e}txt` is present:\nnext";
        assert_eq!(
            terminal_safe_message(hostile),
            "no token labelled `evil\\u{1b}]0;owned\\u{7}\\u{202e}txt` is present:\nnext"
        );
        assert_eq!(terminal_safe("a\nb\0\0"), "a\\u{a}b");
    }
}
