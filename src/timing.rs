//! The time rules of DESIGN.md section 4: deadlines on the monotonic clock, drift, budgets.

use std::time::Duration;

use tokio::time::Instant;

/// How long a waiting request pauses before trying a store that failed, and a waiter before
/// its first new try at a release subscription that failed.
pub(crate) const STORE_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The time rules of DESIGN.md section 4.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Fraction of the ttl held back for clock drift between this node and the store.
    pub(crate) drift: f64,
    /// Budget for one store operation (acquire attempt, release, inspect).
    pub(crate) op_timeout: Duration,
    /// Longest a waiter sleeps before re-checking a key without a release notice.
    pub(crate) backstop_cap: Duration,
    /// How long the store may keep failing before the backend actor is restarted.
    pub(crate) store_budget: Duration,
}

impl Timing {
    /// `deadline = sent_at + ttl × (1 − drift)`, on the monotonic clock, from when the request
    /// that set the ttl was sent.
    pub(crate) fn deadline(&self, sent_at: Instant, ttl: Duration) -> Instant {
        sent_at + ttl.mul_f64(1.0 - self.drift)
    }
}
