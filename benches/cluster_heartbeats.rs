//! What keeping remote leases alive costs: a gateway node (manager on the memory backend,
//! `ClusterGateway`) in this process, and a remote node in a second OS process (this bench
//! started again) that holds 1,000 leases through the gateway, each for a holder actor of its
//! own. The CPU time of each process, every thread (`/proc/PID/task/*/schedstat`, in
//! nanoseconds), is read over windows in which nothing but keeping the leases alive happens,
//! and printed as a percentage of one core, the median of the rounds:
//!
//! - (a) connected nodes, no lease, no liveness session: the baseline;
//! - (b) 1,000 leases with a ttl of an hour: no renewal falls in a window, so only the
//!   heartbeats of the node's liveness session (one every quarter of the bound, for all its
//!   leases) run;
//! - (c) as (b), with a task on the remote node awaiting each lease's `lost()`: every
//!   heartbeat's answer moves the deadline those tasks wait for;
//! - (d) 1,000 leases with a ttl of 30 s: the gateway's node also renews each every 10 s.
//!
//! Run: `cargo bench --features cluster --bench cluster_heartbeats`; `-- --bound SECS` sets
//! the gateway's liveness bound (default 10 s), `--leases N`, `--rounds N`, `--window SECS`.
//! The target: the heartbeat traffic for 1,000 remote leases costs under 1% of one
//! core, on each side.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use leasehold::cluster::{
    ClusterGateway, GatewayOptions, RemoteAcquire, RemoteHolder, RemoteLease, RemoteLockClient,
    RemoteLockEvent,
};
use leasehold::{LockEventKind, LockManager, MemoryBackend};
use leasehold_bench_support::cpu;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const COOKIE: &str = "leasehold-bench-cookie";
/// Set in the remote node's environment: the gateway node's port.
const REMOTE: &str = "LEASEHOLD_BENCH_GATEWAY_PORT";

struct Args {
    bound: Duration,
    leases: usize,
    rounds: usize,
    window: Duration,
}

fn args() -> Args {
    let given: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        given
            .iter()
            .position(|a| a == name)
            .and_then(|i| given.get(i + 1))
            .map(|v| {
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
            })
    };
    Args {
        bound: Duration::from_secs_f64(value("--bound").unwrap_or(10.0)),
        leases: value("--leases").map_or(1000, |n| n as usize),
        rounds: value("--rounds").map_or(5, |n| n as usize),
        window: Duration::from_secs_f64(value("--window").unwrap_or(10.0)),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    match std::env::var(REMOTE) {
        Ok(port) => remote(port.parse().expect("gateway port")).await,
        Err(_) => gateway(args()).await,
    }
}

fn free_port() -> u16 {
    TcpListener::bind((LOOPBACK, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn node(name: &str, port: u16) -> ActorRef<NodeServerMessage> {
    let server = NodeServer::new(
        port,
        COOKIE.into(),
        name.into(),
        "127.0.0.1".into(),
        None,
        None,
    )
    .with_listen_addr(LOOPBACK);
    Actor::spawn(None, server, ()).await.expect("node server").0
}

/// CPU time of every thread of process `pid` so far: the first field of each thread's
/// `schedstat` (nanoseconds on the CPU). Threads that ended are not counted: both processes
/// keep their threads (tokio's workers) for the whole run.
fn cpu_of(pid: u32) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process is running");
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path().join("schedstat");
            let stat = std::fs::read_to_string(path).ok()?;
            stat.split_whitespace().next()?.parse().ok()
        })
        .map(Duration::from_nanos)
        .sum()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// This process: node A, the manager and the gateway; it starts node B and measures.
async fn gateway(args: Args) {
    let port = free_port();
    let server = node("gateway", port).await;
    let locks = LockManager::builder()
        .with_name("bench-cluster-heartbeats")
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await
        .expect("manager");
    ClusterGateway::start_with_options(
        &locks,
        GatewayOptions::new().with_liveness_bound(args.bound),
    )
    .await
    .expect("gateway");
    let mut child = Command::new(std::env::current_exe().expect("this bench's path"))
        .env(REMOTE, port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the remote node");
    let remote_pid = child.id().expect("remote node's pid");
    let mut to_remote = child.stdin.take().unwrap();
    let mut from_remote = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut expect = async |line: &str| {
        let got = from_remote.next_line().await.expect("read the remote node");
        assert_eq!(got.as_deref(), Some(line), "the remote node says {line}");
    };
    expect("connected").await;

    println!(
        "cluster heartbeats: {} remote leases, liveness bound {:?} (a heartbeat every {:?}), \
         {} rounds of {:?}; load {}",
        args.leases,
        args.bound,
        args.bound / 4,
        args.rounds,
        args.window,
        cpu::loadavg()
    );
    println!(
        "{:<44} {:>14} {:>14} {:>12}",
        "scenario", "gateway node", "remote node", "renewals/s"
    );
    let mut events = locks.events();
    let here = std::process::id();
    let scenarios = [
        ("(a) connected, no lease", None, false),
        (
            "(b) leases, ttl 1 h: heartbeats only",
            Some(3_600_000),
            false,
        ),
        (
            "(c) as (b), a task awaiting each lost()",
            Some(3_600_000),
            true,
        ),
        (
            "(d) leases, ttl 30 s: heartbeats + renewals",
            Some(30_000),
            false,
        ),
    ];
    for (name, ttl_ms, watched) in scenarios {
        if let Some(ttl_ms) = ttl_ms {
            let command = format!("acquire {} {ttl_ms} {watched}\n", args.leases);
            to_remote.write_all(command.as_bytes()).await.unwrap();
            expect("held").await;
        }
        // Let the acquisitions' after-effects (advertised holder groups, timers) settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (mut ours, mut theirs, mut renewals) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            while events.try_recv().is_ok() {}
            let (ours_before, theirs_before) = (cpu_of(here), cpu_of(remote_pid));
            let started = std::time::Instant::now();
            tokio::time::sleep(args.window).await;
            let elapsed = started.elapsed().as_secs_f64();
            let (ours_after, theirs_after) = (cpu_of(here), cpu_of(remote_pid));
            let mut renewed = 0;
            while let Ok(event) = events.try_recv() {
                renewed += usize::from(matches!(event.kind, LockEventKind::Renewed { .. }));
            }
            ours.push((ours_after - ours_before).as_secs_f64() / elapsed * 100.0);
            theirs.push((theirs_after - theirs_before).as_secs_f64() / elapsed * 100.0);
            renewals.push(renewed as f64 / elapsed);
        }
        println!(
            "{name:<44} {:>12.3} % {:>12.3} % {:>12.1}",
            median(ours),
            median(theirs),
            median(renewals)
        );
        if ttl_ms.is_some() {
            to_remote.write_all(b"release\n").await.unwrap();
            expect("released").await;
        }
    }
    println!("(CPU time of each process, every thread, per second of wall time, median of the rounds; load {})", cpu::loadavg());
    drop(to_remote);
    child.wait().await.expect("the remote node ends");
    locks.shutdown().await;
    server.stop_and_wait(None, None).await.unwrap();
}

/// A remote holder that ignores the events it is sent.
struct Holder;

impl Actor for Holder {
    type Msg = RemoteLockEvent;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<RemoteLockEvent>,
        (): (),
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

/// The second process: node B. Says `connected` once it sees the gateway; on `acquire N
/// TTL_MS WATCHED` takes N leases, each for a holder actor of its own (and, if WATCHED is
/// `true`, a task awaiting its `lost()`), and says `held`; on `release` releases them and says
/// `released`; ends when its stdin closes.
async fn remote(port: u16) {
    let server = node("remote", free_port()).await;
    ractor_cluster::client_connect(&server, (LOOPBACK, port))
        .await
        .expect("connect to the gateway's node");
    let gateway = loop {
        if let Some(gateway) = RemoteLockClient::remote_gateways().pop() {
            break gateway;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("connected");
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    let mut held: Vec<(Arc<RemoteLease>, ActorRef<RemoteLockEvent>)> = Vec::new();
    let mut watchers = tokio::task::JoinSet::new();
    while let Ok(Some(line)) = commands.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["acquire", count, ttl_ms, watched] => {
                let count: usize = count.parse().unwrap();
                let ttl = Duration::from_millis(ttl_ms.parse().unwrap());
                let run = rand::random::<u64>();
                for chunk in (0..count).collect::<Vec<_>>().chunks(100) {
                    let taken = chunk.iter().map(|i| {
                        let gateway = gateway.clone();
                        async move {
                            let (holder, _) = Actor::spawn(None, Holder, ()).await.unwrap();
                            let request = RemoteAcquire::new(
                                format!("bench/{run:016x}/{i:05}"),
                                &RemoteHolder::join(&holder.get_cell()),
                            )
                            .with_ttl(ttl);
                            let lease = gateway.acquire(request).await.expect("acquire");
                            (Arc::new(lease.expect("a free key")), holder)
                        }
                    });
                    held.extend(futures::future::join_all(taken).await);
                }
                assert!(held.iter().all(|(lease, _)| lease.is_held()));
                if *watched == "true" {
                    for (lease, _) in &held {
                        let lease = lease.clone();
                        watchers.spawn(async move { lease.lost().await });
                    }
                }
                println!("held");
            }
            ["release"] => {
                watchers.abort_all();
                while watchers.join_next().await.is_some() {}
                let releases = held.drain(..).map(|(lease, holder)| async move {
                    let lease = Arc::into_inner(lease).expect("no other user of the lease");
                    lease.release().await.expect("release");
                    holder.stop(None);
                });
                futures::future::join_all(releases).await;
                println!("released");
            }
            other => panic!("unknown command {other:?}"),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), server.stop_and_wait(None, None)).await;
}
