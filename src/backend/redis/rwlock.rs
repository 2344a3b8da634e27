//! Read-write locks on Redis: the shares, the hold and the waiting writers' intents of a
//! read-write lock `K` live beside its lock's keys, in the same hash slot, under names of their
//! own (a read-write lock, a semaphore and a lock of one name are apart):
//!
//! | name               | Redis type            | holds                                        |
//! |--------------------|-----------------------|----------------------------------------------|
//! | `P{K}:rw-readers`  | sorted set            | a reader's owner token per share, scored by when it runs out (server ms) |
//! | `P{K}:rw-writer`   | string, with the ttl  | the writer's owner token                     |
//! | `P{K}:rw-waiting`  | sorted set            | a waiting writer's owner token per intent, scored by when it runs out |
//! | `P{K}:rw-fence`    | string, never expires | the last fencing token handed out            |
//! | `P{K}:rw-released` | pub/sub channel       | a notice per release and per withdrawn intent (or fair place that may let someone in) |
//! | `P{K}:rw-queue`    | sorted set            | fair waiters' owner tokens (readers and writers), scored by arrival |
//! | `P{K}:rw-places`   | hash                  | fair waiter's owner token → when its place expires (server ms) |
//! | `P{K}:rw-arrivals` | string, never expires | the arrival counter (the queue's scores) |
//!
//! A fair acquisition ([`LockOptions::with_fair`](crate::LockOptions::with_fair)) runs the
//! same script with the three queue keys: a fair writer's owner is also put in `rw-waiting`
//! (with its place's expiry), so its place keeps new unfair readers out as an unfair writer's
//! intent does, and the unfair reader's path is unchanged. A fair reader counts an intent
//! against it only if its writer has no place (an unfair writer) or one ahead of its own; a
//! fair writer goes in only first in the queue. `withdraw_rw_waiter.lua` takes a waiter that
//! gave up out of the queue (and its intent). An unfair writer does not look at the queue.
//!
//! Shares and intents are members, not keys, so Redis does not expire them: every acquisition
//! drops the members whose score has passed (server clock) before it looks, which is what
//! frees a crashed reader's share at its ttl and lets readers past a dead waiting writer at its
//! intent's ttl. Each sorted set's key carries the expiry of its longest member, so a lock
//! nobody uses any more leaves only its fence counter. The scripts: `acquire_rw.lua`
//! (admission, intent, token), `renew_rw.lua`, `release_rw.lua` (with the notice),
//! `withdraw_writer.lua` and `withdraw_rw_waiter.lua` (with the notice). With
//! [`RedisBackend::with_restart_quarantine`], an acquisition waits out the quarantine after a
//! data loss as a lock's does.

use std::time::Duration;

use futures::StreamExt;
use redis::Value;

use super::lua::Lua;
use super::replica_ack::Call;
use super::{answer, millis, remaining, renewed, unexpected, Answer, RedisBackend};
use crate::backend::{Acquisition, Contention, Lease, OwnerToken, ReleaseNotices, RwMode};
use crate::error::StoreError;

static ACQUIRE: Lua = Lua::new(include_str!("acquire_rw.lua"));
static RENEW: Lua = Lua::new(include_str!("renew_rw.lua"));
static RELEASE: Lua = Lua::new(include_str!("release_rw.lua"));
static WITHDRAW: Lua = Lua::new(include_str!("withdraw_writer.lua"));
static WITHDRAW_WAITER: Lua = Lua::new(include_str!("withdraw_rw_waiter.lua"));

impl RedisBackend {
    /// The read shares' set and the write hold's key of the read-write lock `name`.
    fn rw_keys(&self, name: &str) -> (String, String) {
        let lock = self.lock_key(name);
        (format!("{lock}:rw-readers"), format!("{lock}:rw-writer"))
    }

    /// The fair waiters' queue of the read-write lock `name`: the queue, its places' leases
    /// and the arrival counter.
    fn rw_queue_keys(&self, name: &str) -> [String; 3] {
        let lock = self.lock_key(name);
        ["rw-queue", "rw-places", "rw-arrivals"].map(|what| format!("{lock}:{what}"))
    }

    fn rw_channel(&self, name: &str) -> String {
        format!("{}:rw-released", self.lock_key(name))
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
        let (readers, writer) = self.rw_keys(name);
        let lock = self.lock_key(name);
        let mut call = Call {
            keys: vec![
                readers,
                writer,
                format!("{lock}:rw-waiting"),
                format!("{lock}:rw-fence"),
            ],
            args: vec![
                owner.to_string().into_bytes(),
                millis(ttl).to_string().into_bytes(),
                mode.as_str().as_bytes().to_vec(),
                if intent { b"1".to_vec() } else { b"0".to_vec() },
                u64::try_from(self.quarantine.as_millis())
                    .unwrap_or(u64::MAX)
                    .to_string()
                    .into_bytes(),
            ],
        };
        if fair {
            call.keys.extend(self.rw_queue_keys(name));
            call.args.push(b"fair".to_vec());
        }
        if !self.quarantine.is_zero() {
            call.keys.push(format!("{}epoch", self.prefix));
        }
        let (reply, unconfirmed) = self
            .run_acked(self.script(&ACQUIRE), &call, "acquire rw")
            .await?;
        let token = match answer("acquire rw", reply)? {
            Answer::Token(token) => token,
            Answer::Refused(answer) => {
                return match answer.as_slice() {
                    [Value::Int(left)] => Ok(Acquisition::Held(Contention::with_remaining_ttl(
                        Some(remaining(*left).unwrap_or_default()),
                    ))),
                    _ => Err(unexpected("acquire rw", &Value::Array(answer))),
                };
            }
        };
        let mut lease = Lease::new(name, owner, token);
        lease.rw = Some(mode);
        if let Some(error) = unconfirmed {
            return Err(self.undone(error, self.release_rw(&lease, mode)).await);
        }
        Ok(Acquisition::Acquired(lease))
    }

    pub(super) async fn renew_rw(
        &self,
        lease: &Lease,
        mode: RwMode,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (readers, writer) = self.rw_keys(&lease.key);
        let call = Call {
            keys: vec![readers, writer],
            args: vec![
                lease.owner.to_string().into_bytes(),
                millis(ttl).to_string().into_bytes(),
                mode.as_str().as_bytes().to_vec(),
            ],
        };
        let (reply, unconfirmed) = self
            .run_acked(self.script(&RENEW), &call, "renew rw")
            .await?;
        renewed("renew rw", reply, unconfirmed)
    }

    pub(super) async fn release_rw(&self, lease: &Lease, mode: RwMode) -> Result<bool, StoreError> {
        let (readers, writer) = self.rw_keys(&lease.key);
        self.script(&RELEASE)
            .key(readers)
            .key(writer)
            .arg(lease.owner.to_string())
            .arg(mode.as_str())
            .arg(self.rw_channel(&lease.key))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|error| self.failed("release rw", error))
    }

    pub(super) async fn withdraw_rw_intent(
        &self,
        name: &str,
        owner: OwnerToken,
    ) -> Result<(), StoreError> {
        let _: i64 = self
            .script(&WITHDRAW)
            .key(format!("{}:rw-waiting", self.lock_key(name)))
            .arg(owner.to_string())
            .arg(self.rw_channel(name))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|error| self.failed("withdraw writer", error))?;
        Ok(())
    }

    pub(super) async fn withdraw_rw_place(
        &self,
        name: &str,
        owner: OwnerToken,
    ) -> Result<(), StoreError> {
        let [queue, places, _] = self.rw_queue_keys(name);
        let _: i64 = self
            .script(&WITHDRAW_WAITER)
            .key(queue)
            .key(places)
            .key(format!("{}:rw-waiting", self.lock_key(name)))
            .arg(owner.to_string())
            .arg(self.rw_channel(name))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|error| self.failed("withdraw rw waiter", error))?;
        Ok(())
    }

    pub(super) async fn subscribe_to_rw(&self, name: &str) -> Result<ReleaseNotices, StoreError> {
        let channel = self.rw_channel(name);
        Ok(self.notices.subscribe(channel).await?.boxed())
    }
}
