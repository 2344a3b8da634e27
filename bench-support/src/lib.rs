//! What leasehold's benches (`benches/redis.rs`, `benches/etcd.rs`) and its load test
//! (`tools/loadtest`) share, so that both measure the same way against the same peers:
//!
//! - [`harness`]: back-to-back lock+release cycles by many tasks, each contender in short turns
//!   interleaved per round, with throughput, client and server CPU per cycle and (at one task)
//!   the latency of each cycle; and contended handoff.
//! - [`cpu`]: the CPU time of this process and of a server process, and the machine's load.
//! - [`raw_redis`] (feature `redis`): the Redis peers — a plain raw lock (`SET NX PX` and a
//!   compare-and-delete script) and leasehold's own [`RedisBackend`](leasehold::RedisBackend)
//!   called directly, without actors.
//! - [`raw_etcd`] (feature `etcd`): the raw etcd-client making leasehold's calls.
//!
//! A crate apart from `leasehold-test-support` because tests need only the servers, not these
//! clients, their dependencies, or the measuring code; the benches and the tool need both.

pub mod cpu;
pub mod harness;
#[cfg(feature = "etcd")]
pub mod raw_etcd;
#[cfg(feature = "redis")]
pub mod raw_redis;
