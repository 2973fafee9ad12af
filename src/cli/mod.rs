//! Argument parsing, dispatch, output and exit codes. One file per group of subcommands.

mod audit;
mod backup;
mod client;
mod doctor;
mod io;
mod key;
mod lifecycle;
mod open;
mod ops;
mod passphrase;
mod recovery;
mod select;
mod serve;
mod store;
mod transport;
mod verify;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A hardware-backed keystore: applications hold authenticated key IDs, never keys.
#[derive(Debug, Parser)]
#[command(name = "keyhold", version, about, long_about = None)]
pub struct Args {
    /// The store directory [default: $KEYHOLD_STORE, else $XDG_DATA_HOME/keyhold]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,

    /// The namespace keys are created in, listed from, and looked up by --name in
    #[arg(
        long,
        global = true,
        value_name = "NS",
        env = "KEYHOLD_NAMESPACE",
        default_value = keyhold::DEFAULT_NAMESPACE
    )]
    namespace: String,

    /// The backend configuration (TOML; see hsm-config/) [default: $KEYHOLD_CONFIG, else
    /// $XDG_CONFIG_HOME/keyhold/config.toml (~/.config/keyhold/config.toml), else
    /// /etc/keyhold/config.toml, the first that exists]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Read the store's passphrase from the first line of FILE
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,

    /// Run key and cryptographic commands through `keyhold serve` at REMOTE (unix:PATH, or
    /// https://HOST:PORT with --remote-ca), which holds the store, instead of opening it here
    /// [default: $KEYHOLD_REMOTE, for those commands only]
    #[arg(long, global = true, value_name = "REMOTE")]
    remote: Option<String>,

    /// With --remote: the bearer token is the first line of FILE [default: $KEYHOLD_TOKEN, else
    /// none: the service knows this user by its peer credentials]
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// With --remote https://…: the CA certificate(s) (PEM) the service's certificate must chain
    /// to; the system's CA roots are never used [default: $KEYHOLD_REMOTE_CA]
    #[arg(long, global = true, value_name = "FILE")]
    remote_ca: Option<PathBuf>,

    /// With --remote https://…: this client's certificate (PEM), for a service that knows its
    /// clients by certificate (mutual TLS); with --remote-key [default: $KEYHOLD_REMOTE_CERT]
    #[arg(long, global = true, value_name = "FILE", requires = "remote_key")]
    remote_cert: Option<PathBuf>,

    /// The private key (PEM) of --remote-cert, readable by its owner (and group) only
    /// [default: $KEYHOLD_REMOTE_KEY]
    #[arg(long, global = true, value_name = "FILE", requires = "remote_cert")]
    remote_key: Option<PathBuf>,

    /// Machine-readable output (JSON) on stdout; errors as a JSON object on stderr
    #[arg(long, global = true)]
    json: bool,

    /// Log more on stderr: -v info, -vv debug (overrides RUST_LOG)
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,

    /// Log errors only: no warnings on stderr (overrides RUST_LOG)
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new store
    Init(store::InitArgs),
    /// Create, list, show and export keys; rotate them, change their state, destroy them
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Sign input with a signing key
    Sign(ops::SignArgs),
    /// Verify a signature (exit 0 valid, 1 invalid)
    Verify(ops::VerifyArgs),
    /// Encrypt input into an envelope
    Encrypt(ops::EncryptArgs),
    /// Decrypt an envelope
    Decrypt(ops::DecryptArgs),
    /// Re-encrypt an envelope under the key's newest version (the plaintext stays inside)
    Rewrap(ops::DecryptArgs),
    /// Compute an HMAC-SHA256 tag
    Mac(ops::MacArgs),
    /// Verify an HMAC-SHA256 tag (exit 0 valid, 1 invalid)
    MacVerify(ops::MacVerifyArgs),
    /// Print N random bytes as hex
    Random(ops::RandomArgs),
    /// Check backends and tokens; find orphaned or missing key objects
    Doctor(doctor::DoctorArgs),
    /// Re-bind a TPM-sealed store to the PCRs as they are now (after an intended change), or move
    /// the store to another sealer, passphrase or Argon2 cost (--to)
    Reseal(store::ResealArgs),
    /// Write an encrypted, authenticated backup of the store into a directory
    Backup(backup::BackupArgs),
    /// Restore the store from a backup, verified whole before anything is replaced
    Restore(backup::RestoreArgs),
    /// Break-glass recovery: split the root secret into shares, or restore the store from them
    #[command(subcommand)]
    Recovery(recovery::RecoveryCommand),
    /// Verify the audit log's hash chain, or show its entries
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Run the lifecycle work that is due (activations, expiries, rotations, destructions)
    Maintain(lifecycle::MaintainArgs),
    /// Verify the whole store: records, audit log, key material in the backends
    #[command(subcommand)]
    Store(verify::StoreCommand),
    /// Hold the store open and serve its cryptography to configured clients over a Unix socket
    Serve(serve::ServeArgs),
    /// Add, list and remove the service's token clients (bearer tokens)
    #[command(subcommand)]
    Client(client::ClientCommand),
}

/// Why a command failed, and so its exit code.
#[derive(Debug)]
pub enum Failure {
    /// The library refused or failed.
    Keyhold(keyhold::Error),
    /// The command line's own trouble (files, terminal).
    Cli(String),
    /// The command line was used wrongly in a way clap cannot see (exit 2, as clap's errors).
    Usage(String),
    /// No key has the name given with `--name` (exit 5, as a destroyed key's ID).
    NoSuchName(String),
    /// The command already said what happened on stdout (`{"valid":false}`): exit 1, no message.
    Quiet,
    /// A failure with where to look next appended (e.g. where the configuration is looked for).
    Hinted(Box<Failure>, String),
    /// The command ran and found problems (`doctor`, `store verify`): its documented exit code,
    /// the JSON error `kind` (`doctor_findings`, `verify_findings`) and a summary.
    Findings {
        code: u8,
        kind: &'static str,
        summary: String,
    },
}

impl From<keyhold::Error> for Failure {
    fn from(e: keyhold::Error) -> Self {
        Self::Keyhold(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cli(msg)
            | Self::Usage(msg)
            | Self::NoSuchName(msg)
            | Self::Findings { summary: msg, .. } => f.write_str(msg),
            Self::Quiet => Ok(()),
            Self::Hinted(inner, hint) => write!(f, "{inner}: {hint}"),
            Self::Keyhold(e) => {
                write!(f, "{e}")?;
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
        }
    }
}

impl Failure {
    /// Whether this is stdout's reader going away, which `main` treats as success.
    fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Cli(msg) if msg == io::BROKEN_PIPE)
    }

    /// The documented exit code (docs/cli.md).
    fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::NoSuchName(_) => 5,
            Self::Hinted(inner, _) => inner.exit_code(),
            // By kind: an error `keyhold serve` answered (`--remote`) exits as the same error
            // would have here.
            Self::Keyhold(e) => match e.kind() {
                "key_id_authentication" => 3,
                "unseal" => 4,
                "no_such_key" => 5,
                "wrong_state" => 9,
                "store_tampered" => 10,
                // A device object that does not match its record failed an integrity check too.
                "integrity" | "key_object_mismatch" => 6,
                "backend_unavailable" | "backend_login" | "timeout" => 7,
                _ => 1,
            },
            Self::Findings { code, .. } => *code,
            _ => 1,
        }
    }

    /// A stable machine-readable name of what failed, for `--json` errors (docs/cli.md).
    fn kind(&self) -> &'static str {
        match self {
            Self::Cli(_) | Self::Quiet => "cli",
            Self::Usage(_) => "usage",
            Self::NoSuchName(_) => "no_such_key",
            Self::Findings { kind, .. } => kind,
            Self::Hinted(inner, _) => inner.kind(),
            Self::Keyhold(e) => e.kind(),
        }
    }

    /// Prints the failure on stderr: `keyhold: message`, or with `--json` one JSON object.
    fn report(&self, json: bool) {
        if matches!(self, Self::Quiet) {
            return;
        }
        if json {
            eprintln!(
                "{}",
                error_json(self.exit_code(), self.kind(), &self.to_string())
            );
        } else {
            // Messages carry text from devices and files (a token's label, a path): never let
            // it drive the terminal.
            eprintln!("keyhold: {}", io::terminal_safe_message(&self.to_string()));
        }
    }
}

/// `{"error":{"code":N,"kind":"…","message":"…"}}`.
fn error_json(code: u8, kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "error": { "code": code, "kind": kind, "message": message } })
}

/// What commands return.
pub type CmdResult = Result<(), Failure>;

/// Settings every command shares, resolved from the global options.
pub struct Context {
    store: PathBuf,
    config: keyhold::config::Config,
    /// Where the configuration was looked for and which file was read, for messages.
    config_source: ConfigSource,
    namespace: String,
    passphrase_file: Option<PathBuf>,
    /// `--remote`: the service that holds the store, if commands go through one.
    remote: Option<String>,
    /// `--token-file` (read only by `--remote`, which the `serve` feature builds).
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    token_file: Option<PathBuf>,
    /// `--remote-ca`, `--remote-cert`, `--remote-key`, for an https remote.
    #[cfg_attr(not(feature = "serve"), allow(dead_code))]
    remote_tls: RemoteTls,
    json: bool,
}

/// The TLS files of an https remote: from `--remote-ca`, `--remote-cert` and `--remote-key`,
/// else `$KEYHOLD_REMOTE_CA`, `$KEYHOLD_REMOTE_CERT` and `$KEYHOLD_REMOTE_KEY`.
#[cfg_attr(not(feature = "serve"), allow(dead_code))]
#[derive(Debug, Default)]
struct RemoteTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    /// Whether any came from the command line: with a unix: remote that is a mistake to say,
    /// while the variables may be set for the https remotes of other commands.
    by_flag: bool,
}

impl RemoteTls {
    fn from_args(args: &Args, remote: bool) -> Result<Self, Failure> {
        let by_flag = args.remote_ca.is_some() || args.remote_cert.is_some();
        if by_flag && !remote {
            return Err(Failure::Usage(
                "--remote-ca, --remote-cert and --remote-key are for --remote https://HOST:PORT \
                 (or $KEYHOLD_REMOTE): give it too"
                    .into(),
            ));
        }
        if !remote {
            return Ok(Self::default());
        }
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let ca = args.remote_ca.clone().or_else(|| var("KEYHOLD_REMOTE_CA"));
        let (cert, key) = match (&args.remote_cert, &args.remote_key) {
            (Some(cert), Some(key)) => (Some(cert.clone()), Some(key.clone())),
            _ => (var("KEYHOLD_REMOTE_CERT"), var("KEYHOLD_REMOTE_KEY")),
        };
        Ok(Self {
            ca,
            cert,
            key,
            by_flag,
        })
    }
}

impl Context {
    fn from_args(args: &Args) -> Result<Self, Failure> {
        // `--remote` is said for this command; `$KEYHOLD_REMOTE` is a default for the commands
        // that run through a service, and leaves the others (`serve` itself, `client add`, …)
        // where the store is.
        let remote = match &args.remote {
            Some(remote) => Some(remote.clone()),
            None if runs_remotely(&args.command) => std::env::var("KEYHOLD_REMOTE").ok(),
            None => None,
        }
        .filter(|r| !r.is_empty());
        let store = match &args.store {
            Some(dir) => dir.clone(),
            // Through a service, no store is opened here: one that cannot be found is no error.
            None if remote.is_some() => default_store().unwrap_or_default(),
            None => default_store()?,
        };
        let config_source = ConfigSource::locate(args.config.as_deref());
        let config = match &config_source.read {
            Some(path) => keyhold::config::Config::load(path)?,
            None => keyhold::config::Config::default(),
        };
        Ok(Self {
            store,
            config,
            config_source,
            namespace: args.namespace.clone(),
            passphrase_file: args.passphrase_file.clone(),
            remote_tls: RemoteTls::from_args(args, remote.is_some())?,
            remote,
            token_file: args.token_file.clone(),
            json: args.json,
        })
    }
}

/// Where the configuration comes from: `--config`, else `$KEYHOLD_CONFIG`, else the first of
/// `$XDG_CONFIG_HOME/keyhold/config.toml` (`~/.config/keyhold/config.toml`) and
/// `/etc/keyhold/config.toml` that exists.
#[derive(Debug)]
struct ConfigSource {
    /// The file read, if any. A file named by `--config` or `$KEYHOLD_CONFIG` is read even if it
    /// does not exist, so that a typo is an error rather than an empty configuration.
    read: Option<PathBuf>,
    /// How it was chosen, or every place looked at: for messages.
    tried: Vec<String>,
}

impl ConfigSource {
    const SYSTEM: &'static str = "/etc/keyhold/config.toml";

    fn locate(flag: Option<&std::path::Path>) -> Self {
        if let Some(path) = flag {
            return Self {
                read: Some(path.to_owned()),
                tried: vec![format!("--config {}", path.display())],
            };
        }
        let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(path) = non_empty("KEYHOLD_CONFIG") {
            let path = PathBuf::from(path);
            return Self {
                tried: vec![format!("$KEYHOLD_CONFIG={}", path.display())],
                read: Some(path),
            };
        }
        let mut tried = vec![
            "--config (not given)".to_owned(),
            "$KEYHOLD_CONFIG (unset)".to_owned(),
        ];
        let user = non_empty("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| non_empty("HOME").map(|home| PathBuf::from(home).join(".config")))
            .map(|dir| dir.join("keyhold/config.toml"));
        let candidates = user.into_iter().chain([PathBuf::from(Self::SYSTEM)]);
        let mut read = None;
        for path in candidates {
            tried.push(path.display().to_string());
            if path.exists() {
                read = Some(path);
                break;
            }
        }
        Self { read, tried }
    }

    /// `configuration read from FILE (looked for: …)` or `no configuration file (looked for: …)`.
    fn describe(&self) -> String {
        let looked = self.tried.join(", ");
        match &self.read {
            Some(path) => format!(
                "configuration read from {} (looked for: {looked})",
                path.display()
            ),
            None => format!(
                "no configuration file was found, so only the built-in `software` backend exists \
                 (looked for: {looked})"
            ),
        }
    }
}

fn default_store() -> Result<PathBuf, Failure> {
    let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("KEYHOLD_STORE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(data) = non_empty("XDG_DATA_HOME") {
        return Ok(PathBuf::from(data).join("keyhold"));
    }
    if let Some(home) = non_empty("HOME") {
        return Ok(PathBuf::from(home).join(".local/share/keyhold"));
    }
    Err(Failure::Cli(
        "no store directory: pass --store DIR or set KEYHOLD_STORE".into(),
    ))
}

/// Runs `keyhold` and turns the outcome into an exit code.
pub fn main() -> ExitCode {
    // Files keyhold writes (plaintexts among them) are private to the user, and nothing this
    // process reads (passphrases, PINs, plaintexts) may end in a core file.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    keyhold::secret::harden_process();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            if !e.use_stderr() {
                // --help, --version
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if json_asked() {
                let message = e.render().to_string();
                let message = message.trim().trim_start_matches("error: ");
                eprintln!("{}", error_json(2, "usage", message));
            } else {
                let _ = e.print();
            }
            return ExitCode::from(2);
        }
    };
    init_logging(&args);
    let outcome = run(&args);
    if let Err(failure) = &outcome {
        if !failure.is_broken_pipe() {
            failure.report(args.json);
        }
    }
    ExitCode::from(exit_code_of(&outcome))
}

/// The exit code of a command's outcome (docs/cli.md): 0 for success, and for a broken pipe (the
/// reader of stdout went away, as `head` does: not keyhold's failure); else the failure's.
fn exit_code_of(outcome: &CmdResult) -> u8 {
    match outcome {
        Ok(()) => 0,
        Err(failure) if failure.is_broken_pipe() => 0,
        Err(failure) => failure.exit_code(),
    }
}

/// Whether `--json` is among the arguments (before any `--`), for errors found before they parse.
fn json_asked() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Log lines on stderr: `-q` errors only, `-v` info, `-vv` debug; otherwise `$KEYHOLD_LOG`, else
/// `$RUST_LOG` (tracing's filter syntax: `off`, `warn`, `keyhold=debug`, …), else warnings.
fn init_logging(args: &Args) {
    use tracing_subscriber::EnvFilter;
    let filter = if args.quiet {
        EnvFilter::new("error")
    } else {
        match args.verbose {
            0 => EnvFilter::try_from_env("KEYHOLD_LOG")
                .or_else(|_| EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| EnvFilter::new("warn")),
            1 => EnvFilter::new("info"),
            _ => EnvFilter::new("debug"),
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(args: &Args) -> CmdResult {
    let ctx = Context::from_args(args)?;
    dispatch(&ctx, args).map_err(|failure| match failure {
        // A backend the configuration lacks: say where the configuration was looked for.
        Failure::Keyhold(keyhold::Error::NoSuchBackend { .. }) => {
            Failure::Hinted(Box::new(failure), ctx.config_source.describe())
        }
        other => other,
    })
}

/// Whether `command` may run through `--remote`: key and cryptographic commands, and the
/// store's checks, audit log, due work and token clients (`audit`, `store verify`, `maintain`,
/// `client list`: for a client granted `audit`, `maintain` or `admin`). The
/// others change the store as a whole (or are the service) and run where it is.
fn runs_remotely(command: &Command) -> bool {
    matches!(
        command,
        Command::Key(_)
            | Command::Audit(_)
            | Command::Store(verify::StoreCommand::Verify(_))
            | Command::Maintain(_)
            | Command::Client(client::ClientCommand::List)
            | Command::Sign(_)
            | Command::Verify(_)
            | Command::Encrypt(_)
            | Command::Decrypt(_)
            | Command::Rewrap(_)
            | Command::Mac(_)
            | Command::MacVerify(_)
            | Command::Random(_)
    )
}

fn dispatch(ctx: &Context, args: &Args) -> CmdResult {
    if let Some(remote) = &args.remote {
        if !runs_remotely(&args.command) {
            return Err(io::not_remote(remote));
        }
    }
    match &args.command {
        Command::Init(a) => store::init(ctx, a),
        Command::Key(c) => key::run(ctx, c),
        Command::Sign(a) => ops::sign(ctx, a),
        Command::Verify(a) => ops::verify(ctx, a),
        Command::Encrypt(a) => ops::encrypt(ctx, a),
        Command::Decrypt(a) => ops::decrypt(ctx, a),
        Command::Rewrap(a) => ops::rewrap(ctx, a),
        Command::Mac(a) => ops::mac(ctx, a),
        Command::MacVerify(a) => ops::mac_verify(ctx, a),
        Command::Random(a) => ops::random(ctx, a),
        Command::Doctor(a) => doctor::run(ctx, a),
        Command::Reseal(a) => store::reseal(ctx, a),
        Command::Recovery(c) => recovery::run(ctx, c),
        Command::Backup(a) => backup::backup(ctx, a),
        Command::Restore(a) => backup::restore(ctx, a),
        Command::Audit(c) => audit::run(ctx, c),
        Command::Maintain(a) => lifecycle::maintain(ctx, a),
        Command::Store(c) => verify::run(ctx, c),
        Command::Serve(a) => serve::serve(ctx, a),
        Command::Client(c) => client::run(ctx, c),
    }
}

#[cfg(test)]
mod tests;
