//! A Sentinel-watched Redis on loopback: a primary, two replicas and three `redis-sentinel`
//! processes, each with its own free port and temp dir, stopped by pid when dropped. Sentinel
//! timing is short (a primary is down after [`DOWN_AFTER`] without answering), so a failover
//! takes a second or two; [`RedisSentinel::fail_over`] makes one the way a crash would
//! (SIGKILL), waits for a replica's promotion, and brings the killed server back as a replica
//! of the new primary, so the next failover has two replicas to choose from again.
//!
//! Readiness and promotion are asked over the Redis protocol itself (`INFO replication`,
//! `SENTINEL master`, `SENTINEL replicas`, `SENTINEL ckquorum`), each wait bounded; a wait that
//! runs out panics with every server's and sentinel's log.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::redis_server::{answering_pid, free_port, RedisServer};
use crate::resp::{command, Resp};

/// The name the sentinels know the primary by.
pub const MASTER_NAME: &str = "leasehold";

/// How long the sentinels wait for an unanswered primary before they call it down
/// (`down-after-milliseconds`). Short, so failovers are quick; long enough that a busy
/// 2-core machine does not make one by itself.
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

/// `failover-timeout`: how long a failover may take before another sentinel tries again.
const FAILOVER_TIMEOUT: Duration = Duration::from_millis(3000);

/// How long the topology has to form (replicas synced, sentinels discovered each other), and
/// a failover to complete.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A primary, two replicas and three sentinels (quorum 2) on `127.0.0.1`.
pub struct RedisSentinel {
    /// The data servers; which of them is the primary changes with each failover.
    servers: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
    /// The server [`kill_primary`](Self::kill_primary) killed, until it is restarted.
    killed: Option<usize>,
}

impl RedisSentinel {
    /// Starts the servers and sentinels, and waits until the replicas are in sync and every
    /// sentinel knows the primary, both replicas and the two other sentinels. Panics with the
    /// logs if that does not happen within 30 s, and with the package to install if
    /// `redis-server` or `redis-sentinel` is missing.
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let replica_of = primary.port().to_string();
        let mut servers = vec![primary];
        for _ in 0..2 {
            servers.push(RedisServer::start_with_args(&[
                "--replicaof",
                "127.0.0.1",
                &replica_of,
            ]));
        }
        let primary_port = servers[0].port();
        let sentinels = (0..3)
            .map(|_| SentinelProcess::start(primary_port))
            .collect();
        let topology = RedisSentinel {
            servers,
            sentinels,
            killed: None,
        };
        topology.wait_healthy();
        topology
    }

    /// One topology for every test of this process that only needs a Sentinel deployment
    /// to talk to (never failed over): started by the first caller, stopped when the process
    /// exits (test binaries do not drop statics, so an exit hook kills its processes by pid).
    pub fn shared() -> &'static RedisSentinel {
        static SHARED: OnceLock<RedisSentinel> = OnceLock::new();
        SHARED.get_or_init(|| {
            let topology = RedisSentinel::start();
            at_exit::stop(topology.pids(), topology.dirs());
            topology
        })
    }

    /// `redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/leasehold`: the sentinels and
    /// the master name, in the URL form `RedisBackend::connect` takes.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinel_ports()
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+sentinel://{}/{MASTER_NAME}", hosts.join(","))
    }

    /// The sentinels' ports.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The ports of the data servers (the primary and the replicas, in no particular order).
    pub fn server_ports(&self) -> Vec<u16> {
        self.servers.iter().map(RedisServer::port).collect()
    }

    /// The data server on `port` (to pause a replica, read its log, …).
    pub fn server(&self, port: u16) -> &RedisServer {
        self.servers
            .iter()
            .find(|server| server.port() == port)
            .unwrap_or_else(|| panic!("no data server on port {port}"))
    }

    /// The ports of the servers that are replicas now (by the sentinels' word on the primary).
    pub fn replica_ports(&self) -> Vec<u16> {
        let primary = self.primary_port();
        let killed = self.killed.map(|at| self.servers[at].port());
        self.server_ports()
            .into_iter()
            .filter(|&port| port != primary && Some(port) != killed)
            .collect()
    }

    /// The primary's port, as the sentinels name it (most of them agreeing).
    pub fn primary_port(&self) -> u16 {
        self.named_primary().unwrap_or_else(|| {
            panic!(
                "the sentinels name no primary\n{}",
                self.logs_of_everything()
            )
        })
    }

    /// The port a majority of the sentinels name as the primary, if they agree.
    fn named_primary(&self) -> Option<u16> {
        let named: Vec<u16> = self
            .sentinels
            .iter()
            .filter_map(|sentinel| {
                let reply = command(
                    sentinel.port,
                    &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
                )
                .ok()?;
                reply.items().get(1)?.text()?.parse().ok()
            })
            .collect();
        named
            .iter()
            .copied()
            .find(|port| named.iter().filter(|p| *p == port).count() >= 2)
    }

    /// Kills the primary (SIGKILL) and returns its port. Replicas keep what they had received.
    pub fn kill_primary(&mut self) -> u16 {
        assert!(self.killed.is_none(), "a killed server is still down");
        let port = self.primary_port();
        let at = self
            .servers
            .iter()
            .position(|server| server.port() == port)
            .expect("the primary is one of ours");
        self.servers[at].kill();
        self.killed = Some(at);
        port
    }

    /// Waits until a majority of the sentinels name a primary other than `old` and that server
    /// says it is a primary; returns its port.
    pub fn wait_for_promotion(&self, old: u16) -> u16 {
        let give_up = Instant::now() + READY_WITHIN;
        loop {
            if let Some(port) = self.named_primary().filter(|&port| port != old) {
                if role(port).as_deref() == Some("master") {
                    return port;
                }
            }
            assert!(
                Instant::now() < give_up,
                "no replica promoted within {READY_WITHIN:?} after the primary on {old} \
                 went down\n{}",
                self.logs_of_everything()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the killed server again, without data, as a replica of the current primary,
    /// and waits until the topology is whole again (see [`start`](Self::start)).
    pub fn restart_killed(&mut self) {
        let at = self.killed.take().expect("a server was killed");
        let primary = self.primary_port().to_string();
        self.servers[at].restart_with_args(&["--replicaof", "127.0.0.1", &primary]);
        self.wait_healthy();
    }

    /// One failover as a crash makes it: SIGKILL the primary, wait for the promotion, restart
    /// the killed server as a replica and wait until all is whole. Returns the old and the
    /// new primary's ports.
    pub fn fail_over(&mut self) -> (u16, u16) {
        let old = self.kill_primary();
        let new = self.wait_for_promotion(old);
        self.restart_killed();
        (old, new)
    }

    /// Waits until the primary has two replicas in sync and every sentinel sees it, both
    /// replicas up and the two other sentinels, with a quorum.
    pub fn wait_healthy(&self) {
        let give_up = Instant::now() + READY_WITHIN;
        loop {
            let why_not = self.unhealthy();
            let Some(why_not) = why_not else {
                return;
            };
            assert!(
                Instant::now() < give_up,
                "the Sentinel topology is not whole within {READY_WITHIN:?}: {why_not}\n{}",
                self.logs_of_everything()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What is not yet as it should be, if anything.
    fn unhealthy(&self) -> Option<String> {
        let Some(primary) = self.named_primary() else {
            return Some("the sentinels name no primary".to_owned());
        };
        let info = match command(primary, &["INFO", "replication"]) {
            Ok(Resp::Bulk(Some(info))) => info,
            other => return Some(format!("primary {primary} answered INFO with {other:?}")),
        };
        if !info.contains("role:master") {
            return Some(format!("{primary} is not a primary:\n{info}"));
        }
        let online = info
            .lines()
            .filter(|line| line.starts_with("slave") && line.contains("state=online"))
            .count();
        if online < 2 {
            return Some(format!("{online} replicas in sync with {primary}:\n{info}"));
        }
        for sentinel in &self.sentinels {
            let port = sentinel.port;
            let master = command(port, &["SENTINEL", "master", MASTER_NAME]);
            let master = match master {
                Ok(master) => master,
                Err(e) => return Some(format!("sentinel {port}: {e}")),
            };
            let seen = (
                master.field("port"),
                master.field("flags"),
                master.field("num-slaves"),
                master.field("num-other-sentinels"),
            );
            let primary_text = primary.to_string();
            if seen != (Some(&primary_text), Some("master"), Some("2"), Some("2")) {
                return Some(format!(
                    "sentinel {port} sees (port, flags, replicas, other sentinels) {seen:?}"
                ));
            }
            let replicas = command(port, &["SENTINEL", "replicas", MASTER_NAME]);
            let replicas = match replicas {
                Ok(replicas) => replicas,
                Err(e) => return Some(format!("sentinel {port}: {e}")),
            };
            let flags: Vec<&str> = replicas
                .items()
                .iter()
                .filter_map(|replica| replica.field("flags"))
                .collect();
            if flags != ["slave", "slave"] {
                return Some(format!("sentinel {port} sees replicas flagged {flags:?}"));
            }
            match command(port, &["SENTINEL", "ckquorum", MASTER_NAME]) {
                Ok(Resp::Simple(ok)) if ok.starts_with("OK") => {}
                other => return Some(format!("sentinel {port} ckquorum: {other:?}")),
            }
        }
        None
    }

    /// Every server's and sentinel's log, for failure messages.
    pub fn logs_of_everything(&self) -> String {
        let mut logs = String::new();
        for server in &self.servers {
            logs.push_str(&format!(
                "=== redis-server on {} ===\n{}\n",
                server.port(),
                server.log()
            ));
        }
        for sentinel in &self.sentinels {
            logs.push_str(&format!(
                "=== redis-sentinel on {} ===\n{}\n",
                sentinel.port,
                sentinel.log()
            ));
        }
        logs
    }

    fn pids(&self) -> Vec<u32> {
        let servers = self.servers.iter().map(RedisServer::pid);
        servers
            .chain(self.sentinels.iter().map(|s| s.child.id()))
            .collect()
    }

    fn dirs(&self) -> Vec<PathBuf> {
        let servers = self.servers.iter().map(|s| s.dir().to_owned());
        servers
            .chain(self.sentinels.iter().map(|s| s.dir.path().to_owned()))
            .collect()
    }

    /// A backend on this deployment, through the sentinels (its own connections: one backend
    /// is one node).
    #[cfg(feature = "redis")]
    pub async fn backend(&self) -> leasehold::RedisBackend {
        leasehold::RedisBackend::connect(&self.url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connect to {}: {e}\n{}",
                    self.url(),
                    self.logs_of_everything()
                )
            })
    }
}

/// A server's `role` from `INFO replication`, if it answers.
fn role(port: u16) -> Option<String> {
    let info = command(port, &["INFO", "replication"]).ok()?;
    let info = info.text()?;
    info.lines()
        .find_map(|line| line.strip_prefix("role:"))
        .map(|role| role.trim().to_owned())
}

/// One `redis-sentinel` process.
struct SentinelProcess {
    port: u16,
    dir: TempDir,
    child: Child,
}

impl SentinelProcess {
    fn start(primary: u16) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("leasehold-sentinel-")
            .tempdir()
            .expect("temp dir for redis-sentinel");
        let mut last_log = String::new();
        // Another process may take the port between our probe and the bind: try a few.
        for _ in 0..5 {
            let port = free_port();
            // Sentinel rewrites its config file as it learns the topology, so it is a fresh
            // file in the temp dir.
            let config = format!(
                "port {port}\n\
                 bind 127.0.0.1\n\
                 daemonize no\n\
                 dir {dir}\n\
                 logfile {dir}/sentinel.log\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {down}\n\
                 sentinel failover-timeout {MASTER_NAME} {failover}\n\
                 sentinel parallel-syncs {MASTER_NAME} 2\n",
                dir = dir.path().display(),
                down = DOWN_AFTER.as_millis(),
                failover = FAILOVER_TIMEOUT.as_millis(),
            );
            let config_path = dir.path().join("sentinel.conf");
            fs::write(&config_path, config).expect("write sentinel.conf");
            let mut child = spawn_sentinel(&config_path, dir.path());
            match wait_answering(port, &mut child) {
                Ok(()) => return SentinelProcess { port, dir, child },
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = format!("{why}\n{}", read_log(dir.path()));
                    if !last_log.contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("redis-sentinel did not start:\n{last_log}");
    }

    fn log(&self) -> String {
        read_log(self.dir.path())
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_sentinel(config: &Path, dir: &Path) -> Child {
    let stderr = fs::File::create(dir.join("stderr.log")).expect("stderr log file");
    let spawned = Command::new("redis-sentinel")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn();
    match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-sentinel is not installed (these tests run real sentinels): \
             apt-get install redis-sentinel"
        ),
        Err(e) => panic!("could not run redis-sentinel: {e}"),
    }
}

fn read_log(dir: &Path) -> String {
    let log = fs::read_to_string(dir.join("sentinel.log")).unwrap_or_default();
    let stderr = fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    format!("--- sentinel.log ---\n{log}--- stderr ---\n{stderr}")
}

/// Waits until the process on `port` answers and is `child`, or says why not.
fn wait_answering(port: u16, child: &mut Child) -> Result<(), String> {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("exited with {status}"));
        }
        if answering_pid(port) == Some(child.id()) {
            return Ok(());
        }
        if Instant::now() > give_up {
            return Err(format!("no answer on port {port} within 10s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops the processes of topologies kept in statics when the process exits.
pub(crate) mod at_exit {
    use super::*;

    /// Processes and dirs to remove at exit.
    static LEFT: Mutex<Vec<(Vec<u32>, Vec<PathBuf>)>> = Mutex::new(Vec::new());

    extern "C" {
        fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
        fn kill(pid: i32, signal: std::ffi::c_int) -> std::ffi::c_int;
    }

    const SIGKILL: std::ffi::c_int = 9;

    extern "C" fn stop_all() {
        let left = std::mem::take(&mut *LEFT.lock().unwrap_or_else(|p| p.into_inner()));
        for (pids, dirs) in left {
            for pid in pids {
                if let Ok(pid) = i32::try_from(pid) {
                    // SAFETY: a plain system call on a pid this process started and still
                    // owns (its child, not reaped, so the pid cannot have been reused).
                    unsafe { kill(pid, SIGKILL) };
                }
            }
            for dir in dirs {
                let _ = fs::remove_dir_all(dir);
            }
        }
    }

    /// Kills `pids` (by pid) and removes `dirs` when the process exits.
    pub(crate) fn stop(pids: Vec<u32>, dirs: Vec<PathBuf>) {
        static REGISTERED: OnceLock<()> = OnceLock::new();
        REGISTERED.get_or_init(|| {
            // SAFETY: registers a function that only makes system calls and takes a lock
            // nothing holds at exit.
            unsafe { atexit(stop_all) };
        });
        LEFT.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((pids, dirs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_primary_is_replaced_by_a_replica_and_comes_back_as_one() {
        let mut topology = RedisSentinel::start();
        let started = Instant::now();
        let (old, new) = topology.fail_over();
        assert_ne!(old, new);
        assert_eq!(role(old).as_deref(), Some("slave"));
        eprintln!("failover took {:?}", started.elapsed());
    }
}
