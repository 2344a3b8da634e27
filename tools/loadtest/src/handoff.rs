//! Contended handoff: the harness's 16 tasks take turns on one key, holding it 1 ms each; the
//! figure is the time from one holder's release to the next holder's acquisition.

use std::time::Duration;

use leasehold::LockClient;
use leasehold_bench_support::harness::{self, Turn, HANDOFF_TASKS};

use crate::progress::Progress;
use crate::report::{Handoff, Store};
use crate::{Nodes, Plan, Stores};

/// Far longer than any turn: no lease expires during a contest.
const TTL: Duration = Duration::from_secs(30);

/// A client taking turns.
#[derive(Clone)]
enum Taker {
    Leasehold(LockClient),
    /// rslock's `acquire` retries `SET NX` until it wins; it has no waiting by notice.
    Rslock(rslock::LockManager),
}

impl Taker {
    async fn turn(self) -> Turn {
        match self {
            Taker::Leasehold(client) => harness::leasehold_turn(client, TTL).await,
            Taker::Rslock(rslock) => {
                let guard = rslock
                    .acquire("loadtest/handoff/rslock", TTL)
                    .await
                    .expect("rslock acquire");
                Turn::hold(|| guard.release()).await
            }
        }
    }
}

/// How many contests run (one per client), each for the plan's handoff time.
const CONTESTS: usize = 5;

/// The planned time of the contests.
pub fn planned(plan: &Plan) -> Duration {
    plan.handoff * CONTESTS as u32
}

/// One contest per client, one after the other.
pub async fn measure(
    nodes: &Nodes,
    stores: &Stores,
    plan: &Plan,
    progress: &Progress,
) -> Vec<Handoff> {
    let contests: [_; CONTESTS] = [
        (
            "leasehold memory",
            Store::Memory,
            Taker::Leasehold(nodes.memory.clone()),
        ),
        (
            "leasehold redis",
            Store::Redis,
            Taker::Leasehold(nodes.redis.clone()),
        ),
        (
            "rslock 0.10",
            Store::Redis,
            Taker::Rslock(rslock::LockManager::new(vec![stores.redis.url()])),
        ),
        (
            "leasehold etcd txn",
            Store::EtcdTxn,
            Taker::Leasehold(nodes.etcd_txn.clone()),
        ),
        (
            "leasehold etcd lock",
            Store::EtcdLock,
            Taker::Leasehold(nodes.etcd_lock.clone()),
        ),
    ];
    let mut results = Vec::new();
    for (name, store, taker) in contests {
        let contest = harness::handoff(plan.handoff, move |_task| taker.clone().turn());
        let turns = progress
            .step(format!("handoff, {name}"), plan.handoff, contest)
            .await;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let percentiles = turns.median_p99();
        results.push(Handoff {
            name: name.to_owned(),
            store,
            tasks: HANDOFF_TASKS,
            median_ms: percentiles.map(|(median, _)| ms(median)),
            p99_ms: percentiles.map(|(_, p99)| ms(p99)),
            handoffs: turns.gaps.len(),
            retakes: turns.retakes,
        });
    }
    results
}
