//! The in-process store: the same contract as the networked stores (ttl expiry, fencing,
//! compare-and-delete, release notices), with zero set-up.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::{
    Acquisition, Contention, Leader, LeaderChanges, Lease, LockBackend, LockInfo, OwnerToken,
    PermitHolder, Permits, ReleaseNotices, RwMode, StoreEvent, StoreEventKind, StoreEvents,
};
use crate::error::StoreError;

mod rwlock;
mod semaphore;

/// An in-process lock table.
///
/// Clones share one table, so two [`LockManager`](crate::LockManager)s given clones of one
/// `MemoryBackend` contend for the same keys, like two nodes sharing one Redis. Time is
/// tokio's clock, so tests can pause and advance it.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    table: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    slots: HashMap<String, Slot>,
    /// Semaphores, by name (apart from the locks: a semaphore and a lock of one name are two
    /// things).
    semaphores: HashMap<String, semaphore::SemaphoreRow>,
    /// Read-write locks, by name (apart from the locks and the semaphores).
    rwlocks: HashMap<String, rwlock::RwRow>,
    /// `watch_prefix` subscribers; a closed one is pruned at the next event.
    watchers: Vec<(String, mpsc::UnboundedSender<StoreEvent>)>,
}

impl Table {
    fn slot(&mut self, key: &str) -> &mut Slot {
        if !self.slots.contains_key(key) {
            self.slots.insert(key.to_owned(), Slot::default());
        }
        self.slots.get_mut(key).expect("inserted above")
    }

    fn publish(&mut self, key: &str, kind: StoreEventKind) {
        if self.watchers.is_empty() {
            return;
        }
        self.watchers.retain(|(prefix, tx)| {
            !key.starts_with(prefix.as_str())
                || tx
                    .send(StoreEvent {
                        key: key.to_owned(),
                        kind: kind.clone(),
                    })
                    .is_ok()
        });
    }
}

/// One key's row. The row outlives its holder: the fence counter must never go back.
#[derive(Default)]
struct Slot {
    fence: u64,
    holder: Option<Holder>,
    /// One sender per subscription; a closed one (its stream was dropped) is pruned.
    subscribers: Vec<mpsc::UnboundedSender<()>>,
    /// An election's candidates waiting for their turn, in the order they first campaigned.
    candidates: VecDeque<Candidate>,
    /// An election's observers, each told every change of `told`.
    observers: Vec<mpsc::UnboundedSender<Option<Leader>>>,
    /// The leader the observers were last told of: each change is told once, to all of them
    /// together, so every observer sees the same sequence.
    told: Option<Leader>,
}

/// A candidate's entry in an election's queue; leased, like the leadership itself.
struct Candidate {
    token: OwnerToken,
    expires_at: Instant,
}

struct Holder {
    owner: OwnerToken,
    expires_at: Instant,
    metadata: Option<String>,
}

impl Slot {
    /// The live holder, if any: an expired lease counts as absent, as in a store with ttls.
    fn live_holder(&self, now: Instant) -> Option<&Holder> {
        self.holder.as_ref().filter(|h| h.expires_at > now)
    }

    fn held_by(&mut self, owner: OwnerToken, now: Instant) -> Option<&mut Holder> {
        self.holder
            .as_mut()
            .filter(|h| h.owner == owner && h.expires_at > now)
    }

    fn notify(&mut self) {
        self.subscribers.retain(|tx| tx.send(()).is_ok());
    }

    /// The leader, if the key is held as an election (or a lock: its metadata is the value).
    fn leader(&self, now: Instant) -> Option<Leader> {
        self.live_holder(now).map(|holder| Leader {
            value: holder.metadata.clone().unwrap_or_default(),
            term: self.fence,
        })
    }

    /// Tells the observers if the leader changed since they were last told.
    fn tell_observers(&mut self, now: Instant) {
        let leader = self.leader(now);
        if leader == self.told {
            return;
        }
        self.observers.retain(|tx| tx.send(leader.clone()).is_ok());
        self.told = leader;
    }
}

impl MemoryBackend {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while the lock was held cannot leave a row half-written (every update is a
        // single assignment), so a poisoned table is still consistent.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn acquire(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        Ok(take(
            &mut self.table(),
            key,
            owner,
            ttl,
            metadata,
            Instant::now(),
        ))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        if lease.permits.is_some() {
            return Ok(self.renew_permits(lease, ttl));
        }
        if lease.rw.is_some() {
            return Ok(self.renew_rw(lease, ttl));
        }
        let now = Instant::now();
        let mut table = self.table();
        let holder = table
            .slots
            .get_mut(&lease.key)
            .and_then(|slot| slot.held_by(lease.owner, now));
        Ok(match holder {
            Some(holder) => {
                holder.expires_at = now + ttl;
                true
            }
            None => false,
        })
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        if lease.permits.is_some() {
            return Ok(self.release_permits(lease));
        }
        if lease.rw.is_some() {
            return Ok(self.release_rw(lease));
        }
        let now = Instant::now();
        let mut table = self.table();
        let Some(slot) = table.slots.get_mut(&lease.key) else {
            return Ok(false);
        };
        if slot.held_by(lease.owner, now).is_none() {
            return Ok(false);
        }
        slot.holder = None;
        slot.notify();
        slot.tell_observers(now);
        table.publish(&lease.key, StoreEventKind::Released);
        Ok(true)
    }

    async fn inspect(&self, key: &str) -> Result<Option<LockInfo>, StoreError> {
        let now = Instant::now();
        let table = self.table();
        Ok(table.slots.get(key).and_then(|slot| {
            slot.live_holder(now).map(|holder| LockInfo {
                key: key.to_owned(),
                fencing_token: slot.fence,
                remaining_ttl: holder.expires_at - now,
                metadata: holder.metadata.clone(),
            })
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>, StoreError> {
        let now = Instant::now();
        let table = self.table();
        let mut held: Vec<LockInfo> = table
            .slots
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .filter_map(|(key, slot)| {
                slot.live_holder(now).map(|holder| LockInfo {
                    key: key.clone(),
                    fencing_token: slot.fence,
                    remaining_ttl: holder.expires_at - now,
                    metadata: holder.metadata.clone(),
                })
            })
            .collect();
        held.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(held)
    }

    async fn subscribe(&self, key: &str, _seen: &Contention) -> Result<ReleaseNotices, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut table = self.table();
        let slot = table.slot(key);
        slot.subscribers.retain(|tx| !tx.is_closed());
        slot.subscribers.push(tx);
        Ok(receiver_stream(rx))
    }

    async fn acquire_permits(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.take_permits(name, owner, ttl, permits, metadata, false)
    }

    fn supports_fair_permits(&self) -> bool {
        true
    }

    async fn acquire_permits_fair(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.take_permits(name, owner, ttl, permits, metadata, true)
    }

    async fn withdraw_permits(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_permit_waiter(name, owner);
        Ok(())
    }

    async fn subscribe_permits(
        &self,
        name: &str,
        _seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        Ok(self.subscribe_to_permits(name))
    }

    async fn permit_holders(&self, name: &str) -> Result<Vec<PermitHolder>, StoreError> {
        Ok(self.holders_of(name))
    }

    async fn acquire_rw(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: RwMode,
        intent: bool,
        _metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        Ok(self.take_rw(name, owner, ttl, mode, intent, false))
    }

    fn supports_fair_rw(&self) -> bool {
        true
    }

    async fn acquire_rw_fair(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: RwMode,
        _metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        Ok(self.take_rw(name, owner, ttl, mode, false, true))
    }

    async fn withdraw_rw_waiter(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_rw_place(name, owner);
        Ok(())
    }

    async fn withdraw_writer(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_rw_intent(name, owner);
        Ok(())
    }

    async fn subscribe_rw(
        &self,
        name: &str,
        _seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        Ok(self.subscribe_to_rw(name))
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<StoreEvents, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.table().watchers.push((prefix.to_owned(), tx));
        Ok(receiver_stream(rx))
    }

    async fn campaign(
        &self,
        name: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: &str,
    ) -> Result<Acquisition, StoreError> {
        Ok(self.queue_attempt(name, candidate, ttl, Some(value)))
    }

    fn supports_fair(&self) -> bool {
        true
    }

    async fn acquire_fair(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        // The same queue as an election's candidates: a fair lock and an election of one
        // name are one lease, and their waiters one line.
        Ok(self.queue_attempt(key, owner, ttl, metadata))
    }

    async fn withdraw(&self, name: &str, candidate: OwnerToken) -> Result<(), StoreError> {
        let mut table = self.table();
        if let Some(slot) = table.slots.get_mut(name) {
            let was_first = slot
                .candidates
                .front()
                .is_some_and(|c| c.token == candidate);
            slot.candidates.retain(|c| c.token != candidate);
            if was_first {
                slot.notify();
            }
        }
        Ok(())
    }

    async fn proclaim(&self, lease: &Lease, value: &str) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut table = self.table();
        let Some(slot) = table.slots.get_mut(&lease.key) else {
            return Ok(false);
        };
        let Some(holder) = slot.held_by(lease.owner, now) else {
            return Ok(false);
        };
        holder.metadata = Some(value.to_owned());
        slot.tell_observers(now);
        Ok(true)
    }

    async fn observe(&self, name: &str) -> Result<LeaderChanges, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let now = Instant::now();
            let mut table = self.table();
            let slot = table.slot(name);
            slot.tell_observers(now);
            slot.observers.retain(|tx| !tx.is_closed());
            // The current leader first, then every change.
            let _ = tx.send(slot.told.clone());
            slot.observers.push(tx);
        }
        // Nothing in an in-process table notices a lease running out; each observer's stream
        // looks when the current leader's lease would end, and whoever looks first tells all.
        let table = self.table.clone();
        let name = name.to_owned();
        Ok(futures::stream::unfold(rx, move |mut rx| {
            let (table, name) = (table.clone(), name.clone());
            async move {
                loop {
                    let expires_at = {
                        let table = table.lock().unwrap_or_else(|p| p.into_inner());
                        let now = Instant::now();
                        table
                            .slots
                            .get(&name)
                            .and_then(|slot| slot.live_holder(now).map(|h| h.expires_at))
                    };
                    tokio::select! {
                        item = rx.recv() => return item.map(|item| (item, rx)),
                        () = tokio::time::sleep_until(expires_at.unwrap_or_else(Instant::now)),
                            if expires_at.is_some() =>
                        {
                            let mut table = table.lock().unwrap_or_else(|p| p.into_inner());
                            table.slot(&name).tell_observers(Instant::now());
                        }
                    }
                }
            }
        })
        .boxed())
    }
}

impl MemoryBackend {
    /// One attempt of `candidate` (an election's candidate, or a fair lock's waiter) at the
    /// lease on `name`: taken if nobody holds it and `candidate` is first in the name's
    /// queue, else `candidate` keeps (or takes) a place in the queue, leased for `ttl`.
    fn queue_attempt(
        &self,
        name: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: Option<&str>,
    ) -> Acquisition {
        let now = Instant::now();
        let mut table = self.table();
        {
            let slot = table.slot(name);
            slot.candidates.retain(|c| c.expires_at > now);
            // A leader that expired is gone for the observers before anyone follows it.
            slot.tell_observers(now);
            let first = slot.candidates.front().map(|c| c.token);
            if slot.live_holder(now).is_none() && first.is_none_or(|token| token == candidate) {
                slot.candidates.pop_front();
            } else {
                // Keep (or take) a place in the queue, leased for `ttl` from this attempt.
                match slot.candidates.iter_mut().find(|c| c.token == candidate) {
                    Some(entry) => entry.expires_at = now + ttl,
                    None => slot.candidates.push_back(Candidate {
                        token: candidate,
                        expires_at: now + ttl,
                    }),
                }
                // Whoever is ahead (the leader, or the first candidate) may be gone by then;
                // and the next attempt must come before this entry runs out.
                let ahead = match slot.live_holder(now) {
                    Some(holder) => holder.expires_at - now,
                    None => slot
                        .candidates
                        .front()
                        .map_or(Duration::ZERO, |c| c.expires_at - now),
                };
                let contention = Contention::with_remaining_ttl(Some(ahead.min(ttl / 2)));
                return Acquisition::Held(contention);
            }
        }
        // Nobody leads and this candidate is first: take the lease.
        take(&mut table, name, candidate, ttl, value, now)
    }
}

/// Takes `key` for `owner` if nobody holds it: the one write behind `acquire` and `campaign`.
fn take(
    table: &mut Table,
    key: &str,
    owner: OwnerToken,
    ttl: Duration,
    metadata: Option<&str>,
    now: Instant,
) -> Acquisition {
    let slot = table.slot(key);
    if let Some(holder) = slot.live_holder(now) {
        return Acquisition::Held(Contention::with_remaining_ttl(Some(
            holder.expires_at - now,
        )));
    }
    slot.fence += 1;
    slot.holder = Some(Holder {
        owner,
        expires_at: now + ttl,
        metadata: metadata.map(str::to_owned),
    });
    let fencing_token = slot.fence;
    slot.tell_observers(now);
    table.publish(key, StoreEventKind::Acquired { fencing_token });
    Acquisition::Acquired(Lease::new(key, owner, fencing_token))
}

/// The receiver as a stream; dropping the stream closes the channel, which is how the table
/// learns a subscriber left.
fn receiver_stream<T: Send + 'static>(rx: mpsc::UnboundedReceiver<T>) -> BoxStream<'static, T> {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}
