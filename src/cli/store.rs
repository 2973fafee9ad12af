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

pub fn init(ctx: &Context, args: &InitArgs) -> CmdResult {
    let params = Argon2Params {
        memory_mib: args.argon2_memory_mib,
        iterations: args.argon2_iterations,
        parallelism: args.argon2_parallelism,
    };
    params.validate()?;
    if ctx.store.join(keyhold::store::DB_FILE).exists() {
        return Err(keyhold::Error::StoreExists {
            path: ctx.store.clone(),
        }
        .into());
    }
    if args.pcrs.is_some() && !matches!(args.sealer, SealerKind::Tpm) {
        return Err(Failure::Cli("--pcrs goes with --sealer tpm".into()));
    }
    let ks = match (args.sealer, &args.backend) {
        (SealerKind::Passphrase, None) => {
            let sealer = PassphraseSealer::new(io::passphrase(ctx, true)?).with_params(params)?;
            Keystore::create_with(&ctx.store, &sealer, &ctx.config)?
        }
        (SealerKind::Pkcs11, Some(name)) => {
            let sealer = pkcs11_sealer(ctx, name)?;
            Keystore::create_with(&ctx.store, sealer.as_ref(), &ctx.config)?
        }
        (SealerKind::Tpm, _) => {
            let sealer = tpm_sealer(ctx, args, params)?;
            Keystore::create_with(&ctx.store, sealer.as_ref(), &ctx.config)?
        }
        (SealerKind::Passphrase, Some(_)) => {
            return Err(Failure::Cli(
                "--backend goes with --sealer pkcs11 or tpm, not with a passphrase".into(),
            ))
        }
        (SealerKind::Pkcs11, None) => {
            return Err(Failure::Cli(
                "--sealer pkcs11 needs --backend NAME, a PKCS#11 backend of the configuration"
                    .into(),
            ))
        }
    };
    // keyhold opens a store only with the sealer the user states, never the one the store names.
    if io::check_stated_sealer(ctx, ks.sealer_kind()).is_err() {
        let kind = ks.sealer_kind();
        // A warning like the others (`-q` silences it): the next command fails without it.
        tracing::warn!(
            "to open this store, state its sealer: set KEYHOLD_SEALER={kind}, or put \
             `sealer = \"{kind}\"` under [store] in the configuration file"
        );
    }
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

/// A new `tpm` sealer as `init` asks: the TPM of `--backend`, `--pcrs`, a recovery passphrase.
#[cfg(feature = "tpm")]
fn tpm_sealer(
    ctx: &Context,
    args: &InitArgs,
    params: Argon2Params,
) -> Result<Box<dyn Sealer>, Failure> {
    let (device, name) = io::tpm_device(ctx, args.backend.as_deref(), false)?;
    let pcrs = args
        .pcrs
        .as_deref()
        .map(keyhold::sealer::tpm::parse_pcrs)
        .transpose()?;
    let mut sealer =
        keyhold::TpmSealer::new(device, name).with_pcrs(pcrs.as_deref().unwrap_or(&[]))?;
    if pcrs.is_some() {
        if args.no_recovery {
            tracing::warn!(
                "sealed to PCRs without a recovery passphrase: if those PCRs change for good, \
                 the store and its software keys are lost"
            );
        } else {
            let recovery = PassphraseSealer::new(io::passphrase(ctx, true)?).with_params(params)?;
            sealer = sealer.with_recovery(recovery);
        }
    }
    Ok(Box::new(sealer))
}

#[cfg(not(feature = "tpm"))]
fn tpm_sealer(
    _ctx: &Context,
    _args: &InitArgs,
    _params: Argon2Params,
) -> Result<Box<dyn Sealer>, Failure> {
    Err(keyhold::Error::not_built("tpm").into())
}

#[derive(Debug, Args)]
pub struct ResealArgs {
    /// Bind the new seal to these SHA-256 PCRs (e.g. 0,7) [default: the PCRs of the old seal]
    #[arg(long, value_name = "LIST", conflicts_with = "no_pcrs")]
    pcrs: Option<String>,

    /// Bind the new seal to no PCRs
    #[arg(long)]
    no_pcrs: bool,
}

/// `keyhold reseal`: re-binds a TPM-sealed store to the PCRs as they are now. When the TPM refuses
/// the old seal (the PCRs changed), the recovery passphrase unseals it.
pub fn reseal(ctx: &Context, args: &ResealArgs) -> CmdResult {
    // Read only to find the sealer kind and the TPM: this read is not authenticated, so nothing
    // from it goes into the new seal (see the closure below).
    let sealed = keyhold::store::Store::open(&ctx.store)?
        .meta()
        .sealed_root
        .clone();
    if sealed.sealer != "tpm" {
        return Err(Failure::Cli(format!(
            "keyhold reseal re-binds a TPM-sealed store to the TPM's PCRs; this store is sealed by \
             `{}`",
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
    let requested = match (&args.pcrs, args.no_pcrs) {
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
    let (old_pcrs, pcrs) = Keystore::reseal(&ctx.store, &unsealer, |verified| {
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
