//! `KeyActor`: one lease at a time. Given an acquisition request by its backend actor, it makes
//! the attempt; if the key is taken, it owns the lease: owner token, fencing token, monotonic
//! deadline, renewal timer, holder monitor. It lets the lease go on release, on loss, or when
//! its holder dies, and in every case the holder is told (through the guard's status channel)
//! by the deadline: the loss check runs a little before it.
//!
//! A lease on a shared lease that the store keeps alive for many (an etcd session) may
//! *follow* it instead (`backend/follow.rs`): no renewal timer, the deadline read from the
//! shared lease's clock, and the store's word (`KeyMsg::Follow`) when the key is taken away,
//! the shared lease is lost, or the store cannot vouch for the key any more.
//!
//! Whatever ends its job (an attempt that found the key held, a release, a loss), the key
//! actor first tells its backend actor by one message, `KeyDone`, and only then answers the
//! caller: by mailbox order, the backend knows the key is free on this node before anyone who
//! was just told "released" can ask for it again. That message is the one record of the end
//! of a job; the backend actor then reuses the idle key actor for its next acquisition rather
//! than starting a new actor per lock.

mod timer;

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::time::{timeout_at, Instant};

use crate::backend::{Acquisition, Contention, FollowNotice, Lease, OwnerToken, SharedClock};
use crate::backend_actor::BackendMsg;
use crate::backend_ctx::BackendCtx;
use crate::error::{Error, Result, StoreError};
use crate::event::{LockEventKind, LostReason, ReleaseReason};
use crate::guard::{status_cell, LeaseStatus, LockGuard, StatusWriter};
use crate::metrics::{Primitive, StoreOp};
use crate::request::{AcquireReply, AcquireRequest, Requeue};
use crate::timing::STORE_RETRY_PAUSE;
use timer::RenewalTimer;

/// Messages to a key actor. Sent by its backend actor (an attempt, a release or renewal by
/// message, a takeover, shutdown), by the [`LockGuard`] of the lease it holds, and by its
/// renewal timer.
pub(crate) enum KeyMsg {
    /// Try to take `request.key`, as the backend actor's job `job`.
    Attempt {
        job: u64,
        request: AcquireRequest,
        reply: AcquireReply,
    },
    /// Give the lock back, if `owner` (when given) holds it. Guards always name their owner:
    /// a key actor holds lease after lease, and an old guard must not touch a newer one.
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
    /// Replace the leader's value (an election's lease), if `owner` holds the lease.
    Proclaim {
        value: String,
        owner: OwnerToken,
        reply: RpcReplyPort<Result<()>>,
    },
    /// Make `holder` the lease's holder, monitored instead of the current one, if `owner`
    /// holds the lease. The lease and its fencing token stay as they are.
    HandOver {
        holder: ActorCell,
        owner: OwnerToken,
        reply: RpcReplyPort<Result<()>>,
    },
    /// The renewal timer fired: renew if auto-renew is on, declare the lease lost if the
    /// deadline has come.
    Tick,
    /// The store's word on the lease of `owner`, which follows a shared lease (see
    /// `backend/follow.rs`): it follows no more.
    Follow {
        owner: OwnerToken,
        notice: FollowNotice,
    },
    /// A restarted backend actor took over job `job`: report to `backend` from now on. If
    /// that job is over already (its `KeyDone` went to the actor that failed), report again.
    Adopt {
        backend: ActorRef<BackendMsg>,
        key: Arc<str>,
        job: u64,
    },
    /// Release whatever is held (the manager is shutting down), then stop.
    Shutdown,
}

#[cfg(feature = "cluster")]
impl ractor::Message for KeyMsg {}

pub(crate) struct KeyActor;

pub(crate) struct KeyArgs {
    pub(crate) ctx: Arc<BackendCtx>,
    pub(crate) backend: ActorRef<BackendMsg>,
}

pub(crate) struct KeyState {
    ctx: Arc<BackendCtx>,
    /// Where `KeyDone` goes: the backend actor that gave the current job, or the one that
    /// adopted this actor since.
    backend: ActorRef<BackendMsg>,
    /// The job under way (an attempt, then the lease if it was won); `None` while idle.
    job: Option<Job>,
    held: Option<Held>,
    timer: RenewalTimer,
}

struct Job {
    id: u64,
    /// The backend actor's slot (see `AcquireRequest::key`): what `KeyDone` names.
    key: Arc<str>,
    /// The key or semaphore name the caller asked for: what events and errors name.
    name: Arc<str>,
    /// What the lease is taken as, for the metrics.
    primitive: Primitive,
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
    /// When the holder is told of the loss if no renewal got through: a little before the
    /// deadline (half its drift margin), so that the latency of the timer that notices cannot
    /// make the news late.
    lose_at: Instant,
    /// When the timer is armed for: the next renewal, or the loss check.
    tick_at: Instant,
    /// Consecutive failed renewals.
    failures: u32,
    /// The shared lease's clock, while this lease follows one (no renewals, no timer of its
    /// own: the deadline runs from the shared lease's last keep-alive).
    follows: Option<SharedClock>,
    /// The guard's view of this lease.
    status: StatusWriter,
}

impl KeyState {
    /// The key of the job this actor had when it stopped, if any (read from the state ractor
    /// hands the backend actor with the termination event).
    pub(crate) fn job(&self) -> Option<(Arc<str>, u64)> {
        self.job.as_ref().map(|job| (job.key.clone(), job.id))
    }
}

impl Actor for KeyActor {
    type Msg = KeyMsg;
    type State = KeyState;
    type Arguments = KeyArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<KeyMsg>,
        args: KeyArgs,
    ) -> Result<KeyState, ActorProcessingErr> {
        Ok(KeyState {
            ctx: args.ctx,
            backend: args.backend,
            job: None,
            held: None,
            timer: RenewalTimer::start(myself),
        })
    }

    // Every step that waits is boxed for the time it runs. ractor keeps an actor's message
    // loop in one allocation for its whole life, as large as the largest `handle` future:
    // unboxed, the steps made that about 4 KiB for every held lock, 1.7 KiB boxed. Each box
    // but an attempt's is under 1 KiB, which the allocator's per-thread cache serves.
    async fn handle(
        &self,
        myself: ActorRef<KeyMsg>,
        msg: KeyMsg,
        state: &mut KeyState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KeyMsg::Attempt {
                job,
                request,
                reply,
            } => Box::pin(state.attempt(&myself, job, request, reply)).await,
            KeyMsg::Release {
                reason,
                owner,
                reply,
            } => {
                let result = match state.check_owner(owner) {
                    Ok(()) => Box::pin(state.release(&myself, reason)).await,
                    Err(e) => Err(e),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            KeyMsg::Renew { ttl, owner, reply } => {
                let checked = state
                    .check_owner(owner)
                    .and_then(|()| state.ctx.check_ttl(ttl));
                let result = match checked {
                    Ok(()) => Box::pin(state.renew(&myself, Some(ttl))).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            KeyMsg::Proclaim {
                value,
                owner,
                reply,
            } => {
                let result = match state.check_owner(Some(owner)) {
                    Ok(()) => Box::pin(state.proclaim(&myself, &value)).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            KeyMsg::HandOver {
                holder,
                owner,
                reply,
            } => {
                let result = match state.check_owner(Some(owner)) {
                    Ok(()) => state.hand_over(&myself, holder),
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            KeyMsg::Tick => Box::pin(state.tick(&myself)).await,
            KeyMsg::Follow { owner, notice } => {
                Box::pin(state.follow_notice(&myself, owner, notice)).await
            }
            KeyMsg::Adopt { backend, key, job } => {
                state.backend = backend;
                if state.job.as_ref().is_none_or(|current| current.id != job) {
                    // That job ended while no backend actor was there to hear it.
                    let _ = state.backend.cast(BackendMsg::KeyDone {
                        key,
                        job,
                        actor: myself.clone(),
                        requeue: None,
                    });
                }
            }
            KeyMsg::Shutdown => {
                if state.held.is_some() {
                    let _ = Box::pin(state.release(&myself, ReleaseReason::Shutdown)).await;
                }
                myself.stop(None);
            }
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
        // holder stopped or panicked, its locks go at once rather than after the ttl. A late
        // event about the holder of an earlier lease matches no current holder.
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
            let _ = Box::pin(state.release(&myself, ReleaseReason::HolderStopped)).await;
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<KeyMsg>,
        state: &mut KeyState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(held) = state.held.take() {
            // Stopped from outside while still holding: the guard must not go on believing.
            // The store lease expires by itself.
            held.status.send(LeaseStatus::Gone(LostReason::Shutdown));
            if held.follows.is_some() {
                state.ctx.store.unfollow(&held.lease);
            }
            state.ctx.metrics.held_silently_ended(state.primitive());
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
        self.lose_at = lose_at(deadline, self.ttl, drift);
    }

    /// While following a shared lease, brings the deadline up to the shared lease's clock.
    fn catch_up(&mut self, timing: &crate::timing::Timing) {
        if let Some(clock) = &self.follows {
            let deadline = timing.deadline(clock.kept(), self.ttl);
            self.set_deadline(deadline, timing.drift);
        }
    }
}

impl KeyState {
    #[tracing::instrument(level = "debug", name = "acquire_attempt", skip_all, fields(
        backend = %self.ctx.name, key = %request.name, token = tracing::field::Empty,
    ))]
    async fn attempt(
        &mut self,
        myself: &ActorRef<KeyMsg>,
        job: u64,
        request: AcquireRequest,
        reply: AcquireReply,
    ) {
        let ctx = self.ctx.clone();
        self.job = Some(Job {
            id: job,
            key: request.key.clone(),
            name: request.name.clone(),
            primitive: request.primitive(),
        });
        // A campaign (a waiting writer, a fair waiter) keeps its token across attempts: the
        // store's queue (or the writer's intent) knows it by that.
        let owner = match (&request.candidate, &request.fair) {
            (Some(candidate), _) => *candidate,
            (None, Some(entry)) => entry.owner(),
            (None, None) => OwnerToken::random(),
        };
        let sent_at = Instant::now();
        let metadata = request.metadata.as_deref();
        let store = &ctx.store;
        // One attempt always gets its full operation budget, even if it overruns the wait
        // budget: a short wait must still try at least once.
        let (op, attempt) = match (request.permits, request.rw, request.primitive()) {
            (Some(permits), _, _) => {
                let (name, ttl) = (&request.name, request.ttl);
                let attempt = if request.fair.is_some() {
                    store.acquire_permits_fair(name, owner, ttl, permits, metadata)
                } else {
                    store.acquire_permits(name, owner, ttl, permits, metadata)
                };
                (StoreOp::AcquirePermits, attempt)
            }
            (None, Some(mode), _) => {
                let intent = request.intent.is_some();
                let (name, ttl) = (&request.name, request.ttl);
                let attempt = if request.fair.is_some() {
                    store.acquire_rw_fair(name, owner, ttl, mode, metadata)
                } else {
                    store.acquire_rw(name, owner, ttl, mode, intent, metadata)
                };
                (StoreOp::AcquireRw, attempt)
            }
            (None, None, Primitive::Election) => {
                let value = metadata.unwrap_or_default();
                let campaign = store.campaign(&request.key, owner, request.ttl, value);
                (StoreOp::Campaign, campaign)
            }
            (None, None, _) if request.fair.is_some() => (
                StoreOp::AcquireFair,
                store.acquire_fair(&request.name, owner, request.ttl, metadata),
            ),
            (None, None, _) => (
                StoreOp::Acquire,
                store.acquire(&request.key, owner, request.ttl, metadata),
            ),
        };
        let attempt = timeout_at(sent_at + ctx.timing.op_timeout, attempt)
            .await
            .unwrap_or(Err(StoreError::TimedOut {
                op: "acquire",
                after: ctx.timing.op_timeout,
            }));
        let now = Instant::now();
        ctx.answered(op, now - sent_at, &attempt);
        let outcome = match attempt {
            Ok(Acquisition::Acquired(lease)) => {
                let deadline = ctx.timing.deadline(sent_at, request.ttl);
                if now < lose_at(deadline, request.ttl, ctx.timing.drift) {
                    return self.hold(myself, lease, request, sent_at, now, reply);
                }
                // The store's answer came too late to be of use: the lease it granted may
                // already have expired there. Give it back and treat this as a slow store,
                // rather than hand the caller a guard that is not held.
                self.take_back(lease).await;
                Err(StoreError::TimedOut {
                    op: "acquire",
                    after: now - sent_at,
                })
            }
            Ok(Acquisition::Held(contention)) => {
                let primitive = request.primitive();
                ctx.emit(primitive, &request.name, None, LockEventKind::Contended);
                Ok(contention)
            }
            Err(error) => {
                // A timeout or a broken connection may still have let the write through.
                if error.is_retryable() {
                    self.take_back(request.lease_for(owner)).await;
                }
                Err(error)
            }
        };
        self.finish_attempt(myself, request, reply, outcome);
    }

    /// Gives back a lease the caller will not get: it is ours only if the owner token
    /// matches, so this never touches another holder's key. Better than leaving the key held
    /// by nobody until its ttl.
    async fn take_back(&self, lease: Lease) {
        let ctx = &self.ctx;
        let release = ctx
            .metrics
            .timed(StoreOp::Release, ctx.store.release(&lease));
        let _ = timeout_at(Instant::now() + ctx.timing.op_timeout, release).await;
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
        let answer = match outcome {
            Ok(_) if request.tries_once() => Ok(None),
            Err(error) if request.tries_once() || !error.is_retryable() => {
                Err(self.ctx.store_error(error))
            }
            _ if request.out_of_time(now) => Err(request.timeout_error(now)),
            Ok(contention) => {
                let requeue = Requeue {
                    request,
                    reply,
                    contention,
                };
                return self.done(myself, Some(requeue));
            }
            // A waiting request rides out a store outage: it keeps its place in the queue and
            // tries again after a short pause, until its wait budget runs out.
            Err(error) => {
                tracing::debug!(backend = %self.ctx.name, key = %request.name, %error, "acquire attempt failed; will retry");
                let requeue = Requeue {
                    request,
                    reply,
                    contention: Contention::with_remaining_ttl(Some(STORE_RETRY_PAUSE)),
                };
                return self.done(myself, Some(requeue));
            }
        };
        self.done(myself, None);
        let _ = reply.send(answer);
    }

    /// The attempt won: this actor holds the lease from now on.
    fn hold(
        &mut self,
        myself: &ActorRef<KeyMsg>,
        lease: Lease,
        request: AcquireRequest,
        sent_at: Instant,
        now: Instant,
        reply: AcquireReply,
    ) {
        let ctx = &self.ctx;
        let deadline = ctx.timing.deadline(sent_at, request.ttl);
        let (status, status_rx) = status_cell(LeaseStatus::Held {
            deadline,
            ttl: request.ttl,
        });
        for entry in [&request.intent, &request.fair].into_iter().flatten() {
            entry.acquired();
        }
        let token = lease.fencing_token;
        tracing::Span::current().record("token", token);
        ctx.emit(
            request.primitive(),
            &request.name,
            Some(token),
            LockEventKind::Acquired {
                waited: now - request.requested_at,
            },
        );
        let guard = LockGuard::new(
            request.name.clone(),
            ctx.name.clone(),
            lease.owner,
            token,
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
            tick_at: deadline,
            failures: 0,
            follows: None,
            status,
        };
        held.set_deadline(deadline, ctx.timing.drift);
        self.held = Some(held);
        self.schedule_or_follow(myself, sent_at);
        let holder_gone = request
            .holder
            .as_ref()
            .is_some_and(|h| h.get_status() >= ractor::ActorStatus::Stopping);
        if holder_gone {
            // It stopped before the monitor was in place: no event will come for it.
            let _ = myself.cast(KeyMsg::Release {
                reason: ReleaseReason::HolderStopped,
                owner: None,
                reply: None,
            });
        }
        // If the caller has gone, the guard comes back inside the error and its drop
        // releases the lock: nothing is held for nobody.
        let _ = reply.send(Ok(Some(guard)));
    }

    /// After an acquisition or a renewal: follow the shared lease the lease is on, if the
    /// store offers that (no timer then), else arm the timer.
    fn schedule_or_follow(&mut self, myself: &ActorRef<KeyMsg>, last_sent: Instant) {
        if !self.follow(myself) {
            self.schedule(last_sent);
        }
    }

    /// Asks the store to let the lease follow the shared lease it is on; true if it does. The
    /// guard then reads its deadline from the shared lease's clock.
    fn follow(&mut self, myself: &ActorRef<KeyMsg>) -> bool {
        let ctx = &self.ctx;
        let Some(held) = self.held.as_mut() else {
            return false;
        };
        if !held.auto_renew || !ctx.store.can_follow() {
            return false;
        }
        let drift = ctx.timing.drift;
        // From the shared lease's keep-alive to this lease's loss check.
        let lose_after = held.ttl.mul_f64(1.0 - drift) - held.ttl.mul_f64(drift / 2.0);
        let (actor, owner) = (myself.clone(), held.lease.owner);
        let notify = Box::new(move |notice| {
            let _ = actor.cast(KeyMsg::Follow { owner, notice });
        });
        let Some(clock) = ctx.store.follow(&held.lease, held.ttl, lose_after, notify) else {
            return false;
        };
        held.status.send(LeaseStatus::Following {
            clock: clock.clone(),
            span: held.ttl.mul_f64(1.0 - drift),
            ttl: held.ttl,
        });
        held.follows = Some(clock);
        held.catch_up(&ctx.timing);
        self.timer.disarm();
        true
    }

    /// The store's word on a lease that follows a shared one.
    async fn follow_notice(
        &mut self,
        myself: &ActorRef<KeyMsg>,
        owner: OwnerToken,
        notice: FollowNotice,
    ) {
        let timing = self.ctx.timing;
        let Some(held) = self.held.as_mut() else {
            return;
        };
        // A word about an earlier lease of this actor, or one that stopped following since.
        if held.lease.owner != owner || held.follows.is_none() {
            return;
        }
        held.catch_up(&timing);
        held.follows = None;
        match notice {
            FollowNotice::Taken | FollowNotice::SharedLeaseGone => {
                self.lose(myself, LostReason::NotOwner).await;
            }
            FollowNotice::SharedLeaseExpired => {
                self.lose(myself, LostReason::Expired).await;
            }
            // Renew on its own from now, at once: the renewal checks the key, and follows
            // again once the store can vouch for it.
            _ => {
                let (deadline, ttl) = (held.deadline, held.ttl);
                held.status.send(LeaseStatus::Held { deadline, ttl });
                let now = Instant::now();
                held.tick_at = now;
                self.timer.arm(now);
            }
        }
    }

    /// Arms the timer: the next renewal (ttl/3 after the last one was sent) if auto-renew is
    /// on, else the loss check just before the deadline. Never later than that check.
    fn schedule(&mut self, last_sent: Instant) {
        let Some(held) = self.held.as_mut() else {
            return;
        };
        let at = if held.auto_renew {
            let due = if held.failures == 0 {
                // On the process's renewal grid, so renewals due together fire together.
                let step = held.ttl / 3;
                crate::timing::renewal_slot(last_sent + step, step)
            } else {
                // Retry quickly, several times before the deadline.
                last_sent + (held.ttl / 12).max(Duration::from_millis(1))
            };
            due.min(held.lose_at)
        } else {
            held.lose_at
        };
        held.tick_at = at;
        self.timer.arm(at);
    }

    async fn tick(&mut self, myself: &ActorRef<KeyMsg>) {
        let Some(held) = self.held.as_ref() else {
            return;
        };
        if held.follows.is_some() {
            return; // a tick armed before the lease began to follow
        }
        let now = Instant::now();
        if now >= held.lose_at {
            self.lose(myself, LostReason::Expired).await;
        } else if now < held.tick_at {
            // A tick armed for an earlier lease, or before a manual renewal moved the
            // schedule: arm again for the current one.
            self.timer.arm(held.tick_at);
        } else if held.auto_renew {
            let _ = self.renew(myself, None).await;
        } else {
            self.schedule(now);
        }
    }

    /// One renewal, bounded by the loss check: a store that hangs cannot keep the holder
    /// believing past the deadline.
    #[tracing::instrument(level = "debug", name = "renew", skip_all, fields(
        backend = %self.ctx.name, key = self.job_name(), token = self.token(),
    ))]
    async fn renew(&mut self, myself: &ActorRef<KeyMsg>, ttl: Option<Duration>) -> Result<()> {
        let ctx = self.ctx.clone();
        let primitive = self.primitive();
        let Some(held) = self.held.as_mut() else {
            return Err(self.not_held());
        };
        if let Some(ttl) = ttl {
            held.ttl = ttl;
        }
        if held.follows.is_some() {
            // Renewed by hand: on its own, then (with the new ttl) following again.
            held.catch_up(&ctx.timing);
            held.follows = None;
            ctx.store.unfollow(&held.lease);
        }
        let sent_at = Instant::now();
        let token = held.lease.fencing_token;
        let renewing = ctx.store.renew_from(&held.lease, held.ttl, sent_at);
        let renewed = timeout_at(held.lose_at, renewing).await;
        let took = sent_at.elapsed();
        ctx.metrics.renewal(primitive, took);
        match &renewed {
            Ok(outcome) => ctx.answered(StoreOp::Renew, took, outcome),
            Err(_) => ctx.answered::<()>(
                StoreOp::Renew,
                took,
                &Err(StoreError::TimedOut {
                    op: "renew",
                    after: took,
                }),
            ),
        }
        match renewed {
            Ok(Ok(Some(from))) => {
                held.failures = 0;
                held.set_deadline(ctx.timing.deadline(from, held.ttl), ctx.timing.drift);
                let (deadline, ttl) = (held.deadline, held.ttl);
                held.status.send(LeaseStatus::Held { deadline, ttl });
                if let Some(job) = &self.job {
                    let renewed = LockEventKind::Renewed { deadline };
                    ctx.emit(primitive, &job.name, Some(token), renewed);
                }
                self.schedule_or_follow(myself, sent_at);
                Ok(())
            }
            Ok(Ok(None)) => Err(self.lose(myself, LostReason::NotOwner).await),
            Ok(Err(error)) => {
                held.failures += 1;
                let attempt = held.failures;
                // The key is read only here, on the failure path: a successful renewal copies
                // nothing.
                let key = self
                    .job
                    .as_ref()
                    .map_or_else(|| "".into(), |job| job.name.clone());
                ctx.emit(
                    primitive,
                    &key,
                    Some(token),
                    LockEventKind::RenewFailed {
                        attempt,
                        error: error.clone(),
                    },
                );
                self.schedule(Instant::now());
                Err(ctx.store_error(error))
            }
            Err(_deadline_passed) => Err(self.lose(myself, LostReason::Expired).await),
        }
    }

    /// The lease can no longer be trusted: the backend actor hears first (so whatever the
    /// holder does next finds the key free on this node), then the holder.
    async fn lose(&mut self, myself: &ActorRef<KeyMsg>, reason: LostReason) -> Error {
        let Some(mut held) = self.held.take() else {
            return self.not_held();
        };
        held.catch_up(&self.ctx.timing);
        let key = self.shared_job_name();
        let primitive = self.primitive();
        let error = Error::LeaseLost {
            key: key.to_string(),
            reason,
        };
        self.stop_holding(myself, &held);
        self.done(myself, None);
        held.status.send(LeaseStatus::Gone(reason));
        self.ctx.emit(
            primitive,
            &key,
            Some(held.lease.fencing_token),
            LockEventKind::Lost { reason },
        );
        if reason == LostReason::Expired {
            // Our deadline runs ahead of the store's expiry by the drift margin: if the lease
            // is still ours there, give it back now instead of making the next holder wait.
            // Past the store's expiry there is nothing to give back, so a stalled store cannot
            // hold this actor (and a shutdown waiting for it) any longer than that. Unless the
            // store keeps the key past its ttl (a session lease): then only this delete frees
            // it, and it gets the whole budget.
            let store_expiry = held.deadline + held.ttl.mul_f64(self.ctx.timing.drift);
            let mut budget = Instant::now() + self.ctx.timing.op_timeout;
            if !self.ctx.store.keys_outlive_ttl() {
                budget = budget.min(store_expiry);
            }
            let ctx = &self.ctx;
            let release = ctx
                .metrics
                .timed(StoreOp::Release, ctx.store.release(&held.lease));
            let _ = timeout_at(budget, release).await;
        }
        error
    }

    #[tracing::instrument(level = "debug", name = "release", skip_all, fields(
        backend = %self.ctx.name, key = self.job_name(), token = self.token(), ?reason,
    ))]
    async fn release(&mut self, myself: &ActorRef<KeyMsg>, reason: ReleaseReason) -> Result<()> {
        let Some(held) = self.held.take() else {
            return Err(self.not_held());
        };
        let key = self.shared_job_name();
        let primitive = self.primitive();
        let ctx = self.ctx.clone();
        let token = held.lease.fencing_token;
        self.stop_holding(myself, &held);
        let sent_at = Instant::now();
        let released = timeout_at(
            sent_at + ctx.timing.op_timeout,
            ctx.store.release(&held.lease),
        )
        .await
        .unwrap_or(Err(StoreError::TimedOut {
            op: "release",
            after: ctx.timing.op_timeout,
        }));
        let now = Instant::now();
        ctx.answered(StoreOp::Release, now - sent_at, &released);
        // Free on this node before anyone is answered.
        self.done(myself, None);
        if let Ok(false) = released {
            // It was taken away between renewals, and nobody had noticed yet: a loss, not a
            // release.
            let reason = LostReason::NotOwner;
            held.status.send(LeaseStatus::Gone(reason));
            ctx.emit(primitive, &key, Some(token), LockEventKind::Lost { reason });
            return Err(Error::LeaseLost {
                key: key.to_string(),
                reason,
            });
        }
        let status = match reason {
            ReleaseReason::Shutdown => LeaseStatus::Gone(LostReason::Shutdown),
            ReleaseReason::HolderStopped => LeaseStatus::Gone(LostReason::HolderStopped),
            _ => LeaseStatus::Released,
        };
        held.status.send(status);
        ctx.emit(
            primitive,
            &key,
            Some(token),
            LockEventKind::Released {
                held_for: now - held.acquired_at,
                reason,
            },
        );
        // A store error leaves the lease to expire in the store by itself; the caller still
        // learns the release did not reach it.
        released.map(drop).map_err(|error| ctx.store_error(error))
    }

    /// Replaces the value stored with the lease (an election leader's value).
    async fn proclaim(&mut self, myself: &ActorRef<KeyMsg>, value: &str) -> Result<()> {
        let ctx = self.ctx.clone();
        let not_held = self.not_held();
        let Some(held) = self.held.as_mut() else {
            return Err(not_held);
        };
        held.catch_up(&ctx.timing);
        let proclaim = ctx
            .metrics
            .timed(StoreOp::Proclaim, ctx.store.proclaim(&held.lease, value));
        let proclaimed = timeout_at(held.lose_at, proclaim).await;
        match proclaimed {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(self.lose(myself, LostReason::NotOwner).await),
            Ok(Err(error)) => Err(ctx.store_error(error)),
            Err(_deadline_passed) => Err(self.lose(myself, LostReason::Expired).await),
        }
    }

    /// Monitors `holder` instead of the current holder (if any); the lease stays as it is.
    fn hand_over(&mut self, myself: &ActorRef<KeyMsg>, holder: ActorCell) -> Result<()> {
        let not_held = self.not_held();
        let Some(held) = self.held.as_mut() else {
            return Err(not_held);
        };
        // The new one first: there is no moment when nobody is watched.
        myself.get_cell().monitor(holder.clone());
        if let Some(old) = held.holder.replace(holder.clone()) {
            if old.get_id() != holder.get_id() {
                myself.get_cell().unmonitor(old);
            }
        }
        let token = held.lease.fencing_token;
        let (primitive, key) = (self.primitive(), self.shared_job_name());
        self.ctx
            .emit(primitive, &key, Some(token), LockEventKind::HandedOver);
        if holder.get_status() >= ractor::ActorStatus::Stopping {
            // It stopped before the monitor was in place: no event will come for it.
            let _ = myself.cast(KeyMsg::Release {
                reason: ReleaseReason::HolderStopped,
                owner: None,
                reply: None,
            });
        }
        Ok(())
    }

    fn check_owner(&self, owner: Option<OwnerToken>) -> Result<()> {
        match (&self.held, owner) {
            (Some(held), Some(owner)) if held.lease.owner != owner => Err(self.not_held()),
            (None, Some(_)) => Err(self.not_held()),
            _ => Ok(()),
        }
    }

    fn not_held(&self) -> Error {
        Error::NotHeld {
            key: self.job.as_ref().map_or("", |job| &job.name).to_owned(),
        }
    }

    /// What the lease of the job under way is taken as (a lock while idle).
    fn primitive(&self) -> Primitive {
        self.job
            .as_ref()
            .map_or(Primitive::Mutex, |job| job.primitive)
    }

    /// The name of the job under way, for spans ("" while idle).
    fn job_name(&self) -> &str {
        self.job.as_ref().map_or("", |job| &job.name)
    }

    /// The fencing token of the lease held, for spans (0 when none is).
    fn token(&self) -> u64 {
        self.held
            .as_ref()
            .map_or(0, |held| held.lease.fencing_token)
    }

    /// The name of the job under way (the lock's key, the semaphore's name), shared, for
    /// errors and events ("" while idle). Not the backend actor's slot key, which for a
    /// semaphore's permit is a key of its own.
    fn shared_job_name(&self) -> Arc<str> {
        self.job
            .as_ref()
            .map_or_else(|| "".into(), |job| job.name.clone())
    }

    /// The lease is over: no more ticks, no more holder to watch.
    fn stop_holding(&mut self, myself: &ActorRef<KeyMsg>, held: &Held) {
        self.timer.disarm();
        if held.follows.is_some() {
            self.ctx.store.unfollow(&held.lease);
        }
        if let Some(holder) = &held.holder {
            myself.get_cell().unmonitor(holder.clone());
        }
    }

    /// Ends the current job: tells the backend actor, with the request to queue again if
    /// there is one. This actor is idle from here on, until its backend gives it another job.
    /// If the backend actor is gone, the request goes with the message, and its caller (who
    /// sees its reply port close) asks the backend's next actor.
    fn done(&mut self, myself: &ActorRef<KeyMsg>, requeue: Option<Requeue>) {
        let Some(job) = self.job.take() else {
            return;
        };
        let _ = self.backend.cast(BackendMsg::KeyDone {
            key: job.key,
            job: job.id,
            actor: myself.clone(),
            requeue,
        });
    }
}

/// When a lease whose deadline is `deadline` is reported lost if no renewal got through.
fn lose_at(deadline: Instant, ttl: Duration, drift: f64) -> Instant {
    deadline - ttl.mul_f64(drift / 2.0)
}
