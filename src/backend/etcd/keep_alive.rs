//! One `LeaseKeepAlive` stream for every renewal of a backend.
//!
//! etcd's LeaseKeepAlive is a bidirectional stream made to carry many leases: the client sends
//! lease ids, etcd answers each with the lease's new ttl (0 when the lease is gone), in order.
//! Opening a stream per renewal costs a gRPC stream set-up and tear-down each time; etcd's own
//! Go client keeps one stream for all its leases, and so does this backend.
//!
//! A small task owns the stream. A renewal sends it the lease id and a oneshot sender; the task
//! writes the id on the stream (once, however many renewals of that lease wait) and answers every
//! waiter of that id when etcd's answer comes. Each key actor still owns its lease, its timer and
//! its deadline: the task only carries their requests.
//!
//! Renewals come in bursts (key actors renew on a grid shared by the process, see
//! `timing::renewal_slot`): the task takes every ask already queued, writes every id the stream
//! will take without waiting, and reads every answer already arrived, each in one go, so a
//! burst costs the task (and the gRPC stream under it) a few wake-ups rather than a few per
//! renewal.
//!
//! When the stream breaks, every renewal waiting on it fails with a retryable store error (the
//! key actor tries again on its next tick, and says `Lost` at its deadline if the outage lasts),
//! and the next renewal opens a new stream.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use etcd_client::{Client, LeaseKeepAliveResponse, LeaseKeepAliveStream, LeaseKeeper};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::call::{store_error, Retry};
use crate::error::StoreError;
use crate::task::AbortOnDrop;

/// etcd's answer to one keep-alive.
#[derive(Debug, Clone, Copy)]
pub(super) struct KeptAlive {
    /// The lease's ttl after the keep-alive, in seconds; 0 when the lease is gone (expired or
    /// revoked), and the keys on it with it.
    pub(super) ttl: i64,
    /// The store's revision when etcd answered, if the answer said. Every change etcd applied
    /// before this answer has a revision no greater than this.
    pub(super) revision: Option<i64>,
    /// When the keep-alive that etcd answered was written on the stream, or earlier: the
    /// lease runs at least its ttl from then. A renewal that joins a keep-alive already sent
    /// for the same lease (a session lease shared by many locks) gets an earlier instant than
    /// its own request.
    pub(super) sent_at: Instant,
}

type Answer = oneshot::Sender<Result<KeptAlive, StoreError>>;

/// A renewal's request to the task.
struct Ask {
    id: i64,
    answer: Answer,
}

/// The handle to a backend's keep-alive task; dropping it stops the task (and closes the
/// stream).
pub(super) struct KeepAlives {
    asks: mpsc::UnboundedSender<Ask>,
    _task: AbortOnDrop<()>,
}

impl KeepAlives {
    /// Starts the task. The stream itself is opened by the first renewal, on a live lease (etcd
    /// client's stream set-up sends one keep-alive and wants a live lease's answer).
    pub(super) fn start(client: Client, tries: usize) -> Self {
        let (asks, receiver) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(client, tries, receiver));
        KeepAlives {
            asks,
            _task: AbortOnDrop(task),
        }
    }

    /// One keep-alive of lease `id` on the shared stream.
    pub(super) async fn keep_alive(&self, id: i64) -> Result<KeptAlive, StoreError> {
        let (answer, answered) = oneshot::channel();
        if self.asks.send(Ask { id, answer }).is_err() {
            return Err(StoreError::unavailable(
                "the etcd keep-alive task has stopped",
            ));
        }
        answered.await.unwrap_or_else(|_| {
            Err(StoreError::unavailable(
                "the etcd keep-alive task dropped a renewal",
            ))
        })
    }
}

/// An open stream: the sending half (etcd-client's keeper, whose lease id is set before each
/// send) and the answers.
struct Stream {
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
}

/// What woke the task.
enum Event {
    Ask(Option<Ask>),
    Sent(Result<(), etcd_client::Error>),
    Answer(Result<Option<LeaseKeepAliveResponse>, etcd_client::Error>),
}

/// The renewals of one lease waiting for etcd's answer: one request on the stream answers
/// them all. A lease of its own has one renewal at a time: it is kept without a `Vec`.
enum Waiters {
    One(Answer),
    Many(Vec<Answer>),
}

impl Waiters {
    fn push(&mut self, answer: Answer) {
        match self {
            Waiters::Many(answers) => answers.push(answer),
            Waiters::One(_) => {
                let Waiters::One(first) = std::mem::replace(self, Waiters::Many(Vec::new())) else {
                    unreachable!("matched One above")
                };
                *self = Waiters::Many(vec![first, answer]);
            }
        }
    }

    fn answer(self, outcome: &Result<KeptAlive, StoreError>) {
        match self {
            Waiters::One(answer) => {
                let _ = answer.send(outcome.clone());
            }
            Waiters::Many(answers) => {
                for answer in answers {
                    let _ = answer.send(outcome.clone());
                }
            }
        }
    }
}

/// One lease's keep-alive under way: who waits for it, and when it was written on the stream
/// (`None` until then).
struct Pending {
    waiters: Waiters,
    sent_at: Option<Instant>,
}

/// The most asks, writes or answers handled in one go before the task lets the others run: a
/// burst of renewals (they come on a shared grid, see `timing::renewal_slot`) is written in
/// one batch, and etcd's answers to it are read in one batch.
const BATCH: usize = 256;

async fn run(client: Client, tries: usize, mut asks: mpsc::UnboundedReceiver<Ask>) {
    let mut stream: Option<Stream> = None;
    // Keep-alives asked for and not yet answered, by lease id.
    let mut pending: HashMap<i64, Pending> = HashMap::new();
    // Lease ids to write on the stream, in order.
    let mut unsent: VecDeque<i64> = VecDeque::new();
    // When the task began writing the first of `unsent` (a write may be cancelled and begun
    // again: the first beginning counts).
    let mut writing_since: Option<Instant> = None;
    loop {
        if stream.is_some() && !unsent.is_empty() {
            writing_since.get_or_insert_with(Instant::now);
        }
        // Sending and reading run side by side: etcd stops reading requests while its answers
        // wait to be read, so a task that only waited to send could block both ends.
        let event = {
            let (keeper, answers) = match stream.as_mut() {
                Some(Stream { keeper, answers }) => (Some(keeper), Some(answers)),
                None => (None, None),
            };
            tokio::select! {
                ask = asks.recv() => Event::Ask(ask),
                sent = send(keeper, unsent.front().copied()) => Event::Sent(sent),
                answer = read(answers) => Event::Answer(answer),
            }
        };
        match event {
            Event::Ask(None) => return, // The backend is gone.
            Event::Ask(Some(first)) => {
                // This ask, and every other one already waiting (up to a batch): a burst of
                // renewals is taken at once, and written together below.
                let (mut ask, mut taken) = (first, 1);
                loop {
                    let Ask { id, answer } = ask;
                    let open = match stream {
                        Some(_) => Ok(()),
                        None => open_stream(&client, tries, id)
                            .await
                            .map(|opened| stream = Some(opened)),
                    };
                    match open {
                        Ok(()) => push_waiter(&mut pending, &mut unsent, id, answer),
                        Err(outcome) => {
                            let _ = answer.send(outcome);
                        }
                    }
                    if taken == BATCH {
                        break;
                    }
                    match asks.try_recv() {
                        Ok(next) => (ask, taken) = (next, taken + 1),
                        Err(_) => break,
                    }
                }
            }
            Event::Sent(Ok(())) => {
                let since = writing_since.take().unwrap_or_else(Instant::now);
                if let Some(id) = unsent.pop_front() {
                    mark_sent(&mut pending, id, since);
                }
                // Whatever else can be written without waiting goes in the same batch (the
                // stream's queue takes them at once while it has room).
                let mut failed = None;
                if let Some(Stream { keeper, .. }) = stream.as_mut() {
                    for _ in 0..BATCH {
                        let Some(&id) = unsent.front() else { break };
                        keeper.id = id;
                        // Read before the write: no later than etcd gets it, and after the
                        // renewal asked (the batch's start may be before that).
                        let at = Instant::now();
                        match keeper.keep_alive().now_or_never() {
                            Some(Ok(())) => {
                                unsent.pop_front();
                                mark_sent(&mut pending, id, at);
                            }
                            Some(Err(error)) => {
                                failed = Some(error);
                                break;
                            }
                            None => break,
                        }
                    }
                }
                if let Some(error) = failed {
                    broken(&mut stream, &mut pending, &mut unsent, Some(error));
                    writing_since = None;
                }
            }
            Event::Sent(Err(error)) | Event::Answer(Err(error)) => {
                broken(&mut stream, &mut pending, &mut unsent, Some(error));
                writing_since = None;
            }
            Event::Answer(Ok(None)) => {
                broken(&mut stream, &mut pending, &mut unsent, None);
                writing_since = None;
            }
            Event::Answer(Ok(Some(answer))) => {
                answered(&mut pending, &answer);
                // And every answer already here.
                let mut ended = None;
                if let Some(Stream { answers, .. }) = stream.as_mut() {
                    for _ in 0..BATCH {
                        match answers.message().now_or_never() {
                            Some(Ok(Some(answer))) => answered(&mut pending, &answer),
                            Some(Ok(None)) => {
                                ended = Some(None);
                                break;
                            }
                            Some(Err(error)) => {
                                ended = Some(Some(error));
                                break;
                            }
                            None => break,
                        }
                    }
                }
                if let Some(error) = ended {
                    broken(&mut stream, &mut pending, &mut unsent, error);
                    writing_since = None;
                }
            }
        }
    }
}

/// Adds a renewal of lease `id` to those waiting; the first one queues the lease's write.
fn push_waiter(
    pending: &mut HashMap<i64, Pending>,
    unsent: &mut VecDeque<i64>,
    id: i64,
    answer: Answer,
) {
    match pending.entry(id) {
        Entry::Occupied(mut waiting) => waiting.get_mut().waiters.push(answer),
        Entry::Vacant(vacant) => {
            vacant.insert(Pending {
                waiters: Waiters::One(answer),
                sent_at: None,
            });
            unsent.push_back(id);
        }
    }
}

/// Lease `id`'s keep-alive was written on the stream; the write began at `since`.
fn mark_sent(pending: &mut HashMap<i64, Pending>, id: i64, since: Instant) {
    if let Some(waiting) = pending.get_mut(&id) {
        waiting.sent_at = Some(since);
    }
}

/// etcd answered a keep-alive: everyone waiting on that lease hears.
fn answered(pending: &mut HashMap<i64, Pending>, answer: &LeaseKeepAliveResponse) {
    let Entry::Occupied(waiting) = pending.entry(answer.id()) else {
        return;
    };
    let Some(sent_at) = waiting.get().sent_at else {
        // Not an answer to a keep-alive this task wrote (the stream's opening one): the
        // renewals waiting on this lease wait for their own.
        return;
    };
    let kept = KeptAlive {
        ttl: answer.ttl(),
        revision: answer.header().map(|h| h.revision()),
        sent_at,
    };
    waiting.remove().waiters.answer(&Ok(kept));
}

/// Writes lease `id` on the stream; never resolves while there is no stream or nothing to send.
async fn send(keeper: Option<&mut LeaseKeeper>, id: Option<i64>) -> Result<(), etcd_client::Error> {
    match (keeper, id) {
        (Some(keeper), Some(id)) => {
            keeper.id = id;
            // Cancel-safe: a send dropped half-way sends nothing, and the id stays queued.
            keeper.keep_alive().await
        }
        _ => std::future::pending().await,
    }
}

/// The next answer on the stream; never resolves while there is no stream.
async fn read(
    answers: Option<&mut LeaseKeepAliveStream>,
) -> Result<Option<LeaseKeepAliveResponse>, etcd_client::Error> {
    match answers {
        Some(answers) => answers.message().await,
        None => std::future::pending().await,
    }
}

/// Opens the stream with a keep-alive of lease `id` (etcd-client sends one and reads its
/// answer). `Err(Ok(..))` when etcd says the lease is gone: that renewal has its answer, and
/// the next one opens the stream.
async fn open_stream(
    client: &Client,
    tries: usize,
    id: i64,
) -> Result<Stream, Result<KeptAlive, StoreError>> {
    let mut left = tries;
    loop {
        match client.lease_client().keep_alive(id).await {
            Ok((keeper, answers)) => return Ok(Stream { keeper, answers }),
            Err(etcd_client::Error::LeaseKeepAliveError(why)) if why == "lease not found" => {
                return Err(Ok(KeptAlive {
                    ttl: 0,
                    revision: None,
                    sent_at: Instant::now(),
                }))
            }
            Err(error) if left > 1 && Retry::IfConnectionBroke.allows(&error) => left -= 1,
            Err(error) => return Err(Err(store_error("lease keep-alive", error))),
        }
    }
}

/// The stream broke (`error`) or etcd closed it (`None`): every renewal waiting on it fails,
/// retryably (the store could not be reached: the key actor tries again on its next tick), and
/// the next renewal opens a new stream.
fn broken(
    stream: &mut Option<Stream>,
    pending: &mut HashMap<i64, Pending>,
    unsent: &mut VecDeque<i64>,
    error: Option<etcd_client::Error>,
) {
    let context = "the etcd lease keep-alive stream broke";
    let error = match error {
        Some(error) => StoreError::unavailable_because(context, error),
        None => StoreError::unavailable(context),
    };
    tracing::debug!(%error, "the next renewal reopens the keep-alive stream");
    *stream = None;
    unsent.clear();
    let failed = Err(error);
    for (_, waiting) in pending.drain() {
        waiting.waiters.answer(&failed);
    }
}
