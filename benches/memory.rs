//! Lock+release cycles per second through `LockClient` on the memory backend, with 1 and 64
//! concurrent tasks: `cargo bench --bench memory`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use leasehold::{LockClient, LockManager, LockOptions, MemoryBackend};

/// Runs `cycles` lock+release cycles split over `tasks` tasks, each on its own key.
async fn cycles(client: &LockClient, tasks: u64, cycles: u64) -> Duration {
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let client = client.clone();
        let per_task = cycles / tasks;
        handles.push(tokio::spawn(async move {
            let key = format!("bench/{task}");
            for _ in 0..per_task {
                let guard = client
                    .try_lock(&key, LockOptions::new())
                    .await
                    .expect("lock")
                    .expect("own key is free");
                guard.release().await.expect("release");
            }
        }));
    }
    for handle in handles {
        handle.await.expect("bench task");
    }
    started.elapsed()
}

fn lock_release(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = runtime.block_on(async {
        LockManager::builder()
            .with_name("bench-memory")
            .with_backend("memory", MemoryBackend::new())
            .start()
            .await
            .expect("manager")
    });
    let mut group = c.benchmark_group("memory_lock_release");
    for tasks in [1u64, 64] {
        const BATCH: u64 = 640;
        group.throughput(Throughput::Elements(BATCH));
        group.bench_function(format!("{tasks}_tasks"), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let client = client.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += cycles(&client, tasks, BATCH).await;
                    }
                    total
                }
            })
        });
    }
    group.finish();
    runtime.block_on(client.shutdown());
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = lock_release
}
criterion_main!(benches);
