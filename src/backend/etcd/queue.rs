//! Fair waiters' queues: one per semaphore (both modes) and per lock in `txn` mode (`lock` mode
//! uses the Lock service's own queue, `election.rs`). A fair waiter has one key in its queue,
//! named after its owner token, on an etcd lease of its own granted for the request's ttl;
//! the queue's order is the keys' create revisions, so a waiter's place is where it first
//! asked.
//!
//! | key | value | lease |
//! |-----|-------|-------|
//! | `DIR <owner in hex>` | empty | its id chosen from the owner token ([`place_lease`]), granted for the request's ttl at its first attempt, kept alive by each later one |
//!
//! `DIR` is `P + KEY + "\x1ffair/"` for a lock, `P + NAME + "\x1fpermits\x1ffair/"` for a
//! semaphore: beside what it queues for, never inside a range that is read for holders (a
//! lock's key, a semaphore's `permits/` directory). Each directory's one watch for waiters
//! covers its queue too (see [`EtcdBackend::watch_deletes_in`]).
//!
//! | step | etcd calls |
//! |------|------------|
//! | look | two range ops in the attempt's read `Txn` (no round trip of their own): the queue's first key by create revision, and the waiter's own key |
//! | wait in line | `LeaseKeepAlive` of the place's lease, sent beside the read (its id is known before the read says it); with no key yet (or its lease gone), then `LeaseGrant` of that id and a `Txn` putting the key if it does not exist: the back of the queue |
//! | admitted | the admission `Txn` compares that the waiter's key is still the one read (its create revision: nothing can be created before it any more), or that the queue is still empty, and deletes the key; the lease it was on (kept alive beside the read) carries the lock's or the permits' key from then on (on a session backend a lock's key goes on the session, beside a keep-alive of it, and the place's lease is revoked after) |
//! | withdraw | `Txn` deleting the key, then `LeaseRevoke` of its lease |
//!
//! Every way out of the queue deletes a key — an admission, a withdrawal, a lease that ran out
//! (a dead waiter's, at its ttl) — and each delete wakes the waiters behind it through their
//! watch: the next one may go. A waiter whose key was deleted by another client (or whose
//! lease was revoked) has lost its place: its next attempt puts a new key, at the back.

use std::time::Duration;

use tokio::time::Instant;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, TxnResponse,
};

use super::call::is_lease_not_found;
use super::keep_alive::KeptAlive;
use super::lease::lease_seconds;
use super::values::{token, txn_revision, Holder};
use super::EtcdBackend;
use crate::backend::{Acquisition, Contention, Lease, OwnerToken};
use crate::error::StoreError;

/// The directory suffix of a queue: `"\x1ffair/"`, after what it queues for.
pub(super) const QUEUE_SUFFIX: &str = "\u{1f}fair/";

/// A fair waiters' queue: its keys are under `dir`.
#[derive(Debug, Clone)]
pub(super) struct WaitQueue {
    dir: String,
}

/// What one read of a queue showed a waiter.
#[derive(Debug)]
pub(super) struct Place {
    /// The waiter's key.
    key: String,
    /// The lease its key goes on: see [`place_lease`].
    chosen: i64,
    /// The first key in the queue (by create revision), if any.
    head: Option<Vec<u8>>,
    /// The waiter's own key, if it has one: its create revision and its lease.
    own: Option<(i64, i64)>,
    /// The keep-alive of its key's lease sent beside the read, if that lease is alive and
    /// the keep-alive was sent after the attempt began: it runs its ttl from then.
    kept: Option<KeptAlive>,
}

/// The lease of `owner`'s place in a queue: an id chosen by us (etcd takes one at grant) from
/// the owner token's random bits, positive and not zero, so that every attempt can keep its
/// place alive beside its read, before the read says which lease the place is on.
pub(super) fn place_lease(owner: OwnerToken) -> i64 {
    let bits = owner.as_u128() as u64 & i64::MAX as u64;
    bits.max(1) as i64
}

impl WaitQueue {
    /// The queue of what lives at `base` (a lock key, a semaphore's `permits` stem).
    pub(super) fn beside(base: &str) -> Self {
        WaitQueue {
            dir: format!("{base}{QUEUE_SUFFIX}"),
        }
    }

    pub(super) fn dir(&self) -> &str {
        &self.dir
    }

    pub(super) fn key(&self, owner: OwnerToken) -> String {
        format!("{}{owner}", self.dir)
    }

    /// The two range ops of a look at the queue, for `owner`'s read `Txn`: the first key, and
    /// `owner`'s own.
    pub(super) fn look(&self, owner: OwnerToken) -> [TxnOp; 2] {
        let first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1)
            .with_keys_only();
        [
            TxnOp::get(self.dir.as_str(), Some(first)),
            TxnOp::get(self.key(owner), Some(GetOptions::new().with_keys_only())),
        ]
    }

    /// `owner`'s place, from the answers to [`look`](Self::look)'s two ops and the keep-alive
    /// sent beside them ([`EtcdBackend::read_keeping_place`]).
    pub(super) fn place(
        &self,
        owner: OwnerToken,
        answers: &[TxnOpResponse],
        kept: Option<KeptAlive>,
    ) -> Result<Place, StoreError> {
        let first_kv = |answer: Option<&TxnOpResponse>| match answer {
            Some(TxnOpResponse::Get(get)) => Ok(get.kvs().first().cloned()),
            _ => Err(StoreError::protocol(
                "etcd txn answer without the queue's range",
            )),
        };
        let head = first_kv(answers.first())?;
        let own = first_kv(answers.get(1))?.map(|kv| (kv.create_revision(), kv.lease()));
        let chosen = place_lease(owner);
        Ok(Place {
            key: self.key(owner),
            chosen,
            head: head.map(|kv| kv.key().to_vec()),
            own,
            // Only if its key is on that lease: a key on another is kept alive on its own.
            kept: kept.filter(|_| own.is_some_and(|(_, lease)| lease == chosen)),
        })
    }
}

impl Place {
    /// Nobody is ahead: the queue is empty, or the waiter's key is its first.
    pub(super) fn first(&self) -> bool {
        self.head
            .as_deref()
            .is_none_or(|head| head == self.key.as_bytes())
    }

    /// The lease the waiter's key is on, if it has a key.
    pub(super) fn lease(&self) -> Option<i64> {
        self.own.map(|(_, lease)| lease)
    }

    /// The compare that keeps an admission to what the look saw: the waiter's key is still
    /// the one read, on the same lease (no key can be created before it any more, so it is
    /// still first), or, for a waiter without a key, the queue is still empty (over a range
    /// without keys etcd compares a version of 0).
    pub(super) fn still_first(&self, queue: &WaitQueue) -> Vec<Compare> {
        match self.own {
            Some((created, lease)) => vec![
                Compare::create_revision(self.key.as_str(), CompareOp::Equal, created),
                Compare::lease(self.key.as_str(), CompareOp::Equal, lease),
            ],
            None => vec![Compare::version(queue.dir.as_str(), CompareOp::Equal, 0).with_prefix()],
        }
    }

    /// The op of an admission that takes the waiter's key out of the queue (its delete wakes
    /// the waiters behind it).
    pub(super) fn leave(&self) -> Option<TxnOp> {
        self.own.map(|_| TxnOp::delete(self.key.as_str(), None))
    }

    /// A lock's admission: writes `lock_key` with `value` on `lease` if the key is free and
    /// the waiter still first, and takes the waiter out of the queue.
    fn admit_to_lock(&self, queue: &WaitQueue, lock_key: &str, value: String, lease: i64) -> Txn {
        let mut compares = vec![Compare::create_revision(lock_key, CompareOp::Equal, 0)];
        compares.extend(self.still_first(queue));
        let put = TxnOp::put(lock_key, value, Some(PutOptions::new().with_lease(lease)));
        let mut ops = vec![put];
        ops.extend(self.leave());
        Txn::new().when(compares).and_then(ops)
    }
}

impl EtcdBackend {
    /// An attempt's read, with a keep-alive of its place's lease sent beside it: an attempt
    /// needs that keep-alive either way (to keep its place, or for what it is admitted to
    /// carry its ttl from this attempt), and beside the read it costs no round trip of its
    /// own. The read's answer, and the keep-alive's if the lease is alive and the keep-alive
    /// was sent after the attempt began (one that joined an earlier attempt's, given up in
    /// flight, does not count: the steps after the read keep the place themselves then).
    pub(super) async fn read_keeping_place(
        &self,
        read: Txn,
        owner: OwnerToken,
    ) -> Result<(TxnResponse, Option<KeptAlive>), StoreError> {
        let asked_at = Instant::now();
        let (read, kept) = futures::join!(self.txn(read), self.keep_alive(place_lease(owner)));
        // No such lease (a first attempt, a place that ran out) or a failed keep-alive: the
        // place is seen to after the read.
        let kept = kept
            .ok()
            .filter(|kept| kept.ttl > 0 && kept.sent_at >= asked_at);
        Ok((read?, kept))
    }

    /// Keeps the waiter's place in `queue` for `ttl` from now: nothing more if its read's
    /// keep-alive did; else a keep-alive of its key's lease, or, if it has no key (or the
    /// lease is gone, and the key with it), a new key at the back on its place's lease.
    pub(super) async fn keep_place(
        &self,
        queue: &WaitQueue,
        place: &Place,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if place.kept.is_some() {
            return Ok(());
        }
        if let Some(lease) = place.lease() {
            if self.keep_alive(lease).await?.ttl > 0 {
                return Ok(());
            }
        }
        let grant = self.grant_id(place.chosen, ttl).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                place.key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                place.key.as_str(),
                "",
                Some(PutOptions::new().with_lease(grant.id)),
            )]);
        // Kept either way: if the key is there (an earlier attempt's whose answer was lost),
        // it is on this same lease, or on one that runs out with nothing on this one.
        if !self.txn(txn).await?.succeeded() {
            tracing::debug!(queue = %queue.dir, "a fair waiter's key was there already");
        }
        grant.keep();
        Ok(())
    }

    /// The admission's lease: the waiter's key's, kept alive now, so that it runs for the
    /// request's ttl from this attempt on (the holder's deadline counts from before it). The
    /// lease and the ttl it was granted for, in seconds; `None` if it is gone: the place is
    /// lost.
    pub(super) async fn lease_of_place(
        &self,
        place: &Place,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let Some(lease) = place.lease() else {
            return Ok(None);
        };
        if let Some(kept) = place.kept {
            return Ok(Some((lease, kept.ttl)));
        }
        let asked_at = Instant::now();
        let mut kept = self.keep_alive(lease).await?;
        if kept.ttl > 0 && kept.sent_at < asked_at {
            // It joined a keep-alive of this lease sent before (an earlier attempt's, given
            // up in flight), which may not cover the ttl from this attempt: one of its own.
            kept = self.keep_alive(lease).await?;
        }
        Ok((kept.ttl > 0).then_some((lease, kept.ttl)))
    }

    /// `txn` mode's fair attempt on the lock `key`: the lock key is written only if it is
    /// free and the waiter is first in the lock's queue (or nobody is in it); else the waiter
    /// keeps (or takes) its place there.
    ///
    /// | case | etcd calls |
    /// |------|------------|
    /// | free, queue empty | a read `Txn` (the key, the queue's first, ours), `LeaseGrant`, the admission `Txn` |
    /// | free, first in the queue | a read `Txn` and, beside it, `LeaseKeepAlive` of the place's lease; the admission `Txn`, which moves the waiter's key from the queue to the lock key on that lease |
    /// | held, or someone ahead | a read `Txn` and, beside it, `LeaseKeepAlive` of the place's lease (at the first attempt, then `LeaseGrant` of it and a `Txn` putting its key) |
    pub(super) async fn acquire_txn_fair(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let lock_key = self.lock_key(key);
        let queue = WaitQueue::beside(&lock_key);
        let [first, own] = queue.look(owner);
        let read = Txn::new().and_then([TxnOp::get(lock_key.as_str(), None), first, own]);
        let (read, kept) = self.read_keeping_place(read, owner).await?;
        let seen = txn_revision(&read)?;
        let answers = read.op_responses();
        let free = match answers.first() {
            Some(TxnOpResponse::Get(get)) => get.kvs().is_empty(),
            _ => return Err(StoreError::protocol("etcd txn answer without the lock key")),
        };
        let place = queue.place(owner, &answers[1..], kept)?;
        // How long to wait before the next attempt: no more than half the place's ttl, so
        // that attempt keeps it alive in time; a delete of the lock key or of a key ahead in
        // the queue wakes the waiter sooner. An attempt that was first at the read but not
        // admitted (a race, or its place ran out) looks again at once.
        let mut wait = ttl / 2;
        if free && place.first() {
            match self
                .admit(key, &queue, &place, owner, ttl, metadata)
                .await?
            {
                Some(acquired) => return Ok(acquired),
                None => wait = Duration::ZERO,
            }
        }
        self.keep_place(&queue, &place, ttl).await?;
        Ok(Acquisition::Held(Contention {
            remaining_ttl: Some(wait),
            revision: Some(seen),
        }))
    }

    /// Writes the lock key for the fair waiter first in line, if nothing changed since its
    /// read; `None` if something did.
    async fn admit(
        &self,
        key: &str,
        queue: &WaitQueue,
        place: &Place,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Option<Acquisition>, StoreError> {
        if self.session.is_some() {
            return self
                .admit_on_session(key, queue, place, owner, ttl, metadata)
                .await;
        }
        let (id, granted, grant) = if place.lease().is_some() {
            match self.lease_of_place(place).await? {
                Some((id, granted)) => (id, granted, None),
                None => return Ok(None),
            }
        } else {
            let grant = self.grant(ttl).await?;
            (grant.id, grant.ttl, Some(grant))
        };
        let lock_key = self.lock_key(key);
        let lock_key = lock_key.as_str();
        // Recorded before the write, so the prefix watch cannot miss a change right after it.
        let registration = self.register(owner, id, granted).await;
        let value = Holder::encode(owner, granted, metadata);
        let admission = place.admit_to_lock(queue, lock_key, value, id);
        let answer = match self.txn(admission).await {
            // The place's lease ran out between its keep-alive and the write.
            Err(error) if is_lease_not_found(&error) => return Ok(None),
            answer => answer?,
        };
        if !answer.succeeded() {
            if let Some(grant) = grant {
                grant.revoke().await;
            }
            return Ok(None);
        }
        let mut lease = Lease::new(key, owner, token(txn_revision(&answer)?)?);
        lease.lease_id = Some(grant.map_or(id, |grant| grant.keep()));
        registration.keep();
        Ok(Some(Acquisition::Acquired(lease)))
    }

    /// [`admit`](Self::admit) on a backend whose locks are on its session lease: the lock
    /// key goes on the session (beside it, a keep-alive of the session sent after this
    /// attempt began, as for an unfair lock in `txn_mode.rs`), not on the place's lease, which
    /// carries nothing once the place is deleted and is revoked then.
    async fn admit_on_session(
        &self,
        key: &str,
        queue: &WaitQueue,
        place: &Place,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Option<Acquisition>, StoreError> {
        let Some(session) = &self.session else {
            return Err(StoreError::protocol("no session lease to admit on"));
        };
        let current = session.lease(self).await?;
        let asked_at = Instant::now();
        // The value says the lock's own ttl (what `inspect` shows), not the session's.
        let granted = lease_seconds(ttl);
        let lock_key = self.lock_key(key);
        let lock_key = lock_key.as_str();
        let registration = self.register(owner, current.id, granted).await;
        let value = Holder::encode(owner, granted, metadata);
        let admission = place.admit_to_lock(queue, lock_key, value, current.id);
        let (answer, kept) =
            futures::join!(self.txn(admission), current.kept_after(self, asked_at));
        let answer = match answer {
            // The session lease is gone: the next attempt is on a new one.
            Err(error) if is_lease_not_found(&error) => {
                current.gone(self);
                return Ok(None);
            }
            answer => answer?,
        };
        if !answer.succeeded() {
            return Ok(None);
        }
        let mut lease = Lease::new(key, owner, token(txn_revision(&answer)?)?);
        lease.lease_id = Some(current.id);
        // Not trusted, the key is given back; the place went with the write: the next
        // attempt queues again.
        let lease = self.trust_on_session(lease, registration, kept).await?;
        if let Some(id) = place.lease() {
            if let Err(error) = self.revoke(id).await {
                tracing::debug!(queue = %queue.dir, %error, "revoking an admitted place's lease failed; it will run out");
            }
        }
        Ok(Some(Acquisition::Acquired(lease)))
    }

    /// Takes `owner` out of `queue` (it stopped waiting): deletes its key, which wakes the
    /// waiters behind it, and revokes the lease the key was on. Nothing to do if it has no
    /// key (admitted: the admission deleted it).
    pub(super) async fn leave_queue(
        &self,
        queue: &WaitQueue,
        owner: OwnerToken,
    ) -> Result<(), StoreError> {
        let key = queue.key(owner);
        let txn = Txn::new().and_then([TxnOp::delete(
            key.as_str(),
            Some(DeleteOptions::new().with_prev_key()),
        )]);
        let answer = self.txn(txn).await?;
        let on_lease = answer.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Delete(delete) => delete.prev_kvs().first().map(KeyValue::lease),
            _ => None,
        });
        // Nothing else is on the lease: revoking only ends it now rather than at its ttl.
        if let Some(id) = on_lease.filter(|&id| id != 0) {
            if let Err(error) = self.revoke(id).await {
                tracing::debug!(%key, %error, "lease revoke after leaving a queue failed; it will run out");
            }
        }
        Ok(())
    }
}

/// The end of the range of every key that starts with `prefix` (as etcd's own clients
/// compute it): the prefix with its last byte below `0xff` incremented, bytes after it
/// dropped.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(prefix_end(b"a/b\x1ffair/"), b"a/b\x1ffair0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn a_queue_sorts_between_its_base_and_the_rest() {
        // A lock's queue: the lock key, then the queue, then any other key that starts with
        // the lock key (a key has no control character).
        let lock = "p/jobs";
        let queue = WaitQueue::beside(lock);
        let end = prefix_end(queue.dir().as_bytes());
        assert!(lock.as_bytes() < queue.dir().as_bytes());
        assert!(end.as_slice() <= "p/jobs ".as_bytes());
        assert!(end.as_slice() < "p/jobs\u{1f}permits/".as_bytes());
        // A semaphore's: the queue, then its permits directory, in one range.
        let stem = "p/jobs\u{1f}permits";
        let queue = WaitQueue::beside(stem);
        assert!(queue.dir() < "p/jobs\u{1f}permits/");
    }
}
