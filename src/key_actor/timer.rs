//! The key actor's renewal timer: one long-lived task per key actor, re-armed in place.
//!
//! A timer per renewal (`send_after`) costs a task spawn when a lease is taken and an abort
//! when it is given back, on every lock cycle. This one task lives as long as its key actor
//! (which a backend reuses for lease after lease) and is re-armed by writing the time it is
//! due to an atomic. The task is woken only when the new time is earlier than the one it is
//! sleeping until: a short hold's timer is disarmed and re-armed for a later time without the
//! task running at all, and when it wakes at the old time it just goes back to sleep.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use ractor::ActorRef;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::KeyMsg;
use crate::task::AbortOnDrop;

/// `due` when the timer is disarmed; `sleeping_until` while the task waits for no time.
const NONE: u64 = 0;
const NEVER: u64 = u64::MAX;

/// Sends [`KeyMsg::Tick`] to its key actor once the armed time comes. Dropping it stops the
/// task, so a renewal can never outlive its key actor.
pub(crate) struct RenewalTimer {
    shared: Arc<Shared>,
    /// Times are kept as nanoseconds since this instant (plus one, so that zero means none).
    base: Instant,
    _task: AbortOnDrop<()>,
}

struct Shared {
    /// When the next tick is due, or `NONE`. Written by the key actor, cleared by the task
    /// when it sends the tick.
    due: AtomicU64,
    /// The time the task is sleeping until (`NEVER`: until notified). Written by the task.
    sleeping_until: AtomicU64,
    notify: Notify,
}

impl RenewalTimer {
    pub(crate) fn start(actor: ActorRef<KeyMsg>) -> Self {
        let shared = Arc::new(Shared {
            due: AtomicU64::new(NONE),
            sleeping_until: AtomicU64::new(NEVER),
            notify: Notify::new(),
        });
        let base = Instant::now();
        let task = tokio::spawn(run(shared.clone(), base, actor));
        RenewalTimer {
            shared,
            base,
            _task: AbortOnDrop(task),
        }
    }

    /// Ticks once at `at` (replacing any earlier arming).
    pub(crate) fn arm(&self, at: Instant) {
        let at = at.saturating_duration_since(self.base).as_nanos() as u64 + 1;
        // Store first, then look: the task stores what it sleeps until, then looks at `due`
        // again. Whichever goes second sees the other's write, so an earlier time is never
        // missed: either the task sees it, or this notifies (and a notification with nobody
        // waiting is kept for the task's next wait).
        self.shared.due.store(at, SeqCst);
        if at < self.shared.sleeping_until.load(SeqCst) {
            self.shared.notify.notify_one();
        }
    }

    /// No tick until armed again. The task is not woken: if it wakes at the old time, it
    /// finds nothing due and waits.
    pub(crate) fn disarm(&self) {
        self.shared.due.store(NONE, SeqCst);
    }
}

async fn run(shared: Arc<Shared>, base: Instant, actor: ActorRef<KeyMsg>) {
    loop {
        let due = shared.due.load(SeqCst);
        let until = if due == NONE { NEVER } else { due };
        shared.sleeping_until.store(until, SeqCst);
        if shared.due.load(SeqCst) != due {
            continue; // armed meanwhile: look again
        }
        if until == NEVER {
            shared.notify.notified().await;
            continue;
        }
        let at = base + std::time::Duration::from_nanos(until - 1);
        tokio::select! {
            _ = tokio::time::sleep_until(at) => {
                // Still due at this time (not re-armed or disarmed while asleep): tick.
                let fired = shared.due.compare_exchange(due, NONE, SeqCst, SeqCst).is_ok();
                if fired && actor.cast(KeyMsg::Tick).is_err() {
                    return; // the key actor is gone
                }
            }
            _ = shared.notify.notified() => {}
        }
    }
}
