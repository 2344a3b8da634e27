//! Fenced writes on a real etcd (one member per test, on free loopback ports): the caller's
//! operations run in one transaction guarded by the resource's fence key, so a stale holder's
//! write is refused and leaves nothing behind. The last test pauses a holder's whole process
//! (SIGSTOP) past its ttl: this test binary, started again to run the `#[ignore]`d entry
//! `child_paused_holder`.

#[path = "support/child.rs"]
mod child;
#[path = "support/clients.rs"]
mod clients;
#[path = "support/paused_holder.rs"]
mod paused_holder;

use std::time::Duration;

use etcd_client::{Compare, CompareOp, KvClient, Txn, TxnOp, TxnOpResponse};
use leasehold::testing::{start, unique_key};
use leasehold::{EtcdFence, EtcdMode, FenceError, LockOptions, StaleToken, Wait};
use leasehold_test_support::EtcdServer;
use paused_holder::FencedValue;

async fn kv(server: &EtcdServer) -> KvClient {
    clients::etcd_kv(&server.endpoint()).await
}

async fn get(kv: &mut KvClient, key: &str) -> Option<String> {
    let response = kv.get(key, None).await.unwrap();
    response
        .kvs()
        .first()
        .map(|kv| kv.value_str().unwrap().to_owned())
}

#[tokio::test]
async fn older_token_is_refused_and_writes_nothing() {
    let server = EtcdServer::start();
    let mut kv = kv(&server).await;
    let key = unique_key("value");
    let fence = EtcdFence::new(format!("fence/{key}"));
    fence
        .run(&mut kv, 9, [TxnOp::put(key.as_str(), "nine", None)])
        .await
        .unwrap();
    let refused = fence
        .run(&mut kv, 8, [TxnOp::put(key.as_str(), "eight", None)])
        .await
        .unwrap_err();
    assert_eq!(refused.stale(), Some(StaleToken::new(8, 9)));
    assert_eq!(get(&mut kv, &key).await.as_deref(), Some("nine"));
    assert_eq!(fence.newest(&mut kv).await.unwrap(), Some(9));
}

#[tokio::test]
async fn same_or_newer_token_writes_and_returns_the_callers_responses() {
    let server = EtcdServer::start();
    let mut kv = kv(&server).await;
    let key = unique_key("value");
    let fence = EtcdFence::new(format!("fence/{key}"));
    assert_eq!(fence.newest(&mut kv).await.unwrap(), None);
    fence
        .run(&mut kv, 5, [TxnOp::put(key.as_str(), "a", None)])
        .await
        .unwrap();
    fence
        .run(&mut kv, 5, [TxnOp::put(key.as_str(), "b", None)])
        .await
        .unwrap();
    let responses = fence
        .run(
            &mut kv,
            6,
            [
                TxnOp::put(key.as_str(), "c", None),
                TxnOp::get(key.as_str(), None),
            ],
        )
        .await
        .unwrap();
    assert_eq!(responses.len(), 2);
    let TxnOpResponse::Get(read) = &responses[1] else {
        panic!("the caller's get answers second: {responses:?}");
    };
    assert_eq!(read.kvs()[0].value(), b"c");
    assert_eq!(fence.newest(&mut kv).await.unwrap(), Some(6));
}

#[tokio::test]
async fn tokens_compare_exactly_across_the_u64_range() {
    let server = EtcdServer::start();
    let mut kv = kv(&server).await;
    let key = unique_key("value");
    let fence = EtcdFence::new(format!("fence/{key}"));
    fence
        .run(&mut kv, u64::MAX, [TxnOp::put(key.as_str(), "max", None)])
        .await
        .unwrap();
    let refused = fence
        .run(&mut kv, u64::MAX - 1, [TxnOp::put(key.as_str(), "x", None)])
        .await
        .unwrap_err();
    assert_eq!(
        refused.stale(),
        Some(StaleToken::new(u64::MAX - 1, u64::MAX))
    );
    // 10 after 9 passes: fixed-width digits, not "10" < "9".
    let fence = EtcdFence::new(format!("fence/{key}/small"));
    fence.run(&mut kv, 9, []).await.unwrap();
    fence.run(&mut kv, 10, []).await.unwrap();
    assert!(fence.run(&mut kv, 9, []).await.unwrap_err().is_stale());
}

#[tokio::test]
async fn callers_own_txn_runs_nested_with_its_own_comparisons() {
    let server = EtcdServer::start();
    let mut kv = kv(&server).await;
    let key = unique_key("value");
    let fence = EtcdFence::new(format!("fence/{key}"));
    // Create-if-absent, behind the fence.
    let create = || {
        Txn::new()
            .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), "created", None)])
            .or_else([TxnOp::get(key.as_str(), None)])
    };
    assert!(fence
        .run_txn(&mut kv, 3, create())
        .await
        .unwrap()
        .succeeded());
    assert!(!fence
        .run_txn(&mut kv, 3, create())
        .await
        .unwrap()
        .succeeded());
    assert!(fence
        .run_txn(&mut kv, 2, create())
        .await
        .unwrap_err()
        .is_stale());
    assert_eq!(get(&mut kv, &key).await.as_deref(), Some("created"));
}

/// Issue 19's scenario: the first holder's lease runs out (no renewal, as if its process had
/// been paused), a second holder takes the key and writes, and then the first one wakes up
/// and writes with its old token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_whose_lease_ran_out_cannot_write_after_the_next_holder() {
    let server = EtcdServer::start();
    let first_node = start(server.backend(EtcdMode::Txn).await).await;
    let second_node = start(server.backend(EtcdMode::Txn).await).await;
    let mut kv = kv(&server).await;
    let key = unique_key("fenced");
    let resource = format!("resource/{key}");
    let fence = EtcdFence::new(format!("fence/{key}"));
    // etcd leases are whole seconds.
    let ttl = Duration::from_secs(1);

    let first = first_node
        .try_lock(
            &key,
            LockOptions::new().with_ttl(ttl).with_auto_renew(false),
        )
        .await
        .unwrap()
        .expect("the key is free");
    let write = |value: &str| [TxnOp::put(resource.as_str(), value, None)];
    fence
        .run(&mut kv, first.fencing_token(), write("first, in time"))
        .await
        .unwrap();
    // The second holder waits for the first one's lease to expire (a bounded wait).
    let second = second_node
        .lock(
            &key,
            LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(15))),
        )
        .await
        .unwrap();
    assert!(second.fencing_token() > first.fencing_token());
    fence
        .run(&mut kv, second.fencing_token(), write("second"))
        .await
        .unwrap();

    let late = fence
        .run(&mut kv, first.fencing_token(), write("first, too late"))
        .await
        .unwrap_err();
    assert_eq!(
        late.stale(),
        Some(StaleToken::new(
            first.fencing_token(),
            second.fencing_token()
        ))
    );
    assert_eq!(get(&mut kv, &resource).await.as_deref(), Some("second"));
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
    let server = EtcdServer::start();
    let node = start(server.backend(EtcdMode::Txn).await).await;
    let key = unique_key("paused");
    let resource = format!("resource/{key}");
    let mut value = FencedKey::new(kv(&server).await, &resource);
    paused_holder::parent_side(
        "child_paused_holder",
        &[(ENV_ETCD, server.endpoint())],
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
    let endpoint = child::var(ENV_ETCD);
    let kv = clients::etcd_kv(&endpoint).await;
    let mut value = FencedKey::new(kv, &child::var(paused_holder::ENV_RESOURCE));
    paused_holder::child_side(clients::etcd_locks(&endpoint).await, &mut value).await;
}

/// The etcd endpoint, for the child.
const ENV_ETCD: &str = "FENCED_CHILD_ETCD";

/// An etcd key written through an `EtcdFence` (its fence key beside it).
struct FencedKey {
    kv: KvClient,
    key: String,
    fence: EtcdFence,
}

impl FencedKey {
    fn new(kv: KvClient, key: &str) -> Self {
        FencedKey {
            kv,
            key: key.to_owned(),
            fence: EtcdFence::new(format!("{key}/fence")),
        }
    }
}

impl FencedValue for FencedKey {
    async fn write(&mut self, token: u64, value: &str) -> Result<(), StaleToken> {
        let put = [TxnOp::put(self.key.as_str(), value, None)];
        match self.fence.run(&mut self.kv, token, put).await {
            Ok(_) => Ok(()),
            Err(FenceError::Stale(stale)) => Err(stale),
            Err(e) => panic!("fenced put of {}: {e}", self.key),
        }
    }

    async fn read(&mut self) -> Option<String> {
        get(&mut self.kv, &self.key).await
    }
}
