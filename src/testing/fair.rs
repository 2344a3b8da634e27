//! The fairness part of the conformance suite: every backend that waits fairly
//! ([`LockOptions::with_fair`], `acquire_fair` behind the backend seam) passes these. Run them
//! with [`fair_suite!`](crate::fair_suite).
//!
//! Each test fails with fairness off (the same requests without `with_fair`): a node then
//! hands a released key to its own waiters first, and an unfair request ignores the store's
//! queue. The read-write lock tests each fail when one admission rule is broken (a fair
//! reader let past a writer's place ahead, or kept out by a reader's; a fair writer let in
//! while not first; an unfair reader let past a fair writer's place; a place not withdrawn).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use ractor::Actor;

use super::{eventually, start, unique_key, waiting_on, Holder, PROMPT};
use crate::{Error, ErrorKind, LockBackend, LockOptions, OwnerToken, RwMode, StoreErrorKind, Wait};

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
            fair_is_refused_where_unsupported_before_any_io,
            fair_semaphore_waiters_are_admitted_in_asking_order,
            fair_semaphore_waiter_that_times_out_withdraws_and_does_not_block_the_next,
            dead_fair_semaphore_waiter_delays_the_next_only_until_its_entry_ttl,
            same_holder_asking_again_fairly_gets_an_error,
            fair_waiter_whose_caller_went_away_does_not_block_the_next,
            fair_rw_waiters_are_admitted_in_asking_order_across_modes,
            consecutive_fair_readers_at_the_head_go_in_together,
            waiting_fair_writer_keeps_new_unfair_readers_out,
            dead_fair_rw_waiter_delays_the_next_only_until_its_place_ttl,
            fair_rw_waiter_that_times_out_withdraws_and_does_not_block_the_next,
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

/// A fair request the store cannot serve is refused with an error naming what is
/// unsupported, and nothing is taken: fair semaphores on a store without a semaphore queue
/// ([`LockBackend::supports_fair_permits`]), fair read-write locks on one without a
/// read-write queue ([`LockBackend::supports_fair_rw`]). Where there is one, they are served.
pub async fn fair_is_refused_where_unsupported_before_any_io<B: LockBackend + Clone>(backend: B) {
    let fair_permits = backend.supports_fair_permits();
    let fair_rw = backend.supports_fair_rw();
    let client = start(backend).await;
    let name = unique_key("fair-refused");
    let semaphore = client.semaphore(&name, 2).unwrap();
    let fair = LockOptions::new().with_fair(true);
    if fair_permits {
        let guard = semaphore.try_acquire(fair.clone()).await.unwrap();
        guard.expect("a free semaphore").release().await.unwrap();
    } else {
        let refused = semaphore.try_acquire(fair.clone()).await.unwrap_err();
        assert_unsupported(&refused, "semaphores");
        assert!(semaphore.holders().await.unwrap().is_empty());
    }
    let rwlock = client.rwlock(&name).unwrap();
    if fair_rw {
        let guard = rwlock.try_write(fair.clone()).await.unwrap();
        guard
            .expect("a free read-write lock")
            .release()
            .await
            .unwrap();
        let guard = rwlock.try_read(fair).await.unwrap();
        guard
            .expect("a free read-write lock")
            .release()
            .await
            .unwrap();
    } else {
        let refused = rwlock.try_write(fair.clone()).await.unwrap_err();
        assert_unsupported(&refused, "read-write locks");
        let refused = rwlock.try_read(fair).await.unwrap_err();
        assert_unsupported(&refused, "read-write locks");
        // Nothing was taken: an unfair writer gets the lock at once.
        let guard = rwlock.try_write(LockOptions::new()).await.unwrap();
        guard.expect("nothing held").release().await.unwrap();
    }
    client.shutdown().await;
}

/// On a store without fair read-write locks: a fair request is refused before any I/O (true
/// when the test ran its course; false when the store serves them).
async fn refused_without_fair_rw<B: LockBackend + Clone>(backend: &B) -> bool {
    if backend.supports_fair_rw() {
        return false;
    }
    let client = start(backend.clone()).await;
    let rwlock = client.rwlock(&unique_key("fair-rw")).unwrap();
    let refused = rwlock
        .read(fair(PROMPT))
        .await
        .expect_err("fair read-write locks are refused on this store");
    assert_unsupported(&refused, "read-write locks");
    client.shutdown().await;
    true
}

/// Spawns a fair read (`write` false) or write of `rwlock` waiting up to `limit`, and waits
/// until it is in the store's queue: `queued` requests for the name wait on `a` and `b` then.
async fn queue_fair_rw(
    rwlock: &crate::RwLock,
    write: bool,
    limit: Duration,
    nodes: [&crate::LockClient; 2],
    queued: usize,
) -> tokio::task::JoinHandle<crate::Result<crate::LockGuard>> {
    let rwlock_ = rwlock.clone();
    let task = tokio::spawn(async move {
        if write {
            rwlock_.write(fair(limit)).await
        } else {
            rwlock_.read(fair(limit)).await
        }
    });
    let name = rwlock.name().to_owned();
    eventually("the fair waiter is queued", PROMPT, || async {
        waiting_on(nodes[0], &name).await + waiting_on(nodes[1], &name).await == queued
    })
    .await;
    task
}

/// A writer holds; fair R1 (node A), W2 (B), R3 (A) queue in that order, each in the store's
/// queue before the next asks. Released, the lock goes to R1 alone (R3 is behind W2: a fair
/// try to read from B gets nothing, nor does R3 get in); R1 released, to W2; W2 released, to
/// R3. Their fencing tokens grow in that order. A fair reader admitted past the writer ahead
/// of it takes its share with R1 (and keeps W2 out until this test's budget runs out).
pub async fn fair_rw_waiters_are_admitted_in_asking_order_across_modes<B: LockBackend + Clone>(
    backend: B,
) {
    if refused_without_fair_rw(&backend).await {
        return;
    }
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("fair-rw-order");
    let (on_a, on_b) = (a.rwlock(&name).unwrap(), b.rwlock(&name).unwrap());
    let held = on_a.try_write(LockOptions::new()).await.unwrap();
    let held = held.expect("the lock is free");
    let limit = PROMPT * 5;
    let r1 = queue_fair_rw(&on_a, false, limit, [&a, &b], 1).await;
    let w2 = queue_fair_rw(&on_b, true, limit, [&a, &b], 2).await;
    let r3 = queue_fair_rw(&on_a, false, limit, [&a, &b], 3).await;
    let held_token = held.fencing_token();
    held.release().await.unwrap();
    let r1 = r1.await.unwrap().expect("R1, first in line, reads");
    let behind = on_b.try_read(LockOptions::new().with_fair(true)).await;
    assert!(
        behind.unwrap().is_none(),
        "a fair reader went in past the fair writer waiting ahead of it"
    );
    assert!(!r3.is_finished(), "R3 went in past W2, which asked first");
    let r1_token = r1.fencing_token();
    r1.release().await.unwrap();
    let w2 = w2.await.unwrap().expect("W2, next in line, writes");
    assert!(!r3.is_finished(), "R3 went in beside W2's write hold");
    let w2_token = w2.fencing_token();
    w2.release().await.unwrap();
    let r3 = r3.await.unwrap().expect("R3, last in line, reads");
    let tokens = [held_token, r1_token, w2_token, r3.fencing_token()];
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "tokens out of asking order: {tokens:?}"
    );
    r3.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A writer holds; a fair reader's place is first in the queue (taken straight through the
/// backend: a reader in line that has not come back yet), then fair R1 (node A), R2 (B) and
/// W3 (A) queue. Released, the lock lets R1 and R2 in together, though a reader's place is
/// still ahead of them (readers ahead do not keep readers out); W3 still waits, and gets the
/// write hold once both have left and the first place is withdrawn, with a token greater than
/// theirs. A fair reader kept out by the reader's place ahead of it would wait for that
/// place's ttl (a minute), past this test's budget.
pub async fn consecutive_fair_readers_at_the_head_go_in_together<B: LockBackend + Clone>(
    backend: B,
) {
    if refused_without_fair_rw(&backend).await {
        return;
    }
    let a = start(backend.clone()).await;
    let b = start(backend.clone()).await;
    let name = unique_key("fair-rw-readers");
    let (on_a, on_b) = (a.rwlock(&name).unwrap(), b.rwlock(&name).unwrap());
    let held = on_a.try_write(LockOptions::new()).await.unwrap();
    let held = held.expect("the lock is free");
    let first = OwnerToken::random();
    let attempt = backend
        .acquire_rw_fair(&name, first, Duration::from_secs(60), RwMode::Read, None)
        .await;
    assert!(
        matches!(attempt, Ok(crate::backend::Acquisition::Held(_))),
        "the first reader queues behind the writer: {attempt:?}"
    );
    let limit = PROMPT * 5;
    let r1 = queue_fair_rw(&on_a, false, limit, [&a, &b], 1).await;
    let r2 = queue_fair_rw(&on_b, false, limit, [&a, &b], 2).await;
    let w3 = queue_fair_rw(&on_a, true, limit, [&a, &b], 3).await;
    held.release().await.unwrap();
    let r1 = r1.await.unwrap().expect("R1 reads");
    let r2 = r2.await.unwrap().expect("R2 reads beside R1");
    assert!(!w3.is_finished(), "W3 wrote while readers held");
    let newest = r1.fencing_token().max(r2.fencing_token());
    backend.withdraw_rw_waiter(&name, first).await.unwrap();
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    let w3 = w3.await.unwrap().expect("W3 writes once the readers left");
    assert!(w3.fencing_token() > newest);
    w3.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A reader holds (unfairly) and a fair writer waits behind it (node B): a new unfair reader
/// is refused (the fair writer's place keeps it out as an unfair writer's intent would), and
/// so is a fair one (the writer is ahead of it). The reader released, the writer gets in;
/// the writer released, readers get in again. Unfair readers that ignored fair writers would
/// share the lock forever.
pub async fn waiting_fair_writer_keeps_new_unfair_readers_out<B: LockBackend + Clone>(backend: B) {
    if refused_without_fair_rw(&backend).await {
        return;
    }
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("fair-rw-writer-first");
    let (on_a, on_b) = (a.rwlock(&name).unwrap(), b.rwlock(&name).unwrap());
    let reader = on_a.try_read(LockOptions::new()).await.unwrap();
    let reader = reader.expect("the lock is free");
    let writer = queue_fair_rw(&on_b, true, PROMPT * 5, [&a, &b], 1).await;
    let unfair = on_a.try_read(LockOptions::new()).await.unwrap();
    assert!(
        unfair.is_none(),
        "an unfair reader went in while a fair writer waited"
    );
    let fair_reader = on_a.try_read(LockOptions::new().with_fair(true)).await;
    assert!(
        fair_reader.unwrap().is_none(),
        "a fair reader went in past the fair writer ahead of it"
    );
    reader.release().await.unwrap();
    let writer = writer.await.unwrap().expect("the fair writer writes");
    writer.release().await.unwrap();
    let again = on_a.try_read(LockOptions::new()).await.unwrap();
    again
        .expect("readers go in once the writer left")
        .release()
        .await
        .unwrap();
    let again = on_b
        .try_read(LockOptions::new().with_fair(true))
        .await
        .unwrap();
    again.expect("fair readers too").release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A fair writer that died in the queue (its place, taken straight through the backend, is
/// never refreshed nor withdrawn) keeps the fair reader behind it out until its place's ttl,
/// and no longer (well before the holder's ttl); while it is first, a fair writer that
/// only tries gets nothing either, though nothing is held.
pub async fn dead_fair_rw_waiter_delays_the_next_only_until_its_place_ttl<
    B: LockBackend + Clone,
>(
    backend: B,
) {
    const DEAD_TTL: Duration = Duration::from_secs(2);
    if refused_without_fair_rw(&backend).await {
        return;
    }
    let a = start(backend.clone()).await;
    let b = start(backend.clone()).await;
    let name = unique_key("fair-rw-dead");
    let on_a = a.rwlock(&name).unwrap();
    let long = LockOptions::new().with_ttl(Duration::from_secs(60));
    let held = on_a
        .try_write(long)
        .await
        .unwrap()
        .expect("the lock is free");
    // The dead waiter: one attempt, answered "held", so its place is in the queue.
    let dead = OwnerToken::random();
    let entered_at = Instant::now();
    let attempt = backend
        .acquire_rw_fair(&name, dead, DEAD_TTL, RwMode::Write, None)
        .await;
    assert!(
        matches!(attempt, Ok(crate::backend::Acquisition::Held(_))),
        "the dead writer queues behind the holder: {attempt:?}"
    );
    let on_b = b.rwlock(&name).unwrap();
    // Its budget is shorter than the holder's ttl: only the dead place's expiry, not the
    // holder's, can let it in in time.
    let reader = queue_fair_rw(&on_b, false, DEAD_TTL + PROMPT * 5, [&a, &b], 1).await;
    held.release().await.unwrap();
    let first = on_a.try_write(LockOptions::new().with_fair(true)).await;
    let first = first.unwrap();
    if Instant::now() < entered_at + DEAD_TTL {
        assert!(
            first.is_none(),
            "a fair writer went in while another writer's place was first"
        );
    }
    drop(first);
    let guard = reader.await.unwrap().expect("the live reader gets in");
    let got_at = Instant::now();
    assert!(
        got_at >= entered_at + DEAD_TTL,
        "the dead writer was ahead until its place ran out, yet the reader got in after {:?}",
        got_at - entered_at
    );
    guard.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A fair writer whose wait budget runs out leaves the queue at once: the fair reader behind
/// it (on another node) gets in when the holder releases, without waiting for the writer's
/// place to run out (its ttl, a minute, is longer than the reader's whole budget).
pub async fn fair_rw_waiter_that_times_out_withdraws_and_does_not_block_the_next<
    B: LockBackend + Clone,
>(
    backend: B,
) {
    const ENTRY_TTL: Duration = Duration::from_secs(60);
    if refused_without_fair_rw(&backend).await {
        return;
    }
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("fair-rw-timeout");
    let (on_a, on_b) = (a.rwlock(&name).unwrap(), b.rwlock(&name).unwrap());
    let long = LockOptions::new().with_ttl(ENTRY_TTL);
    let held = on_a
        .try_write(long)
        .await
        .unwrap()
        .expect("the lock is free");
    let impatient = {
        let rwlock = on_a.clone();
        let options = fair(Duration::from_millis(500)).with_ttl(ENTRY_TTL);
        tokio::spawn(async move { rwlock.write(options).await })
    };
    eventually("the impatient writer is queued", PROMPT, || async {
        waiting_on(&a, &name).await == 1
    })
    .await;
    let patient = queue_fair_rw(&on_b, false, PROMPT * 5, [&a, &b], 2).await;
    let timed_out = impatient.await.unwrap();
    assert!(
        matches!(timed_out, Err(Error::Timeout { .. })),
        "the impatient writer times out: {timed_out:?}"
    );
    held.release().await.unwrap();
    let guard = patient
        .await
        .unwrap()
        .expect("the reader is not held up by the writer that left");
    guard.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// On a store without fair semaphores: a fair acquisition is refused before any I/O (true
/// when the test ran its course; false when the store serves fair semaphores).
async fn refused_without_fair_permits<B: LockBackend + Clone>(backend: &B) -> bool {
    if backend.supports_fair_permits() {
        return false;
    }
    let client = start(backend.clone()).await;
    let semaphore = client.semaphore(&unique_key("fair-sem"), 2).unwrap();
    let refused = semaphore
        .acquire(fair(PROMPT))
        .await
        .expect_err("fair semaphores are refused on this store");
    assert_unsupported(&refused, "semaphores");
    client.shutdown().await;
    true
}

/// A semaphore of 2 permits, both held; four fair waiters on two managers ask one after the
/// other (each in the store's queue before the next asks): 1 permit (node A), 2 (B), 1 (A),
/// 1 (B). One permit freed lets the first in; once it is back, a permit is free but the head
/// wants 2: a fair 1-permit `try_acquire` from elsewhere gets nothing (and leaves no entry).
/// The last permit freed, the others get in, strictly in asking order (by fencing token,
/// which grows with each admission). Without fairness a 1-permit waiter behind the 2-permit
/// one takes the free permit first.
pub async fn fair_semaphore_waiters_are_admitted_in_asking_order<B: LockBackend + Clone>(
    backend: B,
) {
    if refused_without_fair_permits(&backend).await {
        return;
    }
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("fair-sem-order");
    let (on_a, on_b) = (
        a.semaphore(&name, 2).unwrap(),
        b.semaphore(&name, 2).unwrap(),
    );
    let first = on_a.try_acquire(LockOptions::new()).await.unwrap();
    let second = on_a.try_acquire(LockOptions::new()).await.unwrap();
    let (first, second) = (first.expect("free"), second.expect("free"));
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let asks = [(&on_a, 1), (&on_b, 2), (&on_a, 1), (&on_b, 1)];
    let mut tasks = Vec::new();
    for (i, (semaphore, count)) in asks.into_iter().enumerate() {
        let (semaphore, admitted) = (semaphore.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            let guard = semaphore
                .acquire_many(count, fair(Duration::from_secs(30)))
                .await;
            let guard = guard.unwrap_or_else(|e| panic!("waiter {i}: {e}"));
            admitted.lock().unwrap().push((guard.fencing_token(), i));
            guard.release().await.unwrap();
        }));
        eventually("the waiter is queued", PROMPT, || async {
            waiting_on(&a, &name).await + waiting_on(&b, &name).await == i + 1
        })
        .await;
    }
    first.release().await.unwrap();
    eventually("the first waiter came and went", PROMPT, || async {
        admitted.lock().unwrap().len() == 1 && on_a.holders().await.unwrap().len() == 1
    })
    .await;
    // One permit is free, but the 2-permit waiter is first in line.
    let behind = on_b.try_acquire(LockOptions::new().with_fair(true)).await;
    assert!(
        behind.unwrap().is_none(),
        "a fair 1-permit request went ahead of the 2-permit waiter at the head"
    );
    second.release().await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let mut admitted = admitted.lock().unwrap().clone();
    admitted.sort_unstable();
    let order: Vec<usize> = admitted.into_iter().map(|(_, i)| i).collect();
    assert_eq!(order, (0..asks.len()).collect::<Vec<_>>());
    // The try that lost left no place in the queue: the whole semaphore is free to a fair
    // ask. Its withdrawal is sent when its request ends, after the answer, so it is not
    // ordered before this ask: wait for it, far less than the place's ttl (30 s), which is
    // how long a place nobody withdrew would keep the semaphore from a fair ask.
    let whole = LockOptions::new().with_fair(true);
    let give_up = Instant::now() + PROMPT;
    let all = loop {
        if let Some(all) = on_b.try_acquire_many(2, whole.clone()).await.unwrap() {
            break all;
        }
        let holders = on_b.holders().await.unwrap();
        assert!(
            Instant::now() < give_up,
            "a fair ask for every permit still waits after {PROMPT:?}: holders {holders:?}, \
             or a place left in the queue"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    all.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A fair 2-permit waiter at the head of a semaphore's queue keeps a 1-permit waiter (on
/// another node) out while one permit is free; when its wait budget runs out it leaves the
/// queue at once, and the 1-permit waiter gets the free permit then (not before), without
/// waiting for the first one's place to run out (its ttl, a minute, is longer than the second
/// waiter's whole budget). Without fairness the 1-permit waiter gets in before the other
/// times out.
pub async fn fair_semaphore_waiter_that_times_out_withdraws_and_does_not_block_the_next<
    B: LockBackend + Clone,
>(
    backend: B,
) {
    const ENTRY_TTL: Duration = Duration::from_secs(60);
    if refused_without_fair_permits(&backend).await {
        return;
    }
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("fair-sem-timeout");
    let (on_a, on_b) = (
        a.semaphore(&name, 2).unwrap(),
        b.semaphore(&name, 2).unwrap(),
    );
    let long = LockOptions::new().with_ttl(ENTRY_TTL);
    let first = on_a.try_acquire(long.clone()).await.unwrap();
    let second = on_a.try_acquire(long).await.unwrap();
    let (first, second) = (first.expect("free"), second.expect("free"));
    const BUDGET: Duration = Duration::from_millis(500);
    // The impatient waiter's budget runs from a moment after this one, so it cannot give
    // up (and leave the queue) before `asked + BUDGET`.
    let asked = Instant::now();
    let impatient = {
        let semaphore = on_a.clone();
        let options = fair(BUDGET).with_ttl(ENTRY_TTL);
        tokio::spawn(async move { semaphore.acquire_many(2, options).await.map(drop) })
    };
    eventually("the impatient waiter is queued", PROMPT, || async {
        waiting_on(&a, &name).await == 1
    })
    .await;
    let patient = {
        let semaphore = on_b.clone();
        tokio::spawn(async move {
            let guard = semaphore.acquire(fair(PROMPT * 5)).await;
            (guard, Instant::now())
        })
    };
    eventually("the patient waiter is queued", PROMPT, || async {
        waiting_on(&b, &name).await == 1
    })
    .await;
    // One permit is free from here on.
    first.release().await.unwrap();
    let timed_out = impatient.await.unwrap();
    assert!(
        matches!(timed_out, Err(Error::Timeout { .. })),
        "the impatient waiter times out: {timed_out:?}"
    );
    let (guard, admitted_at) = patient.await.unwrap();
    let guard = guard.expect("the next waiter is not held up by the one that left");
    assert!(
        admitted_at >= asked + BUDGET,
        "the 1-permit waiter got in {:?} before the 2-permit waiter ahead of it could give up",
        (asked + BUDGET) - admitted_at
    );
    guard.release().await.unwrap();
    second.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A semaphore waiter that died in the queue (its place, taken straight through the backend,
/// is never refreshed nor withdrawn) keeps the one free permit from the fair waiter behind it
/// until its place's ttl, and no longer (well before the holders' ttl). Without fairness the
/// waiter behind takes the free permit at once.
pub async fn dead_fair_semaphore_waiter_delays_the_next_only_until_its_entry_ttl<
    B: LockBackend + Clone,
>(
    backend: B,
) {
    const DEAD_TTL: Duration = Duration::from_secs(2);
    if refused_without_fair_permits(&backend).await {
        return;
    }
    let a = start(backend.clone()).await;
    let b = start(backend.clone()).await;
    let name = unique_key("fair-sem-dead");
    let on_a = a.semaphore(&name, 2).unwrap();
    let long = LockOptions::new().with_ttl(Duration::from_secs(60));
    let first = on_a.try_acquire(long.clone()).await.unwrap();
    let second = on_a.try_acquire(long).await.unwrap();
    let (first, second) = (first.expect("free"), second.expect("free"));
    // The dead waiter: one attempt for 2 permits, answered "held", so it is in the queue.
    let dead = OwnerToken::random();
    let entered_at = Instant::now();
    let permits = crate::backend::Permits::new(2, 2);
    let attempt = backend
        .acquire_permits_fair(&name, dead, DEAD_TTL, permits, None)
        .await;
    assert!(
        matches!(attempt, Ok(crate::backend::Acquisition::Held(_))),
        "the dead waiter queues behind the holders: {attempt:?}"
    );
    let waiter = {
        let semaphore = b.semaphore(&name, 2).unwrap();
        // Its budget is shorter than the holders' ttl: only the dead place's expiry, not a
        // holder's, can let it in in time.
        tokio::spawn(async move { semaphore.acquire(fair(DEAD_TTL + PROMPT * 5)).await })
    };
    eventually("the live waiter is queued", PROMPT, || async {
        waiting_on(&b, &name).await == 1
    })
    .await;
    first.release().await.unwrap();
    let guard = waiter
        .await
        .unwrap()
        .expect("the live waiter gets a permit");
    let got_at = Instant::now();
    assert!(
        got_at >= entered_at + DEAD_TTL,
        "the dead waiter was ahead until its place ran out, yet the next got in after {:?}",
        got_at - entered_at
    );
    guard.release().await.unwrap();
    second.release().await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
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
/// apart from the others. A permit it holds of a semaphore of the same name is not the lock:
/// it does not stop the holder from taking the lock fairly, nor (where semaphores can be
/// fair) from taking a second permit fairly.
pub async fn same_holder_asking_again_fairly_gets_an_error<B: LockBackend + Clone>(backend: B) {
    let fair_permits = backend.supports_fair_permits();
    let client = start(backend).await;
    let key = unique_key("fair-again");
    let (holder, _join) = Actor::spawn(None, Holder, ()).await.unwrap();
    let semaphore = client.semaphore(&key, 2).unwrap();
    let mine = LockOptions::new().with_holder(holder.clone());
    let permit = semaphore.try_acquire(mine.clone()).await.unwrap();
    let permit = permit.expect("the semaphore is free");
    if fair_permits {
        let second = semaphore.try_acquire(mine.with_fair(true)).await.unwrap();
        let second = second.expect("a holder may hold several permits, fairly too");
        second.release().await.unwrap();
    }
    let opts = LockOptions::new()
        .with_fair(true)
        .with_holder(holder.clone());
    let guard = client.try_lock(&key, opts.clone()).await.unwrap();
    let guard = guard.expect("a permit of the same name is not the lock");
    // Bounded, so that a wait for itself fails the test with a timeout rather than hangs.
    let err = client
        .lock(&key, opts.with_wait(Wait::UpTo(PROMPT)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyHeld { .. }), "{err:?}");
    assert!(err.to_string().contains(&key), "{err}");
    assert!(guard.is_held());
    guard.release().await.unwrap();
    permit.release().await.unwrap();
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
