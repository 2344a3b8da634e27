//! The etcd backend on a session lease (`EtcdBackendBuilder::with_session`), on real `etcd`
//! servers: the whole conformance suite, then what the session changes — one lease under every
//! lock, a release that deletes only its key, locks that follow the session (no renewal of
//! their own while it is kept; a key taken away by another client lost within ttl/3), every
//! lock lost together when the session lease is revoked from outside or etcd stops answering,
//! and the session's bounds refused before any I/O.

use leasehold_test_support::etcd_server;

use std::time::Duration;

use etcd_client::{Client, GetOptions};
use etcd_server::EtcdServer;
use leasehold::testing::{eventually, start, unique_key};
use leasehold::{Error, EtcdBackend, EtcdMode, LockEventKind, LockOptions, LostReason, Wait};
use tokio::time::{timeout, timeout_at, Instant};

/// The session's ttl in these tests: longer than every ttl the conformance suite asks for.
const SESSION: Duration = Duration::from_secs(120);

async fn session_backend(server: &EtcdServer, ttl: Duration) -> EtcdBackend {
    EtcdBackend::builder([server.endpoint()])
        .with_prefix(unique_key("session/"))
        .with_session(ttl)
        .connect()
        .await
        .expect("etcd backend on a session lease")
}

// `EtcdServer::start()` is a temporary of the statement that runs each test, so the server
// lives until the test is over and is stopped when it ends.
mod conformance {
    leasehold::conformance_suite!(
        real,
        super::session_backend(&super::EtcdServer::start(), super::SESSION).await
    );
}

// Fair waiters queue on leases of their own; an admitted one's lock is on the session.
mod fair {
    leasehold::fair_suite!(
        real,
        super::session_backend(&super::EtcdServer::start(), super::SESSION).await
    );
}

/// The etcd key of `key`'s lock, read by a plain client.
async fn lock_key(etcd: &mut Client, backend: &EtcdBackend, key: &str) -> etcd_client::KeyValue {
    let read = etcd.get(backend.lock_key(key), None).await.unwrap();
    read.kvs().first().cloned().expect("the lock key exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_share_one_lease_and_a_release_deletes_only_its_key() {
    let server = EtcdServer::start();
    let backend = session_backend(&server, Duration::from_secs(10)).await;
    let node = start(backend.clone()).await;
    let mut etcd = Client::connect([server.endpoint()], None).await.unwrap();
    let keys: Vec<String> = (0..3).map(|i| unique_key(&format!("shared{i}"))).collect();
    let mut guards = Vec::new();
    for key in &keys {
        let opts = LockOptions::new().with_ttl(Duration::from_secs(10));
        guards.push(node.try_lock(key, opts).await.unwrap().expect("free key"));
    }
    let mut leases = Vec::new();
    for key in &keys {
        leases.push(lock_key(&mut etcd, &backend, key).await.lease());
    }
    assert_ne!(leases[0], 0, "the locks are on a lease");
    assert!(
        leases.iter().all(|&lease| lease == leases[0]),
        "one session lease under every lock: {leases:?}"
    );
    let tokens: Vec<u64> = guards.iter().map(|g| g.fencing_token()).collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "tokens {tokens:?}");

    let first = guards.remove(0);
    first.release().await.unwrap();
    let gone = etcd.get(backend.lock_key(&keys[0]), None).await.unwrap();
    assert_eq!(gone.count(), 0, "the released lock's key is deleted");
    let alive = etcd.lease_time_to_live(leases[0], None).await.unwrap();
    assert!(alive.ttl() > 0, "the release left the session lease alive");
    for (guard, key) in guards.iter().zip(&keys[1..]) {
        assert!(guard.is_held());
        assert_eq!(lock_key(&mut etcd, &backend, key).await.lease(), leases[0]);
    }
    for guard in guards {
        guard.release().await.unwrap();
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_session_lease_loses_every_lock_on_it_and_a_new_session_follows() {
    let server = EtcdServer::start();
    let ttl = Duration::from_secs(6);
    let backend = session_backend(&server, ttl).await;
    let node = start(backend.clone()).await;
    let other = start(backend.clone()).await;
    let mut etcd = Client::connect([server.endpoint()], None).await.unwrap();
    let keys: Vec<String> = (0..4).map(|i| unique_key(&format!("revoked{i}"))).collect();
    let mut guards = Vec::new();
    for key in &keys {
        let opts = LockOptions::new().with_ttl(ttl);
        guards.push(node.try_lock(key, opts).await.unwrap().expect("free key"));
    }
    let session = lock_key(&mut etcd, &backend, &keys[0]).await.lease();
    etcd.lease_revoke(session).await.unwrap();
    // At once, before the keeper's next keep-alive could have noticed: a new lock is taken on
    // a new session lease.
    let fresh = unique_key("after-revoke");
    let taken = other
        .try_lock(&fresh, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .expect("a free key right after the revoke");
    let fresh_on = lock_key(&mut etcd, &backend, &fresh).await.lease();
    assert_ne!(
        fresh_on, session,
        "the new lock is not on the revoked lease"
    );
    taken.release().await.unwrap();
    // Each lock hears of it from the prefix watch (the revoke deleted its key) or the
    // session's keeper: within a third of the ttl.
    for guard in &guards {
        let reason = timeout(ttl / 3, guard.lost())
            .await
            .expect("lost within a third of the ttl");
        assert_eq!(reason, LostReason::NotOwner);
        assert!(!guard.is_held());
    }
    // The next acquisition is on a new session lease.
    let again = other
        .lock(
            &keys[0],
            LockOptions::new()
                .with_ttl(ttl)
                .with_wait(Wait::UpTo(Duration::from_secs(5))),
        )
        .await
        .unwrap();
    let renewed_on = lock_key(&mut etcd, &backend, &keys[0]).await.lease();
    assert_ne!(renewed_on, session, "a new session after the revoke");
    assert!(again.fencing_token() > guards[0].fencing_token());
    again.release().await.unwrap();
    node.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_locks_are_kept_for_several_session_ttls_by_the_keeper() {
    let server = EtcdServer::start();
    let ttl = Duration::from_secs(2);
    let backend = session_backend(&server, ttl).await;
    let node = start(backend.clone()).await;
    let other = start(backend.clone()).await;
    let key = unique_key("kept");
    let held = node
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .expect("free key");
    // Three session ttls: without keep-alives etcd would have deleted the key twice over.
    let survived = timeout(3 * ttl, held.lost()).await;
    assert!(survived.is_err(), "lost while renewing: {survived:?}");
    assert!(held.is_held());
    let mut etcd = Client::connect([server.endpoint()], None).await.unwrap();
    let lease = lock_key(&mut etcd, &backend, &key).await.lease();
    assert!(etcd.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);
    assert!(
        other
            .try_lock(&key, LockOptions::new().with_ttl(ttl))
            .await
            .unwrap()
            .is_none(),
        "a held session lock was taken"
    );
    held.release().await.unwrap();
    node.shutdown().await;
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_bounds_are_refused_before_any_io() {
    let server = EtcdServer::start();
    for (ttl, named) in [
        (Duration::from_millis(1500), "1.5s"),
        (Duration::from_millis(2500), "2.5s"),
    ] {
        let refused = EtcdBackend::builder([server.endpoint()])
            .with_session(ttl)
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, Error::InvalidConfig(why) if why.contains(named)),
            "{refused:?}"
        );
    }
    let refused = EtcdBackend::builder([server.endpoint()])
        .with_session(Duration::from_secs(5))
        .with_mode(EtcdMode::Lock)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::InvalidConfig(why) if why.contains("txn mode")),
        "{refused:?}"
    );

    let backend = session_backend(&server, Duration::from_secs(5)).await;
    let node = start(backend.clone()).await;
    let key = unique_key("bounds");
    let longer = Duration::from_secs(6);
    let refused = node
        .try_lock(&key, LockOptions::new().with_ttl(longer))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, Error::InvalidTtl { ttl, .. } if ttl == longer),
        "{refused:?}"
    );
    let mut etcd = Client::connect([server.endpoint()], None).await.unwrap();
    let under_prefix = etcd
        .get(backend.prefix(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(under_prefix.count(), 0, "the refused lock wrote nothing");
    let held = node
        .try_lock(&key, LockOptions::new().with_ttl(Duration::from_secs(5)))
        .await
        .unwrap()
        .expect("free key");
    let refused = held.renew(longer).await.unwrap_err();
    assert!(
        matches!(refused, Error::InvalidTtl { ttl, .. } if ttl == longer),
        "{refused:?}"
    );
    assert!(held.is_held(), "a refused renewal leaves the lock held");
    held.release().await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lock_makes_no_renewal_of_its_own_while_the_session_is_kept() {
    let server = EtcdServer::start();
    let ttl = Duration::from_secs(2);
    let backend = session_backend(&server, ttl).await;
    let node = start(backend.clone()).await;
    let mut events = node.events();
    let keys: Vec<String> = (0..3).map(|i| unique_key(&format!("quiet{i}"))).collect();
    let mut guards = Vec::new();
    for key in &keys {
        let opts = LockOptions::new().with_ttl(ttl);
        guards.push(node.try_lock(key, opts).await.unwrap().expect("free key"));
    }
    let before = node.metrics();
    let first_deadline = guards[0].deadline().expect("held");
    // Three ttls: a lock renewed on its own would have renewed about nine times.
    let survived = timeout(3 * ttl, guards[0].lost()).await;
    assert!(
        survived.is_err(),
        "lost while the session was kept: {survived:?}"
    );
    let after = node.metrics();
    assert_eq!(
        after.renewed - before.renewed,
        0,
        "renewals of a following lock"
    );
    assert_eq!(after.renew_failed, before.renew_failed);
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(
                event.kind,
                LockEventKind::Renewed { .. } | LockEventKind::RenewFailed { .. }
            ),
            "renewal activity of a following lock: {event:?}"
        );
    }
    for guard in &guards {
        assert!(guard.is_held());
        let moved = guard.deadline().expect("held") - first_deadline;
        assert!(
            moved >= 2 * ttl,
            "the deadline followed the session only {moved:?}"
        );
    }
    for guard in guards {
        guard.release().await.unwrap();
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_taken_away_by_another_client_is_lost_within_a_third_of_the_ttl() {
    let server = EtcdServer::start();
    // Long enough that neither the deadline nor a renewal every ttl/3 could report it in time.
    let ttl = Duration::from_secs(30);
    let backend = session_backend(&server, ttl).await;
    let node = start(backend.clone()).await;
    let mut etcd = Client::connect([server.endpoint()], None).await.unwrap();
    let (deleted, overwritten, kept) = (
        unique_key("deleted"),
        unique_key("overwritten"),
        unique_key("untouched"),
    );
    let mut guards = Vec::new();
    for key in [&deleted, &overwritten, &kept] {
        let opts = LockOptions::new().with_ttl(ttl);
        guards.push(node.try_lock(key, opts).await.unwrap().expect("free key"));
    }
    let taken_at = Instant::now();
    etcd.delete(backend.lock_key(&deleted), None).await.unwrap();
    etcd.put(backend.lock_key(&overwritten), "someone else", None)
        .await
        .unwrap();
    for guard in &guards[..2] {
        let reason = timeout_at(taken_at + ttl / 3, guard.lost())
            .await
            .expect("lost within a third of the ttl");
        assert_eq!(reason, LostReason::NotOwner);
        assert!(!guard.is_held());
    }
    assert!(
        guards[2].is_held(),
        "a lock whose key nobody touched is kept"
    );
    guards.pop().unwrap().release().await.unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unreachable_loses_every_session_lock_together_before_the_deadline() {
    let server = EtcdServer::start();
    let ttl = Duration::from_secs(3);
    let backend = session_backend(&server, ttl).await;
    let node = start(backend.clone()).await;
    let mut events = node.events();
    let keys: Vec<String> = (0..4).map(|i| unique_key(&format!("cut-off{i}"))).collect();
    let mut guards = Vec::new();
    for key in &keys {
        let opts = LockOptions::new().with_ttl(ttl);
        guards.push(node.try_lock(key, opts).await.unwrap().expect("free key"));
    }
    server.pause();
    // No keep-alive sent from here on is answered: every deadline is at most the ttl (less
    // the default drift of 1%) after now.
    let latest = Instant::now() + ttl.mul_f64(0.99);
    // Each key actor says so (the event), told by the session's keeper: a following lock has
    // no timer of its own that could.
    let mut lost = std::collections::HashSet::new();
    while lost.len() < keys.len() {
        let event = timeout_at(latest, events.recv())
            .await
            .expect("every lock's Lost event before its deadline")
            .unwrap();
        if let LockEventKind::Lost { reason } = event.kind {
            assert_eq!(reason, LostReason::Expired, "{event:?}");
            lost.insert(event.key.clone());
        }
    }
    for guard in &guards {
        let reason = timeout_at(latest, guard.lost())
            .await
            .expect("lost before the deadline");
        assert_eq!(reason, LostReason::Expired);
        assert!(!guard.is_held());
    }
    server.resume();
    node.shutdown().await;
}

/// A fair waiter on a session backend waits in the lock's queue on a lease of its own (its
/// place); admitted, its lock key is on the session lease, as every lock of the backend is,
/// and its place is gone with its lease revoked (nothing is left on it). With the lock key
/// written on the place's lease instead, the keys' leases differ; with the place's lease
/// left, it is still alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fair_lock_is_admitted_onto_the_session_lease() {
    let server = EtcdServer::start();
    let backend = session_backend(&server, SESSION).await;
    let node = start(backend.clone()).await;
    let mut etcd = Client::connect([server.endpoint()], None).await.unwrap();
    let key = unique_key("fair");
    let held = node.try_lock(&key, LockOptions::new()).await.unwrap();
    let held = held.expect("a free key");
    let session = lock_key(&mut etcd, &backend, &key).await.lease();
    let waiter = {
        let (node, key) = (node.clone(), key.clone());
        let fair = LockOptions::new()
            .with_fair(true)
            .with_wait(Wait::UpTo(Duration::from_secs(30)));
        tokio::spawn(async move { node.lock(&key, fair).await })
    };
    let queue = format!("{}\u{1f}fair/", backend.lock_key(&key));
    let in_queue = GetOptions::new().with_prefix();
    let place = timeout(Duration::from_secs(10), async {
        loop {
            let read = etcd
                .get(queue.as_str(), Some(in_queue.clone()))
                .await
                .unwrap();
            if let Some(kv) = read.kvs().first() {
                return kv.lease();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the fair waiter takes a place in the queue");
    assert_ne!(place, session, "a place is on a lease of its own");
    held.release().await.unwrap();
    let guard = timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the fair waiter is admitted")
        .unwrap()
        .unwrap();
    assert_eq!(
        lock_key(&mut etcd, &backend, &key).await.lease(),
        session,
        "the admitted lock is on the session lease"
    );
    let left = etcd.get(queue.as_str(), Some(in_queue)).await.unwrap();
    assert_eq!(left.count(), 0, "the place left the queue");
    let place_lease = etcd.lease_time_to_live(place, None).await.unwrap();
    assert_eq!(place_lease.ttl(), -1, "the place's lease is revoked");
    guard.release().await.unwrap();
    node.shutdown().await;
}

/// The session's keeper keeps pace with the shortest ttl among the locks following it now:
/// a keep-alive every eighth of the session's ttl (120 s: 15 s), every sixth of a following
/// lock's ttl when that is sooner (60 s: 10 s; 3 s: 0.5 s), and back to the slower pace when
/// the short lock stops following (released), not the short one's for the session's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keepers_pace_is_the_shortest_ttl_of_the_locks_following_now() {
    let server = EtcdServer::start();
    let backend = session_backend(&server, SESSION).await;
    let node = start(backend.clone()).await;
    let pace = |expected: Duration| {
        let backend = backend.clone();
        async move {
            let what = format!("the keeper's pace is {expected:?}");
            eventually(&what, Duration::from_secs(5), || async {
                backend.session_keep_alive_every() == Some(expected)
            })
            .await;
        }
    };
    let hold = |name: &str, ttl: Duration| {
        let (node, key) = (node.clone(), unique_key(name));
        async move {
            let opts = LockOptions::new().with_ttl(ttl);
            node.try_lock(&key, opts)
                .await
                .unwrap()
                .expect("a free key")
        }
    };
    let long = hold("long", Duration::from_secs(60)).await;
    pace(Duration::from_secs(10)).await;
    let short = hold("short", Duration::from_secs(3)).await;
    pace(Duration::from_millis(500)).await;
    short.release().await.unwrap();
    pace(Duration::from_secs(10)).await;
    long.release().await.unwrap();
    pace(SESSION / 8).await;
    node.shutdown().await;
}
