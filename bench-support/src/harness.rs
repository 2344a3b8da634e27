//! The measurements the store benches and the load test share: throughput of back-to-back
//! cycles, with CPU per cycle on both sides and the latency of each cycle; and contended
//! handoff (tasks take turns on one key; the gap from each release to the next holder's
//! acquisition is what is reported).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold::{Acquisition, LockBackend, LockClient, LockOptions, OwnerToken, Wait};

use crate::cpu;

/// Tasks taking turns on the handoff key.
pub const HANDOFF_TASKS: usize = 16;
/// How long each turn holds the key.
pub const HOLD: Duration = Duration::from_millis(1);

/// How long each contender's turn is: `warmup` (tasks started, nothing counted), then
/// `measure` (cycles, CPU and latencies counted).
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Time for the tasks to start and the connections to warm before counting.
    pub warmup: Duration,
    /// The counted part.
    pub measure: Duration,
}

/// One contender's figures at one concurrency: the median over the rounds of each figure.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// lock+release cycles per second, all tasks together.
    pub cycles_per_sec: f64,
    /// CPU time (user + system) of this process per cycle, in µs.
    pub client_cpu_us: f64,
    /// CPU time of the server process per cycle, in µs, when its pid was given.
    pub server_cpu_us: Option<f64>,
    /// Median time of one cycle, in µs: measured with one task only (uncontended).
    pub p50_us: Option<f64>,
    /// 99th percentile time of one cycle, in µs: measured with one task only.
    pub p99_us: Option<f64>,
    /// How many rounds the medians are over.
    pub rounds: usize,
}

/// What one turn of one contender measured.
struct Sample {
    cycles_per_sec: f64,
    client_cpu_us: f64,
    server_cpu_us: Option<f64>,
    latency_us: Option<(f64, f64)>,
}

/// Measures each contender with `tasks` concurrent tasks, each running `cycle(contender,
/// task)` back to back on a key of the task's own. The contenders take short turns (one
/// [`Window`] each) in an order that rotates every round, `rounds` times, so that a change in
/// the machine's background load falls on every one alike; each figure is the median of the
/// rounds. `servers[i]` holds the pids of the server processes contender `i` talks to: their
/// CPU times are read from `/proc` and summed (every node of a replicated store does work for
/// each cycle); none, and its server CPU is not measured. With one task, each cycle is timed
/// too (p50, p99).
///
/// All contenders run in this one process, one at a time: the process CPU time of a window is
/// the contender's (plus the runtime's idle overhead).
pub async fn measure<C, F, Fut>(
    contenders: &[C],
    servers: &[Vec<u32>],
    tasks: usize,
    rounds: usize,
    window: Window,
    cycle: F,
) -> Vec<Figures>
where
    C: Clone + Send + Sync + 'static,
    F: Fn(C, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    assert_eq!(
        contenders.len(),
        servers.len(),
        "one list of server pids per contender"
    );
    let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for turn in 0..contenders.len() {
            let i = (round + turn) % contenders.len();
            let (contender, cycle) = (contenders[i].clone(), cycle.clone());
            let one = move |task| cycle(contender.clone(), task);
            samples[i].push(turn_of(tasks, window, &servers[i], one).await);
        }
    }
    samples
        .iter()
        .map(|samples| Figures {
            cycles_per_sec: median(samples.iter().map(|s| s.cycles_per_sec)).unwrap_or(0.0),
            client_cpu_us: median(samples.iter().map(|s| s.client_cpu_us)).unwrap_or(0.0),
            server_cpu_us: median(samples.iter().filter_map(|s| s.server_cpu_us)),
            p50_us: median(samples.iter().filter_map(|s| s.latency_us.map(|l| l.0))),
            p99_us: median(samples.iter().filter_map(|s| s.latency_us.map(|l| l.1))),
            rounds: samples.len(),
        })
        .collect()
}

/// Cycles per second of each contender: [`measure`] without the server's CPU.
pub async fn rates<C, F, Fut>(
    contenders: &[C],
    tasks: usize,
    rounds: usize,
    (warmup, measure_for): (Duration, Duration),
    cycle: F,
) -> Vec<f64>
where
    C: Clone + Send + Sync + 'static,
    F: Fn(C, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let servers = vec![Vec::new(); contenders.len()];
    let window = Window {
        warmup,
        measure: measure_for,
    };
    measure(contenders, &servers, tasks, rounds, window, cycle)
        .await
        .into_iter()
        .map(|f| f.cycles_per_sec)
        .collect()
}

/// One turn: `tasks` tasks run `cycle(task)` back to back; after the warmup, this task reads
/// the cycle count and both CPU clocks, sleeps through the window, and reads them again.
async fn turn_of<F, Fut>(tasks: usize, window: Window, servers: &[u32], cycle: F) -> Sample
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let cycles = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Timing each cycle only pays with one task: it is the uncontended latency.
    let timing = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..tasks)
        .map(|task| {
            let (cycle, cycles, stop, timing) =
                (cycle.clone(), cycles.clone(), stop.clone(), timing.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    cycle(task).await;
                    if tasks == 1 && timing.load(Ordering::Relaxed) {
                        latencies.push(started.elapsed());
                    }
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(window.warmup).await;
    let read = || {
        let server = servers_cpu(servers);
        (
            Instant::now(),
            cycles.load(Ordering::Relaxed),
            cpu::process(),
            server,
        )
    };
    timing.store(true, Ordering::Relaxed);
    let (from, cycles_from, client_from, server_from) = read();
    tokio::time::sleep(window.measure).await;
    let (to, cycles_to, client_to, server_to) = read();
    timing.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("bench task"));
    }
    let counted = (cycles_to - cycles_from).max(1) as f64;
    let per_cycle = |d: Duration| d.as_secs_f64() * 1e6 / counted;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Sample {
        cycles_per_sec: (cycles_to - cycles_from) as f64 / (to - from).as_secs_f64(),
        client_cpu_us: per_cycle(client_to.saturating_sub(client_from)),
        server_cpu_us: server_from
            .zip(server_to)
            .map(|(from, to)| per_cycle(to.saturating_sub(from))),
        latency_us: (!latencies.is_empty()).then(|| (us(at(0.5)), us(at(0.99)))),
    }
}

/// The CPU time of the processes `pids` so far, summed; `None` if there are none, or one is
/// gone (a sum without it would not be the servers' work).
fn servers_cpu(pids: &[u32]) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| cpu::of_process(pid)).sum()
}

/// The median of `values`, `None` if there are none.
pub fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// One lock+release cycle straight on `backend`, without leasehold's actors: `acquire` with a
/// fresh owner token, then `release` of the lease it returned — the store calls (scripts,
/// transactions) the library makes, and nothing around them.
pub async fn backend_cycle(backend: &dyn LockBackend, key: &str, ttl: Duration) {
    let acquired = backend
        .acquire(key, OwnerToken::random(), ttl, None)
        .await
        .unwrap_or_else(|e| panic!("{} acquire {key}: {e}", backend.kind()));
    let Acquisition::Acquired(lease) = acquired else {
        panic!("{key} is a key of its own, and free: {acquired:?}");
    };
    let released = backend
        .release(&lease)
        .await
        .unwrap_or_else(|e| panic!("{} release {key}: {e}", backend.kind()));
    assert!(released, "the release finds our own lease");
}

/// One holder's turn: when it got the lock, and when it let go.
#[derive(Clone, Copy)]
pub struct Turn {
    /// When the lock was granted.
    pub acquired: Instant,
    /// When the holder let go (its release was sent).
    pub released: Instant,
}

impl Turn {
    /// Holds for [`HOLD`] from now (the lock was just acquired), then runs `release`.
    pub async fn hold<R: Future>(release: impl FnOnce() -> R) -> Turn {
        let acquired = Instant::now();
        tokio::time::sleep(HOLD).await;
        let released = Instant::now();
        release().await;
        Turn { acquired, released }
    }
}

/// A turn through leasehold: wait for the shared key, hold it, release it.
pub async fn leasehold_turn(client: LockClient, ttl: Duration) -> Turn {
    let opts = LockOptions::new()
        .with_ttl(ttl)
        .with_wait(Wait::UpTo(Duration::from_secs(60)));
    let guard = client
        .lock("bench/handoff/leasehold", opts)
        .await
        .expect("lock");
    Turn::hold(|| async { guard.release().await.expect("release") }).await
}

/// How the turns went: each release → next acquisition gap where the lock went to another task,
/// and how many times a task took the lock straight back instead.
pub struct Handoffs {
    /// Release → next acquisition, for each turn that went to another task.
    pub gaps: Vec<Duration>,
    /// Turns the releasing task took straight back.
    pub retakes: usize,
}

/// Runs [`HANDOFF_TASKS`] tasks, each taking turns (`turn(task)`) until `budget` is over.
pub async fn handoff<F, Fut>(budget: Duration, turn: F) -> Handoffs
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Turn> + Send,
{
    let stop = Instant::now() + budget;
    let turns = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..HANDOFF_TASKS)
        .map(|task| {
            let (turn, turns) = (turn.clone(), turns.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    let taken = turn(task).await;
                    turns.lock().unwrap().push((task, taken));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("handoff task");
    }
    let mut turns = std::mem::take(&mut *turns.lock().unwrap());
    turns.sort_by_key(|(_, turn)| turn.acquired);
    let mut handoffs = Handoffs {
        gaps: Vec::new(),
        retakes: 0,
    };
    for pair in turns.windows(2) {
        let ((before_task, before), (after_task, after)) = (pair[0], pair[1]);
        assert!(
            after.acquired >= before.released,
            "two holders of the handoff key at once"
        );
        if before_task == after_task {
            handoffs.retakes += 1;
        } else {
            handoffs.gaps.push(after.acquired - before.released);
        }
    }
    handoffs
}

impl Handoffs {
    /// The median and 99th percentile of the gaps; `None` if no turn went to another task.
    pub fn median_p99(&self) -> Option<(Duration, Duration)> {
        let mut gaps = self.gaps.clone();
        if gaps.is_empty() {
            return None;
        }
        gaps.sort();
        let median = gaps[gaps.len() / 2];
        let p99 = gaps[(gaps.len() * 99 / 100).min(gaps.len() - 1)];
        Some((median, p99))
    }
}

/// Prints one line: the handoff gaps' median and p99, and how many turns were counted.
pub fn report(name: &str, handoffs: &Handoffs) {
    let Some((median, p99)) = handoffs.median_p99() else {
        println!("{name:<30} no handoffs");
        return;
    };
    println!(
        "{name:<30} median {:>8.3} ms   p99 {:>8.3} ms   ({} handoffs to another task, {} retakes by the same task)",
        median.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        handoffs.gaps.len(),
        handoffs.retakes,
    );
}

/// Prints one table of a run: a row per contender (`names[i]` for `figures[i]`), under a
/// heading that names the concurrency (`"memory, 64 tasks"`) and the server column (`"server"`
/// or, for a whole cluster, `"cluster"`).
pub fn print_figures(heading: &str, server: &str, names: &[&str], figures: &[Figures]) {
    println!();
    println!(
        "{heading:<38}{:>10}{:>15}{:>15}{:>9}{:>9}",
        "cycles/s",
        "client µs/cyc",
        format!("{server} µs/cyc"),
        "p50 µs",
        "p99 µs"
    );
    let opt = |v: Option<f64>, width: usize, digits: usize| match v {
        Some(v) => format!("{v:>width$.digits$}"),
        None => format!("{:>width$}", "-"),
    };
    for (name, f) in names.iter().zip(figures) {
        println!(
            "  {name:<36}{:>10.0}{:>15.1}{}{}{}",
            f.cycles_per_sec,
            f.client_cpu_us,
            opt(f.server_cpu_us, 15, 1),
            opt(f.p50_us, 9, 0),
            opt(f.p99_us, 9, 0),
        );
    }
}

/// `"1 task"`, `"64 tasks"`.
pub fn tasks_label(tasks: usize) -> String {
    format!("{tasks} task{}", if tasks == 1 { "" } else { "s" })
}

/// The first contender's ratios to the others, a column per concurrency: `rows` holds each
/// concurrency's figures, contender 0 first.
pub struct Ratios<'a> {
    rows: &'a [(usize, Vec<Figures>)],
}

impl<'a> Ratios<'a> {
    /// Prints the heading line (the concurrencies) under `title`.
    pub fn new(title: &str, rows: &'a [(usize, Vec<Figures>)]) -> Self {
        println!();
        let header: String = rows.iter().map(|(t, _)| format!("{t:>9}")).collect();
        println!("{title:<58}{header}  (tasks)");
        Ratios { rows }
    }

    /// One line: `of(contender 0) / of(contender peer)` at each concurrency.
    pub fn line(&self, name: &str, of: impl Fn(&Figures) -> Option<f64>, peer: usize) {
        let row: String = self
            .rows
            .iter()
            .map(|(_, f)| match (of(&f[0]), of(&f[peer])) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:>9.2}", a / b),
                _ => format!("{:>9}", "-"),
            })
            .collect();
        println!("  {name:<56}{row}");
    }

    /// The uncontended (1 task) p50 and p99 of contender 0 against contenders 1 and 2.
    pub fn uncontended(&self) {
        let Some((_, one)) = self.rows.iter().find(|(t, _)| *t == 1) else {
            return;
        };
        let p = |f: &Figures| f.p50_us.zip(f.p99_us);
        if let (Some((a50, a99)), Some((b50, b99)), Some((c50, c99))) =
            (p(&one[0]), p(&one[1]), p(&one[2]))
        {
            println!(
                "  uncontended cycle, 1 task: p50 a/b {:.2}, a/c {:.2}; p99 a/b {:.2}, a/c {:.2}",
                a50 / b50,
                a50 / c50,
                a99 / b99,
                a99 / c99
            );
        }
    }
}
