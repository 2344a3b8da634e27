//! A child process for tests that need a lock holder in another OS process: the test binary
//! itself, started again to run one `#[ignore]`d entry, which talks to the parent through
//! report lines on its stdout and commands on its stdin. The parent can stop (SIGSTOP),
//! resume and kill it, which no holder inside the test process allows.
//!
//! Included by the test files that need it with `#[path = "support/child.rs"] mod child;`:
//! it runs this test binary again, so it belongs to the test harness, not to the
//! `leasehold-test-support` crate that starts servers.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader, Lines, Stdin};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Marks the child's stdout lines meant for the parent (the test harness prints its own).
pub const REPORT: &str = "child-report:";

/// This test binary, started again to run one child entry, with its stdout read line by line.
pub struct ChildTest {
    entry: &'static str,
    process: Child,
    stdin: Option<ChildStdin>,
    /// Lines that contain [`REPORT`], from after it.
    reports: mpsc::UnboundedReceiver<String>,
    /// Everything the child wrote, stdout and stderr, for failure messages.
    output: Arc<Mutex<Vec<String>>>,
}

impl ChildTest {
    /// Starts `entry` (an `#[ignore]`d test of this binary) with `env` added to its
    /// environment.
    pub fn spawn(entry: &'static str, env: &[(&str, String)]) -> ChildTest {
        let exe = std::env::current_exe().expect("path of this test binary");
        let mut process = Command::new(exe)
            .args(["--ignored", "--exact", entry, "--nocapture"])
            .args(["--test-threads", "1"])
            .envs(env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A failed test must not leave a stopped or holding child behind.
            .kill_on_drop(true)
            .spawn()
            .expect("start this test binary again as a child");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (sender, reports) = mpsc::unbounded_channel();
        read_lines(process.stdout.take().unwrap(), output.clone(), Some(sender));
        read_lines(process.stderr.take().unwrap(), output.clone(), None);
        ChildTest {
            entry,
            stdin: process.stdin.take(),
            process,
            reports,
            output,
        }
    }

    /// The next report, or a panic with the child's output.
    pub async fn next_report(&mut self, limit: Duration) -> String {
        match timeout(limit, self.reports.recv()).await {
            Ok(Some(report)) => report,
            Ok(None) => panic!(
                "child {} ended without reporting\n{}",
                self.entry,
                self.output()
            ),
            Err(_) => panic!(
                "child {} reported nothing within {limit:?}\n{}",
                self.entry,
                self.output()
            ),
        }
    }

    /// The next report that starts with `tag`, as its `key=value` fields; the reports before
    /// it are handed to `skipped`.
    pub async fn next_tagged(
        &mut self,
        tag: &str,
        limit: Duration,
        mut skipped: impl FnMut(&str),
    ) -> HashMap<String, String> {
        let give_up = tokio::time::Instant::now() + limit;
        loop {
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            let report = self.next_report(left).await;
            match fields(&report, tag) {
                Some(fields) => {
                    return fields
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect()
                }
                None => skipped(&report),
            }
        }
    }

    /// Writes `line` to the child's stdin.
    pub async fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to the child");
        stdin.flush().await.expect("flush to the child");
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.process.id().expect("the child is running")
    }

    /// Sends `signal` (`-STOP`, `-CONT`, …) with `kill`.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// SIGSTOP, and returns once the kernel shows the child stopped (bounded): from then on
    /// none of its threads runs, its lease renewals included.
    pub fn stop(&self) {
        self.signal("-STOP");
        let pid = self.pid();
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state is the field after the command name, which is in parentheses.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            if state == Some('T') {
                return;
            }
            assert!(Instant::now() < give_up, "{pid} did not stop: {stat}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL, and reap.
    pub async fn kill(&mut self) {
        self.process.kill().await.expect("kill the child");
    }

    /// Closes its stdin, waits for it to exit, asserts it passed, and returns the reports it
    /// had not handed out yet.
    pub async fn finish(mut self, limit: Duration) -> Vec<String> {
        drop(self.stdin.take());
        let status = match timeout(limit, self.process.wait()).await {
            Ok(status) => status.expect("wait for the child"),
            Err(_) => panic!(
                "child {} still running after {limit:?}\n{}",
                self.entry,
                self.output()
            ),
        };
        assert!(
            status.success(),
            "child {} failed: {status}\n{}",
            self.entry,
            self.output()
        );
        let mut reports = Vec::new();
        // The readers end at EOF, which follows the exit.
        while let Some(report) = self.reports.recv().await {
            reports.push(report);
        }
        reports
    }

    /// Everything the child wrote so far, for a failure message.
    pub fn output(&self) -> String {
        format!(
            "--- output of child {} ---\n{}",
            self.entry,
            self.output.lock().unwrap().join("\n")
        )
    }
}

fn read_lines(
    from: impl AsyncRead + Unpin + Send + 'static,
    output: Arc<Mutex<Vec<String>>>,
    reports: Option<mpsc::UnboundedSender<String>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(from).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // Not only at the start: libtest prints `test NAME ... ` without a newline before
            // the test's own first line.
            if let (Some(reports), Some((_, report))) = (&reports, line.split_once(REPORT)) {
                let _ = reports.send(report.trim().to_owned());
            }
            output.lock().unwrap().push(line);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The child's side.

/// Says `line` to the parent (a child entry's stdout).
pub fn report(line: &str) {
    println!("{REPORT} {line}");
}

/// The parent's commands to a child, one a line on its stdin.
pub type Commands = Lines<BufReader<Stdin>>;

/// The parent's commands, one a line.
pub fn commands() -> Commands {
    BufReader::new(tokio::io::stdin()).lines()
}

/// Waits for the parent to say `command`; panics on anything else, or if stdin closes.
pub async fn expect_command(commands: &mut Commands, command: &str) {
    let line = commands.next_line().await.expect("read stdin");
    assert_eq!(line.as_deref(), Some(command), "the parent says {command}");
}

/// The environment variable `name`, which the parent sets. Panics naming it when it is
/// missing: run by hand (`--ignored`), a child entry fails instead of passing without having
/// done anything.
pub fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this is a child process of a test, started by it")
    })
}

/// The `key=value` words of a report line that starts with `tag`.
pub fn fields<'a>(line: &'a str, tag: &str) -> Option<HashMap<&'a str, &'a str>> {
    let mut words = line.split_whitespace();
    if words.next()? != tag {
        return None;
    }
    words.map(|word| word.split_once('=')).collect()
}
