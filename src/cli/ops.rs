//! The operations: sign, verify, encrypt, decrypt, mac, mac-verify, random.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use keyhold::SignatureFormat;

use super::{io, CmdResult, Context, Failure};

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

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The signing key's ID
    #[arg(long, value_name = "ID")]
    key: String,
    /// Read the message from FILE [default: stdin]
    #[arg(long = "in", value_name = "FILE")]
    input: Option<PathBuf>,
    /// Write the signature to FILE [default: stdout]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// ECDSA signature encoding
    #[arg(long, value_enum, default_value = "der")]
    format: FormatArg,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The signing key's ID
    #[arg(long, value_name = "ID")]
    key: String,
    /// The signature file
    #[arg(long, value_name = "FILE")]
    signature: PathBuf,
    /// Read the message from FILE [default: stdin]
    #[arg(long = "in", value_name = "FILE")]
    input: Option<PathBuf>,
    /// ECDSA signature encoding
    #[arg(long, value_enum, default_value = "der")]
    format: FormatArg,
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// The key's ID
    #[arg(long, value_name = "ID")]
    key: String,
    /// Additional authenticated data (must be the same to decrypt)
    #[arg(long, value_name = "TEXT", default_value = "")]
    aad: String,
    /// Read from FILE [default: stdin]
    #[arg(long = "in", value_name = "FILE")]
    input: Option<PathBuf>,
    /// Write to FILE [default: stdout]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MacArgs {
    /// The MAC key's ID
    #[arg(long, value_name = "ID")]
    key: String,
    /// Read the data from FILE [default: stdin]
    #[arg(long = "in", value_name = "FILE")]
    input: Option<PathBuf>,
    /// Write the tag to FILE [default: stdout]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MacVerifyArgs {
    /// The MAC key's ID
    #[arg(long, value_name = "ID")]
    key: String,
    /// The tag file
    #[arg(long, value_name = "FILE")]
    tag: PathBuf,
    /// Read the data from FILE [default: stdin]
    #[arg(long = "in", value_name = "FILE")]
    input: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RandomArgs {
    /// How many bytes (1 to 65536)
    n: usize,
}

pub fn sign(ctx: &Context, args: &SignArgs) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let message = io::read_input(args.input.as_deref())?;
    let sig = ks.sign(&args.key, &message, args.format.into())?;
    io::write_output(args.out.as_deref(), &sig)
}

pub fn verify(ctx: &Context, args: &VerifyArgs) -> CmdResult {
    let signature = io::read_small_file(&args.signature, "signature")?;
    let ks = io::open_keystore(ctx)?;
    let message = io::read_input(args.input.as_deref())?;
    ks.verify(&args.key, &message, &signature, args.format.into())?;
    valid(ctx, "signature valid")
}

pub fn encrypt(ctx: &Context, args: &EncryptArgs) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let plaintext = io::read_input(args.input.as_deref())?;
    let envelope = ks.encrypt(&args.key, &plaintext, args.aad.as_bytes())?;
    io::write_output(args.out.as_deref(), &envelope)
}

pub fn decrypt(ctx: &Context, args: &EncryptArgs) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let envelope = io::read_envelope(args.input.as_deref())?;
    let plaintext = ks.decrypt(&args.key, &envelope, args.aad.as_bytes())?;
    io::write_output(args.out.as_deref(), plaintext.expose())
}

pub fn mac(ctx: &Context, args: &MacArgs) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let data = io::read_input(args.input.as_deref())?;
    let tag = ks.mac(&args.key, &data)?;
    io::write_output(args.out.as_deref(), &tag)
}

pub fn mac_verify(ctx: &Context, args: &MacVerifyArgs) -> CmdResult {
    let tag = io::read_small_file(&args.tag, "tag")?;
    let ks = io::open_keystore(ctx)?;
    let data = io::read_input(args.input.as_deref())?;
    ks.verify_mac(&args.key, &data, &tag)?;
    valid(ctx, "tag valid")
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

fn valid(ctx: &Context, text: &str) -> Result<(), Failure> {
    if ctx.json {
        io::print_json(&serde_json::json!({ "valid": true }))
    } else {
        io::print_line(text)
    }
}
