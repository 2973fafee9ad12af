//! What a token can make, from what it says about its mechanisms: `C_GetMechanismList` for
//! presence, `C_GetMechanismInfo` for the operations (flags) and key sizes of each.
//!
//! Nothing is tried here. The one property no flag tells, whether RSA-OAEP decrypts with SHA-256
//! and a label (SoftHSM 2.6 does SHA-1 only), is learned on the real key when one is made
//! (`Pkcs11Backend::generate`), and only that capability is then marked unsupported.

use cryptoki::context::Pkcs11;
use cryptoki::error::Error as CkError;
use cryptoki::mechanism::{MechanismInfo, MechanismType};
use cryptoki::slot::Slot;

use crate::key::{KeyType, Purpose};

/// An operation a mechanism must be flagged for.
#[derive(Debug, Clone, Copy)]
enum Op {
    GenerateKeyPair,
    Generate,
    Sign,
    Encrypt,
    Decrypt,
    Wrap,
}

impl Op {
    fn allowed(self, info: &MechanismInfo) -> bool {
        match self {
            Self::GenerateKeyPair => info.generate_key_pair(),
            Self::Generate => info.generate(),
            Self::Sign => info.sign(),
            Self::Encrypt => info.encrypt(),
            Self::Decrypt => info.decrypt(),
            Self::Wrap => info.wrap(),
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Self::GenerateKeyPair => "CKF_GENERATE_KEY_PAIR",
            Self::Generate => "CKF_GENERATE",
            Self::Sign => "CKF_SIGN",
            Self::Encrypt => "CKF_ENCRYPT",
            Self::Decrypt => "CKF_DECRYPT",
            Self::Wrap => "CKF_WRAP",
        }
    }
}

/// One mechanism a key type needs: for which operations, with which key size. Sizes are in the
/// mechanism's own unit (bits for RSA and EC, bytes for AES and HMAC keys, bits for generic
/// secret generation); tokens differ, so any of `sizes` in range will do.
struct Need {
    mechanism: MechanismType,
    ops: &'static [Op],
    sizes: &'static [usize],
}

const fn need(mechanism: MechanismType, ops: &'static [Op], sizes: &'static [usize]) -> Need {
    Need {
        mechanism,
        ops,
        sizes,
    }
}

/// What keyhold uses to make and use a key of `key_type` with `purpose` (messages are hashed in
/// software, so only the raw signature mechanisms are needed).
fn needs(key_type: KeyType, purpose: Purpose) -> Vec<Need> {
    use MechanismType as M;
    match key_type {
        KeyType::EcdsaP256 => vec![
            need(M::ECC_KEY_PAIR_GEN, &[Op::GenerateKeyPair], &[256]),
            need(M::ECDSA, &[Op::Sign], &[256]),
        ],
        KeyType::EcdsaP384 => vec![
            need(M::ECC_KEY_PAIR_GEN, &[Op::GenerateKeyPair], &[384]),
            need(M::ECDSA, &[Op::Sign], &[384]),
        ],
        // Ed25519 is 255 bits; SoftHSM reports its Edwards sizes as 256..456.
        KeyType::Ed25519 => vec![
            need(
                M::ECC_EDWARDS_KEY_PAIR_GEN,
                &[Op::GenerateKeyPair],
                &[255, 256],
            ),
            need(M::EDDSA, &[Op::Sign], &[255, 256]),
        ],
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            let bits: &'static [usize] = match key_type {
                KeyType::Rsa2048 => &[2048],
                KeyType::Rsa3072 => &[3072],
                _ => &[4096],
            };
            let mut list = vec![need(M::RSA_PKCS_KEY_PAIR_GEN, &[Op::GenerateKeyPair], bits)];
            if purpose == Purpose::Decrypt {
                list.push(need(M::RSA_PKCS_OAEP, &[Op::Decrypt], bits));
            } else {
                list.push(need(M::RSA_PKCS_PSS, &[Op::Sign], bits));
                list.push(need(M::RSA_PKCS, &[Op::Sign], bits));
            }
            list
        }
        KeyType::Aes256Gcm => vec![
            need(M::AES_KEY_GEN, &[Op::Generate], &[32, 256]),
            need(M::AES_GCM, &[Op::Encrypt, Op::Decrypt], &[32, 256]),
        ],
        KeyType::HmacSha256 => vec![
            need(M::GENERIC_SECRET_KEY_GEN, &[Op::Generate], &[256, 32]),
            need(M::SHA256_HMAC, &[Op::Sign], &[32, 256]),
        ],
    }
}

/// What the export of a key under a trusted key needs: `C_WrapKey` with RFC 5649 under an
/// AES-256 key (tokens give AES sizes in bytes; some in bits).
const WRAP: Need = need(MechanismType::AES_KEY_WRAP_PAD, &[Op::Wrap], &[32, 256]);

/// The token's mechanisms and what it says about each keyhold uses.
#[derive(Debug)]
pub(super) struct Mechanisms {
    list: Vec<MechanismType>,
    /// `C_GetMechanismInfo` of each listed mechanism keyhold needs (an error says why not).
    info: Vec<(MechanismType, Result<MechanismInfo, String>)>,
}

impl Mechanisms {
    /// Asks the token.
    ///
    /// # Errors
    /// `C_GetMechanismList`'s error. A failed `C_GetMechanismInfo` marks only the key types that
    /// need that mechanism.
    pub(super) fn read(module: &Pkcs11, slot: Slot) -> Result<Self, CkError> {
        let list = module.get_mechanism_list(slot)?;
        let mut info: Vec<(MechanismType, Result<MechanismInfo, String>)> = Vec::new();
        for key_type in KeyType::ALL {
            for &purpose in key_type.purposes() {
                for n in needs(key_type, purpose) {
                    if list.contains(&n.mechanism) && !info.iter().any(|(m, _)| *m == n.mechanism) {
                        info.push((n.mechanism, mechanism_info(module, slot, n.mechanism)));
                    }
                }
            }
        }
        Ok(Self { list, info })
    }

    /// Asks the token about the one mechanism an export needs (exports are rare: not asked
    /// with the others, when the backend first answers for its capabilities).
    ///
    /// # Errors
    /// `C_GetMechanismList`'s error; a failed `C_GetMechanismInfo` is reported by
    /// [`Self::check_wrap`].
    pub(super) fn read_wrap(module: &Pkcs11, slot: Slot) -> Result<Self, CkError> {
        let list = module.get_mechanism_list(slot)?;
        let mut info = Vec::new();
        if list.contains(&WRAP.mechanism) {
            info.push((WRAP.mechanism, mechanism_info(module, slot, WRAP.mechanism)));
        }
        Ok(Self { list, info })
    }

    /// `Ok` if the token wraps keys with RFC 5649 under an AES-256 key, else what it lacks (to
    /// follow "the token lacks").
    pub(super) fn check_wrap(&self) -> Result<(), String> {
        self.check_one(&WRAP)
    }

    /// `Ok` if the token can make and use `key_type` keys for `purpose`, else what it lacks
    /// (to follow "the token lacks").
    pub(super) fn check(&self, key_type: KeyType, purpose: Purpose) -> Result<(), String> {
        let mut lacks = Vec::new();
        for n in needs(key_type, purpose) {
            if let Err(what) = self.check_one(&n) {
                lacks.push(what);
            }
        }
        if lacks.is_empty() {
            Ok(())
        } else {
            Err(lacks.join(" and "))
        }
    }

    fn check_one(&self, n: &Need) -> Result<(), String> {
        let m = n.mechanism;
        if !self.list.contains(&m) {
            return Err(m.to_string());
        }
        let info = match self.info.iter().find(|(k, _)| *k == m).map(|(_, i)| i) {
            Some(Ok(info)) => info,
            Some(Err(why)) => return Err(format!("readable mechanism info for {m} ({why})")),
            None => return Err(format!("mechanism info for {m}")),
        };
        for op in n.ops {
            if !op.allowed(info) {
                return Err(format!("{m} with {} (its mechanism info)", op.flag()));
            }
        }
        let (min, max) = (info.min_key_size(), info.max_key_size());
        // 0..0: the token does not say (openCryptoki for CKM_SHA256_HMAC).
        let reported = min != 0 || max != 0;
        let fits = |s: usize| min <= s && (max == 0 || s <= max);
        if reported && !n.sizes.iter().any(|&s| fits(s)) {
            return Err(format!(
                "{m} with key size {} (it does {min} to {max})",
                n.sizes.first().copied().unwrap_or_default()
            ));
        }
        Ok(())
    }
}

/// `C_GetMechanismInfo` of `mechanism`, or why it could not be read.
fn mechanism_info(
    module: &Pkcs11,
    slot: Slot,
    mechanism: MechanismType,
) -> Result<MechanismInfo, String> {
    module
        .get_mechanism_info(slot, mechanism)
        .map_err(|e| match e {
            CkError::Pkcs11(rv, _) => format!("C_GetMechanismInfo: {rv:?}"),
            other => other.to_string(),
        })
}
