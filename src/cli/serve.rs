//! `keyhold serve`: the keystore held open by one process that applications ask over a Unix
//! socket (see `keyhold::service` and docs/service.md).

use clap::Args;

use super::{CmdResult, Context};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen: unix:PATH [default: $XDG_RUNTIME_DIR/keyhold.sock, else
    /// /run/keyhold/keyhold.sock]
    #[arg(long, value_name = "unix:PATH")]
    listen: Option<String>,
}

/// Opens the store (the passphrase is asked once, now) and serves it until SIGTERM or SIGINT.
#[cfg(feature = "serve")]
pub fn serve(ctx: &Context, args: &ServeArgs) -> CmdResult {
    use super::{io, Failure};
    use keyhold::service::Listen;
    let listen = match &args.listen {
        Some(text) => Listen::parse(text)?,
        None => Listen::default_path(),
    };
    // Refused before the store is unsealed: a service nobody may use is a mistake.
    keyhold::service::Clients::precheck(&ctx.config, &ctx.store)?;
    let keystore = io::open_keystore(ctx)?;
    keyhold::service::serve(keystore, &ctx.config, &listen, |at| {
        tracing::info!("keyhold serve: listening on {at}");
    })
    .map_err(Failure::from)
}

#[cfg(not(feature = "serve"))]
pub fn serve(_ctx: &Context, _args: &ServeArgs) -> CmdResult {
    Err(keyhold::Error::not_built("serve").into())
}
