//! Renewal: a keep-alive on the backend's one stream, and the prefix watch's word that the key
//! is still ours; a read of the key only when the watch cannot vouch for it.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{PutOptions, Txn, TxnOp};
use tokio::time::Instant;

use super::held::{HeldKeys, Owned, Registration};
use super::lease::lease_seconds;
use super::session::Session;
use super::values::{owner_compares, Holder};
use super::EtcdBackend;
use crate::backend::{Lease, OwnerToken};
use crate::error::StoreError;

impl EtcdBackend {
    /// The watch over this backend's prefix, opened by the first lock taken under it.
    pub(super) async fn held_keys(&self) -> Arc<HeldKeys> {
        let cell = Arc::clone(
            self.shared
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(Arc::clone(&self.prefix))
                .or_default(),
        );
        let held = cell
            .get_or_init(|| async {
                let (client, prefix) = (self.shared.client.clone(), self.prefix.to_string());
                // Boxed: opening the watch is a large future, and it is awaited here once per
                // backend, while every acquisition and renewal awaits this function.
                Arc::new(Box::pin(HeldKeys::start(client, prefix, self.shared.tries)).await)
            })
            .await;
        Arc::clone(held)
    }

    /// The watch over this backend's prefix, if a lock was taken under it.
    pub(super) fn held_keys_if_started(&self) -> Option<Arc<HeldKeys>> {
        let held = self.shared.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&self.prefix).and_then(|cell| cell.get().cloned())
    }

    /// Records, before the write that takes the lock, that `owner` is about to hold a key on
    /// `lease` granted for `granted` seconds. Dropped without [`Registration::keep`], the record
    /// goes (the attempt failed, or was given up half-way).
    pub(super) async fn register(
        &self,
        owner: OwnerToken,
        lease: i64,
        granted: i64,
    ) -> Registration {
        HeldKeys::register(self.held_keys().await, owner, lease, granted)
    }

    /// Renews `lease` for `ttl` (see the module documentation).
    pub(super) async fn renew_lease(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let held = self.held_keys().await;
        let owner = lease.owner;
        match held.get(owner) {
            Some(Owned::Taken) => {
                held.forget(owner);
                return Ok(false);
            }
            // A longer ttl than the lease has needs the key's value to move it: read below.
            Some(Owned::Held {
                lease: current,
                granted,
            }) if lease_seconds(ttl) <= granted => {
                let kept = self.keep_alive(current).await?;
                if kept.ttl <= 0 {
                    // The lease is gone, and the key with it.
                    held.forget(owner);
                    return Ok(false);
                }
                // Everything etcd applied before it answered has a revision up to the
                // answer's: once the watch has shown that far, a delete or overwrite of our
                // key before this renewal has been seen.
                if let Some(revision) = kept.revision {
                    if held.caught_up(revision).await {
                        match held.get(owner) {
                            Some(Owned::Held { .. }) => return Ok(true),
                            Some(Owned::Taken) => {
                                held.forget(owner);
                                return Ok(false);
                            }
                            // A gap in the watch meanwhile, or forgotten: read.
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
        let since = held.watching_since();
        // Boxed: the read's calls would make every renewal's future (allocated per call, and
        // thousands of them wait on the keep-alive stream at once) several times larger.
        match Box::pin(self.renew_by_reading(lease, ttl)).await? {
            Some((current, granted)) => {
                held.confirm(owner, current, granted, since);
                Ok(true)
            }
            None => {
                held.forget(owner);
                Ok(false)
            }
        }
    }

    /// Renews a lock on the session lease (see `session.rs`): no call of its own when the
    /// session's last keep-alive is recent (sent within a sixth of `ttl`) and the watch vouches
    /// for the key. The instant the renewed ttl runs from, or `None` when the lock is lost.
    pub(super) async fn renew_on_session(
        &self,
        session: &Session,
        lease: &Lease,
        ttl: Duration,
        asked_at: Instant,
    ) -> Result<Option<Instant>, StoreError> {
        let held = self.held_keys().await;
        let owner = lease.owner;
        let current = match lease.lease_id {
            Some(id) => session.get(id),
            None => None,
        };
        let not_held = || {
            held.forget(owner);
            Ok(None)
        };
        // Its session was lost (and replaced): the key went with it.
        let Some(current) = current else {
            return not_held();
        };
        // Within a sixth of the ttl: the deadline counted from it leaves five sixths, so the next
        // renewal (a third of the ttl on) comes with room to spare even on a loaded machine.
        let fresh_after = asked_at.checked_sub(ttl / 6).unwrap_or(asked_at);
        let Some(kept) = current.kept_after(self, fresh_after).await? else {
            return not_held();
        };
        let seconds = lease_seconds(ttl);
        let said = |owned: Option<Owned>| matches!(owned, Some(Owned::Held { granted, .. }) if seconds <= granted);
        if let (true, Some(revision)) = (said(held.get(owner)), kept.revision) {
            // As in `renew_lease`: once the watch has shown everything up to the keep-alive's
            // revision, its word on the key stands. (A longer ttl than the key's value says is
            // written into the value, below.)
            if held.caught_up(revision).await {
                match held.get(owner) {
                    Some(Owned::Held { .. }) => return Ok(Some(kept.sent_at)),
                    Some(Owned::Taken) => return not_held(),
                    _ => {}
                }
            }
        }
        if held.get(owner) == Some(Owned::Taken) {
            return not_held();
        }
        // The watch cannot vouch: read the key.
        let since = held.watching_since();
        let lock_key = self.lock_key(&lease.key);
        let read = self.get(&lock_key, None).await?;
        let Some(kv) = read.kvs().first().filter(|kv| kv.lease() == current.id) else {
            return not_held();
        };
        let Some(holder) = Holder::decode(kv.value()).filter(|h| h.owner == owner) else {
            return not_held();
        };
        if holder.granted < seconds {
            // The value says the lock's ttl (what `inspect` shows): say the longer one, on
            // the same session lease, if the key is still ours.
            let value = Holder::encode(owner, seconds, holder.metadata);
            let txn = Txn::new()
                .when(owner_compares(kv.key(), owner))
                .and_then([TxnOp::put(
                    kv.key(),
                    value,
                    Some(PutOptions::new().with_lease(current.id)),
                )]);
            if !self.txn(txn).await?.succeeded() {
                return not_held();
            }
        }
        held.confirm(owner, current.id, seconds.max(holder.granted), since);
        Ok(Some(kept.sent_at))
    }

    /// Renewal without the watch's word: a keep-alive and, in parallel, a read of the key —
    /// is it still ours, and on which lease? (A key deleted or overwritten behind our back
    /// leaves the lease alive; only the key says whether we still hold the lock.) The lease
    /// the key is on and its granted ttl, or `None` when the lock is not ours any more.
    async fn renew_by_reading(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let Some(lock_key) = self.locate(lease).await? else {
            return Ok(None);
        };
        let keep_granted = async {
            match lease.lease_id {
                Some(id) => Some(self.keep_alive(id).await.map(|kept| kept.ttl > 0)),
                None => None,
            }
        };
        let (kept, read) = futures::join!(keep_granted, self.get(&lock_key, None));
        let read = read?;
        let Some(kv) = read.kvs().first() else {
            return Ok(None);
        };
        let Some(holder) = Holder::decode(kv.value()).filter(|h| h.owner == lease.owner) else {
            return Ok(None);
        };
        let current = kv.lease();
        let alive = match kept {
            Some(kept) if Some(current) == lease.lease_id => kept?,
            // The key is on another lease than the one granted at acquisition (a renewal moved
            // it to a longer one): keep that one alive.
            _ if current != 0 => self.keep_alive(current).await?.ttl > 0,
            _ => false,
        };
        if !alive {
            return Ok(None);
        }
        if lease_seconds(ttl) <= holder.granted {
            return Ok(Some((current, holder.granted)));
        }
        self.move_to_longer_lease(kv, &holder, current, ttl).await
    }
}
