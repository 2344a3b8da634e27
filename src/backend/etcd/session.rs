//! The session lease: one etcd lease shared by every lock a backend takes, as etcd's
//! `concurrency.Session` does (see [`EtcdBackendBuilder::with_session`]).
//!
//! With a lease per lock, 100,000 locks are 100,000 leases, each kept alive on its own. With a
//! session they are one lease, kept alive by one small task every ttl/8, and a lock costs its
//! key alone: taking it is one transaction (no grant, no revoke), releasing it one delete.
//!
//! An auto-renewed lock on the session *follows* it (`backend/follow.rs`): its key actor arms
//! no renewal timer, and its deadline (what its guard reads) is counted from the session's
//! last answered keep-alive, which the keeper writes to the session's [`SharedClock`] — the
//! session lease runs at least its ttl from there. Each key actor still owns its key and its
//! lease state; what it no longer does is ask, every ttl/3, a question whose answer is the same
//! for every lock on the session. Whether the key itself is still ours comes from the prefix
//! watch (`held.rs`), which tells a following lock's key actor directly when its key is
//! deleted or overwritten, or that it can no longer vouch for it (the watch broke): that lock
//! then renews on its own (reading its key) until the watch vouches for it again. A lock that
//! does not follow (auto-renew off, a semaphore's permits, a read-write hold, the watch not
//! vouching) renews as before: its renewal asks when the session's last keep-alive was sent
//! (`kept`), and sends one of its own if that is older than a sixth of its ttl.
//!
//! The keeper keeps pace with the shortest ttl of a lock that followed the session (a
//! keep-alive every sixth of it, at most every eighth of the session's ttl) and gives the
//! session up when no keep-alive was answered by that lock's loss check (at most the
//! session's ttl): then every following lock is told at once, `Lost` together, before their
//! deadlines.
//!
//! The trade-off: a lost session loses every lock on it at once. When etcd says the session
//! lease is gone (expired or revoked), its keys are gone with it; every lock on it is `Lost`,
//! and the next acquisition grants a new session.
//!
//! [`EtcdBackendBuilder::with_session`]: super::EtcdBackendBuilder::with_session

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{timeout_at, Instant};

use super::keep_alive::KeptAlive;
use super::lease::lease_seconds;
use super::EtcdBackend;
use crate::backend::{FollowNotice, SharedClock};
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
    /// When the lease was last confirmed kept alive, for the locks that follow it (see
    /// `backend/follow.rs`): advanced with every keep-alive etcd answers with the lease
    /// alive, ended when the lease is lost.
    pub(super) clock: SharedClock,
    /// The shortest ttl of a lock that followed this lease, in nanoseconds (`u64::MAX` while
    /// none did): the keeper keeps the lease alive every sixth of it, at least.
    shortest_ttl: AtomicU64,
    /// The shortest time from a keep-alive to a following lock's loss check, in nanoseconds:
    /// with no keep-alive answered for that long, the keeper ends the session, and every lock
    /// on it hears of the loss together, by that check.
    lose_after: AtomicU64,
    /// Wakes the keeper when a lock with a shorter ttl begins to follow.
    wake: Arc<Notify>,
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
        let wake = Arc::new(Notify::new());
        let session = Arc::new(Current {
            id: grant.id,
            granted: grant.ttl,
            clock: SharedClock::new(asked_at),
            shortest_ttl: AtomicU64::new(u64::MAX),
            lose_after: AtomicU64::new(u64::MAX),
            wake: Arc::clone(&wake),
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
        let keeper = tokio::spawn(keep(backend.clone(), Arc::downgrade(&session), wake));
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
                self.end(backend, FollowNotice::SharedLeaseGone);
                return Ok(None);
            }
        }
    }

    /// etcd said the lease is gone (a call on it answered "lease not found").
    pub(super) fn gone(&self, backend: &EtcdBackend) {
        self.end(backend, FollowNotice::SharedLeaseGone);
    }

    /// The lease is lost: no lock is taken on it any more, and every lock following it is
    /// told `notice` at once (the ones renewing on their own hear it at their next renewal).
    fn end(&self, backend: &EtcdBackend, notice: FollowNotice) {
        self.state().alive = false;
        self.clock.end();
        if let Some(held) = backend.held_keys_if_started() {
            held.lose_followers(self.id, notice);
        }
    }

    /// A lock with `ttl`, whose holder must hear of a loss within `lose_after` of the last
    /// keep-alive, begins to follow this lease: the keeper keeps pace with it.
    pub(super) fn followed(&self, ttl: Duration, lose_after: Duration) {
        let ttl = ttl.as_nanos().min(u64::MAX as u128) as u64;
        let lose_after = lose_after.as_nanos().min(u64::MAX as u128) as u64;
        let shorter = self.shortest_ttl.fetch_min(ttl, Ordering::AcqRel) > ttl;
        let sooner = self.lose_after.fetch_min(lose_after, Ordering::AcqRel) > lose_after;
        if shorter || sooner {
            self.wake.notify_one();
        }
    }

    /// How often the keeper sends a keep-alive, and how long after the last one answered it
    /// gives the lease up: an eighth of the granted ttl and the whole of it, or sooner when a
    /// lock following the lease has a shorter ttl.
    fn pace(&self) -> (Duration, Duration) {
        let granted = Duration::from_secs(u64::try_from(self.granted).unwrap_or(1));
        let nanos = |at: &AtomicU64| Duration::from_nanos(at.load(Ordering::Acquire));
        let every = (granted / 8).min(nanos(&self.shortest_ttl) / 6);
        (every, granted.min(nanos(&self.lose_after)))
    }

    /// Records etcd's answer to a keep-alive; false when it says the lease is gone.
    fn record(&self, kept: KeptAlive) -> bool {
        let mut state = self.state();
        if kept.ttl <= 0 {
            state.alive = false;
        } else if kept.sent_at > state.kept.sent_at {
            state.kept = kept;
        }
        if state.alive {
            self.clock.advance(kept.sent_at);
        }
        state.alive
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The keeper: a keep-alive every eighth of the granted ttl (or every sixth of the shortest
/// ttl of a lock that follows the lease), until etcd says the lease is gone, no keep-alive
/// was answered in time (the whole ttl, or the following locks' loss check), or the session
/// is dropped. Each answer advances the clock the following locks read their deadline from.
async fn keep(backend: EtcdBackend, session: std::sync::Weak<Current>, wake: Arc<Notify>) {
    loop {
        // Registered before the pace is read, so a lock that follows meanwhile still wakes it.
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let Some(current) = session.upgrade() else {
            return;
        };
        let Some(kept) = current.kept() else {
            return;
        };
        let (every, give_up_after) = current.pace();
        let (next, limit) = (kept.sent_at + every, kept.sent_at + give_up_after);
        drop(current);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            // A lock with a shorter ttl follows now: keep its pace.
            _ = woken => continue,
        }
        let Some(current) = session.upgrade() else {
            return;
        };
        match timeout_at(limit, backend.keep_alive(current.id)).await {
            Ok(Ok(kept)) => {
                if !current.record(kept) {
                    current.end(&backend, FollowNotice::SharedLeaseGone);
                    tracing::warn!(lease = current.id, "the etcd session lease is gone");
                    return;
                }
            }
            failed => {
                if Instant::now() >= limit {
                    current.end(&backend, FollowNotice::SharedLeaseExpired);
                    tracing::warn!(
                        lease = current.id,
                        ?failed,
                        "the etcd session lease ran out"
                    );
                    return;
                }
                tracing::debug!(
                    lease = current.id,
                    ?failed,
                    "session keep-alive failed; trying again"
                );
                drop(current);
                tokio::time::sleep_until((Instant::now() + RETRY_AFTER).min(limit)).await;
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
