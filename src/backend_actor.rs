//! `BackendActor`: one per configured backend service. It owns the per-key FIFO queues of local
//! waiters and at most one release subscription per contended key, and spawns a `KeyActor` for
//! each acquisition attempt. Store I/O happens in the key actors (and in short request tasks),
//! never in this actor's handler, so one slow key cannot stall the others.
//!
//! # Failure and restart
//!
//! The backend actor fails when its store stays unreachable longer than the retry budget, or
//! when its own code panics. Its locks must not go down with it: before it stops, it hands its
//! key actors to the manager (ractor would otherwise kill them as its children) and its waiting
//! requests to the [`BackendCtx`], which outlives it. The actor the manager restarts first
//! probes the store, then adopts the key actors back (they never stopped renewing) and takes up
//! the waiting requests in their order. Only a `kill` skips the hand-over: a killed supervisor
//! kills its children, and their guards turn un-held at their deadline, as the store's leases
//! expire.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, ActorRuntime, ActorStatus,
    RpcReplyPort, SupervisionEvent,
};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use crate::backend::{Contention, LockBackend, LockInfo, OwnerToken};
use crate::error::{Error, Result, StoreError};
use crate::event::{EventBus, LockEventKind, ReleaseReason};
use crate::guard::LockGuard;
use crate::key_actor::{KeyActor, KeyArgs, KeyMsg};
use crate::manager::LockManagerMsg;
use crate::options::{validate_key, LockOptions, Wait};
use crate::task::AbortOnDrop;

/// What a backend actor and its key actors share: the store, where events go, the timing. It
/// outlives any one backend actor, so it also carries what a restarted one takes over.
pub(crate) struct BackendCtx {
    pub(crate) name: Arc<str>,
    pub(crate) store: Arc<dyn LockBackend>,
    pub(crate) events: Arc<EventBus>,
    pub(crate) timing: Timing,
    /// The running backend actor, or why there is none. Kept here, beside the store, so that
    /// `LockClient`s send acquisitions straight to it (one actor hop less on the hot path than
    /// routing each one through the manager), and wait here for it while it is down.
    serving: watch::Sender<Serving>,
    /// Every key actor of this backend that has not been accounted for: the record a restarted
    /// backend actor re-adopts them from.
    keys: Mutex<HashMap<ActorId, KeyEntry>>,
    /// Waiting requests a failed backend actor handed over, oldest first.
    stash: Mutex<Vec<(AcquireRequest, AcquireReply)>>,
    /// How long the store has been failing, as the key actors see it.
    health: Health,
}

/// Whether a backend has an actor to take requests.
#[derive(Clone)]
pub(crate) enum Serving {
    Up(ActorRef<BackendMsg>),
    /// Failed; the manager is restarting it.
    Down,
    /// The manager shut down.
    Stopped,
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
            serving: watch::Sender::new(Serving::Down),
            keys: Mutex::default(),
            stash: Mutex::default(),
            health: Health::default(),
        }
    }

    /// The running backend actor, if it is up.
    pub(crate) fn actor(&self) -> Option<ActorRef<BackendMsg>> {
        match &*self.serving.borrow() {
            Serving::Up(actor) => Some(actor.clone()),
            _ => None,
        }
    }

    /// Records whether this backend has an actor. Once stopped, it stays stopped.
    pub(crate) fn set_serving(&self, serving: Serving) {
        self.serving.send_if_modified(|now| {
            let change = !matches!(now, Serving::Stopped);
            if change {
                *now = serving;
            }
            change
        });
    }

    /// The backend actor to send `request` to. While the backend is down, a request that
    /// waits waits for it to come back, until its wait budget runs out; one that tries once
    /// fails at once (retryably).
    pub(crate) async fn actor_for(&self, request: &AcquireRequest) -> Result<ActorRef<BackendMsg>> {
        if let Some(actor) = self.actor() {
            return Ok(actor);
        }
        let mut serving = self.serving.subscribe();
        let up = serving.wait_for(|s| request.tries_once() || !matches!(s, Serving::Down));
        let answer = match request.deadline {
            Some(deadline) => timeout_at(deadline, up).await.ok(),
            None => Some(up.await),
        };
        match answer {
            Some(Ok(serving)) => match &*serving {
                Serving::Up(actor) => Ok(actor.clone()),
                Serving::Down => Err(self.down()),
                Serving::Stopped => Err(Error::ManagerStopped),
            },
            // The manager and its backends are gone.
            Some(Err(_)) => Err(Error::ManagerStopped),
            // The wait budget ran out first.
            None => Err(self.down()),
        }
    }

    pub(crate) fn down(&self) -> Error {
        Error::BackendDown {
            backend: self.name.to_string(),
        }
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

    /// Counts a store operation's outcome towards the backend's health. After failures (and no
    /// success) for longer than the retry budget, tells the backend actor the store is down.
    pub(crate) fn record<T>(&self, outcome: &std::result::Result<T, StoreError>) {
        match outcome {
            Ok(_) => self.health.succeeded(),
            Err(error) if error.is_retryable() => {
                if self.health.failing_for() >= self.timing.store_budget {
                    if let Some(actor) = self.actor() {
                        let _ = actor.cast(BackendMsg::StoreDown(error.clone()));
                    }
                }
            }
            Err(_) => {}
        }
    }

    fn keys(&self) -> MutexGuard<'_, HashMap<ActorId, KeyEntry>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stash(&self) -> MutexGuard<'_, Vec<(AcquireRequest, AcquireReply)>> {
        self.stash.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases every lock of this backend and fails every request it still has, then waits
    /// (bounded) for the key actors to stop. For shutdown, whether or not a backend actor is up.
    pub(crate) async fn release_all(&self) {
        for (_, reply) in self.stash().drain(..) {
            let _ = reply.send(Err(Error::ManagerStopped));
        }
        let entries: Vec<KeyEntry> = self.keys().drain().map(|(_, entry)| entry).collect();
        for entry in &entries {
            let _ = entry.actor.cast(KeyMsg::Release {
                reason: ReleaseReason::Shutdown,
                owner: None,
                reply: None,
            });
        }
        // Each key actor's release is bounded by the operation timeout; wait a little longer.
        let budget = Some(self.timing.op_timeout * 2);
        let stopped = entries.iter().map(|entry| {
            let cell = entry.actor.get_cell();
            async move { cell.wait(budget).await }
        });
        futures::future::join_all(stopped).await;
    }
}

/// A run of store failures, as the key actors report them.
#[derive(Default)]
struct Health {
    /// Set while `since` is: the success path only reads this.
    failing: AtomicBool,
    /// When the current run of failures began.
    since: Mutex<Option<Instant>>,
}

impl Health {
    fn succeeded(&self) {
        if self.failing.load(Ordering::Relaxed) {
            self.reset();
        }
    }

    /// Records one failure; how long the store has been failing.
    fn failing_for(&self) -> Duration {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        self.failing.store(true, Ordering::Relaxed);
        since.get_or_insert_with(Instant::now).elapsed()
    }

    /// Forgets past failures (an operation or a probe just got through).
    fn reset(&self) {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.failing.store(false, Ordering::Relaxed);
    }

    /// Whether failures have run for at least `budget`, without recording one.
    fn down_for(&self, budget: Duration) -> bool {
        let since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        since.is_some_and(|since| since.elapsed() >= budget)
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
    /// How long the store may keep failing before the backend actor is restarted.
    pub(crate) store_budget: Duration,
}

impl Timing {
    /// `deadline = sent_at + ttl × (1 − drift)`, on the monotonic clock, from when the request
    /// that set the ttl was sent.
    pub(crate) fn deadline(&self, sent_at: Instant, ttl: Duration) -> Instant {
        sent_at + ttl.mul_f64(1.0 - self.drift)
    }
}

/// One acquisition request, validated and resolved to a backend.
#[derive(Clone)]
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
        // A budget too long for the clock is no budget: wait forever.
        let deadline = match wait {
            Wait::UpTo(budget) => requested_at.checked_add(budget),
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

    pub(crate) fn waits(&self) -> bool {
        !self.tries_once()
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
    /// The store has failed for longer than the retry budget (the last error).
    StoreDown(StoreError),
    /// A key actor that may have stopped before this actor was watching it.
    KeyActorEnded(ActorId),
    /// Fault injection for tests: panic in this actor's handler.
    #[cfg(feature = "testing")]
    Panic,
}

#[cfg(feature = "cluster")]
impl ractor::Message for BackendMsg {}

pub(crate) struct BackendActor;

/// A backend actor's start-up arguments.
pub(crate) struct BackendArgs {
    pub(crate) ctx: Arc<BackendCtx>,
    /// Set when this actor replaces a failed one: probe the store before taking requests.
    pub(crate) restart: bool,
    /// Told when a restarted actor is up.
    pub(crate) manager: ActorRef<LockManagerMsg>,
}

pub(crate) struct BackendState {
    ctx: Arc<BackendCtx>,
    manager: ActorRef<LockManagerMsg>,
    /// Set until a restarted actor has probed its store and taken over.
    restarting: bool,
    slots: HashMap<Arc<str>, Slot>,
    next_waiter: u64,
    /// Set by `Shutdown`: requests still in flight are answered "manager stopped".
    stopping: bool,
}

/// A key this node is attempting, holding or waiting for.
#[derive(Default)]
struct Slot {
    /// The key actor attempting or holding the key; at most one per key per node, so local
    /// waiters never race each other at the store.
    busy: Option<KeyEntry>,
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

/// A key actor, as its backend records it.
#[derive(Clone)]
pub(crate) struct KeyEntry {
    key: Arc<str>,
    actor: ActorRef<KeyMsg>,
    holder: Option<ActorId>,
    outcome: Arc<KeyOutcome>,
}

/// What a key actor leaves for its backend actor when it stops. Shared rather than passed in
/// the key actor's final state, because the backend actor that started it may have been
/// replaced by then.
#[derive(Default)]
pub(crate) struct KeyOutcome {
    /// Set once the key actor has let the key go (before it answers anyone; its termination
    /// event comes later).
    pub(crate) done: AtomicBool,
    /// A waiting request whose attempt found the key held elsewhere: it goes back to the
    /// front of the key's queue.
    pub(crate) requeue: Mutex<Option<Requeue>>,
}

impl KeyEntry {
    fn is_done(&self) -> bool {
        self.outcome.done.load(Ordering::Acquire)
    }

    fn take_requeue(&self) -> Option<Requeue> {
        let mut requeue = self
            .outcome
            .requeue
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        requeue.take()
    }
}

impl Slot {
    /// Forgets a key actor that has let the key go, without waiting for its termination.
    fn settle(&mut self) {
        if self.busy.as_ref().is_some_and(KeyEntry::is_done) {
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
    type Arguments = BackendArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<BackendMsg>,
        args: BackendArgs,
    ) -> Result<BackendState, ActorProcessingErr> {
        let mut state = BackendState {
            ctx: args.ctx,
            manager: args.manager,
            restarting: args.restart,
            slots: HashMap::new(),
            next_waiter: 0,
            stopping: false,
        };
        if !args.restart {
            // Up before the manager's `start` returns, so the first request finds it.
            state.take_over(&myself);
        }
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<BackendMsg>,
        state: &mut BackendState,
    ) -> Result<(), ActorProcessingErr> {
        if !state.restarting {
            return Ok(());
        }
        // A restart: the store answers before this actor takes anything over. A failed probe
        // fails this actor, and the manager tries again after a longer pause.
        let budget = state.ctx.timing.op_timeout;
        match timeout(budget, state.ctx.store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(format!("store probe failed: {error}").into()),
            Err(_) => return Err(format!("store probe timed out after {budget:?}").into()),
        }
        state.ctx.health.reset();
        state.restarting = false;
        state.take_over(&myself);
        let name = state.ctx.name.clone();
        let _ = state.manager.cast(LockManagerMsg::backend_up(name));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<BackendMsg>,
        msg: BackendMsg,
        state: &mut BackendState,
    ) -> Result<(), ActorProcessingErr> {
        let handled = AssertUnwindSafe(state.handle(&myself, msg))
            .catch_unwind()
            .await;
        state.fail_over(&myself, handled)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<BackendMsg>,
        event: SupervisionEvent,
        state: &mut BackendState,
    ) -> Result<(), ActorProcessingErr> {
        // A key actor is done: it released, lost, or failed to acquire; its outcome says
        // whether its request still waits. This actor carries on either way (ractor's default
        // would stop it with its child).
        let id = match event {
            SupervisionEvent::ActorTerminated(cell, ..) => cell.get_id(),
            SupervisionEvent::ActorFailed(cell, error) => {
                tracing::error!(backend = %state.ctx.name, %error, "key actor failed");
                cell.get_id()
            }
            _ => return Ok(()),
        };
        let handled = std::panic::catch_unwind(AssertUnwindSafe(|| state.ended(&myself, id)));
        state.fail_over(&myself, handled.map(Ok))
    }

    async fn post_stop(
        &self,
        myself: ActorRef<BackendMsg>,
        state: &mut BackendState,
    ) -> Result<(), ActorProcessingErr> {
        // Stopped from outside, not by shutdown: hand over like a failure does.
        if !state.stopping {
            state.hand_over(&myself);
        }
        Ok(())
    }
}

impl BackendState {
    async fn handle(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        msg: BackendMsg,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BackendMsg::Acquire(request, reply) => self.acquire(myself, request, reply),
            BackendMsg::Inspect(key, reply) => self.inspect(key, reply),
            BackendMsg::Release { key, owner, reply } => {
                let msg = |reply| KeyMsg::Release {
                    reason: ReleaseReason::Requested,
                    owner: Some(owner),
                    reply: Some(reply),
                };
                self.forward(&key, reply, msg);
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
                self.forward(&key, reply, msg);
            }
            BackendMsg::Wake(key) => self.wake(myself, &key),
            BackendMsg::WaiterTimedOut(key, id) => self.waiter_timed_out(&key, id),
            BackendMsg::Shutdown(reply) => {
                self.shutdown().await;
                let _ = reply.send(());
            }
            BackendMsg::StoreDown(error) => {
                let budget = self.ctx.timing.store_budget;
                // A late report may reach the actor that replaced the one it was meant for:
                // only a store that is still failing takes this one down.
                if self.ctx.health.down_for(budget) {
                    let why = format!("store failing for over {budget:?}, last: {error}");
                    return Err(why.into());
                }
            }
            BackendMsg::KeyActorEnded(id) => self.ended(myself, id),
            #[cfg(feature = "testing")]
            BackendMsg::Panic => panic!("backend actor panic injected by a test"),
        }
        Ok(())
    }

    /// After a handler ran: a panic or an error fails this actor, once it has handed over
    /// what must outlive it.
    fn fail_over(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        handled: std::thread::Result<Result<(), ActorProcessingErr>>,
    ) -> Result<(), ActorProcessingErr> {
        let error = match handled {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => error,
            Err(panic) => panic_message(panic).into(),
        };
        if !self.stopping {
            self.hand_over(myself);
        }
        Err(error)
    }

    /// This actor is going away (not by shutdown). Its key actors are linked to the manager
    /// instead, since ractor kills a stopping actor's children, and its waiting requests go to
    /// the backend's stash: the actor that replaces it takes both back.
    fn hand_over(&mut self, myself: &ActorRef<BackendMsg>) {
        if self
            .ctx
            .actor()
            .is_some_and(|a| a.get_id() == myself.get_id())
        {
            self.ctx.set_serving(Serving::Down);
        }
        let manager = self.manager.get_cell();
        for entry in self.ctx.keys().values() {
            entry.actor.get_cell().link(manager.clone());
        }
        let mut stash = self.ctx.stash();
        for (_, slot) in self.slots.drain() {
            let waiters = slot.waiters.into_iter();
            stash.extend(waiters.map(|waiter| (waiter.request, waiter.reply)));
        }
    }

    /// Becomes the backend's actor: adopts the key actors on record (after a restart, those
    /// its predecessor handed over, which never stopped renewing), takes up the handed-over
    /// requests in their order, and starts taking new ones.
    fn take_over(&mut self, myself: &ActorRef<BackendMsg>) {
        let me = myself.get_cell();
        let entries: Vec<KeyEntry> = self.ctx.keys().values().cloned().collect();
        for entry in entries {
            let cell = entry.actor.get_cell();
            cell.link(me.clone());
            if cell.get_status() >= ActorStatus::Stopping {
                // It may have stopped while nobody watched: no event would come for it.
                // (Should one come after all, the second report finds nothing to do.)
                let _ = myself.cast(BackendMsg::KeyActorEnded(cell.get_id()));
            } else if !entry.is_done() {
                let key = entry.key.clone();
                self.slots.entry(key).or_default().busy = Some(entry);
            }
        }
        let stashed = std::mem::take(&mut *self.ctx.stash());
        for (request, reply) in stashed {
            self.acquire(myself, request, reply);
        }
        self.ctx.set_serving(Serving::Up(myself.clone()));
    }

    /// A key actor stopped: forget it, and put back the request it leaves, if any.
    fn ended(&mut self, myself: &ActorRef<BackendMsg>, id: ActorId) {
        let Some(entry) = self.ctx.keys().remove(&id) else {
            return;
        };
        let requeue = entry.take_requeue();
        self.finished(myself, entry.key, id, requeue);
    }

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
        let outcome = Arc::new(KeyOutcome::default());
        let args = KeyArgs {
            ctx: self.ctx.clone(),
            outcome: outcome.clone(),
            request,
            reply,
        };
        // Not waiting for the key actor's `pre_start` keeps this actor's loop free; the
        // attempt itself runs in the key actor's `post_start`.
        match ActorRuntime::spawn_linked_instant(None, KeyActor, args, myself.get_cell()) {
            Ok((actor, _start)) => {
                let entry = KeyEntry {
                    key: key.clone(),
                    actor,
                    holder,
                    outcome,
                };
                self.ctx.keys().insert(entry.actor.get_id(), entry.clone());
                let slot = self.slots.entry(key).or_default();
                slot.woken = false;
                slot.busy = Some(entry);
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
        for (_, slot) in self.slots.drain() {
            for waiter in slot.waiters {
                let _ = waiter.reply.send(Err(Error::ManagerStopped));
            }
        }
        self.ctx.release_all().await;
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    format!("backend actor panicked: {what}")
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
