//! A Sentinel-watched Redis: the primary is whichever server the sentinels name now.
//!
//! The sentinels are asked through the `redis` crate's own [`SentinelClient`] (built from the
//! URL form below, or given whole by the application), which also checks that the server it
//! names answers `ROLE` as a primary. The backend keeps one multiplexed connection to that
//! primary. A call that fails in a way a failover explains (the connection dropped or timed
//! out, the server refused it, or answered `READONLY`/`MASTERDOWN`/`LOADING`) fails as usual
//! (retryable) and drops that connection, so the next call asks the sentinels again and
//! connects to the primary they name then. Nothing is retried here: an acquire whose reply
//! was lost may have been applied, and the lock manager decides what to do about it (it gives
//! the key back, and a waiting request tries again). Renew and release, which are safe to
//! repeat, are sent once more by the backend when their connection turned out to be dropped,
//! which is how the first call after a failover learns of it.
//!
//! Pub/sub connections (release notices, `watch`, `observe`) are opened on the primary the
//! sentinels name at the time. A failover ends them (Sentinel closes the clients of the
//! servers it reconfigures, and a dead server's connections break): every release-notice
//! stream ends, the waiters look at the key again on their backstop timers, and their next
//! subscription connects to the new primary — without the application doing anything.
//!
//! # URL
//! ```text
//! redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/master-name[/db]
//! rediss+sentinel://…   the same over TLS, to the sentinels and to the servers
//! ```
//! The hosts are the sentinels (port 26379 when left out). The user and password are the
//! data servers' (`AUTH`), not the sentinels'; sentinels with a password of their own, client
//! certificates or other settings need a [`SentinelClient`] built with
//! [`SentinelClientBuilder`](redis::sentinel::SentinelClientBuilder) and
//! [`RedisBackend::connect_sentinel`](super::RedisBackend::connect_sentinel).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection, PubSub};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisConnectionInfo, RedisError, RedisResult,
};
use redis::{TlsMode, Value};
use tokio::time::timeout;

use super::is_transient;

/// The URL schemes of the Sentinel form, plain and TLS.
pub(super) const SCHEMES: [&str; 2] = ["redis+sentinel://", "rediss+sentinel://"];

/// The port of a sentinel the URL names without one.
const SENTINEL_PORT: u16 = 26379;

/// The longest a lookup of the primary (asking the sentinels, checking its role, connecting)
/// may take before the call fails as unavailable.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// What a Sentinel URL says, before any I/O.
#[derive(Debug)]
pub(super) struct SentinelUrl {
    pub(super) sentinels: Vec<String>,
    pub(super) master: String,
    pub(super) node: SentinelNodeConnectionInfo,
}

/// Parses the URL form in the module docs; the error says what is wrong (the caller names
/// the URL, password hidden).
pub(super) fn parse_url(url: &str) -> Result<SentinelUrl, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix(SCHEMES[0]) {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix(SCHEMES[1]) {
        (rest, true)
    } else {
        return Err(format!(
            "the scheme is not {} or {}",
            SCHEMES[0], SCHEMES[1]
        ));
    };
    let (authority, path) = rest
        .split_once('/')
        .ok_or("there is no master name (…/master-name after the sentinels)")?;
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((credentials, hosts)) => (Some(credentials), hosts),
        None => (None, authority),
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',') {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|&port| port > 0)
                    .ok_or_else(|| format!("sentinel {host:?} has a bad port"))?;
                (name, port)
            }
            None => (host, SENTINEL_PORT),
        };
        if name.is_empty() {
            return Err(format!("sentinel {host:?} has no host"));
        }
        let scheme = if tls { "rediss" } else { "redis" };
        sentinels.push(format!("{scheme}://{name}:{port}"));
    }
    let (master, db) = match path.split_once('/') {
        Some((master, db)) => {
            let db = db
                .parse::<i64>()
                .ok()
                .filter(|&db| db >= 0)
                .ok_or_else(|| format!("database {db:?} is not a number"))?;
            (master, db)
        }
        None => (path, 0),
    };
    if master.is_empty() {
        return Err("the master name is empty".to_owned());
    }
    let mut redis = RedisConnectionInfo::default().set_db(db);
    if let Some(credentials) = credentials {
        let (user, password) = match credentials.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (credentials, None),
        };
        let user = percent_decode(user).map_err(|why| format!("the user {why}"))?;
        if !user.is_empty() {
            redis = redis.set_username(user);
        }
        if let Some(password) = password {
            let password = percent_decode(password).map_err(|why| format!("the password {why}"))?;
            redis = redis.set_password(password);
        }
    }
    let mut node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis);
    if tls {
        node = node.set_tls_mode(TlsMode::Secure);
    }
    Ok(SentinelUrl {
        sentinels,
        master: master.to_owned(),
        node,
    })
}

/// `%XX` escapes, as in the `redis` crate's own URLs.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = text
                .get(at + 1..at + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or("has a bad %-escape")?;
            out.push(hex);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8".to_owned())
}

impl SentinelUrl {
    /// The crate's client for the primary these sentinels watch.
    pub(super) fn client(self) -> RedisResult<SentinelClient> {
        SentinelClient::build(
            self.sentinels,
            self.master,
            Some(self.node),
            SentinelServerType::Master,
        )
    }
}

/// The primary the sentinels name, and the backend's one connection to it.
pub(super) struct SentinelPrimary {
    /// Asked again after every failure a failover explains. Its own connections to the
    /// sentinels are cached inside it; the lock also keeps two callers from looking up at once.
    sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
    current: Mutex<Option<Current>>,
    generations: AtomicU64,
    config: AsyncConnectionConfig,
    /// For messages: the master name and the sentinels.
    pub(super) describe: String,
}

#[derive(Clone)]
struct Current {
    /// Which connection this is, so a failure on an old one does not drop a newer one.
    generation: u64,
    conn: MultiplexedConnection,
}

impl SentinelPrimary {
    pub(super) fn new(
        sentinel: SentinelClient,
        describe: String,
        config: AsyncConnectionConfig,
    ) -> Self {
        SentinelPrimary {
            sentinel: Arc::new(tokio::sync::Mutex::new(sentinel)),
            current: Mutex::new(None),
            generations: AtomicU64::new(0),
            config,
            describe,
        }
    }

    /// Another connection to the same primary, through the same sentinels (opened on first
    /// use).
    pub(super) fn another(&self) -> SentinelPrimary {
        SentinelPrimary {
            sentinel: self.sentinel.clone(),
            current: Mutex::new(None),
            // Found before if this one found it: "no primary" is then a failover under way.
            generations: AtomicU64::new(self.generations.load(Ordering::Relaxed)),
            config: self.config.clone(),
            describe: self.describe.clone(),
        }
    }

    fn cached(&self) -> Option<Current> {
        // Every update under this lock is a single assignment: a panic cannot leave it torn.
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The connection to the primary, looked up and opened if there is none.
    async fn connection(&self) -> RedisResult<Current> {
        if let Some(current) = self.cached() {
            return Ok(current);
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another call may have connected while this one waited for the lock.
        if let Some(current) = self.cached() {
            return Ok(current);
        }
        let connecting = async {
            let client = sentinel.async_get_client().await?;
            client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
        };
        let conn = within_lookup(&self.describe, connecting)
            .await
            .map_err(|error| self.in_failover(error))?;
        let current = Current {
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            conn,
        };
        *self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(current.clone());
        Ok(current)
    }

    /// Forgets connection `generation` after a failure a failover explains: the next call
    /// asks the sentinels again.
    fn forget_after(&self, generation: u64, error: &RedisError) {
        if !is_transient(error) {
            return;
        }
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            tracing::info!(primary = %self.describe, %error, "redis primary connection failed; asking the sentinels again");
            *current = None;
        }
    }

    /// A pub/sub connection to the primary the sentinels name now.
    pub(super) async fn pubsub(&self) -> RedisResult<PubSub> {
        let mut sentinel = self.sentinel.lock().await;
        let connecting = async { sentinel.async_get_client().await?.get_async_pubsub().await };
        within_lookup(&self.describe, connecting)
            .await
            .map_err(|error| self.in_failover(error))
    }

    /// "The sentinels name no primary" is what they say while a failover is under way (the
    /// old primary is down, no replica promoted yet): once a primary was found, it is a
    /// retryable I/O error like the failed connection before it. Before that, it is a
    /// configuration error (a wrong master name), and stays one.
    fn in_failover(&self, error: RedisError) -> RedisError {
        let found_before = self.generations.load(Ordering::Relaxed) > 0;
        if found_before && error.kind() == ErrorKind::MasterNameNotFoundBySentinel {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!(
                    "the sentinels name no primary for {} now: {error}",
                    self.describe
                ),
            ))
        } else {
            error
        }
    }

    pub(super) async fn send(&self, cmd: &Cmd) -> RedisResult<Value> {
        let mut current = self.connection().await?;
        let result = current.conn.req_packed_command(cmd).await;
        if let Err(error) = &result {
            self.forget_after(current.generation, error);
        }
        result
    }

    pub(super) async fn send_pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let mut current = self.connection().await?;
        let result = current
            .conn
            .req_packed_commands(pipeline, offset, count)
            .await;
        if let Err(error) = &result {
            self.forget_after(current.generation, error);
        }
        result
    }

    pub(super) fn db(&self) -> i64 {
        self.cached().map_or(0, |current| current.conn.get_db())
    }
}

/// `lookup` within [`LOOKUP_TIMEOUT`], or an I/O timeout error naming `what`.
async fn within_lookup<T>(
    what: &str,
    lookup: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    match timeout(LOOKUP_TIMEOUT, lookup).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("looking up and connecting to {what} took over {LOOKUP_TIMEOUT:?}"),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_names_sentinels_master_and_db() {
        let url = parse_url("redis+sentinel://:p%40ss@a:1,b/mymaster/3").unwrap();
        assert_eq!(url.sentinels, ["redis://a:1", "redis://b:26379"]);
        assert_eq!(url.master, "mymaster");
        let url = parse_url("rediss+sentinel://a/m").unwrap();
        assert_eq!(url.sentinels, ["rediss://a:26379"]);
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, why) in [
            ("redis+sentinel://a:1", "no master name"),
            ("redis+sentinel://a:1/", "master name is empty"),
            ("redis+sentinel://a:x/m", "bad port"),
            ("redis+sentinel://,a/m", "has no host"),
            ("redis+sentinel://a/m/x", "database"),
            ("redis+sentinel://u:%zz@a/m", "bad %-escape"),
        ] {
            let error = parse_url(url).unwrap_err();
            assert!(error.contains(why), "{url}: {error}");
        }
    }
}
