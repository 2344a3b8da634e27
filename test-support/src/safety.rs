//! The safety checker of the contention tests (`tests/safety.rs`, `tests/safety_semaphore.rs`,
//! `tests/safety_rwlock.rs`, `tests/safety_fenced.rs`, `tests/redis_sentinel.rs`): a record of
//! holds, as each holder saw them and as the store showed them, and the violations a run's
//! record shows.
//!
//! A holder records a [`Hold`]: the stretch of wall-clock time in which the library told it
//! "held" ([`Witness`]), its fencing token, its [`Kind`] (shared, or exclusive: a read-write
//! lock's write hold), and how the hold ended. A test that reads the store itself adds
//! [`StoreLease`]s, the stretch in which the store showed a lease live, and the store's fence
//! counter as it read it. A [`History`] of both finds:
//! - more holders at once than the primitive admits (1 for a lock, N for a semaphore of N), in
//!   either account;
//! - an exclusive hold at once with any other hold, in either account;
//! - a token handed out twice, or out of order ([`TokenOrder`]: in hold order for a lock, in
//!   the order of the acquisitions for a semaphore, whose holders overlap, and above every
//!   earlier token for a read-write lock's writer).
//!
//! [`fenced_violations`] checks the other half, the protected resource's own record of the
//! accesses its fence accepted: no stale token, no lost update.
//!
//! And the parts of a contention run the tests share: [`hold_on`] (a holder whose only work is
//! to hold), [`Fault`] (the Redis server paused past the ttl, or restarted without its data)
//! and [`gather`] (a child process's reports).
//!
//! Wall-clock time ([`SystemTime`]), because it is comparable across the processes of one
//! machine, and with the Redis server's `TIME`; a holder in a child process reports its holds
//! as [`Hold::line`]s.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use leasehold::LockGuard;

use crate::RedisServer;

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done, and released.
    Released,
    /// Done; the release did not reach the store, where the lease ends at its ttl.
    ReleaseFailed,
    /// `is_held()` turned false: the holder stopped working at once.
    Lost,
    /// The protected resource refused the token: a newer holder had used it.
    Refused,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Released,
        Outcome::ReleaseFailed,
        Outcome::Lost,
        Outcome::Refused,
    ];

    /// The word in a history and in a [`Hold::line`].
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Released => "released",
            Outcome::ReleaseFailed => "release-failed",
            Outcome::Lost => "lost",
            Outcome::Refused => "refused",
        }
    }
}

/// What a hold admits beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Other shared holds, as many as the [`History`] admits at once: a lock's hold (one at
    /// once), a semaphore's permit (N at once), a read-write lock's read share (any number).
    Shared,
    /// Nothing at all: a read-write lock's write hold.
    Exclusive,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Shared, Kind::Exclusive];

    /// The word in a history and in a [`Hold::line`].
    pub fn name(self) -> &'static str {
        match self {
            Kind::Shared => "shared",
            Kind::Exclusive => "exclusive",
        }
    }
}

/// The stretch of wall-clock time in which the library told one holder "held", as that holder
/// saw it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Witness {
    /// Just after the first "held".
    pub from: Option<SystemTime>,
    /// Just before the last "held" (after the first).
    pub to: Option<SystemTime>,
}

impl Witness {
    /// Asks the guard. `from` is read just after the first "held" and `to` just before the
    /// last one, so `[from, to]` lies inside the time the library said "held": an overlap of
    /// such intervals is holders at once, never an artefact of when the clock was read.
    pub fn look(&mut self, guard: &LockGuard) -> bool {
        let before = SystemTime::now();
        let held = guard.is_held();
        if held {
            match self.from {
                None => self.from = Some(SystemTime::now()),
                Some(_) => self.to = Some(before),
            }
        }
        held
    }
}

/// Holds `guard` (of a key asked for at `asked`) for `work`, asking `is_held()` every
/// `look_every` and stopping at once when it says no, then releases it: a holder whose only
/// work is to hold. The hold is [`Kind::Shared`]; see [`Hold::with_kind`].
pub async fn hold_on(
    guard: LockGuard,
    asked: SystemTime,
    worker: &str,
    work: Duration,
    look_every: Duration,
) -> Hold {
    let token = guard.fencing_token();
    let mut seen = Witness::default();
    let working = Instant::now();
    let mut lost = !seen.look(&guard);
    while !lost && working.elapsed() < work {
        tokio::time::sleep(look_every).await;
        lost = !seen.look(&guard);
    }
    let ended = SystemTime::now();
    let outcome = if lost {
        // Dropping the guard gives the key back, if it is still ours.
        Outcome::Lost
    } else {
        match guard.release().await {
            Ok(()) => Outcome::Released,
            // The store did not confirm (paused, restarted, failed over): the lease ends at
            // its ttl.
            Err(_) => Outcome::ReleaseFailed,
        }
    };
    Hold::new(worker, token, Some(asked), seen, ended, outcome)
}

/// One hold of a key (a lock, a semaphore's permit, a read-write lock's read share or write
/// hold), as its holder reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    /// Who held it.
    pub worker: String,
    /// Its fencing token.
    pub token: u64,
    /// What it admits beside it.
    pub kind: Kind,
    /// Just before the holder asked for it (`lock`, `acquire`, …), if recorded: an
    /// acquisition asked after another was seen held must get a greater token.
    pub asked: Option<SystemTime>,
    /// See [`Witness`]; `None` if the library never said "held" (twice).
    pub from: Option<SystemTime>,
    /// See [`Witness`].
    pub to: Option<SystemTime>,
    /// When the holder stopped: before calling `release`, or when it learned of the loss.
    pub ended: SystemTime,
    /// How it ended.
    pub outcome: Outcome,
}

impl Hold {
    /// The hold `seen` by its witness, [`Kind::Shared`].
    pub fn new(
        worker: &str,
        token: u64,
        asked: Option<SystemTime>,
        seen: Witness,
        ended: SystemTime,
        outcome: Outcome,
    ) -> Hold {
        Hold {
            worker: worker.to_owned(),
            token,
            kind: Kind::Shared,
            asked,
            from: seen.from,
            to: seen.to,
            ended,
            outcome,
        }
    }

    /// The same hold, of `kind`.
    pub fn with_kind(self, kind: Kind) -> Hold {
        Hold { kind, ..self }
    }

    /// One line for a child process's report: `HOLD worker=… token=… …`, times in
    /// nanoseconds since the Unix epoch. [`Hold::parse`] reads it back.
    pub fn line(&self) -> String {
        let time = |t: Option<SystemTime>| t.map_or("-".to_owned(), |t| nanos(t).to_string());
        format!(
            "HOLD worker={} token={} kind={} asked={} from={} to={} ended={} outcome={}",
            self.worker,
            self.token,
            self.kind.name(),
            time(self.asked),
            time(self.from),
            time(self.to),
            nanos(self.ended),
            self.outcome.name()
        )
    }

    /// A [`Hold::line`], or `None` for any other line.
    pub fn parse(line: &str) -> Option<Hold> {
        let mut words = line.split_whitespace();
        if words.next()? != "HOLD" {
            return None;
        }
        let fields: HashMap<&str, &str> = words
            .map(|word| word.split_once('='))
            .collect::<Option<_>>()?;
        let time = |name: &str| -> Option<Option<SystemTime>> {
            match *fields.get(name)? {
                "-" => Some(None),
                n => Some(Some(from_nanos(n.parse().ok()?))),
            }
        };
        let outcome = *fields.get("outcome")?;
        let kind = *fields.get("kind")?;
        Some(Hold {
            worker: fields.get("worker")?.to_string(),
            token: fields.get("token")?.parse().ok()?,
            kind: *Kind::ALL.iter().find(|k| k.name() == kind)?,
            asked: time("asked")?,
            from: time("from")?,
            to: time("to")?,
            ended: time("ended")??,
            outcome: *Outcome::ALL.iter().find(|o| o.name() == outcome)?,
        })
    }

    /// `[from, to]`, if the holder saw "held" at two instants.
    pub fn interval(&self) -> Option<(SystemTime, SystemTime)> {
        match (self.from, self.to) {
            (Some(from), Some(to)) if from <= to => Some((from, to)),
            _ => None,
        }
    }
}

/// Reads a child process's report lines: its [`Hold::line`]s go to `holds` and its
/// [`Tally::line`]s into `tally`. Answers how many holds it reported.
pub fn gather(reports: &[String], holds: &mut Vec<Hold>, tally: &mut Tally) -> usize {
    let mut reported = 0;
    for report in reports {
        if let Some(hold) = Hold::parse(report) {
            holds.push(hold);
            reported += 1;
        } else if let Some(child_tally) = Tally::parse(report) {
            tally.add(&child_tally);
        }
    }
    reported
}

/// A fault of the Redis server the contenders share, struck while a long hold is under way.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// SIGSTOP for twice the ttl, then SIGCONT: every lease runs out while nothing answers.
    PauseRedis,
    /// SIGKILL and a fresh server on the same port: every lease and counter is forgotten.
    RestartRedisWithoutData,
}

impl Fault {
    /// Strikes `server`, whose leases have `ttl`, now that a long hold is under way; answers
    /// when the fault began and when it was over. (On a multi-threaded runtime: a restart
    /// blocks its thread.)
    pub async fn strike(self, server: &mut RedisServer, ttl: Duration) -> (SystemTime, SystemTime) {
        let from = match self {
            Fault::PauseRedis => {
                // At once: the pause then always outlasts that holder's deadline, which falls
                // before its hold ends.
                let from = SystemTime::now();
                server.pause();
                // The sleep is the fault: every lease outlives its deadline while Redis is
                // frozen.
                tokio::time::sleep(ttl * 2).await;
                server.resume();
                from
            }
            Fault::RestartRedisWithoutData => {
                // Late in the lease's first ttl, where the other nodes' backstop timers (set
                // from the PTTL they read as the hold began) fire close to the holder's
                // renewals: the stretch in which a restart can give two holders at once.
                let into_the_hold = ttl.mul_f64(rand::random_range(0.6..1.0));
                tokio::time::sleep(into_the_hold).await;
                let from = SystemTime::now();
                tokio::task::block_in_place(|| server.restart());
                from
            }
        };
        (from, SystemTime::now())
    }
}

/// A lease as the store showed it: live (by the store's own clock) in every look from `from`
/// to `to`, so live throughout `[from, to]` (renewing a lease that ran out fails; a released
/// or forgotten one never comes back). A member of the store that a look did not show and a
/// later one does is another lease: a read-write lock's waiting writer keeps its owner token
/// across its attempts, and an attempt granted after its caller stopped waiting for it is
/// given back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreLease {
    /// The lease's fencing token, when the store keeps it with the lease (a semaphore's
    /// permits do; a read-write lock's shares and hold do not).
    pub token: Option<u64>,
    /// The holder as the store names it (an owner token).
    pub owner: String,
    /// What it admits beside it.
    pub kind: Kind,
    /// The first look that showed it live.
    pub from: SystemTime,
    /// The last look that showed it live.
    pub to: SystemTime,
}

/// A lease one look at the store showed live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Live {
    /// Its fencing token, if the store keeps it with the lease.
    pub token: Option<u64>,
    /// The holder as the store names it (an owner token).
    pub owner: String,
    /// What it admits beside it.
    pub kind: Kind,
}

/// Looks at a store, in order, gathered into [`StoreLease`]s (each lease from the first look
/// that showed it live to the last), and the store's fence counter as the looks read it.
#[derive(Debug, Default)]
pub struct StoreLooks {
    leases: Vec<StoreLease>,
    /// Each member of the store's latest lease: its place in `leases`, and the look that last
    /// showed it (counting from 1).
    seen: HashMap<Live, (usize, usize)>,
    counter: Vec<(SystemTime, u64)>,
    /// How many looks there were.
    pub looks: usize,
    /// The most leases one look showed live.
    pub most_at_once: usize,
}

impl StoreLooks {
    /// One look, at `at` (the store's clock), that showed `live` (token, owner) leases, all
    /// [`Kind::Shared`] (a semaphore's permits).
    pub fn add(&mut self, at: SystemTime, live: &[(u64, String)]) {
        self.add_live(
            at,
            live.iter().map(|(token, owner)| Live {
                token: Some(*token),
                owner: owner.clone(),
                kind: Kind::Shared,
            }),
        );
    }

    /// One look, at `at` (the store's clock), that showed `live` leases.
    pub fn add_live(&mut self, at: SystemTime, live: impl IntoIterator<Item = Live>) {
        self.looks += 1;
        let mut at_once = 0;
        for lease in live {
            at_once += 1;
            match self.seen.get_mut(&lease) {
                // Shown by the look before too: the same lease, still live.
                Some((n, last)) if *last + 1 == self.looks => {
                    self.leases[*n].to = at;
                    *last = self.looks;
                }
                _ => {
                    self.leases.push(StoreLease {
                        token: lease.token,
                        owner: lease.owner.clone(),
                        kind: lease.kind,
                        from: at,
                        to: at,
                    });
                    self.seen.insert(lease, (self.leases.len() - 1, self.looks));
                }
            }
        }
        self.most_at_once = self.most_at_once.max(at_once);
    }

    /// A look, at `at` (the store's clock), that read the store's fence counter: `last`, the
    /// last token handed out. Every token granted before `at` is at most `last`.
    pub fn add_counter(&mut self, at: SystemTime, last: u64) {
        self.counter.push((at, last));
    }

    /// The leases seen.
    pub fn leases(&self) -> Vec<StoreLease> {
        self.leases.clone()
    }

    /// The fence counter as the looks read it: (when, the last token handed out then).
    pub fn counter(&self) -> Vec<(SystemTime, u64)> {
        self.counter.clone()
    }
}

/// What fencing tokens promise about their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenOrder {
    /// A lock's: each hold's token is greater than the one of every hold before it (holds do
    /// not overlap, so "before" is plain).
    HoldOrder,
    /// A semaphore's: strictly increasing per name in the order they are handed out, so an
    /// acquisition asked after another lease was seen held (by its holder or in the store),
    /// or after the store's fence counter was read, gets a greater token. Holds overlap, so
    /// their own order says nothing.
    GrantOrder,
    /// A read-write lock's: a writer's token is greater than every token handed out before
    /// it, so a write hold asked after another lease (a share or a hold) was seen held, or
    /// after the store's fence counter was read, has a greater token. Readers' tokens promise
    /// nothing about their order.
    WriterOrder,
}

/// A contention run's holds, for the checker and for a reader when it fails.
#[derive(Debug)]
pub struct History {
    /// The origin of the times shown (`+1.234567s`).
    pub started: SystemTime,
    /// How many may hold at once: 1 for a lock, N for a semaphore of N (one permit a hold),
    /// any number of read shares of a read-write lock (`usize::MAX`). An exclusive hold admits
    /// nothing beside it, whatever this says.
    pub at_most: usize,
    /// What the tokens promise.
    pub order: TokenOrder,
    /// Every hold, as its holder reported it.
    pub holds: Vec<Hold>,
    /// The store's account; empty when the test does not read the store.
    pub store: Vec<StoreLease>,
    /// The store's fence counter, as the looks read it ([`StoreLooks::counter`]); empty when
    /// the test does not read it.
    pub counter: Vec<(SystemTime, u64)>,
}

impl History {
    /// A history of `holds` of a lock (at most one holder; tokens in hold order), without the
    /// store's account.
    pub fn of_lock(started: SystemTime, holds: Vec<Hold>) -> History {
        History {
            started,
            at_most: 1,
            order: TokenOrder::HoldOrder,
            holds,
            store: Vec::new(),
            counter: Vec::new(),
        }
    }

    /// A history of `holds` of one permit each of a semaphore of `permits` (at most that many
    /// holders; tokens in grant order), with the store's account `store`.
    pub fn of_semaphore(
        started: SystemTime,
        permits: usize,
        holds: Vec<Hold>,
        store: Vec<StoreLease>,
    ) -> History {
        History {
            started,
            at_most: permits,
            order: TokenOrder::GrantOrder,
            holds,
            store,
            counter: Vec::new(),
        }
    }

    /// A history of `holds` of a read-write lock (read shares [`Kind::Shared`], any number at
    /// once; write holds [`Kind::Exclusive`]; a writer's token above every earlier one), with
    /// the store's account: its leases `store`, and its fence counter `counter`.
    pub fn of_rwlock(
        started: SystemTime,
        holds: Vec<Hold>,
        store: Vec<StoreLease>,
        counter: Vec<(SystemTime, u64)>,
    ) -> History {
        History {
            started,
            at_most: usize::MAX,
            order: TokenOrder::WriterOrder,
            holds,
            store,
            counter,
        }
    }

    /// Whether a hold that began before `fault_from` ended otherwise than released: the
    /// fault cut it short.
    pub fn cut_short_by(&self, fault_from: SystemTime) -> bool {
        self.holds.iter().any(|hold| {
            hold.outcome != Outcome::Released && hold.from.is_some_and(|from| from < fault_from)
        })
    }

    /// How many holds began after `fault_to`.
    pub fn began_after(&self, fault_to: SystemTime) -> usize {
        self.holds
            .iter()
            .filter(|hold| hold.from.is_some_and(|from| from > fault_to))
            .count()
    }

    /// `t` as seconds since the start of the run.
    pub fn at(&self, t: SystemTime) -> String {
        since(self.started, t)
    }

    /// Everything the holds and the store's account show that should not be, one line each.
    pub fn violations(&self) -> Vec<String> {
        let mut found = Vec::new();
        let timed: Vec<Span<'_>> = self
            .holds
            .iter()
            .filter_map(|hold| {
                let (from, to) = hold.interval()?;
                Some(Span {
                    who: &hold.worker,
                    token: Some(hold.token),
                    kind: hold.kind,
                    from,
                    to,
                })
            })
            .collect();
        let leases: Vec<Span<'_>> = self
            .store
            .iter()
            .map(|lease| Span {
                who: &lease.owner,
                token: lease.token,
                kind: lease.kind,
                from: lease.from,
                to: lease.to,
            })
            .collect();
        // (1) At most `at_most` holders at once, and an exclusive hold alone, by their own
        // account and by the store's. A holder's stretch is open at its ends for this (two
        // holds that meet at an instant are in turn), a lease's in the store is closed: each
        // end is a look that showed it live.
        let holders = Account::Holders;
        found.extend(self.crowds(holders, timed.clone()));
        found.extend(self.alone(holders, &timed));
        found.extend(self.crowds(Account::Store, leases.clone()));
        found.extend(self.alone(Account::Store, &leases));

        // (2) No token is handed out twice, by either account.
        let mut by_token: HashMap<u64, &Hold> = HashMap::new();
        for hold in &self.holds {
            if let Some(other) = by_token.insert(hold.token, hold) {
                found.push(format!(
                    "token {} handed to both {} and {}",
                    hold.token, other.worker, hold.worker
                ));
            }
        }
        let mut in_store: HashMap<u64, &StoreLease> = HashMap::new();
        for lease in &self.store {
            let Some(token) = lease.token else { continue };
            if let Some(other) = in_store.insert(token, lease) {
                if other.owner == lease.owner {
                    found.push(format!(
                        "the lease of {} (token {token}) back in the store at {} after a look \
                         without it",
                        lease.owner,
                        self.at(lease.from)
                    ));
                } else {
                    found.push(format!(
                        "token {token} in the store for both {} and {}",
                        other.owner, lease.owner
                    ));
                }
            }
        }

        // (3) Tokens in the promised order.
        let bound = |hold: &Hold| match self.order {
            TokenOrder::HoldOrder => false,
            TokenOrder::GrantOrder => true,
            TokenOrder::WriterOrder => hold.kind == Kind::Exclusive,
        };
        if self.order == TokenOrder::HoldOrder {
            let mut in_order = timed.clone();
            in_order.sort_by_key(|span| span.from);
            for pair in in_order.windows(2) {
                let (before, after) = (&pair[0], &pair[1]);
                if after.token <= before.token {
                    found.push(format!(
                        "token {} of {} follows token {} of {}",
                        show(after.token),
                        after.who,
                        show(before.token),
                        before.who
                    ));
                }
            }
        }
        // Every token seen handed out, by when it was first seen so: a lease seen held by its
        // holder or in the store, or the store's fence counter read.
        let mut seen: Vec<(SystemTime, u64, String)> = timed
            .iter()
            .chain(&leases)
            .filter_map(|span| {
                let token = span.token?;
                Some((span.from, token, format!("of {}, seen held", span.who)))
            })
            .chain(
                self.counter
                    .iter()
                    .map(|&(at, last)| (at, last, "the store's fence counter showed".to_owned())),
            )
            .collect();
        seen.sort_by_key(|&(at, ..)| at);
        for hold in self.holds.iter().filter(|hold| bound(hold)) {
            let Some(asked) = hold.asked else { continue };
            // The greatest token seen handed out before this acquisition was asked.
            let before = seen
                .iter()
                .take_while(|&&(at, ..)| at < asked)
                .max_by_key(|&&(_, token, _)| token);
            if let Some((at, token, how)) = before {
                if hold.token <= *token {
                    found.push(format!(
                        "token {} of {}, asked at {}, is not above token {token} {how} at {}",
                        hold.token,
                        hold.worker,
                        self.at(asked),
                        self.at(*at)
                    ));
                }
            }
        }
        found
    }

    /// A violation for each span that begins while `at_most` others are under way.
    fn crowds(&self, account: Account, mut spans: Vec<Span<'_>>) -> Vec<String> {
        let mut found = Vec::new();
        spans.sort_by_key(|span| span.from);
        let mut under_way: Vec<Span<'_>> = Vec::new();
        for span in spans {
            under_way.retain(|other| account.at_once(other, &span));
            if under_way.len() >= self.at_most {
                let others: Vec<String> = under_way
                    .iter()
                    .map(|other| {
                        format!(
                            "{} (token {}) {}..{}",
                            other.who,
                            show(other.token),
                            self.at(other.from),
                            self.at(other.to)
                        )
                    })
                    .collect();
                found.push(format!(
                    "{} holders at once (at most {}) {}: {} (token {}) from {} while {}",
                    under_way.len() + 1,
                    self.at_most,
                    account.name(),
                    span.who,
                    show(span.token),
                    self.at(span.from),
                    others.join(", ")
                ));
            }
            under_way.push(span);
        }
        found
    }

    /// A violation for each pair of spans at once of which one is exclusive.
    fn alone(&self, account: Account, spans: &[Span<'_>]) -> Vec<String> {
        let mut found = Vec::new();
        for (n, one) in spans.iter().enumerate() {
            for other in &spans[n + 1..] {
                let exclusive = one.kind == Kind::Exclusive || other.kind == Kind::Exclusive;
                if exclusive && account.at_once(one, other) && account.at_once(other, one) {
                    let (first, second) = if one.from <= other.from {
                        (one, other)
                    } else {
                        (other, one)
                    };
                    found.push(format!(
                        "{} hold of {} (token {}) {}..{} at once with {} hold of {} \
                         (token {}) {}..{} {}",
                        second.kind.name(),
                        second.who,
                        show(second.token),
                        self.at(second.from),
                        self.at(second.to),
                        first.kind.name(),
                        first.who,
                        show(first.token),
                        self.at(first.from),
                        self.at(first.to),
                        account.name()
                    ));
                }
            }
        }
        found
    }
}

/// Whose account of the holds.
#[derive(Debug, Clone, Copy)]
enum Account {
    /// The holders': each stretch from just after the library first said "held" to just
    /// before it last did.
    Holders,
    /// The store's: each stretch from the first look that showed the lease live to the last.
    Store,
}

impl Account {
    fn name(self) -> &'static str {
        match self {
            Account::Holders => "by the holders' account",
            Account::Store => "by the store's account",
        }
    }

    /// Whether `earlier` is still under way when `later` begins. A holder's stretch that ends
    /// as another begins is not at once with it (it was handed on); a look that showed a
    /// lease live for the last time and another for the first showed both live.
    fn at_once(self, earlier: &Span<'_>, later: &Span<'_>) -> bool {
        match self {
            Account::Holders => earlier.to > later.from,
            Account::Store => earlier.to >= later.from,
        }
    }
}

/// A token, or `?` where the store does not keep it with the lease.
fn show(token: Option<u64>) -> String {
    token.map_or("?".to_owned(), |token| token.to_string())
}

/// A stretch of holding, by either account.
#[derive(Debug, Clone)]
struct Span<'a> {
    who: &'a str,
    token: Option<u64>,
    kind: Kind,
    from: SystemTime,
    to: SystemTime,
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |t: Option<SystemTime>| t.map_or("-".to_owned(), |t| self.at(t));
        // Kinds are shown where there is more than one.
        let kinds = self.holds.iter().any(|hold| hold.kind == Kind::Exclusive)
            || self.store.iter().any(|lease| lease.kind == Kind::Exclusive);
        let kind = |kind: Kind| if kinds { kind.name() } else { "" };
        writeln!(
            f,
            "holds, by the time they began (asked, held from..to, ended):"
        )?;
        let mut holds: Vec<&Hold> = self.holds.iter().collect();
        holds.sort_by_key(|hold| hold.from.unwrap_or(hold.ended));
        for hold in holds {
            writeln!(
                f,
                "  asked {:<10} {:>10}..{:<10} ended {:<10} token {} {:<14} {} {}",
                at(hold.asked),
                at(hold.from),
                at(hold.to),
                at(Some(hold.ended)),
                hold.token,
                hold.worker,
                hold.outcome.name(),
                kind(hold.kind)
            )?;
        }
        if !self.store.is_empty() {
            writeln!(
                f,
                "leases in the store, by the first look that showed them:"
            )?;
            let mut leases: Vec<&StoreLease> = self.store.iter().collect();
            leases.sort_by_key(|lease| lease.from);
            for lease in leases {
                writeln!(
                    f,
                    "  {:>10}..{:<10} token {} owner {} {}",
                    self.at(lease.from),
                    self.at(lease.to),
                    show(lease.token),
                    lease.owner,
                    kind(lease.kind)
                )?;
            }
        }
        if let (Some(first), Some(last)) = (self.counter.first(), self.counter.last()) {
            writeln!(
                f,
                "the store's fence counter, read {} times: {} at {}, .., {} at {}",
                self.counter.len(),
                first.1,
                self.at(first.0),
                last.1,
                self.at(last.0)
            )?;
        }
        Ok(())
    }
}

/// One access a fenced resource accepted, in the resource's order.
#[derive(Debug, Clone, Copy)]
pub struct Accepted<'a> {
    /// The token presented.
    pub token: u64,
    /// The value written, for a write (`None` for a read).
    pub wrote: Option<u64>,
    /// Who: a worker, or a write's id.
    pub by: &'a str,
}

/// The resource's own record checked: tokens never decrease in its order (no stale token
/// accepted), and the writes, each the value read plus one, are 1, 2, …, n with `value` (the
/// resource at the end) n (no update lost). One line per violation; a lost update is one
/// violation, not one per write after it.
pub fn fenced_violations<'a>(
    accepted: impl IntoIterator<Item = Accepted<'a>>,
    value: u64,
) -> Vec<String> {
    let mut found = Vec::new();
    let mut newest: Option<(u64, &str)> = None;
    let (mut writes, mut previous) = (0, 0);
    for (n, access) in accepted.into_iter().enumerate() {
        if let Some((token, by)) = newest {
            if access.token < token {
                found.push(format!(
                    "stale token {} accepted from {} (access {}) after token {token} from {by}",
                    access.token,
                    access.by,
                    n + 1
                ));
            }
        }
        if newest.is_none_or(|(token, _)| access.token >= token) {
            newest = Some((access.token, access.by));
        }
        if let Some(wrote) = access.wrote {
            writes += 1;
            if wrote != previous + 1 {
                found.push(format!(
                    "lost update: accepted write number {writes} by {} set {wrote} after \
                     {previous}",
                    access.by
                ));
            }
            previous = wrote;
        }
    }
    if value != writes {
        found.push(format!(
            "the resource holds {value} after {writes} accepted writes"
        ));
    }
    found
}

/// What went wrong without breaking a worker: how it retried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Waits that ran out (the key stayed held, or the store did not answer in time).
    pub timeouts: u64,
    /// Other retryable errors: the store unreachable or the backend down.
    pub store_errors: u64,
}

impl Tally {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &Tally) {
        self.timeouts += other.timeouts;
        self.store_errors += other.store_errors;
    }

    /// One line for a child process's report; [`Tally::parse`] reads it back.
    pub fn line(&self) -> String {
        format!(
            "TALLY timeouts={} store_errors={}",
            self.timeouts, self.store_errors
        )
    }

    /// A [`Tally::line`], or `None` for any other line.
    pub fn parse(line: &str) -> Option<Tally> {
        let rest = line.strip_prefix("TALLY ")?;
        let mut tally = Tally::default();
        for word in rest.split_whitespace() {
            match word.split_once('=')? {
                ("timeouts", n) => tally.timeouts = n.parse().ok()?,
                ("store_errors", n) => tally.store_errors = n.parse().ok()?,
                _ => return None,
            }
        }
        Some(tally)
    }
}

/// The violations and the history, for a failure message; empty when there are none.
pub fn verdict(violations: &[String], history: &impl fmt::Display) -> String {
    if violations.is_empty() {
        String::new()
    } else {
        format!(
            "{} violations:\n  {}\n{history}",
            violations.len(),
            violations.join("\n  ")
        )
    }
}

/// `t` in nanoseconds since the Unix epoch: a time one process tells another.
pub fn nanos(t: SystemTime) -> u64 {
    let since_epoch = t.duration_since(UNIX_EPOCH).expect("clock after 1970");
    u64::try_from(since_epoch.as_nanos()).expect("before 2554")
}

/// The time `nanos` nanoseconds after the Unix epoch.
pub fn from_nanos(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

/// `t` as seconds since `origin`, for reading a history.
pub fn since(origin: SystemTime, t: SystemTime) -> String {
    match t.duration_since(origin) {
        Ok(after) => format!("+{:.6}s", after.as_secs_f64()),
        Err(before) => format!("-{:.6}s", before.duration().as_secs_f64()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000) + Duration::from_millis(ms)
    }

    /// A released hold held from `from` to `to` (ms), asked 1 ms before.
    fn hold(worker: &str, token: u64, from: u64, to: u64) -> Hold {
        Hold {
            worker: worker.to_owned(),
            token,
            kind: Kind::Shared,
            asked: Some(at(from - 1)),
            from: Some(at(from)),
            to: Some(at(to)),
            ended: at(to + 1),
            outcome: Outcome::Released,
        }
    }

    fn lease(owner: &str, token: u64, from: u64, to: u64) -> StoreLease {
        StoreLease {
            token: Some(token),
            owner: owner.to_owned(),
            kind: Kind::Shared,
            from: at(from),
            to: at(to),
        }
    }

    /// A write hold, as [`hold`].
    fn write(worker: &str, token: u64, from: u64, to: u64) -> Hold {
        hold(worker, token, from, to).with_kind(Kind::Exclusive)
    }

    /// A read-write lock's share (`Shared`) or hold (`Exclusive`) as a look at the store
    /// shows it: an owner, no token.
    fn live(owner: &str, kind: Kind) -> Live {
        Live {
            token: None,
            owner: owner.to_owned(),
            kind,
        }
    }

    fn semaphore(at_most: usize, holds: Vec<Hold>, store: Vec<StoreLease>) -> History {
        History::of_semaphore(at(0), at_most, holds, store)
    }

    #[test]
    fn a_lock_held_in_turn_passes() {
        let history = History::of_lock(
            at(0),
            vec![
                hold("a", 1, 10, 20),
                hold("b", 2, 20, 30),
                hold("a", 3, 31, 40),
            ],
        );
        assert_eq!(history.violations(), Vec::<String>::new());
    }

    #[test]
    fn two_lock_holders_at_once_are_a_violation() {
        let history = History::of_lock(at(0), vec![hold("a", 1, 10, 20), hold("b", 2, 19, 30)]);
        let found = history.violations();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("2 holders at once (at most 1) by the holders' account: b"),
            "{found:?}"
        );
        // And the failure message shows both holds.
        let message = verdict(&found, &history);
        assert!(message.contains("1 violations:"), "{message}");
        assert!(message.contains("+0.019000s..+0.030000s"), "{message}");
    }

    #[test]
    fn lock_tokens_out_of_hold_order_or_repeated_are_violations() {
        let history = History::of_lock(
            at(0),
            vec![
                hold("a", 5, 10, 20),
                hold("b", 4, 21, 30),
                hold("c", 4, 31, 40),
            ],
        );
        let found = history.violations();
        assert!(
            found.contains(&"token 4 of b follows token 5 of a".to_owned()),
            "{found:?}"
        );
        assert!(
            found.contains(&"token 4 handed to both b and c".to_owned()),
            "{found:?}"
        );
        assert!(
            found.contains(&"token 4 of c follows token 4 of b".to_owned()),
            "{found:?}"
        );
    }

    #[test]
    fn n_semaphore_holders_at_once_pass_and_one_more_is_a_violation() {
        let three = vec![
            hold("a", 1, 10, 50),
            hold("b", 2, 11, 50),
            hold("c", 3, 12, 50),
            // Begins as a ends: not at once with it.
            hold("d", 4, 50, 60),
        ];
        assert_eq!(
            semaphore(3, three.clone(), vec![]).violations(),
            Vec::<String>::new()
        );
        let found = semaphore(2, three, vec![]).violations();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("3 holders at once (at most 2) by the holders' account: c"),
            "{found:?}"
        );
    }

    #[test]
    fn the_stores_account_is_checked_too() {
        let holds = vec![hold("a", 1, 10, 20)];
        let store = vec![
            lease("x", 1, 10, 30),
            lease("y", 2, 12, 30),
            lease("z", 3, 29, 31),
        ];
        let found = semaphore(2, holds, store).violations();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("3 holders at once (at most 2) by the store's account: z"),
            "{found:?}"
        );
    }

    #[test]
    fn looks_at_the_store_make_leases_and_a_token_shown_for_two_owners_is_a_violation() {
        let mut looks = StoreLooks::default();
        looks.add(at(10), &[(1, "x".to_owned())]);
        looks.add(at(12), &[(1, "x".to_owned()), (1, "y".to_owned())]);
        looks.add(at(14), &[(1, "y".to_owned())]);
        assert_eq!((looks.looks, looks.most_at_once), (3, 2));
        let leases = looks.leases();
        assert_eq!(leases, [lease("x", 1, 10, 12), lease("y", 1, 12, 14)]);
        let found = semaphore(3, vec![], leases).violations();
        assert_eq!(found, ["token 1 in the store for both x and y"]);
        // A permit's lease never comes back.
        looks.add_live(at(16), []);
        looks.add(at(18), &[(1, "y".to_owned())]);
        let found = semaphore(3, vec![], looks.leases()).violations();
        assert!(
            found.contains(
                &"the lease of y (token 1) back in the store at +0.018000s after a look without it"
                    .to_owned()
            ),
            "{found:?}"
        );
    }

    #[test]
    fn a_semaphore_token_not_above_one_seen_before_it_was_asked_is_a_violation() {
        // b asked at 19, after a was seen held at 10 (its holder) and c's lease at 15 (the
        // store), with a token below c's.
        let holds = vec![hold("a", 1, 10, 50), hold("b", 2, 20, 50)];
        let store = vec![lease("c", 3, 15, 16)];
        let found = semaphore(3, holds, store).violations();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("token 2 of b, asked at +0.019000s, is not above token 3 of c"),
            "{found:?}"
        );
        // Overlapping holds in any token order are fine when each was asked before the
        // other was seen held.
        let mut early = hold("e", 7, 30, 40);
        early.asked = Some(at(5));
        assert_eq!(
            semaphore(3, vec![hold("a", 8, 10, 50), early], vec![]).violations(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_semaphore_lease_in_the_store_beside_n_others_at_one_look_is_a_violation() {
        // y is last seen, and z first seen, by the look at 30: that look showed x, y and z.
        let store = vec![
            lease("x", 1, 10, 40),
            lease("y", 2, 12, 30),
            lease("z", 3, 30, 40),
        ];
        let found = semaphore(2, vec![], store).violations();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("3 holders at once (at most 2) by the store's account: z"),
            "{found:?}"
        );
    }

    #[test]
    fn readers_share_and_a_writer_in_turn_with_them_passes() {
        let holds = vec![
            hold("r1", 1, 10, 30),
            hold("r2", 2, 11, 40),
            hold("r3", 3, 20, 25),
            // Begins as the last reader ends.
            write("w1", 4, 40, 50),
            write("w2", 5, 51, 60),
            hold("r1", 6, 61, 70),
        ];
        let history = History::of_rwlock(at(0), holds, vec![], vec![]);
        assert_eq!(history.violations(), Vec::<String>::new());
    }

    #[test]
    fn a_writer_at_once_with_a_reader_or_a_writer_is_a_violation() {
        let holds = vec![
            hold("r1", 1, 10, 30),
            hold("r2", 2, 11, 40),
            write("w1", 3, 39, 50),
            write("w2", 4, 49, 60),
        ];
        let history = History::of_rwlock(at(0), holds, vec![], vec![]);
        let found = history.violations();
        assert_eq!(
            found,
            [
                "exclusive hold of w1 (token 3) +0.039000s..+0.050000s at once with shared \
                 hold of r2 (token 2) +0.011000s..+0.040000s by the holders' account",
                "exclusive hold of w2 (token 4) +0.049000s..+0.060000s at once with exclusive \
                 hold of w1 (token 3) +0.039000s..+0.050000s by the holders' account",
            ]
        );
        // And the failure message shows the kinds.
        let message = verdict(&found, &history);
        assert!(
            message.contains("r2             released shared"),
            "{message}"
        );
        assert!(
            message.contains("w1             released exclusive"),
            "{message}"
        );
    }

    #[test]
    fn a_look_that_shows_the_writer_beside_a_reader_is_a_violation() {
        let mut looks = StoreLooks::default();
        looks.add_live(at(10), [live("a", Kind::Shared), live("b", Kind::Shared)]);
        looks.add_live(at(12), [live("b", Kind::Shared)]);
        looks.add_live(at(14), [live("w", Kind::Exclusive)]);
        assert_eq!(
            History::of_rwlock(at(0), vec![], looks.leases(), vec![]).violations(),
            Vec::<String>::new()
        );
        // A writer's owner in the store again after a look without it is another grant.
        looks.add_live(at(15), [live("b", Kind::Shared)]);
        looks.add_live(at(16), [live("w", Kind::Exclusive)]);
        assert_eq!(
            History::of_rwlock(at(0), vec![], looks.leases(), vec![]).violations(),
            Vec::<String>::new()
        );
        // Seen at one look only, each: the look showed both.
        looks.add_live(
            at(17),
            [live("v", Kind::Exclusive), live("c", Kind::Shared)],
        );
        let found = History::of_rwlock(at(0), vec![], looks.leases(), vec![]).violations();
        assert_eq!(
            found,
            [
                "shared hold of c (token ?) +0.017000s..+0.017000s at once with exclusive hold of \
              v (token ?) +0.017000s..+0.017000s by the store's account"
            ]
        );
    }

    #[test]
    fn a_writer_token_not_above_every_token_before_it_was_asked_is_a_violation() {
        // w1 asked at 29, after the counter showed 7 at 25; w2 asked at 39, after r1 (token 9)
        // was seen held at 35. Readers' tokens may come in any order.
        let mut looks = StoreLooks::default();
        looks.add_counter(at(25), 7);
        let holds = vec![
            hold("r2", 3, 10, 20),
            write("w1", 6, 30, 34),
            hold("r1", 9, 35, 60),
            hold("r3", 8, 40, 60),
            write("w2", 8, 62, 70),
        ];
        let found = History::of_rwlock(at(0), holds, vec![], looks.counter()).violations();
        assert_eq!(
            found,
            [
                "token 8 handed to both r3 and w2",
                "token 6 of w1, asked at +0.029000s, is not above token 7 the store's fence \
                 counter showed at +0.025000s",
                "token 8 of w2, asked at +0.061000s, is not above token 9 of r1, seen held at \
                 +0.035000s",
            ]
        );
        // A counter read after the writer asked says nothing about its token.
        let mut late = StoreLooks::default();
        late.add_counter(at(29), 7);
        let holds = vec![write("w1", 6, 30, 34)];
        assert_eq!(
            History::of_rwlock(at(0), holds, vec![], late.counter()).violations(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_hold_round_trips_through_its_line() {
        let mut lost = hold("node0-worker1", 1 << 60, 10, 20);
        lost.outcome = Outcome::Lost;
        lost.to = None;
        assert_eq!(Hold::parse(&lost.line()), Some(lost));
        let write = write("child-worker0", 7, 10, 20);
        assert_eq!(Hold::parse(&write.line()), Some(write));
        assert_eq!(Hold::parse("TALLY timeouts=1 store_errors=2"), None);
        let tally = Tally {
            timeouts: 3,
            store_errors: 4,
        };
        assert_eq!(Tally::parse(&tally.line()), Some(tally));
    }

    #[test]
    fn fenced_stale_tokens_and_lost_updates_are_violations() {
        let ok = [
            Accepted {
                token: 1,
                wrote: None,
                by: "a",
            },
            Accepted {
                token: 1,
                wrote: Some(1),
                by: "a",
            },
            Accepted {
                token: 2,
                wrote: Some(2),
                by: "b",
            },
        ];
        assert_eq!(fenced_violations(ok, 2), Vec::<String>::new());
        assert_eq!(
            fenced_violations(ok, 3),
            ["the resource holds 3 after 2 accepted writes"]
        );
        let stale_and_lost = [
            ok[0],
            ok[1],
            ok[2],
            Accepted {
                token: 1,
                wrote: Some(3),
                by: "a",
            },
            Accepted {
                token: 2,
                wrote: Some(3),
                by: "b",
            },
        ];
        assert_eq!(
            fenced_violations(stale_and_lost, 3),
            [
                "stale token 1 accepted from a (access 4) after token 2 from b",
                "lost update: accepted write number 4 by b set 3 after 3",
                "the resource holds 3 after 4 accepted writes",
            ]
        );
    }
}
