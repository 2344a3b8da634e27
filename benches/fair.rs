//! Fair waiting against unfair, side by side: two managers (two nodes), four tasks on each,
//! contending for ONE key, each task taking the lock, holding it 1 ms, releasing it and asking
//! again at once. On memory, Redis and etcd (`lock` mode, then `txn` mode: the line
//! `etcd-txn`), each server started by this bench on free loopback ports.
//!
//! Run: `cargo bench --features redis,etcd --bench fair` (10 s per run, three rounds of
//! unfair and fair on each store: about four minutes), or with `LEASEHOLD_BENCH_QUICK=1`
//! (or `-- --quick`) for 3 s runs.
//!
//! Printed per store and mode, each the median over the rounds:
//! - each node's share of the holds (the target for fair mode: each within 40–60%);
//! - the hand-off: from one holder's release to the next holder's grant, median and p99
//!   (the target: fair's median at most twice unfair's);
//! - holds per second.
//!
//! Not criterion: each figure is a share or a distribution of hand-offs, not a mean time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold::{EtcdMode, LockBackend, LockClient, LockManager, LockOptions, MemoryBackend, Wait};
use leasehold_bench_support::cpu::loadavg;
use leasehold_bench_support::harness::{median, Turn};
use leasehold_test_support::{EtcdServer, RedisServer};

const TASKS_PER_NODE: usize = 4;
const ROUNDS: usize = 3;
const TTL: Duration = Duration::from_secs(5);

async fn node<B: LockBackend>(name: String, backend: B) -> LockClient {
    LockManager::builder()
        .with_name(name)
        .with_backend("store", backend)
        .start()
        .await
        .expect("manager starts")
}

/// One run's figures.
struct Run {
    /// Node A's share of the holds, in percent (B has the rest).
    share_a: f64,
    /// Release → next grant, median and p99, in ms.
    handoff_p50_ms: f64,
    handoff_p99_ms: f64,
    holds_per_sec: f64,
}

/// Eight tasks on the two nodes take turns on one fresh key for `length`.
async fn run(nodes: &[LockClient; 2], fair: bool, length: Duration) -> Run {
    let key = format!("bench/fair/{:016x}", rand::random::<u64>());
    let stop = Instant::now() + length;
    let turns = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (n, client) in nodes.iter().enumerate() {
        for _ in 0..TASKS_PER_NODE {
            let (client, key, turns) = (client.clone(), key.clone(), turns.clone());
            tasks.push(tokio::spawn(async move {
                let options = LockOptions::new()
                    .with_ttl(TTL)
                    .with_fair(fair)
                    .with_wait(Wait::UpTo(Duration::from_secs(120)));
                while Instant::now() < stop {
                    let guard = client.lock(&key, options.clone()).await.expect("lock");
                    let turn =
                        Turn::hold(|| async { guard.release().await.expect("release") }).await;
                    turns.lock().unwrap().push((n, turn));
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("task");
    }
    let mut turns = std::mem::take(&mut *turns.lock().unwrap());
    turns.retain(|(_, turn)| turn.acquired < stop);
    turns.sort_by_key(|(_, turn)| turn.acquired);
    let mut gaps: Vec<Duration> = turns
        .windows(2)
        .map(|pair| {
            let (before, after) = (pair[0].1, pair[1].1);
            assert!(after.acquired >= before.released, "two holders at once");
            after.acquired - before.released
        })
        .collect();
    gaps.sort();
    let at = |p: f64| {
        let i = ((gaps.len() as f64 * p) as usize).min(gaps.len().saturating_sub(1));
        gaps.get(i).map_or(f64::NAN, |g| g.as_secs_f64() * 1e3)
    };
    let on_a = turns.iter().filter(|(n, _)| *n == 0).count();
    Run {
        share_a: 100.0 * on_a as f64 / turns.len().max(1) as f64,
        handoff_p50_ms: at(0.5),
        handoff_p99_ms: at(0.99),
        holds_per_sec: turns.len() as f64 / length.as_secs_f64(),
    }
}

/// `ROUNDS` rounds of unfair and fair runs (which goes first alternates), then one line per
/// mode of medians.
async fn compare(store: &str, nodes: [LockClient; 2], length: Duration) {
    let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for fair in order {
            runs[usize::from(fair)].push(run(&nodes, fair, length).await);
        }
    }
    for (fair, runs) in runs.iter().enumerate() {
        let m = |f: fn(&Run) -> f64| median(runs.iter().map(f)).unwrap_or(f64::NAN);
        let shares: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.0}/{:.0}", r.share_a, 100.0 - r.share_a))
            .collect();
        println!(
            "{store:<8} {:<7} share A/B {:>5.1}/{:<5.1} (rounds {})  hand-off median {:>7.3} ms  p99 {:>7.3} ms  {:>6.0} holds/s",
            if fair == 1 { "fair" } else { "unfair" },
            m(|r| r.share_a),
            100.0 - m(|r| r.share_a),
            shares.join(", "),
            m(|r| r.handoff_p50_ms),
            m(|r| r.handoff_p99_ms),
            m(|r| r.holds_per_sec),
        );
    }
    for node in nodes {
        node.shutdown().await;
    }
}

fn name(what: &str) -> String {
    format!("bench-fair-{what}-{}", std::process::id())
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; this bench takes only `--quick`.
    let quick = std::env::var_os("LEASEHOLD_BENCH_QUICK").is_some()
        || std::env::args().any(|a| a == "--quick");
    let length = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    println!(
        "fair against unfair: 2 nodes x {TASKS_PER_NODE} tasks on one key, {length:?} per run, \
         medians of {ROUNDS} rounds; load before: {}",
        loadavg()
    );

    let memory = MemoryBackend::new();
    let nodes = [
        node(name("memory-a"), memory.clone()).await,
        node(name("memory-b"), memory).await,
    ];
    compare("memory", nodes, length).await;

    let redis = RedisServer::start();
    let nodes = [
        node(name("redis-a"), redis.backend().await).await,
        node(name("redis-b"), redis.backend().await).await,
    ];
    compare("redis", nodes, length).await;
    drop(redis);

    let etcd = EtcdServer::start();
    let nodes = [
        node(name("etcd-a"), etcd.backend(EtcdMode::Lock).await).await,
        node(name("etcd-b"), etcd.backend(EtcdMode::Lock).await).await,
    ];
    compare("etcd", nodes, length).await;
    let nodes = [
        node(name("etcd-txn-a"), etcd.backend(EtcdMode::Txn).await).await,
        node(name("etcd-txn-b"), etcd.backend(EtcdMode::Txn).await).await,
    ];
    compare("etcd-txn", nodes, length).await;
    drop(etcd);
    println!("load after: {}", loadavg());
}
