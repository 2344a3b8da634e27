//! Running one etcd call: which failures in transit are tried again, and how etcd-client's
//! errors are sorted into retryable and not.

use std::future::Future;

use etcd_client::{GetOptions, GetResponse, Txn, TxnResponse};

use super::EtcdBackend;
use crate::error::{StoreCause, StoreError};

impl EtcdBackend {
    /// Runs one etcd call, and runs it again when it failed in transit, as `retry` allows.
    ///
    /// etcd-client spreads calls over the endpoints, and keeps sending some to an endpoint
    /// that is down: those fail at once with a connect error, before anything was sent, and
    /// another try (which the balancer sends elsewhere) is safe even for a write. Calls caught
    /// on a connection that broke may or may not have been applied, so only the ones that do no
    /// harm twice are tried again then. Answers etcd itself gave (no leader, timed out, …) are
    /// never retried here: the key actors decide what to do about those.
    pub(super) async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        mut call: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut left = self.shared.tries;
        loop {
            match call().await {
                Ok(answer) => return Ok(answer),
                Err(error) if left > 1 && retry.allows(&error) => left -= 1,
                Err(error) => return Err(store_error(op, error)),
            }
        }
    }

    pub(super) async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.call("txn", Retry::IfNeverSent, || {
            let (mut kv, txn) = (self.shared.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    pub(super) async fn get(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, StoreError> {
        self.call("range", Retry::IfConnectionBroke, || {
            let (mut kv, options) = (self.shared.client.kv_client(), options.clone());
            let key = key.to_owned();
            async move { kv.get(key, options).await }
        })
        .await
    }
}

/// When a call that failed in transit may be tried again (see `EtcdBackend::call`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Retry {
    /// Only if it never reached a server: a write whose effect a second try could trip on.
    IfNeverSent,
    /// Also if the connection broke under it: a read, a keep-alive, a revoke, a grant (a
    /// lease granted twice runs out by itself), a Lock call (the same lease is the same
    /// acquisition) or a new watch.
    IfConnectionBroke,
}

impl Retry {
    pub(super) fn allows(self, error: &etcd_client::Error) -> bool {
        match self {
            Retry::IfNeverSent => never_sent(error),
            Retry::IfConnectionBroke => never_sent(error) || broke_in_transit(error),
        }
    }
}

/// How often one call is tried when it fails in transit: with one endpoint, once; with
/// several, enough that the balancer sends one of them to a live endpoint.
pub(super) fn tries_per_call(endpoints: usize) -> usize {
    if endpoints > 1 {
        4 * endpoints
    } else {
        1
    }
}

/// True for a call that failed before anything was sent: tonic reports a failed connection as
/// `Unavailable` with its `ConnectError` in the error's source chain.
pub(super) fn never_sent(error: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return false;
    };
    let code: i32 = status.code().into();
    // 14: unavailable.
    if code != 14 {
        return false;
    }
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        // tonic's `ConnectError` is not nameable without depending on tonic itself.
        if format!("{error:?}").starts_with("ConnectError(") {
            return true;
        }
        source = error.source();
    }
    false
}

/// True for a call whose connection failed under it (reset, closed, cancelled by the
/// transport): tonic gives the status it makes from a client-side failure the failure as its
/// source, while a status etcd sent has none.
pub(super) fn broke_in_transit(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            let code: i32 = status.code().into();
            // 1: cancelled, 14: unavailable.
            matches!(code, 1 | 14) && std::error::Error::source(status).is_some()
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// Sorts etcd-client's errors into retryable (the cluster could not be reached, had no
/// leader, timed out) and not (bad request, permission, protocol), keeping the error whole.
pub(super) fn store_error(op: &'static str, error: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let context = format!("etcd {op}");
    let retryable = match &error {
        E::GRpcStatus(status) => {
            let code: i32 = status.code().into();
            // gRPC codes: 3 invalid argument, 5 not found, 6 already exists, 7 permission
            // denied, 9 failed precondition, 11 out of range, 12 unimplemented,
            // 16 unauthenticated. The rest (unavailable, deadline exceeded, cancelled,
            // aborted, resource exhausted, internal, unknown) may pass.
            !matches!(code, 3 | 5 | 6 | 7 | 9 | 11 | 12 | 16)
        }
        E::TransportError(_)
        | E::IoError(_)
        | E::WatchError(_)
        | E::LeaseKeepAliveError(_)
        | E::EndpointError(_) => true,
        _ => false,
    };
    if retryable {
        StoreError::unavailable_because(context, error)
    } else {
        StoreError::protocol_because(context, error)
    }
}

/// Whether etcd answered "requested lease not found" (gRPC not found): the lease expired or
/// was revoked already.
pub(super) fn is_lease_not_found(error: &StoreError) -> bool {
    match error.cause() {
        Some(StoreCause::Etcd(error)) => matches!(
            &**error,
            etcd_client::Error::GRpcStatus(status)
                // gRPC code 5: not found.
                if i32::from(status.code()) == 5 && status.message().contains("lease not found")
        ),
        _ => false,
    }
}

/// Whether etcd answered "lease already exists" (gRPC failed precondition) to a grant of a
/// lease id chosen by the caller.
pub(super) fn is_lease_exists(error: &StoreError) -> bool {
    match error.cause() {
        Some(StoreCause::Etcd(error)) => matches!(
            &**error,
            etcd_client::Error::GRpcStatus(status)
                // gRPC code 9: failed precondition.
                if i32::from(status.code()) == 9 && status.message().contains("lease already exists")
        ),
        _ => false,
    }
}

/// An etcd-client error in a line: for a gRPC status, its message, code and the failure at
/// the bottom of its cause (`tcp connect error (Unavailable): Connection refused`).
pub(crate) fn describe(error: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return error.to_string();
    };
    let mut text = format!("{} ({:?})", status.message(), status.code());
    let mut cause = std::error::Error::source(status);
    let mut root = None;
    while let Some(error) = cause {
        root = Some(error);
        cause = error.source();
    }
    if let Some(root) = root {
        text.push_str(&format!(": {root}"));
    }
    text
}
