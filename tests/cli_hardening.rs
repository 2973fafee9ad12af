//! The `keyhold` process itself (README, threat model): it is not dumpable and writes no core
//! files (`RLIMIT_CORE` 0, hard), observed from outside on a live process that has unsealed its
//! store and waits for its input; and secrets (passphrases, PINs, plaintexts) never reach its
//! logs or messages, at the most verbose log level, in any encoding.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::env::*;

/// How long the test waits for keyhold to reach its input, or to finish: generous, a loaded
/// two-core machine unseals a store (Argon2) in well under a minute.
const WAIT: Duration = Duration::from_secs(120);

/// The user keyhold runs as, and the owner a dumpable process's `/proc/PID` entries have.
#[derive(Debug, Clone, Copy)]
struct User {
    uid: u32,
    gid: u32,
}

impl User {
    /// Root cannot tell a non-dumpable process by who owns its `/proc/PID` entries (they are
    /// root's either way), so as root keyhold runs as `nobody`; anyone else runs it as themselves.
    fn for_keyhold() -> Self {
        let me = File::open("/proc/self").unwrap().metadata().unwrap();
        if me.uid() != 0 {
            return Self {
                uid: me.uid(),
                gid: me.gid(),
            };
        }
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let fields: Vec<&str> = passwd
            .lines()
            .find(|l| l.starts_with("nobody:"))
            .expect("a `nobody` user in /etc/passwd, to run keyhold unprivileged")
            .split(':')
            .collect();
        Self {
            uid: fields[2].parse().unwrap(),
            gid: fields[3].parse().unwrap(),
        }
    }

    fn apply(self, cmd: &mut Command) {
        cmd.uid(self.uid).gid(self.gid);
    }

    /// Makes `path` this user's (a no-op when it already is).
    fn own(self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).unwrap();
    }
}

/// A core file limit other than 0 for the processes this test starts, so that keyhold's 0 is
/// its own doing and not inherited. Raising the hard limit needs root; otherwise the soft limit
/// goes up to the hard one, which must not be 0 then.
fn allow_core_files() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Core);
    let wanted = Rlimit {
        current: Some(1 << 20),
        maximum: None,
    };
    if setrlimit(Resource::Core, wanted).is_err() {
        let hard = now.maximum;
        assert_ne!(
            hard,
            Some(0),
            "this test cannot check RLIMIT_CORE: its own hard limit is 0 and it is not root, so \
             every child would start with 0 whatever keyhold does"
        );
        setrlimit(
            Resource::Core,
            Rlimit {
                current: hard,
                maximum: hard,
            },
        )
        .unwrap();
    }
    getrlimit(Resource::Core)
        .current
        .map_or(u64::MAX, |limit| limit)
}

/// A copy of the keyhold binary in a directory every user can search, and that directory.
fn binary_others_can_run() -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("keyhold-bin-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("keyhold");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, bin)
}

/// `Max core file size` of process `pid` as /proc/PID/limits shows it: (soft, hard).
fn core_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max core file size"))
        .unwrap_or_else(|| panic!("no core file size in /proc/{pid}/limits:\n{limits}"));
    let mut fields = line.split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

/// The owner of /proc/PID/status, and the real uid the process runs as (its `Uid:` line).
fn proc_owner_and_uid(pid: u32) -> (u32, u32) {
    let path = format!("/proc/{pid}/status");
    let owner = std::fs::metadata(&path).unwrap().uid();
    let status = std::fs::read_to_string(&path).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .unwrap_or_else(|| panic!("no Uid: line in {path}:\n{status}"))
        .parse()
        .unwrap();
    (owner, uid)
}

/// Opens the FIFO `path` for writing once its reader has opened it, failing the test if `child`
/// exits first (it would never read) or does not get there within [`WAIT`].
fn open_when_read(path: &Path, child: &mut Child) -> File {
    use rustix::fs::{Mode, OFlags};
    let deadline = Instant::now() + WAIT;
    loop {
        // Non-blocking: ENXIO until a reader has the FIFO open.
        match rustix::fs::open(path, OFlags::WRONLY | OFlags::NONBLOCK, Mode::empty()) {
            Ok(fd) => return File::from(fd),
            Err(rustix::io::Errno::NXIO) => {}
            Err(e) => panic!("open {} for writing: {e}", path.display()),
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("keyhold exited ({status}) before it read its input");
        }
        assert!(
            Instant::now() < deadline,
            "keyhold did not open its input within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` to exit (killing it after [`WAIT`]) and collects its output.
fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("keyhold did not finish within {WAIT:?} once its input was closed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// README: "the `keyhold` process holding [secrets] is not dumpable and writes no core files".
/// A keyhold process that has unsealed its store and resolved its key, blocked reading the
/// plaintext to encrypt from a FIFO, is looked at from outside:
/// - /proc/PID/limits shows a core file size of 0, soft and hard, although it was started with
///   core files allowed (a control process started the same way shows the inherited limit);
/// - its /proc/PID entries belong to root although it runs as an unprivileged user: the kernel
///   does that for non-dumpable processes only (`PR_SET_DUMPABLE` 0), which is also what keeps
///   that user's other processes from ptrace-attaching to it or reading its memory. (As root no
///   ptrace refusal can be seen, so keyhold runs as `nobody` here.) The control process, dumpable,
///   shows its own user as owner.
#[test]
fn a_running_keyhold_is_not_dumpable_and_writes_no_core_file() {
    let user = User::for_keyhold();
    let inherited = allow_core_files();
    assert_ne!(inherited, 0);

    // The user must be able to run the binary: the build's own may lie under directories only
    // root can search (a clone in a private temp dir, as CI makes), so a copy in one it can.
    let (_bin_dir, bin) = binary_others_can_run();
    let mut version = Command::new(&bin);
    version.arg("--version");
    user.apply(&mut version);
    let out = run_command(version, None);
    assert_ok(&out, "keyhold --version as the unprivileged user");
    // Everything keyhold touches belongs to that user: the store must be its own.
    let env = Env::new();
    user.own(env.dir.path());
    let as_user = |args: &[&str]| {
        let mut cmd = env.command_via(Command::new(&bin), args);
        user.apply(&mut cmd);
        let out = env.run_cmd(cmd, Some(b""));
        assert_ok(&out, &format!("{args:?} as uid {}", user.uid));
        out.stdout
    };
    as_user(INIT_ARGS);
    let id = parse_id_line(
        &as_user(&["key", "create", "data", "--type", "aes-256-gcm"]),
        "key create",
    );

    let fifo = env.file("plaintext.fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_bits_truncate(0o600),
        0,
    )
    .unwrap();
    user.own(&fifo);
    let envelope = env.path_str("envelope");
    let mut cmd = env.command_via(
        Command::new(&bin),
        &[
            "encrypt",
            "--key",
            &id,
            "--in",
            fifo.to_str().unwrap(),
            "--out",
            &envelope,
        ],
    );
    user.apply(&mut cmd);
    let mut keyhold = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A control: an ordinary (dumpable) process started the same way, as the same user.
    let mut control = Command::new("cat");
    user.apply(&mut control);
    let mut control = control
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    // Once keyhold opened the FIFO it has passed its start-up, opened and unsealed the store
    // and resolved the key: it holds the store's root secret while it waits for the plaintext.
    let mut input = open_when_read(&fifo, &mut keyhold);
    let pid = keyhold.id();

    let (owner, uid) = proc_owner_and_uid(pid);
    assert_eq!(uid, user.uid, "keyhold runs as uid {}", user.uid);
    let (control_owner, control_uid) = proc_owner_and_uid(control.id());
    assert_eq!(
        (control_owner, control_uid),
        (user.uid, user.uid),
        "control: a dumpable process's /proc entries belong to its user"
    );
    assert_eq!(
        owner, 0,
        "/proc/{pid}/status of keyhold (uid {uid}) belongs to uid {owner}: the process is \
         dumpable (a non-dumpable process's /proc entries belong to root)"
    );
    assert_eq!(
        core_limit(pid),
        ("0".to_owned(), "0".to_owned()),
        "keyhold's core file size limit (soft, hard)"
    );
    let inherited_text = if inherited == u64::MAX {
        "unlimited".to_owned()
    } else {
        inherited.to_string()
    };
    assert_eq!(
        core_limit(control.id()).0,
        inherited_text,
        "control: the limit keyhold was started with"
    );

    drop(control.stdin.take());
    control.wait().unwrap();
    input
        .write_all(b"held by a process that cannot be dumped")
        .unwrap();
    drop(input);
    let out = finish(keyhold);
    assert_ok(&out, "encrypt from the FIFO");
    let plain = as_user(&["decrypt", "--key", &id, "--in", &envelope]);
    assert_eq!(plain, b"held by a process that cannot be dumped");
    // The envelope is private to that user (umask 077), like every file keyhold writes.
    let mode = std::fs::metadata(&envelope).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{envelope}");
}

// ---------------------------------------------------------------------------------------------
// Secrets never in logs
// ---------------------------------------------------------------------------------------------

/// A plaintext no output may show but `decrypt`'s.
const PLAINTEXT: &str = "plaintext: the vault opens with 8675309-zebra-quasar";

/// Asserts that no form of any of `secrets` is in the stderr of `out`, nor, unless it is
/// `decrypt`'s plaintext output, in its stdout.
fn assert_no_secret_in(out: &Output, secrets: &[&str], stdout_too: bool, ctx: &str) {
    for secret in secrets {
        for (form, text) in secret_forms(secret) {
            let mut streams = vec![("stderr", &out.stderr)];
            if stdout_too {
                streams.push(("stdout", &out.stdout));
            }
            for (name, bytes) in streams {
                assert!(
                    !bytes.windows(text.len()).any(|w| w == text.as_bytes()),
                    "{ctx}: a secret ({secret:?}, as {form} {text:?}) is in its {name}\n{}",
                    show(out)
                );
            }
        }
    }
}

/// The log levels every command runs at: tracing's most verbose through `RUST_LOG`, and
/// keyhold's own most verbose flag (`-vv`, which overrides `RUST_LOG`).
#[derive(Debug, Clone, Copy)]
enum Level {
    RustLogTrace,
    Vv,
}

impl Level {
    const ALL: [Self; 2] = [Self::RustLogTrace, Self::Vv];

    /// `env` with its commands logging at this level.
    fn env(self, env: Env) -> Env {
        match self {
            Self::RustLogTrace => env.with_var("RUST_LOG", "trace"),
            Self::Vv => env,
        }
    }

    /// `args` with this level's global flags first.
    fn args<'a>(self, args: &[&'a str]) -> Vec<&'a str> {
        let flags: &[&str] = match self {
            Self::RustLogTrace => &[],
            Self::Vv => &["-vv"],
        };
        flags.iter().chain(args).copied().collect()
    }
}

/// Runs keyhold with `args` at `level`, `vars` set, feeding `stdin`; expects exit `code` and no
/// form of `secrets` in its output (but in a successful `decrypt`'s stdout). Returns the output.
fn run_checked(
    env: &Env,
    level: Level,
    vars: &[(&str, &str)],
    args: &[&str],
    stdin: &[u8],
    code: i32,
    secrets: &[&str],
) -> Output {
    let args = level.args(args);
    let ctx = format!("{args:?} at {level:?}");
    let out = env.run_with(&args, Some(stdin), |cmd| {
        cmd.envs(vars.iter().copied());
    });
    assert_eq!(out.status.code(), Some(code), "{ctx}\n{}", show(&out));
    let plaintext_out = args.contains(&"decrypt") && code == 0;
    assert_no_secret_in(&out, secrets, !plaintext_out, &ctx);
    out
}

/// A passphrase store at the most verbose log levels: init, key create, sign, verify, encrypt,
/// decrypt (and a failed one), mac, mac-verify (a good and a bad tag), key destroy, and a wrong
/// passphrase. Neither the passphrase, the wrong one, nor the plaintext shows in any output (but
/// decrypt's stdout), in any form. The logs are really on: init and destroy log at info level.
#[test]
fn a_passphrase_and_plaintext_never_reach_the_logs() {
    const WRONG: &str = "not-the-passphrase-but-close-Tr0ub4dor";
    let secrets = [PASS, WRONG, PLAINTEXT];
    let plain = PLAINTEXT.as_bytes();
    for level in Level::ALL {
        // The plaintext is looked for here, not by the harness: decrypt must print it.
        let env = level.env(Env::new()).with_secret(WRONG);
        let run = |args: &[&str], stdin: &[u8], code| {
            run_checked(&env, level, &[], args, stdin, code, &secrets)
        };
        let logged = |out: &Output, line: &str| {
            assert!(
                stderr(out).contains(line),
                "{level:?}: expected the log line {line:?}\n{}",
                show(out)
            );
        };
        logged(&run(INIT_ARGS, b"", 0), " INFO created store");
        let id = |out: Output| parse_id_line(&out.stdout, "key create");
        let signer = id(run(&["key", "create", "s", "--type", "ed25519"], b"", 0));
        let aes = id(run(
            &["key", "create", "e", "--type", "aes-256-gcm"],
            b"",
            0,
        ));
        let mac = id(run(
            &["key", "create", "m", "--type", "hmac-sha256"],
            b"",
            0,
        ));

        let sig = env.write("sig", &run(&["sign", "--key", &signer], plain, 0).stdout);
        run(&["verify", "--key", &signer, "--signature", &sig], plain, 0);
        let envelope = run(&["encrypt", "--key", &aes, "--aad", "ctx"], plain, 0).stdout;
        let back = run(&["decrypt", "--key", &aes, "--aad", "ctx"], &envelope, 0);
        assert_eq!(back.stdout, plain);
        run(&["decrypt", "--key", &aes, "--aad", "other"], &envelope, 1);
        let tag = run(&["mac", "--key", &mac], plain, 0).stdout;
        let good = env.write("tag", &tag);
        run(&["mac-verify", "--key", &mac, "--tag", &good], plain, 0);
        let bad = env.write("bad-tag", &flip(&tag, 0));
        run(&["mac-verify", "--key", &mac, "--tag", &bad], plain, 1);
        let wrong = run_checked(
            &env,
            level,
            &[("KEYHOLD_PASSPHRASE", WRONG)],
            &["sign", "--key", &signer],
            plain,
            4,
            &secrets,
        );
        assert!(stderr(&wrong).contains("keyhold: cannot unseal the store: wrong passphrase"));
        logged(
            &run(&["key", "destroy", "--now", "--yes", "--key", &mac], b"", 0),
            " INFO destroyed key",
        );
    }
}

/// A token's PIN at the most verbose log levels, through every operation that logs in (key
/// create, sign, encrypt, decrypt, mac, mac-verify on token keys; doctor) and a wrong PIN (exit 7):
/// neither PIN, the passphrase nor the plaintext shows in any form. The fixture's PIN (`1234`) is
/// too short to look for, so the token gets a long one first (pkcs11-tool --change-pin).
#[cfg(feature = "pkcs11")]
#[test]
fn a_token_pin_never_reaches_the_logs() {
    use keyhold::testing::SOFTHSM_MODULE;
    const PIN: &str = "token-pin-Zq81x-not-a-secret";
    const WRONG_PIN: &str = "token-pin-Zq81y-almost-it";
    let secrets = [PASS, PIN, WRONG_PIN, PLAINTEXT];
    let plain = PLAINTEXT.as_bytes();
    let hsm = softhsm_with_pin(PIN);

    for level in Level::ALL {
        let env = level
            .env(Env::new())
            .with_softhsm(SOFTHSM_MODULE, hsm.label(), PIN, "")
            .with_secret(PIN)
            .with_secret(WRONG_PIN);
        let run = |args: &[&str], stdin: &[u8], code| {
            run_checked(&env, level, &[], args, stdin, code, &secrets)
        };
        let init = run(INIT_ARGS, b"", 0);
        // The logs are really on at this level.
        assert!(
            stderr(&init).contains(" INFO created store"),
            "{level:?}\n{}",
            show(&init)
        );
        let create = |name, ty| {
            let out = run(
                &["key", "create", name, "--type", ty, "--backend", "hsm"],
                b"",
                0,
            );
            parse_id_line(&out.stdout, "key create")
        };
        let signer = create("s", "ecdsa-p256");
        let aes = create("e", "aes-256-gcm");
        let mac = create("m", "hmac-sha256");
        run(&["sign", "--key", &signer], plain, 0);
        // (Nothing on this path logs below info; the info line at init shows the logs are on.)
        let envelope = run(&["encrypt", "--key", &aes], plain, 0).stdout;
        assert_eq!(run(&["decrypt", "--key", &aes], &envelope, 0).stdout, plain);
        let tag = env.write("tag", &run(&["mac", "--key", &mac], plain, 0).stdout);
        run(&["mac-verify", "--key", &mac, "--tag", &tag], plain, 0);
        let doctor = run(&["doctor"], b"", 0);
        assert!(
            stdout_str(&doctor).contains(hsm.label()),
            "{}",
            show(&doctor)
        );
        let wrong = run_checked(
            &env,
            level,
            &[("KH_TEST_PIN", WRONG_PIN)],
            &["sign", "--key", &signer],
            plain,
            7,
            &secrets,
        );
        assert!(
            stderr(&wrong).contains("keyhold: cannot log in to backend `hsm`"),
            "{}",
            show(&wrong)
        );
    }
}

/// A TPM-sealed store's recovery passphrase at the most verbose log levels: init with it, and
/// after a PCR change a reseal with a wrong one (exit 4) and with the right one (which logs a
/// WARN that it is used): neither shows in any form, nor does the plaintext signed in the TPM.
#[cfg(feature = "tpm")]
#[test]
fn a_recovery_passphrase_never_reaches_the_logs() {
    use keyhold::backend::tpm::device::DeviceSettings;
    use keyhold::testing::Swtpm;
    const RECOVERY: &str = "recovery-passphrase-kept-off-the-machine";
    const WRONG: &str = "recovery-passphrase-kept-off-the-machinE";
    let secrets = [RECOVERY, WRONG, PLAINTEXT];
    let plain = PLAINTEXT.as_bytes();
    let tpm = Swtpm::new().unwrap();
    for level in Level::ALL {
        let env = support::claims::tpm_env(level.env(Env::new()), &tpm.tcti(), "")
            .with_secret(RECOVERY)
            .with_secret(WRONG);
        let run = |vars: &[(&str, &str)], args: &[&str], code| {
            run_checked(&env, level, vars, args, plain, code, &secrets)
        };
        let recovery = [("KEYHOLD_PASSPHRASE", RECOVERY)];
        let mut init = vec!["init", "--sealer", "tpm", "--pcrs", "8"];
        init.extend_from_slice(&INIT_ARGS[3..]);
        let made = run(&recovery, &init, 0);
        // The logs are really on at this level.
        assert!(
            stderr(&made).contains(" INFO created store"),
            "{level:?}\n{}",
            show(&made)
        );
        let key = run(&[], support::claims::CREATE_TPM_KEY, 0);
        let key = parse_id_line(&key.stdout, "key create");
        let signed = run(&[], &["sign", "--key", &key], 0);
        // Debug lines are on too (connecting to the TPM is logged at debug level).
        assert!(
            stderr(&signed).contains(" DEBUG "),
            "{level:?}: no debug line\n{}",
            show(&signed)
        );

        keyhold::backend::tpm::device(&tpm.tcti(), DeviceSettings::default())
            .unwrap()
            .extend_pcr(8, b"a new boot loader")
            .unwrap();
        run(&[], &["sign", "--key", &key], 4);
        let wrong = run(&[("KEYHOLD_PASSPHRASE", WRONG)], &["reseal"], 4);
        assert!(
            stderr(&wrong).contains("wrong passphrase"),
            "{}",
            show(&wrong)
        );
        let resealed = run(&recovery, &["reseal"], 0);
        assert!(
            stderr(&resealed).contains("unsealing with the recovery passphrase"),
            "{}",
            show(&resealed)
        );
        run(&[], &["sign", "--key", &key], 0);
    }
}
