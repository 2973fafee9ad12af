//! `keyhold key …`: create, list, show, pubkey, destroy.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use keyhold::{KeyInfo, KeyOptions, KeyRequest, KeySpec, KeyType, Purpose, RsaPadding};

use super::select::{self, KeySelector};
use super::{io, CmdResult, Context};
use keyhold::time::format_utc;

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key; prints its key ID
    Create(CreateArgs),
    /// List the keys of the namespace
    List,
    /// Show a key's record, with every attribute it records
    Show(KeyArg),
    /// Print the key ID of the key NAME in --namespace
    Id(IdArgs),
    /// Export a key's public key
    Pubkey(PubkeyArgs),
    /// Destroy a key; its ID then gives "no such key"
    Destroy(KeyArg),
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// The key's name
    name: String,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The key's name, unique in its namespace
    name: String,

    /// ecdsa-p256, ecdsa-p384, ed25519, rsa-2048, rsa-3072, rsa-4096, aes-256-gcm, hmac-sha256
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_key_type)]
    key_type: KeyType,

    /// sign, decrypt, encrypt or mac [default: the type's first purpose]
    #[arg(long, value_parser = parse_purpose)]
    purpose: Option<Purpose>,

    /// RSA signature padding [default: pss]
    #[arg(long, value_enum)]
    padding: Option<PaddingArg>,

    /// The backend to create the key in (a name from the configuration); a backend configured
    /// with fallback = "software" may make the key in software instead, with a warning
    #[arg(long, default_value = "software")]
    backend: String,

    /// Let the key leave its device wrapped under another key (never in clear); off by default
    #[arg(long)]
    extractable: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PaddingArg {
    Pss,
    Pkcs1v15,
}

#[derive(Debug, Args)]
pub struct KeyArg {
    #[command(flatten)]
    key: KeySelector,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum PubkeyFormat {
    #[default]
    Pem,
    Der,
    Jwk,
}

#[derive(Debug, Args)]
pub struct PubkeyArgs {
    #[command(flatten)]
    key: KeySelector,

    /// Output format (der is binary: refused on a terminal without --out)
    #[arg(long, value_enum, default_value = "pem")]
    format: PubkeyFormat,

    /// Write to FILE instead of stdout; - is stdout
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

fn parse_key_type(s: &str) -> Result<KeyType, String> {
    s.parse().map_err(|e: keyhold::Error| e.to_string())
}

fn parse_purpose(s: &str) -> Result<Purpose, String> {
    s.parse().map_err(|e: keyhold::Error| e.to_string())
}

pub fn run(ctx: &Context, command: &KeyCommand) -> CmdResult {
    match command {
        KeyCommand::Create(a) => create(ctx, a),
        KeyCommand::List => list(ctx),
        KeyCommand::Show(a) => show(ctx, a),
        KeyCommand::Id(a) => id(ctx, a),
        KeyCommand::Pubkey(a) => pubkey(ctx, a),
        KeyCommand::Destroy(a) => destroy(ctx, a),
    }
}

fn create(ctx: &Context, args: &CreateArgs) -> CmdResult {
    let padding = args.padding.map(|p| match p {
        PaddingArg::Pss => RsaPadding::Pss,
        PaddingArg::Pkcs1v15 => RsaPadding::Pkcs1v15,
    });
    // Check the request before unsealing anything.
    let spec = KeySpec::new(args.key_type, args.purpose, padding)?;
    keyhold::validate_name("namespace", &ctx.namespace)?;
    keyhold::validate_name("key name", &args.name)?;
    let ks = io::open_keystore(ctx)?;
    let info = ks.create_key_with(
        &KeyRequest {
            namespace: ctx.namespace.clone(),
            name: args.name.clone(),
            spec,
            backend: Some(args.backend.clone()),
        },
        &KeyOptions::new().extractable(args.extractable),
    )?;
    // A key made in software in place of the backend asked for is weaker than asked (its
    // material lives in this process, not in the device): never only an ID.
    let fallback = fallback_json(&info);
    if let Some((original, reason)) = fallback_of(&info) {
        tracing::warn!(
            "backend `{original}` cannot make {} keys for {} ({reason}): key `{}/{}` was created \
             in the software backend instead (fallback = \"software\")",
            info.spec.key_type(),
            info.spec.purpose(),
            info.namespace,
            info.name
        );
    }
    if ctx.json {
        let mut json = info_json(&info);
        if let Some(object) = json.as_object_mut() {
            object.insert("fallback".into(), fallback);
        }
        io::print_json(&json)
    } else {
        io::print_line(&info.id)
    }
}

/// The attribute a software key made in place of another backend's records that backend in.
const FALLBACK_FOR: &str = "fallback_for";
/// Why it could not make the key there, recorded beside [`FALLBACK_FOR`].
const FALLBACK_REASON: &str = "fallback_reason";

/// The backend a software key was made in place of, and why (as recorded when it was made).
fn fallback_of(info: &KeyInfo) -> Option<(&str, &str)> {
    let original = info.attributes.get(FALLBACK_FOR)?;
    let reason = info
        .attributes
        .get(FALLBACK_REASON)
        .map_or("it could not make them", String::as_str);
    Some((original, reason))
}

/// `{"for": BACKEND, "reason": WHY}` for a fallback key, `null` for any other.
fn fallback_json(info: &KeyInfo) -> serde_json::Value {
    fallback_of(info).map_or(
        serde_json::Value::Null,
        |(original, reason)| serde_json::json!({ "for": original, "reason": reason }),
    )
}

fn list(ctx: &Context) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let keys = ks.list_keys(Some(&ctx.namespace))?;
    if ctx.json {
        return io::print_json(&serde_json::Value::Array(
            keys.iter().map(info_json).collect(),
        ));
    }
    let name_width = keys.iter().map(|k| k.name.len()).max().unwrap_or(0).max(4);
    let backends: Vec<String> = keys.iter().map(backend_cell).collect();
    let backend_width = backends.iter().map(String::len).max().unwrap_or(0).max(8);
    let mut out = format!(
        "{:name_width$}  {:11}  {:7}  {:backend_width$}  {:6}  ID\n",
        "NAME", "TYPE", "PURPOSE", "BACKEND", "STATE"
    );
    for (k, backend) in keys.iter().zip(&backends) {
        out.push_str(&format!(
            "{:name_width$}  {:11}  {:7}  {:backend_width$}  {:6}  {}\n",
            k.name,
            k.spec.key_type().as_str(),
            k.spec.purpose().as_str(),
            backend,
            k.state.as_str(),
            k.id
        ));
    }
    io::write_output(None, out.as_bytes())
}

/// `key list`'s BACKEND cell: the backend, or `software(fallback:tpm)` for a key made in software
/// in place of backend `tpm` (one word, so that the table still splits on whitespace).
fn backend_cell(info: &KeyInfo) -> String {
    match info.attributes.get(FALLBACK_FOR) {
        Some(original) => format!("{}(fallback:{original})", info.backend),
        None => info.backend.clone(),
    }
}

fn id(ctx: &Context, args: &IdArgs) -> CmdResult {
    keyhold::validate_name("namespace", &ctx.namespace)?;
    keyhold::validate_name("key name", &args.name)?;
    let ks = io::open_keystore(ctx)?;
    let id = select::id_of_name(ctx, &ks, &args.name)?;
    if ctx.json {
        io::print_json(&serde_json::json!({
            "id": id,
            "namespace": ctx.namespace,
            "name": args.name,
        }))
    } else {
        io::print_line(&id)
    }
}

fn show(ctx: &Context, args: &KeyArg) -> CmdResult {
    args.key.check()?;
    let ks = io::open_keystore(ctx)?;
    let id = args.key.resolve(ctx, &ks)?;
    let info = ks.key_info(&id)?;
    if ctx.json {
        return io::print_json(&info_json(&info));
    }
    let fields = [
        ("id", info.id.clone()),
        ("store", info.store_id.clone()),
        ("namespace", info.namespace.clone()),
        ("name", info.name.clone()),
        ("type", info.spec.key_type().to_string()),
        ("purpose", info.spec.purpose().to_string()),
        ("algorithm", info.spec.algorithm().to_string()),
        ("backend", backend_text(&info, ks.sealer_kind())),
        ("locator", info.locator.clone()),
        ("state", info.state.to_string()),
        ("version", info.version.to_string()),
        ("created", format_utc(info.created_at)),
        ("attributes", attributes_text(&info)),
    ];
    let mut fields = fields.to_vec();
    if let Some(at) = info.destroyed_at {
        fields.push(("destroyed", format_utc(at)));
    }
    let mut out = String::new();
    for (field, value) in fields {
        out.push_str(&format!("{field}: {value}\n"));
    }
    io::write_output(None, out.as_bytes())
}

fn pubkey(ctx: &Context, args: &PubkeyArgs) -> CmdResult {
    args.key.check()?;
    if matches!(args.format, PubkeyFormat::Der) {
        io::check_binary_output(args.out.as_deref(), "DER public key", ", or --format pem")?;
    }
    let ks = io::open_keystore(ctx)?;
    let id = args.key.resolve(ctx, &ks)?;
    let public = ks.public_key(&id)?;
    let bytes = match args.format {
        PubkeyFormat::Pem => public.to_pem().into_bytes(),
        PubkeyFormat::Der => public.spki_der().to_vec(),
        PubkeyFormat::Jwk => {
            let mut jwk = public.to_jwk()?.to_string();
            jwk.push('\n');
            jwk.into_bytes()
        }
    };
    io::write_output(io::std_or(args.out.as_deref()), &bytes)
}

fn destroy(ctx: &Context, args: &KeyArg) -> CmdResult {
    args.key.check()?;
    let ks = io::open_keystore(ctx)?;
    let id = args.key.resolve(ctx, &ks)?;
    let info = ks.destroy_key(&id)?;
    if ctx.json {
        // The info is the record as it was before: what is true now is that it is destroyed.
        let mut json = info_json(&info);
        if let Some(object) = json.as_object_mut() {
            object.insert("state".into(), "destroyed".into());
        }
        io::print_json(&json)
    } else {
        io::print_line(&format!("destroyed {}/{}", info.namespace, info.name))
    }
}

/// `hsm`, or `software (sealed by passphrase)`, or `software (sealed by tpm; fallback for tpm)`.
fn backend_text(info: &KeyInfo, sealer: &str) -> String {
    if info.backend != "software" {
        return info.backend.clone();
    }
    match info.attributes.get(FALLBACK_FOR) {
        Some(original) => format!("software (sealed by {sealer}; fallback for {original})"),
        None => format!("software (sealed by {sealer})"),
    }
}

/// Every attribute the record holds, sorted by name: `name=value, …`, or `-` for none.
fn attributes_text(info: &KeyInfo) -> String {
    if info.attributes.is_empty() {
        return "-".into();
    }
    info.attributes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn info_json(info: &KeyInfo) -> serde_json::Value {
    serde_json::json!({
        "id": info.id,
        "store_id": info.store_id,
        "namespace": info.namespace,
        "name": info.name,
        "type": info.spec.key_type().as_str(),
        "purpose": info.spec.purpose().as_str(),
        "algorithm": info.spec.algorithm().as_str(),
        "backend": info.backend,
        "locator": info.locator,
        "state": info.state.as_str(),
        "version": info.version,
        "created": format_utc(info.created_at),
        "attributes": info.attributes,
        "fallback": fallback_json(info),
    })
}
