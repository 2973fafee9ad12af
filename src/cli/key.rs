//! `keyhold key …`: create, list, show, pubkey, destroy.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use keyhold::{KeyInfo, KeyOptions, KeyRequest, KeySpec, KeyType, Purpose, RsaPadding};

use super::{io, CmdResult, Context};

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key; prints its key ID
    Create(CreateArgs),
    /// List the keys of the namespace
    List,
    /// Show a key's record
    Show(KeyArg),
    /// Export a key's public key
    Pubkey(PubkeyArgs),
    /// Destroy a key; its ID then gives "no such key"
    Destroy(KeyArg),
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

    /// The backend to create the key in
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
    /// The key ID
    #[arg(long, value_name = "ID")]
    key: String,
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
    /// The key ID
    #[arg(long, value_name = "ID")]
    key: String,

    /// Output format
    #[arg(long, value_enum, default_value = "pem")]
    format: PubkeyFormat,

    /// Write to FILE instead of stdout
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
    if ctx.json {
        io::print_json(&info_json(&info))
    } else {
        io::print_line(&info.id)
    }
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
    let mut out = format!(
        "{:name_width$}  {:11}  {:7}  {:8}  {:6}  ID\n",
        "NAME", "TYPE", "PURPOSE", "BACKEND", "STATE"
    );
    for k in &keys {
        out.push_str(&format!(
            "{:name_width$}  {:11}  {:7}  {:8}  {:6}  {}\n",
            k.name,
            k.spec.key_type().as_str(),
            k.spec.purpose().as_str(),
            k.backend,
            k.state.as_str(),
            k.id
        ));
    }
    io::write_output(None, out.as_bytes())
}

fn show(ctx: &Context, args: &KeyArg) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let info = ks.key_info(&args.key)?;
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
        ("created", utc(info.created_at)),
        ("attributes", attributes_text(&info)),
    ];
    let mut out = String::new();
    for (field, value) in fields {
        out.push_str(&format!("{field}: {value}\n"));
    }
    io::write_output(None, out.as_bytes())
}

fn pubkey(ctx: &Context, args: &PubkeyArgs) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let public = ks.public_key(&args.key)?;
    let bytes = match args.format {
        PubkeyFormat::Pem => public.to_pem().into_bytes(),
        PubkeyFormat::Der => public.spki_der().to_vec(),
        PubkeyFormat::Jwk => {
            let mut jwk = public.to_jwk()?.to_string();
            jwk.push('\n');
            jwk.into_bytes()
        }
    };
    io::write_output(args.out.as_deref(), &bytes)
}

fn destroy(ctx: &Context, args: &KeyArg) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let info = ks.destroy_key(&args.key)?;
    if ctx.json {
        io::print_json(&info_json(&info))
    } else {
        io::print_line(&format!("destroyed {}/{}", info.namespace, info.name))
    }
}

/// `hsm`, or `software (sealed by passphrase)`, or `software (sealed by tpm; fallback for tpm)`.
fn backend_text(info: &KeyInfo, sealer: &str) -> String {
    if info.backend != "software" {
        return info.backend.clone();
    }
    match info.attributes.get("fallback_for") {
        Some(original) => format!("software (sealed by {sealer}; fallback for {original})"),
        None => format!("software (sealed by {sealer})"),
    }
}

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
        "created": utc(info.created_at),
        "attributes": info.attributes,
    })
}

/// Seconds since the epoch as an RFC 3339 UTC timestamp (days-to-civil from H. Hinnant's
/// `chrono`-compatible algorithms).
fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_795_443_561), "2026-11-23T14:19:21Z");
    }
}
