//! The plain raw lock leasehold is compared with on Redis: [`PlainRawLock`], what a user would
//! write by hand with the `redis` crate and no fencing — `SET key token NX PX ttl`, then a
//! compare-and-delete script, on one `ConnectionManager`. (rslock is the other client peer.)
//!
//! The peer that shows what the actors cost is leasehold's own store calls without them:
//! [`harness::backend_cycle`](crate::harness::backend_cycle) on a
//! [`RedisBackend`](leasehold::RedisBackend), which always runs the scripts the library runs.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
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
#[derive(Clone)]
pub struct PlainRawLock {
    conn: ConnectionManager,
    release: Arc<Script>,
}

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
