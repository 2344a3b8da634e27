//! The read-write lock part of the conformance suite: every backend that holds read-write
//! locks (`acquire_rw`, `withdraw_writer`, `subscribe_rw`) passes these. Run them with
//! [`rwlock_suite!`](crate::rwlock_suite).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::Actor;
use tokio::time::Instant;

use super::{eventually, start, unique_key, Holder, PROMPT};
use crate::{
    Acquisition, Error, ErrorKind, Lease, LockBackend, LockManagerMsg, LockOptions, LostReason,
    OwnerToken, RwMode, Wait,
};

/// Generates one `#[tokio::test]` per read-write lock test for the backend built by
/// `$backend`, as [`conformance_suite!`](crate::conformance_suite) does for the lock tests.
#[macro_export]
macro_rules! rwlock_suite {
    (paused, $backend:expr) => {
        $crate::rwlock_suite!(@all [start_paused = true], $backend);
    };
    (real, $backend:expr) => {
        $crate::rwlock_suite!(@all [flavor = "multi_thread", worker_threads = 2], $backend);
    };
    (@all [$($attr:tt)*], $backend:expr) => {
        $crate::rwlock_suite!(@each [$($attr)*], $backend,
            readers_share_across_nodes,
            a_writer_excludes_readers_and_writers,
            readers_exclude_a_writer,
            try_read_and_try_write_answer_at_once,
            a_waiting_writer_blocks_new_readers_and_gets_the_lock_when_they_leave,
            a_writer_that_gives_up_lets_readers_in_at_once,
            a_dead_waiting_writer_blocks_readers_only_until_its_intent_ttl,
            a_try_write_leaves_no_intent,
            a_writers_token_is_greater_than_every_earlier_token,
            a_crashed_readers_share_frees_at_its_ttl,
            a_writers_release_wakes_waiting_readers_on_another_node,
            writers_never_overlap_anyone_across_nodes,
            holder_actor_stop_frees_its_share,
            a_share_renews_and_a_share_taken_away_is_lost,
            bad_rwlock_input_is_rejected_naming_the_value,
            rwlock_and_lock_of_one_name_are_apart,
            shares_and_holds_by_message_to_the_manager,
        );
    };
    (@each $attr:tt, $backend:expr, $($name:ident),+ $(,)?) => {
        $( $crate::rwlock_suite!(@one $attr, $backend, $name); )+
    };
    (@one [$($attr:tt)*], $backend:expr, $name:ident) => {
        #[tokio::test($($attr)*)]
        async fn $name() {
            $crate::testing::rwlock::$name($backend).await;
        }
    };
}

fn waiting(limit: Duration) -> LockOptions {
    LockOptions::new().with_wait(Wait::UpTo(limit))
}

/// Readers on two nodes hold shares of one read-write lock at the same time.
pub async fn readers_share_across_nodes<B: LockBackend + Clone>(backend: B) {
    let nodes = [start(backend.clone()).await, start(backend).await];
    let name = unique_key("rw-share");
    let mut shares = Vec::new();
    for round in 0..4 {
        let rw = nodes[round % 2].rwlock(&name).unwrap();
        let share = rw.try_read(LockOptions::new()).await.unwrap();
        shares.push(share.expect("readers share"));
    }
    assert!(shares.iter().all(|share| share.is_held()));
    assert!(shares.iter().all(|share| share.key() == name));
    drop(shares);
    for node in nodes {
        node.shutdown().await;
    }
}

/// While a writer holds the lock, no reader and no other writer gets in, on any node; once
/// it lets go, both can.
pub async fn a_writer_excludes_readers_and_writers<B: LockBackend + Clone>(backend: B) {
    let nodes = [start(backend.clone()).await, start(backend).await];
    let name = unique_key("rw-writer");
    let writer = nodes[0]
        .rwlock(&name)
        .unwrap()
        .try_write(LockOptions::new())
        .await
        .unwrap()
        .expect("nothing held");
    for node in &nodes {
        let rw = node.rwlock(&name).unwrap();
        assert!(rw.try_read(LockOptions::new()).await.unwrap().is_none());
        assert!(rw.try_write(LockOptions::new()).await.unwrap().is_none());
    }
    writer.release().await.unwrap();
    let rw = nodes[1].rwlock(&name).unwrap();
    let share = rw.try_read(LockOptions::new()).await.unwrap();
    share.expect("the writer let go").release().await.unwrap();
    let writer = rw.try_write(LockOptions::new()).await.unwrap();
    assert!(writer.is_some(), "the reader let go");
    drop(writer);
    for node in nodes {
        node.shutdown().await;
    }
}

/// A single read share keeps a writer out.
pub async fn readers_exclude_a_writer<B: LockBackend + Clone>(backend: B) {
    let nodes = [start(backend.clone()).await, start(backend).await];
    let name = unique_key("rw-reader");
    let share = nodes[0]
        .rwlock(&name)
        .unwrap()
        .try_read(LockOptions::new())
        .await
        .unwrap()
        .expect("nothing held");
    for node in &nodes {
        let rw = node.rwlock(&name).unwrap();
        assert!(rw.try_write(LockOptions::new()).await.unwrap().is_none());
    }
    share.release().await.unwrap();
    let rw = nodes[1].rwlock(&name).unwrap();
    let writer = rw.try_write(LockOptions::new()).await.unwrap();
    assert!(writer.is_some(), "the reader let go");
    drop(writer);
    for node in nodes {
        node.shutdown().await;
    }
}

/// `try_read` and `try_write` on a held lock answer at once, not after the holder's ttl.
pub async fn try_read_and_try_write_answer_at_once<B: LockBackend + Clone>(backend: B) {
    let nodes = [start(backend.clone()).await, start(backend).await];
    let name = unique_key("rw-try");
    let writer = nodes[0]
        .rwlock(&name)
        .unwrap()
        .try_write(LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let started = Instant::now();
    for node in &nodes {
        let rw = node.rwlock(&name).unwrap();
        assert!(rw.try_read(LockOptions::new()).await.unwrap().is_none());
        assert!(rw.try_write(LockOptions::new()).await.unwrap().is_none());
    }
    // The writer's ttl is 30 s: answering well inside it means nobody waited for it.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(writer.is_held());
    drop(writer);
    for node in nodes {
        node.shutdown().await;
    }
}

/// A writer waiting on one node keeps new readers out on every node while the readers
/// already in go on holding; when the last of them leaves, the writer gets the lock, long
/// before their ttl.
pub async fn a_waiting_writer_blocks_new_readers_and_gets_the_lock_when_they_leave<
    B: LockBackend + Clone,
>(
    backend: B,
) {
    let nodes = [
        start(backend.clone()).await,
        start(backend.clone()).await,
        start(backend).await,
    ];
    let name = unique_key("rw-waiting-writer");
    let first = nodes[0].rwlock(&name).unwrap();
    let reader = first.read(waiting(PROMPT)).await.unwrap();
    let writer = {
        let rw = nodes[1].rwlock(&name).unwrap();
        tokio::spawn(async move { rw.write(waiting(Duration::from_secs(20))).await })
    };
    // Once the writer's intent is in the store, readers are refused on every node, including
    // the one whose reader holds.
    for node in [&nodes[2], &nodes[0]] {
        let rw = node.rwlock(&name).unwrap();
        eventually("a new reader is refused", PROMPT, || async {
            rw.try_read(LockOptions::new()).await.unwrap().is_none()
        })
        .await;
    }
    assert!(reader.is_held(), "the reader already in keeps its share");
    assert!(!writer.is_finished(), "a reader still holds");
    let read_token = reader.fencing_token();
    let released = Instant::now();
    reader.release().await.unwrap();
    let writer = tokio::time::timeout(PROMPT, writer)
        .await
        .expect("the writer got in when the reader left")
        .unwrap()
        .unwrap();
    assert!(released.elapsed() < PROMPT);
    assert!(writer.fencing_token() > read_token);
    writer.release().await.unwrap();
    let share = first.try_read(LockOptions::new()).await.unwrap();
    assert!(share.is_some(), "readers are let in again");
    drop(share);
    for node in nodes {
        node.shutdown().await;
    }
}

/// A waiting writer whose budget runs out withdraws its intent: readers get in at once, not
/// at the intent's ttl.
pub async fn a_writer_that_gives_up_lets_readers_in_at_once<B: LockBackend + Clone>(backend: B) {
    let nodes = [start(backend.clone()).await, start(backend).await];
    let name = unique_key("rw-gives-up");
    let reader = nodes[0]
        .rwlock(&name)
        .unwrap()
        .read(waiting(PROMPT))
        .await
        .unwrap();
    let rw = nodes[1].rwlock(&name).unwrap();
    // Its intent is leased for 30 s; it waits 300 ms.
    let err = rw
        .write(waiting(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    eventually(
        "a reader gets in after the writer gave up",
        PROMPT,
        || async { rw.try_read(LockOptions::new()).await.unwrap().is_some() },
    )
    .await;
    drop(reader);
    for node in nodes {
        node.shutdown().await;
    }
}

/// A writer that recorded its intent and died (nothing withdraws it, nothing refreshes it)
/// keeps readers out only until its intent's ttl.
pub async fn a_dead_waiting_writer_blocks_readers_only_until_its_intent_ttl<
    B: LockBackend + Clone,
>(
    backend: B,
) {
    let client = start(backend.clone()).await;
    let name = unique_key("rw-dead-writer");
    let rw = client.rwlock(&name).unwrap();
    let reader = rw.try_read(LockOptions::new()).await.unwrap().unwrap();
    // A writer's one refused attempt, as its node would make it, and then nothing.
    let dead = OwnerToken::random();
    let ttl = Duration::from_millis(500);
    let attempt = backend
        .acquire_rw(&name, dead, ttl, RwMode::Write, true, None)
        .await
        .unwrap();
    let Acquisition::Held(contention) = attempt else {
        panic!("a reader holds: {attempt:?}");
    };
    let left = contention.remaining_ttl.expect("the store says how long");
    assert!(left <= ttl / 2, "the next attempt comes in time: {left:?}");
    let refused_at = Instant::now();
    assert!(rw.try_read(LockOptions::new()).await.unwrap().is_none());
    let share = rw.read(waiting(Duration::from_secs(10))).await.unwrap();
    assert!(refused_at.elapsed() < Duration::from_secs(10));
    assert!(reader.is_held() && share.is_held());
    drop((reader, share));
    client.shutdown().await;
}

/// A writer that only tries leaves nothing behind: readers are not held up by it.
pub async fn a_try_write_leaves_no_intent<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let rw = client.rwlock(&unique_key("rw-try-write")).unwrap();
    let reader = rw.try_read(LockOptions::new()).await.unwrap().unwrap();
    assert!(rw.try_write(LockOptions::new()).await.unwrap().is_none());
    let share = rw.try_read(LockOptions::new()).await.unwrap();
    assert!(share.is_some(), "no intent was left");
    drop((reader, share));
    client.shutdown().await;
}

/// Every writer's fencing token is greater than every token handed out before it, readers'
/// and writers', whichever node took them.
pub async fn a_writers_token_is_greater_than_every_earlier_token<B: LockBackend + Clone>(
    backend: B,
) {
    let nodes = [start(backend.clone()).await, start(backend).await];
    let name = unique_key("rw-tokens");
    let mut newest = 0;
    for round in 0..3 {
        let mut shares = Vec::new();
        for reader in 0..3 {
            let rw = nodes[(round + reader) % 2].rwlock(&name).unwrap();
            let share = rw.read(waiting(PROMPT)).await.unwrap();
            newest = newest.max(share.fencing_token());
            shares.push(share);
        }
        for share in shares {
            share.release().await.unwrap();
        }
        let rw = nodes[round % 2].rwlock(&name).unwrap();
        let writer = rw.write(waiting(PROMPT)).await.unwrap();
        assert!(
            writer.fencing_token() > newest,
            "writer {} after token {newest}",
            writer.fencing_token()
        );
        newest = writer.fencing_token();
        writer.release().await.unwrap();
    }
    for node in nodes {
        node.shutdown().await;
    }
}

/// A reader that took its share and stopped renewing (a crashed process) keeps a writer out
/// only until its ttl.
pub async fn a_crashed_readers_share_frees_at_its_ttl<B: LockBackend + Clone>(backend: B) {
    let client = start(backend.clone()).await;
    let name = unique_key("rw-crashed");
    let ttl = Duration::from_millis(500);
    let crashed = backend
        .acquire_rw(&name, OwnerToken::random(), ttl, RwMode::Read, false, None)
        .await
        .unwrap();
    let Acquisition::Acquired(crashed) = crashed else {
        panic!("nothing was held: {crashed:?}");
    };
    let rw = client.rwlock(&name).unwrap();
    assert!(rw.try_write(LockOptions::new()).await.unwrap().is_none());
    let writer = rw.write(waiting(Duration::from_secs(10))).await.unwrap();
    assert!(writer.fencing_token() > crashed.fencing_token);
    drop(writer);
    client.shutdown().await;
}

/// Readers waiting behind a writer on another node are woken by its release notice, long
/// before its ttl.
pub async fn a_writers_release_wakes_waiting_readers_on_another_node<B: LockBackend + Clone>(
    backend: B,
) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("rw-wake");
    let writer = a
        .rwlock(&name)
        .unwrap()
        .write(waiting(PROMPT))
        .await
        .unwrap();
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let rw = b.rwlock(&name).unwrap();
            tokio::spawn(async move { rw.read(waiting(Duration::from_secs(20))).await })
        })
        .collect();
    let rw = b.rwlock(&name).unwrap();
    assert!(rw.try_read(LockOptions::new()).await.unwrap().is_none());
    // Dropping the guard releases it (ttl 30 s): the notice wakes the readers.
    drop(writer);
    let woken = Instant::now();
    for reader in readers {
        let share = tokio::time::timeout(PROMPT, reader)
            .await
            .expect("woken by the release notice")
            .unwrap()
            .unwrap();
        assert!(share.is_held());
    }
    assert!(woken.elapsed() < PROMPT);
    a.shutdown().await;
    b.shutdown().await;
}

/// Readers and writers on two nodes, by the library's account: no writer ever holds at the
/// same time as anyone else, and every task gets its turns.
pub async fn writers_never_overlap_anyone_across_nodes<B: LockBackend + Clone>(backend: B) {
    let nodes = [start(backend.clone()).await, start(backend).await];
    let name = unique_key("rw-overlap");
    // Readers count 1, a writer 1000.
    let holding = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for node in &nodes {
        for task in 0..4 {
            let rw = node.rwlock(&name).unwrap();
            let holding = holding.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..3 {
                    let wait = waiting(Duration::from_secs(30));
                    let (guard, weight) = if task == 0 {
                        (rw.write(wait).await.unwrap(), 1000)
                    } else {
                        (rw.read(wait).await.unwrap(), 1)
                    };
                    let now = holding.fetch_add(weight, Ordering::SeqCst) + weight;
                    assert!(
                        now < 1000 || now == 1000 && weight == 1000,
                        "a writer overlapped: {now}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    holding.fetch_sub(weight, Ordering::SeqCst);
                    assert!(guard.is_held());
                    guard.release().await.unwrap();
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    for node in nodes {
        node.shutdown().await;
    }
}

/// A read share's holder actor stopping gives the share back at once: a writer gets in long
/// before its ttl.
pub async fn holder_actor_stop_frees_its_share<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let rw = client.rwlock(&unique_key("rw-holder")).unwrap();
    let (holder, join) = Actor::spawn(None, Holder, ()).await.unwrap();
    let share = rw
        .try_read(LockOptions::new().with_holder(holder.get_cell()))
        .await
        .unwrap()
        .unwrap();
    holder.stop(None);
    let _ = join.await;
    let writer = rw.write(waiting(PROMPT)).await.unwrap();
    assert_eq!(share.lost().await, LostReason::HolderStopped);
    assert!(!share.is_held());
    drop(writer);
    client.shutdown().await;
}

/// A share renews through its guard; when the store stops knowing it (another client deleted
/// it), its next renewal finds out: the guard reports `NotOwner` and is no longer held.
pub async fn a_share_renews_and_a_share_taken_away_is_lost<B: LockBackend + Clone>(backend: B) {
    let client = start(backend.clone()).await;
    let rw = client.rwlock(&unique_key("rw-lost")).unwrap();
    for mode in [RwMode::Read, RwMode::Write] {
        let guard = match mode {
            RwMode::Read => rw.try_read(LockOptions::new()).await,
            _ => rw.try_write(LockOptions::new()).await,
        };
        let guard = guard.unwrap().expect("nothing else is held");
        guard.renew(Duration::from_secs(60)).await.unwrap();
        assert_eq!(guard.ttl(), Some(Duration::from_secs(60)));
        // Another client deletes it, knowing only its owner.
        let mut theirs = Lease::new(rw.name(), guard.owner(), 0);
        theirs.rw = Some(mode);
        assert!(backend.release(&theirs).await.unwrap(), "{mode:?}");
        let err = guard.renew(Duration::from_secs(30)).await.unwrap_err();
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
        assert_eq!(guard.lost().await, LostReason::NotOwner);
        assert!(!guard.is_held());
    }
    client.shutdown().await;
}

/// An empty name, a name with a control character and a bad ttl are refused before any I/O,
/// each with a message naming the value.
pub async fn bad_rwlock_input_is_rejected_naming_the_value<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let err = client.rwlock("").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::EmptyRwLockName);
    assert!(err.to_string().contains("name is empty"), "{err}");
    assert!(err.is_invalid_input());
    let err = client.rwlock("a\nb").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::KeyHasControlChar);
    assert!(err.to_string().contains("a\\nb"), "{err}");
    let rw = client.rwlock(&unique_key("rw-bad")).unwrap();
    let zero = LockOptions::new().with_ttl(Duration::ZERO);
    let err = rw.try_write(zero.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTtl);
    assert!(err.to_string().contains("0ns"), "{err}");
    let err = rw.read(zero).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTtl);
    // Nothing reached the store: the lock is free.
    let writer = rw.try_write(LockOptions::new()).await.unwrap();
    assert!(writer.is_some());
    drop(writer);
    client.shutdown().await;
}

/// A read-write lock, a semaphore and a lock of the same name do not exclude each other.
pub async fn rwlock_and_lock_of_one_name_are_apart<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let name = unique_key("rw-apart");
    let lock = client.try_lock(&name, LockOptions::new()).await.unwrap();
    assert!(lock.is_some(), "the lock is free");
    let writer = client
        .rwlock(&name)
        .unwrap()
        .try_write(LockOptions::new())
        .await
        .unwrap();
    assert!(writer.is_some(), "the read-write lock is free");
    assert!(client.is_locked(&name).await.unwrap());
    drop((lock, writer));
    client.shutdown().await;
}

/// Actors ask for read shares and the write hold by message to the manager: the same checks,
/// the same guards; a message tries once unless its options say to wait.
pub async fn shares_and_holds_by_message_to_the_manager<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let manager = client.manager().clone();
    let name = unique_key("rw-message");
    let ask = |name: &str, mode: RwMode, options: LockOptions| {
        let name = name.to_owned();
        move |reply| LockManagerMsg::AcquireRw {
            backend: None,
            name,
            mode,
            options,
            reply,
        }
    };
    let read = ask(&name, RwMode::Read, LockOptions::new());
    let share = ractor::call!(manager, read).unwrap().unwrap();
    let share = share.expect("nothing held");
    assert_eq!(share.key(), name);
    let write = ask(&name, RwMode::Write, LockOptions::new());
    let refused = ractor::call!(manager, write).unwrap().unwrap();
    assert!(
        refused.is_none(),
        "a reader holds, and a message does not wait by default"
    );
    let waiting_writer = {
        let manager = manager.clone();
        let write = ask(&name, RwMode::Write, waiting(Duration::from_secs(20)));
        tokio::spawn(async move { ractor::call!(manager, write) })
    };
    eventually(
        "the waiting writer holds new readers back",
        PROMPT,
        || async {
            let read = ask(&name, RwMode::Read, LockOptions::new());
            ractor::call!(manager, read).unwrap().unwrap().is_none()
        },
    )
    .await;
    let read_token = share.fencing_token();
    share.release().await.unwrap();
    let writer = tokio::time::timeout(PROMPT, waiting_writer)
        .await
        .expect("the writer got in when the reader left")
        .unwrap()
        .unwrap()
        .unwrap()
        .expect("it waited");
    assert!(writer.fencing_token() > read_token);
    let err = ractor::call!(manager, ask("", RwMode::Read, LockOptions::new()))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::EmptyRwLockName);
    writer.release().await.unwrap();
    client.shutdown().await;
}
