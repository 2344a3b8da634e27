//! The raw etcd-client leasehold is compared with: the same calls leasehold makes for one
//! lock+release cycle in each mode, by hand, with nothing around them. Shared by
//! `benches/etcd.rs` and `tools/loadtest`.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, LockOptions as EtcdLockOptions,
    PutOptions, SortOrder, SortTarget, Txn, TxnOp,
};

/// The ttl every raw cycle asks for (the cycle releases long before it matters).
const TTL: Duration = Duration::from_secs(30);

/// The raw etcd-client, one shared `Client` (one HTTP/2 connection), as leasehold's backend has.
#[derive(Clone)]
pub struct RawEtcd {
    client: Client,
}

impl RawEtcd {
    /// Connects to the etcd member at `endpoint` (`127.0.0.1:PORT`).
    pub async fn connect(endpoint: &str) -> Self {
        let client = Client::connect([endpoint], None)
            .await
            .expect("raw etcd client");
        RawEtcd { client }
    }

    /// leasehold's `txn` mode cycle, by hand: grant, put-if-absent, compare-and-delete, revoke.
    pub async fn txn_cycle(&self, key: &str) {
        let (key, owner, lease) = self.take(key).await;
        let released = self
            .client
            .kv_client()
            .txn(compare_and_delete(&key, &owner))
            .await;
        assert!(released.expect("release txn").succeeded());
        self.revoke(lease).await;
    }

    /// The taking half of leasehold's `txn` mode cycle, by hand: grant, put-if-absent. The
    /// lease id, for [`revoke`](Self::revoke).
    pub async fn txn_take(&self, key: &str) -> i64 {
        self.take(key).await.2
    }

    /// Grant, put-if-absent: the key as written, its owner token and the lease.
    async fn take(&self, key: &str) -> (String, String, i64) {
        let (mut kv, mut leases) = (self.client.kv_client(), self.client.lease_client());
        let key = format!("leasehold/{key}");
        let (owner, value) = owner_value();
        let lease = leases.grant(ttl_seconds(), None).await.expect("grant").id();
        let acquire = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let acquired = kv.txn(acquire).await.expect("acquire txn").succeeded();
        assert!(acquired, "a key of its own is free");
        (key, owner, lease)
    }

    /// Ends a lease [`txn_take`](Self::txn_take) granted, and its key with it.
    pub async fn revoke(&self, lease: i64) {
        let mut leases = self.client.lease_client();
        leases.revoke(lease).await.expect("revoke");
    }

    /// leasehold's `lock` mode cycle, by hand: look at the contenders, grant, `Lock`, write the
    /// holder's value, compare-and-delete, revoke.
    pub async fn lock_cycle(&self, key: &str) {
        let (mut kv, mut leases, mut locks) = (
            self.client.kv_client(),
            self.client.lease_client(),
            self.client.lock_client(),
        );
        // The Lock service's name for the key, `/` escaped as leasehold writes it (these keys
        // have no `%`, the other character it escapes).
        let name = format!("leasehold/{}", key.replace('/', "%2F"));
        let contenders = format!("{name}/");
        let first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let held = kv.get(contenders.as_str(), Some(first)).await;
        assert!(
            held.expect("look").kvs().is_empty(),
            "a key of its own is free"
        );
        let (owner, value) = owner_value();
        let lease = leases.grant(ttl_seconds(), None).await.expect("grant").id();
        let locked = locks
            .lock(name, Some(EtcdLockOptions::new().with_lease(lease)))
            .await
            .expect("lock");
        let key = String::from_utf8(locked.key().to_vec()).expect("utf-8 lock key");
        let write = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
            .and_then([TxnOp::put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease).with_prev_key()),
            )]);
        assert!(kv.txn(write).await.expect("write txn").succeeded());
        let released = kv.txn(compare_and_delete(&key, &owner)).await;
        assert!(released.expect("release txn").succeeded());
        leases.revoke(lease).await.expect("revoke");
    }
}

fn ttl_seconds() -> i64 {
    TTL.as_secs() as i64
}

/// A fresh owner token, and the value leasehold stores with it (owner, then the lease's ttl).
fn owner_value() -> (String, String) {
    let owner = format!("{:032x}", rand::random::<u128>());
    let value = format!("{owner}\n{}", ttl_seconds());
    (owner, value)
}

/// The compare-and-delete leasehold releases with: the value starts with our owner token.
fn compare_and_delete(key: &str, owner: &str) -> Txn {
    Txn::new()
        .when([
            Compare::value(key, CompareOp::Greater, format!("{owner}\n")),
            Compare::value(key, CompareOp::Less, format!("{owner}\x0b")),
        ])
        .and_then([TxnOp::delete(
            key,
            Some(DeleteOptions::new().with_prev_key()),
        )])
}
