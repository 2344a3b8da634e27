//! Liveness across cluster nodes in separate OS processes: a node in a child process (this
//! test binary, started again) takes a lock through this process's gateway, then goes
//! silent — paused with SIGSTOP, or cut off by a TCP relay that stops forwarding without
//! closing either side. The gateway releases its lease once the liveness bound has passed,
//! a third party here is granted the key with a larger token, and the child's lease had
//! stopped being held before that grant (compared on the machine's monotonic clock, which
//! both processes read). A child that is merely busy keeps its lock.

#[path = "support/child.rs"]
mod child;
#[path = "support/cluster_node.rs"]
mod cluster_node;

use std::sync::Arc;
use std::time::Duration;

use child::{commands, expect_command, report, var, ChildTest};
use cluster_node::{node, LOOPBACK};
use leasehold::cluster::{
    ClusterGateway, GatewayOptions, RemoteAcquire, RemoteHolder, RemoteLockClient, RemoteLockEvent,
};
use leasehold::testing::{eventually, unique_key};
use leasehold::{
    LockClient, LockEventKind, LockManager, LockOptions, MemoryBackend, ReleaseReason,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::NodeServerMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

/// Gateways in one process share ractor's process groups, and a child would see every one
/// of them through its node connection: the tests run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const COOKIE: &str = "leasehold-process-cookie";
/// The gateway's liveness bound in these tests.
const BOUND: Duration = Duration::from_secs(2);
const LIMIT: Duration = Duration::from_secs(20);

/// `at` on the machine's monotonic clock (CLOCK_MONOTONIC, which `Instant` reads on Linux),
/// in nanoseconds: comparable between processes on one machine.
fn monotonic_ns(at: Instant) -> i128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, which lives on this stack.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(read, 0, "clock_gettime");
    let now_ns = i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec);
    let here = Instant::now();
    if at <= here {
        now_ns - (here - at).as_nanos() as i128
    } else {
        now_ns + (at - here).as_nanos() as i128
    }
}

/// This process's side: node A with a manager and a gateway of bound [`BOUND`].
struct Gateway {
    server: ActorRef<NodeServerMessage>,
    port: u16,
    locks: LockClient,
    events: broadcast::Receiver<leasehold::LockEvent>,
}

impl Gateway {
    async fn start() -> Gateway {
        let (server, port) = node("gateway", COOKIE).await;
        let locks = LockManager::builder()
            .with_name(format!("process-{}", unique_key("m").replace('/', "-")))
            .with_backend("memory", MemoryBackend::new())
            .start()
            .await
            .unwrap();
        let events = locks.events();
        ClusterGateway::start_with_options(
            &locks,
            GatewayOptions::new().with_liveness_bound(BOUND),
        )
        .await
        .unwrap();
        Gateway {
            server,
            port,
            locks,
            events,
        }
    }

    /// Waits for the gateway to release `key` for its holder's silence.
    async fn released_for_silence(&mut self, key: &str) {
        leasehold::testing::next_event(&mut self.events, LIMIT, |event| {
            (event.key.as_deref() == Some(key)
                && matches!(
                    event.kind,
                    LockEventKind::Released {
                        reason: ReleaseReason::HolderSilent,
                        ..
                    }
                ))
            .then_some(())
        })
        .await;
    }

    /// A third party on this node takes `key` at once; the instant before it asked, and the
    /// token.
    async fn third_party_takes(&self, key: &str) -> (Instant, u64) {
        let asked = Instant::now();
        let guard = self
            .locks
            .try_lock(key, LockOptions::new())
            .await
            .unwrap()
            .expect("the key is free once the gateway released it");
        let token = guard.fencing_token();
        guard.release().await.unwrap();
        (asked, token)
    }

    async fn stop(self) {
        self.locks.shutdown().await;
        self.server.stop_and_wait(None, None).await.unwrap();
    }
}

fn spawn_child(mode: &str, port: u16, key: &str) -> ChildTest {
    ChildTest::spawn(
        "remote_holder_child",
        &[
            ("LEASEHOLD_TEST_MODE", mode.to_owned()),
            ("LEASEHOLD_TEST_PORT", port.to_string()),
            ("LEASEHOLD_TEST_KEY", key.to_owned()),
        ],
    )
}

fn number(fields: &std::collections::HashMap<String, String>, name: &str) -> i128 {
    fields[name].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_loses_its_lease_before_anyone_else_gets_it() {
    let _serial = SERIAL.lock().await;
    let mut gateway = Gateway::start().await;
    let key = unique_key("paused");
    let mut child = spawn_child("pause", gateway.port, &key);
    let acquired = child.next_tagged("acquired", LIMIT, |_| {}).await;
    let token = number(&acquired, "token");

    child.stop();
    gateway.released_for_silence(&key).await;
    let (asked, taken) = gateway.third_party_takes(&key).await;
    assert!(i128::from(taken) > token, "{taken} after {token}");
    child.resume();

    // The first look the child takes after its pause finds the lease un-held, and its
    // deadline had passed before the third party asked.
    let resumed = child
        .next_tagged("resumed", LIMIT, |other| {
            assert!(!other.starts_with("violation"), "{other}")
        })
        .await;
    assert_eq!(resumed["held"], "false");
    assert!(number(&resumed, "deadline_ns") < monotonic_ns(asked));
    let reports = child.finish(LIMIT).await;
    assert!(
        reports.iter().all(|r| !r.starts_with("violation")),
        "{reports:?}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_without_its_connection_closing_loses_its_lease_first() {
    let _serial = SERIAL.lock().await;
    let mut gateway = Gateway::start().await;
    let (flowing, relay_port) = relay(gateway.port).await;
    let key = unique_key("partitioned");
    let mut child = spawn_child("partition", relay_port, &key);
    let acquired = child.next_tagged("acquired", LIMIT, |_| {}).await;
    let token = number(&acquired, "token");

    let cut = Instant::now();
    flowing.send_replace(false);
    let lost = child.next_tagged("lost", LIMIT, |_| {}).await;
    gateway.released_for_silence(&key).await;
    let released = cut.elapsed();
    let (asked, taken) = gateway.third_party_takes(&key).await;
    // Measured, not asserted: from the cut to the release and to the new grant.
    eprintln!(
        "bound {BOUND:?}: cut → released {released:?}, → granted elsewhere {:?}",
        cut.elapsed()
    );
    assert!(i128::from(taken) > token, "{taken} after {token}");
    assert!(
        number(&lost, "at_ns") < monotonic_ns(asked),
        "the child stopped trusting its lease before the third party asked"
    );
    child.send("check").await;
    let check = child.next_tagged("check", LIMIT, |_| {}).await;
    assert_eq!(check["held"], "false");
    child.finish(LIMIT).await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_node_keeps_its_lease() {
    let _serial = SERIAL.lock().await;
    let mut gateway = Gateway::start().await;
    let key = unique_key("busy");
    let mut child = spawn_child("busy", gateway.port, &key);
    let acquired = child.next_tagged("acquired", LIMIT, |_| {}).await;
    let token = number(&acquired, "token") as u64;

    // Both cores busy in the child for longer than the bound.
    child.send("busy").await;
    let done = child
        .next_tagged("busy-done", LIMIT, |other| {
            assert!(!other.starts_with("lost"), "{other}")
        })
        .await;
    assert_eq!(done["held"], "true", "{done:?}");
    assert!(number(&done, "busy_ms") > BOUND.as_millis() as i128);
    let info = gateway.locks.info(&key).await.unwrap().expect("still held");
    assert_eq!(info.fencing_token, token);
    while let Ok(event) = gateway.events.try_recv() {
        assert!(
            !matches!(event.kind, LockEventKind::Released { .. }),
            "{event:?}"
        );
    }
    child.finish(LIMIT).await;
    gateway.stop().await;
}

/// A TCP relay on a loopback port to `to`, forwarding while `flowing` says so. Stopped, it
/// holds what it reads and writes nothing, and closes nothing: to both sides the connection
/// is open and silent.
async fn relay(to: u16) -> (watch::Sender<bool>, u16) {
    let listener = tokio::net::TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (flowing, _) = watch::channel(true);
    let gate = flowing.subscribe();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect((LOOPBACK, to))
                .await
                .unwrap();
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::spawn(forward(in_read, out_write, gate.clone()));
            tokio::spawn(forward(out_read, in_write, gate.clone()));
        }
    });
    (flowing, port)
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else {
            return;
        };
        if read == 0 {
            return;
        }
        // Partitioned: hold the bytes, forever if need be.
        if gate.wait_for(|flowing| *flowing).await.is_err() {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The child's side.

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

/// The child: a node that connects to the gateway's node (at `LEASEHOLD_TEST_PORT`), takes
/// `LEASEHOLD_TEST_KEY` for a holder actor, and then, by `LEASEHOLD_TEST_MODE`:
/// - `pause`: looks at its lease every 5 ms; the first look after a pause longer than the
///   bound reports `resumed held=… deadline_ns=…` (and `violation` if it was still held);
/// - `partition`: reports `lost at_ns=…` when its lease stops being trusted, and
///   `check held=…` when asked;
/// - `busy`: when told, keeps both cores busy for longer than the bound, then reports
///   `busy-done held=… busy_ms=…`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of the tests above"]
async fn remote_holder_child() {
    let mode = var("LEASEHOLD_TEST_MODE");
    let port: u16 = var("LEASEHOLD_TEST_PORT").parse().unwrap();
    let key = var("LEASEHOLD_TEST_KEY");
    let mut commands = commands();
    let (server, _) = node("holder", COOKIE).await;
    ractor_cluster::client_connect(&server, (LOOPBACK, port))
        .await
        .unwrap();
    let mut gateway = None;
    eventually("the gateway is visible", LIMIT, || {
        gateway = RemoteLockClient::remote_gateways().pop();
        std::future::ready(gateway.is_some())
    })
    .await;
    let gateway = gateway.unwrap();
    let (holder, _) = Actor::spawn(None, Holder, ()).await.unwrap();
    let remote_holder = RemoteHolder::join(&holder.get_cell());
    let lease = gateway
        .acquire(RemoteAcquire::new(&key, &remote_holder))
        .await
        .unwrap()
        .expect("the key is free");
    report(&format!("acquired token={}", lease.fencing_token));
    let lease = Arc::new(lease);
    match mode.as_str() {
        "pause" => {
            let mut last = Instant::now();
            let looking = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let now = Instant::now();
                    let held = lease.is_held();
                    if now - last > BOUND {
                        if held {
                            report("violation held after a pause past the bound");
                        }
                        let deadline_ns = monotonic_ns(lease.deadline());
                        report(&format!("resumed held={held} deadline_ns={deadline_ns}"));
                        return;
                    }
                    last = now;
                }
            };
            looking.await;
        }
        "partition" => {
            let reason = lease.lost().await;
            let at_ns = monotonic_ns(Instant::now());
            report(&format!("lost at_ns={at_ns} reason={reason:?}"));
            expect_command(&mut commands, "check").await;
            report(&format!("check held={}", lease.is_held()));
        }
        "busy" => {
            let watching = {
                let lease = lease.clone();
                tokio::spawn(async move {
                    let reason = lease.lost().await;
                    report(&format!("lost reason={reason:?}"));
                })
            };
            expect_command(&mut commands, "busy").await;
            let started = std::time::Instant::now();
            let spin = BOUND + BOUND / 2;
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut x = 0u64;
                        while started.elapsed() < spin {
                            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                        }
                        x
                    })
                })
                .collect();
            for worker in workers {
                worker.join().unwrap();
            }
            let busy_ms = started.elapsed().as_millis();
            report(&format!(
                "busy-done held={} busy_ms={busy_ms}",
                lease.is_held()
            ));
            watching.abort();
        }
        other => panic!("unknown mode {other}"),
    }
    // Wait for the parent to close stdin; then leave.
    let _ = commands.next_line().await;
    drop(lease);
    // Bounded: after a partition the node's connection may never drain.
    let _ = tokio::time::timeout(LIMIT, server.stop_and_wait(None, None)).await;
}
