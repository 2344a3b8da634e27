//! What replica acknowledgement costs on Redis Sentinel: leasehold's lock+release cycles per
//! second with and without `with_replica_ack(1, 1 s)`, measured side by side in one run on one
//! Sentinel deployment (a primary, two replicas, three sentinels, which this bench starts on
//! loopback), at 1 and 64 concurrent tasks, each task on a key of its own. The target of
//! issue 15: with acknowledgement at least 0.7 × without.
//!
//! Run: `cargo bench --bench redis_sentinel` (about 20 s), or `-- --quick` (or
//! `LEASEHOLD_BENCH_QUICK=1`) for fewer rounds.
//!
//! Both clients go through the sentinels to the same primary; they take turns in an order
//! that rotates each round, and every figure is the median of the rounds (see
//! `bench-support`'s harness). The primary's CPU time per cycle is read from `/proc`.

use std::time::Duration;

use leasehold::{LockClient, LockManager, LockOptions};
use leasehold_bench_support::cpu;
use leasehold_bench_support::harness::{self, Window};
use leasehold_test_support::RedisSentinel;

const TTL: Duration = Duration::from_secs(30);
const NAMES: [&str; 2] = ["without replica ack", "with_replica_ack(1, 1s)"];

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick")
        || std::env::var("LEASEHOLD_BENCH_QUICK").is_ok_and(|v| v == "1");
    let rounds = if quick { 3 } else { 5 };
    let window = Window {
        warmup: Duration::from_millis(100),
        measure: Duration::from_millis(if quick { 300 } else { 500 }),
    };
    let topology = RedisSentinel::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(&topology, rounds, window));
}

async fn run(topology: &RedisSentinel, rounds: usize, window: Window) {
    let primary = topology.server(topology.primary_port()).pid();
    println!(
        "leasehold redis sentinel bench: {} (primary pid {primary}), {} tokio workers",
        topology.url(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!("load average at start: {}", cpu::loadavg());
    let start = |name: &str, backend| {
        LockManager::builder()
            .with_name(name)
            .with_backend("redis", backend)
            .start()
    };
    let plain = start("bench-sentinel", topology.backend().await)
        .await
        .expect("lock manager");
    let acked = topology
        .backend()
        .await
        .with_replica_ack(1, Duration::from_secs(1))
        .expect("replica ack settings");
    let acked = start("bench-sentinel-ack", acked)
        .await
        .expect("lock manager");
    let contenders = [(0, plain.clone()), (1, acked.clone())];
    let mut ratios = Vec::new();
    for tasks in [1, 64] {
        let cycle = |(which, client): (usize, LockClient), task| async move {
            let key = format!("bench/sentinel/{which}/{task}");
            let guard = client
                .try_lock(&key, LockOptions::new().with_ttl(TTL))
                .await
                .expect("try_lock")
                .expect("a key of its own is free");
            guard.release().await.expect("release");
        };
        let figures = harness::measure(
            &contenders,
            &[vec![primary], vec![primary]],
            tasks,
            rounds,
            window,
            cycle,
        )
        .await;
        println!();
        println!(
            "{tasks} task(s){:<24}{:>10}{:>15}{:>15}{:>9}{:>9}",
            "", "cycles/s", "client µs/cyc", "server µs/cyc", "p50 µs", "p99 µs"
        );
        for (name, f) in NAMES.iter().zip(&figures) {
            let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
            println!(
                "  {name:<30}{:>10.0}{:>15.1}{:>15}{:>9}{:>9}",
                f.cycles_per_sec,
                f.client_cpu_us,
                f.server_cpu_us
                    .map_or("-".to_owned(), |v| format!("{v:.1}")),
                opt(f.p50_us),
                opt(f.p99_us),
            );
        }
        ratios.push((tasks, figures[1].cycles_per_sec / figures[0].cycles_per_sec));
    }
    println!();
    for (tasks, ratio) in ratios {
        println!(
            "throughput with / without replica ack, {tasks:>2} task(s): {ratio:.2} (target ≥ 0.70)"
        );
    }
    plain.shutdown().await;
    acked.shutdown().await;
    println!("load average at end: {}", cpu::loadavg());
}
