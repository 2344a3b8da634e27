//! The session lease: one etcd lease shared by every lock a backend takes, as etcd's
//! `concurrency.Session` does (see [`EtcdBackendBuilder::with_session`]).
//!
//! With a lease per lock, 100,000 locks are 100,000 leases, each kept alive on its own. With a
//! session they are one lease, kept alive by one small task every ttl/8, and a lock costs its
//! key alone: taking it is one transaction (no grant, no revoke), releasing it one delete.
//!
//! Each key actor still keeps its key, its deadline and its timer. Its renewal asks the session
//! when its last keep-alive was sent (`kept`), and counts its deadline from that instant: the
//! session lease runs at least its ttl from there. A keep-alive older than a sixth of the
//! lock's ttl is too old to renew on, and the renewal sends one of its own (renewals at once
//! share it on the backend's keep-alive stream). Whether the key itself is still ours comes
//! from the prefix watch (`held.rs`), as for any lock.
//!
//! The trade-off: a lost session loses every lock on it at once. When etcd says the session
//! lease is gone (expired or revoked), its keys are gone with it; every renewal on it answers
//! "not held", and the next acquisition grants a new session.
//!
//! [`EtcdBackendBuilder::with_session`]: super::EtcdBackendBuilder::with_session

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::keep_alive::KeptAlive;
use super::lease::lease_seconds;
use super::EtcdBackend;
use crate::error::StoreError;
use crate::task::AbortOnDrop;

/// How long the keeper waits after a failed keep-alive before it tries again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// A backend's session setting and its current lease.
pub(super) struct Session {
    /// The session lease's ttl, as asked.
    pub(super) ttl: Duration,
    /// The live session lease, once the first lock asked for one. A plain mutex, held only to
    /// read or swap the pointer: every renewal of every lock on the session reads it.
    current: Mutex<Option<Arc<Current>>>,
    /// Held while a new session lease is granted, so that locks asking at once share one grant
    /// instead of each granting a lease.
    granting: tokio::sync::Mutex<()>,
}

/// One granted session lease.
pub(super) struct Current {
    pub(super) id: i64,
    /// The ttl etcd granted, in seconds.
    pub(super) granted: i64,
    state: Mutex<State>,
    keeper: Mutex<Option<AbortOnDrop<()>>>,
}

#[derive(Debug, Clone, Copy)]
struct State {
    /// The latest keep-alive etcd answered with the lease alive.
    kept: KeptAlive,
    /// False once etcd said the lease is gone, or no keep-alive succeeded for a whole ttl.
    alive: bool,
}

impl Session {
    pub(super) fn new(ttl: Duration) -> Self {
        Session {
            ttl,
            current: Mutex::new(None),
            granting: tokio::sync::Mutex::new(()),
        }
    }

    /// The live session lease, granting a new one (and starting its keeper) when there is none
    /// or the last one is gone.
    pub(super) async fn lease(&self, backend: &EtcdBackend) -> Result<Arc<Current>, StoreError> {
        if let Some(live) = self.live() {
            return Ok(live);
        }
        let _granting = self.granting.lock().await;
        // Another lock may have granted one while this one waited.
        if let Some(live) = self.live() {
            return Ok(live);
        }
        let asked_at = Instant::now();
        let grant = backend.grant(self.ttl).await?;
        let session = Arc::new(Current {
            id: grant.id,
            granted: grant.ttl,
            state: Mutex::new(State {
                kept: KeptAlive {
                    ttl: grant.ttl,
                    revision: None,
                    sent_at: asked_at,
                },
                alive: true,
            }),
            keeper: Mutex::new(None),
        });
        grant.keep();
        let keeper = tokio::spawn(keep(backend.clone(), Arc::downgrade(&session)));
        *session.keeper.lock().unwrap_or_else(|p| p.into_inner()) = Some(AbortOnDrop(keeper));
        *self.current() = Some(Arc::clone(&session));
        Ok(session)
    }

    /// The current session lease, if it is alive.
    fn live(&self) -> Option<Arc<Current>> {
        self.current().as_ref().filter(|c| c.alive()).cloned()
    }

    /// The session lease `id`, if it is the current one.
    pub(super) fn get(&self, id: i64) -> Option<Arc<Current>> {
        self.current().as_ref().filter(|c| c.id == id).cloned()
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<Arc<Current>>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Current {
    pub(super) fn alive(&self) -> bool {
        self.state().alive
    }

    /// The latest keep-alive of the lease, if the lease is alive.
    pub(super) fn kept(&self) -> Option<KeptAlive> {
        let state = self.state();
        state.alive.then_some(state.kept)
    }

    /// A keep-alive sent at or after `after`, sending one (several renewals at once share it
    /// on the backend's stream). `Ok(None)` when etcd says the lease is gone.
    pub(super) async fn kept_after(
        &self,
        backend: &EtcdBackend,
        after: Instant,
    ) -> Result<Option<KeptAlive>, StoreError> {
        loop {
            if let Some(kept) = self.kept() {
                if kept.sent_at >= after {
                    return Ok(Some(kept));
                }
            } else {
                return Ok(None);
            }
            // A keep-alive already on its way when we asked answers with an earlier instant:
            // then one more is sent, after it.
            let kept = backend.keep_alive(self.id).await?;
            if !self.record(kept) {
                return Ok(None);
            }
        }
    }

    /// etcd said the lease is gone (a call on it answered "lease not found").
    pub(super) fn gone(&self) {
        self.state().alive = false;
    }

    /// Records etcd's answer to a keep-alive; false when it says the lease is gone.
    fn record(&self, kept: KeptAlive) -> bool {
        let mut state = self.state();
        if kept.ttl <= 0 {
            state.alive = false;
        } else if kept.sent_at > state.kept.sent_at {
            state.kept = kept;
        }
        state.alive
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The keeper: a keep-alive every eighth of the granted ttl, until etcd says the lease is
/// gone, no keep-alive succeeded for a whole ttl, or the session is dropped.
async fn keep(backend: EtcdBackend, session: std::sync::Weak<Current>) {
    loop {
        let Some(current) = session.upgrade() else {
            return;
        };
        let Some(kept) = current.kept() else {
            return;
        };
        let granted = Duration::from_secs(u64::try_from(current.granted).unwrap_or(1));
        let next = kept.sent_at + granted / 8;
        drop(current);
        tokio::time::sleep_until(next).await;
        let Some(current) = session.upgrade() else {
            return;
        };
        match backend.keep_alive(current.id).await {
            Ok(kept) => {
                if !current.record(kept) {
                    tracing::warn!(lease = current.id, "the etcd session lease is gone");
                    return;
                }
            }
            Err(error) => {
                let kept = current.kept().map_or(next, |kept| kept.sent_at);
                if Instant::now() >= kept + granted {
                    current.state().alive = false;
                    tracing::warn!(lease = current.id, %error, "the etcd session lease ran out");
                    return;
                }
                tracing::debug!(lease = current.id, %error, "session keep-alive failed; trying again");
                drop(current);
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// Checks a session ttl before any I/O: etcd counts whole seconds, and the keeper renews every
/// eighth of it.
pub(super) fn check_ttl(ttl: Duration) -> Result<(), String> {
    if ttl < Duration::from_secs(2) {
        return Err(format!(
            "etcd session ttl {ttl:?} is under the minimum of 2 s"
        ));
    }
    if lease_seconds(ttl) as u128 * 1000 != ttl.as_millis() {
        return Err(format!(
            "etcd session ttl {ttl:?} is not a whole number of seconds (etcd leases count seconds)"
        ));
    }
    Ok(())
}
