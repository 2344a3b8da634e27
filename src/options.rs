//! What a lock request asks for, and the checks every request passes before any I/O.

use std::time::Duration;

use ractor::ActorCell;

use crate::backend::{OwnerToken, Permits, RwMode};
use crate::error::{Error, Result};

/// The longest key accepted, in bytes (after it is prefixed, a store key stays well under the
/// limits of Redis and etcd).
pub const MAX_KEY_LEN: usize = 512;
/// The longest ttl accepted. A lease is renewed every ttl/3, so a longer lease only makes a
/// dead holder block others longer.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The shortest ttl accepted. Store expiry has millisecond resolution.
pub const MIN_TTL: Duration = Duration::from_millis(1);
/// The longest metadata string accepted, in bytes.
pub const MAX_METADATA_LEN: usize = 1024;
/// A wait budget at least this long is [`Wait::Forever`]: nobody waits a century for a lock,
/// and a budget near `Duration::MAX` cannot be added to the clock to make a deadline.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// How long an acquisition may wait for a held key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Wait {
    /// Try once; if the key is held, give up at once.
    #[default]
    No,
    /// Wait up to this long, then fail with [`Error::Timeout`]. A budget of a hundred years
    /// or more (`Duration::MAX`, say) is the same as [`Wait::Forever`].
    UpTo(Duration),
    /// Wait until the key is free, however long that takes.
    Forever,
}

/// Which entry point asked for a lock: it decides how long to wait when [`LockOptions`] leave
/// the wait unset. This is the one place those defaults are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    /// [`LockClient::try_lock`](crate::LockClient::try_lock): always tries once, whatever the
    /// options say.
    TryLock,
    /// [`LockClient::lock`](crate::LockClient::lock) and
    /// [`LockClient::with_lock`](crate::LockClient::with_lock): wait forever unless told.
    Lock,
    /// [`LockManagerMsg::Acquire`](crate::LockManagerMsg::Acquire) (and the cluster gateway):
    /// try once unless told, since a message caller picks its own wait.
    Message,
}

impl Caller {
    /// The wait this caller uses, given what the options asked for.
    pub(crate) fn wait(self, asked: Option<Wait>) -> Wait {
        match (self, asked) {
            (Caller::TryLock, _) => Wait::No,
            (_, Some(wait)) => wait,
            (Caller::Lock, None) => Wait::Forever,
            (Caller::Message, None) => Wait::No,
        }
    }
}

/// How to take a lock: ttl, waiting, renewal, holder actor, metadata.
///
/// ```
/// use std::time::Duration;
/// use leasehold::{LockOptions, Wait};
///
/// let opts = LockOptions::new()
///     .with_ttl(Duration::from_secs(10))
///     .with_wait(Wait::UpTo(Duration::from_secs(2)))
///     .with_metadata("nightly job on host-7");
/// assert_eq!(opts.ttl(), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone)]
pub struct LockOptions {
    pub(crate) ttl: Duration,
    /// `None`: the call decides (`try_lock` tries once, `lock` waits forever).
    pub(crate) wait: Option<Wait>,
    pub(crate) auto_renew: bool,
    pub(crate) holder: Option<ActorCell>,
    pub(crate) metadata: Option<String>,
    /// Set for an election's campaign: the candidate's token, kept across the attempts of
    /// one campaign (the store keeps the candidate's place in its queue by it).
    pub(crate) candidate: Option<OwnerToken>,
    /// Set for a semaphore's acquisition: how many of how many permits (see `semaphore.rs`).
    pub(crate) permits: Option<Permits>,
    /// Set for a read-write lock's read share or write hold (see `rwlock.rs`). A waiting
    /// writer also sets `candidate`: its token, kept across attempts, names its intent.
    pub(crate) rw: Option<RwMode>,
    /// Fair waiting across nodes (see [`LockOptions::with_fair`]).
    pub(crate) fair: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: Duration::from_secs(30),
            wait: None,
            auto_renew: true,
            holder: None,
            metadata: None,
            candidate: None,
            permits: None,
            rw: None,
            fair: false,
        }
    }
}

impl LockOptions {
    /// The defaults: ttl 30 s, waiting as the call decides, auto-renew on, no holder actor, no
    /// metadata.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lease's time to live. Default 30 s.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait for a held key. Unset, each entry point decides:
    /// [`LockClient::lock`](crate::LockClient::lock) and
    /// [`LockClient::with_lock`](crate::LockClient::with_lock) wait forever, and
    /// [`LockManagerMsg::Acquire`](crate::LockManagerMsg::Acquire) tries once.
    /// [`LockClient::try_lock`](crate::LockClient::try_lock) always tries once.
    pub fn with_wait(mut self, wait: Wait) -> Self {
        self.wait = Some(match wait {
            Wait::UpTo(budget) if budget >= FOREVER => Wait::Forever,
            wait => wait,
        });
        self
    }

    /// Keep the lease alive by renewing it every ttl/3 while it is held. Default on.
    pub fn with_auto_renew(mut self, auto_renew: bool) -> Self {
        self.auto_renew = auto_renew;
        self
    }

    /// Name the actor that holds the lock: the lock is released the moment that actor stops,
    /// and the same actor asking again for the key gets [`Error::AlreadyHeld`].
    pub fn with_holder(mut self, holder: impl Into<ActorCell>) -> Self {
        self.holder = Some(holder.into());
        self
    }

    /// A short string stored with the lock and shown by `info` (who holds it, and why).
    pub fn with_metadata(mut self, metadata: impl Into<String>) -> Self {
        self.metadata = Some(metadata.into());
        self
    }

    /// Fair waiting: waiters on every node are let in in the order they asked, through a
    /// queue in the store whose entries are leased like the lock (a waiter that dies delays
    /// the others no longer than its entry's ttl, which is the lock's ttl). Default off:
    /// without it, a node hands a released key to its own waiters first, which is faster but
    /// can starve the waiters of other nodes.
    ///
    /// Fair waiters are served in order among themselves; a caller that asks without
    /// `fair` may still take a free key ahead of them. A fair lock's guard releases and
    /// renews it; the [`Release`](crate::LockManagerMsg::Release) and
    /// [`Renew`](crate::LockManagerMsg::Renew) messages name unfair locks only. Supported for
    /// locks, semaphores and read-write locks on the memory, Redis and etcd backends
    /// (semaphores: strict FIFO, k permits are taken only by the first fair waiter, once k are
    /// free; read-write locks: readers and writers in one queue, a reader kept out only by a
    /// writer ahead of it, so consecutive readers go in together, a writer only when first and
    /// nothing is held — see [`RwLock`](crate::RwLock)); anywhere else (elections, a store
    /// without a queue) a fair request is refused before any I/O with a
    /// [`StoreError::Unsupported`](crate::StoreError) error.
    ///
    /// ```
    /// use leasehold::LockOptions;
    ///
    /// let opts = LockOptions::new().with_fair(true);
    /// assert!(opts.fair());
    /// ```
    pub fn with_fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }

    /// Whether waiting is fair across nodes.
    pub fn fair(&self) -> bool {
        self.fair
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long the request may wait, if set.
    pub fn wait(&self) -> Option<Wait> {
        self.wait
    }

    /// Whether the lease is renewed automatically.
    pub fn auto_renew(&self) -> bool {
        self.auto_renew
    }

    /// The metadata stored with the lock.
    pub fn metadata(&self) -> Option<&str> {
        self.metadata.as_deref()
    }

    /// Checks everything that can be checked without I/O.
    pub(crate) fn validate(&self) -> Result<()> {
        validate_ttl(self.ttl)?;
        if let Some(metadata) = &self.metadata {
            if metadata.len() > MAX_METADATA_LEN {
                return Err(Error::MetadataTooLong {
                    len: metadata.len(),
                    max: MAX_METADATA_LEN,
                });
            }
        }
        Ok(())
    }
}

/// A key is any non-empty UTF-8 string of at most [`MAX_KEY_LEN`] bytes without control
/// characters.
pub(crate) fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        let shown = key
            .char_indices()
            .take_while(|(i, _)| *i < 64)
            .map(|(_, c)| c);
        return Err(Error::KeyTooLong {
            key: format!("{}…", shown.collect::<String>()),
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    if let Some(ch) = key.chars().find(|c| c.is_control()) {
        return Err(Error::KeyHasControlChar {
            key: key.to_owned(),
            ch,
        });
    }
    Ok(())
}

pub(crate) fn validate_ttl(ttl: Duration) -> Result<()> {
    let why = if ttl.is_zero() {
        "the ttl is zero"
    } else if ttl < MIN_TTL {
        "the ttl is under the minimum of 1 ms"
    } else if ttl > MAX_TTL {
        "the ttl is over the maximum of 24 h"
    } else {
        return Ok(());
    };
    Err(Error::InvalidTtl { ttl, why })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_at_the_maximum_is_accepted_and_one_more_byte_is_not() {
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        let err = validate_key(&"k".repeat(MAX_KEY_LEN + 1)).unwrap_err();
        assert!(err.to_string().contains("513 bytes"), "{err}");
    }

    #[test]
    fn long_multibyte_key_is_shortened_on_a_char_boundary() {
        let err = validate_key(&"é".repeat(MAX_KEY_LEN)).unwrap_err();
        assert!(matches!(err, Error::KeyTooLong { len, .. } if len == 2 * MAX_KEY_LEN));
    }

    #[test]
    fn ttl_bounds_name_the_value() {
        for ttl in [Duration::ZERO, Duration::from_nanos(1), MAX_TTL * 2] {
            let err = validate_ttl(ttl).unwrap_err();
            assert!(err.to_string().contains(&format!("{ttl:?}")), "{err}");
        }
        assert!(validate_ttl(MIN_TTL).is_ok());
    }

    #[test]
    fn each_caller_decides_an_unset_wait_and_only_try_lock_overrides_a_set_one() {
        let budget = Wait::UpTo(Duration::from_secs(3));
        assert_eq!(Caller::TryLock.wait(None), Wait::No);
        assert_eq!(Caller::TryLock.wait(Some(budget)), Wait::No);
        assert_eq!(Caller::Lock.wait(None), Wait::Forever);
        assert_eq!(Caller::Lock.wait(Some(Wait::No)), Wait::No);
        assert_eq!(Caller::Message.wait(None), Wait::No);
        assert_eq!(Caller::Message.wait(Some(budget)), budget);
    }

    #[test]
    fn wait_budget_too_long_for_the_clock_is_forever() {
        let opts = LockOptions::new().with_wait(Wait::UpTo(Duration::MAX));
        assert_eq!(opts.wait(), Some(Wait::Forever));
        let day = Duration::from_secs(24 * 60 * 60);
        let opts = LockOptions::new().with_wait(Wait::UpTo(day));
        assert_eq!(opts.wait(), Some(Wait::UpTo(day)));
    }
}
