//! A semaphore's acquire+release cycle against the mutex's, on each backend (memory, and the
//! `redis-server` and `etcd` this bench starts on free loopback ports), in one run.
//!
//! Run: `cargo bench --bench semaphore --features etcd` (about a minute), or with `-- --quick`
//! (or `LEASEHOLD_BENCH_QUICK=1`) for fewer rounds.
//!
//! At 1 and 64 concurrent tasks, each task loops on a name of its own:
//! (a) the mutex: `try_lock`, then `release`;
//! (b) a semaphore of 1 permit: `try_acquire`, then `release`;
//! (c) all tasks on ONE semaphore of as many permits as tasks: a permit is always free, but
//!     each admission looks at every live lease of the semaphore (and on etcd, races the
//!     other tasks' acquisitions: a try that loses every race is tried again).
//!
//! Each takes turns with the others, in an order that rotates every round; every figure is
//! the median of the rounds. The target: (b)/(a) ≥ 0.8 on every backend.

use std::time::Duration;

use leasehold::{LockBackend, LockClient, LockManager, LockOptions, MemoryBackend};
use leasehold_bench_support::cpu;
use leasehold_bench_support::harness::{self, Window};
use leasehold_test_support::{EtcdServer, RedisServer};

const TTL: Duration = Duration::from_secs(30);
const TASKS: [usize; 2] = [1, 64];
const NAMES: [&str; 3] = [
    "(a) mutex, a key per task",
    "(b) semaphore of 1, one per task",
    "(c) one semaphore of N = tasks",
];

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick")
        || std::env::var("LEASEHOLD_BENCH_QUICK").is_ok_and(|v| v == "1");
    let rounds = if quick { 3 } else { 5 };
    let window = Window {
        warmup: Duration::from_millis(100),
        measure: Duration::from_millis(if quick { 300 } else { 500 }),
    };
    let redis = RedisServer::start();
    let etcd = EtcdServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        println!(
            "leasehold semaphore bench ({} run), {} tokio workers; {rounds} rounds of {:?} + {:?}",
            if quick { "quick" } else { "full" },
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            window.warmup,
            window.measure,
        );
        println!("load average at start: {}", cpu::loadavg());
        let mut summary = Vec::new();
        summary.push((
            "memory",
            bench(MemoryBackend::new(), None, rounds, window).await,
        ));
        let pid = Some(redis.pid());
        summary.push((
            "redis",
            bench(redis.backend().await, pid, rounds, window).await,
        ));
        let backend = etcd.backend(leasehold::EtcdMode::Txn).await;
        summary.push(("etcd", bench(backend, etcd.pid(), rounds, window).await));
        println!();
        println!("semaphore / mutex throughput, same run        1 task   64 tasks");
        for (store, ratios) in summary {
            let row: String = ratios
                .iter()
                .map(|(b, c)| format!("  b/a {b:.2} c/a {c:.2}"))
                .collect();
            println!("  {store:<8}{row}");
        }
        println!("load average at end: {}", cpu::loadavg());
    });
}

/// The three contenders on one backend, at each concurrency: (b)/(a) and (c)/(a) per row.
async fn bench<B: LockBackend + Clone>(
    backend: B,
    server: Option<u32>,
    rounds: usize,
    window: Window,
) -> Vec<(f64, f64)> {
    let client = LockManager::builder()
        .with_name(format!("bench-semaphore-{}", backend.kind()))
        .with_backend(backend.kind(), backend.clone())
        .start()
        .await
        .expect("lock manager");
    let servers = vec![Vec::from_iter(server); 3];
    let mut ratios = Vec::new();
    for tasks in TASKS {
        let contenders = [
            Contender::Mutex(client.clone()),
            Contender::OwnSemaphore(client.clone()),
            Contender::SharedSemaphore(client.clone(), tasks),
        ];
        let cycle = |contender: Contender, task| async move { contender.cycle(task).await };
        let figures = harness::measure(&contenders, &servers, tasks, rounds, window, cycle).await;
        let heading = format!("{}, {}", backend.kind(), harness::tasks_label(tasks));
        harness::print_figures(&heading, "server", &NAMES, &figures);
        let a = figures[0].cycles_per_sec;
        ratios.push((figures[1].cycles_per_sec / a, figures[2].cycles_per_sec / a));
    }
    client.shutdown().await;
    ratios
}

#[derive(Clone)]
enum Contender {
    Mutex(LockClient),
    OwnSemaphore(LockClient),
    SharedSemaphore(LockClient, usize),
}

impl Contender {
    async fn cycle(&self, task: usize) {
        let opts = LockOptions::new().with_ttl(TTL);
        let guard = match self {
            Contender::Mutex(client) => client
                .try_lock(&format!("bench/mutex/{task}"), opts)
                .await
                .expect("try_lock"),
            Contender::OwnSemaphore(client) => client
                .semaphore(&format!("bench/semaphore/{task}"), 1)
                .expect("semaphore")
                .try_acquire(opts)
                .await
                .expect("try_acquire"),
            Contender::SharedSemaphore(client, permits) => {
                let semaphore = client
                    .semaphore(&format!("bench/shared/{permits}"), *permits as u32)
                    .expect("semaphore");
                // A free permit is always there, but on etcd a try that loses every race
                // with the other tasks' acquisitions says none is: try again.
                loop {
                    let permit = semaphore.try_acquire(opts.clone()).await;
                    if let Some(permit) = permit.expect("try_acquire") {
                        break Some(permit);
                    }
                }
            }
        };
        let guard = guard.expect("a free key or permit");
        guard.release().await.expect("release");
    }
}
