//! Lowercase hexadecimal, for identifiers and locators shown to people. Never for secrets in logs.

/// Encodes bytes as lowercase hex.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Decodes lowercase or uppercase hex; `None` for odd lengths or other characters.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    // from_str_radix alone would accept a leading `+`.
    if text.len() % 2 != 0 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes() {
        assert_eq!(super::encode(&[0x00, 0x9f, 0xff]), "009fff");
        assert_eq!(super::encode(&[]), "");
    }

    #[test]
    fn decodes() {
        assert_eq!(super::decode("009fFF"), Some(vec![0x00, 0x9f, 0xff]));
        assert_eq!(super::decode(""), Some(vec![]));
        for bad in ["0", "0g", "+1", "é0"] {
            assert_eq!(super::decode(bad), None, "{bad}");
        }
    }
}
