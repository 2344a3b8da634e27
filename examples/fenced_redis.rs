//! Run with a Redis at hand: `LEASEHOLD_REDIS_URL=redis://127.0.0.1:6379 cargo run --example fenced_redis`
//! (the URL shown is the default).
//!
//! Two holders of one lock, one after the other, write a Redis key through its fence; then
//! the first one, late, tries again with its old token and is refused.

use std::time::Duration;

use leasehold::{FencedScript, LockManager, LockOptions, RedisBackend, RedisFence};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url =
        std::env::var("LEASEHOLD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let locks = LockManager::builder()
        .with_name("fenced-redis-example")
        .with_backend("redis", RedisBackend::connect(&url).await?)
        .start()
        .await?;
    // The resource lives in the same Redis here, but could be any Redis: the fence key sits
    // beside the resource, not beside the lock.
    let mut conn = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let report = RedisFence::new(format!("examples:report:{}", std::process::id()));
    let opts = LockOptions::new().with_ttl(Duration::from_secs(10));

    let first = locks.lock("examples/report", opts.clone()).await?;
    let old_token = first.fencing_token();
    report
        .set(&mut conn, old_token, "draft by the first holder")
        .await?;
    first.release().await?;

    let second = locks.lock("examples/report", opts).await?;
    // A script body of your own, behind the same fence: KEYS[1] is the resource.
    let append = FencedScript::new("return redis.call('APPEND', KEYS[1], ARGV[1])");
    let len: i64 = report
        .run(
            &mut conn,
            second.fencing_token(),
            &append,
            &[] as &[&str],
            &[", revised by the second"],
        )
        .await?;
    println!("token {} wrote {len} bytes", second.fencing_token());

    match report.set(&mut conn, old_token, "late write").await {
        Err(refused) if refused.is_stale() => println!("token {old_token} refused: {refused}"),
        other => panic!("a stale token must be refused, got {other:?}"),
    }
    let value: String = redis::cmd("GET")
        .arg(report.key())
        .query_async(&mut conn)
        .await?;
    println!("{} = {value:?}", report.key());
    second.release().await?;
    locks.shutdown().await;
    Ok(())
}
