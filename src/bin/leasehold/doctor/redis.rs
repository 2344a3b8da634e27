//! `doctor` on Redis: `INFO`, `CONFIG GET`, `TIME` and `PING` on one connection.
//!
//! What decides lock safety on Redis (see `backend/redis.rs` for the key layout):
//! - a held lock is a key with a ttl (`P{K}`), its fence counter a key without one
//!   (`P{K}:fence`): an eviction policy that removes keys with a ttl frees held locks;
//! - a restart that loses the data frees every held lock at once;
//! - replicas acknowledge writes asynchronously: a failover can promote one that never saw an
//!   acquisition;
//! - Redis times key expiry on its own wall clock.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::redis::aio::MultiplexedConnection;
use ::redis::Value;
use leasehold::backend::redis::{primary_client, DEFAULT_PREFIX};

use super::{bounded, latency, Finding};

pub(crate) async fn check(url: &str, ttl: Duration) -> Vec<Finding> {
    let mut conn = match connect(url).await {
        Ok(conn) => conn,
        Err(why) => {
            return vec![Finding::danger(
                "connection",
                why,
                "check the URL, that the server runs, and that this host may reach it",
            )]
        }
    };
    let info = match bounded("INFO", cmd(&mut conn, ::redis::cmd("INFO"))).await {
        Ok(Value::BulkString(text)) => parse_info(&String::from_utf8_lossy(&text)),
        Ok(Value::VerbatimString { text, .. }) => parse_info(&text),
        Ok(other) => {
            return vec![Finding::danger(
                "connection",
                format!("INFO answered {other:?}"),
                "is this a Redis server?",
            )]
        }
        Err(why) => return vec![Finding::danger("connection", why, "")],
    };
    let mut findings = vec![version(&info)];
    // CONFIG may be renamed or refused (managed services): fall back to what INFO says.
    let config = config_get(&mut conn).await;
    findings.push(eviction(&info));
    let quarantine = epoch_exists(&mut conn).await;
    findings.push(persistence(&info, config.as_ref().ok(), quarantine));
    findings.push(replication(&info));
    findings.push(clock(&mut conn).await);
    findings.push(round_trips(&mut conn, ttl).await);
    if let Err(why) = config {
        findings.push(Finding::warning(
            "config",
            why,
            "CONFIG GET is refused here: the save schedule and appendfsync were not checked",
        ));
    }
    findings
}

async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    // A Sentinel URL: the primary its sentinels name now.
    let client = primary_client(url)
        .await
        .map_err(|e| format!("the URL is not usable: {e}"))?;
    bounded("connect", client.get_multiplexed_async_connection()).await
}

async fn cmd(conn: &mut MultiplexedConnection, cmd: ::redis::Cmd) -> ::redis::RedisResult<Value> {
    cmd.query_async(conn).await
}

/// `INFO`'s `key:value` lines (all sections in one map; `#` headers skipped).
fn parse_info(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

async fn config_get(conn: &mut MultiplexedConnection) -> Result<HashMap<String, String>, String> {
    let mut config = HashMap::new();
    for name in ["save", "appendonly", "appendfsync"] {
        let pair: Vec<String> = bounded(
            &format!("CONFIG GET {name}"),
            ::redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async::<Vec<String>>(conn),
        )
        .await?;
        if let [key, value] = pair.as_slice() {
            config.insert(key.clone(), value.clone());
        }
    }
    Ok(config)
}

/// Whether leasehold's restart quarantine has marked this server (`<prefix>epoch`, default
/// prefix).
async fn epoch_exists(conn: &mut MultiplexedConnection) -> bool {
    bounded(
        "EXISTS",
        ::redis::cmd("EXISTS")
            .arg(format!("{DEFAULT_PREFIX}epoch"))
            .query_async::<i64>(conn),
    )
    .await
    .is_ok_and(|n| n > 0)
}

fn version(info: &HashMap<String, String>) -> Finding {
    const CHECK: &str = "version";
    let Some(version) = info.get("redis_version") else {
        return Finding::warning(CHECK, "INFO does not say the version", "");
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major_minor = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let found = format!("redis {version}");
    if major_minor < (2, 6) {
        Finding::danger(
            CHECK,
            found,
            "leasehold runs Lua scripts, which need Redis 2.6 or later: upgrade",
        )
    } else if major_minor < (6, 2) {
        Finding::warning(
            CHECK,
            found,
            "the restart quarantine (RedisBackend::with_restart_quarantine) uses SET … GET, \
             which needs Redis 6.2: upgrade before turning it on",
        )
    } else {
        Finding::ok(CHECK, found)
    }
}

fn eviction(info: &HashMap<String, String>) -> Finding {
    const CHECK: &str = "maxmemory-policy";
    let policy = info
        .get("maxmemory_policy")
        .map(String::as_str)
        .unwrap_or("unknown");
    let maxmemory: u64 = info
        .get("maxmemory")
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let limit = if maxmemory == 0 {
        "no maxmemory".to_owned()
    } else {
        format!("maxmemory {maxmemory} bytes")
    };
    let found = format!("{policy}, {limit}");
    let fix = "CONFIG SET maxmemory-policy noeviction (and in redis.conf): a full server then \
               refuses new acquisitions, loudly, instead of freeing held ones";
    let evicts_locks = policy.starts_with("allkeys-") || policy.starts_with("volatile-");
    match (evicts_locks, maxmemory) {
        (false, _) if policy == "noeviction" => Finding::ok(CHECK, found),
        (false, _) => Finding::warning(CHECK, found, "an unknown policy: use noeviction"),
        (true, 0) => Finding::warning(
            CHECK,
            format!("{found}: nothing is evicted until a maxmemory is set"),
            fix,
        ),
        // allkeys-* evicts any key: held locks and fence counters alike. volatile-* evicts
        // only keys with a ttl, and every held lock key has one (its lease), so it is exactly
        // the held locks that go; the fence counters, without a ttl, stay.
        (true, _) if policy.starts_with("allkeys-") => Finding::danger(
            CHECK,
            format!("{found}: under memory pressure Redis deletes any key, held locks and fence counters included, and a deleted lock is granted again"),
            fix,
        ),
        (true, _) => Finding::danger(
            CHECK,
            format!("{found}: under memory pressure Redis deletes keys that have a ttl, and every held lock key has one (its lease), so held locks are granted again"),
            fix,
        ),
    }
}

fn persistence(
    info: &HashMap<String, String>,
    config: Option<&HashMap<String, String>>,
    quarantine: bool,
) -> Finding {
    const CHECK: &str = "persistence";
    let aof = info.get("aof_enabled").is_some_and(|v| v == "1")
        || config
            .and_then(|c| c.get("appendonly"))
            .is_some_and(|v| v == "yes");
    let save = config.and_then(|c| c.get("save")).cloned();
    let fsync = config
        .and_then(|c| c.get("appendfsync"))
        .cloned()
        .unwrap_or_else(|| "unknown".to_owned());
    let quarantine_advice =
        "or give every node RedisBackend::with_restart_quarantine(longest ttl), \
                             which holds every key for that long after the server lost its data";
    if aof {
        return match fsync.as_str() {
            "always" => Finding::ok(CHECK, "appendonly yes, appendfsync always"),
            "no" => Finding::warning(
                CHECK,
                "appendonly yes, appendfsync no: a crash of the machine loses the writes the \
                 kernel had not flushed (up to about 30 s), held locks among them",
                format!("CONFIG SET appendfsync everysec (or always), {quarantine_advice}"),
            ),
            other => Finding::ok(
                CHECK,
                format!("appendonly yes, appendfsync {other} (a machine crash can lose the last second of acquisitions)"),
            ),
        };
    }
    let snapshots = save.as_deref().is_some_and(|s| !s.trim().is_empty());
    let quarantined = if quarantine {
        format!("; the restart quarantine is in use ({DEFAULT_PREFIX}epoch exists), which covers a restart")
    } else {
        String::new()
    };
    if snapshots {
        Finding::warning(
            CHECK,
            format!(
                "appendonly no, RDB snapshots ({}): a restart goes back to the last snapshot and \
                 forgets the locks taken since, which can then be granted again (fence counters \
                 are re-seeded from the server's clock, so tokens still increase){quarantined}",
                save.unwrap_or_default()
            ),
            format!("CONFIG SET appendonly yes, {quarantine_advice}"),
        )
    } else if quarantine {
        Finding::warning(
            CHECK,
            format!("appendonly no and no save schedule: a restart forgets every held lock{quarantined}"),
            "CONFIG SET appendonly yes, so that a restart does not have to hold every key for the quarantine",
        )
    } else if save.is_none() {
        Finding::warning(
            CHECK,
            "appendonly no; the save schedule is unknown (CONFIG GET refused)",
            format!("turn on appendonly, {quarantine_advice}"),
        )
    } else {
        Finding::danger(
            CHECK,
            "appendonly no and no save schedule: a restart forgets every held lock, and each \
             can be granted to a second holder while the first still works under it (fence \
             counters are re-seeded from the server's clock, so tokens still increase)",
            format!("CONFIG SET appendonly yes (and in redis.conf), {quarantine_advice}"),
        )
    }
}

fn replication(info: &HashMap<String, String>) -> Finding {
    const CHECK: &str = "replication";
    let role = info.get("role").map(String::as_str).unwrap_or("unknown");
    if role == "slave" || role == "replica" {
        let primary = format!(
            "{}:{}",
            info.get("master_host").map(String::as_str).unwrap_or("?"),
            info.get("master_port").map(String::as_str).unwrap_or("?")
        );
        return Finding::danger(
            CHECK,
            format!("this server is a replica of {primary}: acquisitions fail on it (read-only), or are local to it"),
            format!("point leasehold at the primary ({primary}), or at Sentinel"),
        );
    }
    let replicas: u64 = info
        .get("connected_slaves")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if replicas == 0 {
        return Finding::ok(CHECK, format!("role {role}, no replicas"));
    }
    Finding::warning(
        CHECK,
        format!(
            "role {role} with {replicas} replica(s), which acknowledge writes asynchronously: a \
             failover can promote a replica that never saw an acquisition, and grant that lock \
             a second time"
        ),
        "unless failover is manual, make acquisitions wait for replica acknowledgement (WAIT) \
         before they count (RedisBackend::with_replica_ack with the number of replicas), or \
         take locks on a Redis without automatic failover",
    )
}

/// The server's wall clock against this host's, from `TIME`, corrected by half the round trip.
async fn clock(conn: &mut MultiplexedConnection) -> Finding {
    const CHECK: &str = "clock";
    let before = SystemTime::now();
    let sent = Instant::now();
    let time = bounded("TIME", ::redis::cmd("TIME").query_async::<(u64, u64)>(conn)).await;
    let round_trip = sent.elapsed();
    let (seconds, micros) = match time {
        Ok(time) => time,
        Err(why) => return Finding::warning(CHECK, why, ""),
    };
    let server = Duration::from_secs(seconds) + Duration::from_micros(micros);
    let here = before.duration_since(UNIX_EPOCH).unwrap_or_default() + round_trip / 2;
    let (offset, direction) = if server >= here {
        (server - here, "ahead of")
    } else {
        (here - server, "behind")
    };
    let found = format!("the server's clock is {offset:.1?} {direction} this host's");
    if offset <= Duration::from_millis(500) {
        Finding::ok(CHECK, found)
    } else {
        Finding::warning(
            CHECK,
            found,
            "run NTP (chrony, systemd-timesyncd) on both: Redis times key expiry on its wall \
             clock, so a server clock stepped forward ends leases early, and fence counters \
             lost with the data are re-seeded from it",
        )
    }
}

async fn round_trips(conn: &mut MultiplexedConnection, ttl: Duration) -> Finding {
    let mut samples = Vec::with_capacity(super::LATENCY_SAMPLES);
    for _ in 0..super::LATENCY_SAMPLES {
        let sent = Instant::now();
        if let Err(why) = bounded("PING", ::redis::cmd("PING").query_async::<String>(conn)).await {
            return Finding::danger("latency", why, "");
        }
        samples.push(sent.elapsed());
    }
    latency(&samples, ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn eviction_policies_that_free_held_locks_are_dangerous() {
        use super::super::Severity::*;
        for (policy, maxmemory, severity) in [
            ("noeviction", "0", Ok),
            ("noeviction", "1000000", Ok),
            ("allkeys-lru", "0", Warning),
            ("allkeys-lru", "1000000", Danger),
            ("volatile-ttl", "1000000", Danger),
            ("volatile-lfu", "0", Warning),
        ] {
            let finding = eviction(&info(&[
                ("maxmemory_policy", policy),
                ("maxmemory", maxmemory),
            ]));
            assert_eq!(
                finding.severity, severity,
                "{policy} {maxmemory}: {finding:?}"
            );
        }
    }

    #[test]
    fn versions_are_compared_by_number() {
        use super::super::Severity::*;
        for (version, severity) in [
            ("7.0.15", Ok),
            ("6.2.0", Ok),
            ("6.0.9", Warning),
            ("2.4.1", Danger),
            ("10.1.0", Ok),
        ] {
            let finding = super::version(&info(&[("redis_version", version)]));
            assert_eq!(finding.severity, severity, "{version}");
        }
    }
}
