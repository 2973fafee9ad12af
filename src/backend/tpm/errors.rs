//! Every tss-esapi error becomes a keyhold error here, and only here.
//!
//! tss-esapi's `Tss2ResponseCode::kind()` reads only the low 12 bits of a response code and ignores
//! the layer byte, so a TCTI failure (`0x000A000A`) can read as a TPM code. The layer is therefore
//! read first, from the raw code, and `kind()` is trusted only for codes from the TPM itself.

use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind as Kind};
use tss_esapi::Error as TssError;

use crate::error::Error;

/// The response-code layer of the TPM itself (TSS2_RC_LAYER_SHIFT is 16).
const LAYER_TPM: u32 = 0;
/// ESAPI.
const LAYER_ESYS: u32 = 7;
/// SAPI.
const LAYER_SYS: u32 = 8;
/// The TCTI: the connection to the TPM.
const LAYER_TCTI: u32 = 10;
/// Base codes that ESAPI and SAPI return when the TPM's answer did not arrive or was cut short.
const BASE_NO_CONNECTION: u32 = 8;
const BASE_IO_ERROR: u32 = 10;
const BASE_MALFORMED_RESPONSE: u32 = 17;
const BASE_INSUFFICIENT_RESPONSE: u32 = 19;

/// A failed TPM command: which one, and the error tss-esapi gave.
#[derive(Debug, Clone, Copy)]
pub(super) struct Failure {
    pub command: &'static str,
    pub error: TssError,
}

/// Names the TPM command a tss-esapi result came from.
pub(super) trait During<T> {
    fn during(self, command: &'static str) -> Result<T, Failure>;
}

impl<T> During<T> for tss_esapi::Result<T> {
    fn during(self, command: &'static str) -> Result<T, Failure> {
        self.map_err(|error| Failure { command, error })
    }
}

/// The raw 32-bit response code, read from its `Display` (`Response code value: 0x…`): the crate
/// keeps the field private.
pub(super) fn raw_code(rc: Tss2ResponseCode) -> Option<u32> {
    let text = match rc {
        Tss2ResponseCode::Success => return Some(0),
        Tss2ResponseCode::FormatZero(inner) => inner.to_string(),
        Tss2ResponseCode::FormatOne(inner) => inner.to_string(),
    };
    let hex = text.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

/// Whether `e` means the connection to the TPM is gone (the TPM was killed, reset or unplugged):
/// the context must be rebuilt before the TPM can be used again.
pub(super) fn is_disconnect(e: TssError) -> bool {
    let TssError::Tss2Error(rc) = e else {
        return false;
    };
    let Some(raw) = raw_code(rc) else {
        return false;
    };
    let (layer, base) = (raw >> 16, raw & 0xffff);
    match layer {
        LAYER_TCTI => true,
        LAYER_ESYS | LAYER_SYS => matches!(
            base,
            BASE_NO_CONNECTION
                | BASE_IO_ERROR
                | BASE_MALFORMED_RESPONSE
                | BASE_INSUFFICIENT_RESPONSE
        ),
        _ => false,
    }
}

/// Whether `e` means the TPM no longer holds the SRK or the session: it was reset (rebooted, or
/// swtpm restarted) under a connection that survived. Rebuilding the connection recovers.
pub(super) fn is_reset(e: TssError) -> bool {
    matches!(
        tpm_kind(e),
        Some(
            // TPM_RC_HANDLE: a handle keyhold holds (a cached key) names nothing any more.
            Kind::Handle
                | Kind::Initialize
                | Kind::ReferenceH0
                | Kind::ReferenceH1
                | Kind::ReferenceH2
                | Kind::ReferenceH3
                | Kind::ReferenceH4
                | Kind::ReferenceH5
                | Kind::ReferenceH6
                | Kind::ReferenceS0
                | Kind::ReferenceS1
                | Kind::ReferenceS2
                | Kind::ReferenceS3
                | Kind::ReferenceS4
                | Kind::ReferenceS5
                | Kind::ReferenceS6
        )
    )
}

/// Whether the TPM ran out of room for another loaded object.
pub(super) fn is_object_memory(e: TssError) -> bool {
    matches!(
        tpm_kind(e),
        Some(Kind::ObjectMemory | Kind::ObjectHandles | Kind::Memory)
    )
}

/// Whether the TPM refused an authorisation value (never retried).
pub(super) fn is_auth_failure(e: TssError) -> bool {
    matches!(tpm_kind(e), Some(Kind::AuthFail | Kind::BadAuth))
}

/// Whether the TPM says a handle names no object (an empty persistent handle).
pub(super) fn is_missing_handle(e: TssError) -> bool {
    matches!(tpm_kind(e), Some(Kind::Handle))
}

/// Whether the TPM refused a parameter's value (TPM_RC_VALUE, any parameter).
pub(super) fn is_value(e: TssError) -> bool {
    matches!(tpm_kind(e), Some(Kind::Value))
}

/// Whether the TPM answered TPM_RC_FAILURE.
pub(super) fn is_failure(e: TssError) -> bool {
    matches!(tpm_kind(e), Some(Kind::Failure))
}

/// Whether the TPM found an object damaged or made under another parent.
pub(super) fn is_integrity(e: TssError) -> bool {
    matches!(tpm_kind(e), Some(Kind::Integrity))
}

/// Whether the TPM refused a policy (a PCR-bound secret after its PCRs changed).
pub(super) fn is_policy_failure(e: TssError) -> bool {
    matches!(tpm_kind(e), Some(Kind::PolicyFail | Kind::PolicyCc))
}

/// The TPM's own response code kind, or `None` for codes from the software stack.
fn tpm_kind(e: TssError) -> Option<Kind> {
    let TssError::Tss2Error(rc) = e else {
        return None;
    };
    if raw_code(rc).map(|raw| raw >> 16) != Some(LAYER_TPM) {
        return None;
    }
    rc.kind()
}

/// A short description of the raw code, for messages (`0x921`).
fn code_text(e: TssError) -> String {
    match e {
        TssError::Tss2Error(rc) => raw_code(rc).map_or_else(|| "?".into(), |c| format!("{c:#x}")),
        TssError::WrapperError(kind) => format!("{kind:?}"),
    }
}

/// Maps a failed attempt to connect to the TPM at `tcti` (and set up the SRK and session).
pub(super) fn map_connect(
    backend: &str,
    tcti: &str,
    srk_handle: Option<u32>,
    failure: Failure,
) -> Error {
    if failure.command == super::connection::FOREIGN_SRK {
        let handle = srk_handle.unwrap_or_default();
        return Error::Config(format!(
            "backend `{backend}`: the persistent handle {handle:#010x} (srk_handle) holds an \
             object that is not keyhold's storage root key: choose another srk_handle, or, if \
             nothing uses that object, evict it with `tpm2_evictcontrol -C o -c {handle:#010x}`"
        ));
    }
    if failure.command == super::connection::CONNECT || is_disconnect(failure.error) {
        return Error::BackendUnavailable {
            backend: backend.to_owned(),
            reason: format!(
                "cannot reach the TPM at `{tcti}` ({}: {}): check that it is running and that \
                 keyhold may open it; keyhold tries again on the next call",
                failure.command,
                code_text(failure.error)
            ),
        };
    }
    map(backend, failure)
}

/// Maps a failed TPM command on `backend` to keyhold's error.
pub(super) fn map(backend: &str, failure: Failure) -> Error {
    let Failure { command, error } = failure;
    let unavailable = |reason: String| Error::BackendUnavailable {
        backend: backend.to_owned(),
        reason,
    };
    if is_disconnect(error) {
        return unavailable(format!(
            "{command}: the connection to the TPM was lost ({}); keyhold reconnects once the \
             TPM is back",
            code_text(error)
        ));
    }
    if is_reset(error) {
        return unavailable(format!(
            "{command}: the TPM no longer holds keyhold's storage key or session ({}): it was \
             reset; keyhold reconnects on the next call",
            code_text(error)
        ));
    }
    match tpm_kind(error) {
        // Never retried: each failed authorisation would count towards a longer lockout.
        Some(Kind::Lockout) => Error::BackendLogin {
            backend: backend.to_owned(),
            reason: format!(
                "{command}: the TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT): wait for the \
                 lockout to expire, or clear it with `tpm2_dictionarylockout --clear-lockout` and \
                 the lockout authorisation; keyhold does not retry"
            ),
        },
        Some(Kind::AuthFail | Kind::BadAuth)
            if command.starts_with("TPM2_CreatePrimary")
                || command.starts_with("TPM2_EvictControl") =>
        {
            Error::BackendLogin {
                backend: backend.to_owned(),
                reason: format!(
                    "{command}: the TPM refused the owner hierarchy's authorisation ({}): the \
                     owner hierarchy has a password, which keyhold does not use. Make the storage \
                     root key once with that password (keyhold's SRK template, see tpm/NOTES.md), \
                     persist it with tpm2_evictcontrol, and set `srk_handle` to its handle; \
                     keyhold does not retry",
                    code_text(error)
                ),
            }
        }
        Some(Kind::AuthFail | Kind::BadAuth) => Error::BackendLogin {
            backend: backend.to_owned(),
            reason: format!(
                "{command}: the TPM refused the key's authorisation value ({}): the key record \
                 does not belong to this key; keyhold does not retry",
                code_text(error)
            ),
        },
        Some(Kind::ObjectMemory | Kind::SessionMemory | Kind::Memory | Kind::ObjectHandles) => {
            unavailable(format!(
                "{command}: the TPM is out of object memory ({}): another program holds its \
                 transient objects; use the resource manager (`device:/dev/tpmrm0` or `tabrmd`) \
                 or flush them with `tpm2_flushcontext -t`",
                code_text(error)
            ))
        }
        Some(Kind::Integrity) => Error::Integrity {
            what: format!(
                "{command}: the TPM refused the key blob as damaged or made under another storage \
                 key ({})",
                code_text(error)
            ),
        },
        Some(Kind::Failure | Kind::NeedsTest) => unavailable(format!(
            "{command}: the TPM is in failure mode or has not passed its self-test ({})",
            code_text(error)
        )),
        _ => Error::Backend {
            backend: backend.to_owned(),
            operation: format!("{command} ({})", code_text(error)),
            source: Box::new(error),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tss(code: u32) -> TssError {
        TssError::Tss2Error(Tss2ResponseCode::from(code))
    }

    fn mapped(code: u32) -> Error {
        map(
            "tpm",
            Failure {
                command: "TPM2_Sign",
                error: tss(code),
            },
        )
    }

    #[test]
    fn reads_the_raw_code() {
        assert_eq!(raw_code(Tss2ResponseCode::from(0x921)), Some(0x921));
        assert_eq!(
            raw_code(Tss2ResponseCode::from(0x000A_000A)),
            Some(0x000A_000A)
        );
        assert_eq!(raw_code(Tss2ResponseCode::from(0x9a2)), Some(0x9a2));
    }

    #[test]
    fn lockout_says_how_to_recover() {
        let e = mapped(0x921);
        assert!(matches!(e, Error::BackendLogin { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("tpm2_dictionarylockout --clear-lockout"),
            "{text}"
        );
        assert!(text.contains("does not retry"), "{text}");
    }

    #[test]
    fn tcti_failures_are_unavailable_even_when_they_alias_tpm_codes() {
        // 0xA0001 (TCTI general failure) reads as TPM_RC_FAILURE to `kind()`.
        for code in [0x000A_000A, 0x000A_0008, 0x000A_0001, 0x0007_0013] {
            assert!(is_disconnect(tss(code)), "{code:#x}");
            assert!(
                matches!(mapped(code), Error::BackendUnavailable { .. }),
                "{code:#x}"
            );
        }
        assert!(!is_disconnect(tss(0x921)));
        assert!(!is_disconnect(tss(0x0007_000B)));
    }

    #[test]
    fn a_reset_tpm_is_recognised() {
        // TPM_RC_REFERENCE_H0 (the SRK is gone) and TPM_RC_REFERENCE_S0 (the session is gone).
        for code in [0x910, 0x918] {
            assert!(is_reset(tss(code)), "{code:#x}");
            assert!(matches!(mapped(code), Error::BackendUnavailable { .. }));
        }
        assert!(!is_reset(tss(0x000A_0910)));
        assert!(!is_reset(tss(0x921)));
    }

    #[test]
    fn an_owner_password_is_named_as_such() {
        let e = map(
            "tpm",
            Failure {
                command: "TPM2_CreatePrimary (storage root key)",
                error: tss(0x9a2),
            },
        );
        let text = e.to_string();
        assert!(
            text.contains("owner hierarchy") && text.contains("srk_handle"),
            "{text}"
        );
        assert!(mapped(0x9a2)
            .to_string()
            .contains("does not belong to this key"));
    }

    #[test]
    fn object_memory_is_explained() {
        let e = mapped(0x902);
        assert!(e.to_string().contains("out of object memory"), "{e}");
    }

    #[test]
    fn integrity_is_an_integrity_error() {
        assert!(matches!(mapped(0x19f), Error::Integrity { .. }));
    }
}
