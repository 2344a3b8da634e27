//! The in-process store: the same contract as the networked stores (ttl expiry, fencing,
//! compare-and-delete, release notices), with zero set-up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backend::{
    Acquisition, Contention, Lease, LockBackend, LockInfo, OwnerToken, ReleaseNotices, StoreEvent,
    StoreEventKind, StoreEvents,
};
use crate::error::StoreError;

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
        let now = Instant::now();
        let mut table = self.table();
        let slot = table.slot(key);
        if let Some(holder) = slot.live_holder(now) {
            return Ok(Acquisition::Held(Contention::with_remaining_ttl(Some(
                holder.expires_at - now,
            ))));
        }
        slot.fence += 1;
        slot.holder = Some(Holder {
            owner,
            expires_at: now + ttl,
            metadata: metadata.map(str::to_owned),
        });
        let fencing_token = slot.fence;
        table.publish(key, StoreEventKind::Acquired { fencing_token });
        Ok(Acquisition::Acquired(Lease::new(key, owner, fencing_token)))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
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

    async fn watch_prefix(&self, prefix: &str) -> Result<StoreEvents, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.table().watchers.push((prefix.to_owned(), tx));
        Ok(receiver_stream(rx))
    }
}

/// The receiver as a stream; dropping the stream closes the channel, which is how the table
/// learns a subscriber left.
fn receiver_stream<T: Send + 'static>(rx: mpsc::UnboundedReceiver<T>) -> BoxStream<'static, T> {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}
