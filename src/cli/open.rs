//! Opening the keystore: the sealer the user states, the unsealer for it (token, TPM or
//! passphrase), the devices it needs, and the `unlocking…` notice.

use std::io::Write;

use keyhold::config::SealerKind;
use keyhold::sealer::{SealedRoot, Sealer};
use keyhold::{KeyService, Keystore, PassphraseSealer, StoreAdmin};

use super::passphrase::passphrase;
use super::{Context, Failure};

/// The sealer the user states for the store: `$KEYHOLD_SEALER`, else `sealer` under `[store]` in
/// the configuration, else `passphrase`, and where that came from (for messages).
///
/// Never the sealer the store's own files name: whoever can write them could swap a passphrase
/// seal for a TPM seal of a root secret they chose, and keyhold would open the store without the
/// passphrase, making every new key under a key-encryption key they know. A statement outside
/// the store is what they cannot change; passphrase, the one sealer that needs the user's secret,
/// is the default.
pub fn stated_sealer(ctx: &Context) -> Result<(SealerKind, &'static str), Failure> {
    sealer_statement(ctx, std::env::var_os("KEYHOLD_SEALER"))
}

/// [`stated_sealer`] given `$KEYHOLD_SEALER` (tests pass it instead of changing the process's
/// environment, which every test thread shares).
fn sealer_statement(
    ctx: &Context,
    variable: Option<std::ffi::OsString>,
) -> Result<(SealerKind, &'static str), Failure> {
    if let Some(value) = variable.filter(|v| !v.is_empty()) {
        let kind = match value.to_str() {
            Some("passphrase") => SealerKind::Passphrase,
            Some("tpm") => SealerKind::Tpm,
            Some("pkcs11") => SealerKind::Pkcs11,
            _ => {
                return Err(Failure::Cli(format!(
                    "KEYHOLD_SEALER is `{}`: set it to passphrase, tpm or pkcs11",
                    value.to_string_lossy()
                )))
            }
        };
        return Ok((kind, "KEYHOLD_SEALER"));
    }
    match ctx.config.store.sealer {
        Some(kind) => Ok((kind, "the configuration's [store] sealer")),
        None => Ok((
            SealerKind::Passphrase,
            "the default, as no sealer was stated",
        )),
    }
}

/// The stated sealer, if the store records the same; else a refusal saying what to set if the
/// store is genuinely sealed the way it records.
pub fn check_stated_sealer(ctx: &Context, recorded: &str) -> Result<SealerKind, Failure> {
    same_sealer(recorded, stated_sealer(ctx)?)
}

fn same_sealer(
    recorded: &str,
    (stated, source): (SealerKind, &'static str),
) -> Result<SealerKind, Failure> {
    if recorded == stated.as_str() {
        return Ok(stated);
    }
    Err(keyhold::Error::Unseal {
        reason: format!(
            "the store records a `{recorded}` seal, but keyhold expects a `{}` seal ({source}). \
             If you made this store with `keyhold init --sealer {recorded}`, say so: set \
             KEYHOLD_SEALER={recorded}, or put `sealer = \"{recorded}\"` under [store] in the \
             configuration file. If you did not, someone who can write the store directory \
             replaced its sealed root secret: do not use the store; restore it from a backup",
            stated.as_str()
        ),
    }
    .into())
}

/// Opens and unseals the store named by the context, with the sealer the user stated (see
/// [`stated_sealer`]); a store that records another kind is refused.
pub fn open_keystore(ctx: &Context) -> Result<Keystore, Failure> {
    if let Some(remote) = &ctx.remote {
        return Err(not_remote(remote));
    }
    // Look for the store (and its sealer) before asking for a passphrase nobody can use.
    let sealed = keyhold::store::Store::open(&ctx.store)?
        .meta()
        .sealed_root
        .clone();
    let sealer = unsealer(ctx, &sealed)?;
    let _notice = UnlockingNotice::start(&sealed);
    Ok(Keystore::open_with(
        &ctx.store,
        sealer.as_ref(),
        &ctx.config,
    )?)
}

/// The refusal of a command that cannot run through `--remote REMOTE`.
pub fn not_remote(remote: &str) -> Failure {
    Failure::Usage(format!(
        "this command runs where the store is, not through --remote {remote}: the service runs \
         key commands (key create, list, show, id, pubkey, rotate, suspend, resume, deactivate, \
         compromise, destroy, cancel-destroy, set, history, export, import), cryptographic ones \
         (sign, verify, encrypt, decrypt, rewrap, mac, mac-verify, random) and, for a client \
         granted their operation, the commands on the whole store (audit verify, audit show, \
         store verify, maintain, client list)"
    ))
}

/// The keys a key or cryptographic command works on: the service's with `--remote` (or
/// `$KEYHOLD_REMOTE`), else the store's, opened here.
pub fn open_keys(ctx: &Context) -> Result<Box<dyn KeyService>, Failure> {
    match &ctx.remote {
        Some(remote) => Ok(remote_keys(ctx, remote, None)?.into_keys()),
        None => Ok(Box::new(open_keystore(ctx)?)),
    }
}

/// How long a command on the whole store may wait for a service's answer: verifying every key's
/// material, or the due work of every key, takes as long as the devices do (the key commands'
/// calls keep the client's default, 120 s).
const STORE_WIDE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The store's keys and its administration ([`StoreAdmin`]), for the commands that read the
/// audit log or the token clients: the service's with `--remote` (which needs `audit` or
/// `admin`), else the store's, opened here.
pub fn open_store_keys(ctx: &Context) -> Result<Box<dyn StoreKeys>, Failure> {
    match &ctx.remote {
        Some(remote) => remote_keys(ctx, remote, None),
        None => Ok(Box::new(open_keystore(ctx)?)),
    }
}

/// [`open_store_keys`] for the commands on every key of the store (`store verify`,
/// `maintain`): through a service, they wait up to an hour for its answer.
pub fn open_store_wide(ctx: &Context) -> Result<Box<dyn StoreKeys>, Failure> {
    match &ctx.remote {
        Some(remote) => remote_keys(ctx, remote, Some(STORE_WIDE_TIMEOUT)),
        None => Ok(Box::new(open_keystore(ctx)?)),
    }
}

/// A store's keys and its administration, here or through a service.
pub trait StoreKeys: KeyService + StoreAdmin {
    /// The same, as its keys.
    fn keys(&self) -> &dyn KeyService;

    /// The same, as its keys only.
    fn into_keys(self: Box<Self>) -> Box<dyn KeyService>;
}

impl<T: KeyService + StoreAdmin + 'static> StoreKeys for T {
    fn keys(&self) -> &dyn KeyService {
        self
    }

    fn into_keys(self: Box<Self>) -> Box<dyn KeyService> {
        self
    }
}

#[cfg(feature = "serve")]
fn remote_keys(
    ctx: &Context,
    remote: &str,
    timeout: Option<std::time::Duration>,
) -> Result<Box<dyn StoreKeys>, Failure> {
    use keyhold::service::{Remote, RemoteKeystore};
    // A remote that is no remote is a usage error, as any malformed argument.
    let remote = Remote::parse(remote).map_err(|e| Failure::Usage(e.to_string()))?;
    let tls = match &remote {
        Remote::Unix(_) if ctx.remote_tls.by_flag => {
            return Err(Failure::Usage(format!(
                "--remote-ca, --remote-cert and --remote-key are for an https:// remote; \
                 {remote} is a local socket"
            )))
        }
        Remote::Unix(_) => None,
        Remote::Https { .. } => Some(remote_tls(ctx, &remote)?),
    };
    // Read (and `$KEYHOLD_TOKEN` removed) before the client exists: the environment is changed
    // only while this is the one thread (a name lookup for an https remote starts one).
    let token = super::passphrase::token(ctx.token_file.as_deref())?;
    let mut keys = RemoteKeystore::new(remote)?;
    if let Some(tls) = tls {
        keys = keys.with_tls(tls);
    }
    if let Some(token) = token {
        keys = keys.with_token(token);
    }
    if let Some(timeout) = timeout {
        keys = keys.with_timeout(timeout);
    }
    Ok(Box::new(keys))
}

/// The TLS of an https `remote`: its CA is required (the system's roots are not used), a client
/// certificate and key go together.
#[cfg(feature = "serve")]
fn remote_tls(
    ctx: &Context,
    remote: &keyhold::service::Remote,
) -> Result<keyhold::service::ClientTls, Failure> {
    let tls = &ctx.remote_tls;
    let Some(ca) = &tls.ca else {
        return Err(Failure::Usage(format!(
            "--remote {remote} needs --remote-ca FILE (or $KEYHOLD_REMOTE_CA): the CA \
             certificate (PEM) the service's certificate must chain to; the system's CA roots \
             are not used"
        )));
    };
    let identity = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        (None, None) => None,
        _ => {
            return Err(Failure::Usage(
                "a client certificate and its key go together: give both $KEYHOLD_REMOTE_CERT \
                 and $KEYHOLD_REMOTE_KEY (or --remote-cert and --remote-key), or neither"
                    .into(),
            ))
        }
    };
    Ok(keyhold::service::ClientTls::load(ca, identity)?)
}

#[cfg(not(feature = "serve"))]
fn remote_keys(
    _: &Context,
    _: &str,
    _: Option<std::time::Duration>,
) -> Result<Box<dyn StoreKeys>, Failure> {
    Err(keyhold::Error::not_built("serve").into())
}

/// The sealer that unseals the store sealed as `sealed` says, of the kind the user stated (see
/// [`stated_sealer`]): a store that records another kind is refused. Asks for the passphrase of a
/// passphrase store.
pub fn unsealer(ctx: &Context, sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    let stated = check_stated_sealer(ctx, &sealed.sealer)?;
    // Which backend reaches the token or TPM comes from the store's parameters: they choose only
    // among the configured backends, and are authenticated with the rest of the metadata once the
    // root is unsealed.
    Ok(match stated {
        SealerKind::Pkcs11 => pkcs11_unsealer(ctx, sealed)?,
        SealerKind::Tpm => tpm_unsealer(ctx, sealed)?,
        SealerKind::Passphrase => Box::new(PassphraseSealer::new(passphrase(ctx, false)?)),
    })
}

/// How long unsealing may take before a terminal is told `unlocking…`.
const UNLOCKING_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// While alive, says `keyhold: unlocking…` on stderr if unsealing a passphrase store (its Argon2
/// cost) takes longer than [`UNLOCKING_AFTER`] — only when stderr is a terminal: a script's
/// captured stderr gets nothing.
#[derive(Debug)]
pub struct UnlockingNotice {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UnlockingNotice {
    /// The notice for unsealing `sealed` (none unless it is a passphrase seal).
    pub fn start(sealed: &SealedRoot) -> Self {
        use std::io::IsTerminal;
        let terminal = sealed.sealer == PassphraseSealer::KIND && std::io::stderr().is_terminal();
        Self::start_with(terminal, unlocking_after(), || {
            Box::new(std::io::stderr()) as Box<dyn Write + Send>
        })
    }

    /// The notice written to `out` after `after`, if `terminal`; at once if `after` is zero.
    fn start_with(
        terminal: bool,
        after: std::time::Duration,
        out: impl FnOnce() -> Box<dyn Write + Send> + Send + 'static,
    ) -> Self {
        let say = |out: Box<dyn Write + Send>| {
            let mut out = out;
            let _ = out.write_all("keyhold: unlocking…\n".as_bytes());
            let _ = out.flush();
        };
        if !terminal {
            return Self {
                done: None,
                thread: None,
            };
        }
        if after.is_zero() {
            say(out());
            return Self {
                done: None,
                thread: None,
            };
        }
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("unlocking notice".into())
            .spawn(move || {
                // Dropping the sender (unsealing finished) ends the wait early, with nothing said.
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(after) {
                    say(out());
                }
            })
            .ok();
        Self {
            done: Some(done),
            thread,
        }
    }
}

impl Drop for UnlockingNotice {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// [`UNLOCKING_AFTER`]; test builds take `KEYHOLD_TEST_UNLOCKING_AFTER_MS` instead, so that tests
/// need no store slow to open to see (or not see) the notice.
fn unlocking_after() -> std::time::Duration {
    #[cfg(feature = "testing")]
    if let Some(ms) = std::env::var("KEYHOLD_TEST_UNLOCKING_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return std::time::Duration::from_millis(ms);
    }
    UNLOCKING_AFTER
}

/// The `pkcs11` sealer that opens the store sealed as `sealed` says.
#[cfg(feature = "pkcs11")]
fn pkcs11_unsealer(ctx: &Context, sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    let name = keyhold::Pkcs11Sealer::backend_of(sealed)?;
    let backend = std::sync::Arc::new(pkcs11_backend(ctx, &name)?);
    Ok(Box::new(keyhold::Pkcs11Sealer::new(backend)))
}

#[cfg(not(feature = "pkcs11"))]
fn pkcs11_unsealer(_ctx: &Context, _sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    Err(keyhold::Error::not_built("pkcs11").into())
}

/// The `tpm` sealer that opens the store sealed as `sealed` says.
#[cfg(feature = "tpm")]
fn tpm_unsealer(ctx: &Context, sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    let name = keyhold::TpmSealer::backend_of(sealed)?;
    let (device, name) = tpm_device(ctx, name.as_deref(), true)?;
    let file = ctx.passphrase_file.clone();
    Ok(Box::new(
        keyhold::TpmSealer::new(device, name).with_recovery_prompt_on_another_tpm(Box::new(
            move || {
                super::passphrase::passphrase_from(file.as_deref(), false).map_err(|f| {
                    keyhold::Error::Unseal {
                        reason: format!("the recovery passphrase is needed: {f}"),
                    }
                })
            },
        )),
    ))
}

#[cfg(not(feature = "tpm"))]
fn tpm_unsealer(_ctx: &Context, _sealed: &SealedRoot) -> Result<Box<dyn Sealer>, Failure> {
    Err(keyhold::Error::not_built("tpm").into())
}

/// The TPM for the `tpm` sealer, and the name of the configured backend it came from: backend
/// `name`; without a name, the configuration's only TPM backend, else (none configured) the TPM
/// that `$TPM2TOOLS_TCTI`, `$TCTI` or `/dev/tpmrm0` names. `sealed` says the store already names
/// the backend (or none), so no other is guessed.
#[cfg(feature = "tpm")]
pub fn tpm_device(
    ctx: &Context,
    name: Option<&str>,
    sealed: bool,
) -> Result<
    (
        std::sync::Arc<keyhold::backend::tpm::device::TpmDevice>,
        Option<String>,
    ),
    Failure,
> {
    use keyhold::config::{BackendConfig, TpmConfig};
    let tpms: Vec<(&String, &TpmConfig)> = ctx
        .config
        .backends
        .iter()
        .filter_map(|(n, b)| match b {
            BackendConfig::Tpm(t) => Some((n, t)),
            _ => None,
        })
        .collect();
    let (name, config) = match name {
        Some(name) => match ctx.config.backends.get(name) {
            Some(BackendConfig::Tpm(t)) => (Some(name.to_owned()), t.clone()),
            Some(_) => {
                return Err(Failure::Cli(format!(
                    "backend `{name}` is not a TPM backend: the tpm sealer needs one"
                )))
            }
            None => {
                return Err(Failure::Cli(format!(
                    "the store is sealed by the TPM of backend `{name}`, which the configuration \
                     does not define: pass --config (or set KEYHOLD_CONFIG) with [backends.{name}]"
                )))
            }
        },
        None if sealed => (None, TpmConfig::default()),
        None => match tpms.as_slice() {
            [] => (None, TpmConfig::default()),
            [(name, config)] => (Some((*name).clone()), (*config).clone()),
            _ => {
                return Err(Failure::Cli(
                    "the configuration has several TPM backends: name the one that seals the \
                     store with --backend NAME"
                        .into(),
                ))
            }
        },
    };
    let device = keyhold::backend::tpm::device(&config.tcti(), config.settings()?)?;
    Ok((device, name))
}

/// The configured PKCS#11 backend `name`, for the `pkcs11` sealer.
#[cfg(feature = "pkcs11")]
pub fn pkcs11_backend(
    ctx: &Context,
    name: &str,
) -> Result<keyhold::backend::pkcs11::Pkcs11Backend, Failure> {
    use keyhold::backend::pkcs11::Pkcs11Backend;
    use keyhold::config::BackendConfig;
    match ctx.config.backends.get(name) {
        Some(BackendConfig::Pkcs11(p)) => Ok(Pkcs11Backend::new(name, p)?),
        Some(_) => Err(Failure::Cli(format!(
            "backend `{name}` is not a PKCS#11 backend: the pkcs11 sealer needs one"
        ))),
        None => Err(Failure::Cli(format!(
            "the store is sealed by the PKCS#11 backend `{name}`, which the configuration does \
             not define: pass --config (or set KEYHOLD_CONFIG) with [backends.{name}]"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Args, Context};
    use super::*;

    fn context(config: Option<&str>) -> (tempfile::TempDir, Context) {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "keyhold".to_owned(),
            "--store".into(),
            "/nonexistent".into(),
        ];
        if let Some(text) = config {
            let path = dir.path().join("keyhold.toml");
            std::fs::write(&path, text).unwrap();
            args.extend(["--config".into(), path.display().to_string()]);
        }
        args.extend(["key".into(), "list".into()]);
        let ctx = Context::from_args(&Args::try_parse_from(args).unwrap()).unwrap();
        (dir, ctx)
    }

    /// M1: the sealer is the user's statement: `$KEYHOLD_SEALER`, else `[store] sealer`, else
    /// passphrase; never the store's.
    #[test]
    fn the_stated_sealer_comes_from_the_environment_then_the_configuration() {
        let (_d, plain) = context(None);
        let unset = |ctx| sealer_statement(ctx, None).unwrap();
        assert_eq!(
            unset(&plain),
            (
                SealerKind::Passphrase,
                "the default, as no sealer was stated"
            )
        );
        let err = same_sealer("tpm", unset(&plain)).unwrap_err();
        assert!(err.to_string().contains("KEYHOLD_SEALER=tpm"), "{err}");
        let (_d, stated) = context(Some("[store]\nsealer = \"tpm\"\n"));
        assert_eq!(same_sealer("tpm", unset(&stated)).unwrap(), SealerKind::Tpm);
        assert_eq!(
            unset(&stated),
            (SealerKind::Tpm, "the configuration's [store] sealer")
        );
        // Set but empty counts as unset.
        assert_eq!(
            sealer_statement(&stated, Some("".into())).unwrap().0,
            SealerKind::Tpm
        );
        assert_eq!(
            sealer_statement(&stated, Some("pkcs11".into())).unwrap(),
            (SealerKind::Pkcs11, "KEYHOLD_SEALER")
        );
        let err = sealer_statement(&stated, Some("tmp".into())).unwrap_err();
        assert!(
            err.to_string().contains("passphrase, tpm or pkcs11"),
            "{err}"
        );
    }

    /// A writer the notice thread can own while the test reads what it wrote.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
        fn out(&self) -> impl FnOnce() -> Box<dyn Write + Send> + Send + 'static {
            let me = self.clone();
            move || Box::new(me) as Box<dyn Write + Send>
        }
    }

    /// The timing decision, with the threshold injected: unsealing that outlasts it says
    /// `unlocking…` (a zero threshold: at once, no clock involved), unsealing that ends first
    /// says nothing (an hour's threshold, ended at once), and without a terminal nothing is said
    /// and no thread waits, whatever the threshold.
    #[test]
    fn unlocking_is_said_on_a_terminal_only_once_the_threshold_passes() {
        let out = Shared::default();
        drop(UnlockingNotice::start_with(
            true,
            std::time::Duration::ZERO,
            out.out(),
        ));
        assert_eq!(out.text(), "keyhold: unlocking…\n");

        let out = Shared::default();
        let hour = std::time::Duration::from_secs(3600);
        let notice = UnlockingNotice::start_with(true, hour, out.out());
        assert!(
            notice.thread.is_some(),
            "a terminal waits for the threshold"
        );
        drop(notice);
        assert_eq!(out.text(), "", "unsealing ended before the threshold");

        let out = Shared::default();
        let notice = UnlockingNotice::start_with(false, std::time::Duration::ZERO, out.out());
        assert!(notice.thread.is_none() && notice.done.is_none());
        drop(notice);
        assert_eq!(out.text(), "", "not a terminal: silent");

        // And a waiting notice does speak once its threshold passes (polled, not timed: the
        // thread may be slow to run on a loaded machine, never too fast).
        let out = Shared::default();
        let notice =
            UnlockingNotice::start_with(true, std::time::Duration::from_millis(1), out.out());
        while out.text().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(notice);
        assert_eq!(out.text(), "keyhold: unlocking…\n");
    }
}
