//! Safety checked from outside the library, with the protected resource a real store guarded
//! by leasehold's fences: a counter in Redis (`RedisFence` and a `FencedScript`), in etcd
//! (`EtcdFence`) and in PostgreSQL (`PgFence`).
//!
//! Workers contend for one lock (two per lock manager in this process, two managers, and one
//! in a second OS process: this test binary, started again to run an `#[ignore]`d entry).
//! Under the lock each reads the counter through the fence, presenting its token, then writes
//! the value read plus one through the fence, and in the same atomic fenced write appends an
//! entry (token, value, write id) to a log in the store: a Redis list in the same script, an
//! etcd key in the same transaction, a PostgreSQL row in the same transaction. The read is
//! fenced too, as the safety register's is (`test-support/src/register.rs`): it records the
//! reader's token, so a holder superseded between its read and its write cannot have the
//! write accepted after a newer holder read the same value — the lost update a fence on
//! writes alone lets through.
//!
//! The fault makes two holders act as holders at once. The child takes the lock and reads;
//! then, before its write, either its process is frozen (SIGSTOP) or the lock store is frozen
//! for twice the ttl, so that its lease runs out; a newer holder takes the lock and writes;
//! then the child writes with its old token without looking at its lock first, as a process
//! resuming from a long GC pause would. Then the store's own record must show:
//! - the stale write refused, and absent from the log;
//! - tokens never decreasing in the log's order (the store's order of the fenced writes);
//! - no update lost: the log's values are 1, 2, …, n and the counter is n;
//! - every write a worker was told was accepted in the log exactly once, and no refused
//!   write in it.
//!
//! The locks are leasehold's Redis backend for the Redis and PostgreSQL counters (there is no
//! PostgreSQL lock backend) and its etcd backend for the etcd counter, on a server of their
//! own beside the counter's.

#[path = "support/child.rs"]
mod child;
#[path = "support/clients.rs"]
mod clients;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use child::ChildTest;
use etcd_client::{GetOptions, KvClient, TxnOp, TxnOpResponse};
use leasehold::testing::unique_key;
use leasehold::{
    Error, EtcdFence, FenceError, FencedScript, LockClient, LockGuard, LockOptions, PgFence,
    RedisFence, Wait,
};
use leasehold_test_support::safety::{self, Accepted};
use leasehold_test_support::{EtcdServer, PostgresServer, RedisServer};
use redis::aio::MultiplexedConnection;

/// The lease of every hold: etcd's shortest.
const TTL: Duration = Duration::from_secs(1);
/// How long one `lock()` may wait before the worker asks again.
const WAIT_BUDGET: Duration = Duration::from_secs(2);
/// The pause after a retryable error before asking again (a backoff, not a wait for a state).
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// A child has to start (a fresh test binary), connect and report within this; each stage of
/// the run has as long to happen.
const WITHIN: Duration = Duration::from_secs(30);
/// How many holds with a write the child makes before the one the fault strikes.
const CHILD_WRITES_FIRST: u64 = 2;
/// How many accepted writes the run needs after the stale holder's write.
const WRITES_AFTER: usize = 10;

/// What the parent tells the child.
const ENV_STORE: &str = "LEASEHOLD_SAFETY_FENCED_STORE";
const ENV_RESOURCE: &str = "LEASEHOLD_SAFETY_FENCED_RESOURCE";
const ENV_LOCKS: &str = "LEASEHOLD_SAFETY_FENCED_LOCKS";
const ENV_KEY: &str = "LEASEHOLD_SAFETY_FENCED_KEY";

const CHILD_CONTENDER: &str = "child_contender_frozen_before_a_write";

// ---------------------------------------------------------------------------------------------
// The runs: each store, under each fault.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counter_refuses_a_holder_frozen_past_its_ttl_and_loses_no_update() {
    contend(Store::Redis, Fault::FreezeHolder).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counter_refuses_a_holder_whose_lock_store_paused_past_its_ttl() {
    contend(Store::Redis, Fault::PauseLockStore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_counter_refuses_a_holder_frozen_past_its_ttl_and_loses_no_update() {
    contend(Store::Etcd, Fault::FreezeHolder).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_counter_refuses_a_holder_whose_lock_store_paused_past_its_ttl() {
    contend(Store::Etcd, Fault::PauseLockStore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_counter_refuses_a_holder_frozen_past_its_ttl_and_loses_no_update() {
    contend(Store::Postgres, Fault::FreezeHolder).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_counter_refuses_a_holder_whose_lock_store_paused_past_its_ttl() {
    contend(Store::Postgres, Fault::PauseLockStore).await;
}

/// What makes the child a holder that still acts as one after a newer holder took over. In
/// both, the child has read the counter and holds the lock when the fault strikes, and writes
/// (without looking at its lock) once a newer holder has written.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The child's process is frozen (SIGSTOP) until a newer holder has written: its
    /// renewals stop with it.
    FreezeHolder,
    /// The lock store is frozen (SIGSTOP) for twice the ttl: the child's renewals go
    /// unanswered and its lease runs out in the store.
    PauseLockStore,
}

/// A server of one of the stores.
enum Server {
    Redis(RedisServer),
    Etcd(EtcdServer),
    Postgres(PostgresServer),
}

impl Server {
    fn start(store: Store) -> Server {
        match store {
            Store::Redis => Server::Redis(RedisServer::start()),
            Store::Etcd => Server::Etcd(EtcdServer::start()),
            Store::Postgres => Server::Postgres(PostgresServer::start()),
        }
    }

    fn address(&self) -> String {
        match self {
            Server::Redis(server) => server.url(),
            Server::Etcd(server) => server.endpoint(),
            Server::Postgres(server) => server.url(),
        }
    }

    fn pause(&self) {
        match self {
            Server::Redis(server) => server.pause(),
            Server::Etcd(server) => server.pause(),
            Server::Postgres(_) => unreachable!("PostgreSQL holds no locks here"),
        }
    }

    fn resume(&self) {
        match self {
            Server::Redis(server) => server.resume(),
            Server::Etcd(server) => server.resume(),
            Server::Postgres(_) => unreachable!("PostgreSQL holds no locks here"),
        }
    }
}

/// One run. The counter and the locks are on servers of their own, so that pausing the lock
/// store leaves the counter reachable.
async fn contend(store: Store, fault: Fault) {
    let counter_server = Server::start(store);
    let lock_server = Server::start(store.lock_store());
    let (resource, locks) = (counter_server.address(), lock_server.address());
    let key = unique_key("safety-fenced");
    let mut checker = Counter::connect(store, &resource, &key).await;
    checker.create().await;
    let mut child = ChildTest::spawn(
        CHILD_CONTENDER,
        &[
            (ENV_STORE, store.name().to_owned()),
            (ENV_RESOURCE, resource.clone()),
            (ENV_LOCKS, locks.clone()),
            (ENV_KEY, key.clone()),
        ],
    );
    let nodes = [
        lock_node(store, &locks).await,
        lock_node(store, &locks).await,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for w in 0..2 {
            let name = format!("node{n}-worker{w}");
            let (node, key, resource) = (node.clone(), key.clone(), resource.clone());
            let (stop, writes) = (stop.clone(), writes.clone());
            workers.push(tokio::spawn(async move {
                let mut counter = Counter::connect(store, &resource, &key).await;
                let mut seq = 0;
                while !stop.load(Ordering::SeqCst) {
                    let Some(guard) = take(&node, &key).await else {
                        continue;
                    };
                    if let Some(write) = hold(&guard, &mut counter, &name, &mut seq, None).await {
                        writes.lock().unwrap().push(write);
                    }
                    release(guard).await;
                    between_holds().await;
                }
            }));
        }
    }

    // The child writes a few times like every worker, then reads in one more hold and stops
    // there, holding the lock, until told to write.
    let mut child_reports = Vec::new();
    let frozen = child
        .next_tagged("FREEZE-ME", WITHIN, |r| child_reports.push(r.to_owned()))
        .await;
    let old_token: u64 = frozen["token"].parse().unwrap();
    match fault {
        Fault::FreezeHolder => child.stop(),
        Fault::PauseLockStore => {
            lock_server.pause();
            // The sleep is the fault: the child's lease outlives its ttl while nothing answers.
            tokio::time::sleep(TTL * 2).await;
            lock_server.resume();
        }
    }
    // The child's lease has run out, or runs out: a newer holder takes the lock and writes.
    wait_for_log(
        &mut checker,
        "a newer holder writes after the fault",
        |log| log.iter().any(|entry| entry.token > old_token),
    )
    .await;
    if let Fault::FreezeHolder = fault {
        child.resume();
    }
    child.send("write").await;
    let stale = child
        .next_tagged("STALE-WRITE", WITHIN, |r| child_reports.push(r.to_owned()))
        .await;
    let accepted_before = checker.log().await.len();
    wait_for_log(&mut checker, "the workers go on writing", |log| {
        log.len() >= accepted_before + WRITES_AFTER
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("worker task");
    }
    child_reports.extend(child.finish(WITHIN).await);
    for node in &nodes {
        node.shutdown().await;
    }

    let mut writes = std::mem::take(&mut *writes.lock().unwrap());
    writes.extend(child_reports.iter().filter_map(|r| Write::parse(r)));
    let history = History {
        store,
        writes,
        log: checker.log().await,
        value: checker.value().await,
        stale_token: old_token,
        stale_id: stale["id"].clone(),
        stale_outcome: stale["outcome"].clone(),
        stale_held: stale["held"].clone(),
    };
    let violations = history.violations();
    assert!(
        violations.is_empty(),
        "{}",
        safety::verdict(&violations, &history)
    );
    let count = |outcome: &str| {
        history
            .writes
            .iter()
            .filter(|w| w.outcome.name() == outcome)
            .count()
    };
    eprintln!(
        "{store:?}, {fault:?}: {} writes accepted ({} by the child), {} refused, {} failed; the stale \
         holder's write with token {old_token} was {} (is_held() said {})",
        count("accepted"),
        history
            .writes
            .iter()
            .filter(|w| w.id.starts_with("child") && w.outcome == Outcome::Accepted)
            .count(),
        count("refused"),
        count("failed"),
        history.stale_outcome,
        history.stale_held,
    );
}

/// Polls the store's log until `done` says yes (bounded by [`WITHIN`]); returns that log.
async fn wait_for_log(
    checker: &mut Counter,
    what: &str,
    mut done: impl FnMut(&[Entry]) -> bool,
) -> Vec<Entry> {
    let give_up = Instant::now() + WITHIN;
    loop {
        let log = checker.log().await;
        if done(&log) {
            return log;
        }
        assert!(
            Instant::now() < give_up,
            "{what}: not within {WITHIN:?}; the log: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A worker's holds.

/// Other work between holds. Without it the worker that just released would take the key
/// straight back, before the waiters on other nodes (woken by the release notice; there is no
/// queue across nodes) get there, and one process could starve the rest.
async fn between_holds() {
    tokio::time::sleep(Duration::from_millis(rand::random_range(2..10))).await;
}

/// The lock, or `None` when the wait ran out or the store failed for now.
async fn take(node: &LockClient, key: &str) -> Option<LockGuard> {
    let options = LockOptions::new()
        .with_ttl(TTL)
        .with_wait(Wait::UpTo(WAIT_BUDGET));
    match node.lock(key, options).await {
        Ok(guard) => Some(guard),
        Err(Error::Timeout { .. }) => None,
        Err(e) if e.is_retryable() => {
            tokio::time::sleep(RETRY_PAUSE).await;
            None
        }
        Err(e) => panic!("lock({key}) failed for good: {e}"),
    }
}

async fn release(guard: LockGuard) {
    // A lease lost meanwhile, or a store that did not confirm, ends at its ttl.
    let _ = guard.release().await;
}

/// One hold: a fenced read, a little work, and a fenced write of the value read plus one with
/// the log entry. Careful holders ask `is_held()` before they write; with `frozen`, the holder
/// instead calls it between the read and the write and then writes without looking. Returns
/// the write, if one was made.
async fn hold(
    guard: &LockGuard,
    counter: &mut Counter,
    name: &str,
    seq: &mut u64,
    frozen: Option<&mut Freeze<'_>>,
) -> Option<Write> {
    let token = guard.fencing_token();
    if !guard.is_held() {
        return None;
    }
    let value = match counter.read(token).await {
        Access::Done(value) => value,
        Access::Stale => return None,
        Access::Failed(e) => {
            eprintln!("{name}: fenced read with token {token} failed: {e}");
            return None;
        }
    };
    match frozen {
        Some(freeze) => freeze.freeze(guard).await,
        None => {
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..10))).await;
            if !guard.is_held() {
                return None;
            }
        }
    }
    *seq += 1;
    let id = format!("{name}-{seq}");
    let outcome = match counter.write(token, value + 1, &id).await {
        Access::Done(()) => Outcome::Accepted,
        Access::Stale => Outcome::Refused,
        Access::Failed(e) => {
            eprintln!("{name}: fenced write {id} failed: {e}");
            Outcome::Failed
        }
    };
    Some(Write {
        id,
        token,
        value: value + 1,
        outcome,
    })
}

/// The child's hold that the fault strikes, between its read and its write: says FREEZE-ME
/// (the parent freezes the process or the lock store, and says "write" once a newer holder
/// has written), waits for "write", and notes what `is_held()` said then; the holder writes
/// without acting on it.
struct Freeze<'a> {
    commands: &'a mut child::Commands,
    held_after: Option<bool>,
}

impl Freeze<'_> {
    async fn freeze(&mut self, guard: &LockGuard) {
        child::report(&format!("FREEZE-ME token={}", guard.fencing_token()));
        child::expect_command(self.commands, "write").await;
        self.held_after = Some(guard.is_held());
    }
}

/// A write a worker made, and what the fence told it.
#[derive(Debug, Clone, PartialEq)]
struct Write {
    id: String,
    token: u64,
    value: u64,
    outcome: Outcome,
}

impl Write {
    fn line(&self) -> String {
        format!(
            "WRITE id={} token={} value={} outcome={}",
            self.id,
            self.token,
            self.value,
            self.outcome.name()
        )
    }

    fn parse(line: &str) -> Option<Write> {
        let fields = child::fields(line, "WRITE")?;
        let outcome = *fields.get("outcome")?;
        Some(Write {
            id: fields.get("id")?.to_string(),
            token: fields.get("token")?.parse().ok()?,
            value: fields.get("value")?.parse().ok()?,
            outcome: *Outcome::ALL.iter().find(|o| o.name() == outcome)?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The fence let it through.
    Accepted,
    /// The fence refused the token.
    Refused,
    /// The store failed; the write may or may not have happened.
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Accepted, Outcome::Refused, Outcome::Failed];

    fn name(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checker.

/// A run, as the workers and the store saw it.
struct History {
    store: Store,
    /// Every write the workers made, with what they were told.
    writes: Vec<Write>,
    /// The store's log of fenced writes, in the store's order.
    log: Vec<Entry>,
    /// The counter at the end.
    value: u64,
    stale_token: u64,
    stale_id: String,
    stale_outcome: String,
    stale_held: String,
}

impl History {
    fn violations(&self) -> Vec<String> {
        let mut found = Vec::new();
        // (1) The stale holder's late write was refused and left nothing.
        if self.stale_outcome != "refused" {
            found.push(format!(
                "the stale holder's write {} with token {} was {}, not refused",
                self.stale_id, self.stale_token, self.stale_outcome
            ));
        }
        // (2) Tokens never decrease in the store's order, and no update was lost: the values
        // are 1, 2, …, n, and the counter is n.
        found.extend(safety::fenced_violations(
            self.log.iter().map(|entry| Accepted {
                token: entry.token,
                wrote: Some(entry.value),
                by: &entry.id,
            }),
            self.value,
        ));
        // (3) The log and the workers agree: every accepted write is logged once, as it was
        // made; no refused write is logged; nothing is logged that no worker wrote.
        let mut logged: HashMap<&str, Vec<&Entry>> = HashMap::new();
        for entry in &self.log {
            logged.entry(&entry.id).or_default().push(entry);
        }
        let mut made: HashMap<&str, &Write> = HashMap::new();
        for write in &self.writes {
            if made.insert(&write.id, write).is_some() {
                found.push(format!("write id {} used twice", write.id));
            }
            let entries = logged.get(write.id.as_str()).map_or(&[][..], |e| &e[..]);
            match (write.outcome, entries) {
                (Outcome::Accepted, [entry])
                    if entry.token == write.token && entry.value == write.value => {}
                (Outcome::Refused, []) | (Outcome::Failed, [] | [_]) => {}
                (outcome, entries) => found.push(format!(
                    "write {} (token {}, value {}) was {} but is logged {} times: {entries:?}",
                    write.id,
                    write.token,
                    write.value,
                    outcome.name(),
                    entries.len()
                )),
            }
        }
        if logged.contains_key(self.stale_id.as_str()) {
            found.push(format!(
                "the stale holder's refused write {} is in the log",
                self.stale_id
            ));
        }
        for entry in &self.log {
            if !made.contains_key(entry.id.as_str()) {
                found.push(format!("{entry:?} was written by no worker"));
            }
        }
        // (4) The run tested something.
        if self.log.len() < WRITES_AFTER {
            found.push(format!("only {} writes accepted", self.log.len()));
        }
        if !self.log.iter().any(|e| e.id.starts_with("child")) {
            found.push("the child never wrote".to_owned());
        }
        found
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:?}: the stale holder wrote {} with token {}: {} (is_held() said {})",
            self.store, self.stale_id, self.stale_token, self.stale_outcome, self.stale_held
        )?;
        writeln!(f, "the store's log, in its order:")?;
        for entry in &self.log {
            writeln!(
                f,
                "  token {} value {} by {}",
                entry.token, entry.value, entry.id
            )?;
        }
        writeln!(f, "the workers' writes:")?;
        for write in &self.writes {
            writeln!(
                f,
                "  {} token {} value {}: {}",
                write.id,
                write.token,
                write.value,
                write.outcome.name()
            )?;
        }
        write!(f, "counter: {}", self.value)
    }
}

// ---------------------------------------------------------------------------------------------
// The counter in each store.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Redis,
    Etcd,
    Postgres,
}

impl Store {
    const ALL: [Store; 3] = [Store::Redis, Store::Etcd, Store::Postgres];

    /// The lock store beside this store's counter: etcd's own locks for the etcd counter, and
    /// Redis's for the others (there is no PostgreSQL lock backend).
    fn lock_store(self) -> Store {
        match self {
            Store::Etcd => Store::Etcd,
            Store::Redis | Store::Postgres => Store::Redis,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Store::Redis => "redis",
            Store::Etcd => "etcd",
            Store::Postgres => "postgres",
        }
    }
}

/// A lock manager on the lock store of `store`'s counter (see [`Store::lock_store`]).
async fn lock_node(store: Store, locks: &str) -> LockClient {
    match store.lock_store() {
        Store::Etcd => clients::etcd_locks(locks).await,
        Store::Redis | Store::Postgres => clients::redis_locks(locks).await,
    }
}

/// One entry of the store's log: a fenced write that was accepted.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    token: u64,
    value: u64,
    id: String,
}

impl Entry {
    fn line(token: u64, value: u64, id: &str) -> String {
        format!("{token} {value} {id}")
    }

    fn parse(line: &str) -> Entry {
        let mut words = line.split(' ');
        let mut next = || words.next().unwrap_or_else(|| panic!("log entry {line:?}"));
        let token = next().parse().unwrap();
        let value = next().parse().unwrap();
        Entry {
            token,
            value,
            id: next().to_owned(),
        }
    }
}

/// What a fenced access came to.
enum Access<T> {
    Done(T),
    Stale,
    Failed(String),
}

impl<T> Access<T> {
    fn of<E: fmt::Display>(result: Result<T, FenceError<E>>) -> Access<T> {
        match result {
            Ok(value) => Access::Done(value),
            Err(FenceError::Stale(_)) => Access::Stale,
            Err(e) => Access::Failed(e.to_string()),
        }
    }
}

/// The counter `key`, its fence and its log, in one store, through that store's own client.
// One per worker, for a whole run: the size of the largest client does not matter.
#[allow(clippy::large_enum_variant)]
enum Counter {
    /// The counter, `{key}:counter`, and the log, a list `{key}:log`, share a hash tag.
    Redis {
        conn: MultiplexedConnection,
        fence: RedisFence,
        log: String,
    },
    /// Keys `key/counter`, `key/fence` and one `key/log/<write id>` per write.
    Etcd {
        kv: KvClient,
        fence: EtcdFence,
        counter: String,
        log: String,
    },
    /// A row of `safety_counter` and rows of `safety_log`, whose `seq` orders them.
    Postgres {
        client: tokio_postgres::Client,
        fence: PgFence,
        name: String,
    },
}

/// Reads the counter (0 if never written).
static REDIS_READ: LazyLock<FencedScript> =
    LazyLock::new(|| FencedScript::new("return redis.call('GET', KEYS[1])"));
/// Sets the counter to ARGV[1] and appends ARGV[2] to the log, KEYS[2].
static REDIS_WRITE: LazyLock<FencedScript> = LazyLock::new(|| {
    FencedScript::new(
        "redis.call('SET', KEYS[1], ARGV[1])\n\
         redis.call('RPUSH', KEYS[2], ARGV[2])\n\
         return 1",
    )
});

impl Counter {
    async fn connect(store: Store, address: &str, key: &str) -> Counter {
        match store {
            Store::Redis => Counter::Redis {
                conn: clients::redis(address).await,
                fence: RedisFence::new(format!("{{{key}}}:counter")),
                log: format!("{{{key}}}:log"),
            },
            Store::Etcd => Counter::Etcd {
                kv: clients::etcd_kv(address).await,
                fence: EtcdFence::new(format!("{key}/fence")),
                counter: format!("{key}/counter"),
                log: format!("{key}/log/"),
            },
            Store::Postgres => Counter::Postgres {
                client: clients::postgres(address).await,
                fence: PgFence::new(),
                name: key.to_owned(),
            },
        }
    }

    /// Creates the tables (PostgreSQL; the other stores need nothing).
    async fn create(&mut self) {
        if let Counter::Postgres { client, fence, .. } = self {
            fence.create_table(client).await.unwrap();
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS safety_counter \
                         (name text PRIMARY KEY, value bigint NOT NULL);
                     CREATE TABLE IF NOT EXISTS safety_log (seq bigserial PRIMARY KEY, \
                         name text NOT NULL, entry text NOT NULL)",
                )
                .await
                .unwrap();
        }
    }

    /// The counter, read through the fence with `token`.
    async fn read(&mut self, token: u64) -> Access<u64> {
        match self {
            Counter::Redis { conn, fence, .. } => Access::of(
                fence
                    .run::<_, &str, &str, Option<u64>>(conn, token, &REDIS_READ, &[], &[])
                    .await
                    .map(Option::unwrap_or_default),
            ),
            Counter::Etcd {
                kv, fence, counter, ..
            } => {
                let read = fence
                    .run(kv, token, [TxnOp::get(counter.as_str(), None)])
                    .await;
                Access::of(read.map(|responses| {
                    match responses.first() {
                        Some(TxnOpResponse::Get(get)) => get
                            .kvs()
                            .first()
                            .map_or(0, |kv| kv.value_str().unwrap().parse().unwrap()),
                        other => panic!("the fenced get answered {other:?}"),
                    }
                }))
            }
            Counter::Postgres {
                client,
                fence,
                name,
            } => {
                let name = name.as_str();
                let tx = match fence.transaction(client, name, token).await {
                    Ok(tx) => tx,
                    Err(e) => return Access::of(Err(e)),
                };
                let value = tx
                    .query_opt("SELECT value FROM safety_counter WHERE name = $1", &[&name])
                    .await
                    .map(|row| row.map_or(0, |row| row.get::<_, i64>(0)));
                match value {
                    Ok(value) => match tx.commit().await {
                        Ok(()) => Access::Done(value as u64),
                        Err(e) => Access::Failed(e.to_string()),
                    },
                    Err(e) => Access::Failed(e.to_string()),
                }
            }
        }
    }

    /// Sets the counter to `value` and logs the write `id`, through the fence with `token`,
    /// in one atomic step.
    async fn write(&mut self, token: u64, value: u64, id: &str) -> Access<()> {
        let entry = Entry::line(token, value, id);
        match self {
            Counter::Redis { conn, fence, log } => Access::of(
                fence
                    .run::<_, _, _, i64>(
                        conn,
                        token,
                        &REDIS_WRITE,
                        &[log.as_str()],
                        &[value.to_string(), entry],
                    )
                    .await
                    .map(drop),
            ),
            Counter::Etcd {
                kv,
                fence,
                counter,
                log,
            } => {
                let ops = [
                    TxnOp::put(counter.as_str(), value.to_string(), None),
                    TxnOp::put(format!("{log}{id}"), entry, None),
                ];
                Access::of(fence.run(kv, token, ops).await.map(drop))
            }
            Counter::Postgres {
                client,
                fence,
                name,
            } => {
                let name = name.as_str();
                let tx = match fence.transaction(client, name, token).await {
                    Ok(tx) => tx,
                    Err(e) => return Access::of(Err(e)),
                };
                let value = value as i64;
                let written = async {
                    tx.execute(
                        "INSERT INTO safety_counter (name, value) VALUES ($1, $2) \
                         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                        &[&name, &value],
                    )
                    .await?;
                    tx.execute(
                        "INSERT INTO safety_log (name, entry) VALUES ($1, $2)",
                        &[&name, &entry],
                    )
                    .await?;
                    tx.commit().await
                };
                match written.await {
                    Ok(()) => Access::Done(()),
                    Err(e) => Access::Failed(e.to_string()),
                }
            }
        }
    }

    /// The log of accepted writes, in the store's order: the list's (Redis), the revisions
    /// of the writes (etcd), the sequence taken under the fence row's lock (PostgreSQL).
    async fn log(&mut self) -> Vec<Entry> {
        match self {
            Counter::Redis { conn, log, .. } => {
                let lines: Vec<String> = redis::cmd("LRANGE")
                    .arg(&*log)
                    .arg(0)
                    .arg(-1)
                    .query_async(conn)
                    .await
                    .unwrap();
                lines.iter().map(|line| Entry::parse(line)).collect()
            }
            Counter::Etcd { kv, log, .. } => {
                let response = kv
                    .get(log.as_str(), Some(GetOptions::new().with_prefix()))
                    .await
                    .unwrap();
                let mut kvs: Vec<_> = response.kvs().iter().collect();
                kvs.sort_by_key(|kv| kv.create_revision());
                kvs.iter()
                    .map(|kv| Entry::parse(kv.value_str().unwrap()))
                    .collect()
            }
            Counter::Postgres { client, name, .. } => client
                .query(
                    "SELECT entry FROM safety_log WHERE name = $1 ORDER BY seq",
                    &[&name.as_str()],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| Entry::parse(row.get(0)))
                .collect(),
        }
    }

    /// The counter, read without a fence.
    async fn value(&mut self) -> u64 {
        match self {
            Counter::Redis { conn, fence, .. } => {
                let value: Option<u64> = redis::cmd("GET")
                    .arg(fence.key())
                    .query_async(conn)
                    .await
                    .unwrap();
                value.unwrap_or_default()
            }
            Counter::Etcd { kv, counter, .. } => kv
                .get(counter.as_str(), None)
                .await
                .unwrap()
                .kvs()
                .first()
                .map_or(0, |kv| kv.value_str().unwrap().parse().unwrap()),
            Counter::Postgres { client, name, .. } => client
                .query_opt(
                    "SELECT value FROM safety_counter WHERE name = $1",
                    &[&name.as_str()],
                )
                .await
                .unwrap()
                .map_or(0, |row| row.get::<_, i64>(0) as u64),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The child process.

/// Contends like the in-process workers, reporting each write, until it has written
/// [`CHILD_WRITES_FIRST`] times; then, in its next hold, reads, says FREEZE-ME and waits for
/// "write" (see [`Freeze`]); then writes without looking at its lock and reports what the
/// fence said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the fenced safety tests; started by them"]
async fn child_contender_frozen_before_a_write() {
    let store_name = child::var(ENV_STORE);
    let store = *Store::ALL
        .iter()
        .find(|store| store.name() == store_name)
        .unwrap_or_else(|| panic!("{ENV_STORE}={store_name}"));
    let key = child::var(ENV_KEY);
    let node = lock_node(store, &child::var(ENV_LOCKS)).await;
    let mut counter = Counter::connect(store, &child::var(ENV_RESOURCE), &key).await;
    let mut commands = child::commands();
    let mut seq = 0;
    let mut written = 0;
    while written < CHILD_WRITES_FIRST {
        let Some(guard) = take(&node, &key).await else {
            continue;
        };
        if let Some(write) = hold(&guard, &mut counter, "child", &mut seq, None).await {
            child::report(&write.line());
            written += u64::from(write.outcome == Outcome::Accepted);
        }
        release(guard).await;
        between_holds().await;
    }

    let mut freeze = Freeze {
        commands: &mut commands,
        held_after: None,
    };
    let write = loop {
        let Some(guard) = take(&node, &key).await else {
            continue;
        };
        let write = hold(&guard, &mut counter, "child", &mut seq, Some(&mut freeze)).await;
        release(guard).await;
        if let Some(write) = write {
            break write;
        }
    };
    child::report(&format!(
        "STALE-WRITE id={} outcome={} held={}",
        write.id,
        write.outcome.name(),
        freeze.held_after.expect("frozen before the write")
    ));
    child::report(&write.line());
    node.shutdown().await;
}
