//! Argument parsing, dispatch, output and exit codes. One file per group of subcommands.

mod doctor;
mod io;
mod key;
mod ops;
mod store;

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

    /// The namespace keys are created in and listed from
    #[arg(
        long,
        global = true,
        value_name = "NS",
        env = "KEYHOLD_NAMESPACE",
        default_value = keyhold::DEFAULT_NAMESPACE
    )]
    namespace: String,

    /// The backend configuration (TOML; see hsm-config/)
    #[arg(long, global = true, value_name = "FILE", env = "KEYHOLD_CONFIG")]
    config: Option<PathBuf>,

    /// Read the store's passphrase from the first line of FILE
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,

    /// Machine-readable output (JSON) on stdout
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new store
    Init(store::InitArgs),
    /// Create, list, show, export and destroy keys
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Sign input with a signing key
    Sign(ops::SignArgs),
    /// Verify a signature (exit 0 valid, 1 invalid)
    Verify(ops::VerifyArgs),
    /// Encrypt input into an envelope
    Encrypt(ops::EncryptArgs),
    /// Decrypt an envelope
    Decrypt(ops::EncryptArgs),
    /// Compute an HMAC-SHA256 tag
    Mac(ops::MacArgs),
    /// Verify an HMAC-SHA256 tag (exit 0 valid, 1 invalid)
    MacVerify(ops::MacVerifyArgs),
    /// Print N random bytes as hex
    Random(ops::RandomArgs),
    /// Check backends and tokens; find orphaned or missing key objects
    Doctor(doctor::DoctorArgs),
    /// Re-bind a TPM-sealed store to the PCRs as they are now (after an intended change)
    Reseal(store::ResealArgs),
}

/// Why a command failed, and so its exit code.
#[derive(Debug)]
pub enum Failure {
    /// The library refused or failed.
    Keyhold(keyhold::Error),
    /// The command line's own trouble (files, terminal).
    Cli(String),
    /// The command ran and found problems (`doctor`): its documented exit code and a summary.
    Findings { code: u8, summary: String },
}

impl From<keyhold::Error> for Failure {
    fn from(e: keyhold::Error) -> Self {
        Self::Keyhold(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cli(msg) | Self::Findings { summary: msg, .. } => f.write_str(msg),
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
    /// The documented exit code (docs/cli.md).
    fn exit_code(&self) -> u8 {
        use keyhold::Error as E;
        match self {
            Self::Keyhold(E::KeyIdAuthentication { .. }) => 3,
            Self::Keyhold(E::Unseal { .. }) => 4,
            Self::Keyhold(E::NoSuchKey { .. }) => 5,
            Self::Keyhold(E::Integrity { .. }) => 6,
            Self::Keyhold(
                E::BackendUnavailable { .. } | E::BackendLogin { .. } | E::Timeout { .. },
            ) => 7,
            Self::Findings { code, .. } => *code,
            _ => 1,
        }
    }
}

/// What commands return.
pub type CmdResult = Result<(), Failure>;

/// Settings every command shares, resolved from the global options.
pub struct Context {
    store: PathBuf,
    config: keyhold::config::Config,
    namespace: String,
    passphrase_file: Option<PathBuf>,
    json: bool,
}

impl Context {
    fn from_args(args: &Args) -> Result<Self, Failure> {
        let store = match &args.store {
            Some(dir) => dir.clone(),
            None => default_store()?,
        };
        let config = match &args.config {
            Some(path) => keyhold::config::Config::load(path)?,
            None => keyhold::config::Config::default(),
        };
        Ok(Self {
            store,
            config,
            namespace: args.namespace.clone(),
            passphrase_file: args.passphrase_file.clone(),
            json: args.json,
        })
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
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Cli(msg)) if msg == io::BROKEN_PIPE => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("keyhold: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYHOLD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(args: &Args) -> CmdResult {
    let ctx = Context::from_args(args)?;
    match &args.command {
        Command::Init(a) => store::init(&ctx, a),
        Command::Key(c) => key::run(&ctx, c),
        Command::Sign(a) => ops::sign(&ctx, a),
        Command::Verify(a) => ops::verify(&ctx, a),
        Command::Encrypt(a) => ops::encrypt(&ctx, a),
        Command::Decrypt(a) => ops::decrypt(&ctx, a),
        Command::Mac(a) => ops::mac(&ctx, a),
        Command::MacVerify(a) => ops::mac_verify(&ctx, a),
        Command::Random(a) => ops::random(&ctx, a),
        Command::Doctor(a) => doctor::run(&ctx, a),
        Command::Reseal(a) => store::reseal(&ctx, a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
