//! Replica acknowledgement ([`RedisBackend::with_replica_ack`]): an acquisition, and each
//! renewal, counts only once Redis's `WAIT` says enough replicas have it.
//!
//! Replication is asynchronous: a primary answers a write before any replica has it, and a
//! failover to a replica that missed the write forgets it. For a lock that means a second
//! holder, and a fencing token handed out again. `WAIT replicas timeout`, sent right after the
//! script on the same connection, blocks until that many replicas have acknowledged every
//! write the connection made (this one included), or the timeout passes, and answers how many
//! did. With it:
//!
//! - **acquire**: `EVALSHA acquire …` then `WAIT`, in one pipeline (one round trip plus the
//!   replicas' acknowledgement). Too few acknowledgements: the acquisition is undone (the
//!   release script, which compares the owner token, deletes the key and wakes the waiters)
//!   and the call fails with a retryable error naming how many replicas confirmed. The fence
//!   counter keeps the token it handed out, so the next one is greater whichever server
//!   serves it.
//! - **campaign** (elections): taking the leadership is an acquisition, confirmed and undone
//!   (resigned) the same way; a waiting candidate's place in the queue is not waited for.
//! - **renew**: `EVALSHA renew …` then `WAIT`. Too few: a retryable error, so the key actor
//!   counts a failed renewal (`RenewFailed`) and keeps the deadline of the last confirmed one;
//!   the replica's copy of the lease is never shorter than what the holder counts on.
//! - **release** and the rest are not waited for: a release a failover loses only keeps the
//!   key until its ttl.
//!
//! What remains: a replica that acknowledged can still be passed over at a failover (Sentinel
//! promotes the replica with the most data it has heard of, which is one that acknowledged
//! when `replicas` is the number of replicas, but a replica cut off from the sentinels may
//! lag), and a write the replicas acknowledged after `WAIT` gave up may survive the undo's
//! loss (the key is then held by nobody until its ttl). The README's Sentinel section states
//! the window.
//!
//! Redis runs one client's commands in order, so a `WAIT` holds back every command pipelined
//! behind it on its connection until the replicas answer: on the backend's one multiplexed
//! connection, acquisitions and renewals of all tasks would wait for the replicas one after
//! another. So the acknowledged calls go over [`LANES`] connections of their own, opened on
//! the first one and taken in turn: `WAIT`s on different connections wait together (the
//! primary asks the replicas for their offsets once for all the clients waiting), and the
//! other calls (release, inspect) are never held back. The script and its `WAIT` always go
//! in one pipeline on one connection: a `WAIT` on another connection would not cover the
//! script's write.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, RedisError, Script, ScriptInvocation, ServerErrorKind, Value};
use tokio::sync::OnceCell;

use super::connection::Conn;
use super::{millis, RedisBackend};
use crate::error::{Error, Result, StoreError};

/// How many replicas must acknowledge, and how long to wait for them.
#[derive(Debug, Clone)]
pub(super) struct ReplicaAck {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
    /// The connections the acknowledged calls take turns on; shared by the backend's clones.
    lanes: Arc<Lanes>,
}

/// How many connections the acknowledged calls take turns on.
pub(super) const LANES: usize = 8;

#[derive(Default)]
struct Lanes {
    next: AtomicUsize,
    conns: OnceCell<Vec<Conn>>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("open", &self.conns.initialized())
            .finish_non_exhaustive()
    }
}

impl ReplicaAck {
    /// Checks the settings before any I/O; the error names the bad value.
    pub(super) fn new(replicas: usize, timeout: Duration) -> Result<Self> {
        if replicas == 0 {
            return Err(Error::InvalidConfig(
                "with_replica_ack(0, …): 0 replicas would confirm nothing; ask for at least 1 \
                 (or leave replica acknowledgement off)"
                    .to_owned(),
            ));
        }
        let replicas = u32::try_from(replicas).map_err(|_| {
            Error::InvalidConfig(format!(
                "with_replica_ack({replicas}, …): no deployment has that many replicas"
            ))
        })?;
        // WAIT takes whole milliseconds, and reads 0 as "wait for ever".
        if timeout < Duration::from_millis(1) {
            return Err(Error::InvalidConfig(format!(
                "with_replica_ack(…, {timeout:?}): the timeout must be at least 1 ms (WAIT \
                 with 0 would wait for ever)"
            )));
        }
        Ok(ReplicaAck {
            replicas,
            timeout,
            lanes: Arc::default(),
        })
    }

    fn wait_cmd(&self) -> Cmd {
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.replicas).arg(millis(self.timeout));
        wait
    }
}

/// `EVALSHA` of a prepared script call, for a pipeline (the `redis` crate's
/// [`ScriptInvocation::invoke_async`] runs one command on its own).
fn evalsha(script: &Script, keys: &[String], args: &[Vec<u8>]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(key);
    }
    for arg in args {
        cmd.arg(arg.as_slice());
    }
    cmd
}

impl RedisBackend {
    /// Makes an acquisition, and each renewal, count only once Redis's `WAIT` confirms that
    /// `replicas` replicas have it, waiting at most `timeout` for them (see
    /// `redis/replica_ack.rs`). Otherwise an acquisition is undone (the key deleted if it is
    /// still ours) and fails with a retryable [`StoreError`], and a renewal fails (the key
    /// actor retries it until the lease's deadline, and reports `Lost` if none is confirmed
    /// by then).
    ///
    /// This is what keeps a failover from granting a held lock twice or handing out a
    /// fencing token again: Sentinel promotes a replica with the most data, which with
    /// `replicas` equal to the number of replicas has every confirmed lock. Replication is
    /// still asynchronous: the README's Sentinel section states the window that remains.
    /// Keep `timeout` well under the ttl (a renewal must be confirmed within a third of it).
    /// The acknowledged calls take turns on 8 connections of their own, opened on the first
    /// one, so that one call's `WAIT` does not hold back the others.
    ///
    /// `replicas` 0 (which would confirm nothing) and a `timeout` under a millisecond (`WAIT`
    /// takes whole milliseconds, and waits for ever on 0) are rejected with
    /// [`Error::InvalidConfig`] naming the value, before any I/O; so is a backend on Redis
    /// Cluster, where it is not available.
    pub fn with_replica_ack(mut self, replicas: usize, timeout: Duration) -> Result<Self> {
        let ack = ReplicaAck::new(replicas, timeout)?;
        if self.conn.is_cluster() {
            return Err(Error::InvalidConfig(format!(
                "with_replica_ack({replicas}, {timeout:?}) is not available on Redis Cluster \
                 ({}): WAIT answers for one node, and the cluster connection does not send it \
                 beside the script",
                self.notices.addr
            )));
        }
        self.replica_ack = Some(ack);
        Ok(self)
    }

    /// Runs `script` (keys, args) then `WAIT` in one pipeline; answers the script's reply and
    /// how many replicas acknowledged. A server that forgot the script (`NOSCRIPT`, nothing
    /// ran) gets it loaded and the pipeline sent again.
    pub(super) async fn with_ack(
        &self,
        ack: &ReplicaAck,
        script: &Script,
        keys: &[String],
        args: &[Vec<u8>],
        op: &str,
    ) -> std::result::Result<(Value, i64), StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha(script, keys, args))
            .add_command(ack.wait_cmd());
        let lanes = ack
            .lanes
            .conns
            .get_or_try_init(|| async {
                let mut lanes = Vec::with_capacity(LANES);
                for _ in 0..LANES {
                    lanes.push(self.conn.another().await?);
                }
                Ok::<_, RedisError>(lanes)
            })
            .await
            .map_err(|error| self.failed(op, error))?;
        let lane = ack.lanes.next.fetch_add(1, Ordering::Relaxed) % lanes.len();
        let mut conn = lanes[lane].clone();
        let sent = pipe.query_async::<(Value, i64)>(&mut conn).await;
        let sent = match sent {
            Err(error) if error.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                let loaded: std::result::Result<String, RedisError> =
                    script.prepare_invoke().load_async(&mut conn).await;
                match loaded {
                    Ok(_) => pipe.query_async(&mut conn).await,
                    Err(error) => Err(error),
                }
            }
            other => other,
        };
        sent.map_err(|error| self.failed(op, error))
    }

    /// Runs `call` of `script`, followed in the same pipeline by `WAIT` when replica
    /// acknowledgement is on: the script's reply and, if fewer replicas than asked confirmed,
    /// the error to answer instead of whatever the script wrote (a refusal wrote nothing: the
    /// caller, who reads the reply, decides): every acquisition (lock, campaign, permits,
    /// read-write hold) and every acknowledged renewal goes through here.
    pub(super) async fn run_acked(
        &self,
        script: &Script,
        call: &Call,
        op: &str,
    ) -> std::result::Result<(Value, Option<StoreError>), StoreError> {
        match &self.replica_ack {
            None => {
                let reply = call
                    .invocation(script)
                    .invoke_async(&mut self.conn.clone())
                    .await
                    .map_err(|error| self.failed(op, error))?;
                Ok((reply, None))
            }
            Some(ack) => {
                let (reply, acknowledged) = self
                    .with_ack(ack, script, &call.keys, &call.args, op)
                    .await?;
                let short = (acknowledged < i64::from(ack.replicas))
                    .then(|| self.unconfirmed(ack, op, acknowledged));
                Ok((reply, short))
            }
        }
    }

    /// `error` (an acquisition too few replicas confirmed) once `undo`, which gives the lease
    /// back, has run; if even that failed, the lease stays until its ttl, and the error says so.
    pub(super) async fn undone(
        &self,
        error: StoreError,
        undo: impl std::future::Future<Output = std::result::Result<bool, StoreError>>,
    ) -> StoreError {
        match undo.await {
            Ok(_) => error,
            Err(undo) => StoreError::unavailable(format!(
                "{error}; undoing it failed too ({undo}), so the lease stays until its ttl"
            )),
        }
    }

    /// The error of a write too few replicas confirmed.
    pub(super) fn unconfirmed(
        &self,
        ack: &ReplicaAck,
        what: &str,
        acknowledged: i64,
    ) -> StoreError {
        StoreError::unavailable(format!(
            "redis {what} at {} was confirmed by {acknowledged} of the {} replicas asked for \
             within {:?} (WAIT)",
            self.notices.addr, ack.replicas, ack.timeout
        ))
    }
}

/// The keys and arguments of a script call, kept to send them as `EVALSHA` in a pipeline.
pub(super) struct Call {
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<Vec<u8>>,
}

impl Call {
    /// The same call as a [`ScriptInvocation`] of `script`.
    pub(super) fn invocation<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut call = script.prepare_invoke();
        for key in &self.keys {
            call.key(key);
        }
        for arg in &self.args {
            call.arg(arg.as_slice());
        }
        call
    }
}
