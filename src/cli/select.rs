//! Which key a command uses: `--key ID`, or `--name NAME` looked up in `--namespace`.

use clap::Args;
use keyhold::KeyService;

use super::{Context, Failure};

use keyhold::KEY_ID_PREFIX as ID_PREFIX;

/// `--key ID` or `--name NAME`, exactly one.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct KeySelector {
    /// The key ID (kh1_…), as `key create` printed it
    #[arg(long, value_name = "ID")]
    key: Option<String>,

    /// The key's name in --namespace instead of its ID (for people: applications hold IDs)
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

impl KeySelector {
    /// Refuses, before the store is opened, a key name given as `--key`: a usage error that says
    /// to pass `--name`. Anything else is left to ID authentication, so that a modified ID (IDs
    /// are 170-200 characters, names at most 64) still fails authentication (exit 3).
    pub fn check(&self) -> Result<(), Failure> {
        if let Some(key) = &self.key {
            if !key.starts_with(ID_PREFIX) && keyhold::validate_name("key name", key).is_ok() {
                return Err(Failure::Usage(format!(
                    "`{key}` is not a key ID (IDs start with {ID_PREFIX}): to use a key by name, \
                     pass --name {key}"
                )));
            }
        }
        if let Some(name) = &self.name {
            keyhold::validate_name("key name", name)?;
        }
        Ok(())
    }

    /// The key ID to use: `--key` as given, or the ID of the key named `--name` in the context's
    /// namespace, taken from its record after the record's MAC is verified.
    pub fn resolve(&self, ctx: &Context, ks: &dyn KeyService) -> Result<String, Failure> {
        self.check()?;
        match (&self.key, &self.name) {
            (Some(id), _) => Ok(id.clone()),
            (None, Some(name)) => id_of_name(ctx, ks, name),
            (None, None) => Err(Failure::Usage(
                "name the key with --key ID or --name NAME".into(),
            )),
        }
    }
}

/// The ID of the key `name` in the context's namespace.
pub fn id_of_name(ctx: &Context, ks: &dyn KeyService, name: &str) -> Result<String, Failure> {
    keyhold::validate_name("namespace", &ctx.namespace)?;
    keyhold::validate_name("key name", name)?;
    match ks.key_info_by_name(&ctx.namespace, name)? {
        Some(info) => Ok(info.id),
        None => Err(Failure::NoSuchName(format!(
            "no such key: there is no key named `{name}` in namespace `{}` (`keyhold key list \
             --namespace {}` lists its keys)",
            ctx.namespace, ctx.namespace
        ))),
    }
}
