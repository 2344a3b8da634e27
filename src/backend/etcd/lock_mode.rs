//! `lock` mode: acquisition through etcd's Lock service, and where its keys live.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, LockOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use tokio::time::{sleep, Instant};

use super::call::Retry;
use super::values::{token, Holder};
use super::{EtcdBackend, EtcdMode};
use crate::backend::{Acquisition, Contention, Lease, OwnerToken};
use crate::error::StoreError;

/// The shortest first wait before a pending `Lock` call looks whether it is queued behind
/// another holder (see `lock_once`); each later look waits twice as long, up to
/// [`LOCK_PROBE_MAX`].
const LOCK_PROBE_FIRST: Duration = Duration::from_millis(2);
const LOCK_PROBE_MAX: Duration = Duration::from_millis(640);

/// How many times one `lock`-mode acquisition looks and calls `Lock` while other contenders
/// keep slipping in between.
const LOCK_ROUNDS: usize = 3;

impl EtcdBackend {
    /// The prefix under which the Lock service keeps the contenders for `key`.
    pub(super) fn contenders(&self, key: &str) -> String {
        format!("{}/", self.lock_key(key))
    }

    /// The contender holding the Lock-service lock under `contenders`: the key created first.
    pub(super) async fn first_contender(
        &self,
        contenders: &str,
    ) -> Result<(Option<KeyValue>, i64), StoreError> {
        let first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let mut answer = self.get(contenders, Some(first)).await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        Ok((answer.take_kvs().into_iter().next(), revision))
    }

    /// The etcd key holding `lease`, if it can be named: the lock key in `txn` mode; in `lock`
    /// mode the Lock service's key for the lease (`NAME/<lease id in hex>`), or, for a lease
    /// that does not say its id, the contender key whose value carries its owner token.
    pub(super) async fn locate(&self, lease: &Lease) -> Result<Option<String>, StoreError> {
        match (self.mode, lease.lease_id) {
            (EtcdMode::Txn, _) => Ok(Some(self.lock_key(&lease.key))),
            (EtcdMode::Lock, Some(id)) => Ok(Some(contender_key(&self.contenders(&lease.key), id))),
            (EtcdMode::Lock, None) => {
                let contenders = self.contenders(&lease.key);
                let mut answer = self
                    .get(&contenders, Some(GetOptions::new().with_prefix()))
                    .await?;
                Ok(answer
                    .take_kvs()
                    .into_iter()
                    .find(|kv| Holder::decode(kv.value()).is_some_and(|h| h.owner == lease.owner))
                    .and_then(|kv| String::from_utf8(kv.key().to_vec()).ok()))
            }
        }
    }

    pub(super) async fn acquire_lock(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let contenders = self.contenders(key);
        for _ in 0..LOCK_ROUNDS {
            // Look before asking: `Lock` would wait for a held lock, and this call must not.
            let (first, revision) = self.first_contender(&contenders).await?;
            if first.is_some() {
                return Ok(Acquisition::Held(
                    self.contention(first.as_ref(), revision).await,
                ));
            }
            if let Some(acquired) = self.lock_once(key, owner, ttl, metadata).await? {
                return Ok(acquired);
            }
            // Another contender came in between the look and the `Lock` call, and this one
            // backed off. Look again rather than answer `Held`: that contender may be done
            // already, and the release notice it sent may have come while this attempt was
            // still running, when nobody was waiting for it.
        }
        // Still racing: let the waiter try again at once (a zero remaining ttl fires its
        // backstop timer right away).
        Ok(Acquisition::Held(Contention {
            remaining_ttl: Some(Duration::ZERO),
            revision: None,
        }))
    }

    /// One `Lock` call on a lock that looked free. `None` when it turned out to be queued
    /// behind another contender, and was cancelled.
    pub(super) async fn lock_once(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Option<Acquisition>, StoreError> {
        let (name, contenders) = (self.lock_key(key), self.contenders(key));
        let granting = Instant::now();
        let grant = self.grant(ttl).await?;
        // A lease grant is one raft write, as is the Lock call's own put (the Lock service
        // adds a read and its own internal client): four times the grant's time is a margin
        // over how long an uncontended `Lock` takes right now, and when the first look comes.
        let mut wait = (granting.elapsed() * 4).max(LOCK_PROBE_FIRST);
        let ours = contender_key(&contenders, grant.id);
        // The Lock service puts `NAME/<lease>` on our lease and answers once it is the oldest
        // key under `NAME/`: at once for a free lock.
        let lease_id = grant.id;
        let mut locking = Box::pin(self.call("lock", Retry::IfConnectionBroke, || {
            let mut locks = self.shared.client.lock_client();
            let name = name.clone();
            async move {
                locks
                    .lock(name, Some(LockOptions::new().with_lease(lease_id)))
                    .await
            }
        }));
        let answer = loop {
            tokio::select! {
                answer = &mut locking => break answer?,
                () = sleep(wait) => {
                    // Still pending: slow, or queued behind a contender that came in between
                    // our look and our call. Only the second is contention. (A call that is
                    // queued cannot be left to wait: etcd notices the deletes it waits for only
                    // every 100 ms, and cancelling it once it holds the lock would delete the
                    // lock key.)
                    let (first, _) = self.first_contender(&contenders).await?;
                    if first.is_some_and(|kv| kv.key() != ours.as_bytes()) {
                        // Dropping the call cancels it, and etcd deletes a cancelled caller's
                        // key; revoking the lease deletes it in any case.
                        drop(locking);
                        grant.revoke().await;
                        return Ok(None);
                    }
                    wait = (wait * 2).min(LOCK_PROBE_MAX);
                }
            }
        };
        if answer.key() != ours.as_bytes() {
            return Err(StoreError::protocol(format!(
                "etcd's Lock service named the lock key {:?}, expected {ours:?}",
                String::from_utf8_lossy(answer.key())
            )));
        }
        // Write our owner token and metadata onto the lock key, if it is still on our lease (a
        // lease that ran out already took the key with it). The Lock service orders contenders
        // by create revision only, which a put does not change; the previous value of the key
        // tells us that create revision, our fencing token.
        let txn = Txn::new()
            .when([Compare::lease(ours.as_str(), CompareOp::Equal, grant.id)])
            .and_then([TxnOp::put(
                ours.as_str(),
                Holder::encode(owner, grant.ttl, metadata),
                Some(PutOptions::new().with_lease(grant.id).with_prev_key()),
            )]);
        // Recorded before the write, so the prefix watch cannot miss a change right after it.
        let registration = self.register(owner, grant.id, grant.ttl).await;
        let answer = self.txn(txn).await?;
        let created = answer.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Put(put) => put.prev_key().map(KeyValue::create_revision),
            _ => None,
        });
        match created {
            Some(created) if answer.succeeded() => {
                let mut lease = Lease::new(key, owner, token(created)?);
                lease.lease_id = Some(grant.keep());
                registration.keep();
                Ok(Some(Acquisition::Acquired(lease)))
            }
            _ => Err(StoreError::unavailable(format!(
                "the lock key {ours:?} was gone right after etcd's Lock service granted it"
            ))),
        }
    }
}

/// The key the Lock service gives the contender on lease `id`, as etcd's `concurrency.Mutex`
/// names it: `NAME/` and the lease id in lowercase hex.
pub(super) fn contender_key(contenders: &str, id: i64) -> String {
    format!("{contenders}{id:x}")
}

/// A key as a Lock-service name: `%` and `/` written `%25` and `%2F`, one character at a time
/// (so escaping keeps prefixes).
pub(super) fn escape_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len());
    for ch in key.chars() {
        match ch {
            '%' => name.push_str("%25"),
            '/' => name.push_str("%2F"),
            ch => name.push(ch),
        }
    }
    name
}

/// The key an escaped Lock-service name stands for. In an escaped name every `%` starts `%25`
/// or `%2F`, so replacing `%2F` first cannot touch an escaped `%`.
pub(super) fn unescape_name(name: &str) -> String {
    name.replace("%2F", "/").replace("%25", "%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_escape_and_unescape() {
        for key in ["jobs", "a/b", "a%b", "%2F", "%/", "/%25/", "ünï/cödé"] {
            let name = escape_name(key);
            assert!(!name.contains('/'), "{name}");
            assert_eq!(unescape_name(&name), key);
        }
        assert!(escape_name("a/b/c").starts_with(&escape_name("a/b")));
        assert!(!escape_name("a/b").starts_with(&format!("{}/", escape_name("a"))));
    }
}
