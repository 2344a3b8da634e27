//! What a backend actor is asked: an acquisition request, checked before any I/O, and the
//! reply ports of the requests it answers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ractor::{ActorCell, ActorId, RpcReplyPort};
use tokio::time::Instant;

use crate::backend::{Contention, Lease, LockInfo, OwnerToken, Permits, RwMode};
use crate::backend_ctx::BackendCtx;
use crate::error::{Error, Result, StoreError};
use crate::event::LockEventKind;
use crate::guard::LockGuard;
use crate::metrics::{Primitive, StoreOp};
use crate::options::{validate_key, Caller, LockOptions, Wait};

/// What follows the NUL in the slot of a fair lock's request (see `AcquireRequest::key`).
pub(crate) const FAIR_LOCK_SLOT: &str = "f";

/// One acquisition request, validated and resolved to a backend.
#[derive(Clone)]
pub(crate) struct AcquireRequest {
    /// The backend actor's slot for this request: the key, for a lock; for a semaphore's
    /// permits, a slot of this request's own (the name, a NUL, a number), since one node may
    /// hold several leases of one semaphore at once.
    pub(crate) key: Arc<str>,
    /// What the caller asked for: the key, or the semaphore's name.
    pub(crate) name: Arc<str>,
    /// Set for a semaphore's permits.
    pub(crate) permits: Option<Permits>,
    /// Set for a read-write lock's read share or write hold.
    pub(crate) rw: Option<RwMode>,
    /// Set for a writer that waits: withdraws its intent from the store when the last copy
    /// of the request goes without having acquired (it timed out, its caller went away).
    pub(crate) intent: Option<Arc<QueueEntry>>,
    /// Set for a fair request (a lock's, a semaphore's, a read-write lock's): its place in
    /// the store's queue, under its own token (kept across attempts; a writer's is its
    /// `candidate`), withdrawn as a writer's intent is.
    pub(crate) fair: Option<Arc<QueueEntry>>,
    pub(crate) ttl: Duration,
    pub(crate) wait: Wait,
    /// When a waiting request gives up (`None`: try once, or wait forever).
    pub(crate) deadline: Option<Instant>,
    pub(crate) auto_renew: bool,
    pub(crate) holder: Option<ActorCell>,
    pub(crate) metadata: Option<String>,
    /// The candidate's token when this is an election's campaign, or a waiting writer's
    /// (see `LockOptions`).
    pub(crate) candidate: Option<OwnerToken>,
    pub(crate) requested_at: Instant,
}

impl AcquireRequest {
    /// What this request takes a lease as.
    pub(crate) fn primitive(&self) -> Primitive {
        Primitive::of(
            self.permits.is_some(),
            self.rw.is_some(),
            self.candidate.is_some(),
        )
    }

    /// Every check that needs no I/O, then the request as the backend actor takes it. The
    /// `caller` decides the wait when `options` leave it unset.
    pub(crate) fn new(
        ctx: &Arc<BackendCtx>,
        key: &str,
        options: LockOptions,
        caller: Caller,
    ) -> Result<Self> {
        validate_key(key)?;
        options.validate()?;
        if options.fair {
            check_fair(ctx, &options)?;
        }
        let requested_at = Instant::now();
        let wait = caller.wait(options.wait);
        // A budget too long for the clock is no budget: wait forever.
        let deadline = match wait {
            Wait::UpTo(budget) => requested_at.checked_add(budget),
            _ => None,
        };
        let name: Arc<str> = key.into();
        // One node may hold several permits or read shares of one name at once: each such
        // request has a slot of its own. NUL is in no valid key, so no lock's slot is ever
        // one of these.
        // So may a fair lock's waiters: each one is in the store's queue from its first
        // attempt, so each attempts (and waits) for itself, not behind this node's first.
        // A fair lock's slot is marked apart (`\0f`), so that the search for a holder's other
        // requests for the lock (in the backend actor) passes over its permits and shares.
        let key = if options.permits.is_some() || options.rw.is_some() || options.fair {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let lock = options.permits.is_none() && options.rw.is_none();
            format!("{name}\0{}{n}", if lock { FAIR_LOCK_SLOT } else { "" }).into()
        } else {
            name.clone()
        };
        // A writer that waits leaves an intent in the store (by its stable token) that
        // blocks new readers; it must not outlive the wait.
        // A fair writer's place in the queue is its intent: it leaves no other (an unfair
        // intent would keep out the fair readers ahead of it).
        let intent = match (options.rw, options.candidate) {
            (Some(RwMode::Write), Some(owner)) if wait != Wait::No && !options.fair => {
                Some(QueueEntry::new(ctx, &name, owner, Queue::WriterIntents))
            }
            _ => None,
        };
        // A fair request that tries once takes a place too (an attempt at the store cannot
        // look without queueing), and gives it back at once when it does not win.
        let queue = match (options.permits, options.rw) {
            (Some(_), _) => Queue::PermitWaiters,
            (None, Some(_)) => Queue::RwWaiters,
            (None, None) => Queue::Waiters,
        };
        // A writer's place goes by the token it attempts with (its `candidate`).
        let fair = options.fair.then(|| {
            let owner = options.candidate.unwrap_or_else(OwnerToken::random);
            QueueEntry::new(ctx, &name, owner, queue)
        });
        let request = AcquireRequest {
            key,
            name,
            permits: options.permits,
            rw: options.rw,
            intent,
            fair,
            ttl: options.ttl,
            wait,
            deadline,
            auto_renew: options.auto_renew,
            holder: options.holder,
            metadata: options.metadata,
            candidate: options.candidate,
            requested_at,
        };
        ctx.emit(
            request.primitive(),
            &request.name,
            None,
            LockEventKind::Requested,
        );
        Ok(request)
    }

    pub(crate) fn tries_once(&self) -> bool {
        self.wait == Wait::No
    }

    /// Whether the wait budget has run out by `now` (never, for one that waits forever or
    /// tries once).
    pub(crate) fn out_of_time(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|deadline| deadline <= now)
    }

    pub(crate) fn timeout_error(&self, now: Instant) -> Error {
        Error::Timeout {
            key: self.name.to_string(),
            waited: now - self.requested_at,
        }
    }

    /// The lease this request would hold for `owner`, before the store gave it a token (to
    /// give back an attempt whose outcome is unknown).
    pub(crate) fn lease_for(&self, owner: OwnerToken) -> Lease {
        let mut lease = Lease::new(self.name.to_string(), owner, 0);
        lease.permits = self.permits;
        lease.rw = self.rw;
        lease
    }

    pub(crate) fn holder_id(&self) -> Option<ActorId> {
        self.holder.as_ref().map(ActorCell::get_id)
    }
}

/// Refuses a fair request the store (or the primitive) cannot serve fairly, before any I/O.
fn check_fair(ctx: &BackendCtx, options: &LockOptions) -> Result<()> {
    let unsupported = |op| {
        Err(ctx.store_error(StoreError::Unsupported {
            store: ctx.store.kind(),
            op,
        }))
    };
    if options.permits.is_some() {
        if !ctx.store.supports_fair_permits() {
            return unsupported("fair waiting for semaphores");
        }
        return Ok(());
    }
    if options.rw.is_some() {
        if !ctx.store.supports_fair_rw() {
            return unsupported("fair waiting for read-write locks");
        }
        return Ok(());
    }
    if options.candidate.is_some() {
        // An election's campaign waits in the store's queue already.
        return unsupported("fair waiting for elections (a campaign is always queued)");
    }
    if !ctx.store.supports_fair() {
        return unsupported("fair waiting (a store without a waiters' queue)");
    }
    Ok(())
}

/// Which queue in the store a [`QueueEntry`] is in.
#[derive(Clone, Copy)]
pub(crate) enum Queue {
    /// A read-write lock's waiting writers (`withdraw_writer`).
    WriterIntents,
    /// A lock's fair waiters, which an election's candidates share (`withdraw`).
    Waiters,
    /// A semaphore's fair waiters (`withdraw_permits`).
    PermitWaiters,
    /// A read-write lock's fair readers and writers (`withdraw_rw_waiter`).
    RwWaiters,
}

/// A waiting request's entry in a queue in the store (a waiting writer's intent, a fair
/// waiter's place), withdrawn when its request ends without the lease (from a short task: a
/// drop cannot wait for the store). The store drops the entry itself when its owner
/// acquires, and at its ttl if the withdrawal never lands.
pub(crate) struct QueueEntry {
    ctx: Weak<BackendCtx>,
    name: Arc<str>,
    owner: OwnerToken,
    queue: Queue,
    acquired: AtomicBool,
}

impl QueueEntry {
    fn new(ctx: &Arc<BackendCtx>, name: &Arc<str>, owner: OwnerToken, queue: Queue) -> Arc<Self> {
        Arc::new(QueueEntry {
            ctx: Arc::downgrade(ctx),
            name: name.clone(),
            owner,
            queue,
            acquired: AtomicBool::new(false),
        })
    }

    /// The token the entry is known by in the store: the request's owner token on every
    /// attempt.
    pub(crate) fn owner(&self) -> OwnerToken {
        self.owner
    }

    /// The request holds the lease: its entry went with the grant, nothing to withdraw.
    pub(crate) fn acquired(&self) {
        self.acquired.store(true, Ordering::SeqCst);
    }
}

impl Drop for QueueEntry {
    fn drop(&mut self) {
        if self.acquired.load(Ordering::SeqCst) {
            return;
        }
        let Some(ctx) = self.ctx.upgrade() else {
            return; // the manager is gone: the intent runs out at its ttl
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (name, owner, queue) = (self.name.clone(), self.owner, self.queue);
        runtime.spawn(async move {
            let budget = ctx.timing.op_timeout;
            let failed = match queue {
                Queue::WriterIntents => {
                    let withdraw = ctx.store.withdraw_writer(&name, owner);
                    let withdrawn = ctx.metrics.timed(StoreOp::WithdrawWriter, withdraw);
                    tokio::time::timeout(budget, withdrawn).await
                }
                Queue::Waiters => {
                    let withdraw = ctx.store.withdraw(&name, owner);
                    let withdrawn = ctx.metrics.timed(StoreOp::Withdraw, withdraw);
                    tokio::time::timeout(budget, withdrawn).await
                }
                Queue::PermitWaiters => {
                    let withdraw = ctx.store.withdraw_permits(&name, owner);
                    let withdrawn = ctx.metrics.timed(StoreOp::Withdraw, withdraw);
                    tokio::time::timeout(budget, withdrawn).await
                }
                Queue::RwWaiters => {
                    let withdraw = ctx.store.withdraw_rw_waiter(&name, owner);
                    let withdrawn = ctx.metrics.timed(StoreOp::Withdraw, withdraw);
                    tokio::time::timeout(budget, withdrawn).await
                }
            };
            if let Ok(Err(error)) = failed {
                tracing::debug!(%name, %error, "withdrawing a queue entry failed; it runs out at its ttl");
            }
        });
    }
}

pub(crate) type AcquireReply = RpcReplyPort<Result<Option<LockGuard>>>;

/// A waiting request whose attempt found the key held elsewhere (or the store failing): it
/// goes back to the front of the key's queue, and waits as `contention` says.
pub(crate) struct Requeue {
    pub(crate) request: AcquireRequest,
    pub(crate) reply: AcquireReply,
    pub(crate) contention: Contention,
}

/// Who asked about a key: `info` wants the whole answer, `is_locked` only whether there is one.
pub(crate) enum InspectReply {
    Info(RpcReplyPort<Result<Option<LockInfo>>>),
    IsLocked(RpcReplyPort<Result<bool>>),
}

impl InspectReply {
    pub(crate) fn send(self, answer: Result<Option<LockInfo>>) {
        let _ = match self {
            InspectReply::Info(reply) => reply.send(answer).is_ok(),
            InspectReply::IsLocked(reply) => reply.send(answer.map(|info| info.is_some())).is_ok(),
        };
    }
}
