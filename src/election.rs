//! Leader election on the lease machinery: a leader IS the holder of the lease on the
//! election's name, held by a key actor with auto-renew, and its term is the lease's fencing
//! token. What a mutex lacks, the store adds behind [`LockBackend`](crate::LockBackend):
//! a queue of candidates served in campaign order (`campaign`), a value the leader can change
//! without a new term (`proclaim`), and the store's own notices of every change (`observe`).
//!
//! Two faces, as for locks:
//! - async code: [`Election::campaign`] waits until elected and returns a [`Leadership`]
//!   (term, value, `lost()`, `resign()`, `proclaim()`, resign on drop);
//! - actors: [`Election::enlist`] campaigns for a candidate actor, which receives
//!   [`CandidateMsg::Elected`] and [`CandidateMsg::Demoted`]; the [`Candidacy`] it keeps
//!   resigns or proclaims. A candidate actor that stops is withdrawn, or demoted at once
//!   (the key actor monitors it as the lease's holder).
//!
//! An election and a lock of the same name on the same backend are the same lease (as on
//! etcd, where `etcdctl lock NAME` and `etcdctl elect NAME` contend for the same keys).
//!
//! Order: the store serves candidates in the order they reached its queue; on one node,
//! candidates wait in the backend actor's local queue (first come, first served) and only the
//! first of them is in the store's queue at a time.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ractor::{ActorCell, ActorRef, Message};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};

use crate::backend::{Leader, LeaderChanges, OwnerToken};
use crate::client::LockClient;
use crate::error::{Error, Result};
use crate::event::LostReason;
use crate::guard::LockGuard;
use crate::metrics::StoreOp;
use crate::options::{validate_key, validate_ttl, LockOptions, Wait, MAX_METADATA_LEN};
use crate::task::AbortOnDrop;

/// The longest candidate value accepted, in bytes.
pub const MAX_ELECTION_VALUE_LEN: usize = MAX_METADATA_LEN;

/// One election, by name, on the backend of the [`LockClient`] it came from.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), leasehold::Error> {
/// use leasehold::{CampaignOptions, LockManager, MemoryBackend};
///
/// let client = LockManager::builder()
///     .with_name("election-doc")
///     .with_backend("memory", MemoryBackend::new())
///     .start()
///     .await?;
/// let election = client.election("billing/primary")?;
/// let mut leadership = election.campaign("10.0.0.7:8080", CampaignOptions::new()).await?;
/// leadership.proclaim("10.0.0.7:9090").await?;
/// let leader = election.leader().await?.expect("someone leads");
/// assert_eq!((leader.value.as_str(), leader.term), ("10.0.0.7:9090", leadership.term()));
/// leadership.resign().await?;
/// client.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Election {
    client: LockClient,
    name: Arc<str>,
}

impl LockClient {
    /// The election named `name` on this handle's backend. The name is checked here, before
    /// any I/O: it must be a valid key (non-empty, at most [`MAX_KEY_LEN`](crate::MAX_KEY_LEN)
    /// bytes, no control characters).
    pub fn election(&self, name: &str) -> Result<Election> {
        if name.is_empty() {
            return Err(Error::EmptyElectionName);
        }
        validate_key(name)?;
        Ok(Election {
            client: self.clone(),
            name: name.into(),
        })
    }
}

/// How to campaign: the leadership's ttl, how long to wait to be elected, the candidate actor.
#[derive(Debug, Clone)]
pub struct CampaignOptions {
    ttl: Duration,
    wait: Wait,
    holder: Option<ActorCell>,
}

impl Default for CampaignOptions {
    fn default() -> Self {
        CampaignOptions {
            ttl: Duration::from_secs(30),
            wait: Wait::Forever,
            holder: None,
        }
    }
}

impl CampaignOptions {
    /// Ttl 30 s, waiting forever to be elected, no candidate actor.
    pub fn new() -> Self {
        Self::default()
    }

    /// The leadership's lease ttl (renewed every third of it), and the ttl of the candidate's
    /// place in the store's queue while it waits: a candidate that dies delays the others no
    /// longer than this.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait to be elected (`Wait::No`: only if nobody leads and nobody is
    /// queued).
    pub fn with_wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// The candidate actor: when it stops, its campaign is withdrawn, or its leadership
    /// resigned, at once.
    pub fn with_holder(mut self, holder: impl Into<ActorCell>) -> Self {
        self.holder = Some(holder.into());
        self
    }

    /// The ttl.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

impl Election {
    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Campaigns with `value` (an address, say) and waits until elected, as `options` say.
    /// The value and ttl are checked before any I/O.
    pub async fn campaign(
        &self,
        value: impl Into<String>,
        options: CampaignOptions,
    ) -> Result<Leadership> {
        let value = value.into();
        validate_value(&value)?;
        validate_ttl(options.ttl)?;
        let candidate = OwnerToken::random();
        let mut lock = LockOptions::new()
            .with_ttl(options.ttl)
            .with_wait(options.wait)
            .with_metadata(value.clone());
        lock.candidate = Some(candidate);
        if let Some(holder) = options.holder {
            lock = lock.with_holder(holder);
        }
        // Unless this ends elected, the candidate leaves the store's queue at once (not at
        // its entry's ttl): on an error, and when this future is dropped.
        let mut withdraw = Withdraw {
            election: Some(self.clone()),
            candidate,
        };
        let guard = self.client.lock(&self.name, lock).await?;
        withdraw.election = None;
        Ok(Leadership {
            name: self.name.clone(),
            value,
            guard,
        })
    }

    /// The current leader (value and term), or `None` when nobody leads.
    pub async fn leader(&self) -> Result<Option<Leader>> {
        let info = self.client.info(&self.name).await?;
        Ok(info.map(|info| Leader {
            value: info.metadata.unwrap_or_default(),
            term: info.fencing_token,
        }))
    }

    /// The current leader, then every change (a new leader, a proclaimed value, nobody
    /// leading), from the store's own notices: observers on every node see the same
    /// sequence. The stream ends if the store's notices break.
    pub async fn observe(&self) -> Result<LeaderChanges> {
        let ctx = self.client.backend_ctx();
        let budget = ctx.timing.op_timeout;
        let observe = ctx
            .metrics
            .timed(StoreOp::Observe, ctx.store.observe(&self.name));
        match timeout(budget, observe).await {
            Ok(Ok(changes)) => Ok(changes),
            Ok(Err(error)) => Err(ctx.store_error(error)),
            Err(_) => Err(ctx.store_error(crate::StoreError::TimedOut {
                op: "observe",
                after: budget,
            })),
        }
    }

    /// Sends every change [`observe`](Self::observe) sees, converted by `converter`, to
    /// `actor`, until the returned [`Observer`] is dropped or the actor stops.
    pub async fn observe_to<M, F>(&self, actor: ActorRef<M>, converter: F) -> Result<Observer>
    where
        M: Message,
        F: Fn(Option<Leader>) -> M + Send + 'static,
    {
        let mut changes = self.observe().await?;
        let task = tokio::spawn(async move {
            while let Some(change) = changes.next().await {
                if actor.cast(converter(change)).is_err() {
                    break;
                }
            }
        });
        Ok(Observer {
            _task: AbortOnDrop(task),
        })
    }

    /// Campaigns for `candidate`, which is told [`CandidateMsg::Elected`] when elected and
    /// [`CandidateMsg::Demoted`] if the leadership is lost (before the lease's deadline, as a
    /// lock's loss is). The candidate keeps the [`Candidacy`] to resign or proclaim; dropping
    /// it withdraws the campaign, or resigns. The candidate stopping does the same (it is the
    /// lease's holder). Bad input is an error here, before any I/O.
    pub fn enlist<M>(
        &self,
        candidate: ActorRef<M>,
        value: impl Into<String>,
        options: CampaignOptions,
    ) -> Result<Candidacy>
    where
        M: Message + From<CandidateMsg>,
    {
        let value = value.into();
        validate_value(&value)?;
        validate_ttl(options.ttl)?;
        let options = options.with_holder(candidate.get_cell());
        let (commands, rx) = mpsc::unbounded_channel();
        let election = self.clone();
        let task = tokio::spawn(run_candidacy(election, candidate, value, options, rx));
        Ok(Candidacy {
            name: self.name.clone(),
            commands,
            _task: AbortOnDrop(task),
        })
    }
}

/// Takes a candidate that stopped campaigning out of the store's queue, from a short task
/// (a drop cannot wait for the store).
struct Withdraw {
    election: Option<Election>,
    candidate: OwnerToken,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        let Some(election) = self.election.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left: the entry runs out at its ttl
        };
        let candidate = self.candidate;
        runtime.spawn(async move {
            let ctx = election.client.backend_ctx();
            let withdraw = ctx.store.withdraw(&election.name, candidate);
            let withdrawn = ctx.metrics.timed(StoreOp::Withdraw, withdraw);
            if let Ok(Err(error)) = timeout(ctx.timing.op_timeout, withdrawn).await {
                tracing::debug!(name = %election.name, %error, "withdrawing a candidate failed; its entry runs out at its ttl");
            }
        });
    }
}

fn validate_value(value: &str) -> Result<()> {
    if value.len() > MAX_ELECTION_VALUE_LEN {
        let shown = value
            .char_indices()
            .take_while(|(i, _)| *i < 64)
            .map(|(_, c)| c);
        return Err(Error::ElectionValueTooLong {
            value: format!("{}…", shown.collect::<String>()),
            len: value.len(),
            max: MAX_ELECTION_VALUE_LEN,
        });
    }
    Ok(())
}

/// Being the leader: the lease on the election's name. Dropping it resigns.
#[must_use = "dropping the leadership resigns at once"]
pub struct Leadership {
    name: Arc<str>,
    value: String,
    guard: LockGuard,
}

impl Leadership {
    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The term: a fencing token, strictly greater than every earlier leader's.
    pub fn term(&self) -> u64 {
        self.guard.fencing_token()
    }

    /// The value as last campaigned or proclaimed.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// True while the leadership's lease is before its local deadline.
    pub fn is_leader(&self) -> bool {
        self.guard.is_held()
    }

    /// The local deadline of the lease, while it is held.
    pub fn deadline(&self) -> Option<Instant> {
        self.guard.deadline()
    }

    /// Resolves when the leadership is lost (demoted), with the reason: before the lease's
    /// deadline when renewals fail.
    pub async fn lost(&self) -> LostReason {
        self.guard.lost().await
    }

    /// Replaces the value in the same term; observers are told.
    pub async fn proclaim(&mut self, value: impl Into<String>) -> Result<()> {
        let value = value.into();
        validate_value(&value)?;
        self.guard.proclaim(value.clone()).await?;
        self.value = value;
        Ok(())
    }

    /// Gives the leadership up: the next candidate is elected at once.
    pub async fn resign(self) -> Result<()> {
        self.guard.release().await
    }

    /// The lease's guard (owner token, ttl, renewal).
    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("backend", &self.client.backend_name())
            .field("name", &self.name)
            .finish()
    }
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("name", &self.name)
            .field("term", &self.term())
            .field("value", &self.value)
            .field("leader", &self.is_leader())
            .finish()
    }
}

/// What a candidate actor enlisted with [`Election::enlist`] is told.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum CandidateMsg {
    /// The candidate leads, in `term`.
    Elected {
        /// The election's name.
        name: String,
        /// The term: strictly greater than every earlier leader's.
        term: u64,
    },
    /// The candidate no longer leads, for `reason` (not sent for a resignation it asked for).
    Demoted {
        /// The election's name.
        name: String,
        /// The term it led in.
        term: u64,
        /// Why.
        reason: LostReason,
    },
    /// The campaign failed (the manager stopped, the wait budget ran out, …).
    Failed {
        /// The election's name.
        name: String,
        /// Why.
        error: Error,
    },
}

#[cfg(feature = "cluster")]
impl ractor::Message for CandidateMsg {}

/// A candidate actor's campaign, from [`Election::enlist`]. Dropping it withdraws the
/// campaign or resigns the leadership.
pub struct Candidacy {
    name: Arc<str>,
    commands: mpsc::UnboundedSender<Command>,
    _task: AbortOnDrop<()>,
}

enum Command {
    Resign(oneshot::Sender<Result<()>>),
    Proclaim(String, oneshot::Sender<Result<()>>),
}

impl Candidacy {
    /// Resigns the leadership, or withdraws the campaign if not elected yet.
    pub async fn resign(&self) -> Result<()> {
        self.ask(Command::Resign).await
    }

    /// Replaces the leader's value in the same term; an error if not leading.
    pub async fn proclaim(&self, value: impl Into<String>) -> Result<()> {
        let value = value.into();
        validate_value(&value)?;
        self.ask(|reply| Command::Proclaim(value, reply)).await
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<()>>) -> Command,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let over = || Error::NotHeld {
            key: self.name.to_string(),
        };
        self.commands.send(command(reply)).map_err(|_| over())?;
        answer.await.unwrap_or_else(|_| Err(over()))
    }
}

impl std::fmt::Debug for Candidacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidacy")
            .field("name", &self.name)
            .finish()
    }
}

/// Forwards an election's changes to an actor (from [`Election::observe_to`]); dropping it
/// stops.
pub struct Observer {
    _task: AbortOnDrop<()>,
}

/// The candidacy's task: campaign, tell the actor, serve its commands, tell it of a demotion.
/// Owned by the [`Candidacy`] (aborted when it is dropped, which drops the leadership).
async fn run_candidacy<M>(
    election: Election,
    candidate: ActorRef<M>,
    value: String,
    options: CampaignOptions,
    mut commands: mpsc::UnboundedReceiver<Command>,
) where
    M: Message + From<CandidateMsg>,
{
    let name = election.name.to_string();
    let campaign = election.campaign(value, options);
    tokio::pin!(campaign);
    let mut leadership = loop {
        tokio::select! {
            elected = &mut campaign => match elected {
                Ok(leadership) => break leadership,
                Err(error) => {
                    let _ = candidate.cast(CandidateMsg::Failed { name, error }.into());
                    return;
                }
            },
            command = commands.recv() => match command {
                // Withdrawn: dropping the campaign leaves the queue.
                None => return,
                Some(Command::Resign(reply)) => {
                    let _ = reply.send(Ok(()));
                    return;
                }
                Some(Command::Proclaim(_, reply)) => {
                    let _ = reply.send(Err(Error::NotHeld { key: name.clone() }));
                }
            },
        }
    };
    let term = leadership.term();
    if candidate
        .cast(
            CandidateMsg::Elected {
                name: name.clone(),
                term,
            }
            .into(),
        )
        .is_err()
    {
        return; // the candidate is gone: dropping the leadership resigns
    }
    loop {
        let command = tokio::select! {
            reason = leadership.lost() => {
                let _ = candidate.cast(CandidateMsg::Demoted { name, term, reason }.into());
                return;
            }
            command = commands.recv() => command,
        };
        match command {
            None => return,
            Some(Command::Resign(reply)) => {
                let _ = reply.send(leadership.resign().await);
                return;
            }
            Some(Command::Proclaim(value, reply)) => {
                let _ = reply.send(leadership.proclaim(value).await);
            }
        }
    }
}
