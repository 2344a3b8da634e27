//! The etcd backend on real `etcd` servers (one per test, on free loopback ports): the whole
//! conformance suite in both modes, then what only etcd can do to a lock — another client
//! deleting its key or revoking its lease, a leader that dies, a cluster that loses quorum and
//! gets it back, etcd's own Lock service holding the same name.

use leasehold_test_support::etcd_server;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, LockOptions as EtcdLockOptions};
use etcd_server::{EtcdCluster, EtcdServer};
use leasehold::testing::{eventually, next_event, start, unique_key};
use leasehold::{
    EtcdBackend, EtcdMode, Fence, LockClient, LockEventKind, LockGuard, LockOptions, LostReason,
    Wait,
};
use tokio::time::{timeout, Instant};

// `EtcdServer::start()` is a temporary of the statement that runs each test, so the server
// lives until the test is over and is stopped when it ends.
mod txn {
    leasehold::conformance_suite!(
        real,
        super::EtcdServer::start()
            .backend(leasehold::EtcdMode::Txn)
            .await
    );
}

mod lock {
    leasehold::conformance_suite!(
        real,
        super::EtcdServer::start()
            .backend(leasehold::EtcdMode::Lock)
            .await
    );
}

mod election {
    leasehold::election_suite!(
        real,
        super::EtcdServer::start()
            .backend(leasehold::EtcdMode::Lock)
            .await
    );
}

mod fair {
    leasehold::fair_suite!(
        real,
        super::EtcdServer::start()
            .backend(leasehold::EtcdMode::Lock)
            .await
    );
}

// In `txn` mode a fair lock's waiters queue beside the lock key; a semaphore's queue is laid
// out the same in both modes.
mod fair_txn {
    leasehold::fair_suite!(
        real,
        super::EtcdServer::start()
            .backend(leasehold::EtcdMode::Txn)
            .await
    );
}

mod semaphore {
    leasehold::semaphore_suite!(
        real,
        super::EtcdServer::start()
            .backend(leasehold::EtcdMode::Txn)
            .await
    );
}

// The semaphore's keys are laid out the same in both modes; in `lock` mode they must stay out
// of the Lock service's contender range of a lock of the same name.
mod semaphore_lock_mode {
    leasehold::semaphore_suite!(
        real,
        super::EtcdServer::start()
            .backend(leasehold::EtcdMode::Lock)
            .await
    );
}

mod rwlock {
    leasehold::rwlock_suite!(
        real,
        super::EtcdServer::start()
            .backend(leasehold::EtcdMode::Txn)
            .await
    );
}

// As a semaphore's, a read-write lock's keys are laid out the same in both modes, apart from
// the Lock service's contender range of a lock of the same name.
mod rwlock_lock_mode {
    leasehold::rwlock_suite!(
        real,
        super::EtcdServer::start()
            .backend(leasehold::EtcdMode::Lock)
            .await
    );
}

const MODES: [EtcdMode; 2] = [EtcdMode::Txn, EtcdMode::Lock];

fn waiting(limit: Duration) -> LockOptions {
    LockOptions::new().with_wait(Wait::UpTo(limit))
}

/// A plain etcd client of the same cluster: "another client" that knows nothing of leasehold.
async fn other_client(endpoints: &[String]) -> Client {
    Client::connect(endpoints, None)
        .await
        .expect("plain client")
}

/// The etcd keys that hold `key`'s lock: the key itself (txn mode), or every contender key
/// under the Lock service's name (lock mode).
async fn lock_keys(
    etcd: &mut Client,
    backend: &EtcdBackend,
    key: &str,
) -> Vec<etcd_client::KeyValue> {
    let answer = match backend.mode() {
        EtcdMode::Lock => {
            let contenders = format!("{}/", backend.lock_key(key));
            etcd.get(contenders, Some(GetOptions::new().with_prefix()))
                .await
        }
        _ => etcd.get(backend.lock_key(key), None).await,
    };
    answer.expect("read lock keys").take_kvs()
}

/// Holds `key` on a fresh node with a 3 s ttl, then lets `interfere` (another client) touch
/// etcd: the next renewal must find out, and `lost()` say `NotOwner`, within the ttl.
async fn lost_when_another_client_interferes<F, Fut>(mode: EtcdMode, interfere: F)
where
    F: FnOnce(Client, Vec<etcd_client::KeyValue>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let server = EtcdServer::start();
    let backend = server.backend(mode).await;
    let node = start(backend.clone()).await;
    let key = unique_key("interfered");
    let ttl = Duration::from_secs(3);
    let held = node
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let mut etcd = other_client(&[server.endpoint()]).await;
    let keys = lock_keys(&mut etcd, &backend, &key).await;
    assert_eq!(keys.len(), 1, "{mode:?}: one key holds the lock");
    interfere(etcd, keys).await;
    let reason = timeout(ttl, held.lost())
        .await
        .expect("loss found by a renewal, before the ttl");
    assert_eq!(reason, LostReason::NotOwner, "{mode:?}");
    assert!(!held.is_held());
    // The key is free for the next holder.
    let next = node.lock(&key, waiting(Duration::from_secs(5))).await;
    assert!(next.is_ok(), "{mode:?}: free after the loss: {next:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_deleted_behind_the_holders_back_is_lost() {
    for mode in MODES {
        lost_when_another_client_interferes(mode, |mut etcd, keys| async move {
            let deleted = etcd.delete(keys[0].key(), None).await.unwrap();
            assert_eq!(deleted.deleted(), 1);
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_behind_the_holders_back_is_lost() {
    for mode in MODES {
        lost_when_another_client_interferes(mode, |mut etcd, keys| async move {
            assert_ne!(keys[0].lease(), 0, "the lock key is on a lease");
            etcd.lease_revoke(keys[0].lease()).await.unwrap();
        })
        .await;
    }
}

/// Two managers with their own clients (two nodes), four tasks each, on one key: nobody is
/// ever inside at the same time as anyone else, and every token is newer than the last.
async fn two_nodes_never_overlap(mode: EtcdMode) {
    const TASKS_PER_NODE: usize = 4;
    const ROUNDS: usize = 6;
    let server = EtcdServer::start();
    let nodes = [
        start(server.backend(mode).await).await,
        start(server.backend(mode).await).await,
    ];
    let key = unique_key("contended");
    let inside = Arc::new(AtomicBool::new(false));
    let entries = Arc::new(AtomicUsize::new(0));
    let fence = Arc::new(Fence::new());
    let mut tasks = Vec::new();
    for node in &nodes {
        for _ in 0..TASKS_PER_NODE {
            let (node, key) = (node.clone(), key.clone());
            let (inside, entries, fence) = (inside.clone(), entries.clone(), fence.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..ROUNDS {
                    let guard = node
                        .lock(&key, waiting(Duration::from_secs(60)))
                        .await
                        .expect("lock");
                    assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                    fence
                        .accept(guard.fencing_token())
                        .expect("token not stale");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    entries.fetch_add(1, Ordering::SeqCst);
                    inside.store(false, Ordering::SeqCst);
                    guard.release().await.expect("release");
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("contender task");
    }
    assert_eq!(entries.load(Ordering::SeqCst), 2 * TASKS_PER_NODE * ROUNDS);
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_contending_never_overlap_in_txn_mode() {
    two_nodes_never_overlap(EtcdMode::Txn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_contending_never_overlap_in_lock_mode() {
    two_nodes_never_overlap(EtcdMode::Lock).await;
}

/// Renewals of `key` (on `node`'s events) until `count` have succeeded.
async fn renewals(
    events: &mut tokio::sync::broadcast::Receiver<leasehold::LockEvent>,
    key: &str,
    count: usize,
) {
    for _ in 0..count {
        next_event(events, Duration::from_secs(20), |e| {
            let ours = e.key.as_deref() == Some(key);
            (ours && matches!(e.kind, LockEventKind::Renewed { .. })).then_some(())
        })
        .await;
    }
}

/// In a 3-member cluster, the leader dies while a lock is held: after the re-election the
/// renewals go on, the lock is never lost nor taken, and the next holder's token is newer.
async fn leader_failover_keeps_the_lock(mode: EtcdMode) {
    let mut cluster = EtcdCluster::start(3);
    let node = start(cluster.backend(mode).await).await;
    let other = start(cluster.backend(mode).await).await;
    let key = unique_key("failover");
    let ttl = Duration::from_secs(3);
    let opts = LockOptions::new().with_ttl(ttl);
    let earlier = node.try_lock(&key, opts.clone()).await.unwrap().unwrap();
    let earlier_token = earlier.fencing_token();
    earlier.release().await.unwrap();
    let held = node.try_lock(&key, opts).await.unwrap().unwrap();
    assert!(held.fencing_token() > earlier_token);
    let mut events = node.events();
    let leader = tokio::task::block_in_place(|| cluster.leader());
    cluster.member(leader).stop();
    tokio::select! {
        reason = held.lost() => panic!("{mode:?}: lost across the failover: {reason}"),
        () = renewals(&mut events, &key, 2) => {}
    }
    assert!(held.is_held());
    let new_leader = tokio::task::block_in_place(|| cluster.leader());
    assert_ne!(new_leader, leader);
    assert!(
        other
            .try_lock(&key, LockOptions::new())
            .await
            .unwrap()
            .is_none(),
        "{mode:?}: another node took a held lock"
    );
    let held_token = held.fencing_token();
    held.release().await.unwrap();
    let next = other
        .lock(&key, waiting(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(
        next.fencing_token() > held_token,
        "{mode:?}: token {} after {held_token}",
        next.fencing_token()
    );
    next.release().await.unwrap();
    node.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_leader_mid_hold_keeps_the_lock_in_txn_mode() {
    leader_failover_keeps_the_lock(EtcdMode::Txn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_leader_mid_hold_keeps_the_lock_in_lock_mode() {
    leader_failover_keeps_the_lock(EtcdMode::Lock).await;
}

/// In a 3-member cluster two members die while a lock is held: no quorum, no renewal. The
/// holder is told `Expired` at its deadline, which comes before etcd could let the lease run
/// out (and so before anyone else could be given the lock).
async fn quorum_loss_is_lost_in_time(mode: EtcdMode) {
    let mut cluster = EtcdCluster::start(3);
    let node = start(cluster.backend(mode).await).await;
    let key = unique_key("quorum");
    // etcd grants ceil(2.5 s) = 3 s.
    let ttl = Duration::from_millis(2500);
    let lease_ttl = Duration::from_secs(3);
    let held = node
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let mut events = node.events();
    let mut deadline = held.deadline().expect("held");
    let leader = tokio::task::block_in_place(|| cluster.leader());
    cluster.member(leader).stop();
    cluster.member((leader + 1) % 3).stop();
    let lost_at = loop {
        let event = next_event(&mut events, ttl * 4, |e| {
            (e.key.as_deref() == Some(key.as_str())).then(|| e.clone())
        })
        .await;
        match event.kind {
            // A leader that has not yet noticed it lost its quorum may still renew.
            LockEventKind::Renewed { deadline: renewed } => deadline = renewed,
            LockEventKind::Lost { reason } => {
                assert_eq!(reason, LostReason::Expired, "{mode:?}");
                break event.instant;
            }
            _ => {}
        }
    };
    assert!(!held.is_held());
    // deadline = sent + ttl × (1 − drift), and etcd's lease runs lease_ttl from after `sent`.
    let store_expiry_at_earliest = deadline - ttl.mul_f64(0.99) + lease_ttl;
    assert!(
        lost_at < store_expiry_at_earliest,
        "{mode:?}: told {:?} after the lease could have expired",
        lost_at - store_expiry_at_earliest
    );
    assert_eq!(held.lost().await, LostReason::Expired);
    drop(held);
    drop(cluster);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_two_of_three_members_is_lost_before_the_lease_expires_in_txn_mode() {
    quorum_loss_is_lost_in_time(EtcdMode::Txn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_two_of_three_members_is_lost_before_the_lease_expires_in_lock_mode() {
    quorum_loss_is_lost_in_time(EtcdMode::Lock).await;
}

/// In a 3-member cluster two members die while a lock is held, and the holder is told it lost
/// it; then both come back. The cluster serves locks again: the lost key to another node once
/// the dead holder's lease has run out there, a fresh key to the node that lost its lock, each
/// with a token newer than every one handed out before.
async fn quorum_back_serves_acquisitions_again(mode: EtcdMode) {
    let mut cluster = EtcdCluster::start(3);
    let node = start(cluster.backend(mode).await).await;
    let other = start(cluster.backend(mode).await).await;
    let key = unique_key("quorum-back");
    let ttl = Duration::from_secs(2);
    let opts = LockOptions::new().with_ttl(ttl);
    let earlier = other.try_lock(&key, opts.clone()).await.unwrap().unwrap();
    let earlier_token = earlier.fencing_token();
    earlier.release().await.unwrap();
    let held = node.try_lock(&key, opts.clone()).await.unwrap().unwrap();
    let newest = held.fencing_token();
    assert!(newest > earlier_token, "{mode:?}");
    let leader = tokio::task::block_in_place(|| cluster.leader());
    let down = [leader, (leader + 1) % 3];
    for member in down {
        cluster.member(member).stop();
    }
    let reason = timeout(ttl * 4, held.lost())
        .await
        .unwrap_or_else(|_| panic!("{mode:?}: no loss without a quorum"));
    assert_eq!(reason, LostReason::Expired, "{mode:?}");
    for member in down {
        tokio::task::block_in_place(|| cluster.member(member).restart());
    }
    // The store may keep the dead holder's key until its lease runs out (a new leader gives
    // every lease its full ttl again): the wait budget covers that, and the reconnections.
    let retaken = opts.with_wait(Wait::UpTo(Duration::from_secs(20)));
    let next = other
        .lock(&key, retaken.clone())
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: the lost key after the quorum came back: {e}"));
    assert!(
        next.fencing_token() > newest,
        "{mode:?}: token {} after the lost {newest}",
        next.fencing_token()
    );
    let fresh = node
        .lock(&unique_key("quorum-fresh"), retaken)
        .await
        .unwrap_or_else(|e| panic!("{mode:?}: a fresh key after the quorum came back: {e}"));
    // Tokens are etcd revisions, which grow across every key of the cluster.
    assert!(
        fresh.fencing_token() > newest,
        "{mode:?}: token {} after {newest}",
        fresh.fencing_token()
    );
    next.release().await.unwrap();
    fresh.release().await.unwrap();
    drop(held);
    node.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_quorum_is_back_locks_are_served_again_in_txn_mode() {
    quorum_back_serves_acquisitions_again(EtcdMode::Txn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_quorum_is_back_locks_are_served_again_in_lock_mode() {
    quorum_back_serves_acquisitions_again(EtcdMode::Lock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoints_give_a_clear_error_within_the_connect_timeout() {
    // A port nobody listens on: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let connect_timeout = Duration::from_secs(1);
    let connecting = EtcdBackend::builder([endpoint.as_str()])
        .with_connect_timeout(connect_timeout)
        .connect();
    let err = timeout(connect_timeout * 3, connecting)
        .await
        .expect("connect gives up by itself")
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        err.to_string().contains(&endpoint),
        "{err} should name {endpoint}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_answer_gives_a_clear_error_within_the_connect_timeout() {
    let server = EtcdServer::start();
    // Accepts connections (the kernel does), answers nothing.
    server.pause();
    let connect_timeout = Duration::from_secs(1);
    let connecting = EtcdBackend::builder([server.endpoint()])
        .with_connect_timeout(connect_timeout)
        .connect();
    let err = timeout(connect_timeout * 3, connecting)
        .await
        .expect("connect gives up by itself")
        .unwrap_err();
    server.resume();
    assert!(err.is_retryable(), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&server.endpoint()), "{message}");
    assert!(message.contains("did not answer within 1s"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_mode_shares_names_with_etcds_lock_service() {
    let server = EtcdServer::start();
    let backend = server.backend(EtcdMode::Lock).await;
    let node = start(backend.clone()).await;
    let key = unique_key("shared");
    // Another program holds the lock through etcd's Lock service, under leasehold's name.
    let mut etcd = other_client(&[server.endpoint()]).await;
    let lease = etcd.lease_grant(30, None).await.unwrap().id();
    let theirs = etcd
        .lock(
            backend.lock_key(&key),
            Some(EtcdLockOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let info = node
        .info(&key)
        .await
        .unwrap()
        .expect("held by the other program");
    assert_eq!(info.metadata, None);
    let started = Instant::now();
    assert!(node
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .is_none());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "try_lock waited"
    );
    let waiter = {
        let (node, key) = (node.clone(), key.clone());
        tokio::spawn(async move { node.lock(&key, waiting(Duration::from_secs(20))).await })
    };
    etcd.unlock(theirs.key()).await.unwrap();
    let guard = waiter
        .await
        .unwrap()
        .expect("leasehold gets it after the unlock");
    assert!(guard.fencing_token() > info.fencing_token);
    // And while leasehold holds it, the Lock service makes the other program wait.
    let lease = etcd.lease_grant(30, None).await.unwrap().id();
    let name = backend.lock_key(&key);
    let mut blocked = etcd.clone();
    let pending = tokio::spawn(async move {
        blocked
            .lock(name, Some(EtcdLockOptions::new().with_lease(lease)))
            .await
    });
    eventually("the other program queues", Duration::from_secs(5), || {
        let (mut etcd, backend, key) = (etcd.clone(), backend.clone(), key.clone());
        async move { lock_keys(&mut etcd, &backend, &key).await.len() == 2 }
    })
    .await;
    assert!(
        !pending.is_finished(),
        "the Lock service gave away a held lock"
    );
    guard.release().await.unwrap();
    let theirs = timeout(Duration::from_secs(10), pending)
        .await
        .expect("the other program gets it after the release")
        .unwrap()
        .unwrap();
    etcd.unlock(theirs.key()).await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_extend_each_other_are_separate_locks() {
    let server = EtcdServer::start();
    for mode in MODES {
        let node: LockClient = start(server.backend(mode).await).await;
        let parent = unique_key("nested");
        let child = format!("{parent}/child");
        let opts = |m: &str| LockOptions::new().with_metadata(m);
        let p = node.try_lock(&parent, opts("parent")).await.unwrap();
        let c = node.try_lock(&child, opts("child")).await.unwrap();
        assert!(p.is_some() && c.is_some(), "{mode:?}: both free");
        let info = node.info(&parent).await.unwrap().unwrap();
        assert_eq!(info.metadata.as_deref(), Some("parent"), "{mode:?}");
        let info = node.info(&child).await.unwrap().unwrap();
        assert_eq!(info.metadata.as_deref(), Some("child"), "{mode:?}");
        drop((p, c));
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_with_a_longer_ttl_moves_the_key_to_a_longer_lease() {
    let server = EtcdServer::start();
    for mode in MODES {
        let backend = server.backend(mode).await;
        let node = start(backend.clone()).await;
        let key = unique_key("longer");
        let held = node
            .try_lock(&key, LockOptions::new().with_ttl(Duration::from_secs(2)))
            .await
            .unwrap()
            .unwrap();
        let mut etcd = other_client(&[server.endpoint()]).await;
        let before = lock_keys(&mut etcd, &backend, &key).await.remove(0);
        // Auto-renewal then runs every 2 s, with the new ttl.
        held.renew(Duration::from_secs(6)).await.unwrap();
        let after = lock_keys(&mut etcd, &backend, &key).await.remove(0);
        assert_ne!(
            after.lease(),
            before.lease(),
            "{mode:?}: moved to a new lease"
        );
        assert_eq!(
            after.create_revision(),
            before.create_revision(),
            "{mode:?}"
        );
        let granted = etcd.lease_time_to_live(after.lease(), None).await.unwrap();
        assert!(granted.granted_ttl() >= 6, "{mode:?}: {granted:?}");
        let old = etcd.lease_time_to_live(before.lease(), None).await.unwrap();
        assert!(old.ttl() < 0, "{mode:?}: the old lease was revoked");
        let info = node.info(&key).await.unwrap().unwrap();
        assert_eq!(info.fencing_token, held.fencing_token(), "{mode:?}");
        assert!(info.remaining_ttl > Duration::from_secs(3), "{mode:?}");
        // Auto-renewal carries on with the new lease.
        let mut events = node.events();
        renewals(&mut events, &key, 1).await;
        assert!(held.is_held());
        held.release().await.unwrap();
        assert!(lock_keys(&mut etcd, &backend, &key).await.is_empty());
        node.shutdown().await;
    }
}

/// Holds `count` keys on `node` with `ttl`, all renewing.
async fn hold_many(node: &LockClient, what: &str, count: usize, ttl: Duration) -> Vec<LockGuard> {
    let mut guards = Vec::with_capacity(count);
    for _ in 0..count {
        let key = unique_key(what);
        let opts = LockOptions::new().with_ttl(ttl);
        guards.push(node.try_lock(&key, opts).await.unwrap().expect("free key"));
    }
    guards
}

/// Waits until every guard's key has been renewed (a `Renewed` event from now on), failing if
/// one of them is lost first.
async fn all_renewed(
    events: &mut tokio::sync::broadcast::Receiver<leasehold::LockEvent>,
    guards: &[LockGuard],
    limit: Duration,
) {
    let mut left: std::collections::HashSet<String> =
        guards.iter().map(|g| g.key().to_owned()).collect();
    while !left.is_empty() {
        let lost = next_event(events, limit, |e| match &e.kind {
            LockEventKind::Renewed { .. } => {
                left.remove(e.key.as_deref().unwrap_or_default());
                Some(None)
            }
            LockEventKind::Lost { reason } => Some(Some((e.key.clone(), *reason))),
            _ => None,
        })
        .await;
        assert_eq!(
            lost, None,
            "a lease was lost while its renewals should go on"
        );
    }
}

/// The member every renewal's keep-alive stream talks to is killed and started again while
/// leases are held: the stream breaks, the renewals waiting on it fail (retryably), and the
/// next ones reopen it, so every lock is kept and renewed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_breaks_the_keep_alive_stream_and_every_lease_is_kept() {
    let mut server = EtcdServer::start();
    for mode in MODES {
        let node = start(server.backend(mode).await).await;
        let ttl = Duration::from_secs(6);
        let guards = hold_many(&node, "stream-restart", 20, ttl).await;
        all_renewed(&mut node.events(), &guards, ttl).await;
        tokio::task::block_in_place(|| server.restart());
        // After the restart each key is renewed again before its deadline, on a new stream
        // (events from a subscription taken now: none from before the kill counts).
        all_renewed(&mut node.events(), &guards, ttl).await;
        assert!(guards.iter().all(LockGuard::is_held), "{mode:?}");
        for guard in guards {
            guard.release().await.unwrap();
        }
        node.shutdown().await;
    }
}

/// In a 3-member cluster each member in turn is killed and restarted while leases are held, so
/// whichever member carries the keep-alive stream is killed once: the locks are kept throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_each_cluster_member_in_turn_keeps_every_lease() {
    let mut cluster = EtcdCluster::start(3);
    let node = start(cluster.backend(EtcdMode::Txn).await).await;
    let ttl = Duration::from_secs(6);
    let guards = hold_many(&node, "stream-cluster", 10, ttl).await;
    for member in 0..cluster.len() {
        cluster.member(member).stop();
        // Subscribed after the kill: only renewals that came after it count.
        all_renewed(&mut node.events(), &guards, ttl).await;
        tokio::task::block_in_place(|| cluster.member(member).restart());
        all_renewed(&mut node.events(), &guards, ttl).await;
    }
    assert!(guards.iter().all(LockGuard::is_held));
    for guard in guards {
        guard.release().await.unwrap();
    }
    node.shutdown().await;
}

/// Another client deletes a held key: the holder's next renewal, at most ttl/3 later, finds it
/// gone, and `lost()` resolves then — not only at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_by_another_client_is_lost_within_a_third_of_the_ttl() {
    deleted_key_is_lost_within_a_third_of_the_ttl(false).await;
}

/// As above, right after the member restarted: the backend's watch over its keys broke and is
/// being reopened, and the loss is still found by the next renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_after_a_member_restart_is_lost_within_a_third_of_the_ttl() {
    deleted_key_is_lost_within_a_third_of_the_ttl(true).await;
}

async fn deleted_key_is_lost_within_a_third_of_the_ttl(restart_first: bool) {
    let mut server = EtcdServer::start();
    for mode in MODES {
        let backend = server.backend(mode).await;
        let node = start(backend.clone()).await;
        let key = unique_key("deleted");
        let ttl = Duration::from_secs(6);
        let held = node
            .try_lock(&key, LockOptions::new().with_ttl(ttl))
            .await
            .unwrap()
            .unwrap();
        let mut etcd = other_client(&[server.endpoint()]).await;
        let keys = lock_keys(&mut etcd, &backend, &key).await;
        if restart_first {
            tokio::task::block_in_place(|| server.restart());
            etcd = other_client(&[server.endpoint()]).await;
        }
        let deleted_at = Instant::now();
        etcd.delete(keys[0].key(), None).await.unwrap();
        // ttl/3 to the next renewal, plus a margin for its round trip on a loaded machine.
        let bound = ttl / 3 + Duration::from_millis(700);
        let reason = timeout(bound, held.lost())
            .await
            .unwrap_or_else(|_| panic!("{mode:?}: not lost within {bound:?} of the delete"));
        assert_eq!(reason, LostReason::NotOwner, "{mode:?}");
        assert!(deleted_at.elapsed() < bound);
        node.shutdown().await;
    }
}

/// The sum of etcd's Prometheus counter `name` over the lines whose labels include `method`
/// (`grpc_method="…"`), read from the member's `/metrics` on its client port.
fn grpc_counter(endpoint: &str, name: &str, method: &str) -> f64 {
    use std::io::{Read, Write};
    let address = endpoint.trim_start_matches("http://");
    let mut connection = std::net::TcpStream::connect(address).expect("etcd metrics port");
    write!(
        connection,
        "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    connection.read_to_string(&mut page).unwrap();
    let label = format!("grpc_method=\"{method}\"");
    page.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(&label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Many held leases renewing: every keep-alive goes on one LeaseKeepAlive stream, and no
/// renewal reads its key (the prefix watch vouches for it), as etcd's own counters show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_share_one_keep_alive_stream_and_read_no_key() {
    let server = EtcdServer::start();
    for mode in MODES {
        let node = start(server.backend(mode).await).await;
        let ttl = Duration::from_secs(3);
        let guards = hold_many(&node, "one-stream", 10, ttl).await;
        let endpoint = server.endpoint();
        let streams = || grpc_counter(&endpoint, "grpc_server_started_total", "LeaseKeepAlive");
        let reads = || grpc_counter(&endpoint, "grpc_server_handled_total", "Range");
        let (streams_before, reads_before) = (streams(), reads());
        // Three rounds of renewals of every key.
        for _ in 0..3 {
            all_renewed(&mut node.events(), &guards, ttl).await;
        }
        let opened = streams() - streams_before;
        let read = reads() - reads_before;
        // At most one: the stream is opened by the first renewal of this backend.
        assert!(
            opened <= 1.0,
            "{mode:?}: {opened} keep-alive streams for 30 renewals"
        );
        assert_eq!(read, 0.0, "{mode:?}: {read} key reads during 30 renewals");
        for guard in guards {
            guard.release().await.unwrap();
        }
        node.shutdown().await;
    }
}

/// The fair waiters' queue of `key`'s lock in `txn` mode, as a plain client reads it: each
/// waiter's key, oldest first, with its create revision and lease.
async fn fair_queue(
    etcd: &mut Client,
    backend: &EtcdBackend,
    key: &str,
) -> Vec<(Vec<u8>, i64, i64)> {
    let options = GetOptions::new().with_prefix().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let dir = format!("{}\u{1f}fair/", backend.lock_key(key));
    let read = etcd.get(dir, Some(options)).await.unwrap();
    read.kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.create_revision(), kv.lease()))
        .collect()
}

/// `txn` mode: a fair waiter whose place another client took away — its key deleted, or its
/// lease revoked — has lost it, and goes to the back of the queue at its next attempt (woken
/// by that very delete), rather than waiting with no place: a waiter that asked after it was
/// back in line is served after it, one that asked before is served first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_waiter_whose_place_is_taken_away_queues_again_at_the_back() {
    const PROMPT: Duration = Duration::from_secs(5);
    let server = EtcdServer::start();
    let mut etcd = other_client(&[server.endpoint()]).await;
    for delete in [true, false] {
        let backend = server.backend(EtcdMode::Txn).await;
        let (a, b) = (start(backend.clone()).await, start(backend.clone()).await);
        let key = unique_key("fair-taken");
        let fair = LockOptions::new().with_fair(true);
        let held = a.try_lock(&key, fair.clone()).await.unwrap().expect("free");
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let waiter = |client: &LockClient, name: &'static str| {
            let (client, key, order) = (client.clone(), key.clone(), order.clone());
            let options = fair.clone().with_wait(Wait::UpTo(Duration::from_secs(30)));
            tokio::spawn(async move {
                let guard = client.lock(&key, options).await.expect(name);
                order.lock().unwrap().push(name);
                guard.release().await.unwrap();
            })
        };
        let moved = waiter(&a, "moved");
        eventually("the first waiter is queued", PROMPT, || async {
            fair_queue(&mut etcd.clone(), &backend, &key).await.len() == 1
        })
        .await;
        let place = fair_queue(&mut etcd, &backend, &key).await.remove(0);
        let before = waiter(&b, "before");
        eventually("the second waiter is queued", PROMPT, || async {
            fair_queue(&mut etcd.clone(), &backend, &key).await.len() == 2
        })
        .await;
        if delete {
            etcd.delete(place.0.clone(), None).await.unwrap();
        } else {
            etcd.lease_revoke(place.2).await.unwrap();
        }
        // Woken by the delete, the waiter puts its key again: behind the second one.
        eventually("the waiter queues again", PROMPT, || async {
            let queue = fair_queue(&mut etcd.clone(), &backend, &key).await;
            queue.len() == 2 && queue[1].0 == place.0 && queue[1].1 > place.1
        })
        .await;
        let after = waiter(&b, "after");
        eventually("the third waiter is queued", PROMPT, || async {
            fair_queue(&mut etcd.clone(), &backend, &key).await.len() == 3
        })
        .await;
        held.release().await.unwrap();
        for task in [moved, before, after] {
            task.await.unwrap();
        }
        let how = if delete { "deleted" } else { "revoked" };
        assert_eq!(
            *order.lock().unwrap(),
            ["before", "moved", "after"],
            "{how}"
        );
        a.shutdown().await;
        b.shutdown().await;
    }
}

/// A semaphore's waiters watch its queue too: a fair waiter held back only by the place ahead
/// of it (one permit is free, the head wants two) is let in when that place is deleted — by
/// another client here — at once, not at its backstop (set to two minutes, past its wait
/// budget). The waiter whose place was deleted queues again at the back, and is served once
/// both permits are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_semaphore_waiter_is_woken_by_a_delete_in_the_queue_ahead_of_it() {
    const LONG: Duration = Duration::from_secs(60);
    let server = EtcdServer::start();
    let mut etcd = other_client(&[server.endpoint()]).await;
    let backend = server.backend(EtcdMode::Txn).await;
    let node = |n: usize| {
        leasehold::LockManager::builder()
            .with_name(unique_key(&format!("sem-queue-node-{n}")).replace('/', "-"))
            .with_backend("store", backend.clone())
            .with_backstop_cap(Duration::from_secs(120))
            .start()
    };
    let (a, b) = (node(0).await.unwrap(), node(1).await.unwrap());
    let name = unique_key("fair-sem-woken");
    let queue_dir = format!("{}{name}\u{1f}permits\u{1f}fair/", backend.prefix());
    let reader = etcd.clone();
    let queue = move || {
        let (mut etcd, dir) = (reader.clone(), queue_dir.clone());
        async move {
            let options = GetOptions::new().with_prefix().with_sort(
                etcd_client::SortTarget::Create,
                etcd_client::SortOrder::Ascend,
            );
            let read = etcd.get(dir, Some(options)).await.unwrap();
            read.kvs()
                .iter()
                .map(|kv| kv.key().to_vec())
                .collect::<Vec<_>>()
        }
    };
    let long = LockOptions::new().with_ttl(LONG);
    let on_a = a.semaphore(&name, 2).unwrap();
    let first = on_a.try_acquire(long.clone()).await.unwrap().expect("free");
    let second = on_a.try_acquire(long.clone()).await.unwrap().expect("free");
    let fair = long
        .clone()
        .with_fair(true)
        .with_wait(Wait::UpTo(Duration::from_secs(30)));
    let head = {
        let (semaphore, fair) = (on_a.clone(), fair.clone());
        tokio::spawn(async move { semaphore.acquire_many(2, fair).await })
    };
    eventually(
        "the 2-permit waiter is queued",
        Duration::from_secs(5),
        || async { queue().await.len() == 1 },
    )
    .await;
    let head_key = queue().await.remove(0);
    // One permit is free from here on, and the head wants two: the 1-permit waiter that asks
    // now waits behind it (the fair suite checks that it does).
    first.release().await.unwrap();
    let behind = {
        let semaphore = b.semaphore(&name, 2).unwrap();
        tokio::spawn(async move { semaphore.acquire(fair).await })
    };
    eventually(
        "the 1-permit waiter is queued",
        Duration::from_secs(5),
        || async { queue().await.len() == 2 },
    )
    .await;
    // Its attempt is over (its key is its last write), and the watch it waits on starts from
    // that attempt's read: it sees this delete, whenever it opened.
    etcd.delete(head_key.clone(), None).await.unwrap();
    let permit = timeout(Duration::from_secs(10), behind)
        .await
        .expect("the waiter behind is woken by the delete, not its backstop")
        .unwrap()
        .expect("a permit");
    eventually("the head queues again", Duration::from_secs(5), || async {
        queue().await == [head_key.clone()]
    })
    .await;
    permit.release().await.unwrap();
    second.release().await.unwrap();
    let both = head
        .await
        .unwrap()
        .expect("the 2-permit waiter is served last");
    both.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}
