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
//! | renew     | `LeaseKeepAlive` (one request, one answer on the keep-alive stream) and, in parallel, `Range(P+K)` to check that the key still carries our owner token |
//! | release   | `Txn`: if the value carries our owner token then `DeleteRange(P+K)`; then `LeaseRevoke` |
//! | inspect   | `Range(P+K)`, then `LeaseTimeToLive` of the key's lease |
//! | wait      | one `Watch` of `P+K` for deletes, from the revision the failed attempt saw |
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
//! `txn` mode, and in FIFO order within each node.
//!
//! # Monitoring
//! [`LockBackend::watch_prefix`] is one etcd `Watch` of every lock key under a prefix. In `txn`
//! mode the creation of a lock key is an acquisition and its delete a release (an expiry too).
//! In `lock` mode an acquisition is leasehold writing its value onto its contender key, and a
//! release the delete of such a key; holders that use the Lock service directly, and
//! contenders that gave up, are not reported.
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
//! without knowing the rest of the value.
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

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, GetResponse,
    KeyValue, LockOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchFilterType, WatchOptions, WatchStream,
};
use futures::StreamExt;
use tokio::time::{sleep, timeout, Instant};

use crate::backend::{
    Acquisition, Contention, Lease, LockBackend, LockInfo, OwnerToken, ReleaseNotices, StoreEvent,
    StoreEventKind, StoreEvents,
};
use crate::error::{Error, Result, StoreCause, StoreError};

/// The key prefix used unless [`EtcdBackendBuilder::with_prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "leasehold/";

/// How long [`EtcdBackendBuilder::connect`] waits for etcd to answer, unless
/// [`EtcdBackendBuilder::with_connect_timeout`] says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest first wait before a pending `Lock` call looks whether it is queued behind
/// another holder (see `lock_once`); each later look waits twice as long, up to
/// [`LOCK_PROBE_MAX`].
const LOCK_PROBE_FIRST: Duration = Duration::from_millis(2);
const LOCK_PROBE_MAX: Duration = Duration::from_millis(640);

/// How many times one `lock`-mode acquisition looks and calls `Lock` while other contenders
/// keep slipping in between.
const LOCK_ROUNDS: usize = 3;

/// The budget of a lease revocation that nobody waits for (an abandoned attempt's lease).
const ORPHAN_REVOKE_TIMEOUT: Duration = Duration::from_secs(5);

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
}

struct Shared {
    client: Client,
    endpoints: Vec<String>,
    /// How often one call is tried when it fails in transit (see `EtcdBackend::call`).
    tries: usize,
}

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
}

impl fmt::Debug for EtcdBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the connect options: their Debug shows the password.
        f.debug_struct("EtcdBackendBuilder")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("mode", &self.mode)
            .field("connect_timeout", &self.connect_timeout)
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
        } = self;
        if endpoints.is_empty() {
            return Err(Error::InvalidConfig("no etcd endpoints given".to_owned()));
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
                client,
                endpoints,
                tries,
            }),
            prefix: prefix.into(),
            mode,
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
    /// [`EtcdBackendBuilder::with_mode`]).
    pub fn with_mode(mut self, mode: EtcdMode) -> Self {
        self.mode = mode;
        self
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

    /// Runs one etcd call, and runs it again when it failed in transit, as `retry` allows.
    ///
    /// etcd-client spreads calls over the endpoints, and keeps sending some to an endpoint
    /// that is down: those fail at once with a connect error, before anything was sent, and
    /// another try (which the balancer sends elsewhere) is safe even for a write. Calls caught
    /// on a connection that broke may or may not have been applied, so only the ones that do no
    /// harm twice are tried again then. Answers etcd itself gave (no leader, timed out, …) are
    /// never retried here: the key actors decide what to do about those.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        mut call: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut left = self.shared.tries;
        loop {
            match call().await {
                Ok(answer) => return Ok(answer),
                Err(error) if left > 1 && retry.allows(&error) => left -= 1,
                Err(error) => return Err(store_error(op, error)),
            }
        }
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.call("txn", Retry::IfNeverSent, || {
            let (mut kv, txn) = (self.shared.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    async fn get(&self, key: &str, options: Option<GetOptions>) -> Result<GetResponse, StoreError> {
        self.call("range", Retry::IfConnectionBroke, || {
            let (mut kv, options) = (self.shared.client.kv_client(), options.clone());
            let key = key.to_owned();
            async move { kv.get(key, options).await }
        })
        .await
    }

    /// Grants the lease for one acquisition. etcd counts lease ttls in whole seconds: round up
    /// (see "Ttls are whole seconds" in the module documentation).
    async fn grant(&self, ttl: Duration) -> Result<Grant, StoreError> {
        let seconds = lease_seconds(ttl);
        let granted = self
            .call("lease grant", Retry::IfConnectionBroke, || {
                let mut leases = self.shared.client.lease_client();
                async move { leases.grant(seconds, None).await }
            })
            .await?;
        Ok(Grant {
            backend: self.clone(),
            id: granted.id(),
            ttl: granted.ttl(),
            armed: true,
        })
    }

    /// Revokes lease `id`, which deletes every key on it. A lease that is already gone is not
    /// an error.
    async fn revoke(&self, id: i64) -> Result<(), StoreError> {
        let revoked = self
            .call("lease revoke", Retry::IfConnectionBroke, || {
                let mut leases = self.shared.client.lease_client();
                async move { leases.revoke(id).await }
            })
            .await;
        match revoked {
            Ok(_) => Ok(()),
            // etcd says "requested lease not found" (gRPC not found) for a lease that
            // expired or was revoked already: the outcome asked for.
            Err(error) if is_lease_not_found(&error) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// How long the lease `id` has left (`LeaseTimeToLive`), in whole seconds; `None` for a key
    /// without a lease or a lease that is already gone.
    async fn remaining(&self, id: i64) -> Result<Option<Duration>, StoreError> {
        if id == 0 {
            return Ok(None);
        }
        let answer = self
            .call("lease time-to-live", Retry::IfConnectionBroke, || {
                let mut leases = self.shared.client.lease_client();
                async move { leases.time_to_live(id, None).await }
            })
            .await?;
        Ok(u64::try_from(answer.ttl()).ok().map(Duration::from_secs))
    }

    /// One keep-alive of lease `id`: etcd-client's keep-alive stream sends one request and
    /// reads one answer when it is opened; dropping it closes the stream. `Ok(false)` when etcd
    /// answers ttl 0: the lease is gone (expired or revoked), and the keys on it with it.
    async fn keep_alive(&self, id: i64) -> Result<bool, StoreError> {
        self.call("lease keep-alive", Retry::IfConnectionBroke, || {
            let mut leases = self.shared.client.lease_client();
            async move {
                match leases.keep_alive(id).await {
                    Ok(_stream) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(why))
                        if why == "lease not found" =>
                    {
                        Ok(false)
                    }
                    Err(error) => Err(error),
                }
            }
        })
        .await
    }

    /// The prefix under which the Lock service keeps the contenders for `key`.
    fn contenders(&self, key: &str) -> String {
        format!("{}/", self.lock_key(key))
    }

    /// What a failed attempt tells its waiters: the revision it saw, from which their watch
    /// starts, and how long the holder's lease has left, which bounds their backstop timer.
    async fn contention(&self, holder: Option<&KeyValue>, revision: i64) -> Contention {
        let remaining = match holder {
            // Best effort: without it the backstop timer just uses its cap.
            Some(kv) => self.remaining(kv.lease()).await.ok().flatten(),
            None => None,
        };
        Contention {
            remaining_ttl: remaining,
            revision: Some(revision),
        }
    }

    /// The contender holding the Lock-service lock under `contenders`: the key created first.
    async fn first_contender(
        &self,
        contenders: &str,
    ) -> Result<(Option<KeyValue>, i64), StoreError> {
        let first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let mut answer = self.get(contenders, Some(first)).await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        Ok((answer.take_kvs().into_iter().next(), revision))
    }

    /// The etcd key holding `lease`, if it can be named: the lock key in `txn` mode; in `lock`
    /// mode the Lock service's key for the lease (`NAME/<lease id in hex>`), or, for a lease
    /// that does not say its id, the contender key whose value carries its owner token.
    async fn locate(&self, lease: &Lease) -> Result<Option<String>, StoreError> {
        match (self.mode, lease.lease_id) {
            (EtcdMode::Txn, _) => Ok(Some(self.lock_key(&lease.key))),
            (EtcdMode::Lock, Some(id)) => Ok(Some(contender_key(&self.contenders(&lease.key), id))),
            (EtcdMode::Lock, None) => {
                let contenders = self.contenders(&lease.key);
                let mut answer = self
                    .get(&contenders, Some(GetOptions::new().with_prefix()))
                    .await?;
                Ok(answer
                    .take_kvs()
                    .into_iter()
                    .find(|kv| Holder::decode(kv.value()).is_some_and(|h| h.owner == lease.owner))
                    .and_then(|kv| String::from_utf8(kv.key().to_vec()).ok()))
            }
        }
    }

    async fn acquire_txn(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let lock_key = self.lock_key(key);
        // The lease first, so the put can attach the key to it: the key then disappears with
        // the lease, whether it is revoked or runs out.
        let grant = self.grant(ttl).await?;
        let value = Holder::encode(owner, grant.ttl, metadata);
        // `create_revision == 0` means the key does not exist. One transaction either creates
        // it on our lease or, if someone holds it, reads the holder (whose lease tells the
        // waiters how long it may last).
        let txn = Txn::new()
            .when([Compare::create_revision(
                lock_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                lock_key.as_str(),
                value,
                Some(PutOptions::new().with_lease(grant.id)),
            )])
            .or_else([TxnOp::get(lock_key.as_str(), None)]);
        let answer = self.txn(txn).await?;
        // The transaction's revision is the put's: etcd gives each write transaction one new
        // revision, strictly greater than every earlier one, so it is a fencing token.
        let revision = txn_revision(&answer)?;
        if answer.succeeded() {
            let mut lease = Lease::new(key, owner, token(revision)?);
            lease.lease_id = Some(grant.keep());
            return Ok(Acquisition::Acquired(lease));
        }
        let holder = first_range_kv(&answer);
        // Our lease holds nothing: revoke it now rather than leave it to run out.
        let (_, contention) =
            futures::join!(grant.revoke(), self.contention(holder.as_ref(), revision));
        Ok(Acquisition::Held(contention))
    }

    async fn acquire_lock(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let contenders = self.contenders(key);
        for _ in 0..LOCK_ROUNDS {
            // Look before asking: `Lock` would wait for a held lock, and this call must not.
            let (first, revision) = self.first_contender(&contenders).await?;
            if first.is_some() {
                return Ok(Acquisition::Held(
                    self.contention(first.as_ref(), revision).await,
                ));
            }
            if let Some(acquired) = self.lock_once(key, owner, ttl, metadata).await? {
                return Ok(acquired);
            }
            // Another contender came in between the look and the `Lock` call, and this one
            // backed off. Look again rather than answer `Held`: that contender may be done
            // already, and the release notice it sent may have come while this attempt was
            // still running, when nobody was waiting for it.
        }
        // Still racing: let the waiter try again at once (a zero remaining ttl fires its
        // backstop timer right away).
        Ok(Acquisition::Held(Contention {
            remaining_ttl: Some(Duration::ZERO),
            revision: None,
        }))
    }

    /// One `Lock` call on a lock that looked free. `None` when it turned out to be queued
    /// behind another contender, and was cancelled.
    async fn lock_once(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Option<Acquisition>, StoreError> {
        let (name, contenders) = (self.lock_key(key), self.contenders(key));
        let granting = Instant::now();
        let grant = self.grant(ttl).await?;
        // A lease grant is one raft write, as is the Lock call's own put (the Lock service
        // adds a read and its own internal client): four times the grant's time is a margin
        // over how long an uncontended `Lock` takes right now, and when the first look comes.
        let mut wait = (granting.elapsed() * 4).max(LOCK_PROBE_FIRST);
        let ours = contender_key(&contenders, grant.id);
        // The Lock service puts `NAME/<lease>` on our lease and answers once it is the oldest
        // key under `NAME/`: at once for a free lock.
        let lease_id = grant.id;
        let mut locking = Box::pin(self.call("lock", Retry::IfConnectionBroke, || {
            let mut locks = self.shared.client.lock_client();
            let name = name.clone();
            async move {
                locks
                    .lock(name, Some(LockOptions::new().with_lease(lease_id)))
                    .await
            }
        }));
        let answer = loop {
            tokio::select! {
                answer = &mut locking => break answer?,
                () = sleep(wait) => {
                    // Still pending: slow, or queued behind a contender that came in between
                    // our look and our call. Only the second is contention. (A call that is
                    // queued cannot be left to wait: etcd notices the deletes it waits for only
                    // every 100 ms, and cancelling it once it holds the lock would delete the
                    // lock key.)
                    let (first, _) = self.first_contender(&contenders).await?;
                    if first.is_some_and(|kv| kv.key() != ours.as_bytes()) {
                        // Dropping the call cancels it, and etcd deletes a cancelled caller's
                        // key; revoking the lease deletes it in any case.
                        drop(locking);
                        grant.revoke().await;
                        return Ok(None);
                    }
                    wait = (wait * 2).min(LOCK_PROBE_MAX);
                }
            }
        };
        if answer.key() != ours.as_bytes() {
            return Err(StoreError::protocol(format!(
                "etcd's Lock service named the lock key {:?}, expected {ours:?}",
                String::from_utf8_lossy(answer.key())
            )));
        }
        // Write our owner token and metadata onto the lock key, if it is still on our lease (a
        // lease that ran out already took the key with it). The Lock service orders contenders
        // by create revision only, which a put does not change; the previous value of the key
        // tells us that create revision, our fencing token.
        let txn = Txn::new()
            .when([Compare::lease(ours.as_str(), CompareOp::Equal, grant.id)])
            .and_then([TxnOp::put(
                ours.as_str(),
                Holder::encode(owner, grant.ttl, metadata),
                Some(PutOptions::new().with_lease(grant.id).with_prev_key()),
            )]);
        let answer = self.txn(txn).await?;
        let created = answer.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Put(put) => put.prev_key().map(KeyValue::create_revision),
            _ => None,
        });
        match created {
            Some(created) if answer.succeeded() => {
                let mut lease = Lease::new(key, owner, token(created)?);
                lease.lease_id = Some(grant.keep());
                Ok(Some(Acquisition::Acquired(lease)))
            }
            _ => Err(StoreError::unavailable(format!(
                "the lock key {ours:?} was gone right after etcd's Lock service granted it"
            ))),
        }
    }

    /// Opens a watch and waits for etcd to confirm it with its `created` answer, which comes
    /// before any event: from then on no event is missed, also for a watch without a start
    /// revision.
    async fn open_watch(
        &self,
        watched: String,
        options: WatchOptions,
    ) -> Result<WatchStream, StoreError> {
        let mut watch = self
            .call("watch", Retry::IfConnectionBroke, || {
                let mut watches = self.shared.client.watch_client();
                let (watched, options) = (watched.clone(), options.clone());
                async move { watches.watch(watched, Some(options)).await }
            })
            .await?;
        match watch.message().await {
            Ok(Some(created)) if created.created() && !created.canceled() => Ok(watch),
            Ok(other) => Err(StoreError::unavailable(format!(
                "etcd did not create the watch on {watched:?}: {other:?}"
            ))),
            Err(error) => Err(store_error("watch", error)),
        }
    }

    /// What a watch event on a lock key means for monitoring, if anything.
    ///
    /// `txn` mode: creating the key is an acquisition (a later put on it, moving it to a longer
    /// lease, is not), deleting it a release. `lock` mode: an acquisition is leasehold writing
    /// its value onto its contender key (the key's second version; the first is the Lock
    /// service queueing the contender), a release is the delete of a key that had such a
    /// value. Holders that use the Lock service directly are not seen.
    fn store_event(&self, event: &etcd_client::Event) -> Option<StoreEvent> {
        let kv = event.kv()?;
        let etcd_key = std::str::from_utf8(kv.key()).ok()?;
        let key = self.key_of(etcd_key)?;
        let kind = match (event.event_type(), self.mode) {
            (EventType::Put, EtcdMode::Txn) if kv.version() == 1 => StoreEventKind::Acquired {
                fencing_token: token(kv.create_revision()).ok()?,
            },
            (EventType::Put, EtcdMode::Lock)
                if kv.version() == 2 && Holder::decode(kv.value()).is_some() =>
            {
                StoreEventKind::Acquired {
                    fencing_token: token(kv.create_revision()).ok()?,
                }
            }
            (EventType::Delete, EtcdMode::Txn) => StoreEventKind::Released,
            (EventType::Delete, EtcdMode::Lock)
                if event
                    .prev_kv()
                    .is_some_and(|prev| Holder::decode(prev.value()).is_some()) =>
            {
                StoreEventKind::Released
            }
            _ => return None,
        };
        Some(StoreEvent { key, kind })
    }

    /// The application's key for an etcd key this backend wrote: the lock key (`txn` mode) or
    /// a contender key `NAME/<lease>` (`lock` mode).
    fn key_of(&self, etcd_key: &str) -> Option<String> {
        let rest = etcd_key.strip_prefix(&*self.prefix)?;
        match self.mode {
            EtcdMode::Txn => Some(rest.to_owned()),
            EtcdMode::Lock => {
                let (name, _lease) = rest.rsplit_once('/')?;
                Some(unescape_name(name))
            }
        }
    }

    /// Moves the lock key `kv` (ours, on lease `current`) onto a new lease for `ttl`, for a
    /// renewal asking for more than etcd granted: etcd cannot lengthen a lease.
    async fn move_to_longer_lease(
        &self,
        kv: &KeyValue,
        holder: &Holder<'_>,
        current: i64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let grant = self.grant(ttl).await?;
        let mut compares = owner_compares(kv.key(), holder.owner);
        // Only if nobody moved it meanwhile.
        compares.push(Compare::lease(kv.key(), CompareOp::Equal, current));
        let value = Holder::encode(holder.owner, grant.ttl, holder.metadata);
        let txn = Txn::new().when(compares).and_then([TxnOp::put(
            kv.key(),
            value,
            Some(PutOptions::new().with_lease(grant.id)),
        )]);
        if !self.txn(txn).await?.succeeded() {
            grant.revoke().await;
            return Ok(false);
        }
        grant.keep();
        // The key left the old lease, so revoking it deletes nothing; a failure leaves it to
        // run out.
        let _ = self.revoke(current).await;
        Ok(true)
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
            EtcdMode::Lock => self.acquire_lock(key, owner, ttl, metadata).await,
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let Some(lock_key) = self.locate(lease).await? else {
            return Ok(false);
        };
        // The keep-alive of the lease we were granted, and in parallel a read of the key: is it
        // still ours, and still on that lease? (A key deleted or overwritten behind our back
        // leaves the lease alive; only the key says whether we still hold the lock.)
        let keep_granted = async {
            match lease.lease_id {
                Some(id) => Some(self.keep_alive(id).await),
                None => None,
            }
        };
        let (kept, read) = futures::join!(keep_granted, self.get(&lock_key, None));
        let read = read?;
        let Some(kv) = read.kvs().first() else {
            return Ok(false);
        };
        let Some(holder) = Holder::decode(kv.value()).filter(|h| h.owner == lease.owner) else {
            return Ok(false);
        };
        let current = kv.lease();
        let alive = match kept {
            Some(kept) if Some(current) == lease.lease_id => kept?,
            // The key is on another lease than the one granted at acquisition (a renewal moved
            // it to a longer one): keep that one alive.
            _ if current != 0 => self.keep_alive(current).await?,
            _ => false,
        };
        if !alive {
            return Ok(false);
        }
        if lease_seconds(ttl) <= holder.granted {
            return Ok(true);
        }
        self.move_to_longer_lease(kv, &holder, current, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
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
        if on_lease != 0 {
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
        let remaining_ttl = if kv.lease() == 0 {
            // Not written by leasehold (nobody else's key should be here): it never expires.
            Duration::MAX
        } else {
            match self.remaining(kv.lease()).await? {
                Some(remaining) => remaining,
                // The lease ran out between the two reads: the key is being deleted with it.
                None => return Ok(None),
            }
        };
        Ok(Some(LockInfo {
            key: key.to_owned(),
            fencing_token: token(kv.create_revision())?,
            remaining_ttl,
            metadata: Holder::decode(kv.value()).and_then(|h| h.metadata.map(str::to_owned)),
        }))
    }

    async fn subscribe(&self, key: &str, seen: &Contention) -> Result<ReleaseNotices, StoreError> {
        let (watched, options) = match self.mode {
            EtcdMode::Txn => (self.lock_key(key), WatchOptions::new()),
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

/// A lease granted for one acquisition attempt. Until the attempt keeps it, dropping it revokes
/// it: also when the attempt itself is dropped half-way (the key actor gave up on a slow
/// store), so a key written on it does not linger for the whole ttl.
struct Grant {
    backend: EtcdBackend,
    id: i64,
    /// The ttl etcd granted, in seconds (it may raise the one asked for).
    ttl: i64,
    armed: bool,
}

impl Grant {
    /// The lease now belongs to a held lock.
    fn keep(mut self) -> i64 {
        self.armed = false;
        self.id
    }

    /// Revokes the lease now, deleting whatever key is on it. A failure leaves it to run out.
    async fn revoke(mut self) {
        self.armed = false;
        if let Err(error) = self.backend.revoke(self.id).await {
            tracing::debug!(lease = self.id, %error, "lease revoke failed; it will run out");
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Nothing can be awaited here: a short task of its own, bounded, does the revoke.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (backend, id) = (self.backend.clone(), self.id);
            runtime.spawn(async move {
                let _ = timeout(ORPHAN_REVOKE_TIMEOUT, backend.revoke(id)).await;
            });
        }
    }
}

/// A lock key's value, as leasehold writes it: `OWNER\nGRANTED[\nMETADATA]`.
#[derive(Debug, PartialEq, Eq)]
struct Holder<'a> {
    owner: OwnerToken,
    /// The ttl in seconds the key's lease was granted with.
    granted: i64,
    metadata: Option<&'a str>,
}

impl<'a> Holder<'a> {
    fn encode(owner: OwnerToken, granted: i64, metadata: Option<&str>) -> String {
        match metadata {
            Some(metadata) => format!("{owner}\n{granted}\n{metadata}"),
            None => format!("{owner}\n{granted}"),
        }
    }

    /// `None` for a value leasehold did not write (a Lock-service key before we wrote ours).
    fn decode(value: &'a [u8]) -> Option<Self> {
        let value = std::str::from_utf8(value).ok()?;
        let (owner, rest) = value.split_once('\n')?;
        if owner.len() != 32 {
            return None;
        }
        let owner = OwnerToken::from_u128(u128::from_str_radix(owner, 16).ok()?);
        let (granted, metadata) = match rest.split_once('\n') {
            Some((granted, metadata)) => (granted, Some(metadata)),
            None => (rest, None),
        };
        Some(Holder {
            owner,
            granted: granted.parse().ok()?,
            metadata,
        })
    }
}

/// The compares that hold exactly when `key`'s value was written for `owner`, without
/// knowing the rest of the value: `"OWNER\n" < value < "OWNER\x0b"`.
///
/// Every value leasehold writes starts with 32 hex digits and `\n` and goes on with at least
/// one digit. A value between the two bounds starts with the same 32 digits (the first digit
/// that differed would put it below or above both), and its next byte is at least `\n` and
/// below `\x0b`, so it is `\n` and the value is longer than `"OWNER\n"`: it is one of ours.
fn owner_compares(key: &[u8], owner: OwnerToken) -> Vec<Compare> {
    vec![
        Compare::value(key, CompareOp::Greater, format!("{owner}\n")),
        Compare::value(key, CompareOp::Less, format!("{owner}\x0b")),
    ]
}

/// The key the Lock service gives the contender on lease `id`, as etcd's `concurrency.Mutex`
/// names it: `NAME/` and the lease id in lowercase hex.
fn contender_key(contenders: &str, id: i64) -> String {
    format!("{contenders}{id:x}")
}

/// A key as a Lock-service name: `%` and `/` written `%25` and `%2F`, one character at a time
/// (so escaping keeps prefixes).
fn escape_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len());
    for ch in key.chars() {
        match ch {
            '%' => name.push_str("%25"),
            '/' => name.push_str("%2F"),
            ch => name.push(ch),
        }
    }
    name
}

/// The key an escaped Lock-service name stands for. In an escaped name every `%` starts `%25`
/// or `%2F`, so replacing `%2F` first cannot touch an escaped `%`.
fn unescape_name(name: &str) -> String {
    name.replace("%2F", "/").replace("%25", "%")
}

/// etcd's lease ttl for `ttl`: whole seconds, rounded up, at least 1.
fn lease_seconds(ttl: Duration) -> i64 {
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(seconds.max(1)).unwrap_or(i64::MAX)
}

fn txn_revision(answer: &TxnResponse) -> Result<i64, StoreError> {
    answer
        .header()
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::protocol("etcd txn answer without a header"))
}

fn token(revision: i64) -> Result<u64, StoreError> {
    u64::try_from(revision)
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| StoreError::protocol(format!("etcd revision {revision} is not positive")))
}

/// The key read by the `else` branch of the acquire transaction.
fn first_range_kv(answer: &TxnResponse) -> Option<KeyValue> {
    answer.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
        _ => None,
    })
}

/// When a call that failed in transit may be tried again (see `EtcdBackend::call`).
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// Only if it never reached a server: a write whose effect a second try could trip on.
    IfNeverSent,
    /// Also if the connection broke under it: a read, a keep-alive, a revoke, a grant (a
    /// lease granted twice runs out by itself), a Lock call (the same lease is the same
    /// acquisition) or a new watch.
    IfConnectionBroke,
}

impl Retry {
    fn allows(self, error: &etcd_client::Error) -> bool {
        match self {
            Retry::IfNeverSent => never_sent(error),
            Retry::IfConnectionBroke => never_sent(error) || broke_in_transit(error),
        }
    }
}

/// How often one call is tried when it fails in transit: with one endpoint, once; with
/// several, enough that the balancer sends one of them to a live endpoint.
fn tries_per_call(endpoints: usize) -> usize {
    if endpoints > 1 {
        4 * endpoints
    } else {
        1
    }
}

/// True for a call that failed before anything was sent: tonic reports a failed connection as
/// `Unavailable` with its `ConnectError` in the error's source chain.
fn never_sent(error: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return false;
    };
    let code: i32 = status.code().into();
    // 14: unavailable.
    if code != 14 {
        return false;
    }
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        // tonic's `ConnectError` is not nameable without depending on tonic itself.
        if format!("{error:?}").starts_with("ConnectError(") {
            return true;
        }
        source = error.source();
    }
    false
}

/// True for a call whose connection failed under it (reset, closed, cancelled by the
/// transport): tonic gives the status it makes from a client-side failure the failure as its
/// source, while a status etcd sent has none.
fn broke_in_transit(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            let code: i32 = status.code().into();
            // 1: cancelled, 14: unavailable.
            matches!(code, 1 | 14) && std::error::Error::source(status).is_some()
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// Sorts etcd-client's errors into retryable (the cluster could not be reached, had no
/// leader, timed out) and not (bad request, permission, protocol), keeping the error whole.
fn store_error(op: &'static str, error: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let context = format!("etcd {op}");
    let retryable = match &error {
        E::GRpcStatus(status) => {
            let code: i32 = status.code().into();
            // gRPC codes: 3 invalid argument, 5 not found, 6 already exists, 7 permission
            // denied, 9 failed precondition, 11 out of range, 12 unimplemented,
            // 16 unauthenticated. The rest (unavailable, deadline exceeded, cancelled,
            // aborted, resource exhausted, internal, unknown) may pass.
            !matches!(code, 3 | 5 | 6 | 7 | 9 | 11 | 12 | 16)
        }
        E::TransportError(_)
        | E::IoError(_)
        | E::WatchError(_)
        | E::LeaseKeepAliveError(_)
        | E::EndpointError(_) => true,
        _ => false,
    };
    if retryable {
        StoreError::unavailable_because(context, error)
    } else {
        StoreError::protocol_because(context, error)
    }
}

/// Whether etcd answered "requested lease not found" (gRPC not found): the lease expired or
/// was revoked already.
fn is_lease_not_found(error: &StoreError) -> bool {
    match error.cause() {
        Some(StoreCause::Etcd(error)) => matches!(
            &**error,
            etcd_client::Error::GRpcStatus(status)
                // gRPC code 5: not found.
                if i32::from(status.code()) == 5 && status.message().contains("lease not found")
        ),
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

/// An etcd-client error in a line: for a gRPC status, its message, code and the failure at
/// the bottom of its cause (`tcp connect error (Unavailable): Connection refused`).
pub(crate) fn describe(error: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return error.to_string();
    };
    let mut text = format!("{} ({:?})", status.message(), status.code());
    let mut cause = std::error::Error::source(status);
    let mut root = None;
    while let Some(error) = cause {
        root = Some(error);
        cause = error.source();
    }
    if let Some(root) = root {
        text.push_str(&format!(": {root}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let owner = OwnerToken::random();
        for metadata in [None, Some(""), Some("host-7\npid 42")] {
            let value = Holder::encode(owner, 30, metadata);
            let holder = Holder::decode(value.as_bytes()).expect("decodes");
            assert_eq!(
                holder,
                Holder {
                    owner,
                    granted: 30,
                    metadata
                }
            );
        }
        assert_eq!(Holder::decode(b""), None);
        assert_eq!(Holder::decode(b"someone-else"), None);
    }

    #[test]
    fn owner_bounds_enclose_exactly_the_owners_values() {
        let owner = OwnerToken::from_u128(0xabc);
        let low = format!("{owner}\n");
        let high = format!("{owner}\x0b");
        let inside = |v: &str| low.as_str() < v && v < high.as_str();
        assert!(inside(&Holder::encode(owner, 1, None)));
        assert!(inside(&Holder::encode(owner, 86400, Some("\u{10ffff}"))));
        for other in [0xabb, 0xabd, u128::MAX, 0] {
            let other = OwnerToken::from_u128(other);
            assert!(!inside(&Holder::encode(other, 1, Some("x"))));
        }
        assert!(!inside(&owner.to_string()));
        assert!(!inside(&low));
        assert!(!inside(""));
    }

    #[test]
    fn lock_names_escape_and_unescape() {
        for key in ["jobs", "a/b", "a%b", "%2F", "%/", "/%25/", "ünï/cödé"] {
            let name = escape_name(key);
            assert!(!name.contains('/'), "{name}");
            assert_eq!(unescape_name(&name), key);
        }
        assert!(escape_name("a/b/c").starts_with(&escape_name("a/b")));
        assert!(!escape_name("a/b").starts_with(&format!("{}/", escape_name("a"))));
    }

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

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(lease_seconds(Duration::from_millis(1)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(lease_seconds(Duration::from_secs(30)), 30);
    }
}
