//! `KeyActor`: one per attempted or held key. It makes the acquisition attempt, then owns the
//! lease: owner token, fencing token, monotonic deadline, renewal timer, holder monitor. It
//! stops on release, on loss, or when its holder dies, and in every case the holder is told
//! (through the guard's status channel) by the deadline: the loss check runs a little before it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};

use crate::backend::{Acquisition, Contention, Lease, OwnerToken};
use crate::backend_actor::{AcquireReply, AcquireRequest, BackendCtx, KeyOutcome, Requeue};
use crate::error::{Error, Result, StoreError};
use crate::event::{LockEventKind, LostReason, ReleaseReason};
use crate::guard::{LeaseStatus, LockGuard};
use crate::task::AbortOnDrop;

/// Messages to a key actor. Sent by its [`LockGuard`], by the backend actor (release by
/// message, shutdown) and by its own timer.
pub(crate) enum KeyMsg {
    /// Give the lock back. `owner`, when given, must match (release by descriptor).
    Release {
        reason: ReleaseReason,
        owner: Option<OwnerToken>,
        reply: Option<RpcReplyPort<Result<()>>>,
    },
    /// Extend the lease to `ttl` now (and use `ttl` for later auto-renewals).
    Renew {
        ttl: Duration,
        owner: Option<OwnerToken>,
        reply: RpcReplyPort<Result<()>>,
    },
    /// The timer fired: renew if auto-renew is on, declare the lease lost if the deadline has
    /// come.
    Tick,
}

#[cfg(feature = "cluster")]
impl ractor::Message for KeyMsg {}

pub(crate) struct KeyActor;

pub(crate) struct KeyArgs {
    pub(crate) ctx: Arc<BackendCtx>,
    pub(crate) outcome: Arc<KeyOutcome>,
    pub(crate) request: AcquireRequest,
    pub(crate) reply: AcquireReply,
}

pub(crate) struct KeyState {
    ctx: Arc<BackendCtx>,
    key: Arc<str>,
    /// The request, until the attempt is over.
    pending: Option<(AcquireRequest, AcquireReply)>,
    /// What this actor leaves for the backend actor when it stops (shared with the backend's
    /// record of it).
    outcome: Arc<KeyOutcome>,
    held: Option<Held>,
}

/// Everything about a lease that is held.
struct Held {
    lease: Lease,
    ttl: Duration,
    auto_renew: bool,
    holder: Option<ActorCell>,
    acquired_at: Instant,
    /// Local deadline: computed from when the last successful acquire/renew was SENT, so store
    /// latency eats into it rather than extending it.
    deadline: Instant,
    /// Consecutive failed renewals.
    failures: u32,
    /// The guard's view of this lease.
    status: watch::Sender<LeaseStatus>,
    /// When the holder is told of the loss if no renewal got through: a little before the
    /// deadline (half its drift margin), so that the latency of the timer that notices cannot
    /// make the news late.
    lose_at: Instant,
    /// The next renewal or deadline check. Aborted when replaced and when the actor stops, so
    /// no renewal outlives its lock.
    timer: Option<AbortOnDrop<std::result::Result<(), ractor::MessagingErr<KeyMsg>>>>,
}

impl Actor for KeyActor {
    type Msg = KeyMsg;
    type State = KeyState;
    type Arguments = KeyArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<KeyMsg>,
        args: KeyArgs,
    ) -> Result<KeyState, ActorProcessingErr> {
        Ok(KeyState {
            ctx: args.ctx,
            outcome: args.outcome,
            key: args.request.key.clone(),
            pending: Some((args.request, args.reply)),
            held: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<KeyMsg>,
        state: &mut KeyState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some((request, reply)) = state.pending.take() {
            state.attempt(&myself, request, reply).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<KeyMsg>,
        msg: KeyMsg,
        state: &mut KeyState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KeyMsg::Release {
                reason,
                owner,
                reply,
            } => {
                let result = match state.check_owner(owner) {
                    Ok(()) => state.release(&myself, reason).await,
                    Err(e) => Err(e),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            KeyMsg::Renew { ttl, owner, reply } => {
                let result = match state.check_owner(owner) {
                    Ok(()) => state.renew(&myself, Some(ttl)).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            KeyMsg::Tick => state.tick(&myself).await,
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<KeyMsg>,
        event: SupervisionEvent,
        state: &mut KeyState,
    ) -> Result<(), ActorProcessingErr> {
        // The only events a key actor receives are from the holder it monitors: whether the
        // holder stopped or panicked, its locks go at once rather than after the ttl.
        let stopped = match &event {
            SupervisionEvent::ActorTerminated(cell, ..) => Some(cell.get_id()),
            SupervisionEvent::ActorFailed(cell, _) => Some(cell.get_id()),
            _ => None,
        };
        let holder = state
            .held
            .as_ref()
            .and_then(|h| h.holder.as_ref())
            .map(ActorCell::get_id);
        if stopped.is_some() && stopped == holder {
            let _ = state.release(&myself, ReleaseReason::HolderStopped).await;
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<KeyMsg>,
        state: &mut KeyState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(held) = state.held.take() {
            // Stopped from outside while still holding (the backend actor is going away): the
            // guard must not go on believing. The store lease expires by itself.
            let _ = held.status.send(LeaseStatus::Gone(LostReason::Shutdown));
            if let Some(holder) = &held.holder {
                myself.get_cell().unmonitor(holder.clone());
            }
        }
        Ok(())
    }
}

impl Held {
    fn set_deadline(&mut self, deadline: Instant, drift: f64) {
        self.deadline = deadline;
        self.lose_at = deadline - self.ttl.mul_f64(drift / 2.0);
    }
}

impl KeyState {
    async fn attempt(
        &mut self,
        myself: &ActorRef<KeyMsg>,
        request: AcquireRequest,
        reply: AcquireReply,
    ) {
        let ctx = self.ctx.clone();
        let owner = OwnerToken::random();
        let sent_at = Instant::now();
        // One attempt always gets its full operation budget, even if it overruns the wait
        // budget: a short wait must still try at least once.
        let attempt = timeout_at(
            sent_at + ctx.timing.op_timeout,
            ctx.store
                .acquire(&self.key, owner, request.ttl, request.metadata.as_deref()),
        )
        .await
        .unwrap_or(Err(StoreError::TimedOut {
            op: "acquire",
            after: ctx.timing.op_timeout,
        }));
        ctx.record(&attempt);
        let outcome = match attempt {
            Ok(Acquisition::Acquired(lease)) => {
                self.adopt(myself, lease, &request, sent_at, reply);
                return;
            }
            Ok(Acquisition::Held(contention)) => {
                ctx.emit(&self.key, None, LockEventKind::Contended);
                Ok(contention)
            }
            Err(error) => {
                // A timeout or a broken connection may still have let the write through.
                if error.is_retryable() {
                    self.take_back(owner).await;
                }
                Err(error)
            }
        };
        self.finish_attempt(myself, request, reply, outcome);
    }

    /// After an attempt that timed out or lost its connection, the store may still have applied
    /// the write: take it back (it is ours only if the owner token matches) rather than leave
    /// the key held by nobody until its ttl.
    async fn take_back(&self, owner: OwnerToken) {
        let lease = Lease::new(self.key.to_string(), owner, 0);
        let budget = Instant::now() + self.ctx.timing.op_timeout;
        let _ = timeout_at(budget, self.ctx.store.release(&lease)).await;
    }

    /// An attempt that did not acquire: answer the caller, or hand the request back to the
    /// backend actor to wait in the key's queue.
    fn finish_attempt(
        &mut self,
        myself: &ActorRef<KeyMsg>,
        request: AcquireRequest,
        reply: AcquireReply,
        outcome: std::result::Result<Contention, StoreError>,
    ) {
        let now = Instant::now();
        let out_of_time = request.deadline.is_some_and(|d| d <= now);
        let answer = match outcome {
            Ok(_) if request.tries_once() => Ok(None),
            Err(error) if request.tries_once() || !error.is_retryable() => {
                Err(self.ctx.store_error(error))
            }
            _ if out_of_time => Err(request.timeout_error(now)),
            Ok(contention) => return self.finish(myself, Some((request, reply, contention))),
            // A waiting request rides out a store outage: it keeps its place in the queue and
            // tries again after a short pause, until its wait budget runs out.
            Err(error) => {
                tracing::debug!(backend = %self.ctx.name, key = %self.key, %error, "acquire attempt failed; will retry");
                let pause = Contention::with_remaining_ttl(Some(STORE_RETRY_PAUSE));
                return self.finish(myself, Some((request, reply, pause)));
            }
        };
        self.finish(myself, None);
        let _ = reply.send(answer);
    }

    fn adopt(
        &mut self,
        myself: &ActorRef<KeyMsg>,
        lease: Lease,
        request: &AcquireRequest,
        sent_at: Instant,
        reply: AcquireReply,
    ) {
        let ctx = &self.ctx;
        let deadline = ctx.timing.deadline(sent_at, request.ttl);
        let (status, status_rx) = watch::channel(LeaseStatus::Held { deadline });
        let now = Instant::now();
        let token = lease.fencing_token;
        ctx.emit(
            &self.key,
            Some(token),
            LockEventKind::Acquired {
                waited: now - request.requested_at,
            },
        );
        let guard = LockGuard::new(
            self.key.clone(),
            ctx.name.clone(),
            lease.owner,
            token,
            request.ttl,
            myself.clone(),
            status_rx,
        );
        if let Some(holder) = &request.holder {
            myself.get_cell().monitor(holder.clone());
        }
        let mut held = Held {
            lease,
            ttl: request.ttl,
            auto_renew: request.auto_renew,
            holder: request.holder.clone(),
            acquired_at: now,
            deadline,
            lose_at: deadline,
            failures: 0,
            status,
            timer: None,
        };
        held.set_deadline(deadline, ctx.timing.drift);
        self.held = Some(held);
        self.schedule(myself, sent_at);
        let holder_gone = request
            .holder
            .as_ref()
            .is_some_and(|h| h.get_status() >= ractor::ActorStatus::Stopping);
        if holder_gone {
            // It stopped before the monitor was in place: no event will come for it.
            myself
                .cast(KeyMsg::Release {
                    reason: ReleaseReason::HolderStopped,
                    owner: None,
                    reply: None,
                })
                .ok();
        }
        // If the caller has gone, the guard comes back inside the error and its drop
        // releases the lock: nothing is held for nobody.
        let _ = reply.send(Ok(Some(guard)));
    }

    /// Arms the timer: the next renewal (ttl/3 after the last one was sent) if auto-renew is
    /// on, else the loss check just before the deadline. Never later than that check.
    fn schedule(&mut self, myself: &ActorRef<KeyMsg>, last_sent: Instant) {
        let Some(held) = self.held.as_mut() else {
            return;
        };
        let at = if held.auto_renew {
            let step = if held.failures == 0 {
                held.ttl / 3
            } else {
                // Retry quickly, several times before the deadline.
                (held.ttl / 12).max(Duration::from_millis(1))
            };
            (last_sent + step).min(held.lose_at)
        } else {
            held.lose_at
        };
        let delay = at.saturating_duration_since(Instant::now());
        held.timer = Some(AbortOnDrop(myself.send_after(delay, || KeyMsg::Tick)));
    }

    async fn tick(&mut self, myself: &ActorRef<KeyMsg>) {
        let Some(held) = self.held.as_ref() else {
            return;
        };
        if Instant::now() >= held.lose_at {
            self.lose(myself, LostReason::Expired).await;
        } else if held.auto_renew {
            let _ = self.renew(myself, None).await;
        } else {
            // An early tick (a manual renew moved the deadline): re-arm for the new deadline.
            self.schedule(myself, Instant::now());
        }
    }

    /// One renewal, bounded by the deadline: a store that hangs cannot keep the holder
    /// believing past it.
    async fn renew(&mut self, myself: &ActorRef<KeyMsg>, ttl: Option<Duration>) -> Result<()> {
        let ctx = self.ctx.clone();
        let Some(held) = self.held.as_mut() else {
            return Err(Error::NotHeld {
                key: self.key.to_string(),
            });
        };
        if let Some(ttl) = ttl {
            held.ttl = ttl;
        }
        let sent_at = Instant::now();
        let token = held.lease.fencing_token;
        let renewed = timeout_at(held.lose_at, ctx.store.renew(&held.lease, held.ttl)).await;
        match &renewed {
            Ok(outcome) => ctx.record(outcome),
            Err(_) => ctx.record::<()>(&Err(StoreError::TimedOut {
                op: "renew",
                after: held.lose_at.saturating_duration_since(sent_at),
            })),
        }
        match renewed {
            Ok(Ok(true)) => {
                held.failures = 0;
                held.set_deadline(ctx.timing.deadline(sent_at, held.ttl), ctx.timing.drift);
                let deadline = held.deadline;
                let _ = held.status.send(LeaseStatus::Held { deadline });
                ctx.emit(&self.key, Some(token), LockEventKind::Renewed { deadline });
                self.schedule(myself, sent_at);
                Ok(())
            }
            Ok(Ok(false)) => Err(self.lose(myself, LostReason::NotOwner).await),
            Ok(Err(error)) => {
                held.failures += 1;
                let attempt = held.failures;
                ctx.emit(
                    &self.key,
                    Some(token),
                    LockEventKind::RenewFailed {
                        attempt,
                        error: error.clone(),
                    },
                );
                self.schedule(myself, Instant::now());
                Err(ctx.store_error(error))
            }
            Err(_deadline_passed) => Err(self.lose(myself, LostReason::Expired).await),
        }
    }

    /// The lease can no longer be trusted: tell the holder first, then clean up.
    async fn lose(&mut self, myself: &ActorRef<KeyMsg>, reason: LostReason) -> Error {
        let error = Error::LeaseLost {
            key: self.key.to_string(),
            reason,
        };
        let Some(held) = self.held.take() else {
            return error;
        };
        // Free here before the holder hears of the loss, so whatever it does next finds the
        // key free on this node.
        self.outcome.done.store(true, Ordering::Release);
        let _ = held.status.send(LeaseStatus::Gone(reason));
        self.ctx.emit(
            &self.key,
            Some(held.lease.fencing_token),
            LockEventKind::Lost { reason },
        );
        if reason == LostReason::Expired {
            // Our deadline runs ahead of the store's expiry by the drift margin: if the lease
            // is still ours there, give it back now instead of making the next holder wait.
            // Past the store's expiry there is nothing to give back, so a stalled store cannot
            // hold this actor (and a shutdown waiting for it) any longer than that.
            let store_expiry = held.deadline + held.ttl.mul_f64(self.ctx.timing.drift);
            let budget = store_expiry.min(Instant::now() + self.ctx.timing.op_timeout);
            let _ = timeout_at(budget, self.ctx.store.release(&held.lease)).await;
        }
        self.stop_holding(myself, held);
        error
    }

    async fn release(&mut self, myself: &ActorRef<KeyMsg>, reason: ReleaseReason) -> Result<()> {
        let Some(held) = self.held.take() else {
            return Err(Error::NotHeld {
                key: self.key.to_string(),
            });
        };
        let ctx = self.ctx.clone();
        let token = held.lease.fencing_token;
        let budget = Instant::now() + ctx.timing.op_timeout;
        let released = timeout_at(budget, ctx.store.release(&held.lease))
            .await
            .unwrap_or(Err(StoreError::TimedOut {
                op: "release",
                after: ctx.timing.op_timeout,
            }));
        ctx.record(&released);
        let result = match released {
            Ok(true) => Ok(()),
            Ok(false) => {
                // It was taken away between renewals, and nobody had noticed yet.
                let reason = LostReason::NotOwner;
                let _ = held.status.send(LeaseStatus::Gone(reason));
                ctx.emit(&self.key, Some(token), LockEventKind::Lost { reason });
                Err(Error::LeaseLost {
                    key: self.key.to_string(),
                    reason,
                })
            }
            // The lease will expire in the store by itself; the caller still learns the
            // release did not reach it.
            Err(error) => Err(ctx.store_error(error)),
        };
        let status = match reason {
            ReleaseReason::Shutdown => LeaseStatus::Gone(LostReason::Shutdown),
            ReleaseReason::HolderStopped => LeaseStatus::Gone(LostReason::HolderStopped),
            _ => LeaseStatus::Released,
        };
        let _ = held.status.send_if_modified(|s| {
            let modify = matches!(s, LeaseStatus::Held { .. });
            if modify {
                *s = status;
            }
            modify
        });
        ctx.emit(
            &self.key,
            Some(token),
            LockEventKind::Released {
                held_for: held.acquired_at.elapsed(),
                reason,
            },
        );
        self.stop_holding(myself, held);
        result
    }

    fn check_owner(&self, owner: Option<OwnerToken>) -> Result<()> {
        match (&self.held, owner) {
            (Some(held), Some(owner)) if held.lease.owner != owner => Err(Error::NotHeld {
                key: self.key.to_string(),
            }),
            _ => Ok(()),
        }
    }

    fn stop_holding(&mut self, myself: &ActorRef<KeyMsg>, held: Held) {
        if let Some(holder) = &held.holder {
            myself.get_cell().unmonitor(holder.clone());
        }
        drop(held);
        self.finish(myself, None);
    }

    /// Stops, leaving in the outcome a request that still waits, if any: the backend actor
    /// takes it on this actor's termination event and puts it back in the key's queue. Without
    /// one, the key is free here at once: `done` says so to the backend actor before anyone is
    /// answered, so a caller that was just told "released" finds the key free on its next
    /// request, however soon.
    fn finish(&mut self, myself: &ActorRef<KeyMsg>, requeue: Option<Requeue>) {
        match requeue {
            None => self.outcome.done.store(true, Ordering::Release),
            Some(requeue) => {
                let mut slot = self
                    .outcome
                    .requeue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *slot = Some(requeue);
            }
        }
        myself.stop(None);
    }
}

/// How long a waiting request pauses before trying a store that failed.
const STORE_RETRY_PAUSE: Duration = Duration::from_millis(250);
