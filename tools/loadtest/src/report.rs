//! What a run measured, in one data model: serialised as `report.json`, drawn as the plot, and
//! printed as the tables below. Performance targets are checked here and printed as PASS or
//! MISS; a miss is a finding, not a failure of the run.

use std::fmt::{self, Write as _};

use serde::Serialize;

/// Everything one run measured.
#[derive(Serialize)]
pub struct Report {
    /// `full` or `smoke`.
    pub mode: &'static str,
    /// CPUs the run had (tokio runs as many workers).
    pub cores: usize,
    /// Rounds each throughput figure is the median of.
    pub rounds: usize,
    /// `/proc/loadavg` when the run started and when it ended: other work on the machine
    /// moves every figure.
    pub load_at_start: String,
    pub load_at_end: String,
    /// Wall time of the whole run, servers' start included.
    pub seconds: f64,
    pub throughput: Vec<Series>,
    pub handoff: Vec<Handoff>,
    pub held: Vec<Held>,
    pub targets: Vec<Target>,
}

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Store {
    Memory,
    Redis,
    EtcdTxn,
    EtcdLock,
    /// etcd `txn` mode with every lock on one session lease.
    EtcdSession,
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Store::Memory => "memory",
            Store::Redis => "redis",
            Store::EtcdTxn => "etcd txn",
            Store::EtcdLock => "etcd lock",
            Store::EtcdSession => "etcd session",
        })
    }
}

/// Which kind of client a series measures.
#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Client {
    Leasehold,
    /// leasehold's store calls without its actors: on Redis its `RedisBackend` called directly
    /// (the library's own scripts), on etcd the raw etcd-client making the same calls.
    Raw,
    Rslock,
    /// A plain lock by hand on the raw `redis` client: `SET NX PX` + compare-and-delete.
    PlainRaw,
}

/// One client's lock+release throughput against concurrency: a line on the plot.
#[derive(Serialize)]
pub struct Series {
    pub name: String,
    pub client: Client,
    pub store: Store,
    pub points: Vec<Point>,
}

/// Throughput at one concurrency, its cost, and leasehold's throughput ratios to its peers
/// measured in the same run at the same concurrency (only on leasehold's series, only where it
/// has such a peer). Each figure is the median of the plan's rounds.
#[derive(Serialize)]
pub struct Point {
    pub tasks: usize,
    pub cycles_per_sec: f64,
    /// CPU time (user + system) of the load test's process per cycle, µs.
    pub client_cpu_us_per_cycle: f64,
    /// CPU time of the server process per cycle, µs (none for the memory store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_cycle: Option<f64>,
    /// Time of one cycle, median and 99th percentile, µs: measured at 1 task only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_raw: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_rslock: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_plain_raw: Option<f64>,
}

/// Contended handoff: tasks taking turns on one key; release → next holder's acquisition.
#[derive(Serialize)]
pub struct Handoff {
    pub name: String,
    pub store: Store,
    pub tasks: usize,
    /// `None` when no turn went to another task.
    pub median_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Turns that went to another task (the gaps measured).
    pub handoffs: usize,
    /// Turns the releasing task took straight back.
    pub retakes: usize,
}

/// Many locks held at once, with auto-renew.
#[derive(Serialize)]
pub struct Held {
    pub store: Store,
    pub locks: usize,
    pub ttl_s: f64,
    /// From the first acquisition asked for to the last one answered.
    pub take_s: f64,
    /// How long all of them were held after that (the window renewals are judged in).
    pub hold_s: f64,
    /// Locks whose guard still said "held" at the end of the window.
    pub still_held: usize,
    /// Resident set growth per lock since just before the first acquisition: the first sample
    /// right after taking them all, then through the window, the last at its end.
    pub rss_per_lock: Vec<RssSample>,
    /// CPU time of this process (user + system, every thread) during the hold window, less
    /// the renewal watcher's (`watcher_cpu_s`): the measuring tool's own work is not the
    /// locks'.
    pub cpu_s: f64,
    /// CPU time of the renewal watcher's thread during the hold window (receiving every
    /// lifecycle event and keeping per-key gaps), left out of `cpu_s`.
    pub watcher_cpu_s: f64,
    /// Time to release them all and stop the manager.
    pub release_s: f64,
    /// etcd `txn` only: the time the raw etcd-client took as many keys with the same calls,
    /// as many at once, just before (see `held::raw_etcd_take`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_take_s: Option<f64>,
    /// Only when there was a hold window to renew in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub renewals: Option<Renewals>,
}

impl Held {
    /// The largest resident-set sample: the one the target is checked on.
    pub fn rss_per_lock_kib(&self) -> f64 {
        self.rss_per_lock.iter().map(|s| s.kib).fold(0.0, f64::max)
    }
}

/// The resident set growth per held lock, `at_s` seconds after the last lock was taken.
#[derive(Serialize)]
pub struct RssSample {
    pub at_s: f64,
    pub kib: f64,
    /// With `--heap`: the growth of the live heap per lock (bytes allocated and not freed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap_kib: Option<f64>,
}

/// How renewal kept up, from the `Renewed` events of each key.
#[derive(Serialize)]
pub struct Renewals {
    /// `Renewed` events received.
    pub events: u64,
    /// Renewals the manager's metrics counted over the same time (a cross-check).
    pub metrics_renewed: u64,
    /// Events the receiver fell too far behind to see (each would look like a late renewal).
    pub events_missed: u64,
    pub renew_failed: u64,
    pub lost: u64,
    /// Keys still held whose renewals never left a gap longer than ttl/2, from the acquisition
    /// to the end of the window.
    pub keys_on_time: usize,
    pub on_time_pct: f64,
    /// The longest gap of any key, in seconds.
    pub max_gap_s: f64,
    /// Set when the locks followed a shared lease (no renewals of their own): then "on
    /// time" is judged by their deadlines.
    pub following: Option<Following>,
}

/// How the deadlines of locks following a shared lease kept ahead of the clock.
#[derive(Serialize)]
pub struct Following {
    /// The least time left before any key's deadline, read every 5 s for every key.
    pub min_headroom_s: f64,
    /// The same for one key, read every 50 ms.
    pub probe_min_headroom_s: f64,
    /// CPU time spent reading the deadlines (left out of the CPU figure).
    pub probe_cpu_s: f64,
}

/// One performance target and how the run did against it.
#[derive(Serialize)]
pub struct Target {
    pub what: String,
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

// The targets of issue 12 (the lean lease core).
/// lock+release cycles/s the memory store must reach at 64 tasks.
const MEMORY_CYCLES_AT_64: f64 = 250_000.0;
/// Resident memory a held lock may cost.
const RSS_PER_LOCK_KIB: f64 = 10.0;
/// How long taking 100,000 locks on the memory store may take.
const MEMORY_TAKE_S: f64 = 1.0;
/// leasehold / rslock throughput on Redis, by concurrency.
const VS_RSLOCK: [(usize, f64); 3] = [(1, 0.9), (64, 0.8), (256, 0.8)];
/// leasehold's uncontended p50 on Redis at most this many times rslock's.
const P50_VS_RSLOCK: f64 = 1.25;
/// CPU per cycle at 64 tasks on Redis, µs: leasehold's process, and redis-server.
const CLIENT_CPU_US_AT_64: f64 = 25.0;
const SERVER_CPU_US_AT_64: f64 = 15.0;

/// Checks every target the run has figures for.
pub fn targets(throughput: &[Series], held: &[Held]) -> Vec<Target> {
    let mut targets = Vec::new();
    let memory_at_64 = throughput
        .iter()
        .filter(|s| s.client == Client::Leasehold && s.store == Store::Memory)
        .flat_map(|s| &s.points)
        .find(|p| p.tasks == 64);
    if let Some(point) = memory_at_64 {
        targets.push(Target {
            what: "leasehold memory, lock+release at 64 tasks".into(),
            goal: format!("≥ {} cycles/s", thousands(MEMORY_CYCLES_AT_64)),
            measured: format!("{} cycles/s", thousands(point.cycles_per_sec)),
            met: point.cycles_per_sec >= MEMORY_CYCLES_AT_64,
        });
    }
    redis_targets(throughput, &mut targets);
    for held in held {
        let store = held.store;
        let locks = thousands(held.locks as f64);
        let memory_goal = etcd_memory_goal(store).unwrap_or(RSS_PER_LOCK_KIB);
        targets.push(Target {
            what: format!("{store}, {locks} held locks: resident memory per lock"),
            goal: format!("≤ {memory_goal} KiB"),
            measured: format!("{:.1} KiB", held.rss_per_lock_kib()),
            met: held.rss_per_lock_kib() <= memory_goal,
        });
        if store == Store::EtcdTxn {
            let raw = held.raw_take_s.map_or(String::new(), |raw| {
                format!(" (raw etcd-client, same calls: {raw:.2} s)")
            });
            targets.push(Target {
                what: format!("{store}, time to take {locks} locks"),
                goal: format!("≤ {ETCD_TAKE_S} s (for 10,000)"),
                measured: format!("{:.2} s{raw}", held.take_s),
                met: held.take_s <= ETCD_TAKE_S,
            });
        }
        if store == Store::Memory {
            targets.push(Target {
                what: format!("{store}, time to take {locks} locks"),
                goal: format!("< {MEMORY_TAKE_S} s (for 100,000)"),
                measured: format!("{:.2} s", held.take_s),
                met: held.take_s < MEMORY_TAKE_S,
            });
        }
        if let Some(goal) = etcd_cpu_goal(store).filter(|_| held.hold_s > 0.0) {
            let pct = 100.0 * held.cpu_s / held.hold_s;
            targets.push(Target {
                what: format!("{store}, {locks} held locks: client CPU while held"),
                goal: format!("≤ {goal}% of one core"),
                measured: format!("{pct:.1}%"),
                met: pct <= goal,
            });
        }
        if let Some(renewals) = &held.renewals {
            targets.push(Target {
                what: format!("{store}, {locks} held locks: renewals on time (no gap > ttl/2)"),
                goal: "100%".into(),
                measured: format!(
                    "{:.2}% ({} of {} keys)",
                    renewals.on_time_pct,
                    thousands(renewals.keys_on_time as f64),
                    locks
                ),
                met: renewals.keys_on_time == held.locks,
            });
        }
    }
    targets
}

/// The resident memory per lock etcd locks may cost, from the etcd-at-scale issue (the other
/// stores keep the lean core's [`RSS_PER_LOCK_KIB`]).
fn etcd_memory_goal(store: Store) -> Option<f64> {
    matches!(store, Store::EtcdTxn | Store::EtcdSession).then_some(12.0)
}

/// How long taking 10,000 etcd locks with a lease each may take, from the same issue.
const ETCD_TAKE_S: f64 = 2.0;

/// The client CPU goal (percent of one core) while etcd locks are held, from the etcd-at-scale
/// issue: 10,000 locks with a lease each, 100,000 on a session lease.
fn etcd_cpu_goal(store: Store) -> Option<f64> {
    match store {
        Store::EtcdTxn => Some(10.0),
        Store::EtcdSession => Some(3.0),
        _ => None,
    }
}

/// The targets against rslock and on CPU per cycle, from leasehold's Redis series.
fn redis_targets(throughput: &[Series], targets: &mut Vec<Target>) {
    let series = |client| {
        throughput
            .iter()
            .find(|s| s.client == client && s.store == Store::Redis)
    };
    let (Some(ours), Some(rslock)) = (series(Client::Leasehold), series(Client::Rslock)) else {
        return;
    };
    fn at(series: &Series, tasks: usize) -> Option<&Point> {
        series.points.iter().find(|p| p.tasks == tasks)
    }
    for (tasks, goal) in VS_RSLOCK {
        if let Some(ratio) = at(ours, tasks).and_then(|p| p.vs_rslock) {
            targets.push(Target {
                what: format!("leasehold redis / rslock, lock+release, {tasks} task(s)"),
                goal: format!("≥ {goal}"),
                measured: format!("{ratio:.2}"),
                met: ratio >= goal,
            });
        }
    }
    let p50 = |s: &Series| at(s, 1).and_then(|p| p.p50_us);
    if let (Some(a), Some(b)) = (p50(ours), p50(rslock)) {
        targets.push(Target {
            what: "leasehold redis, uncontended cycle p50 against rslock's".into(),
            goal: format!("≤ {P50_VS_RSLOCK} × rslock"),
            measured: format!("{:.2} × ({a:.0} µs vs {b:.0} µs)", a / b),
            met: a <= P50_VS_RSLOCK * b,
        });
    }
    if let Some(point) = at(ours, 64) {
        targets.push(Target {
            what: "leasehold redis at 64 tasks: process CPU per cycle".into(),
            goal: format!("≤ {CLIENT_CPU_US_AT_64} µs"),
            measured: format!("{:.1} µs", point.client_cpu_us_per_cycle),
            met: point.client_cpu_us_per_cycle <= CLIENT_CPU_US_AT_64,
        });
        if let Some(server) = point.server_cpu_us_per_cycle {
            targets.push(Target {
                what: "leasehold redis at 64 tasks: redis-server CPU per cycle".into(),
                goal: format!("≤ {SERVER_CPU_US_AT_64} µs"),
                measured: format!("{server:.1} µs"),
                met: server <= SERVER_CPU_US_AT_64,
            });
        }
    }
}

/// The throughput table, then leasehold's ratios to its peers at each concurrency, then what
/// a cycle costs and (at one task) how long it takes.
pub fn throughput_table(series: &[Series]) -> String {
    let Some(first) = series.first() else {
        return String::new();
    };
    let mut out = String::new();
    let header: String = first
        .points
        .iter()
        .map(|p| format!("{:>10}", p.tasks))
        .collect();
    let _ = writeln!(out, "lock+release cycles/s, each task on its own key");
    let _ = writeln!(out, "{:<38}{header}  (tasks)", "");
    for s in series {
        let row: String = s
            .points
            .iter()
            .map(|p| format!("{:>10}", thousands(p.cycles_per_sec)))
            .collect();
        let _ = writeln!(out, "{:<38}{row}", s.name);
    }
    let _ = writeln!(out, "ratios, measured in the same run");
    for s in series {
        ratio_row(&mut out, s, "rslock", |p| p.vs_rslock);
        ratio_row(&mut out, s, "plain raw", |p| p.vs_plain_raw);
        ratio_row(&mut out, s, "no actors", |p| p.vs_raw);
    }
    let _ = writeln!(
        out,
        "CPU per cycle, µs: this process + the server (medians of the rounds)"
    );
    // Wider columns: a cell holds two figures.
    let wide: String = first
        .points
        .iter()
        .map(|p| format!("{:>17}", p.tasks))
        .collect();
    let _ = writeln!(out, "{:<38}{wide}  (tasks)", "");
    for s in series {
        let row: String = s
            .points
            .iter()
            .map(|p| match p.server_cpu_us_per_cycle {
                Some(server) => format!(
                    "{:>17}",
                    format!("{:.1} + {server:.1}", p.client_cpu_us_per_cycle)
                ),
                None => format!("{:>17.1}", p.client_cpu_us_per_cycle),
            })
            .collect();
        let _ = writeln!(out, "{:<38}{row}", s.name);
    }
    let _ = writeln!(out, "uncontended cycle (1 task), µs");
    for s in series {
        if let Some(p) = s.points.iter().find(|p| p.tasks == 1) {
            if let (Some(p50), Some(p99)) = (p.p50_us, p.p99_us) {
                let _ = writeln!(
                    out,
                    "{:<38}{:>12}{:>12}",
                    s.name,
                    format!("p50 {p50:.0}"),
                    format!("p99 {p99:.0}")
                );
            }
        }
    }
    out
}

/// `SERIES / PEER` and the ratio at each concurrency, if the series has that peer.
fn ratio_row(out: &mut String, series: &Series, peer: &str, ratio: fn(&Point) -> Option<f64>) {
    if series.points.iter().all(|p| ratio(p).is_none()) {
        return;
    }
    let row: String = series
        .points
        .iter()
        .map(|p| ratio(p).map_or(format!("{:>10}", "-"), |r| format!("{r:>10.2}")))
        .collect();
    let _ = writeln!(out, "{:<38}{row}", format!("{} / {peer}", series.name));
}

pub fn handoff_table(handoffs: &[Handoff]) -> String {
    let mut out = String::new();
    let tasks = handoffs.first().map_or(0, |h| h.tasks);
    let _ = writeln!(
        out,
        "contended handoff: {tasks} tasks on one key; release -> next acquisition by another task"
    );
    let _ = writeln!(
        out,
        "{:<34}{:>12}{:>12}{:>10}{:>10}",
        "", "median ms", "p99 ms", "handoffs", "retakes"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
    for h in handoffs {
        let _ = writeln!(
            out,
            "{:<34}{:>12}{:>12}{:>10}{:>10}",
            h.name,
            ms(h.median_ms),
            ms(h.p99_ms),
            h.handoffs,
            h.retakes
        );
    }
    out
}

pub fn held_lines(held: &Held) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} locks on {}, ttl {} s, auto-renew: taken in {:.2} s, held {:.1} s more; {} still held",
        thousands(held.locks as f64),
        held.store,
        held.ttl_s,
        held.take_s,
        held.hold_s,
        thousands(held.still_held as f64),
    );
    if let Some(raw) = held.raw_take_s {
        let _ = writeln!(
            out,
            "  the raw etcd-client making the same calls, as many at once, took as many in {raw:.2} s"
        );
    }
    let samples: Vec<String> = held
        .rss_per_lock
        .iter()
        .map(|s| match s.heap_kib {
            Some(heap) => format!("{:.1} ({:.1} s; live heap {heap:.1})", s.kib, s.at_s),
            None => format!("{:.1} ({:.1} s)", s.kib, s.at_s),
        })
        .collect();
    let _ = writeln!(
        out,
        "  resident memory per lock, KiB (seconds after taking them): {}",
        samples.join(", ")
    );
    if held.hold_s > 0.0 {
        let _ = writeln!(
            out,
            "  CPU time while holding {:.2} s ({:.1}% of one core; the renewal watcher's thread, left out: {:.2} s)",
            held.cpu_s,
            100.0 * held.cpu_s / held.hold_s,
            held.watcher_cpu_s
        );
    }
    if let Some(r) = &held.renewals {
        let _ = writeln!(
            out,
            "  renewals: {} events ({} by the metrics), {} failed, {} lost, {} events missed by the receiver",
            thousands(r.events as f64),
            thousands(r.metrics_renewed as f64),
            r.renew_failed,
            r.lost,
            r.events_missed,
        );
        if let Some(f) = &r.following {
            let _ = writeln!(
                out,
                "  following a shared lease: on time {} of {} keys ({:.2}%), least time left before a deadline {:.2} s (every key, every 5 s) and {:.2} s (one key, every 50 ms; limit ttl/2 = {:.1} s); reading them took {:.2} s, left out",
                thousands(r.keys_on_time as f64),
                thousands(held.locks as f64),
                r.on_time_pct,
                f.min_headroom_s,
                f.probe_min_headroom_s,
                held.ttl_s / 2.0,
                f.probe_cpu_s,
            );
        } else {
            let _ = writeln!(
                out,
                "  on time: {} of {} keys ({:.2}%), longest gap {:.2} s (limit ttl/2 = {:.1} s)",
                thousands(r.keys_on_time as f64),
                thousands(held.locks as f64),
                r.on_time_pct,
                r.max_gap_s,
                held.ttl_s / 2.0,
            );
        }
    }
    let _ = writeln!(out, "  released all and stopped in {:.2} s", held.release_s);
    out
}

pub fn targets_table(targets: &[Target]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "targets (printed, not asserted)");
    for t in targets {
        let verdict = if t.met { "PASS" } else { "MISS" };
        let _ = writeln!(
            out,
            "  {verdict}  {:<62} {:<20} measured {}",
            t.what, t.goal, t.measured
        );
    }
    out
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if value < 0.0 {
        out.insert(0, '-');
    }
    out
}
