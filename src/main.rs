//! The `keyhold` command: a thin layer over the library. See `docs/cli.md` for the contract.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
