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

use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long swtpm gets to listen on its ports after it is started. Generous: ten test processes
/// start swtpm at once on two busy cores.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How many port pairs [`Swtpm::new`] tries before giving up.
const PORT_ATTEMPTS: usize = 20;
/// How many times [`Swtpm::restart`] tries to get its own ports back, and the pause in between:
/// the TCTI names the ports, so a restart cannot move to others.
const RESTART_ATTEMPTS: usize = 50;
const RESTART_PAUSE: Duration = Duration::from_millis(100);
/// Where ports are taken from when the kernel's ephemeral range cannot be read (Linux's default
/// range starts at 32768).
const DEFAULT_EPHEMERAL_LOW: u16 = 32768;
/// The lowest port the fixture uses: below the ephemeral range, above the well-known services.
const LOWEST_PORT: u16 = 20000;

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
    /// Makes a state directory and starts swtpm on two consecutive free ports below the kernel's
    /// ephemeral port range (which every outgoing connection of every parallel test process draws
    /// from), trying another pair when one is taken.
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
        let range = port_range();
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = random_port(&range)?;
            if !free(port) || !port.checked_add(1).is_some_and(free) {
                continue;
            }
            tpm.port = port;
            match tpm.start() {
                Ok(()) => return Ok(tpm),
                // Someone took a port between the probe and swtpm's bind: try another pair.
                Err(Start::Taken(e)) => last = Some(e),
                Err(Start::Failed(e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            fixture_error(format!(
                "no two free consecutive TCP ports in {}-{} after {PORT_ATTEMPTS} attempts",
                range.start(),
                range.end()
            ))
        }))
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
    /// The ports cannot change (clients hold the TCTI), so while one is taken (say, by a client
    /// socket of another process that happened to get it) the start is tried again, a few seconds
    /// at the most.
    ///
    /// # Errors
    /// As [`Swtpm::new`], and if the ports stay taken by someone else.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        let mut last = None;
        for _ in 0..RESTART_ATTEMPTS {
            match self.start() {
                Ok(()) => return Ok(()),
                Err(Start::Taken(e)) => last = Some(e),
                Err(Start::Failed(e)) => return Err(e),
            }
            std::thread::sleep(RESTART_PAUSE);
        }
        Err(last.unwrap_or_else(|| fixture_error("restart")))
    }

    /// Starts swtpm on `self.port` and waits until it listens on both ports itself.
    ///
    /// That something accepts connections on the ports is not enough: another swtpm that won the
    /// race for them would, while this one exits. So the listening sockets are looked up and must
    /// belong to this child.
    fn start(&mut self) -> std::result::Result<(), Start> {
        let port = self.port;
        let ctrl = port
            .checked_add(1)
            .ok_or_else(|| Start::Failed(fixture_error("port out of range")))?;
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
            .map_err(|e| {
                Start::Failed(fixture_error(format!("run swtpm (is it installed?): {e}")))
            })?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    use std::io::Read;
                    let _ = pipe.read_to_string(&mut stderr);
                }
                // Most likely a port was taken (swtpm says so on stderr); the caller decides
                // whether to try again.
                return Err(Start::Taken(fixture_error(format!(
                    "swtpm on ports {port}/{ctrl} exited with {status}: {}",
                    stderr.trim()
                ))));
            }
            if listens(child.id(), port) && listens(child.id(), ctrl) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Start::Failed(fixture_error(format!(
                    "swtpm did not listen on ports {port}/{ctrl} within {} s",
                    START_TIMEOUT.as_secs()
                ))));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Why a start failed: a port was taken (try again), or anything else (give up).
enum Start {
    Taken(Error),
    Failed(Error),
}

/// The ports the fixture picks from: below the kernel's ephemeral range (where the kernel picks
/// the local port of every outgoing connection), as `ci/demo.sh` does.
fn port_range() -> std::ops::RangeInclusive<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW);
    // An ephemeral range that starts low leaves the fixture the ports just below it.
    let start = LOWEST_PORT.min(low.saturating_sub(2000)).max(1024);
    // The pair P, P+1 must both lie below the range.
    start..=low.saturating_sub(2).max(start)
}

fn random_port(range: &std::ops::RangeInclusive<u16>) -> Result<u16> {
    let mut bytes = [0u8; 2];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| Error::crypto("random port"))?;
    let span = u32::from(range.end() - range.start()) + 1;
    let offset = u32::from(u16::from_be_bytes(bytes)) % span;
    u16::try_from(u32::from(*range.start()) + offset).map_err(|_| fixture_error("port range"))
}

/// Whether `port` on 127.0.0.1 can be bound right now.
fn free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (Linux: `/proc/net/tcp`
/// names the listening socket's inode, `/proc/PID/fd` the sockets the process holds).
fn listens(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // 127.0.0.1 as the kernel prints it (the address in host byte order, little-endian here),
    // the port big-endian; state 0A is LISTEN.
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
                .then(|| fields.get(9).map(|inode| format!("socket:[{inode}]")))
                .flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ephemeral_low() -> u16 {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Both ports lie below the kernel's ephemeral range, where no outgoing connection of a
    /// parallel test process can be holding them.
    #[test]
    fn ports_are_taken_below_the_ephemeral_range() {
        let tpm = Swtpm::new().unwrap();
        assert!(port_range().contains(&tpm.port()), "{}", tpm.port());
        assert!(tpm.port() + 1 < ephemeral_low(), "{}", tpm.port());
    }

    /// A swtpm that lost the race for its ports to another one is not mistaken for a running
    /// fixture just because something answers on them: the start says the ports are taken.
    #[test]
    fn another_swtpm_on_the_ports_is_not_taken_for_this_one() {
        let first = Swtpm::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut second = Swtpm {
            dir: dir.path().to_owned(),
            port: first.port(),
            child: None,
        };
        match second.start() {
            Err(Start::Taken(e)) => assert!(e.to_string().contains("exited"), "{e}"),
            Err(Start::Failed(e)) => panic!("expected the ports to be taken, got {e}"),
            Ok(()) => panic!("a swtpm that could not bind its ports was taken for running"),
        }
        // Keep the drop from removing the tempdir twice.
        second.dir = PathBuf::new();
    }

    /// `restart` gets its ports back even when someone holds one for a moment after the kill.
    #[test]
    fn restart_waits_for_a_port_held_for_a_moment() {
        let mut tpm = Swtpm::new().unwrap();
        tpm.kill().unwrap();
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, tpm.port())).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        tpm.restart().unwrap();
        releaser.join().unwrap();
        assert!(tpm.is_running());
        assert!(listens(
            tpm.child.as_ref().map(Child::id).unwrap(),
            tpm.port()
        ));
    }
}
