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
//! so that no way out of the queue can miss it); and the store is wrapped by [`timed`], which
//! times every call at the backend seam.
//!
//! On the hot path (an uncontended lock and release) that is two counter adds, two gauge
//! moves and four histogram samples (wait, hold, the acquire and release calls), and four
//! clock reads to time those two calls.
//!
//! Without the feature every type here is empty and every call an inlined no-op.
//!
//! [`BackendCtx`]: crate::backend_ctx::BackendCtx
//! [`BackendCtx::emit`]: crate::backend_ctx::BackendCtx::emit
//! [`LockMetrics`]: crate::LockMetrics

#[cfg(feature = "metrics")]
pub(crate) use on::*;

#[cfg(not(feature = "metrics"))]
pub(crate) use off::*;

/// The `primitive` label of every series: the lock kind whose leases are counted. Only the
/// mutex exists so far; the label is there so that dashboards need no change when others come.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
const PRIMITIVE: &str = "mutex";

#[cfg(feature = "metrics")]
mod on {
    use std::sync::Arc;
    use std::time::Duration;

    use ::metrics::{
        counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
        Gauge, Histogram, Label, Unit,
    };
    use async_trait::async_trait;
    use tokio::time::Instant;

    use crate::backend::{
        Acquisition, Contention, LeaderChanges, Lease, LockBackend, LockInfo, OwnerToken,
        ReleaseNotices, StoreEvents,
    };
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

    /// The store calls, by the `operation` label of `leasehold_store_call_seconds`.
    #[derive(Clone, Copy)]
    enum Op {
        Acquire,
        Renew,
        Release,
        Inspect,
        Subscribe,
        Ping,
        List,
        WatchPrefix,
        Campaign,
        Withdraw,
        Proclaim,
        Observe,
    }

    const OPS: [&str; 12] = [
        "acquire",
        "renew",
        "release",
        "inspect",
        "subscribe",
        "ping",
        "list",
        "watch_prefix",
        "campaign",
        "withdraw",
        "proclaim",
        "observe",
    ];

    /// One backend's series: registered once, recorded through handles.
    pub(crate) struct BackendMetrics {
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
        /// Shared with the [`Timed`] store.
        calls: Arc<StoreCalls>,
        held: Gauge,
        waiters: Gauge,
    }

    struct StoreCalls {
        /// Indexed as `OPS`.
        latency: [Histogram; 12],
        errors: [Counter; 12],
    }

    impl BackendMetrics {
        /// Registers every series of the backend named `backend`, whose store is of kind
        /// `store`, with the recorder installed now.
        pub(crate) fn new(backend: &str, store: &'static str) -> Self {
            describe();
            let labels = vec![
                Label::new("backend", backend.to_owned()),
                Label::new("store", store),
                Label::new("primitive", super::PRIMITIVE),
            ];
            let with = |name: &'static str, value: &'static str| {
                let mut labels = labels.clone();
                labels.push(Label::new(name, value));
                labels
            };
            BackendMetrics {
                acquired: counter!("leasehold_acquired_total", labels.clone()),
                contended: counter!("leasehold_contended_total", labels.clone()),
                renewals: counter!("leasehold_renewals_total", labels.clone()),
                renewal_failures: counter!("leasehold_renewal_failures_total", labels.clone()),
                released: RELEASE_REASONS.map(|(_, reason)| {
                    counter!("leasehold_released_total", with("reason", reason))
                }),
                lost: LOST_REASONS
                    .map(|(_, reason)| counter!("leasehold_lost_total", with("reason", reason))),
                wait: histogram!("leasehold_wait_seconds", labels.clone()),
                hold: histogram!("leasehold_hold_seconds", labels.clone()),
                renewal: histogram!("leasehold_renewal_seconds", labels.clone()),
                calls: Arc::new(StoreCalls {
                    latency: OPS.map(|op| {
                        histogram!("leasehold_store_call_seconds", with("operation", op))
                    }),
                    errors: OPS
                        .map(|op| counter!("leasehold_store_errors_total", with("operation", op))),
                }),
                held: gauge!("leasehold_held", labels.clone()),
                waiters: gauge!("leasehold_waiters", labels.clone()),
            }
        }

        /// Counts a lifecycle event (where [`LockMetrics`](crate::LockMetrics) counts it).
        #[inline]
        pub(crate) fn event(&self, kind: &LockEventKind) {
            match kind {
                LockEventKind::Acquired { waited } => {
                    self.acquired.increment(1);
                    self.held.increment(1.0);
                    self.wait.record(*waited);
                }
                LockEventKind::Contended => self.contended.increment(1),
                LockEventKind::Renewed { .. } => self.renewals.increment(1),
                LockEventKind::RenewFailed { .. } => self.renewal_failures.increment(1),
                LockEventKind::Lost { reason } => {
                    self.held.decrement(1.0);
                    if let Some(at) = LOST_REASONS.iter().position(|(r, _)| r == reason) {
                        self.lost[at].increment(1);
                    }
                }
                LockEventKind::Released { held_for, reason } => {
                    self.held.decrement(1.0);
                    if let Some(at) = RELEASE_REASONS.iter().position(|(r, _)| r == reason) {
                        self.released[at].increment(1);
                    }
                    self.hold.record(*held_for);
                }
                LockEventKind::Requested
                | LockEventKind::HandedOver
                | LockEventKind::BackendDown
                | LockEventKind::BackendRestored => {}
            }
        }

        /// A renewal sent at `sent_at` just ended (renewed, refused, failed or timed out).
        #[inline]
        pub(crate) fn renewal(&self, sent_at: Instant) {
            self.renewal.record(sent_at.elapsed());
        }

        /// A lease ended without an event (its key actor was stopped from outside while
        /// holding it): it is no longer held.
        pub(crate) fn held_silently_ended(&self) {
            self.held.decrement(1.0);
        }

        /// One more request queued for a key, until the returned value is dropped.
        #[inline]
        pub(crate) fn waiting(&self) -> Counted {
            Counted::new(&self.waiters)
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

    /// `store`, with every call timed into `metrics`' store-call series.
    pub(crate) fn timed(
        store: Arc<dyn LockBackend>,
        metrics: &BackendMetrics,
    ) -> Arc<dyn LockBackend> {
        Arc::new(Timed {
            store,
            calls: metrics.calls.clone(),
        })
    }

    /// The backend seam, timed: each call's latency by operation, and its errors. A call
    /// abandoned by its caller's timeout records nothing here (the renewal histogram and the
    /// events count those).
    struct Timed {
        store: Arc<dyn LockBackend>,
        calls: Arc<StoreCalls>,
    }

    impl Timed {
        #[inline]
        fn record<T>(&self, op: Op, started: std::time::Instant, outcome: &Result<T, StoreError>) {
            let op = op as usize;
            self.calls.latency[op].record(started.elapsed());
            if outcome.is_err() {
                self.calls.errors[op].increment(1);
            }
        }
    }

    #[async_trait]
    impl LockBackend for Timed {
        fn kind(&self) -> &'static str {
            self.store.kind()
        }

        async fn acquire(
            &self,
            key: &str,
            owner: OwnerToken,
            ttl: Duration,
            metadata: Option<&str>,
        ) -> Result<Acquisition, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.acquire(key, owner, ttl, metadata).await;
            self.record(Op::Acquire, started, &outcome);
            outcome
        }

        async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.renew(lease, ttl).await;
            self.record(Op::Renew, started, &outcome);
            outcome
        }

        // Every method of the trait is passed on, those with a default too: the default here
        // would be the trait's, not the wrapped store's.
        async fn renew_from(
            &self,
            lease: &Lease,
            ttl: Duration,
            asked_at: Instant,
        ) -> Result<Option<Instant>, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.renew_from(lease, ttl, asked_at).await;
            self.record(Op::Renew, started, &outcome);
            outcome
        }

        fn max_ttl(&self) -> Option<Duration> {
            self.store.max_ttl()
        }

        async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.release(lease).await;
            self.record(Op::Release, started, &outcome);
            outcome
        }

        async fn inspect(&self, key: &str) -> Result<Option<LockInfo>, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.inspect(key).await;
            self.record(Op::Inspect, started, &outcome);
            outcome
        }

        async fn subscribe(
            &self,
            key: &str,
            seen: &Contention,
        ) -> Result<ReleaseNotices, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.subscribe(key, seen).await;
            self.record(Op::Subscribe, started, &outcome);
            outcome
        }

        async fn ping(&self) -> Result<(), StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.ping().await;
            self.record(Op::Ping, started, &outcome);
            outcome
        }

        async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.list(prefix).await;
            self.record(Op::List, started, &outcome);
            outcome
        }

        async fn watch_prefix(&self, prefix: &str) -> Result<StoreEvents, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.watch_prefix(prefix).await;
            self.record(Op::WatchPrefix, started, &outcome);
            outcome
        }

        async fn campaign(
            &self,
            name: &str,
            candidate: OwnerToken,
            ttl: Duration,
            value: &str,
        ) -> Result<Acquisition, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.campaign(name, candidate, ttl, value).await;
            self.record(Op::Campaign, started, &outcome);
            outcome
        }

        async fn withdraw(&self, name: &str, candidate: OwnerToken) -> Result<(), StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.withdraw(name, candidate).await;
            self.record(Op::Withdraw, started, &outcome);
            outcome
        }

        async fn proclaim(&self, lease: &Lease, value: &str) -> Result<bool, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.proclaim(lease, value).await;
            self.record(Op::Proclaim, started, &outcome);
            outcome
        }

        async fn observe(&self, name: &str) -> Result<LeaderChanges, StoreError> {
            let started = std::time::Instant::now();
            let outcome = self.store.observe(name).await;
            self.record(Op::Observe, started, &outcome);
            outcome
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
    use std::sync::Arc;

    use tokio::time::Instant;

    use crate::backend::LockBackend;
    use crate::event::LockEventKind;

    /// Built without the `metrics` feature: nothing to record into.
    pub(crate) struct BackendMetrics;

    impl BackendMetrics {
        #[inline(always)]
        pub(crate) fn new(_backend: &str, _store: &'static str) -> Self {
            BackendMetrics
        }

        #[inline(always)]
        pub(crate) fn event(&self, _kind: &LockEventKind) {}

        #[inline(always)]
        pub(crate) fn renewal(&self, _sent_at: Instant) {}

        #[inline(always)]
        pub(crate) fn held_silently_ended(&self) {}

        #[inline(always)]
        pub(crate) fn waiting(&self) -> Counted {
            Counted
        }
    }

    /// Nothing, without the `metrics` feature.
    pub(crate) struct Counted;

    #[inline(always)]
    pub(crate) fn timed(
        store: Arc<dyn LockBackend>,
        _metrics: &BackendMetrics,
    ) -> Arc<dyn LockBackend> {
        store
    }
}
