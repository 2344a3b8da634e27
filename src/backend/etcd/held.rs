//! Noticing a held key taken away (deleted or overwritten by another client) without reading
//! it on every renewal.
//!
//! A lease kept alive says nothing about the key: another client may delete the key or write
//! over it and leave our lease alive. Renewals used to read the key each time to find out. Now
//! each prefix a backend writes under has ONE etcd watch, with previous values, over the whole
//! prefix; the backend registers the owner token of every lock it takes, and the watch marks an
//! owner `Taken` when a key whose previous value carried that owner is deleted, or overwritten
//! with another owner's value. The next renewal of that lease answers "not held"; a lock that
//! follows its session lease (no renewals, see `session.rs`) is told at once instead.
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
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::watch;

use super::call::{store_error, Retry};
use super::session::Pace;
use super::values::Holder;
use crate::backend::{FollowNotice, FollowNotify, OwnerToken};
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
    owners: Mutex<Owners>,
    /// The revision up to which the watch has delivered every change under the prefix; 0
    /// while the watch is down.
    seen: watch::Sender<i64>,
}

/// The owners, and the watch they are vouched for by, under one lock: the watch task marks
/// every owner `Unsure` and the watch down in one step, so an owner recorded `Held` is always
/// one the current watch will show every change of.
struct Owners {
    by_owner: HashMap<OwnerToken, Owned, BuildHasherDefault<TokenHasher>>,
    /// The locks that follow their session lease (see `backend/follow.rs`): told directly
    /// when the watch sees their key taken away, or can no longer vouch for it.
    followers: HashMap<OwnerToken, Follower, BuildHasherDefault<TokenHasher>>,
    /// The revision the current watch was created at (it shows every change after it), or 0
    /// while the watch is down.
    watching_since: i64,
}

impl Owners {
    /// How a lock known held now is recorded: `Held` when the watch is up, `Unsure` (read at
    /// the next renewal) when it is down.
    fn held(&self, lease: i64, granted: i64) -> Owned {
        if self.watching_since == 0 {
            Owned::Unsure
        } else {
            Owned::Held { lease, granted }
        }
    }

    /// The watch broke: until it is open again no owner is vouched for.
    fn watch_down(&mut self) {
        self.watching_since = 0;
        self.all_unsure();
    }

    /// No owner is vouched for until its key is read again: followers renew on their own.
    fn all_unsure(&mut self) {
        for owned in self.by_owner.values_mut() {
            if *owned != Owned::Taken {
                *owned = Owned::Unsure;
            }
        }
        for (_, follower) in self.followers.drain() {
            (follower.notify)(FollowNotice::Unsure);
        }
    }

    /// `owner`'s key was taken away.
    fn taken(&mut self, owner: OwnerToken) {
        if let Some(owned) = self.by_owner.get_mut(&owner) {
            *owned = Owned::Taken;
        }
        if let Some(follower) = self.followers.remove(&owner) {
            (follower.notify)(FollowNotice::Taken);
        }
    }
}

/// A lock that follows its session lease.
struct Follower {
    lease: i64,
    notify: FollowNotify,
    /// Its part in the session keeper's pace, given up when it stops following.
    _pace: Pace,
}

/// One prefix's watch and registry; dropping it stops the watch.
pub(super) struct HeldKeys {
    registry: Arc<Registry>,
    _task: AbortOnDrop<()>,
}

impl HeldKeys {
    /// Opens the watch over `prefix` and waits for etcd to confirm it: from then on, a lock
    /// registered here sees every later change of its key. A watch that cannot be opened now
    /// (the endpoints tried were down) is opened by the watch task later; meanwhile renewals
    /// read their key, so an acquisition never fails for want of the watch.
    pub(super) async fn start(client: Client, prefix: String, tries: usize) -> Self {
        let opened = open(&client, &prefix, tries).await;
        let revision = opened.as_ref().map_or(0, |(_, revision)| *revision);
        let registry = Arc::new(Registry {
            owners: Mutex::new(Owners {
                by_owner: HashMap::default(),
                followers: HashMap::default(),
                watching_since: revision,
            }),
            seen: watch::channel(revision).0,
        });
        let stream = opened.ok().map(|(stream, _)| stream);
        let task = tokio::spawn(run(client, prefix, stream, Arc::clone(&registry)));
        HeldKeys {
            registry,
            _task: AbortOnDrop(task),
        }
    }

    /// Records a lock about to be written for `owner` on `lease` (granted for `granted`
    /// seconds). Registered before the write, so no change after it is missed.
    pub(super) fn register(
        held: Arc<Self>,
        owner: OwnerToken,
        lease: i64,
        granted: i64,
    ) -> Registration {
        {
            let mut owners = held.owners();
            let owned = owners.held(lease, granted);
            owners.by_owner.insert(owner, owned);
        }
        Registration {
            held,
            owner,
            armed: true,
        }
    }

    /// What the watch knows of `owner`'s lock, if it was registered.
    pub(super) fn get(&self, owner: OwnerToken) -> Option<Owned> {
        self.owners().by_owner.get(&owner).copied()
    }

    /// Which watch vouches for changes now: the revision it was created at, 0 while it is down.
    /// Taken before a read of a key, and given back to [`confirm`](Self::confirm) after it.
    pub(super) fn watching_since(&self) -> i64 {
        self.owners().watching_since
    }

    /// The lock of `owner` was confirmed held by a read, on `lease` granted for `granted`
    /// seconds, the read having started while the watch `since` was up (only if still
    /// registered: a release may have forgotten it meanwhile). Recorded `Held` only if that
    /// same watch is still up: it shows every change after the read. Otherwise the change
    /// between the read and a reopened watch could go unseen, and the next renewal reads again.
    pub(super) fn confirm(&self, owner: OwnerToken, lease: i64, granted: i64, since: i64) {
        let mut owners = self.owners();
        let vouched = since != 0 && owners.watching_since == since;
        if let Some(owned) = owners.by_owner.get_mut(&owner) {
            if *owned != Owned::Taken {
                *owned = if vouched {
                    Owned::Held { lease, granted }
                } else {
                    Owned::Unsure
                };
            }
        }
    }

    /// Forgets `owner`: its lock was released, lost, or never taken. A lock still following
    /// its session here was released behind its key actor's back (its own key actor stops
    /// following first): it is told its key was taken.
    pub(super) fn forget(&self, owner: OwnerToken) {
        let mut owners = self.owners();
        owners.by_owner.remove(&owner);
        if let Some(follower) = owners.followers.remove(&owner) {
            (follower.notify)(FollowNotice::Taken);
        }
    }

    /// Lets `owner`'s lock follow its session lease `lease`, if the watch vouches for it: it
    /// is recorded held on that lease with a value saying at least `seconds`. From then on the
    /// watch tells it through `notify` when its key is taken away or the watch cannot vouch
    /// for it any more. False (and `notify` dropped) if the watch cannot vouch for it now.
    pub(super) fn follow(
        &self,
        owner: OwnerToken,
        lease: i64,
        seconds: i64,
        notify: FollowNotify,
        pace: Pace,
    ) -> bool {
        let mut owners = self.owners();
        let vouched = matches!(
            owners.by_owner.get(&owner),
            Some(Owned::Held { lease: on, granted }) if *on == lease && *granted >= seconds
        );
        if vouched {
            let follower = Follower {
                lease,
                notify,
                _pace: pace,
            };
            owners.followers.insert(owner, follower);
        }
        vouched
    }

    /// `owner`'s lock follows its session lease no more (its notice is dropped uncalled).
    pub(super) fn unfollow(&self, owner: OwnerToken) {
        self.owners().followers.remove(&owner);
    }

    /// The session lease `lease` is lost: every lock following it is told `notice`.
    pub(super) fn lose_followers(&self, lease: i64, notice: FollowNotice) {
        let mut owners = self.owners();
        owners.followers.retain(|_, follower| {
            let on = follower.lease == lease;
            if on {
                (follower.notify)(notice);
            }
            !on
        });
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

    fn owners(&self) -> std::sync::MutexGuard<'_, Owners> {
        self.registry
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens the watch over every key under `prefix`, with previous values, and waits for etcd's
/// `created` answer, whose revision is where the watch starts: every change after it comes.
/// A call that failed in transit is tried again, up to `tries` times in all, so that the
/// balancer sends one to a live endpoint.
async fn open(
    client: &Client,
    prefix: &str,
    tries: usize,
) -> Result<(WatchStream, i64), StoreError> {
    let options = WatchOptions::new().with_prefix().with_prev_key();
    let mut left = tries;
    let mut stream = loop {
        match client
            .watch_client()
            .watch(prefix, Some(options.clone()))
            .await
        {
            Ok(stream) => break stream,
            Err(error) if left > 1 && Retry::IfConnectionBroke.allows(&error) => left -= 1,
            Err(error) => return Err(store_error("watch", error)),
        }
    };
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

/// The watch task: applies the watch's answers, and opens the watch again whenever it breaks
/// (`stream` is `None` when it could not be opened at the start).
async fn run(
    client: Client,
    prefix: String,
    mut stream: Option<WatchStream>,
    registry: Arc<Registry>,
) {
    loop {
        // Until the watch breaks: apply each answer.
        while let Some(watching) = stream.as_mut() {
            match watching.message().await {
                Ok(Some(answer)) if !answer.canceled() => apply(&registry, &answer),
                // Broken, closed, or cancelled by etcd (compaction, lost leader).
                _ => stream = None,
            }
        }
        // A gap: changes may go unseen until the watch is open again. Renewals read the key
        // meanwhile (the watch position says "nothing seen"), and every lock registered before
        // or during the gap is read once more before the watch is trusted for it again.
        registry.seen.send_replace(0);
        registry
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .watch_down();
        while stream.is_none() {
            tokio::time::sleep(REOPEN_AFTER).await;
            if let Ok((opened, revision)) = open(&client, &prefix, 1).await {
                stream = Some(opened);
                registry
                    .owners
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .watching_since = revision;
                registry.seen.send_replace(revision);
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
                    owners.all_unsure();
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
                owners.taken(was);
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

/// Hashes an [`OwnerToken`] to its low 64 bits. The tokens are ours, drawn uniformly at random
/// from a secure generator, so those bits spread as well as SipHash would spread them (and no
/// one can choose them to collide), and every renewal's look-up skips hashing 16 bytes.
#[derive(Default)]
struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn write_u128(&mut self, token: u128) {
        self.0 ^= token as u64;
    }

    // Only `write_u128` is used (an `OwnerToken` is one `u128`); anything else is folded in
    // byte by byte, FNV-1a style, to stay a correct hasher.
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
