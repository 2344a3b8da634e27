//! Semaphores in the in-process table: per name, the live permit leases, a fence counter that
//! never goes back, the subscribers told when permits are freed, and the fair waiters' queue.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{receiver_stream, MemoryBackend};
use crate::backend::{
    Acquisition, Contention, Lease, OwnerToken, PermitHolder, Permits, ReleaseNotices,
};
use crate::error::StoreError;

/// One semaphore's row. Like a lock's, it outlives its holders: the fence must never go back.
#[derive(Default)]
pub(super) struct SemaphoreRow {
    fence: u64,
    /// The leases, oldest first; expired ones are dropped whenever the row is touched.
    leases: Vec<PermitLease>,
    subscribers: Vec<mpsc::UnboundedSender<()>>,
    /// The fair waiters, in the order they first asked, each with when its place runs out.
    queue: VecDeque<(OwnerToken, Instant)>,
}

struct PermitLease {
    owner: OwnerToken,
    permits: Permits,
    fencing_token: u64,
    expires_at: Instant,
    metadata: Option<String>,
}

impl SemaphoreRow {
    /// Drops the leases that ran out; tells the subscribers if that freed any permits.
    fn expire(&mut self, now: Instant) {
        let before = self.leases.len();
        self.leases.retain(|lease| lease.expires_at > now);
        if self.leases.len() < before {
            self.notify();
        }
    }

    fn notify(&mut self) {
        self.subscribers.retain(|tx| tx.send(()).is_ok());
    }

    fn live(&mut self, owner: OwnerToken, now: Instant) -> Option<&mut PermitLease> {
        self.leases
            .iter_mut()
            .find(|lease| lease.owner == owner && lease.expires_at > now)
    }
}

impl MemoryBackend {
    /// One attempt at `permits`: unfair (`fair` false) looks at the free permits only; fair
    /// also at the queue of fair waiters (see `LockBackend::acquire_permits_fair`).
    pub(super) fn take_permits(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: Permits,
        metadata: Option<&str>,
        fair: bool,
    ) -> Result<Acquisition, StoreError> {
        let now = Instant::now();
        let mut table = self.table();
        let row = table.semaphores.entry(name.to_owned()).or_default();
        row.expire(now);
        if let Some(other) = row.leases.iter().find(|l| l.permits.total != permits.total) {
            return Err(StoreError::PermitsMismatch {
                name: name.to_owned(),
                asked: permits.total,
                held: other.permits.total,
            });
        }
        let used: u32 = row.leases.iter().map(|l| l.permits.count).sum();
        let enough = used + permits.count <= permits.total;
        if fair {
            // A waiter that stopped trying leaves the queue when its place runs out.
            row.queue.retain(|(_, expires_at)| *expires_at > now);
            let head = row.queue.front().copied();
            if !enough || head.is_some_and(|(first, _)| first != owner) {
                // Keep (or take) a place, leased for `ttl` from this attempt.
                match row.queue.iter_mut().find(|(token, _)| *token == owner) {
                    Some(entry) => entry.1 = now + ttl,
                    None => row.queue.push_back((owner, now + ttl)),
                }
                // Until a lease runs out (too few free) or the head's place does (it is
                // ahead); and the next attempt must come before this place runs out.
                let ahead = match (enough, head) {
                    (true, Some((_, expires_at))) => Some(expires_at - now),
                    _ => row.leases.iter().map(|l| l.expires_at - now).min(),
                }
                .unwrap_or_default();
                let contention = Contention::with_remaining_ttl(Some(ahead.min(ttl / 2)));
                return Ok(Acquisition::Held(contention));
            }
            if head.is_some() {
                row.queue.pop_front();
                // Permits are left: the next in line may fit.
                if used + permits.count < permits.total && !row.queue.is_empty() {
                    row.notify();
                }
            }
        }
        if !enough {
            // The first lease to run out may free enough: look again by then at the latest.
            let first = row.leases.iter().map(|l| l.expires_at).min();
            let left = first.map(|at| at - now);
            return Ok(Acquisition::Held(Contention::with_remaining_ttl(left)));
        }
        row.fence += 1;
        row.leases.push(PermitLease {
            owner,
            permits,
            fencing_token: row.fence,
            expires_at: now + ttl,
            metadata: metadata.map(str::to_owned),
        });
        let mut lease = Lease::new(name, owner, row.fence);
        lease.permits = Some(permits);
        Ok(Acquisition::Acquired(lease))
    }

    pub(super) fn renew_permits(&self, lease: &Lease, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut table = self.table();
        let Some(row) = table.semaphores.get_mut(&lease.key) else {
            return false;
        };
        match row.live(lease.owner, now) {
            Some(held) => {
                held.expires_at = now + ttl;
                true
            }
            None => false,
        }
    }

    pub(super) fn release_permits(&self, lease: &Lease) -> bool {
        let now = Instant::now();
        let mut table = self.table();
        let Some(row) = table.semaphores.get_mut(&lease.key) else {
            return false;
        };
        if row.live(lease.owner, now).is_none() {
            return false;
        }
        row.leases.retain(|held| held.owner != lease.owner);
        row.notify();
        true
    }

    /// Takes `owner` out of the semaphore's fair queue; wakes the waiters if it was first.
    pub(super) fn withdraw_permit_waiter(&self, name: &str, owner: OwnerToken) {
        let mut table = self.table();
        let Some(row) = table.semaphores.get_mut(name) else {
            return;
        };
        let was_first = row.queue.front().is_some_and(|(first, _)| *first == owner);
        row.queue.retain(|(token, _)| *token != owner);
        if was_first {
            row.notify();
        }
    }

    pub(super) fn subscribe_to_permits(&self, name: &str) -> ReleaseNotices {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut table = self.table();
        let row = table.semaphores.entry(name.to_owned()).or_default();
        row.subscribers.retain(|tx| !tx.is_closed());
        row.subscribers.push(tx);
        receiver_stream(rx)
    }

    pub(super) fn holders_of(&self, name: &str) -> Vec<PermitHolder> {
        let now = Instant::now();
        let mut table = self.table();
        let Some(row) = table.semaphores.get_mut(name) else {
            return Vec::new();
        };
        row.expire(now);
        row.leases
            .iter()
            .map(|lease| PermitHolder {
                name: name.to_owned(),
                fencing_token: lease.fencing_token,
                permits: lease.permits,
                remaining_ttl: lease.expires_at - now,
                metadata: lease.metadata.clone(),
            })
            .collect()
    }
}
