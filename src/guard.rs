//! `LockGuard`: the application's side of a held lock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorCell, ActorRef};
use tokio::time::Instant;

use crate::backend::OwnerToken;
use crate::error::{Error, Result};
use crate::event::{LostReason, ReleaseReason};
use crate::key_actor::KeyMsg;
use crate::options::validate_ttl;

mod status;

pub(crate) use status::{status_cell, LeaseStatus, StatusReader, StatusWriter};

/// A held lock. Dropping it releases the lock without blocking; [`LockGuard::release`] releases
/// it and waits for the store to confirm.
///
/// Protect the resource with [`LockGuard::fencing_token`] (see [`Fence`](crate::Fence)): a
/// guard can be overtaken by events (a paused process, a partition) and only the resource can
/// refuse a stale holder's late write.
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    key: Arc<str>,
    backend: Arc<str>,
    owner: OwnerToken,
    fencing_token: u64,
    /// The key actor holding the lease. It holds other leases after this one, so every
    /// message to it names this lease's owner token.
    actor: ActorRef<KeyMsg>,
    status: StatusReader,
    /// Set once `release` ran, so drop does not release again.
    released: bool,
}

impl LockGuard {
    pub(crate) fn new(
        key: Arc<str>,
        backend: Arc<str>,
        owner: OwnerToken,
        fencing_token: u64,
        actor: ActorRef<KeyMsg>,
        status: StatusReader,
    ) -> Self {
        LockGuard {
            key,
            backend,
            owner,
            fencing_token,
            actor,
            status,
            released: false,
        }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The name of the backend that holds the lock.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// Strictly greater than the token of every earlier holder of this key on this store.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// The owner token written with the key in the store.
    pub fn owner(&self) -> OwnerToken {
        self.owner
    }

    /// The ttl the lease is renewed with: the one it was taken with, or the one the last
    /// [`renew`](Self::renew) set. `None` once the lease is not held.
    pub fn ttl(&self) -> Option<Duration> {
        self.status.get().held().map(|(_, ttl, _)| ttl)
    }

    /// The local deadline up to which the lease is trusted, while it is held.
    pub fn deadline(&self) -> Option<Instant> {
        self.status.get().held().map(|(deadline, _, _)| deadline)
    }

    /// True while the lease is held and its deadline has not passed. Checked against the
    /// clock on every call, so it turns false at the deadline even if the key actor is stuck.
    pub fn is_held(&self) -> bool {
        self.status
            .get()
            .held()
            .is_some_and(|(deadline, _, ended)| !ended && Instant::now() < deadline)
    }

    /// Resolves when the lease is lost, with the reason; at the latest at the lease deadline.
    /// Never resolves while the lease is held, nor after this guard released it.
    pub async fn lost(&self) -> LostReason {
        self.status.lost().await
    }

    /// Extends the lease to `ttl` from now (and renews with `ttl` from then on).
    pub async fn renew(&self, ttl: Duration) -> Result<()> {
        validate_ttl(ttl)?;
        let owner = Some(self.owner);
        let call = self
            .actor
            .call(|reply| KeyMsg::Renew { ttl, owner, reply }, None)
            .await;
        self.answer(call)
    }

    /// Hands the lease to `holder`, an actor: the lock is not released, `holder` is
    /// monitored instead of the current holder (when it stops, the lock is released with
    /// `HolderStopped`), and the fencing token stays the same, since it is the same lease. A
    /// `HandedOver` event records it. For work where one actor takes a lock and another
    /// finishes the job; this guard still controls the lease (release, renew, drop).
    pub async fn hand_over(&self, holder: impl Into<ActorCell>) -> Result<()> {
        let holder = holder.into();
        let owner = self.owner;
        let call = self
            .actor
            .call(
                |reply| KeyMsg::HandOver {
                    holder,
                    owner,
                    reply,
                },
                None,
            )
            .await;
        self.answer(call)
    }

    /// Releases the lock and waits until the store confirmed it.
    pub async fn release(self) -> Result<()> {
        self.release_because(ReleaseReason::Requested).await
    }

    /// As [`release`](Self::release), with the reason the `Released` event gives.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) async fn release_because(mut self, reason: ReleaseReason) -> Result<()> {
        self.released = true;
        let call = self
            .actor
            .call(
                |reply| KeyMsg::Release {
                    reason,
                    owner: Some(self.owner),
                    reply: Some(reply),
                },
                None,
            )
            .await;
        self.answer(call)
    }

    /// The key actor's answer; or, if it has stopped or holds this lease no longer, why the
    /// lease ended, as its last status says.
    /// Replaces the value stored with the lease (an election leader's `proclaim`).
    pub(crate) async fn proclaim(&self, value: String) -> Result<()> {
        let owner = self.owner;
        let call = self
            .actor
            .call(
                |reply| KeyMsg::Proclaim {
                    value,
                    owner,
                    reply,
                },
                None,
            )
            .await;
        self.answer(call)
    }

    fn answer<M>(
        &self,
        call: Result<CallResult<Result<()>>, ractor::MessagingErr<M>>,
    ) -> Result<()> {
        match call {
            Ok(CallResult::Success(Err(Error::NotHeld { .. })))
            | Ok(CallResult::SenderError)
            | Ok(CallResult::Timeout)
            | Err(_) => Err(match self.status.get() {
                LeaseStatus::Gone(LostReason::Shutdown) => Error::ManagerStopped,
                LeaseStatus::Gone(reason) => Error::LeaseLost {
                    key: self.key.to_string(),
                    reason,
                },
                _ => Error::NotHeld {
                    key: self.key.to_string(),
                },
            }),
            Ok(CallResult::Success(result)) => result,
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.actor.cast(KeyMsg::Release {
                reason: ReleaseReason::Dropped,
                owner: Some(self.owner),
                reply: None,
            });
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("backend", &self.backend)
            .field("key", &self.key)
            .field("fencing_token", &self.fencing_token)
            .field("held", &self.is_held())
            .finish()
    }
}
