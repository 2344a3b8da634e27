//! A semaphore's safety checked from outside the library, under faults, as `tests/safety.rs`
//! checks a lock's.
//!
//! Workers take permits of one semaphore of [`PERMITS`] on one real Redis server, with
//! `acquire` and `try_acquire`: two per lock manager in this process (two managers, two
//! nodes) and two in a second OS process (this test binary, started again to run an
//! `#[ignore]`d child entry: `support/child.rs`). Each records the interval in which the
//! library told it the permit was held. Meanwhile a watcher reads the store itself, again and
//! again: the sorted set of the semaphore's leases (`P{K}:permits`, see
//! `src/backend/redis/semaphore.rs`), each member live while its score (its expiry, server
//! milliseconds) is after the server's `TIME`, read in the same script. Mid-run Redis is
//! paused past the ttl, or killed and restarted without its data; the history must still show
//! (the shared checker, `leasehold_test_support::safety`):
//! - never more than N holders at once, by the holders' account and by the store's;
//! - tokens as DESIGN.md's table of lease kinds promises a semaphore's: strictly increasing
//!   per name in the order they are handed out (an acquisition asked after a permit was seen
//!   held gets a greater token), and none handed out twice;
//! - every lease in the store one permit of a semaphore of N.
//!
//! Every contender's backend has a restart quarantine of one ttl, as in `tests/safety.rs`:
//! without it a restart that loses the data lets new holders in beside the ones still told
//! "held".

#[path = "support/child.rs"]
mod child;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use child::{report, var, ChildTest};
use leasehold::testing::{start, unique_key};
use leasehold::{Error, LockClient, LockOptions, RedisBackend, Semaphore, Wait};
use leasehold_test_support::resp::{self, Resp};
use leasehold_test_support::safety::{
    self, from_nanos, nanos, Fault, History, Hold, StoreLooks, Tally,
};
use leasehold_test_support::RedisServer;
use tokio::time::timeout;

/// The semaphore's N.
const PERMITS: u32 = 3;
/// The lease of every permit.
const TTL: Duration = Duration::from_secs(1);
/// How long a run lasts, fault included.
const RUN_FOR: Duration = Duration::from_secs(8);
/// How long one `acquire()` may wait before the worker asks again.
const WAIT_BUDGET: Duration = Duration::from_secs(2);
/// The pause after a retryable error, or a `try_acquire` that found no permit free, before
/// asking again (a backoff, not a wait for a state).
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// A long hold: past one renewal, and past the deadline of a holder whose renewals stopped.
const LONG_HOLD: Duration = Duration::from_millis(1500);
/// How often a holder asks `is_held()` while it works.
const LOOK_EVERY: Duration = Duration::from_millis(5);
/// How often the watcher reads the store.
const WATCH_EVERY: Duration = Duration::from_millis(2);
/// Workers per node, in each process.
const WORKERS_PER_NODE: usize = 2;
/// A child has to start (a fresh test binary), connect and report within this.
const CHILD_REPORTS_WITHIN: Duration = Duration::from_secs(30);

const CHILD_CONTENDER: &str = "child_permit_contender";

/// What the parent tells the child.
const ENV_REDIS: &str = "LEASEHOLD_SAFETY_SEMAPHORE_REDIS_URL";
const ENV_NAME: &str = "LEASEHOLD_SAFETY_SEMAPHORE_NAME";
/// The end of the run, in nanoseconds since the Unix epoch: both processes read the same wall
/// clock, so they stop together.
const ENV_RUN_UNTIL: &str = "LEASEHOLD_SAFETY_SEMAPHORE_RUN_UNTIL_NANOS";

/// Each look at the store, in one atomic step: the server's `TIME` (seconds, microseconds)
/// and the leases live then, by the rule the semaphore's scripts keep (a member is live while
/// its score, in milliseconds, is after now).
const LOOK: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', now), '+inf')
return { t[1], t[2], live }";

// ---------------------------------------------------------------------------------------------
// The runs.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_n_permit_holders_when_redis_is_paused_past_the_ttl() {
    contend_through(Fault::PauseRedis).await;
}

/// Redis without persistence forgets every permit when it restarts; the quarantine keeps the
/// permits from anyone until their holders have learned that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_n_permit_holders_when_redis_restarts_without_data() {
    contend_through(Fault::RestartRedisWithoutData).await;
}

/// What the in-process workers share with the fault injector.
#[derive(Default)]
struct Progress {
    holds: Mutex<Vec<Hold>>,
    in_long_hold: AtomicUsize,
}

async fn contend_through(fault: Fault) {
    let mut server = RedisServer::start();
    let name = unique_key("safety-semaphore");
    let started = SystemTime::now();
    let until = started + RUN_FOR;
    let backend = server.backend().await.with_restart_quarantine(TTL);
    let leases = format!("{}:permits", backend.lock_key(&name));
    let nodes = [
        start(backend).await,
        start(server.backend().await.with_restart_quarantine(TTL)).await,
    ];
    let watcher = Watcher::start(server.port(), leases);
    let child = ChildTest::spawn(
        CHILD_CONTENDER,
        &[
            (ENV_REDIS, server.url()),
            (ENV_NAME, name.clone()),
            (ENV_RUN_UNTIL, nanos(until).to_string()),
        ],
    );
    let progress = Arc::new(Progress::default());
    let mut workers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let semaphore = node.semaphore(&name, PERMITS).expect("a valid semaphore");
        for w in 0..WORKERS_PER_NODE {
            let (semaphore, progress) = (semaphore.clone(), progress.clone());
            let worker = format!("node{n}-worker{w}");
            workers.push(tokio::spawn(async move {
                contend(&semaphore, &worker, until, &progress, |hold| {
                    progress.holds.lock().unwrap().push(hold)
                })
                .await
            }));
        }
    }

    // Strike while a long hold is under way, so the fault hits held permits, not only waiters.
    let strike = async {
        while progress.in_long_hold.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(LOOK_EVERY).await;
        }
    };
    if timeout(RUN_FOR / 2, strike).await.is_err() {
        let holds = progress.holds.lock().unwrap().clone();
        panic!(
            "no long hold under way within {:?}\n{}\n{}",
            RUN_FOR / 2,
            History::of_semaphore(started, PERMITS as usize, holds, Vec::new()),
            child.output()
        );
    }
    let (fault_from, fault_to) = fault.strike(&mut server, TTL).await;

    let mut tally = Tally::default();
    for worker in workers {
        tally.add(&worker.await.expect("worker task"));
    }
    let mut holds = std::mem::take(&mut *progress.holds.lock().unwrap());
    let reports = child.finish(RUN_FOR + CHILD_REPORTS_WITHIN).await;
    let child_holds = safety::gather(&reports, &mut holds, &mut tally);
    let looked = watcher.stop();
    for node in &nodes {
        node.shutdown().await;
    }

    let history = History::of_semaphore(started, PERMITS as usize, holds, looked.looks.leases());
    let shown = Shown {
        fault: format!(
            "{fault:?} from {} to {}",
            history.at(fault_from),
            history.at(fault_to)
        ),
        history: &history,
    };
    let mut violations = history.violations();
    violations.extend(looked.odd_members);
    assert!(
        violations.is_empty(),
        "{}",
        safety::verdict(&violations, &shown)
    );
    // The run has to have tested something: enough holds, the other process among them, the
    // store showing all N permits taken at once (so "at most N" was at stake), a hold cut
    // short by the fault, and holds again once it was over.
    assert!(history.holds.len() >= 10, "too few holds\n{shown}");
    assert!(
        child_holds >= 1,
        "the child process never held a permit\n{shown}"
    );
    assert_eq!(
        looked.looks.most_at_once, PERMITS as usize,
        "the store never showed all {PERMITS} permits taken at once ({} looks)\n{shown}",
        looked.looks.looks
    );
    let overtaken = history.cut_short_by(fault_from);
    assert!(overtaken, "no hold was cut short by the fault\n{shown}");
    let after = history.began_after(fault_to);
    assert!(after >= 1, "no hold after the fault\n{shown}");
    eprintln!(
        "{fault:?}: {} holds ({child_holds} by the child), {} leases seen in {} looks at the \
         store, tally {tally:?}",
        history.holds.len(),
        history.store.len(),
        looked.looks.looks
    );
}

/// The run, for a reader when it fails.
struct Shown<'a> {
    fault: String,
    history: &'a History,
}

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "fault: {}", self.fault)?;
        write!(f, "{}", self.history)
    }
}

/// One worker's loop until `until`: take a permit (`acquire`, and every third time
/// `try_acquire`), hold it a while, release it. Every hold is handed to `report` as it ends.
async fn contend(
    semaphore: &Semaphore,
    name: &str,
    until: SystemTime,
    progress: &Progress,
    mut report: impl FnMut(Hold),
) -> Tally {
    let options = LockOptions::new()
        .with_ttl(TTL)
        .with_wait(Wait::UpTo(WAIT_BUDGET));
    let mut tally = Tally::default();
    let mut round: u64 = 0;
    let mut asks: u64 = 0;
    while SystemTime::now() < until {
        asks += 1;
        let asked = SystemTime::now();
        let taken = if asks.is_multiple_of(3) {
            semaphore.try_acquire(options.clone()).await
        } else {
            semaphore.acquire(options.clone()).await.map(Some)
        };
        let guard = match taken {
            Ok(Some(guard)) => guard,
            // Every permit taken: other work, then ask again.
            Ok(None) => {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            // The permits stayed taken, or the store is paused, restarting or reconnecting:
            // the next attempt may succeed.
            Err(Error::Timeout { .. }) => {
                tally.timeouts += 1;
                continue;
            }
            Err(e) if e.is_retryable() => {
                tally.store_errors += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            Err(e) => panic!("{name}: a permit of {semaphore:?} failed for good: {e}"),
        };
        // Every fourth hold is long enough to span renewals, and a fault.
        let long = round % 4 == 1;
        let work = if long {
            LONG_HOLD
        } else {
            Duration::from_millis(rand::random_range(0..20))
        };
        round += 1;
        if long {
            progress.in_long_hold.fetch_add(1, Ordering::SeqCst);
        }
        let hold = safety::hold_on(guard, asked, name, work, LOOK_EVERY).await;
        if long {
            progress.in_long_hold.fetch_sub(1, Ordering::SeqCst);
        }
        report(hold);
        // Other work between holds, so waiters on the other nodes get their turn.
        tokio::time::sleep(Duration::from_millis(rand::random_range(2..10))).await;
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// The store's account.

/// Reads the semaphore's leases in the store, on a thread of its own, until stopped. Each look
/// is a new connection with a read timeout (`resp::command`), so a paused or restarting server
/// costs looks, never a hang.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Looked>,
}

/// What the watcher saw.
struct Looked {
    looks: StoreLooks,
    /// Members that are not one permit of a semaphore of [`PERMITS`].
    odd_members: Vec<String>,
}

impl Watcher {
    fn start(port: u16, leases: String) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut looked = Looked {
                looks: StoreLooks::default(),
                odd_members: Vec::new(),
            };
            while !stopped.load(Ordering::SeqCst) {
                if let Ok(reply) = resp::command(port, &["EVAL", LOOK, "1", &leases]) {
                    looked.add(&reply);
                }
                // The rate of looks, not a wait for a state.
                std::thread::sleep(WATCH_EVERY);
            }
            looked
        });
        Watcher { stop, thread }
    }

    fn stop(self) -> Looked {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the watcher")
    }
}

impl Looked {
    fn add(&mut self, reply: &Resp) {
        let [seconds, micros, live] = reply.items() else {
            panic!("the look answered {reply:?}");
        };
        let number = |part: &Resp| -> u64 {
            part.text()
                .and_then(|text| text.parse().ok())
                .unwrap_or_else(|| panic!("the look answered {reply:?}"))
        };
        let at = UNIX_EPOCH
            + Duration::from_secs(number(seconds))
            + Duration::from_micros(number(micros));
        let mut leases = Vec::new();
        for member in live.items() {
            // "<owner>:<k>:<N>:<token>"
            let member = member.text().expect("a member");
            let parts: Vec<&str> = member.split(':').collect();
            let parsed = match parts[..] {
                [owner, k, n, token] => Some((owner, k, n, token.parse::<u64>().ok())),
                _ => None,
            };
            match parsed {
                Some((owner, "1", n, Some(token))) if n == PERMITS.to_string() => {
                    leases.push((token, owner.to_owned()));
                }
                _ => self.odd_members.push(format!(
                    "the store holds {member:?}, not one permit of {PERMITS}"
                )),
            }
        }
        self.looks.add(at, &leases);
    }
}

// ---------------------------------------------------------------------------------------------
// The child process.

/// Contends like the in-process workers, on a node of its own, and reports each hold on
/// stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the semaphore safety tests; started by them"]
async fn child_permit_contender() {
    let url = var(ENV_REDIS);
    let name = var(ENV_NAME);
    let until = from_nanos(var(ENV_RUN_UNTIL).parse().expect(ENV_RUN_UNTIL));
    let backend = RedisBackend::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let node: LockClient = start(backend.with_restart_quarantine(TTL)).await;
    let semaphore = node.semaphore(&name, PERMITS).expect("a valid semaphore");
    let mut workers = Vec::new();
    for w in 0..WORKERS_PER_NODE {
        let semaphore = semaphore.clone();
        workers.push(tokio::spawn(async move {
            let worker = format!("child-worker{w}");
            contend(&semaphore, &worker, until, &Progress::default(), |hold| {
                report(&hold.line())
            })
            .await
        }));
    }
    let mut tally = Tally::default();
    for worker in workers {
        tally.add(&worker.await.expect("worker task"));
    }
    report(&tally.line());
    node.shutdown().await;
}
