//! Leases that follow a shared one: the seam that lets a store keep many locks alive with one
//! keep-alive (an etcd session lease) without each key actor renewing its own.
//!
//! A lock on a shared lease gains nothing from a renewal of its own: the shared lease is what
//! the store keeps alive, and whether the key is still the lock's is what the store's watch
//! says. So such a lock *follows*: its key actor arms no renewal timer, and its deadline is
//! counted from the shared lease's last confirmed keep-alive, read from a [`SharedClock`] the
//! store advances. The store tells the key actor, through its [`FollowNotice`] callback, when
//! the lock stops being one it can vouch for: the key taken away, the shared lease lost, or its
//! watch broken (then the key actor goes back to renewing on its own timer, which reads the key,
//! until the store can vouch for it again).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// When a shared lease was last confirmed kept alive: the instant its latest answered
/// keep-alive was sent, on the monotonic clock. Written by the store's keeper, read by every
/// key actor and guard of the locks that follow it (one atomic, no lock).
#[derive(Clone)]
pub struct SharedClock(Arc<ClockInner>);

struct ClockInner {
    /// Times are nanoseconds since this instant.
    base: Instant,
    kept: AtomicU64,
    /// Set once the shared lease is lost: nothing follows it any more.
    ended: AtomicBool,
}

impl SharedClock {
    /// A clock whose lease was kept alive at `kept`.
    pub fn new(kept: Instant) -> Self {
        SharedClock(Arc::new(ClockInner {
            base: kept,
            kept: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        }))
    }

    /// The lease was confirmed kept alive by a keep-alive sent at `kept` (an earlier instant
    /// than the one recorded changes nothing).
    pub fn advance(&self, kept: Instant) {
        let nanos = kept.saturating_duration_since(self.0.base).as_nanos() as u64;
        self.0.kept.fetch_max(nanos, Ordering::AcqRel);
    }

    /// The shared lease is lost: every lease following it is over.
    pub fn end(&self) {
        self.0.ended.store(true, Ordering::Release);
    }

    /// True once [`end`](Self::end) was called.
    pub fn ended(&self) -> bool {
        self.0.ended.load(Ordering::Acquire)
    }

    /// When the lease was last confirmed kept alive.
    pub fn kept(&self) -> Instant {
        self.0.base + Duration::from_nanos(self.0.kept.load(Ordering::Acquire))
    }
}

impl std::fmt::Debug for SharedClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedClock")
            .field("kept", &self.kept())
            .field("ended", &self.ended())
            .finish()
    }
}

/// What a store tells the key actor of a lease that follows a shared one. After any of these
/// the lease follows no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FollowNotice {
    /// Another client deleted the key or wrote over it.
    Taken,
    /// The store says the shared lease is gone (expired or revoked), and the key with it.
    SharedLeaseGone,
    /// The shared lease could not be kept alive in time: its followers' deadlines have come.
    SharedLeaseExpired,
    /// The store cannot vouch for the key any more (its watch broke): renew it on its own,
    /// which checks the key, until the store can vouch for it again.
    Unsure,
}

/// How a store reaches the key actor of a following lease; called at most once, from the
/// store's own tasks, so it must not block.
pub type FollowNotify = Box<dyn Fn(FollowNotice) + Send + Sync>;
