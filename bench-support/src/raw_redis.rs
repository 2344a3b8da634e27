//! The plain raw lock leasehold is compared with on Redis: [`PlainRawLock`], what a user would
//! write by hand with the `redis` crate and no fencing — `SET key token NX PX ttl`, then a
//! compare-and-delete script, on one `ConnectionManager`; on Redis Cluster the same on the
//! crate's cluster connection, [`PlainRawClusterLock`]. (rslock is the other client peer.)
//!
//! The peer that shows what the actors cost is leasehold's own store calls without them:
//! [`harness::backend_cycle`](crate::harness::backend_cycle) on a
//! [`RedisBackend`](leasehold::RedisBackend), which always runs the scripts the library runs.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::Script;

/// Deletes the key only if it still holds our token: the classic single-instance release.
const COMPARE_AND_DELETE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// A plain lock on the raw `redis` client: one `SET NX PX` to take it, one compare-and-delete
/// script (run by SHA, loaded on first use) to release it. No fencing token, no notices.
/// Generic over the connection: one server's `ConnectionManager`, or a cluster's connection
/// ([`PlainRawClusterLock`]), which sends each call to its key's primary.
#[derive(Clone)]
pub struct PlainRawLock<C = ConnectionManager> {
    conn: C,
    release: Arc<Script>,
}

/// [`PlainRawLock`] on Redis Cluster: the same two calls on the `redis` crate's cluster
/// connection (one key per call, so no hash tag is needed).
pub type PlainRawClusterLock = PlainRawLock<ClusterConnection>;

impl PlainRawLock {
    /// Connects to `url` with one multiplexed, self-reconnecting connection.
    pub async fn connect(url: &str) -> Self {
        let client = redis::Client::open(url).expect("redis url");
        PlainRawLock {
            conn: ConnectionManager::new(client)
                .await
                .expect("redis connection"),
            release: Arc::new(Script::new(COMPARE_AND_DELETE)),
        }
    }
}

impl PlainRawClusterLock {
    /// Connects to the cluster whose nodes (some or all) are `urls`, `redis://host:port` each,
    /// with the crate's multiplexed cluster connection.
    pub async fn connect_cluster(urls: &[String]) -> Self {
        let client = ClusterClient::new(urls.to_vec()).expect("redis cluster urls");
        PlainRawLock {
            conn: client
                .get_async_connection()
                .await
                .expect("redis cluster connection"),
            release: Arc::new(Script::new(COMPARE_AND_DELETE)),
        }
    }
}

impl<C: ConnectionLike + Clone + Send + Sync> PlainRawLock<C> {
    /// Takes `key` for `ttl` with a fresh random token, then releases it.
    pub async fn cycle(&self, key: &str, ttl: Duration) {
        let token = format!("{:032x}", rand::random::<u128>());
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut conn)
            .await
            .expect("SET NX PX");
        assert!(set.is_some(), "{key} is a key of its own, and free");
        let deleted: i64 = self
            .release
            .key(key)
            .arg(&token)
            .invoke_async(&mut conn)
            .await
            .expect("compare-and-delete script");
        assert_eq!(deleted, 1, "the script deletes our own key");
    }
}
