//! The one place keyhold calls a PKCS#11 module itself, rather than through cryptoki: reading
//! `CK_TOKEN_INFO`.
//!
//! cryptoki 0.12's `get_token_info` parses `utcTime` as digits and fails on a token whose clock
//! field is not `YYYYMMDDhhmmss00` (openCryptoki gives `"16:32:04"` and NULs), so such a token
//! could not even be found by its label. cryptoki does not expose the module's function list, so
//! this module opens the same library again (the loader hands back the image cryptoki already
//! loaded and `C_Initialize`d: nothing is initialised twice), takes `C_GetTokenInfo` from the
//! module's own function list, and copies the structure out. Parsing it is safe code, in
//! `token_info.rs`. This is the only `unsafe` in the PKCS#11 backend: keep it this small.
#![allow(unsafe_code)]

use std::path::Path;

use cryptoki_sys::{CKR_OK, CK_FUNCTION_LIST, CK_RV, CK_SLOT_ID, CK_TOKEN_INFO};

use super::token_info::empty_token_info;

/// `C_GetTokenInfo` as the module's function list gives it.
type GetTokenInfo = unsafe extern "C" fn(CK_SLOT_ID, *mut CK_TOKEN_INFO) -> CK_RV;

/// A second handle on a loaded PKCS#11 library, for `C_GetTokenInfo`.
pub(super) struct RawModule {
    /// Keeps the library (and so the function pointer below) loaded as long as this lives.
    _library: cryptoki_sys::Pkcs11,
    get_token_info: GetTokenInfo,
}

impl std::fmt::Debug for RawModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawModule").finish_non_exhaustive()
    }
}

impl RawModule {
    /// Opens the library at `path`, which cryptoki has already loaded and initialised.
    ///
    /// # Errors
    /// A description of what failed (for an "unavailable" error naming the module).
    pub(super) fn open(path: &Path) -> Result<Self, String> {
        // SAFETY: cryptoki loaded this same path already, so the loader returns the image it
        // holds and runs no initialisers again; loading a PKCS#11 module runs no code of ours.
        let library = unsafe { cryptoki_sys::Pkcs11::new(path) }
            .map_err(|e| format!("cannot open the module again for C_GetTokenInfo: {e}"))?;
        let get_function_list = library
            .C_GetFunctionList
            .as_ref()
            .map_err(|e| format!("the module has no C_GetFunctionList: {e}"))?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: C_GetFunctionList writes one pointer to `list`, a valid place for one; the
        // function comes from the library, which `library` keeps loaded.
        let rv = unsafe { get_function_list(&mut list) };
        if rv != CKR_OK || list.is_null() {
            return Err(format!("C_GetFunctionList failed (CK_RV {rv:#x})"));
        }
        // SAFETY: a module's function list is a static structure that stays valid while the
        // library is loaded (PKCS#11 §5.2), and `list` was just checked to be non-null.
        let get_token_info = unsafe { (*list).C_GetTokenInfo }
            .ok_or_else(|| "the module's function list has no C_GetTokenInfo".to_owned())?;
        Ok(Self {
            _library: library,
            get_token_info,
        })
    }

    /// The token's `CK_TOKEN_INFO` as the module wrote it.
    ///
    /// # Errors
    /// The module's return value when it is not `CKR_OK`.
    pub(super) fn token_info(&self, slot: CK_SLOT_ID) -> Result<CK_TOKEN_INFO, CK_RV> {
        let mut info = empty_token_info();
        // SAFETY: C_GetTokenInfo writes one CK_TOKEN_INFO to the pointer it is given, and `info`
        // is one, owned here; the module is initialised (cryptoki did it before any slot was
        // known) and `_library` keeps the function loaded.
        let rv = unsafe { (self.get_token_info)(slot, &mut info) };
        if rv == CKR_OK {
            Ok(info)
        } else {
            Err(rv)
        }
    }
}
