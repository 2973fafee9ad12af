//! docs/cli.md, "Input limit": `decrypt` takes envelopes of up to 64 MiB + 1 KiB, "so that the
//! envelope of a 64 MiB plaintext decrypts", through the real binary. (tests/cli_io.rs checks
//! that 64 MiB is accepted by sign and verify, and that a larger envelope is refused.)
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

/// The envelope's framing around an AES-256-GCM ciphertext (docs/cli.md, "Envelope"): "KHE1",
/// the algorithm, the key's uuid, its version, the nonce length, a 12-byte nonce, the 16-byte tag.
const AES_FRAMING: usize = 4 + 1 + 16 + 4 + 1 + 12 + 16;

/// A plaintext of exactly the 64 MiB limit is encrypted, and its envelope (larger than the
/// limit by its framing) decrypts back to it, from a file to a file and from stdin to stdout.
#[test]
fn the_envelope_of_a_64_mib_plaintext_decrypts() {
    let env = Env::init();
    let aes = env.create_key("aes", "aes-256-gcm", &[]);
    let plain = pseudo_random(LIMIT, 0x64);
    let plain_path = env.write("plain", &plain);
    let envelope_path = env.path_str("envelope");
    let aad = ["--aad", "64 MiB"];
    let encrypt = [
        &[
            "encrypt",
            "--key",
            &aes,
            "--in",
            &plain_path,
            "--out",
            &envelope_path,
        ][..],
        &aad,
    ]
    .concat();
    env.ok(&encrypt, b"", "encrypt exactly 64 MiB");
    let envelope = std::fs::read(&envelope_path).unwrap();
    assert_eq!(envelope.len(), LIMIT + AES_FRAMING, "the envelope's length");

    let back_path = env.path_str("back");
    let decrypt = [
        &[
            "decrypt",
            "--key",
            &aes,
            "--in",
            &envelope_path,
            "--out",
            &back_path,
        ][..],
        &aad,
    ]
    .concat();
    env.ok(
        &decrypt,
        b"",
        "decrypt the envelope of 64 MiB, file to file",
    );
    assert!(
        std::fs::read(&back_path).unwrap() == plain,
        "decrypt (file to file) did not give the plaintext back"
    );

    let decrypt = [&["decrypt", "--key", &aes][..], &aad].concat();
    let out = env.ok(
        &decrypt,
        &envelope,
        "decrypt the envelope of 64 MiB, stdin to stdout",
    );
    assert!(
        out == plain,
        "decrypt (stdin to stdout) did not give the plaintext back ({} bytes)",
        out.len()
    );
}
