//! Noticing a held key taken away (deleted or overwritten by another client) without reading
//! it on every renewal.
//!
//! A lease kept alive says nothing about the key: another client may delete the key or write
//! over it and leave our lease alive. Renewals used to read the key each time to find out. Now
//! each prefix a backend writes under has ONE etcd watch, with previous values, over the whole
//! prefix; the backend registers the owner token of every lock it takes, and the watch marks an
//! owner `Taken` when a key whose previous value carried that owner is deleted, or overwritten
//! with another owner's value. The next renewal of that lease answers "not held".
//!
//! "Lost no later than the next renewal after the change" needs the watch to be caught up when
//! a renewal decides. The keep-alive answer carries the store's revision R; the renewal trusts
//! the watch only once it has shown everything up to R: the revision it was created at, or
//! that of the latest event it delivered (etcd sends one watch's events in revision order).
//! When the watch is behind for longer than [`CATCH_UP`], or broken, or an owner was
//! registered before a gap in the watch, the renewal reads the key as it used to: correctness
//! never depends on the watch being up, only cost.
//!
//! etcd's progress requests would let a watch with no events under its prefix vouch for a
//! later revision, but etcd before 3.4.24 / 3.5.8 may answer one before events it has not
//! sent yet (etcd issue 15220), so they are not used: where other keys of the cluster change
//! while nothing under the prefix does, renewals read their key, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::watch;

use super::call::store_error;
use super::values::Holder;
use crate::backend::OwnerToken;
use crate::error::StoreError;
use crate::task::AbortOnDrop;

/// How long a renewal waits for the watch to catch up with the keep-alive's revision before
/// it reads the key instead: long enough for events in flight (a burst of acquisitions), short
/// against ttl/3.
pub(super) const CATCH_UP: Duration = Duration::from_millis(100);

/// How long the watch task waits before opening a broken watch again.
const REOPEN_AFTER: Duration = Duration::from_millis(200);

/// What the backend knows about one lock it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owned {
    /// Held as far as the watch has seen, on lease `lease` granted for `granted` seconds.
    Held { lease: i64, granted: i64 },
    /// Another client deleted the key or wrote over it.
    Taken,
    /// The watch had a gap since this was registered: the next renewal reads the key.
    Unsure,
}

/// The watched prefix's registry of held owners, shared by the backend and the watch task.
struct Registry {
    owners: Mutex<HashMap<OwnerToken, Owned>>,
    /// The revision up to which the watch has delivered every change under the prefix; 0
    /// while the watch is down.
    seen: watch::Sender<i64>,
}

/// One prefix's watch and registry; dropping it stops the watch.
pub(super) struct HeldKeys {
    registry: Arc<Registry>,
    _task: AbortOnDrop<()>,
}

impl HeldKeys {
    /// Opens the watch over `prefix` and waits for etcd to confirm it: from then on, a lock
    /// registered here sees every later change of its key.
    pub(super) async fn start(client: Client, prefix: String) -> Result<Self, StoreError> {
        let (stream, revision) = open(&client, &prefix).await?;
        let registry = Arc::new(Registry {
            owners: Mutex::new(HashMap::new()),
            seen: watch::channel(revision).0,
        });
        let task = tokio::spawn(run(client, prefix, stream, Arc::clone(&registry)));
        Ok(HeldKeys {
            registry,
            _task: AbortOnDrop(task),
        })
    }

    /// Records a lock about to be written for `owner` on `lease` (granted for `granted`
    /// seconds). Registered before the write, so no change after it is missed.
    pub(super) fn register(
        held: Arc<Self>,
        owner: OwnerToken,
        lease: i64,
        granted: i64,
    ) -> Registration {
        held.owners().insert(owner, Owned::Held { lease, granted });
        Registration {
            held,
            owner,
            armed: true,
        }
    }

    /// What the watch knows of `owner`'s lock, if it was registered.
    pub(super) fn get(&self, owner: OwnerToken) -> Option<Owned> {
        self.owners().get(&owner).copied()
    }

    /// The lock of `owner` was confirmed held by a read, on `lease` granted for `granted`
    /// seconds (only if still registered: a release may have forgotten it meanwhile).
    pub(super) fn confirm(&self, owner: OwnerToken, lease: i64, granted: i64) {
        if let Some(owned) = self.owners().get_mut(&owner) {
            if *owned != Owned::Taken {
                *owned = Owned::Held { lease, granted };
            }
        }
    }

    /// Forgets `owner`: its lock was released, lost, or never taken.
    pub(super) fn forget(&self, owner: OwnerToken) {
        self.owners().remove(&owner);
    }

    /// Waits until the watch has shown every change up to `revision`, for at most
    /// [`CATCH_UP`]. False if it did not (the caller reads the key instead).
    pub(super) async fn caught_up(&self, revision: i64) -> bool {
        let mut seen = self.registry.seen.subscribe();
        if *seen.borrow_and_update() >= revision {
            return true;
        }
        tokio::time::timeout(CATCH_UP, seen.wait_for(|&seen| seen >= revision))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<OwnerToken, Owned>> {
        self.registry
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens the watch over every key under `prefix`, with previous values, and waits for etcd's
/// `created` answer, whose revision is where the watch starts: every change after it comes.
async fn open(client: &Client, prefix: &str) -> Result<(WatchStream, i64), StoreError> {
    let options = WatchOptions::new().with_prefix().with_prev_key();
    let mut stream = client
        .watch_client()
        .watch(prefix, Some(options))
        .await
        .map_err(|e| store_error("watch", e))?;
    match stream.message().await {
        Ok(Some(created)) if created.created() && !created.canceled() => {
            let revision = created.header().map_or(0, |h| h.revision());
            Ok((stream, revision))
        }
        Ok(other) => Err(StoreError::unavailable(format!(
            "etcd did not create the watch on {prefix:?}: {other:?}"
        ))),
        Err(error) => Err(store_error("watch", error)),
    }
}

async fn run(client: Client, prefix: String, mut stream: WatchStream, registry: Arc<Registry>) {
    loop {
        // Until the watch breaks: apply each answer.
        loop {
            match stream.message().await {
                Ok(Some(answer)) if !answer.canceled() => apply(&registry, &answer),
                // Broken, closed, or cancelled by etcd (compaction, lost leader).
                _ => break,
            }
        }
        // A gap: changes may go unseen until the watch is open again. Renewals read the key
        // meanwhile (the watch position says "nothing seen"), and every lock registered before
        // the gap is read once more before the watch is trusted for it again.
        registry.seen.send_replace(0);
        for owned in registry
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values_mut()
        {
            if *owned != Owned::Taken {
                *owned = Owned::Unsure;
            }
        }
        loop {
            tokio::time::sleep(REOPEN_AFTER).await;
            if let Ok((opened, revision)) = open(&client, &prefix).await {
                stream = opened;
                registry.seen.send_replace(revision);
                break;
            }
        }
    }
}

/// Marks the owners whose keys this answer's events took away, then moves the watch position
/// to the last event's revision (not the answer header's: an answer catching up a lagging
/// watch may carry the current revision with only part of the events).
fn apply(registry: &Registry, answer: &WatchResponse) {
    if !answer.events().is_empty() {
        let mut owners = registry.owners.lock().unwrap_or_else(|p| p.into_inner());
        for event in answer.events() {
            let Some(prev) = event.prev_kv() else {
                // etcd could not give the previous value: we cannot tell whose key changed,
                // so every lock is read once more.
                if event.event_type() == EventType::Delete
                    || event.kv().is_some_and(|kv| kv.version() > 1)
                {
                    for owned in owners.values_mut() {
                        if *owned != Owned::Taken {
                            *owned = Owned::Unsure;
                        }
                    }
                }
                continue;
            };
            let Some(was) = Holder::decode(prev.value()).map(|h| h.owner) else {
                continue;
            };
            let now = match event.event_type() {
                EventType::Delete => None,
                EventType::Put => event
                    .kv()
                    .and_then(|kv| Holder::decode(kv.value()))
                    .map(|h| h.owner),
            };
            if now != Some(was) {
                if let Some(owned) = owners.get_mut(&was) {
                    *owned = Owned::Taken;
                }
            }
        }
    }
    let last = answer
        .events()
        .iter()
        .filter_map(|event| event.kv().map(|kv| kv.mod_revision()))
        .max();
    if let Some(last) = last {
        registry.seen.send_if_modified(|seen| {
            let moved = last > *seen;
            *seen = (*seen).max(last);
            moved
        });
    }
}

/// A lock recorded in [`HeldKeys`] before the write that takes it; dropped without
/// [`keep`](Self::keep), the record goes.
pub(super) struct Registration {
    held: Arc<HeldKeys>,
    owner: OwnerToken,
    armed: bool,
}

impl Registration {
    /// The lock was taken: the record stays until release or loss.
    pub(super) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.armed {
            self.held.forget(self.owner);
        }
    }
}
