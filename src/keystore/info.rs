//! A key as JSON: the one form the CLI's `--json` and the service's answers share.

use serde::Deserialize as _;

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

/// A key as [`KeyInfo::to_json`] writes it, read back.
#[derive(serde::Deserialize)]
struct KeyJson {
    id: String,
    store_id: String,
    namespace: String,
    name: String,
    #[serde(rename = "type")]
    key_type: String,
    purpose: String,
    algorithm: String,
    backend: String,
    locator: String,
    state: String,
    version: u32,
    versions: Vec<VersionJson>,
    min_decrypt_version: u32,
    rotate_after_secs: Option<i64>,
    activate_at: Option<String>,
    deactivate_at: Option<String>,
    destroy_at: Option<String>,
    destroyed_at: Option<String>,
    created: String,
    attributes: std::collections::BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct VersionJson {
    version: u32,
    created: String,
    locator: String,
}

/// A UTC time as [`format_utc`] writes it, read back.
fn utc(text: &str) -> crate::Result<i64> {
    crate::time::parse_instant(text, 0)
}

impl KeyInfo {
    /// The key [`Self::to_json`] wrote (as `keyhold serve` answers it).
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] for JSON that is not a key.
    pub fn from_json(value: &serde_json::Value) -> crate::Result<Self> {
        let k = KeyJson::deserialize(value)
            .map_err(|e| crate::Error::InvalidInput(format!("not a key's JSON: {e}")))?;
        let at = |t: &Option<String>| t.as_deref().map(utc).transpose();
        Ok(Self {
            spec: crate::KeySpec::from_names(&k.key_type, &k.purpose, &k.algorithm)?,
            state: k.state.parse()?,
            versions: k
                .versions
                .into_iter()
                .map(|v| {
                    Ok(super::VersionInfo {
                        version: v.version,
                        created_at: utc(&v.created)?,
                        locator: v.locator,
                    })
                })
                .collect::<crate::Result<_>>()?,
            activate_at: at(&k.activate_at)?,
            deactivate_at: at(&k.deactivate_at)?,
            destroy_at: at(&k.destroy_at)?,
            destroyed_at: at(&k.destroyed_at)?,
            created_at: utc(&k.created)?,
            id: k.id,
            store_id: k.store_id,
            namespace: k.namespace,
            name: k.name,
            backend: k.backend,
            locator: k.locator,
            version: k.version,
            min_decrypt_version: k.min_decrypt_version,
            rotate_after: k.rotate_after_secs,
            attributes: k.attributes,
        })
    }
}

impl super::KeyEvent {
    /// The entry [`Self::to_json`] wrote.
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] for JSON that is not a history entry.
    pub fn from_json(value: &serde_json::Value) -> crate::Result<Self> {
        #[derive(serde::Deserialize)]
        struct EventJson {
            seq: u32,
            at: String,
            event: String,
            from: Option<String>,
            to: String,
            version: u32,
            reason: Option<String>,
        }
        let e = EventJson::deserialize(value)
            .map_err(|e| crate::Error::InvalidInput(format!("not a history entry's JSON: {e}")))?;
        Ok(Self {
            seq: e.seq,
            at: utc(&e.at)?,
            event: e.event,
            from: e.from,
            to: e.to,
            version: e.version,
            reason: e.reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_and_a_history_entry_read_back_as_written() {
        let mut attributes = std::collections::BTreeMap::new();
        attributes.insert("never_extractable".to_owned(), "true".to_owned());
        let key = KeyInfo {
            id: "kh1_x".into(),
            store_id: "00".into(),
            namespace: "app".into(),
            name: "signer".into(),
            spec: crate::KeySpec::new(crate::KeyType::EcdsaP256, None, None).unwrap(),
            backend: "software".into(),
            locator: "l2".into(),
            state: crate::KeyState::Active,
            version: 2,
            versions: vec![
                super::super::VersionInfo {
                    version: 1,
                    created_at: 1_700_000_000,
                    locator: "l1".into(),
                },
                super::super::VersionInfo {
                    version: 2,
                    created_at: 1_700_000_100,
                    locator: "l2".into(),
                },
            ],
            min_decrypt_version: 1,
            rotate_after: Some(86_400),
            activate_at: None,
            deactivate_at: Some(1_800_000_000),
            destroy_at: None,
            destroyed_at: None,
            created_at: 1_700_000_000,
            attributes,
        };
        let back = KeyInfo::from_json(&key.to_json()).unwrap();
        assert_eq!(back.to_json(), key.to_json());
        assert_eq!(back.deactivate_at, Some(1_800_000_000));
        let event = super::super::KeyEvent {
            seq: 3,
            at: 1_700_000_200,
            event: "rotated".into(),
            from: Some("active".into()),
            to: "active".into(),
            version: 2,
            reason: Some("yearly".into()),
        };
        assert_eq!(
            super::super::KeyEvent::from_json(&event.to_json()).unwrap(),
            event
        );
        // The entry that made a key comes from no state: `null`, read back as none.
        let first = super::super::KeyEvent {
            seq: 1,
            event: "created".into(),
            from: None,
            ..event
        };
        assert_eq!(first.to_json()["from"], serde_json::Value::Null);
        assert_eq!(
            super::super::KeyEvent::from_json(&first.to_json()).unwrap(),
            first
        );
        assert!(KeyInfo::from_json(&serde_json::json!({"id": 1})).is_err());
    }
}
