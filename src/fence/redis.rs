//! Fenced writes to Redis: the token check and the write in one Lua script.
//!
//! # Keys
//! For a resource key `R` the fence key is `{R}:fence` — or `R:fence` when `R` already has a
//! hash tag (`{…}`) — so on Redis Cluster it lives in `R`'s hash slot and one script may touch
//! both. It holds the newest token that wrote `R`, as decimal digits, and never expires
//! (deleting it lets any token write again, so keep it as long as the resource).
//!
//! # Why a script
//! Redis has one way to make a write depend on a read atomically: a script (`EVALSHA`). A
//! `MULTI`/`EXEC` block cannot branch on the fence's value, and `WATCH` turns every write into
//! two round trips plus retries under contention. So the check and the caller's write are one
//! script: for a plain value, [`RedisFence::set`]; for anything else, the caller writes the
//! body of a Lua script ([`FencedScript`]) and leasehold wraps it in the check. A body rather
//! than a list of commands, because it is what Redis users already write for atomic
//! multi-key updates, it can use the values it reads, and a script is loaded once and then
//! costs one `EVALSHA`.
//!
//! # Tokens
//! Tokens are u64. Lua numbers are doubles (exact below 2^53) and Redis integers signed
//! 64-bit, so the script compares tokens as decimal strings: a shorter string is the smaller
//! token, and of equal length the first differing digit decides.

use std::fmt;
use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{FromRedisValue, RedisError, Script, ToRedisArgs, Value};

use super::{FenceError, StaleToken};

/// What [`FencedScript::new`] puts the caller's body into (see `fence/fenced.lua`).
const WRAPPER_LUA: &str = include_str!("fenced.lua");

/// [`RedisFence::set`]'s script (see `fence/set.lua`).
static SET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("set.lua")));

/// A Redis key protected by fencing tokens: writes to it go through a script that refuses a
/// token older than the newest one that has written it.
///
/// ```no_run
/// # async fn run(guard: leasehold::LockGuard) -> Result<(), Box<dyn std::error::Error>> {
/// use leasehold::{FencedScript, RedisFence};
///
/// let mut conn = redis::Client::open("redis://127.0.0.1:6379")?
///     .get_multiplexed_async_connection()
///     .await?;
/// let balance = RedisFence::new("accounts:42:balance");
/// // A plain value:
/// balance.set(&mut conn, guard.fencing_token(), 100).await?;
/// // Or a script body of your own: KEYS[1] is the resource, then your keys and ARGV.
/// let add = FencedScript::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
/// let total: i64 = balance
///     .run(&mut conn, guard.fencing_token(), &add, &[] as &[&str], &[5])
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisFence {
    key: String,
    fence_key: String,
}

impl RedisFence {
    /// The fence for the Redis key `key` (see the module docs for where its fence key lives).
    pub fn new(key: impl Into<String>) -> Self {
        let key = key.into();
        let fence_key = fence_key(&key);
        RedisFence { key, fence_key }
    }

    /// The protected key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key holding the newest token that wrote [`key`](Self::key).
    pub fn fence_key(&self) -> &str {
        &self.fence_key
    }

    /// `SET key value` if `token` is not older than the newest token that wrote the key, and
    /// records `token` as the newest. An older token gets [`FenceError::Stale`] and writes
    /// nothing.
    pub async fn set<C, V>(
        &self,
        conn: &mut C,
        token: u64,
        value: V,
    ) -> Result<(), FenceError<RedisError>>
    where
        C: ConnectionLike,
        V: ToRedisArgs,
    {
        let reply: Value = SET
            .key(&self.fence_key)
            .key(&self.key)
            .arg(token.to_string())
            .arg(value)
            .invoke_async(conn)
            .await
            .map_err(FenceError::Store)?;
        match reply {
            Value::Int(1) => Ok(()),
            newest => Err(stale(token, newest)),
        }
    }

    /// Runs `script` if `token` is not older than the newest token that wrote the key, and
    /// records `token` as the newest; returns what the body returned. The body sees `KEYS[1]`
    /// = this fence's key, then `keys` as `KEYS[2..]`, and `args` as `ARGV`. An older token
    /// gets [`FenceError::Stale`] and the body does not run.
    ///
    /// Every key the body touches must be in `keys` (Redis Cluster routes by them, and
    /// refuses keys of another slot: give them the resource's hash tag). A body that raises
    /// an error leaves the writes it made before the error (Redis scripts do not roll back),
    /// and the token recorded.
    pub async fn run<C, K, A, T>(
        &self,
        conn: &mut C,
        token: u64,
        script: &FencedScript,
        keys: &[K],
        args: &[A],
    ) -> Result<T, FenceError<RedisError>>
    where
        C: ConnectionLike,
        K: ToRedisArgs,
        A: ToRedisArgs,
        T: FromRedisValue,
    {
        let mut call = script.script.prepare_invoke();
        call.key(&self.fence_key).key(&self.key);
        for key in keys {
            call.key(key);
        }
        call.arg(token.to_string());
        for arg in args {
            call.arg(arg);
        }
        // `invoke_async` runs the script by SHA and loads it first if the server answers
        // NOSCRIPT (a new or restarted server), which means nothing ran.
        let reply: Value = call.invoke_async(conn).await.map_err(FenceError::Store)?;
        let (ran, rest) = match reply {
            Value::Array(mut items) if !items.is_empty() => {
                let ran = items.remove(0);
                (ran, items.into_iter().next())
            }
            other => return Err(FenceError::Store(unexpected(&other))),
        };
        match ran {
            Value::Int(1) => T::from_redis_value(rest.unwrap_or(Value::Nil))
                .map_err(|e| FenceError::Store(e.into())),
            Value::Int(0) => Err(stale(token, rest.unwrap_or(Value::Nil))),
            other => Err(FenceError::Store(unexpected(&other))),
        }
    }

    /// The newest token that has written the key, or `None` if no fenced write has.
    pub async fn newest<C: ConnectionLike>(&self, conn: &mut C) -> Result<Option<u64>, RedisError> {
        let newest: Option<String> = redis::cmd("GET")
            .arg(&self.fence_key)
            .query_async(conn)
            .await?;
        newest
            .map(|newest| {
                newest.parse().map_err(|_| {
                    RedisError::from((
                        redis::ErrorKind::Parse,
                        "fence key does not hold a token",
                        newest,
                    ))
                })
            })
            .transpose()
    }
}

/// The body of a Lua script to run behind a fence ([`RedisFence::run`]).
///
/// Build it once and keep it (a `static` or a field): Redis caches scripts by their SHA, and
/// the first run on a server loads it.
#[derive(Clone)]
pub struct FencedScript {
    script: Script,
}

impl FencedScript {
    /// Wraps `body`, the text of a Lua script as it would be given to `EVAL` (it may
    /// `return` a value), in the fence check. The body runs as a function whose `KEYS` and
    /// `ARGV` are the caller's: `KEYS[1]` is the protected key.
    pub fn new(body: &str) -> Self {
        FencedScript {
            script: Script::new(&WRAPPER_LUA.replace("--BODY--", body)),
        }
    }

    /// The SHA1 Redis knows the wrapped script by.
    pub fn hash(&self) -> &str {
        self.script.get_hash()
    }
}

impl fmt::Debug for FencedScript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FencedScript")
            .field("sha", &self.script.get_hash())
            .finish()
    }
}

/// The fence key of `key`: in `key`'s hash slot on Redis Cluster.
///
/// Cluster hashes the text between the first `{` and the next `}` when that is non-empty,
/// else the whole key. A key with such a tag keeps it under a suffix; a key without one
/// becomes the tag of its fence key, which then hashes exactly as the key does. (A key with
/// no tag but a `}` in it cannot be wrapped that way; its fence key is then `key:fence`,
/// which is right on one server but lands in another slot on Cluster.)
fn fence_key(key: &str) -> String {
    let tagged = key
        .find('{')
        .and_then(|open| key[open + 1..].find('}'))
        .is_some_and(|len| len > 0);
    if tagged || key.contains('}') {
        format!("{key}:fence")
    } else {
        format!("{{{key}}}:fence")
    }
}

/// The refusal of `token`, from the script's answer `newest` (the newest token's digits).
fn stale(token: u64, newest: Value) -> FenceError<RedisError> {
    match String::from_redis_value_ref(&newest)
        .ok()
        .and_then(|digits| digits.parse().ok())
    {
        Some(newest) => FenceError::Stale(StaleToken::new(token, newest)),
        None => FenceError::Store(unexpected(&newest)),
    }
}

fn unexpected(reply: &Value) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected reply from the fenced script",
        format!("{reply:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::fence_key;

    #[test]
    fn fence_key_shares_the_hash_slot() {
        assert_eq!(fence_key("orders:42"), "{orders:42}:fence");
        assert_eq!(fence_key("{user1}:balance"), "{user1}:balance:fence");
        // An empty tag is no tag, and a key with a `}` cannot become a tag: one server only.
        assert_eq!(fence_key("a{}b"), "a{}b:fence");
    }
}
