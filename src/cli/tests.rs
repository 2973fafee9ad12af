//! Argument parsing, exit codes and error reports of the command line, without running a
//! command.

use super::*;

#[test]
fn arguments_are_consistent() {
    use clap::CommandFactory;
    Args::command().debug_assert();
}

#[test]
fn a_replaced_token_object_is_an_integrity_failure() {
    let failure = Failure::from(keyhold::Error::KeyObjectMismatch {
        backend: "hsm".into(),
        key: "default/signer".into(),
        reason: "CKA_SENSITIVE is false".into(),
    });
    assert_eq!(failure.exit_code(), 6);
    assert_eq!(failure.kind(), "key_object_mismatch");
}

/// One failure of every kind there is: each `keyhold::Error` variant and each failure of the
/// command line's own, with the exit code and JSON `kind` docs/cli.md gives it.
fn every_failure() -> Vec<(Failure, u8, &'static str)> {
    use keyhold::Error as E;
    let io = || std::io::Error::other("no space left on device");
    let source = || -> Box<dyn std::error::Error + Send + Sync> { Box::new(io()) };
    let unavailable = || E::BackendUnavailable {
        backend: "tpm".into(),
        reason: "cannot reach the TPM".into(),
    };
    let no_such_backend = || E::NoSuchBackend {
        name: "hsm".into(),
        available: "software".into(),
    };
    let e = |error: E, code, kind| (Failure::from(error), code, kind);
    vec![
        e(
            E::KeyIdAuthentication { reason: "bad tag" },
            3,
            "key_id_authentication",
        ),
        e(
            E::NoSuchKey {
                namespace: "default".into(),
                name: "k".into(),
            },
            5,
            "no_such_key",
        ),
        e(
            E::WrongState {
                key: "default/k".into(),
                state: "suspended".into(),
                operation: "sign",
                hint: String::new(),
            },
            9,
            "wrong_state",
        ),
        e(
            E::StoreTampered {
                what: "key `default/k`: its record was deleted".into(),
            },
            10,
            "store_tampered",
        ),
        e(
            E::Unseal {
                reason: "wrong passphrase".into(),
            },
            4,
            "unseal",
        ),
        e(
            E::Integrity {
                what: "a record".into(),
            },
            6,
            "integrity",
        ),
        e(
            E::KeyObjectMismatch {
                backend: "hsm".into(),
                key: "default/k".into(),
                reason: "CKA_SENSITIVE is false".into(),
            },
            6,
            "key_object_mismatch",
        ),
        e(E::StoreNotFound { path: "/s".into() }, 1, "store_not_found"),
        e(E::StoreExists { path: "/s".into() }, 1, "store_exists"),
        e(
            E::StoreUnusable {
                path: "/s".into(),
                reason: "not a database".into(),
                source: None,
            },
            1,
            "store_unusable",
        ),
        e(
            E::KeyExists {
                namespace: "default".into(),
                name: "k".into(),
            },
            1,
            "key_exists",
        ),
        e(
            E::WrongPurpose {
                key: "default/k".into(),
                purpose: "sign",
                operation: "encrypt",
            },
            1,
            "wrong_purpose",
        ),
        e(
            E::Unsupported {
                backend: "tpm".into(),
                what: "ed25519".into(),
            },
            1,
            "unsupported",
        ),
        e(E::NotBuilt { feature: "tpm" }, 1, "not_built"),
        e(unavailable(), 7, "backend_unavailable"),
        e(
            E::Timeout {
                backend: "tpm".into(),
                waited: std::time::Duration::from_secs(120),
                what: "its turn on the TPM".into(),
            },
            7,
            "timeout",
        ),
        e(
            E::BackendLogin {
                backend: "hsm".into(),
                reason: "wrong PIN".into(),
            },
            7,
            "backend_login",
        ),
        e(
            E::Backend {
                backend: "hsm".into(),
                operation: "C_Sign".into(),
                source: source(),
            },
            1,
            "backend",
        ),
        e(E::Config("line 1".into()), 1, "config"),
        e(no_such_backend(), 1, "no_such_backend"),
        e(E::InvalidInput("input is empty".into()), 1, "invalid_input"),
        e(
            E::VerificationFailed { what: "tag" },
            1,
            "verification_failed",
        ),
        e(E::DecryptionFailed { reason: "x" }, 1, "decryption_failed"),
        e(E::Crypto { operation: "x" }, 1, "crypto"),
        e(
            E::ConsistencyTest {
                key_type: "ecdsa-p256",
            },
            1,
            "crypto",
        ),
        e(
            E::Storage {
                context: "x",
                source: source(),
            },
            1,
            "storage",
        ),
        e(
            E::Io {
                context: "cannot read x".into(),
                source: io(),
            },
            1,
            "io",
        ),
        // `--remote`: the service's errors keep the kind, and so the code, they had there.
        e(
            E::remote("wrong_state", 409, "key `default/k` is suspended".into()),
            9,
            "wrong_state",
        ),
        e(
            E::remote("forbidden", 403, "client `web` may not sign".into()),
            1,
            "remote",
        ),
        (Failure::Cli("cannot read x".into()), 1, "cli"),
        (Failure::Usage("pass --name web".into()), 2, "usage"),
        (Failure::NoSuchName("no such key".into()), 5, "no_such_key"),
        (Failure::Quiet, 1, "cli"),
        (
            Failure::Findings {
                code: 7,
                kind: "doctor_findings",
                summary: "1 backend unavailable".into(),
            },
            7,
            "doctor_findings",
        ),
        (
            Failure::Findings {
                code: 8,
                kind: "doctor_findings",
                summary: "1 key with missing objects".into(),
            },
            8,
            "doctor_findings",
        ),
        (
            Failure::Findings {
                code: 6,
                kind: "verify_findings",
                summary: "store verify found problems: 1 problem (records)".into(),
            },
            6,
            "verify_findings",
        ),
        (
            Failure::Findings {
                code: 7,
                kind: "verify_findings",
                summary: "store verify found problems: 1 unchecked".into(),
            },
            7,
            "verify_findings",
        ),
        // A hint appended changes neither the code nor the kind.
        (
            Failure::Hinted(Box::new(no_such_backend().into()), "looked for: …".into()),
            1,
            "no_such_backend",
        ),
        (
            Failure::Hinted(Box::new(unavailable().into()), "looked for: …".into()),
            7,
            "backend_unavailable",
        ),
    ]
}

/// The exit code(s) docs/cli.md gives each JSON error `kind`, read from its sentence "`code`
/// is the exit code and `kind` one of `usage` (2, …), …, and with exit 1 `cli`, …, `other`".
fn documented_kinds() -> std::collections::BTreeMap<String, Vec<u8>> {
    let docs = include_str!("../../docs/cli.md");
    let intro = "and `kind` one of";
    let start = docs.find(intro).expect("docs/cli.md lists the error kinds") + intro.len();
    let end = start
        + docs[start..]
            .find("`other`.")
            .expect("the list ends with `other`");
    let (coded, exit_one) = docs[start..end + "`other`".len()]
        .split_once("and with exit 1")
        .expect("the list says which kinds exit 1");
    let mut kinds = std::collections::BTreeMap::new();
    let mut pending: Vec<String> = Vec::new();
    let mut rest = coded;
    while let Some(at) = rest.find(['`', '(']) {
        if rest[at..].starts_with('(') {
            // `(2, also for clap's own errors)`, `(`doctor`'s 7 or 8)`: the codes of the
            // kinds named since the last parenthesis.
            let close = at + rest[at..].find(')').expect("a closing parenthesis");
            let codes: Vec<u8> = rest[at + 1..close]
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
            for kind in pending.drain(..) {
                kinds.insert(kind, codes.clone());
            }
            rest = &rest[close + 1..];
        } else {
            let close = at + 1 + rest[at + 1..].find('`').expect("a closing backtick");
            pending.push(rest[at + 1..close].to_owned());
            rest = &rest[close + 1..];
        }
    }
    assert!(
        pending.is_empty(),
        "kinds without a code in docs/cli.md: {pending:?}"
    );
    for kind in exit_one.split('`').skip(1).step_by(2) {
        kinds.insert(kind.to_owned(), vec![1]);
    }
    kinds
}

/// docs/cli.md's exit codes and JSON kinds, for every failure there is: each failure exits
/// with the code its kind is documented with, and reports that kind.
#[test]
fn every_failure_exits_with_its_documented_code_and_kind() {
    let documented = documented_kinds();
    // Spot checks that the sentence was read as meant, not vacuously.
    assert_eq!(documented.get("usage"), Some(&vec![2]));
    assert_eq!(documented.get("timeout"), Some(&vec![7]));
    assert_eq!(documented.get("doctor_findings"), Some(&vec![7, 8]));
    assert_eq!(documented.get("other"), Some(&vec![1]));

    let failures = every_failure();
    for (failure, code, kind) in &failures {
        assert_eq!(failure.exit_code(), *code, "{failure:?}");
        assert_eq!(failure.kind(), *kind, "{failure:?}");
        let codes = documented
            .get(*kind)
            .unwrap_or_else(|| panic!("kind `{kind}` is not in docs/cli.md"));
        assert!(
            codes.contains(code),
            "{failure:?}: docs/cli.md gives `{kind}` {codes:?}"
        );
    }
    // Every documented kind is produced by some failure; `other` is the fallback for
    // variants a later keyhold adds, which no failure of this one produces.
    for kind in documented.keys().filter(|k| *k != "other") {
        assert!(
            failures.iter().any(|(_, _, k)| k == kind),
            "docs/cli.md documents kind `{kind}`, which no failure produces"
        );
    }
    // And every exit code of the table, 0 (success, and a broken pipe) through 10.
    let mut codes: std::collections::BTreeSet<u8> =
        failures.iter().map(|(_, code, _)| *code).collect();
    assert_eq!(exit_code_of(&Ok(())), 0);
    assert_eq!(
        exit_code_of(&Err(Failure::Cli(io::BROKEN_PIPE.into()))),
        0,
        "a broken pipe is success"
    );
    codes.insert(0);
    assert_eq!(codes, (0..=10).collect());
    let docs = include_str!("../../docs/cli.md");
    for code in 0..=10 {
        assert!(
            docs.contains(&format!("\n| {code} | ")),
            "docs/cli.md's exit code table has no row {code}"
        );
    }
    // exit_code_of is the failure's code for everything else.
    for (failure, code, _) in failures {
        assert_eq!(exit_code_of(&Err(failure)), code);
    }
}

/// The list above names every variant of `keyhold::Error` (src/error.rs): a variant added
/// without a documented code fails here rather than exiting 1 as `other` unnoticed.
#[test]
fn every_error_variant_is_in_the_list() {
    let source = include_str!("../error.rs");
    let body = source
        .split_once("pub enum Error {")
        .and_then(|(_, rest)| rest.split_once("\n}\n"))
        .expect("src/error.rs defines `pub enum Error { … }`")
        .0;
    let variants: std::collections::BTreeSet<&str> = body
        .lines()
        .filter_map(|line| line.strip_prefix("    "))
        .filter(|line| line.starts_with(|c: char| c.is_ascii_uppercase()))
        .map(|line| {
            line.split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap_or(line)
        })
        .collect();
    assert!(variants.len() >= 20, "read too few variants: {variants:?}");
    let listed: std::collections::BTreeSet<String> = every_failure()
        .iter()
        .filter_map(|(failure, _, _)| match failure {
            Failure::Keyhold(e) => Some(format!("{e:?}")),
            _ => None,
        })
        .map(|debug| {
            debug
                .split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let missing: Vec<_> = variants.iter().filter(|v| !listed.contains(**v)).collect();
    assert!(
        missing.is_empty(),
        "keyhold::Error variants without a documented code: {missing:?}"
    );
}

/// With `--json` an error is `{"error":{"code","kind","message"}}`, the code the exit code.
#[test]
fn a_json_error_carries_the_exit_code_kind_and_message() {
    let failure = Failure::from(keyhold::Error::Integrity {
        what: "a record".into(),
    });
    let json = error_json(failure.exit_code(), failure.kind(), &failure.to_string());
    assert_eq!(
        json,
        serde_json::json!({"error": {
            "code": 6,
            "kind": "integrity",
            "message": "integrity check failed: a record: the store was modified outside \
                        keyhold; restore it from a backup",
        }})
    );
}
