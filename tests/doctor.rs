//! `leasehold doctor` against real servers, configured well and badly: the built binary, as a
//! user runs it.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use leasehold_test_support::{EtcdCluster, EtcdServer, RedisSentinel, RedisServer};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// A server that keeps what it is told (append-only file, fsync on every write) and never
/// evicts.
const SAFE_REDIS: [&str; 6] = [
    "--appendonly",
    "yes",
    "--appendfsync",
    "always",
    "--maxmemory-policy",
    "noeviction",
];

fn doctor(url: &str) -> (Output, Value) {
    let out = Command::new(BIN)
        .args(["doctor", "--json", "--backend", url])
        .output()
        .expect("run leasehold doctor");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

/// The finding of one check, by name.
fn finding<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check:?} finding in {report:#}"))
}

fn severity<'a>(report: &'a Value, check: &str) -> &'a str {
    finding(report, check)["severity"].as_str().unwrap()
}

#[test]
fn a_safe_redis_has_nothing_dangerous_and_exits_0() {
    let server = RedisServer::start_with_args(&SAFE_REDIS);
    let (out, report) = doctor(&server.url());
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["dangerous"], false);
    for check in [
        "version",
        "maxmemory-policy",
        "persistence",
        "replication",
        "clock",
    ] {
        assert_eq!(severity(&report, check), "ok", "{report:#}");
    }
    assert!(finding(&report, "version")["found"]
        .as_str()
        .unwrap()
        .starts_with("redis "));
}

#[test]
fn eviction_policies_that_can_free_held_locks_are_dangerous() {
    for policy in ["allkeys-lru", "volatile-ttl"] {
        let server = RedisServer::start_with_args(&[
            "--appendonly",
            "yes",
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            policy,
        ]);
        let (out, report) = doctor(&server.url());
        assert_eq!(out.status.code(), Some(1), "{policy}: {report:#}");
        let eviction = finding(&report, "maxmemory-policy");
        assert_eq!(eviction["severity"], "danger", "{policy}: {report:#}");
        assert!(eviction["found"].as_str().unwrap().contains(policy));
        assert!(eviction["advice"].as_str().unwrap().contains("noeviction"));
        assert_eq!(severity(&report, "persistence"), "ok");
    }
}

#[test]
fn redis_without_persistence_is_dangerous_and_the_text_says_what_to_change() {
    // The test servers' default: no append-only file, no snapshots.
    let server = RedisServer::start();
    let (out, report) = doctor(&server.url());
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let persistence = finding(&report, "persistence");
    assert_eq!(persistence["severity"], "danger");
    assert!(persistence["advice"]
        .as_str()
        .unwrap()
        .contains("with_restart_quarantine"));

    let out = Command::new(BIN)
        .args(["doctor", "--backend", &server.url()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("DANGER   persistence"), "{text}");
    assert!(text.contains("→ CONFIG SET appendonly yes"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_restart_quarantine_makes_a_redis_without_persistence_a_warning() {
    use leasehold::{LockBackend, OwnerToken};

    let server = RedisServer::start();
    // A node with the quarantine marks the server (`leasehold:epoch`) on its first attempt.
    let backend = server
        .backend()
        .await
        .with_restart_quarantine(Duration::from_secs(1));
    backend
        .acquire("doctor", OwnerToken::random(), Duration::from_secs(1), None)
        .await
        .unwrap();
    let url = server.url();
    let (out, report) = tokio::task::spawn_blocking(move || doctor(&url))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let persistence = finding(&report, "persistence");
    assert_eq!(persistence["severity"], "warning", "{report:#}");
    assert!(persistence["found"]
        .as_str()
        .unwrap()
        .contains("quarantine is in use"));
}

#[test]
fn a_redis_that_refuses_config_is_still_checked_from_info() {
    let mut args = SAFE_REDIS.to_vec();
    args.extend(["--rename-command", "CONFIG", ""]);
    let server = RedisServer::start_with_args(&args);
    let (out, report) = doctor(&server.url());
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(severity(&report, "config"), "warning");
    assert_eq!(severity(&report, "maxmemory-policy"), "ok");
    // The append-only file shows in INFO; its fsync policy does not.
    assert!(finding(&report, "persistence")["found"]
        .as_str()
        .unwrap()
        .contains("appendonly yes"));
}

#[test]
fn a_replica_is_dangerous_and_a_primary_with_replicas_is_warned_about() {
    let primary = RedisServer::start_with_args(&SAFE_REDIS);
    let port = primary.port().to_string();
    let mut replica_args = SAFE_REDIS.to_vec();
    replica_args.extend(["--replicaof", "127.0.0.1", &port]);
    let replica = RedisServer::start_with_args(&replica_args);

    let (out, report) = doctor(&replica.url());
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let replication = finding(&report, "replication");
    assert_eq!(replication["severity"], "danger");
    assert!(replication["advice"].as_str().unwrap().contains(&port));

    // The primary counts the replica once it has connected.
    let give_up = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let (out, report) = doctor(&primary.url());
        if severity(&report, "replication") != "ok" {
            assert_eq!(out.status.code(), Some(0), "{report:#}");
            break report;
        }
        assert!(
            Instant::now() < give_up,
            "the replica never connected: {report:#}\n{}",
            replica.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let replication = finding(&report, "replication");
    assert_eq!(replication["severity"], "warning");
    assert!(replication["found"].as_str().unwrap().contains("1 replica"));
}

/// A `redis+sentinel://` URL is checked on the primary the sentinels name: its replicas are
/// found.
#[test]
fn a_sentinel_url_is_checked_on_the_primary_the_sentinels_name() {
    let topology = RedisSentinel::start();
    let (_, report) = doctor(&topology.url());
    let replication = finding(&report, "replication");
    assert_eq!(replication["severity"], "warning", "{report:#}");
    assert!(
        replication["found"].as_str().unwrap().contains("2 replica"),
        "{report:#}"
    );
}

#[test]
fn an_unreachable_redis_is_dangerous() {
    let server = RedisServer::start();
    let url = server.url();
    drop(server);
    let (out, report) = doctor(&url);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(severity(&report, "connection"), "danger");
}

#[test]
fn a_healthy_etcd_member_has_nothing_dangerous() {
    let server = EtcdServer::start();
    let (out, report) = doctor(&format!("etcd://{}", server.endpoint()));
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    for check in [
        "version", "quorum", "leader", "alarms", "db size", "latency",
    ] {
        assert_eq!(severity(&report, check), "ok", "{check}: {report:#}");
    }
    assert!(finding(&report, "leader")["found"]
        .as_str()
        .unwrap()
        .contains(server.name()));
}

#[test]
fn an_etcd_database_near_its_quota_is_dangerous() {
    // A quota below a new database (20 to 32 KiB on etcd 3.4), read from the member. etcd
    // starts anyway: only a write would raise the NOSPACE alarm.
    let server = EtcdServer::start_with_args(&["--quota-backend-bytes", "16384"]);
    let (out, report) = doctor(&format!("etcd://{}", server.endpoint()));
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let size = finding(&report, "db size");
    assert_eq!(size["severity"], "danger", "{report:#}");
    assert!(
        size["found"].as_str().unwrap().contains("16.0 KiB quota"),
        "the quota is read from the member: {report:#}"
    );
}

#[test]
fn an_etcd_cluster_missing_a_member_is_warned_about_and_without_quorum_is_dangerous() {
    let mut cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    cluster.member(2).stop();
    let url = format!("etcd://{}", endpoints[..2].join(","));
    let (out, report) = doctor(&url);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let quorum = finding(&report, "quorum");
    assert_eq!(quorum["severity"], "warning", "{report:#}");
    assert!(quorum["found"].as_str().unwrap().contains("2 of 3"));

    cluster.member(1).stop();
    let url = format!("etcd://{}", endpoints[0]);
    let (out, report) = doctor(&url);
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    assert_eq!(severity(&report, "quorum"), "danger", "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_nospace_alarm_is_dangerous() {
    let server = EtcdServer::start_with_args(&["--quota-backend-bytes", "16384"]);
    // A write over the quota raises NOSPACE, and is refused.
    let mut client = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    let refused = client.put("doctor", vec![0u8; 4096], None).await;
    assert!(refused.is_err(), "a write over the quota was accepted");
    let url = format!("etcd://{}", server.endpoint());
    let (out, report) = tokio::task::spawn_blocking(move || doctor(&url))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{report:#}");
    let alarms = finding(&report, "alarms");
    assert_eq!(alarms["severity"], "danger", "{report:#}");
    assert!(
        alarms["found"]
            .as_str()
            .unwrap()
            .contains("NOSPACE on member"),
        "{report:#}"
    );
}
