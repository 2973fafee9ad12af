//! The operations: sign, verify, encrypt, decrypt, mac, mac-verify, random.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use keyhold::SignatureFormat;

use super::io::{self, Encoding};
use super::select::KeySelector;
use super::{CmdResult, Context, Failure};

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum FormatArg {
    /// X9.62 DER (ECDSA)
    #[default]
    Der,
    /// r||s, fixed width (ECDSA; JOSE, IEEE P1363)
    Raw,
}

impl From<FormatArg> for SignatureFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Der => SignatureFormat::Der,
            FormatArg::Raw => SignatureFormat::Raw,
        }
    }
}

/// `--in FILE`: `-` (or none) is stdin.
const IN_HELP: &str = "Read the input from FILE; - is stdin [default: stdin]";

#[derive(Debug, Args)]
pub struct SignArgs {
    #[command(flatten)]
    key: KeySelector,
    #[arg(long = "in", value_name = "FILE", help = IN_HELP)]
    input: Option<PathBuf>,
    /// Write the signature to FILE; - is stdout [default: stdout, refused if a terminal and
    /// --encoding raw]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// ECDSA signature encoding
    #[arg(long, value_enum, default_value = "der")]
    format: FormatArg,
    /// How the signature bytes are written: raw, hex or base64 (text, with a newline)
    #[arg(long, value_enum, default_value = "raw")]
    encoding: Encoding,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    key: KeySelector,
    /// The signature file; - is stdin (then --in FILE is required)
    #[arg(long, value_name = "FILE")]
    signature: PathBuf,
    #[arg(long = "in", value_name = "FILE", help = IN_HELP)]
    input: Option<PathBuf>,
    /// ECDSA signature encoding
    #[arg(long, value_enum, default_value = "der")]
    format: FormatArg,
    /// How the signature file holds the signature: raw, hex or base64
    #[arg(long, value_enum, default_value = "raw")]
    encoding: Encoding,
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    #[command(flatten)]
    key: KeySelector,
    /// Additional authenticated data (must be the same to decrypt)
    #[arg(long, value_name = "TEXT", default_value = "")]
    aad: String,
    #[arg(long = "in", value_name = "FILE", help = IN_HELP)]
    input: Option<PathBuf>,
    /// Write to FILE; - is stdout [default: stdout, refused if a terminal]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MacArgs {
    #[command(flatten)]
    key: KeySelector,
    #[arg(long = "in", value_name = "FILE", help = IN_HELP)]
    input: Option<PathBuf>,
    /// Write the tag to FILE; - is stdout [default: stdout, refused if a terminal and --encoding
    /// raw]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// How the tag bytes are written: raw, hex or base64 (text, with a newline)
    #[arg(long, value_enum, default_value = "raw")]
    encoding: Encoding,
}

#[derive(Debug, Args)]
pub struct MacVerifyArgs {
    #[command(flatten)]
    key: KeySelector,
    /// The tag file; - is stdin (then --in FILE is required)
    #[arg(long, value_name = "FILE")]
    tag: PathBuf,
    #[arg(long = "in", value_name = "FILE", help = IN_HELP)]
    input: Option<PathBuf>,
    /// How the tag file holds the tag: raw, hex or base64
    #[arg(long, value_enum, default_value = "raw")]
    encoding: Encoding,
}

#[derive(Debug, Args)]
pub struct RandomArgs {
    /// How many bytes (1 to 65536)
    n: usize,
}

/// What `--encoding hex|base64` adds to the refusal of binary output on a terminal.
const AS_TEXT: &str = ", or --encoding hex|base64 for text";

pub fn sign(ctx: &Context, args: &SignArgs) -> CmdResult {
    args.key.check()?;
    if args.encoding.is_binary() {
        io::check_binary_output(args.out.as_deref(), "signature", AS_TEXT)?;
    }
    let ks = io::open_keystore(ctx)?;
    let id = args.key.resolve(ctx, &ks)?;
    let message = io::read_input(io::std_or(args.input.as_deref()))?;
    let sig = ks.sign(&id, &message, args.format.into())?;
    io::write_output(io::std_or(args.out.as_deref()), &args.encoding.encode(&sig))
}

pub fn verify(ctx: &Context, args: &VerifyArgs) -> CmdResult {
    args.key.check()?;
    let signature = read_check_value(&args.signature, args.input.as_deref(), "signature")?;
    let signature = args.encoding.decode(signature, "signature")?;
    let ks = io::open_keystore(ctx)?;
    let id = args.key.resolve(ctx, &ks)?;
    let message = io::read_input(io::std_or(args.input.as_deref()))?;
    let outcome = ks.verify(&id, &message, &signature, args.format.into());
    valid(ctx, outcome, "signature valid")
}

pub fn encrypt(ctx: &Context, args: &EncryptArgs) -> CmdResult {
    args.key.check()?;
    io::check_binary_output(args.out.as_deref(), "envelope", "")?;
    let ks = io::open_keystore(ctx)?;
    let id = args.key.resolve(ctx, &ks)?;
    let plaintext = io::read_input(io::std_or(args.input.as_deref()))?;
    let envelope = ks.encrypt(&id, &plaintext, args.aad.as_bytes())?;
    io::write_output(io::std_or(args.out.as_deref()), &envelope)
}

pub fn decrypt(ctx: &Context, args: &EncryptArgs) -> CmdResult {
    args.key.check()?;
    io::check_binary_output(args.out.as_deref(), "plaintext", "")?;
    let ks = io::open_keystore(ctx)?;
    let id = args.key.resolve(ctx, &ks)?;
    let envelope = io::read_envelope(io::std_or(args.input.as_deref()))?;
    let plaintext = ks.decrypt(&id, &envelope, args.aad.as_bytes())?;
    io::write_output(io::std_or(args.out.as_deref()), plaintext.expose())
}

pub fn mac(ctx: &Context, args: &MacArgs) -> CmdResult {
    args.key.check()?;
    if args.encoding.is_binary() {
        io::check_binary_output(args.out.as_deref(), "tag", AS_TEXT)?;
    }
    let ks = io::open_keystore(ctx)?;
    let id = args.key.resolve(ctx, &ks)?;
    let data = io::read_input(io::std_or(args.input.as_deref()))?;
    let tag = ks.mac(&id, &data)?;
    io::write_output(io::std_or(args.out.as_deref()), &args.encoding.encode(&tag))
}

pub fn mac_verify(ctx: &Context, args: &MacVerifyArgs) -> CmdResult {
    args.key.check()?;
    let tag = read_check_value(&args.tag, args.input.as_deref(), "tag")?;
    let tag = args.encoding.decode(tag, "tag")?;
    let ks = io::open_keystore(ctx)?;
    let id = args.key.resolve(ctx, &ks)?;
    let data = io::read_input(io::std_or(args.input.as_deref()))?;
    let outcome = ks.verify_mac(&id, &data, &tag);
    valid(ctx, outcome, "tag valid")
}

/// Reads a signature or tag from its file, or from stdin for `-` when the input is a file.
fn read_check_value(
    path: &std::path::Path,
    input: Option<&std::path::Path>,
    what: &str,
) -> Result<Vec<u8>, Failure> {
    if path != std::path::Path::new("-") {
        return io::read_small_file(path, what);
    }
    if io::std_or(input).is_none() {
        return Err(Failure::Usage(format!(
            "the {what} and the input cannot both come from stdin: pass --in FILE"
        )));
    }
    let data = io::read_input(None)?;
    Ok(data.to_vec())
}

pub fn random(ctx: &Context, args: &RandomArgs) -> CmdResult {
    let bytes = keyhold::random_bytes(args.n)?;
    let hex = keyhold::hex::encode(&bytes);
    if ctx.json {
        io::print_json(&serde_json::json!({ "hex": hex }))
    } else {
        io::print_line(&hex)
    }
}

/// Reports a verification: valid (exit 0), or invalid (exit 1) as `keyhold: … invalid` on stderr,
/// or with `--json` as `{"valid":false}` on stdout.
fn valid(ctx: &Context, outcome: keyhold::Result<()>, text: &str) -> CmdResult {
    match outcome {
        Ok(()) if ctx.json => io::print_json(&serde_json::json!({ "valid": true })),
        Ok(()) => io::print_line(text),
        Err(keyhold::Error::VerificationFailed { .. }) if ctx.json => {
            io::print_json(&serde_json::json!({ "valid": false }))?;
            Err(Failure::Quiet)
        }
        Err(e) => Err(e.into()),
    }
}
