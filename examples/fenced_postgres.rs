//! Run with a PostgreSQL at hand: `LEASEHOLD_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/postgres cargo run --features postgres --example fenced_postgres`
//! (the URL shown is the default; it is tokio-postgres's connection string).
//!
//! Two holders of one lock (from the in-process store, to need nothing else), one after the
//! other, update a row in a fenced transaction; then the first one, late, tries again with
//! its old token and is refused before it writes.

use std::time::Duration;

use leasehold::{LockManager, LockOptions, MemoryBackend, PgFence};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("LEASEHOLD_POSTGRES_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into());
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    let fence = PgFence::new();
    fence.create_table(&client).await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS example_accounts (id bigint PRIMARY KEY, balance bigint);
             INSERT INTO example_accounts VALUES (42, 0) ON CONFLICT DO NOTHING",
        )
        .await?;

    let locks = LockManager::builder()
        .with_name("fenced-postgres-example")
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await?;
    let opts = LockOptions::new().with_ttl(Duration::from_secs(10));
    let deposit = "UPDATE example_accounts SET balance = balance + 5 WHERE id = 42";

    let first = locks.lock("accounts/42", opts.clone()).await?;
    let old_token = first.fencing_token();
    let tx = fence
        .transaction(&mut client, "accounts/42", old_token)
        .await?;
    tx.execute(deposit, &[]).await?;
    tx.commit().await?;
    first.release().await?;

    let second = locks.lock("accounts/42", opts).await?;
    let tx = fence
        .transaction(&mut client, "accounts/42", second.fencing_token())
        .await?;
    tx.execute(deposit, &[]).await?;
    tx.commit().await?;
    println!("token {} deposited", second.fencing_token());

    match fence
        .transaction(&mut client, "accounts/42", old_token)
        .await
    {
        Err(refused) if refused.is_stale() => println!("token {old_token} refused: {refused}"),
        Err(other) => return Err(other.into()),
        Ok(_) => panic!("a stale token must be refused"),
    }
    let balance: i64 = client
        .query_one("SELECT balance FROM example_accounts WHERE id = 42", &[])
        .await?
        .get(0);
    println!("balance of account 42: {balance}");
    second.release().await?;
    locks.shutdown().await;
    drop(client);
    connection.await??;
    Ok(())
}
