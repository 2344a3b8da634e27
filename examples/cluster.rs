//! Two ractor_cluster nodes on 127.0.0.1: a worker actor on node B takes a lock from the lock
//! manager on node A, releases it, takes it again and stops, and A releases the lock. A's lock
//! events are printed on B as they arrive.
//!
//! As two processes (a flag picks the role), in two terminals:
//!
//! ```text
//! cargo run --features cluster --example cluster -- gateway 7401
//! cargo run --features cluster --example cluster -- worker 127.0.0.1:7401
//! ```
//!
//! The gateway runs until Ctrl-C; pause the worker (Ctrl-Z) while it holds the lock for longer
//! than the gateway's liveness bound (5 s here) and the gateway releases it, saying
//! `HolderSilent`. Without a role, `cargo run --features cluster --example cluster` runs both
//! nodes in one process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use leasehold::cluster::{
    ClusterGateway, GatewayOptions, RemoteAcquire, RemoteEvent, RemoteHolder, RemoteLockClient,
    RemoteLockEvent,
};
use leasehold::{LockClient, LockManager, MemoryBackend};
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

async fn start_node(
    name: &str,
    port: Option<u16>,
) -> Result<(ActorRef<NodeServerMessage>, u16), Error> {
    // The port given, or a free loopback one; the node listens on loopback only.
    let port = match port {
        Some(port) => port,
        None => TcpListener::bind((LOOPBACK, 0))?.local_addr()?.port(),
    };
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

/// Node A's side: a lock manager and its cluster gateway, on `port`.
async fn gateway_node(
    port: Option<u16>,
) -> Result<(ActorRef<NodeServerMessage>, u16, LockClient), Error> {
    let (node, port) = start_node("node-a", port).await?;
    let locks = LockManager::builder()
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await?;
    ClusterGateway::start_with_options(
        &locks,
        GatewayOptions::new().with_liveness_bound(Duration::from_secs(5)),
    )
    .await?;
    Ok((node, port, locks))
}

/// Node B's side: connects to node A at `gateway`, finds A's lock gateway, and runs the worker.
async fn worker_node(gateway: SocketAddr) -> Result<(), Error> {
    let (node_b, _port_b) = start_node("node-b", None).await?;
    ractor_cluster::client_connect(&node_b, gateway).await?;
    let mut remote = None;
    within_5s("node A's gateway visible on node B", || {
        remote = RemoteLockClient::remote_gateways().pop();
        remote.is_some()
    })
    .await?;
    let remote = remote.expect("found");
    println!("[node B] found node A's lock gateway");
    work(&remote).await?;
    // Let the last events reach node B, then stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    node_b.stop_and_wait(None, None).await?;
    Ok(())
}

/// The worker's part, on node B, through node A's gateway.
async fn work(remote: &RemoteLockClient) -> Result<(), Error> {
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
        "[node B] worker holds {key:?} with fencing token {}; held here: {} (trusted for {:?} \
         past the last heartbeat node A answered)",
        lease.fencing_token,
        lease.is_held(),
        lease.deadline() - tokio::time::Instant::now(),
    );
    lease.release().await?;
    println!("[node B] worker released it by message");

    let lease = remote.acquire(request).await?.ok_or("key was held")?;
    println!(
        "[node B] worker holds it again, token {}; now the worker stops",
        lease.fencing_token
    );
    worker.stop(None);
    for _ in 0..500 {
        if !remote.is_locked(None, key).await? {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if remote.is_locked(None, key).await? {
        return Err("node A kept the stopped worker's lock".into());
    }
    println!("[node A] the lock went with its holder");
    printer.stop(None);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["gateway", port] => {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("the port {port:?} is not a number from 1 to 65535"))?;
            let (node_a, port, locks) = gateway_node(Some(port)).await?;
            println!("[node A] lock gateway on 127.0.0.1:{port}; Ctrl-C stops it");
            let mut events = locks.events();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = async {
                    while let Ok(event) = events.recv().await {
                        println!("[node A] {:?} {:?}", event.key, event.kind);
                    }
                } => {}
            }
            locks.shutdown().await;
            node_a.stop_and_wait(None, None).await?;
        }
        ["worker", gateway] => {
            let gateway: SocketAddr = gateway
                .parse()
                .map_err(|_| format!("the address {gateway:?} is not IP:PORT"))?;
            worker_node(gateway).await?;
        }
        [] => {
            // Both nodes in this process.
            let (node_a, port_a, locks) = gateway_node(None).await?;
            worker_node(SocketAddr::new(LOOPBACK, port_a)).await?;
            locks.shutdown().await;
            node_a.stop_and_wait(None, None).await?;
        }
        _ => return Err("usage: cluster [gateway PORT | worker IP:PORT]".into()),
    }
    Ok(())
}
