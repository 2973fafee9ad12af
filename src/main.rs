//! The `keyhold` command: a thin layer over the library. See `docs/cli.md` for the contract.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // tpm2-tss logs its own `ERROR:esys:…` lines on stderr for errors keyhold handles (a PCR
    // policy that no longer matches, a busy TPM that is retried), which read as failures when the
    // command succeeds or reports the error itself. Quiet it unless the user asked for its logs.
    // Set here, first thing: setting the environment is only sound while no other thread can read
    // it, and tpm2-tss reads TSS2_LOG when it first logs (in a later TPM call).
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    cli::main()
}
