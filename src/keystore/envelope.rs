//! The self-describing envelope `encrypt` produces and `decrypt` takes.
//!
//! ```text
//! "KHE1" | algorithm u8 | key uuid [16] | key version u32 BE | nonce length u8 | nonce | body
//! ```
//! The header up to the key version (25 bytes) is authenticated: it prefixes the caller's AAD in
//! AES-GCM and in the RSA-OAEP label, so an envelope moved to another key or re-labelled fails.

use crate::error::{Error, Result};
use crate::key::Algorithm;

/// The RSA-OAEP label of an envelope whose header and AAD are `binding`:
/// `"KHL1:" ‖ base64url(SHA-256(binding)) ‖ 0x00`, 49 bytes.
///
/// Not `binding` itself: a TPM takes a label only if it ends in 0x00 and fits in 64 bytes, and the
/// label must be the same whichever backend holds the key. The digest binds the header and AAD as
/// firmly as the whole would.
pub(crate) fn oaep_label(binding: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, binding);
    let mut label = b"KHL1:".to_vec();
    label.extend_from_slice(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(digest.as_ref())
            .as_bytes(),
    );
    label.push(0);
    label
}

const MAGIC: &[u8; 4] = b"KHE1";
const HEADER_LEN: usize = 4 + 1 + 16 + 4;

/// The authenticated part of an envelope's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub algorithm: Algorithm,
    pub uuid: [u8; 16],
    pub version: u32,
}

impl Header {
    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4] = algorithm_code(self.algorithm);
        out[5..21].copy_from_slice(&self.uuid);
        out[21..25].copy_from_slice(&self.version.to_be_bytes());
        out
    }

    /// The bytes authenticated with the ciphertext: the header, then the caller's AAD.
    pub(crate) fn aad(self, user_aad: &[u8]) -> Vec<u8> {
        let mut aad = self.to_bytes().to_vec();
        aad.extend_from_slice(user_aad);
        aad
    }
}

fn algorithm_code(algorithm: Algorithm) -> u8 {
    match algorithm {
        Algorithm::Aes256Gcm => 1,
        Algorithm::RsaOaepSha256 => 2,
        // Only encrypting algorithms make envelopes; the keystore never asks for another.
        _ => 0,
    }
}

/// A parsed envelope.
#[derive(Debug)]
pub(crate) struct Envelope<'a> {
    pub header: Header,
    pub nonce: &'a [u8],
    pub body: &'a [u8],
}

/// Writes an envelope.
pub(crate) fn encode(header: Header, nonce: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 1 + nonce.len() + body.len());
    out.extend_from_slice(&header.to_bytes());
    // Nonces are 12 bytes (GCM) or empty (OAEP).
    out.push(nonce.len() as u8);
    out.extend_from_slice(nonce);
    out.extend_from_slice(body);
    out
}

/// Writes an envelope around `body`, reusing its buffer: no second copy of a large ciphertext
/// when the buffer has room for the header and nonce (see `backend::ENVELOPE_ROOM`).
pub(crate) fn encode_into(header: Header, nonce: &[u8], mut body: Vec<u8>) -> Vec<u8> {
    let mut prefix = [0u8; HEADER_LEN + 1 + 255];
    prefix[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    prefix[HEADER_LEN] = nonce.len() as u8;
    let end = HEADER_LEN + 1 + nonce.len();
    prefix[HEADER_LEN + 1..end].copy_from_slice(nonce);
    body.splice(0..0, prefix[..end].iter().copied());
    body
}

/// Reads an envelope, checking only its framing (authentication is the decryption's job).
///
/// # Errors
/// [`Error::DecryptionFailed`] naming the framing problem.
pub(crate) fn decode(bytes: &[u8]) -> Result<Envelope<'_>> {
    let fail = |reason| Error::DecryptionFailed { reason };
    if bytes.len() < HEADER_LEN + 1 || &bytes[..4] != MAGIC {
        return Err(fail(
            "the input is not a keyhold envelope (or it is truncated)",
        ));
    }
    let algorithm = match bytes[4] {
        1 => Algorithm::Aes256Gcm,
        2 => Algorithm::RsaOaepSha256,
        _ => return Err(fail("the envelope names an unknown algorithm")),
    };
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&bytes[5..21]);
    let mut version = [0u8; 4];
    version.copy_from_slice(&bytes[21..25]);
    let nonce_len = usize::from(bytes[HEADER_LEN]);
    let expected_nonce = match algorithm {
        Algorithm::Aes256Gcm => 12,
        _ => 0,
    };
    if nonce_len != expected_nonce {
        return Err(fail(
            "the envelope's nonce length does not fit its algorithm",
        ));
    }
    let rest = &bytes[HEADER_LEN + 1..];
    let (nonce, body) = rest
        .split_at_checked(nonce_len)
        .ok_or(fail("the envelope is truncated"))?;
    if body.is_empty() {
        return Err(fail("the envelope is truncated"));
    }
    Ok(Envelope {
        header: Header {
            algorithm,
            uuid,
            version: u32::from_be_bytes(version),
        },
        nonce,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let header = Header {
            algorithm: Algorithm::Aes256Gcm,
            uuid: [3; 16],
            version: 1,
        };
        let bytes = encode(header, &[9; 12], b"body and tag");
        let env = decode(&bytes).unwrap();
        assert_eq!(env.header, header);
        assert_eq!(env.nonce, &[9; 12]);
        assert_eq!(env.body, b"body and tag");
        for cut in 0..HEADER_LEN + 1 + 12 {
            let err = decode(&bytes[..cut]).err();
            assert!(
                matches!(&err, Some(Error::DecryptionFailed { reason }) if reason.contains("truncated")),
                "cut at {cut}: {err:?}"
            );
        }
    }
}
