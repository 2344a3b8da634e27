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
//! When the stream breaks, every renewal waiting on it fails with a retryable store error (the
//! key actor tries again on its next tick, and says `Lost` at its deadline if the outage lasts),
//! and the next renewal opens a new stream.

use std::collections::{HashMap, VecDeque};

use etcd_client::{Client, LeaseKeepAliveResponse, LeaseKeepAliveStream, LeaseKeeper};
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

async fn run(client: Client, tries: usize, mut asks: mpsc::UnboundedReceiver<Ask>) {
    let mut stream: Option<Stream> = None;
    // Renewals waiting for etcd's answer, by lease id: one request on the stream answers all.
    let mut waiting: HashMap<i64, Vec<Answer>> = HashMap::new();
    // Lease ids to write on the stream, in order.
    let mut unsent: VecDeque<i64> = VecDeque::new();
    // When the task began writing the first of `unsent` (a write may be cancelled and begun
    // again: the first beginning counts), and when each id in flight was written.
    let mut writing_since: Option<Instant> = None;
    let mut sent: HashMap<i64, Instant> = HashMap::new();
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
            Event::Ask(Some(Ask { id, answer })) => {
                if stream.is_none() {
                    match open_stream(&client, tries, id).await {
                        Ok(opened) => stream = Some(opened),
                        Err(outcome) => {
                            let _ = answer.send(outcome);
                            continue;
                        }
                    }
                }
                let answers = waiting.entry(id).or_default();
                if answers.is_empty() {
                    unsent.push_back(id);
                }
                answers.push(answer);
            }
            Event::Sent(Ok(())) => {
                if let Some(id) = unsent.pop_front() {
                    let since = writing_since.take().unwrap_or_else(Instant::now);
                    sent.insert(id, since);
                }
            }
            Event::Sent(Err(error)) | Event::Answer(Err(error)) => {
                broken(&mut stream, &mut waiting, &mut unsent, Some(error));
                (writing_since, sent) = (None, HashMap::new());
            }
            Event::Answer(Ok(None)) => {
                broken(&mut stream, &mut waiting, &mut unsent, None);
                (writing_since, sent) = (None, HashMap::new());
            }
            Event::Answer(Ok(Some(answer))) => {
                let Some(sent_at) = sent.remove(&answer.id()) else {
                    // Not an answer to a keep-alive this task wrote: the stream's opening one.
                    continue;
                };
                let kept = KeptAlive {
                    ttl: answer.ttl(),
                    revision: answer.header().map(|h| h.revision()),
                    sent_at,
                };
                for waiter in waiting.remove(&answer.id()).unwrap_or_default() {
                    let _ = waiter.send(Ok(kept));
                }
            }
        }
    }
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
    waiting: &mut HashMap<i64, Vec<Answer>>,
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
    for (_, answers) in waiting.drain() {
        for answer in answers {
            let _ = answer.send(Err(error.clone()));
        }
    }
}
