//! Bad input at every public entry point, in one place: each row of the tables below names an
//! entry point and an input, and says which error it must give and what the error's message
//! must name. Lock requests run against the memory store, a real Redis and a real etcd (both
//! modes), so every backend rejects the same inputs the same way; manager settings and store
//! addresses run once.
//!
//! Every call runs in its own task under a time limit, so a panic or a hang fails the test
//! naming the row. After each lock request row, another node takes the row's valid keys, which
//! fails if the row left one held, and the row's own node must still answer (its manager did
//! not die on the input).

use leasehold_test_support::etcd_server;
use leasehold_test_support::redis_server;

use std::time::Duration;

use etcd_server::EtcdServer;
use futures::future::BoxFuture;
use futures::FutureExt;
use leasehold::testing::{start, unique_key};
use leasehold::{
    Error, EtcdBackend, EtcdMode, LockBackend, LockClient, LockGuard, LockManager,
    LockManagerBuilder, LockManagerMsg, LockOptions, MemoryBackend, OwnerToken, RedisBackend, Wait,
    MAX_KEY_LEN, MAX_METADATA_LEN, MAX_TTL,
};
use redis_server::RedisServer;
use tokio::time::timeout;

/// How long one row may take before it counts as a hang. Far above any answer that needs no
/// I/O, and above the store operation budget (5 s) for rows that do talk to the store.
const ROW_LIMIT: Duration = Duration::from_secs(10);

/// How long a row may take while its store is paused: an answer that needs no I/O comes at
/// once, one that waits for the store comes only after the operation budget (5 s).
const PAUSED_LIMIT: Duration = Duration::from_secs(2);

/// The backend name every test node is started with (`leasehold::testing::start`).
const STORE: &str = "store";

/// A backend name no node has.
const UNKNOWN: &str = "no-such-store";

/// What a row's call came to. The call gives back whatever it took (it releases a guard it got)
/// before it returns.
type Outcome = Result<(), Failure>;

#[derive(Debug)]
enum Failure {
    /// The library refused, with this error.
    Refused(Error),
    /// The manager actor did not answer the message (ractor's messaging error): it has stopped.
    Unanswered(String),
    /// Something else was wrong, said here (a lock taken that should not be, one not kept…).
    Wrong(String),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::Refused(error)
    }
}

/// Which error a refusal must be.
struct Variant {
    name: &'static str,
    is: fn(&Error) -> bool,
}

/// `variant!(Error::EmptyKey)`: the pattern, and its text for failure messages.
macro_rules! variant {
    ($pattern:pat) => {
        Variant {
            name: stringify!($pattern),
            is: |error| matches!(error, $pattern),
        }
    };
}

/// What a row must come to.
enum Expect {
    /// Rejected as invalid input, before any I/O: this variant, and a message naming these.
    Invalid(Variant, Vec<String>),
    /// Refused for the state of the lock (not the input): this variant, naming these.
    Refused(Variant, Vec<String>),
    /// The store could not be reached: this variant, retryable, naming these.
    Unreachable(Variant, Vec<String>),
    /// `Error::ManagerStopped`: fatal.
    Stopped,
    /// The stopped manager does not answer the message at all.
    Unanswered,
    /// Done (a lock taken and given back, an answer given).
    Accepted,
}

impl std::fmt::Debug for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Invalid(v, names) => write!(f, "invalid input {} naming {names:?}", v.name),
            Expect::Refused(v, names) => write!(f, "refusal {} naming {names:?}", v.name),
            Expect::Unreachable(v, names) => write!(f, "retryable {} naming {names:?}", v.name),
            Expect::Stopped => write!(f, "Error::ManagerStopped"),
            Expect::Unanswered => write!(f, "no answer from the stopped manager"),
            Expect::Accepted => write!(f, "success"),
        }
    }
}

impl Expect {
    /// Whether `outcome` is what this expects, and if not, why not.
    fn check(&self, outcome: Outcome) -> Result<(), String> {
        let error = match (self, outcome) {
            (Expect::Accepted, Ok(())) => return Ok(()),
            // A stopped actor's mailbox is closed: the call cannot even be sent.
            (Expect::Unanswered, Err(Failure::Unanswered(why)))
                if why.starts_with("Messaging(") =>
            {
                return Ok(())
            }
            (_, Err(Failure::Wrong(why))) => return Err(why),
            (
                Expect::Invalid(..)
                | Expect::Refused(..)
                | Expect::Unreachable(..)
                | Expect::Stopped,
                Err(Failure::Refused(error)),
            ) => error,
            (expect, outcome) => return Err(format!("expected {expect:?}, got {outcome:?}")),
        };
        let (variant, names, classes) = match self {
            Expect::Invalid(v, names) => (v, names.clone(), (true, false, false)),
            Expect::Refused(v, names) => (v, names.clone(), (false, false, false)),
            Expect::Unreachable(v, names) => (v, names.clone(), (false, true, false)),
            Expect::Stopped => (
                &variant!(Error::ManagerStopped),
                vec!["stopped".to_owned()],
                (false, false, true),
            ),
            Expect::Unanswered | Expect::Accepted => unreachable!("answered above"),
        };
        if !(variant.is)(&error) {
            return Err(format!("expected {}, got {error:?}", variant.name));
        }
        let got = (
            error.is_invalid_input(),
            error.is_retryable(),
            error.is_fatal(),
        );
        if got != classes {
            return Err(format!(
                "(is_invalid_input, is_retryable, is_fatal) of {error:?} is {got:?}, not {classes:?}"
            ));
        }
        let message = error.to_string();
        match names.iter().find(|name| !message.contains(name.as_str())) {
            Some(name) => Err(format!("the message {message:?} does not name {name:?}")),
            None => Ok(()),
        }
    }

    fn is_invalid(&self) -> bool {
        matches!(self, Expect::Invalid(..))
    }

    fn stops_the_node(&self) -> bool {
        matches!(self, Expect::Stopped | Expect::Unanswered)
    }
}

/// `Expect::Invalid` naming `names`.
fn invalid<const N: usize>(variant: Variant, names: [&str; N]) -> Expect {
    Expect::Invalid(variant, names.map(str::to_owned).to_vec())
}

/// `Expect::Invalid` for a bad ttl: `Error::InvalidTtl` naming it as `Duration`'s `Debug`
/// writes it.
fn invalid_ttl(ttl: Duration) -> Expect {
    invalid(variant!(Error::InvalidTtl { .. }), [&format!("{ttl:?}")])
}

/// `Expect::Invalid` for an unknown backend: `Error::UnknownBackend` naming it and the
/// configured ones.
fn unknown_backend(name: &str) -> Expect {
    invalid(
        variant!(Error::UnknownBackend { .. }),
        [&format!("{name:?}"), &format!("{STORE:?}")],
    )
}

/// The valid keys of one row, each unique to the row. Bad keys are built from them, so that a
/// store that cut a bad key short (at a NUL, at a newline, at the length limit) would take one
/// of these, which the check after the row finds.
#[derive(Clone)]
struct Keys {
    key: String,
}

impl Keys {
    fn new() -> Self {
        Keys {
            key: unique_key("bad-input"),
        }
    }

    /// The row's key, padded to exactly `MAX_KEY_LEN` bytes.
    fn at_max(&self) -> String {
        format!("{:k<MAX_KEY_LEN$}", self.key)
    }

    /// The row's key, padded to one byte over `MAX_KEY_LEN`.
    fn over_max(&self) -> String {
        format!("{}k", self.at_max())
    }

    /// The row's key, then `ch`, then more.
    fn with(&self, ch: char) -> String {
        format!("{}{ch}tail", self.key)
    }

    /// Every valid key of the row: none may be held after it.
    fn all(&self) -> [String; 2] {
        [self.key.clone(), self.at_max()]
    }
}

/// The bad keys every keyed entry point must reject.
#[derive(Clone, Copy)]
enum BadKey {
    Empty,
    OverMax,
    Nul,
    Newline,
}

const BAD_KEYS: [BadKey; 4] = [BadKey::Empty, BadKey::OverMax, BadKey::Nul, BadKey::Newline];

impl BadKey {
    fn label(self) -> &'static str {
        match self {
            BadKey::Empty => "empty key",
            BadKey::OverMax => "key one byte over MAX_KEY_LEN",
            BadKey::Nul => "key with NUL",
            BadKey::Newline => "key with newline",
        }
    }

    fn key(self, keys: &Keys) -> String {
        match self {
            BadKey::Empty => String::new(),
            BadKey::OverMax => keys.over_max(),
            BadKey::Nul => keys.with('\0'),
            BadKey::Newline => keys.with('\n'),
        }
    }

    fn expect(self, keys: &Keys) -> Expect {
        match self {
            BadKey::Empty => invalid(variant!(Error::EmptyKey), ["empty"]),
            // The message shows the start of the key (the whole is too long to print).
            BadKey::OverMax => invalid(
                variant!(Error::KeyTooLong { .. }),
                [&keys.key, &format!("{} bytes", MAX_KEY_LEN + 1)],
            ),
            BadKey::Nul => invalid(
                variant!(Error::KeyHasControlChar { ch: '\0', .. }),
                [&format!("{:?}", self.key(keys)), "'\\0'"],
            ),
            BadKey::Newline => invalid(
                variant!(Error::KeyHasControlChar { ch: '\n', .. }),
                [&format!("{:?}", self.key(keys)), "'\\n'"],
            ),
        }
    }
}

/// Ttls outside `MIN_TTL..=MAX_TTL`.
const BAD_TTLS: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_nanos(1),
    Duration::from_nanos(999_999),
    MAX_TTL.saturating_add(Duration::from_nanos(1)),
    Duration::MAX,
];

/// A public entry point that takes a key: the `LockClient` methods and the `LockManagerMsg`s
/// sent with `ractor::call!`.
#[derive(Clone, Copy, Debug)]
enum Entry {
    TryLock,
    Lock,
    WithLock,
    IsLocked,
    Info,
    Watch,
    Acquire,
    Release,
    Renew,
    IsLockedMsg,
    InfoMsg,
    WatchMsg,
}

/// The entry points that take a lock key (`Watch` takes a prefix).
const KEYED: [Entry; 10] = [
    Entry::TryLock,
    Entry::Lock,
    Entry::WithLock,
    Entry::IsLocked,
    Entry::Info,
    Entry::Acquire,
    Entry::Release,
    Entry::Renew,
    Entry::IsLockedMsg,
    Entry::InfoMsg,
];

/// The entry points that take `LockOptions`.
const ACQUIRING: [Entry; 4] = [Entry::TryLock, Entry::Lock, Entry::WithLock, Entry::Acquire];

/// The entry points that wait as `LockOptions::with_wait` says (`try_lock` never waits).
const WAITING: [Entry; 3] = [Entry::Lock, Entry::WithLock, Entry::Acquire];

impl Entry {
    fn label(self) -> &'static str {
        match self {
            Entry::TryLock => "LockClient::try_lock",
            Entry::Lock => "LockClient::lock",
            Entry::WithLock => "LockClient::with_lock",
            Entry::IsLocked => "LockClient::is_locked",
            Entry::Info => "LockClient::info",
            Entry::Watch => "LockClient::watch",
            Entry::Acquire => "LockManagerMsg::Acquire",
            Entry::Release => "LockManagerMsg::Release",
            Entry::Renew => "LockManagerMsg::Renew",
            Entry::IsLockedMsg => "LockManagerMsg::IsLocked",
            Entry::InfoMsg => "LockManagerMsg::Info",
            Entry::WatchMsg => "LockManagerMsg::Watch",
        }
    }

    fn is_message(self) -> bool {
        self.label().starts_with("LockManagerMsg")
    }

    /// Calls the entry point on `node` with `key` (a prefix for the watches) and `options` (the
    /// ttl for `Renew`), on the backend named `backend` (`None`: the default; the client
    /// methods reach another one through `LockClient::backend`). `Release` and `Renew` name an
    /// owner token nobody holds.
    fn call(
        self,
        node: LockClient,
        backend: Option<&'static str>,
        key: String,
        options: LockOptions,
    ) -> BoxFuture<'static, Outcome> {
        async move {
            let manager = node.manager().clone();
            let client = match backend {
                Some(name) if !self.is_message() => node.backend(name)?,
                _ => node,
            };
            let backend = backend.map(str::to_owned);
            match self {
                Entry::TryLock => match client.try_lock(&key, options).await? {
                    Some(guard) => give_back(guard).await,
                    None => Err(Failure::Wrong(format!("{key:?} was held by someone"))),
                },
                Entry::Lock => give_back(client.lock(&key, options).await?).await,
                Entry::WithLock => {
                    let ran = client.with_lock(&key, options, |_| async {}).await;
                    ran.map_err(Into::into)
                }
                Entry::IsLocked => not_held(&key, client.is_locked(&key).await?),
                Entry::Info => not_held(&key, client.info(&key).await?.is_some()),
                Entry::Watch => client.watch(&key).await.map(drop).map_err(Into::into),
                Entry::Acquire => {
                    let answer = ractor::call!(manager, |reply| LockManagerMsg::Acquire {
                        backend,
                        key: key.clone(),
                        options,
                        reply,
                    });
                    match answered(answer)? {
                        Some(guard) => give_back(guard).await,
                        None => Err(Failure::Wrong(format!("{key:?} was held by someone"))),
                    }
                }
                Entry::Release => answered(ractor::call!(manager, |reply| {
                    LockManagerMsg::Release {
                        backend,
                        key,
                        owner: OwnerToken::random(),
                        reply,
                    }
                })),
                Entry::Renew => answered(ractor::call!(manager, |reply| {
                    LockManagerMsg::Renew {
                        backend,
                        key,
                        owner: OwnerToken::random(),
                        ttl: options.ttl(),
                        reply,
                    }
                })),
                Entry::IsLockedMsg => {
                    let answer = ractor::call!(manager, |reply| LockManagerMsg::IsLocked {
                        backend,
                        key: key.clone(),
                        reply,
                    });
                    not_held(&key, answered(answer)?)
                }
                Entry::InfoMsg => {
                    let answer = ractor::call!(manager, |reply| LockManagerMsg::Info {
                        backend,
                        key: key.clone(),
                        reply,
                    });
                    not_held(&key, answered(answer)?.is_some())
                }
                Entry::WatchMsg => {
                    let answer = ractor::call!(manager, |reply| LockManagerMsg::Watch {
                        backend,
                        prefix: key,
                        reply,
                    });
                    answered(answer).map(drop)
                }
            }
        }
        .boxed()
    }
}

/// Releases a guard a row's call took, and says whether that went wrong.
async fn give_back(guard: LockGuard) -> Outcome {
    if !guard.is_held() {
        return Err(Failure::Wrong(format!("{guard:?} is not held")));
    }
    guard
        .release()
        .await
        .map_err(|e| Failure::Wrong(format!("release after the call: {e}")))
}

/// Rows only ever ask about keys nobody holds.
fn not_held(key: &str, held: bool) -> Outcome {
    match held {
        false => Ok(()),
        true => Err(Failure::Wrong(format!("{key:?} is said to be held"))),
    }
}

/// The answer to a `ractor::call!`, or `Failure::Unanswered` if the actor did not give one.
fn answered<T, M>(
    answer: Result<leasehold::Result<T>, ractor::RactorErr<M>>,
) -> Result<T, Failure> {
    match answer {
        Ok(result) => result.map_err(Failure::Refused),
        Err(error) => Err(Failure::Unanswered(format!("{error:?}"))),
    }
}

/// A row of the lock request table.
struct Case {
    name: String,
    keys: Keys,
    /// Makes the call on a node of the store under test.
    call: Box<dyn FnOnce(LockClient) -> BoxFuture<'static, Outcome> + Send>,
    expect: Expect,
    /// The call is the whole row: nothing is set up in the store first, so the answer must
    /// come even while the store is paused.
    alone: bool,
}

impl Case {
    fn new<F>(name: impl Into<String>, keys: Keys, expect: Expect, alone: bool, call: F) -> Self
    where
        F: FnOnce(LockClient) -> BoxFuture<'static, Outcome> + Send + 'static,
    {
        Case {
            name: name.into(),
            keys,
            call: Box::new(call),
            expect,
            alone,
        }
    }

    /// A row that calls `entry` once on a fresh node, with `key` built from the row's keys.
    fn entry(
        entry: Entry,
        what: &str,
        backend: Option<&'static str>,
        key: impl FnOnce(&Keys) -> String,
        options: LockOptions,
        expect: impl FnOnce(&Keys) -> Expect,
    ) -> Self {
        let keys = Keys::new();
        let key = key(&keys);
        let expect = expect(&keys);
        let name = format!("{}: {what}", entry.label());
        Case::new(name, keys, expect, true, move |node| {
            entry.call(node, backend, key, options)
        })
    }

    /// A row that takes the row's key, then does `then` with the guard.
    fn holding<F, Fut>(name: &str, expect: impl FnOnce(&Keys) -> Expect, then: F) -> Self
    where
        F: FnOnce(LockClient, LockGuard) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let keys = Keys::new();
        let key = keys.key.clone();
        let expect = expect(&keys);
        Case::new(name, keys, expect, false, move |node| {
            async move {
                let guard = node
                    .try_lock(&key, LockOptions::new())
                    .await
                    .map_err(|e| Failure::Wrong(format!("taking {key:?} first: {e}")))?
                    .ok_or_else(|| Failure::Wrong(format!("{key:?} was held by someone")))?;
                then(node, guard).await
            }
            .boxed()
        })
    }

    /// A row that shuts its node down, then calls `entry` on it.
    fn after_shutdown(entry: Entry, expect: Expect) -> Self {
        let keys = Keys::new();
        let key = keys.key.clone();
        let name = format!("{} after shutdown", entry.label());
        Case::new(name, keys, expect, false, move |node| {
            async move {
                node.shutdown().await;
                entry.call(node, None, key, LockOptions::new()).await
            }
            .boxed()
        })
    }
}

/// Every lock request row. Each call builds fresh keys, so the table can run again on the same
/// store.
fn request_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let ok = LockOptions::new;

    // Bad keys, at every entry point that takes a key.
    for entry in KEYED {
        for bad in BAD_KEYS {
            let key = move |keys: &Keys| bad.key(keys);
            let expect = move |keys: &Keys| bad.expect(keys);
            cases.push(Case::entry(entry, bad.label(), None, key, ok(), expect));
        }
    }
    // The longest key is a key like any other, in every store.
    for entry in [Entry::TryLock, Entry::Acquire, Entry::IsLocked, Entry::Info] {
        let what = "key of exactly MAX_KEY_LEN bytes";
        let expect = |_: &Keys| Expect::Accepted;
        cases.push(Case::entry(entry, what, None, Keys::at_max, ok(), expect));
    }

    // Bad ttls, wherever a ttl is given: the acquisitions' options, `Renew`, `LockGuard::renew`.
    for entry in ACQUIRING.into_iter().chain([Entry::Renew]) {
        for ttl in BAD_TTLS {
            let what = format!("ttl {ttl:?}");
            let options = ok().with_ttl(ttl);
            let key = |keys: &Keys| keys.key.clone();
            let expect = move |_: &Keys| invalid_ttl(ttl);
            cases.push(Case::entry(entry, &what, None, key, options, expect));
        }
    }
    for ttl in BAD_TTLS {
        let name = format!("LockGuard::renew: ttl {ttl:?}");
        cases.push(Case::holding(
            &name,
            |_| invalid_ttl(ttl),
            move |_, guard| async move {
                let renewed = guard.renew(ttl).await;
                give_back(guard).await?;
                renewed.map_err(Into::into)
            },
        ));
    }
    // The longest ttl reaches every store as it is (the shortest, MIN_TTL, is accepted too,
    // see options.rs, but a 1 ms lease is lost before a row could give it back).
    let what = format!("ttl MAX_TTL ({MAX_TTL:?})");
    let key = |keys: &Keys| keys.key.clone();
    let expect = |_: &Keys| Expect::Accepted;
    let options = ok().with_ttl(MAX_TTL);
    cases.push(Case::entry(
        Entry::TryLock,
        &what,
        None,
        key,
        options,
        expect,
    ));

    // Other options.
    for entry in ACQUIRING {
        let too_long = "m".repeat(MAX_METADATA_LEN + 1);
        let what = "metadata one byte over MAX_METADATA_LEN";
        let key = |keys: &Keys| keys.key.clone();
        let expect = |_: &Keys| {
            invalid(
                variant!(Error::MetadataTooLong { .. }),
                [&format!("{} bytes", MAX_METADATA_LEN + 1)],
            )
        };
        let options = ok().with_metadata(too_long);
        cases.push(Case::entry(entry, what, None, key, options, expect));
    }
    for entry in WAITING {
        // A budget too long to add to the clock means forever; on a free key, the lock is
        // simply taken.
        for budget in [Duration::MAX, Duration::ZERO] {
            let what = format!("wait UpTo({budget:?}) on a free key");
            let options = ok().with_wait(Wait::UpTo(budget));
            let key = |keys: &Keys| keys.key.clone();
            let expect = |_: &Keys| Expect::Accepted;
            cases.push(Case::entry(entry, &what, None, key, options, expect));
        }
    }
    let what = "metadata of exactly MAX_METADATA_LEN bytes";
    let options = ok().with_metadata("m".repeat(MAX_METADATA_LEN));
    let key = |keys: &Keys| keys.key.clone();
    let expect = |_: &Keys| Expect::Accepted;
    cases.push(Case::entry(
        Entry::TryLock,
        what,
        None,
        key,
        options,
        expect,
    ));

    // Watches take a prefix: the empty one is every key.
    for entry in [Entry::Watch, Entry::WatchMsg] {
        let key = |_: &Keys| String::new();
        let expect = |_: &Keys| Expect::Accepted;
        cases.push(Case::entry(entry, "empty prefix", None, key, ok(), expect));
    }

    // A prefix no valid key can start with.
    for entry in [Entry::Watch, Entry::WatchMsg] {
        for bad in [BadKey::OverMax, BadKey::Nul, BadKey::Newline] {
            let what = format!("prefix: {}", bad.label());
            let key = move |keys: &Keys| bad.key(keys);
            let expect = move |keys: &Keys| bad.expect(keys);
            let case = Case::entry(entry, &what, None, key, ok(), expect);
            cases.push(case);
        }
    }

    // Backends nobody configured.
    for entry in KEYED.into_iter().chain([Entry::Watch, Entry::WatchMsg]) {
        for name in [UNKNOWN, ""] {
            let what = format!("backend {name:?}");
            let key = |keys: &Keys| keys.key.clone();
            let expect = move |_: &Keys| unknown_backend(name);
            cases.push(Case::entry(entry, &what, Some(name), key, ok(), expect));
        }
    }

    // Giving back what is not held (any more).
    let not_held = |keys: &Keys| {
        Expect::Refused(
            variant!(Error::NotHeld { .. }),
            vec![format!("{:?}", keys.key)],
        )
    };
    cases.push(Case::holding(
        "LockManagerMsg::Release twice",
        not_held,
        |node, guard| async move {
            release_by_message(&node, &guard).await?;
            release_by_message(&node, &guard).await
        },
    ));
    cases.push(Case::holding(
        "LockManagerMsg::Renew after release",
        not_held,
        |node, guard| async move {
            release_by_message(&node, &guard).await?;
            let (key, owner) = (guard.key().to_owned(), guard.owner());
            let manager = node.manager();
            answered(ractor::call!(manager, |reply| LockManagerMsg::Renew {
                backend: None,
                key,
                owner,
                ttl: Duration::from_secs(5),
                reply,
            }))
        },
    ));
    cases.push(Case::holding(
        "LockGuard::renew after release",
        not_held,
        |node, guard| async move {
            release_by_message(&node, &guard).await?;
            guard
                .renew(Duration::from_secs(5))
                .await
                .map_err(Into::into)
        },
    ));
    cases.push(Case::holding(
        "LockGuard::release after release",
        not_held,
        |node, guard| async move {
            release_by_message(&node, &guard).await?;
            guard.release().await.map_err(Into::into)
        },
    ));
    for entry in [Entry::Release, Entry::Renew] {
        // `Entry::call` names an owner token nobody holds.
        let name = format!("{}: another holder's owner token", entry.label());
        cases.push(Case::holding(
            &name,
            not_held,
            move |node, guard| async move {
                let key = guard.key().to_owned();
                let answer = entry.call(node, None, key, LockOptions::new()).await;
                // The holder keeps its lock.
                let kept = guard.is_held();
                give_back(guard).await?;
                match kept {
                    true => answer,
                    false => Err(Failure::Wrong("the holder lost its lock".into())),
                }
            },
        ));
    }

    // Everything after shutdown: the client methods say the manager stopped, the manager does
    // not answer messages, and guards say the manager stopped.
    for entry in [
        Entry::TryLock,
        Entry::Lock,
        Entry::WithLock,
        Entry::IsLocked,
        Entry::Info,
        Entry::Watch,
    ] {
        cases.push(Case::after_shutdown(entry, Expect::Stopped));
    }
    for entry in [
        Entry::Acquire,
        Entry::Release,
        Entry::Renew,
        Entry::IsLockedMsg,
        Entry::InfoMsg,
        Entry::WatchMsg,
    ] {
        cases.push(Case::after_shutdown(entry, Expect::Unanswered));
    }
    cases.push(Case::holding(
        "LockGuard::renew after shutdown",
        |_| Expect::Stopped,
        |node, guard| async move {
            node.shutdown().await;
            guard
                .renew(Duration::from_secs(5))
                .await
                .map_err(Into::into)
        },
    ));
    cases.push(Case::holding(
        "LockGuard::release after shutdown",
        |_| Expect::Stopped,
        |node, guard| async move {
            node.shutdown().await;
            guard.release().await.map_err(Into::into)
        },
    ));
    let keys = Keys::new();
    let key = keys.key.clone();
    cases.push(Case::new(
        "LockClient::backend after shutdown, then try_lock",
        keys,
        Expect::Stopped,
        false,
        move |node| {
            async move {
                node.shutdown().await;
                let store = node.backend(STORE)?;
                store.try_lock(&key, LockOptions::new()).await.map(drop)?;
                Ok(())
            }
            .boxed()
        },
    ));
    cases.push(Case::new(
        "LockClient::connect to a manager that shut down",
        Keys::new(),
        Expect::Invalid(
            variant!(Error::ManagerNotFound { .. }),
            vec!["shut-down-manager".to_owned()],
        ),
        false,
        |_| {
            async move {
                // Its own manager: the row's node must stay up for the checks after it.
                let name = unique_key("shut-down-manager");
                let other = LockManager::builder()
                    .with_name(name.clone())
                    .with_backend(STORE, MemoryBackend::new())
                    .start()
                    .await?;
                other.shutdown().await;
                LockClient::connect(&name).await.map(drop)?;
                Ok(())
            }
            .boxed()
        },
    ));
    cases.push(Case::new(
        "LockClient::connect to a name no manager has",
        Keys::new(),
        Expect::Invalid(
            variant!(Error::ManagerNotFound { .. }),
            vec!["no-such-manager".to_owned()],
        ),
        true,
        |_| {
            async move {
                LockClient::connect("no-such-manager").await?;
                Ok(())
            }
            .boxed()
        },
    ));
    cases.push(Case::new(
        "LockClient::shutdown twice",
        Keys::new(),
        Expect::Stopped,
        false,
        |node| {
            async move {
                node.shutdown().await;
                node.shutdown().await;
                node.is_locked("after-two-shutdowns").await.map(drop)?;
                Ok(())
            }
            .boxed()
        },
    ));
    cases
}

/// `LockManagerMsg::Release` of the guard's lease, by its owner token.
async fn release_by_message(node: &LockClient, guard: &LockGuard) -> Outcome {
    let (key, owner) = (guard.key().to_owned(), guard.owner());
    let manager = node.manager();
    answered(ractor::call!(manager, |reply| LockManagerMsg::Release {
        backend: None,
        key,
        owner,
        reply,
    }))?;
    match guard.is_held() {
        false => Ok(()),
        true => Err(Failure::Wrong("the guard is held after its release".into())),
    }
}

/// Runs `call` in a task of its own, and says so if it panics or takes longer than `limit`.
async fn within(limit: Duration, call: BoxFuture<'static, Outcome>) -> Result<Outcome, String> {
    match timeout(limit, tokio::spawn(call)).await {
        Err(_) => Err(format!("no answer within {limit:?}")),
        Ok(Err(join)) => Err(format!("panicked: {join}")),
        Ok(Ok(outcome)) => Ok(outcome),
    }
}

/// Runs `call` and checks its outcome against `expect`.
async fn run_row(
    limit: Duration,
    call: BoxFuture<'static, Outcome>,
    expect: &Expect,
) -> Result<(), String> {
    expect.check(within(limit, call).await?)
}

/// The row left none of its keys held: another node takes each at once.
async fn check_free(observer: &LockClient, keys: &Keys) -> Result<(), String> {
    for key in keys.all() {
        match observer.try_lock(&key, LockOptions::new()).await {
            Ok(Some(guard)) => guard.release().await.expect("release on the observer"),
            other => return Err(format!("{key:?} is not free after the row: {other:?}")),
        }
    }
    Ok(())
}

/// Notes a row's failure, if it failed.
fn tally(failures: &mut Vec<String>, row: &str, checked: Result<(), String>) {
    if let Err(why) = checked {
        failures.push(format!("{row}: {why}"));
    }
}

/// Fails the test listing every row that failed, each with why.
fn report(what: &str, rows: usize, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} of {rows} rows failed on {what}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs every lock request row on a fresh node of `store` (`what` names the store in failure
/// messages).
async fn every_request_row_on<B: LockBackend + Clone>(what: &str, store: B) {
    let observer = start(store.clone()).await;
    let cases = request_cases();
    let rows = cases.len();
    let mut failures = Vec::new();
    for case in cases {
        let node = start(store.clone()).await;
        let mut checked = run_row(ROW_LIMIT, (case.call)(node.clone()), &case.expect).await;
        if checked.is_ok() {
            checked = check_free(&observer, &case.keys).await;
        }
        if checked.is_ok() && !case.expect.stops_the_node() {
            // The manager did not die on the input: it still answers.
            let answer = node.is_locked(&case.keys.key).await;
            if !matches!(answer, Ok(false)) {
                checked = Err(format!("then is_locked answered {answer:?}"));
            }
        }
        tally(&mut failures, &case.name, checked);
        node.shutdown().await;
    }
    observer.shutdown().await;
    report(what, rows, failures);
}

/// Runs the invalid-input rows that need nothing set up in the store while the store is
/// paused: each must be answered at once, so none did I/O. Then checks, with the store back,
/// that none left a key held.
async fn invalid_rows_while_paused<B: LockBackend + Clone>(
    what: &str,
    store: B,
    pause: impl FnOnce(),
    resume: impl FnOnce(),
) {
    let observer = start(store.clone()).await;
    let node = start(store).await;
    let cases: Vec<Case> = request_cases()
        .into_iter()
        .filter(|case| case.alone && case.expect.is_invalid())
        .collect();
    let rows = cases.len();
    // At least every bad key at every keyed entry point: the filter cannot quietly empty the
    // run.
    assert!(rows >= KEYED.len() * BAD_KEYS.len(), "only {rows} rows");
    let mut failures = Vec::new();
    let mut done = Vec::new();
    pause();
    for case in cases {
        let call = (case.call)(node.clone());
        if let Err(why) = run_row(PAUSED_LIMIT, call, &case.expect).await {
            failures.push(format!("{}: {why}", case.name));
        }
        done.push((case.name, case.keys));
    }
    resume();
    for (name, keys) in &done {
        if let Err(why) = check_free(&observer, keys).await {
            failures.push(format!("{name}: {why}"));
        }
    }
    node.shutdown().await;
    observer.shutdown().await;
    report(&format!("a paused {what}"), rows, failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_rejects_every_bad_request_naming_the_value() {
    every_request_row_on("memory", MemoryBackend::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rejects_every_bad_request_naming_the_value() {
    let server = RedisServer::start();
    every_request_row_on("redis", server.backend().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_txn_mode_rejects_every_bad_request_naming_the_value() {
    let server = EtcdServer::start();
    every_request_row_on("etcd txn", server.backend(EtcdMode::Txn).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lock_mode_rejects_every_bad_request_naming_the_value() {
    let server = EtcdServer::start();
    every_request_row_on("etcd lock", server.backend(EtcdMode::Lock).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_rejected_without_touching_a_paused_redis() {
    let server = RedisServer::start();
    let store = server.backend().await;
    invalid_rows_while_paused("redis", store, || server.pause(), || server.resume()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_rejected_without_touching_a_paused_etcd() {
    let server = EtcdServer::start();
    let store = server.backend(EtcdMode::Txn).await;
    invalid_rows_while_paused("etcd", store, || server.pause(), || server.resume()).await;
}

/// A row of the settings table: a manager to start, or a store to connect to.
struct Setup {
    name: String,
    call: BoxFuture<'static, Outcome>,
    expect: Expect,
    /// A manager name the row used: free again after it.
    manager: Option<String>,
}

/// A manager name no other row or test uses.
fn manager_name() -> String {
    unique_key("bad-input-manager")
}

/// A builder with a valid setting for everything.
fn builder(name: &str) -> LockManagerBuilder {
    LockManager::builder()
        .with_name(name)
        .with_backend(STORE, MemoryBackend::new())
}

/// Starts the manager, and if it starts, shuts it down again.
fn start_manager(builder: LockManagerBuilder) -> BoxFuture<'static, Outcome> {
    async move {
        builder.start().await?.shutdown().await;
        Ok(())
    }
    .boxed()
}

impl Setup {
    /// A row that calls `call` with a manager name of its own.
    fn manager(
        name: &str,
        expect: Expect,
        call: fn(String) -> BoxFuture<'static, Outcome>,
    ) -> Self {
        let manager = manager_name();
        Setup {
            name: format!("LockManagerBuilder: {name}"),
            call: call(manager.clone()),
            expect,
            manager: Some(manager),
        }
    }
}

/// `Expect::Invalid` with `Error::InvalidConfig` naming `names`.
fn bad_config<const N: usize>(names: [&str; N]) -> Expect {
    invalid(variant!(Error::InvalidConfig(_)), names)
}

fn manager_settings() -> Vec<Setup> {
    let row = Setup::manager;
    vec![
        row("no backend", bad_config(["no backend"]), |name| {
            start_manager(LockManager::builder().with_name(name))
        }),
        row("backend named \"\"", bad_config(["\"\""]), |name| {
            start_manager(builder(&name).with_backend("", MemoryBackend::new()))
        }),
        row(
            "backend name used twice",
            bad_config(["\"store\""]),
            |name| start_manager(builder(&name).with_backend(STORE, MemoryBackend::new())),
        ),
        row(
            "unknown default backend",
            unknown_backend(UNKNOWN),
            |name| start_manager(builder(&name).with_default_backend(UNKNOWN)),
        ),
        row("clock drift -0.01", bad_config(["-0.01"]), |name| {
            start_manager(builder(&name).with_clock_drift(-0.01))
        }),
        row("clock drift 0.5", bad_config(["0.5"]), |name| {
            start_manager(builder(&name).with_clock_drift(0.5))
        }),
        row("clock drift NaN", bad_config(["NaN"]), |name| {
            start_manager(builder(&name).with_clock_drift(f64::NAN))
        }),
        row("clock drift infinity", bad_config(["inf"]), |name| {
            start_manager(builder(&name).with_clock_drift(f64::INFINITY))
        }),
        row(
            "operation timeout 0",
            bad_config(["operation timeout", "0ns"]),
            |name| start_manager(builder(&name).with_operation_timeout(Duration::ZERO)),
        ),
        row(
            "backstop cap 0",
            bad_config(["backstop cap", "0ns"]),
            |name| start_manager(builder(&name).with_backstop_cap(Duration::ZERO)),
        ),
        row(
            "store retry budget 0",
            bad_config(["store retry budget", "0ns"]),
            |name| start_manager(builder(&name).with_store_retry_budget(Duration::ZERO)),
        ),
        row(
            "operation timeout Duration::MAX",
            bad_config(["operation timeout", &format!("{:?}", Duration::MAX)]),
            |name| start_and_lock(builder(&name).with_operation_timeout(Duration::MAX)),
        ),
        row(
            "backstop cap Duration::MAX",
            bad_config(["backstop cap", &format!("{:?}", Duration::MAX)]),
            |name| start_and_lock(builder(&name).with_backstop_cap(Duration::MAX)),
        ),
        row(
            "store retry budget Duration::MAX",
            bad_config(["store retry budget", &format!("{:?}", Duration::MAX)]),
            |name| start_and_lock(builder(&name).with_store_retry_budget(Duration::MAX)),
        ),
        row(
            "manager name already taken",
            bad_config(["could not start", "bad-input-manager"]),
            |name| {
                async move {
                    let first = builder(&name).start().await?;
                    let second = builder(&name).start().await;
                    // The first manager is untouched by the second one's failure.
                    let first_answers = first.is_locked("k").await;
                    first.shutdown().await;
                    if !matches!(first_answers, Ok(false)) {
                        let why = format!("then the first manager answered {first_answers:?}");
                        return Err(Failure::Wrong(why));
                    }
                    second?.shutdown().await;
                    Ok(())
                }
                .boxed()
            },
        ),
    ]
}

/// Starts the manager, takes a lock and gives it back, and shuts the manager down: settings
/// that only matter once a lock is taken.
fn start_and_lock(builder: LockManagerBuilder) -> BoxFuture<'static, Outcome> {
    async move {
        let node = builder.start().await?;
        let taken = Entry::TryLock
            .call(
                node.clone(),
                None,
                unique_key("settings"),
                LockOptions::new(),
            )
            .await;
        node.shutdown().await;
        taken
    }
    .boxed()
}

/// Rows of store addresses. `paused_redis` is the port of a paused Redis: a row that aimed at
/// it and did I/O would hang there instead of being rejected at once.
fn store_addresses(paused_redis: u16, closed: u16) -> Vec<Setup> {
    let mut rows = Vec::new();
    let malformed_url = |url: String| {
        let expect = invalid(variant!(Error::InvalidConfig(_)), [&format!("{url:?}")]);
        Setup {
            name: format!("RedisBackend::connect({url:?})"),
            call: async move {
                RedisBackend::connect(&url)
                    .await
                    .map(drop)
                    .map_err(Into::into)
            }
            .boxed(),
            expect,
            manager: None,
        }
    };
    for url in [
        String::new(),
        "localhost:6379".to_owned(),
        format!("http://127.0.0.1:{paused_redis}"),
        "redis://127.0.0.1:notaport".to_owned(),
        "redis://127.0.0.1:65536".to_owned(),
        format!("redis://127.0.0.1:{paused_redis}/notadb"),
        format!("redis://[::1:{paused_redis}"),
        "redis://".to_owned(),
    ] {
        rows.push(malformed_url(url));
    }
    let etcd = |endpoints: Vec<String>, expect: Expect| Setup {
        name: format!("EtcdBackend::connect({endpoints:?})"),
        call: async move {
            EtcdBackend::connect(&endpoints)
                .await
                .map(drop)
                .map_err(Into::into)
        }
        .boxed(),
        expect,
        manager: None,
    };
    rows.push(etcd(
        Vec::new(),
        invalid(variant!(Error::InvalidConfig(_)), ["no etcd endpoints"]),
    ));
    for endpoint in [
        String::new(),
        "127.0.0.1:notaport".to_owned(),
        "127.0.0.1:65536".to_owned(),
        "not an endpoint".to_owned(),
        "http://".to_owned(),
    ] {
        let expect = invalid(
            variant!(Error::InvalidConfig(_)),
            [&format!("{endpoint:?}")],
        );
        rows.push(etcd(vec![endpoint], expect));
    }
    // Nobody listens on the closed port: connections are refused, which is worth retrying.
    let endpoint = format!("127.0.0.1:{closed}");
    let expect = Expect::Unreachable(variant!(Error::Store { .. }), vec![endpoint.clone()]);
    rows.push(etcd(vec![endpoint], expect));
    rows
}

/// Runs settings rows one after another.
async fn run_setup_rows(what: &str, rows: Vec<Setup>) {
    let count = rows.len();
    let mut failures = Vec::new();
    for row in rows {
        let mut checked = run_row(ROW_LIMIT, row.call, &row.expect).await;
        if let (Ok(()), Some(name)) = (&checked, row.manager) {
            // Nothing of the refused manager is left: its name is free for a good one.
            checked = match builder(&name).start().await {
                Ok(again) => {
                    again.shutdown().await;
                    Ok(())
                }
                Err(e) => Err(format!("then a good manager named {name:?}: {e}")),
            };
        }
        tally(&mut failures, &row.name, checked);
    }
    report(what, count, failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manager_settings_are_rejected_naming_the_value() {
    run_setup_rows("manager settings", manager_settings()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_store_addresses_are_rejected_naming_them() {
    let redis = RedisServer::start();
    redis.pause();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|probe| probe.local_addr())
        .expect("a loopback port")
        .port();
    run_setup_rows("store addresses", store_addresses(redis.port(), closed)).await;
    redis.resume();
}
