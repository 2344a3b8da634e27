//! Run with a Redis at hand: `LEASEHOLD_REDIS_URL=redis://127.0.0.1:6379 cargo run --example redis`
//! (the URL shown is the default).
//!
//! Takes a lock on Redis, shows what the store says about it, and gives it back.

use std::time::Duration;

use leasehold::{LockManager, LockOptions, RedisBackend};

#[tokio::main]
async fn main() -> Result<(), leasehold::Error> {
    let url =
        std::env::var("LEASEHOLD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // The URL passes straight to the `redis` crate: AUTH, DB and TLS are spelled there.
    let redis = RedisBackend::connect(&url).await?;
    // Debug shows the address and the key prefix, never the password.
    println!("connected: {redis:?}");
    let locks = LockManager::builder()
        .with_name("redis-example")
        .with_backend("redis", redis)
        .start()
        .await?;

    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(10))
        .with_metadata(format!("example pid {}", std::process::id()));
    let Some(guard) = locks.try_lock("examples/redis", opts).await? else {
        println!("examples/redis is held by someone else right now");
        locks.shutdown().await;
        return Ok(());
    };
    println!(
        "locked {:?} with fencing token {}",
        guard.key(),
        guard.fencing_token()
    );
    if let Some(info) = locks.info("examples/redis").await? {
        println!(
            "the store says: token {}, {:?} left, metadata {:?}",
            info.fencing_token, info.remaining_ttl, info.metadata
        );
    }
    guard.release().await?;
    println!(
        "released; held now: {}",
        locks.is_locked("examples/redis").await?
    );
    locks.shutdown().await;
    Ok(())
}
