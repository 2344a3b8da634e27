//! `ClusterGateway`: the lock manager's face to other nodes. It is registered by name, joins
//! [`PROCESS_GROUP`](super::PROCESS_GROUP) (which ractor_cluster mirrors onto every connected
//! node), turns [`RemoteLockMsg`]s into [`LockManagerMsg`]s, and keeps the [`LockGuard`] of
//! every lease it took for a remote holder, keyed by owner token.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorClusterMessage;
use tokio::task::JoinSet;

use super::protocol::{
    HandOverRequest, Heartbeat, HeartbeatAck, KeyRequest, LeaseDescriptor, LeaseRequest,
    RemoteAcquire, RemoteError, RemoteErrorKind, RemoteEvent, RemoteLockEvent, RemoteLockInfo,
    RemoteReply,
};
use super::{RemoteHolder, PROCESS_GROUP};
use crate::client::LockClient;
use crate::error::Error;
use crate::event::ReleaseReason;
use crate::guard::LockGuard;
use crate::manager::LockManagerMsg;
use crate::options::LockOptions;
use crate::task::AbortOnDrop;

/// The messages a remote actor sends to a [`ClusterGateway`]. Every argument and reply
/// crosses the wire; most applications use [`RemoteLockClient`](super::RemoteLockClient)
/// rather than these.
#[derive(RactorClusterMessage)]
#[non_exhaustive]
pub enum RemoteLockMsg {
    /// As [`LockManagerMsg::Acquire`], held by the request's remote holder. `Ok(None)`: the
    /// key is held and the request did not wait.
    #[rpc]
    Acquire(
        RemoteAcquire,
        RpcReplyPort<RemoteReply<Option<LeaseDescriptor>>>,
    ),
    /// Release a lease this gateway holds.
    #[rpc]
    Release(LeaseRequest, RpcReplyPort<RemoteReply<()>>),
    /// Renew a lease to the request's ttl.
    #[rpc]
    Renew(LeaseRequest, RpcReplyPort<RemoteReply<()>>),
    /// As [`LockManagerMsg::IsLocked`].
    #[rpc]
    IsLocked(KeyRequest, RpcReplyPort<RemoteReply<bool>>),
    /// As [`LockManagerMsg::Info`].
    #[rpc]
    Info(
        KeyRequest,
        RpcReplyPort<RemoteReply<Option<RemoteLockInfo>>>,
    ),
    /// Send every lifecycle event to this actor, whose message type is [`RemoteLockEvent`].
    /// The answer comes once the subscription is in place.
    #[rpc]
    Subscribe(RemoteHolder, RpcReplyPort<RemoteReply<()>>),
    /// Hand a lease this gateway holds to another remote holder actor: same lease, same
    /// fencing token, the new holder monitored instead of the old.
    #[rpc]
    HandOver(HandOverRequest, RpcReplyPort<RemoteReply<()>>),
    /// A liveness session's sign of life (see [`Heartbeat`]); answered at once, with the
    /// gateway's bound, or `SessionExpired` for a session whose leases were released.
    #[rpc]
    Heartbeat(Heartbeat, RpcReplyPort<RemoteReply<HeartbeatAck>>),
}

/// The shortest liveness bound a gateway accepts.
pub const MIN_LIVENESS_BOUND: Duration = Duration::from_millis(100);
/// The longest liveness bound a gateway accepts.
pub const MAX_LIVENESS_BOUND: Duration = Duration::from_secs(3600);

/// How a [`ClusterGateway`] holds remote nodes to account (builder, `Default`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GatewayOptions {
    liveness_bound: Duration,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            liveness_bound: Duration::from_secs(10),
        }
    }
}

impl GatewayOptions {
    /// A liveness bound of 10 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// The liveness bound: a remote session (a [`RemoteLockClient`](super::RemoteLockClient)
    /// and its leases) not heard from for longer loses its leases, released with
    /// [`ReleaseReason::HolderSilent`]. Remote clients heartbeat every quarter of it and stop
    /// trusting their leases four fifths of it after the last heartbeat the gateway
    /// answered. Between [`MIN_LIVENESS_BOUND`] and [`MAX_LIVENESS_BOUND`].
    pub fn with_liveness_bound(mut self, bound: Duration) -> Self {
        self.liveness_bound = bound;
        self
    }

    /// The liveness bound.
    pub fn liveness_bound(&self) -> Duration {
        self.liveness_bound
    }

    fn validate(&self) -> crate::Result<()> {
        let bound = self.liveness_bound;
        if !(MIN_LIVENESS_BOUND..=MAX_LIVENESS_BOUND).contains(&bound) {
            return Err(Error::InvalidConfig(format!(
                "gateway liveness bound {bound:?} is outside {MIN_LIVENESS_BOUND:?}..={MAX_LIVENESS_BOUND:?}"
            )));
        }
        Ok(())
    }
}

/// The gateway actor. Start one per manager with [`ClusterGateway::start`].
pub struct ClusterGateway;

/// The gateway's state (opaque).
pub struct GatewayState {
    client: LockClient,
    /// The leases held for remote holders and the liveness sessions they belong to. Shared
    /// with the request tasks, which insert (acquire) and remove (release) while the gateway
    /// goes on serving others, and with the liveness check.
    remotes: Arc<Mutex<Remotes>>,
    bound: Duration,
    /// Requests in flight (an acquisition may wait a long time). They die with the gateway.
    tasks: JoinSet<()>,
    /// The liveness check, every eighth of the bound; dies with the gateway.
    _liveness: AbortOnDrop<()>,
}

/// What the gateway holds for other nodes.
#[derive(Default)]
struct Remotes {
    /// By owner token: the guard, and the liveness session it was taken for.
    leases: HashMap<u128, (LockGuard, Option<u128>)>,
    /// When each live session was last heard from (a heartbeat or a request).
    heard: HashMap<u128, tokio::time::Instant>,
    /// Sessions whose leases were released for silence: they stay over.
    expired: HashSet<u128>,
}

impl Remotes {
    /// `session` was heard from now; an error if it is over.
    fn heard_from(&mut self, session: u128) -> Result<(), RemoteError> {
        if self.expired.contains(&session) {
            return Err(session_expired());
        }
        let now = tokio::time::Instant::now();
        let before = self.heard.insert(session, now);
        // The gap since the session was last heard from: how close it came to the bound.
        tracing::trace!(
            session = %format_args!("{session:032x}"),
            gap = ?before.map(|before| now - before),
            "heard from a liveness session"
        );
        Ok(())
    }
}

fn session_expired() -> RemoteError {
    RemoteError::new(
        RemoteErrorKind::SessionExpired,
        "the gateway did not hear from this node within its liveness bound and released its \
         leases",
    )
}

/// How long the gateway looks for a remote holder it has not heard of yet: ractor_cluster
/// advertises it on the same connection, just before the request, so it is normally there.
const FIND_HOLDER_FOR: Duration = Duration::from_secs(1);

impl ClusterGateway {
    /// Starts a gateway for the manager `client` talks to, linked to that manager (it stops
    /// with it) and registered as `"<manager name>/cluster"`. Remote nodes find it through
    /// [`PROCESS_GROUP`] once a `ractor_cluster::NodeServer` connects them.
    ///
    /// Dropping the returned reference does not stop the gateway; stopping it releases every
    /// lease it holds for remote holders.
    pub async fn start(client: &LockClient) -> crate::Result<ActorRef<RemoteLockMsg>> {
        Self::start_with_options(client, GatewayOptions::new()).await
    }

    /// As [`start`](Self::start), with `options` (checked before anything starts).
    pub async fn start_with_options(
        client: &LockClient,
        options: GatewayOptions,
    ) -> crate::Result<ActorRef<RemoteLockMsg>> {
        options.validate()?;
        let manager = client.manager();
        let name = format!(
            "{}/cluster",
            manager.get_name().unwrap_or_else(|| "leasehold".into())
        );
        let (gateway, _join) = Actor::spawn_linked(
            Some(name.clone()),
            ClusterGateway,
            (client.clone(), options),
            manager.get_cell(),
        )
        .await
        .map_err(|e| {
            Error::InvalidConfig(format!("could not start cluster gateway {name:?}: {e}"))
        })?;
        Ok(gateway)
    }
}

impl Actor for ClusterGateway {
    type Msg = RemoteLockMsg;
    type State = GatewayState;
    type Arguments = (LockClient, GatewayOptions);

    async fn pre_start(
        &self,
        myself: ActorRef<RemoteLockMsg>,
        (client, options): (LockClient, GatewayOptions),
    ) -> Result<GatewayState, ActorProcessingErr> {
        ractor::pg::join(PROCESS_GROUP.to_owned(), vec![myself.get_cell()]);
        // Linked as the manager's child, the gateway would outlive it (ractor does not stop
        // children with their supervisor): watch it, and go with it.
        myself.get_cell().monitor(client.manager().get_cell());
        let remotes = Arc::<Mutex<Remotes>>::default();
        let bound = options.liveness_bound;
        let liveness = tokio::spawn(release_silent(remotes.clone(), bound));
        Ok(GatewayState {
            client,
            remotes,
            bound,
            tasks: JoinSet::new(),
            _liveness: AbortOnDrop(liveness),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<RemoteLockMsg>,
        msg: RemoteLockMsg,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        while state.tasks.try_join_next().is_some() {}
        // Leases already released by their key actor (holder stopped, lease lost) go.
        state
            .remotes
            .lock()
            .expect("remote leases")
            .leases
            .retain(|_, (guard, _)| guard.deadline().is_some());
        let manager = state.client.manager().clone();
        let remotes = state.remotes.clone();
        match msg {
            RemoteLockMsg::Heartbeat(beat, reply) => {
                // Answered here, not in a task: a heartbeat waits for nothing.
                let answer = remotes
                    .lock()
                    .expect("remote leases")
                    .heard_from(beat.session)
                    .map(|()| HeartbeatAck { bound: state.bound });
                let _ = reply.send(RemoteReply(answer));
            }
            RemoteLockMsg::Acquire(request, reply) => {
                // The request is a sign of life too: counted from now, its arrival.
                if let Some(session) = request.session {
                    let heard = remotes.lock().expect("remote leases").heard_from(session);
                    if let Err(error) = heard {
                        let _ = reply.send(RemoteReply(Err(error)));
                        return Ok(());
                    }
                }
                state.tasks.spawn(async move {
                    let answer = acquire(&manager, &remotes, request).await;
                    let _ = reply.send(RemoteReply(answer));
                });
            }
            RemoteLockMsg::Release(request, reply) => {
                let guard = {
                    let mut remotes = remotes.lock().expect("remote leases");
                    match remotes.leases.get(&request.owner.as_u128()) {
                        Some((g, _)) if g.key() == request.key => remotes
                            .leases
                            .remove(&request.owner.as_u128())
                            .map(|(guard, _)| guard),
                        _ => None,
                    }
                };
                state.tasks.spawn(async move {
                    let answer = match guard {
                        Some(guard) => guard.release().await.map_err(RemoteError::from),
                        // Not one of ours (or released already): the manager gives the same
                        // answer it gives locally.
                        None => {
                            ask(&manager, |reply| LockManagerMsg::Release {
                                backend: request.backend,
                                key: request.key,
                                owner: request.owner,
                                reply,
                            })
                            .await
                        }
                    };
                    let _ = reply.send(RemoteReply(answer));
                });
            }
            RemoteLockMsg::HandOver(request, reply) => {
                state.tasks.spawn(async move {
                    let answer = hand_over(&remotes, request).await;
                    let _ = reply.send(RemoteReply(answer));
                });
            }
            RemoteLockMsg::Renew(request, reply) => {
                // One of ours: renewed through its guard, which knows its key actor (a
                // semaphore's permits cannot be found by name: one node may hold several).
                let owner = request.owner.as_u128();
                let taken = {
                    let mut remotes = remotes.lock().expect("remote leases");
                    match remotes.leases.get(&owner) {
                        Some((guard, _)) if guard.key() == request.key => {
                            remotes.leases.remove(&owner)
                        }
                        _ => None,
                    }
                };
                state.tasks.spawn(async move {
                    let answer = match taken {
                        Some((guard, session)) => {
                            let renewed = guard.renew(request.ttl).await;
                            // Back in the map, unless its session went silent meanwhile (as
                            // for a hand-over).
                            let silent = {
                                let mut remotes = remotes.lock().expect("remote leases");
                                let silent = session
                                    .is_some_and(|session| remotes.expired.contains(&session));
                                if silent {
                                    Some(guard)
                                } else {
                                    remotes.leases.insert(owner, (guard, session));
                                    None
                                }
                            };
                            match silent {
                                Some(guard) => {
                                    let reason = ReleaseReason::HolderSilent;
                                    let _ = guard.release_because(reason).await;
                                    Err(session_expired())
                                }
                                None => renewed.map_err(RemoteError::from),
                            }
                        }
                        None => {
                            ask(&manager, |reply| LockManagerMsg::Renew {
                                backend: request.backend,
                                key: request.key,
                                owner: request.owner,
                                ttl: request.ttl,
                                reply,
                            })
                            .await
                        }
                    };
                    let _ = reply.send(RemoteReply(answer));
                });
            }
            RemoteLockMsg::IsLocked(request, reply) => {
                state.tasks.spawn(async move {
                    let answer = ask(&manager, |reply| LockManagerMsg::IsLocked {
                        backend: request.backend,
                        key: request.key,
                        reply,
                    })
                    .await;
                    let _ = reply.send(RemoteReply(answer));
                });
            }
            RemoteLockMsg::Info(request, reply) => {
                state.tasks.spawn(async move {
                    let answer = ask(&manager, |reply| LockManagerMsg::Info {
                        backend: request.backend,
                        key: request.key,
                        reply,
                    })
                    .await
                    .map(|info| info.map(RemoteLockInfo::from));
                    let _ = reply.send(RemoteReply(answer));
                });
            }
            RemoteLockMsg::Subscribe(subscriber, reply) => {
                let client = state.client.clone();
                state.tasks.spawn(async move {
                    let answer = find(&subscriber).await.map(|cell| {
                        let actor: ActorRef<RemoteLockEvent> = cell.into();
                        client.subscribe(actor, |event| {
                            Some(RemoteLockEvent::Event(RemoteEvent::from(event)))
                        });
                    });
                    let _ = reply.send(RemoteReply(answer));
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RemoteLockMsg>,
        event: SupervisionEvent,
        state: &mut GatewayState,
    ) -> Result<(), ActorProcessingErr> {
        let manager = state.client.manager().get_id();
        if let SupervisionEvent::ActorTerminated(cell, ..)
        | SupervisionEvent::ActorFailed(cell, _) = &event
        {
            if cell.get_id() == manager {
                myself.stop(Some("lock manager stopped".into()));
            }
        }
        Ok(())
    }
}

/// Takes a lock for a remote holder: the holder's local stand-in (the `RemoteActor` that
/// ractor_cluster keeps for it) is named as the lock's holder, so the key actor monitors it
/// like any local holder. ractor_cluster stops that stand-in when the remote actor stops and
/// when its node's session ends, and the key actor then releases with `HolderStopped`.
async fn acquire(
    manager: &ActorRef<LockManagerMsg>,
    remotes: &Mutex<Remotes>,
    request: RemoteAcquire,
) -> Result<Option<LeaseDescriptor>, RemoteError> {
    let session = request.session;
    let holder = find(&request.holder).await?;
    let mut options = LockOptions::new()
        .with_holder(holder)
        .with_auto_renew(request.auto_renew)
        .with_fair(request.fair);
    if let Some(ttl) = request.ttl {
        options = options.with_ttl(ttl);
    }
    if let Some(wait) = request.wait {
        options = options.with_wait(wait);
    }
    if let Some(metadata) = request.metadata {
        options = options.with_metadata(metadata);
    }
    let guard = match (request.permits, request.rw) {
        (Some(permits), _) => {
            ask(manager, |reply| LockManagerMsg::AcquirePermits {
                backend: request.backend,
                name: request.key,
                permits,
                count: request.count,
                options,
                reply,
            })
            .await?
        }
        (None, Some(mode)) => {
            ask(manager, |reply| LockManagerMsg::AcquireRw {
                backend: request.backend,
                name: request.key,
                mode,
                options,
                reply,
            })
            .await?
        }
        (None, None) => {
            ask(manager, |reply| LockManagerMsg::Acquire {
                backend: request.backend,
                key: request.key,
                options,
                reply,
            })
            .await?
        }
    };
    let Some(guard) = guard else {
        return Ok(None);
    };
    let lease = LeaseDescriptor::of(&guard);
    let silent = {
        let mut remotes = remotes.lock().expect("remote leases");
        let silent = session.is_some_and(|session| remotes.expired.contains(&session));
        if !silent {
            remotes
                .leases
                .insert(lease.owner.as_u128(), (guard, session));
            return Ok(Some(lease));
        }
        guard
    };
    // The session went silent while the request waited: nobody there to hold it.
    let _ = silent.release_because(ReleaseReason::HolderSilent).await;
    Err(session_expired())
}

/// Hands a lease this gateway holds to another remote holder's stand-in. The guard leaves the
/// map while its key actor is asked (a guard cannot be used under the map's lock), and comes
/// back unless its session went silent meanwhile.
async fn hand_over(remotes: &Mutex<Remotes>, request: HandOverRequest) -> Result<(), RemoteError> {
    let holder = find(&request.holder).await?;
    let owner = request.lease.owner.as_u128();
    let taken = {
        let mut remotes = remotes.lock().expect("remote leases");
        match remotes.leases.get(&owner) {
            Some((guard, _)) if guard.key() == request.lease.key => remotes.leases.remove(&owner),
            _ => None,
        }
    };
    let Some((guard, session)) = taken else {
        return Err(RemoteError::from(Error::NotHeld {
            key: request.lease.key,
        }));
    };
    let answer = guard.hand_over(holder).await.map_err(RemoteError::from);
    let silent = {
        let mut remotes = remotes.lock().expect("remote leases");
        let silent = session.is_some_and(|session| remotes.expired.contains(&session));
        if !silent {
            remotes.leases.insert(owner, (guard, session));
            return answer;
        }
        guard
    };
    let _ = silent.release_because(ReleaseReason::HolderSilent).await;
    Err(session_expired())
}

/// The liveness check: every eighth of the bound, the sessions not heard from within the
/// bound are over, and their leases are released (`Released` with `HolderSilent`). A remote
/// client stops trusting its leases four fifths of the bound after it SENT its last answered
/// heartbeat, which reached the gateway after it was sent: so before this releases them.
async fn release_silent(remotes: Arc<Mutex<Remotes>>, bound: Duration) {
    let every = bound / 8;
    loop {
        tokio::time::sleep(every).await;
        let silent: Vec<LockGuard> = {
            let mut remotes = remotes.lock().expect("remote leases");
            let now = tokio::time::Instant::now();
            let over: Vec<u128> = remotes
                .heard
                .iter()
                .filter(|(_, heard)| now.saturating_duration_since(**heard) > bound)
                .map(|(session, _)| *session)
                .collect();
            if over.is_empty() {
                continue;
            }
            for session in &over {
                if let Some(heard) = remotes.heard.remove(session) {
                    tracing::warn!(
                        session = %format_args!("{session:032x}"),
                        silent_for = ?(now - heard),
                        ?bound,
                        "a liveness session went silent: releasing its leases"
                    );
                }
                remotes.expired.insert(*session);
            }
            let owners: Vec<u128> = remotes
                .leases
                .iter()
                .filter(|(_, (_, session))| session.is_some_and(|s| over.contains(&s)))
                .map(|(owner, _)| *owner)
                .collect();
            owners
                .iter()
                .filter_map(|owner| remotes.leases.remove(owner).map(|(guard, _)| guard))
                .collect()
        };
        let releases = silent
            .into_iter()
            .map(|guard| guard.release_because(ReleaseReason::HolderSilent));
        for released in futures::future::join_all(releases).await {
            if let Err(error) = released {
                tracing::debug!(%error, "releasing a silent node's lease failed");
            }
        }
    }
}

/// The local stand-in of a remote actor, by the group it alone joined. Only stand-ins count:
/// when nodes share a process (tests, the example) the actor itself is a member too, but only
/// the stand-in goes away with the node's connection. (An actor on the gateway's own node
/// uses the manager directly.)
async fn find(holder: &RemoteHolder) -> Result<ActorCell, RemoteError> {
    let give_up = tokio::time::Instant::now() + FIND_HOLDER_FOR;
    loop {
        let members = ractor::pg::get_members(&holder.group);
        if let Some(cell) = members.into_iter().find(|c| !c.get_id().is_local()) {
            return Ok(cell);
        }
        if tokio::time::Instant::now() >= give_up {
            return Err(RemoteError::new(
                RemoteErrorKind::HolderNotFound,
                format!(
                    "no actor in group {holder} is visible here: is its node connected, and \
                     can its message type cross nodes?"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One request to the manager, its error in wire form.
async fn ask<T: Send + 'static>(
    manager: &ActorRef<LockManagerMsg>,
    msg: impl FnOnce(RpcReplyPort<crate::Result<T>>) -> LockManagerMsg,
) -> Result<T, RemoteError> {
    match manager.call(msg, None).await {
        Ok(CallResult::Success(answer)) => answer.map_err(RemoteError::from),
        _ => Err(RemoteError::from(Error::ManagerStopped)),
    }
}
