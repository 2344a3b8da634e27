//! Leader election among three replica actors, on the in-process store: zero set-up.
//! Run with `cargo run --example election`.
//!
//! Each replica campaigns with its address; the first leads. An observer prints every change
//! of leader. The leader crashes (its actor panics): its leadership goes at once, with no
//! wait for the lease's ttl, and the next replica in campaign order takes over, in a higher
//! term. Then that one crashes too, and the last one leads.

use std::time::Duration;

use leasehold::{
    CampaignOptions, Candidacy, CandidateMsg, Leader, LockManager, MemoryBackend, Wait,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

/// A replica: leads when elected, and can be made to crash.
struct Replica;

enum ReplicaMsg {
    /// From the election.
    Election(CandidateMsg),
    /// Keep the candidacy (the replica's stake in the election) in the replica's state: it
    /// goes when the replica stops.
    Enlisted(Candidacy),
    /// A bug.
    Crash,
}

// With leasehold's `cluster` feature, ractor has no blanket `Message` impl: say it.
#[cfg(feature = "cluster")]
impl ractor::Message for ReplicaMsg {}

impl From<CandidateMsg> for ReplicaMsg {
    fn from(msg: CandidateMsg) -> Self {
        ReplicaMsg::Election(msg)
    }
}

struct ReplicaState {
    address: String,
    candidacy: Option<Candidacy>,
    /// Tells `main` which replica leads.
    leading: mpsc::UnboundedSender<(String, u64)>,
}

impl Actor for Replica {
    type Msg = ReplicaMsg;
    type State = ReplicaState;
    type Arguments = (String, mpsc::UnboundedSender<(String, u64)>);

    async fn pre_start(
        &self,
        _: ActorRef<ReplicaMsg>,
        (address, leading): Self::Arguments,
    ) -> Result<ReplicaState, ActorProcessingErr> {
        Ok(ReplicaState {
            address,
            candidacy: None,
            leading,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<ReplicaMsg>,
        msg: ReplicaMsg,
        state: &mut ReplicaState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ReplicaMsg::Enlisted(candidacy) => state.candidacy = Some(candidacy),
            ReplicaMsg::Election(CandidateMsg::Elected { term, .. }) => {
                println!("  {} : I lead, in term {term}", state.address);
                let _ = state.leading.send((state.address.clone(), term));
            }
            ReplicaMsg::Election(CandidateMsg::Demoted { term, reason, .. }) => {
                println!("  {} : demoted from term {term}: {reason}", state.address);
            }
            ReplicaMsg::Election(other) => println!("  {} : {other:?}", state.address),
            ReplicaMsg::Crash => {
                println!("  {} : crashing", state.address);
                return Err("the leader crashed".into());
            }
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = LockManager::builder()
        .with_name("election-example")
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await?;
    let election = client.election("orders/primary")?;

    // The observer prints each change, as every node would see it.
    let mut changes = election.observe().await?;
    let observer = tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(change) = changes.next().await {
            match change {
                Some(Leader { value, term, .. }) => {
                    println!("observer: {value} leads (term {term})")
                }
                None => println!("observer: nobody leads"),
            }
        }
    });

    let (leading, mut leaders) = mpsc::unbounded_channel();
    let options = CampaignOptions::new()
        .with_ttl(Duration::from_secs(10))
        .with_wait(Wait::Forever);
    let mut replicas = Vec::new();
    for i in 1..=3 {
        let address = format!("10.0.0.{i}:7000");
        let (replica, join) =
            Actor::spawn(None, Replica, (address.clone(), leading.clone())).await?;
        let candidacy = election.enlist(replica.clone(), address.clone(), options.clone())?;
        replica.cast(ReplicaMsg::Enlisted(candidacy))?;
        replicas.push((address, replica, join));
    }

    let mut last_term = 0;
    for _ in 0..2 {
        let (address, term) = leaders.recv().await.expect("a replica leads");
        assert!(term > last_term, "terms increase");
        last_term = term;
        let at = replicas.iter().position(|(a, ..)| *a == address).unwrap();
        let (_, replica, join) = replicas.remove(at);
        replica.cast(ReplicaMsg::Crash)?;
        join.await?;
    }
    let (address, term) = leaders.recv().await.expect("the last replica leads");
    assert!(term > last_term);
    println!("{address} leads in term {term}; shutting down");

    for (_, replica, join) in replicas {
        replica.stop(None);
        join.await?;
    }
    client.shutdown().await;
    observer.abort();
    Ok(())
}
