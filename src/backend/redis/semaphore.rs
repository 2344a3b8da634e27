//! Semaphores on Redis: the leases of a semaphore `K` live beside its lock's keys, in the same
//! hash slot, under names of their own (a semaphore and a lock of one name are apart):
//!
//! | name                    | Redis type            | holds                                    |
//! |-------------------------|-----------------------|------------------------------------------|
//! | `P{K}:permits`          | sorted set            | a member `"<owner>:<k>:<N>:<token>"` per lease, scored by when it runs out (server ms) |
//! | `P{K}:permit-metadata`  | hash                  | owner token → metadata, for leases that have any |
//! | `P{K}:permit-fence`     | string, never expires | the last fencing token handed out        |
//! | `P{K}:permits-released` | pub/sub channel       | a notice per release (and per fair waiter's withdrawal or admission that may let the next in) |
//! | `P{K}:permit-queue`     | sorted set            | fair waiters' owner tokens, scored by arrival |
//! | `P{K}:permit-entries`   | hash                  | fair waiter's owner token → when its place expires (server ms) |
//! | `P{K}:permit-arrivals`  | string, never expires | the arrival counter (the queue's scores) |
//!
//! A fair acquisition ([`LockOptions::with_fair`](crate::LockOptions::with_fair)) runs the same
//! script with the three queue keys and the release channel: it is admitted only when enough
//! permits are free and it is first among the live entries of the queue (or the queue is
//! empty), else it keeps (or takes) its place there, leased for its ttl, as a fair lock's
//! waiter does in `campaign.lua`. `withdraw_permits.lua` takes a waiter that gave up out of
//! the queue. An unfair acquisition does not look at the queue.
//!
//! With [`RedisBackend::with_restart_quarantine`], an acquisition of permits waits out the
//! quarantine after a data loss as a lock's does (the same `<prefix>epoch` key).
//!
//! A lease is a member, not a key, so Redis does not expire it: every acquisition reads the
//! whole set (at most N live members) and drops the members whose score has passed (server
//! clock), which is what frees a crashed holder's permits at its ttl. Each member says its k
//! and N, so the same read counts the permits in use and checks N. The set is given the
//! expiry of its last lease, so a semaphore nobody uses any more leaves only its fence
//! counter. A lease's guard knows its member (owner, k, N and token are all in its lease), so
//! renew and release find it in one step. The scripts: `acquire_permits.lua` (admission, N
//! check, token), `renew_permits.lua`, `release_permits.lua` (with the notice),
//! `permit_holders.lua`.

use std::time::Duration;

use futures::StreamExt;
use redis::Value;

use super::lua::Lua;
use super::replica_ack::Call;
use super::{answer, millis, remaining, renewed, unexpected, Answer, RedisBackend};
use crate::backend::{
    Acquisition, Contention, Lease, OwnerToken, PermitHolder, Permits, ReleaseNotices,
};
use crate::error::StoreError;

static ACQUIRE: Lua = Lua::new(include_str!("acquire_permits.lua"));
static RENEW: Lua = Lua::new(include_str!("renew_permits.lua"));
static RELEASE: Lua = Lua::new(include_str!("release_permits.lua"));
static HOLDERS: Lua = Lua::new(include_str!("permit_holders.lua"));
static WITHDRAW: Lua = Lua::new(include_str!("withdraw_permits.lua"));

impl RedisBackend {
    /// The leases' sorted set and hash of the semaphore `name`.
    fn permit_keys(&self, name: &str) -> (String, String) {
        let lock = self.lock_key(name);
        (format!("{lock}:permits"), format!("{lock}:permit-metadata"))
    }

    /// The fair waiters' queue of the semaphore `name`: the queue, its entries' leases and
    /// the arrival counter.
    fn permit_queue_keys(&self, name: &str) -> [String; 3] {
        let lock = self.lock_key(name);
        ["permit-queue", "permit-entries", "permit-arrivals"].map(|what| format!("{lock}:{what}"))
    }

    fn permits_channel(&self, name: &str) -> String {
        format!("{}:permits-released", self.lock_key(name))
    }

    pub(super) async fn take_permits(
        &self,
        name: &str,
        owner: OwnerToken,
        ttl: Duration,
        permits: Permits,
        metadata: Option<&str>,
        fair: bool,
    ) -> Result<Acquisition, StoreError> {
        let (leases, records) = self.permit_keys(name);
        let mut call = Call {
            keys: vec![
                leases,
                records,
                format!("{}:permit-fence", self.lock_key(name)),
            ],
            args: vec![
                owner.to_string().into_bytes(),
                millis(ttl).to_string().into_bytes(),
                permits.total.to_string().into_bytes(),
                permits.count.to_string().into_bytes(),
                metadata.unwrap_or_default().as_bytes().to_vec(),
                u64::try_from(self.quarantine.as_millis())
                    .unwrap_or(u64::MAX)
                    .to_string()
                    .into_bytes(),
            ],
        };
        if fair {
            call.keys.extend(self.permit_queue_keys(name));
            call.args.push(self.permits_channel(name).into_bytes());
        }
        if !self.quarantine.is_zero() {
            call.keys.push(format!("{}epoch", self.prefix));
        }
        let (reply, unconfirmed) = self
            .run_acked(self.script(&ACQUIRE), &call, "acquire permits")
            .await?;
        let token = match answer("acquire permits", reply)? {
            Answer::Token(token) => token,
            Answer::Refused(answer) => {
                return match answer.as_slice() {
                    [Value::Int(left)] => Ok(Acquisition::Held(Contention::with_remaining_ttl(
                        Some(remaining(*left).unwrap_or_default()),
                    ))),
                    [Value::BulkString(what), Value::Int(held)] if what == b"mismatch" => {
                        Err(StoreError::PermitsMismatch {
                            name: name.to_owned(),
                            asked: permits.total,
                            held: u32::try_from(*held).unwrap_or(u32::MAX),
                        })
                    }
                    _ => Err(unexpected("acquire permits", &Value::Array(answer))),
                };
            }
        };
        let mut lease = Lease::new(name, owner, token);
        lease.permits = Some(permits);
        if let Some(error) = unconfirmed {
            return Err(self.undone(error, self.release_permits(&lease)).await);
        }
        Ok(Acquisition::Acquired(lease))
    }

    pub(super) async fn renew_permits(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (leases, records) = self.permit_keys(&lease.key);
        let call = Call {
            keys: vec![leases, records],
            args: vec![
                member(lease).into_bytes(),
                millis(ttl).to_string().into_bytes(),
            ],
        };
        let (reply, unconfirmed) = self
            .run_acked(self.script(&RENEW), &call, "renew permits")
            .await?;
        renewed("renew permits", reply, unconfirmed)
    }

    pub(super) async fn release_permits(&self, lease: &Lease) -> Result<bool, StoreError> {
        let (leases, records) = self.permit_keys(&lease.key);
        self.script(&RELEASE)
            .key(leases)
            .key(records)
            .arg(member(lease))
            .arg(self.permits_channel(&lease.key))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|error| self.failed("release permits", error))
    }

    pub(super) async fn withdraw_permit_waiter(
        &self,
        name: &str,
        owner: OwnerToken,
    ) -> Result<(), StoreError> {
        let [queue, entries, _] = self.permit_queue_keys(name);
        let _: i64 = self
            .script(&WITHDRAW)
            .key(queue)
            .key(entries)
            .arg(owner.to_string())
            .arg(self.permits_channel(name))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|error| self.failed("withdraw permits", error))?;
        Ok(())
    }

    pub(super) async fn subscribe_to_permits(
        &self,
        name: &str,
    ) -> Result<ReleaseNotices, StoreError> {
        let channel = self.permits_channel(name);
        Ok(self.notices.subscribe(channel).await?.boxed())
    }

    pub(super) async fn holders_of(&self, name: &str) -> Result<Vec<PermitHolder>, StoreError> {
        let (leases, records) = self.permit_keys(name);
        let reply: Vec<Value> = self
            .script(&HOLDERS)
            .key(leases)
            .key(records)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|error| self.failed("permit holders", error))?;
        let mut holders = Vec::with_capacity(reply.len() / 3);
        for lease in reply.chunks(3) {
            let holder = match lease {
                [Value::BulkString(member), Value::Int(left), Value::BulkString(metadata)] => {
                    parse_member(name, member, *left, metadata)
                }
                _ => None,
            };
            holders.push(holder.ok_or_else(|| {
                StoreError::protocol(format!("semaphore lease {lease:?} is malformed"))
            })?);
        }
        holders.sort_by_key(|holder| holder.fencing_token);
        Ok(holders)
    }
}

/// The lease's member in the set, `"<owner>:<k>:<N>:<token>"`; only the owner for a lease
/// whose token is not known (an acquisition whose answer never came: the script looks for it).
fn member(lease: &Lease) -> String {
    match lease.permits {
        Some(permits) if lease.fencing_token != 0 => format!(
            "{}:{}:{}:{}",
            lease.owner, permits.count, permits.total, lease.fencing_token
        ),
        _ => lease.owner.to_string(),
    }
}

/// A lease's member with its `left` milliseconds and its metadata ("" for none).
fn parse_member(name: &str, member: &[u8], left: i64, metadata: &[u8]) -> Option<PermitHolder> {
    let member = std::str::from_utf8(member).ok()?;
    let mut parts = member.split(':').skip(1);
    let count = parts.next()?.parse().ok()?;
    let total = parts.next()?.parse().ok()?;
    let fencing_token = parts.next()?.parse().ok()?;
    Some(PermitHolder {
        name: name.to_owned(),
        fencing_token,
        permits: Permits::new(total, count),
        remaining_ttl: remaining(left).unwrap_or_default(),
        metadata: (!metadata.is_empty()).then(|| String::from_utf8_lossy(metadata).into_owned()),
    })
}
