//! Key object templates: what keyhold requires of a key's objects, what hardens them but a token may
//! refuse, how the objects are found again, and what the token really made.
//!
//! Tokens refuse attributes they do not expect: openCryptoki 3.8.1 answers `CKA_COPYABLE`,
//! `CKA_DESTROYABLE` and `CKA_WRAP_WITH_TRUSTED` with `CKR_ATTRIBUTE_TYPE_INVALID`; some answer an
//! explicit `CKA_ENCRYPT=false` on an EC public key with `CKR_GENERAL_ERROR`. So generation tries
//! the full template, then without the PKCS#11 2.40 attributes, then with the required ones only,
//! never fewer; and whatever was made is read back, extra usages the token added by default are
//! cleared where it allows, and the rest is recorded.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType as CkKeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::key::{KeySpec, KeyType, Purpose};

/// Usage attributes each class of object can carry.
const PRIVATE_USAGES: &[AttributeType] = &[
    AttributeType::Sign,
    AttributeType::SignRecover,
    AttributeType::Decrypt,
    AttributeType::Unwrap,
    AttributeType::Derive,
];
const PUBLIC_USAGES: &[AttributeType] = &[
    AttributeType::Verify,
    AttributeType::VerifyRecover,
    AttributeType::Encrypt,
    AttributeType::Wrap,
    AttributeType::Derive,
];
const SECRET_USAGES: &[AttributeType] = &[
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Derive,
];

/// Protection attributes read back from the private or secret object, recorded by these names.
const PROTECTION: &[(AttributeType, &str)] = &[
    (AttributeType::Sensitive, "sensitive"),
    (AttributeType::AlwaysSensitive, "always_sensitive"),
    (AttributeType::Extractable, "extractable"),
    (AttributeType::NeverExtractable, "never_extractable"),
    (AttributeType::Modifiable, "modifiable"),
    (AttributeType::Copyable, "copyable"),
    (AttributeType::Destroyable, "destroyable"),
    (AttributeType::Local, "local"),
    (AttributeType::Private, "private"),
    (AttributeType::WrapWithTrusted, "wrap_with_trusted"),
];

/// A boolean attribute of `kind` with `value`, for the attributes this module sets.
fn flag(kind: AttributeType, value: bool) -> Option<Attribute> {
    Some(match kind {
        AttributeType::Sign => Attribute::Sign(value),
        AttributeType::SignRecover => Attribute::SignRecover(value),
        AttributeType::Verify => Attribute::Verify(value),
        AttributeType::VerifyRecover => Attribute::VerifyRecover(value),
        AttributeType::Encrypt => Attribute::Encrypt(value),
        AttributeType::Decrypt => Attribute::Decrypt(value),
        AttributeType::Wrap => Attribute::Wrap(value),
        AttributeType::Unwrap => Attribute::Unwrap(value),
        AttributeType::Derive => Attribute::Derive(value),
        _ => return None,
    })
}

/// The value of a boolean attribute read back.
fn bool_value(attr: &Attribute) -> Option<bool> {
    Some(match attr {
        Attribute::Sign(v)
        | Attribute::SignRecover(v)
        | Attribute::Verify(v)
        | Attribute::VerifyRecover(v)
        | Attribute::Encrypt(v)
        | Attribute::Decrypt(v)
        | Attribute::Wrap(v)
        | Attribute::Unwrap(v)
        | Attribute::Derive(v)
        | Attribute::Sensitive(v)
        | Attribute::AlwaysSensitive(v)
        | Attribute::Extractable(v)
        | Attribute::NeverExtractable(v)
        | Attribute::Modifiable(v)
        | Attribute::Copyable(v)
        | Attribute::Destroyable(v)
        | Attribute::Local(v)
        | Attribute::Private(v)
        | Attribute::Token(v)
        | Attribute::WrapWithTrusted(v) => *v,
        _ => return None,
    })
}

/// The lowercase name keyhold records for a usage attribute (`CKA_SIGN_RECOVER` → `sign_recover`).
fn usage_name(kind: AttributeType) -> String {
    kind.to_string()
        .trim_start_matches("CKA_")
        .to_ascii_lowercase()
}

/// What a key's objects are on the token: how they are made and how they are found again.
#[derive(Debug, Clone, Copy)]
pub(super) struct Expected {
    key_type: KeyType,
    purpose: Purpose,
    extractable: bool,
    /// Made from material that came from outside (`C_UnwrapKey`): not `CKA_LOCAL`, not always
    /// sensitive, and never extractable again.
    imported: bool,
}

impl Expected {
    /// The objects of a `spec` key, made extractable (under trusted keys) or not.
    pub(super) fn new(spec: &KeySpec, extractable: bool) -> Self {
        Self {
            key_type: spec.key_type(),
            purpose: spec.purpose(),
            extractable,
            imported: false,
        }
    }

    /// The objects of a `spec` key imported into the token: sensitive, not extractable.
    pub(super) fn imported(spec: &KeySpec) -> Self {
        Self {
            imported: true,
            ..Self::new(spec, false)
        }
    }

    /// Whether the key is made extractable (under trusted wrapping keys only).
    pub(super) fn is_extractable(&self) -> bool {
        self.extractable
    }

    /// The class of the object holding the private or secret half.
    pub(super) fn secret_class(&self) -> ObjectClass {
        if self.key_type.is_asymmetric() {
            ObjectClass::PRIVATE_KEY
        } else {
            ObjectClass::SECRET_KEY
        }
    }

    fn ck_key_type(&self) -> CkKeyType {
        match self.key_type {
            KeyType::EcdsaP256 | KeyType::EcdsaP384 => CkKeyType::EC,
            KeyType::Ed25519 => CkKeyType::EC_EDWARDS,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => CkKeyType::RSA,
            KeyType::Aes256Gcm => CkKeyType::AES,
            KeyType::HmacSha256 => CkKeyType::GENERIC_SECRET,
        }
    }

    /// The usages the private or secret object must have: its one purpose.
    fn secret_usages(&self) -> &'static [AttributeType] {
        match self.purpose {
            Purpose::Sign => &[AttributeType::Sign],
            // keyhold checks tags by computing them, but a MAC key may verify too.
            Purpose::Mac => &[AttributeType::Sign, AttributeType::Verify],
            Purpose::Decrypt => &[AttributeType::Decrypt],
            Purpose::Encrypt => &[AttributeType::Encrypt, AttributeType::Decrypt],
        }
    }

    /// The usages keyhold calls on the private or secret object (what a lookup insists on).
    fn used_usages(&self) -> &'static [AttributeType] {
        match self.purpose {
            Purpose::Sign | Purpose::Mac => &[AttributeType::Sign],
            Purpose::Decrypt => &[AttributeType::Decrypt],
            Purpose::Encrypt => &[AttributeType::Encrypt, AttributeType::Decrypt],
        }
    }

    fn public_usage(&self) -> AttributeType {
        if self.purpose == Purpose::Decrypt {
            AttributeType::Encrypt
        } else {
            AttributeType::Verify
        }
    }

    fn class_usages(class: ObjectClass) -> &'static [AttributeType] {
        if class == ObjectClass::PRIVATE_KEY {
            PRIVATE_USAGES
        } else if class == ObjectClass::SECRET_KEY {
            SECRET_USAGES
        } else {
            PUBLIC_USAGES
        }
    }

    /// What a found object of `class` with `id` must match before keyhold uses it. Besides the
    /// ID, only an object the token generated itself (`CKA_LOCAL`) as keyhold makes its keys
    /// counts: a same-ID object imported, or generated extractable, not sensitive, wrappable
    /// under untrusted keys or shorter by someone holding the PIN, is never used in the key's
    /// place.
    pub(super) fn find_template(&self, id: &[u8], class: ObjectClass) -> Vec<Attribute> {
        let mut template = vec![
            Attribute::Id(id.to_vec()),
            Attribute::Class(class),
            Attribute::KeyType(self.ck_key_type()),
            Attribute::Token(true),
        ];
        if self.imported {
            // An imported key is what keyhold unwrapped into the token: sensitive from then on
            // and never extractable, but neither local nor always sensitive (PKCS#11 says so).
            if class == ObjectClass::PUBLIC_KEY {
                return template;
            }
            // No CKA_VALUE_LEN: a token need not fill it in for a key it unwraps (SoftHSM 2.6
            // does not); the import checked the key against its material instead.
            template.extend([
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
            ]);
            template.extend(self.used_usages().iter().filter_map(|&u| flag(u, true)));
            return template;
        }
        template.push(Attribute::Local(true));
        if class == ObjectClass::PUBLIC_KEY {
            template.extend(flag(self.public_usage(), true));
            return template;
        }
        template.extend([
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::AlwaysSensitive(true),
        ]);
        if self.extractable {
            // Wrappable only under SO-trusted keys, as made: a replacement wrappable under any
            // key the PIN holder makes would export everything it protects.
            template.push(Attribute::WrapWithTrusted(true));
        } else {
            template.push(Attribute::NeverExtractable(true));
        }
        if class == ObjectClass::SECRET_KEY {
            // keyhold's secret keys are 256-bit: a shorter replacement is a weaker key.
            template.push(Attribute::ValueLen(32.into()));
        }
        template.extend(self.used_usages().iter().filter_map(|&u| flag(u, true)));
        template
    }

    /// The templates to generate the key's objects with; `public_extra` and `secret_extra` are
    /// the mechanism's own required attributes (curve, modulus size, value length, class).
    pub(super) fn templates(
        &self,
        id: &[u8],
        label: &[u8],
        public_extra: Vec<Attribute>,
        secret_extra: Vec<Attribute>,
    ) -> (Tiered, Tiered) {
        let secret_class = self.secret_class();
        let mut secret = Tiered::default();
        secret.required.extend([
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(self.extractable),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.to_vec()),
        ]);
        if self.extractable {
            // An extractable key may be wrapped only under keys the SO marked trusted: any
            // user-made wrapping key would otherwise export it in effect in clear. Required: a
            // token without it does not get extractable keys.
            secret.required.push(Attribute::WrapWithTrusted(true));
        }
        secret.required.extend(secret_extra);
        for &usage in Self::class_usages(secret_class) {
            let on = self.secret_usages().contains(&usage);
            let attr = flag(usage, on);
            if on {
                secret.required.extend(attr);
            } else {
                // Explicit: tokens' defaults (SoftHSM and openCryptoki give a new private key
                // decrypt, sign, unwrap and sign-recover) must not add a second purpose.
                secret.hardening.extend(attr);
            }
        }
        secret.hardening.push(Attribute::Modifiable(false));
        secret
            .newer
            .extend([Attribute::Copyable(false), Attribute::Destroyable(true)]);

        let mut public = Tiered::default();
        public.required.extend([
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Id(id.to_vec()),
            Attribute::Label(label.to_vec()),
        ]);
        public.required.extend(public_extra);
        for &usage in PUBLIC_USAGES {
            let on = usage == self.public_usage();
            if on {
                public.required.extend(flag(usage, true));
            } else {
                public.hardening.extend(flag(usage, false));
            }
        }
        public.hardening.push(Attribute::Modifiable(false));
        public
            .newer
            .extend([Attribute::Copyable(false), Attribute::Destroyable(true)]);
        (public, secret)
    }
}

/// A template in three tiers: what keyhold needs, what hardens the key (explicit `false` usages,
/// `CKA_MODIFIABLE=false`), and the PKCS#11 2.40 hardening older tokens do not know.
#[derive(Debug, Default)]
pub(super) struct Tiered {
    required: Vec<Attribute>,
    hardening: Vec<Attribute>,
    newer: Vec<Attribute>,
}

/// How many templates generation tries: full, without `newer`, required only.
pub(super) const STAGES: usize = 3;

impl Tiered {
    /// The template tried at `stage` (0: everything; the last: required only).
    pub(super) fn at(&self, stage: usize) -> Vec<Attribute> {
        let mut attrs = self.required.clone();
        if stage < 2 {
            attrs.extend(self.hardening.iter().cloned());
        }
        if stage < 1 {
            attrs.extend(self.newer.iter().cloned());
        }
        attrs
    }

    /// What `stage` leaves out that the one before it had, for the log.
    pub(super) fn dropped_at(&self, stage: usize) -> String {
        let dropped = match stage {
            1 => &self.newer,
            2 => &self.hardening,
            _ => return String::new(),
        };
        dropped
            .iter()
            .map(|a| format!("{}", a.attribute_type()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether a token's refusal of a template may be a refusal of its optional attributes.
/// `CKR_GENERAL_ERROR` is openCryptoki's answer to an explicit `false` usage it did not expect.
pub(super) fn is_template_refusal(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::AttributeTypeInvalid
                | RvError::AttributeValueInvalid
                | RvError::AttributeReadOnly
                | RvError::TemplateInconsistent
                | RvError::GeneralError,
            _,
        )
    )
}

/// Generates the objects at `stage`: a key pair when `public` is given, else a secret key.
pub(super) fn generate_at(
    session: &Session,
    mechanism: &Mechanism<'_>,
    public: Option<&Tiered>,
    secret: &Tiered,
    stage: usize,
) -> Result<(Option<ObjectHandle>, ObjectHandle), CkError> {
    match public {
        Some(public) => {
            let (p, s) =
                session.generate_key_pair(mechanism, &public.at(stage), &secret.at(stage))?;
            Ok((Some(p), s))
        }
        None => Ok((None, session.generate_key(mechanism, &secret.at(stage))?)),
    }
}

/// What the token holds for a new key, as keyhold records it.
#[derive(Debug, Default)]
pub(super) struct Inspection {
    /// `(name, value)` pairs for the key's record.
    pub attributes: Vec<(String, String)>,
    /// Why the key is not what keyhold asked for, if it is not.
    pub problem: Option<String>,
}

/// The usages of `handle` among `usages` that are on.
fn usages_on(
    session: &Session,
    handle: ObjectHandle,
    usages: &[AttributeType],
) -> Result<Vec<AttributeType>, CkError> {
    Ok(session
        .get_attributes(handle, usages)?
        .iter()
        .filter(|a| bool_value(a) == Some(true))
        .map(Attribute::attribute_type)
        .collect())
}

/// Turns off `extra` usages of `handle` one by one where the token allows it; returns those still
/// on afterwards.
fn clear_usages(
    session: &Session,
    handle: ObjectHandle,
    usages: &[AttributeType],
    allowed: &[AttributeType],
) -> Result<Vec<AttributeType>, CkError> {
    let on = usages_on(session, handle, usages)?;
    let extra: Vec<AttributeType> = on.into_iter().filter(|u| !allowed.contains(u)).collect();
    if extra.is_empty() {
        return Ok(extra);
    }
    for &usage in &extra {
        if let Some(off) = flag(usage, false) {
            if let Err(e) = session.update_attributes(handle, &[off]) {
                tracing::debug!("the token keeps {usage} on a new key: C_SetAttributeValue: {e}");
            }
        }
    }
    Ok(usages_on(session, handle, usages)?
        .into_iter()
        .filter(|u| !allowed.contains(u))
        .collect())
}

impl Expected {
    /// Reads back what the token made, clears usages it added beyond the key's purpose where it
    /// can, and says what it holds (and what is wrong, if anything keyhold relies on is).
    pub(super) fn inspect(
        &self,
        session: &Session,
        public: Option<ObjectHandle>,
        secret: ObjectHandle,
    ) -> Result<Inspection, CkError> {
        let class_usages = Self::class_usages(self.secret_class());
        let extra = clear_usages(session, secret, class_usages, self.secret_usages())?;
        let public_extra = match public {
            Some(handle) => clear_usages(session, handle, PUBLIC_USAGES, &[self.public_usage()])?,
            None => Vec::new(),
        };
        let kinds: Vec<AttributeType> = PROTECTION.iter().map(|(k, _)| *k).collect();
        let read = session.get_attributes(secret, &kinds)?;
        let value = |kind: AttributeType| {
            read.iter()
                .find(|a| a.attribute_type() == kind)
                .and_then(bool_value)
        };
        let mut inspection = Inspection::default();
        for &(kind, name) in PROTECTION {
            if kind == AttributeType::WrapWithTrusted && !self.extractable {
                continue;
            }
            let shown = value(kind).map_or_else(|| "not reported".to_owned(), |v| v.to_string());
            inspection.attributes.push((name.to_owned(), shown));
        }
        let on = usages_on(session, secret, class_usages)?;
        // `+`-joined: `key show` lists attributes comma-separated.
        let list = |usages: &[AttributeType]| {
            if usages.is_empty() {
                return "none".to_owned();
            }
            usages
                .iter()
                .map(|&u| usage_name(u))
                .collect::<Vec<_>>()
                .join("+")
        };
        inspection.attributes.push(("usages".into(), list(&on)));
        if let Some(handle) = public {
            let on = usages_on(session, handle, PUBLIC_USAGES)?;
            inspection
                .attributes
                .push(("public_usages".into(), list(&on)));
        }
        if !extra.is_empty() || !public_extra.is_empty() {
            let mut all: Vec<String> = extra.iter().map(|&u| usage_name(u)).collect();
            all.extend(
                public_extra
                    .iter()
                    .map(|&u| format!("public key {}", usage_name(u))),
            );
            tracing::warn!(
                "the token gave a new key usages beyond its purpose and refused to clear them: {}",
                all.join(", ")
            );
            inspection
                .attributes
                .push(("extra_usages".into(), all.join("+")));
        }

        // What every later lookup insists on (`find_template`) must hold now.
        let mut wrong = Vec::new();
        let mut must = vec![
            (AttributeType::Private, true),
            (AttributeType::Sensitive, true),
            (AttributeType::Extractable, self.extractable),
        ];
        if !self.imported {
            // An imported key is by definition neither local nor always sensitive.
            must.extend([
                (AttributeType::AlwaysSensitive, true),
                (AttributeType::Local, true),
                (AttributeType::NeverExtractable, !self.extractable),
            ]);
        }
        if self.extractable {
            must.push((AttributeType::WrapWithTrusted, true));
        }
        for (kind, want) in must {
            match value(kind) {
                Some(v) if v == want => {}
                Some(v) => wrong.push(format!("{kind} is {v}")),
                None => wrong.push(format!("{kind} is not reported")),
            }
        }
        for &usage in self.used_usages() {
            if !on.contains(&usage) {
                wrong.push(format!("{usage} is not set"));
            }
        }
        if !wrong.is_empty() {
            inspection.problem = Some(wrong.join(", "));
        }
        Ok(inspection)
    }
}

#[cfg(test)]
#[cfg(feature = "testing")]
mod tests {
    #![allow(clippy::unwrap_used)]

    use cryptoki::session::UserType;
    use secrecy::SecretString;

    use super::*;
    use crate::config::TokenSelector;
    use crate::testing::{SoftHsm, SOFTHSM_MODULE, TEST_USER_PIN};

    /// The DER OID of P-256, as CKA_EC_PARAMS.
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

    fn session(hsm: &SoftHsm) -> Session {
        let path = std::path::Path::new(SOFTHSM_MODULE);
        let module = super::super::module::module("test", path).unwrap();
        let selector = TokenSelector {
            label: Some(hsm.label().to_owned()),
            serial: None,
        };
        let slot = super::super::module::find_token("test", &module, &selector).unwrap();
        let session = module.pkcs11().open_rw_session(slot).unwrap();
        let pin = SecretString::from(TEST_USER_PIN.to_owned());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("C_Login: {e}"),
        }
        session
    }

    fn value<'a>(inspection: &'a Inspection, name: &str) -> Option<&'a str> {
        inspection
            .attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_tiers_drop_the_newer_attributes_then_the_hardening_never_the_required() {
        let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
        let (public, secret) = Expected::new(&spec, false).templates(b"id", b"l", vec![], vec![]);
        let has = |attrs: &[Attribute], a: &Attribute| attrs.contains(a);
        let full = secret.at(0);
        assert!(has(&full, &Attribute::Copyable(false)));
        assert!(has(&full, &Attribute::Decrypt(false)));
        let older = secret.at(1);
        assert!(!has(&older, &Attribute::Copyable(false)));
        assert!(!has(&older, &Attribute::Destroyable(true)));
        assert!(has(&older, &Attribute::SignRecover(false)));
        assert!(has(&older, &Attribute::Modifiable(false)));
        assert_eq!(secret.dropped_at(1), "CKA_COPYABLE, CKA_DESTROYABLE");
        for stage in 0..STAGES {
            for required in [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Id(b"id".to_vec()),
                Attribute::Label(b"l".to_vec()),
                Attribute::Sign(true),
            ] {
                assert!(has(&secret.at(stage), &required), "{stage}: {required:?}");
            }
            assert!(has(&public.at(stage), &Attribute::Verify(true)));
        }
        let required = secret.at(STAGES - 1);
        assert!(!has(&required, &Attribute::Decrypt(false)));
        assert!(!has(&required, &Attribute::Modifiable(false)));
        assert!(!has(&public.at(STAGES - 1), &Attribute::Encrypt(false)));
    }

    /// SoftHSM gives a private key made from the required template decrypt, unwrap and
    /// sign-recover by default: cleared when the object is modifiable, recorded when not.
    #[test]
    fn usages_a_token_adds_are_cleared_where_it_allows_and_recorded_where_not() {
        let hsm = SoftHsm::new().unwrap();
        let session = session(&hsm);
        let spec = KeySpec::new(KeyType::EcdsaP256, None, None).unwrap();
        let expected = Expected::new(&spec, false);
        let (public, secret) = expected.templates(
            b"usage-test-1",
            b"t/one",
            vec![Attribute::EcParams(P256.to_vec())],
            vec![],
        );
        let last = STAGES - 1;
        let (p, s) = generate_at(
            &session,
            &Mechanism::EccKeyPairGen,
            Some(&public),
            &secret,
            last,
        )
        .unwrap();
        let defaults = usages_on(&session, s, PRIVATE_USAGES).unwrap();
        assert!(defaults.contains(&AttributeType::Decrypt), "{defaults:?}");
        let cleared = expected.inspect(&session, p, s).unwrap();
        assert_eq!(cleared.problem, None);
        assert_eq!(value(&cleared, "usages"), Some("sign"));
        assert_eq!(value(&cleared, "public_usages"), Some("verify"));
        assert_eq!(value(&cleared, "extra_usages"), None);
        assert_eq!(value(&cleared, "never_extractable"), Some("true"));

        let mut locked = secret.at(last);
        locked.push(Attribute::Modifiable(false));
        let (p, s) = session
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public.at(last), &locked)
            .unwrap();
        let recorded = expected.inspect(&session, Some(p), s).unwrap();
        assert_eq!(
            value(&recorded, "extra_usages"),
            Some("sign_recover+decrypt+unwrap"),
            "{:?}",
            recorded.attributes
        );
        assert_eq!(value(&recorded, "modifiable"), Some("false"));
        // Extra usages are recorded, not fatal; a key that is not sensitive is.
        assert_eq!(recorded.problem, None);

        let mut exposed: Vec<Attribute> = secret
            .at(last)
            .into_iter()
            .filter(|a| a.attribute_type() != AttributeType::Sensitive)
            .collect();
        exposed.push(Attribute::Sensitive(false));
        let (p, s) = session
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public.at(last), &exposed)
            .unwrap();
        let problem = expected.inspect(&session, Some(p), s).unwrap().problem;
        assert_eq!(
            problem.as_deref(),
            Some("CKA_SENSITIVE is false, CKA_ALWAYS_SENSITIVE is false")
        );
    }
}
