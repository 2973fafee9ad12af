//! TPM helpers shared by tpm.rs and tpm_sealer.rs: a tap on the TPM bus, tpm2-tools runs (which
//! may fail on purpose), dictionary-attack lockout, and public areas read back by tpm2-tools.
//!
//! swtpm serves one connection at a time: no keyhold connection to the same TPM may be open while
//! these run tpm2-tools.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What one tpm2-tools command did.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the tpm2-tools command `args` against `tcti` in `dir`, then flushes every transient object
/// (tpm2-tools leaves each context it loads in the TPM, which holds about three).
pub fn tpm2(tcti: &str, dir: &Path, args: &[&str]) -> Ran {
    let ran = tpm2_unflushed(tcti, dir, args);
    let flushed = tpm2_unflushed(tcti, dir, &["tpm2_flushcontext", "-t"]);
    assert!(flushed.ok, "tpm2_flushcontext -t: {}", flushed.stderr);
    ran
}

/// Runs one tpm2-tools command (`args[0]`) on `tcti` in `dir`, leaving what it loaded loaded.
pub fn tpm2_unflushed(tcti: &str, dir: &Path, args: &[&str]) -> Ran {
    let mut cmd = std::process::Command::new(args[0]);
    cmd.args(&args[1..])
        .args(["-T", tcti])
        .env("TSS2_LOG", "all+none")
        .current_dir(dir);
    // swtpm serves one connection at a time: a keyhold connection left open would hang it.
    let out = super::env::run_command(cmd, None);
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// As [`tpm2_unflushed`], and panics unless the command succeeded; returns its stdout. swtpm
/// serves one connection at a time: no keyhold connection to the same TPM may be open meanwhile.
pub fn tpm2_tool(tcti: &str, dir: &Path, args: &[&str]) -> String {
    let ran = tpm2_unflushed(tcti, dir, args);
    assert!(ran.ok, "{args:?}: {}", ran.stderr);
    ran.stdout
}

/// As [`tpm2`], and panics unless the command succeeded; returns its stdout.
pub fn tpm2_ok(tcti: &str, dir: &Path, args: &[&str]) -> String {
    let ran = tpm2(tcti, dir, args);
    assert!(ran.ok, "{args:?}: {}", ran.stderr);
    ran.stdout
}

/// TPM_RC_LOCKOUT as tpm2-tools prints it.
pub const RC_LOCKOUT: &str = "(0x921)";

/// A DA-protected NV index and its password (neither is keyhold's).
const DA_INDEX: &str = "0x1500016";
const DA_PASSWORD: &str = "the right password";
/// A DA-protected signing key (no noDA) made by tpm2-tools, and its password.
const DA_KEY_PASSWORD: &str = "the key's password";

/// Makes keyhold's SRK with tpm2-tools as the README tells a user whose owner hierarchy has the
/// password `owner` to (saved as `srk.ctx` in `dir`), and returns its Name.
pub fn make_srk(tcti: &str, dir: &Path, owner: Option<&str>) -> Vec<u8> {
    let mut args = vec!["tpm2_createprimary", "-C", "o"];
    if let Some(password) = owner {
        args.extend(["-P", password]);
    }
    args.extend([
        "-G",
        "ecc256:aes128cfb",
        "-g",
        "sha256",
        "-a",
        "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
        "-c",
        "srk.ctx",
    ]);
    tpm2_ok(tcti, dir, &args);
    let out = tpm2_ok(tcti, dir, &["tpm2_readpublic", "-c", "srk.ctx"]);
    let name = out
        .lines()
        .find_map(|l| l.strip_prefix("name: "))
        .unwrap_or_else(|| panic!("no name in tpm2_readpublic output:\n{out}"));
    super::unhex(name.trim())
}

/// Makes keyhold's SRK with tpm2-tools (saved as `srk.ctx` in `dir`) and returns its Name.
pub fn tools_srk(tcti: &str, dir: &Path) -> Vec<u8> {
    make_srk(tcti, dir, None)
}

/// Drives the TPM into dictionary-attack lockout the way a password guesser would: defines a
/// DA-protected NV index and a DA-protected signing key with passwords, then presents a wrong
/// password to the index until the TPM answers TPM_RC_LOCKOUT. Returns how many wrong passwords
/// it took (swtpm's default MAX_AUTH_FAIL is 3).
pub fn drive_into_lockout(tcti: &str, dir: &Path) -> usize {
    tpm2_ok(
        tcti,
        dir,
        &[
            "tpm2_nvdefine",
            DA_INDEX,
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
            "-p",
            DA_PASSWORD,
        ],
    );
    tools_srk(tcti, dir);
    tpm2_ok(
        tcti,
        dir,
        &[
            "tpm2_create",
            "-C",
            "srk.ctx",
            "-G",
            "ecc256",
            "-p",
            DA_KEY_PASSWORD,
            "-u",
            "da-key.pub",
            "-r",
            "da-key.priv",
        ],
    );
    // The key signs before the lockout: what refuses it later is the lockout, nothing else.
    assert!(
        da_key_signs(tcti, dir).ok,
        "the DA-protected key does not sign"
    );
    for wrong in 1..=10 {
        let ran = read_da_index(tcti, dir, "a wrong guess");
        assert!(!ran.ok, "a wrong password was accepted");
        if ran.stderr.contains(RC_LOCKOUT) {
            return wrong;
        }
        // TPM_RC_AUTH_FAIL (0x98e): "the DA counter incremented".
        assert!(ran.stderr.contains("0x98E"), "{}", ran.stderr);
    }
    panic!("no lockout after 10 wrong passwords");
}

/// Reads the DA-protected NV index with `password`.
fn read_da_index(tcti: &str, dir: &Path, password: &str) -> Ran {
    tpm2(
        tcti,
        dir,
        &[
            "tpm2_nvread",
            DA_INDEX,
            "-C",
            DA_INDEX,
            "-P",
            password,
            "-s",
            "8",
        ],
    )
}

/// Loads `NAME.pub` and `NAME.priv` under `srk.ctx` and saves the context as `NAME.ctx`.
fn load(tcti: &str, dir: &Path, name: &str) {
    let [public, private, context] = ["pub", "priv", "ctx"].map(|ext| format!("{name}.{ext}"));
    tpm2_ok(
        tcti,
        dir,
        &[
            "tpm2_load",
            "-C",
            "srk.ctx",
            "-u",
            &public,
            "-r",
            &private,
            "-c",
            &context,
        ],
    );
}

fn da_key_signs(tcti: &str, dir: &Path) -> Ran {
    std::fs::write(dir.join("da-msg"), b"a message").expect("write da-msg");
    load(tcti, dir, "da-key");
    tpm2(
        tcti,
        dir,
        &[
            "tpm2_sign",
            "-c",
            "da-key.ctx",
            "-p",
            DA_KEY_PASSWORD,
            "-g",
            "sha256",
            "-o",
            "da-sig",
            "da-msg",
        ],
    )
}

/// Asserts that the TPM is in dictionary-attack lockout: DA-protected entities are refused with
/// TPM_RC_LOCKOUT even with the right password (the NV index, and a signing key like keyhold's
/// but without noDA), and TPM_PT_PERMANENT says inLockout.
pub fn assert_in_lockout(tcti: &str, dir: &Path) {
    let ran = read_da_index(tcti, dir, DA_PASSWORD);
    assert!(
        !ran.ok && ran.stderr.contains(RC_LOCKOUT),
        "the right password for the DA-protected index was not refused with TPM_RC_LOCKOUT: {}",
        ran.stderr
    );
    let ran = da_key_signs(tcti, dir);
    assert!(
        !ran.ok && ran.stderr.contains(RC_LOCKOUT),
        "the DA-protected key was not refused with TPM_RC_LOCKOUT: {}",
        ran.stderr
    );
    let props = tpm2_ok(tcti, dir, &["tpm2_getcap", "properties-variable"]);
    assert!(
        props
            .lines()
            .any(|l| l.split_whitespace().eq(["inLockout:", "1"])),
        "TPM_PT_PERMANENT does not say inLockout:\n{props}"
    );
}

/// The attribute flags (`fixedtpm`, `noda`, …) tpm2_readpublic reports for `public` (a marshalled
/// TPMT_PUBLIC) and `private` (the TPM2B_PRIVATE contents) loaded by tpm2-tools under keyhold's
/// SRK, which is checked to have the Name `srk_name`. The TPM refuses to load a public area that
/// is not the one the private part was made with, so these are the object's real attributes.
pub fn loaded_attributes(
    tcti: &str,
    dir: &Path,
    srk_name: &[u8],
    public: &[u8],
    private: &[u8],
) -> BTreeSet<String> {
    assert_eq!(
        tools_srk(tcti, dir),
        srk_name,
        "tpm2-tools made another SRK than keyhold's"
    );
    let sized = |part: &[u8]| {
        let mut out = u16::try_from(part.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(part);
        out
    };
    std::fs::write(dir.join("obj.pub"), sized(public)).expect("write obj.pub");
    std::fs::write(dir.join("obj.priv"), sized(private)).expect("write obj.priv");
    load(tcti, dir, "obj");
    attributes_of(&tpm2_ok(tcti, dir, &["tpm2_readpublic", "-c", "obj.ctx"]))
}

/// The attribute flags of the SRK tpm2-tools makes from keyhold's template.
pub fn srk_attributes(tcti: &str, dir: &Path) -> BTreeSet<String> {
    tools_srk(tcti, dir);
    attributes_of(&tpm2_ok(tcti, dir, &["tpm2_readpublic", "-c", "srk.ctx"]))
}

/// The `attributes: value: a|b|c` of tpm2_readpublic's YAML.
fn attributes_of(readpublic: &str) -> BTreeSet<String> {
    let mut lines = readpublic.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == "attributes:")
        .unwrap_or_else(|| panic!("no attributes in:\n{readpublic}"));
    let value = lines
        .next()
        .and_then(|l| l.trim().strip_prefix("value: "))
        .unwrap_or_else(|| panic!("no attribute value in:\n{readpublic}"));
    value.split('|').map(str::to_owned).collect()
}

/// A set of attribute flags, for comparisons.
pub fn flags(list: &str) -> BTreeSet<String> {
    list.split('|').map(str::to_owned).collect()
}

/// A relay between TPM clients and swtpm that records every byte on the command port, each
/// direction apart: what someone probing the TPM bus would see.
pub struct Tap {
    port: u16,
    to_tpm: Arc<Mutex<Vec<u8>>>,
    from_tpm: Arc<Mutex<Vec<u8>>>,
}

fn relay(mut from: TcpStream, mut to: TcpStream, seen: Option<Arc<Mutex<Vec<u8>>>>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(seen) = &seen {
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

type Seen = Option<(Arc<Mutex<Vec<u8>>>, Arc<Mutex<Vec<u8>>>)>;

fn serve(listener: TcpListener, target: u16, seen: Seen) {
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, target)) else {
                continue;
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (up, down) = match &seen {
                Some((up, down)) => (Some(Arc::clone(up)), Some(Arc::clone(down))),
                None => (None, None),
            };
            std::thread::spawn(move || relay(client, server, up));
            std::thread::spawn(move || relay(s2, c2, down));
        }
    });
}

impl Tap {
    /// A relay on two consecutive ports in front of the swtpm on `target` and `target + 1`. It
    /// holds its listening sockets from the start, so no one can take its ports afterwards.
    pub fn new(target: u16) -> Self {
        for _ in 0..50 {
            let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let port = first.local_addr().unwrap().port();
            let Some(Ok(second)) = port
                .checked_add(1)
                .map(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)))
            else {
                continue;
            };
            let to_tpm = Arc::new(Mutex::new(Vec::new()));
            let from_tpm = Arc::new(Mutex::new(Vec::new()));
            serve(
                first,
                target,
                Some((Arc::clone(&to_tpm), Arc::clone(&from_tpm))),
            );
            serve(second, target + 1, None);
            return Self {
                port,
                to_tpm,
                from_tpm,
            };
        }
        panic!("no two free consecutive ports for the tap");
    }

    /// The TCTI that reaches the TPM through the tap.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Forgets what was seen so far.
    pub fn clear(&self) {
        self.to_tpm.lock().unwrap().clear();
        self.from_tpm.lock().unwrap().clear();
    }

    /// Every byte sent to the TPM since the last [`Tap::clear`].
    pub fn sent(&self) -> Vec<u8> {
        self.to_tpm.lock().unwrap().clone()
    }

    /// Every byte the TPM answered since the last [`Tap::clear`].
    pub fn answered(&self) -> Vec<u8> {
        self.from_tpm.lock().unwrap().clone()
    }

    /// The command codes of the TPM commands sent since the last [`Tap::clear`].
    pub fn commands(&self) -> Vec<u32> {
        frames(&self.sent())
            .into_iter()
            .map(|(code, _)| code)
            .collect()
    }

    /// How many whole answers the TPM gave since the last [`Tap::clear`].
    pub fn answers(&self) -> usize {
        frames(&self.answered())
            .into_iter()
            .filter(|&(_, whole)| whole)
            .count()
    }

    /// The code of the command the TPM was sent and has not answered yet, if there is one.
    pub fn in_flight(&self) -> Option<u32> {
        let commands = self.commands();
        (commands.len() > self.answers())
            .then(|| commands.last().copied())
            .flatten()
    }
}

/// Each TPM command or response in `seen`: bytes 6..10 of its header (a command's code, a
/// response's code), and whether it arrived whole. Each is a 10-byte header, whose bytes 2..6
/// give its size, and its body.
fn frames(seen: &[u8]) -> Vec<(u32, bool)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 10 <= seen.len() {
        let word = |i: usize| u32::from_be_bytes(seen[i..i + 4].try_into().unwrap());
        let code = word(at + 6);
        at += usize::try_from(word(at + 2)).unwrap().max(10);
        out.push((code, at <= seen.len()));
    }
    out
}

/// Whether `seen` contains any 16-byte run of `secret`: finding none means no part of it long
/// enough to matter crossed in clear.
pub fn holds_any_part_of(seen: &[u8], secret: &[u8]) -> bool {
    let run = 16.min(secret.len());
    secret
        .windows(run)
        .any(|part| seen.windows(run).any(|w| w == part))
}

/// TPM command codes (TPM 2.0 Part 2, TPM_CC).
pub const CC_CREATE: u32 = 0x153;
pub const CC_UNSEAL: u32 = 0x15e;
pub const CC_HMAC: u32 = 0x155;

/// Seals `secret` under an SRK of keyhold's template and unseals it again over `tcti`, with
/// password sessions only, as a program without parameter encryption would: the control for the
/// bus tap. Returns what was unsealed; leaves nothing loaded.
pub fn seal_and_unseal_in_clear(tcti: &str, secret: &[u8]) -> Vec<u8> {
    use std::str::FromStr;
    use tss_esapi::attributes::ObjectAttributesBuilder;
    use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
    use tss_esapi::interface_types::resource_handles::Hierarchy;
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::structures::{
        Digest, KeyedHashScheme, PublicBuilder, PublicKeyedHashParameters, SensitiveData,
    };
    use tss_esapi::tcti_ldr::TctiNameConf;
    use tss_esapi::Context;

    let mut context = Context::new(TctiNameConf::from_str(tcti).unwrap()).unwrap();
    context.set_sessions((Some(AuthSession::Password), None, None));
    let srk = context
        .create_primary(
            Hierarchy::Owner,
            keyhold::backend::tpm::raw_templates::srk().unwrap(),
            None,
            None,
            None,
            None,
        )
        .unwrap()
        .key_handle;
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_user_with_auth(true)
        .build()
        .unwrap();
    let template = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .unwrap();
    let data = SensitiveData::try_from(secret.to_vec()).unwrap();
    let created = context
        .create(srk, template, None, Some(data), None, None)
        .unwrap();
    let object = context
        .load(srk, created.out_private, created.out_public)
        .unwrap();
    let unsealed = context.unseal(object.into()).unwrap().value().to_vec();
    context.flush_context(object.into()).unwrap();
    context.flush_context(srk.into()).unwrap();
    unsealed
}
