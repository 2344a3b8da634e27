//! The remote side of liveness: a session's heartbeats to a gateway, and the deadline its
//! leases are trusted until.
//!
//! The gateway releases a session's leases once it has not heard from the session for its
//! bound B (see `gateway.rs`). Here a heartbeat the gateway answered proves it heard from the
//! session at some moment after the heartbeat was SENT, so the gateway keeps the leases at
//! least until `sent_at + B`. The session trusts them until `sent_at + B − B/5`: the fifth is
//! the margin for the two clocks running at slightly different rates and for the gateway's
//! release racing this side's last look. Nothing here needs to hear from the gateway for the
//! deadline to pass: a paused process, or one cut off from the gateway without its
//! connection closing, stops trusting its leases on its own.

use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};

use super::gateway::RemoteLockMsg;
use super::protocol::{Heartbeat, HeartbeatAck, LeaseDescriptor, RemoteError, RemoteErrorKind};
use super::{RemoteHolder, RemoteLockClient};
use crate::event::LostReason;
use crate::task::AbortOnDrop;

/// What a session knows of its standing with the gateway.
#[derive(Debug, Clone, Copy)]
struct Contact {
    /// Until when its leases may be trusted.
    deadline: Instant,
    /// The gateway's bound.
    bound: Duration,
    /// The gateway said the session is over (it released the leases).
    over: bool,
}

impl Contact {
    fn trusted(&self, now: Instant) -> bool {
        !self.over && now < self.deadline
    }
}

/// The deadline a heartbeat (or request) sent at `sent_at` and answered gives.
fn deadline(sent_at: Instant, bound: Duration) -> Instant {
    sent_at + bound - bound / 5
}

/// One liveness session with one gateway: its id, its contact, and the heartbeat task.
pub(super) struct Session {
    id: u128,
    contact: Arc<watch::Sender<Contact>>,
    _heartbeats: AbortOnDrop<()>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &format_args!("{:032x}", self.id))
            .field("contact", &*self.contact.borrow())
            .finish()
    }
}

impl Session {
    /// Starts a session: its first heartbeat must be answered (which says the bound), then a
    /// task heartbeats every quarter of the bound.
    pub(super) async fn start(gateway: ActorRef<RemoteLockMsg>) -> Result<Self, RemoteError> {
        let id = rand::random::<u128>();
        let sent_at = Instant::now();
        // The first answer says the bound; until then, allow a generous one.
        let ack = heartbeat(&gateway, id, Duration::from_secs(10)).await?;
        let contact = Arc::new(
            watch::channel(Contact {
                deadline: deadline(sent_at, ack.bound),
                bound: ack.bound,
                over: false,
            })
            .0,
        );
        let task = tokio::spawn(beat(gateway, id, contact.clone(), sent_at));
        Ok(Session {
            id,
            contact,
            _heartbeats: AbortOnDrop(task),
        })
    }

    pub(super) fn id(&self) -> u128 {
        self.id
    }

    /// The gateway ended the session (its leases are released).
    pub(super) fn is_over(&self) -> bool {
        self.contact.borrow().over
    }

    pub(super) fn end(&self) {
        self.contact.send_modify(|c| c.over = true);
    }

    /// A request sent at `sent_at` was answered: the gateway heard from the session after it.
    pub(super) fn confirmed(&self, sent_at: Instant) {
        confirm(&self.contact, sent_at);
    }
}

fn confirm(contact: &watch::Sender<Contact>, sent_at: Instant) {
    contact.send_if_modified(|c| {
        let later = deadline(sent_at, c.bound);
        let moved = !c.over && later > c.deadline;
        if moved {
            c.deadline = later;
        }
        moved
    });
}

/// One heartbeat, waiting for its answer at most `limit`.
async fn heartbeat(
    gateway: &ActorRef<RemoteLockMsg>,
    session: u128,
    limit: Duration,
) -> Result<HeartbeatAck, RemoteError> {
    let beat = Heartbeat { session };
    let call = gateway.call(|reply| RemoteLockMsg::Heartbeat(beat, reply), Some(limit));
    match timeout(limit, call).await {
        Ok(Ok(CallResult::Success(answer))) => answer.0,
        _ => Err(RemoteError::new(
            RemoteErrorKind::Unreachable,
            format!("the gateway did not answer a heartbeat within {limit:?}"),
        )),
    }
}

/// The heartbeat task: one heartbeat every quarter of the bound (counted from when the last
/// was sent), each answer moving the deadline on; stops when the gateway says the session is
/// over. A heartbeat not answered within the bound is given up: an answer after that could
/// not move the deadline any more.
async fn beat(
    gateway: ActorRef<RemoteLockMsg>,
    session: u128,
    contact: Arc<watch::Sender<Contact>>,
    mut sent_at: Instant,
) {
    loop {
        let bound = contact.borrow().bound;
        sleep_until(sent_at + bound / 4).await;
        sent_at = Instant::now();
        tracing::trace!(session = %format_args!("{session:032x}"), "heartbeat sent");
        match heartbeat(&gateway, session, bound).await {
            Ok(ack) => {
                tracing::trace!(
                    session = %format_args!("{session:032x}"),
                    answered_in = ?sent_at.elapsed(),
                    "heartbeat answered"
                );
                contact.send_modify(|c| c.bound = ack.bound);
                confirm(&contact, sent_at);
            }
            Err(error) if error.kind == RemoteErrorKind::SessionExpired => {
                contact.send_modify(|c| c.over = true);
                return;
            }
            Err(error) => tracing::debug!(%error, "heartbeat to the gateway failed"),
        }
    }
}

/// A lease a gateway holds for this node, as this node sees it: the [`LeaseDescriptor`]
/// (derefs to it) and whether it may still be trusted.
///
/// It is held while this node's contact with the gateway is confirmed within the gateway's
/// liveness bound (less a fifth): when heartbeats stop being answered (this process paused,
/// the network cut, the gateway's node gone), [`is_held`](Self::is_held) turns false and
/// [`lost`](Self::lost) resolves before the gateway releases the lease, so before anyone else
/// can be granted the key, even if this node never hears from the gateway again.
///
/// It says nothing of how the lease ends on the gateway's node for other reasons (its holder
/// actor stopped, the store lost it); subscribe to the gateway's events for those. Dropping
/// it does not release the lease.
#[derive(Debug)]
pub struct RemoteLease {
    descriptor: LeaseDescriptor,
    contact: watch::Receiver<Contact>,
    /// Keeps the heartbeats going while the lease is in use.
    _session: Arc<Session>,
    client: RemoteLockClient,
}

impl RemoteLease {
    pub(super) fn new(
        descriptor: LeaseDescriptor,
        session: Arc<Session>,
        client: RemoteLockClient,
    ) -> Self {
        RemoteLease {
            descriptor,
            contact: session.contact.subscribe(),
            _session: session,
            client,
        }
    }

    /// What the gateway granted.
    pub fn descriptor(&self) -> &LeaseDescriptor {
        &self.descriptor
    }

    /// True while this node's contact with the gateway is confirmed recently enough that the
    /// gateway cannot have released the lease for silence.
    pub fn is_held(&self) -> bool {
        self.contact.borrow().trusted(Instant::now())
    }

    /// Until when the lease may be trusted, as of now (heartbeats move it on).
    pub fn deadline(&self) -> Instant {
        self.contact.borrow().deadline
    }

    /// Resolves when the lease can no longer be trusted: at the deadline if no heartbeat
    /// moves it on, or when the gateway says it released the session's leases.
    pub async fn lost(&self) -> LostReason {
        let mut contact = self.contact.clone();
        loop {
            let now = *contact.borrow_and_update();
            if !now.trusted(Instant::now()) {
                return LostReason::Expired;
            }
            tokio::select! {
                () = sleep_until(now.deadline) => {}
                changed = contact.changed() => {
                    if changed.is_err() {
                        // The session is gone: nothing moves the deadline any more.
                        sleep_until(now.deadline).await;
                    }
                }
            }
        }
    }

    /// Hands the lease to `holder`, another remote holder actor (see
    /// [`RemoteLockClient::hand_over`]): same lease, same fencing token.
    pub async fn hand_over(&self, holder: &RemoteHolder) -> Result<(), RemoteError> {
        self.client.hand_over(&self.descriptor, holder).await
    }

    /// Releases the lease and waits until the store confirmed it.
    pub async fn release(self) -> Result<(), RemoteError> {
        self.client.release(&self.descriptor).await
    }
}

impl std::ops::Deref for RemoteLease {
    type Target = LeaseDescriptor;

    fn deref(&self) -> &LeaseDescriptor {
        &self.descriptor
    }
}
