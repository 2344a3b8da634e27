//! leasehold on Redis Cluster against what a user would otherwise use, measured side by side in
//! one run on one real cluster (three primaries and three replicas, which this bench starts on
//! loopback). The target of issue 15: leasehold/rslock at 64 tasks at least what it is on one
//! server (`cargo bench --bench redis`).
//!
//! Run: `cargo bench --bench redis_cluster` (about a minute), or `cargo bench --bench
//! redis_cluster -- --quick` (or `LEASEHOLD_BENCH_QUICK=1`) for 1 and 64 tasks.
//!
//! At 1, 16, 64 and 256 concurrent tasks, each task looping lock+release on a key of its own
//! (the keys spread over the three shards):
//! (a) leasehold through [`LockClient`] on a `redis+cluster://` backend (`try_lock`, then
//! `release`);
//! (b) `rslock` in its cluster mode (`LockManager::new_cluster`: the cluster counts as one
//! Redlock server), `lock` then `unlock`;
//! (c) a plain raw lock on the `redis` crate's cluster connection: `SET key token NX PX ttl`,
//! then a compare-and-delete script — no fencing, no release notices;
//! (d) leasehold's [`RedisBackend`](leasehold::RedisBackend) on the cluster called directly
//! through the [`LockBackend`](leasehold::LockBackend) trait, no actors.
//!
//! For each: cycles/s; CPU time per cycle of this process and of the cluster — the sum over
//! all six `redis-server`s, replicas included, since each write is replicated; with one task,
//! each cycle's time (p50, p99). The four take turns, in an order that rotates each round, and
//! every figure is the median of the rounds. The machine's load average is printed at the
//! start and the end. (No handoff part: `benches/redis.rs` measures it on one server.)

use std::sync::Arc;
use std::time::Duration;

use leasehold::{LockBackend, LockClient, LockManager, LockOptions};
use leasehold_bench_support::cpu;
use leasehold_bench_support::harness::{self, backend_cycle, Figures, Ratios, Window};
use leasehold_bench_support::raw_redis::PlainRawClusterLock;
use leasehold_test_support::RedisCluster;

/// How long each part runs: each client's figures are measured in `rounds` turns of one
/// window each.
struct Plan {
    concurrency: &'static [usize],
    rounds: usize,
    window: Window,
}

const FULL: Plan = Plan {
    concurrency: &[1, 16, 64, 256],
    rounds: 5,
    window: Window {
        warmup: Duration::from_millis(100),
        measure: Duration::from_millis(500),
    },
};

const QUICK: Plan = Plan {
    concurrency: &[1, 64],
    rounds: 3,
    window: Window {
        warmup: Duration::from_millis(100),
        measure: Duration::from_millis(300),
    },
};

const TTL: Duration = Duration::from_secs(30);

/// The contenders, in the order they are printed.
const NAMES: [&str; 4] = [
    "(a) leasehold LockClient",
    "(b) rslock 0.10, cluster mode",
    "(c) plain raw SET NX PX + CAD",
    "(d) RedisBackend, no actors",
];

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick")
        || std::env::var("LEASEHOLD_BENCH_QUICK").is_ok_and(|v| v == "1");
    let plan = if quick { QUICK } else { FULL };
    let cluster = RedisCluster::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(&cluster, &plan, quick));
}

async fn run(cluster: &RedisCluster, plan: &Plan, quick: bool) {
    println!(
        "leasehold redis cluster bench ({} run) against {} (redis-server pids {:?}), {} tokio workers",
        if quick { "quick" } else { "full" },
        cluster.url(),
        cluster.pids(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!("load average at start: {}", cpu::loadavg());

    let leasehold = LockManager::builder()
        .with_name("bench-redis-cluster")
        .with_backend("redis", cluster.backend().await)
        .start()
        .await
        .expect("lock manager");
    let rslock = rslock::LockManager::new_cluster(cluster.urls()).expect("rslock cluster urls");
    let contenders = [
        Contender::Leasehold(leasehold.clone()),
        Contender::Rslock(rslock),
        Contender::Plain(PlainRawClusterLock::connect_cluster(&cluster.urls()).await),
        Contender::Backend(Arc::new(cluster.backend().await)),
    ];
    let servers = vec![cluster.pids(); contenders.len()];
    println!(
        "each task loops lock+release on a key of its own; {} rounds of {:?} + {:?} per client, \
         interleaved; medians of the rounds; server CPU is all six nodes' together",
        plan.rounds, plan.window.warmup, plan.window.measure
    );

    let mut rows: Vec<(usize, Vec<Figures>)> = Vec::new();
    for &tasks in plan.concurrency {
        let cycle = |contender: Contender, task| async move { contender.cycle(task).await };
        let figures = harness::measure(
            &contenders,
            &servers,
            tasks,
            plan.rounds,
            plan.window,
            cycle,
        )
        .await;
        harness::print_figures(&harness::tasks_label(tasks), "cluster", &NAMES, &figures);
        rows.push((tasks, figures));
    }
    print_summary(&rows);

    leasehold.shutdown().await;
    println!();
    println!("load average at end: {}", cpu::loadavg());
}

/// leasehold's ratios to each peer at every concurrency (throughput; for CPU, per cycle).
fn print_summary(rows: &[(usize, Vec<Figures>)]) {
    let ratios = Ratios::new("leasehold (a) against its peers, same run", rows);
    let rate = |f: &Figures| Some(f.cycles_per_sec);
    let client = |f: &Figures| Some(f.client_cpu_us);
    let server = |f: &Figures| f.server_cpu_us;
    ratios.line("throughput a/b (leasehold / rslock cluster mode)", rate, 1);
    ratios.line("throughput a/c (leasehold / plain raw)", rate, 2);
    ratios.line(
        "throughput a/d (leasehold / its scripts, no actors)",
        rate,
        3,
    );
    ratios.line("client CPU per cycle a/b", client, 1);
    ratios.line("client CPU per cycle a/c", client, 2);
    ratios.line("client CPU per cycle a/d", client, 3);
    ratios.line("cluster CPU per cycle a/b (six nodes)", server, 1);
    ratios.line("cluster CPU per cycle a/c (six nodes)", server, 2);
    ratios.line("cluster CPU per cycle a/d (six nodes)", server, 3);
    ratios.uncontended();
}

#[derive(Clone)]
enum Contender {
    Leasehold(LockClient),
    Rslock(rslock::LockManager),
    Plain(PlainRawClusterLock),
    Backend(Arc<dyn LockBackend>),
}

impl Contender {
    async fn cycle(&self, task: usize) {
        match self {
            Contender::Leasehold(client) => {
                let key = format!("bench/leasehold/{task}");
                let guard = client
                    .try_lock(&key, LockOptions::new().with_ttl(TTL))
                    .await
                    .expect("try_lock")
                    .expect("a key of its own is free");
                guard.release().await.expect("release");
            }
            Contender::Rslock(rslock) => {
                let key = format!("bench/rslock/{task}");
                let lock = rslock.lock(key.as_str(), TTL).await.expect("rslock lock");
                rslock.unlock(&lock).await;
            }
            Contender::Plain(plain) => plain.cycle(&format!("bench/plain/{task}"), TTL).await,
            Contender::Backend(backend) => {
                backend_cycle(backend.as_ref(), &format!("bench/backend/{task}"), TTL).await
            }
        }
    }
}
