//! Semaphores on etcd: each lease of a semaphore `NAME` is a key of its own on an etcd lease
//! of its own, under the semaphore's directory `P + NAME + "\x1fpermits/"`; its fair waiters
//! queue beside it, under `P + NAME + "\x1fpermits\x1ffair/"` (see `queue.rs`):
//!
//! | key | value | lease |
//! |-----|-------|-------|
//! | `P NAME \x1f permits/<owner in hex>` | `"<k> <N>[ <metadata>]"` | granted for the ttl, kept alive by the holder's key actor |
//! | `P NAME \x1f permits \x1f fair/<owner in hex>` | empty | a fair waiter's place: granted for its ttl at its first attempt, kept alive by each later one |
//!
//! The separator is a control character, which no key or name has: so no lock key (in `txn`
//! mode `P + KEY`, in `lock` mode under `P + NAME/`) is ever in a semaphore's directory, and
//! a semaphore and a lock of one name are apart. The queue sorts just before the directory
//! and outside it: a range read of the directory does not read it, and one watch covers both.
//! Monitoring (`list`, `watch_prefix`) does not show semaphore keys.
//!
//! | operation | etcd calls |
//! |-----------|------------|
//! | acquire   | `Range(dir)` at revision R: the live leases, their k and N. Too few free → `Held`, with R. Enough → `LeaseGrant`, then ONE `Txn`: if no key under `dir` was written after R (`mod_revision(dir) < R + 1`, over the range) then `Put(key, value, lease)`; the fencing token is the put's revision. A write in between fails the compare: read and try again. |
//! | acquire, fair | ONE read `Txn` at revision R: `Range(dir)`, the queue's first key (by create revision), the waiter's own. Beside it, `LeaseKeepAlive` of the waiter's place's lease (an id chosen from its owner token, see `queue.rs`). Too few free, or another waiter first → `Held`, with R: the keep-alive kept its place, or, with none yet, it takes one at the back (`LeaseGrant`, a `Txn` putting its key). Enough free and first → ONE `Txn`: if nothing under `dir` was written after R and its key is still the one read (or, without a key, the queue is still empty) then `Put(key, value, place's lease)` and `DeleteRange(its key in the queue)`. First in an empty queue: `LeaseGrant` for the put first. Two round trips for a waiter first in line (three in an empty queue, as the unfair read, grant, write). |
//! | withdraw (fair) | `Txn` deleting the waiter's key in the queue, then `LeaseRevoke` of its lease |
//! | renew     | `Range(key)`: still ours if its create revision is our token; then `LeaseKeepAlive` of the lease it is on, on the backend's one stream. For a longer ttl than that lease was granted: `LeaseGrant`, a `Txn` that moves the key to the new lease if it is still on the old, `LeaseRevoke` of the old |
//! | release   | `Txn`: if the key's create revision is our token then `DeleteRange(key)`; then `LeaseRevoke` of the lease it was on |
//! | wait      | one `Watch` for deletes, from R + 1, of the range from the queue to the end of `dir`: a release, a revoke and a lease that ran out all delete a lease's key; an admission, a withdrawal and a place that ran out delete a key in the queue, which lets the next fair waiter go |
//!
//! A lease that runs out deletes its key: a crashed holder's permits free at its ttl, a dead
//! waiter's place at its ttl. Only admitted leases are ever written under `dir` (the compare
//! keeps out any write the read did not see), so a delete there always frees permits, never
//! undoes a rival's attempt. An unfair waiter is woken by deletes in the queue too (its watch
//! is the semaphore's one): a look that finds nothing free.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, GetOptions, KeyValue, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions,
};
use futures::StreamExt;

use super::call::is_lease_not_found;
use super::lease::lease_seconds;
use super::queue::{prefix_end, WaitQueue};
use super::values::{token, txn_revision};
use super::EtcdBackend;
use crate::backend::{
    Acquisition, Contention, Lease, OwnerToken, PermitHolder, Permits, ReleaseNotices,
};
use crate::error::StoreError;

/// How often one acquisition reads and tries to write when other writes keep coming between
/// the two, before it answers `Held`: a waiter then tries again after [`RACED_PAUSE`], and a
/// `try_acquire` says none is free (under heavy contention on one semaphore, it may say so
/// while permits are free: every lost race was another caller's acquisition).
const TRIES: usize = 16;

/// How long a waiter that lost every race pauses before it tries again (no release notice is
/// coming: the permits may be free).
const RACED_PAUSE: Duration = Duration::from_millis(5);

impl EtcdBackend {
    /// What the semaphore's keys start with: its permits directory is this and `/`, its fair
    /// waiters' queue this and `\x1ffair/` (see `queue.rs`).
    fn permits_stem(&self, name: &str) -> String {
        format!("{}{name}\u{1f}permits", self.prefix)
    }

    /// The semaphore's directory: every lease of it is a key under this.
    fn permits_dir(&self, name: &str) -> String {
        format!("{}/", self.permits_stem(name))
    }

    /// The semaphore's fair waiters' queue.
    fn permits_queue(&self, name: &str) -> WaitQueue {
        WaitQueue::beside(&self.permits_stem(name))
    }

    pub(super) async fn take_permits(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let dir = self.permits_dir(name);
        let key = format!("{dir}{owner}");
        let value = Record::encode(permits, metadata);
        let mut grant = None;
        let mut seen = 0;
        let mut full = false;
        for _ in 0..TRIES {
            let read = self
                .get(&dir, Some(GetOptions::new().with_prefix()))
                .await?;
            seen = read.header().map_or(0, |h| h.revision());
            if !fits(name, permits, read.kvs())? {
                full = true;
                break;
            }
            // The lease first, so the put can attach the key to it; granted once, for every
            // try of this acquisition.
            let id = match &grant {
                Some(grant) => grant,
                None => grant.insert(self.grant(ttl).await?),
            }
            .id;
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(dir.as_str(), CompareOp::Less, seen + 1).with_prefix(),
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(
                    key.as_str(),
                    value.as_str(),
                    Some(PutOptions::new().with_lease(id)),
                )]);
            let answer = self.txn(txn).await?;
            if answer.succeeded() {
                let revision = txn_revision(&answer)?;
                let mut lease = Lease::new(name, owner, token(revision)?);
                lease.permits = Some(permits);
                lease.lease_id = grant.map(|grant| grant.keep());
                return Ok(Acquisition::Acquired(lease));
            }
        }
        if let Some(grant) = grant {
            grant.revoke().await;
        }
        // Full: no remaining ttl, the watch of deletes from `seen` wakes the waiter, and the
        // backstop timer covers a missed one. Raced: look again soon.
        Ok(Acquisition::Held(Contention {
            remaining_ttl: (!full).then_some(RACED_PAUSE),
            revision: Some(seen),
        }))
    }

    /// A fair waiter's attempt: as [`take_permits`](Self::take_permits), admitted only first
    /// in the semaphore's queue (or with nobody in it); else it keeps (or takes) its place
    /// there (see `queue.rs`).
    pub(super) async fn take_permits_fair(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let dir = self.permits_dir(name);
        let queue = self.permits_queue(name);
        let key = format!("{dir}{owner}");
        let value = Record::encode(permits, metadata);
        let mut seen = 0;
        let mut place = None;
        // Every race lost (or the place lost under the attempt): look again soon.
        let mut wait = RACED_PAUSE;
        for _ in 0..TRIES {
            // One read, at one revision: the leases, the queue's first key and ours.
            let [first, own] = queue.look(owner);
            let read = Txn::new().and_then([
                TxnOp::get(dir.as_str(), Some(GetOptions::new().with_prefix())),
                first,
                own,
            ]);
            let (read, kept) = self.read_keeping_place(read, owner).await?;
            seen = txn_revision(&read)?;
            let answers = read.op_responses();
            let Some(TxnOpResponse::Get(leases)) = answers.first() else {
                return Err(StoreError::protocol(
                    "etcd txn answer without the leases' range",
                ));
            };
            let fits = fits(name, permits, leases.kvs())?;
            let read_place = queue.place(owner, &answers[1..], kept)?;
            if !fits || !read_place.first() {
                place = Some(read_place);
                wait = ttl / 2;
                break;
            }
            // Admitted if nothing changed since the read. The lease: the place's, kept alive
            // now (the key moves from the queue to the permits on it), or, first in an empty
            // queue, a new one.
            let (id, grant) = if read_place.lease().is_some() {
                match self.lease_of_place(&read_place).await? {
                    Some((id, _granted)) => (id, None),
                    // The place went with its lease: read again, and queue at the back.
                    None => {
                        place = Some(read_place);
                        continue;
                    }
                }
            } else {
                let grant = self.grant(ttl).await?;
                (grant.id, Some(grant))
            };
            let mut compares = vec![
                Compare::mod_revision(dir.as_str(), CompareOp::Less, seen + 1).with_prefix(),
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            ];
            compares.extend(read_place.still_first(&queue));
            let mut ops = vec![TxnOp::put(
                key.as_str(),
                value.as_str(),
                Some(PutOptions::new().with_lease(id)),
            )];
            ops.extend(read_place.leave());
            let answer = match self.txn(Txn::new().when(compares).and_then(ops)).await {
                // The place's lease ran out between its keep-alive and the write.
                Err(error) if is_lease_not_found(&error) => {
                    place = Some(read_place);
                    continue;
                }
                answer => answer?,
            };
            if answer.succeeded() {
                let revision = txn_revision(&answer)?;
                let mut lease = Lease::new(name, owner, token(revision)?);
                lease.permits = Some(permits);
                lease.lease_id = Some(grant.map_or(id, |grant| grant.keep()));
                return Ok(Acquisition::Acquired(lease));
            }
            if let Some(grant) = grant {
                grant.revoke().await;
            }
            place = Some(read_place);
        }
        // Not admitted (too few free, someone ahead, or every race lost): wait in line. The
        // next attempt keeps the place alive, so it comes within half the ttl; the watch of
        // deletes wakes it sooner (a release, an admission or a withdrawal ahead of it, a
        // lease that ran out).
        if let Some(place) = place {
            self.keep_place(&queue, &place, ttl).await?;
        }
        Ok(Acquisition::Held(Contention {
            remaining_ttl: Some(wait.min(ttl / 2)),
            revision: Some(seen),
        }))
    }

    pub(super) async fn withdraw_permit_waiter(
        &self,
        name: &str,
        owner: OwnerToken,
    ) -> Result<(), StoreError> {
        self.leave_queue(&self.permits_queue(name), owner).await
    }

    pub(super) async fn renew_permits(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = format!("{}{}", self.permits_dir(&lease.key), lease.owner);
        self.renew_own_key(&key, lease, ttl).await
    }

    /// Renews `lease`, whose key (on an etcd lease of its own) is `key`: a semaphore's
    /// permits, a read-write lock's share or hold.
    pub(super) async fn renew_own_key(
        &self,
        key: &str,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // The key, created with the lease's token as its create revision, tells which etcd
        // lease it is on now (a renewal for a longer ttl moves it to a new one).
        let read = self.get(key, None).await?;
        let Some(kv) = read.kvs().first() else {
            return Ok(false); // released, run out, or deleted by another client
        };
        if token(kv.create_revision()).ok() != Some(lease.fencing_token) {
            return Ok(false);
        }
        let current = kv.lease();
        let kept = self.keep_alive(current).await?;
        if kept.ttl <= 0 {
            return Ok(false); // the lease is gone, and the key with it
        }
        if lease_seconds(ttl) <= kept.ttl {
            return Ok(true);
        }
        // etcd cannot lengthen a lease: the key moves to a new, longer one if it is still on
        // the old (its create revision, the token, stays).
        let grant = self.grant(ttl).await?;
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, current)])
            .and_then([TxnOp::put(
                key,
                kv.value(),
                Some(PutOptions::new().with_lease(grant.id)),
            )]);
        if !self.txn(txn).await?.succeeded() {
            grant.revoke().await;
            return Ok(false);
        }
        grant.keep();
        // Nothing is on the old lease any more; a failure leaves it to run out.
        let _ = self.revoke(current).await;
        Ok(true)
    }

    pub(super) async fn release_permits(&self, lease: &Lease) -> Result<bool, StoreError> {
        let key = format!("{}{}", self.permits_dir(&lease.key), lease.owner);
        self.release_own_key(&key, lease).await
    }

    /// Releases `lease`, whose key (on an etcd lease of its own) is `key`: a semaphore's
    /// permits, a read-write lock's share or hold.
    pub(super) async fn release_own_key(
        &self,
        key: &str,
        lease: &Lease,
    ) -> Result<bool, StoreError> {
        // Compare-and-delete: only the key of this lease (its create revision is the token;
        // token 0 is an acquisition whose answer never came, and the key named after its owner
        // is its own). The delete wakes the waiters' watches.
        let ours = match i64::try_from(lease.fencing_token) {
            Ok(0) => Compare::create_revision(key, CompareOp::Greater, 0),
            Ok(token) => Compare::create_revision(key, CompareOp::Equal, token),
            Err(_) => return Ok(false),
        };
        let txn = Txn::new().when([ours]).and_then([TxnOp::delete(
            key,
            Some(DeleteOptions::new().with_prev_key()),
        )]);
        let answer = self.txn(txn).await?;
        if !answer.succeeded() {
            return Ok(false);
        }
        let on_lease = answer.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Delete(delete) => delete.prev_kvs().first().map(KeyValue::lease),
            _ => None,
        });
        // The permits are free already; revoking just ends the lease now rather than at its
        // ttl. A failure costs nothing but that.
        if let Some(id) = on_lease.filter(|&id| id != 0) {
            if let Err(error) = self.revoke(id).await {
                tracing::debug!(name = %lease.key, %error, "lease revoke after a permit release failed; it will run out");
            }
        }
        Ok(true)
    }

    pub(super) async fn subscribe_to_permits(
        &self,
        name: &str,
        seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        // Deletes only, in one range from the queue to the end of the permits: a delete of
        // a lease frees permits (only admitted leases are written), a delete in the queue
        // lets the next fair waiter go.
        let queue = self.permits_queue(name);
        let end = prefix_end(self.permits_dir(name).as_bytes());
        self.watch_deletes_in(queue.dir().to_owned(), end, seen)
            .await
    }

    /// A notice per batch of deletes under `dir` after the revision `seen` says.
    pub(super) async fn watch_deletes(
        &self,
        dir: String,
        seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        let end = prefix_end(dir.as_bytes());
        self.watch_deletes_in(dir, end, seen).await
    }

    /// A notice per batch of deletes in the range `[from, to)` after the revision `seen`
    /// says.
    pub(super) async fn watch_deletes_in(
        &self,
        from: String,
        to: Vec<u8>,
        seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        let mut options = WatchOptions::new()
            .with_range(to)
            .with_filters([WatchFilterType::NoPut]);
        if let Some(revision) = seen.revision {
            options = options.with_start_revision(revision + 1);
        }
        let watch = self.open_watch(from, options).await?;
        let deletes = futures::stream::unfold(watch, |mut watch| async move {
            loop {
                let answer = watch.message().await.ok().flatten()?;
                if answer.canceled() {
                    return None;
                }
                let freed = answer
                    .events()
                    .iter()
                    .any(|event| event.event_type() == EventType::Delete);
                if freed {
                    return Some(((), watch));
                }
            }
        });
        Ok(deletes.boxed())
    }

    pub(super) async fn holders_of(&self, name: &str) -> Result<Vec<PermitHolder>, StoreError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let read = self.get(&self.permits_dir(name), Some(options)).await?;
        let mut holders = Vec::new();
        for kv in read.kvs() {
            let Some(record) = Record::decode(kv) else {
                continue;
            };
            let Some(remaining_ttl) = self.remaining(kv.lease()).await? else {
                continue; // ran out since the read
            };
            holders.push(PermitHolder {
                name: name.to_owned(),
                fencing_token: token(kv.create_revision())?,
                permits: record.permits,
                remaining_ttl,
                metadata: record.metadata.map(str::to_owned),
            });
        }
        Ok(holders)
    }
}

/// A semaphore lease's value, `"<k> <N>[ <metadata>]"`.
struct Record<'a> {
    permits: Permits,
    metadata: Option<&'a str>,
}

impl<'a> Record<'a> {
    fn encode(permits: Permits, metadata: Option<&str>) -> String {
        match metadata {
            Some(metadata) => format!("{} {} {metadata}", permits.count, permits.total),
            None => format!("{} {}", permits.count, permits.total),
        }
    }

    fn decode(kv: &'a KeyValue) -> Option<Self> {
        let value = std::str::from_utf8(kv.value()).ok()?;
        let mut parts = value.splitn(3, ' ');
        let count = parts.next()?.parse().ok()?;
        let total = parts.next()?.parse().ok()?;
        Some(Record {
            permits: Permits::new(total, count),
            metadata: parts.next(),
        })
    }
}

/// Whether `permits` fit beside the semaphore's live leases `kvs`; an error if those were
/// granted with another N.
fn fits(name: &str, permits: Permits, kvs: &[KeyValue]) -> Result<bool, StoreError> {
    let mut used = 0u32;
    for kv in kvs {
        let Some(lease) = Record::decode(kv) else {
            continue; // not a key leasehold wrote: it grants nothing
        };
        if lease.permits.total != permits.total {
            return Err(StoreError::PermitsMismatch {
                name: name.to_owned(),
                asked: permits.total,
                held: lease.permits.total,
            });
        }
        used = used.saturating_add(lease.permits.count);
    }
    Ok(used.saturating_add(permits.count) <= permits.total)
}
