//! Two `ractor_cluster` nodes in one process, on loopback: an actor on node B takes locks
//! through node A's manager, and B's holder stopping or B's node going away releases them.
//!
//! Nodes in one process share ractor's registries, so the tests run one at a time (`SERIAL`)
//! and each shuts its nodes down before the next starts.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold::cluster::{
    ClusterGateway, GatewayOptions, RemoteAcquire, RemoteErrorKind, RemoteEvent, RemoteEventKind,
    RemoteHolder, RemoteLockClient, RemoteLockEvent, RemoteLockMsg, MANAGER_GROUP, PROCESS_GROUP,
};
use leasehold::testing::{eventually, unique_key};
use leasehold::{
    ErrorKind, LockBackend, LockClient, LockManager, LockOptions, MemoryBackend, ReleaseReason,
    RwMode, Wait, MAX_KEY_LEN,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PROMPT: Duration = Duration::from_secs(5);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A remote holder that also records the events it is sent.
struct Sink;

impl Actor for Sink {
    type Msg = RemoteLockEvent;
    type State = Arc<Mutex<Vec<RemoteEvent>>>;
    type Arguments = Arc<Mutex<Vec<RemoteEvent>>>;

    async fn pre_start(
        &self,
        _myself: ActorRef<RemoteLockEvent>,
        seen: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(seen)
    }

    async fn handle(
        &self,
        _myself: ActorRef<RemoteLockEvent>,
        msg: RemoteLockEvent,
        seen: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let RemoteLockEvent::Event(event) = msg else {
            return Ok(());
        };
        seen.lock().unwrap().push(event);
        Ok(())
    }
}

struct Node {
    server: ActorRef<NodeServerMessage>,
    port: u16,
}

impl Node {
    async fn start(name: &str) -> Node {
        // A free loopback port: ractor_cluster does not report the one it picks for port 0.
        let port = TcpListener::bind((LOOPBACK, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = NodeServer::new(
            port,
            "leasehold-test-cookie".into(),
            name.into(),
            "127.0.0.1".into(),
            None,
            None,
        )
        .with_listen_addr(LOOPBACK);
        let (server, _join) = Actor::spawn(None, server, ()).await.unwrap();
        Node { server, port }
    }

    async fn sessions(&self) -> usize {
        ractor::call_t!(self.server, NodeServerMessage::GetSessions, 1000)
            .map(|s| s.len())
            .unwrap_or(0)
    }

    async fn stop(self) {
        self.server.stop_and_wait(None, None).await.unwrap();
    }
}

/// Node A runs a manager and its gateway; node B connects to A.
struct Cluster {
    a: Node,
    b: Node,
    /// The manager on A.
    locks: LockClient,
    /// Its store, for entries put straight through the backend.
    memory: MemoryBackend,
    local_gateway: ActorRef<RemoteLockMsg>,
    /// A's gateway as node B reaches it: through the node connection.
    remote: RemoteLockClient,
}

impl Cluster {
    async fn start() -> Cluster {
        let a = Node::start("node-a").await;
        let b = Node::start("node-b").await;
        let memory = MemoryBackend::new();
        let locks = LockManager::builder()
            .with_name(format!(
                "cluster-test-{}",
                unique_key("m").replace('/', "-")
            ))
            .with_backend("memory", memory.clone())
            .start()
            .await
            .unwrap();
        let local_gateway = ClusterGateway::start(&locks).await.unwrap();
        ractor_cluster::client_connect(&b.server, (LOOPBACK, a.port))
            .await
            .unwrap();
        eventually("nodes connected", PROMPT, || async {
            a.sessions().await == 1 && b.sessions().await == 1
        })
        .await;
        // The group lists A's gateway through the connection once the nodes synchronised.
        // (One process: the stand-in carries the gateway's own pid.)
        let pid = local_gateway.get_id().pid();
        let mut found = None;
        eventually("A's gateway visible on B", PROMPT, || {
            found = RemoteLockClient::remote_gateways()
                .into_iter()
                .find(|g| g.gateway().get_id().pid() == pid);
            std::future::ready(found.is_some())
        })
        .await;
        Cluster {
            a,
            b,
            locks,
            memory,
            local_gateway,
            remote: found.unwrap(),
        }
    }

    async fn stop(self) {
        self.locks.shutdown().await;
        // The gateway goes with its manager.
        self.local_gateway
            .get_cell()
            .wait(Some(PROMPT))
            .await
            .expect("gateway stops with the manager");
        self.b.stop().await;
        self.a.stop().await;
    }
}

type Seen = Arc<Mutex<Vec<RemoteEvent>>>;

/// An actor "on node B" (in this process, any local actor: it is the node connection that
/// makes A's gateway see it as remote) that can hold locks and records events.
async fn spawn_holder() -> (ActorRef<RemoteLockEvent>, RemoteHolder, Seen) {
    let seen = Seen::default();
    let (actor, _join) = Actor::spawn(None, Sink, seen.clone()).await.unwrap();
    let holder = RemoteHolder::join(&actor.get_cell());
    (actor, holder, seen)
}

fn released_because(seen: &Mutex<Vec<RemoteEvent>>, key: &str) -> Option<ReleaseReason> {
    seen.lock().unwrap().iter().find_map(|e| match e.kind {
        RemoteEventKind::Released { reason, .. } if e.key.as_deref() == Some(key) => Some(reason),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_is_in_its_group_and_gateway_in_the_cluster_group() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let manager = cluster.locks.manager().get_id();
    let managers = ractor::pg::get_members(&MANAGER_GROUP.to_owned());
    assert!(managers.iter().any(|m| m.get_id() == manager));
    let gateway = cluster.local_gateway.get_id();
    let gateways = ractor::pg::get_members(&PROCESS_GROUP.to_owned());
    assert!(gateways.iter().any(|g| g.get_id() == gateway));
    let name = cluster.local_gateway.get_name().unwrap();
    assert!(ractor::registry::where_is(name).is_some());
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_actor_acquires_sees_token_and_releases() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (_actor, holder, _seen) = spawn_holder().await;
    let key = unique_key("remote");
    let lease = cluster
        .remote
        .acquire(RemoteAcquire::new(&key, &holder).with_metadata("from node B"))
        .await
        .unwrap()
        .expect("free key");
    assert_eq!(lease.key, key);
    assert_eq!(lease.backend, "memory");
    let info = cluster.locks.info(&key).await.unwrap().unwrap();
    assert_eq!(info.fencing_token, lease.fencing_token);
    assert_eq!(info.metadata.as_deref(), Some("from node B"));
    assert!(cluster.remote.is_locked(None, &key).await.unwrap());
    let remote_info = cluster.remote.info(None, &key).await.unwrap().unwrap();
    assert_eq!(remote_info.fencing_token, lease.fencing_token);
    // A second try, from the same holder or another, finds it held.
    let (_other, other_holder, _) = spawn_holder().await;
    let again = cluster
        .remote
        .acquire(RemoteAcquire::new(&key, &other_holder))
        .await
        .unwrap();
    assert!(again.is_none());
    cluster
        .remote
        .renew(&lease, Duration::from_secs(20))
        .await
        .unwrap();
    cluster.remote.release(&lease).await.unwrap();
    assert!(!cluster.locks.is_locked(&key).await.unwrap());
    // Released once: the second release fails as it does locally.
    let err = cluster.remote.release(&lease).await.unwrap_err();
    assert_eq!(
        err.kind,
        RemoteErrorKind::Manager(ErrorKind::NotHeld),
        "{err}"
    );
    // The next holder gets a greater token.
    let next = cluster
        .remote
        .acquire(RemoteAcquire::new(&key, &other_holder))
        .await
        .unwrap()
        .unwrap();
    assert!(next.fencing_token > lease.fencing_token);
    cluster.remote.release(&next).await.unwrap();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_holder_stopping_releases_its_lock() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (actor, holder, seen) = spawn_holder().await;
    cluster.remote.subscribe(&holder).await.unwrap();
    let (_watcher, watcher_holder, watched) = spawn_holder().await;
    cluster.remote.subscribe(&watcher_holder).await.unwrap();
    let key = unique_key("holder-stops");
    let opts = RemoteAcquire::new(&key, &holder).with_ttl(Duration::from_secs(30));
    cluster.remote.acquire(opts).await.unwrap().unwrap();
    eventually("subscriber told of the acquisition", PROMPT, || {
        let acquired = seen
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e.kind, RemoteEventKind::Acquired { .. }));
        std::future::ready(acquired)
    })
    .await;
    actor.stop(None);
    // Well inside the 30 s ttl: the release came from the holder's death, not expiry.
    eventually(
        "key freed after the remote holder stopped",
        PROMPT,
        || async { !cluster.locks.is_locked(&key).await.unwrap() },
    )
    .await;
    eventually("Released event says why", PROMPT, || {
        std::future::ready(released_because(&watched, &key) == Some(ReleaseReason::HolderStopped))
    })
    .await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_node_shutting_down_releases_its_locks() {
    let _serial = SERIAL.lock().await;
    let Cluster {
        a,
        b,
        locks,
        memory: _,
        local_gateway: _,
        remote,
    } = Cluster::start().await;
    let (_actor, holder, _seen) = spawn_holder().await;
    let mut events = locks.events();
    let key = unique_key("node-goes");
    let opts = RemoteAcquire::new(&key, &holder).with_ttl(Duration::from_secs(30));
    remote.acquire(opts).await.unwrap().unwrap();
    assert!(locks.is_locked(&key).await.unwrap());
    b.stop().await;
    // The session ends as soon as the connection closes, so well inside the 30 s ttl.
    // (ractor_cluster's pings end no session: a peer that goes silent without closing the
    // connection is the gateway's liveness bound's case, tested in cluster_process.rs.)
    eventually("key freed after node B went away", PROMPT, || async {
        !locks.is_locked(&key).await.unwrap()
    })
    .await;
    let reason = loop {
        let event = tokio::time::timeout(PROMPT, events.recv())
            .await
            .unwrap()
            .unwrap();
        if let leasehold::LockEventKind::Released { reason, .. } = event.kind {
            if event.key.as_deref() == Some(&*key) {
                break reason;
            }
        }
    };
    assert_eq!(reason, ReleaseReason::HolderStopped);
    locks.shutdown().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_same_errors_remotely() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (_actor, holder, _seen) = spawn_holder().await;
    let long = "k".repeat(MAX_KEY_LEN + 1);
    let ok = LockOptions::new();
    let cases = vec![
        (RemoteAcquire::new("", &holder), None, "", ok.clone()),
        (RemoteAcquire::new(&long, &holder), None, &*long, ok.clone()),
        (
            RemoteAcquire::new("a\nb", &holder),
            None,
            "a\nb",
            ok.clone(),
        ),
        (
            RemoteAcquire::new("k", &holder).with_ttl(Duration::ZERO),
            None,
            "k",
            ok.clone().with_ttl(Duration::ZERO),
        ),
        (
            RemoteAcquire::new("k", &holder).with_metadata("m".repeat(4096)),
            None,
            "k",
            ok.clone().with_metadata("m".repeat(4096)),
        ),
        (
            RemoteAcquire::new("k", &holder).with_backend("no-such-store"),
            Some("no-such-store".to_owned()),
            "k",
            ok.clone(),
        ),
    ];
    let manager = cluster.locks.manager();
    for (case, backend, key, options) in cases {
        // The same request, locally.
        let local = ractor::call!(manager, |reply| leasehold::LockManagerMsg::Acquire {
            backend,
            key: key.to_owned(),
            options,
            reply,
        })
        .unwrap()
        .unwrap_err();
        let remote = cluster.remote.acquire(case).await.unwrap_err();
        assert_eq!(remote.kind, RemoteErrorKind::from(&local));
        assert_eq!(remote.message, local.to_string());
        assert!(
            remote.is_invalid_input() && !remote.is_retryable(),
            "{remote}"
        );
    }
    let err = cluster.remote.is_locked(None, "").await.unwrap_err();
    assert_eq!(err.kind, RemoteErrorKind::Manager(ErrorKind::EmptyKey));
    let err = cluster
        .remote
        .info(Some("no-such-store"), "k")
        .await
        .unwrap_err();
    assert_eq!(
        err.kind,
        RemoteErrorKind::Manager(ErrorKind::UnknownBackend)
    );
    assert!(err.message.contains("no-such-store"), "{err}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_waiter_gets_the_lock_when_it_is_released() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (_actor, holder, _seen) = spawn_holder().await;
    let key = unique_key("wait");
    let local = cluster
        .locks
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let remote = cluster.remote.clone();
    let request = RemoteAcquire::new(&key, &holder).with_wait(Wait::UpTo(PROMPT));
    let waiter = tokio::spawn(async move { remote.acquire(request).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    let token = local.fencing_token();
    local.release().await.unwrap();
    let lease = waiter.await.unwrap().unwrap().unwrap();
    assert!(lease.fencing_token > token);
    cluster.remote.release(&lease).await.unwrap();
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_the_gateway_cannot_see_is_refused() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    // A holder whose message type cannot cross nodes is never advertised to node A.
    let (local_only, _join) = Actor::spawn(None, LocalOnly, ()).await.unwrap();
    let holder = RemoteHolder::join(&local_only.get_cell());
    let key = unique_key("unseen");
    let err = cluster
        .remote
        .acquire(RemoteAcquire::new(&key, &holder))
        .await
        .unwrap_err();
    assert_eq!(err.kind, RemoteErrorKind::HolderNotFound, "{err}");
    assert!(err.is_invalid_input());
    assert!(!cluster.locks.is_locked(&key).await.unwrap());
    let err = cluster.remote.subscribe(&holder).await.unwrap_err();
    assert_eq!(err.kind, RemoteErrorKind::HolderNotFound, "{err}");
    cluster.stop().await;
}

/// An actor whose messages stay on its node.
struct LocalOnly;

struct LocalMsg;

impl ractor::Message for LocalMsg {}

impl Actor for LocalOnly {
    type Msg = LocalMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<LocalMsg>,
        _: (),
    ) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_renewed_by_the_remote_holder_expires_when_renewals_stop() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (_actor, holder, _seen) = spawn_holder().await;
    let key = unique_key("self-renewed");
    let ttl = Duration::from_millis(400);
    let request = RemoteAcquire::new(&key, &holder)
        .with_ttl(ttl)
        .with_auto_renew(false);
    let lease = cluster.remote.acquire(request).await.unwrap().unwrap();
    // Renewals from the holder's side keep it past several ttls...
    for _ in 0..4 {
        tokio::time::sleep(ttl / 2).await;
        cluster.remote.renew(&lease, ttl).await.unwrap();
    }
    assert!(cluster.locks.is_locked(&key).await.unwrap());
    // ...and when they stop (a silent node), the lease runs out at its ttl.
    eventually("key freed once renewals stopped", ttl * 5, || async {
        !cluster.locks.is_locked(&key).await.unwrap()
    })
    .await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_actor_takes_renews_and_releases_a_semaphores_permits() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (_actor, holder, _seen) = spawn_holder().await;
    let name = unique_key("remote-semaphore");
    let lease = cluster
        .remote
        .acquire(RemoteAcquire::new(&name, &holder).with_permits(3, 2))
        .await
        .unwrap()
        .expect("3 free");
    assert_eq!(lease.key, name);
    let semaphore = cluster.locks.semaphore(&name, 3).unwrap();
    let holders = semaphore.holders().await.unwrap();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].fencing_token, lease.fencing_token);
    assert_eq!(holders[0].permits.count, 2);
    // One permit is left: two more are refused, one is granted.
    let (_other, other_holder, _) = spawn_holder().await;
    let two = RemoteAcquire::new(&name, &other_holder).with_permits(3, 2);
    assert!(cluster.remote.acquire(two).await.unwrap().is_none());
    cluster
        .remote
        .renew(&lease, Duration::from_secs(20))
        .await
        .unwrap();
    cluster.remote.release(&lease).await.unwrap();
    assert!(semaphore.holders().await.unwrap().is_empty());
    // Another N while nobody holds it: the new N holds; a bad count is refused.
    let bad = RemoteAcquire::new(&name, &other_holder).with_permits(3, 4);
    let err = cluster.remote.acquire(bad).await.unwrap_err();
    assert_eq!(
        err.kind,
        RemoteErrorKind::Manager(ErrorKind::InvalidPermitCount),
        "{err}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_actors_take_read_shares_and_the_write_hold_of_a_rwlock() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (_actor, holder, _seen) = spawn_holder().await;
    let (_other, other_holder, _) = spawn_holder().await;
    let name = unique_key("remote-rwlock");
    let read = |holder| RemoteAcquire::new(&name, holder).with_rw(RwMode::Read);
    let first = cluster.remote.acquire(read(&holder)).await.unwrap();
    let first = first.expect("nothing held");
    let second = cluster.remote.acquire(read(&other_holder)).await.unwrap();
    let second = second.expect("readers share");
    assert_eq!(first.key, name);
    // Readers hold: a writer is refused, here and on the manager's own node.
    let write = RemoteAcquire::new(&name, &other_holder).with_rw(RwMode::Write);
    assert!(cluster
        .remote
        .acquire(write.clone())
        .await
        .unwrap()
        .is_none());
    let rw = cluster.locks.rwlock(&name).unwrap();
    assert!(rw.try_write(LockOptions::new()).await.unwrap().is_none());
    cluster
        .remote
        .renew(&first, Duration::from_secs(20))
        .await
        .unwrap();
    cluster.remote.release(&first).await.unwrap();
    cluster.remote.release(&second).await.unwrap();
    let writer = cluster.remote.acquire(write).await.unwrap();
    let writer = writer.expect("the readers let go");
    assert!(writer.fencing_token > second.fencing_token);
    assert!(rw.try_read(LockOptions::new()).await.unwrap().is_none());
    cluster.remote.release(&writer).await.unwrap();
    let bad = RemoteAcquire::new("", &holder).with_rw(RwMode::Read);
    let err = cluster.remote.acquire(bad).await.unwrap_err();
    assert_eq!(
        err.kind,
        RemoteErrorKind::Manager(ErrorKind::EmptyRwLockName),
        "{err}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liveness_bound_out_of_range_is_refused_naming_it() {
    let _serial = SERIAL.lock().await;
    // The group is process-wide: the last test's gateways, and their stand-ins on the other
    // node, leave it as their actors stop, which may come just after that test returned.
    let members = || ractor::pg::get_members(&PROCESS_GROUP.to_owned());
    eventually("the last test's gateways out of the group", PROMPT, || {
        let empty = members().is_empty();
        async move { empty }
    })
    .await;
    let locks = LockManager::builder()
        .with_name(format!(
            "cluster-bound-{}",
            unique_key("m").replace('/', "-")
        ))
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await
        .unwrap();
    for (bound, shown) in [
        (Duration::ZERO, "0ns"),
        (Duration::from_millis(99), "99ms"),
        (Duration::from_secs(3601), "3601s"),
    ] {
        let refused = ClusterGateway::start_with_options(
            &locks,
            GatewayOptions::new().with_liveness_bound(bound),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::InvalidConfig);
        assert!(refused.to_string().contains(shown), "{refused}");
    }
    assert!(members().is_empty(), "a refused gateway joined the group");
    locks.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_handed_to_another_remote_holder_outlives_the_first() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (first, first_holder, _) = spawn_holder().await;
    let (second, second_holder, _) = spawn_holder().await;
    let (_watcher, watcher_holder, watched) = spawn_holder().await;
    cluster.remote.subscribe(&watcher_holder).await.unwrap();
    let key = unique_key("hand-over");
    let opts = RemoteAcquire::new(&key, &first_holder).with_ttl(Duration::from_secs(30));
    let lease = cluster.remote.acquire(opts).await.unwrap().unwrap();
    lease.hand_over(&second_holder).await.unwrap();
    eventually("HandedOver event with the same token", PROMPT, || {
        let handed = watched.lock().unwrap().iter().any(|e| {
            e.kind == RemoteEventKind::HandedOver
                && e.key.as_deref() == Some(key.as_str())
                && e.fencing_token == Some(lease.fencing_token)
        });
        std::future::ready(handed)
    })
    .await;
    first.stop(None);
    // The first holder's stand-in on node A goes once node A hears of the stop; after that,
    // a round trip through the key actor (a renewal) shows the lease was kept.
    eventually("the first holder's stand-in gone", PROMPT, || {
        let members = ractor::pg::get_members(&first_holder.to_string());
        std::future::ready(members.iter().all(|m| m.get_id().is_local()))
    })
    .await;
    cluster
        .remote
        .renew(&lease, Duration::from_secs(30))
        .await
        .unwrap();
    let info = cluster.locks.info(&key).await.unwrap().expect("still held");
    assert_eq!(info.fencing_token, lease.fencing_token);
    second.stop(None);
    eventually("key freed after the new holder stopped", PROMPT, || async {
        !cluster.locks.is_locked(&key).await.unwrap()
    })
    .await;
    eventually("Released event says why", PROMPT, || {
        std::future::ready(released_because(&watched, &key) == Some(ReleaseReason::HolderStopped))
    })
    .await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_taken_at_once_share_one_liveness_session() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (_actor, holder, _seen) = spawn_holder().await;
    // The client's first acquisitions, all at once: one liveness session (one heartbeat
    // task) serves them all, so their leases are trusted until one deadline.
    let taken = (0..20).map(|i| {
        let request = RemoteAcquire::new(unique_key(&format!("at-once-{i}")), &holder);
        cluster.remote.acquire(request)
    });
    let leases: Vec<_> = futures::future::join_all(taken)
        .await
        .into_iter()
        .map(|lease| lease.unwrap().expect("a free key"))
        .collect();
    // Read one after another, the deadlines could straddle a heartbeat's answer: look again.
    eventually("every lease has the session's deadline", PROMPT, || {
        let first = leases[0].deadline();
        std::future::ready(leases.iter().all(|lease| lease.deadline() == first))
    })
    .await;
    for lease in leases {
        lease.release().await.unwrap();
    }
    cluster.stop().await;
}

/// The fair option travels with a remote acquisition: a fair lock is granted as usual; and
/// while a fair reader's place is first in a read-write lock's queue (put there straight
/// through the store, as by a reader that has not come back yet) and nothing is held, a fair
/// remote writer that tries once gets nothing (it is not first), where an unfair one, which
/// ignores the queue, gets the write hold. With the option dropped on the way, the fair ask
/// would be granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_acquire_carries_the_fair_option() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start().await;
    let (_actor, holder, _seen) = spawn_holder().await;
    let key = unique_key("remote-fair");
    let lease = cluster
        .remote
        .acquire(RemoteAcquire::new(&key, &holder).with_fair(true))
        .await
        .unwrap()
        .expect("free key");
    cluster.remote.release(&lease).await.unwrap();
    let name = unique_key("remote-fair-rw");
    let rwlock = cluster.locks.rwlock(&name).unwrap();
    let held = rwlock.try_write(LockOptions::new()).await.unwrap();
    let held = held.expect("the read-write lock is free");
    let place = leasehold::OwnerToken::random();
    let ttl = Duration::from_secs(60);
    let queued = cluster
        .memory
        .acquire_rw_fair(&name, place, ttl, RwMode::Read, None)
        .await
        .unwrap();
    assert!(
        matches!(queued, leasehold::Acquisition::Held(_)),
        "the reader's place is taken behind the writer: {queued:?}"
    );
    held.release().await.unwrap();
    let fair = cluster
        .remote
        .acquire(
            RemoteAcquire::new(&name, &holder)
                .with_rw(RwMode::Write)
                .with_fair(true),
        )
        .await
        .unwrap();
    assert!(
        fair.is_none(),
        "a fair remote writer went in ahead of the reader first in line: the fair option \
         did not travel"
    );
    let unfair = cluster
        .remote
        .acquire(RemoteAcquire::new(&name, &holder).with_rw(RwMode::Write))
        .await
        .unwrap()
        .expect("an unfair writer ignores the queue");
    cluster.remote.release(&unfair).await.unwrap();
    cluster.stop().await;
}
