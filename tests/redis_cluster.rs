//! The Redis backend on a real Redis Cluster of three primaries and three replicas
//! (`RedisCluster` in test-support): the conformance, semaphore and election suites through a
//! `redis+cluster://` URL (on one cluster shared by those tests), then what only a cluster
//! shows — locks on every shard, listed from every shard, release notices by sharded pub/sub
//! across nodes, slots resharded and a shard's primary failing over while locks are held.

use leasehold_test_support::{resp, RedisCluster};

use std::collections::HashSet;
use std::time::Duration;

use leasehold::testing::{start, unique_key};
use leasehold::{LockBackend, LockOptions, RedisBackend, Wait};
use tokio::time::timeout;

leasehold::conformance_suite!(real, RedisCluster::shared().backend().await, without watch);
leasehold::election_suite!(real, RedisCluster::shared().backend().await);

mod fair {
    use leasehold_test_support::RedisCluster;
    leasehold::fair_suite!(real, RedisCluster::shared().backend().await);
}

mod semaphore {
    leasehold::semaphore_suite!(real, super::RedisCluster::shared().backend().await);
}

mod rwlock {
    leasehold::rwlock_suite!(real, super::RedisCluster::shared().backend().await);
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
        let primary = cluster.primary_of(&backend.lock_key(&key));
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

/// Keys of `backend` whose lock keys fall in the slots `first..first + span`, `count` of them.
fn keys_in_slots(
    cluster: &RedisCluster,
    backend: &RedisBackend,
    first: i64,
    span: i64,
    count: usize,
) -> Vec<String> {
    let prefix = unique_key("slots");
    let found: Vec<String> = (0..100_000)
        .map(|i| format!("{prefix}/{i}"))
        .filter(|key| (first..first + span).contains(&cluster.slot_of(&backend.lock_key(key))))
        .take(count)
        .collect();
    assert_eq!(
        found.len(),
        count,
        "keys in slots {first}..{}",
        first + span
    );
    found
}

/// Locks whose slots move to another primary while they are held (MIGRATE, `ASK`, then
/// `MOVED`) stay held: their renewals follow the slot, nobody else gets them, their holders
/// release them on the new primary, and a waiter's subscription follows the slot too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_held_while_their_slots_are_resharded_are_kept() {
    let cluster = RedisCluster::start();
    let backend = cluster.backend().await;
    let holder = start(backend.clone()).await;
    let other = start(cluster.backend().await).await;
    let primaries = cluster.primary_ports();
    let (from, to) = (primaries[0], primaries[1]);
    let first = cluster.slots_of(from)[0].0;
    const MOVED: i64 = 40;
    let keys = keys_in_slots(&cluster, &backend, first, MOVED, 3);
    // Short leases, renewed by their key actors: several renewals fall during the move.
    let options = LockOptions::new().with_ttl(Duration::from_secs(2));
    let mut guards = Vec::new();
    for key in &keys {
        guards.push(
            holder
                .try_lock(key, options.clone())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // A waiter of the first key, on another node that would otherwise look only after ten
    // minutes: its sharded subscription must follow the slot.
    let waiter = leasehold::LockManager::builder()
        .with_name(unique_key("reshard-waiter"))
        .with_backend("redis", cluster.backend().await)
        .with_backstop_cap(Duration::from_secs(600))
        .start()
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let (waiter, key) = (waiter.clone(), keys[0].clone());
        async move {
            let options = LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(60)));
            waiter.lock(&key, options).await
        }
    });
    let channel = format!("{}:released", backend.lock_key(&keys[0]));
    let subscribed_on = |port: u16| {
        let reply = resp::command(port, &["PUBSUB", "SHARDNUMSUB", &channel]);
        let count = reply
            .ok()
            .and_then(|r| r.items().get(1).and_then(resp::Resp::int));
        async move { count == Some(1) }
    };
    leasehold::testing::eventually("the waiter subscribed", Duration::from_secs(10), || {
        subscribed_on(from)
    })
    .await;
    tokio::task::block_in_place(|| cluster.reshard(from, to, MOVED as usize));
    leasehold::testing::eventually(
        "the waiter subscribed on the slot's new shard",
        Duration::from_secs(10),
        || subscribed_on(to),
    )
    .await;
    let mut events = holder.events();
    for key in &keys {
        assert_eq!(
            cluster.primary_of(&backend.lock_key(key)),
            to,
            "{key}'s slot moved"
        );
        assert!(
            matches!(
                resp::command(to, &["EXISTS", &backend.lock_key(key)]),
                Ok(resp::Resp::Int(1))
            ),
            "{key} moved with its slot"
        );
    }
    // A renewal of each after the move (so on the new primary), and no loss.
    let mut renewed = std::collections::HashSet::new();
    while renewed.len() < keys.len() {
        let (key, lost) = leasehold::testing::next_event(
            &mut events,
            Duration::from_secs(10),
            |event| match event.kind {
                leasehold::LockEventKind::Renewed { .. } => Some((event.key.clone(), false)),
                leasehold::LockEventKind::Lost { .. } => Some((event.key.clone(), true)),
                _ => None,
            },
        )
        .await;
        assert!(!lost, "{key:?} was lost while its slot moved");
        renewed.insert(key);
    }
    for (key, guard) in keys.iter().zip(&guards) {
        assert!(guard.is_held(), "{key}");
        assert!(
            other
                .try_lock(key, options.clone())
                .await
                .unwrap()
                .is_none(),
            "{key} is still held for everyone else"
        );
    }
    // The first key's release is seen by its waiter, who takes it; the others' in the store.
    let mut guards = guards.into_iter();
    let first = guards.next().expect("three guards");
    for (key, guard) in keys.iter().skip(1).zip(guards) {
        guard.release().await.unwrap();
        assert!(
            matches!(
                resp::command(to, &["EXISTS", &backend.lock_key(key)]),
                Ok(resp::Resp::Int(0))
            ),
            "{key} released on its new primary"
        );
    }
    first.release().await.unwrap();
    let taken = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter woken by the release notice on the new shard, not its backstop")
        .unwrap()
        .unwrap();
    taken.release().await.unwrap();
    waiter.shutdown().await;
    holder.shutdown().await;
    other.shutdown().await;
}

/// A shard's primary crashes while it holds locks, and its replica takes over: each lock is
/// either kept (renewed on the new primary) or reported lost to its holder — never silence —
/// and the keys are taken again afterwards with larger fencing tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_on_a_shard_whose_primary_fails_over_are_kept_or_reported_lost() {
    let mut cluster = RedisCluster::start();
    let backend = cluster.backend().await;
    let holder = start(backend.clone()).await;
    let other = start(cluster.backend().await).await;
    let old = cluster.primary_ports()[0];
    let first = cluster.slots_of(old)[0].0;
    let keys = keys_in_slots(&cluster, &backend, first, 1000, 3);
    let options = LockOptions::new().with_ttl(Duration::from_secs(3));
    let mut guards = Vec::new();
    for key in &keys {
        guards.push(
            holder
                .try_lock(key, options.clone())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let mut events = holder.events();
    let new = tokio::task::block_in_place(|| cluster.fail_over(old));
    // Each key settles one way or the other within a few ttls: lost (perhaps already, while
    // the failover went on), or renewed after it.
    let mut settled = std::collections::HashMap::new();
    while let Ok(event) = events.try_recv() {
        if let (leasehold::LockEventKind::Lost { .. }, Some(key)) = (&event.kind, &event.key) {
            settled.insert(key.to_string(), false);
        }
    }
    let limit = tokio::time::Instant::now() + Duration::from_secs(20);
    while settled.len() < keys.len() {
        let left = limit.saturating_duration_since(tokio::time::Instant::now());
        let (key, kept) = leasehold::testing::next_event(&mut events, left, |event| {
            let key = event.key.as_deref()?.to_owned();
            match event.kind {
                leasehold::LockEventKind::Renewed { .. } => Some((key, true)),
                leasehold::LockEventKind::Lost { .. } => Some((key, false)),
                _ => None,
            }
        })
        .await;
        settled.entry(key).or_insert(kept);
    }
    for (key, guard) in keys.iter().zip(guards) {
        let lock_key = backend.lock_key(key);
        let before = guard.fencing_token();
        let outcome = if settled[key] {
            "kept"
        } else {
            "reported lost"
        };
        eprintln!("{key}: {outcome} across the failover of {old} to {new}");
        if settled[key] {
            assert!(guard.is_held(), "{key} renewed after the failover");
            assert_eq!(cluster.primary_of(&lock_key), new);
            assert!(
                matches!(
                    resp::command(new, &["EXISTS", &lock_key]),
                    Ok(resp::Resp::Int(1))
                ),
                "{key} kept on the new primary {new}"
            );
            guard.release().await.unwrap();
        } else {
            assert!(
                !guard.is_held(),
                "{key} was reported lost: its guard says so"
            );
        }
        let again = other
            .try_lock(key, options.clone())
            .await
            .unwrap()
            .expect("free once released or lost");
        assert!(
            again.fencing_token() > before,
            "{key}: a token larger than before the failover"
        );
        again.release().await.unwrap();
    }
    holder.shutdown().await;
    other.shutdown().await;
}

/// Notices stay on their shard: a release reaches the waiters by `SPUBLISH`, and a classic
/// subscriber of the same channel (on any node) hears nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_notices_are_sharded_and_watch_says_it_is_not_available() {
    let cluster = RedisCluster::shared();
    let backend = cluster.backend().await;
    let holder = start(backend.clone()).await;
    let waiter = start(cluster.backend().await).await;
    let key = unique_key("sharded");
    let channel = format!("{}:released", backend.lock_key(&key));
    let held = holder
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let waiting = tokio::spawn({
        let (waiter, key) = (waiter.clone(), key.clone());
        async move {
            let options = LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(30)));
            waiter.lock(&key, options).await
        }
    });
    let shard = cluster.primary_of(&channel);
    leasehold::testing::eventually("the waiter subscribed", Duration::from_secs(10), || {
        let sharded = resp::command(shard, &["PUBSUB", "SHARDNUMSUB", &channel]);
        let classic = resp::command(shard, &["PUBSUB", "NUMSUB", &channel]);
        let count = |reply: &std::io::Result<resp::Resp>| {
            reply
                .as_ref()
                .ok()
                .and_then(|r| r.items().get(1))
                .and_then(resp::Resp::int)
        };
        let (sharded, classic) = (count(&sharded), count(&classic));
        async move { sharded == Some(1) && classic == Some(0) }
    })
    .await;
    held.release().await.unwrap();
    let guard = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("woken by the sharded notice")
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
    let refused = match backend.watch_prefix(&key).await {
        Ok(_) => panic!("watch opened on a cluster"),
        Err(error) => error,
    };
    assert_eq!(
        refused.kind(),
        leasehold::StoreErrorKind::Unsupported,
        "{refused}"
    );
    assert!(refused.to_string().contains("pattern"), "{refused}");
    holder.shutdown().await;
    waiter.shutdown().await;
}

/// The `redis` crate's own cluster builder, as an application configures it, serves both the
/// scripts and the sharded notices: a waiter on a backend so built is woken by a release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_from_the_crates_own_cluster_builder_locks_and_hears_releases() {
    let cluster = RedisCluster::shared();
    let urls = cluster.urls();
    let built = || {
        let urls = urls.clone();
        move || {
            redis::cluster::ClusterClientBuilder::new(urls.clone())
                .response_timeout(Duration::from_secs(1))
        }
    };
    let holder = start(RedisBackend::connect_cluster_with(built()).await.unwrap()).await;
    let waiter = leasehold::LockManager::builder()
        .with_name(unique_key("built-waiter"))
        .with_backend(
            "redis",
            RedisBackend::connect_cluster_with(built()).await.unwrap(),
        )
        .with_backstop_cap(Duration::from_secs(600))
        .start()
        .await
        .unwrap();
    let key = unique_key("built");
    let held = holder
        .try_lock(&key, LockOptions::new())
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
    held.release().await.unwrap();
    let guard = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("woken by the release notice, not its backstop (10 min)")
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
    holder.shutdown().await;
    waiter.shutdown().await;
}
