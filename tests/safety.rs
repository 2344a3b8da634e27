//! Safety checked from outside the library, under faults.
//!
//! Workers contend for one key on one real Redis server: two per lock manager in this process
//! (two managers, two nodes) and one in a second OS process (this test binary, started again to
//! run one `#[ignore]`d child entry). Under the lock each does a read-modify-write of a shared
//! register (`support/register.rs`), presenting its fencing token, and records the interval in
//! which the library told it the lock was held. Mid-run Redis is paused past the ttl, or killed
//! and restarted without its data; the history must still show no two holders at once, tokens
//! increasing in hold order, and no stale token accepted nor update lost by the register. Every
//! contender's backend has a restart quarantine of one ttl
//! (`RedisBackend::with_restart_quarantine`): without it, a restart that loses the data lets
//! another node take a key while its holder is still told "held".
//!
//! Then the faults of a holder's own process: paused past its ttl (it must see `is_held()`
//! false, and the register must refuse its late write), and killed while holding (the key is
//! free only once the ttl has run out).
//!
//! (A holder *actor* that panics releases at once: that is the conformance suite's
//! `holder_actor_panic_releases`, run against Redis by `tests/redis.rs`.)

#[path = "support/child.rs"]
mod child;

use leasehold_test_support::redis_server;
use leasehold_test_support::register;
use leasehold_test_support::safety::{
    self, from_nanos, nanos, Accepted, Fault, History, Hold, Outcome, Tally, Witness,
};

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use child::{fields, report, var, ChildTest};
use leasehold::testing::{start, unique_key};
use leasehold::{Error, LockClient, LockGuard, LockOptions, RedisBackend, Wait};
use redis_server::RedisServer;
use register::{Op, OpKind, Register, RegisterClient};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::timeout;

/// The lease of every hold in the contention runs.
const TTL: Duration = Duration::from_secs(1);
/// How long the contention runs last, fault included.
const RUN_FOR: Duration = Duration::from_secs(14);
/// How long one `lock()` may wait before the worker asks again.
const WAIT_BUDGET: Duration = Duration::from_secs(2);
/// The pause after a retryable error before asking again (a backoff, not a wait for a state).
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// A long hold: past one renewal, and past the deadline of a holder whose renewals stopped.
const LONG_HOLD: Duration = Duration::from_millis(1500);
/// How often a holder asks `is_held()` while it works.
const LOOK_EVERY: Duration = Duration::from_millis(5);
/// A child has to start (a fresh test binary), connect and report within this.
const CHILD_REPORTS_WITHIN: Duration = Duration::from_secs(30);

/// The entry points that run in the child process, named for `--exact`.
const CHILD_CONTENDER: &str = "child_contender";
const CHILD_PAUSED_HOLDER: &str = "child_holder_paused_past_its_ttl";
const CHILD_KILLED_HOLDER: &str = "child_holder_killed_while_holding";

/// What the parent tells a child.
const ENV_REDIS: &str = "LEASEHOLD_SAFETY_REDIS_URL";
const ENV_REGISTER: &str = "LEASEHOLD_SAFETY_REGISTER";
const ENV_KEY: &str = "LEASEHOLD_SAFETY_KEY";
const ENV_WORKER: &str = "LEASEHOLD_SAFETY_WORKER";
const ENV_TTL_MS: &str = "LEASEHOLD_SAFETY_TTL_MS";
/// Set for contenders: their backend's restart quarantine.
const ENV_QUARANTINE_MS: &str = "LEASEHOLD_SAFETY_QUARANTINE_MS";
/// The end of a contention run, in nanoseconds since the Unix epoch: both processes read the
/// same wall clock, so they stop together.
const ENV_RUN_UNTIL: &str = "LEASEHOLD_SAFETY_RUN_UNTIL_NANOS";

// ---------------------------------------------------------------------------------------------
// The contention runs.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overlap_stale_write_or_lost_update_when_redis_is_paused_past_the_ttl() {
    contend_through(Fault::PauseRedis).await;
}

/// Redis without persistence forgets every lock when it restarts; the quarantine keeps the
/// key from anyone until its holder has learned that (at its next renewal, or its deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overlap_stale_write_or_lost_update_when_redis_restarts_without_data() {
    contend_through(Fault::RestartRedisWithoutData).await;
}

/// What the in-process workers share with the fault injector.
#[derive(Default)]
struct Progress {
    /// Their holds so far.
    holds: Mutex<Vec<Hold>>,
    in_long_hold: AtomicUsize,
}

async fn contend_through(fault: Fault) {
    let mut server = RedisServer::start();
    let register = Register::start().await;
    let key = unique_key("safety");
    let started = SystemTime::now();
    let until = started + RUN_FOR;
    let nodes = [
        start(server.backend().await.with_restart_quarantine(TTL)).await,
        start(server.backend().await.with_restart_quarantine(TTL)).await,
    ];
    let child = ChildTest::spawn(
        CHILD_CONTENDER,
        &[
            (ENV_REDIS, server.url()),
            (ENV_REGISTER, register.addr().to_string()),
            (ENV_KEY, key.clone()),
            (ENV_WORKER, "child".to_owned()),
            (ENV_TTL_MS, TTL.as_millis().to_string()),
            (ENV_QUARANTINE_MS, TTL.as_millis().to_string()),
            (ENV_RUN_UNTIL, nanos(until).to_string()),
        ],
    );
    let progress = Arc::new(Progress::default());
    let mut workers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for w in 0..2 {
            let (node, key, progress) = (node.clone(), key.clone(), progress.clone());
            let (addr, name) = (register.addr(), format!("node{n}-worker{w}"));
            workers.push(tokio::spawn(async move {
                contend(&node, addr, &key, &name, until, &progress, |hold| {
                    progress.holds.lock().unwrap().push(hold)
                })
                .await
            }));
        }
    }

    // Strike while a long hold is under way (a worker's second hold, so the run is going), so
    // the fault hits a held lease, not only waiters.
    let strike = async {
        while progress.in_long_hold.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(LOOK_EVERY).await;
        }
    };
    if timeout(RUN_FOR / 2, strike).await.is_err() {
        let so_far = Run {
            fault: "none yet".to_owned(),
            history: History::of_lock(started, progress.holds.lock().unwrap().clone()),
            ops: register.log(),
            value: register.value(),
        };
        panic!(
            "no long hold under way within {:?} (child output follows the history)\n{so_far}\n{}",
            RUN_FOR / 2,
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
    for node in &nodes {
        node.shutdown().await;
    }

    let history = History::of_lock(started, holds);
    let run = Run {
        fault: format!(
            "{fault:?} from {} to {}",
            history.at(fault_from),
            history.at(fault_to)
        ),
        history,
        ops: register.log(),
        value: register.value(),
    };
    let violations = run.violations();
    assert!(
        violations.is_empty(),
        "{}",
        safety::verdict(&violations, &run)
    );
    let history = &run.history;
    // The run has to have tested something: enough holds, the other process among them, a
    // hold cut short by the fault (lost, or its release refused), and holds again once the
    // fault was over.
    assert!(history.holds.len() >= 10, "too few holds\n{run}");
    assert!(
        child_holds >= 1,
        "the child process never held the key\n{run}"
    );
    let overtaken = history.cut_short_by(fault_from);
    assert!(overtaken, "no hold was cut short by the fault\n{run}");
    let after = history.began_after(fault_to);
    assert!(after >= 1, "no hold after the fault\n{run}");
    eprintln!(
        "{fault:?}: {} holds ({child_holds} by the child), {} writes accepted, {} refused, \
         tally {tally:?}",
        history.holds.len(),
        run.value,
        run.ops
            .iter()
            .filter(|op| op.kind == OpKind::Write && !op.accepted)
            .count()
    );
}

/// One worker's loop until `until`: lock, read, work, write value + 1, release. Every hold is
/// handed to `report` as it ends.
async fn contend(
    client: &LockClient,
    register: SocketAddr,
    key: &str,
    name: &str,
    until: SystemTime,
    progress: &Progress,
    mut report: impl FnMut(Hold),
) -> Tally {
    let mut register = RegisterClient::connect(register)
        .await
        .expect("connect to the register");
    let options = LockOptions::new()
        .with_ttl(TTL)
        .with_wait(Wait::UpTo(WAIT_BUDGET));
    let mut tally = Tally::default();
    let mut round = 0;
    while SystemTime::now() < until {
        let asked = SystemTime::now();
        let guard = match client.lock(key, options.clone()).await {
            Ok(guard) => guard,
            // The key stayed held, or the store is paused, restarting or reconnecting: the
            // next attempt may succeed.
            Err(Error::Timeout { .. }) => {
                tally.timeouts += 1;
                continue;
            }
            Err(e) if e.is_retryable() => {
                tally.store_errors += 1;
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            Err(e) => panic!("{name}: lock({key}) failed for good: {e}"),
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
        let hold = hold_once(guard, asked, &mut register, name, work).await;
        if long {
            progress.in_long_hold.fetch_sub(1, Ordering::SeqCst);
        }
        report(hold);
        // Other work between holds. Without it the worker that just released would take the
        // key straight back, before the waiters on other nodes (woken by the release notice;
        // there is no queue across nodes) get there, and one process could starve the rest.
        tokio::time::sleep(Duration::from_millis(rand::random_range(2..10))).await;
    }
    tally
}

/// One hold (of a lock asked for at `asked`): a fenced read, `work` of holding on (asking `is_held()` all along, as a careful
/// holder would), a fenced write of the value read plus one, and the release.
async fn hold_once(
    guard: LockGuard,
    asked: SystemTime,
    register: &mut RegisterClient,
    name: &str,
    work: Duration,
) -> Hold {
    let token = guard.fencing_token();
    let mut seen = Witness::default();
    // `Some`: the hold ended before the write. `None`: written, so release it.
    let stopped = 'work: {
        if !seen.look(&guard) {
            break 'work Some(Outcome::Lost);
        }
        let value = match register.read_fenced(token, name).await.expect("read") {
            Ok(value) => value,
            Err(_) => break 'work Some(Outcome::Refused),
        };
        let working = Instant::now();
        while working.elapsed() < work {
            if !seen.look(&guard) {
                break 'work Some(Outcome::Lost);
            }
            tokio::time::sleep(LOOK_EVERY).await;
        }
        if !seen.look(&guard) {
            break 'work Some(Outcome::Lost);
        }
        let written = register.write(token, value + 1, name).await;
        if written.expect("write").is_err() {
            break 'work Some(Outcome::Refused);
        }
        seen.look(&guard);
        None
    };
    let ended = SystemTime::now();
    let outcome = match stopped {
        // Dropping the guard gives the lock back, if it is still ours.
        Some(outcome) => outcome,
        None => match guard.release().await {
            Ok(()) => Outcome::Released,
            // The store did not confirm (paused, restarted): the lease ends at its ttl.
            Err(_) => Outcome::ReleaseFailed,
        },
    };
    Hold::new(name, token, Some(asked), seen, ended, outcome)
}

/// A contention run, for the checker and for a reader when it fails: the holds, and the
/// register's record of the accesses.
struct Run {
    fault: String,
    history: History,
    ops: Vec<Op>,
    value: u64,
}

impl Run {
    fn violations(&self) -> Vec<String> {
        // (1) No two holders at once; (2) tokens strictly increase in hold order, and no
        // token is handed out twice.
        let mut found = self.history.violations();
        // (3) The register accepted no stale token and lost no update: accepted accesses
        // carry non-decreasing tokens of reported holds, and each accepted write is one more
        // than the one before.
        let accepted = self.ops.iter().filter(|op| op.accepted);
        found.extend(safety::fenced_violations(
            accepted.clone().map(|op| Accepted {
                token: op.token,
                wrote: (op.kind == OpKind::Write).then_some(op.value),
                by: &op.client,
            }),
            self.value,
        ));
        for op in accepted {
            if !self.history.holds.iter().any(|hold| hold.token == op.token) {
                found.push(format!(
                    "{:?} by {} with token {}, which no worker reported holding",
                    op.kind, op.client, op.token
                ));
            }
        }
        found
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "fault: {}", self.fault)?;
        write!(f, "{}", self.history)?;
        writeln!(f, "register accesses, in the order the fence saw them:")?;
        for op in &self.ops {
            writeln!(
                f,
                "  {:>10} {:?} {} token {} by {} {}",
                self.history.at(op.at),
                op.kind,
                op.value,
                op.token,
                op.client,
                if op.accepted { "accepted" } else { "REFUSED" }
            )?;
        }
        write!(f, "register value: {}", self.value)
    }
}

// ---------------------------------------------------------------------------------------------
// Faults of the holder's own process.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_process_paused_past_its_ttl_sees_its_lock_lost_and_its_late_write_refused() {
    let ttl = Duration::from_secs(1);
    let server = RedisServer::start();
    let register = Register::start().await;
    let node = start(server.backend().await).await;
    let key = unique_key("paused-holder");
    let mut child = ChildTest::spawn(
        CHILD_PAUSED_HOLDER,
        &[
            (ENV_REDIS, server.url()),
            (ENV_REGISTER, register.addr().to_string()),
            (ENV_KEY, key.clone()),
            (ENV_WORKER, "child".to_owned()),
            (ENV_TTL_MS, ttl.as_millis().to_string()),
        ],
    );
    let ready = child.next_report(CHILD_REPORTS_WITHIN).await;
    let child_token: u64 = fields(&ready, "READY")
        .and_then(|fields| fields.get("token")?.parse().ok())
        .unwrap_or_else(|| panic!("not a READY report: {ready:?}\n{}", child.output()));

    child.signal("-STOP");
    let stopped_at = tokio::time::Instant::now();
    // Renewals stop with the process: the lease runs out, and another holder takes the key.
    let guard = node
        .lock(
            &key,
            LockOptions::new()
                .with_ttl(ttl)
                .with_wait(Wait::UpTo(ttl * 3)),
        )
        .await
        .expect("the key is free once the stopped holder's lease ran out");
    let token = guard.fencing_token();
    assert!(token > child_token, "token {token} after {child_token}");
    let mut client = RegisterClient::connect(register.addr()).await.unwrap();
    let value = client
        .read_fenced(token, "parent")
        .await
        .unwrap()
        .expect("the newer holder reads");
    client
        .write(token, value + 1, "parent")
        .await
        .unwrap()
        .expect("the newer holder writes");
    guard.release().await.unwrap();
    // The sleep is the fault: the holder stays stopped for three ttls in all.
    tokio::time::sleep_until(stopped_at + ttl * 3).await;
    child.signal("-CONT");
    child.send("go").await;

    let held = child.next_report(CHILD_REPORTS_WITHIN).await;
    assert_eq!(
        held,
        "HELD false",
        "the woken holder was told it still holds the lock\n{}",
        child.output()
    );
    let late = child.next_report(CHILD_REPORTS_WITHIN).await;
    assert_eq!(
        late,
        format!("WRITE stale newest={token}"),
        "{}",
        child.output()
    );
    let log = register.log();
    let refused = log
        .iter()
        .rfind(|op| op.client == "child")
        .expect("the child's late write reached the register");
    assert!(
        refused.kind == OpKind::Write && refused.token == child_token && !refused.accepted,
        "{refused:?}"
    );
    assert_eq!(register.value(), 2, "{log:?}");
    child.finish(CHILD_REPORTS_WITHIN).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_process_killed_while_holding_frees_the_key_only_when_its_ttl_runs_out() {
    // Long enough that reading the child's report, killing it and asking again all fit well
    // inside it on a loaded machine.
    let ttl = Duration::from_secs(3);
    let server = RedisServer::start();
    let node = start(server.backend().await).await;
    let key = unique_key("killed-holder");
    let mut child = ChildTest::spawn(
        CHILD_KILLED_HOLDER,
        &[
            (ENV_REDIS, server.url()),
            (ENV_KEY, key.clone()),
            (ENV_WORKER, "child".to_owned()),
            (ENV_TTL_MS, ttl.as_millis().to_string()),
        ],
    );
    let acquired = child.next_report(CHILD_REPORTS_WITHIN).await;
    let parsed = fields(&acquired, "ACQUIRED").and_then(|fields| {
        let token: u64 = fields.get("token")?.parse().ok()?;
        let asked_at: u64 = fields.get("asked_at")?.parse().ok()?;
        Some((token, from_nanos(asked_at)))
    });
    let (child_token, asked_at) = parsed
        .unwrap_or_else(|| panic!("not an ACQUIRED report: {acquired:?}\n{}", child.output()));

    child.kill().await;
    // The holder is gone, but nothing released its lease: the key stays held.
    let options = LockOptions::new().with_ttl(ttl);
    let right_after = node.try_lock(&key, options.clone()).await.unwrap();
    assert!(
        right_after.is_none(),
        "the key was free right after its holder was killed, before its ttl ran out"
    );
    let guard = node
        .lock(&key, options.with_wait(Wait::UpTo(ttl * 3)))
        .await
        .expect("the key is free once the killed holder's ttl ran out");
    let taken_at = SystemTime::now();
    // The child asked before Redis started its ttl, so its lease cannot end before this.
    assert!(
        taken_at >= asked_at + ttl,
        "taken {:?} after the killed holder asked, within its ttl of {ttl:?}",
        taken_at.duration_since(asked_at).unwrap_or_default()
    );
    assert!(guard.fencing_token() > child_token);
    guard.release().await.unwrap();
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The child process.

/// What a child is told through its environment.
struct ChildEnv {
    redis_url: String,
    key: String,
    worker: String,
    ttl: Duration,
}

impl ChildEnv {
    /// Panics naming the first variable missing: run by hand (`--ignored`), an entry fails
    /// instead of passing without having done anything.
    fn read() -> ChildEnv {
        ChildEnv {
            redis_url: var(ENV_REDIS),
            key: var(ENV_KEY),
            worker: var(ENV_WORKER),
            ttl: Duration::from_millis(var(ENV_TTL_MS).parse().expect(ENV_TTL_MS)),
        }
    }

    fn register(&self) -> SocketAddr {
        var(ENV_REGISTER).parse().expect(ENV_REGISTER)
    }

    async fn node(&self) -> LockClient {
        let mut backend = RedisBackend::connect(&self.redis_url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.redis_url));
        if let Ok(millis) = std::env::var(ENV_QUARANTINE_MS) {
            let millis = millis.parse().expect(ENV_QUARANTINE_MS);
            backend = backend.with_restart_quarantine(Duration::from_millis(millis));
        }
        start(backend).await
    }
}

/// Contends like the in-process workers, and reports each hold on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the safety tests; started by them"]
async fn child_contender() {
    let env = ChildEnv::read();
    let until = from_nanos(var(ENV_RUN_UNTIL).parse().expect(ENV_RUN_UNTIL));
    assert_eq!(
        env.ttl, TTL,
        "the parent and the child run the same workers"
    );
    let node = env.node().await;
    let tally = contend(
        &node,
        env.register(),
        &env.key,
        &env.worker,
        until,
        &Progress::default(),
        |hold| report(&hold.line()),
    )
    .await;
    report(&tally.line());
    node.shutdown().await;
}

/// Takes the key and writes once, says READY, and waits for "go" (the parent stops and
/// resumes this process meanwhile); then says whether it still holds the lock, and tries to
/// write again with its token, saying what the register answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the safety tests; started by them"]
async fn child_holder_paused_past_its_ttl() {
    let env = ChildEnv::read();
    let node = env.node().await;
    let mut register = RegisterClient::connect(env.register()).await.unwrap();
    let options = LockOptions::new()
        .with_ttl(env.ttl)
        .with_wait(Wait::UpTo(Duration::from_secs(10)));
    let guard = node.lock(&env.key, options).await.expect("lock");
    let token = guard.fencing_token();
    let value = register
        .read_fenced(token, &env.worker)
        .await
        .unwrap()
        .expect("the first holder reads");
    register
        .write(token, value + 1, &env.worker)
        .await
        .unwrap()
        .expect("the first holder writes");
    report(&format!("READY token={token}"));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let go = stdin.next_line().await.expect("read stdin");
    assert_eq!(go.as_deref(), Some("go"), "the parent says go");
    // Before any more protected work: is the lock still held?
    report(&format!("HELD {}", guard.is_held()));
    // A holder that went on regardless: the register must refuse its old token.
    match register.write(token, value + 2, &env.worker).await.unwrap() {
        Ok(()) => report("WRITE accepted"),
        Err(stale) => report(&format!("WRITE stale newest={}", stale.newest)),
    }
    drop(guard);
    node.shutdown().await;
}

/// Takes the key and holds it (renewing) until the parent kills this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the safety tests; started by them"]
async fn child_holder_killed_while_holding() {
    let env = ChildEnv::read();
    let node = env.node().await;
    let options = LockOptions::new()
        .with_ttl(env.ttl)
        .with_wait(Wait::UpTo(Duration::from_secs(10)));
    let asked_at = SystemTime::now();
    let guard = node.lock(&env.key, options).await.expect("lock");
    report(&format!(
        "ACQUIRED token={} asked_at={}",
        guard.fencing_token(),
        nanos(asked_at)
    ));
    // Hold until killed. Should the parent die instead, its end of stdin closes and this
    // returns, so no child outlives it.
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let _ = stdin.next_line().await;
    drop(guard);
    node.shutdown().await;
}
