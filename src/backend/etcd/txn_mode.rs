//! `txn` mode's acquisition: a lease grant and one transaction on the lock key itself.

use std::time::Duration;

use tokio::time::Instant;

use etcd_client::{
    Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};

use super::call::is_lease_not_found;
use super::held::Registration;
use super::keep_alive::KeptAlive;
use super::lease::{lease_seconds, Grant};
use super::session::{Current, Session};
use super::values::{token, txn_revision, Holder};
use super::EtcdBackend;
use crate::backend::{Acquisition, Lease, LockBackend, OwnerToken};
use crate::error::StoreError;

impl EtcdBackend {
    pub(super) async fn acquire_txn(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        if let Some(session) = &self.session {
            // Boxed: see `EtcdBackend::acquire` (the session's path is the longer).
            return Box::pin(self.acquire_txn_on_session(session, key, owner, ttl, metadata)).await;
        }
        let mut taken = self.take_on_new_lease(key, owner, ttl, metadata).await?;
        if matches!(&taken.2, Err(error) if is_lease_not_found(error)) {
            // The lease ran out before the transaction came (etcd stalled in between for its
            // whole ttl): nothing was written. Once more, on a new lease (the first one's
            // registration goes first: the second is under the same owner).
            drop(taken);
            taken = self.take_on_new_lease(key, owner, ttl, metadata).await?;
        }
        let (grant, registration, answer) = taken;
        let answer = answer?;
        // The transaction's revision is the put's: etcd gives each write transaction one new
        // revision, strictly greater than every earlier one, so it is a fencing token.
        let revision = txn_revision(&answer)?;
        if answer.succeeded() {
            let mut lease = Lease::new(key, owner, token(revision)?);
            lease.lease_id = Some(grant.keep());
            registration.keep();
            return Ok(Acquisition::Acquired(lease));
        }
        let holder = first_range_kv(&answer);
        // Our lease holds nothing: revoke it now rather than leave it to run out.
        let (_, contention) = Box::pin(async {
            futures::join!(grant.revoke(), self.contention(holder.as_ref(), revision))
        })
        .await;
        Ok(Acquisition::Held(contention))
    }

    /// [`acquire_txn`](Self::acquire_txn) on a backend whose locks go on its session lease.
    async fn acquire_txn_on_session(
        &self,
        session: &Session,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let lock_key = self.lock_key(key);
        let current = session.lease(self).await?;
        let acquired = self
            .acquire_on_session(key, &lock_key, owner, ttl, &current, metadata)
            .await;
        match acquired {
            // The session lease was revoked or ran out before the keeper noticed: once
            // more, on a new session.
            Err(error) if is_lease_not_found(&error) => {
                current.gone(self);
                let current = session.lease(self).await?;
                self.acquire_on_session(key, &lock_key, owner, ttl, &current, metadata)
                    .await
            }
            acquired => acquired,
        }
    }

    /// Grants a lease and writes `key` on it if the key is free: the grant, its record in the
    /// prefix watch's registry, and the transaction's answer. The lease comes first, so that
    /// the put can attach the key to it: the key then disappears with the lease, whether it is
    /// revoked or runs out.
    async fn take_on_new_lease(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<(Grant, Registration, Result<TxnResponse, StoreError>), StoreError> {
        let grant = self.grant(ttl).await?;
        // Recorded before the write, so the prefix watch cannot miss a change right after it.
        let registration = self.register(owner, grant.id, grant.ttl).await;
        let value = Holder::encode(owner, grant.ttl, metadata);
        let answer = self.txn(create(&self.lock_key(key), value, grant.id)).await;
        Ok((grant, registration, answer))
    }

    /// `txn` mode on the session lease: one transaction, and beside it a keep-alive of the
    /// session sent after this attempt began, so the lease runs at least its ttl from then on
    /// (the key actor counts the lock's deadline from before the attempt).
    async fn acquire_on_session(
        &self,
        key: &str,
        lock_key: &str,
        owner: OwnerToken,
        ttl: Duration,
        session: &Current,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let asked_at = Instant::now();
        // The value says the lock's own ttl (what `inspect` shows), not the session's.
        let granted = lease_seconds(ttl);
        let value = Holder::encode(owner, granted, metadata);
        let registration = self.register(owner, session.id, granted).await;
        let (answer, kept) = futures::join!(
            self.txn(create(lock_key, value, session.id)),
            session.kept_after(self, asked_at)
        );
        let answer = answer?;
        let revision = txn_revision(&answer)?;
        if !answer.succeeded() {
            let holder = first_range_kv(&answer);
            return Ok(Acquisition::Held(
                self.contention(holder.as_ref(), revision).await,
            ));
        }
        let mut lease = Lease::new(key, owner, token(revision)?);
        lease.lease_id = Some(session.id);
        self.trust_on_session(lease, registration, kept)
            .await
            .map(Acquisition::Acquired)
    }

    /// A lock key just written on the session lease, with what the keep-alive sent beside
    /// the write answered: the lease, if the session runs on from after the attempt began.
    /// Else the key is written but the session's life from now on is not known (or it is
    /// gone, and the key with it): the key is given back rather than trusted.
    pub(super) async fn trust_on_session(
        &self,
        lease: Lease,
        registration: Registration,
        kept: Result<Option<KeptAlive>, StoreError>,
    ) -> Result<Lease, StoreError> {
        if let Ok(Some(_)) = kept {
            registration.keep();
            return Ok(lease);
        }
        drop(registration);
        let _ = self.release(&lease).await;
        Err(kept.err().unwrap_or_else(|| {
            StoreError::unavailable("the etcd session lease ran out during the acquisition")
        }))
    }
}

/// The transaction that creates `lock_key` on `lease` with `value` if it does not exist, and
/// otherwise reads the holder (whose lease tells the waiters how long it may last).
/// `create_revision == 0` means the key does not exist.
fn create(lock_key: &str, value: String, lease: i64) -> Txn {
    Txn::new()
        .when([Compare::create_revision(lock_key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            lock_key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(lock_key, None)])
}

/// The key read by the `else` branch of the acquire transaction.
pub(super) fn first_range_kv(answer: &TxnResponse) -> Option<KeyValue> {
    answer.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
        _ => None,
    })
}
