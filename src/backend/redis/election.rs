//! Elections on Redis: the leadership is the lock key `P{K}` (value `"<owner> <value>"`, term
//! = the fence counter), and the candidates wait in a queue in the same hash slot:
//!
//! | name              | Redis type             | holds                                      |
//! |-------------------|------------------------|--------------------------------------------|
//! | `P{K}:queue`      | sorted set             | waiting candidates' owner tokens, by arrival |
//! | `P{K}:entries`    | hash                   | owner token → when its place expires (server ms) |
//! | `P{K}:arrivals`   | string, never expires  | the arrival counter (the queue's scores)   |
//! | `P{K}:leader`     | pub/sub channel        | `"<term> <value>"` on each new leader or proclaimed value |
//!
//! A place in the queue is leased like the leadership: each attempt of a waiting candidate
//! renews it, and a candidate that stops trying leaves at its ttl (the campaign script drops
//! expired entries from the head). The scripts: `campaign.lua` (one attempt: elect, or keep
//! the place), `withdraw.lua`, `proclaim.lua`. Resignation is the lock's release, whose notice
//! on `P{K}:released` both wakes the waiters and tells observers nobody leads.

use std::time::Duration;

use futures::StreamExt;
use redis::Value;
use tokio::time::{timeout, Instant};

use super::lua::Lua;
use super::replica_ack::Call;
use super::{answer, remaining, unexpected, Answer, RedisBackend, PUBSUB_TIMEOUT};
use crate::backend::{
    Acquisition, Contention, Leader, LeaderChanges, Lease, LockBackend, OwnerToken,
};
use crate::error::StoreError;

static CAMPAIGN: Lua = Lua::new(include_str!("campaign.lua"));
static WITHDRAW: Lua = Lua::new(include_str!("withdraw.lua"));
static PROCLAIM: Lua = Lua::new(include_str!("proclaim.lua"));

impl RedisBackend {
    pub(super) async fn campaign_in_queue(
        &self,
        name: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: &str,
    ) -> Result<Acquisition, StoreError> {
        let lock = self.lock_key(name);
        let leader = format!("{lock}:leader").into_bytes();
        let acquired = format!("{lock}:acquired").into_bytes();
        let held = format!("{candidate} {value}");
        let call = self.queue_call(name, candidate, ttl, value, leader, acquired, held, false);
        self.queue_attempt(name, candidate, call, "campaign").await
    }

    /// One attempt of a fair lock's waiter: the campaign script on the lock's own queue,
    /// writing the lock key as `acquire` does (`"<owner>[ <metadata>]"`), telling no election
    /// observers, publishing the acquisition only where `acquire` does (not on a cluster),
    /// and keeping the restart quarantine as `acquire` does.
    pub(super) async fn acquire_in_queue(
        &self,
        key: &str,
        owner: OwnerToken,
        ttl: Duration,
        metadata: Option<&str>,
    ) -> Result<Acquisition, StoreError> {
        let lock = self.lock_key(key);
        let acquired = if self.conn.is_cluster() {
            Vec::new()
        } else {
            format!("{lock}:acquired").into_bytes()
        };
        let held = match metadata {
            Some(metadata) => format!("{owner} {metadata}"),
            None => owner.to_string(),
        };
        let value = metadata.unwrap_or_default();
        let call = self.queue_call(key, owner, ttl, value, Vec::new(), acquired, held, true);
        self.queue_attempt(key, owner, call, "acquire_fair").await
    }

    /// The campaign script's keys and arguments (see `campaign.lua`).
    #[allow(clippy::too_many_arguments)]
    fn queue_call(
        &self,
        name: &str,
        candidate: OwnerToken,
        ttl: Duration,
        value: &str,
        leader_channel: Vec<u8>,
        acquired_channel: Vec<u8>,
        held: String,
        quarantine: bool,
    ) -> Call {
        let lock = self.lock_key(name);
        let mut call = Call {
            keys: vec![
                lock.clone(),
                format!("{lock}:fence"),
                format!("{lock}:queue"),
                format!("{lock}:entries"),
                format!("{lock}:arrivals"),
            ],
            args: vec![
                candidate.to_string().into_bytes(),
                value.as_bytes().to_vec(),
                super::millis(ttl).to_string().into_bytes(),
                leader_channel,
                acquired_channel,
                held.into_bytes(),
            ],
        };
        if quarantine && !self.quarantine.is_zero() {
            call.keys.push(format!("{}epoch", self.prefix));
            let millis = u64::try_from(self.quarantine.as_millis()).unwrap_or(u64::MAX);
            call.args.push(millis.to_string().into_bytes());
        }
        call
    }

    async fn queue_attempt(
        &self,
        name: &str,
        candidate: OwnerToken,
        call: Call,
        op: &'static str,
    ) -> Result<Acquisition, StoreError> {
        // Taking the leadership is an acquisition: with replica acknowledgement it counts once
        // the replicas have it, and is undone (resigned: the leader's key deleted if it is
        // still ours) if not.
        let (reply, unconfirmed) = self.run_acked(self.script(&CAMPAIGN), &call, op).await?;
        let term = match answer(op, reply)? {
            Answer::Token(term) => term,
            Answer::Refused(wait) => {
                return match wait.as_slice() {
                    [Value::Int(ms)] => Ok(Acquisition::Held(Contention::with_remaining_ttl(
                        Some(remaining(*ms).unwrap_or_default()),
                    ))),
                    _ => Err(unexpected(op, &Value::Array(wait))),
                }
            }
        };
        let lease = Lease::new(name, candidate, term);
        if let Some(error) = unconfirmed {
            return Err(self.undone(error, self.release(&lease)).await);
        }
        Ok(Acquisition::Acquired(lease))
    }

    pub(super) async fn withdraw_from_queue(
        &self,
        name: &str,
        candidate: OwnerToken,
    ) -> Result<(), StoreError> {
        let lock = self.lock_key(name);
        let _: i64 = self
            .script(&WITHDRAW)
            .key(&lock)
            .key(format!("{lock}:queue"))
            .key(format!("{lock}:entries"))
            .arg(candidate.to_string())
            .arg(format!("{lock}:released"))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|error| self.failed("withdraw", error))?;
        Ok(())
    }

    pub(super) async fn proclaim_value(
        &self,
        lease: &Lease,
        value: &str,
    ) -> Result<bool, StoreError> {
        let lock = self.lock_key(&lease.key);
        self.script(&PROCLAIM)
            .key(&lock)
            .key(format!("{lock}:fence"))
            .arg(lease.owner.to_string())
            .arg(value)
            .arg(format!("{lock}:leader"))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|error| self.failed("proclaim", error))
    }

    /// One pub/sub connection of its own, subscribed to the leader and release channels
    /// (Redis delivers one connection's messages in publish order), then a read of the current
    /// leader. An expiry publishes nothing: when the leader's lease would end, the stream reads
    /// again.
    pub(super) async fn observe_leader(&self, name: &str) -> Result<LeaderChanges, StoreError> {
        let lock = self.lock_key(name);
        let (leader_channel, released_channel) =
            (format!("{lock}:leader"), format!("{lock}:released"));
        let channels = [leader_channel.clone(), released_channel];
        let opening = self.conn.messages_on(&channels);
        let messages = match timeout(PUBSUB_TIMEOUT, opening).await {
            Ok(messages) => messages.map_err(|error| self.failed("observe", error))?,
            Err(_) => {
                return Err(StoreError::TimedOut {
                    op: "observe",
                    after: PUBSUB_TIMEOUT,
                })
            }
        };
        let (now, expires_at) = self.read_leader(name).await?;
        let state = Observing {
            backend: self.clone(),
            name: name.to_owned(),
            leader_channel,
            messages,
            told: now.clone(),
            expires_at,
            first: Some(now),
        };
        Ok(futures::stream::unfold(state, Observing::next).boxed())
    }

    /// The leader now, and when its lease would end.
    async fn read_leader(
        &self,
        name: &str,
    ) -> Result<(Option<Leader>, Option<Instant>), StoreError> {
        let info = self.inspect(name).await?;
        let now = Instant::now();
        Ok(match info {
            Some(info) => (
                Some(Leader {
                    value: info.metadata.unwrap_or_default(),
                    term: info.fencing_token,
                }),
                now.checked_add(info.remaining_ttl),
            ),
            None => (None, None),
        })
    }
}

struct Observing {
    backend: RedisBackend,
    name: String,
    leader_channel: String,
    messages: futures::stream::BoxStream<'static, redis::Msg>,
    told: Option<Leader>,
    /// When the leader told of last would lose its lease, if it is not renewed.
    expires_at: Option<Instant>,
    first: Option<Option<Leader>>,
}

impl Observing {
    async fn next(mut self) -> Option<(Option<Leader>, Self)> {
        if let Some(first) = self.first.take() {
            return Some((first, self));
        }
        loop {
            let expires_at = self.expires_at;
            let change = tokio::select! {
                // A closed connection ends the stream.
                message = self.messages.next() => {
                    let message = message?;
                    if message.get_channel_name() == self.leader_channel {
                        let payload = String::from_utf8_lossy(message.get_payload_bytes());
                        let (term, value) = payload.split_once(' ')?;
                        let leader = Leader { value: value.to_owned(), term: term.parse().ok()? };
                        // When its lease would end: read once, not on every notice after.
                        self.expires_at = match self.backend.read_leader(&self.name).await {
                            Ok((Some(now), at)) if now.term == leader.term => at,
                            _ => Some(Instant::now()),
                        };
                        Some(leader)
                    } else {
                        self.expires_at = None;
                        None
                    }
                }
                () = tokio::time::sleep_until(expires_at.unwrap_or_else(Instant::now)), if expires_at.is_some() => {
                    let (now, at) = self.backend.read_leader(&self.name).await.ok()?;
                    self.expires_at = at;
                    // Only an end is learnt this way; a new leader comes with its notice.
                    if now.is_some() {
                        continue;
                    }
                    None
                }
            };
            if change != self.told {
                self.told = change.clone();
                return Some((change, self));
            }
        }
    }
}
