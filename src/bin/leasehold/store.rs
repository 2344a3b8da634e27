//! Backend URLs: which store a command talks to, checked before any I/O.
//!
//! ```text
//! redis://[user:password@]host[:port][/db]       passed to the `redis` crate as it is
//! rediss://…                                     the same over TLS (system roots, or SSL_CERT_FILE)
//! redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/master-name[/db]
//!                                                the primary these sentinels name, followed
//!                                                across failovers (`RedisBackend::connect`)
//! rediss+sentinel://…                            the same over TLS
//! redis+cluster://[[user]:password@]host:port[,host:port…]
//!                                                a Redis Cluster, of which these are some nodes
//! rediss+cluster://…                             the same over TLS
//! etcd://[user:password@]host:port[,host:port…][?mode=txn|lock]
//! etcds://…[?ca=FILE][&cert=FILE&key=FILE]       the same over TLS; a private CA, a client certificate
//! ```

use std::fmt;
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use leasehold::{Error, EtcdBackend, EtcdMode, LockBackend, LockClient, LockManager, RedisBackend};
use redis::IntoConnectionInfo;

/// A store named on the command line.
#[derive(Debug, Clone)]
pub(crate) enum BackendUrl {
    /// `redis://…`, `rediss://…`, `redis+sentinel://…`, `rediss+sentinel://…`,
    /// `redis+cluster://…` or `rediss+cluster://…`, passed to `RedisBackend::connect` as it is.
    Redis(RedisUrl),
    /// `etcd://…` or `etcds://…`.
    Etcd(EtcdUrl),
}

/// A Redis URL; its `Debug` hides the password.
#[derive(Clone)]
pub(crate) struct RedisUrl(String);

impl RedisUrl {
    /// The URL as given, password included, for the `redis` crate.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", hide_password(&self.0))
    }
}

/// An etcd URL, taken apart into etcd-client's settings.
#[derive(Clone)]
pub(crate) struct EtcdUrl {
    /// `host:port`, as etcd-client takes them.
    pub(crate) endpoints: Vec<String>,
    pub(crate) mode: EtcdMode,
    /// User and password, percent-decoded.
    credentials: Option<(String, String)>,
    /// `etcds://`: TLS, with these PEM files read when the URL was parsed.
    tls: Option<EtcdTls>,
    /// The URL with its password hidden, for messages.
    shown: String,
}

#[derive(Clone)]
struct EtcdTls {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for EtcdUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown)
    }
}

impl BackendUrl {
    /// Parses and checks a URL; the error names it (with any password hidden). The PEM files
    /// an `etcds://` URL names are read here, so a wrong path is reported before any network
    /// I/O.
    pub(crate) fn parse(text: &str) -> Result<BackendUrl, String> {
        let shown = hide_password(text);
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            text.into_connection_info()
                .map_err(|e| format!("backend URL {shown:?} is not a valid redis URL: {e}"))?;
            return Ok(BackendUrl::Redis(RedisUrl(text.to_owned())));
        }
        if text.starts_with("redis+sentinel://") || text.starts_with("rediss+sentinel://") {
            RedisBackend::check_url(text).map_err(|e| {
                format!("backend URL {shown:?} is not a valid redis Sentinel URL: {e}")
            })?;
            return Ok(BackendUrl::Redis(RedisUrl(text.to_owned())));
        }
        if text.starts_with("redis+cluster://") || text.starts_with("rediss+cluster://") {
            RedisBackend::check_url(text).map_err(|e| {
                format!("backend URL {shown:?} is not a valid redis Cluster URL: {e}")
            })?;
            return Ok(BackendUrl::Redis(RedisUrl(text.to_owned())));
        }
        let (rest, tls) = if let Some(rest) = text.strip_prefix("etcd://") {
            (rest, false)
        } else if let Some(rest) = text.strip_prefix("etcds://") {
            (rest, true)
        } else {
            return Err(format!(
                "backend URL {shown:?} has an unknown scheme (use redis://, rediss://, redis+sentinel://, rediss+sentinel://, redis+cluster://, rediss+cluster://, etcd:// or etcds://)"
            ));
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((credentials, hosts)) => {
                let (user, password) = credentials.split_once(':').ok_or_else(|| {
                    format!("backend URL {shown:?}: the user needs a password (user:password@)")
                })?;
                let user = percent_decode(user)
                    .map_err(|why| format!("backend URL {shown:?}: the user {why}"))?;
                let password = percent_decode(password)
                    .map_err(|why| format!("backend URL {shown:?}: the password {why}"))?;
                if user.is_empty() {
                    return Err(format!("backend URL {shown:?}: the user is empty"));
                }
                (Some((user, password)), hosts)
            }
            None => (None, authority),
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
        let mut mode = EtcdMode::Txn;
        let mut ca = None;
        let mut cert = None;
        let mut key = None;
        for option in query.split('&').filter(|option| !option.is_empty()) {
            match option.split_once('=') {
                Some(("mode", "txn")) => mode = EtcdMode::Txn,
                Some(("mode", "lock")) => mode = EtcdMode::Lock,
                Some(("ca", path)) if tls => ca = Some(read_pem(&shown, "ca", path)?),
                Some(("cert", path)) if tls => cert = Some(read_pem(&shown, "cert", path)?),
                Some(("key", path)) if tls => key = Some(read_pem(&shown, "key", path)?),
                Some(("ca" | "cert" | "key", _)) => {
                    return Err(format!(
                        "backend URL {shown:?}: {option:?} needs TLS (etcds://)"
                    ))
                }
                _ => {
                    return Err(format!(
                        "backend URL {shown:?}: unknown option {option:?} (use mode=txn|lock, and with etcds:// ca=, cert=, key=)"
                    ))
                }
            }
        }
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(format!(
                    "backend URL {shown:?}: a client certificate needs both cert= and key="
                ))
            }
        };
        Ok(BackendUrl::Etcd(EtcdUrl {
            endpoints,
            mode,
            credentials,
            tls: tls.then_some(EtcdTls { ca, identity }),
            shown,
        }))
    }

    /// The URL with any password hidden.
    pub(crate) fn shown(&self) -> String {
        match self {
            BackendUrl::Redis(url) => hide_password(url.as_str()),
            BackendUrl::Etcd(url) => url.shown.clone(),
        }
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
                builder.with_backend("redis", RedisBackend::connect(url.as_str()).await?)
            }
            BackendUrl::Etcd(url) => builder.with_backend("etcd", url.backend().await?),
        };
        builder.start().await
    }

    /// Connects the store's backend alone, without a lock manager (for reads such as
    /// `status --prefix`).
    pub(crate) async fn backend(&self) -> Result<Box<dyn LockBackend>, Error> {
        Ok(match self {
            BackendUrl::Redis(url) => Box::new(RedisBackend::connect(url.as_str()).await?),
            BackendUrl::Etcd(url) => Box::new(url.backend().await?),
        })
    }
}

impl EtcdUrl {
    /// etcd-client's settings: the library's defaults, plus the URL's user and TLS.
    pub(crate) fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some((user, password)) = &self.credentials {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &self.tls {
            // The system's roots (rustls-native-certs, which also reads SSL_CERT_FILE), and
            // the URL's CA if it names one.
            let mut config = TlsOptions::new().with_native_roots();
            if let Some(ca) = &tls.ca {
                config = config.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(config);
        }
        options
    }

    async fn backend(&self) -> Result<EtcdBackend, Error> {
        EtcdBackend::builder(&self.endpoints)
            .with_connect_options(self.connect_options())
            .with_mode(self.mode)
            .connect()
            .await
    }
}

/// Reads a PEM file named in an `etcds://` URL.
fn read_pem(shown: &str, option: &str, path: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("backend URL {shown:?}: cannot read {option}={path:?}: {e}"))?;
    if !pem.starts_with(b"-----BEGIN") && !String::from_utf8_lossy(&pem).contains("-----BEGIN") {
        return Err(format!(
            "backend URL {shown:?}: {option}={path:?} is not a PEM file"
        ));
    }
    Ok(pem)
}

/// `%40` → `@`, for user names and passwords in URLs.
fn percent_decode(text: &str) -> Result<String, &'static str> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or("has a '%' not followed by two hex digits")?;
            decoded.push(hex);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| "is not UTF-8 once decoded")
}

/// `redis://user:secret@host` → `redis://user:***@host`, for messages.
pub(crate) fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
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
        for good in [
            "redis://127.0.0.1:6379/2",
            "redis+sentinel://10.0.0.1:26379,10.0.0.2/mymaster",
            "rediss+sentinel://:pw@s1:26380/mymaster/2",
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
            "rediss+cluster://:pw@n1:7000",
        ] {
            assert!(
                matches!(BackendUrl::parse(good), Ok(BackendUrl::Redis(_))),
                "{good}"
            );
        }
        for (bad, named) in [
            ("http://x", "unknown scheme"),
            ("redis+sentinel://s1:26379", "no master name"),
            ("redis+sentinel://s1:x/m", "bad port"),
            ("redis+cluster://n1", "has no port"),
            ("redis+cluster://n1:7000/2", "no path"),
            ("redis://:6379:bad", "not a valid redis URL"),
            ("etcd://hostonly", "\"hostonly\" is not host:port"),
            ("etcd://h:1?mode=fast", "mode=fast"),
            ("etcd://h:1?ca=/x.pem", "needs TLS"),
            (
                "etcds://h:1?ca=/no/such/ca.pem",
                "cannot read ca=\"/no/such/ca.pem\"",
            ),
            ("etcd://user@h:1", "needs a password"),
            ("etcd://u:p%zz@h:1", "the password has a '%'"),
        ] {
            let err = BackendUrl::parse(bad).unwrap_err();
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    #[test]
    fn tls_and_credentials_are_accepted() {
        assert!(matches!(
            BackendUrl::parse("rediss://user:pw@redis.example.com:6380/1"),
            Ok(BackendUrl::Redis(_))
        ));
        let Ok(BackendUrl::Etcd(url)) =
            BackendUrl::parse("etcds://root:p%40ss@h1:2379,h2:2379?mode=lock")
        else {
            panic!("etcds URL refused");
        };
        assert_eq!(url.endpoints, ["h1:2379", "h2:2379"]);
        assert_eq!(url.mode, EtcdMode::Lock);
        assert_eq!(
            url.credentials,
            Some(("root".to_owned(), "p@ss".to_owned()))
        );
        assert!(url.tls.is_some());
        assert!(!format!("{url:?}").contains("p%40ss"));
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        let err = BackendUrl::parse("redis://u:s3cret@h:notaport").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        let err = BackendUrl::parse("etcd://u:s3cret@h:1?mode=x").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
