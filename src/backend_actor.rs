//! `BackendActor`: one per configured backend service. It owns the per-key FIFO queues of local
//! waiters and at most one release subscription per contended key, and spawns a `KeyActor` for
//! each acquisition attempt. Store I/O happens in the key actors (and in short request tasks),
//! never in this actor's handler, so one slow key cannot stall the others.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, ActorRuntime, RpcReplyPort,
    SupervisionEvent,
};
use rand::Rng;
use tokio::time::{timeout, Instant};

use crate::backend::{Contention, LockBackend, LockInfo, OwnerToken};
use crate::error::{Error, Result, StoreError};
use crate::event::{EventBus, LockEventKind, ReleaseReason};
use crate::guard::LockGuard;
use crate::key_actor::{KeyActor, KeyArgs, KeyMsg, KeyState};
use crate::options::{validate_key, LockOptions, Wait};
use crate::task::AbortOnDrop;

/// What a backend actor and its key actors share: the store, where events go, the timing.
pub(crate) struct BackendCtx {
    pub(crate) name: Arc<str>,
    pub(crate) store: Arc<dyn LockBackend>,
    pub(crate) events: Arc<EventBus>,
    pub(crate) timing: Timing,
    /// The running backend actor, `None` while it is down. Kept here, beside the store, so
    /// that `LockClient`s send acquisitions straight to it: one actor hop less on the hot
    /// path than routing each one through the manager.
    actor: RwLock<Option<ActorRef<BackendMsg>>>,
}

impl BackendCtx {
    pub(crate) fn new(
        name: Arc<str>,
        store: Arc<dyn LockBackend>,
        events: Arc<EventBus>,
        timing: Timing,
    ) -> Self {
        BackendCtx {
            name,
            store,
            events,
            timing,
            actor: RwLock::new(None),
        }
    }

    /// The running backend actor, if it is up.
    pub(crate) fn actor(&self) -> Option<ActorRef<BackendMsg>> {
        self.actor.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the backend actor that now serves this backend (`None`: it is down).
    pub(crate) fn set_actor(&self, actor: Option<ActorRef<BackendMsg>>) {
        *self.actor.write().unwrap_or_else(|e| e.into_inner()) = actor;
    }

    pub(crate) fn emit(&self, key: &Arc<str>, fencing_token: Option<u64>, kind: LockEventKind) {
        self.events.emit(&self.name, Some(key), fencing_token, kind);
    }

    pub(crate) fn store_error(&self, source: StoreError) -> Error {
        Error::Store {
            backend: self.name.to_string(),
            source,
        }
    }
}

/// The time rules of DESIGN.md section 4.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Fraction of the ttl held back for clock drift between this node and the store.
    pub(crate) drift: f64,
    /// Budget for one store operation (acquire attempt, release, inspect).
    pub(crate) op_timeout: Duration,
    /// Longest a waiter sleeps before re-checking a key without a release notice.
    pub(crate) backstop_cap: Duration,
}

impl Timing {
    /// `deadline = sent_at + ttl × (1 − drift)`, on the monotonic clock, from when the request
    /// that set the ttl was sent.
    pub(crate) fn deadline(&self, sent_at: Instant, ttl: Duration) -> Instant {
        sent_at + ttl.mul_f64(1.0 - self.drift)
    }
}

/// One acquisition request, validated and resolved to a backend.
pub(crate) struct AcquireRequest {
    pub(crate) key: Arc<str>,
    pub(crate) ttl: Duration,
    pub(crate) wait: Wait,
    /// When a waiting request gives up (`None`: try once, or wait forever).
    pub(crate) deadline: Option<Instant>,
    pub(crate) auto_renew: bool,
    pub(crate) holder: Option<ActorCell>,
    pub(crate) metadata: Option<String>,
    pub(crate) requested_at: Instant,
}

impl AcquireRequest {
    /// Every check that needs no I/O, then the request as the backend actor takes it.
    /// `options.wait` unset means try once.
    pub(crate) fn new(ctx: &BackendCtx, key: &str, options: LockOptions) -> Result<Self> {
        validate_key(key)?;
        options.validate()?;
        let requested_at = Instant::now();
        let wait = options.wait.unwrap_or(Wait::No);
        let deadline = match wait {
            Wait::UpTo(budget) => Some(requested_at + budget),
            _ => None,
        };
        let key: Arc<str> = key.into();
        ctx.emit(&key, None, LockEventKind::Requested);
        Ok(AcquireRequest {
            key,
            ttl: options.ttl,
            wait,
            deadline,
            auto_renew: options.auto_renew,
            holder: options.holder,
            metadata: options.metadata,
            requested_at,
        })
    }

    pub(crate) fn tries_once(&self) -> bool {
        self.wait == Wait::No
    }

    pub(crate) fn timeout_error(&self, now: Instant) -> Error {
        Error::Timeout {
            key: self.key.to_string(),
            waited: now - self.requested_at,
        }
    }

    fn holder_id(&self) -> Option<ActorId> {
        self.holder.as_ref().map(ActorCell::get_id)
    }
}

/// A waiting request whose attempt found the key held elsewhere, with what the attempt learned.
pub(crate) type Requeue = (AcquireRequest, AcquireReply, Contention);

type TimerResult = std::result::Result<(), ractor::MessagingErr<BackendMsg>>;

pub(crate) type AcquireReply = RpcReplyPort<Result<Option<LockGuard>>>;

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

pub(crate) enum BackendMsg {
    Acquire(AcquireRequest, AcquireReply),
    Inspect(Arc<str>, InspectReply),
    Release {
        key: Arc<str>,
        owner: OwnerToken,
        reply: RpcReplyPort<Result<()>>,
    },
    Renew {
        key: Arc<str>,
        owner: OwnerToken,
        ttl: Duration,
        reply: RpcReplyPort<Result<()>>,
    },
    /// The key may be free: a release notice, a subscription that just became active, or the
    /// backstop timer.
    Wake(Arc<str>),
    WaiterTimedOut(Arc<str>, u64),
    /// Release every held lock, fail every waiter, and answer when the key actors stopped.
    Shutdown(RpcReplyPort<()>),
}

#[cfg(feature = "cluster")]
impl ractor::Message for BackendMsg {}

pub(crate) struct BackendActor;

pub(crate) struct BackendState {
    ctx: Arc<BackendCtx>,
    slots: HashMap<Arc<str>, Slot>,
    /// Key actor → its key, to clean up after a key actor that panicked.
    children: HashMap<ActorId, Arc<str>>,
    next_waiter: u64,
    /// Set by `Shutdown`: requests still in flight are answered "manager stopped".
    stopping: bool,
}

/// A key this node is attempting, holding or waiting for.
#[derive(Default)]
struct Slot {
    /// The key actor attempting or holding the key; at most one per key per node, so local
    /// waiters never race each other at the store.
    busy: Option<Busy>,
    /// Local waiters, served first come first served.
    waiters: VecDeque<Waiter>,
    /// The key's one release subscription, while it has waiters.
    watch: Option<AbortOnDrop<()>>,
    /// A wake came while an attempt was in flight: if that attempt finds the key held, the
    /// release it raced with may be the one that notice was about, so it looks again at once.
    woken: bool,
    /// Re-checks the key when no notice comes (a lease that expires publishes nothing).
    backstop: Option<AbortOnDrop<TimerResult>>,
}

struct Busy {
    actor: ActorRef<KeyMsg>,
    holder: Option<ActorId>,
    /// Set by the key actor once it has let the key go (before it answers anyone; its
    /// termination event comes later).
    done: Arc<AtomicBool>,
}

impl Slot {
    /// Forgets a key actor that has let the key go, without waiting for its termination.
    fn settle(&mut self) {
        if self
            .busy
            .as_ref()
            .is_some_and(|b| b.done.load(Ordering::Acquire))
        {
            self.busy = None;
        }
    }
}

struct Waiter {
    id: u64,
    request: AcquireRequest,
    reply: AcquireReply,
    _timeout: Option<AbortOnDrop<TimerResult>>,
}

impl Actor for BackendActor {
    type Msg = BackendMsg;
    type State = BackendState;
    type Arguments = Arc<BackendCtx>;

    async fn pre_start(
        &self,
        _myself: ActorRef<BackendMsg>,
        ctx: Arc<BackendCtx>,
    ) -> Result<BackendState, ActorProcessingErr> {
        Ok(BackendState {
            ctx,
            slots: HashMap::new(),
            children: HashMap::new(),
            next_waiter: 0,
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<BackendMsg>,
        msg: BackendMsg,
        state: &mut BackendState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BackendMsg::Acquire(request, reply) => state.acquire(&myself, request, reply),
            BackendMsg::Inspect(key, reply) => state.inspect(key, reply),
            BackendMsg::Release { key, owner, reply } => {
                let msg = |reply| KeyMsg::Release {
                    reason: ReleaseReason::Requested,
                    owner: Some(owner),
                    reply: Some(reply),
                };
                state.forward(&key, reply, msg);
            }
            BackendMsg::Renew {
                key,
                owner,
                ttl,
                reply,
            } => {
                let msg = |reply| KeyMsg::Renew {
                    ttl,
                    owner: Some(owner),
                    reply,
                };
                state.forward(&key, reply, msg);
            }
            BackendMsg::Wake(key) => state.wake(&myself, &key),
            BackendMsg::WaiterTimedOut(key, id) => state.waiter_timed_out(&key, id),
            BackendMsg::Shutdown(reply) => {
                state.shutdown().await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<BackendMsg>,
        event: SupervisionEvent,
        state: &mut BackendState,
    ) -> Result<(), ActorProcessingErr> {
        // A key actor is done: it released, lost, or failed to acquire; its final state says
        // whether its request still waits. This actor carries on either way (ractor's default
        // would stop it with its child).
        let (cell, requeue) = match event {
            SupervisionEvent::ActorTerminated(cell, last_state, _) => {
                let requeue = last_state
                    .and_then(|mut last| last.take::<KeyState>().ok())
                    .and_then(|mut last| last.requeue.take());
                (cell, requeue)
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                tracing::error!(backend = %state.ctx.name, %error, "key actor failed");
                (cell, None)
            }
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if let Some(key) = state.children.remove(&id) {
            state.finished(&myself, key, id, requeue);
        }
        Ok(())
    }
}

impl BackendState {
    fn acquire(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        request: AcquireRequest,
        reply: AcquireReply,
    ) {
        if self.stopping {
            let _ = reply.send(Err(Error::ManagerStopped));
            return;
        }
        let slot = self.slots.entry(request.key.clone()).or_default();
        slot.settle();
        if let Some(holder) = request.holder_id() {
            let busy_for_holder = slot.busy.as_ref().is_some_and(|b| b.holder == Some(holder));
            if busy_for_holder
                || slot
                    .waiters
                    .iter()
                    .any(|w| w.request.holder_id() == Some(holder))
            {
                let _ = reply.send(Err(Error::AlreadyHeld {
                    backend: self.ctx.name.to_string(),
                    key: request.key.to_string(),
                }));
                return;
            }
        }
        if slot.busy.is_none() && slot.waiters.is_empty() {
            self.start_attempt(myself, request, reply);
            return;
        }
        // Held or being attempted on this node, or others are queued before this request: no
        // store round trip can succeed before they are done.
        self.ctx.emit(&request.key, None, LockEventKind::Contended);
        if request.tries_once() {
            let _ = reply.send(Ok(None));
        } else {
            self.enqueue(myself, request, reply, false);
        }
    }

    fn start_attempt(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        request: AcquireRequest,
        reply: AcquireReply,
    ) {
        let key = request.key.clone();
        let holder = request.holder_id();
        let done = Arc::new(AtomicBool::new(false));
        let args = KeyArgs {
            ctx: self.ctx.clone(),
            done: done.clone(),
            request,
            reply,
        };
        // Not waiting for the key actor's `pre_start` keeps this actor's loop free; the
        // attempt itself runs in the key actor's `post_start`.
        match ActorRuntime::spawn_linked_instant(None, KeyActor, args, myself.get_cell()) {
            Ok((actor, _start)) => {
                self.children.insert(actor.get_id(), key.clone());
                let slot = self.slots.entry(key).or_default();
                slot.woken = false;
                slot.busy = Some(Busy {
                    actor,
                    holder,
                    done,
                });
            }
            // Only a name clash can fail an instant spawn, and key actors have no names.
            Err(error) => {
                tracing::error!(backend = %self.ctx.name, %key, %error, "could not spawn key actor")
            }
        }
    }

    fn enqueue(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        request: AcquireRequest,
        reply: AcquireReply,
        front: bool,
    ) {
        let id = self.next_waiter;
        self.next_waiter += 1;
        let timeout = request.deadline.map(|deadline| {
            let key = request.key.clone();
            let delay = deadline.saturating_duration_since(Instant::now());
            AbortOnDrop(myself.send_after(delay, move || BackendMsg::WaiterTimedOut(key, id)))
        });
        let slot = self.slots.entry(request.key.clone()).or_default();
        let waiter = Waiter {
            id,
            request,
            reply,
            _timeout: timeout,
        };
        if front {
            slot.waiters.push_front(waiter);
        } else {
            slot.waiters.push_back(waiter);
        }
    }

    fn finished(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        key: Arc<str>,
        actor: ActorId,
        requeue: Option<Requeue>,
    ) {
        self.free(&key, actor);
        match requeue {
            // The head waiter found the key held elsewhere: it keeps its place and waits for a
            // release notice (or the backstop).
            Some((_, reply, _)) if self.stopping => {
                let _ = reply.send(Err(Error::ManagerStopped));
            }
            Some((request, reply, contention)) => {
                self.enqueue(myself, request, reply, true);
                self.await_release(myself, &key, &contention);
                if self.slots.get(&key).is_some_and(|slot| slot.woken) {
                    self.serve_next(myself, &key);
                }
            }
            // Released or lost here: hand over to the next local waiter at once.
            None => self.serve_next(myself, &key),
        }
    }

    fn free(&mut self, key: &Arc<str>, actor: ActorId) {
        if let Some(slot) = self.slots.get_mut(key) {
            if slot
                .busy
                .as_ref()
                .is_some_and(|b| b.actor.get_id() == actor)
            {
                slot.busy = None;
            }
        }
    }

    /// A release notice, a fresh subscription or the backstop timer says the key may be free.
    fn wake(&mut self, myself: &ActorRef<BackendMsg>, key: &Arc<str>) {
        if let Some(slot) = self.slots.get_mut(key) {
            slot.woken = true;
        }
        self.serve_next(myself, key);
    }

    /// Starts the next waiter's attempt if the key is not busy here; forgets the key when
    /// nobody waits for it (which drops its subscription).
    fn serve_next(&mut self, myself: &ActorRef<BackendMsg>, key: &Arc<str>) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        slot.settle();
        if slot.busy.is_some() {
            return;
        }
        let now = Instant::now();
        while let Some(waiter) = slot.waiters.pop_front() {
            if waiter.reply.is_closed() {
                continue; // the caller gave up
            }
            if waiter.request.deadline.is_some_and(|d| d <= now) {
                let _ = waiter.reply.send(Err(waiter.request.timeout_error(now)));
                continue;
            }
            self.start_attempt(myself, waiter.request, waiter.reply);
            return;
        }
        self.slots.remove(key);
    }

    /// Makes sure the key has its one subscription and a backstop timer.
    fn await_release(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        key: &Arc<str>,
        contention: &Contention,
    ) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        // A subscription whose task ended (the subscribe failed, or its connection broke) is
        // replaced: without it the waiters would only ever wake on the backstop timer.
        if slot
            .watch
            .as_ref()
            .is_none_or(|watch| watch.0.is_finished())
        {
            let store = self.ctx.store.clone();
            let (me, key, seen) = (myself.clone(), key.clone(), contention.clone());
            let backend = self.ctx.name.clone();
            slot.watch = Some(AbortOnDrop(tokio::spawn(async move {
                match store.subscribe(&key, &seen).await {
                    Ok(mut notices) => {
                        // A release between the failed attempt and this subscription would
                        // otherwise be missed: look once more now that notices flow.
                        let mut wake = me.cast(BackendMsg::Wake(key.clone()));
                        while wake.is_ok() && notices.next().await.is_some() {
                            wake = me.cast(BackendMsg::Wake(key.clone()));
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%backend, %key, %error, "release subscription failed; waiting on the backstop timer")
                    }
                }
            })));
        }
        let cap = self.ctx.timing.backstop_cap;
        let base = contention.remaining_ttl.unwrap_or(cap).min(cap);
        // Jitter spreads the re-checks of many nodes waiting on one expiring key.
        let jitter = rand::rng().random_range(0..=base.as_micros() as u64 / 10 + 1000);
        let delay = base + Duration::from_micros(jitter);
        let key = key.clone();
        slot.backstop = Some(AbortOnDrop(
            myself.send_after(delay, move || BackendMsg::Wake(key)),
        ));
    }

    fn waiter_timed_out(&mut self, key: &Arc<str>, id: u64) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        if let Some(at) = slot.waiters.iter().position(|w| w.id == id) {
            let waiter = slot.waiters.remove(at).expect("position is in range");
            let _ = waiter
                .reply
                .send(Err(waiter.request.timeout_error(Instant::now())));
        }
        if slot.busy.is_none() && slot.waiters.is_empty() {
            self.slots.remove(key);
        }
    }

    /// Store reads run in their own short task: a slow store must not stall this actor.
    fn inspect(&self, key: Arc<str>, reply: InspectReply) {
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let budget = ctx.timing.op_timeout;
            let result = match timeout(budget, ctx.store.inspect(&key)).await {
                Ok(result) => result.map_err(|e| ctx.store_error(e)),
                Err(_) => Err(ctx.store_error(StoreError::TimedOut {
                    op: "inspect",
                    after: budget,
                })),
            };
            reply.send(result);
        });
    }

    /// Passes a release or renew by message on to the key's actor, which checks the owner.
    fn forward(
        &mut self,
        key: &Arc<str>,
        reply: RpcReplyPort<Result<()>>,
        msg: impl FnOnce(RpcReplyPort<Result<()>>) -> KeyMsg,
    ) {
        let slot = self.slots.get_mut(key).map(|slot| {
            slot.settle();
            &*slot
        });
        match slot.and_then(|s| s.busy.as_ref()) {
            Some(busy) => {
                if let Err(ractor::MessagingErr::SendErr(msg)) = busy.actor.cast(msg(reply)) {
                    reply_not_held(key, msg);
                }
            }
            None => {
                let _ = reply.send(Err(Error::NotHeld {
                    key: key.to_string(),
                }));
            }
        }
    }

    async fn shutdown(&mut self) {
        self.stopping = true;
        let mut stopping = Vec::new();
        for (_, slot) in self.slots.drain() {
            for waiter in slot.waiters {
                let _ = waiter.reply.send(Err(Error::ManagerStopped));
            }
            if let Some(busy) = slot.busy {
                let _ = busy.actor.cast(KeyMsg::Release {
                    reason: ReleaseReason::Shutdown,
                    owner: None,
                    reply: None,
                });
                stopping.push(busy.actor.get_cell());
            }
        }
        // Each key actor's release is bounded by the operation timeout; wait a little longer.
        let budget = Some(self.ctx.timing.op_timeout * 2);
        futures::future::join_all(stopping.iter().map(|cell| cell.wait(budget))).await;
        self.children.clear();
    }
}

fn reply_not_held(key: &Arc<str>, msg: KeyMsg) {
    let reply = match msg {
        KeyMsg::Release { reply, .. } => reply,
        KeyMsg::Renew { reply, .. } => Some(reply),
        KeyMsg::Tick => None,
    };
    if let Some(reply) = reply {
        let _ = reply.send(Err(Error::NotHeld {
            key: key.to_string(),
        }));
    }
}
