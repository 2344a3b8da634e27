//! Resident memory per held lock: holds 100,000 locks at once on the memory backend (auto-renew
//! on, ttl 30 s) and reports the growth of the process's resident set per lock, and how long
//! taking them took: `cargo bench --bench held_locks`. `-- --locks N` changes the count.

use std::time::{Duration, Instant};

use leasehold::{LockManager, LockOptions, MemoryBackend};
use leasehold_bench_support::cpu::resident_bytes;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let locks: usize = args
        .iter()
        .position(|a| a == "--locks")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--locks takes a number"))
        .unwrap_or(100_000);
    let client = LockManager::builder()
        .with_name("bench-held-locks")
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await
        .expect("manager");
    let keys: Vec<String> = (0..locks).map(|i| format!("held/{i:08}")).collect();
    let opts = LockOptions::new().with_ttl(Duration::from_secs(30));
    // Warm up allocator and runtime so the baseline is not the cost of the first lock.
    drop(client.try_lock("warm-up", opts.clone()).await.unwrap());
    let before = resident_bytes();
    let started = Instant::now();
    let mut guards = Vec::with_capacity(locks);
    for chunk in keys.chunks(1000) {
        let batch = chunk.iter().map(|key| client.try_lock(key, opts.clone()));
        for guard in futures::future::join_all(batch).await {
            guards.push(guard.expect("lock").expect("free key"));
        }
    }
    let spawn_time = started.elapsed();
    // Let the actors settle (post_start done, timers armed) before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = guards.iter().filter(|g| g.is_held()).count();
    let after = resident_bytes();
    let per_lock = (after.saturating_sub(before)) as f64 / locks as f64;
    println!("held locks:          {held} of {locks}");
    println!("time to acquire all: {spawn_time:.2?} (target: under 1 s)");
    println!(
        "resident memory:     {:.1} MiB -> {:.1} MiB",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    println!(
        "per held lock:       {:.2} KiB (target: at most 10 KiB)",
        per_lock / 1024.0
    );
    assert_eq!(held, locks, "every lock is held");
    let released = Instant::now();
    drop(guards);
    client.shutdown().await;
    println!("release + shutdown:  {:.2?}", released.elapsed());
}
