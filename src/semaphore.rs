//! Semaphores on the lease machinery: a semaphore of N permits lets at most N holders (or
//! holders of at most N permits in all) in at once, on any number of nodes.
//!
//! Each acquisition is a lease of its own, of one or more permits, held by a key actor of its
//! own exactly as a lock is: it is renewed by that actor, released by its guard (or the
//! guard's drop, or its holder actor stopping), and a holder that crashes frees its permits at
//! the lease's ttl, never later. What differs is the store's admission rule, behind
//! [`LockBackend::acquire_permits`](crate::LockBackend::acquire_permits): a lease is granted
//! while the live leases hold at most N − k permits.
//!
//! # One N per semaphore
//! Every lease records the N it was granted with. A caller that asks with another N while any
//! lease of the semaphore is live gets [`Error::PermitsMismatch`], naming both numbers; once
//! no lease is left, the next caller's N holds. So N can be changed by letting every holder
//! go, and two deployments that disagree find out at once rather than letting in more
//! holders than either meant.
//!
//! # Waiting
//! A waiting acquisition is woken by the store's notice that permits were freed (or by its
//! backstop timer when a lease simply runs out). Each waiting acquisition on a node waits and
//! tries on its own: when a permit frees, every waiter tries, and one gets it.
//!
//! # Fencing
//! A permit's fencing token is strictly greater than every token handed out for the same
//! semaphore before it, so a resource can tell later holders from earlier ones. (Unlike a
//! lock's, it does not exclude: N holders hold valid tokens at once.)

use std::sync::Arc;

use tokio::time::timeout;

use crate::backend::{PermitHolder, Permits};
use crate::backend_ctx::BackendCtx;
use crate::client::LockClient;
use crate::error::{Error, Result, StoreError};
use crate::guard::LockGuard;
use crate::metrics::StoreOp;
use crate::options::{validate_key, LockOptions};

/// The most permits a semaphore may have. Stores check every live lease's permits on each
/// acquisition, so N stays small enough for that to be cheap.
pub const MAX_PERMITS: u32 = 4096;

/// A semaphore of N permits, by name, on the backend of the [`LockClient`] it came from.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), leasehold::Error> {
/// use leasehold::{LockManager, LockOptions, MemoryBackend};
///
/// let client = LockManager::builder()
///     .with_name("semaphore-doc")
///     .with_backend("memory", MemoryBackend::new())
///     .start()
///     .await?;
/// let api = client.semaphore("partner-api", 2)?;
/// let first = api.acquire(LockOptions::new()).await?;
/// let second = api.acquire(LockOptions::new()).await?;
/// assert!(second.fencing_token() > first.fencing_token());
/// // Both permits are taken: a third caller is refused at once.
/// assert!(api.try_acquire(LockOptions::new()).await?.is_none());
/// first.release().await?;
/// let third = api.try_acquire(LockOptions::new()).await?.expect("a permit is free");
/// # drop((second, third));
/// client.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Semaphore {
    client: LockClient,
    name: Arc<str>,
    permits: u32,
}

impl LockClient {
    /// The semaphore named `name` with `permits` permits, on this handle's backend. Checked
    /// here, before any I/O: the name must be a valid key (non-empty, at most
    /// [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) bytes, no control characters), and `permits` from
    /// 1 to [`MAX_PERMITS`]. A semaphore and a lock of the same name are different things.
    pub fn semaphore(&self, name: &str, permits: u32) -> Result<Semaphore> {
        validate_semaphore(name, permits)?;
        Ok(Semaphore {
            client: self.clone(),
            name: name.into(),
            permits,
        })
    }
}

/// The checks on a semaphore's name and N, before any I/O.
pub(crate) fn validate_semaphore(name: &str, permits: u32) -> Result<()> {
    if name.is_empty() {
        return Err(Error::EmptySemaphoreName);
    }
    validate_key(name)?;
    let why = if permits == 0 {
        "a semaphore needs at least 1 permit"
    } else if permits > MAX_PERMITS {
        "over the maximum of 4096 permits"
    } else {
        return Ok(());
    };
    Err(Error::InvalidPermits { permits, why })
}

/// `options` for an acquisition of `count` of `permits` permits, checked before any I/O (the
/// name and N as [`validate_semaphore`] checks them, k from 1 to N).
pub(crate) fn permit_options(
    name: &str,
    permits: u32,
    count: u32,
    mut options: LockOptions,
) -> Result<LockOptions> {
    validate_semaphore(name, permits)?;
    let why = if count == 0 {
        "at least 1 permit must be asked for"
    } else if count > permits {
        "more permits than the semaphore has"
    } else {
        options.permits = Some(Permits::new(permits, count));
        return Ok(options);
    };
    Err(Error::InvalidPermitCount {
        count,
        permits,
        why,
    })
}

impl LockClient {
    /// Who holds the permits of the semaphore `name` now, according to the store, oldest
    /// first (whatever N they were granted with: each holder says). Empty when nobody does.
    pub async fn semaphore_holders(&self, name: &str) -> Result<Vec<PermitHolder>> {
        validate_semaphore(name, 1)?;
        holders(self.backend_ctx(), name).await
    }
}

/// The store's holders of the semaphore `name`, within the operation budget.
pub(crate) async fn holders(ctx: &BackendCtx, name: &str) -> Result<Vec<PermitHolder>> {
    let budget = ctx.timing.op_timeout;
    let holders = ctx
        .metrics
        .timed(StoreOp::PermitHolders, ctx.store.permit_holders(name));
    match timeout(budget, holders).await {
        Ok(Ok(holders)) => Ok(holders),
        Ok(Err(error)) => Err(ctx.store_error(error)),
        Err(_) => Err(ctx.store_error(StoreError::TimedOut {
            op: "permit holders",
            after: budget,
        })),
    }
}

impl Semaphore {
    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its number of permits, N.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// Takes one permit, waiting as `options.wait` says (forever if unset). The guard is the
    /// permit's lease: fencing token, `lost()`, renewal, release (also on drop).
    pub async fn acquire(&self, options: LockOptions) -> Result<LockGuard> {
        self.acquire_many(1, options).await
    }

    /// Tries once to take one permit: `Ok(None)` when none is free. (`options.wait` is
    /// ignored.)
    pub async fn try_acquire(&self, options: LockOptions) -> Result<Option<LockGuard>> {
        self.try_acquire_many(1, options).await
    }

    /// Takes `count` permits at once, as one lease: all of them or none, so two callers
    /// taking several cannot each hold part of what the other needs. Waits as
    /// [`acquire`](Self::acquire) does. `count` must be from 1 to N.
    pub async fn acquire_many(&self, count: u32, options: LockOptions) -> Result<LockGuard> {
        let options = self.options(count, options)?;
        self.client.lock(&self.name, options).await
    }

    /// Tries once to take `count` permits at once, as one lease.
    pub async fn try_acquire_many(
        &self,
        count: u32,
        options: LockOptions,
    ) -> Result<Option<LockGuard>> {
        let options = self.options(count, options)?;
        self.client.try_lock(&self.name, options).await
    }

    /// Who holds the semaphore's permits now, according to the store, oldest first.
    pub async fn holders(&self) -> Result<Vec<PermitHolder>> {
        self.client.semaphore_holders(&self.name).await
    }

    fn options(&self, count: u32, options: LockOptions) -> Result<LockOptions> {
        permit_options(&self.name, self.permits, count, options)
    }
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Semaphore")
            .field("backend", &self.client.backend_name())
            .field("name", &self.name)
            .field("permits", &self.permits)
            .finish()
    }
}
