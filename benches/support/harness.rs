//! The measurements both store benches share: throughput of back-to-back cycles, and
//! contended handoff (tasks take turns on one key; the gap from each release to the next
//! holder's acquisition is what is reported).
//!
//! Included with `#[path = "support/harness.rs"] mod harness;` (no `mod.rs`: clippy's
//! `mod_module_files` is on).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold::{LockClient, LockOptions, Wait};

/// Tasks taking turns on the handoff key.
pub const HANDOFF_TASKS: usize = 16;
/// How long each turn holds the key.
pub const HOLD: Duration = Duration::from_millis(1);

/// Cycles per second of each contender with `tasks` concurrent tasks, each running
/// `cycle(contender, task)` back to back. The contenders take short turns in rotating order,
/// `rounds` times, so that a change in the machine's background load falls on every one alike
/// instead of on whichever ran at that moment.
pub async fn rates<C, F, Fut>(
    contenders: &[C],
    tasks: usize,
    rounds: usize,
    (warmup, measure): (Duration, Duration),
    cycle: F,
) -> Vec<f64>
where
    C: Clone + Send + Sync + 'static,
    F: Fn(C, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let mut cycles = vec![0u64; contenders.len()];
    for round in 0..rounds {
        for turn in 0..contenders.len() {
            let i = (round + turn) % contenders.len();
            let (contender, cycle) = (contenders[i].clone(), cycle.clone());
            let one = move |task| cycle(contender.clone(), task);
            cycles[i] += throughput(tasks, warmup, measure, one).await;
        }
    }
    let seconds = (measure * rounds as u32).as_secs_f64();
    cycles.into_iter().map(|n| n as f64 / seconds).collect()
}

/// Cycles completed within `measure`, after `warmup`, by `tasks` tasks each running
/// `cycle(task)` back to back.
async fn throughput<F, Fut>(tasks: usize, warmup: Duration, measure: Duration, cycle: F) -> u64
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let started = Instant::now();
    let (from, to) = (started + warmup, started + warmup + measure);
    let workers: Vec<_> = (0..tasks)
        .map(|task| {
            let cycle = cycle.clone();
            tokio::spawn(async move {
                let mut counted = 0u64;
                loop {
                    cycle(task).await;
                    let now = Instant::now();
                    if now >= to {
                        return counted;
                    }
                    if now >= from {
                        counted += 1;
                    }
                }
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker.await.expect("bench task");
    }
    total
}

/// One holder's turn: when it got the lock, and when it let go.
#[derive(Clone, Copy)]
pub struct Turn {
    pub acquired: Instant,
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
    pub gaps: Vec<Duration>,
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
