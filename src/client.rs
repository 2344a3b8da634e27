//! `LockClient`: the handle plain async code uses. Every method is one message to the
//! [`LockManager`](crate::LockManager); the guard it hands back talks to its key actor directly.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorRef, ActorStatus, Message, RpcReplyPort};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::backend::{LockInfo, StoreEvents};
use crate::backend_actor::BackendMsg;
use crate::backend_ctx::BackendCtx;
use crate::error::{Error, Result};
use crate::event::{EventBus, LockEvent, LockMetrics};
use crate::guard::LockGuard;
use crate::manager::LockManagerMsg;
use crate::options::{Caller, LockOptions};
use crate::request::AcquireRequest;

/// A cheap, cloneable handle on a running [`LockManager`](crate::LockManager), scoped to one
/// backend (the default one unless [`LockClient::backend`] chose another).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), leasehold::Error> {
/// use leasehold::{LockManager, LockOptions, MemoryBackend};
///
/// let client = LockManager::builder()
///     .with_name("client-doc")
///     .with_backend("memory", MemoryBackend::new())
///     .start()
///     .await?;
/// let guard = client.lock("reports/daily", LockOptions::new()).await?;
/// assert!(client.try_lock("reports/daily", LockOptions::new()).await?.is_none());
/// println!("writing with fencing token {}", guard.fencing_token());
/// guard.release().await?;
/// client.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct LockClient {
    manager: ActorRef<LockManagerMsg>,
    /// The backend this handle uses.
    backend: Arc<BackendCtx>,
    /// Every backend of the manager, the default first.
    backends: Arc<[Arc<BackendCtx>]>,
    events: Arc<EventBus>,
}

impl LockClient {
    pub(crate) fn new(
        manager: ActorRef<LockManagerMsg>,
        backends: Arc<[Arc<BackendCtx>]>,
        events: Arc<EventBus>,
    ) -> Self {
        LockClient {
            manager,
            backend: backends[0].clone(),
            backends,
            events,
        }
    }

    /// A handle on the manager registered under `name` on this node.
    pub async fn connect(name: &str) -> Result<LockClient> {
        let manager: ActorRef<LockManagerMsg> = ractor::registry::where_is(name)
            .ok_or_else(|| Error::ManagerNotFound {
                name: name.to_owned(),
            })?
            .into();
        match manager.call(LockManagerMsg::Client, None).await {
            Ok(CallResult::Success(client)) => Ok(client),
            _ => Err(Error::ManagerStopped),
        }
    }

    /// The manager actor, for sending [`LockManagerMsg`]s directly.
    pub fn manager(&self) -> &ActorRef<LockManagerMsg> {
        &self.manager
    }

    /// The name of the backend this handle uses.
    pub fn backend_name(&self) -> &str {
        &self.backend.name
    }

    /// A handle on the same manager that uses the backend named `name`.
    pub fn backend(&self, name: &str) -> Result<LockClient> {
        let Some(backend) = self.backends.iter().find(|b| *b.name == *name) else {
            return Err(Error::UnknownBackend {
                name: name.to_owned(),
                known: self.backends.iter().map(|b| b.name.to_string()).collect(),
            });
        };
        Ok(LockClient {
            backend: backend.clone(),
            ..self.clone()
        })
    }

    /// Tries once to take `key`. `Ok(None)`: someone else holds it. (`options.wait` is
    /// ignored: this never waits.)
    pub async fn try_lock(&self, key: &str, options: LockOptions) -> Result<Option<LockGuard>> {
        self.acquire(key, options, Caller::TryLock).await
    }

    /// Takes `key`, waiting as `options.wait` says (forever if unset). Waiting is by release
    /// notice, not by polling; local waiters are served in the order they asked. The guard
    /// it returns is held: an acquisition whose store answer came too late to trust is given
    /// back and tried again within the wait budget.
    pub async fn lock(&self, key: &str, options: LockOptions) -> Result<LockGuard> {
        let asked_at = Instant::now();
        match self.acquire(key, options, Caller::Lock).await? {
            Some(guard) => Ok(guard),
            // Only `Wait::No` answers "held" instead of waiting.
            None => Err(Error::Timeout {
                key: key.to_owned(),
                waited: asked_at.elapsed(),
            }),
        }
    }

    /// Takes `key` (as [`lock`](Self::lock) does: waiting forever unless `options` say),
    /// runs `body` with the fencing token while the lock is held, and releases it. If the
    /// lease is lost while `body` runs, `body` is stopped at once (dropped at its next await)
    /// and the loss is returned as [`Error::LeaseLost`].
    ///
    /// Once `body` has finished while the lease was held, its result is returned even if the
    /// release after it fails: the work is done, and a lease the store did not hear released
    /// expires there by itself. Such a failure is logged, and a release that finds the lease
    /// taken away is a [`LockEventKind::Lost`](crate::LockEventKind::Lost) event.
    pub async fn with_lock<F, Fut, T>(&self, key: &str, options: LockOptions, body: F) -> Result<T>
    where
        F: FnOnce(u64) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.lock(key, options).await?;
        let outcome = tokio::select! {
            out = body(guard.fencing_token()) => out,
            reason = guard.lost() => {
                return Err(Error::LeaseLost { key: key.to_owned(), reason });
            }
        };
        if let Err(error) = guard.release().await {
            tracing::warn!(backend = %self.backend.name, key, %error, "with_lock: the release after the body failed");
        }
        Ok(outcome)
    }

    /// True if anyone (on any node) holds `key`, according to the store.
    pub async fn is_locked(&self, key: &str) -> Result<bool> {
        self.call(|reply| LockManagerMsg::IsLocked {
            backend: Some(self.backend.name.to_string()),
            key: key.to_owned(),
            reply,
        })
        .await
    }

    /// The current holder of `key`: fencing token, remaining ttl, metadata.
    pub async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
        self.call(|reply| LockManagerMsg::Info {
            backend: Some(self.backend.name.to_string()),
            key: key.to_owned(),
            reply,
        })
        .await
    }

    /// Acquisitions and releases of keys that start with `prefix`, as the store sees them,
    /// by any node. For monitoring; not every store supports it.
    pub async fn watch(&self, prefix: &str) -> Result<StoreEvents> {
        self.call(|reply| LockManagerMsg::Watch {
            backend: Some(self.backend.name.to_string()),
            prefix: prefix.to_owned(),
            reply,
        })
        .await
    }

    /// Every lifecycle event from now on (of every backend). A receiver that falls more than
    /// 1024 events behind skips the oldest ones and is told how many.
    pub fn events(&self) -> broadcast::Receiver<LockEvent> {
        self.events.receiver()
    }

    /// Counts and summed wait and hold times of every lock of this manager, so far.
    pub fn metrics(&self) -> LockMetrics {
        self.events.metrics()
    }

    /// Sends every lifecycle event, converted by `converter`, to `actor` (the ractor
    /// `OutputPort` way; `None` from the converter skips the event).
    pub fn subscribe<M, F>(&self, actor: ActorRef<M>, converter: F)
    where
        M: Message,
        F: Fn(LockEvent) -> Option<M> + Send + 'static,
    {
        self.events.subscribe(actor, converter);
    }

    /// Releases every lock this manager holds and waits until all its actors have stopped.
    /// Calls after this fail with [`Error::ManagerStopped`].
    pub async fn shutdown(&self) {
        let _ = self.manager.call(LockManagerMsg::Shutdown, None).await;
        self.manager.get_cell().wait(None).await.ok();
    }

    /// Validates here and sends straight to the backend actor: the manager only routes, and
    /// this handle already knows the route. Its span covers the whole wait.
    #[tracing::instrument(level = "debug", name = "acquire", skip_all, fields(
        backend = %self.backend.name, key = key, token = tracing::field::Empty,
    ))]
    async fn acquire(
        &self,
        key: &str,
        options: LockOptions,
        caller: Caller,
    ) -> Result<Option<LockGuard>> {
        let ctx = &self.backend;
        let request = AcquireRequest::new(ctx, key, options, caller)?;
        let mut gone = None;
        loop {
            let actor = ctx.actor_for(&request, gone.as_ref()).await?;
            let call = actor
                .call(|reply| BackendMsg::Acquire(request.clone(), reply), None)
                .await;
            if let Ok(CallResult::Success(result)) = call {
                if let Ok(Some(guard)) = &result {
                    tracing::Span::current().record("token", guard.fencing_token());
                }
                return result;
            }
            // The request went unanswered: the backend actor went away with it (in its
            // mailbox, or in the hands of one of its key actors), or panicked over it.
            let left = ctx.left(&actor, SETTLE).await;
            if ctx.panic().is_some() || request.tries_once() {
                return Err(ctx.dropped());
            }
            // A waiting request asks again; not the same actor if that one is gone (killed,
            // say, and still recorded as serving): it waits for its successor.
            let stopping = actor.get_status() >= ActorStatus::Stopping;
            gone = (left || stopping).then_some(actor);
        }
    }

    pub(crate) fn backend_ctx(&self) -> &Arc<BackendCtx> {
        &self.backend
    }

    /// Why a request to the manager went unanswered: the manager stopped, or only this
    /// backend is down.
    fn unavailable(&self) -> Error {
        if self.manager.get_status() == ractor::ActorStatus::Running {
            Error::BackendDown {
                backend: self.backend.name.to_string(),
            }
        } else {
            Error::ManagerStopped
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<Result<T>>) -> LockManagerMsg,
    ) -> Result<T> {
        match self.manager.call(msg, None).await {
            Ok(CallResult::Success(result)) => result,
            _ => Err(self.unavailable()),
        }
    }
}

/// How long a caller whose request went unanswered waits for the backend actor to be recorded
/// as failed, if it is failing.
const SETTLE: Duration = Duration::from_millis(50);

impl std::fmt::Debug for LockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockClient")
            .field("manager", &self.manager.get_id())
            .field("backend", &self.backend.name)
            .finish()
    }
}
