//! leasehold on Redis against what a user would otherwise use, measured side by side in one
//! run on one `redis-server` (which this bench starts on a free loopback port), and contended
//! handoff.
//!
//! Run: `cargo bench --bench redis` (about a minute), or `cargo bench --bench redis -- --quick`
//! (or `LEASEHOLD_BENCH_QUICK=1`) for 1 and 64 tasks in about 15 s.
//!
//! - Throughput: at 1, 16, 64 and 256 concurrent tasks, each task looping lock+release on a key
//!   of its own:
//!   (a) leasehold through [`LockClient`] (`try_lock`, then `release`);
//!   (b) `rslock` (a Redlock client, here on one server), `lock` then `unlock`;
//!   (c) a plain raw lock on the `redis` crate: `SET key token NX PX ttl`, then a
//!   compare-and-delete script, on one `ConnectionManager` — no fencing, no release notices;
//!   (d) leasehold's [`RedisBackend`](leasehold::RedisBackend) called directly through the
//!   [`LockBackend`](leasehold::LockBackend) trait, no actors: the store work leasehold's own
//!   scripts do, so (a)/(d) is what the actors cost and (d)/(c) what the scripts cost.
//!
//!   For each: cycles/s; CPU time per cycle of this process (`getrusage`) and of the
//!   redis-server (`/proc/<pid>/stat`); with one task, each cycle's time (p50, p99). The four
//!   take turns, in an order that rotates each round, and every figure is the median of the
//!   rounds. The machine's load average is printed at the start and the end: other work on it
//!   moves every figure, the ratios less.
//! - Contended handoff: 16 tasks taking turns on one key, 1 ms hold each; the time from one
//!   holder's release to the next holder's acquisition, median and p99, counted where the lock
//!   went to another task (a task that takes the lock straight back hands nothing over; those
//!   retakes are counted apart).
//!
//! Not criterion: the figures that matter are ratios between clients under concurrency in one
//! run, which criterion's one-function-at-a-time sampling does not give.

use std::sync::Arc;
use std::time::Duration;

use leasehold::{LockBackend, LockClient, LockManager, LockOptions};
use leasehold_bench_support::cpu;
use leasehold_bench_support::harness::{
    self, backend_cycle, handoff, leasehold_turn, report, Figures, Ratios, Turn, Window,
    HANDOFF_TASKS, HOLD,
};
use leasehold_bench_support::raw_redis::PlainRawLock;
use leasehold_test_support::RedisServer;

/// How long each part runs: each client's figures are measured in `rounds` turns of one
/// window each, and each handoff contest runs for `handoff`.
struct Plan {
    concurrency: &'static [usize],
    rounds: usize,
    window: Window,
    handoff: Duration,
}

const FULL: Plan = Plan {
    concurrency: &[1, 16, 64, 256],
    rounds: 5,
    window: Window {
        warmup: Duration::from_millis(100),
        measure: Duration::from_millis(500),
    },
    handoff: Duration::from_secs(3),
};

const QUICK: Plan = Plan {
    concurrency: &[1, 64],
    rounds: 3,
    window: Window {
        warmup: Duration::from_millis(100),
        measure: Duration::from_millis(300),
    },
    handoff: Duration::from_millis(700),
};

const TTL: Duration = Duration::from_secs(30);

/// The contenders, in the order they are printed.
const NAMES: [&str; 4] = [
    "(a) leasehold LockClient",
    "(b) rslock 0.10",
    "(c) plain raw SET NX PX + CAD",
    "(d) RedisBackend, no actors",
];

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
        "leasehold redis bench ({} run) against redis-server (pid {}) on {url}, {} tokio workers",
        if quick { "quick" } else { "full" },
        server.pid(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!("load average at start: {}", cpu::loadavg());

    let leasehold = LockManager::builder()
        .with_name("bench-redis")
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .expect("lock manager");
    let rslock = rslock::LockManager::new(vec![url.clone()]);
    let contenders = [
        Contender::Leasehold(leasehold.clone()),
        Contender::Rslock(rslock.clone()),
        Contender::Plain(PlainRawLock::connect(&url).await),
        Contender::Backend(Arc::new(server.backend().await)),
    ];
    let servers = vec![vec![server.pid()]; 4];
    println!(
        "each task loops lock+release on a key of its own; {} rounds of {:?} + {:?} per client, \
         interleaved; medians of the rounds",
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
        harness::print_figures(&harness::tasks_label(tasks), "server", &NAMES, &figures);
        rows.push((tasks, figures));
    }
    print_summary(&rows);

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
    println!();
    println!("load average at end: {}", cpu::loadavg());
}

/// leasehold's ratios to each peer at every concurrency (throughput; for CPU, per cycle).
fn print_summary(rows: &[(usize, Vec<Figures>)]) {
    let ratios = Ratios::new("leasehold (a) against its peers, same run", rows);
    let rate = |f: &Figures| Some(f.cycles_per_sec);
    let client = |f: &Figures| Some(f.client_cpu_us);
    let server = |f: &Figures| f.server_cpu_us;
    ratios.line("throughput a/b (leasehold / rslock)", rate, 1);
    ratios.line("throughput a/c (leasehold / plain raw)", rate, 2);
    ratios.line(
        "throughput a/d (leasehold / its scripts, no actors)",
        rate,
        3,
    );
    ratios.line("client CPU per cycle a/b", client, 1);
    ratios.line("client CPU per cycle a/c", client, 2);
    ratios.line("redis-server CPU per cycle a/b", server, 1);
    ratios.line("redis-server CPU per cycle a/c", server, 2);
    ratios.uncontended();
}

/// One of the clients compared, doing one lock+release cycle on a key of the task's own.
#[derive(Clone)]
enum Contender {
    Leasehold(LockClient),
    Rslock(rslock::LockManager),
    Plain(PlainRawLock),
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
