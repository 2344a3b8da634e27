//! The election part of the conformance suite: every backend that supports elections
//! (`campaign` in campaign order, `proclaim`, `observe`) passes these. Run them with
//! [`election_suite!`](crate::election_suite).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use super::{eventually, next_event, start, unique_key, PROMPT};
use crate::{
    CampaignOptions, CandidateMsg, Error, ErrorKind, Leader, LeaderChanges, LockBackend,
    LockEventKind, LostReason, Wait, MAX_ELECTION_VALUE_LEN,
};

/// Generates one `#[tokio::test]` per election test for the backend built by `$backend`, as
/// [`conformance_suite!`](crate::conformance_suite) does for the lock tests.
#[macro_export]
macro_rules! election_suite {
    (paused, $backend:expr) => {
        $crate::election_suite!(@all [start_paused = true], $backend);
    };
    (real, $backend:expr) => {
        $crate::election_suite!(@all [flavor = "multi_thread", worker_threads = 2], $backend);
    };
    (@all [$($attr:tt)*], $backend:expr) => {
        $crate::election_suite!(@each [$($attr)*], $backend,
            one_leader_at_a_time_and_terms_increase,
            resign_hands_over_in_campaign_order,
            proclaim_changes_the_value_in_the_same_term,
            observers_on_two_managers_see_the_same_sequence,
            leader_is_none_when_nobody_leads,
            candidate_actor_is_told_elected_and_its_stop_hands_over,
            candidate_actor_that_stops_while_waiting_is_withdrawn,
            bad_election_input_is_rejected_naming_the_value,
            leadership_taken_away_is_lost,
            observer_actor_is_sent_each_change,
            candidate_actor_is_told_demoted_when_its_leadership_ends,
        );
    };
    (@each $attr:tt, $backend:expr, $($name:ident),+ $(,)?) => {
        $( $crate::election_suite!(@one $attr, $backend, $name); )+
    };
    (@one [$($attr:tt)*], $backend:expr, $name:ident) => {
        #[tokio::test($($attr)*)]
        async fn $name() {
            $crate::testing::election::$name($backend).await;
        }
    };
}

fn opts() -> CampaignOptions {
    CampaignOptions::new().with_wait(Wait::UpTo(Duration::from_secs(20)))
}

async fn next_change(changes: &mut LeaderChanges) -> Option<Leader> {
    tokio::time::timeout(PROMPT, changes.next())
        .await
        .expect("a leader change within the limit")
        .expect("the observation goes on")
}

/// Three candidates on two managers take turns, three terms each: never two leaders at once
/// by the store's account, and every term is greater than the one before.
pub async fn one_leader_at_a_time_and_terms_increase<B: LockBackend + Clone>(backend: B) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("election");
    let leading = Arc::new(AtomicU64::new(0));
    let terms = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, client) in [&a, &b, &a].into_iter().enumerate() {
        let election = client.election(&name).unwrap();
        let (leading, terms) = (leading.clone(), terms.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..3 {
                let value = format!("candidate-{i}-{round}");
                let leadership = election.campaign(value.clone(), opts()).await.unwrap();
                assert_eq!(leading.fetch_add(1, Ordering::SeqCst), 0, "two leaders");
                terms.lock().unwrap().push(leadership.term());
                let leader = election.leader().await.unwrap().expect("a leader");
                assert_eq!(leader, Leader::new(value, leadership.term()));
                tokio::time::sleep(Duration::from_millis(5)).await;
                leading.fetch_sub(1, Ordering::SeqCst);
                leadership.resign().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let terms = terms.lock().unwrap().clone();
    assert_eq!(terms.len(), 9);
    assert!(
        terms.windows(2).all(|w| w[0] < w[1]),
        "terms not increasing: {terms:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The leader resigns and the candidates that campaigned meanwhile follow in the order they
/// campaigned, on whichever node they are, each at once.
pub async fn resign_hands_over_in_campaign_order<B: LockBackend + Clone>(backend: B) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("election-order");
    let first = a
        .election(&name)
        .unwrap()
        .campaign("first", opts())
        .await
        .unwrap();
    let (tx, mut elected) = mpsc::unbounded_channel();
    let campaign = |client: &crate::LockClient, value: &'static str| {
        let election = client.election(&name).unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let leadership = election.campaign(value, opts()).await.unwrap();
            tx.send((value, leadership.term())).unwrap();
            // Leads until the test moves on, then resigns.
            tokio::time::sleep(Duration::from_millis(50)).await;
            leadership.resign().await.unwrap();
        })
    };
    // Each candidate is in line (its attempt found the name held) before the next campaigns.
    let mut events = b.events();
    let second = campaign(&b, "second");
    let contended = |e: &crate::LockEvent| {
        (e.key.as_deref() == Some(name.as_str()) && matches!(e.kind, LockEventKind::Contended))
            .then_some(())
    };
    next_event(&mut events, PROMPT, contended).await;
    let mut events = a.events();
    let third = campaign(&a, "third");
    next_event(&mut events, PROMPT, contended).await;
    let term = first.term();
    first.resign().await.unwrap();
    let (value, second_term) = tokio::time::timeout(PROMPT, elected.recv())
        .await
        .expect("the next candidate is elected at once")
        .unwrap();
    assert_eq!(value, "second");
    assert!(second_term > term);
    let (value, third_term) = tokio::time::timeout(PROMPT, elected.recv())
        .await
        .expect("the next candidate is elected at once")
        .unwrap();
    assert_eq!(value, "third");
    assert!(third_term > second_term);
    second.await.unwrap();
    third.await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// `proclaim` changes the leader's value without a new term, and an observer sees it.
pub async fn proclaim_changes_the_value_in_the_same_term<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let election = client.election(&unique_key("election-proclaim")).unwrap();
    let mut changes = election.observe().await.unwrap();
    assert_eq!(next_change(&mut changes).await, None);
    let mut leadership = election.campaign("10.0.0.1", opts()).await.unwrap();
    let term = leadership.term();
    assert_eq!(
        next_change(&mut changes).await,
        Some(Leader::new("10.0.0.1", term))
    );
    leadership.proclaim("10.0.0.2").await.unwrap();
    assert_eq!(leadership.value(), "10.0.0.2");
    assert_eq!(
        next_change(&mut changes).await,
        Some(Leader::new("10.0.0.2", term))
    );
    assert_eq!(
        election.leader().await.unwrap(),
        Some(Leader::new("10.0.0.2", term))
    );
    leadership.resign().await.unwrap();
    assert_eq!(next_change(&mut changes).await, None);
    client.shutdown().await;
}

/// Observers on two managers see the same sequence of leaders: elections, a proclaim,
/// resignations, a leader whose actor stopped.
pub async fn observers_on_two_managers_see_the_same_sequence<B: LockBackend + Clone>(backend: B) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("election-observe");
    let mut seen_a = a.election(&name).unwrap().observe().await.unwrap();
    let mut seen_b = b.election(&name).unwrap().observe().await.unwrap();
    let mut expected = vec![None];
    let mut one = a
        .election(&name)
        .unwrap()
        .campaign("one", opts())
        .await
        .unwrap();
    expected.push(Some(Leader::new("one", one.term())));
    one.proclaim("one, again").await.unwrap();
    expected.push(Some(Leader::new("one, again", one.term())));
    one.resign().await.unwrap();
    expected.push(None);
    let two = b
        .election(&name)
        .unwrap()
        .campaign("two", opts())
        .await
        .unwrap();
    expected.push(Some(Leader::new("two", two.term())));
    two.resign().await.unwrap();
    expected.push(None);
    for seen in [&mut seen_a, &mut seen_b] {
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            got.push(next_change(seen).await);
        }
        assert_eq!(got, expected);
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// Nobody leads an election nobody campaigned in, nor one whose leader resigned.
pub async fn leader_is_none_when_nobody_leads<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let election = client.election(&unique_key("election-none")).unwrap();
    assert_eq!(election.leader().await.unwrap(), None);
    let leadership = election.campaign("x", opts()).await.unwrap();
    assert!(election.leader().await.unwrap().is_some());
    leadership.resign().await.unwrap();
    assert_eq!(election.leader().await.unwrap(), None);
    client.shutdown().await;
}

/// A test candidate actor: forwards what it is told to the test.
struct Candidate;

impl Actor for Candidate {
    type Msg = CandidateMsg;
    type State = mpsc::UnboundedSender<CandidateMsg>;
    type Arguments = mpsc::UnboundedSender<CandidateMsg>;

    async fn pre_start(
        &self,
        _: ActorRef<CandidateMsg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle(
        &self,
        _: ActorRef<CandidateMsg>,
        msg: CandidateMsg,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = tx.send(msg);
        Ok(())
    }
}

async fn told(rx: &mut mpsc::UnboundedReceiver<CandidateMsg>) -> CandidateMsg {
    tokio::time::timeout(PROMPT, rx.recv())
        .await
        .expect("the candidate is told within the limit")
        .expect("the candidate's channel is open")
}

/// A candidate actor is told `Elected`; when it stops, its leadership goes at once (long
/// before the 30 s ttl) to the next candidate actor, on another node, which is told so.
pub async fn candidate_actor_is_told_elected_and_its_stop_hands_over<B: LockBackend + Clone>(
    backend: B,
) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("election-actor");
    let (tx_one, mut one_told) = mpsc::unbounded_channel();
    let (one, one_join) = Actor::spawn(None, Candidate, tx_one).await.unwrap();
    let _one = a
        .election(&name)
        .unwrap()
        .enlist(one.clone(), "one", opts())
        .unwrap();
    let CandidateMsg::Elected { term: one_term, .. } = told(&mut one_told).await else {
        panic!("the first candidate is elected");
    };
    let (tx_two, mut two_told) = mpsc::unbounded_channel();
    let (two, two_join) = Actor::spawn(None, Candidate, tx_two).await.unwrap();
    let two_candidacy = b
        .election(&name)
        .unwrap()
        .enlist(two.clone(), "two", opts())
        .unwrap();
    // Not elected while the first one leads.
    assert!(two_told.try_recv().is_err());
    one.stop(None);
    one_join.await.unwrap();
    let CandidateMsg::Elected { term: two_term, .. } = told(&mut two_told).await else {
        panic!("the second candidate is elected");
    };
    assert!(two_term > one_term);
    assert_eq!(
        b.election(&name).unwrap().leader().await.unwrap(),
        Some(Leader::new("two", two_term))
    );
    two_candidacy.proclaim("two, proclaimed").await.unwrap();
    assert_eq!(
        a.election(&name).unwrap().leader().await.unwrap(),
        Some(Leader::new("two, proclaimed", two_term))
    );
    two_candidacy.resign().await.unwrap();
    assert_eq!(a.election(&name).unwrap().leader().await.unwrap(), None);
    two.stop(None);
    two_join.await.unwrap();
    a.shutdown().await;
    b.shutdown().await;
}

/// A candidate actor that stops before it is elected is withdrawn: when the leader resigns,
/// the candidate after it is elected at once.
pub async fn candidate_actor_that_stops_while_waiting_is_withdrawn<B: LockBackend + Clone>(
    backend: B,
) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("election-withdraw");
    let leader = a
        .election(&name)
        .unwrap()
        .campaign("leader", opts())
        .await
        .unwrap();
    let (tx, _told) = mpsc::unbounded_channel();
    let (quitter, quitter_join) = Actor::spawn(None, Candidate, tx).await.unwrap();
    let mut events = b.events();
    let candidacy = b
        .election(&name)
        .unwrap()
        .enlist(quitter.clone(), "quitter", opts())
        .unwrap();
    let key = name.clone();
    next_event(&mut events, PROMPT, |e| {
        (e.key.as_deref() == Some(key.as_str()) && matches!(e.kind, LockEventKind::Contended))
            .then_some(())
    })
    .await;
    // The candidate's state (where it would keep its candidacy) goes with it.
    quitter.stop(None);
    quitter_join.await.unwrap();
    drop(candidacy);
    let patient = b.election(&name).unwrap();
    let waiting = tokio::spawn(async move { patient.campaign("patient", opts()).await });
    leader.resign().await.unwrap();
    let leadership = tokio::time::timeout(PROMPT, waiting)
        .await
        .expect("the patient candidate is elected at once")
        .unwrap()
        .unwrap();
    assert_eq!(leadership.value(), "patient");
    eventually("the patient candidate leads", PROMPT, || async {
        a.election(&name).unwrap().leader().await.unwrap()
            == Some(Leader::new("patient", leadership.term()))
    })
    .await;
    drop(leadership);
    a.shutdown().await;
    b.shutdown().await;
}

/// An empty name, an oversize value and a zero ttl are refused before any I/O, each with a
/// message naming it.
pub async fn bad_election_input_is_rejected_naming_the_value<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let err = client.election("").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::EmptyElectionName);
    assert!(err.to_string().contains("name is empty"), "{err}");
    let election = client.election(&unique_key("election-bad")).unwrap();
    let long = "v".repeat(MAX_ELECTION_VALUE_LEN + 1);
    let err = election.campaign(long, opts()).await.unwrap_err();
    assert!(
        matches!(err, Error::ElectionValueTooLong { len, .. } if len == MAX_ELECTION_VALUE_LEN + 1)
    );
    assert!(err.to_string().contains("1025 bytes"), "{err}");
    let err = election
        .campaign("v", opts().with_ttl(Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTtl);
    assert!(err.to_string().contains("0ns"), "{err}");
    assert!(err.is_invalid_input());
    assert_eq!(election.leader().await.unwrap(), None);
    client.shutdown().await;
}

/// When the store stops naming the leader as owner, the leadership is lost (`NotOwner`) and
/// `is_leader()` turns false.
pub async fn leadership_taken_away_is_lost<B: LockBackend + Clone>(backend: B) {
    let client = start(backend.clone()).await;
    let name = unique_key("election-lost");
    let election = client.election(&name).unwrap();
    let leadership = election
        .campaign("v", opts().with_ttl(Duration::from_millis(600)))
        .await
        .unwrap();
    let guard = leadership.guard();
    let mut lease = crate::Lease::new(name.clone(), guard.owner(), leadership.term());
    lease.lease_id = None;
    assert!(backend.release(&lease).await.unwrap());
    let reason = tokio::time::timeout(PROMPT, leadership.lost())
        .await
        .expect("the loss is noticed at the next renewal");
    assert_eq!(reason, LostReason::NotOwner);
    assert!(!leadership.is_leader());
    client.shutdown().await;
}

/// What the test observer actor is sent.
#[derive(Debug)]
pub struct Seen(pub Option<Leader>);

#[cfg(feature = "cluster")]
impl ractor::Message for Seen {}

/// A test observer actor: forwards what it is sent to the test.
struct Watcher;

impl Actor for Watcher {
    type Msg = Seen;
    type State = mpsc::UnboundedSender<Option<Leader>>;
    type Arguments = mpsc::UnboundedSender<Option<Leader>>;

    async fn pre_start(
        &self,
        _: ActorRef<Seen>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle(
        &self,
        _: ActorRef<Seen>,
        Seen(leader): Seen,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = tx.send(leader);
        Ok(())
    }
}

async fn sent(seen: &mut mpsc::UnboundedReceiver<Option<Leader>>) -> Option<Leader> {
    tokio::time::timeout(PROMPT, seen.recv())
        .await
        .expect("the observer actor is sent a change within the limit")
        .expect("the observer actor runs")
}

/// `observe_to` sends an actor the current leader, then each change.
pub async fn observer_actor_is_sent_each_change<B: LockBackend + Clone>(backend: B) {
    let client = start(backend).await;
    let election = client.election(&unique_key("election-observer")).unwrap();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (watcher, join) = Actor::spawn(None, Watcher, tx).await.unwrap();
    let observer = election.observe_to(watcher.clone(), Seen).await.unwrap();
    assert_eq!(sent(&mut seen).await, None);
    let leadership = election.campaign("watched", opts()).await.unwrap();
    assert_eq!(
        sent(&mut seen).await,
        Some(Leader::new("watched", leadership.term()))
    );
    leadership.resign().await.unwrap();
    assert_eq!(sent(&mut seen).await, None);
    drop(observer);
    watcher.stop(None);
    join.await.unwrap();
    client.shutdown().await;
}

/// A leading candidate actor whose leadership ends without its asking (here: its manager
/// shuts down) is told `Demoted`, with the reason.
pub async fn candidate_actor_is_told_demoted_when_its_leadership_ends<B: LockBackend + Clone>(
    backend: B,
) {
    let a = start(backend.clone()).await;
    let b = start(backend).await;
    let name = unique_key("election-demoted");
    let (tx, mut told_to) = mpsc::unbounded_channel();
    let (candidate, join) = Actor::spawn(None, Candidate, tx).await.unwrap();
    let _candidacy = a
        .election(&name)
        .unwrap()
        .enlist(candidate.clone(), "c", opts())
        .unwrap();
    let CandidateMsg::Elected { term, .. } = told(&mut told_to).await else {
        panic!("the candidate is elected");
    };
    a.shutdown().await;
    match told(&mut told_to).await {
        CandidateMsg::Demoted {
            term: demoted,
            reason,
            ..
        } => {
            assert_eq!(demoted, term);
            assert_eq!(reason, LostReason::Shutdown);
        }
        other => panic!("expected Demoted, got {other:?}"),
    }
    assert_eq!(b.election(&name).unwrap().leader().await.unwrap(), None);
    candidate.stop(None);
    join.await.unwrap();
    b.shutdown().await;
}
