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
//! Notices use sharded pub/sub (Redis 7): the scripts `SPUBLISH` (see `lua.rs`), and the
//! backend's notice task and each election observer `SSUBSCRIBE` through a cluster connection
//! of their own, over RESP3, which sends each subscription to its channel's shard and passes
//! the messages on. A notice thus stays on its shard instead of crossing the cluster bus to
//! every node. When a node connection breaks, or a slot moves away from the shard a
//! subscription is on (the server then drops it), the subscriptions end as a broken
//! connection ends them on one server: the waiters look at their keys again and subscribe
//! anew, on the slot's shard now. Sharded pub/sub has no patterns, so `watch` (which needs
//! them to see every key under a prefix) is not available on a cluster.
//!
//! # URL
//! ```text
//! redis+cluster://[[user]:password@]host:port[,host:port…]
//! rediss+cluster://…   the same over TLS
//! ```
//! The hosts are some of the cluster's nodes (the connection learns the others); every node
//! takes the same user and password. Other settings (TLS certificates, timeouts) go through
//! [`RedisBackend::connect_cluster`](super::RedisBackend::connect_cluster), which takes the
//! `redis` crate's own [`ConnectionInfo`]s, or
//! [`RedisBackend::connect_cluster_with`](super::RedisBackend::connect_cluster_with), which
//! takes its [`ClusterClientBuilder`].

use futures::stream::BoxStream;
use futures::StreamExt;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ConnectionInfo, IntoConnectionInfo, Msg, ProtocolVersion, PushInfo, PushKind};
use redis::{RedisResult, Value};
use tokio::sync::mpsc;

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
    builder(nodes).build()
}

/// The builder of the backend's cluster clients on `nodes`: the backend's timeouts.
pub(super) fn builder(nodes: Vec<ConnectionInfo>) -> ClusterClientBuilder {
    ClusterClientBuilder::new(nodes)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        // A call made during a failover waits for the new primary a few times, not forever:
        // the lease's deadline is the limit that matters.
        .retries(3)
}

/// Makes the builder of each cluster client the backend opens (the scripts' one, and one per
/// sharded pub/sub connection): the `redis` crate's builder is not `Clone`.
pub(super) type MakeBuilder = dyn Fn() -> ClusterClientBuilder + Send + Sync;

/// What opens sharded pub/sub connections.
pub(super) struct ClusterSetup {
    pub(super) make: Box<MakeBuilder>,
}

impl ClusterSetup {
    /// A cluster connection of its own for sharded pub/sub (RESP3, its messages to `pushes`).
    pub(super) async fn sharded(&self) -> RedisResult<Sharded> {
        let (sender, pushes) = mpsc::unbounded_channel();
        let client = (self.make)()
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(sender)
            .build()?;
        let conn = client.get_async_connection().await?;
        Ok(Sharded { conn, pushes })
    }
}

/// A cluster connection for sharded pub/sub and what it hears: messages on the channels it
/// subscribed to, confirmations, subscriptions the servers dropped, broken node connections.
pub(super) struct Sharded {
    pub(super) conn: ClusterConnection,
    pub(super) pushes: mpsc::UnboundedReceiver<PushInfo>,
}

impl Sharded {
    /// The messages on the subscribed channels, ending when a node connection breaks or a
    /// server drops a subscription (its slot moved): notices may have been missed then.
    pub(super) fn into_messages(self) -> BoxStream<'static, Msg> {
        futures::stream::unfold(self, |mut sharded| async move {
            loop {
                let push = sharded.pushes.recv().await?;
                if matches!(push.kind, PushKind::Disconnection | PushKind::SUnsubscribe) {
                    return None;
                }
                if let Some(message) = Msg::from_push_info(push) {
                    return Some((message, sharded));
                }
            }
        })
        .boxed()
    }
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
