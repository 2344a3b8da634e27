//! A real PostgreSQL server for tests and benches: a cluster made by `initdb` in its own temp
//! dir, a `postgres` process on a free loopback port, stopped (by its pid) when dropped.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to the
//! `postgres` user (which Debian's package creates) and the binaries run as that user through
//! `setpriv`, which `exec`s: the child's pid is the server's own, so stopping it by pid stops
//! the server and not a wrapper. The binaries are found in `/usr/lib/postgresql/<version>/bin`
//! (Debian keeps them off `PATH`), the newest version first, or in `LEASEHOLD_PG_BIN`.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a started server has to become ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// How long a stopped server has to exit (fast shutdown) before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// The superuser `initdb` creates; connections use it, with `trust` authentication on
/// loopback only.
pub const USER: &str = "postgres";

/// A `postgres` process on `127.0.0.1`, with a cluster of its own.
pub struct PostgresServer {
    port: u16,
    dir: TempDir,
    child: Child,
}

impl PostgresServer {
    /// Makes a cluster, starts a server on a free port and waits until it is ready. Panics with
    /// the server's log if it does not start, and with the install command if PostgreSQL is
    /// missing.
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("leasehold-postgres-")
            .tempdir()
            .expect("temp dir for postgres");
        let as_postgres = running_as_root();
        if as_postgres {
            let status = Command::new("chown")
                .arg(format!("{USER}:"))
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(
                status.success(),
                "chown {USER} {}: is there a `{USER}` user? (apt-get install postgresql makes it)",
                dir.path().display()
            );
        }
        let initdb = command(&bin, "initdb", as_postgres)
            .arg("-D")
            .arg(data_dir(&dir))
            .args(["-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("could not run initdb: {e}"));
        assert!(
            initdb.status.success(),
            "initdb failed:\n{}{}",
            String::from_utf8_lossy(&initdb.stdout),
            String::from_utf8_lossy(&initdb.stderr)
        );
        // Another process may take the port between our probe and the server's bind: try a
        // few ports before giving up.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn(&bin, &dir, port, as_postgres);
            match wait_ready(&dir, port, &mut child) {
                Ok(()) => return PostgresServer { port, dir, child },
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = format!("{why}\n{}", read_log(&dir));
                    if !last_log.contains("could not bind") {
                        break;
                    }
                }
            }
        }
        panic!("postgres did not start:\n{last_log}");
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server process's (the postmaster's) pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `postgresql://postgres@127.0.0.1:PORT/postgres`, which `tokio-postgres` and `psql`
    /// take as they are.
    pub fn url(&self) -> String {
        format!("postgresql://{USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: it ends the sessions and the backends with
        // the postmaster, leaving no orphan. A server that does not exit in time (paused, say)
        // is killed.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let give_up = Instant::now() + STOP_WITHIN;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `initdb` and `postgres` are: `LEASEHOLD_PG_BIN`, or Debian's newest
/// `/usr/lib/postgresql/<version>/bin`, or `PATH`.
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LEASEHOLD_PG_BIN") {
        return Some(dir.into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn command(bin: &Option<PathBuf>, program: &str, as_postgres: bool) -> Command {
    let program = match bin {
        Some(bin) => bin.join(program),
        None => PathBuf::from(program),
    };
    let found = program.exists() || which(&program);
    assert!(
        found,
        "{} is not installed (these tests run a real PostgreSQL): apt-get install postgresql",
        program.display()
    );
    if as_postgres {
        // setpriv execs the program (no fork), so the child's pid is the program's.
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={USER}"))
            .arg(format!("--regid={USER}"))
            .arg("--init-groups")
            .arg("--")
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Whether a bare program name is on `PATH`.
fn which(program: &Path) -> bool {
    program.components().count() == 1
        && std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn running_as_root() -> bool {
    // The real uid, from the kernel: no libc call needed for one number.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> u16 {
    let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    probe.local_addr().expect("probe address").port()
}

fn data_dir(dir: &TempDir) -> PathBuf {
    dir.path().join("data")
}

fn log_path(dir: &TempDir) -> PathBuf {
    dir.path().join("postgres.log")
}

fn read_log(dir: &TempDir) -> String {
    let log = std::fs::read_to_string(log_path(dir)).unwrap_or_default();
    format!("--- postgres.log ---\n{log}")
}

fn spawn(bin: &Option<PathBuf>, dir: &TempDir, port: u16, as_postgres: bool) -> Child {
    // The log file is opened here, as the test's user, and handed over as stdout/stderr.
    let log = std::fs::File::create(log_path(dir)).expect("postgres log file");
    let stderr = log.try_clone().expect("postgres log file");
    command(bin, "postgres", as_postgres)
        .arg("-D")
        .arg(data_dir(dir))
        .args(["-p", &port.to_string()])
        .args(["-h", "127.0.0.1"])
        // The Unix socket goes in the temp dir: the default, /var/run/postgresql, may not
        // exist or be writable.
        .arg("-k")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("could not run postgres: {e}"))
}

/// Waits until this child (not another test's server that took the port first) says in
/// `postmaster.pid` that it is ready, and its port answers; or says why not.
fn wait_ready(dir: &TempDir, port: u16, child: &mut Child) -> Result<(), String> {
    let give_up = Instant::now() + READY_WITHIN;
    let pid_file = data_dir(dir).join("postmaster.pid");
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("postgres exited with {status}"));
        }
        // Line 1 is the postmaster's pid, line 4 its port, and the last line its status,
        // which becomes `ready` once it accepts connections.
        let contents = std::fs::read_to_string(&pid_file).unwrap_or_default();
        let lines: Vec<&str> = contents.lines().collect();
        let ours = lines.first() == Some(&child.id().to_string().as_str())
            && lines.get(3) == Some(&port.to_string().as_str());
        let ready = lines.last().is_some_and(|status| status.trim() == "ready");
        if ours && ready && TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > give_up {
            return Err(format!(
                "not ready on port {port} within {READY_WITHIN:?}; postmaster.pid:\n{contents}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
