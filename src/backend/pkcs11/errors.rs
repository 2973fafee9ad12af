//! Every cryptoki error becomes a keyhold error here, and only here.

use cryptoki::error::{Error as CkError, RvError};

use super::pool::{disposition, Disposition};
use crate::error::Error;

/// Maps a cryptoki error from `operation` (which names the PKCS#11 function) on `backend`.
pub(super) fn map(backend: &str, operation: &str, e: CkError) -> Error {
    match (&e, disposition(&e)) {
        (CkError::Pkcs11(rv, _), Disposition::DeviceGone) => Error::BackendUnavailable {
            backend: backend.to_owned(),
            reason: format!(
                "{operation}: the token is not there ({rv:?}); keyhold reconnects once it is back"
            ),
        },
        (CkError::Pkcs11(RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange, _), _) => {
            Error::DecryptionFailed {
                reason: "the ciphertext, its AAD or the key does not match",
            }
        }
        (CkError::LibraryLoading(_), _) => Error::BackendUnavailable {
            backend: backend.to_owned(),
            reason: format!("{operation}: {e}"),
        },
        _ => Error::Backend {
            backend: backend.to_owned(),
            operation: operation.to_owned(),
            source: Box::new(e),
        },
    }
}
