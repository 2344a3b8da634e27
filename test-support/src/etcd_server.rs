//! Real `etcd` servers for tests and benches: one member, or a cluster of three, on free
//! loopback client and peer ports with their own temp data dirs, stopped (by pid) when
//! dropped.
//!
//! Data dirs live on `/dev/shm` when there is one: etcd then does not wait for the disk on
//! every write, which keeps tests quick on a busy machine (the raft log is still written).
//! Whether a server is ready, and who leads a cluster, is asked over etcd's JSON gateway on
//! the client port with plain HTTP, so this file needs no etcd client.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a started server or cluster has to answer.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// Raft timing of a single member: quick to elect itself, minimum lease ttl 1 s
/// (etcd's minimum is 1.5 election timeouts, rounded up to whole seconds).
const SINGLE_TIMING: Timing = Timing {
    heartbeat_ms: 10,
    election_ms: 100,
};

/// Raft timing of a cluster member: a new leader within about a second of losing one, with
/// room for a busy 2-core machine not to trigger elections by itself. Minimum lease ttl 1 s.
const CLUSTER_TIMING: Timing = Timing {
    heartbeat_ms: 50,
    election_ms: 500,
};

#[derive(Clone, Copy)]
struct Timing {
    heartbeat_ms: u32,
    election_ms: u32,
}

/// One `etcd` member on `127.0.0.1`.
pub struct EtcdServer {
    /// Unique among all servers this process starts: readiness checks look for it in the
    /// member list, so a server of another test that got the port first is not mistaken
    /// for ours.
    name: String,
    client_port: u16,
    peer_port: u16,
    /// `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
    timing: Timing,
    /// Settings given to [`start_with_args`](EtcdServer::start_with_args), kept for restarts.
    extra: Vec<String>,
    /// A second, TLS client port (see [`start_with_tls`](EtcdServer::start_with_tls)).
    tls_port: Option<u16>,
    dir: TempDir,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts a single-member cluster on free ports and waits until it answers. Panics with
    /// the server's log if it does not, and with the install command if `etcd` is missing.
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Starts a single member as [`start`](Self::start) does, with more `etcd` arguments after
    /// the defaults, e.g. `["--quota-backend-bytes", "65536"]`.
    pub fn start_with_args(extra: &[&str]) -> Self {
        Self::start_single(extra, false)
    }

    /// Starts a single member as [`start`](Self::start) does that also serves clients over TLS
    /// with `cert_file` and `key_file` (PEM) on a second port,
    /// [`tls_endpoint`](Self::tls_endpoint). The plain port stays, for readiness checks.
    pub fn start_with_tls(cert_file: &Path, key_file: &Path) -> Self {
        let (cert, key) = (cert_file.display(), key_file.display());
        Self::start_single(
            &[
                "--cert-file",
                &cert.to_string(),
                "--key-file",
                &key.to_string(),
            ],
            true,
        )
    }

    fn start_single(extra: &[&str], tls: bool) -> Self {
        let mut last_log = String::new();
        // Another process may take a port between our probe and etcd's bind: try a few
        // times before giving up.
        for _ in 0..5 {
            let mut server = EtcdServer::new(free_port(), free_port(), SINGLE_TIMING);
            server.extra = extra.iter().map(|&a| a.to_owned()).collect();
            server.tls_port = tls.then(free_port);
            server.initial_cluster = server.cluster_entry();
            server.spawn();
            match server.wait_ready() {
                Ok(()) => return server,
                Err(why) => {
                    last_log = format!("{why}\n{}", server.log());
                    server.kill();
                    if !last_log.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("etcd did not start:\n{last_log}");
    }

    fn new(client_port: u16, peer_port: u16, timing: Timing) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "leasehold-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut builder = tempfile::Builder::new();
        builder.prefix("leasehold-etcd-");
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            builder.tempdir_in(shm)
        } else {
            builder.tempdir()
        }
        .expect("temp dir for etcd");
        EtcdServer {
            name,
            client_port,
            peer_port,
            initial_cluster: String::new(),
            timing,
            extra: Vec::new(),
            tls_port: None,
            dir,
            child: None,
        }
    }

    /// `127.0.0.1:PORT`, the client endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// `127.0.0.1:PORT`, the TLS client endpoint of a member started with
    /// [`start_with_tls`](Self::start_with_tls).
    pub fn tls_endpoint(&self) -> Option<String> {
        self.tls_port.map(|port| format!("127.0.0.1:{port}"))
    }

    /// The member's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The member's pid while it runs, e.g. to read its CPU time from `/proc/<pid>/stat`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (it was not stopped, and did not exit).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// A backend on this server in `mode` (its own client: one backend is one node).
    #[cfg(feature = "etcd")]
    pub async fn backend(&self, mode: leasehold::EtcdMode) -> leasehold::EtcdBackend {
        leasehold::EtcdBackend::builder([self.endpoint()])
            .with_mode(mode)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.endpoint(), self.log()))
    }

    /// Kills the member (SIGKILL, as a crash would).
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the stopped member again on the same ports and data dir, and waits until it
    /// answers (for a cluster member: until it has a leader again).
    pub fn restart(&mut self) {
        self.kill();
        let started = Instant::now();
        // The old sockets may linger a moment after the kill.
        loop {
            self.spawn();
            match self.wait_ready() {
                Ok(()) => return,
                Err(why) => {
                    self.kill();
                    assert!(
                        started.elapsed() < READY_WITHIN,
                        "etcd {} did not restart: {why}\n{}",
                        self.name,
                        self.log()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Freezes the member (SIGSTOP): connections stay open, nothing is answered. Returns once
    /// the kernel shows the process stopped.
    pub fn pause(&self) {
        self.signal("-STOP");
        let pid = self.child.as_ref().expect("etcd is running").id();
        let stat = format!("/proc/{pid}/stat");
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
                "etcd {pid} did not stop: {state:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Thaws a paused member (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// The member's log so far.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        // The last lines say why it failed; a long log would bury them.
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("--- etcd {} log (tail) ---\n{}", self.name, tail.join("\n"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn url(port: u16) -> String {
        format!("http://127.0.0.1:{port}")
    }

    fn cluster_entry(&self) -> String {
        format!("{}={}", self.name, Self::url(self.peer_port))
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let client = Self::url(self.client_port);
        let listen = match self.tls_port {
            Some(port) => format!("{client},https://127.0.0.1:{port}"),
            None => client.clone(),
        };
        let peer = Self::url(self.peer_port);
        let spawned = Command::new("etcd")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.initial_cluster_token()])
            .args([
                "--heartbeat-interval",
                &self.timing.heartbeat_ms.to_string(),
            ])
            .args(["--election-timeout", &self.timing.election_ms.to_string()])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        self.child = Some(match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "etcd is not installed (these tests run a real one): apt-get install etcd-server"
            ),
            Err(e) => panic!("could not run etcd: {e}"),
        });
    }

    /// One token per cluster, so members of different tests' clusters never talk.
    fn initial_cluster_token(&self) -> String {
        let first = self.initial_cluster.split('=').next().unwrap_or_default();
        format!("{first}-token")
    }

    /// Waits until this member answers, is a member of our cluster, and has a leader.
    fn wait_ready(&mut self) -> Result<(), String> {
        let give_up = Instant::now() + READY_WITHIN;
        loop {
            match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(None)) => {}
                Some(Ok(Some(status))) => return Err(format!("etcd exited with {status}")),
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("etcd is not running".to_owned()),
            }
            if self.is_ours() && self.is_healthy() {
                return Ok(());
            }
            if Instant::now() > give_up {
                return Err(format!(
                    "no healthy answer on {} within {READY_WITHIN:?}",
                    self.endpoint()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The member list on the client port names this member.
    fn is_ours(&self) -> bool {
        post(self.client_port, "/v3/cluster/member/list")
            .is_some_and(|body| body.contains(&format!("\"name\":\"{}\"", self.name)))
    }

    /// etcd's `/health`: true only while the member has a leader and answers.
    fn is_healthy(&self) -> bool {
        get(self.client_port, "/health").is_some_and(|body| body.contains("\"health\":\"true\""))
    }

    /// `(this member's id, its leader's id)`, from the maintenance status.
    fn status(&self) -> Option<(String, String)> {
        let body = post(self.client_port, "/v3/maintenance/status")?;
        let member = json_string(&body, "member_id")?;
        let leader = json_string(&body, "leader")?;
        Some((member, leader))
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("etcd is running").id();
        let status = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a paused member too; waiting reaps it.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of etcd members on loopback, each with its own ports and data dir.
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one answers and the cluster has a leader.
    pub fn start(size: usize) -> Self {
        let mut last_log = String::new();
        for _ in 0..5 {
            // Two ports per member, all different: probes freed one by one may hand out one
            // port twice (etcd then refuses the cluster: "has duplicate url").
            let ports = free_ports(2 * size);
            let mut members: Vec<EtcdServer> = ports
                .chunks(2)
                .map(|pair| EtcdServer::new(pair[0], pair[1], CLUSTER_TIMING))
                .collect();
            let initial_cluster = members
                .iter()
                .map(EtcdServer::cluster_entry)
                .collect::<Vec<_>>()
                .join(",");
            for member in &mut members {
                member.initial_cluster = initial_cluster.clone();
                member.spawn();
            }
            let ready: Result<(), String> = members.iter_mut().try_for_each(|m| {
                m.wait_ready()
                    .map_err(|why| format!("{}: {why}\n{}", m.name, m.log()))
            });
            match ready {
                Ok(()) => return EtcdCluster { members },
                Err(why) => {
                    last_log = why;
                    drop(members);
                    if !last_log.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("etcd cluster did not start:\n{last_log}");
    }

    /// Every member's client endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdServer::endpoint).collect()
    }

    /// Member `index`.
    pub fn member(&mut self, index: usize) -> &mut EtcdServer {
        &mut self.members[index]
    }

    /// How many members the cluster has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never, once started).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The index of the current leader, as the running members see it: waits (bounded) until
    /// they agree on one that is running.
    pub fn leader(&mut self) -> usize {
        let give_up = Instant::now() + READY_WITHIN;
        loop {
            if let Some(leader) = self.agreed_leader() {
                return leader;
            }
            assert!(
                Instant::now() < give_up,
                "the etcd cluster has no leader after {READY_WITHIN:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn agreed_leader(&mut self) -> Option<usize> {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for member in &mut self.members {
            if !member.is_running() {
                ids.push(None);
                continue;
            }
            let (id, leader) = member.status()?;
            ids.push(Some(id));
            leaders.push(leader);
        }
        let leader = leaders.first()?;
        if leader == "0" || leaders.iter().any(|l| l != leader) {
            return None;
        }
        ids.iter()
            .position(|id| id.as_deref() == Some(leader.as_str()))
    }

    /// A backend on the whole cluster in `mode` (its own client).
    #[cfg(feature = "etcd")]
    pub async fn backend(&self, mode: leasehold::EtcdMode) -> leasehold::EtcdBackend {
        leasehold::EtcdBackend::builder(self.endpoints())
            .with_mode(mode)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {:?}: {e}\n{}", self.endpoints(), self.log()))
    }

    /// Every member's log.
    pub fn log(&self) -> String {
        self.members
            .iter()
            .map(EtcdServer::log)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `count` free loopback ports, all different: every probe is held until all are bound.
fn free_ports(count: usize) -> Vec<u16> {
    let probes: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port"))
        .collect();
    probes
        .iter()
        .map(|probe| probe.local_addr().expect("probe address").port())
        .collect()
}

fn get(port: u16, path: &str) -> Option<String> {
    http(
        port,
        &format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"),
    )
}

/// A call to etcd's JSON gateway: `POST` with an empty request object.
fn post(port: u16, path: &str) -> Option<String> {
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\n\r\n{{}}"
    );
    http(port, &request)
}

/// One HTTP/1.0 exchange; the body of a 200 answer.
fn http(port: u16, request: &str) -> Option<String> {
    let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    conn.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    conn.write_all(request.as_bytes()).ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then_some(())
        .or_else(|| head.starts_with("HTTP/1.1 200").then_some(()))?;
    Some(body.to_owned())
}

/// The string value of the first `"field":"…"` in a JSON text (the gateway writes 64-bit ids
/// as strings).
fn json_string(json: &str, field: &str) -> Option<String> {
    let start = json.find(&format!("\"{field}\":\""))? + field.len() + 4;
    let end = start + json[start..].find('"')?;
    Some(json[start..end].to_owned())
}
