//! `keyhold serve`: the keystore held open by one process that applications ask over Unix
//! sockets and TCP with TLS (see `keyhold::service` and docs/service.md).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{CmdResult, Context};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen, once per listener: unix:PATH, or tcp:IP:PORT with --tls-cert and
    /// --tls-key [default: the sockets systemd passed (LISTEN_FDS), else
    /// $XDG_RUNTIME_DIR/keyhold.sock, else /run/keyhold/keyhold.sock]
    #[arg(long, value_name = "unix:PATH|tcp:IP:PORT")]
    listen: Vec<String>,

    /// The TLS server certificate chain for TCP listeners (PEM, the server's own first)
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The TLS server's private key (PEM; mode 0600 or 0640)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Ask TCP clients for a certificate of this CA (PEM): its names are clients' `tls_name`
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    client_ca: Option<PathBuf>,

    /// How long a connection may take to send a whole request head (and a TLS handshake),
    /// counted from when it may send one: also how long an idle connection is kept open
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    header_timeout: Duration,

    /// How long a request's body may take to arrive after its head
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    body_timeout: Duration,

    /// After SIGTERM or SIGINT, how long requests in flight have to finish before their
    /// connections are dropped (the service then exits 0 with a warning)
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    drain_timeout: Duration,

    /// Connections served at once (more wait to be accepted)
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
}

fn duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("give a duration above zero".into()),
        Err(e) => Err(format!("{e} (give e.g. 10s, 2m)")),
    }
}

/// Opens the store (the passphrase is asked once, now) and serves it until SIGTERM or SIGINT.
#[cfg(feature = "serve")]
pub fn serve(ctx: &Context, args: &ServeArgs) -> CmdResult {
    use super::{io, Failure};
    use keyhold::service::{Limits, Listen, Prepared, Settings, TlsFiles};
    let mut listen = args
        .listen
        .iter()
        .map(|text| Listen::parse(text))
        .collect::<keyhold::Result<Vec<_>>>()?;
    let inherited = keyhold::service::inherited_sockets();
    if listen.is_empty() && inherited.is_empty() {
        listen.push(Listen::default_path());
    }
    listen.extend(inherited);
    let settings = Settings {
        listen,
        tls: args.tls_cert.as_ref().map(|cert| TlsFiles {
            cert: cert.clone(),
            key: args.tls_key.clone().unwrap_or_default(),
            client_ca: args.client_ca.clone(),
        }),
        limits: Limits {
            header_timeout: args.header_timeout,
            body_timeout: args.body_timeout,
            drain_timeout: args.drain_timeout,
            max_connections: args.max_connections as usize,
        },
    };
    settings
        .check()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    // Refused before the store is unsealed: a service nobody may use, or that cannot listen
    // where it is told, is a mistake that should cost no passphrase or PIN.
    keyhold::service::Clients::precheck(&ctx.config, &ctx.store)?;
    let prepared = Prepared::new(&ctx.config, &settings)?;
    lock_memory();
    let keystore = io::open_keystore(ctx)?;
    // The store's token clients, now readable: one with a configured client's name is refused.
    keyhold::service::Clients::for_service(&ctx.config, &keystore)?;
    keyhold::service::serve(prepared, keystore, |at| {
        for listen in at {
            tracing::info!("keyhold serve: listening on {listen}");
        }
    })
    .map_err(Failure::from)
}

/// Locks the service's memory, now and to come (`mlockall`), so that no unsealed key, PIN or
/// plaintext is written to swap, where that is permitted: with `CAP_IPC_LOCK`, or an unlimited
/// `RLIMIT_MEMLOCK` (`LimitMEMLOCK=infinity` in the systemd unit). Otherwise it is not tried
/// (a warning says why): a process locked with `MCL_FUTURE` has its allocations fail once it
/// reaches the limit. Pages are locked as they are touched (`MCL_ONFAULT`), so thread stacks
/// cost what they use. The store's own secrets are locked either way
/// ([`keyhold::secret::SecretBytes`]).
#[cfg(feature = "serve")]
fn lock_memory() {
    use rustix::process::{getrlimit, Resource};
    use rustix::thread::{capabilities, CapabilitySet};
    let limit = getrlimit(Resource::Memlock).current;
    let capable =
        capabilities(None).is_ok_and(|caps| caps.effective.contains(CapabilitySet::IPC_LOCK));
    if let (Some(bytes), false) = (limit, capable) {
        tracing::warn!(
            "memory not locked: RLIMIT_MEMLOCK is {bytes} bytes, and mlockall needs it \
             unlimited (LimitMEMLOCK=infinity, ulimit -l unlimited) or CAP_IPC_LOCK; secrets \
             are still locked one by one"
        );
        return;
    }
    if let Err(e) = keyhold::secret::lock_all_memory() {
        tracing::warn!("memory not locked: mlockall: {e}; secrets are still locked one by one");
    }
}

#[cfg(not(feature = "serve"))]
pub fn serve(_ctx: &Context, _args: &ServeArgs) -> CmdResult {
    Err(keyhold::Error::not_built("serve").into())
}
