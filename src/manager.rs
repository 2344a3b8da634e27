//! `LockManager`: the supervisor at the root of the tree. It is registered by name, routes each
//! request to the backend it names (or the default one), restarts a failed backend actor with
//! capped exponential backoff, and owns the event bus.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::backend::{LockBackend, LockInfo, OwnerToken, PermitHolder, RwMode, StoreEvents};
use crate::backend_actor::{BackendActor, BackendArgs, BackendMsg};
use crate::backend_ctx::{BackendCtx, Serving};
use crate::client::LockClient;
use crate::error::{Error, Result};
use crate::event::{EventBus, LockEvent, LockEventKind};
use crate::guard::LockGuard;
use crate::metrics::StoreOp;
use crate::options::{validate_key, validate_ttl, Caller, LockOptions, MAX_TTL};
use crate::request::{AcquireReply, AcquireRequest, InspectReply};
use crate::rwlock::rw_options;
use crate::semaphore::{holders, permit_options, validate_semaphore};
use crate::timing::Timing;

/// The name a manager registers under unless told otherwise.
pub const DEFAULT_MANAGER_NAME: &str = "leasehold";

/// Messages an application actor sends to the lock manager, with `call!`/`cast!`.
///
/// `backend: None` means the manager's default backend. Replies come on the `RpcReplyPort`.
///
/// ```no_run
/// # async fn demo(manager: ractor::ActorRef<leasehold::LockManagerMsg>) -> Result<(), Box<dyn std::error::Error>> {
/// use leasehold::{LockManagerMsg, LockOptions};
///
/// let guard = ractor::call!(manager, |reply| LockManagerMsg::Acquire {
///     backend: None,
///     key: "jobs/nightly".into(),
///     options: LockOptions::new(),
///     reply,
/// })??;
/// # drop(guard);
/// # Ok(())
/// # }
/// ```
#[non_exhaustive]
pub enum LockManagerMsg {
    /// Acquire `key`. `options.wait` unset means try once. With `options.holder` set to the
    /// calling actor, the lock is released when that actor stops.
    Acquire {
        /// The backend's name, or `None` for the default.
        backend: Option<String>,
        /// The key.
        key: String,
        /// Ttl, wait, renewal, holder, metadata.
        options: LockOptions,
        /// `Ok(None)`: the key is held and the request did not wait.
        reply: RpcReplyPort<Result<Option<LockGuard>>>,
    },
    /// Acquire `count` of the `permits` permits of the semaphore `name`, as one lease (see
    /// [`Semaphore`](crate::Semaphore)). `options.wait` unset means try once. The guard
    /// releases and renews the lease (the `Release` and `Renew` messages name locks only:
    /// one node may hold several leases of one semaphore).
    AcquirePermits {
        /// The backend's name, or `None` for the default.
        backend: Option<String>,
        /// The semaphore's name.
        name: String,
        /// The semaphore's N.
        permits: u32,
        /// How many permits to take at once, from 1 to N.
        count: u32,
        /// Ttl, wait, renewal, holder, metadata.
        options: LockOptions,
        /// `Ok(None)`: too few permits are free and the request did not wait.
        reply: RpcReplyPort<Result<Option<LockGuard>>>,
    },
    /// Acquire a read share or the write hold of the read-write lock `name` (see
    /// [`RwLock`](crate::RwLock)). `options.wait` unset means try once; a writer that waits
    /// holds new readers back meanwhile, and withdraws that when it gives up. The guard
    /// releases and renews the lease (one node may hold several shares of one lock).
    AcquireRw {
        /// The backend's name, or `None` for the default.
        backend: Option<String>,
        /// The read-write lock's name.
        name: String,
        /// A read share or the write hold.
        mode: RwMode,
        /// Ttl, wait, renewal, holder, metadata.
        options: LockOptions,
        /// `Ok(None)`: refused, and the request did not wait.
        reply: RpcReplyPort<Result<Option<LockGuard>>>,
    },
    /// Who holds the permits of the semaphore `name`, oldest first.
    PermitHolders {
        /// The backend's name, or `None` for the default.
        backend: Option<String>,
        /// The semaphore's name.
        name: String,
        /// The answer.
        reply: RpcReplyPort<Result<Vec<PermitHolder>>>,
    },
    /// Release the lock on `key` held with `owner` (see [`LockGuard::owner`]); not a fair
    /// lock's (see [`LockOptions::with_fair`]): its guard releases it.
    Release {
        /// The backend's name, or `None` for the default.
        backend: Option<String>,
        /// The key.
        key: String,
        /// The owner token of the lease to release.
        owner: OwnerToken,
        /// The answer.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Renew the lease on `key` held with `owner` to `ttl` (not a fair lock's: its guard renews it).
    Renew {
        /// The backend's name, or `None` for the default.
        backend: Option<String>,
        /// The key.
        key: String,
        /// The owner token of the lease to renew.
        owner: OwnerToken,
        /// The new ttl.
        ttl: Duration,
        /// The answer.
        reply: RpcReplyPort<Result<()>>,
    },
    /// Is `key` held by anyone, according to the store?
    IsLocked {
        /// The backend's name, or `None` for the default.
        backend: Option<String>,
        /// The key.
        key: String,
        /// The answer.
        reply: RpcReplyPort<Result<bool>>,
    },
    /// Who holds `key`: fencing token, remaining ttl, metadata.
    Info {
        /// The backend's name, or `None` for the default.
        backend: Option<String>,
        /// The key.
        key: String,
        /// The answer.
        reply: RpcReplyPort<Result<Option<LockInfo>>>,
    },
    /// Acquisitions and releases of keys under `prefix` as the store sees them, from every
    /// node (for monitoring).
    Watch {
        /// The backend's name, or `None` for the default.
        backend: Option<String>,
        /// Only keys that start with this.
        prefix: String,
        /// The event stream.
        reply: RpcReplyPort<Result<StoreEvents>>,
    },
    /// Send every lifecycle event to this actor.
    Subscribe(ActorRef<LockEvent>),
    /// A [`LockClient`] handle on this manager, for async code.
    Client(RpcReplyPort<LockClient>),
    /// Release every lock, stop every actor, then answer.
    Shutdown(RpcReplyPort<()>),
    #[doc(hidden)]
    Backend(BackendNotice),
}

/// Internal: news of a backend actor's restart.
#[doc(hidden)]
pub struct BackendNotice(Notice);

enum Notice {
    /// The backoff after a failure is over: start a new backend actor.
    Restart(Arc<str>),
    /// A restarted backend actor reached its store and took over.
    Up(Arc<str>),
}

impl LockManagerMsg {
    pub(crate) fn backend_up(name: Arc<str>) -> Self {
        LockManagerMsg::Backend(BackendNotice(Notice::Up(name)))
    }

    fn restart_backend(name: Arc<str>) -> Self {
        LockManagerMsg::Backend(BackendNotice(Notice::Restart(name)))
    }
}

#[cfg(feature = "cluster")]
impl ractor::Message for LockManagerMsg {}

/// The lock manager actor. Build and start one with [`LockManager::builder`].
pub struct LockManager;

/// Configures and starts a [`LockManager`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), leasehold::Error> {
/// use leasehold::{LockManager, MemoryBackend};
///
/// let client = LockManager::builder()
///     .with_name("doc-example")
///     .with_backend("memory", MemoryBackend::new())
///     .start()
///     .await?;
/// client.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct LockManagerBuilder {
    name: String,
    backends: Vec<(String, Arc<dyn LockBackend>)>,
    default: Option<String>,
    timing: Timing,
}

impl LockManager {
    /// A builder with no backends, registered as [`DEFAULT_MANAGER_NAME`].
    pub fn builder() -> LockManagerBuilder {
        LockManagerBuilder {
            name: DEFAULT_MANAGER_NAME.to_owned(),
            backends: Vec::new(),
            default: None,
            timing: Timing {
                drift: 0.01,
                op_timeout: Duration::from_secs(5),
                backstop_cap: Duration::from_secs(5),
                store_budget: Duration::from_secs(5),
            },
        }
    }
}

impl LockManagerBuilder {
    /// The name the manager registers under (one manager per name per node).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Adds a backend service under `name`. The first one added is the default unless
    /// [`with_default_backend`](Self::with_default_backend) says otherwise. Several backends of
    /// one kind (two Redis deployments) are simply two names.
    pub fn with_backend(mut self, name: impl Into<String>, backend: impl LockBackend) -> Self {
        self.backends.push((name.into(), Arc::new(backend)));
        self
    }

    /// The backend used when a request names none.
    pub fn with_default_backend(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }

    /// The share of each ttl held back for clock drift (default 0.01): a lease is trusted until
    /// `sent_at + ttl × (1 − drift)`.
    pub fn with_clock_drift(mut self, drift: f64) -> Self {
        self.timing.drift = drift;
        self
    }

    /// The time budget of one store operation (default 5 s).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.timing.op_timeout = timeout;
        self
    }

    /// The longest a waiter goes without re-checking a key when no release notice comes
    /// (default 5 s).
    pub fn with_backstop_cap(mut self, cap: Duration) -> Self {
        self.timing.backstop_cap = cap;
        self
    }

    /// How long a store may keep failing (every operation, no success between) before its
    /// backend actor is restarted (default 5 s). While it is down, the manager probes the store
    /// with capped exponential backoff; `try_lock` fails at once with
    /// [`Error::BackendDown`] and waiting acquisitions wait for it. Held locks are not affected:
    /// their key actors go on renewing until their own deadlines.
    pub fn with_store_retry_budget(mut self, budget: Duration) -> Self {
        self.timing.store_budget = budget;
        self
    }

    /// Starts the manager and its backend actors, and returns a handle on it.
    pub async fn start(self) -> Result<LockClient> {
        self.spawn(None).await
    }

    /// Starts the manager under `supervisor`.
    pub async fn start_linked(self, supervisor: ActorCell) -> Result<LockClient> {
        self.spawn(Some(supervisor)).await
    }

    async fn spawn(self, supervisor: Option<ActorCell>) -> Result<LockClient> {
        let invalid = |msg: String| Err(Error::InvalidConfig(msg));
        if self.backends.is_empty() {
            return invalid("no backend configured".into());
        }
        if !(0.0..0.5).contains(&self.timing.drift) {
            return invalid(format!(
                "clock drift {} is not in [0, 0.5)",
                self.timing.drift
            ));
        }
        let timing = &self.timing;
        for (what, value) in [
            ("operation timeout", timing.op_timeout),
            ("backstop cap", timing.backstop_cap),
            ("store retry budget", timing.store_budget),
        ] {
            if value.is_zero() || value > MAX_TTL {
                return invalid(format!(
                    "{what} {value:?} is not between zero and the longest ttl, {MAX_TTL:?}"
                ));
            }
        }
        let events = Arc::new(EventBus::new());
        let mut backends: Vec<Arc<BackendCtx>> = Vec::new();
        for (name, store) in self.backends {
            if name.is_empty() || backends.iter().any(|b| *b.name == *name) {
                return invalid(format!("backend name {name:?} is empty or used twice"));
            }
            let ctx = BackendCtx::new(name.into(), store, events.clone(), self.timing);
            backends.push(Arc::new(ctx));
        }
        // The default backend goes first: that is how the manager and its clients know it.
        let at = match &self.default {
            None => 0,
            Some(name) => backends
                .iter()
                .position(|b| *b.name == **name)
                .ok_or_else(|| Error::UnknownBackend {
                    name: name.clone(),
                    known: backends.iter().map(|b| b.name.to_string()).collect(),
                })?,
        };
        backends[..=at].rotate_right(1);
        let state_ctxs: Arc<[Arc<BackendCtx>]> = backends.clone().into();
        let args = ManagerArgs {
            name: self.name.clone(),
            backends,
            events: events.clone(),
        };
        let spawned = match supervisor {
            Some(sup) => Actor::spawn_linked(Some(self.name.clone()), LockManager, args, sup).await,
            None => Actor::spawn(Some(self.name.clone()), LockManager, args).await,
        };
        let (manager, _join) = spawned.map_err(|e| {
            Error::InvalidConfig(format!("could not start lock manager {:?}: {e}", self.name))
        })?;
        Ok(LockClient::new(manager, state_ctxs, events))
    }
}

/// The manager actor's start-up arguments (built by [`LockManagerBuilder`]).
pub struct ManagerArgs {
    name: String,
    backends: Vec<Arc<BackendCtx>>,
    events: Arc<EventBus>,
}

/// The manager actor's state (opaque).
pub struct ManagerState {
    name: String,
    backends: HashMap<Arc<str>, BackendEntry>,
    /// Every backend, the default first, as `LockClient`s see them.
    ctxs: Arc<[Arc<BackendCtx>]>,
    events: Arc<EventBus>,
    shutting_down: bool,
}

struct BackendEntry {
    ctx: Arc<BackendCtx>,
    /// The backend's actor: serving, or (after a restart) still probing its store.
    actor: Option<ActorRef<BackendMsg>>,
    /// Failures since the backend was last up; sets the backoff.
    failures: u32,
    /// Down since a failure, until a restarted actor reports up.
    down: bool,
}

const RESTART_BACKOFF_BASE: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_CAP: Duration = Duration::from_secs(10);

impl Actor for LockManager {
    type Msg = LockManagerMsg;
    type State = ManagerState;
    type Arguments = ManagerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LockManagerMsg>,
        args: ManagerArgs,
    ) -> Result<ManagerState, ActorProcessingErr> {
        #[cfg(feature = "cluster")]
        ractor::pg::join(
            crate::cluster::MANAGER_GROUP.into(),
            vec![myself.get_cell()],
        );
        let mut backends = HashMap::new();
        for ctx in &args.backends {
            let actor = spawn_backend(&myself, &args.name, ctx, false).await?;
            let entry = BackendEntry {
                ctx: ctx.clone(),
                actor: Some(actor),
                failures: 0,
                down: false,
            };
            backends.insert(ctx.name.clone(), entry);
        }
        Ok(ManagerState {
            name: args.name,
            backends,
            ctxs: args.backends.into(),
            events: args.events,
            shutting_down: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<LockManagerMsg>,
        msg: LockManagerMsg,
        state: &mut ManagerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LockManagerMsg::Acquire {
                backend,
                key,
                options,
                reply,
            } => state.acquire(backend.as_deref(), &key, Ok(options), reply),
            LockManagerMsg::AcquirePermits {
                backend,
                name,
                permits,
                count,
                options,
                reply,
            } => {
                let options = permit_options(&name, permits, count, options);
                state.acquire(backend.as_deref(), &name, options, reply);
            }
            LockManagerMsg::AcquireRw {
                backend,
                name,
                mode,
                options,
                reply,
            } => {
                let options = rw_options(&name, mode, options);
                state.acquire(backend.as_deref(), &name, options, reply);
            }
            LockManagerMsg::PermitHolders {
                backend,
                name,
                reply,
            } => {
                let live =
                    validate_semaphore(&name, 1).and_then(|()| state.live(backend.as_deref()));
                match live {
                    Ok((ctx, _)) => {
                        let ctx = ctx.clone();
                        // Store I/O: not in this actor's loop.
                        tokio::spawn(async move {
                            let _ = reply.send(holders(&ctx, &name).await);
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            LockManagerMsg::Release {
                backend,
                key,
                owner,
                reply,
            } => {
                let routed = state.route_key(backend.as_deref(), key);
                match routed {
                    Ok((actor, key)) => {
                        let _ = actor.cast(BackendMsg::Release { key, owner, reply });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            LockManagerMsg::Renew {
                backend,
                key,
                owner,
                ttl,
                reply,
            } => {
                let routed =
                    validate_ttl(ttl).and_then(|()| state.route_key(backend.as_deref(), key));
                match routed {
                    Ok((actor, key)) => {
                        let _ = actor.cast(BackendMsg::Renew {
                            key,
                            owner,
                            ttl,
                            reply,
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            LockManagerMsg::IsLocked {
                backend,
                key,
                reply,
            } => state.inspect(backend.as_deref(), key, InspectReply::IsLocked(reply)),
            LockManagerMsg::Info {
                backend,
                key,
                reply,
            } => state.inspect(backend.as_deref(), key, InspectReply::Info(reply)),
            LockManagerMsg::Watch {
                backend,
                prefix,
                reply,
            } => match validate_prefix(&prefix).and_then(|()| state.live(backend.as_deref())) {
                Ok((ctx, _)) => {
                    let ctx = ctx.clone();
                    // Opening a watch is store I/O: not in this actor's loop.
                    tokio::spawn(async move {
                        let watch = ctx.store.watch_prefix(&prefix);
                        let events = ctx.metrics.timed(StoreOp::WatchPrefix, watch).await;
                        let _ = reply.send(events.map_err(|e| ctx.store_error(e)));
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            LockManagerMsg::Subscribe(actor) => state.events.subscribe(actor, Some),
            LockManagerMsg::Client(reply) => {
                let client =
                    LockClient::new(myself.clone(), state.ctxs.clone(), state.events.clone());
                let _ = reply.send(client);
            }
            LockManagerMsg::Shutdown(reply) => {
                state.shutdown().await;
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
            LockManagerMsg::Backend(BackendNotice(Notice::Restart(name))) => {
                state.restart(&myself, &name).await;
            }
            LockManagerMsg::Backend(BackendNotice(Notice::Up(name))) => state.up(&name),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<LockManagerMsg>,
        event: SupervisionEvent,
        state: &mut ManagerState,
    ) -> Result<(), ActorProcessingErr> {
        // ractor's default stops a supervisor when a child stops; a backend failure must not
        // take the manager (and every other backend's locks) down with it.
        let (cell, why) = match &event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.clone().unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if state.shutting_down {
            return Ok(());
        }
        let id = cell.get_id();
        // Key actors are linked here while their backend is down; their ends need nothing
        // from this actor (the next backend actor reads them from its record).
        let Some(entry) = state
            .backends
            .values_mut()
            .find(|e| e.actor.as_ref().is_some_and(|a| a.get_id() == id))
        else {
            return Ok(());
        };
        if let Some(actor) = entry.actor.take() {
            entry.ctx.set_down(&actor, None);
        }
        let name = entry.ctx.name.clone();
        if !entry.down {
            entry.down = true;
            tracing::error!(backend = %name, reason = %why, "backend actor down; restarting");
            state
                .events
                .emit(&name, None, None, LockEventKind::BackendDown);
        } else {
            tracing::warn!(backend = %name, reason = %why, "backend restart failed");
        }
        state.retry_later(&myself, &name);
        Ok(())
    }
}

/// A watch prefix is a key's beginning: the key rules apply, except that it may be empty
/// (every key).
fn validate_prefix(prefix: &str) -> Result<()> {
    match prefix.is_empty() {
        true => Ok(()),
        false => validate_key(prefix),
    }
}

fn send_acquire(
    ctx: &BackendCtx,
    actor: ActorRef<BackendMsg>,
    request: AcquireRequest,
    reply: AcquireReply,
) {
    if let Err(ractor::MessagingErr::SendErr(BackendMsg::Acquire(_, reply))) =
        actor.cast(BackendMsg::Acquire(request, reply))
    {
        let _ = reply.send(Err(ctx.unavailable()));
    }
}

async fn spawn_backend(
    manager: &ActorRef<LockManagerMsg>,
    manager_name: &str,
    ctx: &Arc<BackendCtx>,
    restart: bool,
) -> Result<ActorRef<BackendMsg>, ActorProcessingErr> {
    // Named under the manager, so `registry::where_is("leasehold/redis")` finds it.
    let name = format!("{manager_name}/{}", ctx.name);
    let args = BackendArgs {
        ctx: ctx.clone(),
        restart,
        manager: manager.clone(),
    };
    let (actor, _join) =
        Actor::spawn_linked(Some(name), BackendActor, args, manager.get_cell()).await?;
    Ok(actor)
}

impl ManagerState {
    fn default(&self) -> &Arc<str> {
        &self.ctxs[0].name
    }

    fn backend(&self, name: Option<&str>) -> Result<&BackendEntry> {
        let name = name.unwrap_or(self.default());
        self.backends
            .get(name)
            .ok_or_else(|| Error::UnknownBackend {
                name: name.to_owned(),
                known: self.ctxs.iter().map(|c| c.name.to_string()).collect(),
            })
    }

    fn running(&self) -> Result<()> {
        match self.shutting_down {
            true => Err(Error::ManagerStopped),
            false => Ok(()),
        }
    }

    fn live(&self, name: Option<&str>) -> Result<(&Arc<BackendCtx>, ActorRef<BackendMsg>)> {
        self.running()?;
        let ctx = &self.backend(name)?.ctx;
        match ctx.actor() {
            Some(actor) => Ok((ctx, actor)),
            None => Err(Error::BackendDown {
                backend: ctx.name.to_string(),
            }),
        }
    }

    /// Checks and routes an acquisition (of a lock, of a semaphore's permits or of a
    /// read-write lock's share or hold, whose `options` were checked already) to its backend
    /// actor.
    fn acquire(
        &self,
        backend: Option<&str>,
        key: &str,
        options: Result<LockOptions>,
        reply: AcquireReply,
    ) {
        let routed = options.and_then(|options| {
            self.running()?;
            let ctx = &self.backend(backend)?.ctx;
            let request = AcquireRequest::new(ctx, key, options, Caller::Message)?;
            Ok((ctx.clone(), request))
        });
        match routed {
            Ok((ctx, request)) => match ctx.actor() {
                Some(actor) => send_acquire(&ctx, actor, request, reply),
                // Waiting for a backend to come back is not this actor's to do.
                None => {
                    tokio::spawn(async move {
                        match ctx.actor_for(&request, None).await {
                            Ok(actor) => send_acquire(&ctx, actor, request, reply),
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    });
                }
            },
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn route_key(
        &self,
        backend: Option<&str>,
        key: String,
    ) -> Result<(ActorRef<BackendMsg>, Arc<str>)> {
        validate_key(&key)?;
        let (_, actor) = self.live(backend)?;
        Ok((actor, key.into()))
    }

    fn inspect(&self, backend: Option<&str>, key: String, reply: InspectReply) {
        match self.route_key(backend, key) {
            Ok((actor, key)) => {
                let _ = actor.cast(BackendMsg::Inspect(key, reply));
            }
            Err(e) => reply.send(Err(e)),
        }
    }

    /// Starts a new actor for a failed backend. It probes the store first, and says when it
    /// is up; a failed probe fails it, and brings another try after a longer pause.
    async fn restart(&mut self, myself: &ActorRef<LockManagerMsg>, name: &Arc<str>) {
        if self.shutting_down {
            return;
        }
        let Some(entry) = self.backends.get_mut(name) else {
            return;
        };
        match spawn_backend(myself, &self.name, &entry.ctx, true).await {
            Ok(actor) => entry.actor = Some(actor),
            Err(error) => {
                tracing::error!(backend = %name, %error, "backend actor restart failed");
                self.retry_later(myself, name);
            }
        }
    }

    /// Schedules the next restart, with capped exponential backoff.
    fn retry_later(&mut self, myself: &ActorRef<LockManagerMsg>, name: &Arc<str>) {
        let Some(entry) = self.backends.get_mut(name) else {
            return;
        };
        let backoff = RESTART_BACKOFF_BASE
            .saturating_mul(1 << entry.failures.min(16))
            .min(RESTART_BACKOFF_CAP);
        entry.failures += 1;
        let name = name.clone();
        myself.send_after(backoff, move || LockManagerMsg::restart_backend(name));
    }

    fn up(&mut self, name: &Arc<str>) {
        let Some(entry) = self.backends.get_mut(name) else {
            return;
        };
        entry.failures = 0;
        if std::mem::take(&mut entry.down) {
            tracing::info!(backend = %name, "backend restored");
            self.events
                .emit(name, None, None, LockEventKind::BackendRestored);
        }
    }

    async fn shutdown(&mut self) {
        self.shutting_down = true;
        let mut actors = Vec::new();
        for entry in self.backends.values_mut() {
            entry.ctx.set_serving(Serving::Stopped);
            actors.extend(entry.actor.take());
        }
        let releases = actors.iter().map(|actor| async move {
            let _ = actor.call(BackendMsg::Shutdown, None).await;
            let _ = actor.stop_and_wait(None, None).await;
        });
        futures::future::join_all(releases).await;
        // A backend that was down (or whose restart failed its probe) has locks and requests
        // that no backend actor answered for.
        let ctxs = self.backends.values().map(|e| e.ctx.clone());
        futures::future::join_all(ctxs.map(|ctx| async move { ctx.release_handed_over().await }))
            .await;
    }
}
