//! PKCS#11 helpers of the token tests: the one way to open a raw cryptoki session (on a SoftHSM2
//! token by label, on openCryptoki's soft token), the one reading of a key object's usages, and
//! OpenSC's pkcs11-spy, which logs every call that reaches a module so tests can count them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use keyhold::testing::{
    OPENCRYPTOKI_LABEL, OPENCRYPTOKI_MODULE, OPENCRYPTOKI_USER_PIN, SOFTHSM_MODULE, TEST_SO_PIN,
    TEST_USER_PIN,
};
use secrecy::SecretString;

/// The module at `path`, loaded and initialised. keyhold has usually initialised it already in
/// this process (a module is initialised once per process): that is fine.
pub fn module(path: &str) -> Pkcs11 {
    let module = Pkcs11::new(path).unwrap_or_else(|e| panic!("load {path}: {e}"));
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => panic!("C_Initialize {path}: {e}"),
    }
    module
}

/// The slot of the SoftHSM2 token labelled `label`.
pub fn softhsm_slot(module: &Pkcs11, label: &str) -> Slot {
    module
        .get_slots_with_token()
        .expect("C_GetSlotList")
        .into_iter()
        // A token another test deleted answers C_GetTokenInfo with an error: skip it.
        .find(|&s| {
            module
                .get_token_info(s)
                .is_ok_and(|info| info.label().trim_end() == label)
        })
        .unwrap_or_else(|| panic!("no token labelled {label}"))
}

/// Logs `session` in as `user` with `pin`; already logged in (by keyhold, in this process) is fine.
fn login(session: &Session, user: UserType, pin: &str) {
    match session.login(user, Some(&SecretString::from(pin.to_owned()))) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login ({user:?}): {e}"),
    }
}

/// A read-write session on the SoftHSM2 token labelled `label`, logged in as the user: what
/// another PKCS#11 application, or a person with the PIN and pkcs11-tool, can do. Never logs out
/// (that would log keyhold out too, in this process).
pub fn raw_session(label: &str) -> Session {
    softhsm_session(label, UserType::User, TEST_USER_PIN)
}

/// A read-write session on the SoftHSM2 token labelled `label`, logged in as the security
/// officer. PKCS#11 logs in an application, not a session: this fails with
/// `CKR_USER_ANOTHER_ALREADY_LOGGED_IN` once anything in this process (keyhold included) is logged
/// in to the token as the user, so do the SO's part first. Log it out when done.
pub fn so_session(label: &str) -> Session {
    softhsm_session(label, UserType::So, TEST_SO_PIN)
}

fn softhsm_session(label: &str, user: UserType, pin: &str) -> Session {
    let module = module(SOFTHSM_MODULE);
    let session = module
        .open_rw_session(softhsm_slot(&module, label))
        .expect("C_OpenSession");
    login(&session, user, pin);
    session
}

/// A read-write session on openCryptoki's soft token, logged in as the user (never logs out).
pub fn ock_raw_session() -> Session {
    let module = module(OPENCRYPTOKI_MODULE);
    // cryptoki's own get_token_info fails on this token (its clock field), so it cannot be picked
    // by label here; openCryptoki lists only initialised tokens, and the soft token is the one.
    let slot = *module
        .get_slots_with_token()
        .expect("C_GetSlotList")
        .first()
        .unwrap_or_else(|| {
            panic!(
                "no openCryptoki token: is pkcsslotd running and the token \
                 `{OPENCRYPTOKI_LABEL}` made?"
            )
        });
    let session = module.open_rw_session(slot).expect("C_OpenSession");
    login(&session, UserType::User, OPENCRYPTOKI_USER_PIN);
    session
}

/// The objects labelled exactly `label` (keyhold labels them `namespace/name`), of `class` if
/// given.
pub fn objects(session: &Session, label: &str, class: Option<ObjectClass>) -> Vec<ObjectHandle> {
    let mut template = vec![Attribute::Label(label.as_bytes().to_vec())];
    template.extend(class.map(Attribute::Class));
    session.find_objects(&template).expect("C_FindObjects")
}

/// The objects whose label starts with `prefix` (a namespace on a shared token).
pub fn objects_under(session: &Session, prefix: &str) -> Vec<ObjectHandle> {
    session
        .find_objects(&[])
        .expect("C_FindObjects")
        .into_iter()
        .filter(|&h| {
            session
                .get_attributes(h, &[AttributeType::Label])
                .unwrap_or_default()
                .iter()
                .any(|a| matches!(a, Attribute::Label(l) if l.starts_with(prefix.as_bytes())))
        })
        .collect()
}

/// The usage attributes a key object may carry.
pub const USAGES: [AttributeType; 7] = [
    AttributeType::Sign,
    AttributeType::Verify,
    AttributeType::Encrypt,
    AttributeType::Decrypt,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Derive,
];

/// Each usage attribute of [`USAGES`] the object reports, with its value, as the token says it
/// (an attribute the object's class lacks is left out).
pub fn usages(session: &Session, handle: ObjectHandle) -> Vec<(AttributeType, bool)> {
    session
        .get_attributes(handle, &USAGES)
        .expect("C_GetAttributeValue (usages)")
        .into_iter()
        .map(|attr| match attr {
            Attribute::Sign(v)
            | Attribute::Verify(v)
            | Attribute::Encrypt(v)
            | Attribute::Decrypt(v)
            | Attribute::Wrap(v)
            | Attribute::Unwrap(v)
            | Attribute::Derive(v) => (attr.attribute_type(), v),
            other => panic!("unasked-for attribute {other:?}"),
        })
        .collect()
}

/// Whether `result` says the token of `backend` itself is gone (not merely one of its objects):
/// "not there" when an operation found it missing, "no token labelled" when a new connection did.
pub fn is_token_gone<T: std::fmt::Debug>(result: &keyhold::Result<T>, backend: &str) -> bool {
    matches!(
        result,
        Err(keyhold::Error::BackendUnavailable { backend: b, reason })
            if b == backend
                && (reason.contains("token is not there") || reason.contains("no token labelled"))
    )
}

/// OpenSC's pkcs11-spy: a PKCS#11 module that passes every call on to the module named by
/// `PKCS11SPY` and logs it, with its arguments and return value, to `PKCS11SPY_OUTPUT`. Pointing
/// keyhold at it counts the calls that reached the token (`C_Login`, `C_OpenSession`), not what
/// keyhold believes it did. It logs PIN bytes: test PINs only. Debian ships it in
/// `opensc-pkcs11`, which `opensc` (ci/install.sh) depends on.
pub const SPY_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so";

/// Set in a child [`spied`] started: the spy's log file.
const SPIED: &str = "KEYHOLD_TEST_SPY_LOG";

/// A spy log file and the environment that makes pkcs11-spy write it (read by the spy when it is
/// loaded, so it is given to a child process: never set in this one).
#[derive(Debug)]
pub struct Spy {
    log: PathBuf,
}

impl Spy {
    /// A spy that passes calls to SoftHSM2 and logs to a file in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            log: dir.join("pkcs11-spy.log"),
        }
    }

    /// The variables a child process needs, for `Command::envs`.
    pub fn env(&self) -> [(&'static str, OsString); 3] {
        [
            ("PKCS11SPY", OsString::from(SOFTHSM_MODULE)),
            ("PKCS11SPY_OUTPUT", self.log.clone().into_os_string()),
            (SPIED, self.log.clone().into_os_string()),
        ]
    }

    /// What the spy logged.
    pub fn calls(&self) -> SpyLog {
        let text = std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| panic!("read {}: {e}", self.log.display()));
        SpyLog::parse(&text)
    }
}

/// The calls pkcs11-spy logged, in order: the function and the return value's name.
#[derive(Debug)]
pub struct SpyLog {
    calls: Vec<(String, Option<String>)>,
}

impl SpyLog {
    /// Each call is a block: `N: C_Function`, its arguments, `Returned:  0 CKR_OK`. Calls from
    /// several threads interleave, so return values are reliable only where one thread calls.
    fn parse(text: &str) -> Self {
        let mut calls: Vec<(String, Option<String>)> = Vec::new();
        for line in text.lines() {
            if let Some((n, function)) = line.split_once(": C_") {
                if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() {
                    calls.push((format!("C_{}", function.trim()), None));
                    continue;
                }
            }
            if let Some(rv) = line.strip_prefix("Returned:") {
                if let Some(last) = calls.iter_mut().rev().find(|(_, rv)| rv.is_none()) {
                    last.1 = rv.split_whitespace().nth(1).map(str::to_owned);
                }
            }
        }
        Self { calls }
    }

    /// How many times `function` (e.g. `C_Login`) was called.
    pub fn count(&self, function: &str) -> usize {
        self.calls.iter().filter(|(f, _)| f == function).count()
    }

    /// What each call of `function` returned (e.g. `CKR_PIN_INCORRECT`), in order.
    pub fn returned(&self, function: &str) -> Vec<&str> {
        self.calls
            .iter()
            .filter(|(f, _)| f == function)
            .map(|(_, rv)| rv.as_deref().unwrap_or("(no return logged)"))
            .collect()
    }
}

/// In a test, `spied(name)` runs the test `name` (the calling one) of this test binary again in a
/// child process whose keyhold reaches SoftHSM2 through pkcs11-spy, checks that it ran exactly
/// that one test and that it passed, and returns the spy's log; in that child, it returns `None`
/// and the test goes on to do what is to be counted, with [`module_under_test`] as the module
/// of the keyhold backend whose calls are counted. The spy reads its variables when it is loaded,
/// so they are given to a child rather than set in this process (where other tests' threads run).
pub fn spied(name: &str) -> Option<SpyLog> {
    if std::env::var_os(SPIED).is_some() {
        return None;
    }
    assert!(
        Path::new(SPY_MODULE).exists(),
        "{SPY_MODULE} is missing: install OpenSC (Debian: opensc, opensc-pkcs11)"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let spy = Spy::new(dir.path());
    let mut cmd = Command::new(std::env::current_exe().expect("this test binary"));
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .envs(spy.env());
    let out = super::env::run_command(cmd, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "the spied run of {name} failed or did not run it:\n{stdout}\n{stderr}"
    );
    Some(spy.calls())
}

/// The module keyhold's backend is to load: pkcs11-spy (passing calls to SoftHSM2) in a child
/// that [`spied`] started, SoftHSM2 itself otherwise.
pub fn module_under_test() -> &'static str {
    if std::env::var_os(SPIED).is_some() {
        SPY_MODULE
    } else {
        SOFTHSM_MODULE
    }
}
