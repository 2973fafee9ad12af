//! The `keyhold` process itself (README, threat model): it is not dumpable and writes no core
//! files (`RLIMIT_CORE` 0, hard), observed from outside on a live process that has unsealed its
//! store and waits for its input.
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

    // Everything keyhold touches belongs to that user: the store must be its own.
    let env = Env::new();
    user.own(env.dir.path());
    let as_user = |args: &[&str]| {
        let out = env.run_with(args, Some(b""), |cmd| user.apply(cmd));
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
    let mut cmd = env.command(&[
        "encrypt",
        "--key",
        &id,
        "--in",
        fifo.to_str().unwrap(),
        "--out",
        &envelope,
    ]);
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
    let plain = env.run_with(
        &["decrypt", "--key", &id, "--in", &envelope],
        Some(b""),
        |cmd| user.apply(cmd),
    );
    assert_ok(&plain, "decrypt");
    assert_eq!(plain.stdout, b"held by a process that cannot be dumped");
    // The envelope is private to that user (umask 077), like every file keyhold writes.
    let mode = std::fs::metadata(&envelope).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{envelope}");
}
