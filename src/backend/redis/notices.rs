//! The pub/sub side of the Redis backend: one task per backend owns the pub/sub connection and
//! fans release notices out to the local waiters (see the parent module's `# Waiting`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use redis::aio::{PubSubSink, PubSubStream};
use redis::{PushKind, RedisError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::cluster::Sharded;
use super::connection::Conn;
use super::{store_error, PUBSUB_TIMEOUT};
use crate::error::StoreError;

/// The pub/sub side of one backend (and its clones): the task that owns the pub/sub
/// connection, started on the first subscription.
pub(super) struct NoticeHub {
    conn: Conn,
    pub(super) addr: String,
    next_id: AtomicU64,
    task: Mutex<Option<HubTask>>,
}

struct HubTask {
    commands: mpsc::UnboundedSender<HubCommand>,
    handle: JoinHandle<()>,
}

enum HubCommand {
    Subscribe {
        channel: String,
        id: u64,
        notices: mpsc::Sender<()>,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    Unsubscribe {
        channel: String,
        id: u64,
    },
}

impl NoticeHub {
    pub(super) fn new(conn: Conn, addr: String) -> Self {
        NoticeHub {
            conn,
            addr,
            next_id: AtomicU64::new(0),
            task: Mutex::new(None),
        }
    }

    fn task(&self) -> MutexGuard<'_, Option<HubTask>> {
        // Every update under this lock is a single assignment: a panic cannot leave it torn.
        self.task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The running task's command queue, starting the task if it is not running.
    fn commands(&self) -> mpsc::UnboundedSender<HubCommand> {
        let mut task = self.task();
        match task.as_ref() {
            Some(running) if !running.commands.is_closed() => running.commands.clone(),
            _ => {
                let (commands, queue) = mpsc::unbounded_channel();
                let handle = tokio::spawn(run_hub(self.conn.clone(), self.addr.clone(), queue));
                *task = Some(HubTask {
                    commands: commands.clone(),
                    handle,
                });
                commands
            }
        }
    }

    pub(super) async fn subscribe(&self, channel: String) -> Result<Notices, StoreError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Capacity 1: notices that arrive while one is pending add nothing (the waiter
        // re-checks the key once either way).
        let (notices, rx) = mpsc::channel(1);
        let (done, answer) = oneshot::channel();
        let commands = self.commands();
        let gone = || StoreError::unavailable("the release-notice task stopped");
        commands
            .send(HubCommand::Subscribe {
                channel: channel.clone(),
                id,
                notices,
                done,
            })
            .map_err(|_| gone())?;
        // Built before the answer comes, so that dropping this future while it waits still
        // unsubscribes.
        let stream = Notices {
            rx,
            channel,
            id,
            commands,
        };
        // The task bounds each of its steps; this bounds the wait behind other requests too.
        let budget = PUBSUB_TIMEOUT * 2;
        match timeout(budget, answer).await {
            Ok(Ok(Ok(()))) => Ok(stream),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(StoreError::TimedOut {
                op: "subscribe",
                after: budget,
            }),
        }
    }
}

impl Drop for NoticeHub {
    fn drop(&mut self) {
        // The last clone of the backend is gone: nobody can subscribe any more.
        if let Some(task) = self.task().take() {
            task.handle.abort();
        }
    }
}

/// One subscriber's release notices. Dropping it unsubscribes.
pub(super) struct Notices {
    rx: mpsc::Receiver<()>,
    channel: String,
    id: u64,
    commands: mpsc::UnboundedSender<HubCommand>,
}

impl Stream for Notices {
    type Item = ();

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        let _ = self.commands.send(HubCommand::Unsubscribe {
            channel: std::mem::take(&mut self.channel),
            id: self.id,
        });
    }
}

/// The task that owns the pub/sub connection.
struct Hub {
    conn_to: Conn,
    addr: String,
    /// `None` until the first subscription, and again after the connection broke.
    conn: Option<Listener>,
    /// Channel → its local subscribers. A channel is in this map exactly while the connection
    /// is subscribed to it.
    channels: HashMap<String, Vec<(u64, mpsc::Sender<()>)>>,
}

/// The hub's pub/sub connection.
pub(super) enum Listener {
    /// `SUBSCRIBE` on one connection to one server (a single server, a Sentinel primary).
    Plain(PubSubSink, PubSubStream),
    /// `SSUBSCRIBE` through a cluster connection of its own (Redis Cluster): each channel on
    /// its shard.
    Sharded(Sharded),
}

enum HubEvent {
    Command(HubCommand),
    Heard(Heard),
}

/// What the pub/sub connection said.
enum Heard {
    /// A notice on this channel.
    Notice(String),
    /// The server dropped the subscription to this channel itself (its slot moved to another
    /// shard): notices on it no longer come.
    Dropped(String),
    /// The connection broke, or one of a cluster's node connections did: every subscription
    /// may have missed notices.
    Closed,
}

async fn run_hub(conn_to: Conn, addr: String, mut commands: mpsc::UnboundedReceiver<HubCommand>) {
    let mut hub = Hub {
        conn_to,
        addr,
        conn: None,
        channels: HashMap::new(),
    };
    loop {
        let event = tokio::select! {
            command = commands.recv() => match command {
                Some(command) => HubEvent::Command(command),
                None => return,
            },
            heard = next_heard(&mut hub.conn) => HubEvent::Heard(heard),
        };
        match event {
            HubEvent::Command(HubCommand::Subscribe {
                channel,
                id,
                notices,
                done,
            }) => {
                let result = hub.subscribe(channel, id, notices).await;
                let _ = done.send(result);
            }
            HubEvent::Command(HubCommand::Unsubscribe { channel, id }) => {
                hub.unsubscribe(&channel, id).await;
            }
            HubEvent::Heard(Heard::Notice(channel)) => {
                if let Some(subscribers) = hub.channels.get(&channel) {
                    for (_, notices) in subscribers {
                        // Full: a notice is already pending. Closed: its stream was dropped
                        // and the unsubscribe is on its way.
                        let _ = notices.try_send(());
                    }
                }
            }
            HubEvent::Heard(Heard::Dropped(channel)) => {
                // Its streams end, and their waiters look again and subscribe anew (on the
                // slot's new shard). Nothing more is subscribed to it here.
                if hub.channels.remove(&channel).is_some() {
                    hub.send_unsubscribe(&channel).await;
                }
            }
            HubEvent::Heard(Heard::Closed) => {
                tracing::warn!(addr = %hub.addr, "redis pub/sub connection closed; release notices end until the next subscription");
                hub.disconnect();
            }
        }
    }
}

/// What the connection says next; never, while there is no connection.
async fn next_heard(conn: &mut Option<Listener>) -> Heard {
    match conn {
        Some(Listener::Plain(_, stream)) => match stream.next().await {
            Some(message) => Heard::Notice(message.get_channel_name().to_owned()),
            None => Heard::Closed,
        },
        Some(Listener::Sharded(sharded)) => loop {
            let Some(push) = sharded.pushes.recv().await else {
                return Heard::Closed;
            };
            let channel = || match push.data.first() {
                Some(redis::Value::BulkString(name)) => {
                    Some(String::from_utf8_lossy(name).into_owned())
                }
                _ => None,
            };
            match push.kind {
                PushKind::SMessage => {
                    if let Some(channel) = channel() {
                        return Heard::Notice(channel);
                    }
                }
                PushKind::SUnsubscribe => {
                    if let Some(channel) = channel() {
                        return Heard::Dropped(channel);
                    }
                }
                PushKind::Disconnection => return Heard::Closed,
                // Our own subscriptions confirmed, and the like.
                _ => {}
            }
        },
        None => std::future::pending().await,
    }
}

impl Hub {
    async fn subscribe(
        &mut self,
        channel: String,
        id: u64,
        notices: mpsc::Sender<()>,
    ) -> Result<(), StoreError> {
        if let Some(subscribers) = self.channels.get_mut(&channel) {
            // Already subscribed for another local waiter: one Redis subscription serves both.
            subscribers.push((id, notices));
            return Ok(());
        }
        if self.conn.is_none() {
            // A dedicated connection: one in SUBSCRIBE mode can run nothing but (un)subscribe
            // commands, so it cannot be the multiplexed one the scripts use.
            // On Sentinel: on the primary the sentinels name now.
            let connecting = timeout(PUBSUB_TIMEOUT, self.conn_to.listener());
            self.conn = match connecting.await {
                Ok(Ok(listener)) => Some(listener),
                Ok(Err(error)) => return Err(self.failed("connect", error)),
                Err(_) => return Err(self.timed_out("connect")),
            };
        }
        // SUBSCRIBE returns once the server confirms: from then on every PUBLISH on the
        // channel reaches us, so the waiter's re-check after this cannot miss a release.
        let subscribing = async {
            match self.conn.as_mut().expect("connected above") {
                Listener::Plain(sink, _) => sink.subscribe(&channel).await,
                Listener::Sharded(sharded) => sharded.conn.ssubscribe(&channel).await,
            }
        };
        match timeout(PUBSUB_TIMEOUT, subscribing).await {
            Ok(Ok(())) => {
                self.channels.insert(channel, vec![(id, notices)]);
                Ok(())
            }
            Ok(Err(error)) => {
                let error = self.failed("subscribe", error);
                if error.is_retryable() {
                    self.disconnect();
                }
                Err(error)
            }
            Err(_) => {
                self.disconnect();
                Err(self.timed_out("subscribe"))
            }
        }
    }

    async fn unsubscribe(&mut self, channel: &str, id: u64) {
        let Some(subscribers) = self.channels.get_mut(channel) else {
            return;
        };
        subscribers.retain(|(subscriber, _)| *subscriber != id);
        if !subscribers.is_empty() {
            return;
        }
        self.channels.remove(channel);
        self.send_unsubscribe(channel).await;
    }

    /// UNSUBSCRIBE, so the server stops sending this node notices nobody here waits for. A
    /// connection that cannot even do that is replaced on the next subscription.
    async fn send_unsubscribe(&mut self, channel: &str) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let unsubscribing = async {
            match conn {
                Listener::Plain(sink, _) => sink.unsubscribe(channel).await,
                Listener::Sharded(sharded) => sharded.conn.sunsubscribe(channel).await,
            }
        };
        if !matches!(timeout(PUBSUB_TIMEOUT, unsubscribing).await, Ok(Ok(()))) {
            self.disconnect();
        }
    }

    /// Drops the connection and ends every stream: their subscriptions went with it, and the
    /// waiters' backstop timers take over.
    fn disconnect(&mut self) {
        self.conn = None;
        self.channels.clear();
    }

    fn failed(&self, op: &str, error: RedisError) -> StoreError {
        store_error(format!("redis pub/sub {op} at {}", self.addr), error)
    }

    fn timed_out(&self, op: &str) -> StoreError {
        StoreError::unavailable(format!(
            "redis pub/sub {op} at {} did not answer within {PUBSUB_TIMEOUT:?}",
            self.addr
        ))
    }
}
