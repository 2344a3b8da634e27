//! The seam between the actors and the stores: the [`LockBackend`] trait, and one module per
//! store behind it.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::time::Instant;

use crate::error::StoreError;

pub use follow::{FollowNotice, FollowNotify, SharedClock};

#[cfg(feature = "etcd")]
pub mod etcd;
mod follow;
pub mod memory;
#[cfg(feature = "redis")]
pub mod redis;

/// Who owns a lease in the store: 128 random bits, drawn from a cryptographically secure
/// generator for every acquisition, so no other client can guess it and release or renew a
/// lock it does not hold.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerToken(u128);

impl OwnerToken {
    /// A fresh random token.
    pub fn random() -> Self {
        OwnerToken(rand::random())
    }

    /// The token's bits.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    /// Rebuilds a token from its bits (for backends that read it back from a store).
    pub fn from_u128(bits: u128) -> Self {
        OwnerToken(bits)
    }
}

impl fmt::Display for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerToken({self})")
    }
}

/// A lease as the store granted it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The key, as the application named it (without the backend's prefix).
    pub key: String,
    /// The owner token written with the key.
    pub owner: OwnerToken,
    /// Strictly greater than every token the store returned for this key before.
    pub fencing_token: u64,
    /// The store's own lease id, for stores that have one (etcd).
    pub lease_id: Option<i64>,
    /// Set when the lease is a semaphore's permits rather than a lock (see
    /// [`acquire_permits`](LockBackend::acquire_permits)): `renew` and `release` then act on
    /// the permits of the semaphore named `key`.
    pub permits: Option<Permits>,
    /// Set when the lease is a read share or the write hold of a read-write lock (see
    /// [`acquire_rw`](LockBackend::acquire_rw)): `renew` and `release` then act on that side
    /// of the read-write lock named `key`.
    pub rw: Option<RwMode>,
}

impl Lease {
    /// A lease without a store lease id.
    pub fn new(key: impl Into<String>, owner: OwnerToken, fencing_token: u64) -> Self {
        Lease {
            key: key.into(),
            owner,
            fencing_token,
            lease_id: None,
            permits: None,
            rw: None,
        }
    }
}

/// What a semaphore acquisition asks for: `count` of the semaphore's `total` permits, as one
/// lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Permits {
    /// How many permits the semaphore has (its N). Every caller of one semaphore must give
    /// the same N while any of them holds a permit.
    pub total: u32,
    /// How many of them this lease takes (its k), from 1 to `total`.
    pub count: u32,
}

impl Permits {
    /// `count` of `total` permits (unchecked: the [`Semaphore`](crate::Semaphore) handle
    /// checks them before any I/O).
    pub fn new(total: u32, count: u32) -> Self {
        Permits { total, count }
    }
}

/// Which side of a read-write lock a lease holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RwMode {
    /// A read share: many at once, while no writer holds or waits.
    Read,
    /// The write hold: alone, while nothing else is held.
    Write,
}

impl RwMode {
    /// "read" or "write", as stores lay the side out in their keys.
    pub fn as_str(self) -> &'static str {
        match self {
            RwMode::Read => "read",
            RwMode::Write => "write",
        }
    }
}

/// One holder of a semaphore's permits, as `permit_holders` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PermitHolder {
    /// The semaphore's name.
    pub name: String,
    /// The holder's fencing token.
    pub fencing_token: u64,
    /// How many permits it holds, and of how many.
    pub permits: Permits,
    /// How long its lease has left.
    pub remaining_ttl: Duration,
    /// The metadata the holder stored with its permits.
    pub metadata: Option<String>,
}

/// The answer to an acquisition attempt.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Acquisition {
    /// The key was free and is now held by the requesting owner.
    Acquired(Lease),
    /// Someone else holds the key.
    Held(Contention),
}

/// What a failed attempt learned about the current holder, used to wait well.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Contention {
    /// How long the current lease has left, if the store said. The waiter's backstop timer
    /// fires after this (plus jitter) in case the release notice is missed or the lease just
    /// expires.
    pub remaining_ttl: Option<Duration>,
    /// The store's position (revision) at the failed attempt, for stores whose watches resume
    /// from a revision.
    pub revision: Option<i64>,
}

impl Contention {
    /// A contention with a known remaining ttl.
    pub fn with_remaining_ttl(remaining_ttl: Option<Duration>) -> Self {
        Contention {
            remaining_ttl,
            revision: None,
        }
    }
}

/// What `inspect` shows about a held key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockInfo {
    /// The key.
    pub key: String,
    /// The current holder's fencing token.
    pub fencing_token: u64,
    /// How long the current lease has left.
    pub remaining_ttl: Duration,
    /// The metadata the holder stored with the lock.
    pub metadata: Option<String>,
}

/// Something that happened to a key, as the store saw it (for monitoring tools such as
/// `leasehold watch`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreEvent {
    /// The key, without the backend's prefix.
    pub key: String,
    /// What happened.
    pub kind: StoreEventKind,
}

/// What happened to a key, in a [`StoreEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEventKind {
    /// Someone acquired the key.
    Acquired {
        /// The new holder's fencing token.
        fencing_token: u64,
    },
    /// The holder released the key (stores that see expiry report it here too).
    Released,
}

/// A stream of [`StoreEvent`]s; it ends if the store's watch breaks.
pub type StoreEvents = BoxStream<'static, StoreEvent>;

/// A stream that yields once each time the watched key may have been released. It ends if the
/// subscription breaks; dropping it unsubscribes.
pub type ReleaseNotices = BoxStream<'static, ()>;

/// A store that can hold leases. One value serves one backend service (one Redis deployment,
/// one etcd cluster, one in-process table); it is shared by the backend actor and its key
/// actors, so every method takes `&self`.
///
/// Every implementation must pass the conformance suite in [`crate::testing`].
#[async_trait]
pub trait LockBackend: Send + Sync + 'static {
    /// A short name for the kind of store ("memory", "redis", "etcd"), for logs.
    fn kind(&self) -> &'static str;

    /// Atomically takes `key` for `owner` for `ttl` if nobody holds it. On success the lease's
    /// fencing token is strictly greater than every token ever returned for `key`.
    async fn acquire(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError>;

    /// Extends the lease to `ttl` from now if `lease.owner` still holds it. `Ok(false)` means it
    /// does not (it expired and may have been taken): not an error, a lost lease.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError>;

    /// As [`renew`](Self::renew), and says from when the renewed ttl runs: `Some(from)` when
    /// the lease is still held, `None` when it is not. `asked_at` is when the caller asked
    /// (before any I/O). The default renews and answers `asked_at`, which is right for a store
    /// that extends the lease from when it got the request. A store that renews many leases
    /// at once (one shared lease kept alive for all) answers when that shared renewal was
    /// sent, which may be before `asked_at`: the holder's deadline is counted from it.
    async fn renew_from(
        &self,
        lease: &Lease,
        ttl: Duration,
        asked_at: Instant,
    ) -> Result<Option<Instant>, StoreError> {
        Ok(self.renew(lease, ttl).await?.then_some(asked_at))
    }

    /// The longest ttl this store can give a lease, if it has a bound of its own below
    /// [`MAX_TTL`](crate::MAX_TTL) (an etcd backend on a session lease: the session's ttl).
    /// Longer ttls are refused before any I/O.
    fn max_ttl(&self) -> Option<Duration> {
        None
    }

    /// True when leases of this store can follow a shared lease (see [`follow`](Self::follow)).
    /// Asked once per acquisition with auto-renew, before anything is built for `follow`.
    fn can_follow(&self) -> bool {
        false
    }

    /// Lets `lease` (just taken, auto-renewed with `ttl`) follow the shared lease it is on
    /// instead of being renewed on its own: the answer is the clock its deadline counts from.
    /// The store must keep that shared lease alive often enough for such a lease, and call
    /// `notify` at most once, when the lease stops following: its key taken away, the shared
    /// lease gone, or not kept alive within `lose_after` of the clock (the holder must hear
    /// of the loss by then), or the store unable to vouch for the key. `None` (the default):
    /// the lease is renewed on its own, as usual.
    fn follow(
        &self,
        lease: &Lease,
        ttl: Duration,
        lose_after: Duration,
        notify: FollowNotify,
    ) -> Option<SharedClock> {
        let _ = (lease, ttl, lose_after, notify);
        None
    }

    /// `lease` stops following (released, lost, or renewed on its own from now on); its
    /// `notify` is dropped uncalled.
    fn unfollow(&self, lease: &Lease) {
        let _ = lease;
    }

    /// True when a key stays in the store past its lease's ttl for as long as this client
    /// lives (an etcd backend on a session lease: the session keeps every key on it alive).
    /// A lease lost by expiry is then deleted with the whole operation budget: the store
    /// would not free it by itself.
    fn keys_outlive_ttl(&self) -> bool {
        false
    }

    /// Deletes the key if `lease.owner` still holds it (compare-and-delete) and wakes the
    /// key's waiters. `Ok(false)` means the lease was not held any more.
    async fn release(&self, lease: &Lease) -> Result<bool, StoreError>;

    /// The current holder of `key`, if any.
    async fn inspect(&self, key: &str) -> Result<Option<LockInfo>, StoreError>;

    /// Subscribes to release notices for `key`. The backend actor keeps at most one such
    /// subscription per contended key and shares it among the key's local waiters.
    async fn subscribe(&self, key: &str, seen: &Contention) -> Result<ReleaseNotices, StoreError>;

    /// Answers if the store can be reached. A restarted backend actor probes with this before
    /// it takes requests again. The default reads one key.
    async fn ping(&self) -> Result<(), StoreError> {
        self.inspect("leasehold-probe").await.map(drop)
    }

    /// Every key that starts with `prefix` and is held now, sorted by key, for monitoring
    /// (`leasehold status --prefix`). Not a snapshot: each key is read as of its own moment.
    /// Stores that cannot list say [`StoreError::Unsupported`].
    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>, StoreError> {
        let _ = prefix;
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "list",
        })
    }

    /// Acquisitions and releases of every key that starts with `prefix`, from now on, for
    /// monitoring. Stores that cannot watch say [`StoreError::Unsupported`].
    async fn watch_prefix(&self, prefix: &str) -> Result<StoreEvents, StoreError> {
        let _ = prefix;
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "watch_prefix",
        })
    }

    // --- Leader election (see `crate::election`). An election on `name` is a lease on the
    // key `name`: the leader holds it, its fencing token is the term, and its metadata is the
    // leader's value, so `renew`, `release` and `inspect` serve elections unchanged.

    /// One attempt of `candidate` to become leader of `name`: takes the lease as
    /// [`acquire`](Self::acquire) does (with `value` as its metadata) if nobody leads and
    /// `candidate` is first in the store's queue of candidates; otherwise puts `candidate` in
    /// that queue (or keeps its place there) and answers `Held`. The same `candidate` token
    /// is used for every attempt of one campaign, so its place is kept between attempts.
    ///
    /// A queue entry is itself leased (for `ttl`): a candidate that stops trying delays the
    /// others no longer than that. A `Held` answer's `remaining_ttl` is at most half the
    /// entry's ttl, so the waiting candidate's next attempt refreshes its entry in time.
    ///
    /// The default has no queue: it is [`acquire`](Self::acquire), so candidates on different
    /// nodes are served in the order their attempts land.
    async fn campaign(
        &self,
        name: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: &str,
    ) -> Result<Acquisition, StoreError> {
        self.acquire(name, candidate, ttl, Some(value)).await
    }

    /// Takes `candidate` out of the queue of `name` (it stopped waiting), and sends the
    /// release notice if that lets the next candidate in. The default has no queue.
    async fn withdraw(&self, name: &str, candidate: OwnerToken) -> Result<(), StoreError> {
        let _ = (name, candidate);
        Ok(())
    }

    // --- Fair waiting (see `LockOptions::with_fair`). A fair lock on `key` is the lock on
    // `key` (`renew`, `release` and `inspect` serve it unchanged), taken through the same
    // queue of leased entries as an election's campaign: waiters on every node are let in
    // in the order they first reached the queue.

    /// Whether [`acquire_fair`](Self::acquire_fair) works on this store (checked before any
    /// I/O, so a fair request on a store without a queue is refused at once).
    fn supports_fair(&self) -> bool {
        false
    }

    /// One attempt of a fair waiter `owner` to take `key`: as [`campaign`](Self::campaign),
    /// with the lock's optional metadata instead of a candidate's value, and without telling
    /// an election's observers. The same `owner` is used for every attempt of one waiter;
    /// [`withdraw`](Self::withdraw) takes it out of the queue when it stops waiting.
    async fn acquire_fair(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let _ = (key, owner, ttl, metadata);
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "fair waiting",
        })
    }

    /// Replaces the leader's value if `lease.owner` still leads (`Ok(false)` if not), in the
    /// same term, and tells the observers.
    async fn proclaim(&self, lease: &Lease, value: &str) -> Result<bool, StoreError> {
        let _ = (lease, value);
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "proclaim",
        })
    }

    /// The leader of `name` now (or `None`), then every change, in the store's order: a new
    /// leader, a proclaimed value, no leader. Consecutive items differ. It ends if the
    /// store's notices break.
    async fn observe(&self, name: &str) -> Result<LeaderChanges, StoreError> {
        let _ = name;
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "observe",
        })
    }

    // --- Semaphores (see `crate::semaphore`). A semaphore of N permits on `name` is a set of
    // leases, one per acquisition of k permits, none of them the lock on the key `name`. A
    // permit lease carries `Lease::permits`, and `renew` and `release` act on it as on a
    // lock's lease: the store's semaphore, not its lock, is renewed or released.

    /// One attempt to take `permits.count` of the `permits.total` permits of the semaphore
    /// `name` for `owner`, as one lease for `ttl`: atomic, granted only if the live leases hold
    /// at most `total - count` permits. The lease's fencing token is strictly greater than
    /// every token returned for this semaphore before, and its `permits` is set.
    ///
    /// A lease that is not renewed frees its permits at its ttl. Leases that ask with another
    /// `total` than the live ones get [`StoreError::PermitsMismatch`]: a semaphore's N is the
    /// one its live leases were granted with, and a new one is taken only once none is left.
    async fn acquire_permits(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let _ = (name, owner, ttl, permits, metadata);
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "semaphores",
        })
    }

    /// Whether [`acquire_permits_fair`](Self::acquire_permits_fair) works on this store
    /// (checked before any I/O, as [`supports_fair`](Self::supports_fair) is for locks).
    fn supports_fair_permits(&self) -> bool {
        false
    }

    /// One attempt of a fair waiter `owner` for `permits.count` of the semaphore `name`'s
    /// permits: taken only if that many are free and `owner` is first among the live entries
    /// of the semaphore's queue of waiters (or the queue is empty); else `owner` keeps (or
    /// takes) a place in that queue, leased for `ttl` from this attempt, and the answer's wait
    /// is at most half of `ttl`, so the next attempt renews the place in time. The same
    /// `owner` is used for every attempt of one waiter; [`withdraw_permits`](Self::withdraw_permits)
    /// takes it out of the queue when it stops waiting. An unfair
    /// [`acquire_permits`](Self::acquire_permits) does not look at the queue.
    async fn acquire_permits_fair(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let _ = (name, owner, ttl, permits, metadata);
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "fair waiting for semaphores",
        })
    }

    /// Takes the fair waiter `owner` out of the semaphore `name`'s queue (it stopped
    /// waiting), and sends the permits' release notice if it was first (the next may go in).
    /// The default has no queue.
    async fn withdraw_permits(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        let _ = (name, owner);
        Ok(())
    }

    /// Subscribes to notices that permits of the semaphore `name` may have been freed (a
    /// release; an expiry too, on stores that see it), as [`subscribe`](Self::subscribe)
    /// does for a lock.
    async fn subscribe_permits(
        &self,
        name: &str,
        seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        let _ = (name, seen);
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "semaphores",
        })
    }

    /// The live holders of the semaphore `name`'s permits, oldest first.
    async fn permit_holders(&self, name: &str) -> Result<Vec<PermitHolder>, StoreError> {
        let _ = name;
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "semaphores",
        })
    }

    // --- Read-write locks (see `crate::rwlock`). A read-write lock on `name` is a set of
    // leases, read shares and at most one write hold, none of them the lock on the key `name`
    // nor a semaphore's permit. A lease of it carries `Lease::rw`, and `renew` and `release`
    // act on it as on a lock's lease. Beside the leases, the store keeps the intents of
    // waiting writers, each leased too: a writer that stops asking blocks nobody past its
    // intent's ttl.

    /// One attempt to take the read-write lock `name` for `owner`, as one lease for `ttl`,
    /// atomic. A read share is granted while no writer holds it and no writer's intent is
    /// live; the write hold while nothing at all is held (the writer's own intent goes with
    /// the grant). Every grant's fencing token is strictly greater than every token returned
    /// for this read-write lock before, so a writer's is greater than every earlier reader's
    /// and writer's. The lease's `rw` is set.
    ///
    /// A refused writer with `intent` records (or refreshes) its intent for `ttl`, so new
    /// readers wait from now on, on every node; its `Held` answer's `remaining_ttl` is at
    /// most half that ttl, so the waiting writer's next attempt refreshes the intent in time.
    /// The same `owner` is used for every attempt of one waiting writer. A writer that tries
    /// once asks without `intent`; readers ignore it.
    async fn acquire_rw(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: RwMode,
        intent: bool,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let _ = (name, owner, ttl, mode, intent, metadata);
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "read-write locks",
        })
    }

    /// Takes the intent of the writer `owner` (which stopped waiting) off the read-write lock
    /// `name`, and wakes the waiters if that lets readers in.
    async fn withdraw_writer(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        let _ = (name, owner);
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "read-write locks",
        })
    }

    /// Whether [`acquire_rw_fair`](Self::acquire_rw_fair) works on this store (checked before
    /// any I/O, as [`supports_fair`](Self::supports_fair) is for locks).
    fn supports_fair_rw(&self) -> bool {
        false
    }

    /// One attempt of a fair waiter `owner` (a reader or a writer, as `mode` says) at the
    /// read-write lock `name`. The lock keeps one queue of fair waiters, in the order they
    /// first asked, each place leased for `ttl` from its owner's latest attempt and marked
    /// with its mode:
    ///
    /// - a fair reader is admitted while no writer holds, no unfair writer's intent is live,
    ///   and no fair writer's place is ahead of its own (readers ahead of it do not keep it
    ///   out: consecutive readers at the head go in together);
    /// - a fair writer is admitted while nothing is held and its place is the first live one
    ///   (or the queue is empty). It ignores unfair writers' intents, as they ignore the
    ///   queue.
    ///
    /// A fair writer's place keeps new unfair readers out exactly as an unfair writer's
    /// intent does, so fair writers are not starved either. Admission takes the place out in
    /// the same atomic step as the grant, and the grant's fencing token is as
    /// [`acquire_rw`](Self::acquire_rw)'s. A refused waiter keeps (or takes) its place and
    /// its `Held` answer's `remaining_ttl` is at most half of `ttl`, so the next attempt
    /// renews the place in time. The same `owner` is used for every attempt of one waiter;
    /// [`withdraw_rw_waiter`](Self::withdraw_rw_waiter) takes it out of the queue when it
    /// stops waiting. An unfair [`acquire_rw`](Self::acquire_rw) writer does not look at the
    /// queue (an unfair reader does, only for fair writers' places).
    async fn acquire_rw_fair(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: RwMode,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let _ = (name, owner, ttl, mode, metadata);
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "fair waiting for read-write locks",
        })
    }

    /// Takes the fair waiter `owner` out of the read-write lock `name`'s queue (it stopped
    /// waiting), and wakes the waiters if that may let someone in (it was first, or a
    /// writer). The default has no queue.
    async fn withdraw_rw_waiter(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        let _ = (name, owner);
        Ok(())
    }

    /// Subscribes to notices that the read-write lock `name` may let someone in (a release,
    /// a withdrawn intent; an expiry too, on stores that see it), as
    /// [`subscribe`](Self::subscribe) does for a lock.
    async fn subscribe_rw(
        &self,
        name: &str,
        seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        let _ = (name, seen);
        Err(StoreError::Unsupported {
            store: self.kind(),
            op: "read-write locks",
        })
    }
}

/// The leader of an election, as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Leader {
    /// The value the leader campaigned with, or proclaimed since.
    pub value: String,
    /// The leader's term: its lease's fencing token, strictly greater than every earlier
    /// leader's.
    pub term: u64,
}

impl Leader {
    /// A leader with `value` in `term`.
    pub fn new(value: impl Into<String>, term: u64) -> Self {
        Leader {
            value: value.into(),
            term,
        }
    }
}

/// A stream of leaders of one election: `Some` while one leads, `None` while nobody does.
pub type LeaderChanges = BoxStream<'static, Option<Leader>>;
