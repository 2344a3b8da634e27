//! What a key actor tells the guard of the lease it holds: one small shared cell per lease,
//! written by the key actor, read by the guard.
//!
//! A `tokio::sync::watch` channel would do the job, but it carries eight notifiers per channel
//! (built for many receivers) and wakes them all on every send; a lease has one reader, and
//! a few hundred bytes per held lock matter when a node holds a hundred thousand.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::SharedClock;
use crate::event::LostReason;

/// What the key actor tells its guard about the lease.
#[derive(Debug, Clone)]
pub(crate) enum LeaseStatus {
    /// Held, and trusted until `deadline` (monotonic); renewed with `ttl`.
    Held { deadline: Instant, ttl: Duration },
    /// Held, following a shared lease (see `backend/follow.rs`): trusted until `span` after
    /// the shared lease's last confirmed keep-alive, which the store advances without a word
    /// to the key actor; renewed with `ttl`. Nothing once the clock has ended.
    Following {
        clock: SharedClock,
        span: Duration,
        ttl: Duration,
    },
    /// Given back by the guard's own `release` or drop.
    Released,
    /// Not held any more, through no act of the guard.
    Gone(LostReason),
}

struct Cell {
    status: Mutex<LeaseStatus>,
    /// Set when the writer is dropped: nobody will tell the guard anything any more.
    closed: AtomicBool,
    changed: Notify,
}

/// The key actor's side. Dropping it (the key actor stopped without a word: killed with its
/// backend actor) closes the cell.
pub(crate) struct StatusWriter(Arc<Cell>);

/// The guard's side.
pub(crate) struct StatusReader(Arc<Cell>);

/// A new cell holding `status`.
pub(crate) fn status_cell(status: LeaseStatus) -> (StatusWriter, StatusReader) {
    let cell = Arc::new(Cell {
        status: Mutex::new(status),
        closed: AtomicBool::new(false),
        changed: Notify::new(),
    });
    (StatusWriter(cell.clone()), StatusReader(cell))
}

impl LeaseStatus {
    /// The deadline and the ttl of a lease held, read now; for a lease following a shared one,
    /// also whether that shared lease has ended (then it is not held, whatever the deadline).
    pub(crate) fn held(&self) -> Option<(Instant, Duration, bool)> {
        match self {
            LeaseStatus::Held { deadline, ttl } => Some((*deadline, *ttl, false)),
            LeaseStatus::Following { clock, span, ttl } => {
                Some((clock.kept() + *span, *ttl, clock.ended()))
            }
            _ => None,
        }
    }
}

impl Cell {
    fn get(&self) -> LeaseStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl StatusWriter {
    pub(crate) fn send(&self, status: LeaseStatus) {
        *self.0.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
        self.0.changed.notify_waiters();
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.changed.notify_waiters();
    }
}

impl StatusReader {
    pub(crate) fn get(&self) -> LeaseStatus {
        self.0.get()
    }

    /// Resolves when the lease is gone, with the reason; at the latest at the lease deadline.
    /// Never resolves while the lease is held, nor after the guard released it.
    pub(crate) async fn lost(&self) -> LostReason {
        loop {
            // Registered before the status is read, so a change in between still wakes us.
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.0.get() {
                LeaseStatus::Gone(reason) => return reason,
                LeaseStatus::Released => std::future::pending::<()>().await,
                LeaseStatus::Held { deadline, .. } => {
                    if self.0.closed.load(Ordering::Acquire) {
                        // The key actor is gone without a word: nothing renews the lease
                        // any more.
                        tokio::time::sleep_until(deadline).await;
                        return LostReason::Expired;
                    }
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(deadline) => return LostReason::Expired,
                    }
                }
                LeaseStatus::Following { clock, span, .. } => {
                    let deadline = clock.kept() + span;
                    if self.0.closed.load(Ordering::Acquire) {
                        tokio::time::sleep_until(deadline).await;
                        return LostReason::Expired;
                    }
                    tokio::select! {
                        _ = changed => {}
                        // The shared lease may have been kept alive meanwhile: look again.
                        _ = tokio::time::sleep_until(deadline) => {
                            if Instant::now() >= clock.kept() + span {
                                return LostReason::Expired;
                            }
                        }
                    }
                }
            }
        }
    }
}
