//! Backend URLs: which store a command talks to, checked before any I/O.

use leasehold::{Error, LockClient, LockManager, RedisBackend};
use redis::IntoConnectionInfo;

/// A store named on the command line.
#[derive(Debug, Clone)]
pub(crate) enum BackendUrl {
    /// `redis://…` or `rediss://…`, passed to the `redis` crate as it is.
    Redis(String),
    /// `etcd://host:port[,host:port…][?mode=txn|lock]`.
    Etcd {
        endpoints: Vec<String>,
        lock_mode: bool,
    },
}

impl BackendUrl {
    /// Parses and checks a URL; the error names it (with any password hidden).
    pub(crate) fn parse(text: &str) -> Result<BackendUrl, String> {
        let shown = hide_password(text);
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            text.into_connection_info()
                .map_err(|e| format!("backend URL {shown:?} is not a valid redis URL: {e}"))?;
            return Ok(BackendUrl::Redis(text.to_owned()));
        }
        let Some(rest) = text.strip_prefix("etcd://") else {
            return Err(format!(
                "backend URL {shown:?} has an unknown scheme (use redis://, rediss:// or etcd://)"
            ));
        };
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let lock_mode = match query {
            "" | "mode=txn" => false,
            "mode=lock" => true,
            other => {
                return Err(format!(
                    "backend URL {shown:?}: unknown option {other:?} (use mode=txn or mode=lock)"
                ))
            }
        };
        let endpoints: Vec<String> = hosts.split(',').map(str::to_owned).collect();
        for endpoint in &endpoints {
            let port = endpoint
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(_))) if !host.is_empty()) {
                return Err(format!(
                    "backend URL {shown:?}: endpoint {endpoint:?} is not host:port"
                ));
            }
        }
        if cfg!(not(feature = "etcd")) {
            return Err(format!(
                "backend URL {shown:?} needs leasehold built with the `etcd` feature"
            ));
        }
        Ok(BackendUrl::Etcd {
            endpoints,
            lock_mode,
        })
    }

    /// Connects and starts a lock manager on the store.
    ///
    /// The manager holds back more of each ttl than a library user's default: when the lease
    /// is lost, `run` still has to signal another process, and that process to stop, before
    /// the store's lease ends, and a loaded machine can take tens of milliseconds for that.
    pub(crate) async fn connect(&self) -> Result<LockClient, Error> {
        let builder = LockManager::builder()
            .with_name(format!("leasehold-cli-{}", std::process::id()))
            .with_clock_drift(CLI_CLOCK_DRIFT);
        let builder = match self {
            BackendUrl::Redis(url) => {
                builder.with_backend("redis", RedisBackend::connect(url).await?)
            }
            BackendUrl::Etcd {
                endpoints,
                lock_mode,
            } => etcd(builder, endpoints, *lock_mode).await?,
        };
        builder.start().await
    }
}

#[cfg(feature = "etcd")]
async fn etcd(
    builder: leasehold::LockManagerBuilder,
    endpoints: &[String],
    lock_mode: bool,
) -> Result<leasehold::LockManagerBuilder, Error> {
    let mode = if lock_mode {
        leasehold::EtcdMode::Lock
    } else {
        leasehold::EtcdMode::Txn
    };
    let backend = leasehold::EtcdBackend::connect(endpoints)
        .await?
        .with_mode(mode);
    Ok(builder.with_backend("etcd", backend))
}

#[cfg(not(feature = "etcd"))]
async fn etcd(
    _: leasehold::LockManagerBuilder,
    _: &[String],
    _: bool,
) -> Result<leasehold::LockManagerBuilder, Error> {
    unreachable!("etcd URLs are refused when parsed without the etcd feature")
}

/// `redis://user:secret@host` → `redis://user:***@host`, for error messages.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) if credentials.contains(':') => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// The share of each ttl `run` holds back (the library's default is 0.01): 100 ms of a 2 s
/// lease, 1.5 s of a 30 s one.
const CLI_CLOCK_DRIFT: f64 = 0.05;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_any_io() {
        assert!(matches!(
            BackendUrl::parse("redis://127.0.0.1:6379/2"),
            Ok(BackendUrl::Redis(_))
        ));
        for (bad, named) in [
            ("http://x", "unknown scheme"),
            ("redis://:6379:bad", "not a valid redis URL"),
            ("etcd://hostonly", "\"hostonly\" is not host:port"),
            ("etcd://h:1?mode=fast", "mode=fast"),
        ] {
            let err = BackendUrl::parse(bad).unwrap_err();
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        let err = BackendUrl::parse("redis://u:s3cret@h:notaport").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
