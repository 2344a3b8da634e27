//! etcd leases: granting one per acquisition, keeping it alive, revoking it, reading its time
//! to live, and moving a key onto a longer one.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, KeyValue, LeaseGrantOptions, LeaseGrantResponse, PutOptions, Txn, TxnOp,
};
use tokio::time::timeout;

use super::call::{is_lease_exists, is_lease_not_found, Retry};
use super::keep_alive::KeptAlive;
use super::values::{owner_compares, Holder};
use super::EtcdBackend;
use crate::error::StoreError;

/// The budget of a lease revocation that nobody waits for (an abandoned attempt's lease).
const ORPHAN_REVOKE_TIMEOUT: Duration = Duration::from_secs(5);

impl EtcdBackend {
    /// Grants the lease for one acquisition. etcd counts lease ttls in whole seconds: round up
    /// (see "Ttls are whole seconds" in the module documentation).
    pub(super) async fn grant(&self, ttl: Duration) -> Result<Grant, StoreError> {
        let granted = self.lease_grant(ttl, None).await?;
        Ok(self.granted(granted.id(), granted.ttl()))
    }

    /// Grants lease `id`, chosen by the caller (a fair waiter's place, see `queue.rs`). A lease
    /// `id` that exists already is ours — an earlier grant of it whose answer was lost — and
    /// counts as granted.
    pub(super) async fn grant_id(&self, id: i64, ttl: Duration) -> Result<Grant, StoreError> {
        let ttl = match self.lease_grant(ttl, Some(id)).await {
            Ok(granted) => granted.ttl(),
            Err(error) if is_lease_exists(&error) => lease_seconds(ttl),
            Err(error) => return Err(error),
        };
        Ok(self.granted(id, ttl))
    }

    /// The `LeaseGrant` call, with etcd's choice of id or `id`, for `ttl` in whole seconds.
    async fn lease_grant(
        &self,
        ttl: Duration,
        id: Option<i64>,
    ) -> Result<LeaseGrantResponse, StoreError> {
        let seconds = lease_seconds(ttl);
        self.call("lease grant", Retry::IfConnectionBroke, || {
            let mut leases = self.shared.client.lease_client();
            let options = id.map(|id| LeaseGrantOptions::new().with_id(id));
            async move { leases.grant(seconds, options).await }
        })
        .await
    }

    /// A granted lease, revoked if dropped before it is kept.
    fn granted(&self, id: i64, ttl: i64) -> Grant {
        Grant {
            backend: self.clone(),
            id,
            ttl,
            armed: true,
        }
    }

    /// Revokes lease `id`, which deletes every key on it. A lease that is already gone is not
    /// an error.
    pub(super) async fn revoke(&self, id: i64) -> Result<(), StoreError> {
        let revoked = self
            .call("lease revoke", Retry::IfConnectionBroke, || {
                let mut leases = self.shared.client.lease_client();
                async move { leases.revoke(id).await }
            })
            .await;
        match revoked {
            Ok(_) => Ok(()),
            // etcd says "requested lease not found" (gRPC not found) for a lease that
            // expired or was revoked already: the outcome asked for.
            Err(error) if is_lease_not_found(&error) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// How long the lease `id` has left (`LeaseTimeToLive`), in whole seconds; `None` for a key
    /// without a lease or a lease that is already gone.
    pub(super) async fn remaining(&self, id: i64) -> Result<Option<Duration>, StoreError> {
        if id == 0 {
            return Ok(None);
        }
        let answer = self
            .call("lease time-to-live", Retry::IfConnectionBroke, || {
                let mut leases = self.shared.client.lease_client();
                async move { leases.time_to_live(id, None).await }
            })
            .await?;
        Ok(u64::try_from(answer.ttl()).ok().map(Duration::from_secs))
    }

    /// One keep-alive of lease `id`, on the backend's one keep-alive stream (see
    /// `keep_alive.rs`). A ttl of 0 in the answer means the lease is gone (expired or revoked),
    /// and the keys on it with it.
    pub(super) async fn keep_alive(&self, id: i64) -> Result<KeptAlive, StoreError> {
        self.shared.keep_alives.keep_alive(id).await
    }

    /// Moves the lock key `kv` (ours, on lease `current`) onto a new lease for `ttl`, for a
    /// renewal asking for more than etcd granted: etcd cannot lengthen a lease. The new lease
    /// and its granted ttl in seconds, or `None` if the key was not ours any more.
    pub(super) async fn move_to_longer_lease(
        &self,
        kv: &KeyValue,
        holder: &Holder<'_>,
        current: i64,
        ttl: Duration,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let grant = self.grant(ttl).await?;
        let mut compares = owner_compares(kv.key(), holder.owner);
        // Only if nobody moved it meanwhile.
        compares.push(Compare::lease(kv.key(), CompareOp::Equal, current));
        let value = Holder::encode(holder.owner, grant.ttl, holder.metadata);
        let txn = Txn::new().when(compares).and_then([TxnOp::put(
            kv.key(),
            value,
            Some(PutOptions::new().with_lease(grant.id)),
        )]);
        if !self.txn(txn).await?.succeeded() {
            grant.revoke().await;
            return Ok(None);
        }
        let granted = grant.ttl;
        let moved_to = grant.keep();
        // The key left the old lease, so revoking it deletes nothing; a failure leaves it to
        // run out.
        let _ = self.revoke(current).await;
        Ok(Some((moved_to, granted)))
    }
}

/// A lease granted for one acquisition attempt. Until the attempt keeps it, dropping it revokes
/// it: also when the attempt itself is dropped half-way (the key actor gave up on a slow
/// store), so a key written on it does not linger for the whole ttl.
pub(super) struct Grant {
    backend: EtcdBackend,
    pub(super) id: i64,
    /// The ttl etcd granted, in seconds (it may raise the one asked for).
    pub(super) ttl: i64,
    armed: bool,
}

impl Grant {
    /// The lease now belongs to a held lock.
    pub(super) fn keep(mut self) -> i64 {
        self.armed = false;
        self.id
    }

    /// Revokes the lease now, deleting whatever key is on it. A failure leaves it to run out.
    pub(super) async fn revoke(mut self) {
        self.armed = false;
        if let Err(error) = self.backend.revoke(self.id).await {
            tracing::debug!(lease = self.id, %error, "lease revoke failed; it will run out");
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Nothing can be awaited here: a short task of its own, bounded, does the revoke.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (backend, id) = (self.backend.clone(), self.id);
            runtime.spawn(async move {
                let _ = timeout(ORPHAN_REVOKE_TIMEOUT, backend.revoke(id)).await;
            });
        }
    }
}

/// etcd's lease ttl for `ttl`: whole seconds, rounded up, at least 1.
pub(super) fn lease_seconds(ttl: Duration) -> i64 {
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(seconds.max(1)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(lease_seconds(Duration::from_millis(1)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(lease_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(lease_seconds(Duration::from_secs(30)), 30);
    }
}
