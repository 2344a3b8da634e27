//! The Redis store: one multiplexed connection per backend for the lock scripts, and one
//! pub/sub connection for release notices.
//!
//! # Keys
//! For the lock key `K` under the prefix `P` (default [`DEFAULT_PREFIX`], `leasehold:`):
//!
//! | name            | Redis type                  | holds                                  |
//! |-----------------|-----------------------------|----------------------------------------|
//! | `P{K}`          | string, expires with lease  | `<owner>[ <metadata>]`                 |
//! | `P{K}:fence`    | string, never expires       | the last fencing token handed out; while `P{K}` exists, its holder's token |
//! | `P{K}:released` | pub/sub channel             | one message on every release           |
//! | `P{K}:acquired` | pub/sub channel             | the new fencing token, on every acquire (not on Redis Cluster) |
//! | `Pepoch`        | string, never expires       | with a restart quarantine only: when the server first served leasehold since it lost its data |
//!
//! The lock key's value is the owner token (32 hex digits), then a space and the metadata if
//! the holder gave any. The holder's fencing token is not in it: only an acquisition that won
//! the lock key advances the fence counter, so while the lock key exists the counter holds
//! its holder's token, and `inspect` reads both together. The braces make `K` the hash tag of
//! both keys, so on Redis Cluster they live in one slot and the acquire script, which touches
//! both, may run there. (A key that begins with `}` has an empty tag, which Cluster ignores;
//! on a single server it makes no difference.)
//!
//! Values written by leasehold 0.1 (`<owner> <token>[ <metadata>]`) are still released and
//! renewed by their owner, but nodes of both versions must not share a prefix: 0.1 looks for
//! `<owner> ` and so cannot release a value of this version without metadata, and 0.1's
//! `inspect` looks for the token in the value.
//!
//! Elections add a queue of candidates and a leader channel beside the lock key: see
//! `redis/election.rs`.
//!
//! # Operations
//! Acquire, release and renew are each one Lua script (the `.lua` files beside this one), which
//! the server runs atomically, in one round trip. The commands each runs:
//!
//! | call    | key free                        | key taken    |
//! |---------|---------------------------------|--------------|
//! | acquire | `SET NX PX`, `INCR`, `PUBLISH`  | `SET NX PX`, `PTTL` |
//! | release | `GET`, `DEL`, `PUBLISH`         | `GET`        |
//! | renew   | `GET`, `PEXPIRE`                | `GET`        |
//! | inspect | `MULTI`, `GET`, `GET`, `PTTL`, `EXEC` | same   |
//!
//! - **acquire**: `SET P{K} "<owner>[ <metadata>]" NX PX ttl`; if that wrote the key, `INCR`
//!   the fence counter, `PUBLISH` the token on the acquisition channel and return it; if the
//!   key is held, return its `PTTL`, which bounds how long a waiter sleeps without a notice.
//!   The first `INCR` of a counter, and counters past 2^53, cost one more command each (see
//!   *Fencing tokens*); a restart quarantine costs `TIME` and `SET NX GET` on every attempt.
//! - **release**: compare the owner token, `DEL` the lock key, `PUBLISH` on the release channel
//!   (the waiters' notice). The fence counter stays.
//! - **renew**: compare the owner token, `PEXPIRE` the lock key.
//! - **inspect** is a read: the lock key, the fence counter and the lock key's `PTTL` in one
//!   `MULTI`/`EXEC`.
//!
//! The acquisition `PUBLISH` is kept although usually nobody listens: an idle `PUBLISH` costs
//! the server a dictionary lookup (about 0.4 µs of a 10 µs script, measured on Redis 7.0), and
//! it is the one way a `watch` sees every acquisition. Publishing only while a watch is
//! registered would need the registration read in the same atomic step as the `SET` (a
//! command of the same cost, on a key outside the lock's hash slot, which Redis Cluster
//! refuses), or a flag cached by the client, which lets an acquisition sent before the watch
//! registered run after it started, unseen.
//!
//! The scripts are loaded with `SCRIPT LOAD` when the backend connects and run by SHA
//! (`EVALSHA`); a server that forgot them (a restart) answers `NOSCRIPT`, and the call loads
//! the script again and repeats, which is safe because `NOSCRIPT` means nothing ran.
//!
//! # Fencing tokens
//! A fencing token must be strictly greater than every token handed out for the key before,
//! even when Redis loses its data (a restart without persistence, a failover to a replica that
//! had not seen the counter): a counter that starts again at 1 would hand out tokens that
//! fenced resources have already accepted. So when the acquire script finds the counter
//! missing (`INCR` answers 1), it seeds it from the server's clock:
//!
//! ```text
//! seed = (milliseconds since the Unix epoch, from TIME) × 1024 + 1
//! ```
//!
//! That leaves 1024 tokens per millisecond of headroom: a new seed exceeds every token issued
//! since the previous one unless the key was taken more than 1024 times a millisecond on
//! average since then (a million times a second, far beyond one Redis server), or the server's
//! clock went back. Tokens therefore look like `1839090626446337` (a key first locked in
//! 2026), not `1, 2, 3`; only their order means anything.
//!
//! The seed stays below 2^53 until the year 2248, so the Lua number `INCR` answers is exact
//! and is returned as it is. A counter at or past 2^53 — seeded by leasehold 0.1, which
//! seeded from microseconds (near 2^61), or by this scheme after 2248 — is read back with
//! `GET` as a string, so every digit stays exact and tokens keep increasing across the
//! upgrade. Redis counters are signed 64-bit integers; 0.1's counters last until about 2255.
//! The counter itself never expires (a few dozen bytes per lock name ever used).
//!
//! On Redis Cluster the scripts publish with `SPUBLISH` and the notices are sharded (see
//! `redis/cluster.rs` and `redis/lua.rs`).
//!
//! # Waiting
//! The backend actor keeps at most one subscription per contended key and node; this backend
//! keeps at most one Redis `SUBSCRIBE` per channel, on one pub/sub connection per backend
//! (shared by clones). A task owns that connection: it is started by the first subscription,
//! subscribes and unsubscribes channels as [`ReleaseNotices`] streams come and go, and is
//! stopped when the last clone of the backend is dropped. If the connection breaks, every
//! stream ends: each waiter looks at its key again at once, and the next subscription
//! connects again (a refused subscription is tried again after a short pause, so a failover
//! does not leave a waiter on its backstop timer). A lease that simply expires publishes
//! nothing; the backstop timer covers that.
//!
//! # Connections
//! Calls go through one multiplexed connection (every call of every clone pipelines onto it,
//! which is faster than a pool of exclusive connections). On one server it is a
//! [`redis::aio::ConnectionManager`], which reconnects by itself; on Sentinel it is a
//! connection to the primary the sentinels name, looked up again after a failure a failover
//! explains (`redis/sentinel.rs`). Configuration passes straight through the `redis` crate's
//! own types: a URL or a [`redis::ConnectionInfo`] (AUTH, DB, and TLS when the application
//! turns on one of the `redis` crate's TLS features), optionally a
//! [`redis::aio::ConnectionManagerConfig`], or a [`redis::sentinel::SentinelClient`]. The
//! constructors and the connection code are in `redis/connection.rs`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::{ErrorKind, RedisError, RedisResult, Script, ServerErrorKind, Value};
use tokio::time::timeout;

use crate::backend::{
    Acquisition, Contention, Lease, LockBackend, LockInfo, OwnerToken, ReleaseNotices, StoreEvent,
    StoreEventKind, StoreEvents,
};
use crate::error::StoreError;

mod cluster;
mod connection;
mod election;
mod lua;
mod notices;
mod replica_ack;
mod rwlock;
mod semaphore;
mod sentinel;

pub use connection::primary_client;
use connection::{twice_if_dropped, Conn};
use lua::Lua;
use notices::NoticeHub;
use replica_ack::{Call, ReplicaAck};

/// The key prefix used unless [`RedisBackend::with_prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "leasehold:";

/// The longest the constructors wait for the server to answer before giving up with a
/// retryable error.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The budget for one step on the pub/sub connection (connect, `SUBSCRIBE`, `UNSUBSCRIBE`).
const PUBSUB_TIMEOUT: Duration = Duration::from_secs(5);

static ACQUIRE: Lua = Lua::new(include_str!("redis/acquire.lua"));
static RELEASE: Lua = Lua::new(include_str!("redis/release.lua"));
static RENEW: Lua = Lua::new(include_str!("redis/renew.lua"));

/// The scripts loaded when the backend connects.
static SCRIPTS: [&Lua; 3] = [&ACQUIRE, &RELEASE, &RENEW];

/// Locks on a Redis server, as the module documentation describes.
///
/// It connects to one server (or a proxy in front of several), or to the primary of a
/// Sentinel deployment ([`connect_sentinel`](Self::connect_sentinel)). Its keys are laid out
/// for Redis Cluster (one hash tag per lock), but it does not speak the cluster protocol
/// itself.
///
/// Clones share one connection and one pub/sub connection, so two
/// [`LockManager`](crate::LockManager)s given clones act as two nodes on one Redis; two
/// backends connected separately are two clients of it.
///
/// ```no_run
/// # async fn run() -> Result<(), leasehold::Error> {
/// use leasehold::{LockManager, RedisBackend};
///
/// let redis = RedisBackend::connect("redis://127.0.0.1:6379")
///     .await?
///     .with_prefix("billing:locks:");
/// let locks = LockManager::builder()
///     .with_backend("redis", redis)
///     .start()
///     .await?;
/// # locks.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    conn: Conn,
    prefix: Arc<str>,
    /// See [`RedisBackend::with_restart_quarantine`]; zero when off.
    quarantine: Duration,
    /// See [`RedisBackend::with_replica_ack`].
    replica_ack: Option<ReplicaAck>,
    notices: Arc<NoticeHub>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("addr", &self.notices.addr)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Puts this backend's keys under `prefix` instead of [`DEFAULT_PREFIX`]. Two backends on
    /// one server with different prefixes never see each other's locks.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().into();
        self
    }

    /// Keeps locks exclusive across a Redis restart that loses the data (no persistence, or a
    /// `FLUSHALL`): for `quarantine` after the server first serves leasehold again, every key
    /// answers as held, so no one is granted a key whose holder has not yet learned that its
    /// lease is gone. Set it to the longest ttl any node uses on this server; every node must
    /// set it. The price is that wait, once after each data loss, and on a new server's first
    /// start. Off by default.
    ///
    /// It relies on one server-wide key (`<prefix>epoch`), so it is for a single server, not
    /// Redis Cluster.
    pub fn with_restart_quarantine(mut self, quarantine: Duration) -> Self {
        self.quarantine = quarantine;
        self
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The name of the Redis key that holds `key`'s lock (its fence counter and release channel
    /// add a suffix to it).
    pub fn lock_key(&self, key: &str) -> String {
        format!("{}{{{key}}}", self.prefix)
    }

    /// Every key matching `pattern` (`SCAN`; on a cluster, on every primary). A key may come
    /// more than once.
    async fn scan(&self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut conn = self.conn.clone();
        if let Conn::Cluster { conn, .. } = &conn {
            return cluster::scan(conn, pattern).await;
        }
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }

    /// `lua` in the form this deployment runs (see `redis/lua.rs`).
    fn script<'a>(&self, lua: &'a Lua) -> &'a Script {
        lua.on(self.conn.is_cluster())
    }

    /// A failed call as a [`StoreError`] naming the operation and the server.
    fn failed(&self, op: &str, error: RedisError) -> StoreError {
        store_error(format!("redis {op} at {}", self.notices.addr), error)
    }
}

#[async_trait]
impl LockBackend for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn acquire(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let lock = self.lock_key(key);
        // "<owner>[ <metadata>]": built here, so the script only writes it.
        let value = match metadata {
            Some(metadata) => format!("{owner} {metadata}"),
            None => owner.to_string(),
        };
        let mut call = Call {
            keys: vec![lock.clone(), format!("{lock}:fence")],
            args: vec![
                value.into_bytes(),
                millis(ttl).to_string().into_bytes(),
                u64::try_from(self.quarantine.as_millis())
                    .unwrap_or(u64::MAX)
                    .to_string()
                    .into_bytes(),
                // Only a watch listens, and a cluster has none (sharded pub/sub has no
                // patterns): there, nothing is published.
                if self.conn.is_cluster() {
                    Vec::new()
                } else {
                    format!("{lock}:acquired").into_bytes()
                },
            ],
        };
        if !self.quarantine.is_zero() {
            call.keys.push(format!("{}epoch", self.prefix));
        }
        // EVALSHA, with a reload on NOSCRIPT (see the module docs); with replica
        // acknowledgement, WAIT after it, and a lock too few replicas confirm is given back.
        let (reply, unconfirmed) = self
            .run_acked(self.script(&ACQUIRE), &call, "acquire")
            .await?;
        match answer("acquire", reply)? {
            Answer::Token(token) => {
                let lease = Lease::new(key, owner, token);
                if let Some(error) = unconfirmed {
                    return Err(self.undone(error, self.release(&lease)).await);
                }
                Ok(Acquisition::Acquired(lease))
            }
            Answer::Refused(held) => match held.as_slice() {
                [Value::Int(pttl)] => Ok(Acquisition::Held(Contention::with_remaining_ttl(
                    remaining(*pttl),
                ))),
                _ => Err(unexpected("acquire", &Value::Array(held))),
            },
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        if lease.permits.is_some() {
            return self.renew_permits(lease, ttl).await;
        }
        if let Some(mode) = lease.rw {
            return self.renew_rw(lease, mode, ttl).await;
        }
        let lock = self.lock_key(&lease.key);
        let call = Call {
            keys: vec![lock],
            args: vec![
                lease.owner.to_string().into_bytes(),
                millis(ttl).to_string().into_bytes(),
            ],
        };
        if self.replica_ack.is_none() {
            return twice_if_dropped(|| async {
                call.invocation(self.script(&RENEW))
                    .invoke_async(&mut self.conn.clone())
                    .await
            })
            .await
            .map_err(|error| self.failed("renew", error));
        }
        let (reply, unconfirmed) = self.run_acked(self.script(&RENEW), &call, "renew").await?;
        renewed("renew", reply, unconfirmed)
    }

    async fn release(&self, lease: &Lease) -> Result<bool, StoreError> {
        if lease.permits.is_some() {
            return self.release_permits(lease).await;
        }
        if let Some(mode) = lease.rw {
            return self.release_rw(lease, mode).await;
        }
        let lock = self.lock_key(&lease.key);
        let channel = format!("{lock}:released");
        let owner = lease.owner.to_string();
        twice_if_dropped(|| async {
            self.script(&RELEASE)
                .key(&lock)
                .arg(&owner)
                .arg(&channel)
                .invoke_async(&mut self.conn.clone())
                .await
        })
        .await
        .map_err(|error| self.failed("release", error))
    }

    async fn inspect(&self, key: &str) -> Result<Option<LockInfo>, StoreError> {
        let lock = self.lock_key(key);
        // MULTI/EXEC, so the value, the token and the ttl describe the same holder. While the
        // lock key exists its holder's token is the fence counter: only an acquisition that
        // won the key advances it.
        let (value, token, pttl): (Option<Vec<u8>>, Option<Vec<u8>>, i64) = redis::pipe()
            .atomic()
            .get(&lock)
            .get(format!("{lock}:fence"))
            .pttl(&lock)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|error| self.failed("inspect", error))?;
        // PTTL -2: no key. -1: a key without expiry, which only another client can have written.
        let remaining_ttl = match pttl {
            -2 => return Ok(None),
            -1 => Duration::MAX,
            pttl => remaining(pttl).unwrap_or_default(),
        };
        let Some(value) = value else {
            return Ok(None);
        };
        // "<owner>[ <metadata>]". A key some other client wrote shows the counter's last token
        // if leasehold ever used the name, 0 if not.
        let value = String::from_utf8_lossy(&value);
        let metadata = value
            .split_once(' ')
            .map(|(_, metadata)| metadata.to_owned());
        let fencing_token = match token {
            Some(token) => parse_token(&token)?,
            None => 0,
        };
        Ok(Some(LockInfo {
            key: key.to_owned(),
            fencing_token,
            remaining_ttl,
            metadata,
        }))
    }

    async fn campaign(
        &self,
        name: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: &str,
    ) -> Result<Acquisition, StoreError> {
        self.campaign_in_queue(name, candidate, ttl, value).await
    }

    async fn withdraw(&self, name: &str, candidate: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_from_queue(name, candidate).await
    }

    fn supports_fair(&self) -> bool {
        true
    }

    async fn acquire_fair(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.acquire_in_queue(key, owner, ttl, metadata).await
    }

    async fn proclaim(&self, lease: &Lease, value: &str) -> Result<bool, StoreError> {
        self.proclaim_value(lease, value).await
    }

    async fn observe(&self, name: &str) -> Result<crate::backend::LeaderChanges, StoreError> {
        self.observe_leader(name).await
    }

    async fn acquire_permits(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: crate::backend::Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.take_permits(name, owner, ttl, permits, metadata, false)
            .await
    }

    fn supports_fair_permits(&self) -> bool {
        true
    }

    async fn acquire_permits_fair(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: crate::backend::Permits,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        self.take_permits(name, owner, ttl, permits, metadata, true)
            .await
    }

    async fn withdraw_permits(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_permit_waiter(name, owner).await
    }

    async fn subscribe_permits(
        &self,
        name: &str,
        _seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        self.subscribe_to_permits(name).await
    }

    async fn permit_holders(
        &self,
        name: &str,
    ) -> Result<Vec<crate::backend::PermitHolder>, StoreError> {
        self.holders_of(name).await
    }

    async fn acquire_rw(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: crate::backend::RwMode,
        intent: bool,
        _metadata: Option<&str>,
    ) -> Result<crate::backend::Acquisition, StoreError> {
        self.take_rw(name, owner, ttl, mode, intent, false).await
    }

    fn supports_fair_rw(&self) -> bool {
        true
    }

    async fn acquire_rw_fair(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: crate::backend::RwMode,
        _metadata: Option<&str>,
    ) -> Result<crate::backend::Acquisition, StoreError> {
        self.take_rw(name, owner, ttl, mode, false, true).await
    }

    async fn withdraw_rw_waiter(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_rw_place(name, owner).await
    }

    async fn withdraw_writer(&self, name: &str, owner: OwnerToken) -> Result<(), StoreError> {
        self.withdraw_rw_intent(name, owner).await
    }

    async fn subscribe_rw(
        &self,
        name: &str,
        _seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        self.subscribe_to_rw(name).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<LockInfo>, StoreError> {
        // SCAN for the lock keys `P{K}` whose K starts with `prefix` (the pattern's closing
        // brace leaves out the `P{K}:fence` counters), then `inspect` each: a key may be
        // released between the two, and then it is not listed.
        let pattern = format!("{}{{{}*}}", glob_escape(&self.prefix), glob_escape(prefix));
        let lock_prefix = format!("{}{{", self.prefix);
        let mut keys: Vec<String> = self
            .scan(&pattern)
            .await
            .map_err(|error| self.failed("list", error))?;
        keys.retain_mut(|lock| {
            let Some(key) = lock
                .strip_prefix(&lock_prefix)
                .and_then(|rest| rest.strip_suffix('}'))
                .filter(|key| key.starts_with(prefix))
            else {
                return false;
            };
            *lock = key.to_owned();
            true
        });
        // SCAN may return a key more than once.
        keys.sort();
        keys.dedup();
        let mut held = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(info) = self.inspect(&key).await? {
                held.push(info);
            }
        }
        Ok(held)
    }

    async fn subscribe(&self, key: &str, _seen: &Contention) -> Result<ReleaseNotices, StoreError> {
        let channel = format!("{}:released", self.lock_key(key));
        Ok(self.notices.subscribe(channel).await?.boxed())
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<StoreEvents, StoreError> {
        // Every acquire publishes its token on `P{K}:acquired` and every release publishes on
        // `P{K}:released`, so two PSUBSCRIBE patterns see every key under the prefix. A watch
        // is a monitoring tool: it gets a pub/sub connection of its own, closed with the
        // stream. An expiry publishes nothing, so a watch does not see one.
        if self.conn.is_cluster() {
            // Sharded pub/sub, which a cluster's notices use, has no patterns.
            return Err(StoreError::Unsupported {
                store: "redis cluster",
                op: "watch (sharded pub/sub has no pattern subscriptions)",
            });
        }
        let opening = async {
            let mut pubsub = self.conn.pubsub().await?;
            let pattern = format!("{}{{{}*}}:", glob_escape(&self.prefix), glob_escape(prefix));
            pubsub
                .psubscribe(&[format!("{pattern}acquired"), format!("{pattern}released")])
                .await?;
            Ok::<_, RedisError>(pubsub)
        };
        let pubsub = match timeout(PUBSUB_TIMEOUT, opening).await {
            Ok(pubsub) => pubsub.map_err(|error| self.failed("watch", error))?,
            Err(_) => {
                return Err(StoreError::TimedOut {
                    op: "watch",
                    after: PUBSUB_TIMEOUT,
                })
            }
        };
        let lock_prefix = format!("{}{{", self.prefix);
        let events = pubsub.into_on_message().filter_map(move |message| {
            let event = store_event(&lock_prefix, &message);
            async move { event }
        });
        Ok(events.boxed())
    }
}

/// The key and event of a message on an acquisition or release channel.
fn store_event(lock_prefix: &str, message: &redis::Msg) -> Option<StoreEvent> {
    let channel = message.get_channel_name().strip_prefix(lock_prefix)?;
    let (key, kind) = if let Some(key) = channel.strip_suffix("}:acquired") {
        let token = std::str::from_utf8(message.get_payload_bytes()).ok()?;
        let fencing_token = token.parse().ok()?;
        (key, StoreEventKind::Acquired { fencing_token })
    } else {
        (
            channel.strip_suffix("}:released")?,
            StoreEventKind::Released,
        )
    };
    Some(StoreEvent {
        key: key.to_owned(),
        kind,
    })
}

/// Escapes the characters PSUBSCRIBE patterns give a meaning to.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Redis takes whole milliseconds. Rounding up keeps the store's lease at least as long as the
/// one the holder counts on.
fn millis(ttl: Duration) -> u64 {
    let millis = ttl.as_micros().div_ceil(1000).max(1);
    u64::try_from(millis).unwrap_or(u64::MAX)
}

/// A `PTTL` reply as a remaining lease: -1 (no expiry) and -2 (no key) have none.
fn remaining(pttl: i64) -> Option<Duration> {
    u64::try_from(pttl).ok().map(Duration::from_millis)
}

fn parse_token(token: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(token)
        .ok()
        .and_then(|token| token.parse().ok())
        .ok_or_else(|| {
            StoreError::protocol(format!(
                "fencing token {:?} is not a number",
                String::from_utf8_lossy(token)
            ))
        })
}

/// What an acquisition script answered.
enum Answer {
    /// Taken, with this token (an integer below 2^53, its digits above).
    Token(u64),
    /// Not taken: an array saying why (what is in it is each script's own).
    Refused(Vec<Value>),
}

fn answer(op: &str, reply: Value) -> Result<Answer, StoreError> {
    match reply {
        Value::Int(token) => u64::try_from(token)
            .map(Answer::Token)
            .map_err(|_| unexpected(op, &Value::Int(token))),
        Value::BulkString(token) => Ok(Answer::Token(parse_token(&token)?)),
        Value::Array(items) => Ok(Answer::Refused(items)),
        other => Err(unexpected(op, &other)),
    }
}

/// A renewal script's reply (1: extended, 0: not ours any more), unless it extended the lease
/// on the primary only, which too few replicas confirmed (`unconfirmed`): not a renewal the
/// holder may count on, so a retryable error.
fn renewed(op: &str, reply: Value, unconfirmed: Option<StoreError>) -> Result<bool, StoreError> {
    match (reply, unconfirmed) {
        (Value::Int(0), _) => Ok(false),
        (Value::Int(1), None) => Ok(true),
        (Value::Int(1), Some(error)) => Err(error),
        (other, _) => Err(unexpected(op, &other)),
    }
}

fn unexpected(op: &str, reply: &Value) -> StoreError {
    StoreError::protocol(format!("redis {op} answered {reply:?}"))
}

/// Sorts a `redis` error into the crate's two classes, keeping it whole: the server could not
/// be reached or did not answer in time, or is briefly unable to serve (loading, failing over)
/// → `Unavailable`, retryable; anything else (a script error, a refused AUTH, a wrong reply) →
/// `Protocol`. `context` names the operation and the address.
fn store_error(context: String, error: RedisError) -> StoreError {
    if is_transient(&error) {
        StoreError::unavailable_because(context, error)
    } else {
        StoreError::protocol_because(context, error)
    }
}

/// Whether trying again may help: see [`store_error`].
fn is_transient(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}

/// The URL with the password of its user-info part replaced, for error messages.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hide_password_hides_only_the_password() {
        assert_eq!(
            hide_password("redis://user:secret@host:6379/2"),
            "redis://user:***@host:6379/2"
        );
        assert_eq!(hide_password("redis://:secret@host"), "redis://:***@host");
        assert_eq!(hide_password("redis://host:6379"), "redis://host:6379");
        assert_eq!(hide_password("not a url"), "not a url");
    }

    #[test]
    fn ttl_rounds_up_to_whole_milliseconds() {
        assert_eq!(millis(Duration::from_micros(1500)), 2);
        assert_eq!(millis(Duration::from_millis(300)), 300);
        assert_eq!(millis(Duration::from_nanos(1)), 1);
    }
}
