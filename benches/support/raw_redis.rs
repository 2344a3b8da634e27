//! The raw `redis` client leasehold is compared with: the same two scripts leasehold runs for
//! one lock+release cycle, called by hand, with nothing around them. Shared by
//! `benches/redis.rs` and `examples/loadtest`.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

/// The ttl every raw cycle asks for (the cycle releases long before it matters).
const TTL: Duration = Duration::from_secs(30);

/// The raw `redis` client on one multiplexed connection: leasehold's own acquire and release
/// scripts and key layout, nothing else. The floor of what a client with fencing tokens can do.
#[derive(Clone)]
pub struct RawRedis {
    conn: ConnectionManager,
    acquire: Arc<Script>,
    release: Arc<Script>,
}

impl RawRedis {
    pub async fn connect(url: &str) -> Self {
        let client = redis::Client::open(url).expect("redis url");
        RawRedis {
            conn: ConnectionManager::new(client)
                .await
                .expect("redis connection"),
            acquire: Arc::new(Script::new(include_str!(
                "../../src/backend/redis/acquire.lua"
            ))),
            release: Arc::new(Script::new(include_str!(
                "../../src/backend/redis/release.lua"
            ))),
        }
    }

    /// Acquire script (`SET NX PX` + fence counter), then release script (compare-and-delete +
    /// `PUBLISH`): the two round trips of a leasehold cycle.
    pub async fn cycle(&self, key: &str) {
        let lock = format!("leasehold:{{{key}}}");
        let owner = format!("{:032x}", rand::random::<u128>());
        let mut conn = self.conn.clone();
        let token: redis::Value = self
            .acquire
            .key(&lock)
            .key(format!("{lock}:fence"))
            .arg(&owner)
            .arg(TTL.as_millis() as u64)
            .arg(0) // no restart quarantine
            .arg(format!("{lock}:acquired"))
            .invoke_async(&mut conn)
            .await
            .expect("acquire script");
        assert!(
            matches!(token, redis::Value::Int(_) | redis::Value::BulkString(_)),
            "a key of its own is free: {token:?}"
        );
        let released: bool = self
            .release
            .key(&lock)
            .arg(&owner)
            .arg(format!("{lock}:released"))
            .invoke_async(&mut conn)
            .await
            .expect("release script");
        assert!(released, "the release script deletes our own key");
    }
}
