//! The operations: sign, verify, encrypt, decrypt, rewrap, mac, mac-verify, random.
//!
//! With `--json`, what a use reports (the key version used, the key's state, whether it is
//! compromised) is JSON; binary outputs (envelopes, plaintexts) are never wrapped in it: they go
//! to `--out` or stdout as without `--json`, and the report goes to stdout when `--out` names a
//! file, else to stderr.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use keyhold::{KeyService, KeyState, SignatureFormat, UseOptions, Used};

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
    /// How the signature bytes are written: raw, hex or base64 (text, with a newline); with
    /// --json and no --out, the JSON's `signature` is hex with hex, else base64
    #[arg(long, value_enum, default_value = "raw")]
    encoding: Encoding,
}

/// What a check (verify, mac-verify, decrypt) may use beyond the defaults.
#[derive(Debug, Args)]
pub struct ProcessOptions {
    /// Use a compromised key anyway (the output says so, and a warning is logged)
    #[arg(long)]
    allow_compromised: bool,
}

impl ProcessOptions {
    fn use_options(&self) -> UseOptions {
        UseOptions::new().allow_compromised(self.allow_compromised)
    }
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
    /// Verify with key version N only [default: every version from the key's min decrypt
    /// version up, newest first]
    #[arg(long, value_name = "N")]
    version: Option<u32>,
    #[command(flatten)]
    process: ProcessOptions,
}

#[derive(Debug, Args)]
pub struct EncryptArgs {
    #[command(flatten)]
    key: KeySelector,
    /// Additional authenticated data (the same to encrypt and to decrypt)
    #[arg(long, value_name = "TEXT", default_value = "")]
    aad: String,
    #[arg(long = "in", value_name = "FILE", help = IN_HELP)]
    input: Option<PathBuf>,
    /// Write to FILE; - is stdout [default: stdout, refused if a terminal]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// `decrypt` and `rewrap`: encrypt's options, and the use of a compromised key.
#[derive(Debug, Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    envelope: EncryptArgs,
    #[command(flatten)]
    process: ProcessOptions,
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
    /// How the tag bytes are written: raw, hex or base64 (text, with a newline); with --json and
    /// no --out, the JSON's `tag` is hex with hex, else base64
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
    /// Check with key version N only [default: every version from the key's min decrypt
    /// version up, newest first]
    #[arg(long, value_name = "N")]
    version: Option<u32>,
    #[command(flatten)]
    process: ProcessOptions,
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
    if args.encoding.is_binary() && !ctx.json {
        io::check_binary_output(args.out.as_deref(), "signature", AS_TEXT)?;
    }
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let message = io::read_input(io::std_or(args.input.as_deref()))?;
    let used = ks.sign_with(&id, &message, args.format.into(), &UseOptions::new())?;
    protected(ctx, &used, "signature", args.out.as_deref(), args.encoding)
}

/// Writes a signature or tag (`what`): to `out`, or as `--json` says (docs/cli.md): without
/// `--out FILE` a JSON object holding it as text, the version and the state; with it, the bytes
/// to the file and the JSON without them.
fn protected(
    ctx: &Context,
    used: &Used<Vec<u8>>,
    what: &str,
    out: Option<&std::path::Path>,
    encoding: Encoding,
) -> CmdResult {
    let out = io::std_or(out);
    if !ctx.json {
        return io::write_output(out, &encoding.encode(&used.output));
    }
    let mut json = use_json(used.version, used.state);
    if out.is_some() {
        io::write_output(out, &encoding.encode(&used.output))?;
    } else if let Some(object) = json.as_object_mut() {
        object.insert(what.into(), encoding.json_text(&used.output).into());
    }
    io::print_json(&json)
}

/// Through `--remote`, the keystore that used a compromised key (and logged the warning that it
/// did, src/keystore/ops.rs) is the service's: the command says so on its own stderr too, as it
/// does run here, naming the key as `namespace/name` (asked of the service: only on this path).
fn warn_remote_compromised(
    ctx: &Context,
    ks: &dyn KeyService,
    id: &str,
    operation: &str,
    state: KeyState,
) {
    if ctx.remote.is_none() || state != KeyState::Compromised {
        return;
    }
    let label = ks
        .key_info(id)
        .map(|info| format!("{}/{}", info.namespace, info.name))
        .unwrap_or_else(|_| id.to_owned());
    tracing::warn!(key = %label, "used a compromised key ({operation})");
}

/// The operation `open_envelope` ran, by the output it names.
fn what_operation(what: &str) -> &'static str {
    if what == "plaintext" {
        "decrypt"
    } else {
        "rewrap"
    }
}

/// `{"version": N, "state": "…", "compromised": bool}`: what every `--json` report of a use says.
fn use_json(version: u32, state: KeyState) -> serde_json::Value {
    serde_json::json!({
        "version": version,
        "state": state.as_str(),
        "compromised": state == KeyState::Compromised,
    })
}

/// With `--json`, reports a use whose output is binary (encrypt, decrypt, rewrap): on stdout when
/// the output went to a file, else on stderr, so that stdout holds only the bytes.
fn report_binary_use(
    ctx: &Context,
    out: Option<&std::path::Path>,
    version: u32,
    state: KeyState,
) -> CmdResult {
    if !ctx.json {
        return Ok(());
    }
    let json = use_json(version, state);
    if io::std_or(out).is_some() {
        io::print_json(&json)
    } else {
        eprintln!("{json}");
        Ok(())
    }
}

pub fn verify(ctx: &Context, args: &VerifyArgs) -> CmdResult {
    args.key.check()?;
    let signature = read_check_value(&args.signature, args.input.as_deref(), "signature")?;
    let signature = args.encoding.decode(signature, "signature")?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let message = io::read_input(io::std_or(args.input.as_deref()))?;
    let options = args.process.use_options().version(args.version);
    let outcome = ks.verify_with(&id, &message, &signature, args.format.into(), &options);
    if let Ok(used) = &outcome {
        warn_remote_compromised(ctx, &*ks, &id, "verify", used.state);
    }
    valid(ctx, outcome, "signature valid")
}

pub fn encrypt(ctx: &Context, args: &EncryptArgs) -> CmdResult {
    args.key.check()?;
    io::check_binary_output(args.out.as_deref(), "envelope", "")?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let plaintext = io::read_input(io::std_or(args.input.as_deref()))?;
    let used = ks.encrypt_with(&id, &plaintext, args.aad.as_bytes(), &UseOptions::new())?;
    io::write_output(io::std_or(args.out.as_deref()), &used.output)?;
    report_binary_use(ctx, args.out.as_deref(), used.version, used.state)
}

pub fn decrypt(ctx: &Context, args: &DecryptArgs) -> CmdResult {
    open_envelope(
        ctx,
        args,
        "plaintext",
        |ks, id, envelope, aad, options| ks.decrypt_with(id, envelope, aad, options),
        |plaintext| plaintext.expose(),
    )
}

/// `keyhold rewrap`: an envelope in, the same plaintext under the key's newest version out; the
/// plaintext stays inside the library.
pub fn rewrap(ctx: &Context, args: &DecryptArgs) -> CmdResult {
    open_envelope(
        ctx,
        args,
        "envelope",
        |ks, id, envelope, aad, options| ks.rewrap(id, envelope, aad, options),
        |envelope| envelope.as_slice(),
    )
}

/// Runs `op` on the envelope `args` name and writes its output (`what`, binary; `bytes` gives
/// it) as `decrypt` and `rewrap` do, with the `--json` report of the version and state.
fn open_envelope<T>(
    ctx: &Context,
    args: &DecryptArgs,
    what: &str,
    op: impl FnOnce(&dyn KeyService, &str, &[u8], &[u8], &UseOptions) -> keyhold::Result<Used<T>>,
    bytes: impl FnOnce(&T) -> &[u8],
) -> CmdResult {
    let options = args.process.use_options();
    let args = &args.envelope;
    args.key.check()?;
    io::check_binary_output(args.out.as_deref(), what, "")?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let envelope = io::read_envelope(io::std_or(args.input.as_deref()))?;
    let used = op(&*ks, &id, &envelope, args.aad.as_bytes(), &options)?;
    warn_remote_compromised(ctx, &*ks, &id, what_operation(what), used.state);
    io::write_output(io::std_or(args.out.as_deref()), bytes(&used.output))?;
    report_binary_use(ctx, args.out.as_deref(), used.version, used.state)
}

pub fn mac(ctx: &Context, args: &MacArgs) -> CmdResult {
    args.key.check()?;
    if args.encoding.is_binary() && !ctx.json {
        io::check_binary_output(args.out.as_deref(), "tag", AS_TEXT)?;
    }
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let data = io::read_input(io::std_or(args.input.as_deref()))?;
    let used = ks.mac_with(&id, &data, &UseOptions::new())?;
    protected(ctx, &used, "tag", args.out.as_deref(), args.encoding)
}

pub fn mac_verify(ctx: &Context, args: &MacVerifyArgs) -> CmdResult {
    args.key.check()?;
    let tag = read_check_value(&args.tag, args.input.as_deref(), "tag")?;
    let tag = args.encoding.decode(tag, "tag")?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let data = io::read_input(io::std_or(args.input.as_deref()))?;
    let options = args.process.use_options().version(args.version);
    let outcome = ks.verify_mac_with(&id, &data, &tag, &options);
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
    // Here, from this process's generator, unless a service is asked: no store is opened.
    let bytes = match ctx.remote {
        Some(_) => io::open_keys(ctx)?.random(args.n)?,
        None => keyhold::random_bytes(args.n)?,
    };
    let hex = keyhold::hex::encode(&bytes);
    if ctx.json {
        io::print_json(&serde_json::json!({ "hex": hex }))
    } else {
        io::print_line(&hex)
    }
}

/// Reports a verification: valid (exit 0; with `--json` also the version that verified and the
/// key's state), or invalid (exit 1) as `keyhold: … invalid` on stderr, or with `--json` as
/// `{"valid":false}` on stdout.
fn valid(ctx: &Context, outcome: keyhold::Result<Used<()>>, text: &str) -> CmdResult {
    match outcome {
        Ok(used) if ctx.json => {
            let mut json = use_json(used.version, used.state);
            if let Some(object) = json.as_object_mut() {
                object.insert("valid".into(), true.into());
            }
            io::print_json(&json)
        }
        Ok(_) => io::print_line(text),
        Err(keyhold::Error::VerificationFailed { .. }) if ctx.json => {
            io::print_json(&serde_json::json!({ "valid": false }))?;
            Err(Failure::Quiet)
        }
        Err(e) => Err(e.into()),
    }
}
