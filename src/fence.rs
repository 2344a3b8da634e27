//! The resource side of fencing: reject writes from a holder whose lease was superseded.
//!
//! A fencing token protects a resource only where the resource checks it. [`Fence`] checks it
//! in this process; the store modules check it inside the stores people protect, in the same
//! atomic step as the write, so a stale holder's write can never slip in between the check and
//! the write:
//!
//! - `fence/redis.rs` (`RedisFence`, feature `redis`): one Lua script compares the token
//!   with a fence key beside the resource and does the write;
//! - `fence/etcd.rs` (`EtcdFence`, feature `etcd`): one etcd transaction whose condition
//!   checks a fence key and whose operations advance it and do the caller's writes;
//! - `fence/postgres.rs` (`PgFence`, feature `postgres`): a transaction that advances a
//!   fence row first and is handed to the caller only if the token was not older.
//!
//! Each records, per resource, the newest token that wrote, and refuses an older one with
//! [`StaleToken`] (inside [`FenceError::Stale`]), writing nothing.

#[cfg(feature = "etcd")]
pub(crate) mod etcd;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;

use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "etcd")]
pub use self::etcd::EtcdFence;
#[cfg(feature = "postgres")]
pub use self::postgres::PgFence;
#[cfg(feature = "redis")]
pub use self::redis::{FencedScript, RedisFence};

/// Guards a resource with fencing tokens: a write carrying token `t` is accepted only if no
/// write with a larger token was accepted before.
///
/// A lease can be lost while its holder is paused (GC, SIGSTOP, a slow disk); when the holder
/// wakes up it may still believe it holds the lock. The store hands every new holder a larger
/// token, so the resource itself can refuse the stale holder's late write.
///
/// ```
/// use leasehold::Fence;
///
/// let fence = Fence::new();
/// assert!(fence.accept(7).is_ok());
/// assert!(fence.accept(7).is_ok()); // the same holder, writing again
/// assert!(fence.accept(9).is_ok()); // a newer holder
/// assert_eq!(fence.accept(8).unwrap_err().newest, 9); // the old holder woke up
/// ```
#[derive(Debug, Default)]
pub struct Fence {
    newest: AtomicU64,
}

/// A write was refused because a newer holder has written already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stale fencing token {token}: a holder with token {newest} has written since")]
#[non_exhaustive]
pub struct StaleToken {
    /// The token that was refused.
    pub token: u64,
    /// The newest token accepted so far.
    pub newest: u64,
}

impl StaleToken {
    /// `token` was refused because `newest` has written. (The fields are public to read; this
    /// builds one, e.g. for a resource of the application's own that checks tokens.)
    pub fn new(token: u64, newest: u64) -> Self {
        StaleToken { token, newest }
    }
}

/// Why a fenced write in a store did not happen: the token was older than the resource's
/// newest ([`Stale`](FenceError::Stale), nothing was written), or the store failed
/// ([`Store`](FenceError::Store), with the store client's own error, kept whole).
///
/// Generic over the store's error because the caller brings the store's client (a Redis
/// connection, an etcd client, a PostgreSQL client) and already handles its error type; the
/// fenced write is not a lock operation, so it does not go through [`Error`](crate::Error).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError<E> {
    /// A newer holder has written this resource; nothing was written.
    #[error(transparent)]
    Stale(#[from] StaleToken),
    /// The store failed or answered something unexpected; whether the write happened is
    /// whatever the store's error says (a timeout leaves it unknown).
    #[error("fenced write failed in the store: {0}")]
    Store(#[source] E),
}

impl<E> FenceError<E> {
    /// The refusal, if the token was stale.
    pub fn stale(&self) -> Option<StaleToken> {
        match self {
            FenceError::Stale(stale) => Some(*stale),
            FenceError::Store(_) => None,
        }
    }

    /// True when the token was refused as stale (retrying with the same token cannot
    /// succeed: the holder has lost the lock).
    pub fn is_stale(&self) -> bool {
        matches!(self, FenceError::Stale(_))
    }
}

impl Fence {
    /// A fence that has seen no token yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `token` if it is not older than the newest accepted token, and records it.
    pub fn accept(&self, token: u64) -> Result<(), StaleToken> {
        let previous = self.newest.fetch_max(token, Ordering::AcqRel);
        if token >= previous {
            Ok(())
        } else {
            Err(StaleToken {
                token,
                newest: previous,
            })
        }
    }

    /// The newest token accepted so far (0 if none).
    pub fn newest(&self) -> u64 {
        self.newest.load(Ordering::Acquire)
    }
}
