//! The etcd store: leases, transactions and watches, or etcd's own Lock service, through one
//! shared [`etcd_client::Client`].
//!
//! # Two modes, one contract
//! Both modes give each acquisition its own etcd lease, granted for the lock's ttl, and attach
//! the lock's key to it. The key lives exactly as long as the lease: revoking the lease, or
//! letting it run out, deletes the key, and that delete is what wakes waiters.
//!
//! [`EtcdMode::Txn`] (the default) writes the lock key itself:
//!
//! | operation | etcd calls |
//! |-----------|------------|
//! | acquire   | `LeaseGrant(ceil(ttl))`, then ONE `Txn`: if `create_revision(P+K) == 0` then `Put(P+K, value, lease)` else `Range(P+K)`. On success the fencing token is the revision of the put. On contention the lease is revoked, and the holder's lease `TimeToLive` sizes the waiter's backstop. |
//! | renew     | `LeaseKeepAlive`: one request and its answer on the backend's one keep-alive stream, shared by every lease (see `keep_alive.rs`). Whether the key is still ours comes from one `Watch` of the whole prefix (see `held.rs`); `Range(P+K)` only when that watch cannot vouch for it |
//! | release   | `Txn`: if the value carries our owner token then `DeleteRange(P+K)`; then `LeaseRevoke` |
//! | inspect   | `Range(P+K)`, then `LeaseTimeToLive` of the key's lease |
//! | wait      | one `Watch` for deletes, from the revision the failed attempt saw, of `P+K` and, in one range with it, its fair waiters' queue `P+K+"\x1ffair/"` |
//! | acquire, fair | a queue of leased keys beside the lock key, one per waiter, in create-revision order; admitted only first in it (see `queue.rs`) |
//!
//! [`EtcdMode::Lock`] uses etcd's Lock service (`v3lock`), so leasehold locks exclude — and are
//! excluded by — any other client of that service on the same name (`etcdctl lock`, Go's
//! `concurrency.Mutex`). The service keeps one key per contender under `NAME/`, named after
//! the contender's lease (`NAME/<lease id in hex>`), and the contender whose key was created
//! first holds the lock:
//!
//! | operation | etcd calls |
//! |-----------|------------|
//! | acquire   | `Range(NAME/, first created)`: held → answer at once. Free → `LeaseGrant`, `Lock(NAME, lease)`, then a `Txn` that writes our value onto the returned key if it is still on our lease; the fencing token is that key's create revision. |
//! | renew     | as in `txn` mode, on the lock key |
//! | release   | as in `txn` mode, on the lock key (a compare-and-delete rather than `Unlock`, which deletes without checking who owns the key) |
//! | inspect   | `Range(NAME/, first created)`, then `LeaseTimeToLive` |
//! | wait      | one `Watch` of the prefix `NAME/` for deletes |
//!
//! The two modes lay keys out differently: give each mode its own prefix.
//!
//! ## Acquire must answer promptly; etcd's Lock waits
//! etcd's `Lock` call does not return while someone else holds the lock: it waits server-side,
//! in create-revision order. [`LockBackend::acquire`] must instead answer `Held` at once (a
//! `try_lock` must not wait, and a waiting request waits in the backend actor's queue, where its
//! wait budget and its place in line are kept). So `acquire` looks before it asks: a range read
//! of the first key under `NAME/` answers "held" without granting anything. Only a free lock
//! gets a lease and a `Lock` call, which for a free lock answers at once.
//!
//! If another node slipped in between the look and the call, the call is queued behind it.
//! While the call is pending, `acquire` looks again — first after four times the time the
//! lease grant took (one raft write, as is the call's own put; at least 2 ms), then after twice
//! as long each time — and once the first key under `NAME/` is somebody else's it cancels the call
//! (etcd deletes a cancelled caller's key), revokes the lease (which deletes it in any case),
//! and starts over with a look, up to three times, before answering `Held`. A call that is
//! merely slow is never mistaken for contention. A queued call whose turn comes before the
//! next look cannot be cancelled any more (that would delete the lock key it now holds), and
//! etcd notices the deletes a queued call waits for only every 100 ms: such a call may take up
//! to about 100 ms to return, which shows as occasional slow handoffs when locks are held very
//! briefly under contention from several nodes.
//!
//! The price of answering promptly is that etcd's server-side FIFO orders only contenders whose
//! calls overlap; waiters on different nodes are served in the order their retries land, as in
//! `txn` mode, and in FIFO order within each node. A fair waiter
//! ([`LockOptions::with_fair`](crate::LockOptions::with_fair)) instead keeps its contender key
//! between attempts (`election.rs`): the Lock service's queue then orders every node's fair
//! waiters.
//!
//! # Monitoring
//! [`LockBackend::watch_prefix`] is one etcd `Watch` of every lock key under a prefix. In `txn`
//! mode the creation of a lock key is an acquisition and its delete a release (an expiry too).
//! In `lock` mode an acquisition is leasehold writing its value onto its contender key, and a
//! release the delete of such a key; holders that use the Lock service directly, and
//! contenders that gave up, are not reported.
//!
//! # Session lease
//! With [`EtcdBackendBuilder::with_session`], every lock the backend takes is on one shared
//! lease, as with etcd's `concurrency.Session`: one keep-alive every ttl/8 for all of them,
//! no lease grant or revoke per lock, for users with 100,000 locks and more. An auto-renewed
//! lock on the session *follows* it (`backend/follow.rs`): no renewal and no timer of its
//! own, its deadline counted from the session's last keep-alive, the prefix watch telling its
//! key actor at once if its key is taken away (see `session.rs`). Lock ttls are bounded by
//! the session's ttl (a longer one is refused before any I/O), and a lost session loses all
//! its locks at once. `txn` mode
//! only: in `lock` mode the Lock service names a contender by its lease, so two locks of one
//! name on one session would be one contender.
//!
//! # Calls that fail in transit
//! etcd-client spreads calls over all endpoints and keeps sending some to an endpoint that is
//! down. A call that could not connect is tried again (up to four times per endpoint), as is a
//! read, keep-alive, revoke, grant or `Lock` call whose connection broke under it; a write
//! transaction whose connection broke is not, since it may have been applied.

//! # Values
//! The value of a lock key is `OWNER\nGRANTED[\nMETADATA]`: the owner token in 32 hex digits,
//! the ttl in seconds the key's lease was granted with, and the holder's metadata if it gave
//! any. Compare-and-delete and every other "is this still ours?" check compare the value's
//! owner part inside the transaction (see `owner_compares`), so one transaction does it
//! without knowing the rest of the value. An election candidate's key holds the candidate's
//! value as it is, as etcd's Go client writes it; its checks compare the key's create
//! revision instead (see `election.rs`).
//!
//! # Ttls are whole seconds
//! etcd leases have a ttl in whole seconds, and the server raises any ttl below its minimum
//! (1.5 election timeouts, rounded up: 2 s with etcd's default timing). The lease is granted
//! for `ceil(ttl)` seconds, at least 1, and etcd may raise that; the local deadline still
//! uses the ttl that was asked for. That is safe, because the local deadline always comes
//! before the store's expiry: a holder stops trusting its lock before etcd lets anyone else
//! take it. The cost is on crashes: a holder that dies without releasing blocks the key for
//! the lease etcd granted (at least 1-2 s), not for the sub-second ttl it asked for.
//!
//! etcd cannot lengthen a lease. A renewal asking for a longer ttl than the key's lease was
//! granted with moves the key onto a new, longer lease (a `Txn` that re-puts the value with
//! the new lease only if the key is still ours and still on the old lease; then the old lease
//! is revoked). The key's create revision, and so its fencing token, does not change.
//!
//! # Connection
//! Configuration passes through etcd-client's own [`ConnectOptions`] (user and password,
//! timeouts, HTTP/2 keep-alive, and TLS when the application turns on one of etcd-client's
//! TLS features). Connecting is lazy in etcd-client, so [`EtcdBackendBuilder::connect`] reads
//! the prefix once, bounded by the connect timeout: endpoints that cannot be reached give a
//! clear, retryable error naming them instead of a first lock call that hangs.
//!
//! # Layout
//! This file holds the configuration, the connection and the [`LockBackend`] methods; the
//! rest is one file per concern under `etcd/`, the way etcd-client keeps one file per service:
//!
//! | file | what |
//! |------|------|
//! | `txn_mode.rs` | `txn` mode's acquisition |
//! | `lock_mode.rs` | `lock` mode: the Lock service, contender keys, escaped names |
//! | `lease.rs` | lease grant, revoke, time-to-live, moving to a longer lease |
//! | `keep_alive.rs` | the one keep-alive stream all renewals share |
//! | `held.rs` | the prefix watch that notices held keys taken away |
//! | `renew.rs` | renewal: keep-alive plus the watch's word, or a read |
//! | `session.rs` | the session lease shared by every lock, when configured |
//! | `watch.rs` | watches for waiters and for monitoring |
//! | `queue.rs` | fair waiters' queues (`txn`-mode locks, semaphores) |
//! | `election.rs` | elections in etcd's Election layout (`lock` mode) |
//! | `values.rs` | lock key values, owner compares, fencing tokens from revisions |
//! | `call.rs` | one call tried again when it failed in transit; error classification |

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::OnceCell;
use tokio::time::timeout;

use crate::backend::{
    Acquisition, Contention, FollowNotify, Lease, LockBackend, LockInfo, OwnerToken,
    ReleaseNotices, SharedClock, StoreEvent, StoreEvents,
};
use crate::error::{Error, Result, StoreError};

mod call;
mod election;
mod held;
mod keep_alive;
mod lease;
mod lock_mode;
mod queue;
mod renew;
mod rwlock;
mod semaphore;
mod session;
mod txn_mode;
mod values;
mod watch;

pub(crate) use call::describe;
use call::{tries_per_call, Retry};
use held::HeldKeys;
use keep_alive::KeepAlives;
use lease::lease_seconds;
use lock_mode::escape_name;
use session::Session;
use values::{owner_compares, token, Holder};

/// The key prefix used unless [`EtcdBackendBuilder::with_prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "leasehold/";

/// How long [`EtcdBackendBuilder::connect`] waits for etcd to answer, unless
/// [`EtcdBackendBuilder::with_connect_timeout`] says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a backend takes locks in etcd (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EtcdMode {
    /// Lease + transaction on the lock's own key; fencing token = the put's revision.
    #[default]
    Txn,
    /// etcd's Lock service on the acquisition's lease; fencing token = the lock key's create
    /// revision. Interoperates with other clients of the Lock service on the same name.
    Lock,
}

/// Locks in an etcd cluster, as the module documentation describes.
///
/// Clones share one [`etcd_client::Client`] (one set of HTTP/2 connections), so two
/// [`LockManager`](crate::LockManager)s given clones act as two nodes on one cluster.
///
/// ```no_run
/// # async fn run() -> Result<(), leasehold::Error> {
/// use leasehold::{EtcdBackend, EtcdMode, LockManager};
///
/// let etcd = EtcdBackend::builder(["127.0.0.1:2379"])
///     .with_prefix("billing/locks/")
///     .with_mode(EtcdMode::Txn)
///     .connect()
///     .await?;
/// let locks = LockManager::builder()
///     .with_backend("etcd", etcd)
///     .start()
///     .await?;
/// # locks.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EtcdBackend {
    shared: Arc<Shared>,
    prefix: Arc<str>,
    mode: EtcdMode,
    /// The session lease every lock is on, when configured: shared by this value and its
    /// clones (see `session.rs`).
    session: Option<Arc<Session>>,
}

struct Shared {
    client: Client,
    endpoints: Vec<String>,
    /// How often one call is tried when it fails in transit (see `EtcdBackend::call`).
    tries: usize,
    /// The one keep-alive stream every renewal of this backend (and of its clones) shares.
    keep_alives: KeepAlives,
    /// One watch per key prefix in use, noticing held keys taken away (see `held.rs`).
    held: std::sync::Mutex<HashMap<Arc<str>, HeldCell>>,
    /// Election candidates of this backend waiting in a queue (see `election.rs`).
    candidates: election::Entries,
}

/// A prefix's watch, opened once by the first lock taken under it.
type HeldCell = Arc<OnceCell<Arc<HeldKeys>>>;

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.shared.endpoints)
            .field("prefix", &self.prefix)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Settings for connecting an [`EtcdBackend`]: endpoints, etcd-client's [`ConnectOptions`], a
/// key prefix, a mode and a connect timeout.
#[derive(Clone)]
pub struct EtcdBackendBuilder {
    endpoints: Vec<String>,
    options: Option<ConnectOptions>,
    prefix: String,
    mode: EtcdMode,
    connect_timeout: Duration,
    session: Option<Duration>,
}

impl fmt::Debug for EtcdBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the connect options: their Debug shows the password.
        f.debug_struct("EtcdBackendBuilder")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("mode", &self.mode)
            .field("connect_timeout", &self.connect_timeout)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl EtcdBackendBuilder {
    /// etcd-client's own connection settings: user and password, TLS, per-request and connect
    /// timeouts, HTTP/2 keep-alive, leader requirement. Used as given.
    ///
    /// Without this call the backend uses `ConnectOptions::new()` with a connect timeout of
    /// [`DEFAULT_CONNECT_TIMEOUT`], `with_require_leader(true)` (a member cut off from its
    /// cluster fails calls at once instead of letting them wait) and HTTP/2 keep-alive pings
    /// every 10 s with a 5 s timeout (a dead connection is noticed even while idle).
    pub fn with_connect_options(mut self, options: ConnectOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// The prefix of every key the backend writes (default [`DEFAULT_PREFIX`]).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How locks are taken (default [`EtcdMode::Txn`]).
    pub fn with_mode(mut self, mode: EtcdMode) -> Self {
        self.mode = mode;
        self
    }

    /// Puts every lock on one session lease of `ttl`, as etcd's `concurrency.Session` does:
    /// one keep-alive every `ttl / 8` for all locks, instead of a lease (grant, keep-alives,
    /// revoke) per lock. For many locks (100,000 and more) per backend. The session is granted
    /// by the first acquisition, and again after it is lost.
    ///
    /// The trade-off: if the session lease is lost (etcd unreachable for its whole ttl, or the
    /// lease revoked), every lock on it is lost at once, each told `Lost` before its deadline
    /// as usual. A lock's ttl cannot be longer than the session's (refused with
    /// [`Error::InvalidTtl`] before any I/O); a lock's ttl shorter than the session's still
    /// gives that lock its own deadline, and the session is kept alive every sixth of the
    /// shortest such ttl from then on.
    ///
    /// An auto-renewed lock on the session is not renewed on its own: its deadline follows
    /// the session's last keep-alive ([`LockGuard::deadline`](crate::LockGuard::deadline)
    /// moves along), so it emits no `Renewed` events and counts no renewals. A key deleted or
    /// overwritten by another client is reported `Lost` as soon as the prefix watch shows it.
    ///
    /// `ttl` must be a whole number of seconds, at least 2 (etcd counts lease ttls in
    /// seconds); `txn` mode only. [`connect`](Self::connect) refuses anything else with
    /// [`Error::InvalidConfig`]. Clones of the backend share the session: give each
    /// [`LockManager`](crate::LockManager) its own backend value.
    pub fn with_session(mut self, ttl: Duration) -> Self {
        self.session = Some(ttl);
        self
    }

    /// The longest [`connect`](Self::connect) waits for etcd to answer (default
    /// [`DEFAULT_CONNECT_TIMEOUT`]), authentication included.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connects and checks that etcd answers: one linearizable read of the prefix, which also
    /// needs the cluster to have a leader and the user to be allowed to read the prefix.
    ///
    /// Malformed endpoints or options give [`Error::InvalidConfig`]; endpoints that cannot be
    /// reached, or do not answer within the connect timeout, give a retryable [`Error::Store`]
    /// naming them.
    pub async fn connect(self) -> Result<EtcdBackend> {
        let EtcdBackendBuilder {
            endpoints,
            options,
            prefix,
            mode,
            connect_timeout,
            session,
        } = self;
        if endpoints.is_empty() {
            return Err(Error::InvalidConfig("no etcd endpoints given".to_owned()));
        }
        if let Some(ttl) = session {
            session::check_ttl(ttl).map_err(Error::InvalidConfig)?;
            if mode != EtcdMode::Txn {
                return Err(Error::InvalidConfig(format!(
                    "an etcd session lease needs txn mode, not {mode:?} mode (the Lock service \
                     names a contender by its lease)"
                )));
            }
        }
        for endpoint in &endpoints {
            if let Err(why) = check_endpoint(endpoint) {
                return Err(Error::InvalidConfig(format!(
                    "etcd endpoint {endpoint:?} is malformed: {why}"
                )));
            }
        }
        let options = options.unwrap_or_else(|| {
            ConnectOptions::new()
                .with_connect_timeout(DEFAULT_CONNECT_TIMEOUT.min(connect_timeout))
                .with_require_leader(true)
                .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        });
        let unavailable = |source: StoreError| Error::Store {
            backend: "etcd".to_owned(),
            source,
        };
        let tries = tries_per_call(endpoints.len());
        let connecting = async {
            let client = Client::connect(&endpoints, Some(options)).await?;
            // etcd-client dials lazily: this read is what proves an endpoint answers.
            let probe = GetOptions::new().with_prefix().with_count_only();
            let mut left = tries;
            loop {
                match client
                    .kv_client()
                    .get(prefix.as_str(), Some(probe.clone()))
                    .await
                {
                    Ok(_) => break,
                    Err(error) if left > 1 && Retry::IfConnectionBroke.allows(&error) => left -= 1,
                    Err(error) => return Err(error),
                }
            }
            Ok::<_, etcd_client::Error>(client)
        };
        let client = match timeout(connect_timeout, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(
                error @ (etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_)),
            )) => {
                return Err(Error::InvalidConfig(format!(
                    "etcd endpoints {endpoints:?} or options are invalid: {error}"
                )))
            }
            Ok(Err(error)) if refused_credentials(&error) => {
                return Err(Error::InvalidConfig(format!(
                    "etcd at {endpoints:?} refused the user, password or permissions given: {}",
                    describe(&error)
                )))
            }
            Ok(Err(error)) => {
                return Err(unavailable(StoreError::unavailable_because(
                    format!("could not reach etcd at {endpoints:?}"),
                    error,
                )))
            }
            Err(_) => {
                return Err(unavailable(StoreError::unavailable(format!(
                    "etcd at {endpoints:?} did not answer within {connect_timeout:?}"
                ))))
            }
        };
        Ok(EtcdBackend {
            shared: Arc::new(Shared {
                keep_alives: KeepAlives::start(client.clone(), tries),
                held: std::sync::Mutex::default(),
                candidates: election::Entries::default(),
                client,
                endpoints,
                tries,
            }),
            prefix: prefix.into(),
            mode,
            session: session.map(|ttl| Arc::new(Session::new(ttl))),
        })
    }
}

impl EtcdBackend {
    /// Settings for a backend on the cluster at `endpoints` (`host:port`, or `http://…` /
    /// `https://…` URLs).
    pub fn builder<E: AsRef<str>>(endpoints: impl IntoIterator<Item = E>) -> EtcdBackendBuilder {
        EtcdBackendBuilder {
            endpoints: endpoints
                .into_iter()
                .map(|e| e.as_ref().to_owned())
                .collect(),
            options: None,
            prefix: DEFAULT_PREFIX.to_owned(),
            mode: EtcdMode::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            session: None,
        }
    }

    /// Connects to the cluster at `endpoints` with the default settings (see
    /// [`EtcdBackendBuilder`]).
    pub async fn connect<E: AsRef<str>>(endpoints: impl IntoIterator<Item = E>) -> Result<Self> {
        Self::builder(endpoints).connect().await
    }

    /// The same connection with another key prefix (as
    /// [`EtcdBackendBuilder::with_prefix`]).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().into();
        self
    }

    /// The same connection taking locks in another mode (as
    /// [`EtcdBackendBuilder::with_mode`]). A backend on a session lease takes locks in `txn`
    /// mode only: in `lock` mode its acquisitions fail with [`StoreError::Unsupported`].
    pub fn with_mode(mut self, mode: EtcdMode) -> Self {
        self.mode = mode;
        self
    }

    /// With a session lease ([`EtcdBackendBuilder::with_session`]) that is live: how often
    /// its keeper sends a keep-alive now — an eighth of the session's ttl, or a sixth of the
    /// shortest ttl of a lock following it while one does. `None` without a live session.
    pub fn session_keep_alive_every(&self) -> Option<Duration> {
        let session = self.session.as_ref()?;
        Some(session.live()?.pace().0)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The mode locks are taken in.
    pub fn mode(&self) -> EtcdMode {
        self.mode
    }

    /// The endpoints the backend was connected to.
    pub fn endpoints(&self) -> &[String] {
        &self.shared.endpoints
    }

    /// The shared etcd client (a clone: it shares the backend's connections).
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    /// How long the lock held by `kv` may last: its lease's time to live, at most the ttl the
    /// holder was granted (a lock on a session lease says its own ttl there, while the
    /// session's lease may run for longer); `None` when the lease is already gone. A key
    /// without a lease was not written by leasehold (nobody else's key should be here): it
    /// never expires.
    async fn remaining_ttl(&self, kv: &KeyValue) -> Result<Option<Duration>, StoreError> {
        if kv.lease() == 0 {
            return Ok(Some(Duration::MAX));
        }
        let Some(remaining) = self.remaining(kv.lease()).await? else {
            return Ok(None);
        };
        Ok(Some(match Holder::decode(kv.value()) {
            Some(holder) => remaining.min(Duration::from_secs(
                u64::try_from(holder.granted).unwrap_or(0),
            )),
            None => remaining,
        }))
    }

    /// Where the lock on `key` lives in etcd. In `txn` mode: the lock key itself. In `lock`
    /// mode: the Lock service's name for it, under which each contender has a key
    /// `NAME/<lease id in hex>`. In lock names `%` and `/` in `key` are written `%25` and `%2F`,
    /// so that no lock's `NAME/` is a prefix of another's (`a/` would contain `a/b/…`).
    pub fn lock_key(&self, key: &str) -> String {
        match self.mode {
            EtcdMode::Txn => format!("{}{key}", self.prefix),
            EtcdMode::Lock => format!("{}{}", self.prefix, escape_name(key)),
        }
    }
}

#[async_trait]
impl LockBackend for EtcdBackend {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn acquire(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        match self.mode {
            EtcdMode::Txn => self.acquire_txn(key, owner, ttl, metadata).await,
            // The builder refuses this; `with_mode` on a backend built with a session cannot.
            EtcdMode::Lock if self.session.is_some() => Err(StoreError::Unsupported {
                store: "etcd",
                op: "lock mode on a session lease",
            }),
            // Boxed, as every branch off the common path here: a future is as large as its
            // largest branch, and these are allocated per call.
            EtcdMode::Lock => Box::pin(self.acquire_lock(key, owner, ttl, metadata)).await,
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let asked_at = tokio::time::Instant::now();
        Ok(self.renew_from(lease, ttl, asked_at).await?.is_some())
    }

    async fn renew_from(
        &self,
        lease: &Lease,
        ttl: Duration,
        asked_at: tokio::time::Instant,
    ) -> Result<Option<tokio::time::Instant>, StoreError> {
        if lease.permits.is_some() {
            let renewed = Box::pin(self.renew_permits(lease, ttl)).await?;
            return Ok(renewed.then_some(asked_at));
        }
        if let Some(mode) = lease.rw {
            return Ok(Box::pin(self.renew_rw(lease, mode, ttl))
                .await?
                .then_some(asked_at));
        }
        // A leadership's key holds the candidate's raw value, not a lock value: it is
        // renewed by what etcd says of the key itself (see `election.rs`).
        if let Some(leadership) = self.leadership(lease) {
            let held = Box::pin(self.renew_leadership(lease, ttl, leadership)).await?;
            return Ok(held.then_some(asked_at));
        }
        match &self.session {
            Some(session) => Box::pin(self.renew_on_session(session, lease, ttl, asked_at)).await,
            None => Ok(self.renew_lease(lease, ttl).await?.then_some(asked_at)),
        }
    }

    fn max_ttl(&self) -> Option<Duration> {
        self.session.as_ref().map(|session| session.ttl)
    }

    fn keys_outlive_ttl(&self) -> bool {
        self.session.is_some()
    }

    fn can_follow(&self) -> bool {
        self.session.is_some()
    }

    /// A lock on the session lease follows it (see `session.rs`) while the prefix watch
    /// vouches for its key: no renewal of its own, its deadline counted from the session's
    /// last keep-alive. Semaphore permits and read-write holds renew on their own.
    fn follow(
        &self,
        lease: &Lease,
        ttl: Duration,
        lose_after: Duration,
        notify: FollowNotify,
    ) -> Option<SharedClock> {
        let session = self.session.as_ref()?;
        if lease.permits.is_some() || lease.rw.is_some() {
            return None;
        }
        let current = session.get(lease.lease_id?)?;
        let held = self.held_keys_if_started()?;
        let pace = current.followed(ttl, lose_after);
        if !held.follow(lease.owner, current.id, lease_seconds(ttl), notify, pace) {
            return None;
        }
        // Recorded before the session's life is looked at: a session lost meanwhile either
        // told this lock already, or is seen lost here.
        if !current.alive() {
            held.unfollow(lease.owner);
            return None;
        }
        Some(current.clock.clone())
    }

    fn unfollow(&self, lease: &Lease) {
        if let Some(held) = self.held_keys_if_started() {
            held.unfollow(lease.owner);
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        if lease.permits.is_some() {
            return self.release_permits(lease).await;
        }
        if let Some(mode) = lease.rw {
            return self.release_rw(lease, mode).await;
        }
        // Whatever the outcome, the caller stops holding this lease: the watch need not look
        // out for it any more. Forgotten first, so a release that fails or is given up
        // half-way (a key actor bounds it by its budget) leaves no record behind.
        if let Some(held) = self.held_keys_if_started() {
            held.forget(lease.owner);
        }
        if let Some(leadership) = self.leadership(lease) {
            return self.release_leadership(lease, leadership).await;
        }
        let Some(lock_key) = self.locate(lease).await? else {
            return Ok(false);
        };
        // Compare-and-delete: only a key whose value carries our owner token. The delete is
        // what frees the lock: it wakes the watches of waiters (and, in `lock` mode, the Lock
        // service's own waiters).
        let txn = Txn::new()
            .when(owner_compares(lock_key.as_bytes(), lease.owner))
            .and_then([TxnOp::delete(
                lock_key.as_str(),
                Some(DeleteOptions::new().with_prev_key()),
            )]);
        let answer = self.txn(txn).await?;
        if !answer.succeeded() {
            return Ok(false);
        }
        let on_lease = answer
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Delete(delete) => delete.prev_kvs().first().map(KeyValue::lease),
                _ => None,
            })
            .or(lease.lease_id)
            .unwrap_or(0);
        let on_session = match &self.session {
            Some(session) => session.get(on_lease).is_some(),
            None => false,
        };
        if on_lease != 0 && !on_session {
            // The lock is already free; revoking the lease it was on just ends the lease now
            // instead of at its ttl. A failure here costs nothing but that.
            if let Err(error) = self.revoke(on_lease).await {
                tracing::debug!(key = %lease.key, %error, "lease revoke after release failed; it will run out");
            }
        }
        Ok(true)
    }

    async fn inspect(&self, key: &str) -> Result<Option<LockInfo>, StoreError> {
        let holder = match self.mode {
            EtcdMode::Txn => self
                .get(&self.lock_key(key), None)
                .await?
                .take_kvs()
                .into_iter()
                .next(),
            EtcdMode::Lock => self.first_contender(&self.contenders(key)).await?.0,
        };
        let Some(kv) = holder else {
            return Ok(None);
        };
        let Some(remaining_ttl) = self.remaining_ttl(&kv).await? else {
            // The lease ran out between the two reads: the key is being deleted with it.
            return Ok(None);
        };
        Ok(Some(LockInfo {
            key: key.to_owned(),
            fencing_token: token(kv.create_revision())?,
            remaining_ttl,
            metadata: shown_metadata(&kv),
        }))
    }

    async fn campaign(
        &self,
        name: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: &str,
    ) -> Result<Acquisition, StoreError> {
        self.campaign_in_queue(name, candidate, ttl, value).await
    }

    async fn withdraw(&self, name: &str, candidate: OwnerToken) -> Result<(), StoreError> {
        match self.mode {
            EtcdMode::Lock => self.withdraw_from_queue(candidate).await,
            // Elections need lock mode: here the queue is a fair lock's (`queue.rs`).
            EtcdMode::Txn => {
                let queue = queue::WaitQueue::beside(&self.lock_key(name));
                self.leave_queue(&queue, candidate).await
            }
        }
    }

    /// Lock mode: the contenders of a lock are the Lock service's queue, keys ordered by
    /// create revision. Txn mode: a queue of leased keys beside the lock key (`queue.rs`);
    /// an admitted waiter's lock key goes on the lease of its place, or on the session lease.
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
        match self.mode {
            // A fair waiter is a candidate in the Lock service's own queue: its key
            // (`NAME/<lease>`, created at its first attempt, on a lease of its own) stays
            // between attempts, so its place is where it first asked; the first key created
            // holds the lock. Its value is the metadata, raw, as an election's candidate
            // value is.
            EtcdMode::Lock => {
                self.campaign_in_queue(key, owner, ttl, metadata.unwrap_or_default())
                    .await
            }
            EtcdMode::Txn => self.acquire_txn_fair(key, owner, ttl, metadata).await,
        }
    }

    async fn proclaim(&self, lease: &Lease, value: &str) -> Result<bool, StoreError> {
        self.proclaim_value(lease, value).await
    }

    async fn observe(&self, name: &str) -> Result<crate::backend::LeaderChanges, StoreError> {
        self.observe_leader(name).await
    }

    async fn acquire_permits(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: crate::backend::Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.take_permits(name, owner, ttl, permits, metadata).await
    }

    /// Both modes: a semaphore's fair waiters queue beside its permits (see `queue.rs`).
    fn supports_fair_permits(&self) -> bool {
        true
    }

    async fn acquire_permits_fair(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: crate::backend::Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.take_permits_fair(name, owner, ttl, permits, metadata)
            .await
    }

    async fn withdraw_permits(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_permit_waiter(name, owner).await
    }

    async fn acquire_rw(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: crate::backend::RwMode,
        intent: bool,
        _metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.take_rw(name, owner, ttl, mode, intent, false).await
    }

    async fn withdraw_writer(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_rw_intent(name, owner, false).await
    }

    /// Both modes (and on a session lease): a read-write lock's fair places are keys of its
    /// directory, each on a lease of its own (see `rwlock.rs`).
    fn supports_fair_rw(&self) -> bool {
        true
    }

    async fn acquire_rw_fair(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: crate::backend::RwMode,
        _metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.take_rw(name, owner, ttl, mode, false, true).await
    }

    async fn withdraw_rw_waiter(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_rw_intent(name, owner, true).await
    }

    async fn subscribe_rw(
        &self,
        name: &str,
        seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        self.subscribe_to_rw(name, seen).await
    }

    async fn subscribe_permits(
        &self,
        name: &str,
        seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        self.subscribe_to_permits(name, seen).await
    }

    async fn permit_holders(
        &self,
        name: &str,
    ) -> Result<Vec<crate::backend::PermitHolder>, StoreError> {
        self.holders_of(name).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>, StoreError> {
        // One range read of every lock key under `prefix` (see `watch_prefix` on escaping),
        // oldest first: in `lock` mode the first contender key of a name is its holder.
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let kvs = self
            .get(&self.lock_key(prefix), Some(options))
            .await?
            .take_kvs();
        let mut holders: HashMap<String, KeyValue> = HashMap::new();
        for kv in kvs {
            if let Some(key) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|etcd_key| self.key_of(etcd_key))
            {
                holders.entry(key).or_insert(kv);
            }
        }
        let mut holders: Vec<(String, KeyValue)> = holders.into_iter().collect();
        holders.sort_by(|a, b| a.0.cmp(&b.0));
        let mut held = Vec::with_capacity(holders.len());
        for (key, kv) in holders {
            let Some(remaining_ttl) = self.remaining_ttl(&kv).await? else {
                // Ran out since the read: no longer held.
                continue;
            };
            held.push(LockInfo {
                key,
                fencing_token: token(kv.create_revision())?,
                remaining_ttl,
                metadata: shown_metadata(&kv),
            });
        }
        Ok(held)
    }

    async fn subscribe(&self, key: &str, seen: &Contention) -> Result<ReleaseNotices, StoreError> {
        let (watched, options) = match self.mode {
            // The lock key and, in one range with it, its fair waiters' queue (`queue.rs`):
            // a delete there lets the next fair waiter go.
            EtcdMode::Txn => {
                let lock_key = self.lock_key(key);
                let queue = queue::WaitQueue::beside(&lock_key);
                let end = queue::prefix_end(queue.dir().as_bytes());
                (lock_key, WatchOptions::new().with_range(end))
            }
            EtcdMode::Lock => (self.contenders(key), WatchOptions::new().with_prefix()),
        };
        // Deletes only (`NoPut`): a release, a revoked lease and a lease that ran out all
        // delete the key. Starting right after the revision the failed attempt saw means a
        // delete in between is not missed: etcd replays history from the start revision.
        let mut options = options.with_filters([WatchFilterType::NoPut]);
        if let Some(revision) = seen.revision {
            options = options.with_start_revision(revision + 1);
        }
        let watch = self.open_watch(watched, options).await?;
        let deletes = futures::stream::unfold(watch, |mut watch| async move {
            loop {
                // A broken stream, or a watch etcd cancelled (compaction, lost leader with
                // require-leader), ends the notices: the waiters' backstop timers take over.
                let answer = watch.message().await.ok().flatten()?;
                if answer.canceled() {
                    return None;
                }
                let count = answer
                    .events()
                    .iter()
                    .filter(|event| event.event_type() == EventType::Delete)
                    .count();
                if count > 0 {
                    return Some((count, watch));
                }
            }
        });
        // Dropping the stream drops the watch's gRPC stream, which cancels it in etcd.
        Ok(deletes
            .flat_map(|count| futures::stream::iter(std::iter::repeat_n((), count)))
            .boxed())
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<StoreEvents, StoreError> {
        // One etcd watch on the range of every lock key under `prefix` (lock names escape `/`
        // and `%` one character at a time, so the escaped prefix covers exactly the escaped
        // names that start with it). With the previous value of deleted keys, to tell a
        // holder's release from a Lock-service contender that gave up.
        let watched = self.lock_key(prefix);
        let options = WatchOptions::new().with_prefix().with_prev_key();
        let watch = self.open_watch(watched, options).await?;
        let backend = self.clone();
        let events = futures::stream::unfold(watch, move |mut watch| {
            let backend = backend.clone();
            async move {
                // A broken or cancelled watch ends the stream.
                let answer = watch.message().await.ok().flatten()?;
                if answer.canceled() {
                    return None;
                }
                let events: Vec<StoreEvent> = answer
                    .events()
                    .iter()
                    .filter_map(|event| backend.store_event(event))
                    .collect();
                Some((futures::stream::iter(events), watch))
            }
        });
        Ok(events.flatten().boxed())
    }
}

/// What `inspect` and `list` show as a key's metadata: a lock value's metadata, or a raw
/// value as it is (an election candidate's, leasehold's or another client's such as
/// `etcdctl elect NAME VALUE`).
fn shown_metadata(kv: &KeyValue) -> Option<String> {
    match Holder::decode(kv.value()) {
        Some(holder) => holder.metadata.map(str::to_owned),
        None if !kv.value().is_empty() => Some(election::value_of(kv.value())),
        None => None,
    }
}

/// True when etcd turned the connection's credentials away: a wrong user or password
/// (etcd answers "invalid argument: authentication failed"), an unauthenticated call, or a
/// user without permission to read the prefix. A mistake in the configuration, which trying
/// again will not mend.
fn refused_credentials(error: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return false;
    };
    // gRPC codes: 3 invalid argument, 7 permission denied, 16 unauthenticated.
    match i32::from(status.code()) {
        3 => status.message().contains("authentication failed"),
        7 | 16 => true,
        _ => false,
    }
}

/// Checks one endpoint (`host:port`, `http://host:port` or `https://host:port`) before any
/// I/O. etcd-client does not refuse a port it cannot read (`host:notaport`, `host:65536`): it
/// dials some other port instead, and the refused connection looks like an outage (retryable)
/// rather than a mistake in the configuration.
fn check_endpoint(endpoint: &str) -> std::result::Result<(), &'static str> {
    let rest = match endpoint.split_once("://") {
        Some(("http" | "https", rest)) => rest,
        Some(_) => return Err("the scheme is not http:// or https://"),
        None => endpoint,
    };
    let authority = rest
        .split_once('/')
        .map_or(rest, |(authority, _path)| authority);
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("it contains a space or a control character");
    }
    let (host, port) = match authority.strip_prefix('[') {
        // An IPv6 address: `[::1]:2379`.
        Some(bracketed) => {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or("the IPv6 address has no closing ']'")?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or("']' is not followed by ':'")?,
                ),
            };
            (host, port)
        }
        None if authority.matches(':').count() > 1 => {
            return Err("an IPv6 address must be written in brackets, as [::1]:2379")
        }
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("there is no host");
    }
    match port.map(str::parse::<u16>) {
        None | Some(Ok(1..)) => Ok(()),
        Some(_) => Err("the port is not a number from 1 to 65535"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_endpoints_pass_the_check() {
        for endpoint in [
            "127.0.0.1:2379",
            "etcd-0.etcd:2379",
            "etcd.example.com",
            "http://127.0.0.1:2379",
            "https://etcd.example.com:443/",
            "[::1]:2379",
            "http://[::1]",
        ] {
            assert_eq!(check_endpoint(endpoint), Ok(()), "{endpoint}");
        }
        for endpoint in [
            "[::1",
            "[::1]2379",
            "::1:2379",
            "etcd://h:1",
            "h:0",
            ":2379",
        ] {
            assert!(check_endpoint(endpoint).is_err(), "{endpoint}");
        }
    }
}
