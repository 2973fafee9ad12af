//! Break-glass recovery shares: the root secret split with Shamir's secret sharing (vsss-rs, over
//! GF(256) in constant time), each share written as text a person can copy, with a checksum that
//! catches a typo and the store it belongs to.
//!
//! A share's text is `khs1-` followed by the hex of, in this order: the format version (1), the
//! share's index (its x, 1 to 255), the threshold, the first 8 bytes of the store ID, a 4-byte
//! split ID (random per `recovery split`, so that shares of two splits are not mixed), the 32
//! bytes of the share itself, and the first 4 bytes of SHA-256 over the domain string and all of
//! the above. The hex is grouped by 8 characters with `-` between groups; when read back, `-` and
//! spaces are ignored and either case is accepted.
//!
//! Any `threshold` shares give the root secret; fewer tell nothing about it. A share is as
//! powerful as the root secret once `threshold - 1` others are known: keep them apart.

use std::fmt;

use aws_lc_rs::digest;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::sealer::RootSecret;
use crate::secret::SecretBytes;

/// What every share's text begins with.
pub const PREFIX: &str = "khs1-";
const VERSION: u8 = 1;
const CHECK_DOMAIN: &[u8] = b"keyhold recovery share v1\0";
const STORE_PREFIX_LEN: usize = 8;
const SPLIT_ID_LEN: usize = 4;
const CHECK_LEN: usize = 4;
/// version, index, threshold, store prefix, split ID.
const HEADER_LEN: usize = 3 + STORE_PREFIX_LEN + SPLIT_ID_LEN;
const ENCODED_LEN: usize = HEADER_LEN + RootSecret::LEN + CHECK_LEN;

/// The most shares one split makes (GF(256) has 255 non-zero points).
pub const MAX_SHARES: u8 = 255;

/// One share of a store's root secret.
pub struct Share {
    index: u8,
    threshold: u8,
    store_prefix: [u8; STORE_PREFIX_LEN],
    split_id: [u8; SPLIT_ID_LEN],
    value: SecretBytes,
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share")
            .field("index", &self.index)
            .field("threshold", &self.threshold)
            .field("value", &"[REDACTED]")
            .finish()
    }
}

/// The RNG vsss-rs draws its polynomial coefficients from: aws-lc's CSPRNG, as everything else in
/// keyhold. An RNG failure cannot be returned through vsss-rs's infallible interface: it is
/// recorded and the split is refused once vsss-rs returns.
struct AwsLcRng {
    failed: bool,
}

impl rand_core::TryRng for AwsLcRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> std::result::Result<u32, Self::Error> {
        let mut bytes = [0u8; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> std::result::Result<u64, Self::Error> {
        let mut bytes = [0u8; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> std::result::Result<(), Self::Error> {
        if aws_lc_rs::rand::fill(dst).is_err() {
            self.failed = true;
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for AwsLcRng {}

fn checksum(body: &[u8]) -> [u8; CHECK_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(CHECK_DOMAIN);
    ctx.update(body);
    let mut check = [0u8; CHECK_LEN];
    check.copy_from_slice(&ctx.finish().as_ref()[..CHECK_LEN]);
    check
}

/// Splits `root` of the store `store_id` into `shares` shares, any `threshold` of which rebuild it.
///
/// # Errors
/// [`Error::InvalidInput`] unless `2 <= threshold <= shares <= 255`; [`Error::Crypto`] if the RNG
/// or the sharing fails.
pub fn split(
    root: &RootSecret,
    store_id: &[u8; 16],
    shares: u8,
    threshold: u8,
) -> Result<Vec<Share>> {
    if threshold < 2 {
        return Err(Error::InvalidInput(format!(
            "the threshold must be at least 2, not {threshold}: with 1, every share would be the \
             root secret itself"
        )));
    }
    if shares < threshold {
        return Err(Error::InvalidInput(format!(
            "{shares} shares with a threshold of {threshold} could never be combined: make at \
             least as many shares as the threshold"
        )));
    }
    let mut split_id = [0u8; SPLIT_ID_LEN];
    aws_lc_rs::rand::fill(&mut split_id).map_err(|_| Error::crypto("make a split ID"))?;
    let mut rng = AwsLcRng { failed: false };
    let ids = (1..=shares).map(|x| vsss_rs::IdentifierGf256(vsss_rs::Gf256(x)));
    let made = vsss_rs::Gf256::split_bytes_with_participant_ids_iter(
        usize::from(threshold),
        usize::from(shares),
        root.expose(),
        &mut rng,
        ids,
    )
    .map_err(|_| Error::crypto("split the root secret"))?;
    // vsss-rs returns plain vectors: each is copied into a locked, zeroizing buffer and wiped.
    let made: Vec<Zeroizing<Vec<u8>>> = made.into_iter().map(Zeroizing::new).collect();
    if rng.failed {
        return Err(Error::crypto("random generation"));
    }
    let mut store_prefix = [0u8; STORE_PREFIX_LEN];
    store_prefix.copy_from_slice(&store_id[..STORE_PREFIX_LEN]);
    made.iter()
        .map(|bytes| match bytes.split_first() {
            Some((&index, value)) if value.len() == RootSecret::LEN => Ok(Share {
                index,
                threshold,
                store_prefix,
                split_id,
                value: SecretBytes::copy_from(value),
            }),
            _ => Err(Error::crypto("split the root secret")),
        })
        .collect()
}

impl Share {
    /// The share's index (1 to 255).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// How many shares rebuild the root secret.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// The share as text (see the module's documentation), in a zeroizing string.
    pub fn encode(&self) -> Zeroizing<String> {
        let mut body = Zeroizing::new(Vec::with_capacity(ENCODED_LEN));
        body.extend_from_slice(&[VERSION, self.index, self.threshold]);
        body.extend_from_slice(&self.store_prefix);
        body.extend_from_slice(&self.split_id);
        body.extend_from_slice(self.value.expose());
        let check = checksum(&body);
        body.extend_from_slice(&check);
        let mut text = Zeroizing::new(String::with_capacity(PREFIX.len() + ENCODED_LEN * 9 / 4));
        text.push_str(PREFIX);
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (i, byte) in body.iter().enumerate() {
            if i > 0 && i % 4 == 0 {
                text.push('-');
            }
            text.push(char::from(DIGITS[usize::from(byte >> 4)]));
            text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        text
    }

    /// Reads a share's text; `which` names it in errors (`share 2`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `which` for text that is not a keyhold share, or whose
    /// checksum does not match (a typo).
    pub fn parse(text: &str, which: &str) -> Result<Self> {
        let text = text.trim();
        let Some(rest) = text
            .get(..PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(PREFIX))
            .and_then(|_| text.get(PREFIX.len()..))
        else {
            return Err(Error::InvalidInput(format!(
                "{which} is not a keyhold recovery share: shares begin with `{PREFIX}`"
            )));
        };
        let mut body = Zeroizing::new(Vec::with_capacity(ENCODED_LEN));
        let mut high: Option<u8> = None;
        for c in rest.chars().filter(|c| *c != '-' && !c.is_whitespace()) {
            let Some(nibble) = c.to_digit(16).and_then(|d| u8::try_from(d).ok()) else {
                return Err(Error::InvalidInput(format!(
                    "{which} has a character that is not a hex digit: check it for a typo"
                )));
            };
            match high.take() {
                None => high = Some(nibble),
                Some(h) => body.push(h << 4 | nibble),
            }
        }
        if high.is_some() || body.len() != ENCODED_LEN {
            return Err(Error::InvalidInput(format!(
                "{which} has {} hex digits, a share has {}: a digit is missing or one too many",
                body.len() * 2 + usize::from(high.is_some()),
                ENCODED_LEN * 2
            )));
        }
        let (content, check) = body.split_at(ENCODED_LEN - CHECK_LEN);
        if checksum(content)[..] != check[..] {
            return Err(Error::InvalidInput(format!(
                "{which} is mistyped: its checksum does not match; check it digit by digit"
            )));
        }
        if content[0] != VERSION {
            return Err(Error::InvalidInput(format!(
                "{which} is of share format {}, which this keyhold does not read",
                content[0]
            )));
        }
        let mut store_prefix = [0u8; STORE_PREFIX_LEN];
        store_prefix.copy_from_slice(&content[3..3 + STORE_PREFIX_LEN]);
        let mut split_id = [0u8; SPLIT_ID_LEN];
        split_id.copy_from_slice(&content[3 + STORE_PREFIX_LEN..HEADER_LEN]);
        Ok(Self {
            index: content[1],
            threshold: content[2],
            store_prefix,
            split_id,
            value: SecretBytes::copy_from(&content[HEADER_LEN..]),
        })
    }
}

/// Rebuilds the root secret of the store `store_id` from `shares` (named `share 1`, … in the order
/// given). The result is not yet checked against the store: the caller does that.
///
/// # Errors
/// [`Error::InvalidInput`] for a share of another store or another split, the same share twice,
/// or fewer shares than the threshold; [`Error::Crypto`] if the combination fails.
pub fn combine(shares: &[Share], store_id: &[u8; 16]) -> Result<RootSecret> {
    let Some(first) = shares.first() else {
        return Err(Error::InvalidInput("no recovery share was given".into()));
    };
    for (n, share) in shares.iter().enumerate() {
        let which = n + 1;
        if share.store_prefix[..] != store_id[..STORE_PREFIX_LEN] {
            return Err(Error::InvalidInput(format!(
                "share {which} belongs to another store (store id {}…, this store is {}…): \
                 use the shares printed by `keyhold recovery split` for this store",
                crate::hex::encode(&share.store_prefix),
                crate::hex::encode(&store_id[..STORE_PREFIX_LEN])
            )));
        }
        if share.split_id != first.split_id || share.threshold != first.threshold {
            return Err(Error::InvalidInput(format!(
                "share {which} comes from another `keyhold recovery split` of this store than \
                 share 1: shares of different splits do not combine; use shares of one split"
            )));
        }
        if let Some(earlier) = shares[..n].iter().position(|s| s.index == share.index) {
            return Err(Error::InvalidInput(format!(
                "share {which} is share {} again (the same share as share {}): give {} \
                 different shares",
                share.index,
                earlier + 1,
                first.threshold
            )));
        }
    }
    if shares.len() < usize::from(first.threshold) {
        let given = shares.len();
        return Err(Error::InvalidInput(format!(
            "{given} share{} given, but these shares need {} to rebuild the root secret",
            if given == 1 { "" } else { "s" },
            first.threshold
        )));
    }
    // Exactly `threshold` shares: more would be combined the same way, for nothing.
    let points: Vec<Vec<u8>> = shares[..usize::from(first.threshold)]
        .iter()
        .map(|share| {
            let mut point = Vec::with_capacity(1 + RootSecret::LEN);
            point.push(share.index);
            point.extend_from_slice(share.value.expose());
            point
        })
        .collect();
    let points = Zeroizing::new(points);
    let combined = vsss_rs::Gf256::combine_bytes(&points[..])
        .map(Zeroizing::new)
        .map_err(|_| Error::crypto("combine the recovery shares"))?;
    RootSecret::from_bytes(SecretBytes::copy_from(&combined))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const STORE: [u8; 16] = [7; 16];

    fn texts(shares: &[Share]) -> Vec<String> {
        shares.iter().map(|s| s.encode().to_string()).collect()
    }

    fn parsed(texts: &[&String]) -> Vec<Share> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Share::parse(t, &format!("share {}", i + 1)).unwrap())
            .collect()
    }

    fn message(err: Error) -> String {
        match err {
            Error::InvalidInput(m) => m,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn any_threshold_shares_rebuild_the_root_and_fewer_are_refused() {
        let root = RootSecret::generate().unwrap();
        let t = texts(&split(&root, &STORE, 5, 3).unwrap());
        assert!(t.iter().all(|s| s.starts_with(PREFIX)), "{t:?}");
        for pick in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let shares = parsed(&pick.map(|i| &t[i]));
            assert_eq!(combine(&shares, &STORE).unwrap().expose(), root.expose());
        }
        let err = message(combine(&parsed(&[&t[0], &t[1]]), &STORE).unwrap_err());
        assert_eq!(
            err,
            "2 shares given, but these shares need 3 to rebuild the root secret"
        );
        // Case and grouping do not matter when read back.
        let loose = t[3].to_uppercase().replace('-', " ").replacen(' ', "-", 1);
        let shares = parsed(&[&t[0], &loose, &t[4]]);
        assert_eq!(combine(&shares, &STORE).unwrap().expose(), root.expose());
    }

    #[test]
    fn a_typo_another_store_another_split_and_a_repeat_are_named() {
        let root = RootSecret::generate().unwrap();
        let t = texts(&split(&root, &STORE, 3, 2).unwrap());
        // One digit changed in the share's value: the checksum catches it.
        let at = t[1].len() - 20;
        let digit = if &t[1][at..=at] == "0" { "1" } else { "0" };
        let typo = format!("{}{digit}{}", &t[1][..at], &t[1][at + 1..]);
        assert_ne!(typo, t[1]);
        let err = message(Share::parse(&typo, "share 2").unwrap_err());
        assert!(err.starts_with("share 2 is mistyped"), "{err}");
        let short = &t[1][..t[1].len() - 1];
        let err = message(Share::parse(short, "share 2").unwrap_err());
        assert!(err.contains("a digit is missing"), "{err}");

        let other = texts(&split(&root, &[8; 16], 3, 2).unwrap());
        let err = message(combine(&parsed(&[&t[0], &other[1]]), &STORE).unwrap_err());
        assert!(err.starts_with("share 2 belongs to another store"), "{err}");

        let again = texts(&split(&root, &STORE, 3, 2).unwrap());
        let err = message(combine(&parsed(&[&t[0], &again[1]]), &STORE).unwrap_err());
        assert!(err.contains("another `keyhold recovery split`"), "{err}");

        let err = message(combine(&parsed(&[&t[2], &t[2]]), &STORE).unwrap_err());
        assert!(
            err.starts_with("share 2 is share 3 again (the same share as share 1)"),
            "{err}"
        );
    }

    #[test]
    fn bad_parameters_and_debug_output_say_nothing_secret() {
        let root = RootSecret::generate().unwrap();
        assert!(message(split(&root, &STORE, 3, 1).unwrap_err()).contains("at least 2"));
        assert!(message(split(&root, &STORE, 2, 3).unwrap_err()).contains("could never"));
        let shares = split(&root, &STORE, 2, 2).unwrap();
        let debug = format!("{shares:?}");
        assert!(debug.contains("[REDACTED]"), "{debug}");
        let value = crate::hex::encode(shares[0].value.expose());
        assert!(!debug.contains(&value), "{debug}");
    }
}
