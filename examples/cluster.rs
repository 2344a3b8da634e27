//! Run with `cargo run --example cluster --features cluster`: two ractor_cluster nodes in one
//! process on 127.0.0.1; a worker actor on node B takes a lock from the lock manager on node A,
//! releases it, takes it again and stops, and A releases the lock. A's lock events are printed
//! on B as they arrive.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::time::Duration;

use leasehold::cluster::{
    ClusterGateway, RemoteAcquire, RemoteEvent, RemoteHolder, RemoteLockClient, RemoteLockEvent,
};
use leasehold::{LockManager, MemoryBackend};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

type Error = Box<dyn std::error::Error>;

/// An actor on node B that prints the lock events node A sends it. Its message type can cross
/// nodes, so it can also hold locks on A: the worker below is one.
struct Printer;

impl Actor for Printer {
    type Msg = RemoteLockEvent;
    type State = &'static str;
    type Arguments = &'static str;

    async fn pre_start(
        &self,
        _myself: ActorRef<RemoteLockEvent>,
        name: &'static str,
    ) -> Result<&'static str, ActorProcessingErr> {
        Ok(name)
    }

    async fn handle(
        &self,
        _myself: ActorRef<RemoteLockEvent>,
        msg: RemoteLockEvent,
        name: &mut &'static str,
    ) -> Result<(), ActorProcessingErr> {
        if let RemoteLockEvent::Event(RemoteEvent { key, kind, .. }) = msg {
            println!("[node B {name}] event from node A: {key:?} {kind:?}");
        }
        Ok(())
    }
}

async fn start_node(name: &str) -> Result<(ActorRef<NodeServerMessage>, u16), Error> {
    // A free loopback port; the node listens on loopback only.
    let port = TcpListener::bind((LOOPBACK, 0))?.local_addr()?.port();
    let server = NodeServer::new(
        port,
        "example-cookie".into(),
        name.into(),
        "127.0.0.1".into(),
        None,
        None,
    )
    .with_listen_addr(LOOPBACK);
    let (server, _join) = Actor::spawn(None, server, ()).await?;
    Ok((server, port))
}

/// Polls `f` every 10 ms for up to 5 s.
async fn within_5s<F: FnMut() -> bool>(what: &str, mut f: F) -> Result<(), Error> {
    for _ in 0..500 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("{what}: not within 5 s").into())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // Node A: a lock manager and its cluster gateway.
    let (node_a, port_a) = start_node("node-a").await?;
    let locks = LockManager::builder()
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await?;
    let gateway = ClusterGateway::start(&locks).await?;

    // Node B connects to A and finds A's gateway in the process group.
    let (node_b, _port_b) = start_node("node-b").await?;
    ractor_cluster::client_connect(&node_b, (LOOPBACK, port_a)).await?;
    let pid = gateway.get_id().pid();
    let mut remote = None;
    within_5s("node A's gateway visible on node B", || {
        // Both nodes share this process, so the stand-in carries the gateway's own pid.
        remote = RemoteLockClient::remote_gateways()
            .into_iter()
            .find(|g| g.gateway().get_id().pid() == pid);
        remote.is_some()
    })
    .await?;
    let remote = remote.expect("found");
    println!("[node B] found node A's lock gateway");

    let (printer, _) = Actor::spawn(None, Printer, "printer").await?;
    remote
        .subscribe(&RemoteHolder::join(&printer.get_cell()))
        .await?;
    let (worker, _) = Actor::spawn(None, Printer, "worker").await?;
    let holder = RemoteHolder::join(&worker.get_cell());

    let key = "reports/nightly";
    let request = RemoteAcquire::new(key, &holder).with_ttl(Duration::from_secs(10));
    let lease = remote
        .acquire(request.clone())
        .await?
        .ok_or("key was held")?;
    println!(
        "[node B] worker holds {key:?} with fencing token {}",
        lease.fencing_token
    );
    remote.release(&lease).await?;
    println!("[node B] worker released it by message");

    let lease = remote.acquire(request).await?.ok_or("key was held")?;
    println!(
        "[node B] worker holds it again, token {}; now the worker stops",
        lease.fencing_token
    );
    worker.stop(None);
    for _ in 0..500 {
        if !locks.is_locked(key).await? {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !locks.is_locked(key).await?,
        "node A kept the stopped worker's lock"
    );
    println!("[node A] the lock went with its holder");

    // Let the last events reach node B, then stop everything.
    tokio::time::sleep(Duration::from_millis(200)).await;
    locks.shutdown().await;
    node_b.stop_and_wait(None, None).await?;
    node_a.stop_and_wait(None, None).await?;
    Ok(())
}
