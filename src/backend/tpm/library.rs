//! tpm2-tss, loaded when a TPM is first used rather than when keyhold starts.
//!
//! tss-esapi calls the C functions of tpm2-tss (libtss2-esys, -mu and -tctildr) by name, and its
//! build script links those libraries, so every process would load them (and OpenSSL's
//! libcrypto, which libtss2-esys needs) at start: about 3.4 ms of CPU for each `keyhold`
//! process, whether or not it uses a TPM (issue 12's measurements). keyhold defines here every
//! tpm2-tss function tss-esapi calls, under the same name. The linker resolves tss-esapi's calls
//! to these definitions, finds nothing left to take from the libraries and, as rustc links with
//! `--as-needed`, leaves them out of the binary's needs. Each definition calls the real function,
//! looked up in the libraries once, on first use (`dlopen` with `RTLD_NOW | RTLD_LOCAL`).
//!
//! - This relies on the linker leaving out a library that only discarded code refers to:
//!   tss-esapi's object files name more tpm2-tss functions than keyhold's binary keeps. LLD does
//!   (rust-lld is rustc's default linker on x86_64 Linux since Rust 1.90); GNU ld keeps the
//!   libraries needed, and the binary then loads them at start as before: correct, only slower,
//!   and tpm2-tss must be installed to run it.
//! - The definitions are in the binary's dynamic symbol table, so tpm2-tss's own calls between
//!   its libraries (`Esys_TR_Close`, `Tss2_MU_*`) also pass through them. They cannot loop: each
//!   calls the address `dlsym` found in the library itself, never the binary's.
//! - A keyhold built with the `tpm` feature now starts, and serves software and PKCS#11 keys, on
//!   a machine without tpm2-tss; using a TPM there fails with [`load`]'s message.
//! - A tpm2-tss function that tss-esapi calls but is not listed here is taken from the library at
//!   start, as before: correct, only slower. tests/cli_tpm.rs checks that `keyhold --version`
//!   loads no tpm2-tss library.
//! - Each definition's signature is checked at compile time against tss-esapi's own declaration
//!   of the function (the `const _` beside it): a mismatch fails the build.
//!
//! Unsafe code (see Cargo.toml's `unsafe_code` list): symbol definitions (`no_mangle`) and calls
//! through the pointers `dlsym` returned, with the arguments tss-esapi passed.
#![allow(unsafe_code)]
#![allow(non_snake_case)] // the functions and the table's fields carry tpm2-tss's C names

use std::os::raw::c_char;
use std::sync::{Mutex, OnceLock, PoisonError};

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use tss_esapi::tss2_esys::{
    size_t, ESYS_CONTEXT, ESYS_TR, TPM2B_AUTH, TPM2B_CREATION_DATA, TPM2B_DATA, TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET, TPM2B_MAX_BUFFER, TPM2B_MAX_NV_BUFFER, TPM2B_NAME, TPM2B_NONCE,
    TPM2B_NV_PUBLIC, TPM2B_PRIVATE, TPM2B_PUBLIC, TPM2B_PUBLIC_KEY_RSA, TPM2B_SENSITIVE,
    TPM2B_SENSITIVE_CREATE, TPM2B_SENSITIVE_DATA, TPM2_CAP, TPM2_HANDLE, TPM2_RC, TPM2_SE,
    TPMA_SESSION, TPMI_ALG_HASH, TPMI_DH_PERSISTENT, TPMI_YES_NO, TPML_PCR_SELECTION,
    TPMS_CAPABILITY_DATA, TPMT_PUBLIC, TPMT_PUBLIC_PARMS, TPMT_RSA_DECRYPT, TPMT_SENSITIVE,
    TPMT_SIGNATURE, TPMT_SIG_SCHEME, TPMT_SYM_DEF, TPMT_SYM_DEF_OBJECT, TPMT_TK_CREATION,
    TPMT_TK_HASHCHECK, TSS2_ABI_VERSION, TSS2_BASE_RC_GENERAL_FAILURE, TSS2_RC,
    TSS2_RC_LAYER_SHIFT, TSS2_TCTI_CONTEXT, UINT16, UINT32,
};

/// The libraries, by soname (the runtime packages: Debian's libtss2-esys-3.0.2-0, libtss2-mu0,
/// libtss2-tctildr0).
const ESYS: &str = "libtss2-esys.so.0";
const MU: &str = "libtss2-mu.so.0";
const TCTILDR: &str = "libtss2-tctildr.so.0";

/// The response-code layers a function answers with when its library could not be loaded
/// (`errors.rs` reads a TCTI-layer code as "the TPM is unreachable").
const LAYER_ESYS: u32 = 7;
const LAYER_MU: u32 = 9;
const LAYER_TCTI: u32 = 10;

/// What a function returns when tpm2-tss is not there.
trait Unloaded {
    fn unloaded(layer: u32) -> Self;
}

impl Unloaded for () {
    fn unloaded(_: u32) {}
}

impl Unloaded for TSS2_RC {
    fn unloaded(layer: u32) -> Self {
        (layer << TSS2_RC_LAYER_SHIFT) | TSS2_BASE_RC_GENERAL_FAILURE
    }
}

/// The three libraries, kept open for the life of the process, and the functions found in them.
struct Loaded {
    table: Table,
    _libraries: [Library; 3],
}

/// The libraries once loaded. A failure is not kept: a service started before tpm2-tss was
/// installed finds it at its next use of the TPM.
static LOADED: OnceLock<Loaded> = OnceLock::new();

/// Held while the libraries are being loaded, so that threads do not load them twice.
static LOADING: Mutex<()> = Mutex::new(());

/// Loads tpm2-tss if it is not loaded yet.
///
/// # Errors
/// What the dynamic loader said, and which packages provide the libraries.
pub(super) fn load() -> Result<(), String> {
    loaded().map(drop).map_err(|why| {
        format!(
            "tpm2-tss cannot be loaded ({why}): install its runtime libraries (Debian 12: \
             libtss2-esys-3.0.2-0, libtss2-mu0 and libtss2-tctildr0; elsewhere the tpm2-tss \
             package)"
        )
    })
}

fn loaded() -> Result<&'static Loaded, String> {
    if let Some(loaded) = LOADED.get() {
        return Ok(loaded);
    }
    let _loading = LOADING.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(loaded) = LOADED.get() {
        return Ok(loaded);
    }
    let loaded = open_all()?;
    Ok(LOADED.get_or_init(|| loaded))
}

fn table() -> Option<&'static Table> {
    match loaded() {
        Ok(loaded) => Some(&loaded.table),
        Err(why) => {
            tracing::debug!(error = %why, "tpm2-tss is not loaded");
            None
        }
    }
}

fn open_all() -> Result<Loaded, String> {
    let open = |name: &str| {
        // SAFETY: these libraries run no initialiser that could conflict with the process (they
        // are the ones the binary used to load at start), and they stay open until it exits.
        unsafe { Library::open(Some(name), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| e.to_string())
    };
    let libraries = [open(MU)?, open(TCTILDR)?, open(ESYS)?];
    let table = Table::find(&libraries)?;
    Ok(Loaded {
        table,
        _libraries: libraries,
    })
}

/// Defines each function under its C name, the table of the real ones, and the check of each
/// signature against tss-esapi's declaration.
macro_rules! forward {
    ($(
        $lib:ident fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;
    )*) => {
        struct Table {
            $($name: unsafe extern "C" fn($($ty),*) $(-> $ret)?,)*
        }

        impl Table {
            /// Looks every function up in `libraries` (tss2-mu, tss2-tctildr, tss2-esys).
            fn find(libraries: &[Library; 3]) -> Result<Self, String> {
                Ok(Self {
                    $($name: {
                        let symbol = concat!(stringify!($name), "\0");
                        // SAFETY: the type is the function's C signature, checked below against
                        // tss-esapi's bindings; the pointer is used only while the library is open.
                        let library = &library!(libraries, $lib);
                        let found = unsafe {
                            library
                                .get::<unsafe extern "C" fn($($ty),*) $(-> $ret)?>(
                                    symbol.as_bytes(),
                                )
                        };
                        *found.map_err(|e| e.to_string())?
                    },)*
                })
            }
        }

        $(
            const _: unsafe extern "C" fn($($ty),*) $(-> $ret)? = tss_esapi::tss2_esys::$name;

            /// Forwards to tpm2-tss, loading it on first use.
            ///
            /// # Safety
            /// As the C function's: tss-esapi is the only caller.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
                match table() {
                    // SAFETY: the real function, called with the arguments it was given.
                    Some(table) => unsafe { (table.$name)($($arg),*) },
                    None => Unloaded::unloaded(layer!($lib)),
                }
            }
        )*
    };
}

/// Which of `open_all`'s libraries a function is in.
macro_rules! library {
    ($libraries:ident, mu) => {
        $libraries[0]
    };
    ($libraries:ident, tctildr) => {
        $libraries[1]
    };
    ($libraries:ident, esys) => {
        $libraries[2]
    };
}

/// The response-code layer of a function's library.
macro_rules! layer {
    (esys) => {
        LAYER_ESYS
    };
    (mu) => {
        LAYER_MU
    };
    (tctildr) => {
        LAYER_TCTI
    };
}

// Every tpm2-tss function that tss-esapi 7.7 calls in keyhold, with the library it is in.
forward! {
    esys fn Esys_Create(
        esys_context: *mut ESYS_CONTEXT, parent_handle: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, in_sensitive: *const TPM2B_SENSITIVE_CREATE,
        in_public: *const TPM2B_PUBLIC, outside_info: *const TPM2B_DATA,
        creation_pcr: *const TPML_PCR_SELECTION, out_private: *mut *mut TPM2B_PRIVATE,
        out_public: *mut *mut TPM2B_PUBLIC, creation_data: *mut *mut TPM2B_CREATION_DATA,
        creation_hash: *mut *mut TPM2B_DIGEST, creation_ticket: *mut *mut TPMT_TK_CREATION,
    ) -> TSS2_RC;
    esys fn Esys_CreatePrimary(
        esys_context: *mut ESYS_CONTEXT, primary_handle: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, in_sensitive: *const TPM2B_SENSITIVE_CREATE,
        in_public: *const TPM2B_PUBLIC, outside_info: *const TPM2B_DATA,
        creation_pcr: *const TPML_PCR_SELECTION, object_handle: *mut ESYS_TR,
        out_public: *mut *mut TPM2B_PUBLIC, creation_data: *mut *mut TPM2B_CREATION_DATA,
        creation_hash: *mut *mut TPM2B_DIGEST, creation_ticket: *mut *mut TPMT_TK_CREATION,
    ) -> TSS2_RC;
    esys fn Esys_EvictControl(
        esys_context: *mut ESYS_CONTEXT, auth: ESYS_TR, object_handle: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, persistent_handle: TPMI_DH_PERSISTENT,
        new_object_handle: *mut ESYS_TR,
    ) -> TSS2_RC;
    esys fn Esys_Finalize(context: *mut *mut ESYS_CONTEXT);
    esys fn Esys_FlushContext(esys_context: *mut ESYS_CONTEXT, flush_handle: ESYS_TR) -> TSS2_RC;
    esys fn Esys_GetCapability(
        esys_context: *mut ESYS_CONTEXT, shandle1: ESYS_TR, shandle2: ESYS_TR, shandle3: ESYS_TR,
        capability: TPM2_CAP, property: UINT32, property_count: UINT32,
        more_data: *mut TPMI_YES_NO, capability_data: *mut *mut TPMS_CAPABILITY_DATA,
    ) -> TSS2_RC;
    esys fn Esys_GetTestResult(
        esys_context: *mut ESYS_CONTEXT, shandle1: ESYS_TR, shandle2: ESYS_TR, shandle3: ESYS_TR,
        out_data: *mut *mut TPM2B_MAX_BUFFER, test_result: *mut TPM2_RC,
    ) -> TSS2_RC;
    esys fn Esys_HMAC(
        esys_context: *mut ESYS_CONTEXT, handle: ESYS_TR, shandle1: ESYS_TR, shandle2: ESYS_TR,
        shandle3: ESYS_TR, buffer: *const TPM2B_MAX_BUFFER, hash_alg: TPMI_ALG_HASH,
        out_hmac: *mut *mut TPM2B_DIGEST,
    ) -> TSS2_RC;
    esys fn Esys_Import(
        esys_context: *mut ESYS_CONTEXT, parent_handle: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, encryption_key: *const TPM2B_DATA,
        object_public: *const TPM2B_PUBLIC, duplicate: *const TPM2B_PRIVATE,
        in_sym_seed: *const TPM2B_ENCRYPTED_SECRET, symmetric_alg: *const TPMT_SYM_DEF_OBJECT,
        out_private: *mut *mut TPM2B_PRIVATE,
    ) -> TSS2_RC;
    esys fn Esys_Initialize(
        esys_context: *mut *mut ESYS_CONTEXT, tcti: *mut TSS2_TCTI_CONTEXT,
        abi_version: *mut TSS2_ABI_VERSION,
    ) -> TSS2_RC;
    esys fn Esys_Load(
        esys_context: *mut ESYS_CONTEXT, parent_handle: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, in_private: *const TPM2B_PRIVATE,
        in_public: *const TPM2B_PUBLIC, object_handle: *mut ESYS_TR,
    ) -> TSS2_RC;
    esys fn Esys_NV_DefineSpace(
        esys_context: *mut ESYS_CONTEXT, auth_handle: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, auth: *const TPM2B_AUTH,
        public_info: *const TPM2B_NV_PUBLIC, nv_handle: *mut ESYS_TR,
    ) -> TSS2_RC;
    esys fn Esys_NV_Increment(
        esys_context: *mut ESYS_CONTEXT, auth_handle: ESYS_TR, nv_index: ESYS_TR,
        shandle1: ESYS_TR, shandle2: ESYS_TR, shandle3: ESYS_TR,
    ) -> TSS2_RC;
    esys fn Esys_NV_Read(
        esys_context: *mut ESYS_CONTEXT, auth_handle: ESYS_TR, nv_index: ESYS_TR,
        shandle1: ESYS_TR, shandle2: ESYS_TR, shandle3: ESYS_TR, size: UINT16, offset: UINT16,
        data: *mut *mut TPM2B_MAX_NV_BUFFER,
    ) -> TSS2_RC;
    esys fn Esys_NV_ReadPublic(
        esys_context: *mut ESYS_CONTEXT, nv_index: ESYS_TR, shandle1: ESYS_TR, shandle2: ESYS_TR,
        shandle3: ESYS_TR, nv_public: *mut *mut TPM2B_NV_PUBLIC, nv_name: *mut *mut TPM2B_NAME,
    ) -> TSS2_RC;
    esys fn Esys_PolicyGetDigest(
        esys_context: *mut ESYS_CONTEXT, policy_session: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, policy_digest: *mut *mut TPM2B_DIGEST,
    ) -> TSS2_RC;
    esys fn Esys_PolicyPCR(
        esys_context: *mut ESYS_CONTEXT, policy_session: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, pcr_digest: *const TPM2B_DIGEST,
        pcrs: *const TPML_PCR_SELECTION,
    ) -> TSS2_RC;
    esys fn Esys_RSA_Decrypt(
        esys_context: *mut ESYS_CONTEXT, key_handle: ESYS_TR, shandle1: ESYS_TR, shandle2: ESYS_TR,
        shandle3: ESYS_TR, cipher_text: *const TPM2B_PUBLIC_KEY_RSA,
        in_scheme: *const TPMT_RSA_DECRYPT, label: *const TPM2B_DATA,
        message: *mut *mut TPM2B_PUBLIC_KEY_RSA,
    ) -> TSS2_RC;
    esys fn Esys_ReadPublic(
        esys_context: *mut ESYS_CONTEXT, object_handle: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, out_public: *mut *mut TPM2B_PUBLIC,
        name: *mut *mut TPM2B_NAME, qualified_name: *mut *mut TPM2B_NAME,
    ) -> TSS2_RC;
    esys fn Esys_Sign(
        esys_context: *mut ESYS_CONTEXT, key_handle: ESYS_TR, shandle1: ESYS_TR, shandle2: ESYS_TR,
        shandle3: ESYS_TR, digest: *const TPM2B_DIGEST, in_scheme: *const TPMT_SIG_SCHEME,
        validation: *const TPMT_TK_HASHCHECK, signature: *mut *mut TPMT_SIGNATURE,
    ) -> TSS2_RC;
    esys fn Esys_StartAuthSession(
        esys_context: *mut ESYS_CONTEXT, tpm_key: ESYS_TR, bind: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, nonce_caller: *const TPM2B_NONCE,
        session_type: TPM2_SE, symmetric: *const TPMT_SYM_DEF, auth_hash: TPMI_ALG_HASH,
        session_handle: *mut ESYS_TR,
    ) -> TSS2_RC;
    esys fn Esys_TRSess_SetAttributes(
        esys_context: *mut ESYS_CONTEXT, session: ESYS_TR, flags: TPMA_SESSION, mask: TPMA_SESSION,
    ) -> TSS2_RC;
    esys fn Esys_TR_Close(esys_context: *mut ESYS_CONTEXT, rsrc_handle: *mut ESYS_TR) -> TSS2_RC;
    esys fn Esys_TR_FromTPMPublic(
        esys_context: *mut ESYS_CONTEXT, tpm_handle: TPM2_HANDLE, optional_session1: ESYS_TR,
        optional_session2: ESYS_TR, optional_session3: ESYS_TR, object: *mut ESYS_TR,
    ) -> TSS2_RC;
    esys fn Esys_TR_GetName(
        esys_context: *mut ESYS_CONTEXT, handle: ESYS_TR, name: *mut *mut TPM2B_NAME,
    ) -> TSS2_RC;
    esys fn Esys_TR_SetAuth(
        esys_context: *mut ESYS_CONTEXT, handle: ESYS_TR, auth_value: *const TPM2B_AUTH,
    ) -> TSS2_RC;
    esys fn Esys_TestParms(
        esys_context: *mut ESYS_CONTEXT, shandle1: ESYS_TR, shandle2: ESYS_TR, shandle3: ESYS_TR,
        parameters: *const TPMT_PUBLIC_PARMS,
    ) -> TSS2_RC;
    esys fn Esys_Unseal(
        esys_context: *mut ESYS_CONTEXT, item_handle: ESYS_TR, shandle1: ESYS_TR,
        shandle2: ESYS_TR, shandle3: ESYS_TR, out_data: *mut *mut TPM2B_SENSITIVE_DATA,
    ) -> TSS2_RC;
    mu fn Tss2_MU_TPM2B_SENSITIVE_Marshal(
        src: *const TPM2B_SENSITIVE, buffer: *mut u8, buffer_size: size_t, offset: *mut size_t,
    ) -> TSS2_RC;
    mu fn Tss2_MU_TPMT_PUBLIC_Marshal(
        src: *const TPMT_PUBLIC, buffer: *mut u8, buffer_size: size_t, offset: *mut size_t,
    ) -> TSS2_RC;
    mu fn Tss2_MU_TPMT_PUBLIC_Unmarshal(
        buffer: *const u8, buffer_size: size_t, offset: *mut size_t, dest: *mut TPMT_PUBLIC,
    ) -> TSS2_RC;
    mu fn Tss2_MU_TPMT_SENSITIVE_Marshal(
        src: *const TPMT_SENSITIVE, buffer: *mut u8, buffer_size: size_t, offset: *mut size_t,
    ) -> TSS2_RC;
    mu fn Tss2_MU_TPMT_SENSITIVE_Unmarshal(
        buffer: *const u8, buffer_size: size_t, offset: *mut size_t, dest: *mut TPMT_SENSITIVE,
    ) -> TSS2_RC;
    tctildr fn Tss2_TctiLdr_Finalize(context: *mut *mut TSS2_TCTI_CONTEXT);
    tctildr fn Tss2_TctiLdr_Initialize(
        name_conf: *const c_char, context: *mut *mut TSS2_TCTI_CONTEXT,
    ) -> TSS2_RC;
}
