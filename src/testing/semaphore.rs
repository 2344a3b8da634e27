//! The semaphore part of the conformance suite: every backend that holds semaphores
//! (`acquire_permits`, `subscribe_permits`, `permit_holders`) passes these. Run them with
//! [`semaphore_suite!`](crate::semaphore_suite).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;

use super::{eventually, start, unique_key, Holder, PROMPT};
use crate::{
    Acquisition, Error, ErrorKind, LockBackend, LockManagerMsg, LockOptions, LostReason,
    OwnerToken, Permits, Wait, MAX_PERMITS,
};

/// Generates one `#[tokio::test]` per semaphore test for the backend built by `$backend`, as
/// [`conformance_suite!`](crate::conformance_suite) does for the lock tests.
#[macro_export]
macro_rules! semaphore_suite {
    (paused, $backend:expr) => {
        $crate::semaphore_suite!(@all [start_paused = true], $backend);
    };
    (real, $backend:expr) => {
        $crate::semaphore_suite!(@all [flavor = "multi_thread", worker_threads = 2], $backend);
    };
    (@all [$($attr:tt)*], $backend:expr) => {
        $crate::semaphore_suite!(@each [$($attr)*], $backend,
            at_most_n_hold_at_once_across_nodes,
            n_permits_are_granted_and_the_next_is_refused,
            k_permits_are_taken_and_given_back_together,
            permit_tokens_strictly_increase_across_nodes,
            dropped_permit_guard_wakes_a_waiter_on_another_node,
            holder_actor_stop_frees_its_permit,
            permit_of_a_crashed_holder_frees_at_its_ttl,
            mismatched_permits_are_refused_naming_both,
            bad_semaphore_input_is_rejected_naming_the_value,
            permit_renews_releases_and_shows_in_holders,
            semaphore_and_lock_of_one_name_are_apart,
            permits_by_message_to_the_manager,
            a_permit_known_only_by_its_owner_is_given_back,
            a_permit_taken_away_is_lost,
        );
    };
    (@each $attr:tt, $backend:expr, $($name:ident),+ $(,)?) => {
        $( $crate::semaphore_suite!(@one $attr, $backend, $name); )+
    };
    (@one [$($attr:tt)*], $backend:expr, $name:ident) => {
        #[tokio::test($($attr)*)]
        async fn $name() {
            $crate::testing::semaphore::$name($backend).await;
        }
    };
}

fn waiting(limit: Duration) -> LockOptions {
    LockOptions::new().with_wait(Wait::UpTo(limit))
}

/// Two nodes, four tasks each, on a semaphore of 3: the holders counted at any moment never
/// exceed 3, and every task gets its turns.
pub async fn at_most_n_hold_at_once_across_nodes<B: LockBackend + Clone>(backend: B) {
    const N: u32 = 3;
    let nodes = [start(backend.clone()).await, start(backend).await];
    let name = unique_key("semaphore-n");
    let holding = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for node in &nodes {
        for _ in 0..4 {
            let semaphore = node.semaphore(&name, N).unwrap();
            let (holding, most) = (holding.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..3 {
                    let permit = semaphore
                        .acquire(waiting(Duration::from_secs(20)))
                        .await
                        .unwrap();
                    let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    holding.fetch_sub(1, Ordering::SeqCst);
                    assert!(permit.is_held());
                    permit.release().await.unwrap();
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= N, "{most} held permits at once, of {N}");
    for node in nodes {
        node.shutdown().await;
    }
}

/// N callers get a permit each at once; the next is refused at once, and gets one as soon as
/// one is given back.
pub async fn n_permits_are_granted_and_the_next_is_refused<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let semaphore = client.semaphore(&unique_key("semaphore-full"), 3).unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let permit = semaphore.try_acquire(LockOptions::new()).await.unwrap();
        held.push(permit.expect("a free permit"));
    }
    assert!(semaphore
        .try_acquire(LockOptions::new())
        .await
        .unwrap()
        .is_none());
    held.pop().unwrap().release().await.unwrap();
    let again = semaphore.try_acquire(LockOptions::new()).await.unwrap();
    assert!(again.is_some(), "the permit given back is free");
    drop((held, again));
    client.shutdown().await;
}

/// k permits at once are one lease: granted only when k are free, and freed together.
pub async fn k_permits_are_taken_and_given_back_together<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let semaphore = client.semaphore(&unique_key("semaphore-k"), 5).unwrap();
    let three = semaphore
        .try_acquire_many(3, LockOptions::new())
        .await
        .unwrap()
        .expect("5 free");
    let none = semaphore
        .try_acquire_many(3, LockOptions::new())
        .await
        .unwrap();
    assert!(none.is_none(), "3 asked, 2 free");
    let two = semaphore
        .try_acquire_many(2, LockOptions::new())
        .await
        .unwrap()
        .expect("2 free");
    assert!(semaphore
        .try_acquire(LockOptions::new())
        .await
        .unwrap()
        .is_none());
    let holders = semaphore.holders().await.unwrap();
    let counts: Vec<u32> = holders.iter().map(|h| h.permits.count).collect();
    assert_eq!(counts, [3, 2]);
    assert!(holders.iter().all(|h| h.permits.total == 5));
    three.release().await.unwrap();
    let again = semaphore
        .try_acquire_many(3, LockOptions::new())
        .await
        .unwrap();
    assert!(again.is_some(), "all three came back");
    drop((two, again));
    client.shutdown().await;
}

/// Each permit's fencing token is greater than every earlier one's, whichever node took it.
pub async fn permit_tokens_strictly_increase_across_nodes<B: LockBackend + Clone>(backend: B) {
    let nodes = [start(backend.clone()).await, start(backend).await];
    let name = unique_key("semaphore-tokens");
    let mut last = 0;
    let mut held = Vec::new();
    for round in 0..6 {
        let semaphore = nodes[round % 2].semaphore(&name, 2).unwrap();
        let permit = semaphore.acquire(waiting(PROMPT)).await.unwrap();
        assert!(permit.fencing_token() > last, "token went back");
        last = permit.fencing_token();
        held.push(permit);
        if held.len() == 2 {
            held.remove(0).release().await.unwrap();
        }
    }
    drop(held);
    for node in nodes {
        node.shutdown().await;
    }
}

/// A waiter on another node is woken by the release notice when a guard is dropped.
pub async fn dropped_permit_guard_wakes_a_waiter_on_another_node<B: LockBackend + Clone>(
    backend: B,
) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("semaphore-drop");
    let held = a
        .semaphore(&name, 1)
        .unwrap()
        .acquire(waiting(PROMPT))
        .await
        .unwrap();
    let waiter = {
        let semaphore = b.semaphore(&name, 1).unwrap();
        tokio::spawn(async move { semaphore.acquire(waiting(Duration::from_secs(20))).await })
    };
    // The waiter has tried and found the permit taken.
    let semaphore = b.semaphore(&name, 1).unwrap();
    eventually("the waiter is waiting", PROMPT, || async {
        b.metrics().contended > 0 || waiter.is_finished()
    })
    .await;
    assert!(!waiter.is_finished(), "the only permit is held");
    let token = held.fencing_token();
    drop(held);
    let taken = tokio::time::timeout(PROMPT, waiter)
        .await
        .expect("woken promptly by the release")
        .unwrap()
        .unwrap();
    assert!(taken.fencing_token() > token);
    assert_eq!(semaphore.holders().await.unwrap().len(), 1);
    drop(taken);
    a.shutdown().await;
    b.shutdown().await;
}

/// The holder actor stopping frees its permit at once (not at the ttl), and its guard says
/// why.
pub async fn holder_actor_stop_frees_its_permit<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let semaphore = client
        .semaphore(&unique_key("semaphore-holder"), 1)
        .unwrap();
    let (holder, join) = Actor::spawn(None, Holder, ()).await.unwrap();
    let opts = LockOptions::new().with_holder(holder.clone());
    let permit = semaphore.try_acquire(opts).await.unwrap().unwrap();
    holder.stop(None);
    let _ = join.await;
    assert_eq!(permit.lost().await, LostReason::HolderStopped);
    assert!(!permit.is_held());
    let next = semaphore.acquire(waiting(PROMPT)).await.unwrap();
    assert!(next.fencing_token() > permit.fencing_token());
    drop(next);
    client.shutdown().await;
}

/// A holder that crashed (took a permit from the store and was never heard of again) holds
/// it only until its ttl: a waiter then gets it.
pub async fn permit_of_a_crashed_holder_frees_at_its_ttl<B: LockBackend + Clone>(backend: B) {
    let ttl = Duration::from_millis(400);
    let name = unique_key("semaphore-crash");
    let crashed = backend
        .acquire_permits(&name, OwnerToken::random(), ttl, Permits::new(1, 1), None)
        .await
        .unwrap();
    let Acquisition::Acquired(crashed) = crashed else {
        panic!("the permit was free: {crashed:?}");
    };
    let client = start(backend).await;
    let semaphore = client.semaphore(&name, 1).unwrap();
    assert!(semaphore
        .try_acquire(LockOptions::new())
        .await
        .unwrap()
        .is_none());
    // Stores round ttls up (etcd: whole seconds, at least its minimum lease): allow for it.
    let permit = semaphore
        .acquire(waiting(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(permit.fencing_token() > crashed.fencing_token);
    drop(permit);
    client.shutdown().await;
}

/// A caller with another N than the semaphore's live holders is refused, with both numbers
/// in the message; once nobody holds it, the new N holds.
pub async fn mismatched_permits_are_refused_naming_both<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let name = unique_key("semaphore-mismatch");
    let two = client.semaphore(&name, 2).unwrap();
    let held = two.try_acquire(LockOptions::new()).await.unwrap().unwrap();
    let three = client.semaphore(&name, 3).unwrap();
    let err = three.try_acquire(LockOptions::new()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::PermitsMismatch {
                asked: 3,
                held: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::PermitsMismatch);
    assert!(
        err.to_string()
            .contains("held with 2 permits, asked with 3"),
        "{err}"
    );
    // A waiting caller is refused at once too, rather than waiting for nothing.
    let err = three.acquire(waiting(PROMPT)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermitsMismatch);
    held.release().await.unwrap();
    let now_three = three.try_acquire(LockOptions::new()).await.unwrap();
    assert!(now_three.is_some(), "nobody held it: the new N holds");
    drop(now_three);
    client.shutdown().await;
}

/// An empty name, 0 permits, more than `MAX_PERMITS`, 0 or more than N at once and a bad ttl
/// are refused before any I/O, each with a message naming the value.
pub async fn bad_semaphore_input_is_rejected_naming_the_value<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let err = client.semaphore("", 1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::EmptySemaphoreName);
    assert!(err.to_string().contains("name is empty"), "{err}");
    let err = client.semaphore("a\nb", 1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::KeyHasControlChar);
    let err = client.semaphore("jobs", 0).unwrap_err();
    assert!(matches!(err, Error::InvalidPermits { permits: 0, .. }));
    assert!(err.to_string().contains("permits 0"), "{err}");
    let err = client.semaphore("jobs", MAX_PERMITS + 1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidPermits);
    assert!(err.to_string().contains("4097"), "{err}");
    assert!(err.to_string().contains("4096"), "{err}");
    let semaphore = client.semaphore(&unique_key("semaphore-bad"), 2).unwrap();
    let err = semaphore
        .try_acquire_many(0, LockOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidPermitCount { count: 0, .. }));
    assert!(err.to_string().contains("count 0"), "{err}");
    let err = semaphore
        .try_acquire_many(3, LockOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidPermitCount {
            count: 3,
            permits: 2,
            ..
        }
    ));
    assert!(err.to_string().contains("count 3"), "{err}");
    assert!(err.to_string().contains("has 2 permits"), "{err}");
    let err = semaphore
        .try_acquire(LockOptions::new().with_ttl(Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTtl);
    for err in [
        client.semaphore("", 1).unwrap_err(),
        client.semaphore("jobs", 0).unwrap_err(),
    ] {
        assert!(err.is_invalid_input(), "{err:?}");
    }
    // Nothing reached the store.
    assert!(semaphore.holders().await.unwrap().is_empty());
    client.shutdown().await;
}

/// A permit's guard renews, also for a longer ttl than it was taken with (the store keeps it
/// that long), releases (the store forgets it), and shows in `holders` with its metadata,
/// permits and token meanwhile.
pub async fn permit_renews_releases_and_shows_in_holders<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let semaphore = client.semaphore(&unique_key("semaphore-guard"), 4).unwrap();
    let opts = LockOptions::new().with_metadata("worker 7");
    let permit = semaphore.try_acquire_many(2, opts).await.unwrap().unwrap();
    assert_eq!(permit.key(), semaphore.name());
    // Longer than the 30 s it was taken with (etcd moves it to a longer lease).
    permit.renew(Duration::from_secs(60)).await.unwrap();
    assert_eq!(permit.ttl(), Some(Duration::from_secs(60)));
    let holders = semaphore.holders().await.unwrap();
    assert_eq!(holders.len(), 1);
    let holder = &holders[0];
    assert_eq!(holder.fencing_token, permit.fencing_token());
    assert_eq!(holder.permits, Permits::new(4, 2));
    assert_eq!(holder.metadata.as_deref(), Some("worker 7"));
    assert!(holder.remaining_ttl > Duration::from_secs(40), "{holder:?}");
    // Its auto-renewal goes on with the new ttl.
    permit.renew(Duration::from_secs(60)).await.unwrap();
    permit.release().await.unwrap();
    assert!(semaphore.holders().await.unwrap().is_empty());
    client.shutdown().await;
}

/// A semaphore and a lock of the same name do not exclude each other.
pub async fn semaphore_and_lock_of_one_name_are_apart<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let name = unique_key("semaphore-apart");
    let lock = client
        .try_lock(&name, LockOptions::new())
        .await
        .unwrap()
        .expect("the lock is free");
    let semaphore = client.semaphore(&name, 1).unwrap();
    let permit = semaphore.try_acquire(LockOptions::new()).await.unwrap();
    assert!(permit.is_some(), "the semaphore is free");
    assert!(client.is_locked(&name).await.unwrap());
    drop((lock, permit));
    client.shutdown().await;
}

/// Actors ask for permits, and for a semaphore's holders, by message to the manager: the
/// same checks, the same guard.
pub async fn permits_by_message_to_the_manager<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let manager = client.manager().clone();
    let name = unique_key("semaphore-message");
    let ask = |count: u32| {
        let name = name.clone();
        move |reply| LockManagerMsg::AcquirePermits {
            backend: None,
            name,
            permits: 2,
            count,
            options: LockOptions::new().with_metadata("by message"),
            reply,
        }
    };
    let both = ractor::call!(manager, ask(2)).unwrap().unwrap();
    let both = both.expect("2 free");
    assert_eq!(both.key(), name);
    let none = ractor::call!(manager, ask(1)).unwrap().unwrap();
    assert!(
        none.is_none(),
        "no permit free, and a message does not wait by default"
    );
    let err = ractor::call!(manager, ask(3)).unwrap().unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidPermitCount {
            count: 3,
            permits: 2,
            ..
        }
    ));
    let holders = ractor::call!(manager, |reply| LockManagerMsg::PermitHolders {
        backend: None,
        name: name.clone(),
        reply,
    })
    .unwrap()
    .unwrap();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].fencing_token, both.fencing_token());
    assert_eq!(holders[0].permits, Permits::new(2, 2));
    assert_eq!(holders[0].metadata.as_deref(), Some("by message"));
    both.release().await.unwrap();
    client.shutdown().await;
}

/// An acquisition whose answer never came (a timeout, a broken connection) is given back by
/// its owner token alone, its token unknown: the store finds it, and frees its permits now
/// rather than at its ttl.
pub async fn a_permit_known_only_by_its_owner_is_given_back<B: LockBackend + Clone>(backend: B) {
    let name = unique_key("semaphore-take-back");
    let owner = OwnerToken::random();
    let permits = Permits::new(2, 2);
    let ttl = Duration::from_secs(30);
    let taken = backend
        .acquire_permits(&name, owner, ttl, permits, Some("lost answer"))
        .await
        .unwrap();
    assert!(matches!(taken, Acquisition::Acquired(_)), "{taken:?}");
    let mut unknown = crate::Lease::new(name.clone(), owner, 0);
    unknown.permits = Some(permits);
    assert!(
        backend.release(&unknown).await.unwrap(),
        "found and released"
    );
    assert!(backend.permit_holders(&name).await.unwrap().is_empty());
    let again = backend
        .acquire_permits(&name, OwnerToken::random(), ttl, permits, None)
        .await
        .unwrap();
    let Acquisition::Acquired(again) = again else {
        panic!("both permits are free again: {again:?}");
    };
    assert!(backend.release(&again).await.unwrap());
}

/// When the store stops knowing a permit (another client deleted it), its next renewal finds
/// out: the guard reports `NotOwner` and is no longer held.
pub async fn a_permit_taken_away_is_lost<B: LockBackend + Clone>(backend: B) {
    let client = start(backend.clone()).await;
    let semaphore = client.semaphore(&unique_key("semaphore-lost"), 2).unwrap();
    let permit = semaphore
        .try_acquire(LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    // Another client deletes it, knowing only its owner (as in the store's own records).
    let mut theirs = crate::Lease::new(semaphore.name(), permit.owner(), 0);
    theirs.permits = Some(Permits::new(2, 1));
    assert!(backend.release(&theirs).await.unwrap());
    let err = permit.renew(Duration::from_secs(30)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::LeaseLost {
                reason: LostReason::NotOwner,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(permit.lost().await, LostReason::NotOwner);
    assert!(!permit.is_held());
    client.shutdown().await;
}
