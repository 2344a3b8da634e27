//! Run: `cargo run --release -p leasehold-loadtest -- --out target/report` (about 6 minutes),
//! or with `--smoke` for every scenario at a tiny size (about 10 seconds).
//!
//! The performance report: starts its own `redis-server` and `etcd` on free loopback ports,
//! runs every scenario, prints the figures, and writes `report.json` and `throughput.svg` to
//! the `--out` directory. The machine's load average is printed at the start and the end.
//!
//! - Throughput: lock+release cycles/s at 1, 4, 16, 64 and 256 tasks, each task on its own
//!   key, for leasehold on the memory store, on Redis and on etcd in `txn` and `lock` mode,
//!   and for its peers on the same servers. On Redis: `rslock`, a plain raw lock (`SET NX PX` +
//!   a compare-and-delete script on the raw `redis` client), and leasehold's `RedisBackend`
//!   called directly without actors (its own scripts); on etcd, the raw etcd-client making
//!   leasehold's calls in each mode. Every leasehold figure comes with its ratio to its peers
//!   at the same concurrency; every figure with CPU per cycle of this process and of the
//!   server, and at 1 task the cycle's p50/p99. Each is the median of the rounds, the clients
//!   taking turns interleaved per round.
//! - Contended handoff: 16 tasks taking turns on one key; release → next acquisition.
//! - Held locks: 10,000 locks on Redis and on etcd (`txn`) held with auto-renew for 60 s:
//!   renewals on time, CPU time, resident memory per lock; 100,000 on etcd on a session lease
//!   (every lock on one lease), the same way; 100,000 on the memory store.
//!
//! Performance targets are printed PASS or MISS, not asserted: the run fails (exits non-zero)
//! only when something does not work — a server that does not start, a store error, a lock
//! that is not granted, two holders at once in a handoff.

mod handoff;
mod heap;
mod held;
mod plot;
mod progress;
mod report;
mod throughput;

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[global_allocator]
static HEAP: heap::Counting = heap::Counting;

use held::HeldPlan;
use leasehold::{EtcdBackend, EtcdMode, LockClient, LockManager, MemoryBackend};
use leasehold_bench_support::cpu;
use leasehold_bench_support::raw_etcd::RawEtcd;
use leasehold_test_support::{EtcdServer, RedisServer};
use progress::Progress;
use report::{Report, Store};

/// How big and how long each scenario is.
pub struct Plan {
    name: &'static str,
    concurrency: &'static [usize],
    /// Each throughput point is `rounds` turns of `warmup` + `measure` per client.
    rounds: usize,
    warmup: Duration,
    measure: Duration,
    /// How long each handoff contest runs.
    handoff: Duration,
    held: [HeldPlan; 4],
    /// With `--held-only STORE`: only that store's held-locks scenario.
    held_only: Option<Store>,
}

fn full() -> Plan {
    Plan {
        name: "full",
        concurrency: &[1, 4, 16, 64, 256],
        rounds: 3,
        warmup: Duration::from_millis(200),
        measure: Duration::from_millis(600),
        handoff: Duration::from_secs(3),
        held_only: None,
        held: [
            HeldPlan {
                store: Store::Memory,
                locks: 100_000,
                // As in `benches/held_locks.rs`; nothing is held past the memory reading.
                ttl: Duration::from_secs(30),
                hold: Duration::ZERO,
                parallel: 1000,
                estimate: Duration::from_secs(2),
            },
            HeldPlan {
                store: Store::Redis,
                locks: 10_000,
                ttl: Duration::from_secs(10),
                hold: Duration::from_secs(60),
                parallel: 1000,
                estimate: Duration::from_secs(2),
            },
            HeldPlan {
                store: Store::EtcdTxn,
                locks: 10_000,
                ttl: Duration::from_secs(10),
                hold: Duration::from_secs(60),
                // Each acquisition is two raft writes (lease grant, put): only many in flight
                // at once take 10,000 in seconds rather than a minute.
                parallel: 500,
                estimate: Duration::from_secs(8),
            },
            HeldPlan {
                store: Store::EtcdSession,
                locks: 100_000,
                ttl: Duration::from_secs(10),
                hold: Duration::from_secs(60),
                // One raft write each (the put), the session's keep-alives shared.
                parallel: 500,
                estimate: Duration::from_secs(30),
            },
        ],
    }
}

fn smoke() -> Plan {
    // A ttl of 2 s renews every 667 ms, so even a 2 s hold sees renewals.
    let ttl = Duration::from_secs(2);
    let hold = Duration::from_secs(2);
    Plan {
        name: "smoke",
        concurrency: &[1, 4],
        rounds: 1,
        warmup: Duration::from_millis(50),
        measure: Duration::from_millis(150),
        handoff: Duration::from_millis(300),
        held_only: None,
        held: [
            HeldPlan {
                store: Store::Memory,
                locks: 1000,
                ttl: Duration::from_secs(30),
                hold: Duration::ZERO,
                parallel: 100,
                estimate: Duration::from_millis(100),
            },
            HeldPlan {
                store: Store::Redis,
                locks: 100,
                ttl,
                hold,
                parallel: 100,
                estimate: Duration::from_millis(100),
            },
            HeldPlan {
                store: Store::EtcdTxn,
                locks: 100,
                ttl,
                hold,
                parallel: 100,
                estimate: Duration::from_millis(300),
            },
            HeldPlan {
                store: Store::EtcdSession,
                locks: 100,
                ttl,
                hold,
                parallel: 100,
                estimate: Duration::from_millis(300),
            },
        ],
    }
}

/// The session lease's ttl in the session scenario: the held locks' ttl in both plans fits.
const SESSION_TTL: Duration = Duration::from_secs(10);

/// The servers this run started.
pub struct Stores {
    redis: RedisServer,
    etcd: EtcdServer,
}

impl Stores {
    /// A lock manager of its own on `store` (so each scenario's events and metrics are its own).
    async fn manager(&self, name: &str, store: Store) -> LockClient {
        let builder = LockManager::builder().with_name(name);
        let builder = match store {
            Store::Memory => builder.with_backend("memory", MemoryBackend::new()),
            Store::Redis => builder.with_backend("redis", self.redis.backend().await),
            Store::EtcdTxn => builder.with_backend("etcd", self.etcd.backend(EtcdMode::Txn).await),
            Store::EtcdLock => {
                builder.with_backend("etcd", self.etcd.backend(EtcdMode::Lock).await)
            }
            Store::EtcdSession => {
                let session = EtcdBackend::builder([self.etcd.endpoint()])
                    .with_session(SESSION_TTL)
                    .connect()
                    .await
                    .expect("etcd backend on a session lease");
                builder.with_backend("etcd", session)
            }
        };
        builder.start().await.expect("lock manager")
    }
}

/// The lock managers the throughput and handoff scenarios share, one per store.
pub struct Nodes {
    memory: LockClient,
    redis: LockClient,
    etcd_txn: LockClient,
    etcd_lock: LockClient,
}

struct Args {
    plan: Plan,
    out: PathBuf,
}

fn parse_args() -> Args {
    let usage = "usage: loadtest [--smoke] [--out DIR] [--held-only STORE] [--heap]   \
                 (default DIR: target/report; STORE: memory, redis, etcd-txn, etcd-session; \
                 --heap: count the live heap too, which costs CPU)";
    let mut held_only = None;
    let mut args = Args {
        plan: full(),
        out: PathBuf::from("target/report"),
    };
    let mut given = std::env::args().skip(1);
    while let Some(arg) = given.next() {
        match arg.as_str() {
            "--smoke" => args.plan = smoke(),
            "--out" => match given.next() {
                Some(dir) => args.out = PathBuf::from(dir),
                None => fail(&format!("--out takes a directory\n{usage}")),
            },
            "--held-only" => match given.next().as_deref() {
                Some("memory") => held_only = Some(Store::Memory),
                Some("redis") => held_only = Some(Store::Redis),
                Some("etcd-txn") => held_only = Some(Store::EtcdTxn),
                Some("etcd-session") => held_only = Some(Store::EtcdSession),
                other => fail(&format!(
                    "--held-only takes a store, not {other:?}\n{usage}"
                )),
            },
            "--heap" => heap::turn_on(),
            "--help" | "-h" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => fail(&format!("unknown argument {other:?}\n{usage}")),
        }
    }
    args.plan.held_only = held_only;
    args
}

fn fail(message: &str) -> ! {
    eprintln!("loadtest: {message}");
    std::process::exit(2);
}

fn main() {
    let started = Instant::now();
    let Args { plan, out } = parse_args();
    std::fs::create_dir_all(&out)
        .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", out.display())));
    let stores = Stores {
        redis: RedisServer::start(),
        etcd: EtcdServer::start(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut report = runtime.block_on(run(&stores, &plan));
    drop(stores);
    report.seconds = started.elapsed().as_secs_f64();

    let json = out.join("report.json");
    let text = serde_json::to_string_pretty(&report).expect("report as JSON");
    std::fs::write(&json, text + "\n").unwrap_or_else(|e| panic!("write {}: {e}", json.display()));
    let svg = out.join("throughput.svg");
    plot::draw(&svg, &report).unwrap_or_else(|e| panic!("draw {}: {e}", svg.display()));
    println!("wrote {} and {}", json.display(), svg.display());
    let seconds = report.seconds.round() as u64;
    println!(
        "the whole {} run took {seconds} s ({}m {:02}s)",
        plan.name,
        seconds / 60,
        seconds % 60
    );
}

async fn run(stores: &Stores, plan: &Plan) -> Report {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "leasehold load test ({} run): redis-server on {}, etcd on {}, {cores} cores",
        plan.name,
        stores.redis.url(),
        stores.etcd.endpoint(),
    );
    let load_at_start = cpu::loadavg();
    println!("load average at start: {load_at_start}");
    let nodes = Nodes {
        memory: stores.manager("loadtest-memory", Store::Memory).await,
        redis: stores.manager("loadtest-redis", Store::Redis).await,
        etcd_txn: stores.manager("loadtest-etcd-txn", Store::EtcdTxn).await,
        etcd_lock: stores.manager("loadtest-etcd-lock", Store::EtcdLock).await,
    };
    let held_plans: Vec<&HeldPlan> = plan
        .held
        .iter()
        .filter(|held| plan.held_only.is_none_or(|only| only == held.store))
        .collect();
    let lineup = throughput::lineup(&nodes, stores).await;
    let everything = plan.held_only.is_none();
    let total = held_plans
        .iter()
        .map(|held| held.planned())
        .sum::<Duration>()
        + if everything {
            throughput::planned(plan, lineup.len()) + handoff::planned(plan)
        } else {
            Duration::ZERO
        };
    let progress = Progress::new(total);

    let (mut throughput, mut handoff) = (Vec::new(), Vec::new());
    if everything {
        throughput = throughput::measure(lineup, plan, &progress).await;
        progress.print(&format!("\n{}", report::throughput_table(&throughput)));
        handoff = handoff::measure(&nodes, stores, plan, &progress).await;
        progress.print(&report::handoff_table(&handoff));
    }
    for node in [
        &nodes.memory,
        &nodes.redis,
        &nodes.etcd_txn,
        &nodes.etcd_lock,
    ] {
        node.shutdown().await;
    }

    let mut held = Vec::new();
    for scenario in held_plans {
        let name = format!("loadtest-held-{}", scenario.store).replace(' ', "-");
        let raw_take_s = match scenario.store {
            Store::EtcdTxn => {
                let raw = RawEtcd::connect(&stores.etcd.endpoint()).await;
                Some(held::raw_etcd_take(&raw, scenario, &progress).await)
            }
            _ => None,
        };
        let client = stores.manager(&name, scenario.store).await;
        let mut result = held::measure(client, scenario, &progress).await;
        result.raw_take_s = raw_take_s;
        progress.print(&report::held_lines(&result));
        held.push(result);
    }
    progress.finish();

    let targets = report::targets(&throughput, &held);
    println!("{}", report::targets_table(&targets));
    let load_at_end = cpu::loadavg();
    println!("load average at end: {load_at_end}");
    Report {
        mode: plan.name,
        cores,
        rounds: plan.rounds,
        load_at_start,
        load_at_end,
        seconds: 0.0,
        throughput,
        handoff,
        held,
        targets,
    }
}
