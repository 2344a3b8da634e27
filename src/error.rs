//! The one error type of the crate, and the store-side errors it wraps.

use std::fmt;
#[cfg(any(feature = "redis", feature = "etcd"))]
use std::sync::Arc;
use std::time::Duration;

use crate::event::LostReason;

/// Everything that can go wrong when asking for, holding or giving back a lock.
///
/// [`Error::kind`] names the variant without its details (and, for a store failure, the
/// store's own classification). Variants fall into three groups, told apart by the classifier
/// methods:
/// - **invalid input** ([`Error::is_invalid_input`]): rejected before any I/O, the message names
///   the bad value; retrying the same call cannot succeed;
/// - **transient** ([`Error::is_retryable`]): the store could not be reached or did not answer in
///   time; the same call may succeed later;
/// - **fatal** ([`Error::is_fatal`]): the lock manager has stopped; no call on this handle will
///   succeed again.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key was the empty string.
    #[error("invalid lock key: the key is empty")]
    EmptyKey,
    /// The key is longer than [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes.
    #[error("invalid lock key {key:?}: {len} bytes is over the maximum of {max} bytes")]
    KeyTooLong {
        /// The first bytes of the key (it is too long to print whole).
        key: String,
        /// The key's length in bytes.
        len: usize,
        /// The longest key accepted.
        max: usize,
    },
    /// The key contains a control character (NUL, newline, …), which stores and logs mangle.
    #[error("invalid lock key {key:?}: it contains the control character {ch:?}")]
    KeyHasControlChar {
        /// The key as given.
        key: String,
        /// The first offending character.
        ch: char,
    },
    /// The ttl is zero, under one millisecond, or over [`MAX_TTL`](crate::MAX_TTL).
    #[error("invalid ttl {ttl:?}: {why}")]
    InvalidTtl {
        /// The ttl as given.
        ttl: Duration,
        /// Which bound it broke.
        why: &'static str,
    },
    /// The metadata string is longer than [`MAX_METADATA_LEN`](crate::MAX_METADATA_LEN).
    #[error("invalid lock metadata: {len} bytes is over the maximum of {max} bytes")]
    MetadataTooLong {
        /// The metadata's length in bytes.
        len: usize,
        /// The longest metadata accepted.
        max: usize,
    },
    /// An election's name was the empty string.
    #[error("invalid election name: the name is empty")]
    EmptyElectionName,
    /// A candidate's value is longer than
    /// [`MAX_ELECTION_VALUE_LEN`](crate::MAX_ELECTION_VALUE_LEN).
    #[error("invalid election value {value:?}: {len} bytes is over the maximum of {max} bytes")]
    ElectionValueTooLong {
        /// The first bytes of the value (it is too long to print whole).
        value: String,
        /// The value's length in bytes.
        len: usize,
        /// The longest value accepted.
        max: usize,
    },
    /// A semaphore's name was the empty string.
    #[error("invalid semaphore name: the name is empty")]
    EmptySemaphoreName,
    /// A semaphore's number of permits is zero or over
    /// [`MAX_PERMITS`](crate::MAX_PERMITS).
    #[error("invalid number of permits {permits}: {why}")]
    InvalidPermits {
        /// The number as given.
        permits: u32,
        /// Which bound it broke.
        why: &'static str,
    },
    /// An acquisition asked for zero permits, or for more than the semaphore has.
    #[error("invalid permit count {count}: {why} (the semaphore has {permits} permits)")]
    InvalidPermitCount {
        /// How many permits were asked for at once.
        count: u32,
        /// How many the semaphore has.
        permits: u32,
        /// Which bound it broke.
        why: &'static str,
    },
    /// The semaphore is held with another number of permits than this handle's: every
    /// caller of one semaphore must give the same N while any of them holds a permit.
    #[error("semaphore {name:?} is held with {held} permits, asked with {asked}")]
    PermitsMismatch {
        /// The semaphore's name.
        name: String,
        /// The number of permits this handle asked with.
        asked: u32,
        /// The number its live holders were granted with.
        held: u32,
    },
    /// A read-write lock's name was the empty string.
    #[error("invalid read-write lock name: the name is empty")]
    EmptyRwLockName,
    /// No backend is registered under this name.
    #[error("unknown backend {name:?} (configured: {known:?})")]
    UnknownBackend {
        /// The name asked for.
        name: String,
        /// The names that are configured.
        known: Vec<String>,
    },
    /// The manager or a backend was configured wrongly (no backend, a name used twice, a
    /// malformed store URL, …).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The holder actor asked for a key it already holds. Waiting would deadlock, so this is
    /// an error at once. It is a conflict with the lock's state, not invalid input (the same
    /// request succeeds once the holder has let the key go), and not retryable as it stands.
    #[error("key {key:?} on backend {backend:?} is already held by this holder actor")]
    AlreadyHeld {
        /// The backend name.
        backend: String,
        /// The key.
        key: String,
    },
    /// The lock was not acquired within the wait budget.
    #[error("timed out after {waited:?} waiting for key {key:?}")]
    Timeout {
        /// The key.
        key: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// The lease was lost: it can no longer be trusted to exclude other holders.
    #[error("lease on key {key:?} was lost: {reason}")]
    LeaseLost {
        /// The key.
        key: String,
        /// Why it was lost.
        reason: LostReason,
    },
    /// The lock is not held any more (it was released before), so it cannot be renewed or
    /// released again.
    #[error("lock on key {key:?} is no longer held")]
    NotHeld {
        /// The key.
        key: String,
    },
    /// The store failed or could not be reached.
    #[error("backend {backend:?} failed: {source}")]
    Store {
        /// The backend name.
        backend: String,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// The backend actor is not running (it failed and is being restarted).
    #[error("backend {backend:?} is down")]
    BackendDown {
        /// The backend name.
        backend: String,
    },
    /// The backend actor panicked (a bug, in leasehold or in the store's client) while it had
    /// this request: in hand, or still in its mailbox (the two cannot be told apart from
    /// outside). Not retryable: the same request may panic it again. The manager restarts the
    /// backend actor for everyone else; the locks it held are kept, and the requests waiting in
    /// its queues are served by its successor.
    #[error("backend {backend:?} panicked while handling the request: {panic}")]
    BackendPanicked {
        /// The backend name.
        backend: String,
        /// What it panicked with.
        panic: String,
    },
    /// The lock manager has stopped; no call will succeed again.
    #[error("the lock manager has stopped")]
    ManagerStopped,
    /// No lock manager is registered under this name on this node.
    #[error("no lock manager is registered as {name:?} on this node")]
    ManagerNotFound {
        /// The name asked for.
        name: String,
    },
}

impl Error {
    /// Which error this is, without its details: what a caller matches on to decide what to
    /// do, and what crosses the wire to another node (see `cluster::RemoteErrorKind`).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::EmptyKey => ErrorKind::EmptyKey,
            Error::KeyTooLong { .. } => ErrorKind::KeyTooLong,
            Error::KeyHasControlChar { .. } => ErrorKind::KeyHasControlChar,
            Error::InvalidTtl { .. } => ErrorKind::InvalidTtl,
            Error::MetadataTooLong { .. } => ErrorKind::MetadataTooLong,
            Error::EmptyElectionName => ErrorKind::EmptyElectionName,
            Error::ElectionValueTooLong { .. } => ErrorKind::ElectionValueTooLong,
            Error::EmptySemaphoreName => ErrorKind::EmptySemaphoreName,
            Error::InvalidPermits { .. } => ErrorKind::InvalidPermits,
            Error::InvalidPermitCount { .. } => ErrorKind::InvalidPermitCount,
            Error::PermitsMismatch { .. } => ErrorKind::PermitsMismatch,
            Error::EmptyRwLockName => ErrorKind::EmptyRwLockName,
            Error::UnknownBackend { .. } => ErrorKind::UnknownBackend,
            Error::InvalidConfig(_) => ErrorKind::InvalidConfig,
            Error::AlreadyHeld { .. } => ErrorKind::AlreadyHeld,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::LeaseLost { .. } => ErrorKind::LeaseLost,
            Error::NotHeld { .. } => ErrorKind::NotHeld,
            Error::Store { source, .. } => ErrorKind::Store(source.kind()),
            Error::BackendDown { .. } => ErrorKind::BackendDown,
            Error::ManagerStopped => ErrorKind::ManagerStopped,
            Error::ManagerNotFound { .. } => ErrorKind::ManagerNotFound,
            Error::BackendPanicked { .. } => ErrorKind::BackendPanicked,
        }
    }

    /// True when the same call may succeed if tried again later (store unreachable or slow,
    /// backend restarting, or a wait that timed out).
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// True when the request itself was malformed: it was rejected before any I/O.
    pub fn is_invalid_input(&self) -> bool {
        self.kind().is_invalid_input()
    }

    /// True when the lock manager is gone: no call on this handle can succeed again.
    pub fn is_fatal(&self) -> bool {
        self.kind().is_fatal()
    }
}

/// Which [`Error`] happened, without its details (the redis-rs `ErrorKind` model): one kind
/// per variant, and a store failure carries the store's own classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::EmptyKey`].
    EmptyKey,
    /// [`Error::KeyTooLong`].
    KeyTooLong,
    /// [`Error::KeyHasControlChar`].
    KeyHasControlChar,
    /// [`Error::InvalidTtl`].
    InvalidTtl,
    /// [`Error::MetadataTooLong`].
    MetadataTooLong,
    /// [`Error::EmptyElectionName`].
    EmptyElectionName,
    /// [`Error::ElectionValueTooLong`].
    ElectionValueTooLong,
    /// [`Error::EmptySemaphoreName`].
    EmptySemaphoreName,
    /// [`Error::InvalidPermits`].
    InvalidPermits,
    /// [`Error::InvalidPermitCount`].
    InvalidPermitCount,
    /// [`Error::PermitsMismatch`].
    PermitsMismatch,
    /// [`Error::EmptyRwLockName`].
    EmptyRwLockName,
    /// [`Error::UnknownBackend`].
    UnknownBackend,
    /// [`Error::InvalidConfig`].
    InvalidConfig,
    /// [`Error::AlreadyHeld`].
    AlreadyHeld,
    /// [`Error::Timeout`].
    Timeout,
    /// [`Error::LeaseLost`].
    LeaseLost,
    /// [`Error::NotHeld`].
    NotHeld,
    /// [`Error::Store`], with what kind of store failure it was.
    Store(StoreErrorKind),
    /// [`Error::BackendDown`].
    BackendDown,
    /// [`Error::ManagerStopped`].
    ManagerStopped,
    /// [`Error::ManagerNotFound`].
    ManagerNotFound,
    /// [`Error::BackendPanicked`].
    BackendPanicked,
}

impl ErrorKind {
    /// As [`Error::is_retryable`].
    pub fn is_retryable(self) -> bool {
        match self {
            ErrorKind::Store(store) => store.is_retryable(),
            ErrorKind::BackendDown | ErrorKind::Timeout => true,
            _ => false,
        }
    }

    /// As [`Error::is_invalid_input`].
    pub fn is_invalid_input(self) -> bool {
        matches!(
            self,
            ErrorKind::EmptyKey
                | ErrorKind::KeyTooLong
                | ErrorKind::KeyHasControlChar
                | ErrorKind::InvalidTtl
                | ErrorKind::MetadataTooLong
                | ErrorKind::EmptyElectionName
                | ErrorKind::ElectionValueTooLong
                | ErrorKind::EmptySemaphoreName
                | ErrorKind::InvalidPermits
                | ErrorKind::InvalidPermitCount
                | ErrorKind::EmptyRwLockName
                | ErrorKind::UnknownBackend
                | ErrorKind::InvalidConfig
                | ErrorKind::ManagerNotFound
        )
    }

    /// As [`Error::is_fatal`].
    pub fn is_fatal(self) -> bool {
        self == ErrorKind::ManagerStopped
    }
}

/// An error reported by a store behind the [`LockBackend`](crate::LockBackend) seam.
///
/// A failure the store client reported keeps that client's error whole, as this error's
/// [`source`](std::error::Error::source) (a [`redis::RedisError`] or an
/// [`etcd_client::Error`], which [`StoreError::cause`] also hands out typed), beside the
/// context the backend adds (which operation, which address). A backend written outside this
/// crate says which class its failure is in with [`StoreError::unavailable`] or
/// [`StoreError::protocol`] and a message.
///
/// The message includes the cause's own, so printing only the top error says everything.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached, dropped the connection, or was briefly unable to serve.
    /// Retryable.
    Unavailable {
        /// What the backend was doing (operation, address), or what went wrong when there is
        /// no cause.
        context: String,
        /// The store client's error, when it reported one.
        cause: Option<StoreCause>,
    },
    /// The store answered something the backend cannot use (a protocol or script error, a
    /// refused login). Not retryable.
    Protocol {
        /// What the backend was doing, or what was wrong with the answer.
        context: String,
        /// The store client's error, when it reported one.
        cause: Option<StoreCause>,
    },
    /// The store cannot do this operation at all. Not retryable.
    Unsupported {
        /// The store's kind.
        store: &'static str,
        /// The operation.
        op: &'static str,
    },
    /// The operation did not finish within its time budget. Retryable.
    TimedOut {
        /// Which operation.
        op: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// A semaphore's live holders were granted with another number of permits than the
    /// acquisition asked with. Not retryable as it stands.
    PermitsMismatch {
        /// The semaphore's name.
        name: String,
        /// The number of permits asked with.
        asked: u32,
        /// The number the live holders were granted with.
        held: u32,
    },
}

/// Which [`StoreError`] happened: what decides whether trying again may help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// [`StoreError::Unavailable`].
    Unavailable,
    /// [`StoreError::Protocol`].
    Protocol,
    /// [`StoreError::Unsupported`].
    Unsupported,
    /// [`StoreError::TimedOut`].
    TimedOut,
    /// [`StoreError::PermitsMismatch`].
    PermitsMismatch,
}

impl StoreErrorKind {
    /// True for the kinds where the same operation may succeed later.
    pub fn is_retryable(self) -> bool {
        match self {
            StoreErrorKind::Unavailable | StoreErrorKind::TimedOut => true,
            StoreErrorKind::Protocol
            | StoreErrorKind::Unsupported
            | StoreErrorKind::PermitsMismatch => false,
        }
    }
}

/// A store client's own error, kept whole inside a [`StoreError`]. Behind an [`Arc`] because
/// the store crates' errors are not `Clone` and a [`StoreError`] is (it rides in
/// [`LockEvent`](crate::LockEvent)s).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreCause {
    /// What the `redis` crate said.
    #[cfg(feature = "redis")]
    Redis(Arc<redis::RedisError>),
    /// What the `etcd-client` crate said.
    #[cfg(feature = "etcd")]
    Etcd(Arc<etcd_client::Error>),
}

impl StoreCause {
    /// The store client's error, as a plain error.
    pub fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        match *self {
            #[cfg(feature = "redis")]
            StoreCause::Redis(ref error) => &**error,
            #[cfg(feature = "etcd")]
            StoreCause::Etcd(ref error) => &**error,
        }
    }
}

impl fmt::Display for StoreCause {
    // Without a store feature there is no variant, and nothing to write.
    #[cfg_attr(not(any(feature = "redis", feature = "etcd")), allow(unused_variables))]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            #[cfg(feature = "redis")]
            StoreCause::Redis(ref error) => error.fmt(f),
            // etcd-client prints a gRPC status as its code and message only; the reason it
            // failed (connection refused, …) is further down the chain, and the one a reader
            // needs.
            #[cfg(feature = "etcd")]
            StoreCause::Etcd(ref error) => f.write_str(&crate::backend::etcd::describe(error)),
        }
    }
}

#[cfg(feature = "redis")]
impl From<redis::RedisError> for StoreCause {
    fn from(error: redis::RedisError) -> Self {
        StoreCause::Redis(Arc::new(error))
    }
}

#[cfg(feature = "etcd")]
impl From<etcd_client::Error> for StoreCause {
    fn from(error: etcd_client::Error) -> Self {
        StoreCause::Etcd(Arc::new(error))
    }
}

impl StoreError {
    /// The store could not be reached or is briefly unable to serve (retryable); `message`
    /// says what happened, naming the address when there is one.
    pub fn unavailable(message: impl Into<String>) -> Self {
        StoreError::Unavailable {
            context: message.into(),
            cause: None,
        }
    }

    /// The store answered something the backend cannot use (not retryable); `message` says
    /// what.
    pub fn protocol(message: impl Into<String>) -> Self {
        StoreError::Protocol {
            context: message.into(),
            cause: None,
        }
    }

    /// A retryable failure the store client reported, with what the backend was doing.
    #[cfg(any(feature = "redis", feature = "etcd"))]
    pub(crate) fn unavailable_because(
        context: impl Into<String>,
        cause: impl Into<StoreCause>,
    ) -> Self {
        StoreError::Unavailable {
            context: context.into(),
            cause: Some(cause.into()),
        }
    }

    /// A failure the store client reported that trying again will not cure.
    #[cfg(any(feature = "redis", feature = "etcd"))]
    pub(crate) fn protocol_because(
        context: impl Into<String>,
        cause: impl Into<StoreCause>,
    ) -> Self {
        StoreError::Protocol {
            context: context.into(),
            cause: Some(cause.into()),
        }
    }

    /// Which store error this is.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::Unavailable { .. } => StoreErrorKind::Unavailable,
            StoreError::Protocol { .. } => StoreErrorKind::Protocol,
            StoreError::Unsupported { .. } => StoreErrorKind::Unsupported,
            StoreError::TimedOut { .. } => StoreErrorKind::TimedOut,
            StoreError::PermitsMismatch { .. } => StoreErrorKind::PermitsMismatch,
        }
    }

    /// True when the same operation may succeed later.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    /// The store client's own error, if it reported one.
    pub fn cause(&self) -> Option<&StoreCause> {
        match self {
            StoreError::Unavailable { cause, .. } | StoreError::Protocol { cause, .. } => {
                cause.as_ref()
            }
            StoreError::Unsupported { .. }
            | StoreError::TimedOut { .. }
            | StoreError::PermitsMismatch { .. } => None,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, context, cause) = match self {
            StoreError::Unavailable { context, cause } => ("store unavailable", context, cause),
            StoreError::Protocol { context, cause } => ("unexpected store reply", context, cause),
            StoreError::Unsupported { store, op } => {
                return write!(f, "the {store} store does not support {op}")
            }
            StoreError::TimedOut { op, after } => {
                return write!(f, "store operation {op} timed out after {after:?}")
            }
            StoreError::PermitsMismatch { name, asked, held } => {
                return write!(
                    f,
                    "semaphore {name:?} is held with {held} permits, asked with {asked}"
                )
            }
        };
        write!(f, "{what}: {context}")?;
        if let Some(cause) = cause {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The store crate's error itself, so callers can downcast to it.
        self.cause().map(|cause| cause.as_error() as _)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
