//! The conformance suite: one set of tests, generic over [`LockBackend`], that every backend
//! must pass. Each test is a public async function taking a backend value; clones of that value
//! must share one store (two managers given clones act as two nodes).
//!
//! Run the whole suite for a backend with [`conformance_suite!`](crate::conformance_suite):
//!
//! ```ignore
//! // tests/memory.rs: the memory store keeps tokio's clock, so time can be paused.
//! leasehold::conformance_suite!(paused, leasehold::MemoryBackend::new());
//! // tests/redis.rs: a real server keeps real time.
//! leasehold::conformance_suite!(real, redis_server::RedisServer::start().backend().await);
//! ```
//!
//! Backends that hold elections (`campaign`, `proclaim`, `observe`) also run the election
//! suite, [`election_suite!`](crate::election_suite) (see [`election`]); backends that hold
//! semaphores (`acquire_permits`) the semaphore suite,
//! [`semaphore_suite!`](crate::semaphore_suite) (see [`semaphore`]); backends that hold
//! read-write locks (`acquire_rw`) the read-write lock suite,
//! [`rwlock_suite!`](crate::rwlock_suite) (see [`rwlock`]); backends that wait fairly
//! (`acquire_fair`) the fairness suite, [`fair_suite!`](crate::fair_suite) (see [`fair`]).
//!
//! The tests use ttls of a few hundred milliseconds where time is the subject, so they stay
//! quick against real stores, and take no time at all under a paused clock.

pub mod election;
pub mod fair;
pub mod rwlock;
pub mod semaphore;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::{
    Error, Fence, Lease, LockBackend, LockClient, LockEvent, LockEventKind, LockManager,
    LockManagerMsg, LockOptions, LostReason, OwnerToken, Wait, MAX_KEY_LEN, MAX_TTL,
};

/// Generates one `#[tokio::test]` per suite test for the backend built by `$backend` (an
/// expression evaluated, and possibly `.await`ed, inside each test).
///
/// `paused`: a current-thread runtime with tokio's clock paused (for stores that keep tokio
/// time, like [`MemoryBackend`](crate::MemoryBackend)). `real`: a two-thread runtime on real
/// time (for networked stores). The calling crate needs tokio with the `macros`, `rt-multi-thread`
/// and `test-util` features. `real, $backend, without watch` leaves out the one test of
/// [`LockBackend::watch_prefix`], for a store that does not have it (Redis Cluster, whose
/// sharded pub/sub has no patterns); that store should test that it says so.
#[macro_export]
macro_rules! conformance_suite {
    (paused, $backend:expr) => {
        $crate::conformance_suite!(@all [start_paused = true], $backend);
    };
    (real, $backend:expr) => {
        $crate::conformance_suite!(@all [flavor = "multi_thread", worker_threads = 2], $backend);
    };
    (real, $backend:expr, without watch) => {
        $crate::conformance_suite!(@core [flavor = "multi_thread", worker_threads = 2], $backend);
    };
    (@all [$($attr:tt)*], $backend:expr) => {
        $crate::conformance_suite!(@core [$($attr)*], $backend);
        $crate::conformance_suite!(@one [$($attr)*], $backend,
            watch_reports_acquisitions_and_releases_under_a_prefix);
    };
    (@core [$($attr:tt)*], $backend:expr) => {
        $crate::conformance_suite!(@each [$($attr)*], $backend,
            contenders_lose_no_update,
            fencing_tokens_strictly_increase,
            fencing_tokens_increase_across_nodes,
            try_lock_on_held_key_returns_none_at_once,
            waiter_gets_lock_promptly_after_release,
            waiter_on_other_node_is_woken_by_release_notice,
            waiters_are_served_in_fifo_order,
            ttl_expiry_frees_key_of_holder_that_stopped_renewing,
            auto_renew_holds_across_five_ttls,
            non_owner_cannot_release_or_renew,
            lost_resolves_when_lease_is_taken_away,
            with_lock_reports_loss_during_body,
            holder_actor_stop_releases,
            holder_actor_panic_releases,
            hand_over_moves_the_holder_not_the_lease,
            dropping_guard_releases,
            shutdown_releases_and_later_calls_fail,
            info_shows_holder_metadata_and_token,
            wait_budget_times_out_with_how_long_it_waited,
            bad_input_is_rejected_naming_the_value,
            same_holder_asking_again_gets_an_error,
            release_twice_and_renew_after_release_fail,
            an_old_guard_cannot_touch_a_later_lease,
            renew_sets_the_ttl_the_guard_reports,
            a_release_that_finds_the_lease_gone_counts_as_lost_only,
            list_shows_every_held_key_under_a_prefix,
        );
    };
    (@each $attr:tt, $backend:expr, $($name:ident),+ $(,)?) => {
        $( $crate::conformance_suite!(@one $attr, $backend, $name); )+
    };
    (@one [$($attr:tt)*], $backend:expr, $name:ident) => {
        #[tokio::test($($attr)*)]
        async fn $name() {
            $crate::testing::$name($backend).await;
        }
    };
}

/// Starts a manager on `backend` under a name no other test uses.
pub async fn start<B: LockBackend + Clone>(backend: B) -> LockClient {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "leasehold-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    LockManager::builder()
        .with_name(name)
        .with_backend("store", backend)
        .start()
        .await
        .expect("lock manager starts")
}

/// Fault injection: makes the backend actor behind `client` panic in its message handler, as
/// a bug in it would. The manager restarts it; held locks and waiting requests survive.
pub fn panic_backend_actor(client: &LockClient) {
    if let Some(actor) = client.backend_ctx().actor() {
        let _ = actor.cast(crate::backend_actor::BackendMsg::Panic);
    }
}

/// Fault injection: makes the backend actor behind `client` panic when it is next asked for
/// `key`, with that request in hand (its caller gets [`Error::BackendPanicked`]). The manager
/// restarts it, and the new actor serves `key` as usual.
pub fn panic_backend_actor_on_acquire(client: &LockClient, key: &str) {
    if let Some(actor) = client.backend_ctx().actor() {
        let _ = actor.cast(crate::backend_actor::BackendMsg::PanicOnAcquire(key.into()));
    }
}

/// How many requests for `name` wait on the node behind `client` between attempts: each
/// one has been answered "held" by the store at least once (a fair waiter is in the store's
/// queue by then).
pub async fn waiting_on(client: &LockClient, name: &str) -> usize {
    let Some(actor) = client.backend_ctx().actor() else {
        return 0;
    };
    ractor::call!(actor, |reply| crate::backend_actor::BackendMsg::Waiting(
        name.into(),
        reply
    ))
    .unwrap_or(0)
}

/// A key no other test uses (real stores are shared by the tests of one run).
pub fn unique_key(what: &str) -> String {
    format!("{what}/{:016x}", rand::random::<u64>())
}

/// Polls `condition` every 5 ms until it holds, or panics after `limit` saying `what` did not
/// happen.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < give_up, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for the next event matching `pick`, or panics after `limit`.
pub async fn next_event<T>(
    events: &mut broadcast::Receiver<LockEvent>,
    limit: Duration,
    mut pick: impl FnMut(&LockEvent) -> Option<T>,
) -> T {
    let found = tokio::time::timeout(limit, async {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("event bus closed"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("expected event not seen within {limit:?}"))
}

fn waiting(limit: Duration) -> LockOptions {
    LockOptions::new().with_wait(Wait::UpTo(limit))
}

const PROMPT: Duration = Duration::from_secs(2);

/// 32 tasks do a non-atomic read-modify-write of a shared counter under the lock: with mutual
/// exclusion no update is lost, and the fence accepts every write.
pub async fn contenders_lose_no_update<B: LockBackend + Clone>(backend: B) {
    const TASKS: u64 = 32;
    const ROUNDS: u64 = 4;
    let client = start(backend).await;
    let key = unique_key("counter");
    let counter = Arc::new(Mutex::new(0u64));
    let fence = Arc::new(Fence::new());
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (client, key, counter, fence) =
            (client.clone(), key.clone(), counter.clone(), fence.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = client
                    .lock(&key, waiting(Duration::from_secs(60)))
                    .await
                    .expect("lock");
                let read = *counter.lock().unwrap();
                // Give every other task the chance to interleave here.
                tokio::task::yield_now().await;
                fence
                    .accept(guard.fencing_token())
                    .expect("token not stale");
                *counter.lock().unwrap() = read + 1;
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("contender task");
    }
    assert_eq!(*counter.lock().unwrap(), TASKS * ROUNDS);
    client.shutdown().await;
}

/// Each acquisition of a key gets a larger token than every one before.
pub async fn fencing_tokens_strictly_increase<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let key = unique_key("fence");
    let mut last = 0;
    for _ in 0..5 {
        let guard = client
            .try_lock(&key, LockOptions::new())
            .await
            .unwrap()
            .unwrap();
        assert!(
            guard.fencing_token() > last,
            "token {} after {last}",
            guard.fencing_token()
        );
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
    client.shutdown().await;
}

/// Tokens keep increasing when the key moves between two nodes.
pub async fn fencing_tokens_increase_across_nodes<B: LockBackend + Clone>(backend: B) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let key = unique_key("fence2");
    let mut last = 0;
    for round in 0..6 {
        let node = if round % 2 == 0 { &a } else { &b };
        let guard = node.lock(&key, waiting(PROMPT)).await.unwrap();
        assert!(guard.fencing_token() > last);
        last = guard.fencing_token();
        guard.release().await.unwrap();
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// `try_lock` on a held key answers `None` without waiting for the holder.
pub async fn try_lock_on_held_key_returns_none_at_once<B: LockBackend + Clone>(backend: B) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let key = unique_key("try");
    let held = a.try_lock(&key, LockOptions::new()).await.unwrap().unwrap();
    let started = Instant::now();
    assert!(a
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .is_none());
    assert!(b
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .is_none());
    // The holder's ttl is 30 s: answering well inside it means nobody waited for it.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(held.is_held());
    drop(held);
    a.shutdown().await;
    b.shutdown().await;
}

/// A waiter on the holder's node gets the lock right after the release, not after the ttl.
pub async fn waiter_gets_lock_promptly_after_release<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let key = unique_key("handoff");
    let held = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let mut events = client.events();
    let waiter = {
        let (client, key) = (client.clone(), key.clone());
        tokio::spawn(async move { client.lock(&key, LockOptions::new()).await })
    };
    next_event(&mut events, PROMPT, |e| {
        matches!(e.kind, LockEventKind::Contended).then_some(())
    })
    .await;
    let released_at = Instant::now();
    held.release().await.unwrap();
    let guard = waiter.await.unwrap().unwrap();
    assert!(released_at.elapsed() < PROMPT);
    assert!(guard.is_held());
    drop(guard);
    client.shutdown().await;
}

/// A waiter on another node is woken by the store's release notice: it acquires long before
/// its backstop timer (the holder's 30 s ttl, capped at 5 s) would fire.
pub async fn waiter_on_other_node_is_woken_by_release_notice<B: LockBackend + Clone>(backend: B) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let key = unique_key("notice");
    let held = a.try_lock(&key, LockOptions::new()).await.unwrap().unwrap();
    let mut events = b.events();
    let waiter = {
        let (b, key) = (b.clone(), key.clone());
        tokio::spawn(async move { b.lock(&key, LockOptions::new()).await })
    };
    next_event(&mut events, PROMPT, |e| {
        matches!(e.kind, LockEventKind::Contended).then_some(())
    })
    .await;
    // Whether the release lands before or after B's subscription is active, B must not wait
    // for its backstop: a notice wakes it, or the re-check it makes once subscribed does.
    let released_at = Instant::now();
    held.release().await.unwrap();
    let guard = waiter.await.unwrap().unwrap();
    let handoff = released_at.elapsed();
    assert!(handoff < Duration::from_secs(2), "handoff took {handoff:?}");
    drop(guard);
    a.shutdown().await;
    b.shutdown().await;
}

/// Waiters on one node get the key in the order they asked for it.
pub async fn waiters_are_served_in_fifo_order<B: LockBackend + Clone>(backend: B) {
    const WAITERS: usize = 6;
    let client = start(backend).await;
    let key = unique_key("fifo");
    let held = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut events = client.events();
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        let (client, key, order) = (client.clone(), key.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let guard = client.lock(&key, LockOptions::new()).await.unwrap();
            order.lock().unwrap().push(i);
            guard.release().await.unwrap();
        }));
        // Waiter i is queued before waiter i+1 asks.
        next_event(&mut events, PROMPT, |e| {
            matches!(e.kind, LockEventKind::Contended).then_some(())
        })
        .await;
    }
    held.release().await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..WAITERS).collect::<Vec<_>>());
    client.shutdown().await;
}

/// A holder that stops renewing loses the key at its ttl: its guard reports `Expired` and
/// another node can take the key.
pub async fn ttl_expiry_frees_key_of_holder_that_stopped_renewing<B: LockBackend + Clone>(
    backend: B,
) {
    let ttl = Duration::from_millis(400);
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let key = unique_key("expiry");
    let opts = LockOptions::new().with_ttl(ttl).with_auto_renew(false);
    let held = a.try_lock(&key, opts).await.unwrap().unwrap();
    let deadline = held.deadline().expect("held");
    assert_eq!(held.lost().await, LostReason::Expired);
    // The loss check runs half the drift margin (1% of the ttl by default) before the
    // deadline; not earlier.
    let told = Instant::now();
    assert!(told + ttl.mul_f64(0.01) >= deadline, "told too early");
    assert!(!held.is_held());
    let taken = b
        .lock(&key, waiting(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(taken.fencing_token() > held.fencing_token());
    drop(taken);
    a.shutdown().await;
    b.shutdown().await;
}

/// With auto-renew a lock outlives five times its ttl, with no loss: renewed at least twice
/// a ttl, or (a lock that follows a shared lease) with its deadline moving along.
pub async fn auto_renew_holds_across_five_ttls<B: LockBackend + Clone>(backend: B) {
    let ttl = Duration::from_millis(300);
    let a = start(backend.clone()).await;
    let b = start(backend.clone()).await;
    let key = unique_key("renew");
    // A lock that follows a shared lease (an etcd session) is not renewed on its own: its
    // deadline moves with the shared lease's keep-alives instead.
    let follows = backend.can_follow();
    let mut events = a.events();
    let held = a
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let first_deadline = held.deadline().expect("held");
    tokio::select! {
        reason = held.lost() => panic!("lost while auto-renewing: {reason}"),
        _ = tokio::time::sleep(ttl * 5) => {}
    }
    assert!(held.is_held());
    assert!(b
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .is_none());
    let mut renewals = 0;
    while let Ok(event) = events.try_recv() {
        match event.kind {
            LockEventKind::Renewed { .. } => renewals += 1,
            LockEventKind::Lost { .. } => panic!("unexpected loss: {event:?}"),
            _ => {}
        }
    }
    if follows {
        let moved = held.deadline().expect("held") - first_deadline;
        assert!(
            moved >= ttl * 4,
            "the deadline moved only {moved:?} in 5 ttls"
        );
    } else {
        assert!(renewals >= 10, "only {renewals} renewals in 5 ttls");
    }
    held.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// Release and renew with someone else's owner token change nothing, at the store and
/// through the manager.
pub async fn non_owner_cannot_release_or_renew<B: LockBackend + Clone>(backend: B) {
    let client = start(backend.clone()).await;
    let key = unique_key("owner");
    let held = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let impostor = Lease::new(key.clone(), OwnerToken::random(), held.fencing_token());
    assert!(!backend.release(&impostor).await.unwrap());
    assert!(!backend
        .renew(&impostor, Duration::from_secs(60))
        .await
        .unwrap());
    let manager = client.manager();
    let released = ractor::call!(manager, |reply| LockManagerMsg::Release {
        backend: None,
        key: key.clone(),
        owner: impostor.owner,
        reply,
    })
    .unwrap();
    assert!(
        matches!(released, Err(Error::NotHeld { .. })),
        "{released:?}"
    );
    let renewed = ractor::call!(manager, |reply| LockManagerMsg::Renew {
        backend: None,
        key: key.clone(),
        owner: impostor.owner,
        ttl: Duration::from_secs(60),
        reply,
    })
    .unwrap();
    assert!(matches!(renewed, Err(Error::NotHeld { .. })), "{renewed:?}");
    assert!(held.is_held());
    assert!(client.is_locked(&key).await.unwrap());
    held.release().await.unwrap();
    client.shutdown().await;
}

/// When the store stops naming the holder as owner (its key was deleted behind its back), the
/// next renewal finds out: `lost()` resolves with `NotOwner` and `is_held()` turns false.
pub async fn lost_resolves_when_lease_is_taken_away<B: LockBackend + Clone>(backend: B) {
    let ttl = Duration::from_millis(300);
    let client = start(backend.clone()).await;
    let key = unique_key("taken");
    let held = client
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let behind_its_back = Lease::new(key.clone(), held.owner(), held.fencing_token());
    assert!(backend.release(&behind_its_back).await.unwrap());
    let reason = tokio::time::timeout(ttl * 2, held.lost())
        .await
        .expect("loss reported within the ttl");
    assert_eq!(reason, LostReason::NotOwner);
    assert!(!held.is_held());
    assert!(matches!(
        held.release().await,
        Err(Error::LeaseLost {
            reason: LostReason::NotOwner,
            ..
        })
    ));
    client.shutdown().await;
}

/// `with_lock` stops its body and says so when the lease is lost while the body runs.
pub async fn with_lock_reports_loss_during_body<B: LockBackend + Clone>(backend: B) {
    let ttl = Duration::from_millis(300);
    let client = start(backend).await;
    let key = unique_key("with");
    let finished = Arc::new(AtomicU64::new(0));
    let body_done = finished.clone();
    // Without renewal the lease runs out while the body is still working.
    let opts = LockOptions::new().with_ttl(ttl).with_auto_renew(false);
    let outcome = client
        .with_lock(&key, opts, |_token| async move {
            tokio::time::sleep(ttl * 10).await;
            body_done.store(1, Ordering::SeqCst);
        })
        .await;
    assert!(
        matches!(
            outcome,
            Err(Error::LeaseLost {
                reason: LostReason::Expired,
                ..
            })
        ),
        "{outcome:?}"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "body ran on after the loss"
    );
    let value = client
        .with_lock(&key, LockOptions::new(), |token| async move { token * 2 })
        .await
        .unwrap();
    assert!(value > 0);
    assert!(!client.is_locked(&key).await.unwrap());
    client.shutdown().await;
}

pub(crate) struct Holder;

impl Actor for Holder {
    type Msg = HolderMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<HolderMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<HolderMsg>,
        msg: HolderMsg,
        _: &mut (),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HolderMsg::Panic => panic!("holder actor panics on purpose"),
        }
    }
}

/// What the test holder actor can be told.
#[derive(Debug)]
pub enum HolderMsg {
    /// Panic in the handler.
    Panic,
}

#[cfg(feature = "cluster")]
impl ractor::Message for HolderMsg {}

async fn holder_death_releases<B, F>(backend: B, kill: F)
where
    B: LockBackend + Clone,
    F: FnOnce(&ActorRef<HolderMsg>),
{
    let client = start(backend).await;
    let key = unique_key("holder");
    let (holder, join) = Actor::spawn(None, Holder, ()).await.unwrap();
    let guard = client
        .try_lock(&key, LockOptions::new().with_holder(holder.clone()))
        .await
        .unwrap()
        .unwrap();
    // The guard lives on (the holder's state might have leaked it); the holder's death alone
    // must free the key, long before the 30 s ttl.
    kill(&holder);
    let _ = join.await;
    eventually("key freed after holder death", PROMPT, || async {
        !client.is_locked(&key).await.unwrap()
    })
    .await;
    assert_eq!(guard.lost().await, LostReason::HolderStopped);
    assert!(!guard.is_held());
    client.shutdown().await;
}

/// The holder actor stopping releases its locks at once.
pub async fn holder_actor_stop_releases<B: LockBackend + Clone>(backend: B) {
    holder_death_releases(backend, |holder| holder.stop(None)).await;
}

/// The holder actor panicking releases its locks at once.
pub async fn holder_actor_panic_releases<B: LockBackend + Clone>(backend: B) {
    holder_death_releases(backend, |holder| {
        holder.cast(HolderMsg::Panic).unwrap();
    })
    .await;
}

/// A lease handed to another holder actor stays held with the same fencing token, and an
/// event records it: the old holder stopping leaves it alone, the new one stopping releases
/// it.
pub async fn hand_over_moves_the_holder_not_the_lease<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let key = unique_key("hand-over");
    let mut events = client.events();
    let (first, first_join) = Actor::spawn(None, Holder, ()).await.unwrap();
    let (second, second_join) = Actor::spawn(None, Holder, ()).await.unwrap();
    let guard = client
        .try_lock(&key, LockOptions::new().with_holder(first.clone()))
        .await
        .unwrap()
        .unwrap();
    let token = guard.fencing_token();
    guard.hand_over(second.clone()).await.unwrap();
    let handed = next_event(&mut events, PROMPT, |e| {
        (e.key.as_deref() == Some(key.as_str()) && matches!(e.kind, LockEventKind::HandedOver))
            .then_some(e.fencing_token)
    })
    .await;
    assert_eq!(handed, Some(token));
    first.stop(None);
    let _ = first_join.await;
    // The key actor handles the stop's supervision event before a later message: a renewal
    // answered after it shows the lease outlived its first holder.
    guard.renew(Duration::from_secs(30)).await.unwrap();
    assert!(guard.is_held());
    let info = client.info(&key).await.unwrap().expect("still held");
    assert_eq!(info.fencing_token, token);
    second.stop(None);
    let _ = second_join.await;
    eventually("key freed after the new holder stopped", PROMPT, || async {
        !client.is_locked(&key).await.unwrap()
    })
    .await;
    let lost = tokio::time::timeout(PROMPT, guard.lost()).await;
    assert_eq!(lost, Ok(LostReason::HolderStopped));
    client.shutdown().await;
}

/// Dropping a guard releases the lock without anyone awaiting it.
pub async fn dropping_guard_releases<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let key = unique_key("drop");
    let guard = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert!(client.is_locked(&key).await.unwrap());
    drop(guard);
    eventually("key freed after drop", PROMPT, || async {
        !client.is_locked(&key).await.unwrap()
    })
    .await;
    client.shutdown().await;
}

/// Shutdown releases every lock before it returns; afterwards every call says the manager
/// stopped, guards included.
pub async fn shutdown_releases_and_later_calls_fail<B: LockBackend + Clone>(backend: B) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let keys: Vec<String> = (0..3).map(|_| unique_key("shutdown")).collect();
    let mut guards = Vec::new();
    for key in &keys {
        guards.push(a.try_lock(key, LockOptions::new()).await.unwrap().unwrap());
    }
    a.shutdown().await;
    for key in &keys {
        assert!(
            !b.is_locked(key).await.unwrap(),
            "{key} still held after shutdown"
        );
    }
    for guard in &guards {
        assert!(!guard.is_held());
        assert_eq!(guard.lost().await, LostReason::Shutdown);
        assert!(matches!(
            guard.renew(Duration::from_secs(1)).await,
            Err(Error::ManagerStopped)
        ));
    }
    let guard = guards.pop().unwrap();
    assert!(matches!(guard.release().await, Err(Error::ManagerStopped)));
    let after = a.try_lock(&keys[0], LockOptions::new()).await;
    assert!(matches!(after, Err(Error::ManagerStopped)), "{after:?}");
    assert!(after.unwrap_err().is_fatal());
    assert!(matches!(a.info(&keys[0]).await, Err(Error::ManagerStopped)));
    b.shutdown().await;
}

/// `info` shows the holder's metadata, its fencing token and a remaining ttl within the ttl.
pub async fn info_shows_holder_metadata_and_token<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let key = unique_key("info");
    assert!(client.info(&key).await.unwrap().is_none());
    assert!(!client.is_locked(&key).await.unwrap());
    let ttl = Duration::from_secs(20);
    let guard = client
        .try_lock(
            &key,
            LockOptions::new()
                .with_ttl(ttl)
                .with_metadata("host-7 pid 42"),
        )
        .await
        .unwrap()
        .unwrap();
    let info = client.info(&key).await.unwrap().expect("held");
    assert_eq!(info.key, key);
    assert_eq!(info.metadata.as_deref(), Some("host-7 pid 42"));
    assert_eq!(info.fencing_token, guard.fencing_token());
    assert!(info.remaining_ttl <= ttl && info.remaining_ttl > ttl / 2);
    guard.release().await.unwrap();
    assert!(client.info(&key).await.unwrap().is_none());
    client.shutdown().await;
}

/// A wait budget that runs out gives a retryable timeout saying how long it waited.
pub async fn wait_budget_times_out_with_how_long_it_waited<B: LockBackend + Clone>(backend: B) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let key = unique_key("timeout");
    let held = a.try_lock(&key, LockOptions::new()).await.unwrap().unwrap();
    let budget = Duration::from_millis(300);
    for node in [&a, &b] {
        let err = node.lock(&key, waiting(budget)).await.unwrap_err();
        match &err {
            Error::Timeout { waited, .. } => assert!(*waited >= budget, "{err}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(err.is_retryable());
    }
    assert!(held.is_held());
    drop(held);
    a.shutdown().await;
    b.shutdown().await;
}

/// Each kind of bad input gets its own error, naming the bad value, before any I/O.
pub async fn bad_input_is_rejected_naming_the_value<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let ok = LockOptions::new();
    let long = "k".repeat(MAX_KEY_LEN + 1);
    let cases: Vec<(&str, LockOptions, &str)> = vec![
        ("", ok.clone(), "empty"),
        (&long, ok.clone(), "513 bytes"),
        ("a\0b", ok.clone(), "'\\0'"),
        ("a\nb", ok.clone(), "'\\n'"),
        ("k", ok.clone().with_ttl(Duration::ZERO), "0ns"),
        ("k", ok.clone().with_ttl(Duration::from_nanos(1)), "1ns"),
        ("k", ok.clone().with_ttl(MAX_TTL * 2), "172800s"),
        (
            "k",
            ok.clone().with_metadata("m".repeat(4096)),
            "4096 bytes",
        ),
    ];
    for (key, opts, named) in cases {
        let err = client.try_lock(key, opts.clone()).await.unwrap_err();
        assert!(err.is_invalid_input() && !err.is_retryable(), "{err:?}");
        assert!(err.to_string().contains(named), "{err} should name {named}");
        let err = client.lock(key, opts).await.unwrap_err();
        assert!(err.to_string().contains(named), "{err} should name {named}");
    }
    let err = client.is_locked("").await.unwrap_err();
    assert!(matches!(err, Error::EmptyKey), "{err:?}");
    let err = client.backend("no-such-store").unwrap_err();
    assert!(err.to_string().contains("no-such-store"), "{err}");
    let manager = client.manager();
    let err = ractor::call!(manager, |reply| LockManagerMsg::Acquire {
        backend: Some("no-such-store".into()),
        key: "k".into(),
        options: LockOptions::new(),
        reply,
    })
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, Error::UnknownBackend { ref name, .. } if name == "no-such-store"));
    let guard = client.try_lock("k-valid", ok).await.unwrap().unwrap();
    let err = guard.renew(Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, Error::InvalidTtl { .. }), "{err:?}");
    // Nothing was left held by any of it.
    guard.release().await.unwrap();
    for key in ["k", "k-valid"] {
        assert!(!client.is_locked(key).await.unwrap());
    }
    client.shutdown().await;
}

/// A holder actor that asks again for a key it holds gets `AlreadyHeld` at once instead of
/// deadlocking on itself.
pub async fn same_holder_asking_again_gets_an_error<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let key = unique_key("again");
    let (holder, _join) = Actor::spawn(None, Holder, ()).await.unwrap();
    let opts = LockOptions::new().with_holder(holder.clone());
    let guard = client.try_lock(&key, opts.clone()).await.unwrap().unwrap();
    let err = client
        .lock(&key, opts.with_wait(Wait::Forever))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyHeld { .. }), "{err:?}");
    assert!(err.to_string().contains(&key));
    // A conflict with what the holder holds now: neither malformed nor worth a blind retry.
    assert!(!err.is_invalid_input() && !err.is_retryable() && !err.is_fatal());
    assert!(guard.is_held());
    guard.release().await.unwrap();
    holder.stop(None);
    client.shutdown().await;
}

/// Releasing twice (by message) and renewing after release say the lock is not held.
pub async fn release_twice_and_renew_after_release_fail<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let key = unique_key("twice");
    let guard = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let owner = guard.owner();
    let manager = client.manager();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let answer = ractor::call!(manager, |reply| LockManagerMsg::Release {
            backend: None,
            key: key.clone(),
            owner,
            reply,
        });
        answers.push(answer.unwrap());
    }
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert!(
        matches!(answers[1], Err(Error::NotHeld { .. })),
        "{:?}",
        answers[1]
    );
    let renew = guard.renew(Duration::from_secs(5)).await;
    assert!(renew.is_err(), "{renew:?}");
    assert!(!guard.is_held());
    client.shutdown().await;
}

/// A watch on a prefix sees acquisitions (with their tokens) and releases of the keys under
/// it, by any node, and nothing of other keys.
pub async fn watch_reports_acquisitions_and_releases_under_a_prefix<B: LockBackend + Clone>(
    backend: B,
) {
    use crate::StoreEventKind;
    use futures::StreamExt;

    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let prefix = unique_key("watched");
    let mut events = a.watch(&prefix).await.expect("watch opens");
    let outside = b
        .try_lock(&unique_key("elsewhere"), LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let key = format!("{prefix}/job");
    let guard = b.try_lock(&key, LockOptions::new()).await.unwrap().unwrap();
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let mut next = async || {
        tokio::time::timeout(PROMPT, events.next())
            .await
            .expect("store event within the limit")
            .expect("watch still open")
    };
    let acquired = next().await;
    assert_eq!(acquired.key, key);
    assert_eq!(
        acquired.kind,
        StoreEventKind::Acquired {
            fencing_token: token
        }
    );
    let released = next().await;
    assert_eq!(
        (released.key.as_str(), released.kind),
        (key.as_str(), StoreEventKind::Released)
    );
    drop(outside);
    a.shutdown().await;
    b.shutdown().await;
}

/// Key actors hold lease after lease; a guard whose lease ended (here: taken away behind its
/// back) cannot renew or release a later lease, of any key, nor free it by being dropped.
pub async fn an_old_guard_cannot_touch_a_later_lease<B: LockBackend + Clone>(backend: B) {
    let client = start(backend.clone()).await;
    let old_key = unique_key("old");
    let old = client
        .try_lock(&old_key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let behind_its_back = Lease::new(old_key.clone(), old.owner(), old.fencing_token());
    assert!(backend.release(&behind_its_back).await.unwrap());
    // The next renewal finds out; renewing now makes it happen at once.
    assert!(old.renew(Duration::from_secs(30)).await.is_err());
    assert!(!old.is_held());
    // Later leases (on this key and another) go to whichever key actors are idle.
    let mut later = Vec::new();
    for key in [old_key.clone(), unique_key("later")] {
        let guard = client
            .try_lock(&key, LockOptions::new())
            .await
            .unwrap()
            .expect("free key taken");
        later.push((key, guard));
    }
    assert!(old.renew(Duration::from_secs(30)).await.is_err());
    drop(old);
    for (key, guard) in &later {
        // A release by the old guard would have been answered before these calls.
        assert!(client.is_locked(key).await.unwrap(), "{key} was freed");
        assert!(guard.is_held());
    }
    for (_, guard) in later {
        guard.release().await.unwrap();
    }
    client.shutdown().await;
}

/// After `renew(ttl)`, the guard reports the new ttl, and the store keeps the lease for it.
pub async fn renew_sets_the_ttl_the_guard_reports<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let key = unique_key("renew-ttl");
    let first = Duration::from_secs(30);
    let guard = client
        .try_lock(&key, LockOptions::new().with_ttl(first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(guard.ttl(), Some(first));
    let longer = Duration::from_secs(120);
    guard.renew(longer).await.unwrap();
    assert_eq!(guard.ttl(), Some(longer));
    let info = client.info(&key).await.unwrap().expect("held");
    assert!(info.remaining_ttl > first, "{info:?}");
    // Released by message, the guard's lease is over: it reports no ttl.
    let manager = client.manager();
    let owner = guard.owner();
    let released = ractor::call!(manager, |reply| LockManagerMsg::Release {
        backend: None,
        key: key.clone(),
        owner,
        reply,
    });
    assert!(released.unwrap().is_ok());
    assert_eq!(guard.ttl(), None);
    client.shutdown().await;
}

/// A release that finds the lease taken away is a loss, not a release too: the metrics count
/// it once, and hold no lock.
pub async fn a_release_that_finds_the_lease_gone_counts_as_lost_only<B: LockBackend + Clone>(
    backend: B,
) {
    let client = start(backend.clone()).await;
    let key = unique_key("counted");
    let guard = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.metrics().held(), 1);
    let behind_its_back = Lease::new(key.clone(), guard.owner(), guard.fencing_token());
    assert!(backend.release(&behind_its_back).await.unwrap());
    assert!(matches!(
        guard.release().await,
        Err(Error::LeaseLost {
            reason: LostReason::NotOwner,
            ..
        })
    ));
    let metrics = client.metrics();
    assert_eq!((metrics.lost, metrics.released), (1, 0), "{metrics:?}");
    assert_eq!(metrics.held(), 0, "{metrics:?}");
    client.shutdown().await;
}

/// `list` shows the keys under a prefix held now, sorted, with their holders' tokens,
/// metadata and ttls; not released keys, nor keys beside the prefix.
pub async fn list_shows_every_held_key_under_a_prefix<B: LockBackend + Clone>(backend: B) {
    let client = start(backend.clone()).await;
    let prefix = unique_key("listed");
    let ttl = Duration::from_secs(20);
    let mut guards = Vec::new();
    // Taken out of order: the list is sorted by key.
    for (name, metadata) in [("b", "second"), ("a/deep", "first")] {
        let options = LockOptions::new().with_ttl(ttl).with_metadata(metadata);
        let key = format!("{prefix}/{name}");
        guards.push(client.try_lock(&key, options).await.unwrap().unwrap());
    }
    let beside = client
        .try_lock(&format!("{prefix}-beside"), LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let released = format!("{prefix}/released");
    let guard = client
        .try_lock(&released, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    guard.release().await.unwrap();

    let listed = backend.list(&format!("{prefix}/")).await.expect("list");
    let keys: Vec<&str> = listed.iter().map(|info| info.key.as_str()).collect();
    assert_eq!(keys, [format!("{prefix}/a/deep"), format!("{prefix}/b")]);
    assert_eq!(listed[0].metadata.as_deref(), Some("first"));
    assert_eq!(listed[0].fencing_token, guards[1].fencing_token());
    assert_eq!(listed[1].fencing_token, guards[0].fencing_token());
    for info in &listed {
        assert!(
            info.remaining_ttl <= ttl && info.remaining_ttl > ttl / 2,
            "{info:?}"
        );
    }
    drop(beside);
    for guard in guards {
        guard.release().await.unwrap();
    }
    assert!(backend
        .list(&format!("{prefix}/"))
        .await
        .unwrap()
        .is_empty());
    client.shutdown().await;
}
