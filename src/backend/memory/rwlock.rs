//! Read-write locks in the in-process table: per name, the live read shares and write hold,
//! the waiting writers' intents, a fence counter that never goes back, and the subscribers
//! told when someone may get in.

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
    subscribers: Vec<mpsc::UnboundedSender<()>>,
}

struct RwLease {
    owner: OwnerToken,
    mode: RwMode,
    expires_at: Instant,
}

impl RwRow {
    /// Drops the leases and intents that ran out; tells the subscribers if that may let
    /// someone in.
    fn expire(&mut self, now: Instant) {
        let before = self.leases.len() + self.intents.len();
        self.leases.retain(|lease| lease.expires_at > now);
        self.intents.retain(|(_, until)| *until > now);
        if self.leases.len() + self.intents.len() < before {
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
    pub(super) fn take_rw(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: RwMode,
        intent: bool,
    ) -> Acquisition {
        let now = Instant::now();
        let mut table = self.table();
        let row = table.rwlocks.entry(name.to_owned()).or_default();
        row.expire(now);
        // Whoever keeps this caller out, and until when at the latest.
        let blocking = match mode {
            RwMode::Read => row
                .leases
                .iter()
                .filter(|lease| lease.mode == RwMode::Write)
                .map(|lease| lease.expires_at)
                .chain(row.intents.iter().map(|(_, until)| *until))
                .min(),
            RwMode::Write => row.leases.iter().map(|lease| lease.expires_at).min(),
        };
        if let Some(until) = blocking {
            let mut left = until - now;
            if mode == RwMode::Write && intent {
                // New readers wait behind this writer from now on; its next attempt comes
                // before the intent runs out.
                row.intents.retain(|(token, _)| *token != owner);
                row.intents.push((owner, now + ttl));
                left = left.min(ttl / 2);
            }
            return Acquisition::Held(Contention::with_remaining_ttl(Some(left)));
        }
        row.intents.retain(|(token, _)| *token != owner);
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

    pub(super) fn subscribe_to_rw(&self, name: &str) -> ReleaseNotices {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut table = self.table();
        let row = table.rwlocks.entry(name.to_owned()).or_default();
        row.subscribers.retain(|tx| !tx.is_closed());
        row.subscribers.push(tx);
        receiver_stream(rx)
    }
}
