//! `BackendCtx`: what a backend actor and its key actors share, and what outlives any one
//! backend actor: the store, the event bus, the timing rules, whether an actor is serving, and
//! what a failed actor handed over to its successor.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};

use crate::backend::LockBackend;
use crate::backend_actor::{BackendMsg, Busy};
use crate::error::{Error, Result, StoreError};
use crate::event::{EventBus, LockEventKind};
use crate::key_actor::KeyMsg;
use crate::metrics::{BackendMetrics, Primitive, StoreOp};
use crate::request::{AcquireReply, AcquireRequest};
use crate::timing::Timing;

/// What a backend actor and its key actors share: the store, where events go, the timing. It
/// outlives any one backend actor, so it also carries what a restarted one takes over.
pub(crate) struct BackendCtx {
    pub(crate) name: Arc<str>,
    pub(crate) store: Arc<dyn LockBackend>,
    pub(crate) events: Arc<EventBus>,
    pub(crate) timing: Timing,
    /// This backend's series in the `metrics` recorder (nothing without the feature).
    pub(crate) metrics: BackendMetrics,
    /// The running backend actor, or why there is none. Kept here, beside the store, so that
    /// `LockClient`s send acquisitions straight to it (one actor hop less on the hot path than
    /// routing each one through the manager), and wait here for it while it is down.
    serving: watch::Sender<Serving>,
    /// What a failed backend actor left for its successor. Empty while an actor serves: the
    /// serving actor's own state is the one record of its keys and waiters.
    handover: Mutex<Handover>,
    /// Numbers the key actors' jobs, across restarts of the backend actor, so a late report
    /// about an old job is never taken for the current one.
    next_job: AtomicU64,
    /// How long the store has been failing, as the key actors see it.
    health: Health,
}

/// Whether a backend has an actor to take requests.
#[derive(Clone)]
pub(crate) enum Serving {
    Up(ActorRef<BackendMsg>),
    /// Failed; the manager is restarting it. `panic` says what the failed actor panicked with,
    /// if that is how it failed: a request it dropped is then answered with that, not retried.
    Down {
        panic: Option<Arc<str>>,
    },
    /// The manager shut down.
    Stopped,
}

/// What a failing backend actor hands to the one that replaces it: the key actors that were
/// attempting or holding a key (they keep renewing meanwhile), and the requests that were
/// waiting, oldest first.
#[derive(Default)]
pub(crate) struct Handover {
    pub(crate) keys: Vec<Busy>,
    pub(crate) waiting: Vec<(AcquireRequest, AcquireReply)>,
}

impl BackendCtx {
    pub(crate) fn new(
        name: Arc<str>,
        store: Arc<dyn LockBackend>,
        events: Arc<EventBus>,
        timing: Timing,
    ) -> Self {
        let metrics = BackendMetrics::new(&name, store.kind());
        BackendCtx {
            name,
            store,
            events,
            timing,
            metrics,
            serving: watch::Sender::new(Serving::Down { panic: None }),
            handover: Mutex::default(),
            next_job: AtomicU64::new(1),
            health: Health::default(),
        }
    }

    /// Refuses a ttl over the store's own bound ([`LockBackend::max_ttl`]), before any I/O.
    pub(crate) fn check_ttl(&self, ttl: Duration) -> Result<()> {
        match self.store.max_ttl() {
            Some(max) if ttl > max => Err(Error::InvalidTtl {
                ttl,
                why: "the ttl is over the backend's longest (an etcd backend on a session lease: the session's ttl)",
            }),
            _ => Ok(()),
        }
    }

    /// The running backend actor, if it is up.
    pub(crate) fn actor(&self) -> Option<ActorRef<BackendMsg>> {
        match &*self.serving.borrow() {
            Serving::Up(actor) => Some(actor.clone()),
            _ => None,
        }
    }

    /// What a backend actor panicked with, while the backend is down because of it.
    pub(crate) fn panic(&self) -> Option<Arc<str>> {
        match &*self.serving.borrow() {
            Serving::Down { panic } => panic.clone(),
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

    /// Records that `actor` is no longer serving (it failed, or was stopped), unless another
    /// actor already took its place. A panic message, once recorded, is kept until an actor
    /// serves again.
    pub(crate) fn set_down(&self, actor: &ActorRef<BackendMsg>, panic: Option<Arc<str>>) {
        self.serving.send_if_modified(|now| match now {
            Serving::Up(up) if up.get_id() == actor.get_id() => {
                *now = Serving::Down { panic };
                true
            }
            Serving::Down { panic: none @ None } if panic.is_some() => {
                *none = panic;
                true
            }
            _ => false,
        });
    }

    /// The backend actor to send `request` to. While the backend is down, a request that
    /// waits waits for it to come back, until its wait budget runs out; one that tries once
    /// fails at once (retryably). `gone`, when given, is an actor that just failed to answer:
    /// it is not taken for an answer even if it is still recorded as serving.
    pub(crate) async fn actor_for(
        &self,
        request: &AcquireRequest,
        gone: Option<&ActorRef<BackendMsg>>,
    ) -> Result<ActorRef<BackendMsg>> {
        if gone.is_none() {
            if let Some(actor) = self.actor() {
                return Ok(actor);
            }
        }
        let usable = |s: &Serving| match s {
            Serving::Up(actor) => gone.is_none_or(|gone| gone.get_id() != actor.get_id()),
            Serving::Down { .. } => false,
            Serving::Stopped => true,
        };
        let mut serving = self.serving.subscribe();
        let up = serving.wait_for(|s| request.tries_once() || usable(s));
        let answer = match request.deadline {
            Some(deadline) => timeout_at(deadline, up).await.ok(),
            None => Some(up.await),
        };
        match answer {
            Some(Ok(serving)) => match &*serving {
                Serving::Up(actor) if usable(&serving) => Ok(actor.clone()),
                Serving::Up(_) | Serving::Down { .. } => Err(self.unavailable()),
                Serving::Stopped => Err(Error::ManagerStopped),
            },
            // The manager and its backends are gone.
            Some(Err(_)) => Err(Error::ManagerStopped),
            // The wait budget ran out first.
            None => Err(self.unavailable()),
        }
    }

    /// Waits (up to `limit`) until `actor` no longer serves; whether it stopped serving. For a
    /// caller whose request `actor` dropped: a failing actor drops what it holds as it
    /// unwinds, a moment before it is recorded as failed (and why).
    pub(crate) async fn left(&self, actor: &ActorRef<BackendMsg>, limit: Duration) -> bool {
        let mut serving = self.serving.subscribe();
        let left = serving.wait_for(|s| match s {
            Serving::Up(up) => up.get_id() != actor.get_id(),
            _ => true,
        });
        let left = matches!(tokio::time::timeout(limit, left).await, Ok(Ok(_)));
        left
    }

    /// Why this backend cannot take a request now: it is down (retryable), or the manager
    /// stopped.
    pub(crate) fn unavailable(&self) -> Error {
        match &*self.serving.borrow() {
            Serving::Stopped => Error::ManagerStopped,
            _ => Error::BackendDown {
                backend: self.name.to_string(),
            },
        }
    }

    /// Why a request that the backend actor had taken went unanswered: if that actor
    /// panicked, the panic (a bug: not retryable, since the same request may well panic the
    /// next actor too); otherwise as [`unavailable`](Self::unavailable).
    pub(crate) fn dropped(&self) -> Error {
        match self.panic() {
            Some(panic) => Error::BackendPanicked {
                backend: self.name.to_string(),
                panic: panic.to_string(),
            },
            None => self.unavailable(),
        }
    }

    /// A lifecycle event of a lease of kind `primitive` on `key`: into the metrics, and to
    /// whoever listens.
    pub(crate) fn emit(
        &self,
        primitive: Primitive,
        key: &Arc<str>,
        fencing_token: Option<u64>,
        kind: LockEventKind,
    ) {
        self.metrics.event(primitive, &kind);
        self.events.emit(&self.name, Some(key), fencing_token, kind);
    }

    pub(crate) fn store_error(&self, source: StoreError) -> Error {
        // Not a store failure: the callers of one semaphore disagree on its N.
        if let StoreError::PermitsMismatch { name, asked, held } = source {
            return Error::PermitsMismatch { name, asked, held };
        }
        Error::Store {
            backend: self.name.to_string(),
            source,
        }
    }

    /// A number for a key actor's next job, never used before on this backend.
    pub(crate) fn next_job(&self) -> u64 {
        self.next_job.fetch_add(1, Ordering::Relaxed)
    }

    /// A call on a lease (`op`: acquire, renew or release) answered after `took` (from the
    /// clock readings its key actor takes anyway): into the store-call metrics, and towards
    /// the backend's health.
    pub(crate) fn answered<T>(
        &self,
        op: StoreOp,
        took: Duration,
        outcome: &std::result::Result<T, StoreError>,
    ) {
        self.metrics.store_call(op, took, outcome.is_err());
        self.record(outcome);
    }

    /// Counts a store operation's outcome towards the backend's health. After failures (and no
    /// success) for longer than the retry budget, tells the backend actor the store is down.
    fn record<T>(&self, outcome: &std::result::Result<T, StoreError>) {
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

    /// Whether the store has failed, and nothing got through, for at least `budget`.
    pub(crate) fn store_down_for(&self, budget: Duration) -> bool {
        self.health.down_for(budget)
    }

    /// Forgets past store failures (a probe just got through).
    pub(crate) fn store_answered(&self) {
        self.health.reset();
    }

    pub(crate) fn handover(&self) -> MutexGuard<'_, Handover> {
        self.handover.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For shutdown while no backend actor serves: fails the handed-over requests, releases the
    /// handed-over locks, and waits (bounded) for their key actors to stop.
    pub(crate) async fn release_handed_over(&self) {
        let Handover { keys, waiting } = std::mem::take(&mut *self.handover());
        for (_, reply) in waiting {
            let _ = reply.send(Err(Error::ManagerStopped));
        }
        let actors: Vec<ActorRef<KeyMsg>> = keys.into_iter().map(|busy| busy.actor).collect();
        self.stop_key_actors(&actors).await;
    }

    /// Tells each key actor to release what it holds and stop, then waits for them, bounded by
    /// the operation budget (each release is bounded by it too) with room to spare.
    pub(crate) async fn stop_key_actors(&self, actors: &[ActorRef<KeyMsg>]) {
        for actor in actors {
            let _ = actor.cast(KeyMsg::Shutdown);
        }
        let budget = Some(self.timing.op_timeout * 2);
        let stopped = actors.iter().map(|actor| {
            let cell = actor.get_cell();
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
