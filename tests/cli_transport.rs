//! Key transport on the command line (docs/cli.md, "Key transport"): `key export` and
//! `key import`, checked against OpenSSL both ways, into a real SoftHSM2 token, and refused
//! where they must be (not exportable, changed, wrong key, lifecycle state), leaving nothing
//! behind when they fail.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;
use support::{attribute_map, openssl};

/// OpenSSL's options for RSA-OAEP with SHA-256 and MGF1-SHA-256 (`CKM_RSA_AES_KEY_WRAP`'s).
const OAEP_SHA256: [&str; 6] = [
    "-pkeyopt",
    "rsa_padding_mode:oaep",
    "-pkeyopt",
    "rsa_oaep_md:sha256",
    "-pkeyopt",
    "rsa_mgf1_md:sha256",
];

/// `key export --key KEY --wrap-with KEK --out OUT`.
fn export_under<'a>(key: &'a str, kek: &'a str, out: &'a str) -> [&'a str; 8] {
    [
        "key",
        "export",
        "--key",
        key,
        "--wrap-with",
        kek,
        "--out",
        out,
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs openssl in the env's directory and asserts it succeeded.
fn openssl_ok(env: &Env, args: &[&str]) {
    let (ok, text) = openssl(env.dir.path(), args);
    assert!(ok, "openssl {args:?} failed: {text}");
}

/// `openssl enc` for RFC 5649 (AES key wrap with padding) under the 32-byte `kek`; `-iv
/// A65959A6` is RFC 5649's alternative initial value, which `openssl enc` wants spelled out.
fn openssl_kwp(env: &Env, decrypt: bool, kek: &[u8], input: &str, output: &str) {
    let key = hex(kek);
    let mut args = vec!["enc", "-id-aes256-wrap-pad", "-K", &key, "-iv", "A65959A6"];
    if decrypt {
        args.push("-d");
    }
    args.extend(["-in", input, "-out", output]);
    openssl_ok(env, &args);
}

/// OpenSSL's side of `CKM_RSA_AES_KEY_WRAP` with RSA-OAEP-SHA256: unwraps `wrapped` (a file)
/// with the RSA private key `private_pem` (2048-bit: 256 bytes of RSA ciphertext first).
fn openssl_rsa_aes_unwrap(env: &Env, private_pem: &str, wrapped: &str) -> Vec<u8> {
    let all = std::fs::read(env.file(wrapped)).unwrap();
    let rsa = env.write("rsa-part", &all[..256]);
    let kwp = env.write("kwp-part", &all[256..]);
    let mut args = vec!["pkeyutl", "-decrypt", "-inkey", private_pem];
    args.extend(OAEP_SHA256);
    args.extend(["-in", &rsa, "-out", "ephemeral"]);
    openssl_ok(env, &args);
    let ephemeral = std::fs::read(env.file("ephemeral")).unwrap();
    assert_eq!(ephemeral.len(), 32, "an AES-256 ephemeral key");
    openssl_kwp(env, true, &ephemeral, &kwp, "unwrapped");
    std::fs::read(env.file("unwrapped")).unwrap()
}

/// OpenSSL's side of `CKM_RSA_AES_KEY_WRAP` the other way: wraps the file `key` to the RSA
/// public key `public_pem` under a fresh AES-256 key; returns the path of the result.
fn openssl_rsa_aes_wrap(env: &Env, public_pem: &str, key: &str) -> String {
    let ephemeral: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let eph = env.write("eph", &ephemeral);
    let mut args = vec!["pkeyutl", "-encrypt", "-pubin", "-inkey", public_pem];
    args.extend(OAEP_SHA256);
    args.extend(["-in", &eph, "-out", "eph.rsa"]);
    openssl_ok(env, &args);
    openssl_kwp(env, false, &ephemeral, key, "key.kwp");
    let mut wrapped = std::fs::read(env.file("eph.rsa")).unwrap();
    wrapped.extend(std::fs::read(env.file("key.kwp")).unwrap());
    env.write("wrapped", &wrapped)
}

/// An RSA-2048 private key made by OpenSSL, in the env's directory as `name` (PEM).
fn openssl_rsa_key(env: &Env, name: &str) {
    let args = [
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        name,
    ];
    openssl_ok(env, &args);
}

/// A 32-byte key-encryption key both sides know: OpenSSL's as bytes, keyhold's imported from
/// them (bring your own key). Returns the bytes and the keyhold key's ID.
fn shared_kek(env: &Env) -> (Vec<u8>, String) {
    let kek: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(29).wrapping_add(3))
        .collect();
    let file = env.write("kek.bin", &kek);
    let id = env.ok_text(&[
        "key",
        "import",
        "kek",
        "--type",
        "aes-256-gcm",
        "--in",
        &file,
    ]);
    (kek, id.trim_end().to_owned())
}

/// `keyhold mac` of `data` with `id`, as bytes.
fn keyhold_tag(env: &Env, id: &str, data: &str) -> Vec<u8> {
    env.ok(
        &["mac", "--key", id, "--in", data, "--out", "-"],
        b"",
        "mac",
    )
}

/// `openssl dgst -hmac` of `data` under the raw key `key`, as bytes.
fn openssl_tag(env: &Env, key: &[u8], data: &str) -> Vec<u8> {
    let macopt = format!("hexkey:{}", hex(key));
    openssl_ok(
        env,
        &[
            "dgst", "-sha256", "-mac", "HMAC", "-macopt", &macopt, "-binary", "-out", "tag", data,
        ],
    );
    std::fs::read(env.file("tag")).unwrap()
}

/// Asserts that `key show` says the key `id` is in `backend` with these attributes.
#[cfg(any(feature = "pkcs11", feature = "tpm"))]
fn assert_imported_into(env: &Env, id: &str, backend: &str, attributes: &[(&str, &str)]) {
    let show = env.ok_text(&["key", "show", "--key", id]);
    assert_eq!(support::field(&show, "backend"), backend);
    let recorded = attribute_map(&show);
    for (name, value) in attributes {
        assert_eq!(
            recorded.get(*name).map(String::as_str),
            Some(*value),
            "{name}: {show}"
        );
    }
}

/// Keys of the namespace as `key list` names them.
fn key_names(env: &Env) -> Vec<String> {
    env.ok_text(&["key", "list"])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn an_hmac_key_exported_under_a_store_key_unwraps_in_openssl_to_the_same_key() {
    let env = Env::init();
    let (kek, kek_id) = shared_kek(&env);
    let mac = env.create_key("webhooks", "hmac-sha256", &["--exportable"]);
    let out = env.path_str("mac.kwp");
    env.ok_text(&export_under(&mac, &kek_id, &out));
    // RFC 5649: a 32-byte key wraps to 40 bytes, and OpenSSL unwraps it under the same KEK.
    assert_eq!(std::fs::read(&out).unwrap().len(), 40);
    openssl_kwp(&env, true, &kek, &out, "mac.key");
    let key = std::fs::read(env.file("mac.key")).unwrap();
    assert_eq!(key.len(), 32);
    let data = env.write("body", b"a webhook body");
    assert_eq!(
        openssl_tag(&env, &key, &data),
        keyhold_tag(&env, &mac, &data),
        "the exported key gives OpenSSL the tag keyhold computes"
    );
    // The export is a use of both keys, each in the audit log.
    let log = env.ok_text(&["audit", "show"]);
    assert!(
        log.lines()
            .any(|l| l.contains(" export outcome=ok ") && l.contains(&mac)),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(" wrap outcome=ok ") && l.contains(&kek_id)),
        "{log}"
    );
}

#[test]
fn openssl_wraps_an_hmac_key_under_the_shared_key_and_keyhold_imports_it() {
    let env = Env::init();
    let (kek, kek_id) = shared_kek(&env);
    let key: Vec<u8> = (0..32u8).map(|i| i ^ 0xa5).collect();
    let raw = env.write("hmac.key", &key);
    openssl_kwp(&env, false, &kek, &raw, "hmac.kwp");
    let wrapped = env.path_str("hmac.kwp");
    let id = env.ok_text(&[
        "key",
        "import",
        "partner",
        "--type",
        "hmac-sha256",
        "--in",
        &wrapped,
        "--unwrap-with",
        &kek_id,
    ]);
    let id = id.trim_end();
    let data = env.write("body", b"signed by the partner");
    assert_eq!(openssl_tag(&env, &key, &data), keyhold_tag(&env, id, &data));
    let show = env.ok_text(&["key", "show", "--key", id]);
    let attributes = attribute_map(&show);
    assert_eq!(
        attributes.get("origin").map(String::as_str),
        Some("imported")
    );
    assert_eq!(
        attributes.get("extractable"),
        None,
        "not exportable unless asked"
    );
}

#[test]
fn a_key_exported_to_an_openssl_rsa_key_signs_in_openssl_and_keyhold_verifies() {
    let env = Env::init();
    openssl_rsa_key(&env, "rcpt.pem");
    openssl_ok(
        &env,
        &["pkey", "-in", "rcpt.pem", "-pubout", "-out", "rcpt.pub"],
    );
    let signer = env.create_key("signer", "ecdsa-p256", &["--exportable"]);
    let rcpt = env.path_str("rcpt.pub");
    let out = env.path_str("signer.wrapped");
    env.ok_text(&[
        "key",
        "export",
        "--key",
        &signer,
        "--to-public",
        &rcpt,
        "--out",
        &out,
    ]);
    let pkcs8 = openssl_rsa_aes_unwrap(&env, &env.path_str("rcpt.pem"), "signer.wrapped");
    let der = env.write("signer.der", &pkcs8);
    let msg = env.write("msg", b"signed by openssl with keyhold's key");
    openssl_ok(
        &env,
        &[
            "dgst", "-sha256", "-sign", &der, "-keyform", "DER", "-out", "msg.sig", &msg,
        ],
    );
    let sig = env.path_str("msg.sig");
    env.ok_text(&[
        "verify",
        "--key",
        &signer,
        "--signature",
        &sig,
        "--in",
        &msg,
    ]);
}

#[test]
fn openssl_wraps_a_p384_key_to_a_keyhold_rsa_key_and_it_signs_as_the_original() {
    let env = Env::init();
    let unwrapper = env.create_key("unwrapper", "rsa-2048", &["--purpose", "decrypt"]);
    let public = env.write("unwrapper.pub", env.pubkey_pem(&unwrapper).as_bytes());
    openssl_ok(
        &env,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            "mine.pem",
        ],
    );
    openssl_ok(
        &env,
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "mine.pem", "-outform", "DER", "-out", "mine.p8",
        ],
    );
    let wrapped = openssl_rsa_aes_wrap(&env, &public, &env.path_str("mine.p8"));
    let id = env.ok_text(&[
        "key",
        "import",
        "mine",
        "--type",
        "ecdsa-p384",
        "--in",
        &wrapped,
        "--unwrap-with",
        &unwrapper,
    ]);
    let msg = env.write("msg", b"signed by keyhold with the imported key");
    let sig = env.path_str("msg.sig");
    env.ok_text(&["sign", "--key", id.trim_end(), "--in", &msg, "--out", &sig]);
    openssl_ok(
        &env,
        &["pkey", "-in", "mine.pem", "-pubout", "-out", "mine.pub"],
    );
    openssl_ok(
        &env,
        &[
            "dgst",
            "-sha384",
            "-verify",
            "mine.pub",
            "-signature",
            &sig,
            &msg,
        ],
    );
    // The same key, so the same public key.
    let (_, ours) = openssl(env.dir.path(), &["pkey", "-pubin", "-in", "mine.pub"]);
    assert_eq!(env.pubkey_pem(id.trim_end()), ours);
}

#[test]
fn a_pem_private_key_from_openssl_is_imported_as_is_and_signs() {
    let env = Env::init();
    openssl_ok(
        &env,
        &["genpkey", "-algorithm", "ed25519", "-out", "ed.pem"],
    );
    let pem = env.path_str("ed.pem");
    let id = env.ok_text(&["key", "import", "byok", "--type", "ed25519", "--in", &pem]);
    let msg = env.write("msg", b"bring your own key");
    let sig = env.path_str("msg.sig");
    env.ok_text(&["sign", "--key", id.trim_end(), "--in", &msg, "--out", &sig]);
    openssl_ok(
        &env,
        &[
            "pkeyutl", "-verify", "-inkey", "ed.pem", "-rawin", "-in", &msg, "-sigfile", &sig,
        ],
    );
    // A key of another type is refused, naming the type; so is a traditional EC PEM.
    let out = env.run(
        &[
            "key",
            "import",
            "wrong",
            "--type",
            "ecdsa-p256",
            "--in",
            &pem,
        ],
        b"",
    );
    assert_fail(
        &out,
        1,
        "is not a key of type ecdsa-p256",
        "ed25519 as ecdsa-p256",
    );
    openssl_ok(
        &env,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "sec1.pem",
        ],
    );
    let sec1 = env.path_str("sec1.pem");
    let out = env.run(
        &[
            "key",
            "import",
            "sec1",
            "--type",
            "ecdsa-p256",
            "--in",
            &sec1,
        ],
        b"",
    );
    assert_fail(&out, 1, "openssl pkcs8 -topk8 -nocrypt", "a SEC1 PEM");
    // A name taken is refused before anything is imported.
    let out = env.run(
        &["key", "import", "byok", "--type", "ed25519", "--in", &pem],
        b"",
    );
    assert_fail(
        &out,
        1,
        "a key named `default/byok` already exists",
        "a name taken",
    );
    assert_eq!(key_names(&env), vec!["byok".to_owned()]);
}

#[test]
fn a_key_not_created_exportable_does_not_leave() {
    let env = Env::init();
    let (_, kek_id) = shared_kek(&env);
    let key = env.create_key("stays", "aes-256-gcm", &[]);
    let out = env.path_str("never");
    let run = env.run(&export_under(&key, &kek_id, &out), b"");
    assert_fail(
        &run,
        1,
        "key `default/stays` is not exportable: only keys created or imported with --exportable",
        "export of a non-exportable key",
    );
    assert!(!env.file("never").exists(), "nothing was written");
    // Its public key still travels: an asymmetric non-exportable key's pubkey works.
    let signer = env.create_key("signer", "ecdsa-p256", &[]);
    env.pubkey_pem(&signer);
    let log = env.ok_text(&["audit", "show", "--key", &key]);
    assert!(log.contains(" export outcome=invalid_input "), "{log}");
}

#[test]
fn a_changed_wrapped_key_or_another_unwrap_key_is_refused_and_nothing_is_recorded() {
    let env = Env::init();
    let (kek, kek_id) = shared_kek(&env);
    let other = env.create_key("other", "aes-256-gcm", &[]);
    let raw = env.write("hmac.key", &[7u8; 32]);
    openssl_kwp(&env, false, &kek, &raw, "hmac.kwp");
    let mut wrapped = std::fs::read(env.file("hmac.kwp")).unwrap();
    let good = env.write("good.kwp", &wrapped);
    wrapped[5] ^= 0x01;
    let bent = env.write("bent.kwp", &wrapped);
    let before = key_names(&env);
    for (file, unwrap_with, what) in [
        (&bent, &kek_id, "a changed byte"),
        (&good, &other, "another key"),
    ] {
        let out = env.run(
            &[
                "key",
                "import",
                "in",
                "--type",
                "hmac-sha256",
                "--in",
                file,
                "--unwrap-with",
                unwrap_with,
            ],
            b"",
        );
        assert_fail(
            &out,
            1,
            "decryption failed: the wrapped key does not unwrap under this key",
            what,
        );
        assert_eq!(key_names(&env), before, "{what}: no key recorded");
        let id = env.run(&["key", "id", "in"], b"");
        assert_fail(&id, 5, "no key named `in`", what);
    }
    let log = env.ok_text(&["audit", "show"]);
    assert_eq!(
        log.matches(" import outcome=decryption_failed ").count(),
        2,
        "{log}"
    );
    // The good file under the right key imports.
    env.ok_text(&[
        "key",
        "import",
        "in",
        "--type",
        "hmac-sha256",
        "--in",
        &good,
        "--unwrap-with",
        &kek_id,
    ]);
}

#[test]
fn only_active_keys_export_and_wrap() {
    let env = Env::init();
    let (_, kek_id) = shared_kek(&env);
    let key = env.create_key("k", "hmac-sha256", &["--exportable"]);
    let export = |env: &Env| env.run(&export_under(&key, &kek_id, "-"), b"");
    // (state change, key, expected refusal, change back)
    let cases = [
        (
            "suspend",
            &key,
            "key `default/k` is suspended: it cannot be exported",
            Some("resume"),
        ),
        (
            "suspend",
            &kek_id,
            "key `default/kek` is suspended: it cannot wrap a key",
            Some("resume"),
        ),
        (
            "compromise",
            &key,
            "key `default/k` is compromised: it cannot be exported",
            None,
        ),
    ];
    for (change, id, refusal, back) in cases {
        env.ok_text(&["key", change, "--key", id]);
        assert_fail(&export(&env), 9, refusal, change);
        if let Some(back) = back {
            env.ok_text(&["key", back, "--key", id]);
        }
    }
    // A key whose destruction is scheduled does not leave either.
    let other = env.create_key("other", "hmac-sha256", &["--exportable"]);
    env.ok_text(&["key", "destroy", "--key", &other, "--after", "1d"]);
    let out = env.run(&export_under(&other, &kek_id, "-"), b"");
    assert_fail(
        &out,
        9,
        "key `default/other` is scheduled for destruction on ",
        "destroy scheduled",
    );
}

#[test]
fn key_ids_only_where_ids_go() {
    let env = Env::init();
    let key = env.create_key("k", "hmac-sha256", &["--exportable"]);
    let out = env.run(
        &[
            "key",
            "export",
            "--key",
            &key,
            "--wrap-with",
            "kek",
            "--out",
            "-",
        ],
        b"",
    );
    assert_fail(
        &out,
        2,
        "--wrap-with takes a key ID",
        "a name for --wrap-with",
    );
    let out = env.run(&["key", "export", "--key", &key, "--out", "-"], b"");
    assert_fail(&out, 2, "--wrap-with", "no wrapping named");
}

#[cfg(feature = "pkcs11")]
mod softhsm {
    use super::*;
    use keyhold::testing::SoftHsm;
    use support::pkcs11::raw_session;

    /// Every object on the token (labelled or not: SoftHSM 2.6 leaves unlabelled ones behind
    /// when it refuses an unwrap template).
    fn token_objects(hsm: &SoftHsm) -> usize {
        raw_session(hsm.label()).find_objects(&[]).unwrap().len()
    }

    #[test]
    fn a_software_key_moves_into_the_token_wrapped_and_signs_there_as_before() {
        let hsm = SoftHsm::new().unwrap();
        let env = Env::on_softhsm(&hsm);
        env.init_store();
        let kek = env.create_key("kek", "aes-256-gcm", &[]);
        let software = env.create_key("signer", "ecdsa-p256", &["--exportable"]);
        let out = env.path_str("signer.kwp");
        env.ok_text(&export_under(&software, &kek, &out));
        let id = env.ok_text(&[
            "key",
            "import",
            "in-token",
            "--type",
            "ecdsa-p256",
            "--in",
            &out,
            "--unwrap-with",
            &kek,
            "--backend",
            "hsm",
        ]);
        let id = id.trim_end();
        assert_imported_into(
            &env,
            id,
            "hsm",
            &[
                ("origin", "imported"),
                ("sensitive", "true"),
                ("extractable", "false"),
                ("always_sensitive", "false"),
                ("never_extractable", "false"),
                ("local", "false"),
                ("usages", "sign"),
            ],
        );
        // The same key: the token's signature verifies under the software key's public key,
        // and the token's public object is that key.
        assert_eq!(env.pubkey_pem(id), env.pubkey_pem(&software));
        let msg = env.write("msg", b"signed inside the token");
        let sig = env.path_str("msg.sig");
        env.ok_text(&["sign", "--key", id, "--in", &msg, "--out", &sig]);
        env.ok_text(&[
            "verify",
            "--key",
            &software,
            "--signature",
            &sig,
            "--in",
            &msg,
        ]);
        // Both halves on the token, nothing else: doctor finds no missing object and no orphan.
        assert_eq!(token_objects(&hsm), 2);
        env.ok_text(&["doctor"]);
    }

    /// The label of the wrapping key the SO provisions in these tests.
    const TRUSTED_LABEL: &str = "transport-kek";

    /// An AES-256 key with the known `value`, labelled `label`, made on the token as the given
    /// session makes it: a public token object with CKA_WRAP, sensitive and not extractable
    /// unless `readable`, CKA_TRUSTED only when `trusted` (which only an SO session may set:
    /// SoftHSM answers a user's with CKR_ATTRIBUTE_READ_ONLY), CKA_UNWRAP and CKA_DECRYPT only
    /// when `two_way`.
    fn make_wrapping_key(
        session: &cryptoki::session::Session,
        label: &str,
        value: &[u8],
        (trusted, readable, two_way): (bool, bool, bool),
    ) {
        use cryptoki::object::{Attribute, KeyType, ObjectClass};
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Sensitive(!readable),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(two_way),
            Attribute::Decrypt(two_way),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Value(value.to_vec()),
        ];
        if trusted {
            template.push(Attribute::Trusted(true));
        }
        session.create_object(&template).unwrap();
    }

    /// The security officer's part, done once before anything logs in as the user: the trusted
    /// wrapping key [`TRUSTED_LABEL`] with the value `kek`; two trusted keys labelled `twin` (a
    /// label that names no one key); and a trusted key whose value is readable (`readable`).
    /// SoftHSM lets the SO make only public objects (CKA_PRIVATE true: CKR_USER_NOT_LOGGED_IN).
    fn provision_as_so(hsm: &SoftHsm, kek: &[u8]) {
        let so = support::pkcs11::so_session(hsm.label());
        make_wrapping_key(&so, TRUSTED_LABEL, kek, (true, false, false));
        make_wrapping_key(&so, "twin", kek, (true, false, false));
        make_wrapping_key(&so, "twin", kek, (true, false, false));
        make_wrapping_key(&so, "readable", kek, (true, true, false));
        make_wrapping_key(&so, "two-way", kek, (true, false, true));
        so.logout().unwrap();
    }

    /// A store on a fresh token whose SO provisioned the trusted wrapping keys
    /// ([`provision_as_so`]) with the bytes of the store's software key `kek` ([`shared_kek`]):
    /// the token, the env, the bytes and the software key's ID.
    fn provisioned() -> (SoftHsm, Env, Vec<u8>, String) {
        let hsm = SoftHsm::new().unwrap();
        let env = Env::on_softhsm(&hsm);
        env.init_store();
        let (kek, kek_id) = shared_kek(&env);
        provision_as_so(&hsm, &kek);
        (hsm, env, kek, kek_id)
    }

    /// `key export --key KEY --wrap-with-trusted LABEL --out OUT`.
    fn export_trusted<'a>(key: &'a str, label: &'a str, out: &'a str) -> [&'a str; 8] {
        [
            "key",
            "export",
            "--key",
            key,
            "--wrap-with-trusted",
            label,
            "--out",
            out,
        ]
    }

    /// A token key of type `ty` made exportable and exported under [`TRUSTED_LABEL`]: its ID and
    /// the file holding it wrapped.
    fn exported_token_key(env: &Env, name: &str, ty: &str) -> (String, String) {
        let id = env.create_key(name, ty, &["--backend", "hsm", "--exportable"]);
        let out = env.path_str(&format!("{name}.kwp"));
        env.ok_text(&export_trusted(&id, TRUSTED_LABEL, &out));
        (id, out)
    }

    /// `key import NAME --type TY --in FILE --unwrap-with KEK --backend software`: the new ID.
    fn import_into_software(env: &Env, name: &str, ty: &str, file: &str, kek: &str) -> String {
        let id = env.ok_text(&[
            "key",
            "import",
            name,
            "--type",
            ty,
            "--in",
            file,
            "--unwrap-with",
            kek,
            "--backend",
            "software",
        ]);
        id.trim_end().to_owned()
    }

    /// SoftHSM2 → software: token keys made exportable leave the token wrapped inside it under
    /// the key the SO marked trusted, OpenSSL unwraps them under the KEK's bytes, and keyhold
    /// imports them into software under a software key of the same bytes: the same keys.
    #[test]
    fn token_keys_exported_under_the_so_trusted_key_are_the_same_keys_in_software() {
        let (hsm, env, kek, kek_id) = provisioned();
        let before = token_objects(&hsm);

        // An ECDSA P-256 signing key.
        let (signer, out) = exported_token_key(&env, "signer", "ecdsa-p256");
        // What OpenSSL unwraps is the key's PKCS#8, whose public key is the token key's.
        openssl_kwp(&env, true, &kek, &out, "signer.der");
        openssl_ok(
            &env,
            &[
                "pkey",
                "-inform",
                "DER",
                "-in",
                "signer.der",
                "-pubout",
                "-out",
                "signer.pub",
            ],
        );
        let (_, p8) = openssl(
            env.dir.path(),
            &["asn1parse", "-inform", "DER", "-in", "signer.der"],
        );
        assert!(
            p8.contains("id-ecPublicKey") && p8.contains("prime256v1"),
            "{p8}"
        );
        let pem = std::fs::read_to_string(env.file("signer.pub")).unwrap();
        assert_eq!(pem, env.pubkey_pem(&signer));
        let moved = import_into_software(&env, "moved-signer", "ecdsa-p256", &out, &kek_id);
        assert_imported_into(
            &env,
            &moved,
            "software (sealed by passphrase)",
            &[("origin", "imported")],
        );
        assert_eq!(env.pubkey_pem(&moved), env.pubkey_pem(&signer));
        // Each signs for the other.
        let msg = env.write("msg", b"signed on one side, verified on the other");
        for (signs, verifies) in [(&signer, &moved), (&moved, &signer)] {
            let sig = env.path_str("msg.sig");
            env.ok_text(&["sign", "--key", signs, "--in", &msg, "--out", &sig]);
            env.ok_text(&[
                "verify",
                "--key",
                verifies,
                "--signature",
                &sig,
                "--in",
                &msg,
            ]);
        }

        // An AES-256-GCM key.
        let (aes, out) = exported_token_key(&env, "sealer", "aes-256-gcm");
        assert_eq!(
            std::fs::read(&out).unwrap().len(),
            40,
            "RFC 5649 of 32 bytes"
        );
        openssl_kwp(&env, true, &kek, &out, "sealer.key");
        let raw = std::fs::read(env.file("sealer.key")).unwrap();
        assert_eq!(raw.len(), 32);
        let moved = import_into_software(&env, "moved-sealer", "aes-256-gcm", &out, &kek_id);
        let material = keyhold::testing::reveal_software_key(&env.store, PASS, &moved).unwrap();
        assert_eq!(material.material.expose(), &raw[..]);
        // An envelope names its key (its uuid is authenticated), so each key's envelope is
        // opened with the other key's bytes: the token's under the imported key's material,
        // the imported key's under the bytes the token exported.
        let plain = env.write("plain", b"sealed on one side, opened on the other");
        let sealed = env.path_str("sealed");
        env.ok_text(&["encrypt", "--key", &aes, "--in", &plain, "--out", &sealed]);
        let envelope = std::fs::read(&sealed).unwrap();
        assert_eq!(
            support::open_envelope(material.material.expose(), &envelope, b""),
            b"sealed on one side, opened on the other"
        );
        env.ok_text(&["encrypt", "--key", &moved, "--in", &plain, "--out", &sealed]);
        let envelope = std::fs::read(&sealed).unwrap();
        assert_eq!(
            support::open_envelope(&raw, &envelope, b""),
            b"sealed on one side, opened on the other"
        );

        // Each export is a use of the key in the audit log; the token's KEK is no store key.
        let log = env.ok_text(&["audit", "show"]);
        for key in [&signer, &aes] {
            assert!(
                log.lines()
                    .any(|l| l.contains(" export outcome=ok ") && l.contains(key.as_str())),
                "{log}"
            );
        }
        // The token holds what it held, plus the two keys (a pair and a secret key): the
        // export made nothing on it.
        assert_eq!(token_objects(&hsm), before + 3);
    }

    #[test]
    fn a_token_key_is_wrapped_only_under_a_trusted_key_and_each_refusal_says_why() {
        let (hsm, env, kek, software_kek) = provisioned();
        // A wrapping key made by someone with the user PIN: not trusted, whatever else it is.
        make_wrapping_key(
            &raw_session(hsm.label()),
            "user-kek",
            &kek,
            (false, false, false),
        );
        let token_kek = env.create_key("token-kek", "aes-256-gcm", &["--backend", "hsm"]);
        let key = env.create_key("k", "hmac-sha256", &["--backend", "hsm", "--exportable"]);
        let kept = env.create_key("kept", "hmac-sha256", &["--backend", "hsm"]);
        let software = env.create_key("soft", "hmac-sha256", &["--exportable"]);
        let rcpt = {
            openssl_rsa_key(&env, "rcpt.pem");
            openssl_ok(
                &env,
                &["pkey", "-in", "rcpt.pem", "-pubout", "-out", "rcpt.pub"],
            );
            env.path_str("rcpt.pub")
        };
        let out = env.path_str("refused.kwp");
        let before = (token_objects(&hsm), key_names(&env));
        let to_public = [
            "key",
            "export",
            "--key",
            &key,
            "--to-public",
            &rcpt,
            "--out",
            &out,
        ];
        let cases: [(&[&str], &str); 10] = [
            (
                &export_under(&key, &token_kek, &out),
                "backend `hsm` does not support wrapping its keys under a keyhold key: an \
                 exportable token key is wrappable only under a key the token's security \
                 officer marked trusted (CKA_WRAP_WITH_TRUSTED), which keyhold's own keys are \
                 not: export it with --wrap-with-trusted LABEL",
            ),
            (
                &export_under(&key, &software_kek, &out),
                "(a token key: with --wrap-with-trusted LABEL, under an AES-256 key on its \
                 token that the token's security officer made with CKA_WRAP and CKA_TRUSTED \
                 true)",
            ),
            (
                &to_public,
                "does not support wrapping its keys to a public key",
            ),
            (
                &export_trusted(&kept, TRUSTED_LABEL, &out),
                "key `default/kept` is not exportable",
            ),
            (
                &export_trusted(&key, "nope", &out),
                "no object labelled `nope` is on token",
            ),
            (
                &export_trusted(&key, "user-kek", &out),
                "no object labelled `user-kek` on token",
            ),
            (
                &export_trusted(&key, "twin", &out),
                "2 trusted wrapping keys are labelled `twin` on token",
            ),
            (
                &export_trusted(&key, "readable", &out),
                "can be read or taken out of the token (it is not CKA_SENSITIVE, or is \
                 CKA_EXTRACTABLE): a key wrapped under it would be as good as in clear",
            ),
            // Review: a trusted key that also unwraps (or decrypts) lets anyone with the user
            // PIN unwrap the export back into the token as a readable key.
            (
                &export_trusted(&key, "two-way", &out),
                "also unwraps or decrypts (CKA_UNWRAP or CKA_DECRYPT): whoever has the user PIN \
                 could unwrap what is wrapped under it back into the token as a readable key",
            ),
            (
                &export_trusted(&software, TRUSTED_LABEL, &out),
                "backend `software` does not support wrapping under a token's trusted key",
            ),
        ];
        for (args, needle) in cases {
            let run = env.run(args, b"");
            assert_fail(&run, 1, needle, &format!("{args:?}"));
            assert!(!std::path::Path::new(&out).exists(), "{args:?}: no output");
        }
        // The untrusted key is refused for what it lacks, and the SO is named.
        let run = env.run(&export_trusted(&key, "user-kek", &out), b"");
        assert_fail(
            &run,
            1,
            "is a trusted wrapping key: CKA_TRUSTED is not true (only the security officer can \
             set it); the token's security officer makes it once: an AES-256 secret key",
            "untrusted wrapping key",
        );
        // An empty label is a usage error, before the store is opened.
        let run = env.run(&export_trusted(&key, "", &out), b"");
        assert_fail(
            &run,
            2,
            "--wrap-with-trusted takes the CKA_LABEL",
            "empty label",
        );
        // Nothing changed on the token or in the store; each refused export is in the log.
        assert_eq!((token_objects(&hsm), key_names(&env)), before);
        let log = env.ok_text(&["audit", "show", "--key", &key]);
        assert!(
            log.lines()
                .filter(|l| l.contains(" export outcome=") && !l.contains("outcome=ok"))
                .count()
                >= 7,
            "{log}"
        );
        // And the key still leaves under the trusted key.
        env.ok_text(&export_trusted(&key, TRUSTED_LABEL, &out));
        openssl_kwp(&env, true, &kek, &out, "k.key");
        let data = env.write("body", b"a body");
        let raw = std::fs::read(env.file("k.key")).unwrap();
        assert_eq!(
            openssl_tag(&env, &raw, &data),
            keyhold_tag(&env, &key, &data)
        );
    }

    #[test]
    fn an_import_the_token_refuses_leaves_no_record_and_no_object() {
        let hsm = SoftHsm::new().unwrap();
        let env = Env::on_softhsm(&hsm);
        env.init_store();
        openssl_rsa_key(&env, "r.pem");
        openssl_ok(
            &env,
            &["genpkey", "-algorithm", "ed25519", "-out", "ed.pem"],
        );
        let rsa = env.path_str("r.pem");
        let ed = env.path_str("ed.pem");
        // SoftHSM 2.6 does RSA-OAEP with SHA-1 only (the new key's check finds it) and does not
        // unwrap Ed25519 PKCS#8.
        for (args, needle) in [
            (
                vec!["--type", "rsa-2048", "--purpose", "decrypt", "--in", &rsa],
                "lacks CKM_RSA_PKCS_OAEP with SHA-256",
            ),
            (
                vec!["--type", "ed25519", "--in", &ed],
                "does not support importing ed25519 keys: token",
            ),
            (
                vec!["--type", "rsa-2048", "--in", &rsa, "--exportable"],
                "does not support exportable imported keys",
            ),
        ] {
            let mut cmd = vec!["key", "import", "refused", "--backend", "hsm"];
            cmd.extend(args.iter().copied());
            let out = env.run(&cmd, b"");
            assert_fail(&out, 1, needle, &format!("{cmd:?}"));
            assert!(key_names(&env).is_empty(), "{cmd:?}: nothing recorded");
            assert_eq!(token_objects(&hsm), 0, "{cmd:?}: nothing left on the token");
        }
        env.ok_text(&["doctor"]);
    }
}

#[cfg(feature = "tpm")]
mod tpm {
    use super::*;
    use keyhold::testing::Swtpm;

    /// OpenSSL → TPM: a P-256 key made by OpenSSL is imported into swtpm (TPM2_Import), signs
    /// there, and OpenSSL verifies with the original's public key.
    #[test]
    fn an_openssl_key_imported_into_the_tpm_signs_for_openssl() {
        let tpm = Swtpm::new().unwrap();
        let config = format!(
            "[backends.tpm]\ntype = \"tpm\"\ntcti = \"{}\"\n",
            tpm.tcti()
        );
        let env = Env::new()
            .with_config(&config)
            .with_var("TSS2_LOG", "all+none");
        env.init_store();
        openssl_ok(
            &env,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ec.pem",
            ],
        );
        let pem = env.path_str("ec.pem");
        let id = env.ok_text(&[
            "key",
            "import",
            "edge",
            "--type",
            "ecdsa-p256",
            "--in",
            &pem,
            "--backend",
            "tpm",
        ]);
        let id = id.trim_end();
        assert_imported_into(
            &env,
            id,
            "tpm",
            &[("origin", "imported"), ("fixed_tpm", "false")],
        );
        let msg = env.write("msg", b"signed inside the TPM");
        let sig = env.path_str("msg.sig");
        env.ok_text(&["sign", "--key", id, "--in", &msg, "--out", &sig]);
        openssl_ok(
            &env,
            &["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub"],
        );
        openssl_ok(
            &env,
            &[
                "dgst",
                "-sha256",
                "-verify",
                "ec.pub",
                "-signature",
                &sig,
                &msg,
            ],
        );
    }
}
