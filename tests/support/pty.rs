//! Talking to keyhold on a terminal: the real binary on a pty from script(1), each prompt
//! answered once it has shown (keyhold turns echo off, discarding what was typed ahead, before it
//! shows a secret's prompt: an answer typed before it would be lost).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::env::{require_tool, Env};

/// Generous: a prompt comes after an Argon2 derivation on a loaded two-core machine.
const WAIT: Duration = Duration::from_secs(120);

/// Runs keyhold with `args` as [`Env::command`] builds it (store, configuration, clean
/// environment) plus `vars`, on a terminal, answering each `(prompt, answer)` of `dialogue` in
/// turn once `prompt` has shown. Returns the exit code and everything the terminal showed. Panics,
/// with the transcript, if a prompt does not show or keyhold does not finish within two minutes.
pub fn converse(
    env: &Env,
    vars: &[(&str, &str)],
    args: &[&str],
    dialogue: &[(&str, &str)],
) -> (Option<i32>, String) {
    let script = require_tool("script", "util-linux: it gives keyhold a terminal");
    let inner = env.command(args);
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', "'\\''"));
    let line: Vec<String> = std::iter::once(inner.get_program())
        .chain(inner.get_args())
        .map(quote)
        .collect();
    let mut cmd = Command::new(script);
    cmd.env_clear();
    for (name, value) in inner.get_envs() {
        if let Some(value) = value {
            cmd.env(name, value);
        }
    }
    cmd.envs(vars.iter().copied())
        .current_dir(env.dir.path())
        .args(["-qec", &line.join(" "), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start script(1)");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let shown = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let shown = Arc::clone(&shown);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                shown
                    .lock()
                    .expect("transcript")
                    .extend_from_slice(&chunk[..n]);
            }
        })
    };
    let transcript = || String::from_utf8_lossy(&shown.lock().expect("transcript")).into_owned();
    let mut seen = 0;
    for (prompt, answer) in dialogue {
        let start = Instant::now();
        loop {
            let text = transcript();
            if let Some(at) = text[seen..].find(prompt) {
                seen += at + prompt.len();
                break;
            }
            if start.elapsed() > WAIT || child.try_wait().expect("wait").is_some() {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{args:?}: the prompt {prompt:?} did not show; the terminal showed:\n{text}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        stdin
            .write_all(format!("{answer}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("type on the terminal");
    }
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{args:?}: did not finish; the terminal showed:\n{}",
                transcript()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(stdin);
    reader.join().expect("terminal reader");
    (status.code(), transcript())
}
