//! `keyhold key …`: create, list, show, id, pubkey; the lifecycle commands (rotate, states,
//! destroy, set, history) are in `lifecycle.rs`.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use keyhold::{KeyInfo, KeyOptions, KeyRequest, KeySpec, KeyState, KeyType, Purpose, RsaPadding};

use super::lifecycle::{self, DestroyArgs, ReasonArgs, SetArgs};
use super::select::{self, KeySelector};
use super::{io, CmdResult, Context};
use keyhold::time::format_utc;

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key; prints its key ID
    Create(CreateArgs),
    /// List the keys of the namespace (destroyed ones too with --all)
    List(ListArgs),
    /// Show a key's record, with every attribute it records
    Show(KeyArg),
    /// Print the key ID of the key NAME in --namespace
    Id(IdArgs),
    /// Export a key's public key
    Pubkey(PubkeyArgs),
    /// Make a new version of a key (same ID; older versions still decrypt and verify)
    Rotate(ReasonArgs),
    /// Suspend an active key: it only decrypts and verifies until resumed
    Suspend(ReasonArgs),
    /// Make a suspended key active again
    Resume(ReasonArgs),
    /// Deactivate a key for good: it only decrypts and verifies
    Deactivate(ReasonArgs),
    /// Mark a key compromised: it never protects again, and processes only with
    /// --allow-compromised
    Compromise(ReasonArgs),
    /// Schedule a key's destruction (in 7 days by default), or destroy it now with --now; its ID
    /// then answers "destroyed on DATE"
    Destroy(DestroyArgs),
    /// Cancel a key's scheduled destruction
    CancelDestroy(ReasonArgs),
    /// Change a key's schedule or version policy
    Set(SetArgs),
    /// Show every lifecycle event of a key, oldest first
    History(KeyArg),
    /// Export an exportable key, wrapped under a key of the store (a token key: under a key its
    /// security officer marked trusted) or to an RSA public key
    Export(super::transport::ExportArgs),
    /// Import a key: wrapped (--unwrap-with), or a PKCS#8 private key or raw AES/HMAC key
    Import(super::transport::ImportArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Also list destroyed keys (tombstones)
    #[arg(long)]
    all: bool,
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

    #[command(flatten)]
    spec: SpecArgs,

    /// The backend to create the key in (a name from the configuration); a backend configured
    /// with fallback = "software" may make the key in software instead, with a warning
    #[arg(long, default_value = "software")]
    backend: String,

    /// Let the key leave its device wrapped under another key (never in clear; `key export`);
    /// off by default
    #[arg(long, visible_alias = "exportable")]
    extractable: bool,

    /// Create the key in pre-activation, active from TIME (RFC 3339 UTC, or +DURATION from now)
    #[arg(long, value_name = "TIME")]
    activate_at: Option<String>,

    /// Deactivate the key at TIME (RFC 3339 UTC, or +DURATION from now)
    #[arg(long, value_name = "TIME")]
    deactivate_at: Option<String>,

    /// Rotate the key when its current version is DURATION old (e.g. 90d)
    #[arg(long, value_name = "DURATION")]
    rotate_after: Option<String>,
}

/// A key's type, purpose and padding, as `key create` and `key import` take them.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// ecdsa-p256, ecdsa-p384, ed25519, rsa-2048, rsa-3072, rsa-4096, aes-256-gcm, hmac-sha256
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_key_type)]
    key_type: KeyType,

    /// sign, decrypt, encrypt or mac [default: the type's first purpose]
    #[arg(long, value_parser = parse_purpose)]
    purpose: Option<Purpose>,

    /// RSA signature padding [default: pss]
    #[arg(long, value_enum)]
    padding: Option<PaddingArg>,
}

impl SpecArgs {
    /// The spec asked for, checked.
    pub fn spec(&self) -> keyhold::Result<KeySpec> {
        let padding = self.padding.map(|p| match p {
            PaddingArg::Pss => RsaPadding::Pss,
            PaddingArg::Pkcs1v15 => RsaPadding::Pkcs1v15,
        });
        KeySpec::new(self.key_type, self.purpose, padding)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PaddingArg {
    Pss,
    Pkcs1v15,
}

#[derive(Debug, Args)]
pub struct KeyArg {
    #[command(flatten)]
    pub key: KeySelector,
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
        KeyCommand::List(a) => list(ctx, a),
        KeyCommand::Show(a) => show(ctx, a),
        KeyCommand::Id(a) => id(ctx, a),
        KeyCommand::Pubkey(a) => pubkey(ctx, a),
        KeyCommand::Rotate(a) => lifecycle::rotate(ctx, a),
        KeyCommand::Suspend(a) => lifecycle::transition(ctx, a, keyhold::Transition::Suspend),
        KeyCommand::Resume(a) => lifecycle::transition(ctx, a, keyhold::Transition::Resume),
        KeyCommand::Deactivate(a) => lifecycle::transition(ctx, a, keyhold::Transition::Deactivate),
        KeyCommand::Compromise(a) => lifecycle::transition(ctx, a, keyhold::Transition::Compromise),
        KeyCommand::Destroy(a) => lifecycle::destroy(ctx, a),
        KeyCommand::CancelDestroy(a) => lifecycle::cancel_destroy(ctx, a),
        KeyCommand::Set(a) => lifecycle::set(ctx, a),
        KeyCommand::History(a) => lifecycle::history(ctx, a),
        KeyCommand::Export(a) => super::transport::export(ctx, a),
        KeyCommand::Import(a) => super::transport::import(ctx, a),
    }
}

fn create(ctx: &Context, args: &CreateArgs) -> CmdResult {
    // Check the request before unsealing anything.
    let spec = args.spec.spec()?;
    keyhold::validate_name("namespace", &ctx.namespace)?;
    keyhold::validate_name("key name", &args.name)?;
    // Times `+DURATION` count from when the store is open (unsealing may take seconds): the
    // options are checked now and made again then.
    create_options(args, keyhold::time::now())?;
    let ks = io::open_keys(ctx)?;
    let options = create_options(args, keyhold::time::now())?;
    let info = ks.create_key_with(
        &KeyRequest {
            namespace: ctx.namespace.clone(),
            name: args.name.clone(),
            spec,
            backend: Some(args.backend.clone()),
        },
        &options,
    )?;
    // A key made in software in place of the backend asked for is weaker than asked (its
    // material lives in this process, not in the device): never only an ID.
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
        io::print_json(&info_json(&info))
    } else {
        io::print_line(&info.id)
    }
}

/// The options of `key create`, with times counted from `now`.
fn create_options(args: &CreateArgs, now: i64) -> keyhold::Result<KeyOptions> {
    let instant = |text: &Option<String>| {
        text.as_deref()
            .map(|t| keyhold::time::parse_instant(t, now))
            .transpose()
    };
    Ok(KeyOptions::new()
        .extractable(args.extractable)
        .activate_at(instant(&args.activate_at)?)
        .deactivate_at(instant(&args.deactivate_at)?)
        .rotate_after(
            args.rotate_after
                .as_deref()
                .map(keyhold::time::parse_duration)
                .transpose()?,
        ))
}

/// The backend a software key was made in place of, and why.
fn fallback_of(info: &KeyInfo) -> Option<(&str, &str)> {
    info.fallback()
}

fn list(ctx: &Context, args: &ListArgs) -> CmdResult {
    let ks = io::open_keys(ctx)?;
    let keys = if args.all {
        ks.list_all_keys(Some(&ctx.namespace))?
    } else {
        ks.list_keys(Some(&ctx.namespace))?
    };
    if ctx.json {
        return io::print_json(&serde_json::Value::Array(
            keys.iter().map(info_json).collect(),
        ));
    }
    let name_width = keys.iter().map(|k| k.name.len()).max().unwrap_or(0).max(4);
    let backends: Vec<String> = keys.iter().map(backend_cell).collect();
    let backend_width = backends.iter().map(String::len).max().unwrap_or(0).max(8);
    let mut out = format!(
        "{:name_width$}  {:11}  {:7}  {:backend_width$}  {:15}  ID\n",
        "NAME", "TYPE", "PURPOSE", "BACKEND", "STATE"
    );
    for (k, backend) in keys.iter().zip(&backends) {
        out.push_str(&format!(
            "{:name_width$}  {:11}  {:7}  {:backend_width$}  {:15}  {}\n",
            k.name,
            k.spec.key_type().as_str(),
            k.spec.purpose().as_str(),
            backend,
            state_cell(k),
            k.id
        ));
    }
    io::write_output(None, out.as_bytes())
}

/// `key list`'s STATE cell: the state, or `destroy-pending` while a destruction is scheduled.
fn state_cell(info: &KeyInfo) -> &'static str {
    if info.destroy_at.is_some() && info.state != KeyState::Destroyed {
        "destroy-pending"
    } else {
        info.state.as_str()
    }
}

/// `key list`'s BACKEND cell: the backend, or `software(fallback:tpm)` for a key made in software
/// in place of backend `tpm` (one word, so that the table still splits on whitespace).
fn backend_cell(info: &KeyInfo) -> String {
    match info.fallback().map(|(original, _)| original) {
        Some(original) => format!("{}(fallback:{original})", info.backend),
        None => info.backend.clone(),
    }
}

fn id(ctx: &Context, args: &IdArgs) -> CmdResult {
    keyhold::validate_name("namespace", &ctx.namespace)?;
    keyhold::validate_name("key name", &args.name)?;
    let ks = io::open_keys(ctx)?;
    let id = select::id_of_name(ctx, &*ks, &args.name)?;
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
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
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
        ("backend", backend_text(&info, &ks.sealer_kind()?)),
        ("locator", info.locator.clone()),
        ("state", state_text(&info)),
        ("version", info.version.to_string()),
        ("versions", versions_text(&info)),
        ("min decrypt version", info.min_decrypt_version.to_string()),
        ("rotate after", duration_text(info.rotate_after)),
        (
            "activate at",
            info.activate_at.map_or("-".into(), format_utc),
        ),
        (
            "deactivate at",
            info.deactivate_at.map_or("never".into(), format_utc),
        ),
        ("created", format_utc(info.created_at)),
    ];
    let mut fields = fields.to_vec();
    if let Some(at) = info.destroyed_at {
        fields.push(("destroyed", format_utc(at)));
    }
    let mut out = String::new();
    for (field, value) in fields {
        out.push_str(&format!("{field}: {value}\n"));
    }
    // One line per attribute: a value may hold any text (a fallback's reason has ", "), and
    // device text is escaped so that it can neither drive the terminal nor start a line.
    for (name, value) in &info.attributes {
        out.push_str(&format!(
            "attribute {}: {}\n",
            io::terminal_safe(name),
            io::terminal_safe(value)
        ));
    }
    io::write_output(None, out.as_bytes())
}

/// `active`, `active, destruction scheduled for DATE`, `destroyed`.
fn state_text(info: &KeyInfo) -> String {
    match info.destroy_at {
        Some(at) if info.state != KeyState::Destroyed => {
            format!(
                "{}, destruction scheduled for {}",
                info.state,
                format_utc(at)
            )
        }
        _ => info.state.to_string(),
    }
}

/// `1 (DATE), 2 (DATE)`; `-` for a destroyed key, whose versions are gone.
fn versions_text(info: &KeyInfo) -> String {
    if info.versions.is_empty() {
        return "-".into();
    }
    info.versions
        .iter()
        .map(|v| format!("{} ({})", v.version, format_utc(v.created_at)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A duration in seconds as people write it (`90days`, `1h 30m`), or `never`.
pub(super) fn duration_text(secs: Option<i64>) -> String {
    match secs.and_then(|s| u64::try_from(s).ok()) {
        Some(s) => humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
        None => "never".into(),
    }
}

fn pubkey(ctx: &Context, args: &PubkeyArgs) -> CmdResult {
    args.key.check()?;
    if matches!(args.format, PubkeyFormat::Der) {
        io::check_binary_output(args.out.as_deref(), "DER public key", ", or --format pem")?;
    }
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let public = ks.public_key_version(&id, None)?;
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

/// `hsm`, or `software (sealed by passphrase)`, or `software (sealed by tpm; fallback for tpm)`.
fn backend_text(info: &KeyInfo, sealer: &str) -> String {
    if info.backend != "software" {
        return info.backend.clone();
    }
    match info.fallback().map(|(original, _)| original) {
        Some(original) => format!("software (sealed by {sealer}; fallback for {original})"),
        None => format!("software (sealed by {sealer})"),
    }
}

/// The key object of `--json` outputs (docs/cli.md).
pub(super) fn info_json(info: &KeyInfo) -> serde_json::Value {
    info.to_json()
}
