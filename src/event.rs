//! Lifecycle events: what happened to which lock, when. Published through a ractor
//! [`OutputPort`], a broadcast channel for plain async code, and `tracing`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ractor::{ActorRef, Message, OutputPort};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::error::StoreError;

/// One thing that happened to a lock (or to a backend).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LockEvent {
    /// The backend's configured name.
    pub backend: Arc<str>,
    /// The key, or `None` for backend-wide events.
    pub key: Option<Arc<str>>,
    /// The lease's fencing token, once there is one.
    pub fencing_token: Option<u64>,
    /// Wall-clock time of the event, for logs.
    pub at: SystemTime,
    /// Monotonic time of the event, comparable with lease deadlines.
    pub instant: Instant,
    /// What happened.
    pub kind: LockEventKind,
}

/// What happened, in a [`LockEvent`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LockEventKind {
    /// A lock was asked for.
    Requested,
    /// The lock was acquired, after waiting this long since it was asked for.
    Acquired {
        /// From the request to the acquisition.
        waited: Duration,
    },
    /// The key was held by someone else; the request waits (or gives up, for a try-lock).
    Contended,
    /// The lease was extended; it is now trusted until `deadline`.
    Renewed {
        /// The new local deadline (monotonic).
        deadline: Instant,
    },
    /// A renewal failed and will be retried until the deadline.
    RenewFailed {
        /// How many renewals in a row have failed.
        attempt: u32,
        /// What the store said.
        error: StoreError,
    },
    /// The lease can no longer be trusted; the holder has been told.
    Lost {
        /// Why.
        reason: LostReason,
    },
    /// The lock was given back.
    Released {
        /// How long it was held.
        held_for: Duration,
        /// Why it was given back.
        reason: ReleaseReason,
    },
    /// The held lease was handed to another holder actor ([`LockGuard::hand_over`]): same
    /// lease, same fencing token, the new holder monitored instead of the old.
    ///
    /// [`LockGuard::hand_over`]: crate::LockGuard::hand_over
    HandedOver,
    /// The backend actor failed; requests to it fail with a retryable error until it is back.
    BackendDown,
    /// The backend actor was restarted.
    BackendRestored,
}

/// Why a lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The store says someone else owns the key now (it expired and was taken, or it was
    /// deleted or overwritten behind the holder's back).
    NotOwner,
    /// The local deadline passed before a renewal succeeded (the store was unreachable or
    /// slow, or auto-renew was off).
    Expired,
    /// The lock manager shut down and released it.
    Shutdown,
    /// The holder actor stopped, and the lock was released with it.
    HolderStopped,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::NotOwner => "the store no longer names this holder as owner",
            LostReason::Expired => "the lease deadline passed without a successful renewal",
            LostReason::Shutdown => "the lock manager shut down",
            LostReason::HolderStopped => "the holder actor stopped",
        })
    }
}

/// Why a lock was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseReason {
    /// `release()` was called (or a `Release` message sent).
    Requested,
    /// The guard was dropped.
    Dropped,
    /// The holder actor stopped.
    HolderStopped,
    /// The lock manager shut down.
    Shutdown,
    /// The caller gave up before the acquisition could be handed over.
    Abandoned,
    /// A cluster gateway did not hear from the holder's node within its liveness bound
    /// (`cluster::GatewayOptions`, feature `cluster`).
    HolderSilent,
}

#[cfg(feature = "cluster")]
impl ractor::Message for LockEvent {}

/// Counts and durations over every lock of one manager since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockMetrics {
    /// Acquisitions asked for.
    pub requested: u64,
    /// Acquisitions that succeeded.
    pub acquired: u64,
    /// Times a request found its key held.
    pub contended: u64,
    /// Successful renewals.
    pub renewed: u64,
    /// Failed renewals.
    pub renew_failed: u64,
    /// Leases lost.
    pub lost: u64,
    /// Locks released.
    pub released: u64,
    /// Time spent waiting, summed over all acquisitions.
    pub total_wait: Duration,
    /// Time locks were held, summed over all releases.
    pub total_hold: Duration,
}

impl LockMetrics {
    /// Locks held right now.
    pub fn held(&self) -> u64 {
        self.acquired.saturating_sub(self.lost + self.released)
    }
}

/// The live counters behind [`LockMetrics`]: relaxed atomic adds on the hot path, nothing more.
#[derive(Default)]
struct Counters {
    requested: AtomicU64,
    acquired: AtomicU64,
    contended: AtomicU64,
    renewed: AtomicU64,
    renew_failed: AtomicU64,
    lost: AtomicU64,
    released: AtomicU64,
    wait_micros: AtomicU64,
    hold_micros: AtomicU64,
}

impl Counters {
    fn count(&self, kind: &LockEventKind) {
        let add = |counter: &AtomicU64, n: u64| counter.fetch_add(n, Ordering::Relaxed);
        let micros = |d: &Duration| d.as_micros().min(u64::MAX as u128) as u64;
        match kind {
            LockEventKind::Requested => add(&self.requested, 1),
            LockEventKind::Acquired { waited } => {
                add(&self.wait_micros, micros(waited));
                add(&self.acquired, 1)
            }
            LockEventKind::Contended => add(&self.contended, 1),
            LockEventKind::Renewed { .. } => add(&self.renewed, 1),
            LockEventKind::RenewFailed { .. } => add(&self.renew_failed, 1),
            LockEventKind::Lost { .. } => add(&self.lost, 1),
            LockEventKind::Released { held_for, .. } => {
                add(&self.hold_micros, micros(held_for));
                add(&self.released, 1)
            }
            LockEventKind::HandedOver
            | LockEventKind::BackendDown
            | LockEventKind::BackendRestored => 0,
        };
    }

    fn snapshot(&self) -> LockMetrics {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LockMetrics {
            requested: get(&self.requested),
            acquired: get(&self.acquired),
            contended: get(&self.contended),
            renewed: get(&self.renewed),
            renew_failed: get(&self.renew_failed),
            lost: get(&self.lost),
            released: get(&self.released),
            total_wait: Duration::from_micros(get(&self.wait_micros)),
            total_hold: Duration::from_micros(get(&self.hold_micros)),
        }
    }
}

/// Where events go: the ractor output port (for actors), a broadcast channel (for async code),
/// `tracing`, and the metrics counters.
pub(crate) struct EventBus {
    port: OutputPort<LockEvent>,
    broadcast: broadcast::Sender<LockEvent>,
    /// Set once an actor subscribed to the port (ractor does not say how many listen).
    port_subscribed: AtomicBool,
    counters: Counters,
}

impl EventBus {
    pub(crate) fn new() -> Self {
        EventBus {
            port: OutputPort::default(),
            broadcast: broadcast::channel(1024).0,
            port_subscribed: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    pub(crate) fn emit(
        &self,
        backend: &Arc<str>,
        key: Option<&Arc<str>>,
        fencing_token: Option<u64>,
        kind: LockEventKind,
    ) {
        self.counters.count(&kind);
        trace_event(backend, key, fencing_token, &kind);
        // The event itself (two clock reads, a few reference counts) is built only when
        // someone listens: the hot path pays for events only when they were asked for.
        let listened =
            self.broadcast.receiver_count() > 0 || self.port_subscribed.load(Ordering::Relaxed);
        if !listened {
            return;
        }
        let event = LockEvent {
            backend: backend.clone(),
            key: key.cloned(),
            fencing_token,
            at: SystemTime::now(),
            instant: Instant::now(),
            kind,
        };
        if self.broadcast.receiver_count() > 0 {
            let _ = self.broadcast.send(event.clone());
        }
        self.port.send(event);
    }

    pub(crate) fn metrics(&self) -> LockMetrics {
        self.counters.snapshot()
    }

    pub(crate) fn receiver(&self) -> broadcast::Receiver<LockEvent> {
        self.broadcast.subscribe()
    }

    pub(crate) fn subscribe<M, F>(&self, actor: ActorRef<M>, converter: F)
    where
        M: Message,
        F: Fn(LockEvent) -> Option<M> + Send + 'static,
    {
        self.port.subscribe(actor, converter);
        self.port_subscribed.store(true, Ordering::Relaxed);
    }
}

fn trace_event(
    backend: &Arc<str>,
    key: Option<&Arc<str>>,
    fencing_token: Option<u64>,
    kind: &LockEventKind,
) {
    let key = key.map(|k| &**k).unwrap_or("");
    let backend = &**backend;
    let token = fencing_token.unwrap_or(0);
    match kind {
        LockEventKind::Requested => tracing::trace!(backend, key, "lock requested"),
        LockEventKind::Acquired { waited } => {
            tracing::debug!(backend, key, token, ?waited, "lock acquired")
        }
        LockEventKind::Contended => tracing::debug!(backend, key, "lock contended"),
        LockEventKind::Renewed { .. } => tracing::trace!(backend, key, token, "lease renewed"),
        LockEventKind::RenewFailed { attempt, error } => {
            tracing::warn!(backend, key, token, attempt, %error, "lease renewal failed")
        }
        LockEventKind::Lost { reason } => {
            tracing::warn!(backend, key, token, %reason, "lease lost")
        }
        LockEventKind::Released { held_for, reason } => {
            tracing::debug!(backend, key, token, ?held_for, ?reason, "lock released")
        }
        LockEventKind::HandedOver => {
            tracing::debug!(backend, key, token, "lock handed to another holder")
        }
        LockEventKind::BackendDown => tracing::error!(backend, "backend down"),
        LockEventKind::BackendRestored => tracing::info!(backend, "backend restored"),
    }
}
