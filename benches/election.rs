//! Election handovers, on memory, Redis and etcd (`lock` mode, the Election layout), each
//! server started by this bench on free loopback ports.
//!
//! Run: `cargo bench --features redis,etcd --bench election` (about a minute), or with
//! `LEASEHOLD_BENCH_QUICK=1` (or `-- --quick`) for fewer runs.
//!
//! - Resign: a leader on one node resigns while a candidate on another node waits; the time
//!   from the `resign()` call to the candidate's `campaign()` returning. Median and p99.
//! - Failover: the leader is another OS process (this bench binary again, in the role
//!   `leader`), killed with SIGKILL; the time from the kill to the waiting candidate being
//!   elected, against the leader's ttl. Median and max. (The leader renews every ttl/3, so
//!   its lease has between 2/3 ttl and a full ttl left at the kill.)
//!
//! Not criterion: each sample is one handover, and the figures are medians of those.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use leasehold::{CampaignOptions, LockBackend, LockClient, LockManager, MemoryBackend, Wait};
use leasehold_test_support::{EtcdServer, RedisServer};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(1);

fn options() -> CampaignOptions {
    CampaignOptions::new()
        .with_ttl(TTL)
        .with_wait(Wait::UpTo(Duration::from_secs(30)))
}

async fn node<B: LockBackend>(name: &str, backend: B) -> LockClient {
    LockManager::builder()
        .with_name(name)
        .with_backend("store", backend)
        .start()
        .await
        .expect("manager starts")
}

/// `runs` resignations from a leader on `a` to a candidate waiting on `b`.
async fn resign(a: &LockClient, b: &LockClient, runs: usize) -> Vec<Duration> {
    let name = format!("bench-resign-{:x}", rand::random::<u64>());
    let (ea, eb) = (a.election(&name).unwrap(), b.election(&name).unwrap());
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let leader = ea.campaign("a", options()).await.unwrap();
        let mut events = b.events();
        let eb2 = eb.clone();
        let waiting = tokio::spawn(async move {
            let l = eb2.campaign("b", options()).await.unwrap();
            (Instant::now(), l)
        });
        // The candidate is in line (its attempt found the leader) before the resignation.
        loop {
            let event = events.recv().await.unwrap();
            if matches!(event.kind, leasehold::LockEventKind::Contended) {
                break;
            }
        }
        let resigned_at = Instant::now();
        leader.resign().await.unwrap();
        let (elected_at, next) = waiting.await.unwrap();
        samples.push(elected_at - resigned_at);
        next.resign().await.unwrap();
    }
    samples
}

/// `runs` failovers from a leader process (killed) to a candidate here.
async fn failover(url: &str, client: &LockClient, runs: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let name = format!("bench-failover-{:x}", rand::random::<u64>());
        let mut leader = Command::new(std::env::current_exe().unwrap())
            .env("LEASEHOLD_BENCH_ROLE", "leader")
            .env("LEASEHOLD_BENCH_STORE", url)
            .env("LEASEHOLD_BENCH_NAME", &name)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(leader.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "leading");
        let election = client.election(&name).unwrap();
        let mut events = client.events();
        let waiting = tokio::spawn(async move {
            let l = election.campaign("here", options()).await.unwrap();
            (Instant::now(), l)
        });
        loop {
            let event = events.recv().await.unwrap();
            if matches!(event.kind, leasehold::LockEventKind::Contended) {
                break;
            }
        }
        // Let the leader renew at least once, so its lease is not fresh at the kill.
        tokio::time::sleep(TTL / 2).await;
        let killed_at = Instant::now();
        leader.kill().unwrap();
        let _ = leader.wait();
        let (elected_at, next) = waiting.await.unwrap();
        samples.push(elected_at - killed_at);
        next.resign().await.unwrap();
    }
    samples
}

/// The `leader` role: campaign on the store named by the environment, say so, hold forever.
async fn lead() {
    let url = std::env::var("LEASEHOLD_BENCH_STORE").unwrap();
    let name = std::env::var("LEASEHOLD_BENCH_NAME").unwrap();
    let client = if let Some(endpoint) = url.strip_prefix("etcd://") {
        let backend = leasehold::EtcdBackend::builder([endpoint])
            .with_mode(leasehold::EtcdMode::Lock)
            .connect()
            .await
            .unwrap();
        node("leader", backend).await
    } else {
        node(
            "leader",
            leasehold::RedisBackend::connect(&url).await.unwrap(),
        )
        .await
    };
    let leadership = client
        .election(&name)
        .unwrap()
        .campaign("leader-process", options())
        .await
        .unwrap();
    println!("leading");
    let reason = leadership.lost().await;
    eprintln!("leader process: lost ({reason})");
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let at = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[at]
}

fn print(what: &str, mut samples: Vec<Duration>) {
    let median = percentile(&mut samples, 0.5);
    let p99 = percentile(&mut samples, 0.99);
    let max = *samples.last().unwrap();
    println!(
        "{what:<34} n={:<4} median {median:>10.2?}  p99 {p99:>10.2?}  max {max:>10.2?}",
        samples.len()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var("LEASEHOLD_BENCH_ROLE").as_deref() == Ok("leader") {
        return lead().await;
    }
    let quick = std::env::var_os("LEASEHOLD_BENCH_QUICK").is_some()
        || std::env::args().any(|a| a == "--quick");
    // cargo bench passes `--bench`; anything else (a `--test` run) only checks it starts.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let (resigns, failovers) = if quick { (20, 3) } else { (200, 10) };
    println!("election handovers, ttl {TTL:?}");

    let memory = MemoryBackend::new();
    let (a, b) = (
        node("mem-a", memory.clone()).await,
        node("mem-b", memory).await,
    );
    print(
        "memory resign -> next leader",
        resign(&a, &b, resigns).await,
    );
    a.shutdown().await;
    b.shutdown().await;

    let redis = RedisServer::start();
    let (a, b) = (
        node("redis-a", redis.backend().await).await,
        node("redis-b", redis.backend().await).await,
    );
    print("redis resign -> next leader", resign(&a, &b, resigns).await);
    print(
        "redis failover (SIGKILL) -> leader",
        failover(&redis.url(), &a, failovers).await,
    );
    a.shutdown().await;
    b.shutdown().await;

    let etcd = EtcdServer::start();
    let (a, b) = (
        node("etcd-a", etcd.backend(leasehold::EtcdMode::Lock).await).await,
        node("etcd-b", etcd.backend(leasehold::EtcdMode::Lock).await).await,
    );
    print("etcd resign -> next leader", resign(&a, &b, resigns).await);
    let url = format!("etcd://{}", etcd.endpoint());
    print(
        "etcd failover (SIGKILL) -> leader",
        failover(&url, &a, failovers).await,
    );
    a.shutdown().await;
    b.shutdown().await;
}
