//! `ClusterGateway`: the lock manager's face to other nodes. It is registered by name, joins
//! [`PROCESS_GROUP`](super::PROCESS_GROUP) (which ractor_cluster mirrors onto every connected
//! node), turns [`RemoteLockMsg`]s into [`LockManagerMsg`]s, and keeps the [`LockGuard`] of
//! every lease it took for a remote holder, keyed by owner token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorClusterMessage;
use tokio::task::JoinSet;

use super::protocol::{
    KeyRequest, LeaseDescriptor, LeaseRequest, RemoteAcquire, RemoteError, RemoteErrorKind,
    RemoteEvent, RemoteLockEvent, RemoteLockInfo, RemoteReply,
};
use super::{RemoteHolder, PROCESS_GROUP};
use crate::client::LockClient;
use crate::error::Error;
use crate::guard::LockGuard;
use crate::manager::LockManagerMsg;
use crate::options::LockOptions;

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
}

/// The gateway actor. Start one per manager with [`ClusterGateway::start`].
pub struct ClusterGateway;

/// The gateway's state (opaque).
pub struct GatewayState {
    client: LockClient,
    /// The leases held for remote holders. Shared with the request tasks, which insert
    /// (acquire) and remove (release) while the gateway goes on serving others.
    leases: Arc<Mutex<HashMap<u128, LockGuard>>>,
    /// Requests in flight (an acquisition may wait a long time). They die with the gateway.
    tasks: JoinSet<()>,
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
        let manager = client.manager();
        let name = format!(
            "{}/cluster",
            manager.get_name().unwrap_or_else(|| "leasehold".into())
        );
        let (gateway, _join) = Actor::spawn_linked(
            Some(name.clone()),
            ClusterGateway,
            client.clone(),
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
    type Arguments = LockClient;

    async fn pre_start(
        &self,
        myself: ActorRef<RemoteLockMsg>,
        client: LockClient,
    ) -> Result<GatewayState, ActorProcessingErr> {
        ractor::pg::join(PROCESS_GROUP.to_owned(), vec![myself.get_cell()]);
        // Linked as the manager's child, the gateway would outlive it (ractor does not stop
        // children with their supervisor): watch it, and go with it.
        myself.get_cell().monitor(client.manager().get_cell());
        Ok(GatewayState {
            client,
            leases: Arc::default(),
            tasks: JoinSet::new(),
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
            .leases
            .lock()
            .expect("lease map")
            .retain(|_, guard| guard.deadline().is_some());
        let manager = state.client.manager().clone();
        let leases = state.leases.clone();
        match msg {
            RemoteLockMsg::Acquire(request, reply) => {
                state.tasks.spawn(async move {
                    let answer = acquire(&manager, &leases, request).await;
                    let _ = reply.send(RemoteReply(answer));
                });
            }
            RemoteLockMsg::Release(request, reply) => {
                let guard = {
                    let mut leases = leases.lock().expect("lease map");
                    match leases.get(&request.owner.as_u128()) {
                        Some(g) if g.key() == request.key => {
                            leases.remove(&request.owner.as_u128())
                        }
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
            RemoteLockMsg::Renew(request, reply) => {
                // One of ours: renewed through its guard, which knows its key actor (a
                // semaphore's permits cannot be found by name: one node may hold several).
                let guard = {
                    let mut leases = leases.lock().expect("lease map");
                    match leases.get(&request.owner.as_u128()) {
                        Some(g) if g.key() == request.key => {
                            leases.remove(&request.owner.as_u128())
                        }
                        _ => None,
                    }
                };
                state.tasks.spawn(async move {
                    let answer = match guard {
                        Some(guard) => {
                            let renewed = guard.renew(request.ttl).await;
                            leases
                                .lock()
                                .expect("lease map")
                                .insert(guard.owner().as_u128(), guard);
                            renewed.map_err(RemoteError::from)
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
    leases: &Mutex<HashMap<u128, LockGuard>>,
    request: RemoteAcquire,
) -> Result<Option<LeaseDescriptor>, RemoteError> {
    let holder = find(&request.holder).await?;
    let mut options = LockOptions::new()
        .with_holder(holder)
        .with_auto_renew(request.auto_renew);
    if let Some(ttl) = request.ttl {
        options = options.with_ttl(ttl);
    }
    if let Some(wait) = request.wait {
        options = options.with_wait(wait);
    }
    if let Some(metadata) = request.metadata {
        options = options.with_metadata(metadata);
    }
    let guard = match request.permits {
        Some(permits) => {
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
        None => {
            ask(manager, |reply| LockManagerMsg::Acquire {
                backend: request.backend,
                key: request.key,
                options,
                reply,
            })
            .await?
        }
    };
    Ok(guard.map(|guard| {
        let lease = LeaseDescriptor::of(&guard);
        leases
            .lock()
            .expect("lease map")
            .insert(lease.owner.as_u128(), guard);
        lease
    }))
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
