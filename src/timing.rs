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

/// The widest step of the renewal grid (see [`renewal_slot`]).
const RENEWAL_GRID: Duration = Duration::from_millis(50);

/// The moment a renewal due at `due` is made, for a lease renewed every `step`: `due` rounded
/// DOWN to a grid shared by every key actor of the process, of [`RENEWAL_GRID`] or a
/// sixty-fourth of `step`, whichever is less.
///
/// Renewals each at its own instant wake the runtime's threads once per renewal, and reach a
/// store's shared connection one by one (etcd's keep-alive stream: one write per lease). On
/// the grid, the renewals due within the same few milliseconds fire together: one wake-up
/// runs them all, and their requests leave in one write. Rounding down renews a little early,
/// never late: the deadline is counted from when the renewal is sent, so it only moves less
/// far, by at most a sixty-fourth of the step (1.6% more renewals at most).
pub(crate) fn renewal_slot(due: Instant, step: Duration) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let grid = RENEWAL_GRID.min(step / 64);
    let origin = *ORIGIN.get_or_init(Instant::now);
    let (Some(since), false) = (due.checked_duration_since(origin), grid.is_zero()) else {
        // Before the origin (a test's paused clock may start anywhere): as due.
        return due;
    };
    let grid_ns = grid.as_nanos();
    let off = Duration::from_nanos((since.as_nanos() % grid_ns) as u64);
    due - off
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_slots_are_early_and_shared() {
        // A step long enough for the widest grid (ttl 30 s).
        let step = Duration::from_secs(10);
        let now = Instant::now();
        let a = renewal_slot(now + Duration::from_millis(1003), step);
        let b = renewal_slot(now + Duration::from_millis(1007), step);
        let due = now + Duration::from_millis(1003);
        assert!(a <= due && due - a < RENEWAL_GRID, "{a:?} {due:?}");
        // Two renewals due within one grid step of each other share a slot or are one step
        // apart, never anything in between.
        let apart = if a > b { a - b } else { b - a };
        assert!(apart.is_zero() || apart == RENEWAL_GRID, "{apart:?}");
        // A short step gets a finer grid: never more than a sixty-fourth of the step early.
        let short = Duration::from_millis(30);
        let due = now + Duration::from_millis(5);
        assert!(due - renewal_slot(due, short) < short / 64 + Duration::from_nanos(1));
    }
}
