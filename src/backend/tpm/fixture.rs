//! A private swtpm for tests: its own state directory, its own TCP ports, killed on drop.
//!
//! tss-esapi 7.7 cannot reach swtpm over a Unix socket (it drops `path=` from `swtpm:path=…`, see
//! `tpm/NOTES.md`), so the fixture serves the TPM on TCP loopback: the command port `P` and the
//! control port `P+1`, which the `swtpm` TCTI derives from `P`. Two fixtures never share ports or
//! state.
//!
//! ```no_run
//! # fn main() -> Result<(), keyhold::Error> {
//! use keyhold::backend::tpm::fixture::Swtpm;
//! let mut tpm = Swtpm::new()?;        // a fresh TPM, manufactured on first start
//! let tcti = tpm.tcti();              // "swtpm:host=127.0.0.1,port=P"
//! tpm.restart()?;                     // a reboot: same state, transient objects gone
//! # Ok(())
//! # }
//! ```

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long swtpm gets to accept connections after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How many port pairs to try before giving up.
const PORT_ATTEMPTS: usize = 20;

fn fixture_error(what: impl std::fmt::Display) -> Error {
    Error::Config(format!("swtpm test fixture: {what}"))
}

/// A running swtpm (TPM 2.0) on 127.0.0.1, with a private state directory removed on drop.
#[derive(Debug)]
pub struct Swtpm {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Swtpm {
    /// Makes a state directory and starts swtpm on two free consecutive ports.
    ///
    /// # Errors
    /// [`Error::Config`] if swtpm is not installed, the directory cannot be made, or no port pair
    /// could be used.
    pub fn new() -> Result<Self> {
        let mut suffix = [0u8; 8];
        aws_lc_rs::rand::fill(&mut suffix).map_err(|_| Error::crypto("random directory name"))?;
        let dir = std::env::temp_dir().join(format!(
            "keyhold-swtpm-{}-{}",
            std::process::id(),
            crate::hex::encode(&suffix)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| fixture_error(format!("create {}: {e}", dir.display())))?;
        let mut tpm = Self {
            dir,
            port: 0,
            child: None,
        };
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let Some(port) = free_port_pair() else {
                continue;
            };
            tpm.port = port;
            match tpm.start() {
                Ok(()) => return Ok(tpm),
                // Someone took a port between the probe and swtpm's bind: try another pair.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| fixture_error("no two free consecutive TCP ports")))
    }

    /// The TCTI string for this TPM, as tss-esapi and tpm2-tools take it.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The command port; the control port is the next one.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// Whether swtpm is running (it has not been killed, and has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills swtpm (SIGKILL, like a crash or power loss) and waits for it to exit. Killing a TPM
    /// that is not running succeeds.
    ///
    /// # Errors
    /// [`Error::Config`] if the process cannot be signalled.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Err(e) = child.kill() {
                // Already exited is fine; anything else is not.
                if e.kind() != std::io::ErrorKind::InvalidInput {
                    return Err(fixture_error(format!("kill swtpm: {e}")));
                }
            }
            child
                .wait()
                .map_err(|e| fixture_error(format!("wait for swtpm: {e}")))?;
        }
        Ok(())
    }

    /// Kills swtpm and starts it again on the same state and ports: to the TPM, a reboot. Key
    /// blobs and persistent objects survive; transient objects, sessions and saved contexts do not.
    ///
    /// # Errors
    /// As [`Swtpm::new`], and if the ports were taken by someone else meanwhile.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.start()
    }

    /// Starts swtpm on `self.port` and waits until it accepts connections.
    fn start(&mut self) -> Result<()> {
        let port = self.port;
        let ctrl = port
            .checked_add(1)
            .ok_or_else(|| fixture_error("port out of range"))?;
        let log = self.dir.join("swtpm.log");
        let mut child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", self.dir.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .arg("--log")
            .arg(format!("file={},level=1", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fixture_error(format!("run swtpm (is it installed?): {e}")))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return Err(fixture_error(format!(
                    "swtpm on ports {port}/{ctrl} exited with {status}: {}",
                    stderr.trim()
                )));
            }
            if accepts(port) && accepts(ctrl) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fixture_error(format!(
                    "swtpm did not accept connections on ports {port}/{ctrl} within {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn accepts(port: u16) -> bool {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok()
}

/// A port `P` such that `P` and `P+1` are both free on 127.0.0.1 right now.
fn free_port_pair() -> Option<u16> {
    let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
    let port = first.local_addr().ok()?.port();
    let next = port.checked_add(1)?;
    let second = TcpListener::bind((Ipv4Addr::LOCALHOST, next)).ok()?;
    drop((first, second));
    Some(port)
}
