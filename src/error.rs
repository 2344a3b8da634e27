//! The one error type of the crate, and the store-side errors it wraps.

use std::time::Duration;

use crate::event::LostReason;

/// Everything that can go wrong when asking for, holding or giving back a lock.
///
/// Variants fall into three groups, told apart by the classifier methods:
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
    /// an error at once.
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
    /// this request. Not retryable: the same request may panic it again. The manager restarts
    /// the backend actor for everyone else, and the locks it held are kept.
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
    /// True when the same call may succeed if tried again later (store unreachable or slow,
    /// backend restarting, or a wait that timed out).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Store { source, .. } => source.is_retryable(),
            Error::BackendDown { .. } | Error::Timeout { .. } => true,
            _ => false,
        }
    }

    /// True when the request itself was malformed: it was rejected before any I/O.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::EmptyKey
                | Error::KeyTooLong { .. }
                | Error::KeyHasControlChar { .. }
                | Error::InvalidTtl { .. }
                | Error::MetadataTooLong { .. }
                | Error::UnknownBackend { .. }
                | Error::InvalidConfig(_)
                | Error::AlreadyHeld { .. }
                | Error::ManagerNotFound { .. }
        )
    }

    /// True when the lock manager is gone: no call on this handle can succeed again.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::ManagerStopped)
    }
}

/// An error reported by a store behind the [`LockBackend`](crate::LockBackend) seam.
///
/// Store crates' own errors are kept whole (their `kind()` and retry hints stay usable); a
/// backend written outside this crate says which of the two classes its failure is in.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached, dropped the connection, or did not answer in time.
    /// Retryable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something the backend cannot use (a protocol or script error).
    /// Not retryable.
    #[error("unexpected store reply: {0}")]
    Protocol(String),
    /// The store cannot do this operation at all. Not retryable.
    #[error("the {store} store does not support {op}")]
    Unsupported {
        /// The store's kind.
        store: &'static str,
        /// The operation.
        op: &'static str,
    },
    /// The operation did not finish within its time budget. Retryable.
    #[error("store operation {op} timed out after {after:?}")]
    TimedOut {
        /// Which operation.
        op: &'static str,
        /// How long it was given.
        after: Duration,
    },
}

impl StoreError {
    /// True when the same operation may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::TimedOut { .. } => true,
            StoreError::Protocol(_) | StoreError::Unsupported { .. } => false,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
