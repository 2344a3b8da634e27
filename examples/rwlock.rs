//! Zero set-up read-write lock on the in-process backend: `cargo run --example rwlock`.
//!
//! Four readers read a configuration in turns while a writer rewrites it once. The readers
//! share the lock; the writer waits for the readers already in, and while it waits, readers
//! that come later wait behind it (its intent is in the store), so it is not starved. The
//! output shows who holds what, and each grant's fencing token: the writer's is greater than
//! every token handed out before it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use leasehold::{LockManager, LockOptions, MemoryBackend, Wait};

#[tokio::main]
async fn main() -> Result<(), leasehold::Error> {
    let locks = LockManager::builder()
        .with_name("rwlock-example")
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await?;
    let config = locks.rwlock("config")?;
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(5))
        .with_wait(Wait::UpTo(Duration::from_secs(10)));
    // Readers count 1 each, the writer 100: the writer must always see exactly 100.
    let holding = Arc::new(AtomicU32::new(0));
    let newest = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for reader in 0..4u32 {
        let (config, opts, holding, newest) = (
            config.clone(),
            opts.clone(),
            holding.clone(),
            newest.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for round in 0..3 {
                let share = config.read(opts.clone()).await?;
                newest.fetch_max(share.fencing_token(), Ordering::SeqCst);
                let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                println!(
                    "reader {reader}, round {round}: token {}, {now} reader(s) in",
                    share.fencing_token()
                );
                assert!(now < 100, "a reader overlapped the writer");
                tokio::time::sleep(Duration::from_millis(30)).await; // reading
                holding.fetch_sub(1, Ordering::SeqCst);
                share.release().await?;
            }
            Ok::<_, leasehold::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(40)).await; // the readers are in
    let before = newest.load(Ordering::SeqCst);
    let hold = config.write(opts).await?;
    let now = holding.fetch_add(100, Ordering::SeqCst) + 100;
    println!(
        "writer: token {} (newest before it asked: {before}), alone: {}",
        hold.fencing_token(),
        now == 100
    );
    assert_eq!(now, 100, "the writer overlapped a reader");
    assert!(hold.fencing_token() > before);
    tokio::time::sleep(Duration::from_millis(30)).await; // rewriting
    holding.fetch_sub(100, Ordering::SeqCst);
    hold.release().await?;
    for task in tasks {
        task.await.expect("reader")?;
    }
    locks.shutdown().await;
    Ok(())
}
