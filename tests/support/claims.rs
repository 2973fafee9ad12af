//! Helpers of the tests of README claims through the CLI (cli_hardening, cli_exit_codes,
//! cli_reseal): the configuration of a TPM-sealed store, and a TPM key's creation.

/// A configuration with the TPM at `tcti` as backend `tpm` (`extra` lines added to its table)
/// and the store's sealer stated as `tpm`.
pub fn tpm_store_config(tcti: &str, extra: &str) -> String {
    format!(
        "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{tcti}\"\n{extra}\n[store]\nsealer = \"tpm\"\n"
    )
}

/// `key create k --type ecdsa-p256 --backend tpm`: a key made inside the TPM.
pub const CREATE_TPM_KEY: &[&str] = &[
    "key",
    "create",
    "k",
    "--type",
    "ecdsa-p256",
    "--backend",
    "tpm",
];

/// An Env on a TPM-sealed store at `tcti` ([`tpm_store_config`] with `extra`): no passphrase
/// unless a command is given one (the recovery passphrase), tpm2-tss's own logging off.
pub fn tpm_env(env: super::env::Env, tcti: &str, extra: &str) -> super::env::Env {
    env.without_passphrase()
        .with_var("TSS2_LOG", "all+none")
        .with_config(&tpm_store_config(tcti, extra))
}
