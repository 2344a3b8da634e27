//! Run with an etcd at hand: `LEASEHOLD_ETCD_ENDPOINTS=127.0.0.1:2379 cargo run --features etcd --example fenced_etcd`
//! (the endpoint shown is the default; separate several with commas).
//!
//! Two holders of one lock, one after the other, write etcd keys in a fenced transaction;
//! then the first one, late, tries again with its old token and is refused.

use std::time::Duration;

use etcd_client::{Client, TxnOp};
use leasehold::{EtcdBackend, EtcdFence, LockManager, LockOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoints =
        std::env::var("LEASEHOLD_ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into());
    let endpoints: Vec<&str> = endpoints.split(',').map(str::trim).collect();
    let locks = LockManager::builder()
        .with_name("fenced-etcd-example")
        .with_backend(
            "etcd",
            EtcdBackend::builder(endpoints.clone()).connect().await?,
        )
        .start()
        .await?;
    let mut kv = Client::connect(endpoints, None).await?.kv_client();
    let config = format!("examples/config/{}", std::process::id());
    let fence = EtcdFence::new(format!("{config}/fence"));
    let opts = LockOptions::new().with_ttl(Duration::from_secs(10));

    let first = locks.lock("examples/config", opts.clone()).await?;
    let old_token = first.fencing_token();
    fence
        .run(
            &mut kv,
            old_token,
            [TxnOp::put(config.as_str(), "v1", None)],
        )
        .await?;
    first.release().await?;

    let second = locks.lock("examples/config", opts).await?;
    // Any etcd-client operations, all in the one guarded transaction.
    fence
        .run(
            &mut kv,
            second.fencing_token(),
            [
                TxnOp::put(config.as_str(), "v2", None),
                TxnOp::put(format!("{config}/by"), "the second holder", None),
            ],
        )
        .await?;
    println!("token {} wrote v2", second.fencing_token());

    let late = fence
        .run(
            &mut kv,
            old_token,
            [TxnOp::put(config.as_str(), "late", None)],
        )
        .await;
    match late {
        Err(refused) if refused.is_stale() => println!("token {old_token} refused: {refused}"),
        other => panic!("a stale token must be refused, got {other:?}"),
    }
    let now = kv.get(config.as_str(), None).await?;
    println!("{config} = {:?}", now.kvs()[0].value_str()?);
    second.release().await?;
    locks.shutdown().await;
    Ok(())
}
