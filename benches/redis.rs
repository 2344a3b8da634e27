//! Lock+release throughput and contended handoff on Redis, against peers measured in the same
//! run on the same `redis-server` (which this bench starts on a free loopback port).
//!
//! Run: `cargo bench --bench redis` (under a minute), or `cargo bench --bench redis -- --quick`
//! (or `LEASEHOLD_BENCH_QUICK=1`) for a few seconds.
//!
//! - Throughput, 1 and 64 concurrent tasks, each on its own key, `try_lock` then release:
//!   (a) leasehold through [`LockClient`]; (b) the raw `redis` crate running leasehold's own
//!   acquire and release scripts on one `ConnectionManager`, the floor of what any client with
//!   fencing tokens can do; (c) `rslock`, a Redlock client (its acquire is a plain
//!   `SET NX PX`, less server work than a fencing acquire, so it can beat (b)). Prints each
//!   figure and the ratios a/b and a/c, and for reference leasehold on the in-process store
//!   (what the actors cost without a network).
//! - Contended handoff: 16 tasks taking turns on one key, 1 ms hold each; the time from one
//!   holder's release to the next holder's acquisition, median and p99, counted where the lock
//!   went to another task (a task that takes the lock straight back hands nothing over; those
//!   retakes are counted apart).
//!
//! Not criterion: the figures that matter are ratios between clients under concurrency in one
//! run, which criterion's one-function-at-a-time sampling does not give.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/raw_redis.rs"]
mod raw_redis;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use harness::{handoff, leasehold_turn, rates, report, Turn, HANDOFF_TASKS, HOLD};
use leasehold::{LockClient, LockManager, LockOptions, MemoryBackend};
use raw_redis::RawRedis;
use redis_server::RedisServer;

/// How long each part runs: each client's throughput is measured in `rounds` turns of
/// `warmup` + `measure`, and each handoff contest runs for `handoff`.
struct Plan {
    rounds: usize,
    warmup: Duration,
    measure: Duration,
    handoff: Duration,
}

const FULL: Plan = Plan {
    rounds: 6,
    warmup: Duration::from_millis(100),
    measure: Duration::from_millis(500),
    handoff: Duration::from_secs(4),
};

const QUICK: Plan = Plan {
    rounds: 1,
    warmup: Duration::from_millis(100),
    measure: Duration::from_millis(400),
    handoff: Duration::from_millis(700),
};

const CONCURRENCY: [usize; 2] = [1, 64];
const TTL: Duration = Duration::from_secs(30);

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick")
        || std::env::var("LEASEHOLD_BENCH_QUICK").is_ok_and(|v| v == "1");
    let plan = if quick { QUICK } else { FULL };
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(&server, &plan, quick));
}

async fn run(server: &RedisServer, plan: &Plan, quick: bool) {
    let url = server.url();
    println!(
        "leasehold redis bench ({} run) against redis-server on {url}, {} tokio workers",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    let leasehold = LockManager::builder()
        .with_name("bench-redis")
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .expect("lock manager");
    let raw = RawRedis::connect(&url).await;
    let rslock = rslock::LockManager::new(vec![url.clone()]);

    // For reference: the same calls on the in-process store, the cost of the actors alone.
    let memory = LockManager::builder()
        .with_name("bench-memory-reference")
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await
        .expect("memory lock manager");
    let clients = [
        Contender::Leasehold(leasehold.clone()),
        Contender::Raw(raw),
        Contender::Rslock(rslock.clone()),
        Contender::Memory(memory.clone()),
    ];
    let mut rows = Vec::new();
    for tasks in CONCURRENCY {
        let cycle = |contender: Contender, task| async move { contender.cycle(task).await };
        let window = (plan.warmup, plan.measure);
        rows.push(rates(&clients, tasks, plan.rounds, window, cycle).await);
    }

    println!();
    println!(
        "lock+release cycles/s          {:>12}{:>12}",
        "1 task", "64 tasks"
    );
    let names = [
        "(a) leasehold LockClient",
        "(b) raw redis, same scripts",
        "(c) rslock 0.10",
        "(ref) leasehold, memory store",
    ];
    for (i, name) in names.iter().enumerate() {
        println!("{name:<30} {:>12.0}{:>12.0}", rows[0][i], rows[1][i]);
    }
    println!(
        "{:<30} {:>12.2}{:>12.2}",
        "a/b",
        rows[0][0] / rows[0][1],
        rows[1][0] / rows[1][1]
    );
    println!(
        "{:<30} {:>12.2}{:>12.2}",
        "a/c",
        rows[0][0] / rows[0][2],
        rows[1][0] / rows[1][2]
    );

    println!();
    println!(
        "contended handoff: {HANDOFF_TASKS} tasks, one key, {HOLD:?} hold; release -> next acquisition"
    );
    let one_node = handoff(plan.handoff, {
        let client = leasehold.clone();
        move |_task| leasehold_turn(client.clone(), TTL)
    })
    .await;
    report("leasehold, one node", &one_node);

    let second = LockManager::builder()
        .with_name("bench-redis-2")
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .expect("second lock manager");
    let two_nodes = handoff(plan.handoff, {
        let nodes = [leasehold.clone(), second.clone()];
        // Half the tasks on each node: a turn that crosses nodes goes by release notice.
        move |task| leasehold_turn(nodes[task % 2].clone(), TTL)
    })
    .await;
    report("leasehold, two nodes", &two_nodes);

    let rslock_turns = handoff(plan.handoff, {
        let rslock = rslock.clone();
        move |_task| {
            let rslock = rslock.clone();
            async move {
                let guard = rslock
                    .acquire("bench/handoff/rslock", TTL)
                    .await
                    .expect("rslock acquire");
                Turn::hold(|| guard.release()).await
            }
        }
    })
    .await;
    report("rslock 0.10", &rslock_turns);

    leasehold.shutdown().await;
    second.shutdown().await;
    memory.shutdown().await;
}

/// One of the clients compared, doing one lock+release cycle on a key of the task's own.
#[derive(Clone)]
enum Contender {
    Leasehold(LockClient),
    Raw(RawRedis),
    Rslock(rslock::LockManager),
    Memory(LockClient),
}

impl Contender {
    async fn cycle(&self, task: usize) {
        match self {
            Contender::Leasehold(client) | Contender::Memory(client) => {
                let key = format!("bench/leasehold/{task}");
                let guard = client
                    .try_lock(&key, LockOptions::new().with_ttl(TTL))
                    .await
                    .expect("try_lock")
                    .expect("a key of its own is free");
                guard.release().await.expect("release");
            }
            Contender::Raw(raw) => raw.cycle(&format!("bench/raw/{task}")).await,
            Contender::Rslock(rslock) => {
                let key = format!("bench/rslock/{task}");
                let lock = rslock.lock(key.as_str(), TTL).await.expect("rslock lock");
                rslock.unlock(&lock).await;
            }
        }
    }
}
