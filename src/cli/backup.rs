//! `keyhold backup` and `keyhold restore`: the whole store in one encrypted, authenticated file,
//! and back.

use std::path::PathBuf;

use clap::Args;

use keyhold::{Backup, RootSource};

use super::{io, recovery, CmdResult, Context};

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Write the backup into this directory (made 0700 if absent); keep it on another disk or
    /// machine
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup file, or a directory (its newest backup)
    #[arg(long, value_name = "PATH")]
    from: PathBuf,

    /// Restore into this store directory [default: the store, --store]
    #[arg(long, value_name = "DIR")]
    to: Option<PathBuf>,

    /// Rebuild the root secret from recovery shares in FILE (one per line) instead of opening
    /// the backup's seal (a TPM that died, a lost token key)
    #[arg(long, value_name = "FILE")]
    shares_file: Option<PathBuf>,
}

/// `keyhold backup --to DIR`.
pub fn backup(ctx: &Context, args: &BackupArgs) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let info = ks.backup(&args.to)?;
    if ctx.json {
        io::print_json(&serde_json::json!({
            "backup": info.path.display().to_string(),
            "store_id": info.store_id,
            "generation": info.generation,
            "keys": info.keys,
            "audit_log": info.audit_log,
        }))
    } else {
        io::print_line(&format!(
            "backed up keyhold store {} ({} keys, generation {}) to {}",
            ctx.store.display(),
            info.keys,
            info.generation,
            info.path.display()
        ))
    }
}

/// `keyhold restore --from PATH [--to DIR]`.
pub fn restore(ctx: &Context, args: &RestoreArgs) -> CmdResult {
    let backup = Backup::open(&args.from)?;
    let to = args.to.clone().unwrap_or_else(|| ctx.store.clone());
    let restored = match &args.shares_file {
        Some(file) => {
            let shares = recovery::shares_from_file(file)?;
            backup.restore(RootSource::Shares(&shares), &to, &ctx.config)?
        }
        None => {
            let sealer = io::unsealer(ctx, backup.sealed_root())?;
            let _notice = io::UnlockingNotice::start(backup.sealed_root());
            backup.restore(RootSource::Sealer(sealer.as_ref()), &to, &ctx.config)?
        }
    };
    if ctx.json {
        io::print_json(&serde_json::json!({
            "store": restored.store.display().to_string(),
            "backup": backup.path().display().to_string(),
            "backup_generation": restored.backup_generation,
            "generation": restored.generation,
            "keys": restored.keys,
            "audit_log_restored": restored.audit_log_restored,
        }))
    } else {
        io::print_line(&format!(
            "restored keyhold store {} from {} ({} keys, taken at generation {}, now at {}){}",
            restored.store.display(),
            backup.path().display(),
            restored.keys,
            restored.backup_generation,
            restored.generation,
            if restored.audit_log_restored {
                "; its audit log restored"
            } else {
                ""
            }
        ))
    }
}
