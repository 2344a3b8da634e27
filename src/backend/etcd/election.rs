//! Elections in etcd's Election-service layout (`lock` mode only): each candidate has one key,
//! `NAME/<lease id in hex>`, on its own lease, and the candidate whose key was created first
//! leads — as etcd's `concurrency.Election` (and `etcdctl elect`) lays them out, so leasehold's
//! candidates and theirs share one queue. The leader's term is its key's create revision.
//!
//! | operation | etcd calls |
//! |-----------|------------|
//! | campaign, first attempt | `LeaseGrant`, then a `Txn`: if `create_revision(NAME/<lease>) == 0` then `Put(NAME/<lease>, value, lease)`; then `Range(NAME/, first created)`: ours → leader |
//! | campaign, later attempts | `LeaseKeepAlive` of the candidate's lease (its place in the queue is leased), then `Range(NAME/, first created)` |
//! | withdraw | `LeaseRevoke`, which deletes the key and wakes the next candidate's watch |
//! | proclaim | a `Txn`: if `create_revision(NAME/<lease>)` is the term then `Put` the new value on the same lease (a put keeps the create revision, so the term) — as Go's `Election.Proclaim` |
//! | renew (leader) | `LeaseKeepAlive` of the leader's lease and, beside it, `Range(NAME/<lease>)`: still there with the term as its create revision, on that lease |
//! | resign (release) | a `Txn`: if `create_revision(NAME/<lease>)` is the term then `DeleteRange` — as Go's `Election.Resign` — then `LeaseRevoke` |
//! | observe | `Range(NAME/)` of every candidate, then one `Watch` of `NAME/` from the next revision; the leader after each event is the candidate created first |
//!
//! # Values are raw
//! A candidate key's value is the candidate's value exactly as given, as Go's client writes
//! it, so `etcdctl elect --listen` and `Election.Observe` show leasehold's value and nothing
//! else. Nothing in etcd names leasehold's owner token, so a leadership is known by what
//! etcd itself says: the key is named after the candidate's lease, and was created at the
//! term (its create revision), which no other incarnation of the key can share. This backend
//! keeps its own record of its candidates (owner token → key, current lease, term once
//! elected), which is how its renewals, releases and proclaims tell an election's lease
//! from a lock's. The granted ttl that a lock's value carries comes from the keep-alive's
//! answer (the lease's granted ttl) instead. The prefix watch that vouches for locks
//! recognises them by the owner token in their values, so it cannot vouch for a leader's
//! key: every renewal of a leadership reads its key, beside the keep-alive.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use super::lease::lease_seconds;
use super::lock_mode::contender_key;
use super::values::{token, Holder};
use super::{EtcdBackend, EtcdMode};
use crate::backend::{Acquisition, Contention, Leader, LeaderChanges, Lease, OwnerToken};
use crate::error::StoreError;

/// One of this backend's candidates: its key in the queue, the lease the key is on, and the
/// term once it is elected (the key's create revision).
#[derive(Debug, Clone)]
pub(super) struct Entry {
    key: String,
    lease: i64,
    term: Option<i64>,
}

/// A leadership this backend holds: its key, the lease the key is on, and the term.
pub(super) type Leadership = (String, i64, i64);

/// This backend's candidates, waiting or elected, by candidate token: the one record of
/// which of its leases are elections (their keys hold raw values, not lock values). An
/// entry goes when the candidate withdraws, resigns, or its leadership is found lost.
pub(super) type Entries = Mutex<HashMap<OwnerToken, Entry>>;

impl EtcdBackend {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<OwnerToken, Entry>> {
        self.shared
            .candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The leadership `lease` is, if it is one this backend elected.
    pub(super) fn leadership(&self, lease: &Lease) -> Option<Leadership> {
        // Only a `lock`-mode backend campaigns (see `needs_lock_mode`): a `txn`-mode one has no
        // leaderships, and its renewals and releases skip the look-up under the lock.
        if self.mode != EtcdMode::Lock {
            return None;
        }
        let entry = self.entries().get(&lease.owner).cloned()?;
        let term = entry.term?;
        Some((entry.key, entry.lease, term))
    }

    fn needs_lock_mode(&self, op: &'static str) -> Result<(), StoreError> {
        match self.mode {
            EtcdMode::Lock => Ok(()),
            _ => Err(StoreError::Unsupported { store: "etcd", op }),
        }
    }

    pub(super) async fn campaign_in_queue(
        &self,
        name: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: &str,
    ) -> Result<Acquisition, StoreError> {
        self.needs_lock_mode("campaign (elections need EtcdMode::Lock, the Election layout)")?;
        let contenders = self.contenders(name);
        let known = self
            .entries()
            .get(&candidate)
            .filter(|entry| entry.term.is_none())
            .map(|entry| entry.lease);
        // Keep the place in the queue alive, or take one at its end.
        let lease = match known {
            Some(lease) if self.keep_alive(lease).await?.ttl > 0 => lease,
            _ => {
                self.entries().remove(&candidate);
                self.enter(&contenders, candidate, ttl, value).await?
            }
        };
        let ours = contender_key(&contenders, lease);
        let (first, revision) = self.first_contender(&contenders).await?;
        match first {
            Some(kv) if kv.key() == ours.as_bytes() => {
                let term = kv.create_revision();
                if let Some(entry) = self.entries().get_mut(&candidate) {
                    entry.term = Some(term);
                }
                let mut won = Lease::new(name, candidate, token(term)?);
                won.lease_id = Some(lease);
                Ok(Acquisition::Acquired(won))
            }
            Some(kv) => {
                let mut contention = self.contention(Some(&kv), revision).await;
                // The next attempt keeps this candidate's lease alive: come back in time.
                let half = ttl / 2;
                contention.remaining_ttl =
                    Some(contention.remaining_ttl.map_or(half, |r| r.min(half)));
                Ok(Acquisition::Held(contention))
            }
            // Our key went with its lease between the keep-alive and the read: take a new
            // place at once.
            None => {
                self.entries().remove(&candidate);
                Ok(Acquisition::Held(Contention {
                    remaining_ttl: Some(Duration::ZERO),
                    revision: Some(revision),
                }))
            }
        }
    }

    /// Writes the candidate's key, with its raw value, on a new lease: its place at the end
    /// of the queue (what Go's `Election.Campaign` writes).
    async fn enter(
        &self,
        contenders: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: &str,
    ) -> Result<i64, StoreError> {
        let grant = self.grant(ttl).await?;
        let key = contender_key(contenders, grant.id);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(grant.id)),
            )]);
        if !self.txn(txn).await?.succeeded() {
            return Err(StoreError::protocol(format!(
                "the candidate key {key:?} existed before its lease was granted"
            )));
        }
        let lease = grant.keep();
        self.entries().insert(
            candidate,
            Entry {
                key,
                lease,
                term: None,
            },
        );
        Ok(lease)
    }

    pub(super) async fn withdraw_from_queue(
        &self,
        candidate: OwnerToken,
    ) -> Result<(), StoreError> {
        // Only a candidate still waiting: an elected one resigns through its key actor.
        let entry = {
            let mut entries = self.entries();
            match entries.get(&candidate) {
                Some(entry) if entry.term.is_none() => entries.remove(&candidate),
                _ => None,
            }
        };
        match entry {
            // Revoking the lease deletes the key, which wakes the candidates behind it.
            Some(entry) => self.revoke(entry.lease).await,
            None => Ok(()),
        }
    }

    /// Renews a leadership: a keep-alive of the key's lease and, beside it, a read of the
    /// key. Still leader while the key is there, created at the term, on that lease (a key
    /// deleted behind our back leaves the lease alive; only the key says). A renewal asking
    /// for more than the lease was granted (the keep-alive's answer says how much) moves the
    /// key onto a longer lease.
    pub(super) async fn renew_leadership(
        &self,
        lease: &Lease,
        ttl: Duration,
        (key, current, term): Leadership,
    ) -> Result<bool, StoreError> {
        let (kept, read) = futures::join!(self.keep_alive(current), self.get(&key, None));
        let (kept, read) = (kept?, read?);
        let ours = read
            .kvs()
            .first()
            .filter(|kv| kv.create_revision() == term && kv.lease() == current);
        let Some(kv) = ours.filter(|_| kept.ttl > 0) else {
            self.entries().remove(&lease.owner);
            return Ok(false);
        };
        if lease_seconds(ttl) <= kept.ttl {
            return Ok(true);
        }
        // etcd cannot lengthen a lease: put the same value on a longer one, if the key is
        // still ours and still on the old lease. The key keeps its name and create revision,
        // so its place and its term; only its lease changes.
        let grant = self.grant(ttl).await?;
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.as_str(), CompareOp::Equal, term),
                Compare::lease(key.as_str(), CompareOp::Equal, current),
            ])
            .and_then([TxnOp::put(
                key.as_str(),
                kv.value(),
                Some(PutOptions::new().with_lease(grant.id)),
            )]);
        if !self.txn(txn).await?.succeeded() {
            grant.revoke().await;
            self.entries().remove(&lease.owner);
            return Ok(false);
        }
        let moved_to = grant.keep();
        if let Some(entry) = self.entries().get_mut(&lease.owner) {
            entry.lease = moved_to;
        }
        // The key left the old lease, so revoking it deletes nothing; a failure leaves it to
        // run out.
        let _ = self.revoke(current).await;
        Ok(true)
    }

    /// Resigns a leadership: deletes the key only if it is still the one created at the term
    /// (as Go's `Election.Resign`), which elects the next candidate; then revokes its lease.
    pub(super) async fn release_leadership(
        &self,
        lease: &Lease,
        (key, current, term): Leadership,
    ) -> Result<bool, StoreError> {
        self.entries().remove(&lease.owner);
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                term,
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let deleted = self.txn(txn).await?.succeeded();
        // Nothing else is on the lease: revoking it only ends it now instead of at its ttl.
        if let Err(error) = self.revoke(current).await {
            tracing::debug!(%key, %error, "lease revoke after resigning failed; it will run out");
        }
        Ok(deleted)
    }

    pub(super) async fn proclaim_value(
        &self,
        lease: &Lease,
        value: &str,
    ) -> Result<bool, StoreError> {
        self.needs_lock_mode("proclaim (elections need EtcdMode::Lock, the Election layout)")?;
        let Some((key, current, term)) = self.leadership(lease) else {
            return Ok(false);
        };
        // As Go's `Election.Proclaim`: the new value, on the same lease, only if the key is
        // still the one created at the term.
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                term,
            )])
            .and_then([TxnOp::put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(current)),
            )]);
        Ok(self.txn(txn).await?.succeeded())
    }

    pub(super) async fn observe_leader(&self, name: &str) -> Result<LeaderChanges, StoreError> {
        self.needs_lock_mode("observe (elections need EtcdMode::Lock, the Election layout)")?;
        let contenders = self.contenders(name);
        // Every candidate now, then every change after that read, in revision order: the
        // leader after each event is a function of the store's history alone, so observers
        // on every node see the same sequence.
        let mut read = self
            .get(&contenders, Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = read.header().map_or(0, |h| h.revision());
        let mut queue = Queue::default();
        for kv in read.take_kvs() {
            queue.put(&kv);
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let watch = self.open_watch(contenders, options).await?;
        let now = queue.leader()?;
        let changes = futures::stream::unfold(
            (watch, queue, now.clone(), Some(now)),
            |(mut watch, mut queue, told, first)| async move {
                if let Some(first) = first {
                    return Some((vec![first], (watch, queue, told, None)));
                }
                let mut told = told;
                loop {
                    // A broken or cancelled watch ends the stream.
                    let answer = watch.message().await.ok().flatten()?;
                    if answer.canceled() {
                        return None;
                    }
                    let mut changes = Vec::new();
                    for event in answer.events() {
                        let Some(kv) = event.kv() else { continue };
                        match event.event_type() {
                            EventType::Put => queue.put(kv),
                            EventType::Delete => queue.delete(kv.key()),
                        }
                        let leader = queue.leader().ok()?;
                        if leader != told {
                            told = leader.clone();
                            changes.push(leader);
                        }
                    }
                    if !changes.is_empty() {
                        return Some((changes, (watch, queue, told, None)));
                    }
                }
            },
        );
        Ok(changes.flat_map(futures::stream::iter).boxed())
    }
}

/// An election's candidates as an observer rebuilds them from the watch: by create revision.
#[derive(Default)]
struct Queue {
    by_created: BTreeMap<i64, (Vec<u8>, Vec<u8>)>,
}

impl Queue {
    fn put(&mut self, kv: &KeyValue) {
        let entry = (kv.key().to_vec(), kv.value().to_vec());
        self.by_created.insert(kv.create_revision(), entry);
    }

    fn delete(&mut self, key: &[u8]) {
        self.by_created.retain(|_, (k, _)| k != key);
    }

    fn leader(&self) -> Result<Option<Leader>, StoreError> {
        let Some((created, (_, value))) = self.by_created.first_key_value() else {
            return Ok(None);
        };
        Ok(Some(Leader {
            value: value_of(value),
            term: token(*created)?,
        }))
    }
}

/// The value shown for a contender key's value: a candidate's raw value as it is, or the
/// metadata of a lock held on the same name in `lock` mode.
pub(super) fn value_of(raw: &[u8]) -> String {
    match Holder::decode(raw) {
        Some(holder) => holder.metadata.unwrap_or_default().to_owned(),
        None => String::from_utf8_lossy(raw).into_owned(),
    }
}
