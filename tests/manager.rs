//! The manager itself: configuration, several named backends, lookup by name, and the event
//! outputs (ractor `OutputPort` and the broadcast channel).

use std::time::Duration;

use leasehold::testing::{eventually, next_event, start, unique_key};
use leasehold::{
    Error, LockClient, LockEvent, LockEventKind, LockManager, LockManagerMsg, LockOptions,
    MemoryBackend, ReleaseReason,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

#[tokio::test]
async fn a_manager_needs_at_least_one_backend() {
    let err = LockManager::builder()
        .with_name(unique_key("no-backend"))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
}

#[tokio::test]
async fn a_backend_name_used_twice_is_named_in_the_error() {
    let err = LockManager::builder()
        .with_name(unique_key("twice"))
        .with_backend("store-a", MemoryBackend::new())
        .with_backend("store-a", MemoryBackend::new())
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("store-a"), "{err}");
}

#[tokio::test]
async fn an_unknown_default_backend_is_named_in_the_error() {
    let err = LockManager::builder()
        .with_name(unique_key("default"))
        .with_backend("memory", MemoryBackend::new())
        .with_default_backend("redis-eu")
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnknownBackend { name, known } if name == "redis-eu" && known == &["memory"]),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_second_manager_under_a_taken_name_is_refused() {
    let name = unique_key("taken");
    let first = LockManager::builder()
        .with_name(name.clone())
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await
        .unwrap();
    let err = LockManager::builder()
        .with_name(name.clone())
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&name), "{err}");
    first.shutdown().await;
}

#[tokio::test]
async fn two_backends_of_one_kind_hold_the_same_key_independently() {
    let client = LockManager::builder()
        .with_name(unique_key("two-stores"))
        .with_backend("east", MemoryBackend::new())
        .with_backend("west", MemoryBackend::new())
        .start()
        .await
        .unwrap();
    assert_eq!(client.backend_name(), "east");
    let west = client.backend("west").unwrap();
    let key = unique_key("shared-name");
    let in_east = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let in_west = west
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((in_east.backend(), in_west.backend()), ("east", "west"));
    assert!(client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .is_none());
    assert!(west
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .is_none());
    in_east.release().await.unwrap();
    assert!(!client.is_locked(&key).await.unwrap());
    assert!(west.is_locked(&key).await.unwrap());
    drop(in_west);
    client.shutdown().await;
}

#[tokio::test]
async fn connect_finds_a_manager_by_its_registered_name() {
    let name = unique_key("registered");
    let started = LockManager::builder()
        .with_name(name.clone())
        .with_backend("memory", MemoryBackend::new())
        .start()
        .await
        .unwrap();
    let found = LockClient::connect(&name).await.unwrap();
    let key = unique_key("connect");
    let guard = found
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert!(started.is_locked(&key).await.unwrap());
    drop(guard);
    started.shutdown().await;
    // Stopped, it is no longer registered.
    let gone = LockClient::connect(&name).await.unwrap_err();
    assert!(matches!(&gone, Error::ManagerNotFound { name: n } if *n == name));
    assert!(gone.to_string().contains(&name), "{gone}");
}

/// An application actor that collects the events it is sent.
struct Collector;

impl Actor for Collector {
    type Msg = LockEvent;
    type State = mpsc::UnboundedSender<LockEvent>;
    type Arguments = mpsc::UnboundedSender<LockEvent>;

    async fn pre_start(
        &self,
        _: ActorRef<LockEvent>,
        out: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(out)
    }

    async fn handle(
        &self,
        _: ActorRef<LockEvent>,
        event: LockEvent,
        out: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = out.send(event);
        Ok(())
    }
}

#[tokio::test]
async fn a_subscribed_actor_sees_a_lock_lifecycle_in_order() {
    let client = start(MemoryBackend::new()).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (collector, _) = Actor::spawn(None, Collector, tx).await.unwrap();
    let manager = client.manager();
    ractor::cast!(manager, LockManagerMsg::Subscribe(collector.clone())).unwrap();
    // The subscription is in place once the manager has handled the message before this call.
    client.is_locked("sync").await.unwrap();
    let key = unique_key("lifecycle");
    let guard = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event within 5 s")
            .expect("collector alive");
        if event.key.as_deref() != Some(key.as_str()) {
            continue;
        }
        assert_eq!(&*event.backend, "store");
        kinds.push(event.kind.clone());
        if !matches!(event.kind, LockEventKind::Requested) {
            assert_eq!(event.fencing_token, Some(token));
        }
    }
    assert!(matches!(kinds[0], LockEventKind::Requested), "{kinds:?}");
    assert!(
        matches!(kinds[1], LockEventKind::Acquired { .. }),
        "{kinds:?}"
    );
    assert!(
        matches!(
            kinds[2],
            LockEventKind::Released {
                reason: ReleaseReason::Requested,
                ..
            }
        ),
        "{kinds:?}"
    );
    collector.stop(None);
    client.shutdown().await;
}

#[tokio::test]
async fn the_event_channel_reports_contention_and_waiting_time() {
    let client = start(MemoryBackend::new()).await;
    let mut events = client.events();
    let key = unique_key("waited");
    let held = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let waiter = {
        let (client, key) = (client.clone(), key.clone());
        tokio::spawn(async move { client.lock(&key, LockOptions::new()).await })
    };
    next_event(&mut events, Duration::from_secs(5), |e| {
        matches!(e.kind, LockEventKind::Contended).then_some(())
    })
    .await;
    let hold = Duration::from_millis(50);
    tokio::time::sleep(hold).await;
    drop(held);
    let waited = next_event(&mut events, Duration::from_secs(5), |e| match e.kind {
        LockEventKind::Acquired { waited } => Some(waited),
        _ => None,
    })
    .await;
    assert!(waited >= hold, "waited {waited:?}");
    let guard = waiter.await.unwrap().unwrap();
    drop(guard);
    eventually("key free", Duration::from_secs(5), || async {
        !client.is_locked(&key).await.unwrap()
    })
    .await;
    client.shutdown().await;
}

#[tokio::test]
async fn metrics_count_acquisitions_contention_and_releases() {
    let client = start(MemoryBackend::new()).await;
    let key = unique_key("metrics");
    let guard = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert!(client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .is_none());
    let during = client.metrics();
    assert_eq!(
        (during.requested, during.acquired, during.held()),
        (2, 1, 1)
    );
    assert!(during.contended >= 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    guard.release().await.unwrap();
    let after = client.metrics();
    assert_eq!((after.released, after.lost, after.held()), (1, 0, 0));
    assert!(after.total_hold >= Duration::from_millis(20));
    client.shutdown().await;
}
