//! What the CLI tests share: a `weft` child process whose stdout lines arrive on a channel, every
//! wait bounded by [`WAIT`]. (Each test file is its own crate and uses part of it.)
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bound on every wait: a broken build or a lost message fails instead of hanging.
pub const WAIT: Duration = Duration::from_secs(30);

/// A running `weft` process. Killed when dropped.
pub struct Running {
    pub name: String,
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Running {
    /// Starts `weft ARGS` (logging warnings only: several processes' info lines would bury a
    /// failure's message).
    pub fn start(name: &str, args: &[impl AsRef<OsStr>]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("weft starts");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name: name.to_owned(),
            child,
            stdin,
            lines,
        }
    }

    /// The next stdout line.
    pub fn line(&self, what: &str) -> String {
        self.lines.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!(
                "no line from {} within {WAIT:?}: waiting for {what}",
                self.name
            )
        })
    }

    /// The next stdout line if one comes within `wait`.
    pub fn line_within(&self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }

    /// Writes `text` to the process's stdin.
    pub fn write(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(text.as_bytes()).expect("the process reads");
        stdin.flush().unwrap();
    }

    /// The value after `prefix` in the next line.
    pub fn line_after(&self, prefix: &str) -> String {
        let line = self.line(prefix);
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{}: expected `{prefix}...`, got {line:?}", self.name))
            .to_owned()
    }

    /// The `node ID@ADDR` line every long-running pattern command prints first.
    pub fn node_addr(&self) -> String {
        self.line_after("node ")
    }

    /// Waits (bounded) for the process to exit, and checks it succeeded.
    pub fn wait_success(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(
                started.elapsed() < WAIT,
                "{} did not exit within {WAIT:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process and returns what it printed that was not read yet.
    pub fn kill_and_drain(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut rest = Vec::new();
        // The reader thread ends at the end of stdout, which the kill brings.
        while let Ok(line) = self.lines.recv_timeout(WAIT) {
            rest.push(line);
        }
        rest
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
