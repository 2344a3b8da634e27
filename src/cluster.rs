//! Lock messages across the nodes of a `ractor_cluster` (feature `cluster`).
//!
//! ```text
//! node A                                          node B
//! LockManager ── ClusterGateway  <─ RemoteLockMsg ──  RemoteLockClient (any actor's code)
//!                 (group "leasehold")                 holder actor (its own group)
//! ```
//!
//! A [`LockManager`](crate::LockManager)'s messages hold in-process values (guards, reply
//! channels of local types), so they cannot cross nodes. A [`ClusterGateway`] started next to
//! the manager speaks a serialisable protocol instead, [`RemoteLockMsg`]: a remote acquisition
//! answers with a [`LeaseDescriptor`] (key, backend, owner token, fencing token, ttl) while the
//! gateway keeps the guard; release and renewal are messages naming the owner token.
//!
//! Every remote lease names a remote holder actor ([`RemoteHolder`]). The gateway makes
//! ractor_cluster's local stand-in for that actor the lock's holder, so the rule for local
//! holders applies: when the actor stops, or its node disconnects (ractor_cluster stops every
//! stand-in of a node whose session ends), the lock is released and the `Released` event says
//! `HolderStopped`. A remote holder must be an actor whose message type can cross nodes (for
//! example [`RemoteLockEvent`]): ractor_cluster only tells other nodes about those.
//!
//! # Liveness
//! ractor_cluster 0.16 ends a node's session only when its connection closes or fails; its
//! pings do not end a session whose peer merely went silent (a partition, a paused process).
//! So the gateway protocol checks liveness itself. A [`RemoteLockClient`] runs a liveness
//! session with the gateway: a [`Heartbeat`] every quarter of the gateway's bound
//! ([`GatewayOptions::with_liveness_bound`], default 10 s). The gateway releases the leases of
//! a session it has not heard from within the bound (`Released` with
//! [`ReleaseReason::HolderSilent`](crate::ReleaseReason::HolderSilent)), and answers it
//! `SessionExpired` if it comes back. The remote side keeps a deadline of its own, four fifths
//! of the bound after it sent the last heartbeat the gateway answered: its [`RemoteLease`]
//! turns un-held, and `lost()` resolves, before the gateway lets the lease go, even if it never
//! hears from the gateway again.
//!
//! - `cluster/gateway.rs`: the [`ClusterGateway`] actor, [`RemoteLockMsg`], the release of
//!   silent sessions' leases.
//! - `cluster/liveness.rs`: the remote side: heartbeats, the session's deadline, [`RemoteLease`].
//! - `cluster/protocol.rs`: the requests, replies, errors and events that cross the wire.
//! - `cluster/wire.rs`: their byte encoding.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use leasehold::cluster::{ClusterGateway, RemoteAcquire, RemoteHolder, RemoteLockClient};
//! # let holder_cell: ractor::ActorCell = unimplemented!();
//! // Node A: a manager with a gateway.
//! let locks = leasehold::LockManager::builder()
//!     .with_backend("memory", leasehold::MemoryBackend::new())
//!     .start()
//!     .await?;
//! ClusterGateway::start(&locks).await?;
//!
//! // Node B, once the nodes are connected: find A's gateway, lock for a holder actor.
//! let gateway = RemoteLockClient::remote_gateways().pop().expect("a connected gateway");
//! let holder = RemoteHolder::join(&holder_cell);
//! let lease = gateway.acquire(RemoteAcquire::new("jobs/nightly", &holder)).await?;
//! if let Some(lease) = lease {
//!     println!("fencing token {}, held: {}", lease.fencing_token, lease.is_held());
//!     lease.release().await?;
//! }
//! # Ok(())
//! # }
//! ```

mod gateway;
mod liveness;
mod protocol;
mod wire;

use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorCell, ActorRef, RpcReplyPort};

pub use gateway::{
    ClusterGateway, GatewayOptions, GatewayState, RemoteLockMsg, MAX_LIVENESS_BOUND,
    MIN_LIVENESS_BOUND,
};
pub use liveness::RemoteLease;
pub use protocol::{
    HandOverRequest, Heartbeat, HeartbeatAck, KeyRequest, LeaseDescriptor, LeaseRequest,
    RemoteAcquire, RemoteError, RemoteErrorKind, RemoteEvent, RemoteEventKind, RemoteLockEvent,
    RemoteLockInfo, RemoteReply,
};

use std::sync::Arc;

use liveness::Session;

use crate::options::Wait;

/// The process group every [`ClusterGateway`] joins. ractor_cluster mirrors group membership
/// onto connected nodes, so `ractor::pg::get_members(PROCESS_GROUP)` on any node lists the
/// gateways of every connected node (see [`RemoteLockClient::remote_gateways`]).
pub const PROCESS_GROUP: &str = "leasehold";

/// The process group a [`LockManager`](crate::LockManager) joins when the `cluster` feature is
/// on. Its message type cannot cross nodes, so only local actors see it there; remote ones
/// use the gateways in [`PROCESS_GROUP`].
pub const MANAGER_GROUP: &str = "leasehold.managers";

/// An actor made findable by a gateway on another node: it joins a process group of its own,
/// which ractor_cluster mirrors onto the connected nodes. Used to name a remote lock holder and
/// a remote event subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHolder {
    pub(crate) group: String,
}

impl RemoteHolder {
    /// Joins `actor` to a fresh, randomly named group. The actor's message type must be
    /// serialisable (ractor_cluster advertises only such actors), e.g. [`RemoteLockEvent`].
    /// It leaves the group when it stops.
    pub fn join(actor: &ActorCell) -> Self {
        let group = format!("leasehold.holder.{:032x}", rand::random::<u128>());
        ractor::pg::join(group.clone(), vec![actor.clone()]);
        RemoteHolder { group }
    }
}

/// A typed handle on a [`ClusterGateway`], usually one on another node: async methods that
/// send [`RemoteLockMsg`]s and wait for the answer.
///
/// Clones share one liveness session with the gateway: a task that heartbeats while the
/// session has leases or clients, and the deadline its leases are trusted until (see
/// [`RemoteLease`]).
#[derive(Debug, Clone)]
pub struct RemoteLockClient {
    gateway: ActorRef<RemoteLockMsg>,
    /// Time allowed for the gateway's answer on top of any wait the request asks for.
    timeout: Duration,
    /// The current liveness session, started by the first acquisition, and started again
    /// after the gateway ended one for silence. An async mutex, held while a session starts:
    /// acquisitions that find no live session wait for the one being started instead of
    /// each starting their own (a thousand leases taken at once would otherwise keep up to
    /// as many heartbeat tasks going).
    session: Arc<tokio::sync::Mutex<Option<Arc<Session>>>>,
}

impl RemoteLockClient {
    /// A handle on `gateway`.
    pub fn new(gateway: ActorRef<RemoteLockMsg>) -> Self {
        RemoteLockClient {
            gateway,
            timeout: Duration::from_secs(10),
            session: Arc::default(),
        }
    }

    /// The live session, or a new one (its first heartbeat answered).
    async fn session(&self) -> Result<Arc<Session>, RemoteError> {
        let mut current = self.session.lock().await;
        if let Some(session) = current.as_ref().filter(|s| !s.is_over()) {
            return Ok(session.clone());
        }
        let session = Arc::new(Session::start(self.gateway.clone()).await?);
        *current = Some(session.clone());
        Ok(session)
    }

    /// Handles on the gateways of the other connected nodes, as [`PROCESS_GROUP`] lists them
    /// here. Empty until a node connection has synchronised its groups.
    pub fn remote_gateways() -> Vec<RemoteLockClient> {
        ractor::pg::get_members(&PROCESS_GROUP.to_owned())
            .into_iter()
            .filter(|cell| !cell.get_id().is_local())
            .map(|cell| RemoteLockClient::new(cell.into()))
            .collect()
    }

    /// How long to wait for an answer beyond the request's own wait (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The gateway actor.
    pub fn gateway(&self) -> &ActorRef<RemoteLockMsg> {
        &self.gateway
    }

    /// Acquires as the request says. `Ok(None)`: the key is held and the request did not wait.
    ///
    /// The lease belongs to this client's liveness session: the gateway releases it if it
    /// does not hear from this node within its bound, and the [`RemoteLease`] stops being
    /// held before that (see [`GatewayOptions::with_liveness_bound`]).
    pub async fn acquire(
        &self,
        mut request: RemoteAcquire,
    ) -> Result<Option<RemoteLease>, RemoteError> {
        let timeout = match request.wait() {
            None | Some(Wait::No) => Some(self.timeout),
            Some(Wait::UpTo(wait)) => Some(self.timeout.saturating_add(wait)),
            Some(Wait::Forever) => None,
        };
        let session = self.session().await?;
        request.session = Some(session.id());
        // The gateway counts the request as a sign of life from its arrival, after this.
        let sent_at = tokio::time::Instant::now();
        let answer = self
            .call(|reply| RemoteLockMsg::Acquire(request, reply), timeout)
            .await;
        if let Err(error) = &answer {
            if error.kind == RemoteErrorKind::SessionExpired {
                session.end();
            }
        }
        Ok(answer?.map(|descriptor| {
            session.confirmed(sent_at);
            RemoteLease::new(descriptor, session, self.clone())
        }))
    }

    /// Releases the lease and waits until the store confirmed it.
    pub async fn release(&self, lease: &LeaseDescriptor) -> Result<(), RemoteError> {
        let request = LeaseRequest::new(lease, lease.ttl);
        self.call(
            |reply| RemoteLockMsg::Release(request, reply),
            Some(self.timeout),
        )
        .await
    }

    /// Hands the lease to `holder`, another remote holder actor: the lock is not released,
    /// `holder` is monitored instead of the current holder, and the fencing token stays the
    /// same (it is the same lease). The gateway's `HandedOver` event records it.
    pub async fn hand_over(
        &self,
        lease: &LeaseDescriptor,
        holder: &RemoteHolder,
    ) -> Result<(), RemoteError> {
        let request = HandOverRequest::new(lease, holder);
        self.call(
            |reply| RemoteLockMsg::HandOver(request, reply),
            Some(self.timeout),
        )
        .await
    }

    /// Extends the lease to `ttl` from now (and renews with `ttl` from then on).
    pub async fn renew(&self, lease: &LeaseDescriptor, ttl: Duration) -> Result<(), RemoteError> {
        let request = LeaseRequest::new(lease, ttl);
        self.call(
            |reply| RemoteLockMsg::Renew(request, reply),
            Some(self.timeout),
        )
        .await
    }

    /// True if anyone holds `key` on `backend` (`None`: the default), according to the store.
    pub async fn is_locked(&self, backend: Option<&str>, key: &str) -> Result<bool, RemoteError> {
        let request = KeyRequest::new(backend, key);
        self.call(
            |reply| RemoteLockMsg::IsLocked(request, reply),
            Some(self.timeout),
        )
        .await
    }

    /// The current holder of `key`: fencing token, remaining ttl, metadata.
    pub async fn info(
        &self,
        backend: Option<&str>,
        key: &str,
    ) -> Result<Option<RemoteLockInfo>, RemoteError> {
        let request = KeyRequest::new(backend, key);
        self.call(
            |reply| RemoteLockMsg::Info(request, reply),
            Some(self.timeout),
        )
        .await
    }

    /// Sends every lifecycle event of the gateway's manager to `subscriber`, an actor whose
    /// message type is [`RemoteLockEvent`]; answers once the subscription is in place.
    pub async fn subscribe(&self, subscriber: &RemoteHolder) -> Result<(), RemoteError> {
        let subscriber = subscriber.clone();
        self.call(
            |reply| RemoteLockMsg::Subscribe(subscriber, reply),
            Some(self.timeout),
        )
        .await
    }

    async fn call<T: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<RemoteReply<T>>) -> RemoteLockMsg,
        timeout: Option<Duration>,
    ) -> Result<T, RemoteError> {
        match self.gateway.call(msg, timeout).await {
            Ok(CallResult::Success(RemoteReply(answer))) => answer,
            Ok(CallResult::Timeout) => Err(RemoteError::new(
                RemoteErrorKind::Unreachable,
                format!("the gateway did not answer within {timeout:?}"),
            )),
            Ok(CallResult::SenderError) => Err(RemoteError::new(
                RemoteErrorKind::Unreachable,
                "the gateway dropped the request",
            )),
            Err(e) => Err(RemoteError::new(
                RemoteErrorKind::Unreachable,
                format!("the gateway is unreachable: {e}"),
            )),
        }
    }
}
