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
//! The keeper keeps pace with the shortest ttl among the locks following the session now (a
//! keep-alive every sixth of it, at most every eighth of the session's ttl; when that lock
//! stops following, the pace is the next shortest's again) and gives the session up when no
//! keep-alive was answered by that lock's loss check (at most the session's ttl): then every
//! following lock is told at once, `Lost` together, before their deadlines.
//! [`EtcdBackend::session_keep_alive_every`] reads the pace.
//!
//! The trade-off: a lost session loses every lock on it at once. When etcd says the session
//! lease is gone (expired or revoked), its keys are gone with it; every lock on it is `Lost`,
//! and the next acquisition grants a new session.
//!
//! [`EtcdBackendBuilder::with_session`]: super::EtcdBackendBuilder::with_session

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
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
    /// The paces of the locks following this lease now: the keeper keeps pace with the
    /// shortest, and slows down again when it stops following.
    paces: Mutex<Paces>,
    /// Wakes the keeper when a lock with a shorter ttl begins to follow.
    wake: Arc<Notify>,
}

/// How many following locks have each ttl, and each time from a keep-alive to their loss
/// check: the keeper keeps the lease alive every sixth of the shortest ttl at least, and
/// ends the session when no keep-alive was answered for the shortest loss check (every lock
/// on it then hears of the loss together, by that check).
#[derive(Default)]
struct Paces {
    ttls: BTreeMap<Duration, usize>,
    lose_afters: BTreeMap<Duration, usize>,
}

impl Paces {
    fn add(&mut self, pace: &Pace) {
        *self.ttls.entry(pace.ttl).or_default() += 1;
        *self.lose_afters.entry(pace.lose_after).or_default() += 1;
    }

    fn remove(&mut self, pace: &Pace) {
        for (map, at) in [
            (&mut self.ttls, pace.ttl),
            (&mut self.lose_afters, pace.lose_after),
        ] {
            if let Some(count) = map.get_mut(&at) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&at);
                }
            }
        }
    }

    fn shortest(&self) -> (Option<Duration>, Option<Duration>) {
        let first = |map: &BTreeMap<Duration, usize>| map.keys().next().copied();
        (first(&self.ttls), first(&self.lose_afters))
    }
}

/// One following lock's part in its session's pace, for as long as it follows: dropped (the
/// lock released, lost, or renewing on its own), the keeper no longer keeps its pace.
pub(super) struct Pace {
    session: Weak<Current>,
    ttl: Duration,
    lose_after: Duration,
}

impl Drop for Pace {
    fn drop(&mut self) {
        if let Some(session) = self.session.upgrade() {
            session.paces().remove(self);
        }
    }
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
            paces: Mutex::new(Paces::default()),
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
    pub(super) fn live(&self) -> Option<Arc<Current>> {
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
    /// keep-alive, begins to follow this lease: the keeper keeps pace with it for as long as
    /// the lock keeps the answer.
    pub(super) fn followed(self: &Arc<Self>, ttl: Duration, lose_after: Duration) -> Pace {
        let pace = Pace {
            session: Arc::downgrade(self),
            ttl,
            lose_after,
        };
        let mut paces = self.paces();
        let (shortest, soonest) = paces.shortest();
        paces.add(&pace);
        drop(paces);
        if shortest.is_none_or(|at| ttl < at) || soonest.is_none_or(|at| lose_after < at) {
            self.wake.notify_one();
        }
        pace
    }

    /// How often the keeper sends a keep-alive, and how long after the last one answered it
    /// gives the lease up: an eighth of the granted ttl and the whole of it, or sooner while
    /// a lock following the lease has a shorter ttl.
    pub(super) fn pace(&self) -> (Duration, Duration) {
        let granted = Duration::from_secs(u64::try_from(self.granted).unwrap_or(1));
        let (shortest, soonest) = self.paces().shortest();
        let every = shortest.map_or(granted / 8, |ttl| (granted / 8).min(ttl / 6));
        (every, soonest.map_or(granted, |at| granted.min(at)))
    }

    fn paces(&self) -> std::sync::MutexGuard<'_, Paces> {
        self.paces.lock().unwrap_or_else(|p| p.into_inner())
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
