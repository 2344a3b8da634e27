//! The backend's way to its Redis, for each form of deployment: the connection the scripts
//! run on, and where pub/sub connections are opened.
//!
//! - One server (or a proxy): the `redis` crate's [`ConnectionManager`], which reconnects to
//!   that address by itself; pub/sub connections from its [`Client`].
//! - Sentinel: the primary the sentinels name, looked up again after a failover (see
//!   `sentinel.rs`).
//! - Cluster: the `redis` crate's cluster connection, which routes each script to its slot's
//!   primary; pub/sub connections on one of the primaries (see `cluster.rs`).
//!
//! Either way, opening one loads the scripts (proving the server answers and accepted the
//! AUTH and SELECT) within [`CONNECT_TIMEOUT`](super::CONNECT_TIMEOUT).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, Value,
};
use tokio::time::timeout;

use super::cluster::{self, ClusterSetup, MakeBuilder};
use super::notices::{Listener, NoticeHub};
use super::sentinel::{self, SentinelPrimary};
use super::{
    hide_password, is_transient, store_error, RedisBackend, CONNECT_TIMEOUT, DEFAULT_PREFIX,
    SCRIPTS,
};
use crate::error::{Error, Result, StoreError};

/// The constructors.
impl RedisBackend {
    /// Connects to the deployment `url` names:
    ///
    /// - `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS when a `redis`
    ///   TLS feature is on: one server, through the `redis` crate's own URL parsing;
    /// - `redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/master-name[/db]`, or
    ///   `rediss+sentinel://`: the primary the sentinels at those addresses (port 26379 when
    ///   left out) name `master-name`, followed across failovers (see
    ///   [`connect_sentinel`](Self::connect_sentinel)); the user and password are the data
    ///   servers';
    /// - `redis+cluster://[[user]:password@]host:port[,host:port…]`, or `rediss+cluster://`:
    ///   a Redis Cluster, of which these are some nodes (see
    ///   [`connect_cluster`](Self::connect_cluster)).
    ///
    /// A malformed URL is rejected before any I/O with [`Error::InvalidConfig`] naming it (its
    /// password hidden). A deployment that cannot be reached, or does not answer within
    /// [`CONNECT_TIMEOUT`], gives a retryable [`Error::Store`] naming its address.
    pub async fn connect(url: &str) -> Result<Self> {
        match parse(url)? {
            Target::Server(info) => Self::connect_info(info).await,
            Target::Sentinel(parsed) => {
                let describe = format!(
                    "master {:?} of sentinels {}",
                    parsed.master,
                    parsed.sentinels.join(",")
                );
                let client = parsed.client().map_err(|error| malformed(url, &error))?;
                Self::connect_sentinel_as(client, describe).await
            }
            Target::Cluster(nodes) => {
                let describe = format!("the cluster of {}", hide_password(url));
                let make = move || cluster::builder(nodes.clone());
                Self::connect_cluster_as(Box::new(make), describe).await
            }
        }
    }

    /// Checks a URL of any form [`connect`](Self::connect) takes, without any I/O: the
    /// [`Error::InvalidConfig`] it would fail with, if any (e.g. for a command line that
    /// checks its arguments before it connects).
    pub fn check_url(url: &str) -> Result<()> {
        match parse(url)? {
            Target::Server(_) => Ok(()),
            Target::Sentinel(parsed) => parsed
                .client()
                .map(drop)
                .map_err(|error| malformed(url, &error)),
            Target::Cluster(nodes) => cluster::client(nodes)
                .map(drop)
                .map_err(|error| malformed(url, &error)),
        }
    }

    /// Connects with the `redis` crate's own connection settings (address, AUTH, DB, TLS,
    /// protocol).
    pub async fn connect_info(info: ConnectionInfo) -> Result<Self> {
        Self::connect_with_config(info, default_config()).await
    }

    /// Connects with the `redis` crate's connection settings and its connection-manager
    /// settings (reconnection backoff, connection and response timeouts). The default is the
    /// `redis` crate's, except: 3 reconnection retries at most a second apart (so a call during
    /// an outage fails within a lease's deadline rather than after it), and a 2 s response
    /// timeout.
    pub async fn connect_with_config(
        info: ConnectionInfo,
        config: ConnectionManagerConfig,
    ) -> Result<Self> {
        let addr = info.addr().to_string();
        let client = Client::open(info).map_err(|error| {
            Error::InvalidConfig(format!("redis connection to {addr} is invalid: {error}"))
        })?;
        let connecting = ConnectionManager::new_with_config(client.clone(), config.clone());
        let conn = match timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => Conn::Server {
                conn,
                setup: Arc::new(ServerSetup { client, config }),
            },
            Ok(Err(error)) => {
                return Err(Error::Store {
                    backend: "redis".to_owned(),
                    source: store_error(format!("cannot connect to redis at {addr}"), error),
                })
            }
            Err(_) => {
                return Err(Error::Store {
                    backend: "redis".to_owned(),
                    source: StoreError::unavailable(format!(
                        "redis at {addr} did not answer within {CONNECT_TIMEOUT:?}"
                    )),
                })
            }
        };
        Ok(Self::on(conn.establish(&addr).await?, addr))
    }

    /// Connects to the primary a Sentinel deployment names, through the `redis` crate's own
    /// [`SentinelClient`] (built with [`SentinelClient::build`] or
    /// [`SentinelClientBuilder`](redis::sentinel::SentinelClientBuilder) for sentinels with
    /// their own password, TLS certificates and the like), which must be built with
    /// [`SentinelServerType::Master`](redis::sentinel::SentinelServerType::Master): a client
    /// for replicas is refused with [`Error::InvalidConfig`].
    ///
    /// The backend follows failovers by itself: a call that fails as a failover would make it
    /// fail (the connection broke, `READONLY`, …) is a retryable error, and the next call asks
    /// the sentinels for the primary again; release notices move to the new primary with the
    /// next subscription. Replication is asynchronous, so a failover can lose a lock taken
    /// just before it: see [`with_replica_ack`](Self::with_replica_ack).
    pub async fn connect_sentinel(client: SentinelClient) -> Result<Self> {
        Self::connect_sentinel_as(client, "a Sentinel deployment's primary".to_owned()).await
    }

    async fn connect_sentinel_as(client: SentinelClient, describe: String) -> Result<Self> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let primary = SentinelPrimary::new(client, describe.clone(), config);
        let conn = Conn::Sentinel(Arc::new(primary));
        Ok(Self::on(conn.establish(&describe).await?, describe))
    }

    /// Connects to a Redis Cluster through the `redis` crate's cluster connection, given some
    /// of its nodes (it learns the others). Every node takes the settings of the first (user,
    /// password, TLS). Slot migrations (`MOVED`, `ASK`) and failovers are followed by the
    /// cluster connection; a call that fails meanwhile is a retryable error. The connection
    /// times out a reply after 2 s and a connection attempt after 10 s, and retries a call 3
    /// times. A list without a node is [`Error::InvalidConfig`], before any I/O.
    pub async fn connect_cluster(nodes: impl IntoIterator<Item = ConnectionInfo>) -> Result<Self> {
        let nodes: Vec<ConnectionInfo> = nodes.into_iter().collect();
        let Some(first) = nodes.first() else {
            return Err(Error::InvalidConfig(
                "a Redis Cluster needs at least one node to connect to; the list is empty"
                    .to_owned(),
            ));
        };
        let describe = format!("the cluster of {}", first.addr());
        Self::connect_cluster_as(Box::new(move || cluster::builder(nodes.clone())), describe).await
    }

    /// Connects to a Redis Cluster with the `redis` crate's own cluster settings: `make`
    /// returns a [`ClusterClientBuilder`] (nodes, credentials, TLS certificates, timeouts,
    /// retries), called once for the connection the scripts run on and once for each sharded
    /// pub/sub connection, which the backend sets to RESP3 with a push sender of its own. The
    /// builder's own defaults apply (see [`connect_cluster`](Self::connect_cluster) for
    /// leasehold's): keep the response timeout under the lock manager's operation budget.
    /// Do not turn on `read_from_replicas`: a lease read from a replica may be stale.
    pub async fn connect_cluster_with(
        make: impl Fn() -> ClusterClientBuilder + Send + Sync + 'static,
    ) -> Result<Self> {
        Self::connect_cluster_as(Box::new(make), "a Redis Cluster".to_owned()).await
    }

    async fn connect_cluster_as(make: Box<MakeBuilder>, describe: String) -> Result<Self> {
        let client = make().build().map_err(|error| {
            Error::InvalidConfig(format!("redis cluster {describe} is invalid: {error}"))
        })?;
        let conn = match timeout(CONNECT_TIMEOUT, client.get_async_connection()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                return Err(Error::Store {
                    backend: "redis".to_owned(),
                    source: store_error(format!("cannot connect to redis at {describe}"), error),
                })
            }
            Err(_) => {
                return Err(Error::Store {
                    backend: "redis".to_owned(),
                    source: StoreError::unavailable(format!(
                        "redis at {describe} did not answer within {CONNECT_TIMEOUT:?}"
                    )),
                })
            }
        };
        let conn = Conn::Cluster {
            conn,
            setup: Arc::new(ClusterSetup { make }),
        };
        Ok(Self::on(conn.establish(&describe).await?, describe))
    }

    /// A backend with the default settings on an established connection.
    fn on(conn: Conn, addr: String) -> Self {
        RedisBackend {
            notices: Arc::new(NoticeHub::new(conn.clone(), addr)),
            conn,
            prefix: DEFAULT_PREFIX.into(),
            quarantine: Duration::ZERO,
            replica_ack: None,
        }
    }
}

/// The connection-manager settings [`RedisBackend::connect_info`] uses.
fn default_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        // A call made while the connection is down waits for the reconnection: a few quick
        // retries keep that wait inside a lease's deadline.
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(1))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// How long a call waits for the server's answer: under the lock manager's 5 s operation
/// budget, so a server that stopped answering shows up as a store error first; well above any
/// busy server's reply time, since an acquire the client stopped waiting for may still have
/// been applied.
pub(super) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `redis` crate's client for the server a URL names now: the server of a `redis://` or
/// `rediss://` URL, or the primary the sentinels of a `redis+sentinel://` URL name (checked to
/// answer as a primary). For tools that talk to that server directly, such as
/// `leasehold doctor`. A malformed URL is [`Error::InvalidConfig`], before any I/O.
pub async fn primary_client(url: &str) -> Result<Client> {
    match parse(url)? {
        Target::Server(info) => Client::open(info).map_err(|error| malformed(url, &error)),
        Target::Sentinel(parsed) => {
            let mut sentinel = parsed.client().map_err(|error| malformed(url, &error))?;
            let shown = hide_password(url);
            match timeout(CONNECT_TIMEOUT, sentinel.async_get_client()).await {
                Ok(Ok(client)) => Ok(client),
                Ok(Err(error)) => Err(Error::Store {
                    backend: "redis".to_owned(),
                    source: store_error(format!("the sentinels of {shown}"), error),
                }),
                Err(_) => Err(Error::Store {
                    backend: "redis".to_owned(),
                    source: StoreError::unavailable(format!(
                        "the sentinels of {shown} named no primary within {CONNECT_TIMEOUT:?}"
                    )),
                }),
            }
        }
        Target::Cluster(_) => Err(Error::InvalidConfig(format!(
            "{} names a Redis Cluster, which has a primary per shard, not one",
            hide_password(url)
        ))),
    }
}

/// What a URL names.
enum Target {
    Server(ConnectionInfo),
    Sentinel(sentinel::SentinelUrl),
    Cluster(Vec<ConnectionInfo>),
}

fn parse(url: &str) -> Result<Target> {
    if sentinel::SCHEMES
        .iter()
        .any(|scheme| url.starts_with(scheme))
    {
        let parsed = sentinel::parse_url(url).map_err(|why| malformed(url, &why))?;
        return Ok(Target::Sentinel(parsed));
    }
    if cluster::SCHEMES
        .iter()
        .any(|scheme| url.starts_with(scheme))
    {
        let nodes = cluster::parse_url(url).map_err(|why| malformed(url, &why))?;
        return Ok(Target::Cluster(nodes));
    }
    let info = url
        .into_connection_info()
        .map_err(|error| malformed(url, &error))?;
    Ok(Target::Server(info))
}

fn malformed(url: &str, error: &dyn fmt::Display) -> Error {
    Error::InvalidConfig(format!(
        "redis URL {:?} is malformed: {error}",
        hide_password(url)
    ))
}

/// The connection the lock scripts run on. Cheap to clone: clones share it. It is cloned for
/// every call, so everything but the connection itself is behind an `Arc`.
#[derive(Clone)]
pub(super) enum Conn {
    /// One server.
    Server {
        conn: ConnectionManager,
        setup: Arc<ServerSetup>,
    },
    /// The primary the sentinels name.
    Sentinel(Arc<SentinelPrimary>),
    /// A Redis Cluster.
    Cluster {
        conn: ClusterConnection,
        setup: Arc<ClusterSetup>,
    },
}

/// What opens more connections to one server like the first (see [`Conn::another`] and
/// [`Conn::pubsub`]). Its client's connection settings hold strings: shared, not copied on
/// every call.
pub(super) struct ServerSetup {
    client: Client,
    config: ConnectionManagerConfig,
}

impl Conn {
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster { .. })
    }

    /// A dedicated pub/sub connection: one in SUBSCRIBE mode can run nothing but
    /// (un)subscribe commands, so it cannot be the multiplexed one the scripts use.
    pub(super) async fn pubsub(&self) -> RedisResult<PubSub> {
        match self {
            Conn::Server { setup, .. } => setup.client.get_async_pubsub().await,
            Conn::Sentinel(primary) => primary.pubsub().await,
            Conn::Cluster { .. } => Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "classic pub/sub is not used on Redis Cluster",
            ))),
        }
    }

    /// A connection of its own subscribed to `channels`, as a stream of their messages that
    /// ends when the connection breaks (on a cluster, sharded pub/sub: see `cluster.rs`).
    pub(super) async fn messages_on(
        &self,
        channels: &[String],
    ) -> RedisResult<futures::stream::BoxStream<'static, redis::Msg>> {
        match self {
            Conn::Cluster { setup, .. } => {
                let mut sharded = setup.sharded().await?;
                sharded.conn.ssubscribe(channels).await?;
                Ok(sharded.into_messages())
            }
            _ => {
                let mut pubsub = self.pubsub().await?;
                pubsub.subscribe(channels).await?;
                Ok(pubsub.into_on_message().boxed())
            }
        }
    }

    /// The release-notice task's connection: classic pub/sub on one server, sharded pub/sub
    /// on a cluster.
    pub(super) async fn listener(&self) -> RedisResult<Listener> {
        match self {
            Conn::Cluster { setup, .. } => Ok(Listener::Sharded(setup.sharded().await?)),
            _ => {
                let (sink, stream) = self.pubsub().await?.split();
                Ok(Listener::Plain(sink, stream))
            }
        }
    }

    /// Another connection to the same deployment, of the same kind and settings, opened now
    /// (see `replica_ack.rs` for why).
    pub(super) async fn another(&self) -> RedisResult<Conn> {
        match self {
            Conn::Server { setup, .. } => {
                let (client, config) = (setup.client.clone(), setup.config.clone());
                let conn = ConnectionManager::new_with_config(client, config);
                let conn = match timeout(CONNECT_TIMEOUT, conn).await {
                    Ok(conn) => conn?,
                    Err(_) => {
                        return Err(RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting took over {CONNECT_TIMEOUT:?}"),
                        )))
                    }
                };
                Ok(Conn::Server {
                    conn,
                    setup: Arc::clone(setup),
                })
            }
            Conn::Sentinel(primary) => Ok(Conn::Sentinel(Arc::new(primary.another()))),
            // Replica acknowledgement, the one user of this, is refused on a cluster.
            Conn::Cluster { .. } => Ok(self.clone()),
        }
    }

    /// Checks that the deployment answers: loads the scripts, and on Sentinel checks the
    /// named server is a primary. `addr` names it in errors.
    pub(super) async fn establish(self, addr: &str) -> Result<Conn> {
        let mut conn = self;
        let cluster = conn.is_cluster();
        let checking = async {
            // Loading the scripts now spares the first calls a NOSCRIPT round trip, and proves
            // the server answers and accepted our AUTH and SELECT.
            if cluster {
                // The cluster connection sends SCRIPT LOAD to every node, one at a time (not
                // in a pipeline, which it would send to one node). Every cluster node is a
                // primary or a replica the cluster itself keeps: there is no role to check.
                for lua in SCRIPTS {
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(lua.code(true))
                        .query_async::<String>(&mut conn)
                        .await?;
                }
                return Ok::<_, RedisError>(Value::Array(vec![Value::BulkString(
                    b"master".to_vec(),
                )]));
            }
            let mut load = redis::pipe();
            for lua in SCRIPTS {
                load.cmd("SCRIPT").arg("LOAD").arg(lua.code(false));
            }
            load.query_async::<Vec<String>>(&mut conn).await?;
            // A SentinelClient built for replicas would send every write to a replica.
            let role: Value = redis::cmd("ROLE").query_async(&mut conn).await?;
            Ok::<_, RedisError>(role)
        };
        match timeout(CONNECT_TIMEOUT, checking).await {
            Ok(Ok(role)) => match role {
                Value::Array(ref items) if matches!(items.first(), Some(Value::BulkString(role)) if role == b"master") => {
                    Ok(conn)
                }
                other => Err(Error::InvalidConfig(format!(
                    "redis at {addr} is not a primary (ROLE answered {other:?}); a \
                     SentinelClient must be built with SentinelServerType::Master"
                ))),
            },
            Ok(Err(error)) => {
                let source = if is_transient(&error) {
                    StoreError::unavailable_because(
                        format!("cannot connect to redis at {addr}"),
                        error,
                    )
                } else {
                    StoreError::protocol_because(format!("redis at {addr} refused us"), error)
                };
                Err(Error::Store {
                    backend: "redis".to_owned(),
                    source,
                })
            }
            Err(_) => Err(Error::Store {
                backend: "redis".to_owned(),
                source: StoreError::unavailable(format!(
                    "redis at {addr} did not answer within {CONNECT_TIMEOUT:?}"
                )),
            }),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Server { conn, .. } => conn.req_packed_command(cmd),
            Conn::Sentinel(primary) => async move { primary.send(cmd).await }.boxed(),
            Conn::Cluster { conn, .. } => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Server { conn, .. } => conn.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(primary) => {
                async move { primary.send_pipeline(pipeline, offset, count).await }.boxed()
            }
            Conn::Cluster { conn, .. } => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Server { conn, .. } => conn.get_db(),
            Conn::Sentinel(primary) => primary.db(),
            Conn::Cluster { .. } => 0,
        }
    }
}

/// Runs an idempotent call (renew, release: compare-and-set) once more when its connection
/// turned out to be dropped, which is how the first call after a failover finds out: the
/// second goes over a new connection (on Sentinel, to the new primary). Had the first one
/// reached the server after all, the second finds the same state and answers the same, except
/// that a release then answers "not ours", which the key actor reports as a loss.
pub(super) async fn twice_if_dropped<T, F, Fut>(mut call: F) -> redis::RedisResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    match call().await {
        Err(error) if error.is_connection_dropped() => call().await,
        other => other,
    }
}
