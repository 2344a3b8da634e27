//! A Redis Cluster on loopback: three primaries and three replicas, each a `redis-server` with
//! its own free client port, free cluster-bus port (`--cluster-port`, so the bus is not
//! `port + 10000`, which may be taken or out of range) and temp dir, joined by
//! `redis-cli --cluster create … --cluster-replicas 1 --cluster-yes`, stopped by pid when
//! dropped. Ready when every node says `cluster_state:ok` and knows all six; a wait that runs
//! out panics with every node's log.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::redis_sentinel::at_exit;
use crate::redis_server::{free_port, RedisServer};
use crate::resp::command;
use crate::tls::Certificates;

/// `cluster-node-timeout`: how long a primary may be unreachable before its replica takes
/// over. Short, so failovers are quick.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(1000);

/// How long the cluster has to form, or to recover from a failover.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Three primaries and three replicas on `127.0.0.1`.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// Each node's TLS port, in the order of `nodes`; empty unless made by `start_tls`.
    tls_ports: Vec<u16>,
}

impl RedisCluster {
    /// Starts six nodes, makes them a cluster with one replica per primary, and waits until
    /// every node reports the cluster whole. Panics with the logs if it does not within 30 s,
    /// and with the package to install if `redis-server` or `redis-cli` is missing.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// As [`start`](Self::start), with TLS: each node also listens on a TLS port of its own
    /// with `certs` (clients are not asked for certificates), and the nodes talk to each other
    /// over TLS (`tls-cluster`, `tls-replication`). The cluster is made over TLS, so a client
    /// that connects over TLS is told the nodes' TLS ports ([`url`](Self::url) is then a
    /// `rediss+cluster://` URL); each node's plain port stays open, which is how readiness is
    /// checked and how [`primary_of`](Self::primary_of) and the rest look.
    pub fn start_tls(certs: &Certificates) -> Self {
        Self::start_with(Some(certs))
    }

    fn start_with(certs: Option<&Certificates>) -> Self {
        let tls_args = |tls_port: u16, certs: &Certificates| -> Vec<String> {
            let path = |p: &std::path::Path| p.display().to_string();
            [
                "--tls-port",
                &tls_port.to_string(),
                "--tls-cert-file",
                &path(&certs.cert),
                "--tls-key-file",
                &path(&certs.key),
                "--tls-ca-cert-file",
                &path(&certs.ca),
                "--tls-auth-clients",
                "no",
                "--tls-cluster",
                "yes",
                "--tls-replication",
                "yes",
            ]
            .map(str::to_owned)
            .to_vec()
        };
        let mut tls_ports = Vec::new();
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                let bus = free_port().to_string();
                let mut args: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    &NODE_TIMEOUT.as_millis().to_string(),
                ]
                .map(str::to_owned)
                .to_vec();
                if let Some(certs) = certs {
                    let tls_port = free_port();
                    tls_ports.push(tls_port);
                    args.extend(tls_args(tls_port, certs));
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                RedisServer::start_with_args(&args)
            })
            .collect();
        let cluster = RedisCluster { nodes, tls_ports };
        let mut create = Command::new("redis-cli");
        if let Some(certs) = certs {
            create.arg("--tls").arg("--cacert").arg(&certs.ca);
        }
        let output = create
            .arg("--cluster")
            .arg("create")
            .args(cluster.client_addrs())
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output();
        let output = match output {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-cli is not installed (the cluster tests create a real cluster with it): \
                 apt-get install redis-tools"
            ),
            Err(e) => panic!("could not run redis-cli: {e}"),
        };
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed ({}):\n{}{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            cluster.logs_of_everything()
        );
        cluster.wait_healthy();
        cluster
    }

    /// `127.0.0.1:PORT` of every node, for clients: the TLS ports on a TLS cluster.
    fn client_addrs(&self) -> Vec<String> {
        let ports = if self.tls_ports.is_empty() {
            self.ports()
        } else {
            self.tls_ports.clone()
        };
        ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// One cluster for every test of this process that only needs a cluster to talk to
    /// (never failed over nor resharded): started by the first caller, stopped when the
    /// process exits (test binaries do not drop statics, so an exit hook kills its nodes by
    /// pid).
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let cluster = RedisCluster::start();
            let pids = cluster.pids();
            let dirs: Vec<PathBuf> = cluster.nodes.iter().map(|n| n.dir().to_owned()).collect();
            at_exit::stop(pids, dirs);
            cluster
        })
    }

    /// `redis+cluster://127.0.0.1:P1,…`: every node, in the URL form `RedisBackend::connect`
    /// takes; on a cluster made by [`start_tls`](Self::start_tls),
    /// `rediss+cluster://127.0.0.1:T1,…` with the nodes' TLS ports.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ports.is_empty() {
            "redis+cluster"
        } else {
            "rediss+cluster"
        };
        format!("{scheme}://{}", self.client_addrs().join(","))
    }

    /// A backend on this cluster (its own connections: one backend is one node).
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

    /// Every node's port.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// The pid of every node's `redis-server`, primaries and replicas (a bench sums their CPU:
    /// replicas do work for every write too).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(RedisServer::pid).collect()
    }

    /// `redis://127.0.0.1:PORT` of every node: the seed list a cluster client takes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The ports of the nodes that are primaries now.
    pub fn primary_ports(&self) -> Vec<u16> {
        self.ports()
            .into_iter()
            .filter(|&port| {
                command(port, &["ROLE"])
                    .is_ok_and(|role| role.items().first().and_then(|r| r.text()) == Some("master"))
            })
            .collect()
    }

    /// The cluster's id of the node on `port` (`CLUSTER MYID`).
    pub fn node_id(&self, port: u16) -> String {
        match command(port, &["CLUSTER", "MYID"]) {
            Ok(id) if id.text().is_some() => id.text().unwrap_or_default().to_owned(),
            other => panic!("CLUSTER MYID on {port}: {other:?}"),
        }
    }

    /// The slot ranges the primary on `port` serves now, lowest first (`CLUSTER SLOTS`).
    pub fn slots_of(&self, port: u16) -> Vec<(i64, i64)> {
        let slots = command(port, &["CLUSTER", "SLOTS"])
            .unwrap_or_else(|e| panic!("CLUSTER SLOTS on {port}: {e}"));
        let mut ranges: Vec<(i64, i64)> = slots
            .items()
            .iter()
            .filter_map(|range| {
                let fields = range.items();
                let served_by = fields.get(2)?.items().get(1)?.int()?;
                (served_by == i64::from(port))
                    .then_some((fields.first()?.int()?, fields.get(1)?.int()?))
            })
            .collect();
        ranges.sort_unstable();
        ranges
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> i64 {
        let port = self.ports()[0];
        match command(port, &["CLUSTER", "KEYSLOT", key]).map(|slot| slot.int()) {
            Ok(Some(slot)) => slot,
            other => panic!("CLUSTER KEYSLOT {key} on {port}: {other:?}"),
        }
    }

    /// The port of the primary that serves `key`'s slot now.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot = self.slot_of(key);
        self.primary_ports()
            .into_iter()
            .find(|&port| {
                self.slots_of(port)
                    .iter()
                    .any(|&(first, last)| (first..=last).contains(&slot))
            })
            .unwrap_or_else(|| panic!("no primary serves slot {slot} of {key}"))
    }

    /// Moves the `count` lowest-numbered slots of the primary on `from` to the primary on
    /// `to` with `redis-cli --cluster reshard` (which moves their keys with `MIGRATE`, slot by
    /// slot, clients meeting `ASK` and then `MOVED`), then waits until the cluster is whole.
    pub fn reshard(&self, from: u16, to: u16, count: usize) {
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("reshard")
            .arg(format!("127.0.0.1:{from}"))
            .args(["--cluster-from", &self.node_id(from)])
            .args(["--cluster-to", &self.node_id(to)])
            .args(["--cluster-slots", &count.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster reshard");
        assert!(
            output.status.success(),
            "redis-cli --cluster reshard failed ({}):\n{}{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.logs_of_everything()
        );
        self.wait_healthy();
    }

    /// A failover as a crash makes it: SIGKILLs the primary on `port`, waits until the
    /// cluster is ok again with its replica promoted, restarts the killed node (it rejoins as a
    /// replica, from its `nodes.conf`) and waits until the cluster is whole. Returns the new
    /// primary's port.
    pub fn fail_over(&mut self, port: u16) -> u16 {
        let at = self
            .nodes
            .iter()
            .position(|node| node.port() == port)
            .expect("a node of this cluster");
        let before = self.primary_ports();
        assert!(
            before.contains(&port),
            "{port} is not a primary: {before:?}"
        );
        self.nodes[at].kill();
        let give_up = Instant::now() + READY_WITHIN;
        let promoted = loop {
            let alive: Vec<u16> = self.ports().into_iter().filter(|&p| p != port).collect();
            let ok = alive.iter().all(|&p| {
                command(p, &["CLUSTER", "INFO"])
                    .ok()
                    .and_then(|info| info.text().map(|t| t.contains("cluster_state:ok")))
                    .unwrap_or(false)
            });
            let primaries: Vec<u16> = self.primary_ports();
            let new: Vec<u16> = primaries
                .iter()
                .copied()
                .filter(|p| !before.contains(p))
                .collect();
            if ok && primaries.len() == 3 && new.len() == 1 {
                break new[0];
            }
            assert!(
                Instant::now() < give_up,
                "no replica took over from {port} within {READY_WITHIN:?}\n{}",
                self.logs_of_everything()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.nodes[at].restart();
        self.wait_healthy();
        promoted
    }

    /// Waits until every node answers `cluster_state:ok` and knows all six nodes, and every
    /// replica is in sync with its primary.
    pub fn wait_healthy(&self) {
        let give_up = Instant::now() + READY_WITHIN;
        loop {
            let why_not = self.ports().into_iter().find_map(|port| {
                let info = command(port, &["CLUSTER", "INFO"]);
                let info = match info.as_ref().ok().and_then(|info| info.text()) {
                    Some(info) => info.to_owned(),
                    None => return Some(format!("node {port} answered CLUSTER INFO {info:?}")),
                };
                let whole = info.contains("cluster_state:ok")
                    && info.contains("cluster_known_nodes:6")
                    && info.contains("cluster_slots_ok:16384");
                if !whole {
                    return Some(format!("node {port}:\n{info}"));
                }
                // A replica that has not synced with its primary yet could not take over
                // from it (its data would be too old to be promoted).
                let replication = command(port, &["INFO", "replication"]);
                let replication = replication
                    .as_ref()
                    .ok()
                    .and_then(|r| r.text())
                    .unwrap_or("");
                let synced = !replication.contains("role:slave")
                    || replication.contains("master_link_status:up");
                (!synced).then(|| format!("replica {port} is not in sync:\n{replication}"))
            });
            let Some(why_not) = why_not else {
                return;
            };
            assert!(
                Instant::now() < give_up,
                "the cluster is not whole within {READY_WITHIN:?}: {why_not}\n{}",
                self.logs_of_everything()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every node's log, for failure messages.
    pub fn logs_of_everything(&self) -> String {
        let mut logs = String::new();
        for node in &self.nodes {
            logs.push_str(&format!(
                "=== cluster node on {} ===\n{}\n",
                node.port(),
                node.log()
            ));
        }
        logs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_nodes_make_a_cluster_of_three_primaries() {
        let cluster = RedisCluster::start();
        assert_eq!(cluster.primary_ports().len(), 3);
    }
}
