//! `txn` mode's acquisition: a lease grant and one transaction on the lock key itself.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};

use super::values::{token, txn_revision, Holder};
use super::EtcdBackend;
use crate::backend::{Acquisition, Lease, OwnerToken};
use crate::error::StoreError;

impl EtcdBackend {
    pub(super) async fn acquire_txn(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let lock_key = self.lock_key(key);
        // The lease first, so the put can attach the key to it: the key then disappears with
        // the lease, whether it is revoked or runs out.
        let grant = self.grant(ttl).await?;
        let value = Holder::encode(owner, grant.ttl, metadata);
        // `create_revision == 0` means the key does not exist. One transaction either creates
        // it on our lease or, if someone holds it, reads the holder (whose lease tells the
        // waiters how long it may last).
        let txn = Txn::new()
            .when([Compare::create_revision(
                lock_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                lock_key.as_str(),
                value,
                Some(PutOptions::new().with_lease(grant.id)),
            )])
            .or_else([TxnOp::get(lock_key.as_str(), None)]);
        // Recorded before the write, so the prefix watch cannot miss a change right after it.
        let registration = self.register(owner, grant.id, grant.ttl).await;
        let answer = self.txn(txn).await?;
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
        let (_, contention) =
            futures::join!(grant.revoke(), self.contention(holder.as_ref(), revision));
        Ok(Acquisition::Held(contention))
    }
}

/// The key read by the `else` branch of the acquire transaction.
pub(super) fn first_range_kv(answer: &TxnResponse) -> Option<KeyValue> {
    answer.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
        _ => None,
    })
}
