//! The `metrics` feature: a scripted sequence of acquisitions, contention, renewals, releases
//! and losses, on the memory backend and on a real Redis, recorded into metrics-util's
//! `DebuggingRecorder`, and every counter checked for its exact value.
//!
//! Each test has a recorder of its own, made the thread's default only while its manager
//! starts: leasehold registers its series then, and records through those handles from the
//! actors' tasks on any thread. So the tests run in parallel without sharing counts.

use std::collections::HashMap;
use std::time::Duration;

use leasehold::testing::{eventually, unique_key};
use leasehold::{LockClient, LockManager, LockOptions, LostReason, MemoryBackend, Wait};
use leasehold_test_support::redis_server::RedisServer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

const LIMIT: Duration = Duration::from_secs(10);

/// What a backend recorded so far. A `DebuggingRecorder` snapshot hands over what was
/// recorded since the last one (counters and gauges go back to zero, histograms are drained),
/// so the snapshots are summed here.
struct Recorded {
    snapshotter: Snapshotter,
    backend: &'static str,
    store: &'static str,
    counters: HashMap<String, u64>,
    gauges: HashMap<String, f64>,
    /// How many samples each histogram got.
    samples: HashMap<String, usize>,
}

impl Recorded {
    fn new(recorder: &DebuggingRecorder, backend: &'static str, store: &'static str) -> Self {
        Recorded {
            snapshotter: recorder.snapshotter(),
            backend,
            store,
            counters: HashMap::new(),
            gauges: HashMap::new(),
            samples: HashMap::new(),
        }
    }

    /// Takes in what was recorded since the last look. Every series must carry the backend's
    /// name, its store kind and the primitive; it is filed under its name and other labels,
    /// as `name{label=value}`.
    fn update(&mut self) -> &mut Self {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let (kind, key) = key.into_parts();
            let mut rest = Vec::new();
            let (mut backend, mut store, mut primitive) = (None, None, None);
            for label in key.labels() {
                match label.key() {
                    "backend" => backend = Some(label.value().to_owned()),
                    "store" => store = Some(label.value().to_owned()),
                    "primitive" => primitive = Some(label.value().to_owned()),
                    other => rest.push(format!("{other}={}", label.value())),
                }
            }
            let name = key.name();
            assert!(name.starts_with("leasehold_"), "{name}: not prefixed");
            assert_eq!(
                backend.as_deref(),
                Some(self.backend),
                "{name}: backend label"
            );
            assert_eq!(store.as_deref(), Some(self.store), "{name}: store label");
            // Lifecycle series say what the lease was taken as; a lock's are filed under the
            // bare name, the others' with their primitive. Store calls say their operation.
            match primitive.as_deref() {
                None => assert!(
                    name.starts_with("leasehold_store_"),
                    "{name}: no primitive label"
                ),
                Some("mutex") => {}
                Some(other @ ("semaphore" | "election" | "rwlock")) => {
                    rest.push(format!("primitive={other}"))
                }
                Some(other) => panic!("{name}: primitive label {other:?}"),
            }
            let series = if rest.is_empty() {
                name.to_owned()
            } else {
                format!("{name}{{{}}}", rest.join(","))
            };
            match (kind, value) {
                (MetricKind::Counter, DebugValue::Counter(n)) => {
                    *self.counters.entry(series).or_default() += n
                }
                (MetricKind::Gauge, DebugValue::Gauge(v)) => {
                    *self.gauges.entry(series).or_default() += v.into_inner()
                }
                (MetricKind::Histogram, DebugValue::Histogram(values)) => {
                    assert!(
                        values.iter().all(|v| v.into_inner() >= 0.0),
                        "{series}: a negative duration in {values:?}"
                    );
                    *self.samples.entry(series).or_default() += values.len()
                }
                (kind, value) => panic!("{series}: a {kind:?} with a value {value:?}"),
            }
        }
        self
    }

    fn counter(&self, series: &str) -> u64 {
        *self
            .counters
            .get(series)
            .unwrap_or_else(|| panic!("{series} was never registered"))
    }

    fn gauge(&self, series: &str) -> f64 {
        *self
            .gauges
            .get(series)
            .unwrap_or_else(|| panic!("{series} was never registered"))
    }

    fn samples(&self, series: &str) -> usize {
        self.samples.get(series).copied().unwrap_or(0)
    }

    /// Checks every counter: `expected` lists those that are not zero.
    fn assert_counters(&self, expected: &[(&str, u64)]) {
        for (series, value) in expected {
            assert!(
                self.counters.contains_key(*series),
                "{series} was never registered; registered: {:?}",
                self.counters.keys()
            );
            assert_eq!(self.counter(series), *value, "{series}");
        }
        for (series, value) in &self.counters {
            if !expected.iter().any(|(s, _)| s == series) {
                assert_eq!(*value, 0, "{series}");
            }
        }
    }

    /// Polls until `condition` holds on what was recorded.
    async fn until(&mut self, what: &str, condition: impl Fn(&Recorded) -> bool) {
        eventually(what, LIMIT, || std::future::ready(condition(self.update()))).await;
    }
}

/// Starts a manager named `name` with one backend, its series registered with `recorder`.
async fn start(
    recorder: &DebuggingRecorder,
    name: &str,
    backend: &str,
    store: impl leasehold::LockBackend,
) -> LockClient {
    let _during_start = metrics::set_default_local_recorder(recorder);
    LockManager::builder()
        .with_name(name)
        .with_backend(backend, store)
        .start()
        .await
        .expect("lock manager starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_records_a_scripted_sequence() {
    let recorder = DebuggingRecorder::new();
    let mut seen = Recorded::new(&recorder, "mem", "memory");
    let client = start(&recorder, "metrics-memory", "mem", MemoryBackend::new()).await;
    let (a, b) = (unique_key("metrics/a"), unique_key("metrics/b"));

    // Acquired; then found held by a try and by a waiter, who queues.
    let first = client.lock(&a, LockOptions::new()).await.unwrap();
    assert!(client
        .try_lock(&a, LockOptions::new())
        .await
        .unwrap()
        .is_none());
    first.renew(Duration::from_secs(30)).await.unwrap();
    let waiter = {
        let (client, a) = (client.clone(), a.clone());
        let wait = LockOptions::new().with_wait(Wait::UpTo(LIMIT));
        tokio::spawn(async move { client.lock(&a, wait).await })
    };
    seen.until("the waiter queued", |r| r.gauge("leasehold_waiters") == 1.0)
        .await;
    assert_eq!(seen.gauge("leasehold_held"), 1.0);

    // Released: the waiter gets it.
    first.release().await.unwrap();
    let second = waiter.await.unwrap().unwrap();
    seen.until("the waiter left the queue", |r| {
        r.gauge("leasehold_waiters") == 0.0
    })
    .await;
    assert_eq!(seen.gauge("leasehold_held"), 1.0);

    // Lost: a lease nobody renews expires.
    let short = LockOptions::new()
        .with_ttl(Duration::from_millis(100))
        .with_auto_renew(false);
    let third = client.lock(&b, short).await.unwrap();
    let reason = tokio::time::timeout(LIMIT, third.lost()).await.unwrap();
    assert_eq!(reason, LostReason::Expired);

    // Dropped: released in the background.
    drop(second);
    seen.until("nothing held", |r| r.gauge("leasehold_held") == 0.0)
        .await;

    // A semaphore's permit counts under its own primitive, not as a lock.
    let permit = client
        .semaphore(&unique_key("metrics/s"), 2)
        .unwrap()
        .acquire(LockOptions::new())
        .await
        .unwrap();
    seen.until("the permit is held", |r| {
        r.gauge("leasehold_held{primitive=semaphore}") == 1.0
    })
    .await;
    permit.release().await.unwrap();

    seen.update().assert_counters(&[
        ("leasehold_acquired_total", 3),
        ("leasehold_contended_total", 2),
        ("leasehold_renewals_total", 1),
        ("leasehold_released_total{reason=requested}", 1),
        ("leasehold_released_total{reason=dropped}", 1),
        ("leasehold_lost_total{reason=expired}", 1),
        ("leasehold_acquired_total{primitive=semaphore}", 1),
        (
            "leasehold_released_total{reason=requested,primitive=semaphore}",
            1,
        ),
    ]);
    assert_eq!(seen.gauge("leasehold_held{primitive=semaphore}"), 0.0);
    assert_eq!(
        seen.samples("leasehold_wait_seconds{primitive=semaphore}"),
        1
    );
    assert_eq!(seen.gauge("leasehold_waiters"), 0.0);
    assert_eq!(seen.samples("leasehold_wait_seconds"), 3);
    assert_eq!(seen.samples("leasehold_hold_seconds"), 2);
    assert_eq!(seen.samples("leasehold_renewal_seconds"), 1);
    // The memory store's calls are in-process: no store-call series is kept for them.
    let store_series: Vec<_> = seen
        .samples
        .keys()
        .chain(seen.counters.keys())
        .filter(|series| series.starts_with("leasehold_store_"))
        .collect();
    assert!(store_series.is_empty(), "{store_series:?}");
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_records_renewal_failures_and_losses() {
    let server = RedisServer::start();
    let recorder = DebuggingRecorder::new();
    let mut seen = Recorded::new(&recorder, "main-redis", "redis");
    let backend = server.backend().await;
    let client = start(&recorder, "metrics-redis", "main-redis", backend.clone()).await;
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = unique_key("metrics/redis");
    // Renewed only by hand, so that the counts are the script's.
    let manual = LockOptions::new().with_auto_renew(false);

    let guard = client.lock(&key, manual.clone()).await.unwrap();
    assert!(client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .is_none());
    guard.renew(Duration::from_secs(30)).await.unwrap();

    // The server refuses scripts for a moment: one renewal fails (the lease is still held).
    let acl = |rule: &str| {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg(rule)
            .to_owned()
    };
    acl("-evalsha")
        .exec_async(&mut raw)
        .await
        .expect("ACL SETUSER");
    let refused = guard.renew(Duration::from_secs(30)).await;
    acl("+@all")
        .exec_async(&mut raw)
        .await
        .expect("ACL SETUSER");
    assert!(
        refused.is_err(),
        "a renewal the server refused: {refused:?}"
    );
    assert!(guard.is_held());

    // Another client deletes the key: the next renewal finds the lease gone.
    redis::cmd("DEL")
        .arg(backend.lock_key(&key))
        .exec_async(&mut raw)
        .await
        .unwrap();
    assert!(guard.renew(Duration::from_secs(30)).await.is_err());
    assert_eq!(guard.lost().await, LostReason::NotOwner);

    // A plain acquisition and release.
    let again = client.lock(&key, manual).await.unwrap();
    again.release().await.unwrap();

    seen.until("nothing held", |r| r.gauge("leasehold_held") == 0.0)
        .await;
    seen.assert_counters(&[
        ("leasehold_acquired_total", 2),
        ("leasehold_contended_total", 1),
        ("leasehold_renewals_total", 1),
        ("leasehold_renewal_failures_total", 1),
        ("leasehold_store_errors_total{operation=renew}", 1),
        ("leasehold_lost_total{reason=not_owner}", 1),
        ("leasehold_released_total{reason=requested}", 1),
    ]);
    assert_eq!(seen.samples("leasehold_wait_seconds"), 2);
    assert_eq!(seen.samples("leasehold_hold_seconds"), 1);
    assert_eq!(seen.samples("leasehold_renewal_seconds"), 3);
    let calls = |op: &str| seen.samples(&format!("leasehold_store_call_seconds{{operation={op}}}"));
    assert_eq!(calls("acquire"), 2);
    assert_eq!(calls("renew"), 3);
    assert_eq!(calls("release"), 1);
    client.shutdown().await;
}
