//! The fairness part of the conformance suite: every backend that waits fairly
//! ([`LockOptions::with_fair`], `acquire_fair` behind the backend seam) passes these. Run them
//! with [`fair_suite!`](crate::fair_suite).
//!
//! Each test fails with fairness off (the same requests without `with_fair`): a node then
//! hands a released key to its own waiters first, and an unfair request ignores the store's
//! queue.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use ractor::Actor;

use super::{eventually, start, unique_key, waiting_on, Holder, PROMPT};
use crate::{Error, ErrorKind, LockBackend, LockOptions, OwnerToken, StoreErrorKind, Wait};

/// Generates one `#[tokio::test]` per fairness test for the backend built by `$backend`, as
/// [`conformance_suite!`](crate::conformance_suite) does for the lock tests.
#[macro_export]
macro_rules! fair_suite {
    (paused, $backend:expr) => {
        $crate::fair_suite!(@all [start_paused = true], $backend);
    };
    (real, $backend:expr) => {
        $crate::fair_suite!(@all [flavor = "multi_thread", worker_threads = 2], $backend);
    };
    (@all [$($attr:tt)*], $backend:expr) => {
        $crate::fair_suite!(@each [$($attr)*], $backend,
            fair_waiters_on_two_nodes_are_served_in_asking_order,
            dead_fair_waiter_delays_the_next_only_until_its_entry_ttl,
            fair_waiter_that_times_out_withdraws_and_does_not_block_the_next,
            fair_is_refused_for_semaphores_and_rwlocks_before_any_io,
            same_holder_asking_again_fairly_gets_an_error,
            fair_waiter_whose_caller_went_away_does_not_block_the_next,
        );
    };
    (@each $attr:tt, $backend:expr, $($name:ident),+ $(,)?) => {
        $( $crate::fair_suite!(@one $attr, $backend, $name); )+
    };
    (@one [$($attr:tt)*], $backend:expr, $name:ident) => {
        #[tokio::test($($attr)*)]
        async fn $name() {
            $crate::testing::fair::$name($backend).await;
        }
    };
}

/// A fair request waiting up to `limit`.
fn fair(limit: Duration) -> LockOptions {
    LockOptions::new()
        .with_fair(true)
        .with_wait(Wait::UpTo(limit))
}

/// Six waiters on two managers ask one after the other, in the order A A B A B B (each is
/// in the store's queue before the next asks), while a third party holds the key: released,
/// the key goes to them in exactly that order. Without fairness node A serves its own three
/// first; with only each node's first waiter in the store's queue, A and B would alternate.
pub async fn fair_waiters_on_two_nodes_are_served_in_asking_order<B: LockBackend + Clone>(
    backend: B,
) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let key = unique_key("fair-order");
    let held = a
        .try_lock(&key, LockOptions::new().with_fair(true))
        .await
        .unwrap()
        .expect("the key is free");
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let nodes = [&a, &a, &b, &a, &b, &b];
    for (i, client) in nodes.into_iter().enumerate() {
        let (client, name, order) = (client.clone(), key.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let guard = client.lock(&name, fair(Duration::from_secs(30))).await;
            let guard = guard.unwrap_or_else(|e| panic!("waiter {i}: {e}"));
            order.lock().unwrap().push(i);
            guard.release().await.unwrap();
        }));
        // Waiter i is in the store's queue before waiter i + 1 asks.
        eventually("the waiter is queued", PROMPT, || async {
            waiting_on(&a, &key).await + waiting_on(&b, &key).await == i + 1
        })
        .await;
    }
    held.release().await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..nodes.len()).collect::<Vec<_>>());
    a.shutdown().await;
    b.shutdown().await;
}

/// A waiter that died in the queue (its entry, put there straight through the backend, is
/// never refreshed nor withdrawn) keeps its place until its entry's ttl, and no longer: the
/// fair waiter behind it gets the released key once that entry ran out, not before (it was
/// ahead) and well before the holder's ttl.
pub async fn dead_fair_waiter_delays_the_next_only_until_its_entry_ttl<B: LockBackend + Clone>(
    backend: B,
) {
    const DEAD_TTL: Duration = Duration::from_secs(2);
    let a = start(backend.clone()).await;
    let b = start(backend.clone()).await;
    let key = unique_key("fair-dead");
    let long = LockOptions::new()
        .with_fair(true)
        .with_ttl(Duration::from_secs(60));
    let held = a
        .try_lock(&key, long)
        .await
        .unwrap()
        .expect("the key is free");
    // The dead waiter: one attempt, answered "held", so its entry is in the queue.
    let dead = OwnerToken::random();
    let entered_at = Instant::now();
    let attempt = backend.acquire_fair(&key, dead, DEAD_TTL, None).await;
    assert!(
        matches!(attempt, Ok(crate::backend::Acquisition::Held(_))),
        "the dead waiter queues behind the holder: {attempt:?}"
    );
    let waiter = {
        let (b, key) = (b.clone(), key.clone());
        // Its budget is shorter than the holder's ttl: only the dead entry's expiry, not
        // the holder's, can let it in in time.
        tokio::spawn(async move { b.lock(&key, fair(DEAD_TTL + PROMPT * 5)).await })
    };
    eventually("the live waiter is queued", PROMPT, || async {
        waiting_on(&b, &key).await == 1
    })
    .await;
    held.release().await.unwrap();
    let guard = waiter.await.unwrap().expect("the live waiter gets the key");
    let got_at = Instant::now();
    assert!(
        got_at >= entered_at + DEAD_TTL,
        "the dead waiter was ahead until its entry ran out, yet the next got the key after {:?}",
        got_at - entered_at
    );
    guard.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A fair waiter whose wait budget runs out leaves the queue at once: the waiter behind it
/// (on another node) gets the released key without waiting for the first one's entry to run
/// out (its ttl, a minute, is longer than the second waiter's whole budget).
pub async fn fair_waiter_that_times_out_withdraws_and_does_not_block_the_next<
    B: LockBackend + Clone,
>(
    backend: B,
) {
    const ENTRY_TTL: Duration = Duration::from_secs(60);
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let key = unique_key("fair-timeout");
    let held = a
        .try_lock(&key, LockOptions::new().with_fair(true).with_ttl(ENTRY_TTL))
        .await
        .unwrap()
        .expect("the key is free");
    let impatient = {
        let (a, key) = (a.clone(), key.clone());
        let options = fair(Duration::from_millis(500)).with_ttl(ENTRY_TTL);
        tokio::spawn(async move { a.lock(&key, options).await })
    };
    eventually("the impatient waiter is queued", PROMPT, || async {
        waiting_on(&a, &key).await == 1
    })
    .await;
    let patient = {
        let (b, key) = (b.clone(), key.clone());
        tokio::spawn(async move { b.lock(&key, fair(PROMPT * 5)).await })
    };
    eventually("the patient waiter is queued", PROMPT, || async {
        waiting_on(&b, &key).await == 1
    })
    .await;
    let timed_out = impatient.await.unwrap();
    assert!(
        matches!(timed_out, Err(Error::Timeout { .. })),
        "the impatient waiter times out: {timed_out:?}"
    );
    held.release().await.unwrap();
    let guard = patient
        .await
        .unwrap()
        .expect("the next waiter is not held up by the one that left");
    guard.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// Fair waiting is built for locks only: a fair semaphore or read-write lock request is
/// refused with an error naming what is unsupported, and nothing is taken.
pub async fn fair_is_refused_for_semaphores_and_rwlocks_before_any_io<B: LockBackend + Clone>(
    backend: B,
) {
    let client = start(backend).await;
    let name = unique_key("fair-refused");
    let semaphore = client.semaphore(&name, 2).unwrap();
    let refused = semaphore
        .try_acquire(LockOptions::new().with_fair(true))
        .await
        .unwrap_err();
    assert_unsupported(&refused, "semaphores");
    let rwlock = client.rwlock(&name).unwrap();
    let refused = rwlock
        .try_write(LockOptions::new().with_fair(true))
        .await
        .unwrap_err();
    assert_unsupported(&refused, "read-write locks");
    client.shutdown().await;
}

fn assert_unsupported(error: &Error, what: &str) {
    assert_eq!(
        error.kind(),
        ErrorKind::Store(StoreErrorKind::Unsupported),
        "{error}"
    );
    let shown = error.to_string();
    assert!(
        shown.contains("fair waiting") && shown.contains(what),
        "{shown}"
    );
}

/// A holder actor that holds a lock fairly and asks for it again (fairly) gets
/// [`Error::AlreadyHeld`] at once, not a wait for itself, although each fair request waits
/// apart from the others.
pub async fn same_holder_asking_again_fairly_gets_an_error<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let key = unique_key("fair-again");
    let (holder, _join) = Actor::spawn(None, Holder, ()).await.unwrap();
    let opts = LockOptions::new()
        .with_fair(true)
        .with_holder(holder.clone());
    let guard = client.try_lock(&key, opts.clone()).await.unwrap().unwrap();
    // Bounded, so that a wait for itself fails the test with a timeout rather than hangs.
    let err = client
        .lock(&key, opts.with_wait(Wait::UpTo(PROMPT)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyHeld { .. }), "{err:?}");
    assert!(err.to_string().contains(&key), "{err}");
    assert!(guard.is_held());
    guard.release().await.unwrap();
    holder.stop(None);
    client.shutdown().await;
}

/// A fair waiter whose caller went away (the waiting future dropped) is taken out of the
/// queue when its node next looks at it (here: the release notice): the waiter behind it, on
/// another node, gets the key without waiting for the first one's entry to run out (its ttl,
/// a minute, is longer than the second waiter's whole budget).
pub async fn fair_waiter_whose_caller_went_away_does_not_block_the_next<B: LockBackend + Clone>(
    backend: B,
) {
    const ENTRY_TTL: Duration = Duration::from_secs(60);
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let key = unique_key("fair-gone");
    let held = a
        .try_lock(&key, LockOptions::new().with_fair(true).with_ttl(ENTRY_TTL))
        .await
        .unwrap()
        .expect("the key is free");
    let gone = {
        let (a, key) = (a.clone(), key.clone());
        let options = fair(ENTRY_TTL).with_ttl(ENTRY_TTL);
        tokio::spawn(async move { a.lock(&key, options).await })
    };
    eventually("the first waiter is queued", PROMPT, || async {
        waiting_on(&a, &key).await == 1
    })
    .await;
    let patient = {
        let (b, key) = (b.clone(), key.clone());
        tokio::spawn(async move { b.lock(&key, fair(PROMPT * 5)).await })
    };
    eventually("the second waiter is queued", PROMPT, || async {
        waiting_on(&b, &key).await == 1
    })
    .await;
    // The first waiter's caller goes away: nothing is sent to the store yet.
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    held.release().await.unwrap();
    let guard = patient
        .await
        .unwrap()
        .expect("the next waiter is not held up by one whose caller went away");
    guard.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}
