//! Many locks held at once, with auto-renew: the resident memory each costs, the CPU renewing
//! them takes, and whether every renewal came on time — "on time" meaning that no key ever went
//! longer than ttl/2 without a renewal, from its acquisition to the end of the window (renewal
//! runs every ttl/3, so ttl/2 leaves room for the store's answer but not for a skipped turn).
//!
//! A lock that follows a shared lease (etcd's session, see the README) is not renewed on its
//! own: it has no `Renewed` events, and "on time" means instead that its deadline, which the
//! shared lease's keep-alives move, never came within ttl/2 of the clock. That is read from the
//! guards while they are held: every key's deadline every [`SWEEP_EVERY`], and one key's every
//! [`PROBE_EVERY`] (they share one clock); the time the readings took is left out of the CPU.
//!
//! The memory figures follow `benches/held_locks.rs`: the growth of the resident set from just
//! before the first acquisition, divided by the number of locks.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::Duration;

use futures::StreamExt;
use leasehold::{LockClient, LockEvent, LockEventKind, LockGuard, LockOptions};
use leasehold_bench_support::cpu;
use leasehold_bench_support::raw_etcd::RawEtcd;
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

use crate::heap;
use crate::progress::Progress;
use crate::report::{Following, Held, Renewals, RssSample, Store};

/// One held-locks scenario.
pub struct HeldPlan {
    pub store: Store,
    pub locks: usize,
    pub ttl: Duration,
    /// How long to keep them all after the last is taken; zero measures memory only.
    pub hold: Duration,
    /// Acquisitions in flight at once.
    pub parallel: usize,
    /// A guess at how long taking them all takes, and again releasing them (for the bar).
    pub estimate: Duration,
}

impl HeldPlan {
    pub fn planned(&self) -> Duration {
        self.estimate * 2 + self.hold.max(SETTLE)
    }
}

/// Time for the key actors to finish starting (timers armed) before the resident set is read.
const SETTLE: Duration = Duration::from_millis(500);
/// Resident-set readings through the hold window, after the first one.
const RSS_SAMPLES: u32 = 6;
/// How often one guard's deadline is read, and every guard's.
const PROBE_EVERY: Duration = Duration::from_millis(50);
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Takes `plan.locks` locks through `client` (a manager of their own), holds them, reads the
/// figures, and releases them all, shutting the manager down.
pub async fn measure(client: LockClient, plan: &HeldPlan, progress: &Progress) -> Held {
    let what = format!("{} locks on {}", plan.locks, plan.store);
    let slug = plan.store.to_string().replace(' ', "-");
    let keys: Vec<String> = (0..plan.locks)
        .map(|i| format!("loadtest/held/{slug}/{i:06}"))
        .collect();
    // The bookkeeping is allocated before the baseline, so it does not count as the locks'.
    let mut sent_at = vec![Instant::now(); plan.locks];
    let mut headroom = vec![Duration::MAX; plan.locks];
    let watcher = (!plan.hold.is_zero()).then(|| Watcher::start(client.events(), &keys));
    let opts = LockOptions::new().with_ttl(plan.ttl);
    // Warm up the allocator and the runtime so the baseline is not the cost of the first lock.
    drop(
        client
            .try_lock("loadtest/held/warm-up", opts.clone())
            .await
            .expect("warm-up lock"),
    );
    trim_heap();
    let baseline = cpu::resident_bytes();
    let heap_baseline = heap::live_bytes();

    let metrics_before = client.metrics();
    let started = Instant::now();
    let mut guards: Vec<Option<LockGuard>> = (0..plan.locks).map(|_| None).collect();
    let taking = futures::stream::iter(keys.iter().enumerate())
        .map(|(i, key)| {
            let (client, opts) = (client.clone(), opts.clone());
            async move {
                let sent = Instant::now();
                let guard = client
                    .try_lock(key, opts)
                    .await
                    .unwrap_or_else(|e| panic!("try_lock {key}: {e}"))
                    .unwrap_or_else(|| panic!("{key} is free"));
                (i, sent, guard)
            }
        })
        .buffer_unordered(plan.parallel)
        .for_each(|(i, sent, guard)| {
            sent_at[i] = sent;
            guards[i] = Some(guard);
            futures::future::ready(())
        });
    progress
        .step(format!("taking {what}"), plan.estimate, taking)
        .await;
    let take = started.elapsed();

    let held_from = Instant::now();
    let cpu_before = cpu::process();
    let watcher_before = watcher.as_ref().map_or(Duration::ZERO, Watcher::cpu);
    let per_lock = |at: Instant| RssSample {
        at_s: (at - held_from).as_secs_f64(),
        kib: cpu::resident_bytes().saturating_sub(baseline) as f64 / plan.locks as f64 / 1024.0,
        heap_kib: heap::live_bytes()
            .zip(heap_baseline)
            .map(|(now, before)| (now - before) as f64 / plan.locks as f64 / 1024.0),
    };
    // Samples through the window show whether the resident set settles or keeps growing.
    let holding = async {
        tokio::time::sleep(SETTLE).await;
        let mut samples = vec![per_lock(Instant::now())];
        let readings = if plan.hold > SETTLE { RSS_SAMPLES } else { 0 };
        for i in 1..=readings {
            tokio::time::sleep_until(held_from + plan.hold * i / RSS_SAMPLES).await;
            samples.push(per_lock(Instant::now()));
        }
        samples
    };
    // The deadlines' headroom (see the module documentation), and the time spent reading it.
    let mut probe_headroom = Duration::MAX;
    let mut probe_time = Duration::ZERO;
    let probing = async {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        // The first tick reads every key, so a window shorter than a sweep still reads them.
        let mut last_sweep: Option<Instant> = None;
        loop {
            tick.tick().await;
            let started = thread_cpu();
            let now = Instant::now();
            let left = |guard: &Option<LockGuard>| {
                let deadline = guard.as_ref().and_then(LockGuard::deadline);
                deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(now))
            };
            probe_headroom = probe_headroom.min(left(&guards[0]));
            if last_sweep.is_none_or(|last| now - last >= SWEEP_EVERY) {
                last_sweep = Some(now);
                for (min, guard) in headroom.iter_mut().zip(&guards) {
                    *min = (*min).min(left(guard));
                }
            }
            // CPU time of this thread, not wall time: on a busy machine the readings may be
            // descheduled, and that is not time the process spent.
            probe_time += thread_cpu().saturating_sub(started);
        }
    };
    let holding = async {
        tokio::select! {
            samples = holding => samples,
            _ = probing => unreachable!("the probe runs until the window ends"),
        }
    };
    let rss_per_lock = progress
        .step(format!("holding {what}"), plan.hold.max(SETTLE), holding)
        .await;
    let held_until = Instant::now();
    let watcher_cpu = watcher.as_ref().map_or(Duration::ZERO, |watcher| {
        watcher.cpu().saturating_sub(watcher_before)
    });
    let cpu = (cpu::process() - cpu_before)
        .saturating_sub(watcher_cpu)
        .saturating_sub(probe_time);
    let renewed = client.metrics().renewed - metrics_before.renewed;
    let guards: Vec<LockGuard> = guards.into_iter().flatten().collect();
    let still_held: Vec<bool> = guards.iter().map(LockGuard::is_held).collect();
    let renewals = watcher.map(|watcher| {
        let log = watcher.stop(held_until);
        let mut renewals = log.judge(&keys, &sent_at, &still_held, held_until, plan.ttl, renewed);
        if renewals.events == 0 && renewed == 0 {
            // Following a shared lease: judged by the deadlines instead.
            let on_time = headroom
                .iter()
                .zip(&still_held)
                .filter(|(left, held)| **held && **left >= plan.ttl / 2)
                .count();
            renewals.keys_on_time = on_time;
            renewals.on_time_pct = 100.0 * on_time as f64 / plan.locks.max(1) as f64;
            renewals.following = Some(Following {
                min_headroom_s: headroom.iter().min().map_or(0.0, Duration::as_secs_f64),
                probe_min_headroom_s: probe_headroom.as_secs_f64(),
                probe_cpu_s: probe_time.as_secs_f64(),
            });
        }
        renewals
    });

    let releasing = Instant::now();
    let release = async {
        drop(guards);
        client.shutdown().await;
    };
    progress
        .step(format!("releasing {what}"), plan.estimate, release)
        .await;

    Held {
        store: plan.store,
        locks: plan.locks,
        ttl_s: plan.ttl.as_secs_f64(),
        take_s: take.as_secs_f64(),
        hold_s: (held_until - held_from).as_secs_f64(),
        still_held: still_held.iter().filter(|held| **held).count(),
        rss_per_lock,
        cpu_s: cpu.as_secs_f64(),
        watcher_cpu_s: watcher_cpu.as_secs_f64(),
        release_s: releasing.elapsed().as_secs_f64(),
        raw_take_s: None,
        renewals,
    }
}

/// How long the raw etcd-client takes `plan.locks` keys making the calls leasehold's `txn`
/// mode makes to take one (grant, put-if-absent), `plan.parallel` at once: the floor the
/// store sets on the time to take them. The leases are revoked after.
pub async fn raw_etcd_take(raw: &RawEtcd, plan: &HeldPlan, progress: &Progress) -> f64 {
    let keys: Vec<String> = (0..plan.locks)
        .map(|i| format!("loadtest/held/raw/{i:06}"))
        .collect();
    let started = Instant::now();
    let taking = futures::stream::iter(&keys)
        .map(|key| raw.txn_take(key))
        .buffer_unordered(plan.parallel)
        .collect::<Vec<i64>>();
    let leases = progress
        .step(
            format!("raw etcd-client taking {} keys", plan.locks),
            plan.estimate,
            taking,
        )
        .await;
    let took = started.elapsed().as_secs_f64();
    let revoking = futures::stream::iter(leases)
        .map(|lease| raw.revoke(lease))
        .buffer_unordered(plan.parallel)
        .collect::<Vec<()>>();
    progress
        .step(
            "raw etcd-client revoking them".to_string(),
            plan.estimate,
            revoking,
        )
        .await;
    took
}

/// Receives every event of the manager on a thread of its own, so that the busy runtime
/// cannot starve it into falling behind (the broadcast channel keeps only the newest 1024),
/// and keeps per key only what the on-time check needs.
struct Watcher {
    /// Sends the end of the window.
    stop: oneshot::Sender<Instant>,
    thread: JoinHandle<RenewalLog>,
    /// The thread's id, for its CPU time.
    tid: libc::pid_t,
}

#[derive(Default)]
struct RenewalLog {
    /// Per key: the first and the latest renewal, and the longest gap between two renewals.
    tracks: HashMap<String, Track>,
    events: u64,
    missed: u64,
    failed: u64,
    lost: u64,
}

#[derive(Default)]
struct Track {
    first: Option<Instant>,
    last: Option<Instant>,
    longest: Duration,
}

impl Watcher {
    fn start(mut events: broadcast::Receiver<LockEvent>, keys: &[String]) -> Self {
        let mut log = RenewalLog {
            tracks: keys.iter().map(|k| (k.clone(), Track::default())).collect(),
            ..RenewalLog::default()
        };
        let (stop, mut stopped) = oneshot::channel();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("renewal-watcher".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("watcher runtime");
                runtime.block_on(async move {
                    let until = loop {
                        tokio::select! {
                            // Checked first: once the window has ended, what is left is drained.
                            biased;
                            until = &mut stopped => break until.ok(),
                            received = events.recv() => match received {
                                Ok(event) => log.record(&event),
                                Err(broadcast::error::RecvError::Lagged(n)) => log.missed += n,
                                Err(broadcast::error::RecvError::Closed) => break None,
                            },
                        }
                    };
                    // What was sent before the window ended and not yet received. (Anything
                    // received above is at most a few events past the end, which can only
                    // lengthen the gaps seen, never hide one.)
                    loop {
                        match events.try_recv() {
                            Ok(event) if until.is_some_and(|until| event.instant <= until) => {
                                log.record(&event)
                            }
                            Ok(_) => {}
                            Err(broadcast::error::TryRecvError::Lagged(n)) => log.missed += n,
                            Err(_) => break,
                        }
                    }
                    log
                })
            })
            .expect("spawn the renewal watcher");
        let tid = tid_rx.recv().expect("the renewal watcher's thread id");
        Watcher { stop, thread, tid }
    }

    /// CPU time of the watcher's thread so far (`/proc/self/task/TID/schedstat`, first field,
    /// in nanoseconds).
    fn cpu(&self) -> Duration {
        std::fs::read_to_string(format!("/proc/self/task/{}/schedstat", self.tid))
            .ok()
            .and_then(|stat| stat.split_whitespace().next()?.parse().ok())
            .map_or(Duration::ZERO, Duration::from_nanos)
    }

    /// Stops at `until`, the end of the window, and hands over what was seen.
    fn stop(self, until: Instant) -> RenewalLog {
        let _ = self.stop.send(until);
        self.thread.join().expect("renewal watcher")
    }
}

impl RenewalLog {
    fn record(&mut self, event: &LockEvent) {
        match event.kind {
            LockEventKind::Renewed { .. } => {
                self.events += 1;
                let key = event.key.as_deref().unwrap_or_default();
                if let Some(track) = self.tracks.get_mut(key) {
                    if let Some(last) = track.last {
                        track.longest = track.longest.max(event.instant - last);
                    }
                    track.first.get_or_insert(event.instant);
                    track.last = Some(event.instant);
                }
            }
            LockEventKind::RenewFailed { .. } => self.failed += 1,
            LockEventKind::Lost { .. } => self.lost += 1,
            _ => {}
        }
    }

    /// Judges each key from its acquisition (`sent_at`, when it was asked for) to `until`.
    fn judge(
        &self,
        keys: &[String],
        sent_at: &[Instant],
        still_held: &[bool],
        until: Instant,
        ttl: Duration,
        metrics_renewed: u64,
    ) -> Renewals {
        let mut on_time = 0;
        let mut max_gap = Duration::ZERO;
        for ((key, &taken), &held) in keys.iter().zip(sent_at).zip(still_held) {
            let track = &self.tracks[key];
            let first = track.first.unwrap_or(until) - taken;
            let tail = until.saturating_duration_since(track.last.unwrap_or(taken));
            let gap = first.max(track.longest).max(tail);
            max_gap = max_gap.max(gap);
            if held && gap <= ttl / 2 {
                on_time += 1;
            }
        }
        Renewals {
            events: self.events,
            metrics_renewed,
            events_missed: self.missed,
            renew_failed: self.failed,
            lost: self.lost,
            keys_on_time: on_time,
            on_time_pct: 100.0 * on_time as f64 / keys.len().max(1) as f64,
            max_gap_s: max_gap.as_secs_f64(),
            following: None,
        }
    }
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Gives the memory freed by earlier scenarios back to the system, so the next baseline is
/// what is live: otherwise the next locks would reuse freed pages that are still resident, and
/// look cheaper than they are.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
