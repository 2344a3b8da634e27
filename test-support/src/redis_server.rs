//! A real `redis-server` for tests and benches: started on a free loopback port with its own
//! temp dir and no persistence, stopped (by its pid) when dropped.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a started server has to answer.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// A `redis-server` process on `127.0.0.1`.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    child: Child,
    /// Settings given to [`start_with_args`](RedisServer::start_with_args), kept for restarts.
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers. Panics with the
    /// server's log if it does not, and with the install command if `redis-server` is missing.
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Starts a server as [`start`](Self::start) does, with more `redis-server` arguments
    /// after the defaults (later ones win), e.g. `["--maxmemory-policy", "allkeys-lru"]` or
    /// TLS settings. The server still listens on its plain port, which is how readiness is
    /// checked.
    pub fn start_with_args(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|&a| a.to_owned()).collect();
        let dir = tempfile::Builder::new()
            .prefix("leasehold-redis-")
            .tempdir()
            .expect("temp dir for redis-server");
        // Another process may take the port between our probe and the server's bind: try a
        // few ports before giving up.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn(port, &dir, &extra);
            match wait_ready(port, &mut child) {
                Ok(()) => {
                    return RedisServer {
                        port,
                        dir,
                        child,
                        extra,
                    }
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = format!("{why}\n{}", read_log(&dir));
                    if !last_log.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("redis-server did not start:\n{last_log}");
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server process's pid, e.g. to read its CPU time from `/proc/<pid>/stat`. A
    /// [`restart`](Self::restart) changes it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A backend on this server (its own connections: one backend is one node).
    #[cfg(feature = "redis")]
    pub async fn backend(&self) -> leasehold::RedisBackend {
        leasehold::RedisBackend::connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.url(), read_log(&self.dir)))
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered. Returns once
    /// the kernel shows the process stopped.
    pub fn pause(&self) {
        self.signal("-STOP");
        let stat = format!("/proc/{}/stat", self.child.id());
        let give_up = Instant::now() + READY_WITHIN;
        loop {
            // The state is the field after the command name, which is in parentheses.
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            let state = state.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            if state == Some(Some('T')) {
                return;
            }
            assert!(
                Instant::now() < give_up,
                "redis-server {} did not stop: {state:?}",
                self.child.id()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kills the server and starts a new one on the same port, without data (nothing is
    /// persisted), as a crash and restart of a cache-only Redis would.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.port;
        let started = Instant::now();
        // The old socket may linger a moment after the kill.
        loop {
            let mut child = spawn(port, &self.dir, &self.extra);
            match wait_ready(port, &mut child) {
                Ok(()) => {
                    self.child = child;
                    return;
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    assert!(
                        started.elapsed() < READY_WITHIN,
                        "redis-server did not restart on port {port}: {why}\n{}",
                        read_log(&self.dir)
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Kills the server (SIGKILL) and reaps it, as a crash would; the port and temp dir stay
    /// for [`restart_with_args`](Self::restart_with_args).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, without data, with these `redis-server`
    /// arguments instead of the ones it was started with (e.g. `--replicaof` a new primary).
    pub fn restart_with_args(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|&a| a.to_owned()).collect();
        self.restart();
    }

    /// The server's temp dir (its log, and its data if persistence is turned on).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {} failed", self.child.id());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused server too; waiting reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    probe.local_addr().expect("probe address").port()
}

fn log_path(dir: &TempDir) -> PathBuf {
    dir.path().join("redis.log")
}

fn read_log(dir: &TempDir) -> String {
    let log = std::fs::read_to_string(log_path(dir)).unwrap_or_default();
    let stderr = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    format!("--- redis.log ---\n{log}--- stderr ---\n{stderr}")
}

fn spawn(port: u16, dir: &TempDir, extra: &[String]) -> Child {
    let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log file");
    let spawned = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .arg("--logfile")
        .arg(log_path(dir))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn();
    match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not installed (these tests run a real one): apt-get install redis-server"
        ),
        Err(e) => panic!("could not run redis-server: {e}"),
    }
}

/// Waits until the server on `port` answers, and is this child (not another test's server that
/// took the port first), or says why not.
fn wait_ready(port: u16, child: &mut Child) -> Result<(), String> {
    let give_up = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("redis-server exited with {status}"));
        }
        if answering_pid(port) == Some(child.id()) {
            return Ok(());
        }
        if Instant::now() > give_up {
            return Err(format!("no answer on port {port} within {READY_WITHIN:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pid of the server answering `INFO server` on `port`, if one does.
pub(crate) fn answering_pid(port: u16) -> Option<u32> {
    let attempt = || -> std::io::Result<String> {
        let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        conn.set_read_timeout(Some(Duration::from_millis(500)))?;
        conn.write_all(b"INFO server\r\n")?;
        // A bulk reply: `$LEN\r\n`, LEN bytes, `\r\n`.
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply);
            let complete = text.split_once("\r\n").is_some_and(|(header, body)| {
                header
                    .strip_prefix('$')
                    .and_then(|len| len.parse::<usize>().ok())
                    .is_some_and(|len| body.len() >= len)
            });
            if complete {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    let info = attempt().ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}
