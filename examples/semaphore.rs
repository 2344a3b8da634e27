//! Zero set-up semaphore on the in-process backend: `cargo run --example semaphore`.
//!
//! Six jobs share a rate-limited API that allows three callers at once: each takes one of
//! the semaphore's three permits, calls, and gives it back. One job takes two permits at once
//! (a heavier call). The output shows at most three permits in use at any moment, and each
//! permit's fencing token (each greater than those of the permits granted before it).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use leasehold::{LockManager, LockOptions, MemoryBackend, Wait};

#[tokio::main]
async fn main() -> Result<(), leasehold::Error> {
    let locks = LockManager::builder()
        .with_name("semaphore-example")
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await?;
    let api = locks.semaphore("partner-api", 3)?;
    let in_use = Arc::new(AtomicU32::new(0));
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(5))
        .with_wait(Wait::UpTo(Duration::from_secs(10)));
    let mut jobs = Vec::new();
    for job in 0..6u32 {
        let (api, in_use, opts) = (api.clone(), in_use.clone(), opts.clone());
        jobs.push(tokio::spawn(async move {
            let count = if job == 3 { 2 } else { 1 };
            let permit = api.acquire_many(count, opts).await?;
            let now = in_use.fetch_add(count, Ordering::SeqCst) + count;
            println!(
                "job {job}: {count} permit(s), fencing token {}, {now} of 3 in use",
                permit.fencing_token()
            );
            assert!(now <= 3);
            tokio::time::sleep(Duration::from_millis(50)).await; // the call
            in_use.fetch_sub(count, Ordering::SeqCst);
            permit.release().await
        }));
    }
    for job in jobs {
        job.await.expect("job")?;
    }
    println!("holders now: {:?}", api.holders().await?);
    locks.shutdown().await;
    Ok(())
}
