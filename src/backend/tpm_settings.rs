//! How a TPM is used (SRK handle, loaded keys, waiting time): part of the configuration, so that
//! a `[backends.NAME]` table of type `tpm` is checked the same in a build without the `tpm`
//! feature. The device itself is `backend::tpm::device`.

use std::time::Duration;

/// How long a caller waits for its turn on the TPM by default. Generous: an RSA-3072 key
/// generation on a slow discrete TPM takes tens of seconds, and everyone else waits for it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// How many keys stay loaded between operations by default: a TPM holds about three transient
/// objects, and the SRK is one of them.
pub const DEFAULT_MAX_LOADED: usize = 2;

/// How a device is used: where its SRK lives, how many keys stay loaded, how long callers wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSettings {
    /// Keep the SRK at this persistent handle (`0x81000001` by convention) instead of deriving a
    /// transient copy at every connection.
    pub srk_handle: Option<u32>,
    /// The most keys kept loaded between operations (at least 1).
    pub max_loaded: usize,
    /// The longest a caller waits for its turn.
    pub timeout: Duration,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            srk_handle: None,
            max_loaded: DEFAULT_MAX_LOADED,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}
