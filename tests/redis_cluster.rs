//! The Redis backend on a real Redis Cluster of three primaries and three replicas
//! (`RedisCluster` in test-support): the conformance, semaphore and election suites through a
//! `redis+cluster://` URL (on one cluster shared by those tests), then what only a cluster
//! shows — locks on every shard, listed from every shard, release notices across nodes.

use leasehold_test_support::{resp, RedisCluster};

use std::collections::HashSet;
use std::time::Duration;

use leasehold::testing::{start, unique_key};
use leasehold::{LockBackend, LockOptions, RedisBackend, Wait};
use tokio::time::timeout;

leasehold::conformance_suite!(real, RedisCluster::shared().backend().await);
leasehold::election_suite!(real, RedisCluster::shared().backend().await);

mod semaphore {
    leasehold::semaphore_suite!(real, super::RedisCluster::shared().backend().await);
}

/// The port of the primary that holds `key` now (`CLUSTER KEYSLOT`, then `CLUSTER SLOTS`).
fn primary_of(cluster: &RedisCluster, key: &str) -> u16 {
    let port = cluster.ports()[0];
    let slot = match resp::command(port, &["CLUSTER", "KEYSLOT", key]) {
        Ok(resp::Resp::Int(slot)) => slot,
        other => panic!("CLUSTER KEYSLOT {key}: {other:?}"),
    };
    let slots = resp::command(port, &["CLUSTER", "SLOTS"]).expect("CLUSTER SLOTS");
    for range in slots.items() {
        let fields = range.items();
        let (Some(resp::Resp::Int(first)), Some(resp::Resp::Int(last))) =
            (fields.first(), fields.get(1))
        else {
            continue;
        };
        if (*first..=*last).contains(&slot) {
            if let Some(resp::Resp::Int(port)) = fields.get(2).and_then(|p| p.items().get(1)) {
                return u16::try_from(*port).expect("a port");
            }
        }
    }
    panic!("no primary serves slot {slot} of {key}: {slots:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_on_every_shard_are_held_there_and_listed_from_all() {
    let cluster = RedisCluster::shared();
    let backend: RedisBackend = cluster.backend().await;
    let node = start(backend.clone()).await;
    let prefix = unique_key("spread");
    let ttl = LockOptions::new().with_ttl(Duration::from_secs(30));
    let mut guards = Vec::new();
    let mut shards = HashSet::new();
    for i in 0..24 {
        let key = format!("{prefix}/{i}");
        let guard = node
            .try_lock(&key, ttl.clone())
            .await
            .unwrap()
            .expect("a fresh key is free");
        let primary = primary_of(cluster, &backend.lock_key(&key));
        assert!(
            matches!(
                resp::command(primary, &["EXISTS", &backend.lock_key(&key)]),
                Ok(resp::Resp::Int(1))
            ),
            "{key} is on its slot's primary {primary}"
        );
        shards.insert(primary);
        guards.push(guard);
    }
    assert_eq!(
        shards.len(),
        3,
        "24 keys landed on every one of the 3 shards"
    );
    let listed = backend.list(&prefix).await.unwrap();
    assert_eq!(
        listed.len(),
        24,
        "every shard's locks are listed: {listed:?}"
    );
    for guard in guards {
        guard.release().await.unwrap();
    }
    assert!(backend.list(&prefix).await.unwrap().is_empty());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_on_one_shard_wakes_a_waiter_of_another_node_before_its_backstop() {
    let cluster = RedisCluster::shared();
    let holder = start(cluster.backend().await).await;
    let long = Duration::from_secs(600);
    let waiter = leasehold::LockManager::builder()
        .with_name(format!("cluster-waiter-{}", std::process::id()))
        .with_backend("redis", cluster.backend().await)
        .with_backstop_cap(long)
        .start()
        .await
        .unwrap();
    for i in 0..6 {
        let key = unique_key(&format!("notice-{i}"));
        let held = holder
            .try_lock(&key, LockOptions::new().with_ttl(long))
            .await
            .unwrap()
            .unwrap();
        let mut events = waiter.events();
        let waiting = tokio::spawn({
            let (waiter, key) = (waiter.clone(), key.clone());
            async move {
                let options = LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(30)));
                waiter.lock(&key, options).await
            }
        });
        leasehold::testing::next_event(&mut events, Duration::from_secs(10), |event| {
            matches!(event.kind, leasehold::LockEventKind::Contended).then_some(())
        })
        .await;
        let token = held.fencing_token();
        held.release().await.unwrap();
        let guard = timeout(Duration::from_secs(20), waiting)
            .await
            .expect("woken by the release notice, not its backstop (10 min)")
            .unwrap()
            .unwrap();
        assert!(guard.fencing_token() > token);
        guard.release().await.unwrap();
    }
    holder.shutdown().await;
    waiter.shutdown().await;
}

#[tokio::test]
async fn cluster_urls_without_nodes_or_with_a_path_are_refused_before_any_io() {
    for url in [
        "redis+cluster://",
        "redis+cluster://127.0.0.1",
        "redis+cluster://127.0.0.1:0",
        "redis+cluster://127.0.0.1:7000/2",
        "redis+cluster://:7000",
    ] {
        let error = RedisBackend::connect(url).await.unwrap_err();
        assert!(error.is_invalid_input(), "{url}: {error:?}");
        assert!(error.to_string().contains(url), "{url}: {error}");
    }
    let error = RedisBackend::connect_cluster(Vec::new()).await.unwrap_err();
    assert!(error.to_string().contains("empty"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_ack_is_refused_on_a_cluster_naming_the_settings() {
    let backend = RedisCluster::shared().backend().await;
    let error = backend
        .with_replica_ack(1, Duration::from_millis(100))
        .unwrap_err();
    assert!(error.is_invalid_input(), "{error:?}");
    assert!(error.to_string().contains("with_replica_ack(1"), "{error}");
}
