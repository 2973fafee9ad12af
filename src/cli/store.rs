//! `keyhold init` and `keyhold reseal`.

use clap::{Args, ValueEnum};

use keyhold::sealer::{SealedRoot, Sealer};
use keyhold::{Argon2Params, Keystore, PassphraseSealer};

use super::{io, CmdResult, Context, Failure};

/// How the store's root secret is sealed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SealerKind {
    /// Argon2id from a passphrase
    Passphrase,
    /// A non-extractable AES key in a PKCS#11 token (needs --backend)
    Pkcs11,
    /// A TPM sealed object, optionally bound to PCRs (--pcrs)
    Tpm,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// How to protect the store's root secret
    #[arg(long, value_enum)]
    sealer: SealerKind,

    /// The configured backend that seals the store (--sealer pkcs11; for --sealer tpm, default:
    /// the configuration's TPM backend, else $TPM2TOOLS_TCTI or /dev/tpmrm0)
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,

    /// With --sealer tpm: bind the seal to these SHA-256 PCRs (e.g. 0,7); a recovery passphrase
    /// is asked for (as the store passphrase is) unless --no-recovery
    #[arg(long, value_name = "LIST")]
    pcrs: Option<String>,

    /// With --pcrs: no recovery passphrase; the store is lost if those PCRs change for good
    #[arg(long, requires = "pcrs")]
    no_recovery: bool,

    /// With --sealer tpm and no --pcrs: a recovery passphrase too (asked for as the store
    /// passphrase is), which opens the store where this TPM is not: a backup restored on another
    /// machine, or this TPM cleared
    #[arg(long, conflicts_with_all = ["pcrs", "no_recovery"])]
    recovery: bool,

    #[command(flatten)]
    argon2: Argon2Args,
}

/// The Argon2id cost of a passphrase seal (`init`, `reseal --to`, `recovery restore --to`).
#[derive(Debug, Args)]
pub struct Argon2Args {
    /// Argon2id memory in MiB (at least 19)
    #[arg(long, value_name = "MIB", default_value_t = Argon2Params::default().memory_mib)]
    argon2_memory_mib: u32,

    /// Argon2id passes over memory (at least 2)
    #[arg(long, value_name = "N", default_value_t = Argon2Params::default().iterations)]
    argon2_iterations: u32,

    /// Argon2id lanes
    #[arg(long, value_name = "N", default_value_t = Argon2Params::default().parallelism)]
    argon2_parallelism: u32,
}

impl Argon2Args {
    /// The parameters, checked.
    pub(super) fn params(&self) -> Result<Argon2Params, Failure> {
        let params = Argon2Params {
            memory_mib: self.argon2_memory_mib,
            iterations: self.argon2_iterations,
            parallelism: self.argon2_parallelism,
        };
        params.validate()?;
        Ok(params)
    }
}

pub fn init(ctx: &Context, args: &InitArgs) -> CmdResult {
    let params = args.argon2.params()?;
    if ctx.store.join(keyhold::store::DB_FILE).exists() {
        return Err(keyhold::Error::StoreExists {
            path: ctx.store.clone(),
        }
        .into());
    }
    let new = NewSeal {
        kind: args.sealer,
        option: "--sealer",
        backend: args.backend.as_deref(),
        pcrs: args.pcrs.as_deref(),
        no_recovery: args.no_recovery,
        recovery: args.recovery,
        params,
    };
    let sealer = new_sealer(ctx, &new, || io::passphrase(ctx, true))?;
    let ks = Keystore::create_with(&ctx.store, sealer.as_ref(), &ctx.config)?;
    warn_unless_stated(ctx, ks.sealer_kind());
    if ctx.json {
        io::print_json(&serde_json::json!({
            "store": ctx.store.display().to_string(),
            "store_id": ks.store_id(),
            "sealer": ks.sealer_kind(),
        }))
    } else {
        io::print_line(&format!(
            "initialised keyhold store {} (store id {}, sealer {})",
            ctx.store.display(),
            ks.store_id(),
            ks.sealer_kind()
        ))
    }
}

/// keyhold opens a store only with the sealer the user states, never the one the store names: a
/// store just sealed by `kind` says how to state it, unless it already is.
pub(super) fn warn_unless_stated(ctx: &Context, kind: &str) {
    if io::check_stated_sealer(ctx, kind).is_err() {
        // A warning like the others (`-q` silences it): the next command fails without it.
        tracing::warn!(
            "to open this store, state its sealer: set KEYHOLD_SEALER={kind}, or put \
             `sealer = \"{kind}\"` under [store] in the configuration file"
        );
    }
}

/// How a store is to be sealed: by `init`, `reseal --to` or `recovery restore --to`.
pub(super) struct NewSeal<'a> {
    pub kind: SealerKind,
    /// The option that chose `kind` (`--sealer`, `--to`), for messages.
    pub option: &'static str,
    pub backend: Option<&'a str>,
    pub pcrs: Option<&'a str>,
    pub no_recovery: bool,
    /// A recovery passphrase without PCRs.
    pub recovery: bool,
    pub params: Argon2Params,
}

/// The sealer `new` describes; `passphrase` gives the passphrase (of a passphrase seal, or the
/// recovery passphrase of a TPM seal bound to PCRs), asked only when one is needed.
pub(super) fn new_sealer(
    ctx: &Context,
    new: &NewSeal<'_>,
    passphrase: impl FnOnce() -> Result<secrecy::SecretString, Failure>,
) -> Result<Box<dyn Sealer>, Failure> {
    let option = new.option;
    if (new.pcrs.is_some() || new.no_recovery || new.recovery)
        && !matches!(new.kind, SealerKind::Tpm)
    {
        return Err(Failure::Cli(format!(
            "--pcrs, --recovery and --no-recovery go with {option} tpm"
        )));
    }
    match (new.kind, new.backend) {
        (SealerKind::Passphrase, None) => Ok(Box::new(
            PassphraseSealer::new(passphrase()?).with_params(new.params)?,
        )),
        (SealerKind::Pkcs11, Some(name)) => pkcs11_sealer(ctx, name),
        (SealerKind::Tpm, _) => tpm_sealer(ctx, new, passphrase),
        (SealerKind::Passphrase, Some(_)) => Err(Failure::Cli(format!(
            "--backend goes with {option} pkcs11 or tpm, not with a passphrase"
        ))),
        (SealerKind::Pkcs11, None) => Err(Failure::Cli(format!(
            "{option} pkcs11 needs --backend NAME, a PKCS#11 backend of the configuration"
        ))),
    }
}

/// A new `pkcs11` sealer, with a key in the token of backend `name`.
#[cfg(feature = "pkcs11")]
fn pkcs11_sealer(ctx: &Context, name: &str) -> Result<Box<dyn Sealer>, Failure> {
    let backend = std::sync::Arc::new(io::pkcs11_backend(ctx, name)?);
    Ok(Box::new(keyhold::Pkcs11Sealer::new(backend)))
}

#[cfg(not(feature = "pkcs11"))]
fn pkcs11_sealer(_ctx: &Context, _name: &str) -> Result<Box<dyn Sealer>, Failure> {
    Err(keyhold::Error::not_built("pkcs11").into())
}

/// A new `tpm` sealer as `new` asks: the TPM of `--backend`, `--pcrs`, a recovery passphrase.
#[cfg(feature = "tpm")]
fn tpm_sealer(
    ctx: &Context,
    new: &NewSeal<'_>,
    passphrase: impl FnOnce() -> Result<secrecy::SecretString, Failure>,
) -> Result<Box<dyn Sealer>, Failure> {
    let (device, name) = io::tpm_device(ctx, new.backend, false)?;
    let pcrs = new.pcrs.map(keyhold::sealer::tpm::parse_pcrs).transpose()?;
    let mut sealer =
        keyhold::TpmSealer::new(device, name).with_pcrs(pcrs.as_deref().unwrap_or(&[]))?;
    if pcrs.is_some() || new.recovery {
        if new.no_recovery {
            tracing::warn!(
                "sealed to PCRs without a recovery passphrase: if those PCRs change for good, \
                 the store and its software keys are lost"
            );
        } else {
            let recovery = PassphraseSealer::new(passphrase()?).with_params(new.params)?;
            sealer = sealer.with_recovery(recovery);
        }
    }
    Ok(Box::new(sealer))
}

#[cfg(not(feature = "tpm"))]
fn tpm_sealer(
    _ctx: &Context,
    _new: &NewSeal<'_>,
    _passphrase: impl FnOnce() -> Result<secrecy::SecretString, Failure>,
) -> Result<Box<dyn Sealer>, Failure> {
    Err(keyhold::Error::not_built("tpm").into())
}

#[derive(Debug, Args)]
pub struct ResealArgs {
    /// Move the store to this sealer, or give it a new passphrase or Argon2 cost (`--to
    /// passphrase`) [default: re-bind a TPM-sealed store to its PCRs]
    #[arg(long, value_enum, value_name = "SEALER")]
    to: Option<SealerKind>,

    /// Bind the new seal to no PCRs
    #[arg(long, conflicts_with_all = ["to", "pcrs"])]
    no_pcrs: bool,

    #[command(flatten)]
    seal: NewSealArgs,
}

/// How `reseal --to` and `recovery restore --to` seal the store (`--to` is theirs).
#[derive(Debug, Args)]
pub struct NewSealArgs {
    /// With --to pkcs11 or tpm: the configured backend that seals the store (for tpm, default:
    /// the configuration's TPM backend, else $TPM2TOOLS_TCTI or /dev/tpmrm0)
    #[arg(long, value_name = "NAME", requires = "to")]
    backend: Option<String>,

    /// Bind the new seal to these SHA-256 PCRs (e.g. 0,7) [default: the PCRs of the old seal;
    /// with --to tpm, none]
    #[arg(long, value_name = "LIST")]
    pcrs: Option<String>,

    /// With --to tpm --pcrs: no recovery passphrase; the store is lost if those PCRs change for
    /// good
    #[arg(long, requires_all = ["to", "pcrs"])]
    no_recovery: bool,

    /// With --to tpm and no --pcrs: a recovery passphrase too, which opens the store where this
    /// TPM is not (a backup restored on another machine, or this TPM cleared)
    #[arg(long, requires = "to", conflicts_with_all = ["pcrs", "no_recovery"])]
    recovery: bool,

    /// Read the new passphrase (--to passphrase; with --to tpm --pcrs or --recovery, the
    /// recovery passphrase)
    /// from the first line of FILE [default: $KEYHOLD_NEW_PASSPHRASE, else the terminal]
    #[arg(long, value_name = "FILE", requires = "to")]
    new_passphrase_file: Option<std::path::PathBuf>,

    #[command(flatten)]
    argon2: Argon2Args,
}

impl NewSealArgs {
    /// The sealer these options describe with `--to kind`; the new passphrase is asked for (from
    /// `--new-passphrase-file`, `$KEYHOLD_NEW_PASSPHRASE` or the terminal) if one is needed.
    pub(super) fn sealer(
        &self,
        ctx: &Context,
        kind: SealerKind,
    ) -> Result<Box<dyn Sealer>, Failure> {
        let new = NewSeal {
            kind,
            option: "--to",
            backend: self.backend.as_deref(),
            pcrs: self.pcrs.as_deref(),
            no_recovery: self.no_recovery,
            recovery: self.recovery,
            params: self.argon2.params()?,
        };
        new_sealer(ctx, &new, || {
            io::new_passphrase(self.new_passphrase_file.as_deref())
        })
    }
}

/// `keyhold reseal`: with `--to`, moves the store to that sealer (a new passphrase, Argon2 cost,
/// TPM or token); without, re-binds a TPM-sealed store to the PCRs as they are now (when the TPM
/// refuses the old seal because the PCRs changed, the recovery passphrase unseals it).
pub fn reseal(ctx: &Context, args: &ResealArgs) -> CmdResult {
    // Read only to find the sealer kind and the TPM: this read is not authenticated, so nothing
    // from it goes into the new seal (see the closure below).
    let sealed = keyhold::store::Store::open(&ctx.store)?
        .meta()
        .sealed_root
        .clone();
    if let Some(kind) = args.to {
        return reseal_to(ctx, args, kind, &sealed);
    }
    if sealed.sealer != "tpm" {
        return Err(Failure::Cli(format!(
            "keyhold reseal re-binds a TPM-sealed store to the TPM's PCRs; this store is sealed by \
             `{}` (to change its passphrase or sealer: keyhold reseal --to SEALER)",
            sealed.sealer
        )));
    }
    io::check_stated_sealer(ctx, &sealed.sealer)?;
    tpm_reseal(ctx, args, &sealed)
}

/// `reseal` once the store is known to be sealed by a TPM, as the user states.
#[cfg(feature = "tpm")]
fn tpm_reseal(ctx: &Context, args: &ResealArgs, sealed: &SealedRoot) -> CmdResult {
    use keyhold::sealer::tpm::parse_pcrs;
    use keyhold::TpmSealer;
    let name = TpmSealer::backend_of(sealed)?;
    let (device, name) = io::tpm_device(ctx, name.as_deref(), true)?;
    let requested = match (&args.seal.pcrs, args.no_pcrs) {
        (Some(list), _) => Some(parse_pcrs(list)?),
        (None, true) => Some(Vec::new()),
        (None, false) => None,
    };
    // A PCR list given here is checked (no resettable PCR) before anything is unsealed.
    let checked = match &requested {
        Some(pcrs) => {
            Some(TpmSealer::new(std::sync::Arc::clone(&device), name.clone()).with_pcrs(pcrs)?)
        }
        None => None,
    };
    let file = ctx.passphrase_file.clone();
    let unsealer = TpmSealer::new(std::sync::Arc::clone(&device), name.clone())
        .with_recovery_prompt(Box::new(move || {
            io::passphrase_from(file.as_deref(), false).map_err(|f| keyhold::Error::Unseal {
                reason: format!("the recovery passphrase is needed: {f}"),
            })
        }));
    // The new seal is built from the old one as `Keystore::reseal` authenticated it, in the same
    // open of the store: a PCR list or recovery seal changed behind keyhold's back is refused,
    // never carried over, even if the store was swapped between the read above and that open.
    let first_backend = TpmSealer::backend_of(sealed)?;
    let (old_pcrs, pcrs) = Keystore::reseal_with(&ctx.store, &unsealer, &ctx.config, |verified| {
        if TpmSealer::backend_of(verified)? != first_backend {
            return Err(keyhold::Error::Integrity {
                what: "the TPM backend the seal names changed while keyhold reseal ran".into(),
            });
        }
        let old_pcrs = TpmSealer::pcrs_of(verified)?;
        let pcrs = requested.unwrap_or_else(|| old_pcrs.clone());
        let resealer = match checked {
            Some(sealer) => sealer,
            None => TpmSealer::new(device, name).with_pcrs(&pcrs)?,
        }
        .keeping_recovery(TpmSealer::recovery_of(verified)?);
        Ok((resealer, (old_pcrs, pcrs)))
    })?;
    if ctx.json {
        io::print_json(&serde_json::json!({
            "store": ctx.store.display().to_string(),
            "sealer": "tpm",
            "old_pcrs": old_pcrs,
            "pcrs": pcrs,
        }))
    } else {
        let list = |pcrs: &[u8]| {
            if pcrs.is_empty() {
                "none".to_owned()
            } else {
                pcrs.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
            }
        };
        io::print_line(&format!(
            "re-sealed keyhold store {} to the TPM: PCRs {} → {}",
            ctx.store.display(),
            list(&old_pcrs),
            list(&pcrs)
        ))
    }
}

#[cfg(not(feature = "tpm"))]
fn tpm_reseal(_ctx: &Context, _args: &ResealArgs, _sealed: &SealedRoot) -> CmdResult {
    Err(keyhold::Error::not_built("tpm").into())
}

/// `reseal --to KIND`: unseals with the sealer the user states for the store (as every command
/// opens it), seals with the new one (asking for the new passphrase before anything is unsealed),
/// checks the new seal, and replaces the old one in one transaction.
fn reseal_to(ctx: &Context, args: &ResealArgs, kind: SealerKind, sealed: &SealedRoot) -> CmdResult {
    // The current passphrase first, then the new one: as a person expects to be asked.
    let unsealer = io::unsealer(ctx, sealed)?;
    let resealer = args.seal.sealer(ctx, kind)?;
    {
        let _notice = io::UnlockingNotice::start(sealed);
        Keystore::reseal_with(&ctx.store, unsealer.as_ref(), &ctx.config, |_| {
            Ok((&*resealer, ()))
        })?;
    }
    let old = sealed.sealer.as_str();
    let kind = resealer.kind();
    warn_unless_stated(ctx, kind);
    if ctx.json {
        io::print_json(&serde_json::json!({
            "store": ctx.store.display().to_string(),
            "old_sealer": old,
            "sealer": kind,
        }))
    } else {
        io::print_line(&format!(
            "re-sealed keyhold store {}: {old} → {kind}",
            ctx.store.display()
        ))
    }
}
