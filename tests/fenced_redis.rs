//! Fenced writes on a real `redis-server` (one per test, on a free loopback port): the token
//! check and the write happen in one script, so a stale holder's write is refused and leaves
//! nothing behind, and tokens compare exactly across the whole u64 range. The last test pauses
//! a holder's whole process (SIGSTOP) past its ttl: this test binary, started again to run the
//! `#[ignore]`d entry `child_paused_holder`.

#[path = "support/child.rs"]
mod child;
#[path = "support/clients.rs"]
mod clients;
#[path = "support/paused_holder.rs"]
mod paused_holder;

use std::time::Duration;

use leasehold::testing::{start, unique_key};
use leasehold::{FenceError, FencedScript, LockOptions, RedisFence, StaleToken, Wait};
use leasehold_test_support::RedisServer;
use paused_holder::FencedValue;
use redis::aio::MultiplexedConnection;

async fn client(server: &RedisServer) -> MultiplexedConnection {
    clients::redis(&server.url()).await
}

async fn get(conn: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test]
async fn older_token_is_refused_and_writes_nothing() {
    let server = RedisServer::start();
    let mut conn = client(&server).await;
    let fence = RedisFence::new(unique_key("value"));
    fence.set(&mut conn, 9, "nine").await.unwrap();
    let refused = fence.set(&mut conn, 8, "eight").await.unwrap_err();
    assert_eq!(refused.stale(), Some(StaleToken::new(8, 9)));
    assert_eq!(get(&mut conn, fence.key()).await.as_deref(), Some("nine"));
    assert_eq!(fence.newest(&mut conn).await.unwrap(), Some(9));
}

#[tokio::test]
async fn same_or_newer_token_writes_and_advances_the_fence() {
    let server = RedisServer::start();
    let mut conn = client(&server).await;
    let fence = RedisFence::new(unique_key("value"));
    assert_eq!(fence.newest(&mut conn).await.unwrap(), None);
    fence.set(&mut conn, 5, "a").await.unwrap();
    fence.set(&mut conn, 5, "b").await.unwrap();
    fence.set(&mut conn, 6, "c").await.unwrap();
    assert_eq!(get(&mut conn, fence.key()).await.as_deref(), Some("c"));
    assert_eq!(fence.newest(&mut conn).await.unwrap(), Some(6));
}

#[tokio::test]
async fn tokens_compare_exactly_above_two_to_the_53() {
    let server = RedisServer::start();
    let mut conn = client(&server).await;
    let fence = RedisFence::new(unique_key("value"));
    // As doubles these two are equal, and u64::MAX is no Redis integer.
    fence.set(&mut conn, u64::MAX, "max").await.unwrap();
    let refused = fence.set(&mut conn, u64::MAX - 1, "max-1").await;
    assert_eq!(
        refused.unwrap_err().stale(),
        Some(StaleToken::new(u64::MAX - 1, u64::MAX))
    );
    let fence = RedisFence::new(unique_key("value"));
    fence.set(&mut conn, (1 << 53) + 1, "a").await.unwrap();
    assert!(fence
        .set(&mut conn, 1 << 53, "b")
        .await
        .unwrap_err()
        .is_stale());
    // A shorter decimal is a smaller token, whatever its first digit.
    let fence = RedisFence::new(unique_key("value"));
    fence.set(&mut conn, 10, "ten").await.unwrap();
    assert!(fence
        .set(&mut conn, 9, "nine")
        .await
        .unwrap_err()
        .is_stale());
    assert_eq!(get(&mut conn, fence.key()).await.as_deref(), Some("ten"));
}

#[tokio::test]
async fn fenced_script_runs_the_callers_body_with_its_keys_and_args() {
    let server = RedisServer::start();
    let mut conn = client(&server).await;
    let key = unique_key("account");
    let fence = RedisFence::new(format!("{{{key}}}:balance"));
    let log = format!("{{{key}}}:log");
    let deposit = FencedScript::new(
        "local total = redis.call('INCRBY', KEYS[1], ARGV[1])\n\
         redis.call('RPUSH', KEYS[2], ARGV[2])\n\
         return total",
    );
    let total: i64 = fence
        .run(&mut conn, 3, &deposit, &[&log], &["10", "first"])
        .await
        .unwrap();
    assert_eq!(total, 10);
    let stale = fence
        .run::<_, _, _, i64>(&mut conn, 2, &deposit, &[&log], &["99", "stale"])
        .await;
    assert!(matches!(stale, Err(FenceError::Stale(_))));
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg(&log)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries, ["first"]);
    assert_eq!(get(&mut conn, fence.key()).await.as_deref(), Some("10"));
}

/// Issue 19's scenario: the first holder's lease runs out (no renewal, as if its process had
/// been paused), a second holder takes the key and writes, and then the first one wakes up
/// and writes with its old token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_whose_lease_ran_out_cannot_write_after_the_next_holder() {
    let server = RedisServer::start();
    let first_node = start(server.backend().await).await;
    let second_node = start(server.backend().await).await;
    let mut conn = client(&server).await;
    let key = unique_key("fenced");
    let resource = RedisFence::new(format!("resource:{key}"));
    let ttl = Duration::from_millis(300);

    let first = first_node
        .try_lock(
            &key,
            LockOptions::new().with_ttl(ttl).with_auto_renew(false),
        )
        .await
        .unwrap()
        .expect("the key is free");
    resource
        .set(&mut conn, first.fencing_token(), "first, in time")
        .await
        .unwrap();
    // The second holder waits for the first one's lease to expire (a bounded wait, not a sleep).
    let second = second_node
        .lock(
            &key,
            LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    assert!(second.fencing_token() > first.fencing_token());
    resource
        .set(&mut conn, second.fencing_token(), "second")
        .await
        .unwrap();

    let late = resource
        .set(&mut conn, first.fencing_token(), "first, too late")
        .await
        .unwrap_err();
    assert_eq!(
        late.stale(),
        Some(StaleToken::new(
            first.fencing_token(),
            second.fencing_token()
        ))
    );
    assert_eq!(
        get(&mut conn, resource.key()).await.as_deref(),
        Some("second")
    );
    drop(first);
    second.release().await.unwrap();
    first_node.shutdown().await;
    second_node.shutdown().await;
}

/// Issue 19's scenario with a real pause (`support/paused_holder.rs`): a holder process is
/// frozen (SIGSTOP) past its ttl, the next holder writes, and the frozen one's late write is
/// refused, leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_process_paused_past_its_ttl_cannot_write_after_the_next_holder() {
    let server = RedisServer::start();
    let node = start(server.backend().await).await;
    let key = unique_key("paused");
    let resource = format!("resource:{key}");
    let mut value = FencedKey::new(client(&server).await, &resource);
    paused_holder::parent_side(
        "child_paused_holder",
        &[(ENV_REDIS, server.url())],
        &node,
        &key,
        &resource,
        &mut value,
    )
    .await;
    node.shutdown().await;
}

/// The child side of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by holder_process_paused_past_its_ttl_cannot_write_after_the_next_holder"]
async fn child_paused_holder() {
    let url = child::var(ENV_REDIS);
    let conn = clients::redis(&url).await;
    let mut value = FencedKey::new(conn, &child::var(paused_holder::ENV_RESOURCE));
    paused_holder::child_side(clients::redis_locks(&url).await, &mut value).await;
}

/// The Redis server, for the child.
const ENV_REDIS: &str = "FENCED_CHILD_REDIS";

/// A Redis key written through its `RedisFence`.
struct FencedKey {
    conn: MultiplexedConnection,
    fence: RedisFence,
}

impl FencedKey {
    fn new(conn: MultiplexedConnection, key: &str) -> Self {
        FencedKey {
            conn,
            fence: RedisFence::new(key),
        }
    }
}

impl FencedValue for FencedKey {
    async fn write(&mut self, token: u64, value: &str) -> Result<(), StaleToken> {
        match self.fence.set(&mut self.conn, token, value).await {
            Ok(()) => Ok(()),
            Err(FenceError::Stale(stale)) => Err(stale),
            Err(e) => panic!("fenced SET of {}: {e}", self.fence.key()),
        }
    }

    async fn read(&mut self) -> Option<String> {
        get(&mut self.conn, self.fence.key()).await
    }
}
