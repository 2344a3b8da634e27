//! Renewal, deadlines, loss and store outages, with faults injected between the key actors and
//! the memory store: renewals that fail or hang, acquisitions that are slow or fail. Time is paused, so ttls
//! pass in virtual time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use leasehold::testing::{next_event, start, unique_key};
use leasehold::{
    Acquisition, Contention, Lease, LockBackend, LockEventKind, LockInfo, LockOptions, LostReason,
    MemoryBackend, OwnerToken, ReleaseNotices, StoreError,
};
use tokio::time::Instant;

const TTL: Duration = Duration::from_millis(300);

/// What the faulty store does to renewals.
const RENEW_OK: u32 = 0;
const RENEW_FAILS: u32 = 1;
const RENEW_HANGS: u32 = 2;

/// The memory store with a switch for renewals and a delay for acquisitions.
#[derive(Clone, Default)]
struct Faulty {
    inner: MemoryBackend,
    renew: Arc<AtomicU32>,
    /// Failures still to inject before renewals succeed again (with `RENEW_FAILS`).
    failures_left: Arc<AtomicU32>,
    acquire_delay_ms: Arc<AtomicU64>,
    /// Acquisitions still to fail, as an unreachable store would.
    acquire_failures: Arc<AtomicU32>,
}

impl Faulty {
    fn fail_renewals(&self, times: u32) {
        self.failures_left.store(times, Ordering::SeqCst);
        self.renew.store(RENEW_FAILS, Ordering::SeqCst);
    }
}

#[async_trait]
impl LockBackend for Faulty {
    fn kind(&self) -> &'static str {
        "faulty-memory"
    }

    async fn acquire(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let failing = self
            .acquire_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(StoreError::unavailable("injected acquire failure"));
        }
        let delay = self.acquire_delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        self.inner.acquire(key, owner, ttl, metadata).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        match self.renew.load(Ordering::SeqCst) {
            RENEW_FAILS => {
                let left = self.failures_left.fetch_sub(1, Ordering::SeqCst);
                if left <= 1 {
                    self.renew.store(RENEW_OK, Ordering::SeqCst);
                }
                Err(StoreError::unavailable("injected renewal failure"))
            }
            RENEW_HANGS => std::future::pending().await,
            _ => self.inner.renew(lease, ttl).await,
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        self.inner.release(lease).await
    }

    async fn inspect(&self, key: &str) -> Result<Option<LockInfo>, StoreError> {
        self.inner.inspect(key).await
    }

    async fn subscribe(&self, key: &str, seen: &Contention) -> Result<ReleaseNotices, StoreError> {
        self.inner.subscribe(key, seen).await
    }
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_are_retried_with_events_and_lost_comes_by_the_deadline() {
    let store = Faulty::default();
    let client = start(store.clone()).await;
    let mut events = client.events();
    let key = unique_key("renew-fails");
    let guard = client
        .try_lock(&key, LockOptions::new().with_ttl(TTL))
        .await
        .unwrap()
        .unwrap();
    store.fail_renewals(u32::MAX);
    let deadline = guard.deadline().unwrap();
    let mut attempts = Vec::new();
    let lost_at = loop {
        let event = next_event(&mut events, TTL * 4, |e| Some(e.clone())).await;
        match event.kind {
            LockEventKind::RenewFailed { attempt, error } => {
                assert!(error.is_retryable());
                attempts.push(attempt);
            }
            LockEventKind::Lost { reason } => {
                assert_eq!(reason, LostReason::Expired);
                break event.instant;
            }
            _ => {}
        }
    };
    assert!(
        lost_at <= deadline,
        "Lost at {lost_at:?}, after the deadline {deadline:?}"
    );
    assert!(attempts.len() >= 2, "retried only {attempts:?}");
    assert_eq!(attempts, (1..=attempts.len() as u32).collect::<Vec<_>>());
    assert_eq!(guard.lost().await, LostReason::Expired);
    assert!(!guard.is_held());
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_hanging_store_cannot_delay_lost_past_the_deadline() {
    let store = Faulty::default();
    let client = start(store.clone()).await;
    let key = unique_key("renew-hangs");
    let guard = client
        .try_lock(&key, LockOptions::new().with_ttl(TTL))
        .await
        .unwrap()
        .unwrap();
    let mut events = client.events();
    store.renew.store(RENEW_HANGS, Ordering::SeqCst);
    let deadline = guard.deadline().unwrap();
    assert_eq!(guard.lost().await, LostReason::Expired);
    assert!(Instant::now() <= deadline + Duration::from_millis(1));
    assert!(!guard.is_held());
    // The key actor itself gave up on the hanging renewal at the deadline, and said so.
    let lost_at = next_event(&mut events, TTL, |e| {
        matches!(e.kind, LockEventKind::Lost { .. }).then_some(e.instant)
    })
    .await;
    assert!(
        lost_at <= deadline,
        "Lost event at {lost_at:?}, deadline {deadline:?}"
    );
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn one_failed_renewal_is_recovered_without_loss() {
    let store = Faulty::default();
    let client = start(store.clone()).await;
    let mut events = client.events();
    let key = unique_key("renew-recovers");
    let guard = client
        .try_lock(&key, LockOptions::new().with_ttl(TTL))
        .await
        .unwrap()
        .unwrap();
    store.fail_renewals(1);
    next_event(&mut events, TTL, |e| {
        matches!(e.kind, LockEventKind::RenewFailed { attempt: 1, .. }).then_some(())
    })
    .await;
    next_event(&mut events, TTL, |e| {
        matches!(e.kind, LockEventKind::Renewed { .. }).then_some(())
    })
    .await;
    tokio::select! {
        reason = guard.lost() => panic!("lost after one failed renewal: {reason}"),
        _ = tokio::time::sleep(TTL * 3) => {}
    }
    assert!(guard.is_held());
    guard.release().await.unwrap();
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_deadline_counts_from_when_the_acquire_was_sent() {
    let store = Faulty::default();
    let latency = Duration::from_millis(100);
    store
        .acquire_delay_ms
        .store(latency.as_millis() as u64, Ordering::SeqCst);
    let client = start(store.clone()).await;
    let key = unique_key("deadline");
    let ttl = Duration::from_secs(10);
    let asked = Instant::now();
    let guard = client
        .try_lock(&key, LockOptions::new().with_ttl(ttl))
        .await
        .unwrap()
        .unwrap();
    let answered = Instant::now();
    assert!(answered - asked >= latency);
    let deadline = guard.deadline().unwrap();
    // The store's latency eats into the lease instead of extending it, and the drift margin
    // (1% by default) is held back.
    assert!(deadline <= asked + ttl.mul_f64(0.99) + Duration::from_millis(1));
    assert!(deadline < answered + ttl.mul_f64(0.99));
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn without_auto_renew_a_manual_renew_moves_the_deadline() {
    let client = start(MemoryBackend::new()).await;
    let key = unique_key("manual");
    let guard = client
        .try_lock(
            &key,
            LockOptions::new().with_ttl(TTL).with_auto_renew(false),
        )
        .await
        .unwrap()
        .unwrap();
    let first = guard.deadline().unwrap();
    tokio::time::sleep(TTL / 2).await;
    guard.renew(TTL * 2).await.unwrap();
    let second = guard.deadline().unwrap();
    assert!(second > first + TTL);
    tokio::time::sleep_until(first + Duration::from_millis(1)).await;
    assert!(guard.is_held(), "the old deadline no longer applies");
    assert_eq!(guard.lost().await, LostReason::Expired);
    // Told by the new deadline (the loss check runs a little before it), not at the old one.
    let told = Instant::now();
    assert!(
        told <= second && told > first + TTL,
        "{told:?}, {first:?}, {second:?}"
    );
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn try_lock_on_an_unreachable_store_fails_at_once_with_a_retryable_error() {
    let store = Faulty::default();
    store.acquire_failures.store(1, Ordering::SeqCst);
    let client = start(store.clone()).await;
    let err = client
        .try_lock(&unique_key("down"), LockOptions::new())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        err.to_string().contains("injected acquire failure"),
        "{err}"
    );
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_acquire_rides_out_a_store_outage() {
    let store = Faulty::default();
    store.acquire_failures.store(5, Ordering::SeqCst);
    let client = start(store.clone()).await;
    let opts = LockOptions::new().with_wait(leasehold::Wait::UpTo(Duration::from_secs(30)));
    let guard = client.lock(&unique_key("outage"), opts).await.unwrap();
    assert!(guard.is_held());
    assert_eq!(store.acquire_failures.load(Ordering::SeqCst), 0);
    client.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_longer_than_the_wait_budget_ends_in_a_timeout() {
    let store = Faulty::default();
    store.acquire_failures.store(u32::MAX, Ordering::SeqCst);
    let client = start(store.clone()).await;
    let budget = Duration::from_secs(2);
    let opts = LockOptions::new().with_wait(leasehold::Wait::UpTo(budget));
    let err = client
        .lock(&unique_key("long-outage"), opts)
        .await
        .unwrap_err();
    assert!(
        matches!(err, leasehold::Error::Timeout { waited, .. } if waited >= budget),
        "{err:?}"
    );
    client.shutdown().await;
}

/// On the real clock, where timers fire late: the loss check runs half the drift margin before
/// the deadline, so the news is not late even though the timer that brings it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_real_clock_lost_is_told_before_the_deadline() {
    let client = leasehold::LockManager::builder()
        .with_name(unique_key("real-clock"))
        .with_backend("memory", MemoryBackend::new())
        .with_clock_drift(0.1)
        .start()
        .await
        .unwrap();
    let mut events = client.events();
    let options = LockOptions::new()
        .with_ttl(Duration::from_secs(1))
        .with_auto_renew(false);
    let guard = client.try_lock("k", options).await.unwrap().unwrap();
    let deadline = guard.deadline().unwrap();
    let lost_at = next_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e.kind, LockEventKind::Lost { .. }).then_some(e.instant)
    })
    .await;
    assert!(
        lost_at <= deadline,
        "Lost {:?} after the deadline",
        lost_at - deadline
    );
    assert!(!guard.is_held());
    client.shutdown().await;
}
