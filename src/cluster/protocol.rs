//! What crosses between nodes: requests, lease descriptors, errors and events, each with its
//! byte encoding (see `wire.rs`).

use std::fmt;
use std::time::Duration;

use ractor_cluster::RactorClusterMessage;

use super::wire::{bytes_convertable, wire_struct, Wire};
use super::RemoteHolder;
use crate::backend::{LockInfo, OwnerToken, RwMode};
use crate::error::{Error, ErrorKind, StoreErrorKind};
use crate::event::{LockEvent, LockEventKind, LostReason, ReleaseReason};
use crate::guard::LockGuard;
use crate::options::Wait;

/// A remote acquisition request: what [`LockOptions`](crate::LockOptions) says locally, plus
/// the remote holder actor (mandatory: a lease whose holder nobody watches would be renewed
/// forever after its node went away).
#[derive(Debug, Clone)]
pub struct RemoteAcquire {
    pub(super) backend: Option<String>,
    pub(super) key: String,
    pub(super) ttl: Option<Duration>,
    pub(super) wait: Option<Wait>,
    pub(super) metadata: Option<String>,
    pub(super) auto_renew: bool,
    pub(super) holder: RemoteHolder,
    /// Set for a semaphore's permits: N.
    pub(super) permits: Option<u32>,
    /// How many permits at once (1 unless `with_permits` said).
    pub(super) count: u32,
    /// Set for a read-write lock's read share or write hold.
    pub(super) rw: Option<RwMode>,
    /// The liveness session of the asking node (see [`Heartbeat`]), set by
    /// [`RemoteLockClient`](super::RemoteLockClient): the lease goes when the gateway does not
    /// hear from that session within its bound.
    pub(super) session: Option<u128>,
    /// Fair waiting across nodes (see [`LockOptions::with_fair`](crate::LockOptions::with_fair)).
    pub(super) fair: bool,
}

impl RemoteAcquire {
    /// Acquire `key` on the default backend, held by `holder`: the lock is released when that
    /// actor stops or its node disconnects. Try once, ttl as the manager's default.
    pub fn new(key: impl Into<String>, holder: &RemoteHolder) -> Self {
        RemoteAcquire {
            backend: None,
            key: key.into(),
            ttl: None,
            wait: None,
            metadata: None,
            auto_renew: true,
            holder: holder.clone(),
            permits: None,
            count: 1,
            rw: None,
            session: None,
            fair: false,
        }
    }

    /// Wait fairly: waiters on every node are let in in the order they asked (see
    /// [`LockOptions::with_fair`](crate::LockOptions::with_fair), which says what each store
    /// serves fairly).
    pub fn with_fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }

    /// Acquire `count` of the `permits` permits of the semaphore named `key` (see
    /// [`Semaphore`](crate::Semaphore)), as one lease, instead of the lock `key`. Released
    /// as a lock's lease is ([`RemoteLockClient::release`](super::RemoteLockClient::release)),
    /// or when the holder stops.
    pub fn with_permits(mut self, permits: u32, count: u32) -> Self {
        self.permits = Some(permits);
        self.count = count;
        self
    }

    /// Acquire a read share or the write hold of the read-write lock named `key` (see
    /// [`RwLock`](crate::RwLock)) instead of the lock `key`. Released as a lock's lease is
    /// ([`RemoteLockClient::release`](super::RemoteLockClient::release)), or when the
    /// holder stops.
    pub fn with_rw(mut self, mode: RwMode) -> Self {
        self.rw = Some(mode);
        self
    }

    /// The backend, by its name on the manager's node.
    pub fn with_backend(mut self, backend: impl Into<String>) -> Self {
        self.backend = Some(backend.into());
        self
    }

    /// The lease ttl.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long to wait for a held key (unset: try once).
    pub fn with_wait(mut self, wait: Wait) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Metadata stored with the lock (see [`LockInfo::metadata`]).
    pub fn with_metadata(mut self, metadata: impl Into<String>) -> Self {
        self.metadata = Some(metadata.into());
        self
    }

    /// Whether the manager renews the lease (default on). A silent node's leases go at the
    /// gateway's liveness bound either way (see the [`cluster`](super) module); off, the
    /// holder renews the lease itself
    /// ([`RemoteLockClient::renew`](super::RemoteLockClient::renew)) and it also expires at
    /// its ttl once the renewals stop coming.
    pub fn with_auto_renew(mut self, auto_renew: bool) -> Self {
        self.auto_renew = auto_renew;
        self
    }

    /// The key asked for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The wait asked for.
    pub fn wait(&self) -> Option<Wait> {
        self.wait
    }
}

/// A lease held for a remote holder: what it needs to use the lock (the fencing token) and to
/// release or renew it by message (key, backend, owner token).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseDescriptor {
    /// The key.
    pub key: String,
    /// The name of the backend that holds it, on the manager's node.
    pub backend: String,
    /// The owner token written with the key in the store.
    pub owner: OwnerToken,
    /// Strictly greater than the token of every earlier holder of this key on this store.
    pub fencing_token: u64,
    /// The ttl the manager renews the lease with.
    pub ttl: Duration,
}

impl LeaseDescriptor {
    pub(super) fn of(guard: &LockGuard) -> Self {
        LeaseDescriptor {
            key: guard.key().to_owned(),
            backend: guard.backend().to_owned(),
            owner: guard.owner(),
            fencing_token: guard.fencing_token(),
            ttl: guard.ttl().unwrap_or_default(),
        }
    }
}

/// A remote node's sign of life to a gateway, for one liveness session (a
/// [`RemoteLockClient`](super::RemoteLockClient) and the leases it took). The gateway releases
/// a session's leases when it has not heard from it (a heartbeat or a request) within its
/// bound; the remote side counts its own deadline from when it SENT the last heartbeat the
/// gateway answered, so it stops trusting its leases before the gateway lets them go.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub(super) session: u128,
}

/// A gateway's answer to a [`Heartbeat`]: the session is alive, and the bound it is held to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeartbeatAck {
    /// The gateway's liveness bound: silent for longer, a session's leases are released.
    pub bound: Duration,
}

/// A lease named by message: release it, or renew it to `ttl`.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    pub(super) backend: Option<String>,
    pub(super) key: String,
    pub(super) owner: OwnerToken,
    /// For renewals; ignored by releases.
    pub(super) ttl: Duration,
}

impl LeaseRequest {
    /// The lease `lease` describes, renewed (if this is a renewal) to `ttl`.
    pub fn new(lease: &LeaseDescriptor, ttl: Duration) -> Self {
        LeaseRequest {
            backend: Some(lease.backend.clone()),
            key: lease.key.clone(),
            owner: lease.owner,
            ttl,
        }
    }
}

/// A lease to hand to another remote holder actor (see
/// [`LockGuard::hand_over`](crate::LockGuard::hand_over)): same lease, same fencing token.
#[derive(Debug, Clone)]
pub struct HandOverRequest {
    pub(super) lease: LeaseRequest,
    pub(super) holder: RemoteHolder,
}

impl HandOverRequest {
    /// Hand `lease` to `holder`.
    pub fn new(lease: &LeaseDescriptor, holder: &RemoteHolder) -> Self {
        HandOverRequest {
            lease: LeaseRequest::new(lease, lease.ttl),
            holder: holder.clone(),
        }
    }
}

/// A key on a backend (`None`: the manager's default), for `IsLocked` and `Info`.
#[derive(Debug, Clone)]
pub struct KeyRequest {
    pub(super) backend: Option<String>,
    pub(super) key: String,
}

impl KeyRequest {
    /// `key` on `backend` (`None` for the default).
    pub fn new(backend: Option<&str>, key: impl Into<String>) -> Self {
        KeyRequest {
            backend: backend.map(str::to_owned),
            key: key.into(),
        }
    }
}

/// [`LockInfo`], as it crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteLockInfo {
    /// The key.
    pub key: String,
    /// The current holder's fencing token.
    pub fencing_token: u64,
    /// How long the current lease has left.
    pub remaining_ttl: Duration,
    /// The metadata the holder stored with the lock.
    pub metadata: Option<String>,
}

impl From<LockInfo> for RemoteLockInfo {
    fn from(info: LockInfo) -> Self {
        RemoteLockInfo {
            key: info.key,
            fencing_token: info.fencing_token,
            remaining_ttl: info.remaining_ttl,
            metadata: info.metadata,
        }
    }
}

/// Which [`Error`] a [`RemoteError`] stands for, or which failure only a remote caller can
/// meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteErrorKind {
    /// The lock manager answered an [`Error`] of this kind.
    Manager(ErrorKind),
    /// The gateway could not find the holder (or subscriber) actor: it is not on a connected
    /// node, or its message type cannot cross nodes, so ractor_cluster did not advertise it.
    HolderNotFound,
    /// The gateway did not answer (its node is unreachable, or the call timed out).
    Unreachable,
    /// The gateway had not heard from this liveness session within its bound and released
    /// its leases; the session is over.
    SessionExpired,
}

/// An [`Error`] as it crosses the wire: its kind and its message (the local error's
/// `Display`), with the same classifier methods.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct RemoteError {
    /// Which error.
    pub kind: RemoteErrorKind,
    /// What the manager's node said.
    pub message: String,
}

impl RemoteError {
    pub(super) fn new(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        RemoteError {
            kind,
            message: message.into(),
        }
    }

    /// As [`Error::is_retryable`] (plus an unreachable gateway).
    pub fn is_retryable(&self) -> bool {
        match self.kind {
            RemoteErrorKind::Manager(kind) => kind.is_retryable(),
            RemoteErrorKind::Unreachable => true,
            RemoteErrorKind::HolderNotFound | RemoteErrorKind::SessionExpired => false,
        }
    }

    /// As [`Error::is_invalid_input`] (plus a holder the gateway cannot see).
    pub fn is_invalid_input(&self) -> bool {
        match self.kind {
            RemoteErrorKind::Manager(kind) => kind.is_invalid_input(),
            RemoteErrorKind::HolderNotFound => true,
            RemoteErrorKind::Unreachable | RemoteErrorKind::SessionExpired => false,
        }
    }

    /// As [`Error::is_fatal`].
    pub fn is_fatal(&self) -> bool {
        matches!(self.kind, RemoteErrorKind::Manager(kind) if kind.is_fatal())
    }
}

impl From<&Error> for RemoteErrorKind {
    fn from(error: &Error) -> Self {
        RemoteErrorKind::Manager(error.kind())
    }
}

impl From<Error> for RemoteError {
    fn from(error: Error) -> Self {
        RemoteError::new(RemoteErrorKind::from(&error), error.to_string())
    }
}

/// What [`RemoteLockEvent`] subscribers are told: a [`LockEvent`] without its local clocks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteEvent {
    /// The backend's name on the manager's node.
    pub backend: String,
    /// The key, or `None` for backend-wide events.
    pub key: Option<String>,
    /// The lease's fencing token, once there is one.
    pub fencing_token: Option<u64>,
    /// What happened.
    pub kind: RemoteEventKind,
}

/// What happened, in a [`RemoteEvent`] (as [`LockEventKind`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteEventKind {
    /// A lock was asked for.
    Requested,
    /// The lock was acquired after waiting this long.
    Acquired {
        /// From the request to the acquisition.
        waited: Duration,
    },
    /// The key was held by someone else.
    Contended,
    /// The lease was extended.
    Renewed,
    /// A renewal failed and will be retried until the deadline.
    RenewFailed {
        /// How many renewals in a row have failed.
        attempt: u32,
        /// What the store said.
        error: String,
    },
    /// The lease can no longer be trusted.
    Lost {
        /// Why.
        reason: LostReason,
    },
    /// The lock was given back.
    Released {
        /// How long it was held.
        held_for: Duration,
        /// Why (a remote holder that stopped or disconnected: `HolderStopped`).
        reason: ReleaseReason,
    },
    /// The backend actor failed.
    BackendDown,
    /// The backend actor was restarted.
    BackendRestored,
    /// The lease was handed to another holder actor; same fencing token.
    HandedOver,
}

impl From<LockEvent> for RemoteEvent {
    fn from(event: LockEvent) -> Self {
        let kind = match event.kind {
            LockEventKind::Requested => RemoteEventKind::Requested,
            LockEventKind::Acquired { waited } => RemoteEventKind::Acquired { waited },
            LockEventKind::Contended => RemoteEventKind::Contended,
            LockEventKind::Renewed { .. } => RemoteEventKind::Renewed,
            LockEventKind::RenewFailed { attempt, error } => RemoteEventKind::RenewFailed {
                attempt,
                error: error.to_string(),
            },
            LockEventKind::Lost { reason } => RemoteEventKind::Lost { reason },
            LockEventKind::Released { held_for, reason } => {
                RemoteEventKind::Released { held_for, reason }
            }
            LockEventKind::BackendDown => RemoteEventKind::BackendDown,
            LockEventKind::BackendRestored => RemoteEventKind::BackendRestored,
            LockEventKind::HandedOver => RemoteEventKind::HandedOver,
        };
        RemoteEvent {
            backend: event.backend.to_string(),
            key: event.key.map(|k| k.to_string()),
            fencing_token: event.fencing_token,
            kind,
        }
    }
}

/// The message type of an actor that subscribes to a remote manager's events (see
/// [`RemoteLockClient::subscribe`](super::RemoteLockClient::subscribe)). Any actor with this
/// message type can also be a remote holder.
#[derive(RactorClusterMessage, Debug)]
#[non_exhaustive]
pub enum RemoteLockEvent {
    /// One lifecycle event.
    Event(RemoteEvent),
}

/// The answer to a remote request. (A named wrapper, because ractor's byte conversion trait
/// cannot be implemented for `Result` outside ractor.)
#[derive(Debug)]
pub struct RemoteReply<T>(pub Result<T, RemoteError>);

// ---- byte encodings ----

impl Wire for () {
    fn put(&self, _out: &mut Vec<u8>) {}
    fn take(_input: &mut &[u8]) -> Option<Self> {
        Some(())
    }
}

impl Wire for OwnerToken {
    fn put(&self, out: &mut Vec<u8>) {
        self.as_u128().put(out);
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        Some(OwnerToken::from_u128(u128::take(input)?))
    }
}

impl Wire for Wait {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Wait::No => out.push(0),
            Wait::UpTo(d) => {
                out.push(1);
                d.put(out);
            }
            Wait::Forever => out.push(2),
        }
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        match u8::take(input)? {
            0 => Some(Wait::No),
            1 => Some(Wait::UpTo(Duration::take(input)?)),
            2 => Some(Wait::Forever),
            _ => None,
        }
    }
}

/// Enums without data: one byte, the position in the list.
macro_rules! wire_unit_enum {
    ($ty:ty { $($variant:path),* $(,)? }) => {
        impl Wire for $ty {
            fn put(&self, out: &mut Vec<u8>) {
                let all = [$($variant),*];
                out.push(all.iter().position(|v| v == self).expect("listed") as u8);
            }
            fn take(input: &mut &[u8]) -> Option<Self> {
                [$($variant),*].get(usize::from(u8::take(input)?)).copied()
            }
        }
    };
}

wire_unit_enum!(RwMode {
    RwMode::Read,
    RwMode::Write,
});
wire_unit_enum!(LostReason {
    LostReason::NotOwner,
    LostReason::Expired,
    LostReason::Shutdown,
    LostReason::HolderStopped,
});
wire_unit_enum!(ReleaseReason {
    ReleaseReason::Requested,
    ReleaseReason::Dropped,
    ReleaseReason::HolderStopped,
    ReleaseReason::Shutdown,
    ReleaseReason::Abandoned,
    ReleaseReason::HolderSilent,
});
wire_unit_enum!(StoreErrorKind {
    StoreErrorKind::Unavailable,
    StoreErrorKind::Protocol,
    StoreErrorKind::Unsupported,
    StoreErrorKind::TimedOut,
    StoreErrorKind::PermitsMismatch,
});

/// The kinds without data are one byte, their position in this list (new kinds go at its
/// end); a store failure is the byte [`STORE_KIND`], then its store kind. (Only this codec
/// lists the kinds; the protocol's types are built on the crate's own.)
const ERROR_KINDS: [ErrorKind; 22] = [
    ErrorKind::EmptyKey,
    ErrorKind::KeyTooLong,
    ErrorKind::KeyHasControlChar,
    ErrorKind::InvalidTtl,
    ErrorKind::MetadataTooLong,
    ErrorKind::UnknownBackend,
    ErrorKind::InvalidConfig,
    ErrorKind::AlreadyHeld,
    ErrorKind::Timeout,
    ErrorKind::LeaseLost,
    ErrorKind::NotHeld,
    ErrorKind::BackendDown,
    ErrorKind::ManagerStopped,
    ErrorKind::ManagerNotFound,
    ErrorKind::BackendPanicked,
    ErrorKind::EmptyElectionName,
    ErrorKind::ElectionValueTooLong,
    ErrorKind::EmptySemaphoreName,
    ErrorKind::InvalidPermits,
    ErrorKind::InvalidPermitCount,
    ErrorKind::PermitsMismatch,
    ErrorKind::EmptyRwLockName,
];
/// Not the byte after the list, which moved with every kind added (21 with semaphores, 22 with
/// read-write locks): a fixed byte, so that a kind added later leaves the others as they are.
const STORE_KIND: u8 = u8::MAX;
const _: () = assert!(ERROR_KINDS.len() < STORE_KIND as usize);

impl Wire for ErrorKind {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            ErrorKind::Store(store) => {
                out.push(STORE_KIND);
                store.put(out);
            }
            kind => {
                let at = ERROR_KINDS.iter().position(|k| k == kind);
                out.push(at.expect("every kind without data is listed") as u8);
            }
        }
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        match u8::take(input)? {
            STORE_KIND => Some(ErrorKind::Store(StoreErrorKind::take(input)?)),
            at => ERROR_KINDS.get(usize::from(at)).copied(),
        }
    }
}

impl Wire for RemoteErrorKind {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            RemoteErrorKind::Manager(kind) => {
                out.push(0);
                kind.put(out);
            }
            RemoteErrorKind::HolderNotFound => out.push(1),
            RemoteErrorKind::Unreachable => out.push(2),
            RemoteErrorKind::SessionExpired => out.push(3),
        }
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        match u8::take(input)? {
            0 => Some(RemoteErrorKind::Manager(ErrorKind::take(input)?)),
            1 => Some(RemoteErrorKind::HolderNotFound),
            2 => Some(RemoteErrorKind::Unreachable),
            3 => Some(RemoteErrorKind::SessionExpired),
            _ => None,
        }
    }
}

impl Wire for RemoteEventKind {
    fn put(&self, out: &mut Vec<u8>) {
        use RemoteEventKind as K;
        match self {
            K::Requested => out.push(0),
            K::Acquired { waited } => {
                out.push(1);
                waited.put(out);
            }
            K::Contended => out.push(2),
            K::Renewed => out.push(3),
            K::RenewFailed { attempt, error } => {
                out.push(4);
                attempt.put(out);
                error.put(out);
            }
            K::Lost { reason } => {
                out.push(5);
                reason.put(out);
            }
            K::Released { held_for, reason } => {
                out.push(6);
                held_for.put(out);
                reason.put(out);
            }
            K::BackendDown => out.push(7),
            K::BackendRestored => out.push(8),
            K::HandedOver => out.push(9),
        }
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        use RemoteEventKind as K;
        Some(match u8::take(input)? {
            0 => K::Requested,
            1 => K::Acquired {
                waited: Wire::take(input)?,
            },
            2 => K::Contended,
            3 => K::Renewed,
            4 => K::RenewFailed {
                attempt: Wire::take(input)?,
                error: Wire::take(input)?,
            },
            5 => K::Lost {
                reason: Wire::take(input)?,
            },
            6 => K::Released {
                held_for: Wire::take(input)?,
                reason: Wire::take(input)?,
            },
            7 => K::BackendDown,
            8 => K::BackendRestored,
            9 => K::HandedOver,
            _ => return None,
        })
    }
}

impl<T: Wire> Wire for Result<T, RemoteError> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Ok(value) => {
                out.push(0);
                value.put(out);
            }
            Err(error) => {
                out.push(1);
                error.put(out);
            }
        }
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        match u8::take(input)? {
            0 => Some(Ok(T::take(input)?)),
            1 => Some(Err(RemoteError::take(input)?)),
            _ => None,
        }
    }
}

impl<T: Wire> Wire for RemoteReply<T> {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
    }
    fn take(input: &mut &[u8]) -> Option<Self> {
        Some(RemoteReply(Wire::take(input)?))
    }
}

wire_struct!(RemoteHolder { group });
wire_struct!(RemoteAcquire {
    backend,
    key,
    ttl,
    wait,
    metadata,
    auto_renew,
    holder,
    permits,
    count,
    rw,
    session,
    fair,
});
wire_struct!(Heartbeat { session });
wire_struct!(HeartbeatAck { bound });
wire_struct!(LeaseDescriptor {
    key,
    backend,
    owner,
    fencing_token,
    ttl,
});
wire_struct!(LeaseRequest {
    backend,
    key,
    owner,
    ttl
});
wire_struct!(KeyRequest { backend, key });
wire_struct!(HandOverRequest { lease, holder });
wire_struct!(RemoteLockInfo {
    key,
    fencing_token,
    remaining_ttl,
    metadata,
});
wire_struct!(RemoteError { kind, message });
wire_struct!(RemoteEvent {
    backend,
    key,
    fencing_token,
    kind,
});

bytes_convertable!(
    RemoteHolder,
    RemoteAcquire,
    LeaseRequest,
    KeyRequest,
    RemoteEvent,
    RemoteReply<Option<LeaseDescriptor>>,
    RemoteReply<()>,
    RemoteReply<bool>,
    RemoteReply<Option<RemoteLockInfo>>,
    Heartbeat,
    RemoteReply<HeartbeatAck>,
    HandOverRequest,
);

impl fmt::Display for RemoteHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::wire::{decode, encode};

    #[test]
    fn every_error_kind_crosses_the_wire_whole() {
        let store = [
            StoreErrorKind::Unavailable,
            StoreErrorKind::Protocol,
            StoreErrorKind::Unsupported,
            StoreErrorKind::TimedOut,
            StoreErrorKind::PermitsMismatch,
        ];
        let kinds = ERROR_KINDS
            .into_iter()
            .chain(store.into_iter().map(ErrorKind::Store))
            .map(RemoteErrorKind::Manager)
            .chain([
                RemoteErrorKind::HolderNotFound,
                RemoteErrorKind::Unreachable,
                RemoteErrorKind::SessionExpired,
            ]);
        for kind in kinds {
            let error = RemoteError::new(kind, "said");
            let back: RemoteError = decode(&encode(&error));
            assert_eq!(back, error);
        }
    }

    #[test]
    fn a_remote_error_classifies_as_the_local_one() {
        let local = Error::Store {
            backend: "redis".to_owned(),
            source: crate::StoreError::unavailable("down"),
        };
        let remote = RemoteError::from(local.clone());
        assert_eq!(
            remote.kind,
            RemoteErrorKind::Manager(ErrorKind::Store(StoreErrorKind::Unavailable))
        );
        assert_eq!(remote.is_retryable(), local.is_retryable());
        assert_eq!(remote.is_invalid_input(), local.is_invalid_input());
        assert_eq!(remote.is_fatal(), local.is_fatal());
        let stopped = RemoteError::from(Error::ManagerStopped);
        assert!(stopped.is_fatal() && !stopped.is_retryable());
    }
}
