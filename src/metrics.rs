//! Metrics through the [`metrics`](https://docs.rs/metrics) crate facade (feature `metrics`):
//! what the README's "Metrics" section lists, recorded into whatever recorder the application
//! installed (a Prometheus, StatsD or OpenTelemetry exporter).
//!
//! Every series a backend can record is registered once, when its [`BackendCtx`] is built
//! (when the [`LockManager`](crate::LockManager) starts), and kept as a handle: recording is
//! then a call on the handle (an atomic add for a counter), with no name lookup, label
//! building or allocation on the hot path. The flip side, as for every pre-registered
//! `metrics` handle: the recorder must be installed before the manager starts, or the handles
//! record into nothing.
//!
//! The hooks are one line each, at the places that already count [`LockMetrics`]:
//! [`BackendCtx::emit`] passes each lifecycle event to [`BackendMetrics::event`] (which also
//! moves the held-leases gauge: up on `Acquired`, down on `Released` and `Lost`); the key
//! actor times its renewals ([`BackendMetrics::renewal`]); the backend actor keeps a
//! [`Counted`] in each waiter it queues (its share of the waiters gauge, given back on drop,
//! so that no way out of the queue can miss it); and every store call is timed where it is
//! made, by operation ([`StoreOp`]).
//!
//! The calls on a lease (acquire, renew, release) are timed by the key actor from the clock
//! readings it takes anyway (when it asked, which starts the lease's deadline; when the answer
//! came, which starts the hold or ends it), through [`BackendCtx::answered`]; the rarer calls
//! through [`BackendMetrics::timed`]. An earlier version wrapped the store in a timing
//! `LockBackend`: that cost a second boxed future and two clock reads per call, on the hot
//! path, for readings the key actor already had.
//!
//! On the hot path (an uncontended lock and release) that is two counter adds, two gauge
//! moves and four histogram samples (wait, hold, the acquire and release calls), and no clock
//! read of its own. On the memory store, whose calls are in-process, the store-call series
//! are not kept: two histogram samples.
//!
//! Without the feature every type here is empty and every call an inlined no-op.
//!
//! [`BackendCtx`]: crate::backend_ctx::BackendCtx
//! [`BackendCtx::emit`]: crate::backend_ctx::BackendCtx::emit
//! [`BackendCtx::answered`]: crate::backend_ctx::BackendCtx::answered
//! [`LockMetrics`]: crate::LockMetrics

#[cfg(feature = "metrics")]
pub(crate) use on::*;

#[cfg(not(feature = "metrics"))]
pub(crate) use off::*;

/// The lock kinds, by the `primitive` label of the lifecycle series: what a lease was taken
/// as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) enum Primitive {
    Mutex,
    Semaphore,
    Election,
    RwLock,
}

impl Primitive {
    /// Each kind's label, indexed as the enum.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    const LABELS: [&'static str; 4] = ["mutex", "semaphore", "election", "rwlock"];

    /// The kind of a request: a semaphore's permits, a read-write lock's share or hold (whose
    /// waiting writer also has a stable token), an election's campaign, or a lock.
    pub(crate) fn of(permits: bool, rw: bool, campaign: bool) -> Self {
        match (permits, rw, campaign) {
            (true, _, _) => Primitive::Semaphore,
            (false, true, _) => Primitive::RwLock,
            (false, false, true) => Primitive::Election,
            (false, false, false) => Primitive::Mutex,
        }
    }
}

/// The store calls, by the `operation` label of `leasehold_store_call_seconds`.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) enum StoreOp {
    Acquire,
    Renew,
    Release,
    Inspect,
    Subscribe,
    Ping,
    WatchPrefix,
    Campaign,
    Withdraw,
    Proclaim,
    Observe,
    AcquirePermits,
    PermitHolders,
    AcquireRw,
    WithdrawWriter,
    AcquireFair,
}

impl StoreOp {
    /// Each operation's label, indexed as the enum.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    const LABELS: [&'static str; 16] = [
        "acquire",
        "renew",
        "release",
        "inspect",
        "subscribe",
        "ping",
        "watch_prefix",
        "campaign",
        "withdraw",
        "proclaim",
        "observe",
        "acquire_permits",
        "permit_holders",
        "acquire_rw",
        "withdraw_writer",
        "acquire_fair",
    ];
}

#[cfg(feature = "metrics")]
mod on {
    use std::future::Future;
    use std::time::Duration;

    use ::metrics::{
        counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
        Gauge, Histogram, Label, Unit,
    };
    use tokio::time::Instant;

    use super::{Primitive, StoreOp};
    use crate::error::StoreError;
    use crate::event::{LockEventKind, LostReason, ReleaseReason};

    const RELEASE_REASONS: [(ReleaseReason, &str); 6] = [
        (ReleaseReason::Requested, "requested"),
        (ReleaseReason::Dropped, "dropped"),
        (ReleaseReason::HolderStopped, "holder_stopped"),
        (ReleaseReason::Shutdown, "shutdown"),
        (ReleaseReason::Abandoned, "abandoned"),
        (ReleaseReason::HolderSilent, "holder_silent"),
    ];

    const LOST_REASONS: [(LostReason, &str); 4] = [
        (LostReason::NotOwner, "not_owner"),
        (LostReason::Expired, "expired"),
        (LostReason::Shutdown, "shutdown"),
        (LostReason::HolderStopped, "holder_stopped"),
    ];

    /// One backend's series: registered once, recorded through handles.
    pub(crate) struct BackendMetrics {
        /// The lifecycle series, indexed as [`Primitive`].
        kinds: [Series; 4],
        /// `None` for the in-process memory store: its calls are function calls on a map,
        /// with no latency worth a series, and four histogram samples per lock cycle would be
        /// most of what recording costs there.
        calls: Option<StoreCalls>,
    }

    /// The lifecycle series of one primitive on one backend.
    struct Series {
        acquired: Counter,
        contended: Counter,
        renewals: Counter,
        renewal_failures: Counter,
        /// Indexed as `RELEASE_REASONS`.
        released: [Counter; RELEASE_REASONS.len()],
        /// Indexed as `LOST_REASONS`.
        lost: [Counter; 4],
        wait: Histogram,
        hold: Histogram,
        renewal: Histogram,
        held: Gauge,
        waiters: Gauge,
    }

    struct StoreCalls {
        /// Indexed as [`StoreOp`].
        latency: [Histogram; 16],
        errors: [Counter; 16],
    }

    impl BackendMetrics {
        /// Registers every series of the backend named `backend`, whose store is of kind
        /// `store`, with the recorder installed now.
        pub(crate) fn new(backend: &str, store: &'static str) -> Self {
            describe();
            let labels = vec![
                Label::new("backend", backend.to_owned()),
                Label::new("store", store),
            ];
            let with = |more: &[(&'static str, &'static str)]| {
                let mut labels = labels.clone();
                labels.extend(more.iter().map(|&(name, value)| Label::new(name, value)));
                labels
            };
            let series = |primitive: &'static str| {
                let labels = with(&[("primitive", primitive)]);
                let with = |name, value| with(&[("primitive", primitive), (name, value)]);
                Series {
                    acquired: counter!("leasehold_acquired_total", labels.clone()),
                    contended: counter!("leasehold_contended_total", labels.clone()),
                    renewals: counter!("leasehold_renewals_total", labels.clone()),
                    renewal_failures: counter!("leasehold_renewal_failures_total", labels.clone()),
                    released: RELEASE_REASONS.map(|(_, reason)| {
                        counter!("leasehold_released_total", with("reason", reason))
                    }),
                    lost: LOST_REASONS.map(|(_, reason)| {
                        counter!("leasehold_lost_total", with("reason", reason))
                    }),
                    wait: histogram!("leasehold_wait_seconds", labels.clone()),
                    hold: histogram!("leasehold_hold_seconds", labels.clone()),
                    renewal: histogram!("leasehold_renewal_seconds", labels.clone()),
                    held: gauge!("leasehold_held", labels.clone()),
                    waiters: gauge!("leasehold_waiters", labels),
                }
            };
            BackendMetrics {
                kinds: Primitive::LABELS.map(series),
                // By operation, which says the primitive where it matters.
                calls: (store != "memory").then(|| StoreCalls {
                    latency: StoreOp::LABELS.map(|op| {
                        histogram!("leasehold_store_call_seconds", with(&[("operation", op)]))
                    }),
                    errors: StoreOp::LABELS.map(|op| {
                        counter!("leasehold_store_errors_total", with(&[("operation", op)]))
                    }),
                }),
            }
        }

        /// Counts a lifecycle event (where [`LockMetrics`](crate::LockMetrics) counts it).
        #[inline]
        pub(crate) fn event(&self, primitive: Primitive, kind: &LockEventKind) {
            let series = &self.kinds[primitive as usize];
            match kind {
                LockEventKind::Acquired { waited } => {
                    series.acquired.increment(1);
                    series.held.increment(1.0);
                    series.wait.record(*waited);
                }
                LockEventKind::Contended => series.contended.increment(1),
                LockEventKind::Renewed { .. } => series.renewals.increment(1),
                LockEventKind::RenewFailed { .. } => series.renewal_failures.increment(1),
                LockEventKind::Lost { reason } => {
                    series.held.decrement(1.0);
                    if let Some(at) = LOST_REASONS.iter().position(|(r, _)| r == reason) {
                        series.lost[at].increment(1);
                    }
                }
                LockEventKind::Released { held_for, reason } => {
                    series.held.decrement(1.0);
                    if let Some(at) = RELEASE_REASONS.iter().position(|(r, _)| r == reason) {
                        series.released[at].increment(1);
                    }
                    series.hold.record(*held_for);
                }
                LockEventKind::Requested
                | LockEventKind::HandedOver
                | LockEventKind::BackendDown
                | LockEventKind::BackendRestored => {}
            }
        }

        /// A renewal that took `took` just ended (renewed, refused, failed or timed out).
        #[inline]
        pub(crate) fn renewal(&self, primitive: Primitive, took: Duration) {
            self.kinds[primitive as usize].renewal.record(took);
        }

        /// A store call answered after `took`; `failed` if with an error (a call its caller
        /// stopped waiting for counts as one, taking as long as the caller waited).
        #[inline]
        pub(crate) fn store_call(&self, op: StoreOp, took: Duration, failed: bool) {
            let Some(calls) = &self.calls else {
                return;
            };
            let op = op as usize;
            calls.latency[op].record(took);
            if failed {
                calls.errors[op].increment(1);
            }
        }

        /// Makes the store call `call`, timed as `op`.
        pub(crate) async fn timed<T>(
            &self,
            op: StoreOp,
            call: impl Future<Output = Result<T, StoreError>>,
        ) -> Result<T, StoreError> {
            if self.calls.is_none() {
                return call.await;
            }
            let started = Instant::now();
            let outcome = call.await;
            self.store_call(op, started.elapsed(), outcome.is_err());
            outcome
        }

        /// A lease ended without an event (its key actor was stopped from outside while
        /// holding it): it is no longer held.
        pub(crate) fn held_silently_ended(&self, primitive: Primitive) {
            self.kinds[primitive as usize].held.decrement(1.0);
        }

        /// One more request queued for a key, until the returned value is dropped.
        #[inline]
        pub(crate) fn waiting(&self, primitive: Primitive) -> Counted {
            Counted::new(&self.kinds[primitive as usize].waiters)
        }
    }

    /// A gauge's share of one thing that exists: up when made, down when dropped.
    pub(crate) struct Counted(Gauge);

    impl Counted {
        fn new(gauge: &Gauge) -> Self {
            gauge.increment(1.0);
            Counted(gauge.clone())
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.decrement(1.0);
        }
    }

    /// Names each series' unit and meaning for the recorder (exporters print them as help
    /// text). Per name, not per backend: each backend says it again, harmlessly, so that the
    /// recorder current when any manager starts has them.
    fn describe() {
        describe_counter!(
            "leasehold_acquired_total",
            Unit::Count,
            "Acquisitions that succeeded."
        );
        describe_counter!(
            "leasehold_contended_total",
            Unit::Count,
            "Times an acquisition attempt found its key held (here or at the store)."
        );
        describe_counter!(
            "leasehold_released_total",
            Unit::Count,
            "Locks given back, by reason."
        );
        describe_counter!(
            "leasehold_lost_total",
            Unit::Count,
            "Leases lost, by reason."
        );
        describe_counter!(
            "leasehold_renewals_total",
            Unit::Count,
            "Successful lease renewals."
        );
        describe_counter!(
            "leasehold_renewal_failures_total",
            Unit::Count,
            "Lease renewals that failed and will be retried until the deadline."
        );
        describe_counter!(
            "leasehold_store_errors_total",
            Unit::Count,
            "Store calls that failed, by operation."
        );
        describe_histogram!(
            "leasehold_wait_seconds",
            Unit::Seconds,
            "Time from asking for a lock to acquiring it."
        );
        describe_histogram!(
            "leasehold_hold_seconds",
            Unit::Seconds,
            "Time a lock was held, from acquisition to release."
        );
        describe_histogram!(
            "leasehold_renewal_seconds",
            Unit::Seconds,
            "Time a renewal took, as the key actor saw it (timeouts included)."
        );
        describe_histogram!(
            "leasehold_store_call_seconds",
            Unit::Seconds,
            "Latency of store calls, by operation."
        );
        describe_gauge!("leasehold_held", Unit::Count, "Leases held now.");
        describe_gauge!(
            "leasehold_waiters",
            Unit::Count,
            "Requests queued for a key held or being attempted on this node."
        );
    }
}

#[cfg(not(feature = "metrics"))]
mod off {
    use std::future::Future;
    use std::time::Duration;

    use super::{Primitive, StoreOp};
    use crate::error::StoreError;
    use crate::event::LockEventKind;

    /// Built without the `metrics` feature: nothing to record into.
    pub(crate) struct BackendMetrics;

    impl BackendMetrics {
        #[inline(always)]
        pub(crate) fn new(_backend: &str, _store: &'static str) -> Self {
            BackendMetrics
        }

        #[inline(always)]
        pub(crate) fn event(&self, _primitive: Primitive, _kind: &LockEventKind) {}

        #[inline(always)]
        pub(crate) fn renewal(&self, _primitive: Primitive, _took: Duration) {}

        #[inline(always)]
        pub(crate) fn store_call(&self, _op: StoreOp, _took: Duration, _failed: bool) {}

        /// Makes the store call `call`, untimed.
        #[inline(always)]
        pub(crate) async fn timed<T>(
            &self,
            _op: StoreOp,
            call: impl Future<Output = Result<T, StoreError>>,
        ) -> Result<T, StoreError> {
            call.await
        }

        #[inline(always)]
        pub(crate) fn held_silently_ended(&self, _primitive: Primitive) {}

        #[inline(always)]
        pub(crate) fn waiting(&self, _primitive: Primitive) -> Counted {
            Counted
        }
    }

    /// Nothing, without the `metrics` feature.
    pub(crate) struct Counted;
}
