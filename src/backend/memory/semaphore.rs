//! Semaphores in the in-process table: per name, the live permit leases, a fence counter that
//! never goes back, and the subscribers told when permits are freed.

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
    pub(super) fn take_permits(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: Permits,
        metadata: Option<&str>,
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
        if used + permits.count > permits.total {
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
