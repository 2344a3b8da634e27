//! Run with an etcd at hand: `LEASEHOLD_ETCD_ENDPOINTS=127.0.0.1:2379 cargo run --features etcd --example etcd`
//! (the endpoint shown is the default; separate several with commas).
//!
//! Takes a lock on etcd, shows what the store says about it, and gives it back.

use std::time::Duration;

use leasehold::{EtcdBackend, EtcdMode, LockManager, LockOptions};

#[tokio::main]
async fn main() -> Result<(), leasehold::Error> {
    let endpoints =
        std::env::var("LEASEHOLD_ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into());
    // User and password, TLS and timeouts are etcd-client's own `ConnectOptions`, passed to
    // `with_connect_options`; `EtcdMode::Lock` would use etcd's Lock service instead.
    let etcd = EtcdBackend::builder(endpoints.split(',').map(str::trim))
        .with_mode(EtcdMode::Txn)
        .connect()
        .await?;
    println!("connected: {etcd:?}");
    let locks = LockManager::builder()
        .with_name("etcd-example")
        .with_backend("etcd", etcd)
        .start()
        .await?;

    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(10))
        .with_metadata(format!("example pid {}", std::process::id()));
    let Some(guard) = locks.try_lock("examples/etcd", opts).await? else {
        println!("examples/etcd is held by someone else right now");
        locks.shutdown().await;
        return Ok(());
    };
    println!(
        "locked {:?} with fencing token {} (the etcd revision that created the key)",
        guard.key(),
        guard.fencing_token()
    );
    if let Some(info) = locks.info("examples/etcd").await? {
        println!(
            "the store says: token {}, {:?} left, metadata {:?}",
            info.fencing_token, info.remaining_ttl, info.metadata
        );
    }
    guard.release().await?;
    println!(
        "released; held now: {}",
        locks.is_locked("examples/etcd").await?
    );
    locks.shutdown().await;
    Ok(())
}
