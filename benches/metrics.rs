//! What recording metrics costs: lock+release cycles/s (and this process's CPU per cycle)
//! through `LockClient` on the memory backend, at 1 and 64 tasks. Built with the `metrics`
//! feature, it records into metrics-exporter-prometheus's recorder, rendered (scraped) once a
//! second as a server would; built without, nothing is recorded. Run both builds in turn and
//! compare (the README's "Metrics" section has the commands):
//!
//! `cargo bench --bench metrics` and `cargo bench --bench metrics --features metrics`.
//!
//! With `LEASEHOLD_BENCH_FIXED=N` it runs instead a fixed N cycles over 64 tasks and exits, for
//! counting the process's instructions per cycle (`perf stat -e instructions:u`), which the
//! machine's other load does not move the way it moves a rate.

use std::time::Duration;

use leasehold::{LockClient, LockManager, LockOptions, MemoryBackend};
use leasehold_bench_support::cpu;
use leasehold_bench_support::harness::{self, Window};

const ROUNDS: usize = 5;
const WINDOW: Window = Window {
    warmup: Duration::from_millis(300),
    measure: Duration::from_secs(2),
};

fn main() {
    // `cargo bench` passes `--bench`; this bench takes no other argument.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let recording = record();
    runtime.block_on(run(recording));
}

/// Installs the Prometheus recorder (before the manager starts: leasehold registers its
/// series then) and scrapes it once a second on a thread of its own. Histograms are the
/// exporter's default summaries, or with `LEASEHOLD_BENCH_BUCKETS=1` Prometheus histograms
/// with buckets (what a fleet aggregating across instances configures).
#[cfg(feature = "metrics")]
fn record() -> &'static str {
    let buckets = std::env::var_os("LEASEHOLD_BENCH_BUCKETS").is_some();
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    if buckets {
        let bounds = [
            1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
        ];
        builder = builder.set_buckets(&bounds).expect("bucket bounds");
    }
    let handle = builder.install_recorder().expect("prometheus recorder");
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        handle.run_upkeep();
        std::hint::black_box(handle.render());
    });
    if buckets {
        "on (metrics-exporter-prometheus recorder, histograms with buckets, scraped every second)"
    } else {
        "on (metrics-exporter-prometheus recorder, default summaries, scraped every second)"
    }
}

#[cfg(not(feature = "metrics"))]
fn record() -> &'static str {
    "off (built without the feature)"
}

async fn run(recording: &str) {
    println!("leasehold metrics-cost bench: metrics {recording}");
    println!("load average at start: {}", cpu::loadavg());
    let client = LockManager::builder()
        .with_name("bench-metrics")
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await
        .expect("lock manager");
    if let Some(total) = std::env::var("LEASEHOLD_BENCH_FIXED")
        .ok()
        .and_then(|n| n.parse::<u64>().ok())
    {
        fixed(&client, 64, total).await;
        client.shutdown().await;
        return;
    }
    for tasks in [1, 64] {
        let cycle = |client: LockClient, task: usize| async move {
            let key = format!("bench/{task}");
            let guard = client
                .try_lock(&key, LockOptions::new())
                .await
                .expect("lock")
                .expect("own key is free");
            guard.release().await.expect("release");
        };
        let figures = harness::measure(
            std::slice::from_ref(&client),
            &[Vec::new()],
            tasks,
            ROUNDS,
            WINDOW,
            cycle,
        )
        .await;
        let f = &figures[0];
        println!(
            "{tasks:>2} tasks: {:>9.0} cycles/s, {:>5.2} µs CPU/cycle (medians of {} rounds of {:?})",
            f.cycles_per_sec, f.client_cpu_us, f.rounds, WINDOW.measure
        );
    }
    println!("load average at end: {}", cpu::loadavg());
    client.shutdown().await;
}

/// `total` cycles split over `tasks` tasks, each on a key of its own.
async fn fixed(client: &LockClient, tasks: u64, total: u64) {
    let (started, cpu_from) = (std::time::Instant::now(), cpu::process());
    let workers: Vec<_> = (0..tasks)
        .map(|task| {
            let client = client.clone();
            tokio::spawn(async move {
                let key = format!("bench/{task}");
                for _ in 0..total / tasks {
                    let guard = client.try_lock(&key, LockOptions::new()).await;
                    let guard = guard.expect("lock").expect("own key is free");
                    guard.release().await.expect("release");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("bench task");
    }
    let (elapsed, cpu) = (started.elapsed(), cpu::process() - cpu_from);
    let done = (total / tasks * tasks) as f64;
    println!(
        "{tasks} tasks, {done} cycles: {:.0} cycles/s, {:.2} µs CPU/cycle",
        done / elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / done
    );
}
