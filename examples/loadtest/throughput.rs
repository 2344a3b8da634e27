//! Uncontended throughput: each client runs lock+release cycles back to back, every task on a
//! key of its own, at each concurrency of the plan. All clients are measured by the harness's
//! `rates`, in short rotating turns, so background load falls on each of them alike.

use std::sync::Arc;
use std::time::Duration;

use leasehold::{LockClient, LockOptions};

use crate::harness;
use crate::progress::Progress;
use crate::raw_etcd::RawEtcd;
use crate::raw_redis::RawRedis;
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
    /// The raw store client making the same calls (for leasehold's series).
    pub raw: Option<&'static str>,
    /// rslock on the same store (for leasehold on Redis).
    pub rslock: Option<&'static str>,
}

/// One lock+release cycle on a key of the task's own.
pub enum Cycle {
    Leasehold(LockClient),
    RawRedis(RawRedis),
    Rslock(rslock::LockManager),
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
            Cycle::RawRedis(raw) => raw.cycle(&key).await,
            Cycle::Rslock(rslock) => {
                let lock = rslock.lock(key.as_str(), TTL).await.expect("rslock lock");
                rslock.unlock(&lock).await;
            }
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
    // rates[c][i]: contender i's cycles/s at concurrency c.
    let mut rates = Vec::new();
    for &tasks in plan.concurrency {
        let measuring = harness::rates(
            &lineup,
            tasks,
            plan.rounds,
            (plan.warmup, plan.measure),
            |contender: Arc<Contender>, task| async move { contender.cycle(task).await },
        );
        let label = format!("throughput, {tasks} tasks");
        let planned = per_concurrency(plan, lineup.len());
        rates.push(progress.step(label, planned, measuring).await);
    }
    let index = |name: Option<&str>| name.and_then(|n| lineup.iter().position(|c| c.name == n));
    lineup
        .iter()
        .enumerate()
        .map(|(i, contender)| {
            let (raw, rslock) = (index(contender.raw), index(contender.rslock));
            let points = plan
                .concurrency
                .iter()
                .zip(&rates)
                .map(|(&tasks, rates)| Point {
                    tasks,
                    cycles_per_sec: rates[i],
                    vs_raw: raw.map(|peer| rates[i] / rates[peer]),
                    vs_rslock: rslock.map(|peer| rates[i] / rates[peer]),
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
    let leasehold = |name, store, client: &LockClient, raw, rslock| Contender {
        name,
        client: Client::Leasehold,
        store,
        cycle: Cycle::Leasehold(client.clone()),
        raw,
        rslock,
    };
    let peer = |name, client, store, cycle| Contender {
        name,
        client,
        store,
        cycle,
        raw: None,
        rslock: None,
    };
    let raw_etcd = RawEtcd::connect(&stores.etcd.endpoint()).await;
    vec![
        leasehold("leasehold memory", Store::Memory, &nodes.memory, None, None),
        leasehold(
            "leasehold redis",
            Store::Redis,
            &nodes.redis,
            Some("raw redis, same scripts"),
            Some("rslock 0.10"),
        ),
        peer(
            "raw redis, same scripts",
            Client::Raw,
            Store::Redis,
            Cycle::RawRedis(RawRedis::connect(&stores.redis.url()).await),
        ),
        peer(
            "rslock 0.10",
            Client::Rslock,
            Store::Redis,
            Cycle::Rslock(rslock::LockManager::new(vec![stores.redis.url()])),
        ),
        leasehold(
            "leasehold etcd txn",
            Store::EtcdTxn,
            &nodes.etcd_txn,
            Some("raw etcd-client, txn calls"),
            None,
        ),
        peer(
            "raw etcd-client, txn calls",
            Client::Raw,
            Store::EtcdTxn,
            Cycle::RawEtcdTxn(raw_etcd.clone()),
        ),
        leasehold(
            "leasehold etcd lock",
            Store::EtcdLock,
            &nodes.etcd_lock,
            Some("raw etcd-client, lock calls"),
            None,
        ),
        peer(
            "raw etcd-client, lock calls",
            Client::Raw,
            Store::EtcdLock,
            Cycle::RawEtcdLock(raw_etcd),
        ),
    ]
}
