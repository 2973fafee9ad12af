//! `keyhold recovery split` and `keyhold recovery restore`: break-glass recovery of a store's root
//! secret from Shamir shares, for a store whose sealer is gone (a TPM that died or was cleared).

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use keyhold::sealer::shares::{Share, MAX_SHARES, PREFIX};
use keyhold::Keystore;

use super::store::{warn_unless_stated, NewSealArgs, SealerKind};
use super::{io, CmdResult, Context, Failure};

#[derive(Debug, Subcommand)]
pub enum RecoveryCommand {
    /// Split the store's root secret into N shares, any M of which rebuild it (printed once)
    Split(SplitArgs),
    /// Rebuild the root secret from M shares and seal the store anew (its sealer is gone)
    Restore(RestoreArgs),
}

#[derive(Debug, Args)]
pub struct SplitArgs {
    /// How many shares to make (at most 255)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(2..=i64::from(MAX_SHARES)))]
    shares: u8,

    /// How many shares rebuild the root secret (at least 2, at most N)
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u8).range(2..=i64::from(MAX_SHARES)))]
    threshold: u8,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Seal the store with this sealer once the root secret is rebuilt
    #[arg(long, value_enum, value_name = "SEALER")]
    to: SealerKind,

    /// Read the shares from FILE, one per line (blank lines and lines starting with `#` are
    /// skipped) [default: asked for on the terminal]
    #[arg(long, value_name = "FILE")]
    shares_file: Option<PathBuf>,

    #[command(flatten)]
    seal: NewSealArgs,
}

pub fn run(ctx: &Context, command: &RecoveryCommand) -> CmdResult {
    match command {
        RecoveryCommand::Split(args) => split(ctx, args),
        RecoveryCommand::Restore(args) => restore(ctx, args),
    }
}

/// `recovery split`: the shares go to stdout, once; nothing is written to the store or the log.
fn split(ctx: &Context, args: &SplitArgs) -> CmdResult {
    if args.threshold > args.shares {
        return Err(Failure::Usage(format!(
            "--threshold {} is more than --shares {}: the shares could never be combined",
            args.threshold, args.shares
        )));
    }
    let meta = keyhold::store::Store::open(&ctx.store)?.meta().clone();
    let unsealer = io::unsealer(ctx, &meta.sealed_root)?;
    let shares = {
        let _notice = io::UnlockingNotice::start(&meta.sealed_root);
        Keystore::split_root(
            &ctx.store,
            unsealer.as_ref(),
            &ctx.config,
            args.shares,
            args.threshold,
        )?
    };
    // The shares themselves carry the ID of the store split_root unsealed and checked.
    let store_id = keyhold::hex::encode(&meta.store_id);
    // Built in a zeroizing buffer and written in one go: the shares are the root secret.
    let mut out = Zeroizing::new(String::new());
    if ctx.json {
        // Written by hand (a share's text is `[0-9a-z-]`, nothing to escape) so that no copy of
        // the shares is left in a JSON value's strings.
        out.push_str(&format!(
            "{{\"store_id\":\"{store_id}\",\"threshold\":{},\"shares\":[",
            args.threshold
        ));
        for (i, share) in shares.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(&share.encode());
            out.push('"');
        }
        out.push_str("]}\n");
    } else {
        out.push_str(&format!(
            "# keyhold recovery shares of store {store_id}: any {} of these {} rebuild its root \
             secret.\n# Each is as powerful as the root secret once {} others are known: give \
             them to different people, keep them apart and offline. They are not shown again.\n",
            args.threshold,
            args.shares,
            args.threshold - 1
        ));
        for share in &shares {
            out.push_str(&share.encode());
            out.push('\n');
        }
    }
    io::write_output(None, out.as_bytes())
}

/// `recovery restore`: the shares from `--shares-file` or the terminal, the root rebuilt and
/// checked against the store, then sealed with `--to` as `reseal --to` does.
fn restore(ctx: &Context, args: &RestoreArgs) -> CmdResult {
    // The store must exist before anyone types a share.
    keyhold::store::Store::open(&ctx.store)?;
    let shares = match &args.shares_file {
        Some(path) => shares_from_file(path)?,
        None => shares_from_terminal()?,
    };
    let resealer = args.seal.sealer(ctx, args.to)?;
    Keystore::recover(&ctx.store, &shares, resealer.as_ref(), &ctx.config)?;
    let kind = resealer.kind();
    warn_unless_stated(ctx, kind);
    if ctx.json {
        io::print_json(&serde_json::json!({
            "store": ctx.store.display().to_string(),
            "sealer": kind,
            "shares_used": shares.len(),
        }))
    } else {
        io::print_line(&format!(
            "restored keyhold store {} from {} recovery shares: sealed by {kind}",
            ctx.store.display(),
            shares.len()
        ))
    }
}

/// The most bytes a shares file may hold: 255 shares with room for comments.
const MAX_SHARES_FILE: u64 = 256 * 1024;

/// Every share in `path`, one per line; blank lines and `#` comments (as `split` prints them)
/// are skipped, every other line is a share (`share N` in errors, counting shares only).
fn shares_from_file(path: &Path) -> Result<Vec<Share>, Failure> {
    let file = std::fs::File::open(path).map_err(|e| {
        Failure::Cli(format!(
            "cannot read the shares file {}: {e}",
            path.display()
        ))
    })?;
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_SHARES_FILE)
        .read_to_string(&mut text)
        .map_err(|e| Failure::Cli(format!("cannot read {}: {e}", path.display())))?;
    let lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let mut shares = Vec::new();
    for (n, line) in lines.enumerate() {
        shares.push(Share::parse(line, &format!("share {}", n + 1))?);
    }
    if shares.is_empty() {
        return Err(Failure::Cli(format!(
            "{} holds no recovery share (lines beginning with `{PREFIX}`)",
            path.display()
        )));
    }
    Ok(shares)
}

/// Asks for shares on the terminal (echo off), one at a time, until as many as the first share's
/// threshold were given.
fn shares_from_terminal() -> Result<Vec<Share>, Failure> {
    let tty = io::HiddenTerminal::open().ok_or_else(|| {
        Failure::Cli(
            "no shares: pass --shares-file FILE, or run keyhold in a terminal to type them".into(),
        )
    })?;
    let mut shares: Vec<Share> = Vec::new();
    loop {
        let which = format!("share {}", shares.len() + 1);
        let line = tty.ask(&format!("recovery {which}: "), "recovery share")?;
        let text =
            std::str::from_utf8(&line).map_err(|_| Failure::Cli(format!("{which} is not text")))?;
        shares.push(Share::parse(text, &which)?);
        if shares
            .first()
            .is_some_and(|first| shares.len() >= usize::from(first.threshold()))
        {
            return Ok(shares);
        }
    }
}
