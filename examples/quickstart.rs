//! Zero set-up tour of leasehold on the in-process backend: `cargo run --example quickstart`.
//!
//! Three worker actors contend for one key by message. The first holds it for three times its
//! ttl (auto-renew keeps it alive), the others wait for it by release notice and are served in
//! the order they asked. A subscriber actor prints every lifecycle event.

use std::time::{Duration, Instant};

use leasehold::{
    Fence, LockEvent, LockEventKind, LockManager, LockManagerMsg, LockOptions, MemoryBackend, Wait,
};
use ractor::{call, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;

const KEY: &str = "jobs/nightly";
const TTL: Duration = Duration::from_millis(300);

/// Prints lifecycle events as they happen.
struct EventPrinter;

impl Actor for EventPrinter {
    type Msg = LockEvent;
    type State = Instant;
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<LockEvent>,
        _: (),
    ) -> Result<Instant, ActorProcessingErr> {
        Ok(Instant::now())
    }

    async fn handle(
        &self,
        _: ActorRef<LockEvent>,
        event: LockEvent,
        started: &mut Instant,
    ) -> Result<(), ActorProcessingErr> {
        let what = match &event.kind {
            LockEventKind::Requested => "requested".to_owned(),
            LockEventKind::Acquired { waited } => format!("acquired after waiting {waited:.1?}"),
            LockEventKind::Contended => "contended: someone else holds it".to_owned(),
            LockEventKind::Renewed { .. } => "renewed".to_owned(),
            LockEventKind::Released { held_for, reason } => {
                format!("released after {held_for:.1?} ({reason:?})")
            }
            other => format!("{other:?}"),
        };
        let token = event
            .fencing_token
            .map(|t| format!(" token {t}"))
            .unwrap_or_default();
        println!(
            "  [event {:>4} ms] {}:{}{token} {what}",
            started.elapsed().as_millis(),
            event.backend,
            event.key.as_deref().unwrap_or("-"),
        );
        Ok(())
    }
}

/// An application actor that takes the lock, works while holding it, and gives it back.
struct Worker;

struct WorkerArgs {
    manager: ActorRef<LockManagerMsg>,
    fence: Arc<Fence>,
}

enum WorkerMsg {
    /// Take the lock, hold it for this long, answer with the fencing token used.
    Work(Duration, RpcReplyPort<u64>),
}

#[cfg(feature = "cluster")]
impl ractor::Message for WorkerMsg {}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerArgs;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        _: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        WorkerMsg::Work(hold, reply): WorkerMsg,
        state: &mut WorkerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let name = myself.get_name().unwrap_or_default();
        // Naming this actor as holder: if it stopped or panicked, the lock would go with it.
        let options = LockOptions::new()
            .with_ttl(TTL)
            .with_wait(Wait::UpTo(Duration::from_secs(10)))
            .with_holder(myself.clone())
            .with_metadata(format!("{name} on the quickstart node"));
        let guard = call!(state.manager, |reply| LockManagerMsg::Acquire {
            backend: None,
            key: KEY.into(),
            options,
            reply,
        })??
        .expect("waiting acquisitions answer with a guard");
        let token = guard.fencing_token();
        println!("{name}: holding {KEY} with fencing token {token} for {hold:?} (ttl {TTL:?})");
        // The protected resource checks the token: a stale holder could not write.
        state.fence.accept(token)?;
        tokio::time::sleep(hold).await;
        assert!(guard.is_held(), "auto-renew keeps the lease past its ttl");
        guard.release().await?;
        println!("{name}: released {KEY}");
        let _ = reply.send(token);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let locks = LockManager::builder()
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await?;
    let (printer, printer_done) = Actor::spawn(None, EventPrinter, ()).await?;
    locks.subscribe(printer.clone(), Some);

    let fence = Arc::new(Fence::new());
    let mut workers = Vec::new();
    for (i, hold) in [TTL * 3, TTL / 3, TTL / 3].into_iter().enumerate() {
        let args = WorkerArgs {
            manager: locks.manager().clone(),
            fence: fence.clone(),
        };
        let (worker, _) = Actor::spawn(Some(format!("worker-{i}")), Worker, args).await?;
        workers.push((worker, hold));
    }
    // All three ask at once; the key's FIFO queue decides who goes next.
    let asks = workers.iter().map(|(worker, hold)| async move {
        worker
            .call(|reply| WorkerMsg::Work(*hold, reply), None)
            .await
    });
    let mut tokens = Vec::new();
    for answer in futures::future::join_all(asks).await {
        tokens.push(answer?.success_or("worker stopped before answering")?);
    }
    println!("fencing tokens, in worker order: {tokens:?}");

    locks.shutdown().await;
    for (worker, _) in workers {
        worker.stop_and_wait(None, None).await?;
    }
    // Let the printer finish the events already sent to it, then stop.
    printer.drain()?;
    printer_done.await?;
    println!("done: every worker held {KEY} in turn, none at the same time");
    Ok(())
}
