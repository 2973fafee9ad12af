//! The CLI contract of docs/cli.md, against the real binary in temp stores: The configuration file: where it is looked for, and a backend's fallback to software.
//!
//! Each test builds its own store (Argon2 at the documented minimum, 19 MiB / 2 iterations)
//! through the shared harness (tests/support/env.rs), drives `keyhold` as a subprocess, and checks
//! exit codes, stdout formats and stderr messages exactly; failures must leave the store
//! byte-for-byte unchanged.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use support::env::*;

/// The message for a backend the configuration lacks says which file was read.
fn assert_read_from(o: &std::process::Output, path: &std::path::Path) {
    let says = format!("configuration read from {} (looked for: ", path.display());
    assert!(stderr(o).contains(&says), "expected {says:?}\n{}", show(o));
}

#[test]
fn configuration_file_default_locations_and_where_they_were_looked_for() {
    let env = Env::init();
    // Here even in remote mode: where this process looked for a configuration is what it
    // shows, and through `keyhold serve` the backends are the service's.
    let env = env.local_only("it shows where the command itself looked for its configuration");
    let home = env.dir.path();
    let xdg = home.join("xdg");
    let write = |path: &std::path::Path, text: &str| {
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, text).expect("write a config");
    };
    let bad = "[software]\nkey_cache_secs = \"soon\"\n";
    let good = "[software]\nkey_cache_secs = 0\n";
    let home_config = home.join(".config/keyhold/config.toml");
    let xdg_config = xdg.join("keyhold/config.toml");
    let env_config = home.join("env.toml");
    let flag_config = home.join("flag.toml");
    let run = |extra: &[&str], xdg_set: bool, env_set: bool| {
        let mut args = extra.to_vec();
        args.extend(["key", "create", "k", "--type", "ed25519"]);
        args.extend(["--backend", "hsm"]);
        env.run_with(&args, Some(b""), |c| {
            if xdg_set {
                c.env("XDG_CONFIG_HOME", &xdg);
            }
            if env_set {
                c.env("KEYHOLD_CONFIG", &env_config);
            }
        })
    };
    // No file anywhere: the message lists every place looked at.
    let o = run(&[], false, false);
    assert_fail(&o, 1, "no backend named `hsm`", "no configuration");
    let expected = format!(
        "no configuration file was found, so only the built-in `software` backend exists (looked \
         for: --config (not given), $KEYHOLD_CONFIG (unset), {}, /etc/keyhold/config.toml)",
        home_config.display()
    );
    assert!(
        stderr(&o).contains(&expected),
        "expected {expected:?}\n{}",
        show(&o)
    );

    // ~/.config/keyhold/config.toml is read when XDG_CONFIG_HOME is unset.
    write(&home_config, good);
    assert_read_from(&run(&[], false, false), &home_config);
    write(&home_config, bad);
    let o = run(&[], false, false);
    assert_fail(
        &o,
        1,
        &format!("{}: line 2, column 18", home_config.display()),
        "~/.config read",
    );
    // $XDG_CONFIG_HOME/keyhold/config.toml replaces ~/.config.
    write(&xdg_config, good);
    assert_read_from(&run(&[], true, false), &xdg_config);
    // $KEYHOLD_CONFIG comes before both, and must exist.
    let o = run(&[], true, true);
    assert_fail(
        &o,
        1,
        &format!("cannot read {}", env_config.display()),
        "$KEYHOLD_CONFIG missing",
    );
    write(&env_config, good);
    let o = run(&[], true, true);
    assert!(
        stderr(&o).contains(&format!(
            "configuration read from {} (looked for: $KEYHOLD_CONFIG={})",
            env_config.display(),
            env_config.display()
        )),
        "{}",
        show(&o)
    );
    // --config comes before everything.
    write(&flag_config, bad);
    let flag = flag_config.to_str().expect("UTF-8 path");
    let o = run(&["--config", flag], true, true);
    assert_fail(
        &o,
        1,
        &format!("{flag}: line 2, column 18"),
        "--config read",
    );
}

/// A SoftHSM2 token that cannot make RSA decryption keys (SoftHSM 2.6 has no OAEP-SHA256), with
/// `fallback = "software"`: the key is made in software, and every output says so.
#[test]
#[cfg(feature = "pkcs11")]
fn a_fallback_to_software_is_warned_reported_in_json_and_marked_in_list() {
    use keyhold::testing::SoftHsm;
    let hsm = SoftHsm::new().expect("a SoftHSM2 token");
    let env = Env::new().with_softhsm(
        keyhold::testing::SOFTHSM_MODULE,
        hsm.label(),
        keyhold::testing::TEST_USER_PIN,
        "fallback = \"software\"\n",
    );
    env.init_store();
    let run = |args: &[&str], adjust: &dyn Fn(&mut std::process::Command)| {
        env.run_with(args, Some(b""), adjust)
    };
    // `key create NAME` of a type the token lacks, after `global` options.
    let create_dec = |global: &[&str], name: &str, adjust: &dyn Fn(&mut std::process::Command)| {
        let mut args = global.to_vec();
        args.extend([
            "key",
            "create",
            name,
            "--type",
            "rsa-2048",
            "--purpose",
            "decrypt",
        ]);
        args.extend(["--backend", "hsm"]);
        run(&args, adjust)
    };
    let o = create_dec(&[], "dec", &|_| {});
    assert_ok(&o, "create with a fallback");
    let id = parse_id_line(&o.stdout, "create with a fallback");
    let warning: Vec<String> = stderr(&o).lines().map(str::to_owned).collect();
    assert_eq!(warning.len(), 1, "expected one warning line\n{}", show(&o));
    assert!(
        warning[0].contains("WARN")
            && warning[0].contains("backend `hsm` cannot make rsa-2048 keys for decrypt (")
            && warning[0].contains("OAEP")
            && warning[0].contains("key `default/dec` was created in the software backend instead"),
        "{}",
        show(&o)
    );

    // --json says so, with the reason.
    let o = create_dec(&["--json"], "dec2", &|_| {});
    assert_ok(&o, "create --json with a fallback");
    let v = parse_json(&o.stdout, "create --json");
    assert_eq!(v["backend"].as_str(), Some("software"), "{v:?}");
    let fallback = v
        .get("fallback")
        .unwrap_or_else(|| panic!("no `fallback` in {v:?}"));
    assert_eq!(fallback["for"].as_str(), Some("hsm"), "{v:?}");
    assert!(
        fallback["reason"]
            .as_str()
            .is_some_and(|r| r.contains("OAEP")),
        "{v:?}"
    );

    // key list marks it; a key the token made is not marked.
    let o = run(
        &[
            "key",
            "create",
            "sig",
            "--type",
            "ecdsa-p256",
            "--backend",
            "hsm",
        ],
        &|_| {},
    );
    assert_ok(&o, "a token key");
    assert!(o.stderr.is_empty(), "no fallback, no warning\n{}", show(&o));
    let o = run(&["key", "list"], &|_| {});
    assert_ok(&o, "key list");
    let rows: Vec<Vec<String>> = stdout_str(&o)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let backend_of = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .map(|r| r[3].clone())
            .unwrap_or_else(|| panic!("no row {name} in\n{}", stdout_str(&o)))
    };
    assert_eq!(backend_of("dec"), "software(fallback:hsm)");
    assert_eq!(backend_of("sig"), "hsm");
    assert!(
        rows.iter().all(|r| r.len() == 6),
        "six columns\n{}",
        stdout_str(&o)
    );
    // Without the configuration, using the token's key says where the configuration was looked
    // for.
    let mut cmd = env.bare_command();
    cmd.arg("--store")
        .arg(&env.store)
        .args(["sign", "--name", "sig", "--out", "-"]);
    let o = env.run_cmd(cmd, Some(b"msg"));
    assert_fail(
        &o,
        1,
        "no backend named `hsm`",
        "a token key without the configuration",
    );
    assert!(
        stderr(&o).contains(
            "no configuration file was found, so only the built-in `software` \
             backend exists (looked for: --config (not given), $KEYHOLD_CONFIG (unset), "
        ),
        "{}",
        show(&o)
    );
    // key show --json: the documented key object, `fallback` and `attributes` included, for
    // the fallback key and for a key the token made (attributes reported by the token).
    for (name, fallback_for) in [("dec", Some("hsm")), ("sig", None)] {
        let text = run(&["key", "show", "--name", name], &|_| {});
        assert_ok(&text, "key show");
        let o = run(&["--json", "key", "show", "--name", name], &|_| {});
        assert_ok(&o, "key show --json");
        let v = parse_json(&o.stdout, "key show --json");
        let ctx = format!("key show --json of {name}");
        assert_key_object(&v, &stdout_str(&text), fallback_for, &ctx);
        if fallback_for.is_none() {
            assert_eq!(v["attributes"]["never_extractable"], "true", "{ctx}: {v}");
        }
    }
    // key show --json carries `fallback` too, and every attribute, sorted.
    let o = run(&["--json", "key", "show", "--key", &id], &|_| {});
    let v = parse_json(&o.stdout, "show --json");
    assert_eq!(
        v.get("fallback").and_then(|f| f["for"].as_str()),
        Some("hsm"),
        "{v:?}"
    );
    // …with the reason, recorded at creation (not re-derived from today's token).
    assert!(
        v.get("fallback")
            .and_then(|f| f["reason"].as_str())
            .is_some_and(|r| r.contains("OAEP")),
        "{v:?}"
    );
    let o = run(&["key", "show", "--name", "sig"], &|_| {});
    let text = stdout_str(&o);
    // One `attribute NAME: VALUE` line each, in the order shown.
    let attributes: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("attribute "))
        .collect();
    let names: Vec<&str> = attributes
        .iter()
        .filter_map(|a| a.split_once(": "))
        .map(|(k, _)| k)
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert!(
        names.len() >= 2 && names == sorted,
        "attributes sorted: {attributes:?}"
    );
    let o = run(&["--json", "key", "show", "--name", "sig"], &|_| {});
    let v = parse_json(&o.stdout, "show --json");
    let Some(members) = v.get("attributes").and_then(|a| a.as_object()) else {
        panic!("attributes object in {v:?}")
    };
    let json_names: Vec<&str> = members.keys().map(String::as_str).collect();
    assert_eq!(json_names, names, "the JSON attributes are the text's");
    // serde_json's map sorts its keys: the order keyhold wrote them in is read from the text.
    let text = stdout_str(&o);
    let at: Vec<usize> = names
        .iter()
        .map(|n| {
            text.find(&format!("\"{n}\":"))
                .unwrap_or_else(|| panic!("no {n:?} in {text}"))
        })
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "the JSON attributes are in the text's order: {text}"
    );

    // Logging: RUST_LOG=off and -q silence the warning; -v adds info lines.
    let o = create_dec(&[], "dec3", &|c| {
        c.env("RUST_LOG", "off");
    });
    assert_ok(&o, "RUST_LOG=off");
    assert!(
        o.stderr.is_empty(),
        "RUST_LOG=off: expected nothing on stderr\n{}",
        show(&o)
    );
    let o = create_dec(&["-q"], "dec4", &|_| {});
    assert_ok(&o, "-q");
    assert!(
        o.stderr.is_empty(),
        "-q: expected nothing on stderr\n{}",
        show(&o)
    );
    let o = run(&["-q", "key", "show", "--key", "dec"], &|_| {});
    assert_fail(&o, 2, "is not a key ID", "-q keeps errors");
    let o = create_dec(&["-v"], "dec5", &|c| {
        c.env("RUST_LOG", "off");
    });
    assert_ok(&o, "-v");
    assert!(
        stderr(&o).contains(" INFO "),
        "-v: expected info lines (over RUST_LOG=off)\n{}",
        show(&o)
    );
}
