//! `keyhold audit …`: verify the audit log's chain, show its entries.

use clap::{Args, Subcommand};
use keyhold::audit::Entry;
use keyhold::time::{format_utc, parse_instant};

use super::{io, select, CmdResult, Context};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every entry's MAC and the hash chain; prints the count and the head
    Verify,
    /// Show entries, oldest first
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Only the entries of the key with this ID (kh1_…; the key may be destroyed)
    #[arg(long, value_name = "ID", conflicts_with = "name")]
    key: Option<String>,

    /// Only the entries of the key NAME in --namespace (a key that still exists)
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Only entries at or after TIME: RFC 3339 UTC (2026-12-31T00:00:00Z)
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
}

pub fn run(ctx: &Context, command: &AuditCommand) -> CmdResult {
    match command {
        AuditCommand::Verify => verify(ctx),
        AuditCommand::Show(a) => show(ctx, a),
    }
}

fn verify(ctx: &Context) -> CmdResult {
    let ks = io::open_store_keys(ctx)?;
    let verified = ks.verify_audit()?;
    let head = keyhold::hex::encode(&verified.head);
    if verified.cut_short {
        tracing::warn!(
            "the audit log ends in a line cut short by a crash mid-write; it is not an entry, \
             and the next write drops it"
        );
    }
    if ctx.json {
        io::print_json(&verified.to_json())
    } else {
        io::print_line(&format!(
            "audit log verified: {} entries, head {head}",
            verified.entries
        ))
    }
}

fn show(ctx: &Context, args: &ShowArgs) -> CmdResult {
    // Checked before the store is opened, as every other argument.
    let since = args
        .since
        .as_deref()
        .map(|t| parse_instant(t, keyhold::time::now()))
        .transpose()?;
    if let Some(name) = &args.name {
        keyhold::validate_name("key name", name)?;
    }
    let ks = io::open_store_keys(ctx)?;
    let id = match (&args.key, &args.name) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(name)) => Some(select::id_of_name(ctx, ks.keys(), name)?),
        (None, None) => None,
    };
    let entries = ks.audit_entries(id.as_deref(), since)?;
    if ctx.json {
        return io::print_json(&serde_json::Value::Array(
            entries.iter().map(Entry::to_json).collect(),
        ));
    }
    let mut out = String::new();
    for e in &entries {
        out.push_str(&entry_line(e));
        out.push('\n');
    }
    io::write_output(None, out.as_bytes())
}

/// `TIME seq=N OPERATION outcome=… namespace=… version=… uid=… pid=…[ client=…] key=…` (`-` for
/// none; `client=` only for what the service did for a client).
fn entry_line(e: &Entry) -> String {
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let client = e
        .client
        .as_deref()
        .map(|c| format!(" client={c}"))
        .unwrap_or_default();
    // Entries are MAC'd, but a MAC says who wrote them, not that their text is harmless to a
    // terminal.
    io::terminal_safe(&format!(
        "{} seq={} {} outcome={} namespace={} version={} uid={} pid={}{client} key={}",
        format_utc(e.time),
        e.seq,
        e.operation,
        e.outcome,
        or_dash(e.namespace.as_deref()),
        e.version.map_or_else(|| "-".to_owned(), |v| v.to_string()),
        e.caller.uid,
        e.caller.pid,
        or_dash(e.key_id.as_deref()),
    ))
}
