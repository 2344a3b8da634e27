//! Distributed locks as [ractor] actors.
//!
//! An application (an actor, or any async code) asks for a lock with a message; leasehold
//! acquires it from a store, keeps it alive, tells the holder the moment it can no longer be
//! trusted, and releases it when the holder is done or dies.
//!
//! ```text
//! LockManager  (supervisor; registered by name)            manager.rs
//!  ├── BackendActor "memory"   waiter queues, one release   backend_actor.rs
//!  │     │                     subscription per key
//!  │     ├── KeyActor "jobs/nightly"  lease, owner token,   key_actor.rs
//!  │     │                             fence, deadline, renewal timer
//!  │     └── KeyActor "orders/42"
//!  └── BackendActor "redis" …
//! ```
//!
//! # Layout
//! - `manager.rs`: [`LockManager`], its builder and [`LockManagerMsg`], the messages actors send.
//! - `backend_actor.rs`: routing per backend, per-key FIFO queues, release subscriptions, the
//!   idle key actors; `backend_ctx.rs`: what a backend's actors share and what outlives a
//!   failed backend actor; `request.rs`: an acquisition request and the reply ports;
//!   `timing.rs`: deadlines and budgets.
//! - `key_actor.rs`: one lease at a time: the acquisition attempt, renewal, loss, release,
//!   holder monitor; its renewal timer in `key_actor/timer.rs`.
//! - `client.rs` and `guard.rs`: [`LockClient`] and [`LockGuard`], the face for async code;
//!   `guard/status.rs`: how a key actor tells its guard about the lease.
//! - `backend.rs`: the [`LockBackend`] trait, the seam to the stores, with one file per store:
//!   `backend/memory.rs` ([`MemoryBackend`]), `backend/redis.rs` (`RedisBackend`, its Lua
//!   scripts and its pub/sub notice hub in `backend/redis/`), `backend/etcd.rs`;
//!   `backend/follow.rs`: leases that follow a shared lease (an etcd session) instead of
//!   being renewed one by one.
//! - `election.rs`: [`Election`], leader election on the same leases: [`Leadership`] for async
//!   code, [`Candidacy`] and [`CandidateMsg`] for candidate actors.
//! - `semaphore.rs`: [`Semaphore`], N permits on the same leases, one lease (and key actor)
//!   per acquisition of one or more permits.
//! - `rwlock.rs`: [`RwLock`], many readers or one writer on the same leases, one lease (and key
//!   actor) per read share or write hold; a waiting writer's intent holds new readers back.
//! - `options.rs`, `event.rs`, `error.rs`: [`LockOptions`], [`LockEvent`], [`Error`];
//!   `metrics.rs`: the same events (and store calls) recorded through the `metrics` facade.
//! - `fence.rs`: the resource side of fencing, [`Fence`] in this process, and token checks
//!   inside the stores people protect, one file per store: `fence/redis.rs` (`RedisFence`),
//!   `fence/etcd.rs` (`EtcdFence`), `fence/postgres.rs` (`PgFence`).
//! - `testing.rs` (feature `testing`): the conformance suite every backend passes.
//! - `cluster.rs` (feature `cluster`): `ClusterGateway`, the manager's face to other
//!   `ractor_cluster` nodes, and the serialisable remote protocol (`cluster/`).
//!
//! # Example
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), leasehold::Error> {
//! use std::time::Duration;
//! use leasehold::{LockManager, LockOptions, MemoryBackend, Wait};
//!
//! let locks = LockManager::builder()
//!     .with_name("crate-doc")
//!     .with_backend("memory", MemoryBackend::new())
//!     .start()
//!     .await?;
//! let opts = LockOptions::new()
//!     .with_ttl(Duration::from_secs(10))
//!     .with_wait(Wait::UpTo(Duration::from_secs(1)));
//! let total = locks.with_lock("ledger", opts, |token| async move {
//!     // Pass `token` to the resource, which rejects older ones (see `Fence`).
//!     token
//! }).await?;
//! assert!(total >= 1);
//! locks.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Cargo features
//! - `redis` (default): `RedisBackend`, on the `redis` crate's multiplexed connection, and
//!   `RedisFence`.
//! - `etcd`: `EtcdBackend`, on `etcd-client`, and `EtcdFence`.
//! - `postgres`: `PgFence`, fenced transactions on `tokio-postgres`.
//! - `testing`: the public conformance suite, `testing`.
//! - `metrics`: counters, histograms and gauges through the [`metrics`](https://docs.rs/metrics)
//!   crate facade, for any of its exporters (the README lists them); install the recorder
//!   before starting the manager. Off, recording compiles to nothing.
//! - `cli`: the `leasehold` command line (`src/bin/leasehold/`).
//! - `cluster`: the `cluster` module (lock messages from other `ractor_cluster` nodes); turns
//!   on ractor's `cluster` feature and gives the message types explicit
//!   `ractor::Message` impls. Turn it on whenever `ractor_cluster` is in the build, since that
//!   removes ractor's blanket impl for every crate.

mod backend_actor;
mod backend_ctx;
mod client;
mod election;
mod error;
mod event;
mod fence;
mod guard;
mod key_actor;
mod manager;
mod metrics;
mod options;
mod request;
mod rwlock;
mod semaphore;
mod task;
mod timing;

pub mod backend;
#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "etcd")]
pub use backend::etcd::{EtcdBackend, EtcdMode};
pub use backend::memory::MemoryBackend;
#[cfg(feature = "redis")]
pub use backend::redis::RedisBackend;
pub use backend::{
    Acquisition, Contention, Leader, LeaderChanges, Lease, LockBackend, LockInfo, OwnerToken,
    PermitHolder, Permits, ReleaseNotices, RwMode, StoreEvent, StoreEventKind, StoreEvents,
};
pub use client::LockClient;
pub use election::{
    CampaignOptions, Candidacy, CandidateMsg, Election, Leadership, Observer,
    MAX_ELECTION_VALUE_LEN,
};
pub use error::{Error, ErrorKind, Result, StoreCause, StoreError, StoreErrorKind};
pub use event::{LockEvent, LockEventKind, LockMetrics, LostReason, ReleaseReason};
#[cfg(feature = "etcd")]
pub use fence::EtcdFence;
#[cfg(feature = "postgres")]
pub use fence::PgFence;
pub use fence::{Fence, FenceError, StaleToken};
#[cfg(feature = "redis")]
pub use fence::{FencedScript, RedisFence};
pub use guard::LockGuard;
pub use manager::{LockManager, LockManagerBuilder, LockManagerMsg, DEFAULT_MANAGER_NAME};
pub use options::{LockOptions, Wait, MAX_KEY_LEN, MAX_METADATA_LEN, MAX_TTL, MIN_TTL};
pub use rwlock::RwLock;
pub use semaphore::{Semaphore, MAX_PERMITS};
