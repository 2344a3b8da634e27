//! Read-write locks on etcd: each read share, the write hold and each waiting writer's intent
//! of a read-write lock `NAME` is a key of its own on an etcd lease of its own, under the
//! lock's directory `P + NAME + "\x1frw/"` (as etcd's own `recipes/rwmutex.go` keeps its
//! readers and writers under one prefix, on leases):
//!
//! | key | lease |
//! |-----|-------|
//! | `P NAME \x1f rw/read/<owner>`    | granted for the ttl, kept alive by the reader's key actor |
//! | `P NAME \x1f rw/write/<owner>`   | granted for the ttl, kept alive by the writer's key actor |
//! | `P NAME \x1f rw/waiting/<owner>` | granted for the waiting writer's ttl, kept alive by each of its attempts (so a writer that dies blocks readers until that ttl) |
//! | `P NAME \x1f rw/fair/<owner>`    | a fair waiter's place (its value: `read` or `write`), granted for the waiter's ttl, kept alive by each of its attempts; the queue's order is the places' create revisions |
//!
//! A fair waiter ([`LockOptions::with_fair`](crate::LockOptions::with_fair)) reads the same
//! directory: a fair reader is kept out by a hold, an (unfair) writer's intent, or a fair
//! writer's place created before its own; a fair writer by any share or hold, or any place
//! created before its own. A fair writer's place is its intent: an unfair reader is kept out
//! by it too. An unfair writer does not look at the places. Admission deletes the place in
//! the transaction that grants.
//!
//! The separator is a control character, which no key or name has: no lock key, no
//! semaphore's key is ever in this directory.
//!
//! | operation | etcd calls |
//! |-----------|------------|
//! | acquire   | `Range(dir)` at revision R: the shares, the hold, the intents. A reader finds a hold or an intent, a writer a share or a hold → `Held`, with R (a waiting writer first puts its intent on a lease of its own, or keeps its lease alive). Free → `LeaseGrant`, then ONE `Txn`: if no key under `dir` was written after R (`mod_revision(dir) < R + 1`, over the range) then `Put(key, lease)` (and, for a writer, `DeleteRange` of its intent); the fencing token is the put's revision, so a writer's is greater than every earlier token. A write in between (a writer's intent landing, a rival's grant) fails the compare: read and try again. |
//! | renew, release | as a semaphore's permit (`semaphore.rs`): by the key's create revision, the token |
//! | withdraw  | `DeleteRange` of the intent (a fair waiter: of its place), then `LeaseRevoke` of its lease |
//! | wait      | one `Watch` of `dir` for deletes, from R + 1: a release, a withdrawn intent, and a lease that ran out all delete a key |

use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};

use super::values::{token, txn_revision};
use super::EtcdBackend;
use crate::backend::{Acquisition, Contention, Lease, OwnerToken, ReleaseNotices, RwMode};
use crate::error::StoreError;

/// As for semaphores: how often one acquisition reads and tries to write when other writes
/// keep coming between the two, and how long a waiter that lost every race pauses.
const TRIES: usize = 16;
const RACED_PAUSE: Duration = Duration::from_millis(5);

const WAITING: &str = "waiting";
/// The fair waiters' places (see the table above).
const FAIR: &str = "fair";

impl EtcdBackend {
    /// The read-write lock's directory: every share, hold and intent of it is a key under this.
    fn rw_dir(&self, name: &str) -> String {
        format!("{}{name}\u{1f}rw/", self.prefix)
    }

    fn rw_key(&self, name: &str, side: &str, owner: OwnerToken) -> String {
        format!("{}{side}/{owner}", self.rw_dir(name))
    }

    pub(super) async fn take_rw(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        mode: RwMode,
        intent: bool,
        fair: bool,
    ) -> Result<Acquisition, StoreError> {
        let dir = self.rw_dir(name);
        let key = self.rw_key(name, mode.as_str(), owner);
        // A waiting writer's intent; a fair waiter's place (a fair writer's is its intent).
        let intent_key = self.rw_key(name, if fair { FAIR } else { WAITING }, owner);
        let fair_dir = format!("{dir}{FAIR}/");
        let read_dir = format!("{dir}{}/", RwMode::Read.as_str());
        let write_dir = format!("{dir}{}/", RwMode::Write.as_str());
        let waiting_dir = format!("{dir}{WAITING}/");
        let mut grant = None;
        let mut seen = 0;
        let mut blocked = false;
        for _ in 0..TRIES {
            let read = self
                .get(&dir, Some(GetOptions::new().with_prefix()))
                .await?;
            seen = read.header().map_or(0, |h| h.revision());
            let under = |side: &str| {
                read.kvs()
                    .iter()
                    .any(|kv| kv.key().starts_with(side.as_bytes()))
            };
            let own = read
                .kvs()
                .iter()
                .find(|kv| kv.key() == intent_key.as_bytes());
            let mine = own.map(|kv| kv.lease());
            // The fair places ahead of this caller's (all of them for an unfair caller or a
            // fair one without a place yet: it would go to the back), and whether each is a
            // writer's.
            let created = own.filter(|_| fair).map(|kv| kv.create_revision());
            let ahead: Vec<bool> = read
                .kvs()
                .iter()
                .filter(|kv| kv.key().starts_with(fair_dir.as_bytes()))
                .filter(|kv| created.is_none_or(|mine| kv.create_revision() < mine))
                .map(|kv| kv.value() == RwMode::Write.as_str().as_bytes())
                .collect();
            blocked = match (mode, fair) {
                // A fair writer's place keeps readers out as an intent does (a fair
                // reader's, only if it is ahead of its own).
                (RwMode::Read, _) => {
                    under(&write_dir) || under(&waiting_dir) || ahead.iter().any(|&w| w)
                }
                (RwMode::Write, false) => under(&read_dir) || under(&write_dir),
                (RwMode::Write, true) => under(&read_dir) || under(&write_dir) || !ahead.is_empty(),
            };
            if blocked {
                if fair {
                    self.keep_intent(&intent_key, mode.as_str(), mine, ttl)
                        .await?;
                } else if mode == RwMode::Write && intent {
                    self.keep_intent(&intent_key, "", mine, ttl).await?;
                }
                break;
            }
            // The etcd lease of this writer's intent, as read: revoked once the writer holds.
            let intent_lease = mine.filter(|&id| id != 0);
            let id = match &grant {
                Some(grant) => grant,
                None => grant.insert(self.grant(ttl).await?),
            }
            .id;
            let mut ops = vec![TxnOp::put(
                key.as_str(),
                "",
                Some(PutOptions::new().with_lease(id)),
            )];
            if mode == RwMode::Write || fair {
                // The writer's intent (the fair waiter's place) goes with the grant; its lease
                // is revoked after.
                ops.push(TxnOp::delete(intent_key.as_str(), None));
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(dir.as_str(), CompareOp::Less, seen + 1).with_prefix(),
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                ])
                .and_then(ops);
            let answer = self.txn(txn).await?;
            if answer.succeeded() {
                let revision = txn_revision(&answer)?;
                let mut lease = Lease::new(name, owner, token(revision)?);
                lease.rw = Some(mode);
                lease.lease_id = grant.map(|grant| grant.keep());
                // The intent's key went with the grant; its lease would otherwise linger,
                // empty, until its ttl. A failure costs nothing but that.
                if let Some(id) = intent_lease {
                    let _ = self.revoke(id).await;
                }
                return Ok(Acquisition::Acquired(lease));
            }
        }
        if let Some(grant) = grant {
            grant.revoke().await;
        }
        // Blocked: the watch of deletes from `seen` wakes the waiter (a waiting writer also
        // comes back within half its intent's ttl, to keep the intent alive). Raced: look
        // again soon.
        let remaining_ttl = match (blocked, fair || mode == RwMode::Write && intent) {
            (false, _) => Some(RACED_PAUSE),
            (true, true) => Some(ttl / 2),
            (true, false) => None,
        };
        Ok(Acquisition::Held(Contention {
            remaining_ttl,
            revision: Some(seen),
        }))
    }

    /// Puts a waiting writer's intent (a fair waiter's place, with `value` its mode) on a
    /// lease of its own for `ttl`, or keeps the lease of the one it put before alive. The put
    /// changes the directory's revision, so a transaction that read before it fails its
    /// compare and reads again.
    async fn keep_intent(
        &self,
        intent_key: &str,
        value: &str,
        on_lease: Option<i64>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if let Some(id) = on_lease.filter(|&id| id != 0) {
            if self.keep_alive(id).await?.ttl > 0 {
                return Ok(());
            }
        }
        let grant = self.grant(ttl).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(intent_key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                intent_key,
                value,
                Some(PutOptions::new().with_lease(grant.id)),
            )]);
        if self.txn(txn).await?.succeeded() {
            grant.keep();
        } else {
            grant.revoke().await; // put meanwhile (by an attempt of ours that timed out)
        }
        Ok(())
    }

    pub(super) async fn renew_rw(
        &self,
        lease: &Lease,
        mode: RwMode,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = self.rw_key(&lease.key, mode.as_str(), lease.owner);
        self.renew_own_key(&key, lease, ttl).await
    }

    pub(super) async fn release_rw(&self, lease: &Lease, mode: RwMode) -> Result<bool, StoreError> {
        let key = self.rw_key(&lease.key, mode.as_str(), lease.owner);
        self.release_own_key(&key, lease).await
    }

    /// Takes a waiting writer's intent (`fair` false) or a fair waiter's place off the
    /// read-write lock `name`.
    pub(super) async fn withdraw_rw_intent(
        &self,
        name: &str,
        owner: OwnerToken,
        fair: bool,
    ) -> Result<(), StoreError> {
        let key = self.rw_key(name, if fair { FAIR } else { WAITING }, owner);
        let txn = Txn::new().and_then([TxnOp::delete(
            key.as_str(),
            Some(DeleteOptions::new().with_prev_key()),
        )]);
        let answer = self.txn(txn).await?;
        let on_lease = answer.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Delete(delete) => {
                delete.prev_kvs().first().map(|kv| kv.lease())
            }
            _ => None,
        });
        // The delete woke the waiters' watches; the revoke ends the lease now rather than at
        // its ttl.
        if let Some(id) = on_lease.filter(|&id| id != 0) {
            let _ = self.revoke(id).await;
        }
        Ok(())
    }

    pub(super) async fn subscribe_to_rw(
        &self,
        name: &str,
        seen: &Contention,
    ) -> Result<ReleaseNotices, StoreError> {
        self.watch_deletes(self.rw_dir(name), seen).await
    }
}
