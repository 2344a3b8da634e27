//! Read-write locks in the in-process table: per name, the live read shares and write hold,
//! the waiting writers' intents, the fair waiters' queue, a fence counter that never goes
//! back, and the subscribers told when someone may get in.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{receiver_stream, MemoryBackend};
use crate::backend::{Acquisition, Contention, Lease, OwnerToken, ReleaseNotices, RwMode};

/// One read-write lock's row. Like a lock's, it outlives its holders: the fence must never go
/// back.
#[derive(Default)]
pub(super) struct RwRow {
    fence: u64,
    /// The read shares and the write hold; expired ones are dropped whenever the row is
    /// touched.
    leases: Vec<RwLease>,
    /// Waiting writers, each until its intent's ttl (refreshed by its next attempt).
    intents: Vec<(OwnerToken, Instant)>,
    /// The fair waiters, in the order they first asked, each with its mode and when its
    /// place runs out (refreshed by its next attempt). A writer's place is its intent.
    queue: VecDeque<(OwnerToken, RwMode, Instant)>,
    subscribers: Vec<mpsc::UnboundedSender<()>>,
}

struct RwLease {
    owner: OwnerToken,
    mode: RwMode,
    expires_at: Instant,
}

impl RwRow {
    /// Drops the leases, intents and fair places that ran out; tells the subscribers if that
    /// may let someone in.
    fn expire(&mut self, now: Instant) {
        let before = self.leases.len() + self.intents.len() + self.queue.len();
        self.leases.retain(|lease| lease.expires_at > now);
        self.intents.retain(|(_, until)| *until > now);
        self.queue.retain(|(_, _, until)| *until > now);
        if self.leases.len() + self.intents.len() + self.queue.len() < before {
            self.notify();
        }
    }

    fn notify(&mut self) {
        self.subscribers.retain(|tx| tx.send(()).is_ok());
    }

    fn live(&mut self, lease: &Lease, now: Instant) -> Option<&mut RwLease> {
        self.leases.iter_mut().find(|held| {
            held.owner == lease.owner && Some(held.mode) == lease.rw && held.expires_at > now
        })
    }
}

impl MemoryBackend {
    /// One attempt at a read share or the write hold: unfair (`fair` false) as
    /// `LockBackend::acquire_rw` says, with a waiting writer's `intent`; fair as
    /// `LockBackend::acquire_rw_fair` says (`intent` is not looked at: a fair writer's place
    /// is its intent).
    pub(super) fn take_rw(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: RwMode,
        intent: bool,
        fair: bool,
    ) -> Acquisition {
        let now = Instant::now();
        let mut table = self.table();
        let row = table.rwlocks.entry(name.to_owned()).or_default();
        row.expire(now);
        // The fair places ahead of this caller's: all of them for an unfair caller, or a fair
        // one not yet in the queue (it would go to the back).
        let place = row
            .queue
            .iter()
            .position(|(token, _, _)| fair && *token == owner);
        let ahead = row.queue.iter().take(place.unwrap_or(row.queue.len()));
        // Whoever keeps this caller out, and until when at the latest.
        let blocking = match (mode, fair) {
            // A reader: a write hold, an unfair writer's intent, a fair writer's place (for
            // a fair reader, one ahead of its own).
            (RwMode::Read, _) => row
                .leases
                .iter()
                .filter(|lease| lease.mode == RwMode::Write)
                .map(|lease| lease.expires_at)
                .chain(row.intents.iter().map(|(_, until)| *until))
                .chain(
                    ahead
                        .filter(|(_, mode, _)| *mode == RwMode::Write)
                        .map(|(_, _, until)| *until),
                )
                .min(),
            // An unfair writer: anything held (it ignores the queue).
            (RwMode::Write, false) => row.leases.iter().map(|lease| lease.expires_at).min(),
            // A fair writer: anything held, or any place ahead of its own.
            (RwMode::Write, true) => row
                .leases
                .iter()
                .map(|lease| lease.expires_at)
                .chain(ahead.map(|(_, _, until)| *until))
                .min(),
        };
        if let Some(until) = blocking {
            let mut left = until - now;
            if fair {
                // Keep (or take) the place, leased for `ttl` from this attempt; the next
                // attempt comes before it runs out.
                match row.queue.iter_mut().find(|(token, _, _)| *token == owner) {
                    Some(entry) => entry.2 = now + ttl,
                    None => row.queue.push_back((owner, mode, now + ttl)),
                }
                left = left.min(ttl / 2);
            } else if mode == RwMode::Write && intent {
                // New readers wait behind this writer from now on; its next attempt comes
                // before the intent runs out.
                row.intents.retain(|(token, _)| *token != owner);
                row.intents.push((owner, now + ttl));
                left = left.min(ttl / 2);
            }
            return Acquisition::Held(Contention::with_remaining_ttl(Some(left)));
        }
        row.intents.retain(|(token, _)| *token != owner);
        // The place goes with the grant. That lets nobody else in: whatever let this caller
        // in (a release, a withdrawal) has woken the others already.
        row.queue.retain(|(token, _, _)| *token != owner);
        row.fence += 1;
        row.leases.push(RwLease {
            owner,
            mode,
            expires_at: now + ttl,
        });
        let mut lease = Lease::new(name, owner, row.fence);
        lease.rw = Some(mode);
        Acquisition::Acquired(lease)
    }

    pub(super) fn renew_rw(&self, lease: &Lease, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut table = self.table();
        let Some(row) = table.rwlocks.get_mut(&lease.key) else {
            return false;
        };
        match row.live(lease, now) {
            Some(held) => {
                held.expires_at = now + ttl;
                true
            }
            None => false,
        }
    }

    pub(super) fn release_rw(&self, lease: &Lease) -> bool {
        let now = Instant::now();
        let mut table = self.table();
        let Some(row) = table.rwlocks.get_mut(&lease.key) else {
            return false;
        };
        if row.live(lease, now).is_none() {
            return false;
        }
        row.leases.retain(|held| held.owner != lease.owner);
        row.notify();
        true
    }

    pub(super) fn withdraw_rw_intent(&self, name: &str, owner: OwnerToken) {
        let mut table = self.table();
        let Some(row) = table.rwlocks.get_mut(name) else {
            return;
        };
        let before = row.intents.len();
        row.intents.retain(|(token, _)| *token != owner);
        if row.intents.len() < before {
            row.notify();
        }
    }

    /// Takes `owner` out of the fair queue; wakes the waiters if that may let someone in (it
    /// was first, or a writer, which keeps readers behind it and unfair readers out).
    pub(super) fn withdraw_rw_place(&self, name: &str, owner: OwnerToken) {
        let mut table = self.table();
        let Some(row) = table.rwlocks.get_mut(name) else {
            return;
        };
        let Some(at) = row.queue.iter().position(|(token, _, _)| *token == owner) else {
            return;
        };
        let (_, mode, _) = row.queue.remove(at).expect("found just now");
        if at == 0 || mode == RwMode::Write {
            row.notify();
        }
    }

    pub(super) fn subscribe_to_rw(&self, name: &str) -> ReleaseNotices {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut table = self.table();
        let row = table.rwlocks.entry(name.to_owned()).or_default();
        row.subscribers.retain(|tx| !tx.is_closed());
        row.subscribers.push(tx);
        receiver_stream(rx)
    }
}
