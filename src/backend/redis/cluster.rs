//! A Redis Cluster: the `redis` crate's cluster connection runs each script on the primary of
//! its keys' slot, and follows `MOVED` and `ASK` (a slot migration) and failovers by itself.
//!
//! Every key of one lock (`P{K}`, `P{K}:fence`, a semaphore's `P{K}:permits`…) has the hash
//! tag `K`, so one lock's keys live in one slot and each script touches one slot, as Cluster
//! requires. Two things are server-wide and so not for Cluster: the restart quarantine's epoch
//! key, and replica acknowledgement (`WAIT` answers for the node it runs on, and the cluster
//! connection sends it to every node); [`with_replica_ack`](super::RedisBackend::with_replica_ack)
//! refuses a Cluster backend.
//!
//! Release notices and `watch` use Redis's classic pub/sub, which a Cluster carries to every
//! node: the backend subscribes on one node, the first of the current primaries (from
//! `CLUSTER SLOTS`) that takes the connection, and a subscription that breaks with its node
//! connects again, to another.
//!
//! # URL
//! ```text
//! redis+cluster://[[user]:password@]host:port[,host:port…]
//! rediss+cluster://…   the same over TLS
//! ```
//! The hosts are some of the cluster's nodes (the connection learns the others); every node
//! takes the same user and password. Other settings (TLS certificates, RESP3) go through
//! [`RedisBackend::connect_cluster`](super::RedisBackend::connect_cluster), which takes the
//! `redis` crate's own [`ConnectionInfo`]s.

use redis::aio::PubSub;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult, Value,
};
use tokio::time::timeout;

use super::connection::RESPONSE_TIMEOUT;
use super::CONNECT_TIMEOUT;

/// The URL schemes of the Cluster form, plain and TLS.
pub(super) const SCHEMES: [&str; 2] = ["redis+cluster://", "rediss+cluster://"];

/// Parses the URL form in the module docs into one `ConnectionInfo` per node; the error says
/// what is wrong (the caller names the URL, password hidden).
pub(super) fn parse_url(url: &str) -> Result<Vec<ConnectionInfo>, String> {
    let (rest, scheme) = if let Some(rest) = url.strip_prefix(SCHEMES[0]) {
        (rest, "redis")
    } else if let Some(rest) = url.strip_prefix(SCHEMES[1]) {
        (rest, "rediss")
    } else {
        return Err(format!(
            "the scheme is not {} or {}",
            SCHEMES[0], SCHEMES[1]
        ));
    };
    if rest.contains('/') || rest.contains('?') {
        return Err("a cluster URL has no path or query (a cluster has only database 0)".into());
    }
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), rest),
    };
    hosts
        .split(',')
        .map(|host| {
            let (name, port) = host
                .rsplit_once(':')
                .ok_or_else(|| format!("node {host:?} has no port"))?;
            if name.is_empty() {
                return Err(format!("node {host:?} has no host"));
            }
            if !port.parse::<u16>().is_ok_and(|port| port > 0) {
                return Err(format!("node {host:?} has a bad port"));
            }
            format!("{scheme}://{credentials}{name}:{port}")
                .into_connection_info()
                .map_err(|error| format!("node {host:?}: {error}"))
        })
        .collect()
}

/// A cluster client with the backend's timeouts.
pub(super) fn client(nodes: Vec<ConnectionInfo>) -> RedisResult<ClusterClient> {
    ClusterClientBuilder::new(nodes)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        // A call made during a failover waits for the new primary a few times, not forever:
        // the lease's deadline is the limit that matters.
        .retries(3)
        .build()
}

/// What opens pub/sub connections to the cluster's nodes: the settings of the first node
/// given (user, password, TLS), with the address of a node that serves now.
pub(super) struct ClusterSetup {
    pub(super) template: ConnectionInfo,
}

impl ClusterSetup {
    /// A pub/sub connection on the first current primary that takes one. Classic pub/sub
    /// messages reach every node of a cluster, so any node hears every release.
    pub(super) async fn pubsub(&self, conn: &ClusterConnection) -> RedisResult<PubSub> {
        let mut last = None;
        for (host, port) in primaries(conn).await? {
            let info = self.node(host, port);
            let opening = async { Client::open(info)?.get_async_pubsub().await };
            match timeout(CONNECT_TIMEOUT, opening).await {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(error)) => last = Some(error),
                Err(_) => last = Some(timed_out("opening a pub/sub connection")),
            }
        }
        Err(last.unwrap_or_else(|| timed_out("finding a primary")))
    }

    fn node(&self, host: String, port: u16) -> ConnectionInfo {
        let addr = match self.template.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        self.template.clone().set_addr(addr)
    }
}

fn timed_out(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} on the cluster took over {CONNECT_TIMEOUT:?}"),
    ))
}

/// The addresses of the cluster's primaries now, one per shard, from `CLUSTER SLOTS`.
pub(super) async fn primaries(conn: &ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let slots: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn.clone())
        .await?;
    let mut found: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = slots else {
        return Ok(found);
    };
    for range in ranges {
        // [first slot, last slot, [host, port, id, …] of the primary, replicas…]
        let Value::Array(fields) = range else {
            continue;
        };
        let Some(Value::Array(primary)) = fields.get(2) else {
            continue;
        };
        let host = match primary.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            _ => continue,
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        if !found.iter().any(|(h, p)| *h == host && *p == port) {
            found.push((host, port));
        }
    }
    Ok(found)
}

/// Every key matching `pattern` on every primary (`SCAN` on each: the cluster connection sends
/// a plain `SCAN` to one node only). A key may come more than once.
pub(super) async fn scan(conn: &ClusterConnection, pattern: &str) -> RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    for (host, port) in primaries(conn).await? {
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port,
            });
            let reply = conn.clone().route_command(scan, route).await?;
            let (next, batch): (u64, Vec<String>) = redis::from_redis_value(reply)?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(keys)
}
