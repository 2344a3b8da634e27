//! Uncontended throughput: each client runs lock+release cycles back to back, every task on a
//! key of its own, at each concurrency of the plan. All clients are measured by the harness's
//! `measure`, in short turns interleaved per round (so background load falls on each of them
//! alike), with CPU per cycle of this process and of the server, and at one task the latency
//! of each cycle; each figure is the median of the rounds.

use std::sync::Arc;
use std::time::Duration;

use leasehold::{LockBackend, LockClient, LockOptions};
use leasehold_bench_support::harness::{self, backend_cycle, Window};
use leasehold_bench_support::raw_etcd::RawEtcd;
use leasehold_bench_support::raw_redis::PlainRawLock;

use crate::progress::Progress;
use crate::report::{Client, Point, Series, Store};
use crate::{Nodes, Plan, Stores};

/// The ttl of every leasehold and rslock cycle (each releases long before it matters).
const TTL: Duration = Duration::from_secs(30);

/// One client in the lineup: what it is called, what it runs, and which series leasehold's
/// figures are divided by.
pub struct Contender {
    pub name: &'static str,
    pub client: Client,
    pub store: Store,
    pub cycle: Cycle,
    /// The pid of the server the cycles go to, whose CPU time is read (none for memory).
    pub server: Option<u32>,
    /// The peers leasehold's series is divided by, by name (only on leasehold's series).
    pub peers: Peers,
}

/// The names of a leasehold series' peers on the same store, where it has them.
#[derive(Clone, Copy, Default)]
pub struct Peers {
    /// leasehold's own store calls without its actors.
    pub raw: Option<&'static str>,
    /// rslock (Redis).
    pub rslock: Option<&'static str>,
    /// The plain raw lock, `SET NX PX` + compare-and-delete (Redis).
    pub plain: Option<&'static str>,
}

/// One lock+release cycle on a key of the task's own.
pub enum Cycle {
    Leasehold(LockClient),
    /// A leasehold backend called directly through `LockBackend`: its store calls, no actors.
    Backend(Arc<dyn LockBackend>),
    Rslock(rslock::LockManager),
    PlainRaw(PlainRawLock),
    RawEtcdTxn(RawEtcd),
    RawEtcdLock(RawEtcd),
}

impl Contender {
    async fn cycle(&self, task: usize) {
        // Each series has keys of its own, so no series finds another's leftovers.
        let key = format!("loadtest/{}/{task}", self.name.replace(' ', "-"));
        match &self.cycle {
            Cycle::Leasehold(client) => {
                let guard = client
                    .try_lock(&key, LockOptions::new().with_ttl(TTL))
                    .await
                    .unwrap_or_else(|e| panic!("{}: try_lock {key}: {e}", self.name))
                    .unwrap_or_else(|| panic!("{}: {key} is a key of its own", self.name));
                guard
                    .release()
                    .await
                    .unwrap_or_else(|e| panic!("{}: release {key}: {e}", self.name));
            }
            Cycle::Backend(backend) => backend_cycle(backend.as_ref(), &key, TTL).await,
            Cycle::Rslock(rslock) => {
                let lock = rslock.lock(key.as_str(), TTL).await.expect("rslock lock");
                rslock.unlock(&lock).await;
            }
            Cycle::PlainRaw(plain) => plain.cycle(&key, TTL).await,
            Cycle::RawEtcdTxn(raw) => raw.txn_cycle(&key).await,
            Cycle::RawEtcdLock(raw) => raw.lock_cycle(&key).await,
        }
    }
}

/// The planned time of the throughput measurements of `contenders`.
pub fn planned(plan: &Plan, contenders: usize) -> Duration {
    per_concurrency(plan, contenders) * plan.concurrency.len() as u32
}

fn per_concurrency(plan: &Plan, contenders: usize) -> Duration {
    (plan.warmup + plan.measure) * (plan.rounds * contenders) as u32
}

/// Measures every contender at every concurrency of the plan; one series per contender.
pub async fn measure(lineup: Vec<Contender>, plan: &Plan, progress: &Progress) -> Vec<Series> {
    let lineup: Vec<Arc<Contender>> = lineup.into_iter().map(Arc::new).collect();
    let servers: Vec<Vec<u32>> = lineup
        .iter()
        .map(|c| c.server.into_iter().collect())
        .collect();
    let window = Window {
        warmup: plan.warmup,
        measure: plan.measure,
    };
    // figures[c][i]: contender i's figures at concurrency c.
    let mut figures = Vec::new();
    for &tasks in plan.concurrency {
        let measuring = harness::measure(
            &lineup,
            &servers,
            tasks,
            plan.rounds,
            window,
            |contender: Arc<Contender>, task| async move { contender.cycle(task).await },
        );
        let label = format!("throughput, {tasks} tasks");
        let planned = per_concurrency(plan, lineup.len());
        figures.push(progress.step(label, planned, measuring).await);
    }
    let index = |name: Option<&str>| name.and_then(|n| lineup.iter().position(|c| c.name == n));
    lineup
        .iter()
        .enumerate()
        .map(|(i, contender)| {
            let peers = contender.peers;
            let (raw, rslock, plain) = (index(peers.raw), index(peers.rslock), index(peers.plain));
            let points = plan
                .concurrency
                .iter()
                .zip(&figures)
                .map(|(&tasks, all)| {
                    let ours = &all[i];
                    let vs = |peer: Option<usize>| {
                        peer.map(|peer| ours.cycles_per_sec / all[peer].cycles_per_sec)
                    };
                    Point {
                        tasks,
                        cycles_per_sec: ours.cycles_per_sec,
                        client_cpu_us_per_cycle: ours.client_cpu_us,
                        server_cpu_us_per_cycle: ours.server_cpu_us,
                        p50_us: ours.p50_us,
                        p99_us: ours.p99_us,
                        vs_raw: vs(raw),
                        vs_rslock: vs(rslock),
                        vs_plain_raw: vs(plain),
                    }
                })
                .collect();
            Series {
                name: contender.name.to_owned(),
                client: contender.client,
                store: contender.store,
                points,
            }
        })
        .collect()
}

/// Every client measured: leasehold on each store, and its peers on the same servers.
pub async fn lineup(nodes: &Nodes, stores: &Stores) -> Vec<Contender> {
    let (redis, etcd) = (Some(stores.redis.pid()), stores.etcd.pid());
    let leasehold = |name, store, client: &LockClient, server, peers| Contender {
        name,
        client: Client::Leasehold,
        store,
        cycle: Cycle::Leasehold(client.clone()),
        server,
        peers,
    };
    let peer = |name, client, store, cycle, server| Contender {
        name,
        client,
        store,
        cycle,
        server,
        peers: Peers::default(),
    };
    let raw_etcd = RawEtcd::connect(&stores.etcd.endpoint()).await;
    let redis_peers = Peers {
        raw: Some(REDIS_SCRIPTS),
        rslock: Some(RSLOCK),
        plain: Some(PLAIN_RAW),
    };
    vec![
        leasehold(
            "leasehold memory",
            Store::Memory,
            &nodes.memory,
            None,
            Peers::default(),
        ),
        leasehold(
            "leasehold redis",
            Store::Redis,
            &nodes.redis,
            redis,
            redis_peers,
        ),
        peer(
            REDIS_SCRIPTS,
            Client::Raw,
            Store::Redis,
            Cycle::Backend(Arc::new(stores.redis.backend().await)),
            redis,
        ),
        peer(
            RSLOCK,
            Client::Rslock,
            Store::Redis,
            Cycle::Rslock(rslock::LockManager::new(vec![stores.redis.url()])),
            redis,
        ),
        peer(
            PLAIN_RAW,
            Client::PlainRaw,
            Store::Redis,
            Cycle::PlainRaw(PlainRawLock::connect(&stores.redis.url()).await),
            redis,
        ),
        leasehold(
            "leasehold etcd txn",
            Store::EtcdTxn,
            &nodes.etcd_txn,
            etcd,
            Peers {
                raw: Some("raw etcd-client, txn calls"),
                ..Peers::default()
            },
        ),
        peer(
            "raw etcd-client, txn calls",
            Client::Raw,
            Store::EtcdTxn,
            Cycle::RawEtcdTxn(raw_etcd.clone()),
            etcd,
        ),
        leasehold(
            "leasehold etcd lock",
            Store::EtcdLock,
            &nodes.etcd_lock,
            etcd,
            Peers {
                raw: Some("raw etcd-client, lock calls"),
                ..Peers::default()
            },
        ),
        peer(
            "raw etcd-client, lock calls",
            Client::Raw,
            Store::EtcdLock,
            Cycle::RawEtcdLock(raw_etcd),
            etcd,
        ),
    ]
}

/// leasehold's `RedisBackend` called directly: the scripts the library runs, no actors.
const REDIS_SCRIPTS: &str = "redis, leasehold scripts, no actors";
const RSLOCK: &str = "rslock 0.10";
/// `SET NX PX` + a compare-and-delete script on the raw `redis` client.
const PLAIN_RAW: &str = "plain raw redis lock";
