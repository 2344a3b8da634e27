//! A read-write lock's safety checked from outside the library, under faults, as
//! `tests/safety.rs` checks a lock's and `tests/safety_semaphore.rs` a semaphore's.
//!
//! Workers take read shares and the write hold of one read-write lock on one real Redis
//! server, with `read`/`write` (a wait budget) and `try_read`/`try_write`: two per lock
//! manager in this process (two managers, two nodes) and two in a second OS process (this test
//! binary, started again to run an `#[ignore]`d child entry: `support/child.rs`). Each records
//! the interval in which the library told it the share or hold was held. Meanwhile a watcher
//! reads the store itself, again and again, in one script per look (see
//! `src/backend/redis/rwlock.rs`): the server's `TIME`, the readers' sorted set
//! `P{K}:rw-readers` (a member live while its score, its expiry in server milliseconds, is
//! after that time), the writer's key `P{K}:rw-writer` and its `PTTL`, and the fence counter
//! `P{K}:rw-fence`. Mid-run Redis is paused past the ttl, or killed and restarted without its
//! data; the history must still show (the shared checker, `leasehold_test_support::safety`):
//! - no write hold at once with any other hold, read or write, by the holders' account and by
//!   the store's;
//! - tokens as DESIGN.md's table of lease kinds promises a read-write lock's: a writer's token
//!   greater than every token handed out before it was asked for (every token seen held by a
//!   holder, and every value the store's fence counter showed, before then), and no token
//!   handed out twice;
//! - the writer's key in the store always with a ttl.
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
use leasehold::{Error, LockClient, LockOptions, RedisBackend, RwLock, Wait};
use leasehold_test_support::resp::{self, Resp};
use leasehold_test_support::safety::{
    self, from_nanos, nanos, Fault, History, Hold, Kind, Live, StoreLooks, Tally,
};
use leasehold_test_support::RedisServer;
use tokio::time::timeout;

/// The lease of every share and hold.
const TTL: Duration = Duration::from_secs(1);
/// How long a run lasts, fault included.
const RUN_FOR: Duration = Duration::from_secs(8);
/// How long one `read()` or `write()` may wait before the worker asks again.
const WAIT_BUDGET: Duration = Duration::from_secs(2);
/// The pause after a retryable error, or a `try_*` that was refused, before asking again (a
/// backoff, not a wait for a state).
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

const CHILD_CONTENDER: &str = "child_rw_contender";

/// What the parent tells the child.
const ENV_REDIS: &str = "LEASEHOLD_SAFETY_RWLOCK_REDIS_URL";
const ENV_NAME: &str = "LEASEHOLD_SAFETY_RWLOCK_NAME";
/// The end of the run, in nanoseconds since the Unix epoch: both processes read the same wall
/// clock, so they stop together.
const ENV_RUN_UNTIL: &str = "LEASEHOLD_SAFETY_RWLOCK_RUN_UNTIL_NANOS";

/// Each look at the store, in one atomic step: the server's `TIME` (seconds, microseconds);
/// the read shares live then, by the rule the read-write lock's scripts keep (a member is live
/// while its score, in milliseconds, is after now); the writer's owner token (or nil) and its
/// `PTTL`; the fence counter (or nil).
const LOOK: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local readers = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', now), '+inf')
return { t[1], t[2], readers, redis.call('GET', KEYS[2]), redis.call('PTTL', KEYS[2]),
  redis.call('GET', KEYS[3]) }";

// ---------------------------------------------------------------------------------------------
// The runs.

/// The fault strikes while a long write hold is under way: the writer's lease runs out while
/// Redis is frozen, and readers and writers waiting behind it must not get in before it has
/// been told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writer_beside_another_hold_when_redis_is_paused_past_the_ttl() {
    contend_through(Fault::PauseRedis, Kind::Exclusive).await;
}

/// Redis without persistence forgets every share, hold and intent when it restarts (and the
/// fence counter: the next one is seeded from the clock); the quarantine keeps the lock from
/// anyone until the readers in when it struck have learned that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_writer_beside_another_hold_when_redis_restarts_without_data() {
    contend_through(Fault::RestartRedisWithoutData, Kind::Shared).await;
}

/// What the in-process workers share with the fault injector.
#[derive(Default)]
struct Progress {
    holds: Mutex<Vec<Hold>>,
    /// Long read holds under way, and long write holds.
    long_reads: AtomicUsize,
    long_writes: AtomicUsize,
    /// Holds taken with `try_read` or `try_write`.
    tried: AtomicUsize,
}

impl Progress {
    fn long(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::Shared => &self.long_reads,
            Kind::Exclusive => &self.long_writes,
        }
    }
}

/// A run with `fault`, struck while a long hold of `kind` is under way.
async fn contend_through(fault: Fault, kind: Kind) {
    let mut server = RedisServer::start();
    let name = unique_key("safety-rwlock");
    let started = SystemTime::now();
    let until = started + RUN_FOR;
    let backend = server.backend().await.with_restart_quarantine(TTL);
    let lock = backend.lock_key(&name);
    let keys = [
        format!("{lock}:rw-readers"),
        format!("{lock}:rw-writer"),
        format!("{lock}:rw-fence"),
    ];
    let nodes = [
        start(backend).await,
        start(server.backend().await.with_restart_quarantine(TTL)).await,
    ];
    let watcher = Watcher::start(server.port(), keys);
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
        let rwlock = node.rwlock(&name).expect("a valid read-write lock");
        for w in 0..WORKERS_PER_NODE {
            let (rwlock, progress) = (rwlock.clone(), progress.clone());
            let worker = format!("node{n}-worker{w}");
            workers.push(tokio::spawn(async move {
                // The first worker's first hold is the long one the fault strikes in.
                let first = (n, w) == (0, 0);
                let first = first.then_some(kind);
                contend(&rwlock, &worker, w, first, until, &progress, |hold| {
                    progress.holds.lock().unwrap().push(hold)
                })
                .await
            }));
        }
    }

    // Strike while a long hold of `kind` is under way, so the fault hits held leases, not
    // only waiters.
    let strike = async {
        while progress.long(kind).load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(LOOK_EVERY).await;
        }
    };
    if timeout(RUN_FOR / 2, strike).await.is_err() {
        let holds = progress.holds.lock().unwrap().clone();
        panic!(
            "no long {} hold under way within {:?}\n{}\n{}",
            kind.name(),
            RUN_FOR / 2,
            History::of_rwlock(started, holds, Vec::new(), Vec::new()),
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
    let first_child_hold = holds.len();
    let child_holds = safety::gather(&reports, &mut holds, &mut tally);
    let child_writes = holds[first_child_hold..]
        .iter()
        .filter(|hold| hold.kind == Kind::Exclusive)
        .count();
    let looked = watcher.stop();
    for node in &nodes {
        node.shutdown().await;
    }

    let history = History::of_rwlock(
        started,
        holds,
        looked.looks.leases(),
        looked.looks.counter(),
    );
    let shown = Shown {
        fault: format!(
            "{fault:?}, struck in a long {} hold, from {} to {}",
            kind.name(),
            history.at(fault_from),
            history.at(fault_to)
        ),
        history: &history,
    };
    let mut violations = history.violations();
    violations.extend(looked.odd);
    assert!(
        violations.is_empty(),
        "{}",
        safety::verdict(&violations, &shown)
    );
    // The run has to have tested something: enough holds of each kind, the other process
    // among them, the store showing readers sharing and a writer, a hold of the kind struck
    // cut short by the fault, and holds again once it was over.
    let count = |kind: Kind| history.holds.iter().filter(|h| h.kind == kind).count();
    let (reads, writes) = (count(Kind::Shared), count(Kind::Exclusive));
    assert!(reads >= 10, "too few read holds\n{shown}");
    assert!(writes >= 5, "too few write holds\n{shown}");
    assert!(
        child_holds >= 1 && child_writes >= 1,
        "the child process held no share or no write hold\n{shown}"
    );
    assert!(
        looked.most_readers >= 2,
        "the store never showed two read shares at once ({} looks)\n{shown}",
        looked.looks.looks
    );
    assert!(
        history
            .store
            .iter()
            .any(|lease| lease.kind == Kind::Exclusive),
        "the store never showed a writer ({} looks)\n{shown}",
        looked.looks.looks
    );
    let cut = history.holds.iter().any(|hold| {
        hold.kind == kind
            && hold.outcome != safety::Outcome::Released
            && hold.from.is_some_and(|from| from < fault_from)
    });
    assert!(
        cut,
        "no {} hold was cut short by the fault\n{shown}",
        kind.name()
    );
    let after = history.began_after(fault_to);
    assert!(after >= 1, "no hold after the fault\n{shown}");
    eprintln!(
        "{fault:?}: {} holds ({reads} read, {writes} write; {child_holds} by the child, \
         {child_writes} of them write; {} in-process by try_*), {} leases seen in {} looks at \
         the store ({} counter readings), tally {tally:?}",
        history.holds.len(),
        progress.tried.load(Ordering::SeqCst),
        history.store.len(),
        looked.looks.looks,
        history.counter.len()
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

/// One worker's loop until `until`: take a read share or (every third time) the write hold,
/// with `read`/`write` or (two times in five) `try_read`/`try_write`, hold it a while, release
/// it. Every hold is handed to `report` as it ends. `offset` staggers the workers' mixes;
/// `first`, if given, is the kind of the worker's first hold, taken waiting and held long.
async fn contend(
    rwlock: &RwLock,
    name: &str,
    offset: usize,
    mut first: Option<Kind>,
    until: SystemTime,
    progress: &Progress,
    mut report: impl FnMut(Hold),
) -> Tally {
    let options = LockOptions::new()
        .with_ttl(TTL)
        .with_wait(Wait::UpTo(WAIT_BUDGET));
    let mut tally = Tally::default();
    // Holds so far, of each kind: read shares, write holds.
    let mut rounds = [0_u64; 2];
    let mut asks = offset;
    while SystemTime::now() < until {
        asks += 1;
        let kind = if asks.is_multiple_of(3) {
            Kind::Exclusive
        } else {
            Kind::Shared
        };
        let (kind, tries, first) = match first.take() {
            Some(first) => (first, false, true),
            None => (kind, asks % 5 < 2, false),
        };
        let asked = SystemTime::now();
        let taken = match (kind, tries) {
            (Kind::Shared, true) => rwlock.try_read(options.clone()).await,
            (Kind::Shared, false) => rwlock.read(options.clone()).await.map(Some),
            (Kind::Exclusive, true) => rwlock.try_write(options.clone()).await,
            (Kind::Exclusive, false) => rwlock.write(options.clone()).await.map(Some),
        };
        let guard = match taken {
            Ok(Some(guard)) => guard,
            // Refused: other work, then ask again.
            Ok(None) => {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            // Held throughout the wait, or the store is paused, restarting or reconnecting:
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
            Err(e) => panic!(
                "{name}: a {} of {rwlock:?} failed for good: {e}",
                kind.name()
            ),
        };
        if tries {
            progress.tried.fetch_add(1, Ordering::SeqCst);
        }
        // Every third read share, and the first hold if told, is long enough to span
        // renewals, and a fault. (Long write holds hold everyone else up: a run with more of
        // them has few holds.)
        let round = &mut rounds[usize::from(kind == Kind::Exclusive)];
        let long = first || (kind == Kind::Shared && *round % 3 == 1);
        let work = if long {
            LONG_HOLD
        } else {
            Duration::from_millis(rand::random_range(0..20))
        };
        *round += 1;
        if long {
            progress.long(kind).fetch_add(1, Ordering::SeqCst);
        }
        let hold = safety::hold_on(guard, asked, name, work, LOOK_EVERY).await;
        if long {
            progress.long(kind).fetch_sub(1, Ordering::SeqCst);
        }
        report(hold.with_kind(kind));
        // Other work between holds, so waiters on the other nodes get their turn.
        tokio::time::sleep(Duration::from_millis(rand::random_range(2..10))).await;
    }
    tally
}

// ---------------------------------------------------------------------------------------------
// The store's account.

/// Reads the read-write lock's shares, hold and fence counter in the store, on a thread of its
/// own, until stopped. Each look is a new connection with a read timeout (`resp::command`), so
/// a paused or restarting server costs looks, never a hang.
struct Watcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Looked>,
}

/// What the watcher saw.
#[derive(Default)]
struct Looked {
    looks: StoreLooks,
    /// The most read shares one look showed.
    most_readers: usize,
    /// What the store should never show: a writer's key without a ttl.
    odd: Vec<String>,
}

impl Watcher {
    /// `keys`: the readers' set, the writer's key, the fence counter.
    fn start(port: u16, keys: [String; 3]) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut looked = Looked::default();
            while !stopped.load(Ordering::SeqCst) {
                let look = ["EVAL", LOOK, "3", &keys[0], &keys[1], &keys[2]];
                if let Ok(reply) = resp::command(port, &look) {
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
        let [seconds, micros, readers, writer, writer_ttl, fence] = reply.items() else {
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
        let owner = |member: &Resp, kind: Kind| Live {
            token: None,
            owner: member
                .text()
                .unwrap_or_else(|| panic!("the look answered {reply:?}"))
                .to_owned(),
            kind,
        };
        let mut live: Vec<Live> = readers
            .items()
            .iter()
            .map(|member| owner(member, Kind::Shared))
            .collect();
        self.most_readers = self.most_readers.max(live.len());
        if writer.text().is_some() {
            live.push(owner(writer, Kind::Exclusive));
            if writer_ttl.int() == Some(-1) {
                self.odd.push(format!(
                    "the writer's key {writer:?} has no ttl, at {}",
                    nanos(at)
                ));
            }
        }
        self.looks.add_live(at, live);
        if fence.text().is_some() {
            self.looks.add_counter(at, number(fence));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The child process.

/// Contends like the in-process workers, on a node of its own, and reports each hold on
/// stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the read-write lock safety tests; started by them"]
async fn child_rw_contender() {
    let url = var(ENV_REDIS);
    let name = var(ENV_NAME);
    let until = from_nanos(var(ENV_RUN_UNTIL).parse().expect(ENV_RUN_UNTIL));
    let backend = RedisBackend::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    let node: LockClient = start(backend.with_restart_quarantine(TTL)).await;
    let rwlock = node.rwlock(&name).expect("a valid read-write lock");
    let mut workers = Vec::new();
    for w in 0..WORKERS_PER_NODE {
        let rwlock = rwlock.clone();
        workers.push(tokio::spawn(async move {
            let worker = format!("child-worker{w}");
            contend(
                &rwlock,
                &worker,
                w,
                None,
                until,
                &Progress::default(),
                |hold| report(&hold.line()),
            )
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
