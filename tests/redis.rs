//! The Redis backend on a real `redis-server` (one per test, started on a free loopback port):
//! the whole conformance suite, then what only Redis can do to a lock — another client
//! touching its keys, a server frozen (SIGSTOP) for a while, a restart that loses the data, a
//! broken pub/sub connection.

use leasehold_test_support::redis_server;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use leasehold::backend::redis::CONNECT_TIMEOUT;
use leasehold::testing::{eventually, next_event, start, unique_key};
use leasehold::{
    Acquisition, Contention, ErrorKind, Lease, LockBackend, LockClient, LockEvent, LockEventKind,
    LockManager, LockOptions, LostReason, OwnerToken, RedisBackend, StoreCause, StoreErrorKind,
    StoreEventKind, Wait,
};
use redis::aio::MultiplexedConnection;
use redis_server::RedisServer;
use tokio::sync::broadcast;
use tokio::time::{timeout, Instant};

// `RedisServer::start()` is a temporary of the statement that runs each test, so the server
// lives until the test is over and is stopped when it ends.
leasehold::conformance_suite!(real, redis_server::RedisServer::start().backend().await);
leasehold::election_suite!(real, redis_server::RedisServer::start().backend().await);

mod fair {
    leasehold::fair_suite!(real, super::RedisServer::start().backend().await);
}

mod semaphore {
    leasehold::semaphore_suite!(real, super::RedisServer::start().backend().await);
}

mod rwlock {
    leasehold::rwlock_suite!(real, super::RedisServer::start().backend().await);
}

/// A plain client of the same server: "another client" that knows nothing of leasehold.
async fn other_client(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn waiting(limit: Duration) -> LockOptions {
    LockOptions::new().with_wait(Wait::UpTo(limit))
}

async fn subscribers(conn: &mut MultiplexedConnection, channel: &str) -> i64 {
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(conn)
        .await
        .unwrap();
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_deleted_by_another_client_is_lost_at_next_renewal() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let node = start(backend.clone()).await;
    let key = unique_key("deleted");
    let ttl = Duration::from_secs(3);
    let held = node
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let mut other = other_client(&server).await;
    let deleted: i64 = redis::cmd("DEL")
        .arg(backend.lock_key(&key))
        .query_async(&mut other)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let reason = timeout(ttl, held.lost())
        .await
        .expect("loss found by a renewal, before the ttl");
    assert_eq!(reason, LostReason::NotOwner);
    assert!(!held.is_held());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_overwritten_by_another_client_is_lost_at_next_renewal() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let node = start(backend.clone()).await;
    let key = unique_key("overwritten");
    let ttl = Duration::from_secs(3);
    let held = node
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let mut other = other_client(&server).await;
    let _: () = redis::cmd("SET")
        .arg(backend.lock_key(&key))
        .arg("someone-else")
        .query_async(&mut other)
        .await
        .unwrap();
    let reason = timeout(ttl, held.lost())
        .await
        .expect("loss found by a renewal, before the ttl");
    assert_eq!(reason, LostReason::NotOwner);
    // The other client's key is not ours to delete.
    let value: String = redis::cmd("GET")
        .arg(backend.lock_key(&key))
        .query_async(&mut other)
        .await
        .unwrap();
    assert_eq!(value, "someone-else");
    node.shutdown().await;
}

/// Waits (up to `limit` for each event) for the next successful renewal of `key` sent at or
/// after `since`; a loss of `key` on the way fails the test.
async fn renewal_since(
    events: &mut broadcast::Receiver<LockEvent>,
    key: &str,
    since: Instant,
    limit: Duration,
) -> LockEvent {
    loop {
        let event = next_event(events, limit, |e| {
            (e.key.as_deref() == Some(key)).then(|| e.clone())
        })
        .await;
        match event.kind {
            LockEventKind::Lost { reason } => panic!("{key} was lost: {reason}"),
            LockEventKind::Renewed { .. } if event.instant >= since => return event,
            _ => {}
        }
    }
}

/// Follows the events of the keys in `deadlines` (each with the deadline its guard had before
/// the fault) until every one is lost. For each key: its `Lost` event, and the deadline its
/// holder had been given by then (the latest of the guard's and of every `Renewed` event).
async fn losses(
    events: &mut broadcast::Receiver<LockEvent>,
    mut deadlines: HashMap<String, Instant>,
    limit: Duration,
) -> HashMap<String, (LockEvent, Instant)> {
    let mut lost = HashMap::new();
    while lost.len() < deadlines.len() {
        let event = next_event(events, limit, |e| {
            let key = e.key.as_deref()?;
            deadlines.contains_key(key).then(|| e.clone())
        })
        .await;
        let key = event.key.as_deref().expect("picked by key").to_owned();
        match event.kind {
            LockEventKind::Renewed { deadline } => {
                let latest = deadlines.get_mut(&key).expect("picked by key");
                *latest = (*latest).max(deadline);
            }
            LockEventKind::Lost { .. } => {
                let deadline = deadlines[&key];
                assert!(
                    lost.insert(key.clone(), (event, deadline)).is_none(),
                    "{key} lost twice"
                );
            }
            _ => {}
        }
    }
    lost
}

/// The manager's default clock drift: a lease is trusted until `sent + ttl × (1 − DRIFT)`.
const DRIFT: f64 = 0.01;

/// The clock drift of the holders whose loss is timed ([`with_wide_margin`]).
const WIDE_DRIFT: f64 = 0.4;

/// A manager on `backend` that holds back [`WIDE_DRIFT`] of each ttl, so its loss check runs
/// a fifth of the ttl before the deadline. With the default 1% (10 ms of a 2 s ttl ahead) a
/// loaded 2-core test machine may delay the timer past the deadline; what the tests check —
/// told of the loss by the deadline — is the same.
async fn with_wide_margin(backend: RedisBackend) -> LockClient {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    LockManager::builder()
        .with_name(format!(
            "redis-wide-margin-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
        .with_backend("store", backend)
        .with_clock_drift(WIDE_DRIFT)
        .start()
        .await
        .unwrap()
}

/// Asserts that the holder (on a [`with_wide_margin`] manager) was told of the loss (`event`)
/// by its deadline, which is `ttl × WIDE_DRIFT` before the store can give `key` to anyone else.
fn told_by_the_deadline(key: &str, event: &LockEvent, deadline: Instant) {
    assert!(
        event.instant <= deadline,
        "{key}: told {:?} after the deadline",
        event.instant.saturating_duration_since(deadline)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_for_half_the_ttl_keeps_the_lock() {
    let server = RedisServer::start();
    let node = start(server.backend().await).await;
    let other = start(server.backend().await).await;
    let key = unique_key("short-pause");
    let ttl = Duration::from_secs(2);
    let mut events = node.events();
    let held = node
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    // Pausing just after a renewal puts a whole ttl ahead of the holder and sends the next
    // renewal (ttl/3 later) into the pause, where it hangs until the server wakes.
    renewal_since(&mut events, &key, Instant::now(), ttl * 2).await;
    server.pause();
    let paused_at = Instant::now();
    let resume_at = paused_at + ttl / 2;
    // The pause itself is the fault; the guard is watched all through it.
    while Instant::now() < resume_at {
        assert!(held.is_held(), "given up during a pause of half the ttl");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Taken before the signal: on a busy machine the server may answer before `resume`
    // returns.
    let resumed_at = Instant::now();
    server.resume();
    // A machine too busy to run this test on time makes a longer fault than the one meant:
    // say so rather than blame the lock.
    assert!(
        resumed_at - paused_at < ttl * 3 / 4,
        "the test was held up: the server stayed paused {:?}, not {:?}",
        resumed_at - paused_at,
        ttl / 2
    );
    let renewal = renewal_since(&mut events, &key, resumed_at, ttl * 2).await;
    let LockEventKind::Renewed { deadline } = renewal.kind else {
        unreachable!("picked as a renewal")
    };
    // It was sent into the pause and answered after it: the lock rode out a renewal in flight,
    // not merely a quiet spell between renewals.
    let sent_at = deadline - ttl.mul_f64(1.0 - DRIFT);
    assert!(
        sent_at < resumed_at,
        "the first renewal after the pause was sent {:?} after it",
        sent_at - resumed_at
    );
    assert!(held.is_held());
    // The store agrees: the key is still ours, not free for another node.
    assert!(
        other
            .try_lock(&key, LockOptions::new())
            .await
            .unwrap()
            .is_none(),
        "another node took a lock whose holder kept it"
    );
    while let Ok(event) = events.try_recv() {
        let lost = matches!(event.kind, LockEventKind::Lost { .. });
        assert!(
            !(lost && event.key.as_deref() == Some(key.as_str())),
            "{event:?}"
        );
    }
    // A compare-and-delete release succeeds only if the store still names this holder.
    held.release().await.expect("still the owner in the store");
    node.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_for_twice_the_ttl_is_lost_in_time_and_retaken_with_a_newer_token() {
    let server = RedisServer::start();
    let node = with_wide_margin(server.backend().await).await;
    let contender = start(server.backend().await).await;
    let key = unique_key("long-pause");
    let ttl = Duration::from_secs(2);
    let mut events = node.events();
    let held = node
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let deadline = held.deadline().expect("held");
    server.pause();
    let paused_at = Instant::now();
    let mut lost = losses(
        &mut events,
        HashMap::from([(key.clone(), deadline)]),
        ttl * 2,
    )
    .await;
    let (event, deadline) = lost.remove(&key).expect("lost");
    assert!(
        matches!(
            event.kind,
            LockEventKind::Lost {
                reason: LostReason::Expired
            }
        ),
        "{event:?}"
    );
    told_by_the_deadline(&key, &event, deadline);
    assert!(!held.is_held());
    let reason = timeout(ttl, held.lost()).await.expect("lost() resolves");
    assert_eq!(reason, LostReason::Expired);
    // The pause is the fault: the server stays frozen for twice the ttl in all.
    tokio::time::sleep_until(paused_at + ttl * 2).await;
    server.resume();
    let next = contender
        .lock(&key, waiting(Duration::from_secs(20)).with_ttl(ttl))
        .await
        .expect("the key is free once its lease expired");
    assert!(
        next.fencing_token() > held.fencing_token(),
        "token {} after the lost {}",
        next.fencing_token(),
        held.fencing_token()
    );
    next.release().await.unwrap();
    drop(held);
    node.shutdown().await;
    contender.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_data_mid_hold_is_lost_for_every_holder() {
    let mut server = RedisServer::start();
    let nodes = [
        with_wide_margin(server.backend().await).await,
        with_wide_margin(server.backend().await).await,
    ];
    let ttl = Duration::from_secs(2);
    let mut events: Vec<_> = nodes.iter().map(LockClient::events).collect();
    // Two keys held on each of two nodes.
    let mut held = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for _ in 0..2 {
            let key = unique_key("restart");
            let guard = node
                .try_lock(&key, LockOptions::new().with_ttl(ttl))
                .await
                .unwrap()
                .unwrap();
            held.push((n, guard));
        }
    }
    let deadlines: Vec<HashMap<String, Instant>> = (0..nodes.len())
        .map(|n| {
            held.iter()
                .filter(|(m, _)| *m == n)
                .map(|(_, g)| (g.key().to_owned(), g.deadline().expect("held")))
                .collect()
        })
        .collect();
    server.restart();
    for (events, deadlines) in events.iter_mut().zip(deadlines) {
        for (key, (event, deadline)) in losses(events, deadlines, ttl * 2).await {
            // A renewal on the new connection finds the key gone (NotOwner); renewals that
            // kept failing until the deadline would say Expired. Either way the holder knows,
            // and by its deadline.
            assert!(
                matches!(
                    event.kind,
                    LockEventKind::Lost {
                        reason: LostReason::NotOwner | LostReason::Expired
                    }
                ),
                "{key}: {event:?}"
            );
            told_by_the_deadline(&key, &event, deadline);
        }
    }
    for (_, guard) in &held {
        assert!(!guard.is_held(), "{}", guard.key());
        timeout(ttl, guard.lost()).await.expect("lost() resolves");
    }
    drop(held);
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_without_data_keys_are_taken_again_with_larger_fencing_tokens() {
    let mut server = RedisServer::start();
    let node = start(server.backend().await).await;
    let other = start(server.backend().await).await;
    let ttl = Duration::from_secs(2);
    let opts = LockOptions::new().with_ttl(ttl);
    let keys: Vec<String> = (0..3).map(|_| unique_key("fence-restart")).collect();
    // Each key is taken and released a few times, then held across the restart.
    let mut newest = 0;
    let mut held = Vec::new();
    for key in &keys {
        for _ in 0..3 {
            let guard = node.try_lock(key, opts.clone()).await.unwrap().unwrap();
            newest = newest.max(guard.fencing_token());
            guard.release().await.unwrap();
        }
        let guard = node.try_lock(key, opts.clone()).await.unwrap().unwrap();
        newest = newest.max(guard.fencing_token());
        held.push(guard);
    }
    server.restart();
    // The restart forgot every lock: another node takes each key (waiting out its own
    // reconnection), with a token above every one handed out before.
    let retaken = opts.clone().with_wait(Wait::UpTo(Duration::from_secs(20)));
    for key in &keys {
        let guard = other
            .lock(key, retaken.clone())
            .await
            .unwrap_or_else(|e| panic!("{key} after the restart: {e}"));
        assert!(
            guard.fencing_token() > newest,
            "{key}: token {} after a restart, {newest} before it",
            guard.fencing_token()
        );
        // And tokens go on increasing from the new seed.
        let first = guard.fencing_token();
        guard.release().await.unwrap();
        let guard = other.lock(key, retaken.clone()).await.unwrap();
        assert!(guard.fencing_token() > first, "{key}");
        guard.release().await.unwrap();
    }
    // The node whose locks the restart took can lock again too.
    for guard in &held {
        timeout(ttl * 2, guard.lost())
            .await
            .expect("told of the loss");
    }
    drop(held);
    let guard = node
        .lock(&keys[0], retaken)
        .await
        .expect("the node that lost its locks takes them again");
    assert!(guard.fencing_token() > newest);
    guard.release().await.unwrap();
    node.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_fencing_token_is_seeded_from_the_server_clock() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut other).await.unwrap();
    // The seed is milliseconds since the epoch times 1024 (see the module docs).
    let before = (seconds * 1_000 + micros / 1_000) << 10;
    let key = unique_key("seed");
    let owner = OwnerToken::random();
    let Acquisition::Acquired(lease) = backend
        .acquire(&key, owner, Duration::from_secs(5), None)
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };
    assert!(
        lease.fencing_token > before,
        "token {} is not above the clock seed {before}",
        lease.fencing_token
    );
    assert!(
        lease.fencing_token < 1 << 53,
        "token {} is past what a Lua number holds exactly",
        lease.fencing_token
    );
    assert!(backend.release(&lease).await.unwrap());
}

/// Takes `key` (free) and gives it back at once, returning the token.
async fn take_and_give_back(backend: &RedisBackend, key: &str) -> u64 {
    let owner = OwnerToken::random();
    let Acquisition::Acquired(lease) = backend
        .acquire(key, owner, Duration::from_secs(5), None)
        .await
        .unwrap()
    else {
        panic!("{key} is free");
    };
    assert!(backend.release(&lease).await.unwrap());
    lease.fencing_token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stay_exact_and_increasing_across_2_pow_53() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let key = unique_key("exact");
    let fence = format!("{}:fence", backend.lock_key(&key));
    // Two below 2^53: the next tokens are 2^53 - 1 (the last a double holds with its
    // neighbours apart), 2^53 and 2^53 + 1 (which a double would round to 2^53).
    let start: u64 = (1 << 53) - 2;
    let _: () = redis::cmd("SET")
        .arg(&fence)
        .arg(start)
        .query_async(&mut other)
        .await
        .unwrap();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(take_and_give_back(&backend, &key).await);
    }
    assert_eq!(tokens, [start + 1, start + 2, start + 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_seeded_by_the_first_version_near_2_pow_61_give_exact_increasing_tokens() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let key = unique_key("old-seed");
    let fence = format!("{}:fence", backend.lock_key(&key));
    // What leasehold 0.1 seeded: microseconds since the epoch << 10, an odd number near 2^61
    // whose neighbours no double can tell apart.
    let old: u64 = 1_838_603_795_027_981_313;
    let _: () = redis::cmd("SET")
        .arg(&fence)
        .arg(old)
        .query_async(&mut other)
        .await
        .unwrap();
    let first = take_and_give_back(&backend, &key).await;
    let second = take_and_give_back(&backend, &key).await;
    assert_eq!((first, second), (old + 1, old + 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reads_the_holders_token_from_the_counter_even_past_2_pow_53() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let key = unique_key("inspect-exact");
    let fence = format!("{}:fence", backend.lock_key(&key));
    let old: u64 = 1_838_603_795_027_981_313;
    let _: () = redis::cmd("SET")
        .arg(&fence)
        .arg(old)
        .query_async(&mut other)
        .await
        .unwrap();
    let owner = OwnerToken::random();
    let Acquisition::Acquired(lease) = backend
        .acquire(&key, owner, Duration::from_secs(5), Some("host-7 pid 42"))
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };
    // Another attempt while it is held answers "held" and leaves the counter alone.
    assert!(matches!(
        backend
            .acquire(&key, OwnerToken::random(), Duration::from_secs(5), None)
            .await
            .unwrap(),
        Acquisition::Held(_)
    ));
    let info = backend.inspect(&key).await.unwrap().expect("held");
    assert_eq!(info.fencing_token, old + 1);
    assert_eq!(info.fencing_token, lease.fencing_token);
    assert_eq!(info.metadata.as_deref(), Some("host-7 pid 42"));
    assert!(backend.release(&lease).await.unwrap());
    assert!(backend.inspect(&key).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_value_in_the_first_versions_layout_is_still_released_by_its_owner() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let key = unique_key("old-value");
    let owner = OwnerToken::random();
    // leasehold 0.1 wrote "<owner> <token>[ <metadata>]".
    let _: () = redis::cmd("SET")
        .arg(backend.lock_key(&key))
        .arg(format!("{owner} 1838603795027981313 batch"))
        .arg("PX")
        .arg(5000)
        .query_async(&mut other)
        .await
        .unwrap();
    let lease = Lease::new(&key, owner, 1_838_603_795_027_981_313);
    assert!(backend.renew(&lease, Duration::from_secs(5)).await.unwrap());
    let stranger = Lease::new(&key, OwnerToken::random(), 1);
    assert!(!backend.release(&stranger).await.unwrap());
    assert!(backend.release(&lease).await.unwrap());
    assert!(backend.inspect(&key).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_an_acquisition_with_its_exact_token_and_the_release() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let prefix = unique_key("watched");
    let key = format!("{prefix}/a");
    let fence = format!("{}:fence", backend.lock_key(&key));
    let old: u64 = 1_838_603_795_027_981_313;
    let _: () = redis::cmd("SET")
        .arg(&fence)
        .arg(old)
        .query_async(&mut other)
        .await
        .unwrap();
    let mut events = backend.watch_prefix(&prefix).await.unwrap();
    assert_eq!(take_and_give_back(&backend, &key).await, old + 1);
    let limit = Duration::from_secs(5);
    let first = timeout(limit, events.next()).await.unwrap().unwrap();
    assert_eq!(first.key, key);
    assert_eq!(
        first.kind,
        StoreEventKind::Acquired {
            fencing_token: old + 1
        }
    );
    let second = timeout(limit, events.next()).await.unwrap().unwrap();
    assert_eq!(second.key, key);
    assert_eq!(second.kind, StoreEventKind::Released);
}

/// One holder's time with a key, as the holder saw it.
struct Held {
    from: Instant,
    to: Instant,
    token: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_contending_for_the_same_keys_never_overlap() {
    const TASKS_PER_NODE: usize = 4;
    const ROUNDS: usize = 6;
    let server = RedisServer::start();
    // Two managers, each with its own connections: two nodes of one application.
    let nodes = [
        start(server.backend().await).await,
        start(server.backend().await).await,
    ];
    let keys: Vec<String> = (0..3).map(|_| unique_key("overlap")).collect();
    let held: Arc<Mutex<HashMap<String, Vec<Held>>>> = Arc::default();
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for t in 0..TASKS_PER_NODE {
            let (node, keys, held) = (node.clone(), keys.clone(), held.clone());
            tasks.push(tokio::spawn(async move {
                for round in 0..ROUNDS {
                    let key = &keys[(n + t + round) % keys.len()];
                    let opts = LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(60)));
                    let guard = node.lock(key, opts).await.expect("lock");
                    let from = Instant::now();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let to = Instant::now();
                    let token = guard.fencing_token();
                    guard.release().await.expect("release");
                    held.lock()
                        .unwrap()
                        .entry(key.clone())
                        .or_default()
                        .push(Held { from, to, token });
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("contender");
    }
    let held = std::mem::take(&mut *held.lock().unwrap());
    let mut total = 0;
    for (key, mut intervals) in held {
        intervals.sort_by_key(|held| held.from);
        total += intervals.len();
        for pair in intervals.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            assert!(after.from >= before.to, "two holders of {key} at once");
            assert!(
                after.token > before.token,
                "{key}: token {} after {}",
                after.token,
                before.token
            );
        }
    }
    assert_eq!(total, 2 * TASKS_PER_NODE * ROUNDS);
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_notice_hands_the_lock_to_another_node_before_its_backstop() {
    let server = RedisServer::start();
    let holder_node = start(server.backend().await).await;
    // Ten minutes of lease and of backstop: within the 30 s wait budget, only the release
    // notice can hand this node the lock.
    let long = Duration::from_secs(600);
    let waiter_node = LockManager::builder()
        .with_name(format!("redis-handoff-{}", std::process::id()))
        .with_backend("store", server.backend().await)
        .with_backstop_cap(long)
        .start()
        .await
        .unwrap();
    let key = unique_key("handoff");
    let held = holder_node
        .try_lock(&key, LockOptions::new().with_ttl(long))
        .await
        .unwrap()
        .unwrap();
    let mut events = waiter_node.events();
    let waiting = tokio::spawn({
        let (node, key) = (waiter_node.clone(), key.clone());
        async move {
            let opts = LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(30)));
            node.lock(&key, opts).await
        }
    });
    next_event(&mut events, Duration::from_secs(10), |event| {
        matches!(event.kind, LockEventKind::Contended).then_some(())
    })
    .await;
    let token = held.fencing_token();
    held.release().await.unwrap();
    let guard = waiting
        .await
        .unwrap()
        .expect("handed over by the release notice");
    assert!(guard.fencing_token() > token);
    guard.release().await.unwrap();
    holder_node.shutdown().await;
    waiter_node.shutdown().await;
}

/// A waiter whose release subscription is refused (here by an ACL that denies the channel;
/// in a Sentinel failover, by a moment when no primary is named) while its attempts still
/// find the key held tries the subscription again, instead of sleeping until its backstop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_release_subscription_is_tried_again_before_the_backstop() {
    let server = RedisServer::start();
    let mut admin = other_client(&server).await;
    // The waiter's user may run the scripts and publish acquisitions, but not hear releases.
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "waiter",
            "on",
            ">pw",
            "~*",
            "+@all",
            "resetchannels",
            "&*:acquired",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let long = Duration::from_secs(600);
    let holder_node = start(server.backend().await).await;
    let url = format!("redis://waiter:pw@127.0.0.1:{}", server.port());
    let waiter_node = LockManager::builder()
        .with_name(format!("redis-refused-{}", std::process::id()))
        .with_backend("store", RedisBackend::connect(&url).await.unwrap())
        .with_backstop_cap(long)
        .start()
        .await
        .unwrap();
    let key = unique_key("refused");
    let held = holder_node
        .try_lock(&key, LockOptions::new().with_ttl(long))
        .await
        .unwrap()
        .unwrap();
    let waiting = tokio::spawn({
        let (node, key) = (waiter_node.clone(), key.clone());
        async move { node.lock(&key, waiting(Duration::from_secs(60))).await }
    });
    let denied = || {
        let mut admin = admin.clone();
        async move {
            let log: Vec<redis::Value> = redis::cmd("ACL")
                .arg("LOG")
                .query_async(&mut admin)
                .await
                .unwrap();
            !log.is_empty()
        }
    };
    eventually("the subscription refused", Duration::from_secs(10), denied).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "waiter", "allchannels"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let channel = format!("{}:released", server.backend().await.lock_key(&key));
    let subscribed = || {
        let (mut admin, channel) = (admin.clone(), channel.clone());
        async move { subscribers(&mut admin, &channel).await == 1 }
    };
    eventually(
        "subscribed once allowed",
        Duration::from_secs(10),
        subscribed,
    )
    .await;
    held.release().await.unwrap();
    let guard = timeout(Duration::from_secs(10), waiting)
        .await
        .expect("woken by the release notice, not the backstop (10 min)")
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();
    holder_node.shutdown().await;
    waiter_node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_subscription_per_key_is_shared_and_ends_with_its_streams() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let key = unique_key("shared-watch");
    let channel = format!("{}:released", backend.lock_key(&key));
    let seen = Contention::default();
    let mut first = backend.subscribe(&key, &seen).await.unwrap();
    let mut second = backend.clone().subscribe(&key, &seen).await.unwrap();
    assert_eq!(subscribers(&mut other, &channel).await, 1);
    // One release wakes both local subscribers.
    let owner = OwnerToken::random();
    let Acquisition::Acquired(lease) = backend
        .acquire(&key, owner, Duration::from_secs(5), None)
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };
    assert!(backend.release(&lease).await.unwrap());
    for stream in [&mut first, &mut second] {
        timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("notice delivered")
            .expect("stream open");
    }
    drop(first);
    drop(second);
    eventually("unsubscribed", Duration::from_secs(5), || {
        let mut other = other.clone();
        let channel = channel.clone();
        async move { subscribers(&mut other, &channel).await == 0 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_pubsub_connection_ends_release_streams() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let key = unique_key("broken-watch");
    let mut notices = backend
        .subscribe(&key, &Contention::default())
        .await
        .unwrap();
    kill_pubsub_connections(&mut other).await;
    let end = timeout(Duration::from_secs(5), notices.next())
        .await
        .expect("stream ends instead of going quiet");
    assert!(end.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_after_a_broken_pubsub_connection_reconnects() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let key = unique_key("rewatch");
    let mut notices = backend
        .subscribe(&key, &Contention::default())
        .await
        .unwrap();
    kill_pubsub_connections(&mut other).await;
    assert!(timeout(Duration::from_secs(5), notices.next())
        .await
        .unwrap()
        .is_none());
    let mut notices = backend
        .subscribe(&key, &Contention::default())
        .await
        .unwrap();
    let Acquisition::Acquired(lease) = backend
        .acquire(&key, OwnerToken::random(), Duration::from_secs(5), None)
        .await
        .unwrap()
    else {
        panic!("a fresh key is free");
    };
    assert!(backend.release(&lease).await.unwrap());
    timeout(Duration::from_secs(5), notices.next())
        .await
        .expect("notice on the new connection")
        .expect("stream open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_key_holds_owner_token_and_metadata_beside_a_fence_counter_with_its_hash_tag() {
    let server = RedisServer::start();
    let backend = server.backend().await.with_prefix("app:");
    let mut other = other_client(&server).await;
    let key = unique_key("layout");
    let owner = OwnerToken::random();
    let ttl = Duration::from_secs(5);
    let lease = match backend
        .acquire(&key, owner, ttl, Some("a b"))
        .await
        .unwrap()
    {
        Acquisition::Acquired(lease) => lease,
        held => panic!("a fresh key is free: {held:?}"),
    };
    let mut names: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut other)
        .await
        .unwrap();
    names.sort();
    let tagged = format!("app:{{{key}}}");
    assert_eq!(names, [tagged.clone(), format!("{tagged}:fence")]);
    let value: String = redis::cmd("GET")
        .arg(&tagged)
        .query_async(&mut other)
        .await
        .unwrap();
    assert_eq!(value, format!("{owner} a b"));
    // The holder's token is the counter's value while it holds the key.
    let counter: u64 = redis::cmd("GET")
        .arg(format!("{tagged}:fence"))
        .query_async(&mut other)
        .await
        .unwrap();
    assert_eq!(counter, lease.fencing_token);
    assert!(backend.release(&lease).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_with_different_prefixes_do_not_contend() {
    let server = RedisServer::start();
    let a = start(server.backend().await.with_prefix("a:")).await;
    let b = start(server.backend().await.with_prefix("b:")).await;
    let key = unique_key("prefixed");
    let held_a = a.try_lock(&key, LockOptions::new()).await.unwrap();
    let held_b = b.try_lock(&key, LockOptions::new()).await.unwrap();
    assert!(held_a.is_some() && held_b.is_some());
    drop((held_a, held_b));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn malformed_url_error_hides_the_password() {
    let err = RedisBackend::connect("redis://app:hunter2@127.0.0.1:notaport")
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(!message.contains("hunter2"), "{message}");
    assert!(message.contains("app:***@127.0.0.1:notaport"), "{message}");
}

#[tokio::test]
async fn unreachable_server_gives_a_retryable_error_naming_it() {
    // A port nobody listens on: bound, noted, closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let err = timeout(CONNECT_TIMEOUT * 2, RedisBackend::connect(&url))
        .await
        .expect("an error, not a hang")
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn paused_server_gives_a_retryable_error_at_connect_instead_of_a_hang() {
    let server = RedisServer::start();
    server.pause();
    let err = timeout(CONNECT_TIMEOUT * 2, RedisBackend::connect(&server.url()))
        .await
        .expect("an error, not a hang")
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", server.port())),
        "{err}"
    );
    server.resume();
}

#[tokio::test]
async fn refused_auth_is_an_error_that_is_not_retried() {
    let server = RedisServer::start();
    let mut other = other_client(&server).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right-password")
        .query_async(&mut other)
        .await
        .unwrap();
    let url = format!("redis://:wrong-password@127.0.0.1:{}", server.port());
    let err = timeout(CONNECT_TIMEOUT * 2, RedisBackend::connect(&url))
        .await
        .expect("an error, not a hang")
        .unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Store(StoreErrorKind::Protocol));
    let message = err.to_string();
    assert!(
        message.contains(&format!("127.0.0.1:{}", server.port())),
        "{message}"
    );
    assert!(!message.contains("wrong-password"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_keeps_the_redis_error_whole_and_names_the_server() {
    let server = RedisServer::start();
    let backend = server.backend().await;
    let mut other = other_client(&server).await;
    let key = unique_key("wrong-type");
    // Another client made the lock key a hash: the release script's GET fails with WRONGTYPE.
    let _: () = redis::cmd("HSET")
        .arg(backend.lock_key(&key))
        .arg("field")
        .arg("value")
        .query_async(&mut other)
        .await
        .unwrap();
    let lease = Lease::new(&key, OwnerToken::random(), 1);
    let err = backend.release(&lease).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Protocol, "{err}");
    assert!(!err.is_retryable());
    assert!(matches!(err.cause(), Some(StoreCause::Redis(_))), "{err:?}");
    let source = std::error::Error::source(&err).expect("a source");
    let redis_error = source
        .downcast_ref::<redis::RedisError>()
        .expect("the redis crate's own error");
    assert!(
        redis_error.to_string().contains("WRONGTYPE"),
        "{redis_error}"
    );
    let message = err.to_string();
    assert!(message.contains("release"), "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:{}", server.port())),
        "{message}"
    );
    assert!(message.contains("WRONGTYPE"), "{message}");
}

/// Drops every pub/sub connection the server has, as a network fault would.
async fn kill_pubsub_connections(other: &mut MultiplexedConnection) {
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(other)
        .await
        .unwrap();
}

/// With a restart quarantine, a restart that loses the data grants nobody the key until the
/// quarantine has passed, by which time its old holder has been told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_quarantine_keeps_a_key_from_everyone_until_its_old_holder_knows() {
    let mut server = RedisServer::start();
    let quarantine = Duration::from_secs(2);
    let ttl = LockOptions::new().with_ttl(quarantine);
    let a = start(server.backend().await.with_restart_quarantine(quarantine)).await;
    let b = start(server.backend().await.with_restart_quarantine(quarantine)).await;
    let key = unique_key("quarantine");
    // A new server is quarantined too, from its first acquisition on.
    let first = a.lock(&key, ttl.clone().with_wait(Wait::UpTo(quarantine * 5)));
    let held = first.await.unwrap();
    let before = held.fencing_token();

    let (mut a_events, mut b_events) = (a.events(), b.events());
    server.restart();
    let restarted = Instant::now();
    let taken = b
        .lock(&key, ttl.with_wait(Wait::UpTo(quarantine * 5)))
        .await
        .unwrap();
    let limit = Duration::from_secs(5);
    let lost = next_event(&mut a_events, limit, |e| {
        matches!(e.kind, LockEventKind::Lost { .. }).then_some(e.instant)
    })
    .await;
    let acquired = next_event(&mut b_events, limit, |e| {
        matches!(e.kind, LockEventKind::Acquired { .. }).then_some(e.instant)
    })
    .await;
    assert!(
        lost < acquired,
        "the old holder was told only after another took the key"
    );
    assert!(
        acquired >= restarted + quarantine,
        "granted inside the quarantine"
    );
    assert!(!held.is_held());
    assert!(taken.fencing_token() > before);
}

/// A restart quarantine holds back a semaphore's permits as it does a lock: a fresh server
/// (as after a data loss) grants none until the quarantine is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_quarantine_holds_back_semaphore_permits_too() {
    let server = RedisServer::start();
    let quarantine = Duration::from_millis(500);
    let backend = server.backend().await.with_restart_quarantine(quarantine);
    let name = unique_key("quarantine-permits");
    let ask = || {
        let (backend, name) = (backend.clone(), name.clone());
        async move {
            let permits = leasehold::Permits::new(1, 1);
            let ttl = Duration::from_secs(5);
            backend
                .acquire_permits(&name, OwnerToken::random(), ttl, permits, None)
                .await
                .unwrap()
        }
    };
    let started = Instant::now();
    let Acquisition::Held(held) = ask().await else {
        panic!("granted during the quarantine");
    };
    assert!(held.remaining_ttl.is_some_and(|left| left <= quarantine));
    eventually(
        "a permit after the quarantine",
        Duration::from_secs(5),
        || async { matches!(ask().await, Acquisition::Acquired(_)) },
    )
    .await;
    assert!(started.elapsed() >= quarantine.mul_f64(0.9));
}

/// A semaphore of 3, six workers on two managers, one of them holding for three ttls at a
/// time, and the server paused (SIGSTOP) for twice the ttl while it holds: it is told its
/// permit is lost, and by the library's own account (from each acquisition to the release or
/// to the moment its guard said "lost") there are never more than 3 holders at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_never_has_more_than_n_holders_through_a_pause_past_the_ttl() {
    use std::sync::atomic::AtomicBool;
    const N: u32 = 3;
    let server = RedisServer::start();
    let nodes = [
        start(server.backend().await).await,
        start(server.backend().await).await,
    ];
    let name = unique_key("semaphore-pause");
    let ttl = Duration::from_millis(600);
    let stop = Arc::new(AtomicBool::new(false));
    // Set while the long holder holds; the ends of its holds, `true` for a loss.
    let long_holds = Arc::new(AtomicBool::new(false));
    let long_ends: Arc<Mutex<Vec<bool>>> = Arc::default();
    let holds: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let mut workers = Vec::new();
    for worker in 0..6 {
        let semaphore = nodes[worker % 2].semaphore(&name, N).unwrap();
        let (stop, holds) = (stop.clone(), holds.clone());
        let (long_holds, long_ends) = (long_holds.clone(), long_ends.clone());
        let hold_for = if worker == 0 {
            ttl * 3
        } else {
            Duration::from_millis(30)
        };
        workers.push(tokio::spawn(async move {
            let opts = LockOptions::new()
                .with_ttl(ttl)
                .with_wait(Wait::UpTo(Duration::from_millis(200)));
            while !stop.load(Ordering::SeqCst) {
                // A wait that runs out, or a store that does not answer, is no hold.
                let Ok(permit) = semaphore.acquire(opts.clone()).await else {
                    continue;
                };
                let from = Instant::now();
                if worker == 0 {
                    long_holds.store(true, Ordering::SeqCst);
                }
                let lost = tokio::select! {
                    _ = permit.lost() => true,
                    () = tokio::time::sleep(hold_for) => false,
                };
                let to = Instant::now();
                if worker == 0 {
                    long_holds.store(false, Ordering::SeqCst);
                    long_ends.lock().unwrap().push(lost);
                }
                holds.lock().unwrap().push((from, to));
                if !lost {
                    let _ = permit.release().await;
                }
            }
        }));
    }
    eventually("the long holder holds", Duration::from_secs(10), || async {
        long_holds.load(Ordering::SeqCst) && holds.lock().unwrap().len() >= 10
    })
    .await;
    server.pause();
    let paused_at = Instant::now();
    while paused_at.elapsed() < ttl * 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.resume();
    let before = holds.lock().unwrap().len();
    eventually("holds after the pause", Duration::from_secs(20), || async {
        holds.lock().unwrap().len() >= before + 10
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    assert!(
        long_ends.lock().unwrap().contains(&true),
        "the long holder was told of no loss"
    );
    // +1 at each acquisition, -1 at each end (ends first at equal instants): never above N.
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for &(from, to) in holds.lock().unwrap().iter() {
        edges.push((from, 1));
        edges.push((to, -1));
    }
    edges.sort();
    let mut holding = 0;
    for (at, step) in edges {
        holding += step;
        assert!(
            holding <= N as i32,
            "{holding} holders at {:?} after the start of the pause",
            at.checked_duration_since(paused_at)
        );
    }
    for node in nodes {
        node.shutdown().await;
    }
}
