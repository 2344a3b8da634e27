//! Fenced transactions on a real PostgreSQL (one server per test, on a free loopback
//! port, made by `initdb` in a temp dir): the fence row is advanced first in the caller's
//! transaction, so a stale holder's transaction is refused before it writes anything. The test
//! with a holder process paused (SIGSTOP) past its ttl runs this test binary again for the
//! `#[ignore]`d entry `child_paused_holder`, and takes its locks from a real `redis-server`
//! (there is no PostgreSQL lock backend).

#[path = "support/child.rs"]
mod child;
#[path = "support/clients.rs"]
mod clients;
#[path = "support/paused_holder.rs"]
mod paused_holder;

use std::time::Duration;

use leasehold::testing::{start, unique_key};
use leasehold::{FenceError, LockOptions, MemoryBackend, PgFence, StaleToken, Wait};
use leasehold_test_support::{PostgresServer, RedisServer};
use paused_holder::FencedValue;
use tokio_postgres::Client;

async fn connect(server: &PostgresServer) -> Client {
    clients::postgres(&server.url()).await
}

/// A fence table and a `resources` table (name → value), fresh for the test.
async fn setup(server: &PostgresServer) -> (Client, PgFence) {
    let client = connect(server).await;
    let fence = PgFence::new();
    fence.create_table(&client).await.unwrap();
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS resources (name text PRIMARY KEY, value text)")
        .await
        .unwrap();
    (client, fence)
}

async fn write(
    client: &mut Client,
    fence: &PgFence,
    name: &str,
    token: u64,
    value: &str,
) -> Result<(), leasehold::FenceError<tokio_postgres::Error>> {
    let tx = fence.transaction(client, name, token).await?;
    tx.execute(
        "INSERT INTO resources (name, value) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        &[&name, &value],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    Ok(())
}

async fn value(client: &Client, name: &str) -> Option<String> {
    client
        .query_opt("SELECT value FROM resources WHERE name = $1", &[&name])
        .await
        .unwrap()
        .map(|row| row.get(0))
}

#[tokio::test]
async fn older_token_is_refused_and_writes_nothing() {
    let server = PostgresServer::start();
    let (mut client, fence) = setup(&server).await;
    let name = unique_key("value");
    write(&mut client, &fence, &name, 9, "nine").await.unwrap();
    let refused = write(&mut client, &fence, &name, 8, "eight")
        .await
        .unwrap_err();
    assert_eq!(refused.stale(), Some(StaleToken::new(8, 9)));
    assert_eq!(value(&client, &name).await.as_deref(), Some("nine"));
    assert_eq!(fence.newest(&client, &name).await.unwrap(), Some(9));
}

#[tokio::test]
async fn same_or_newer_token_writes_and_advances_the_fence() {
    let server = PostgresServer::start();
    let (mut client, fence) = setup(&server).await;
    let name = unique_key("value");
    assert_eq!(fence.newest(&client, &name).await.unwrap(), None);
    write(&mut client, &fence, &name, 5, "a").await.unwrap();
    write(&mut client, &fence, &name, 5, "b").await.unwrap();
    write(&mut client, &fence, &name, 6, "c").await.unwrap();
    assert_eq!(value(&client, &name).await.as_deref(), Some("c"));
    assert_eq!(fence.newest(&client, &name).await.unwrap(), Some(6));
}

#[tokio::test]
async fn tokens_compare_exactly_across_the_u64_range() {
    let server = PostgresServer::start();
    let (mut client, fence) = setup(&server).await;
    let name = unique_key("value");
    // Past i64::MAX, where a bigint column would have overflowed.
    write(&mut client, &fence, &name, u64::MAX, "max")
        .await
        .unwrap();
    let refused = write(&mut client, &fence, &name, u64::MAX - 1, "x").await;
    assert_eq!(
        refused.unwrap_err().stale(),
        Some(StaleToken::new(u64::MAX - 1, u64::MAX))
    );
    assert_eq!(fence.newest(&client, &name).await.unwrap(), Some(u64::MAX));
    assert_eq!(value(&client, &name).await.as_deref(), Some("max"));
}

#[tokio::test]
async fn a_rolled_back_transaction_takes_its_fence_advance_back() {
    let server = PostgresServer::start();
    let (mut client, fence) = setup(&server).await;
    let name = unique_key("value");
    write(&mut client, &fence, &name, 3, "three").await.unwrap();
    let tx = fence.transaction(&mut client, &name, 7).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(fence.newest(&client, &name).await.unwrap(), Some(3));
    write(&mut client, &fence, &name, 4, "four").await.unwrap();
}

#[tokio::test]
async fn a_custom_table_name_is_quoted() {
    let server = PostgresServer::start();
    let client = connect(&server).await;
    let fence = PgFence::with_table("Fences; DROP TABLE x");
    fence.create_table(&client).await.unwrap();
    let mut client = client;
    let tx = fence.transaction(&mut client, "r", 1).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(fence.newest(&client, "r").await.unwrap(), Some(1));
}

/// Issue 19's scenario: the first holder's lease runs out (no renewal, as if its process had
/// been paused), a second holder takes the key and writes, and then the first one wakes up
/// and writes with its old token. The locks come from leasehold's in-process store (there is
/// no PostgreSQL lock backend); the tokens are checked by PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_whose_lease_ran_out_cannot_write_after_the_next_holder() {
    let server = PostgresServer::start();
    let (mut client, fence) = setup(&server).await;
    let store = MemoryBackend::new();
    let first_node = start(store.clone()).await;
    let second_node = start(store).await;
    let key = unique_key("fenced");
    let ttl = Duration::from_millis(300);

    let first = first_node
        .try_lock(
            &key,
            LockOptions::new().with_ttl(ttl).with_auto_renew(false),
        )
        .await
        .unwrap()
        .expect("the key is free");
    write(
        &mut client,
        &fence,
        &key,
        first.fencing_token(),
        "first, in time",
    )
    .await
    .unwrap();
    let second = second_node
        .lock(
            &key,
            LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    assert!(second.fencing_token() > first.fencing_token());
    write(&mut client, &fence, &key, second.fencing_token(), "second")
        .await
        .unwrap();

    let late = write(
        &mut client,
        &fence,
        &key,
        first.fencing_token(),
        "first, too late",
    )
    .await
    .unwrap_err();
    assert_eq!(
        late.stale(),
        Some(StaleToken::new(
            first.fencing_token(),
            second.fencing_token()
        ))
    );
    assert_eq!(value(&client, &key).await.as_deref(), Some("second"));
    drop(first);
    second.release().await.unwrap();
    first_node.shutdown().await;
    second_node.shutdown().await;
}

/// Sessions of this server waiting for a lock (a row lock, here: the fence row).
async fn waiting_for_a_lock(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The race the row lock settles: an older holder's transaction that reaches the fence while a
/// newer holder's transaction has it waits, and is refused once the newer one commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_transaction_waiting_behind_a_newer_one_is_refused_when_it_commits() {
    let server = PostgresServer::start();
    let (mut newer_client, fence) = setup(&server).await;
    let mut older_client = connect(&server).await;
    let watcher = connect(&server).await;
    let name = unique_key("value");
    write(&mut newer_client, &fence, &name, 3, "three")
        .await
        .unwrap();

    let newer = fence
        .transaction(&mut newer_client, &name, 6)
        .await
        .unwrap();
    let older = tokio::spawn({
        let (fence, name) = (fence.clone(), name.clone());
        async move { write(&mut older_client, &fence, &name, 5, "five, late").await }
    });
    leasehold::testing::eventually(
        "the older transaction waits for the fence row",
        Duration::from_secs(10),
        || async { waiting_for_a_lock(&watcher).await == 1 },
    )
    .await;
    assert!(!older.is_finished());
    newer
        .execute(
            "INSERT INTO resources (name, value) VALUES ($1, 'six')
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&name],
        )
        .await
        .unwrap();
    newer.commit().await.unwrap();

    let refused = older.await.unwrap().unwrap_err();
    assert_eq!(refused.stale(), Some(StaleToken::new(5, 6)));
    assert_eq!(value(&watcher, &name).await.as_deref(), Some("six"));
}

/// `execute` pipelines the caller's statements behind the fence statement: for a stale token
/// they run, and are rolled back with the refused transaction.
#[tokio::test]
async fn pipelined_statements_of_a_stale_token_are_rolled_back() {
    let server = PostgresServer::start();
    let (mut client, fence) = setup(&server).await;
    let name = unique_key("value");
    let upsert = client
        .prepare(
            "INSERT INTO resources (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        )
        .await
        .unwrap();
    let counts = fence
        .execute(&mut client, &name, 9, &[(&upsert, &[&name, &"nine"])])
        .await
        .unwrap();
    assert_eq!(counts, [1]);
    let refused = fence
        .execute(&mut client, &name, 8, &[(&upsert, &[&name, &"eight"])])
        .await
        .unwrap_err();
    assert_eq!(refused.stale(), Some(StaleToken::new(8, 9)));
    assert_eq!(value(&client, &name).await.as_deref(), Some("nine"));
    fence
        .execute(&mut client, &name, 10, &[(&upsert, &[&name, &"ten"])])
        .await
        .unwrap();
    assert_eq!(value(&client, &name).await.as_deref(), Some("ten"));
    assert_eq!(fence.newest(&client, &name).await.unwrap(), Some(10));
}

/// Issue 19's scenario with a real pause (`support/paused_holder.rs`): a holder process is
/// frozen (SIGSTOP) past its ttl, the next holder writes, and the frozen one's late write is
/// refused, leaving nothing. The locks come from Redis, the tokens are checked by PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_process_paused_past_its_ttl_cannot_write_after_the_next_holder() {
    let server = PostgresServer::start();
    let locks = RedisServer::start();
    let (client, fence) = setup(&server).await;
    let node = start(locks.backend().await).await;
    let key = unique_key("paused");
    let mut row = FencedRow {
        client,
        fence,
        name: format!("resource/{key}"),
    };
    let name = row.name.clone();
    paused_holder::parent_side(
        "child_paused_holder",
        &[(ENV_POSTGRES, server.url()), (ENV_REDIS, locks.url())],
        &node,
        &key,
        &name,
        &mut row,
    )
    .await;
    node.shutdown().await;
}

/// The child side of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by holder_process_paused_past_its_ttl_cannot_write_after_the_next_holder"]
async fn child_paused_holder() {
    let mut row = FencedRow {
        client: clients::postgres(&child::var(ENV_POSTGRES)).await,
        fence: PgFence::new(),
        name: child::var(paused_holder::ENV_RESOURCE),
    };
    let node = clients::redis_locks(&child::var(ENV_REDIS)).await;
    paused_holder::child_side(node, &mut row).await;
}

/// The PostgreSQL server and the Redis server of the locks, for the child.
const ENV_POSTGRES: &str = "FENCED_CHILD_POSTGRES";
const ENV_REDIS: &str = "FENCED_CHILD_REDIS";

/// A row of `resources` written through a `PgFence`.
struct FencedRow {
    client: Client,
    fence: PgFence,
    name: String,
}

impl FencedValue for FencedRow {
    async fn write(&mut self, token: u64, value: &str) -> Result<(), StaleToken> {
        match write(&mut self.client, &self.fence, &self.name, token, value).await {
            Ok(()) => Ok(()),
            Err(FenceError::Stale(stale)) => Err(stale),
            Err(e) => panic!("fenced write of {}: {e}", self.name),
        }
    }

    async fn read(&mut self) -> Option<String> {
        value(&self.client, &self.name).await
    }
}
