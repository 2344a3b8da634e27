//! The resource side of fencing: reject writes from a holder whose lease was superseded.

use std::sync::atomic::{AtomicU64, Ordering};

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
