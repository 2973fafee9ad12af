//! A key as JSON: the one form the CLI's `--json` and the service's answers share.

use super::KeyInfo;
use crate::time::format_utc;

/// The attribute a software key made in place of another backend's records that backend in.
pub(super) const FALLBACK_FOR: &str = "fallback_for";
/// Why it could not make the key there, recorded beside [`FALLBACK_FOR`].
pub(super) const FALLBACK_REASON: &str = "fallback_reason";

impl KeyInfo {
    /// The backend a software key was made in place of, and why (as recorded when it was made).
    pub fn fallback(&self) -> Option<(&str, &str)> {
        let original = self.attributes.get(FALLBACK_FOR)?;
        let reason = self
            .attributes
            .get(FALLBACK_REASON)
            .map_or("it could not make them", String::as_str);
        Some((original, reason))
    }

    /// The key as JSON (docs/cli.md, `--json`): everything but its material, times in UTC.
    pub fn to_json(&self) -> serde_json::Value {
        let at = |secs: Option<i64>| secs.map(format_utc);
        serde_json::json!({
            "id": self.id,
            "store_id": self.store_id,
            "namespace": self.namespace,
            "name": self.name,
            "type": self.spec.key_type().as_str(),
            "purpose": self.spec.purpose().as_str(),
            "algorithm": self.spec.algorithm().as_str(),
            "backend": self.backend,
            "locator": self.locator,
            "state": self.state.as_str(),
            "version": self.version,
            "versions": self
                .versions
                .iter()
                .map(|v| serde_json::json!({
                    "version": v.version,
                    "created": format_utc(v.created_at),
                    "locator": v.locator,
                }))
                .collect::<Vec<_>>(),
            "min_decrypt_version": self.min_decrypt_version,
            "rotate_after_secs": self.rotate_after,
            "activate_at": at(self.activate_at),
            "deactivate_at": at(self.deactivate_at),
            "destroy_at": at(self.destroy_at),
            "destroyed_at": at(self.destroyed_at),
            "created": format_utc(self.created_at),
            "attributes": self.attributes,
            "fallback": self.fallback().map_or(
                serde_json::Value::Null,
                |(original, reason)| serde_json::json!({ "for": original, "reason": reason }),
            ),
        })
    }
}
