//! Clients of the stores, from the address a server (or a parent test, for its child
//! process) gives: connected, or a panic naming the address. The same few lines in every
//! fenced test, its child entry and the fenced safety checker.

// Each test file uses the stores it tests.
#![allow(dead_code)]

/// A multiplexed Redis connection to `url`.
#[cfg(feature = "redis")]
pub async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap_or_else(|e| panic!("redis URL {url}: {e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// An etcd KV client on `endpoint`.
#[cfg(feature = "etcd")]
pub async fn etcd_kv(endpoint: &str) -> etcd_client::KvClient {
    etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"))
        .kv_client()
}

/// A PostgreSQL client on `url`, its connection driven by a task of its own.
#[cfg(feature = "postgres")]
pub async fn postgres(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A lock manager (one node) on leasehold's Redis backend at `url`.
#[cfg(feature = "redis")]
pub async fn redis_locks(url: &str) -> leasehold::LockClient {
    let backend = leasehold::RedisBackend::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    leasehold::testing::start(backend).await
}

/// A lock manager (one node) on leasehold's etcd backend at `endpoint`, in `txn` mode.
#[cfg(feature = "etcd")]
pub async fn etcd_locks(endpoint: &str) -> leasehold::LockClient {
    let backend = leasehold::EtcdBackend::builder([endpoint])
        .with_mode(leasehold::EtcdMode::Txn)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {endpoint}: {e}"));
    leasehold::testing::start(backend).await
}
