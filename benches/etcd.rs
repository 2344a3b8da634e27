//! Lock+release throughput and contended handoff on etcd, in both modes, against the raw
//! etcd-client making the same calls, measured in the same run on the same `etcd` (which this
//! bench starts on free loopback ports, its data dir on `/dev/shm` when there is one).
//!
//! Run: `cargo bench --features etcd --bench etcd` (about a minute), or with
//! `LEASEHOLD_BENCH_QUICK=1` (or `-- --quick`) for a few seconds.
//!
//! - Throughput, 1 and 64 concurrent tasks, each on its own key, `try_lock` then release:
//!   leasehold through [`LockClient`] in `txn` and in `lock` mode, and the raw etcd-client
//!   making the same etcd calls as each mode (`txn`: lease grant, put-if-absent transaction,
//!   compare-and-delete transaction, lease revoke; `lock`: range of the lock's contenders,
//!   lease grant, `Lock`, the transaction writing the holder's value, compare-and-delete, lease
//!   revoke). Prints each figure and the ratio leasehold / raw. For reference, the bare Lock
//!   service cycle (grant, `Lock`, `Unlock`, revoke), which skips leasehold's look-first read
//!   and its owner token and metadata.
//! - Contended handoff: 16 tasks taking turns on one key, 1 ms hold each; the time from one
//!   holder's release to the next holder's acquisition, median and p99, counted where the lock
//!   went to another task (retakes by the same task are counted apart). Leasehold in each mode
//!   on one node and across two nodes, and the raw Lock service (each task with a lease of its
//!   own, waiting inside etcd) for reference.
//!
//! Not criterion: the figures that matter are ratios between clients under concurrency in one
//! run, which criterion's one-function-at-a-time sampling does not give.

use std::time::Duration;

use etcd_client::{Client, LockOptions as EtcdLockOptions};
use leasehold::{EtcdMode, LockClient, LockManager, LockOptions};
use leasehold_bench_support::harness::{
    handoff, leasehold_turn, rates, report, Turn, HANDOFF_TASKS, HOLD,
};
use leasehold_bench_support::raw_etcd::RawEtcd;
use leasehold_test_support::EtcdServer;

/// How long each part runs: each client's throughput is measured in `rounds` turns of
/// `warmup` + `measure`, and each handoff contest runs for `handoff`.
struct Plan {
    rounds: usize,
    warmup: Duration,
    measure: Duration,
    handoff: Duration,
}

const FULL: Plan = Plan {
    rounds: 4,
    warmup: Duration::from_millis(200),
    measure: Duration::from_millis(1000),
    handoff: Duration::from_secs(4),
};

const QUICK: Plan = Plan {
    rounds: 1,
    warmup: Duration::from_millis(100),
    measure: Duration::from_millis(300),
    handoff: Duration::from_millis(600),
};

const CONCURRENCY: [usize; 2] = [1, 64];
const TTL: Duration = Duration::from_secs(30);
const TTL_SECONDS: i64 = 30;

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick")
        || std::env::var("LEASEHOLD_BENCH_QUICK").is_ok_and(|v| v == "1");
    let plan = if quick { QUICK } else { FULL };
    let server = EtcdServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(&server, &plan, quick));
}

async fn run(server: &EtcdServer, plan: &Plan, quick: bool) {
    println!(
        "leasehold etcd bench ({} run) against etcd on {}, {} tokio workers",
        if quick { "quick" } else { "full" },
        server.endpoint(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let txn = manager("bench-etcd-txn", server, EtcdMode::Txn).await;
    let lock = manager("bench-etcd-lock", server, EtcdMode::Lock).await;
    let raw = Client::connect([server.endpoint()], None)
        .await
        .expect("raw etcd client");
    let by_hand = RawEtcd::connect(&server.endpoint()).await;
    let clients = [
        Contender::Leasehold(txn.clone()),
        Contender::RawTxn(by_hand.clone()),
        Contender::Leasehold(lock.clone()),
        Contender::RawLock(by_hand),
        Contender::BareLockService(raw.clone()),
    ];
    let mut rows = Vec::new();
    for tasks in CONCURRENCY {
        let cycle = |contender: Contender, task| async move { contender.cycle(task).await };
        let window = (plan.warmup, plan.measure);
        rows.push(rates(&clients, tasks, plan.rounds, window, cycle).await);
    }

    println!();
    println!(
        "lock+release cycles/s                   {:>10}{:>10}",
        "1 task", "64 tasks"
    );
    let names = [
        "(a) leasehold, txn mode",
        "(b) raw etcd-client, same calls as (a)",
        "(c) leasehold, lock mode",
        "(d) raw etcd-client, same calls as (c)",
        "(ref) raw Lock service, bare cycle",
    ];
    for (i, name) in names.iter().enumerate() {
        println!("{name:<40}{:>10.0}{:>10.0}", rows[0][i], rows[1][i]);
    }
    for (name, a, b) in [("a/b", 0, 1), ("c/d", 2, 3), ("c/ref", 2, 4)] {
        println!(
            "{name:<40}{:>10.2}{:>10.2}",
            rows[0][a] / rows[0][b],
            rows[1][a] / rows[1][b]
        );
    }

    println!();
    println!(
        "contended handoff: {HANDOFF_TASKS} tasks, one key, {HOLD:?} hold; release -> next acquisition"
    );
    let txn2 = manager("bench-etcd-txn-2", server, EtcdMode::Txn).await;
    let lock2 = manager("bench-etcd-lock-2", server, EtcdMode::Lock).await;
    for (name, nodes) in [
        ("leasehold txn, one node", [txn.clone(), txn.clone()]),
        ("leasehold txn, two nodes", [txn.clone(), txn2.clone()]),
        ("leasehold lock, one node", [lock.clone(), lock.clone()]),
        ("leasehold lock, two nodes", [lock.clone(), lock2.clone()]),
    ] {
        let turns = handoff(plan.handoff, move |task| {
            // Half the tasks on each node: a turn that crosses nodes goes by watch.
            leasehold_turn(nodes[task % 2].clone(), TTL)
        })
        .await;
        report(name, &turns);
    }
    let raw_turns = handoff(plan.handoff, {
        let raw = raw.clone();
        move |_task| raw_lock_service_turn(raw.clone())
    })
    .await;
    report("raw Lock service", &raw_turns);

    for node in [txn, lock, txn2, lock2] {
        node.shutdown().await;
    }
}

async fn manager(name: &str, server: &EtcdServer, mode: EtcdMode) -> LockClient {
    LockManager::builder()
        .with_name(name)
        .with_backend("etcd", server.backend(mode).await)
        .start()
        .await
        .expect("lock manager")
}

/// One of the clients compared, doing one lock+release cycle on a key of the task's own.
#[derive(Clone)]
enum Contender {
    Leasehold(LockClient),
    RawTxn(RawEtcd),
    RawLock(RawEtcd),
    BareLockService(Client),
}

impl Contender {
    async fn cycle(&self, task: usize) {
        match self {
            Contender::Leasehold(client) => {
                let key = format!("bench/leasehold/{task}");
                let guard = client
                    .try_lock(&key, LockOptions::new().with_ttl(TTL))
                    .await
                    .expect("try_lock")
                    .expect("a key of its own is free");
                guard.release().await.expect("release");
            }
            Contender::RawTxn(raw) => raw.txn_cycle(&format!("bench/raw-txn/{task}")).await,
            Contender::RawLock(raw) => raw.lock_cycle(&format!("bench/raw-lock/{task}")).await,
            Contender::BareLockService(client) => bare_lock_service_cycle(client, task).await,
        }
    }
}

/// The Lock service as its own docs use it, with a lease per cycle: grant, `Lock`, `Unlock`,
/// revoke.
async fn bare_lock_service_cycle(client: &Client, task: usize) {
    let (mut leases, mut locks) = (client.lease_client(), client.lock_client());
    let name = format!("leasehold/bench%2Fbare-lock%2F{task}");
    let lease = leases.grant(TTL_SECONDS, None).await.expect("grant").id();
    let locked = locks
        .lock(name, Some(EtcdLockOptions::new().with_lease(lease)))
        .await
        .expect("lock");
    locks.unlock(locked.key()).await.expect("unlock");
    leases.revoke(lease).await.expect("revoke");
}

/// A turn on etcd's Lock service: the call waits inside etcd until it is this task's turn.
async fn raw_lock_service_turn(client: Client) -> Turn {
    let (mut leases, mut locks) = (client.lease_client(), client.lock_client());
    let lease = leases.grant(TTL_SECONDS, None).await.expect("grant").id();
    let locked = locks
        .lock(
            "leasehold/bench-handoff-raw",
            Some(EtcdLockOptions::new().with_lease(lease)),
        )
        .await
        .expect("lock");
    let turn = Turn::hold(|| async {
        locks.unlock(locked.key()).await.expect("unlock");
    })
    .await;
    leases.revoke(lease).await.expect("revoke");
    turn
}
