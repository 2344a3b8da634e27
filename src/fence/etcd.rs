//! Fenced writes to etcd: the caller's operations in one transaction guarded by a fence key.
//!
//! # The fence key
//! One key per resource, named by the caller, holds the newest token that wrote the resource
//! as 20 zero-padded decimal digits (`u64::MAX` has 20). etcd compares values bytewise, and
//! fixed-width digits compare bytewise exactly as the numbers do, over the whole u64 range.
//!
//! # The transaction
//! ```text
//! if   value(fence) > token          -- a newer holder has written
//! then get(fence)                    -- report it; nothing is written
//! else put(fence, token), <the caller's operations>
//! ```
//! The condition is the negation ("newer than the token", not "at most the token") because
//! etcd fails every value comparison on a key that does not exist: so a resource no fenced
//! write has touched yet takes the `else` branch and is written, in the same single round
//! trip, with no separate creation step. The caller's operations are etcd-client's own
//! [`TxnOp`]s, or a whole [`Txn`] of the caller's, with its own comparisons, nested in the
//! `else` branch (nested transactions need etcd 3.3 or later).

use etcd_client::{
    Compare, CompareOp, Error as EtcdError, KvClient, Txn, TxnOp, TxnOpResponse, TxnResponse,
};

use super::{FenceError, StaleToken};

/// An etcd resource protected by fencing tokens: writes to it run in a transaction that
/// refuses a token older than the newest one recorded in its fence key.
///
/// ```no_run
/// # async fn run(guard: leasehold::LockGuard) -> Result<(), Box<dyn std::error::Error>> {
/// use etcd_client::{Client, TxnOp};
/// use leasehold::EtcdFence;
///
/// let mut kv = Client::connect(["127.0.0.1:2379"], None).await?.kv_client();
/// let config = EtcdFence::new("fences/config/app");
/// config
///     .run(
///         &mut kv,
///         guard.fencing_token(),
///         [TxnOp::put("config/app", "v2", None), TxnOp::delete("config/app.draft", None)],
///     )
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdFence {
    fence_key: Vec<u8>,
}

impl EtcdFence {
    /// The fence whose newest token lives in the etcd key `fence_key`. Use one fence key per
    /// resource, and keep it as long as the resource (deleting it lets any token write again).
    pub fn new(fence_key: impl Into<Vec<u8>>) -> Self {
        EtcdFence {
            fence_key: fence_key.into(),
        }
    }

    /// The key holding the newest token.
    pub fn fence_key(&self) -> &[u8] {
        &self.fence_key
    }

    /// Runs `ops` in one transaction if `token` is not older than the newest token recorded,
    /// and records `token`; returns the responses to `ops`, in order. An older token gets
    /// [`FenceError::Stale`] and nothing is written.
    pub async fn run(
        &self,
        kv: &mut KvClient,
        token: u64,
        ops: impl Into<Vec<TxnOp>>,
    ) -> Result<Vec<TxnOpResponse>, FenceError<EtcdError>> {
        let response = kv
            .txn(self.txn(token, ops))
            .await
            .map_err(FenceError::Store)?;
        self.outcome(token, &response)
    }

    /// Runs the caller's own transaction `txn` (its comparisons, its `then` and `else`
    /// branches) nested in the fence's, if `token` is not older than the newest token
    /// recorded; returns `txn`'s own response (whose `succeeded()` is its comparisons'
    /// verdict). The token is recorded whichever branch of `txn` ran. An older token gets
    /// [`FenceError::Stale`] and `txn` does not run.
    pub async fn run_txn(
        &self,
        kv: &mut KvClient,
        token: u64,
        txn: Txn,
    ) -> Result<TxnResponse, FenceError<EtcdError>> {
        let responses = self.run(kv, token, [TxnOp::txn(txn)]).await?;
        match responses.into_iter().next() {
            Some(TxnOpResponse::Txn(inner)) => Ok(inner),
            _ => Err(FenceError::Store(EtcdError::InvalidArgs(
                "the fenced transaction did not answer with the nested transaction's response"
                    .into(),
            ))),
        }
    }

    /// The guarded transaction [`run`](Self::run) sends, for a caller that sends it through
    /// a client of its own; [`outcome`](Self::outcome) reads the response.
    pub fn txn(&self, token: u64, ops: impl Into<Vec<TxnOp>>) -> Txn {
        let mut write = vec![TxnOp::put(self.fence_key.clone(), digits(token), None)];
        write.extend(ops.into());
        Txn::new()
            .when([Compare::value(
                self.fence_key.clone(),
                CompareOp::Greater,
                digits(token),
            )])
            .and_then([TxnOp::get(self.fence_key.clone(), None)])
            .or_else(write)
    }

    /// What the response to [`txn`](Self::txn)`(token, …)` means: the responses to the
    /// caller's operations, or the refusal.
    pub fn outcome(
        &self,
        token: u64,
        response: &TxnResponse,
    ) -> Result<Vec<TxnOpResponse>, FenceError<EtcdError>> {
        let mut responses = response.op_responses();
        if !response.succeeded() {
            // The `else` branch ran: our put first, then the caller's operations.
            responses.remove(0);
            return Ok(responses);
        }
        // The comparison held: a newer token is recorded, and the `then` branch read it.
        let newest = match responses.first() {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().and_then(|kv| parse(kv.value())),
            _ => None,
        };
        match newest {
            Some(newest) => Err(FenceError::Stale(StaleToken::new(token, newest))),
            None => Err(FenceError::Store(EtcdError::InvalidArgs(format!(
                "the fence key {:?} does not hold a token",
                String::from_utf8_lossy(&self.fence_key)
            )))),
        }
    }

    /// The newest token recorded, or `None` if no fenced write has happened.
    pub async fn newest(&self, kv: &mut KvClient) -> Result<Option<u64>, EtcdError> {
        let response = kv.get(self.fence_key.clone(), None).await?;
        Ok(response.kvs().first().and_then(|kv| parse(kv.value())))
    }
}

/// `token` as 20 zero-padded decimal digits: bytewise order is numeric order.
fn digits(token: u64) -> String {
    format!("{token:020}")
}

fn parse(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::digits;

    #[test]
    fn digits_order_as_numbers() {
        let tokens = [0, 9, 10, 1 << 53, (1 << 53) + 1, u64::MAX - 1, u64::MAX];
        for pair in tokens.windows(2) {
            assert!(digits(pair[0]).as_bytes() < digits(pair[1]).as_bytes());
        }
        assert_eq!(digits(u64::MAX).len(), 20);
    }
}
