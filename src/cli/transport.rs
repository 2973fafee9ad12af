//! `keyhold key export` and `keyhold key import`: keys leave only wrapped, and come in wrapped or
//! as a private key or raw secret brought from outside (docs/cli.md, "Key transport").

use std::path::PathBuf;

use clap::Args;
use keyhold::{ExportTo, KeyOptions, KeyRequest};

use super::io;
use super::select::KeySelector;
use super::{CmdResult, Context, Failure};

/// The most bytes a key file to import or a public key to wrap to may have.
const MAX_KEY_FILE: usize = 1024 * 1024;

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("wrapping")
        .required(true)
        .args(["wrap_with", "to_public", "wrap_with_trusted"])
))]
pub struct ExportArgs {
    #[command(flatten)]
    key: KeySelector,

    /// Wrap under this aes-256-gcm key of the store (its key ID): RFC 5649 AES key wrap with
    /// padding (`openssl enc -d -id-aes256-wrap-pad -iv A65959A6` unwraps it)
    #[arg(long, value_name = "ID")]
    wrap_with: Option<String>,

    /// Wrap to this RSA public key (PEM or DER): CKM_RSA_AES_KEY_WRAP, RSA-OAEP-SHA256 of a
    /// fresh AES-256 key followed by RFC 5649 under it
    #[arg(long, value_name = "PEM")]
    to_public: Option<PathBuf>,

    /// Token keys: wrap inside the token under the AES-256 key with this CKA_LABEL that the
    /// token's security officer marked trusted (CKA_TRUSTED): RFC 5649, as --wrap-with
    #[arg(long, value_name = "LABEL")]
    wrap_with_trusted: Option<String>,

    /// Write the wrapped key to FILE; - is stdout [default: stdout, refused if a terminal]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The key's name, unique in its namespace
    name: String,

    #[command(flatten)]
    spec: super::key::SpecArgs,

    /// The key file: wrapped (with --unwrap-with), else a PKCS#8 private key (PEM or DER) or an
    /// AES or HMAC key's 32 raw bytes; - is stdin
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,

    /// Unwrap the file with this key of the store (its ID): an aes-256-gcm key (RFC 5649) or an
    /// RSA decrypt key (CKM_RSA_AES_KEY_WRAP)
    #[arg(long, value_name = "ID")]
    unwrap_with: Option<String>,

    /// The backend to hold the key (a name from the configuration)
    #[arg(long, default_value = "software")]
    backend: String,

    /// Let the imported key leave again, wrapped (`key export`); off by default
    #[arg(long)]
    exportable: bool,
}

/// Refuses, before the store is opened, something other than a key ID where one goes.
fn check_id(option: &str, id: &str) -> Result<(), Failure> {
    if id.starts_with(keyhold::KEY_ID_PREFIX) {
        return Ok(());
    }
    Err(Failure::Usage(format!(
        "{option} takes a key ID ({}…): `keyhold key id NAME` prints the ID of a key by name",
        keyhold::KEY_ID_PREFIX
    )))
}

pub fn export(ctx: &Context, args: &ExportArgs) -> CmdResult {
    args.key.check()?;
    if let Some(kek) = &args.wrap_with {
        check_id("--wrap-with", kek)?;
    }
    if args.wrap_with_trusted.as_deref() == Some("") {
        return Err(Failure::Usage(
            "--wrap-with-trusted takes the CKA_LABEL of a wrapping key on the token, not an \
             empty string"
                .into(),
        ));
    }
    let out = io::std_or(args.out.as_deref());
    io::check_binary_output(args.out.as_deref(), "wrapped key", "")?;
    let public = args
        .to_public
        .as_deref()
        .map(|path| read_file(path, "public key"))
        .transpose()?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, ks.as_ref())?;
    let to = match (&args.wrap_with, &public, &args.wrap_with_trusted) {
        (Some(kek), _, _) => ExportTo::Key(kek),
        (None, Some(public), _) => ExportTo::Public(public),
        (None, None, Some(label)) => ExportTo::Trusted(label),
        (None, None, None) => {
            return Err(Failure::Usage(
                "say what to wrap the key under: --wrap-with ID, --to-public PEM or \
                 --wrap-with-trusted LABEL"
                    .into(),
            ))
        }
    };
    let wrapped = ks.export_key(&id, to)?;
    io::write_output(out, &wrapped)
}

pub fn import(ctx: &Context, args: &ImportArgs) -> CmdResult {
    // Check the request before unsealing anything.
    let spec = args.spec.spec()?;
    keyhold::validate_name("namespace", &ctx.namespace)?;
    keyhold::validate_name("key name", &args.name)?;
    if let Some(id) = &args.unwrap_with {
        check_id("--unwrap-with", id)?;
    }
    let input = read_file(&args.input, "key file")?;
    let ks = io::open_keys(ctx)?;
    let info = ks.import_key(
        &KeyRequest {
            namespace: ctx.namespace.clone(),
            name: args.name.clone(),
            spec,
            backend: Some(args.backend.clone()),
        },
        &input,
        args.unwrap_with.as_deref(),
        &KeyOptions::new().extractable(args.exportable),
    )?;
    if ctx.json {
        io::print_json(&serde_json::json!({
            "id": info.id,
            "namespace": info.namespace,
            "name": info.name,
            "type": info.spec.key_type().as_str(),
            "purpose": info.spec.purpose().as_str(),
            "backend": info.backend,
            "origin": "imported",
        }))
    } else {
        io::print_line(&info.id)
    }
}

/// A small file (a key, a public key), read into zeroizing memory; `-` is stdin.
fn read_file(path: &std::path::Path, what: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, Failure> {
    let data = io::read_input(io::std_or(Some(path)))?;
    if data.len() > MAX_KEY_FILE {
        return Err(Failure::Cli(format!(
            "the {what} {} is larger than {MAX_KEY_FILE} bytes: it is not a key",
            path.display()
        )));
    }
    Ok(data)
}
