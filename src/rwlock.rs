//! Read-write locks on the lease machinery: many readers, or one writer, on any number of
//! nodes.
//!
//! Each read share and each write hold is a lease of its own, held by a key actor of its own
//! exactly as a lock is: renewed by that actor, released by its guard (or the guard's drop,
//! or its holder actor stopping), and a holder that crashes frees its share at the lease's
//! ttl, never later. What differs is the store's admission rule, behind
//! [`LockBackend::acquire_rw`](crate::LockBackend::acquire_rw):
//!
//! - a read share is granted while no writer holds the lock and no writer waits for it;
//! - the write hold is granted while nothing at all is held.
//!
//! # Writers are not starved
//! A writer that waits leaves an *intent* in the store, under its own token, and from then on
//! new readers wait, on every node: the readers already in finish, and the writer gets the
//! lock when the last of them leaves. The intent is leased like everything else (for the
//! writer's ttl, refreshed by each of its attempts, at least twice per ttl): a waiting writer
//! that dies blocks readers no longer than that. One whose wait budget runs out withdraws its
//! intent at once; one whose caller went away, when its backend actor next serves the queue
//! (a wake, or its backstop within half the intent's ttl) and drops the request. A writer
//! that only tries
//! ([`try_write`](RwLock::try_write)) leaves no intent.
//!
//! Readers cannot starve writers, but writers coming one after another can keep readers
//! waiting (a write-preferring lock). As with any such lock, a task that holds a read share
//! and asks for another (or for the write hold) while a writer waits waits for itself.
//!
//! # Fair waiting
//! With [`LockOptions::with_fair`], readers and writers of every node wait in one queue in the
//! store, in the order they asked, each place leased (for the request's ttl, refreshed by each
//! attempt) and marked with its side. A fair reader goes in while no writer holds, no unfair
//! writer waits, and no fair writer's place is ahead of its own (readers ahead of it do not
//! keep it out: consecutive readers go in together); a fair writer while nothing is held and
//! its place is first. A fair writer's place is its intent: it keeps new unfair readers out as
//! an unfair waiting writer does. An unfair writer does not look at the queue. A fair
//! `try_read` or `try_write` that does not win gives its place back at once.
//!
//! # Fencing
//! Every grant, read or write, takes the next number of one counter per name: a writer's
//! fencing token is strictly greater than every token handed out before it, reader's or
//! writer's, so a resource that accepts writes only with a token not older than the newest
//! it has seen (a [`Fence`](crate::Fence)) rejects a writer whose hold was taken over.
//! Readers' tokens increase too, but readers hold valid tokens side by side.

use std::sync::Arc;

use crate::backend::{OwnerToken, RwMode};
use crate::client::LockClient;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::options::{validate_key, LockOptions};

/// A read-write lock, by name, on the backend of the [`LockClient`] it came from.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), leasehold::Error> {
/// use leasehold::{LockManager, LockOptions, MemoryBackend};
///
/// let client = LockManager::builder()
///     .with_name("rwlock-doc")
///     .with_backend("memory", MemoryBackend::new())
///     .start()
///     .await?;
/// let config = client.rwlock("config")?;
/// let first = config.read(LockOptions::new()).await?;
/// let second = config.read(LockOptions::new()).await?;
/// // Readers share; a writer is refused while they hold.
/// assert!(config.try_write(LockOptions::new()).await?.is_none());
/// let newest = second.fencing_token();
/// first.release().await?;
/// second.release().await?;
/// let writer = config.write(LockOptions::new()).await?;
/// assert!(writer.fencing_token() > newest);
/// assert!(config.try_read(LockOptions::new()).await?.is_none());
/// # drop(writer);
/// client.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RwLock {
    client: LockClient,
    name: Arc<str>,
}

impl LockClient {
    /// The read-write lock named `name`, on this handle's backend. The name is checked here,
    /// before any I/O: it must be a valid key (non-empty, at most
    /// [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes, no control characters). A read-write lock, a
    /// semaphore and a lock of one name are three different things.
    pub fn rwlock(&self, name: &str) -> Result<RwLock> {
        validate_rwlock(name)?;
        Ok(RwLock {
            client: self.clone(),
            name: name.into(),
        })
    }
}

/// The checks on a read-write lock's name, before any I/O.
pub(crate) fn validate_rwlock(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::EmptyRwLockName);
    }
    validate_key(name)
}

/// `options` for a read share or the write hold of the read-write lock `name`, checked
/// before any I/O. A writer gets a token of its own, kept across the attempts of its wait:
/// its intent in the store goes by it.
pub(crate) fn rw_options(
    name: &str,
    mode: RwMode,
    mut options: LockOptions,
) -> Result<LockOptions> {
    validate_rwlock(name)?;
    options.rw = Some(mode);
    options.candidate = match mode {
        RwMode::Write => Some(OwnerToken::random()),
        RwMode::Read => None,
    };
    Ok(options)
}

impl RwLock {
    /// The read-write lock's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes a read share, waiting as `options.wait` says (forever if unset) while a writer
    /// holds the lock or waits for it. The guard is the share's lease: fencing token,
    /// `lost()`, renewal, release (also on drop).
    pub async fn read(&self, options: LockOptions) -> Result<LockGuard> {
        let options = rw_options(&self.name, RwMode::Read, options)?;
        self.client.lock(&self.name, options).await
    }

    /// Tries once to take a read share: `Ok(None)` at once when a writer holds the lock or
    /// waits for it. (`options.wait` is ignored.)
    pub async fn try_read(&self, options: LockOptions) -> Result<Option<LockGuard>> {
        let options = rw_options(&self.name, RwMode::Read, options)?;
        self.client.try_lock(&self.name, options).await
    }

    /// Takes the write hold, waiting as `options.wait` says (forever if unset) while anything
    /// is held. While it waits, new readers wait behind it; its intent is withdrawn if it
    /// gives up. Its fencing token is greater than every token handed out before it.
    pub async fn write(&self, options: LockOptions) -> Result<LockGuard> {
        let options = rw_options(&self.name, RwMode::Write, options)?;
        self.client.lock(&self.name, options).await
    }

    /// Tries once to take the write hold: `Ok(None)` at once when anything is held. Leaves no
    /// intent behind: readers are not held up by a writer that did not wait. (`options.wait`
    /// is ignored.)
    pub async fn try_write(&self, options: LockOptions) -> Result<Option<LockGuard>> {
        let options = rw_options(&self.name, RwMode::Write, options)?;
        self.client.try_lock(&self.name, options).await
    }
}

impl std::fmt::Debug for RwLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RwLock")
            .field("backend", &self.client.backend_name())
            .field("name", &self.name)
            .finish()
    }
}
