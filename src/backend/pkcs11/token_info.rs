//! `CK_TOKEN_INFO` read defensively: no field's content can make a token unreadable.
//!
//! Tokens fill these fields loosely. openCryptoki 3.8.1 gives `utcTime` = `"16:32:04"` and NULs
//! and `CK_UNAVAILABLE_INFORMATION` counters; some pad text with NULs instead of spaces. keyhold
//! needs the label, serial and flags to find the token and guard its PIN, so text is trimmed of
//! either padding, counters that a token does not report are `None`, and the clock is kept raw.

use cryptoki_sys::{
    CKF_CLOCK_ON_TOKEN, CKF_PROTECTED_AUTHENTICATION_PATH, CKF_TOKEN_INITIALIZED,
    CKF_USER_PIN_COUNT_LOW, CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_INITIALIZED, CKF_USER_PIN_LOCKED,
    CKF_USER_PIN_TO_BE_CHANGED, CKF_WRITE_PROTECTED, CK_EFFECTIVELY_INFINITE, CK_FLAGS,
    CK_TOKEN_INFO, CK_ULONG, CK_UNAVAILABLE_INFORMATION, CK_VERSION,
};

/// A token's limit on something (sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limit {
    /// At most this many.
    Max(u64),
    /// `CK_EFFECTIVELY_INFINITE`: no limit.
    Infinite,
    /// `CK_UNAVAILABLE_INFORMATION`: the token does not say.
    Unavailable,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // openCryptoki's soft token says 2^64 - 2: a count, technically, but no limit.
            Self::Max(n) if *n > u64::from(u32::MAX) => f.write_str("unlimited"),
            Self::Max(n) => write!(f, "{n}"),
            Self::Infinite => f.write_str("unlimited"),
            Self::Unavailable => f.write_str("not reported"),
        }
    }
}

/// What a token says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TokenInfo {
    /// `label`, without its padding.
    pub label: String,
    /// `manufacturerID`, without its padding.
    pub manufacturer: String,
    /// `model`, without its padding.
    pub model: String,
    /// `serialNumber`, without its padding.
    pub serial: String,
    flags: CK_FLAGS,
    /// `ulMaxSessionCount`.
    pub max_sessions: Limit,
    /// `ulSessionCount`, if reported.
    pub sessions: Option<u64>,
    /// `ulFreePrivateMemory`, if reported.
    pub free_private_memory: Option<u64>,
    /// `hardwareVersion` and `firmwareVersion`.
    pub versions: [(u8, u8); 2],
    /// `utcTime` as the token wrote it (meant to be `YYYYMMDDhhmmss00`; often it is not).
    pub utc_time: [u8; 16],
}

/// Text of a fixed-width field: up to the first NUL, trailing spaces removed, invalid UTF-8
/// replaced (a label is shown and compared, never trusted as code).
fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end])
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

// CK_ULONG is 32 bits on some targets (Windows): the casts are not no-ops everywhere.
#[allow(clippy::unnecessary_cast)]
fn limit(value: CK_ULONG) -> Limit {
    match value {
        CK_EFFECTIVELY_INFINITE => Limit::Infinite,
        CK_UNAVAILABLE_INFORMATION => Limit::Unavailable,
        n => Limit::Max(n as u64),
    }
}

#[allow(clippy::unnecessary_cast)]
fn count(value: CK_ULONG) -> Option<u64> {
    (value != CK_UNAVAILABLE_INFORMATION).then_some(value as u64)
}

fn version(v: CK_VERSION) -> (u8, u8) {
    (v.major, v.minor)
}

impl TokenInfo {
    /// Parses what `C_GetTokenInfo` wrote. Never fails: a field a token fills oddly is kept as
    /// well as it can be.
    pub(super) fn parse(raw: &CK_TOKEN_INFO) -> Self {
        Self {
            label: text(&raw.label),
            manufacturer: text(&raw.manufacturerID),
            model: text(&raw.model),
            serial: text(&raw.serialNumber),
            flags: raw.flags,
            max_sessions: limit(raw.ulMaxSessionCount),
            sessions: count(raw.ulSessionCount),
            free_private_memory: count(raw.ulFreePrivateMemory),
            versions: [version(raw.hardwareVersion), version(raw.firmwareVersion)],
            utc_time: raw.utcTime,
        }
    }

    /// The same info with `added` set in its flags (the fault hook in `module.rs`).
    #[cfg(any(test, feature = "testing"))]
    pub(super) fn with_flags(mut self, added: CK_FLAGS) -> Self {
        self.flags |= added;
        self
    }

    fn flag(&self, flag: CK_FLAGS) -> bool {
        self.flags & flag != 0
    }

    /// `CKF_TOKEN_INITIALIZED`.
    pub(super) fn initialized(&self) -> bool {
        self.flag(CKF_TOKEN_INITIALIZED)
    }

    /// `CKF_USER_PIN_INITIALIZED`.
    pub(super) fn user_pin_initialized(&self) -> bool {
        self.flag(CKF_USER_PIN_INITIALIZED)
    }

    /// `CKF_USER_PIN_COUNT_LOW`: a wrong PIN was entered since the last good one.
    pub(super) fn user_pin_count_low(&self) -> bool {
        self.flag(CKF_USER_PIN_COUNT_LOW)
    }

    /// `CKF_USER_PIN_FINAL_TRY`: one more wrong PIN locks it.
    pub(super) fn user_pin_final_try(&self) -> bool {
        self.flag(CKF_USER_PIN_FINAL_TRY)
    }

    /// `CKF_USER_PIN_LOCKED`.
    pub(super) fn user_pin_locked(&self) -> bool {
        self.flag(CKF_USER_PIN_LOCKED)
    }

    /// `CKF_USER_PIN_TO_BE_CHANGED`.
    pub(super) fn user_pin_to_be_changed(&self) -> bool {
        self.flag(CKF_USER_PIN_TO_BE_CHANGED)
    }

    /// `CKF_WRITE_PROTECTED`: no key can be generated on it.
    pub(super) fn write_protected(&self) -> bool {
        self.flag(CKF_WRITE_PROTECTED)
    }

    /// `CKF_PROTECTED_AUTHENTICATION_PATH`: the PIN is entered on the device (a PIN pad).
    pub(super) fn protected_authentication_path(&self) -> bool {
        self.flag(CKF_PROTECTED_AUTHENTICATION_PATH)
    }

    /// The token's clock as it gave it, for display: `None` without `CKF_CLOCK_ON_TOKEN`.
    pub(super) fn clock(&self) -> Option<String> {
        self.flag(CKF_CLOCK_ON_TOKEN).then(|| text(&self.utc_time))
    }

    /// The session limit as a number keyhold can use (`None`: no limit, or not reported).
    pub(super) fn session_limit(&self) -> Option<usize> {
        match self.max_sessions {
            Limit::Max(n) => usize::try_from(n).ok(),
            Limit::Infinite | Limit::Unavailable => None,
        }
    }
}

/// A zeroed `CK_TOKEN_INFO`, for `C_GetTokenInfo` to fill (every field is bytes or integers, so
/// zero is a valid value of each).
pub(super) fn empty_token_info() -> CK_TOKEN_INFO {
    let version = CK_VERSION { major: 0, minor: 0 };
    CK_TOKEN_INFO {
        label: [0; 32],
        manufacturerID: [0; 32],
        model: [0; 16],
        serialNumber: [0; 16],
        flags: 0,
        ulMaxSessionCount: 0,
        ulSessionCount: 0,
        ulMaxRwSessionCount: 0,
        ulRwSessionCount: 0,
        ulMaxPinLen: 0,
        ulMinPinLen: 0,
        ulTotalPublicMemory: 0,
        ulFreePublicMemory: 0,
        ulTotalPrivateMemory: 0,
        ulFreePrivateMemory: 0,
        hardwareVersion: version,
        firmwareVersion: version,
        utcTime: [0; 16],
    }
}

// The byte images are what the modules wrote on x86_64 Linux (CK_ULONG = 8 bytes, little-endian).
#[cfg(test)]
#[cfg(all(target_pointer_width = "64", target_endian = "little"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// SoftHSM2 2.6.1, token `p11core-exp`: space padding, `CK_EFFECTIVELY_INFINITE` session
    /// limits, `CK_UNAVAILABLE_INFORMATION` counts, a well-formed clock.
    const SOFTHSM: &str =
        "703131636f72652d657870202020202020202020202020202020202020202020536f667448534d20\
        70726f6a6563742020202020202020202020202020202020536f667448534d207632202020202020\
        396265343265663866643133346261392d040000000000000000000000000000ffffffffffffffff\
        0000000000000000ffffffffffffffffff000000000000000400000000000000ffffffffffffffff\
        ffffffffffffffffffffffffffffffffffffffffffffffff02060206323032363132303131363335\
        3235303000000000";

    /// openCryptoki 3.8.1 soft token `keyhold-ock`: the clock is `16:36:12` and NULs (cryptoki
    /// 0.12 fails on it with `ParseInt(InvalidDigit)`), the session limit is 2^64-2, the R/W
    /// session count and the memory counters are `CK_UNAVAILABLE_INFORMATION`.
    const OPENCRYPTOKI: &str =
        "6b6579686f6c642d6f636b20202020202020202020202020202020202020202049424d20436f7270\
        2e202020202020202020202020202020202020202020202049424d20536f6674546f6b2020202020\
        313233202020202020202020202020204d04000000000000feffffffffffffff0000000000000000\
        feffffffffffffffffffffffffffffff08000000000000000400000000000000ffffffffffffffff\
        ffffffffffffffffffffffffffffffffffffffffffffffff0100010031363a33363a313200000000\
        0000000000000000";

    /// Rebuilds a `CK_TOKEN_INFO` from its byte image, field by field at the C layout's offsets.
    fn image(hex: &str) -> CK_TOKEN_INFO {
        let bytes = crate::hex::decode(hex).unwrap();
        assert_eq!(bytes.len(), std::mem::size_of::<CK_TOKEN_INFO>());
        let ulong = |at: usize| CK_ULONG::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let mut info = empty_token_info();
        info.label.copy_from_slice(&bytes[0..32]);
        info.manufacturerID.copy_from_slice(&bytes[32..64]);
        info.model.copy_from_slice(&bytes[64..80]);
        info.serialNumber.copy_from_slice(&bytes[80..96]);
        info.flags = ulong(96);
        info.ulMaxSessionCount = ulong(104);
        info.ulSessionCount = ulong(112);
        info.ulMaxRwSessionCount = ulong(120);
        info.ulRwSessionCount = ulong(128);
        info.ulMaxPinLen = ulong(136);
        info.ulMinPinLen = ulong(144);
        info.ulTotalPublicMemory = ulong(152);
        info.ulFreePublicMemory = ulong(160);
        info.ulTotalPrivateMemory = ulong(168);
        info.ulFreePrivateMemory = ulong(176);
        info.hardwareVersion = CK_VERSION {
            major: bytes[184],
            minor: bytes[185],
        };
        info.firmwareVersion = CK_VERSION {
            major: bytes[186],
            minor: bytes[187],
        };
        info.utcTime.copy_from_slice(&bytes[188..204]);
        info
    }

    #[test]
    fn softhsm_token_info_parses() {
        let info = TokenInfo::parse(&image(SOFTHSM));
        assert_eq!(info.label, "p11core-exp");
        assert_eq!(info.manufacturer, "SoftHSM project");
        assert_eq!(info.model, "SoftHSM v2");
        assert_eq!(info.serial, "9be42ef8fd134ba9");
        assert!(info.initialized() && info.user_pin_initialized());
        assert!(!info.user_pin_locked() && !info.user_pin_final_try());
        assert!(!info.write_protected() && !info.protected_authentication_path());
        assert_eq!(info.max_sessions, Limit::Infinite);
        assert_eq!(info.max_sessions.to_string(), "unlimited");
        assert_eq!(info.session_limit(), None);
        assert_eq!(info.sessions, None);
        assert_eq!(info.free_private_memory, None);
        assert_eq!(info.versions, [(2, 6), (2, 6)]);
        assert_eq!(info.clock(), None, "SoftHSM has no CKF_CLOCK_ON_TOKEN");
        assert_eq!(&info.utc_time, b"2026120116352500");
    }

    #[test]
    fn opencryptoki_token_info_with_a_malformed_clock_and_unavailable_counters_parses() {
        let info = TokenInfo::parse(&image(OPENCRYPTOKI));
        assert_eq!(info.label, "keyhold-ock");
        assert_eq!(info.manufacturer, "IBM Corp.");
        assert_eq!(info.model, "IBM SoftTok");
        assert_eq!(info.serial, "123");
        assert!(info.initialized() && info.user_pin_initialized());
        assert!(!info.user_pin_to_be_changed());
        assert_eq!(info.max_sessions, Limit::Max(u64::MAX - 1));
        assert_eq!(info.max_sessions.to_string(), "unlimited");
        assert_eq!(info.sessions, Some(0));
        assert_eq!(info.free_private_memory, None);
        assert_eq!(info.versions, [(1, 0), (1, 0)]);
        assert_eq!(info.clock().as_deref(), Some("16:36:12"));
    }

    #[test]
    fn nul_padding_and_garbage_are_trimmed_not_fatal() {
        let mut raw = image(OPENCRYPTOKI);
        raw.label = [0; 32];
        raw.label[..5].copy_from_slice(b"ocktk");
        raw.serialNumber = [b' '; 16];
        raw.serialNumber[..4].copy_from_slice(b"12\0x");
        raw.model = [0xff; 16];
        raw.utcTime = [0; 16];
        raw.ulMaxSessionCount = CK_UNAVAILABLE_INFORMATION;
        raw.flags = CKF_TOKEN_INITIALIZED | CKF_USER_PIN_LOCKED | CKF_CLOCK_ON_TOKEN;
        let info = TokenInfo::parse(&raw);
        assert_eq!(info.label, "ocktk");
        assert_eq!(info.serial, "12", "text ends at the first NUL");
        assert_eq!(info.model, "\u{fffd}".repeat(16));
        assert_eq!(info.max_sessions, Limit::Unavailable);
        assert_eq!(info.max_sessions.to_string(), "not reported");
        assert_eq!(info.clock().as_deref(), Some(""));
        assert!(info.user_pin_locked() && !info.user_pin_initialized());
    }

    #[test]
    fn a_zeroed_info_is_an_uninitialised_token_with_an_unlimited_session_count() {
        let info = TokenInfo::parse(&empty_token_info());
        assert!(!info.initialized());
        assert_eq!(info.label, "");
        assert_eq!(info.max_sessions, Limit::Infinite);
        assert_eq!(info.sessions, Some(0));
    }
}
