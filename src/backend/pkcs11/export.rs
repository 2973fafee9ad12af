//! Key export from a token: an exportable key (`CKA_EXTRACTABLE`, `CKA_WRAP_WITH_TRUSTED`) is
//! wrapped inside the token by `C_WrapKey` (`CKM_AES_KEY_WRAP_PAD`, RFC 5649) under an AES-256
//! key that the token's security officer made and marked trusted (`CKA_TRUSTED`), named by its
//! label. keyhold never holds the SO PIN: the SO provisions the wrapping key once, and keyhold's
//! user session only uses it. Every other way out is refused, saying what the SO must provision.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};

use super::capabilities::Mechanisms;
use super::{errors, Pkcs11Backend, EXTRACTABLE_BLOB, IMPORTED_BLOB};
use crate::backend::{KeyRef, Wrapping};
use crate::error::{Error, Result};

/// What the security officer must provision, for messages.
const PROVISION: &str = "the token's security officer makes it once: an AES-256 secret key \
    (CKO_SECRET_KEY, CKK_AES, CKA_VALUE_LEN 32) with CKA_WRAP, CKA_TRUSTED and CKA_SENSITIVE \
    true and CKA_EXTRACTABLE, CKA_UNWRAP and CKA_DECRYPT false, a public token object \
    (docs/cli.md, \"Key transport\")";

/// The length of an AES-256 key in bytes (`CKA_VALUE_LEN`).
const AES_256_LEN: u64 = 32;

/// What is read of each object carrying the label, to say why none is a trusted wrapping key.
const CHECKED: [AttributeType; 4] = [
    AttributeType::Class,
    AttributeType::KeyType,
    AttributeType::Wrap,
    AttributeType::Trusted,
];

/// What is read of the one trusted wrapping key before it is used.
const USED: [AttributeType; 5] = [
    AttributeType::ValueLen,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Unwrap,
    AttributeType::Decrypt,
];

/// The objects a token holds under a label: those that are trusted wrapping keys, the [`USED`]
/// attributes of the one, or what each of the others is (its [`CHECKED`] attributes) when not
/// exactly one is.
struct Search {
    trusted: Vec<ObjectHandle>,
    one: Vec<Attribute>,
    others: Vec<Vec<Attribute>>,
}

impl Pkcs11Backend {
    /// Wraps the key as `wrapping` says: under a trusted key of its token, else refused.
    pub(super) fn export(&self, key: &KeyRef<'_>, wrapping: Wrapping<'_>) -> Result<Vec<u8>> {
        match wrapping {
            Wrapping::Trusted(label) => self.wrap_under_trusted(key, label),
            Wrapping::Kek(_) | Wrapping::RsaPublic(_) => Err(self.cannot_wrap(key, wrapping)),
        }
    }

    /// `C_WrapKey` of the key's secret or private object under the trusted key `label`.
    fn wrap_under_trusted(&self, key: &KeyRef<'_>, label: &str) -> Result<Vec<u8>> {
        if key.blob != Some(EXTRACTABLE_BLOB) {
            return Err(self.cannot_wrap(key, Wrapping::Trusted(label)));
        }
        self.require_wrap_mechanism()?;
        let kek = self.trusted_key(label)?;
        let operation = "wrap the key (C_WrapKey, CKM_AES_KEY_WRAP_PAD)";
        self.with_key(key, operation, |session, handle| {
            session.wrap_key(&Mechanism::AesKeyWrapPad, kek, handle)
        })
        .map_err(|e| match e {
            Error::Backend { ref source, .. } => match wrap_refusal(source.as_ref()) {
                Some(why) => Error::Unsupported {
                    backend: self.name.clone(),
                    what: format!(
                        "wrapping this key under `{label}`: {} refused ({why})",
                        self.token_name()
                    ),
                },
                None => e,
            },
            other => other,
        })
    }

    /// `Ok` if the token wraps with RFC 5649 under AES-256 keys, as it says of its mechanisms.
    fn require_wrap_mechanism(&self) -> Result<()> {
        let slot = self.pool.slot()?;
        let mechanisms = Mechanisms::read_wrap(self.pool.module().pkcs11(), slot)
            .map_err(|e| errors::map(&self.name, "list mechanisms (C_GetMechanismList)", e))?;
        mechanisms.check_wrap().map_err(|what| Error::Unsupported {
            backend: self.name.clone(),
            what: format!(
                "wrapping keys for export: {} lacks {what}, which keyhold wraps with (RFC 5649)",
                self.token_name()
            ),
        })
    }

    /// The one trusted wrapping key labelled `label` on the token: an AES-256 secret key with
    /// `CKA_WRAP` and `CKA_TRUSTED` true.
    fn trusted_key(&self, label: &str) -> Result<ObjectHandle> {
        let wanted = [
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(CkKeyType::AES),
            Attribute::Trusted(true),
            Attribute::Wrap(true),
        ];
        let search = self.run(
            "find the trusted wrapping key (C_FindObjects)",
            |_, session| {
                let trusted = session.find_objects(&wanted)?;
                let (mut one, mut others) = (Vec::new(), Vec::new());
                if let [handle] = trusted.as_slice() {
                    one = session.get_attributes(*handle, &USED)?;
                } else {
                    let labelled = [Attribute::Label(label.as_bytes().to_vec())];
                    for handle in session.find_objects(&labelled)? {
                        others.push(session.get_attributes(handle, &CHECKED)?);
                    }
                }
                Ok(Search {
                    trusted,
                    one,
                    others,
                })
            },
        )?;
        let token = self.token_name();
        let refused = |why: String| Error::InvalidInput(format!("{why}; {PROVISION}"));
        match search.trusted.as_slice() {
            [one] => match unfit(&search.one) {
                None => Ok(*one),
                Some(why) => Err(refused(format!(
                    "the trusted wrapping key `{label}` on {token} {why}"
                ))),
            },
            [] if search.others.is_empty() => Err(refused(format!(
                "no object labelled `{label}` is on {token} (or visible to keyhold's session)"
            ))),
            [] => Err(refused(format!(
                "no object labelled `{label}` on {token} is a trusted wrapping key: {}",
                shortfalls(&search.others)
            ))),
            several => Err(Error::InvalidInput(format!(
                "{} trusted wrapping keys are labelled `{label}` on {token}: keyhold wraps only \
                 under a label that names exactly one (the token's security officer can relabel \
                 or remove the others)",
                several.len()
            ))),
        }
    }

    /// Why a token key is not wrapped as `wrapping` says: what
    /// [`crate::backend::Backend::wrap_key`] answers.
    pub(super) fn cannot_wrap(&self, key: &KeyRef<'_>, wrapping: Wrapping<'_>) -> Error {
        let token = self.token_name();
        let what = if key.blob == Some(IMPORTED_BLOB) {
            "exporting this key: a key imported into a token is not extractable (import a key \
             into software to keep it exportable)"
                .to_owned()
        } else if key.blob != Some(EXTRACTABLE_BLOB) {
            "exporting this key: it was made without --exportable, so the token keeps it".to_owned()
        } else {
            let how = match wrapping {
                Wrapping::RsaPublic(_) => format!(
                    "wrapping its keys to a public key ({token} may also lack \
                     CKM_RSA_AES_KEY_WRAP with SHA-256, as SoftHSM 2.6 does)"
                ),
                Wrapping::Kek(_) | Wrapping::Trusted(_) => {
                    "wrapping its keys under a keyhold key".to_owned()
                }
            };
            format!(
                "{how}: an exportable token key is wrappable only under a key the token's \
                 security officer marked trusted (CKA_WRAP_WITH_TRUSTED), which keyhold's own \
                 keys are not: export it with --wrap-with-trusted LABEL, LABEL naming such a key \
                 on {token}; {PROVISION}"
            )
        };
        Error::Unsupported {
            backend: self.name.clone(),
            what,
        }
    }
}

/// Why the trusted key whose [`USED`] attributes are `attributes` is not one to wrap under, if
/// it is not: not AES-256, its value readable (a key wrapped under it would then be as good as
/// in clear to whoever reads it, and a public object is read without a login), or able to
/// unwrap or decrypt (an export unwrapped back into the token as a readable key).
fn unfit(attributes: &[Attribute]) -> Option<String> {
    let has = |wanted: &Attribute| attributes.iter().any(|a| a == wanted);
    let length = attributes.iter().find_map(|a| match a {
        Attribute::ValueLen(n) => Some(u64::from(*n)),
        _ => None,
    });
    match length {
        Some(AES_256_LEN) => {}
        Some(n) => {
            return Some(format!(
                "is {n} bytes long (CKA_VALUE_LEN): keyhold wraps under AES-256 keys only"
            ))
        }
        None => {
            return Some(
                "does not say its length (CKA_VALUE_LEN): keyhold wraps under AES-256 keys only"
                    .into(),
            )
        }
    }
    if !has(&Attribute::Sensitive(true)) || !has(&Attribute::Extractable(false)) {
        return Some(
            "can be read or taken out of the token (it is not CKA_SENSITIVE, or is \
             CKA_EXTRACTABLE): a key wrapped under it would be as good as in clear"
                .into(),
        );
    }
    // A missing attribute counts as true: only a key that says it does neither is used.
    if !has(&Attribute::Unwrap(false)) || !has(&Attribute::Decrypt(false)) {
        return Some(
            "also unwraps or decrypts (CKA_UNWRAP or CKA_DECRYPT): whoever has the user PIN \
             could unwrap what is wrapped under it back into the token as a readable key"
                .into(),
        );
    }
    None
}

/// What the objects in `others` lack to be a trusted wrapping key, each shortfall once.
fn shortfalls(others: &[Vec<Attribute>]) -> String {
    let mut lacks: Vec<&str> = Vec::new();
    for attributes in others {
        let has = |wanted: &Attribute| attributes.iter().any(|a| a == wanted);
        let checks = [
            (
                has(&Attribute::Class(ObjectClass::SECRET_KEY))
                    && has(&Attribute::KeyType(CkKeyType::AES)),
                "it is not an AES secret key (CKO_SECRET_KEY, CKK_AES)",
            ),
            (has(&Attribute::Wrap(true)), "CKA_WRAP is not true"),
            (
                has(&Attribute::Trusted(true)),
                "CKA_TRUSTED is not true (only the security officer can set it)",
            ),
        ];
        for (ok, why) in checks {
            if !ok && !lacks.contains(&why) {
                lacks.push(why);
            }
        }
    }
    lacks.join(", and ")
}

/// Why `C_WrapKey` refused the key, when the token says so (rather than failing otherwise).
fn wrap_refusal(e: &(dyn std::error::Error + Send + Sync + 'static)) -> Option<&'static str> {
    match e.downcast_ref::<CkError>() {
        Some(CkError::Pkcs11(rv, Function::WrapKey)) => match rv {
            RvError::KeyNotWrappable => {
                Some("CKR_KEY_NOT_WRAPPABLE: the key wraps only under keys the token holds trusted")
            }
            RvError::KeyUnextractable => {
                Some("CKR_KEY_UNEXTRACTABLE: the key's object is not extractable")
            }
            RvError::WrappingKeyTypeInconsistent | RvError::WrappingKeySizeRange => {
                Some("the wrapping key does not suit CKM_AES_KEY_WRAP_PAD")
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
#[cfg(feature = "testing")]
mod tests {
    use super::*;
    use crate::testing::OpenCryptoki;

    /// openCryptoki 3.8 lists no CKM_AES_KEY_WRAP_PAD: the export's mechanism check refuses,
    /// naming the token and the mechanism. (No exportable key reaches this check on that token,
    /// which knows no CKA_WRAP_WITH_TRUSTED: tests/transport.rs.)
    #[test]
    fn a_token_without_rfc_5649_is_refused_naming_it_and_the_mechanism() {
        let ock = OpenCryptoki::new().unwrap();
        let backend = Pkcs11Backend::new("ock", &ock.backend_config()).unwrap();
        let refused = backend.require_wrap_mechanism();
        assert!(
            matches!(&refused, Err(Error::Unsupported { backend, what })
                if backend == "ock"
                    && what.starts_with("wrapping keys for export: token `keyhold-ock`")
                    && what.contains("lacks CKM_AES_KEY_WRAP_PAD")),
            "{refused:?}"
        );
    }
}
