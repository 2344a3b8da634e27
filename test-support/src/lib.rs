//! The servers leasehold's tests, benches and tools run against: a real `redis-server`
//! ([`RedisServer`]), a Sentinel-watched primary with two replicas ([`RedisSentinel`]), a
//! Redis Cluster of three primaries and three replicas ([`RedisCluster`]), real `etcd` members
//! ([`EtcdServer`], [`EtcdCluster`]) and a real PostgreSQL ([`PostgresServer`], for the
//! fenced-write tests), each started on free loopback ports with a temp dir of its own, ready (answering) when `start` returns, and
//! stopped by pid when dropped. A server that does not start panics with its log; a missing
//! binary panics with the Debian package to install. Fault tests stop, pause (SIGSTOP) and
//! restart them.
//!
//! Also the resource a lock protects in the safety tests: [`Register`], one integer behind a
//! fence, served over TCP so holders in other processes use it too; and the checker of what
//! the safety tests record ([`safety`]: holds, by the holders' and the store's account, and
//! the violations they show). And certificates for TLS tests ([`tls::certificates`]).
//!
//! A workspace crate of its own (as redis-rs has `redis-test`), a dev-dependency of
//! `leasehold` and of the workspace's tools; never published. Features `redis` and `etcd` add
//! the `backend()` helpers that connect a leasehold backend to a server.

pub mod etcd_server;
pub mod postgres_server;
pub mod redis_cluster;
pub mod redis_sentinel;
pub mod redis_server;
pub mod register;
pub mod resp;
pub mod safety;
pub mod tls;

pub use etcd_server::{EtcdCluster, EtcdServer};
pub use postgres_server::PostgresServer;
pub use redis_cluster::RedisCluster;
pub use redis_sentinel::RedisSentinel;
pub use redis_server::RedisServer;
pub use register::{Op, OpKind, Register, RegisterClient, Stale};
