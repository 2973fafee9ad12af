//! `keyhold store verify`: the whole store checked, every problem reported.

use std::io::IsTerminal;

use clap::{Args, Subcommand};
use keyhold::verify::{Finding, Section, Status, VerifyProgress, VerifyReport};
use keyhold::Keystore;

use super::{io, CmdResult, Context, Failure};

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Check every record's MAC, the audit log's chain and every key's material in its backend
    Verify(VerifyArgs),
    /// Accept the store as it is and anchor it afresh (its TPM was cleared or replaced, or you
    /// put an older copy back on purpose)
    Reanchor(ReanchorArgs),
}

#[derive(Debug, Args)]
pub struct ReanchorArgs {
    /// Confirm: the store is accepted as it is now, even if it is an older copy
    #[arg(long)]
    yes: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {}

pub fn run(ctx: &Context, command: &StoreCommand) -> CmdResult {
    match command {
        StoreCommand::Verify(a) => verify(ctx, a),
        StoreCommand::Reanchor(a) => reanchor(ctx, a),
    }
}

/// Exit codes beyond the common ones (docs/cli.md, "Store verify exit codes"): 6 when a check
/// failed, before 7 when something could not be checked.
const FAILED: u8 = 6;
const UNCHECKED: u8 = 7;
/// The commitment, the state or an anchor failed: the store was tampered with or rolled back
/// (as every command's exit 10), whatever else failed.
const TAMPERED: u8 = 10;

fn verify(ctx: &Context, _args: &VerifyArgs) -> CmdResult {
    let (report, place) = match &ctx.remote {
        // The service verifies the store it holds open (its opening was checked then).
        Some(remote) => (io::open_store_wide(ctx)?.verify_store()?, remote.clone()),
        None => (verify_here(ctx)?, ctx.store.display().to_string()),
    };
    if ctx.json {
        io::print_json(&report.to_json())?;
    } else {
        io::write_output(None, text(&place, &report).as_bytes())?;
    }
    verdict(&report)
}

/// The store opened here and verified, its opening too, with a progress bar on a terminal.
fn verify_here(ctx: &Context) -> Result<VerifyReport, Failure> {
    // Look for the store (and its sealer) before asking for a passphrase nobody can use.
    let sealed = keyhold::store::Store::open(&ctx.store)?
        .meta()
        .sealed_root
        .clone();
    let sealer = io::unsealer(ctx, &sealed)?;
    // Said while unsealing only: the first progress report means the root is unsealed.
    let unlocking = std::cell::RefCell::new(Some(io::UnlockingNotice::start(&sealed)));
    let bar = Bar::on_terminal();
    let report = Keystore::open_and_verify(&ctx.store, sealer.as_ref(), &ctx.config, &|p| {
        drop(unlocking.borrow_mut().take());
        bar.show(p);
    });
    drop(unlocking.take());
    bar.finish();
    Ok(report?)
}

/// `keyhold store reanchor --yes`.
fn reanchor(ctx: &Context, args: &ReanchorArgs) -> CmdResult {
    if !args.yes {
        return Err(Failure::Usage(
            "store reanchor accepts the store as it is now, even an older copy put back (a \
             rollback keyhold would otherwise refuse): add --yes if that is what you mean"
                .into(),
        ));
    }
    let sealed = keyhold::store::Store::open(&ctx.store)?
        .meta()
        .sealed_root
        .clone();
    let sealer = io::unsealer(ctx, &sealed)?;
    let done = {
        let _notice = io::UnlockingNotice::start(&sealed);
        Keystore::reanchor(&ctx.store, sealer.as_ref(), &ctx.config)?
    };
    if ctx.json {
        io::print_json(&serde_json::json!({
            "store": ctx.store.display().to_string(),
            "from_generation": done.from_generation,
            "generation": done.generation,
            "counter": done.counter,
        }))
    } else {
        io::print_line(&format!(
            "re-anchored keyhold store {}: accepted at generation {}, now {}{}",
            ctx.store.display(),
            done.from_generation,
            done.generation,
            if done.counter {
                ", bound to its counter anew"
            } else {
                ""
            }
        ))
    }
}

fn verdict(report: &VerifyReport) -> CmdResult {
    let count = |status| {
        report
            .findings()
            .filter(|(_, f)| f.status == status)
            .count()
    };
    let (failed, unchecked) = (count(Status::Failed), count(Status::Unchecked));
    let tampered = report.sections.iter().any(Section::is_tampered);
    let code = match report.status() {
        Status::Passed => return Ok(()),
        Status::Failed if tampered => TAMPERED,
        Status::Failed => FAILED,
        Status::Unchecked => UNCHECKED,
    };
    let failing: Vec<&str> = report
        .sections
        .iter()
        .filter(|s| s.status == Status::Failed)
        .map(|s| s.kind.as_str())
        .collect();
    let mut found = Vec::new();
    if failed > 0 {
        found.push(format!(
            "{failed} {} ({})",
            if failed == 1 { "problem" } else { "problems" },
            failing.join(", ")
        ));
    }
    if unchecked > 0 {
        found.push(format!("{unchecked} unchecked"));
    }
    Err(Failure::Findings {
        code,
        kind: "verify_findings",
        summary: format!("store verify found problems: {}", found.join(", ")),
    })
}

/// `store: WHERE (id …)` (its directory, or the service that holds it), then per check its
/// status, summary and findings, then the verdict.
fn text(place: &str, report: &VerifyReport) -> String {
    let mut out = format!(
        "store: {} (id {}, {} keys)\n",
        place, report.store_id, report.keys
    );
    for section in &report.sections {
        out.push_str(&format!(
            "\n{}: {}\n  {}\n",
            section.kind.title(),
            section.status.as_str().to_uppercase(),
            section.summary
        ));
        for finding in &section.findings {
            out.push_str(&format!("  {}\n", finding_line(finding)));
        }
    }
    out.push_str(&format!(
        "\nstore verify: {}\n",
        match report.status() {
            Status::Passed => "every check passed",
            Status::Unchecked => "nothing failed, but not everything could be checked",
            Status::Failed => "problems found",
        }
    ));
    out
}

/// `FAILED NS/NAME v2 (uuid …, id kh1_…): what`.
fn finding_line(finding: &Finding) -> String {
    let status = match finding.status {
        Status::Failed => "FAILED",
        _ => "UNCHECKED",
    };
    let key = finding.key.as_ref().map_or_else(String::new, |k| {
        let mut name = if k.label.is_empty() {
            "a key with no record".to_owned()
        } else {
            k.label.clone()
        };
        if let Some(v) = k.version {
            name.push_str(&format!(" v{v}"));
        }
        let mut ids = format!("uuid {}", k.uuid);
        if let Some(id) = &k.id {
            ids.push_str(&format!(", id {id}"));
        }
        if let Some(backend) = &k.backend {
            ids.push_str(&format!(", backend {backend}"));
        }
        format!("{name} ({ids}): ")
    });
    // Names and reasons come from records and devices: never let them drive the terminal.
    io::terminal_safe(&format!("{status} {key}{}", finding.what))
}

/// The progress bar: on stderr, only when it is a terminal.
struct Bar(Option<indicatif::ProgressBar>);

impl Bar {
    fn on_terminal() -> Self {
        if !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} {elapsed}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        Self(Some(bar))
    }

    fn show(&self, p: VerifyProgress) {
        let Some(bar) = &self.0 else { return };
        bar.set_length(p.total);
        bar.set_position(p.done);
        bar.set_message(p.check.as_str());
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
