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
//! | proclaim | `Range(NAME/<lease>)`, then a `Txn`: if its mod revision is unchanged then `Put` the new value on the same lease (a put keeps the create revision, so the term) |
//! | observe | `Range(NAME/)` of every candidate, then one `Watch` of `NAME/` from the next revision; the leader after each event is the candidate created first |
//!
//! Values are leasehold's lock values (`OWNER\nGRANTED\nVALUE`, see `values.rs`), so renewal
//! and release work as for locks; a key written by another client shows its raw value.

use std::sync::Mutex;
use std::time::Duration;

use std::collections::BTreeMap;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use super::held::Registration;
use super::lock_mode::contender_key;
use super::values::{token, Holder};
use super::{EtcdBackend, EtcdMode};
use crate::backend::{Acquisition, Contention, Leader, LeaderChanges, Lease, OwnerToken};
use crate::error::StoreError;

/// A waiting candidate's key: on lease `lease`, recorded with the prefix watch from its
/// write on (so a renewal after it is elected can trust the watch).
pub(super) struct Entry {
    lease: i64,
    registration: Registration,
}

/// The candidates of this backend waiting in some election's queue, by candidate token.
pub(super) type Entries = Mutex<std::collections::HashMap<OwnerToken, Entry>>;

impl EtcdBackend {
    fn entries(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<OwnerToken, Entry>> {
        self.shared
            .candidates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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
        let known = self.entries().get(&candidate).map(|entry| entry.lease);
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
                if let Some(entry) = self.entries().remove(&candidate) {
                    entry.registration.keep();
                }
                let mut won = Lease::new(name, candidate, token(kv.create_revision())?);
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

    /// Writes the candidate's key on a new lease: its place at the end of the queue.
    async fn enter(
        &self,
        contenders: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: &str,
    ) -> Result<i64, StoreError> {
        let grant = self.grant(ttl).await?;
        let key = contender_key(contenders, grant.id);
        let registration = self.register(candidate, grant.id, grant.ttl).await;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                Holder::encode(candidate, grant.ttl, Some(value)),
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
                lease,
                registration,
            },
        );
        Ok(lease)
    }

    pub(super) async fn withdraw_from_queue(
        &self,
        candidate: OwnerToken,
    ) -> Result<(), StoreError> {
        let entry = self.entries().remove(&candidate);
        match entry {
            // Revoking the lease deletes the key, which wakes the candidates behind it.
            Some(entry) => self.revoke(entry.lease).await,
            None => Ok(()),
        }
    }

    pub(super) async fn proclaim_value(
        &self,
        lease: &Lease,
        value: &str,
    ) -> Result<bool, StoreError> {
        self.needs_lock_mode("proclaim (elections need EtcdMode::Lock, the Election layout)")?;
        let Some(key) = self.locate(lease).await? else {
            return Ok(false);
        };
        // A renewal may move the key to a longer lease meanwhile: read again and retry.
        for _ in 0..3 {
            let mut read = self.get(&key, None).await?;
            let Some(kv) = read.take_kvs().into_iter().next() else {
                return Ok(false);
            };
            let Some(holder) = Holder::decode(kv.value()).filter(|h| h.owner == lease.owner) else {
                return Ok(false);
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::put(
                    key.as_str(),
                    Holder::encode(lease.owner, holder.granted, Some(value)),
                    Some(PutOptions::new().with_lease(kv.lease())),
                )]);
            if self.txn(txn).await?.succeeded() {
                return Ok(true);
            }
        }
        Err(StoreError::unavailable(format!(
            "the leader key {key:?} kept changing during proclaim"
        )))
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

/// The value shown for a contender key's value.
pub(super) fn value_of(raw: &[u8]) -> String {
    match Holder::decode(raw) {
        Some(holder) => holder.metadata.unwrap_or_default().to_owned(),
        None => String::from_utf8_lossy(raw).into_owned(),
    }
}
