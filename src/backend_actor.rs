//! `BackendActor`: one per configured backend service. It owns the per-key FIFO queues of local
//! waiters, at most one release subscription per contended key, and the key actors: it gives
//! each acquisition attempt to an idle key actor (starting one only when none is idle), and
//! takes it back when the key actor reports its job done. Store I/O happens in the key actors
//! (and in short request tasks), never in this actor's handler, so one slow key cannot stall
//! the others.
//!
//! # One record per key
//!
//! A key's slot says which key actor is attempting or holding it (`busy`), who waits, and the
//! key's one subscription. The slot changes only in this actor's handler, on messages: an
//! acquisition marks it busy, and the key actor's `KeyDone` (sent before it answers anyone)
//! frees it. A key actor that stops without reporting (stopped from outside, or panicked)
//! frees it through its termination event.
//!
//! # Failure and restart
//!
//! The backend actor fails when its store stays unreachable longer than the retry budget, or
//! when its own code panics. Its locks must not go down with it: before it stops, it hands its
//! busy key actors to the manager (ractor would otherwise kill them as its children) and them
//! and its waiting requests to the [`BackendCtx`], which outlives it. The actor the manager
//! restarts first probes the store, then adopts the key actors back (they never stopped
//! renewing; one whose job ended meanwhile says so again) and takes up the waiting requests in
//! their order. Only a `kill` skips the hand-over: a killed supervisor kills its children, and
//! their guards turn un-held at their deadline, as the store's leases expire.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, ActorRuntime, ActorStatus,
    MessagingErr, RpcReplyPort, SupervisionEvent,
};
use rand::Rng;
use tokio::time::{timeout, Instant};

use crate::backend::{Contention, OwnerToken, ReleaseNotices};
use crate::backend_ctx::{BackendCtx, Handover, Serving};
use crate::error::{Error, Result, StoreError};
use crate::event::{LockEventKind, ReleaseReason};
use crate::key_actor::{KeyActor, KeyArgs, KeyMsg, KeyState};
use crate::manager::LockManagerMsg;
use crate::metrics::{Counted, StoreOp};
use crate::request::{AcquireReply, AcquireRequest, InspectReply, Requeue, FAIR_LOCK_SLOT};
use crate::task::AbortOnDrop;
use crate::timing::STORE_RETRY_PAUSE;

/// How many idle key actors a backend keeps for its next acquisitions. Past that, a key
/// actor whose job is done stops (an idle one costs a few KiB).
const MAX_IDLE_KEY_ACTORS: usize = 1024;

type TimerResult = std::result::Result<(), MessagingErr<BackendMsg>>;

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
    /// A key actor ended its job `job` on `key` (an attempt that did not win, a release, a
    /// loss) and is idle. With `requeue`, the attempt was for a waiting request that found
    /// the key held elsewhere (or the store failing): it goes back to the front of the queue.
    KeyDone {
        key: Arc<str>,
        job: u64,
        actor: ActorRef<KeyMsg>,
        requeue: Option<Requeue>,
    },
    /// Release every held lock, fail every waiter, and answer when the key actors stopped.
    Shutdown(RpcReplyPort<()>),
    /// The store has failed for longer than the retry budget (the last error).
    StoreDown(StoreError),
    /// Fault injection for tests: panic in this actor's handler.
    #[cfg(feature = "testing")]
    Panic,
    /// Fault injection for tests: panic in this actor's handler when an acquisition of this
    /// key comes (with the request's reply port still in hand).
    #[cfg(feature = "testing")]
    PanicOnAcquire(Arc<str>),
    /// For tests: how many requests for this name wait here between attempts (a fair one
    /// is in the store's queue by then: its first attempt put it there).
    #[cfg(feature = "testing")]
    Waiting(Arc<str>, RpcReplyPort<usize>),
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
    /// Key actors with no job, for the next acquisitions (some may have been stopped from
    /// outside since: those are dropped when picked).
    idle: Vec<ActorRef<KeyMsg>>,
    next_waiter: u64,
    /// Set by `Shutdown`: requests still in flight are answered "manager stopped".
    stopping: bool,
    #[cfg(feature = "testing")]
    panic_on_acquire: Option<Arc<str>>,
}

/// The key actor a key is busy with on this node: at most one per key, so local waiters never
/// race each other at the store.
#[derive(Clone)]
pub(crate) struct Busy {
    pub(crate) key: Arc<str>,
    /// The job it was given; its `KeyDone` names it.
    pub(crate) job: u64,
    pub(crate) actor: ActorRef<KeyMsg>,
    holder: Option<ActorId>,
}

/// A key this node is attempting, holding or waiting for.
#[derive(Default)]
struct Slot {
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

struct Waiter {
    id: u64,
    request: AcquireRequest,
    reply: AcquireReply,
    _timeout: Option<AbortOnDrop<TimerResult>>,
    /// Its share of the `leasehold_waiters` gauge, given back however it leaves the queue.
    _counted: Counted,
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
            idle: Vec::new(),
            next_waiter: 0,
            stopping: false,
            #[cfg(feature = "testing")]
            panic_on_acquire: None,
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
        let ctx = &state.ctx;
        match timeout(budget, ctx.metrics.timed(StoreOp::Ping, ctx.store.ping())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(format!("store probe failed: {error}").into()),
            Err(_) => return Err(format!("store probe timed out after {budget:?}").into()),
        }
        state.ctx.store_answered();
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
        // A key actor stopped. Normally that is one this actor retired, or one that stopped
        // after shutdown; one that stopped in the middle of a job frees its key here. This
        // actor carries on either way (ractor's default would stop it with its child).
        let handled = std::panic::catch_unwind(AssertUnwindSafe(|| match event {
            SupervisionEvent::ActorTerminated(_, Some(mut last), _) => {
                if let Some((key, job)) = last.take::<KeyState>().ok().and_then(|s| s.job()) {
                    if state.free(&key, |busy| busy.job == job) {
                        state.serve_next(&myself, &key);
                    }
                }
            }
            SupervisionEvent::ActorTerminated(cell, None, _) => {
                state.key_actor_gone(&myself, &cell)
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                tracing::error!(backend = %state.ctx.name, %error, "key actor failed");
                state.key_actor_gone(&myself, &cell);
            }
            _ => {}
        }));
        state.fail_over(&myself, handled.map(Ok))
    }

    async fn post_stop(
        &self,
        myself: ActorRef<BackendMsg>,
        state: &mut BackendState,
    ) -> Result<(), ActorProcessingErr> {
        // Stopped from outside, not by shutdown: hand over like a failure does.
        if !state.stopping {
            state.hand_over(&myself, None);
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
            BackendMsg::KeyDone {
                key,
                job,
                actor,
                requeue,
            } => self.key_done(myself, key, job, actor, requeue),
            BackendMsg::Shutdown(reply) => {
                self.shutdown().await;
                let _ = reply.send(());
            }
            BackendMsg::StoreDown(error) => {
                let budget = self.ctx.timing.store_budget;
                // A late report may reach the actor that replaced the one it was meant for:
                // only a store that is still failing takes this one down.
                if self.ctx.store_down_for(budget) {
                    let why = format!("store failing for over {budget:?}, last: {error}");
                    return Err(why.into());
                }
            }
            #[cfg(feature = "testing")]
            BackendMsg::Panic => panic!("backend actor panic injected by a test"),
            #[cfg(feature = "testing")]
            BackendMsg::PanicOnAcquire(key) => self.panic_on_acquire = Some(key),
            #[cfg(feature = "testing")]
            BackendMsg::Waiting(name, reply) => {
                let waiting = self.slots.values().flat_map(|slot| &slot.waiters);
                let _ = reply.send(waiting.filter(|w| w.request.name == name).count());
            }
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
        let (error, panic) = match handled {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => (error, None),
            Err(panic) => {
                let what = panic_message(panic);
                (format!("backend actor panicked: {what}").into(), Some(what))
            }
        };
        if !self.stopping {
            self.hand_over(myself, panic);
        }
        Err(error)
    }

    /// This actor is going away (not by shutdown). Its busy key actors are linked to the
    /// manager instead, since ractor kills a stopping actor's children, and they and the
    /// waiting requests go to the backend's hand-over record: the actor that replaces it takes
    /// both back. Idle key actors hold nothing and just stop.
    fn hand_over(&mut self, myself: &ActorRef<BackendMsg>, panic: Option<String>) {
        self.ctx.set_down(myself, panic.map(Into::into));
        let manager = self.manager.get_cell();
        let mut handover = self.ctx.handover();
        for (_, slot) in self.slots.drain() {
            if let Some(busy) = slot.busy {
                busy.actor.get_cell().link(manager.clone());
                handover.keys.push(busy);
            }
            let waiters = slot.waiters.into_iter();
            handover
                .waiting
                .extend(waiters.map(|waiter| (waiter.request, waiter.reply)));
        }
        for actor in self.idle.drain(..) {
            actor.stop(None);
        }
    }

    /// Becomes the backend's actor: adopts the key actors on record (after a restart, those
    /// its predecessor handed over, which never stopped renewing), takes up the handed-over
    /// requests in their order, and starts taking new ones.
    fn take_over(&mut self, myself: &ActorRef<BackendMsg>) {
        let Handover { keys, waiting } = std::mem::take(&mut *self.ctx.handover());
        let me = myself.get_cell();
        for busy in keys {
            let cell = busy.actor.get_cell();
            if cell.get_status() >= ActorStatus::Stopping {
                continue; // it stopped with its lease while nobody watched
            }
            cell.link(me.clone());
            let adopt = KeyMsg::Adopt {
                backend: myself.clone(),
                key: busy.key.clone(),
                job: busy.job,
            };
            if busy.actor.cast(adopt).is_ok() {
                let key = busy.key.clone();
                self.slots.entry(key).or_default().busy = Some(busy);
            }
        }
        for (request, reply) in waiting {
            self.acquire(myself, request, reply);
        }
        self.ctx.set_serving(Serving::Up(myself.clone()));
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
        #[cfg(feature = "testing")]
        if self.panic_on_acquire.as_ref() == Some(&request.key) {
            panic!(
                "backend actor panic injected by a test, on acquiring {}",
                request.key
            );
        }
        if let Err(error) = self.ctx.check_ttl(request.ttl) {
            let _ = reply.send(Err(error));
            return;
        }
        let fair_lock = request.fair.is_some() && request.permits.is_none() && request.rw.is_none();
        if let Some(holder) = request.holder_id().filter(|_| fair_lock) {
            // A fair request has a slot of its own: the same holder's other requests for
            // this lock are in other slots (its name's, or its name's fair ones; not the
            // name's permits or shares), found by a search, which only a fair request with a
            // holder actor pays for.
            let name = &*request.name;
            let of_name = |key: &str| {
                key == name
                    || key
                        .strip_prefix(name)
                        .and_then(|rest| rest.strip_prefix('\0'))
                        .is_some_and(|rest| rest.starts_with(FAIR_LOCK_SLOT))
            };
            let same_holder = self.slots.iter().any(|(key, slot)| {
                of_name(key)
                    && (slot.busy.as_ref().is_some_and(|b| b.holder == Some(holder))
                        || slot
                            .waiters
                            .iter()
                            .any(|w| w.request.holder_id() == Some(holder)))
            });
            if same_holder {
                let _ = reply.send(Err(Error::AlreadyHeld {
                    backend: self.ctx.name.to_string(),
                    key: request.name.to_string(),
                }));
                return;
            }
        }
        let slot = self.slots.entry(request.key.clone()).or_default();
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
        let primitive = request.primitive();
        self.ctx
            .emit(primitive, &request.name, None, LockEventKind::Contended);
        if request.tries_once() {
            let _ = reply.send(Ok(None));
        } else {
            self.enqueue(myself, request, reply, false);
        }
    }

    /// Gives the attempt to an idle key actor, or to a new one.
    fn start_attempt(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        request: AcquireRequest,
        reply: AcquireReply,
    ) {
        let key = request.key.clone();
        let holder = request.holder_id();
        let job = self.ctx.next_job();
        let mut msg = KeyMsg::Attempt {
            job,
            request,
            reply,
        };
        loop {
            let actor = match self.idle.pop() {
                Some(actor) => actor,
                None => match self.spawn_key_actor(myself) {
                    Some(actor) => actor,
                    None => return, // logged; the reply port closes with `msg`
                },
            };
            // An idle actor stopped from outside gives the message back: try the next one.
            match actor.cast(msg) {
                Ok(()) => {
                    let slot = self.slots.entry(key.clone()).or_default();
                    slot.woken = false;
                    slot.busy = Some(Busy {
                        key,
                        job,
                        actor,
                        holder,
                    });
                    return;
                }
                Err(MessagingErr::SendErr(back)) => msg = back,
                Err(_) => return,
            }
        }
    }

    fn spawn_key_actor(&self, myself: &ActorRef<BackendMsg>) -> Option<ActorRef<KeyMsg>> {
        let args = KeyArgs {
            ctx: self.ctx.clone(),
            backend: myself.clone(),
        };
        // Not waiting for the key actor's `pre_start` keeps this actor's loop free; messages
        // sent meanwhile wait in its mailbox.
        match ActorRuntime::spawn_linked_instant(None, KeyActor, args, myself.get_cell()) {
            Ok((actor, _start)) => Some(actor),
            // Only a name clash can fail an instant spawn, and key actors have no names.
            Err(error) => {
                tracing::error!(backend = %self.ctx.name, %error, "could not spawn key actor");
                None
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
        let counted = self.ctx.metrics.waiting(request.primitive());
        let waiter = Waiter {
            id,
            request,
            reply,
            _timeout: timeout,
            _counted: counted,
        };
        if front {
            slot.waiters.push_front(waiter);
        } else {
            slot.waiters.push_back(waiter);
        }
    }

    /// A key actor's report that its job is over: the key is free here, and the actor idle.
    fn key_done(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        key: Arc<str>,
        job: u64,
        actor: ActorRef<KeyMsg>,
        requeue: Option<Requeue>,
    ) {
        if self.stopping {
            // Shutdown stops every key actor; a request still waiting has nothing to wait for.
            if let Some(requeue) = requeue {
                let _ = requeue.reply.send(Err(Error::ManagerStopped));
            }
            return;
        }
        if !self.free(&key, |busy| busy.job == job) {
            // About a job this actor does not know (one a failed predecessor had already
            // heard the end of): nothing to free, and the actor is accounted for elsewhere.
            tracing::debug!(backend = %self.ctx.name, %key, job, "late report of a finished job");
            return;
        }
        if self.idle.len() < MAX_IDLE_KEY_ACTORS {
            self.idle.push(actor);
        } else {
            actor.stop(None);
        }
        match requeue {
            // The head waiter found the key held elsewhere: it keeps its place and waits for a
            // release notice (or the backstop).
            Some(Requeue {
                request,
                reply,
                contention,
            }) => {
                // A semaphore's (a read-write lock's, a fair lock's) waiter listens for its
                // name's notices, not for its slot's key.
                let notices = Notices::of(&request);
                self.enqueue(myself, request, reply, true);
                self.await_release(myself, &key, &contention, notices);
                if self.slots.get(&key).is_some_and(|slot| slot.woken) {
                    self.serve_next(myself, &key);
                }
            }
            // Released or lost here: hand over to the next local waiter at once.
            None => self.serve_next(myself, &key),
        }
    }

    /// Frees `key` if it is busy with the job `is_it` picks; false if it was not.
    fn free(&mut self, key: &Arc<str>, is_it: impl Fn(&Busy) -> bool) -> bool {
        let Some(slot) = self.slots.get_mut(key) else {
            return false;
        };
        let freed = slot.busy.as_ref().is_some_and(is_it);
        if freed {
            slot.busy = None;
        }
        freed
    }

    /// A key actor stopped without a last state to read (killed, or failed): free its key if
    /// it was busy with one. Rare, so a search over the keys is fine.
    fn key_actor_gone(&mut self, myself: &ActorRef<BackendMsg>, cell: &ActorCell) {
        let id = cell.get_id();
        let key = self.slots.iter().find_map(|(key, slot)| {
            let busy = slot.busy.as_ref()?;
            (busy.actor.get_id() == id).then(|| key.clone())
        });
        if let Some(key) = key {
            self.free(&key, |busy| busy.actor.get_id() == id);
            self.serve_next(myself, &key);
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
        if slot.busy.is_some() {
            return;
        }
        let now = Instant::now();
        while let Some(waiter) = slot.waiters.pop_front() {
            if waiter.reply.is_closed() {
                continue; // the caller gave up
            }
            if waiter.request.out_of_time(now) {
                let _ = waiter.reply.send(Err(waiter.request.timeout_error(now)));
                continue;
            }
            self.start_attempt(myself, waiter.request, waiter.reply);
            return;
        }
        self.slots.remove(key);
    }

    /// Makes sure the key has its one subscription (to the `notices` its waiter needs) and a
    /// backstop timer.
    fn await_release(
        &mut self,
        myself: &ActorRef<BackendMsg>,
        key: &Arc<str>,
        contention: &Contention,
        notices: Notices,
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
            let ctx = self.ctx.clone();
            let (me, key, seen) = (myself.clone(), key.clone(), contention.clone());
            slot.watch = Some(AbortOnDrop(tokio::spawn(async move {
                let mut notices = subscribe_until_done(&ctx, &key, &seen, notices).await;
                // A release between the failed attempt and this subscription would otherwise
                // be missed: look once more now that notices flow.
                let mut wake = me.cast(BackendMsg::Wake(key.clone()));
                while wake.is_ok() && notices.next().await.is_some() {
                    wake = me.cast(BackendMsg::Wake(key.clone()));
                }
                // The stream ended: its connection broke (a failover, a network fault), and a
                // release may have gone unheard. Look again now, rather than at the backstop
                // timer; an attempt that finds the key still held subscribes again (this task
                // has finished), on a new connection.
                if wake.is_ok() {
                    let _ = me.cast(BackendMsg::Wake(key.clone()));
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
            let inspect = ctx.metrics.timed(StoreOp::Inspect, ctx.store.inspect(&key));
            let result = match timeout(budget, inspect).await {
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
        let busy = self.slots.get(key).and_then(|slot| slot.busy.as_ref());
        let not_held = || Error::NotHeld {
            key: key.to_string(),
        };
        let Some(busy) = busy else {
            let _ = reply.send(Err(not_held()));
            return;
        };
        // A key actor that has just stopped gives the message back: nobody holds the key here.
        if let Err(MessagingErr::SendErr(
            KeyMsg::Release {
                reply: Some(reply), ..
            }
            | KeyMsg::Renew { reply, .. },
        )) = busy.actor.cast(msg(reply))
        {
            let _ = reply.send(Err(not_held()));
        }
    }

    async fn shutdown(&mut self) {
        self.stopping = true;
        let mut actors = Vec::new();
        for (_, slot) in self.slots.drain() {
            for waiter in slot.waiters {
                let _ = waiter.reply.send(Err(Error::ManagerStopped));
            }
            actors.extend(slot.busy.map(|busy| busy.actor));
        }
        actors.append(&mut self.idle);
        self.ctx.stop_key_actors(&actors).await;
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Which notices wake a slot's waiter.
enum Notices {
    /// The release notices of the slot's own key (a lock, an election).
    Key,
    /// Those of the semaphore of this name (the slot is one acquisition's own).
    Permits(Arc<str>),
    /// Those of the read-write lock of this name (the slot is one acquisition's own).
    Rw(Arc<str>),
    /// The release notices of the lock of this name, for a fair waiter (the slot is its own).
    Lock(Arc<str>),
}

impl Notices {
    fn of(request: &AcquireRequest) -> Self {
        match (request.permits, request.rw) {
            (Some(_), _) => Notices::Permits(request.name.clone()),
            (None, Some(_)) => Notices::Rw(request.name.clone()),
            (None, None) if request.fair.is_some() => Notices::Lock(request.name.clone()),
            (None, None) => Notices::Key,
        }
    }
}

/// The longest pause between two tries at a release subscription that keeps failing.
const SUBSCRIBE_RETRY_CAP: Duration = Duration::from_secs(2);

/// Subscribes to the release notices a waiter on `key` needs, trying again after a pause
/// (doubling, up to two seconds or the backstop cap) while the store refuses: a waiter whose subscription
/// failed once (in a failover, say, when the sentinels name no primary for a moment) would
/// otherwise hear nothing until its backstop, which can be as far off as the holder's ttl.
/// The task that runs this is aborted when nobody waits for the key any more.
async fn subscribe_until_done(
    ctx: &BackendCtx,
    key: &Arc<str>,
    seen: &Contention,
    notices: Notices,
) -> ReleaseNotices {
    let mut pause = STORE_RETRY_PAUSE;
    loop {
        let subscribe = async {
            match &notices {
                Notices::Key => ctx.store.subscribe(key, seen).await,
                Notices::Lock(name) => ctx.store.subscribe(name, seen).await,
                Notices::Permits(name) => ctx.store.subscribe_permits(name, seen).await,
                Notices::Rw(name) => ctx.store.subscribe_rw(name, seen).await,
            }
        };
        match ctx.metrics.timed(StoreOp::Subscribe, subscribe).await {
            Ok(notices) => return notices,
            Err(error) => {
                let backend = &ctx.name;
                tracing::warn!(%backend, %key, %error, retry_in = ?pause, "release subscription failed");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(SUBSCRIBE_RETRY_CAP.min(ctx.timing.backstop_cap));
    }
}
