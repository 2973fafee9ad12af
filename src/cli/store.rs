//! `keyhold init`.

use clap::{Args, ValueEnum};
use std::sync::Arc;

use keyhold::{Argon2Params, Keystore, PassphraseSealer, Pkcs11Sealer};

use super::{io, CmdResult, Context, Failure};

/// How the store's root secret is sealed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SealerKind {
    /// Argon2id from a passphrase
    Passphrase,
    /// A non-extractable AES key in a PKCS#11 token (needs --backend)
    Pkcs11,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// How to protect the store's root secret
    #[arg(long, value_enum)]
    sealer: SealerKind,

    /// The configured backend that seals the store (for --sealer pkcs11)
    #[arg(long, value_name = "NAME")]
    backend: Option<String>,

    /// Argon2id memory in MiB (at least 8)
    #[arg(long, value_name = "MIB", default_value_t = Argon2Params::default().memory_mib)]
    argon2_memory_mib: u32,

    /// Argon2id passes over memory
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
    let ks = match (args.sealer, &args.backend) {
        (SealerKind::Passphrase, None) => {
            let sealer = PassphraseSealer::new(io::passphrase(ctx, true)?).with_params(params)?;
            Keystore::create_with(&ctx.store, &sealer, &ctx.config)?
        }
        (SealerKind::Pkcs11, Some(name)) => {
            let sealer = Pkcs11Sealer::new(Arc::new(io::pkcs11_backend(ctx, name)?));
            Keystore::create_with(&ctx.store, &sealer, &ctx.config)?
        }
        (SealerKind::Passphrase, Some(_)) => {
            return Err(Failure::Cli(
                "--backend goes with --sealer pkcs11, not with a passphrase".into(),
            ))
        }
        (SealerKind::Pkcs11, None) => {
            return Err(Failure::Cli(
                "--sealer pkcs11 needs --backend NAME, a PKCS#11 backend of the configuration"
                    .into(),
            ))
        }
    };
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
