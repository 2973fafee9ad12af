//! What a keystore does for the keys it holds, whether it is open in this process
//! ([`Keystore`]) or held by a service (`keyhold serve`, reached with
//! `crate::service::RemoteKeystore`): applications and the command line use either through
//! [`KeyService`] without knowing which.
//!
//! The store's checks, its audit log, the lifecycle's due work and its token clients are
//! [`StoreAdmin`]'s, done where the store is or, for a client granted `audit`, `maintain` or
//! `admin`, by a service. Changing the store as a whole (backups, restores, re-sealing,
//! recovery) is in neither: it runs where the store is.

use super::{
    ExportTo, KeyEvent, KeyInfo, KeyRequest, Keystore, PolicyChange, Transition, UseOptions, Used,
};
use crate::backend::KeyOptions;
use crate::error::Result;
use crate::key::SignatureFormat;
use crate::public_key::PublicKey;
use crate::secret::SecretBytes;

/// Keys made, found, used and managed: the operations [`Keystore`] has of the same names, which
/// document them.
pub trait KeyService: Send + Sync {
    /// Makes a key ([`Keystore::create_key_with`]).
    ///
    /// # Errors
    /// As [`Keystore::create_key_with`]; for a service, its refusals too.
    fn create_key_with(&self, request: &KeyRequest, options: &KeyOptions) -> Result<KeyInfo>;

    /// The key `id` ([`Keystore::key_info`]).
    ///
    /// # Errors
    /// As [`Keystore::key_info`].
    fn key_info(&self, id: &str) -> Result<KeyInfo>;

    /// The key named `name` in `namespace`, if any ([`Keystore::key_info_by_name`]).
    ///
    /// # Errors
    /// As [`Keystore::key_info_by_name`].
    fn key_info_by_name(&self, namespace: &str, name: &str) -> Result<Option<KeyInfo>>;

    /// The keys of `namespace` (or every one the caller sees) but destroyed ones
    /// ([`Keystore::list_keys`]).
    ///
    /// # Errors
    /// As [`Keystore::list_keys`].
    fn list_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>>;

    /// [`Self::list_keys`] with destroyed keys ([`Keystore::list_all_keys`]).
    ///
    /// # Errors
    /// As [`Keystore::list_all_keys`].
    fn list_all_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>>;

    /// The public key of a version (`None`: the current one) of `id`
    /// ([`Keystore::public_key_version`]).
    ///
    /// # Errors
    /// As [`Keystore::public_key_version`].
    fn public_key_version(&self, id: &str, version: Option<u32>) -> Result<PublicKey>;

    /// Signs ([`Keystore::sign_with`]).
    ///
    /// # Errors
    /// As [`Keystore::sign_with`].
    fn sign_with(
        &self,
        id: &str,
        message: &[u8],
        format: SignatureFormat,
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>>;

    /// Verifies ([`Keystore::verify_with`]).
    ///
    /// # Errors
    /// As [`Keystore::verify_with`].
    fn verify_with(
        &self,
        id: &str,
        message: &[u8],
        signature: &[u8],
        format: SignatureFormat,
        options: &UseOptions,
    ) -> Result<Used<()>>;

    /// Encrypts into an envelope ([`Keystore::encrypt_with`]).
    ///
    /// # Errors
    /// As [`Keystore::encrypt_with`].
    fn encrypt_with(
        &self,
        id: &str,
        plaintext: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>>;

    /// Opens an envelope ([`Keystore::decrypt_with`]).
    ///
    /// # Errors
    /// As [`Keystore::decrypt_with`].
    fn decrypt_with(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<SecretBytes>>;

    /// Re-encrypts an envelope under the key's newest version ([`Keystore::rewrap`]).
    ///
    /// # Errors
    /// As [`Keystore::rewrap`].
    fn rewrap(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>>;

    /// Computes a MAC ([`Keystore::mac_with`]).
    ///
    /// # Errors
    /// As [`Keystore::mac_with`].
    fn mac_with(&self, id: &str, data: &[u8], options: &UseOptions) -> Result<Used<Vec<u8>>>;

    /// Checks a MAC ([`Keystore::verify_mac_with`]).
    ///
    /// # Errors
    /// As [`Keystore::verify_mac_with`].
    fn verify_mac_with(
        &self,
        id: &str,
        data: &[u8],
        tag: &[u8],
        options: &UseOptions,
    ) -> Result<Used<()>>;

    /// Rotates ([`Keystore::rotate_key`]).
    ///
    /// # Errors
    /// As [`Keystore::rotate_key`].
    fn rotate_key(&self, id: &str, reason: Option<&str>) -> Result<KeyInfo>;

    /// Suspends, resumes, deactivates or marks compromised ([`Keystore::change_state`]).
    ///
    /// # Errors
    /// As [`Keystore::change_state`].
    fn change_state(
        &self,
        id: &str,
        transition: Transition,
        reason: Option<&str>,
    ) -> Result<KeyInfo>;

    /// Schedules (or, at a time not in the future, carries out) the key's destruction
    /// ([`Keystore::schedule_destroy`]).
    ///
    /// # Errors
    /// As [`Keystore::schedule_destroy`].
    fn schedule_destroy(&self, id: &str, at: i64, reason: Option<&str>) -> Result<KeyInfo>;

    /// Cancels a scheduled destruction ([`Keystore::cancel_destroy`]).
    ///
    /// # Errors
    /// As [`Keystore::cancel_destroy`].
    fn cancel_destroy(&self, id: &str, reason: Option<&str>) -> Result<KeyInfo>;

    /// Changes the key's schedule or version policy ([`Keystore::set_policy`]).
    ///
    /// # Errors
    /// As [`Keystore::set_policy`].
    fn set_policy(&self, id: &str, policy: &PolicyChange, reason: Option<&str>) -> Result<KeyInfo>;

    /// The key's history ([`Keystore::history`]).
    ///
    /// # Errors
    /// As [`Keystore::history`].
    fn history(&self, id: &str) -> Result<Vec<KeyEvent>>;

    /// The exportable key `id`, wrapped as `to` says ([`Keystore::export_key`]).
    ///
    /// # Errors
    /// As [`Keystore::export_key`]; for a service, a wrapping key it does not let the caller see
    /// is one that does not exist.
    fn export_key(&self, id: &str, to: ExportTo<'_>) -> Result<Vec<u8>>;

    /// Brings a key in: `input` wrapped (unwrapped with the key `unwrap_with`), or a private key
    /// or raw secret ([`Keystore::import_key`]).
    ///
    /// # Errors
    /// As [`Keystore::import_key`]; for a service, its refusals too.
    fn import_key(
        &self,
        request: &KeyRequest,
        input: &[u8],
        unwrap_with: Option<&str>,
        options: &KeyOptions,
    ) -> Result<KeyInfo>;

    /// How the store's root secret is sealed (`passphrase`, `tpm`, `pkcs11`):
    /// [`Keystore::sealer_kind`].
    ///
    /// # Errors
    /// For a service, not reaching it.
    fn sealer_kind(&self) -> Result<String>;

    /// `n` random bytes ([`super::random_bytes`]).
    ///
    /// # Errors
    /// As [`super::random_bytes`].
    fn random(&self, n: usize) -> Result<Vec<u8>>;
}

impl KeyService for Keystore {
    fn create_key_with(&self, request: &KeyRequest, options: &KeyOptions) -> Result<KeyInfo> {
        Keystore::create_key_with(self, request, options)
    }

    fn key_info(&self, id: &str) -> Result<KeyInfo> {
        Keystore::key_info(self, id)
    }

    fn key_info_by_name(&self, namespace: &str, name: &str) -> Result<Option<KeyInfo>> {
        Keystore::key_info_by_name(self, namespace, name)
    }

    fn list_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>> {
        Keystore::list_keys(self, namespace)
    }

    fn list_all_keys(&self, namespace: Option<&str>) -> Result<Vec<KeyInfo>> {
        Keystore::list_all_keys(self, namespace)
    }

    fn public_key_version(&self, id: &str, version: Option<u32>) -> Result<PublicKey> {
        Keystore::public_key_version(self, id, version)
    }

    fn sign_with(
        &self,
        id: &str,
        message: &[u8],
        format: SignatureFormat,
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        Keystore::sign_with(self, id, message, format, options)
    }

    fn verify_with(
        &self,
        id: &str,
        message: &[u8],
        signature: &[u8],
        format: SignatureFormat,
        options: &UseOptions,
    ) -> Result<Used<()>> {
        Keystore::verify_with(self, id, message, signature, format, options)
    }

    fn encrypt_with(
        &self,
        id: &str,
        plaintext: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        Keystore::encrypt_with(self, id, plaintext, aad, options)
    }

    fn decrypt_with(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<SecretBytes>> {
        Keystore::decrypt_with(self, id, input, aad, options)
    }

    fn rewrap(
        &self,
        id: &str,
        input: &[u8],
        aad: &[u8],
        options: &UseOptions,
    ) -> Result<Used<Vec<u8>>> {
        Keystore::rewrap(self, id, input, aad, options)
    }

    fn mac_with(&self, id: &str, data: &[u8], options: &UseOptions) -> Result<Used<Vec<u8>>> {
        Keystore::mac_with(self, id, data, options)
    }

    fn verify_mac_with(
        &self,
        id: &str,
        data: &[u8],
        tag: &[u8],
        options: &UseOptions,
    ) -> Result<Used<()>> {
        Keystore::verify_mac_with(self, id, data, tag, options)
    }

    fn rotate_key(&self, id: &str, reason: Option<&str>) -> Result<KeyInfo> {
        Keystore::rotate_key(self, id, reason)
    }

    fn change_state(
        &self,
        id: &str,
        transition: Transition,
        reason: Option<&str>,
    ) -> Result<KeyInfo> {
        Keystore::change_state(self, id, transition, reason)
    }

    fn schedule_destroy(&self, id: &str, at: i64, reason: Option<&str>) -> Result<KeyInfo> {
        Keystore::schedule_destroy(self, id, at, reason)
    }

    fn cancel_destroy(&self, id: &str, reason: Option<&str>) -> Result<KeyInfo> {
        Keystore::cancel_destroy(self, id, reason)
    }

    fn set_policy(&self, id: &str, policy: &PolicyChange, reason: Option<&str>) -> Result<KeyInfo> {
        Keystore::set_policy(self, id, policy, reason)
    }

    fn history(&self, id: &str) -> Result<Vec<KeyEvent>> {
        Keystore::history(self, id)
    }

    fn export_key(&self, id: &str, to: ExportTo<'_>) -> Result<Vec<u8>> {
        Keystore::export_key(self, id, to)
    }

    fn import_key(
        &self,
        request: &KeyRequest,
        input: &[u8],
        unwrap_with: Option<&str>,
        options: &KeyOptions,
    ) -> Result<KeyInfo> {
        Keystore::import_key(self, request, input, unwrap_with, options)
    }

    fn sealer_kind(&self) -> Result<String> {
        Ok(Keystore::sealer_kind(self).to_owned())
    }

    fn random(&self, n: usize) -> Result<Vec<u8>> {
        super::random_bytes(n)
    }
}

/// The store's checks, its audit log, the lifecycle's due work and its token clients, for its
/// administrator: by [`Keystore`] where the store is, or by a service
/// (`crate::service::RemoteKeystore`) for a client granted `audit`, `maintain` or `admin`.
pub trait StoreAdmin: Send + Sync {
    /// The audit log's MACs and hash chain verified ([`Keystore::verify_audit`]).
    ///
    /// # Errors
    /// As [`Keystore::verify_audit`].
    fn verify_audit(&self) -> Result<crate::audit::Verified>;

    /// The audit log's entries, oldest first: those of the key `key` only, if given (a genuine
    /// ID; the key may be destroyed), and those at or after `since` (seconds since the epoch)
    /// only, if given ([`Keystore::audit_entries`], [`Keystore::audit_entries_of_key`]).
    ///
    /// # Errors
    /// As those.
    fn audit_entries(
        &self,
        key: Option<&str>,
        since: Option<i64>,
    ) -> Result<Vec<crate::audit::Entry>>;

    /// The whole store verified: records, audit log, key material, commitment
    /// ([`Keystore::verify_store`]).
    ///
    /// # Errors
    /// As [`Keystore::verify_store`]: what fails a check is in the report.
    fn verify_store(&self) -> Result<crate::verify::VerifyReport>;

    /// The work every key's schedule makes due now, done ([`Keystore::maintain`]).
    ///
    /// # Errors
    /// As [`Keystore::maintain`]; a key whose work failed is in the answer.
    fn maintain(&self) -> Result<super::Maintenance>;

    /// The store's token clients, by name ([`Keystore::clients`]); a service's configured
    /// clients are not the store's.
    ///
    /// # Errors
    /// As [`Keystore::clients`].
    fn token_clients(&self) -> Result<Vec<super::TokenClient>>;
}

impl StoreAdmin for Keystore {
    fn verify_audit(&self) -> Result<crate::audit::Verified> {
        Keystore::verify_audit(self)
    }

    fn audit_entries(
        &self,
        key: Option<&str>,
        since: Option<i64>,
    ) -> Result<Vec<crate::audit::Entry>> {
        let mut entries = match key {
            Some(id) => self.audit_entries_of_key(id)?,
            None => Keystore::audit_entries(self)?,
        };
        if let Some(since) = since {
            entries.retain(|e| e.time >= since);
        }
        Ok(entries)
    }

    fn verify_store(&self) -> Result<crate::verify::VerifyReport> {
        Keystore::verify_store(self, &|_| {})
    }

    fn maintain(&self) -> Result<super::Maintenance> {
        Keystore::maintain(self)
    }

    fn token_clients(&self) -> Result<Vec<super::TokenClient>> {
        Keystore::clients(self)
    }
}
