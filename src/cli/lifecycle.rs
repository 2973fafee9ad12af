//! The key lifecycle on the command line: `key rotate|suspend|resume|deactivate|compromise|
//! destroy|cancel-destroy|set|history` and `keyhold maintain`. The rules (states, schedules,
//! versions) are the library's (`keyhold::Keystore`); this file parses, asks and reports.

use clap::Args;
use keyhold::time::format_utc;
use keyhold::{KeyInfo, PolicyText, Transition};

use super::key::{info_json, KeyArg};
use super::select::KeySelector;
use super::{io, CmdResult, Context, Failure};

/// How long a destruction waits by default (`key destroy` without `--after` or `--now`).
const DEFAULT_DESTROY_AFTER: &str = "7d";

#[derive(Debug, Args)]
pub struct ReasonArgs {
    #[command(flatten)]
    key: KeySelector,

    /// Why, recorded in the key's history (`key history`)
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct DestroyArgs {
    #[command(flatten)]
    key: KeySelector,

    /// Destroy the key when DURATION has passed (e.g. 30d, 12h); until then it only decrypts and
    /// verifies, and `key cancel-destroy` keeps it [default: 7d]
    #[arg(long, value_name = "DURATION", conflicts_with = "now")]
    after: Option<String>,

    /// Destroy the key at once, for good (asks on the terminal to type the key's name, unless
    /// --yes)
    #[arg(long)]
    now: bool,

    /// With --now: do not ask (required without a terminal)
    #[arg(long, requires = "now")]
    yes: bool,

    /// Why, recorded in the key's history (`key history`)
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    #[command(flatten)]
    key: KeySelector,

    /// Rotate when the current version is DURATION old (e.g. 90d), or `never`
    #[arg(long, value_name = "DURATION|never")]
    rotate_after: Option<String>,

    /// Deactivate the key at TIME (RFC 3339 UTC, or +DURATION from now), or `never`
    #[arg(long, value_name = "TIME|never")]
    deactivate_at: Option<String>,

    /// Activate a key in pre-activation at TIME (RFC 3339 UTC, +DURATION from now, or `now`)
    #[arg(long, value_name = "TIME|now")]
    activate_at: Option<String>,

    /// The oldest version that may still decrypt and verify (1 to the current version)
    #[arg(long, value_name = "N")]
    min_decrypt_version: Option<u32>,

    /// Why, recorded in the key's history (`key history`)
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
}

/// `NS/NAME`.
fn label(info: &KeyInfo) -> String {
    format!("{}/{}", info.namespace, info.name)
}

/// Prints the key object with `--json`, else `text`.
fn report(ctx: &Context, info: &KeyInfo, text: &str) -> CmdResult {
    if ctx.json {
        io::print_json(&info_json(info))
    } else {
        io::print_line(text)
    }
}

pub fn rotate(ctx: &Context, args: &ReasonArgs) -> CmdResult {
    args.key.check()?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let info = ks.rotate_key(&id, args.reason.as_deref())?;
    let text = format!("rotated {} to version {}", label(&info), info.version);
    report(ctx, &info, &text)
}

pub fn transition(ctx: &Context, args: &ReasonArgs, transition: Transition) -> CmdResult {
    args.key.check()?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let info = ks.change_state(&id, transition, args.reason.as_deref())?;
    let key = label(&info);
    let text = match transition {
        Transition::Suspend => format!("suspended {key}"),
        Transition::Resume => format!("resumed {key}"),
        Transition::Deactivate => format!("deactivated {key}"),
        _ => format!("marked {key} compromised"),
    };
    report(ctx, &info, &text)
}

pub fn destroy(ctx: &Context, args: &DestroyArgs) -> CmdResult {
    args.key.check()?;
    if args.now {
        return destroy_now(ctx, args);
    }
    let after =
        keyhold::time::parse_duration(args.after.as_deref().unwrap_or(DEFAULT_DESTROY_AFTER))?;
    if after.as_secs() == 0 {
        // A destruction due now would skip the confirmation --now asks for.
        return Err(Failure::Usage(
            "--after must be at least 1s: to destroy the key at once, pass --now".into(),
        ));
    }
    let after = keyhold::time::duration_secs(after)?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    // From now, not from when the command started: unsealing may take seconds.
    let at = keyhold::time::now_ceil()
        .checked_add(after)
        .ok_or_else(|| Failure::Usage("--after is too far in the future".into()))?;
    let info = ks.schedule_destroy(&id, at, args.reason.as_deref())?;
    if info.state == keyhold::KeyState::Destroyed {
        // The time passed while it was being scheduled (a machine stalled for --after 1s).
        return report(ctx, &info, &format!("destroyed {}", label(&info)));
    }
    let text = format!(
        "{} will be destroyed on {} (keyhold key cancel-destroy --key {} keeps it)",
        label(&info),
        format_utc(at),
        info.id
    );
    report(ctx, &info, &text)
}

/// `key destroy --now`: after the user typed the key's name on the terminal, or with `--yes`.
fn destroy_now(ctx: &Context, args: &DestroyArgs) -> CmdResult {
    // Refused before the store is opened: nothing changes, and nothing waits for an answer
    // that cannot come.
    if !args.yes && !io::has_terminal() {
        return Err(Failure::Usage(
            "key destroy --now destroys the key for good: there is no terminal to confirm on, \
             so pass --yes to confirm"
                .into(),
        ));
    }
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    if !args.yes {
        let info = ks.key_info(&id)?;
        let question = format!(
            "this destroys key `{}` and every version of it for good; type its name to confirm: ",
            io::terminal_safe(&label(&info))
        );
        let answer = io::ask_terminal(&question)?;
        if answer.as_deref().map(str::trim) != Some(info.name.as_str()) {
            return Err(Failure::Cli(format!(
                "not confirmed: key `{}` was not destroyed",
                label(&info)
            )));
        }
    }
    let at = keyhold::time::now();
    let info = ks.schedule_destroy(&id, at, args.reason.as_deref())?;
    report(ctx, &info, &format!("destroyed {}", label(&info)))
}

pub fn cancel_destroy(ctx: &Context, args: &ReasonArgs) -> CmdResult {
    args.key.check()?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let info = ks.cancel_destroy(&id, args.reason.as_deref())?;
    let text = format!("kept {}: its destruction is cancelled", label(&info));
    report(ctx, &info, &text)
}

pub fn set(ctx: &Context, args: &SetArgs) -> CmdResult {
    args.key.check()?;
    // Every value is checked before the store is opened; times `+DURATION` count from when the
    // store is open (unsealing may take seconds), so the policy is made again then.
    let text = policy_text(args);
    let (_, said) = text.parse(keyhold::time::now())?;
    if said.is_empty() {
        return Err(Failure::Usage(
            "nothing to set: pass --rotate-after, --deactivate-at, --activate-at or \
             --min-decrypt-version"
                .into(),
        ));
    }
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let (policy, said) = text.parse(keyhold::time::now())?;
    let info = ks.set_policy(&id, &policy, args.reason.as_deref())?;
    let text = format!("updated {}: {}", label(&info), said.join(", "));
    report(ctx, &info, &text)
}

/// The change `key set` asks for, as the library reads it.
fn policy_text(args: &SetArgs) -> PolicyText {
    PolicyText {
        rotate_after: args.rotate_after.clone(),
        deactivate_at: args.deactivate_at.clone(),
        activate_at: args.activate_at.clone(),
        min_decrypt_version: args.min_decrypt_version,
    }
}

pub fn history(ctx: &Context, args: &KeyArg) -> CmdResult {
    args.key.check()?;
    let ks = io::open_keys(ctx)?;
    let id = args.key.resolve(ctx, &*ks)?;
    let events = ks.history(&id)?;
    if ctx.json {
        return io::print_json(&serde_json::Value::Array(
            events.iter().map(keyhold::KeyEvent::to_json).collect(),
        ));
    }
    let mut out = String::new();
    for e in &events {
        // The reason is the operator's text: escaped so that it cannot drive the terminal.
        let reason = e
            .reason
            .as_deref()
            .map(io::terminal_safe)
            .unwrap_or_default();
        let line = format!(
            "{:<3}  {}  {:<17}  {} -> {}  v{}  {reason}",
            e.seq,
            format_utc(e.at),
            e.event,
            e.from.as_deref().unwrap_or("none"),
            e.to,
            e.version
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    io::write_output(None, out.as_bytes())
}

#[derive(Debug, Args)]
pub struct MaintainArgs {}

/// `keyhold maintain`: runs the work every key's schedule makes due now. What was done goes to
/// stdout; each key whose work failed is named on stderr, and the command exits with the first
/// failure's code (after the other keys' work was done).
pub fn maintain(ctx: &Context, _args: &MaintainArgs) -> CmdResult {
    let ks = io::open_store_wide(ctx)?;
    let report = ks.maintain()?;
    let done = &report.done;
    if ctx.json {
        io::print_json(&serde_json::Value::Array(
            done.iter()
                .map(|d| serde_json::json!({ "key": d.key, "action": d.action }))
                .collect(),
        ))?;
    } else if done.is_empty() && report.failed.is_empty() {
        io::print_line("nothing due")?;
    } else {
        let mut out = String::new();
        for d in done {
            out.push_str(&format!("{}: {}\n", d.key, d.action));
        }
        io::write_output(None, out.as_bytes())?;
    }
    let mut failed = report.failed.into_iter();
    let Some((key, first)) = failed.next() else {
        return Ok(());
    };
    for (key, e) in failed {
        tracing::error!("{key}: {e}");
    }
    tracing::error!("{key}: its due work failed");
    Err(first.into())
}
