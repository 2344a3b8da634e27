//! Backend actor failure and restart: a store that stays unreachable past the retry budget, a
//! panic in the backend actor, a backend actor stopped from outside. Held locks survive (their
//! key actors are re-adopted and keep renewing), waiting requests are taken up again, and the
//! manager reports `BackendDown` and `BackendRestored`. The memory tests pause time, so outages
//! pass in virtual time; the last test pauses a real redis-server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use leasehold::testing::{
    next_event, panic_backend_actor, panic_backend_actor_on_acquire, unique_key,
};
use leasehold::{
    Acquisition, Contention, Error, Lease, LockBackend, LockClient, LockEvent, LockEventKind,
    LockGuard, LockInfo, LockManager, LockManagerMsg, LockOptions, LostReason, MemoryBackend,
    OwnerToken, ReleaseNotices, StoreError, Wait,
};
use tokio::sync::broadcast;
use tokio::time::Instant;

use leasehold_test_support::redis_server;

const TTL: Duration = Duration::from_secs(3);
const BUDGET: Duration = Duration::from_millis(200);
const LIMIT: Duration = Duration::from_secs(30);

/// The memory store behind a switch that makes every operation fail, as an unreachable store
/// would; it records when the manager probed it.
#[derive(Clone, Default)]
struct Switched {
    inner: MemoryBackend,
    down: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<Instant>>>,
}

impl Switched {
    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(StoreError::unavailable("injected outage")),
            false => Ok(()),
        }
    }

    fn probes(&self) -> Vec<Instant> {
        self.probes.lock().unwrap().clone()
    }
}

#[async_trait]
impl LockBackend for Switched {
    fn kind(&self) -> &'static str {
        "switched-memory"
    }

    async fn acquire(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.check()?;
        self.inner.acquire(key, owner, ttl, metadata).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.release(lease).await
    }

    async fn inspect(&self, key: &str) -> Result<Option<LockInfo>, StoreError> {
        self.check()?;
        self.inner.inspect(key).await
    }

    async fn subscribe(&self, key: &str, seen: &Contention) -> Result<ReleaseNotices, StoreError> {
        self.check()?;
        self.inner.subscribe(key, seen).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.probes.lock().unwrap().push(Instant::now());
        self.check()
    }
}

async fn start(store: &Switched) -> LockClient {
    LockManager::builder()
        .with_name(unique_key("recovery-manager"))
        .with_backend("memory", store.clone())
        .with_store_retry_budget(BUDGET)
        .start()
        .await
        .expect("lock manager starts")
}

fn ttl() -> LockOptions {
    LockOptions::new().with_ttl(TTL)
}

fn waiting(limit: Duration) -> LockOptions {
    ttl().with_wait(Wait::UpTo(limit))
}

async fn backend_down(events: &mut broadcast::Receiver<LockEvent>) {
    next_event(events, LIMIT, |e| {
        matches!(e.kind, LockEventKind::BackendDown).then_some(())
    })
    .await
}

async fn backend_restored(events: &mut broadcast::Receiver<LockEvent>) {
    next_event(events, LIMIT, |e| {
        matches!(e.kind, LockEventKind::BackendRestored).then_some(())
    })
    .await
}

/// Every `Lost` event seen so far on `events`, without waiting.
fn losses(events: &mut broadcast::Receiver<LockEvent>) -> Vec<LockEvent> {
    let mut lost = Vec::new();
    while let Ok(event) = events.try_recv() {
        if matches!(event.kind, LockEventKind::Lost { .. }) {
            lost.push(event);
        }
    }
    lost
}

/// After an outage: `held` is renewed again, under its token, nothing was lost, and both
/// guards release (the held one through its re-adopted key actor).
async fn kept_through_the_outage(
    events: &mut broadcast::Receiver<LockEvent>,
    held: LockGuard,
    other: LockGuard,
) {
    let token = held.fencing_token();
    next_event(events, LIMIT, |e| {
        matches!(e.kind, LockEventKind::Renewed { .. } if e.fencing_token == Some(token))
            .then_some(())
    })
    .await;
    assert!(held.is_held());
    assert!(losses(events).is_empty());
    held.release()
        .await
        .expect("the re-adopted key actor releases");
    other.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_outage_past_the_retry_budget_takes_the_backend_down_and_back_without_losing_locks() {
    let store = Switched::default();
    let client = start(&store).await;
    let mut events = client.events();
    let held = client.lock("jobs/held", ttl()).await.unwrap();

    store.set_down(true);
    backend_down(&mut events).await;
    let refused = client.try_lock("jobs/other", ttl()).await.unwrap_err();
    assert!(
        matches!(&refused, Error::BackendDown { backend } if backend == "memory"),
        "{refused}"
    );
    assert!(refused.is_retryable());
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.lock("jobs/other", waiting(LIMIT)).await })
    };

    // Shorter than the ttl: the held lock must ride it out.
    tokio::time::sleep(TTL / 3).await;
    store.set_down(false);
    backend_restored(&mut events).await;

    let other = waiter
        .await
        .unwrap()
        .expect("the waiting acquire gets the lock");
    kept_through_the_outage(&mut events, held, other).await;
    assert!(client.try_lock("jobs/held", ttl()).await.unwrap().is_some());
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn while_the_store_stays_down_probes_back_off_exponentially_up_to_a_cap() {
    let store = Switched::default();
    let client = start(&store).await;
    let mut events = client.events();
    store.set_down(true);
    let _ = client.try_lock("jobs/probe", ttl()).await;
    tokio::time::sleep(BUDGET * 2).await;
    let _ = client.try_lock("jobs/probe", ttl()).await;
    backend_down(&mut events).await;

    tokio::time::sleep(Duration::from_secs(60)).await;
    store.set_down(false);
    backend_restored(&mut events).await;

    let probes = store.probes();
    let gaps: Vec<Duration> = probes.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 6, "probes at {gaps:?}");
    for pair in gaps[..5].windows(2) {
        assert!(pair[1] > pair[0], "no backoff between probes: {gaps:?}");
    }
    let longest = *gaps.iter().max().unwrap();
    assert!(longest < Duration::from_secs(30), "uncapped: {gaps:?}");
    assert_eq!(gaps.iter().rev().nth(1), Some(&longest), "{gaps:?}");
    // One outage, one pair of events.
    let mut more = Vec::new();
    while let Ok(event) = events.try_recv() {
        more.push(event.kind);
    }
    assert!(
        !more.iter().any(|k| matches!(
            k,
            LockEventKind::BackendDown | LockEventKind::BackendRestored
        )),
        "{more:?}"
    );
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_acquire_gives_up_with_backend_down_when_its_budget_ends_first() {
    let store = Switched::default();
    let client = start(&store).await;
    let mut events = client.events();
    store.set_down(true);
    let _ = client.try_lock("jobs/a", ttl()).await;
    tokio::time::sleep(BUDGET * 2).await;
    let _ = client.try_lock("jobs/a", ttl()).await;
    backend_down(&mut events).await;

    let asked = Instant::now();
    let budget = Duration::from_secs(2);
    let answer = client.lock("jobs/a", waiting(budget)).await.unwrap_err();
    assert!(matches!(answer, Error::BackendDown { .. }), "{answer}");
    assert!(asked.elapsed() >= budget);
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_backend_actor_is_restarted_and_its_locks_and_waiters_carry_on() {
    let store = Switched::default();
    let client = start(&store).await;
    let mut events = client.events();
    let held = client.lock("jobs/busy", ttl()).await.unwrap();
    let waiter = {
        let client = client.clone();
        tokio::spawn(async move { client.lock("jobs/busy", waiting(LIMIT)).await })
    };
    next_event(&mut events, LIMIT, |e| {
        matches!(e.kind, LockEventKind::Contended).then_some(())
    })
    .await;

    panic_backend_actor(&client);
    backend_down(&mut events).await;
    backend_restored(&mut events).await;

    // Past several ttls, the lock is still held and renewed by the same key actor.
    tokio::time::sleep(TTL * 3).await;
    assert!(held.is_held());
    assert!(losses(&mut events).is_empty());
    let first = held.fencing_token();
    held.release().await.unwrap();
    let next = tokio::time::timeout(LIMIT, waiter)
        .await
        .expect("the handed-over waiter is served")
        .unwrap()
        .unwrap();
    assert!(next.fencing_token() > first);
    next.release().await.unwrap();
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_the_backend_actor_panics_over_fails_with_the_panic_and_is_not_retried() {
    let store = Switched::default();
    let client = start(&store).await;
    let mut events = client.events();
    let held = client.lock("jobs/held", ttl()).await.unwrap();
    panic_backend_actor_on_acquire(&client, "jobs/poison");

    // A waiting request would otherwise ask the restarted actor again, and perhaps panic it
    // again: the panic is its answer.
    let error = client
        .lock("jobs/poison", waiting(LIMIT))
        .await
        .expect_err("the backend actor panicked over this request");
    assert!(
        matches!(&error, Error::BackendPanicked { backend, panic }
            if backend == "memory" && panic.contains("jobs/poison")),
        "{error:?}"
    );
    assert!(!error.is_retryable() && !error.is_fatal() && !error.is_invalid_input());

    backend_down(&mut events).await;
    backend_restored(&mut events).await;
    let guard = client
        .try_lock("jobs/poison", ttl())
        .await
        .unwrap()
        .expect("the restarted actor serves the key");
    assert!(held.is_held());
    guard.release().await.unwrap();
    held.release().await.unwrap();
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_backend_actor_stopped_from_outside_hands_over_like_a_failed_one() {
    let store = Switched::default();
    let client = start(&store).await;
    let mut events = client.events();
    let held = client.lock("jobs/kept", ttl()).await.unwrap();

    let name = format!("{}/memory", client.manager().get_name().unwrap());
    ractor::registry::where_is(name)
        .expect("the backend actor is registered under the manager")
        .stop(Some("stopped by a test".into()));
    backend_down(&mut events).await;
    backend_restored(&mut events).await;

    tokio::time::sleep(TTL * 2).await;
    assert!(held.is_held());
    // One key actor for the key: a second acquisition on this node is refused at once.
    assert!(client.try_lock("jobs/kept", ttl()).await.unwrap().is_none());
    held.release().await.unwrap();
    assert!(client.try_lock("jobs/kept", ttl()).await.unwrap().is_some());
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_actor_waiting_by_message_while_the_backend_is_down_is_served_after_it() {
    let store = Switched::default();
    let client = start(&store).await;
    let mut events = client.events();
    panic_backend_actor(&client);
    backend_down(&mut events).await;

    let manager = client.manager().clone();
    let asked = tokio::spawn(async move {
        ractor::call!(manager, |reply| LockManagerMsg::Acquire {
            backend: None,
            key: "jobs/by-message".into(),
            options: waiting(LIMIT),
            reply,
        })
    });
    backend_restored(&mut events).await;
    let guard = asked.await.unwrap().unwrap().unwrap();
    assert!(guard.expect("acquired after the restart").is_held());
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_while_a_backend_is_down_releases_its_locks() {
    let store = Switched::default();
    let client = start(&store).await;
    let mut events = client.events();
    let held = client.lock("jobs/orphan", ttl()).await.unwrap();
    panic_backend_actor(&client);
    backend_down(&mut events).await;

    client.shutdown().await;
    assert_eq!(held.lost().await, LostReason::Shutdown);
    let info = store.inner.inspect("jobs/orphan").await.unwrap();
    assert!(info.is_none(), "left held in the store: {info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_takes_the_backend_down_and_back_and_a_lock_held_through_it_is_kept() {
    let server = redis_server::RedisServer::start();
    let client = LockManager::builder()
        .with_name(unique_key("recovery-redis"))
        .with_backend("redis", server.backend().await)
        .with_store_retry_budget(BUDGET)
        .with_operation_timeout(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let mut events = client.events();
    let ttl = LockOptions::new().with_ttl(Duration::from_secs(6));
    let held = client.lock(&unique_key("held"), ttl.clone()).await.unwrap();

    server.pause();
    // Each attempt times out against the frozen server; past the budget the backend is down.
    let key = unique_key("other");
    let down = tokio::time::timeout(LIMIT, async {
        loop {
            match client.try_lock(&key, ttl.clone()).await {
                Err(Error::BackendDown { .. }) => break,
                Err(e) if e.is_retryable() => continue,
                other => panic!("against a frozen server: {other:?}\n{}", server.log()),
            }
        }
    });
    down.await.expect("the backend goes down");
    backend_down(&mut events).await;
    let waiter = {
        let (client, key, ttl) = (client.clone(), key.clone(), ttl.clone());
        tokio::spawn(async move { client.lock(&key, ttl.with_wait(Wait::UpTo(LIMIT))).await })
    };

    server.resume();
    backend_restored(&mut events).await;
    let other = waiter
        .await
        .unwrap()
        .expect("the waiter gets the lock once Redis answers");
    kept_through_the_outage(&mut events, held, other).await;
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_answer_that_comes_after_the_lease_deadline_is_given_back_and_taken_again() {
    let server = redis_server::RedisServer::start();
    let client = LockManager::builder()
        .with_name(unique_key("late-answer"))
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .unwrap();
    let ttl = Duration::from_secs(1);
    let key = unique_key("late");
    let mut events = client.events();

    // The acquisition is sent into the frozen server and answered once it thaws, after the
    // lease's local deadline: that lease cannot be trusted, so `lock` must not hand it over.
    server.pause();
    let asking = {
        let (client, key) = (client.clone(), key.clone());
        let opts = LockOptions::new()
            .with_ttl(ttl)
            .with_wait(Wait::UpTo(LIMIT));
        tokio::spawn(async move { client.lock(&key, opts).await })
    };
    next_event(&mut events, LIMIT, |e| {
        matches!(e.kind, LockEventKind::Requested).then_some(())
    })
    .await;
    tokio::time::sleep(ttl * 3 / 2).await;
    server.resume();

    let guard = asking
        .await
        .unwrap()
        .expect("taken again within the wait budget");
    assert!(guard.is_held(), "handed over a lease past its deadline");
    let deadline = guard.deadline().expect("held");
    assert!(deadline > Instant::now());
    guard.release().await.unwrap();
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_returns_the_body_result_when_the_release_after_it_fails() {
    let server = redis_server::RedisServer::start();
    let backend = server.backend().await;
    let lock_key = backend.lock_key("report");
    let client = LockManager::builder()
        .with_name(unique_key("with-lock-release"))
        .with_backend("redis", backend)
        .start()
        .await
        .unwrap();
    let mut events = client.events();
    let redis = redis::Client::open(server.url()).unwrap();
    let mut other = redis.get_multiplexed_async_connection().await.unwrap();

    // The body finishes while the lock is held; another client then deletes the key, so the
    // release finds it gone. The body's work is done: its result is what the caller gets.
    let result = client
        .with_lock("report", LockOptions::new(), |token| async move {
            let deleted: i64 = redis::cmd("DEL")
                .arg(&lock_key)
                .query_async(&mut other)
                .await
                .unwrap();
            assert_eq!(deleted, 1);
            token * 10
        })
        .await;
    let value = result.expect("the body's result survives a failed release");
    let lost = next_event(&mut events, LIMIT, |e| match e.kind {
        LockEventKind::Lost { reason } => Some((reason, e.fencing_token)),
        _ => None,
    })
    .await;
    assert_eq!(lost, (LostReason::NotOwner, Some(value / 10)));
    client.shutdown().await;
}
