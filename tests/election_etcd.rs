//! Elections on etcd interoperate with etcd's own Election service: `etcdctl elect` (a child
//! process, stopped by pid) and leasehold candidates share one queue, and each side sees the
//! other's leader and value.

use leasehold_test_support::etcd_server;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use etcd_server::EtcdServer;
use futures::StreamExt;
use leasehold::testing::{eventually, next_event, start, unique_key};
use leasehold::{CampaignOptions, EtcdBackend, EtcdMode, LockEventKind, Wait};

const PROMPT: Duration = Duration::from_secs(10);

/// `etcdctl elect` as a child process, its stdout lines sent to a channel.
struct Etcdctl {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Etcdctl {
    fn elect(server: &EtcdServer, args: &[&str]) -> Self {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", server.endpoint()))
            .arg("elect")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcdctl starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Etcdctl { child, lines }
    }

    /// Waits (bounded) for a line of output that `pick` accepts.
    fn wait_for_line(&self, what: &str, pick: impl Fn(&str) -> bool) -> String {
        let give_up = std::time::Instant::now() + PROMPT;
        loop {
            let left = give_up.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pick(&line) => return line,
                Ok(_) => continue,
                Err(_) => panic!("etcdctl did not print {what} within {PROMPT:?}"),
            }
        }
    }

    /// Waits (bounded) for `etcdctl elect` to print a leader, and answers its value. etcdctl
    /// prints a leader as two lines, its key (`NAME/<lease id in hex>`) and its value: the
    /// line after the key must be the value exactly, so a value that is not raw (more lines,
    /// or anything around it) shows as the wrong value.
    fn next_leader(&self, etcd_name: &str) -> String {
        let key = self.wait_for_line("a leader's key", |line| {
            line.starts_with(&format!("{etcd_name}/"))
        });
        let value = self
            .lines
            .recv_timeout(PROMPT)
            .unwrap_or_else(|_| panic!("etcdctl printed the key {key} but no value"));
        value
    }

    /// SIGKILL by pid: etcdctl dies without resigning, and its key stays until its session
    /// lease runs out (60 s in etcdctl).
    fn kill(mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// SIGTERM by pid (etcdctl resigns and ends its session), then waits for it to exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Etcdctl {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn opts() -> CampaignOptions {
    CampaignOptions::new()
        .with_ttl(Duration::from_secs(2))
        .with_wait(Wait::UpTo(PROMPT))
}

async fn lock_mode(server: &EtcdServer) -> EtcdBackend {
    server.backend(EtcdMode::Lock).await
}

/// The candidate keys under an election's etcd name, oldest first, with their values.
async fn candidate_keys(server: &EtcdServer, etcd_name: &str) -> Vec<(String, String, i64)> {
    let mut etcd = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    let options = etcd_client::GetOptions::new().with_prefix().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let answer = etcd
        .get(format!("{etcd_name}/"), Some(options))
        .await
        .unwrap();
    answer
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_owned(),
                kv.value_str().unwrap().to_owned(),
                kv.lease(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leasehold_follows_an_etcdctl_leader_and_sees_its_value() {
    let server = EtcdServer::start();
    let backend = lock_mode(&server).await;
    let client = start(backend.clone()).await;
    let name = unique_key("interop");
    let etcd_name = backend.lock_key(&name);
    let ctl = Etcdctl::elect(&server, &[&etcd_name, "etcdctl-leader"]);
    assert_eq!(ctl.next_leader(&etcd_name), "etcdctl-leader");
    let election = client.election(&name).unwrap();
    let leader = election.leader().await.unwrap().expect("etcdctl leads");
    assert_eq!(leader.value, "etcdctl-leader");
    let mut changes = election.observe().await.unwrap();
    let first = changes.next().await.expect("the current leader");
    assert_eq!(first, Some(leader.clone()));
    let mut events = client.events();
    let campaign = {
        let election = election.clone();
        tokio::spawn(async move { election.campaign("leasehold", opts()).await })
    };
    let key = name.clone();
    next_event(&mut events, PROMPT, |e| {
        (e.key.as_deref() == Some(key.as_str()) && matches!(e.kind, LockEventKind::Contended))
            .then_some(())
    })
    .await;
    assert!(!campaign.is_finished(), "elected while etcdctl leads");
    ctl.stop();
    let leadership = tokio::time::timeout(PROMPT, campaign)
        .await
        .expect("elected once etcdctl resigned")
        .unwrap()
        .unwrap();
    assert!(leadership.term() > leader.term);
    assert_eq!(
        election.leader().await.unwrap().map(|l| l.value),
        Some("leasehold".to_owned())
    );
    let next = tokio::time::timeout(PROMPT, changes.next()).await.unwrap();
    assert_eq!(
        next.flatten().map(|l| (l.value, l.term)),
        Some(("leasehold".to_owned(), leadership.term()))
    );
    leadership.resign().await.unwrap();
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_sees_a_leasehold_leader_and_follows_it() {
    let server = EtcdServer::start();
    let backend = lock_mode(&server).await;
    let client = start(backend.clone()).await;
    let name = unique_key("interop");
    let etcd_name = backend.lock_key(&name);
    let election = client.election(&name).unwrap();
    let mut leadership = election.campaign("leasehold-leader", opts()).await.unwrap();
    // In etcd, the candidate key holds the value as it is, as Go's client writes it.
    let keys = candidate_keys(&server, &etcd_name).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let (key, value, lease) = &keys[0];
    assert_eq!(value, "leasehold-leader");
    assert_eq!(key, &format!("{etcd_name}/{lease:x}"));
    // etcdctl's observer (`--listen`) names leasehold's candidate key and shows its value.
    let listener = Etcdctl::elect(&server, &["--listen", &etcd_name]);
    assert_eq!(listener.next_leader(&etcd_name), "leasehold-leader");
    // A proclaimed value is shown as it is too, in the same term.
    leadership.proclaim("leasehold-proclaimed").await.unwrap();
    assert_eq!(listener.next_leader(&etcd_name), "leasehold-proclaimed");
    assert_eq!(
        candidate_keys(&server, &etcd_name).await[0].1,
        "leasehold-proclaimed"
    );
    // A renewal asking for more than the lease was granted moves the key onto a longer
    // lease: same key, same term, same raw value.
    leadership
        .guard()
        .renew(Duration::from_secs(6))
        .await
        .unwrap();
    let moved = candidate_keys(&server, &etcd_name).await;
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(
        (&moved[0].0, moved[0].1.as_str()),
        (key, "leasehold-proclaimed")
    );
    assert_ne!(moved[0].2, *lease, "the key is on a new lease");
    // etcd's observers see that put on the leader's key as the leader again, value as it is.
    assert_eq!(listener.next_leader(&etcd_name), "leasehold-proclaimed");
    assert_eq!(
        election.leader().await.unwrap().map(|l| l.term),
        Some(leadership.term())
    );
    // An etcdctl candidate queues behind it, and is elected when it resigns.
    let follower = Etcdctl::elect(&server, &[&etcd_name, "etcdctl-follower"]);
    eventually("etcdctl's candidate key is written", PROMPT, || async {
        candidate_keys(&server, &etcd_name).await.len() == 2
    })
    .await;
    // Renewals go on while it leads (ttl 2 s: several renewals in the wait below).
    let renewed = leadership.guard().deadline().unwrap();
    eventually("a renewal", PROMPT, || async {
        leadership.guard().deadline().is_some_and(|d| d > renewed)
    })
    .await;
    assert!(leadership.is_leader());
    assert_eq!(
        election.leader().await.unwrap().map(|l| l.value),
        Some("leasehold-proclaimed".to_owned())
    );
    let term = leadership.term();
    leadership.resign().await.unwrap();
    assert_eq!(follower.next_leader(&etcd_name), "etcdctl-follower");
    let leader = election.leader().await.unwrap().expect("etcdctl leads");
    assert_eq!(leader.value, "etcdctl-follower");
    assert!(leader.term > term);
    assert_eq!(listener.next_leader(&etcd_name), "etcdctl-follower");
    follower.stop();
    listener.stop();
    eventually("nobody leads", PROMPT, || async {
        election.leader().await.unwrap().is_none()
    })
    .await;
    client.shutdown().await;
}

/// etcdctl leads, then a leasehold candidate and a second etcdctl candidate queue in that
/// order. The etcdctl leader dies (SIGKILL: it never resigns; its key goes when its session
/// lease does, which the test revokes rather than wait etcdctl's 60 s): leasehold is elected,
/// not the etcdctl candidate behind it; when leasehold resigns, that one is. A leasehold
/// observer sees the three leaders, with their raw values, in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_of_both_kinds_take_over_in_campaign_order() {
    let server = EtcdServer::start();
    let backend = lock_mode(&server).await;
    let client = start(backend.clone()).await;
    let name = unique_key("interop");
    let etcd_name = backend.lock_key(&name);
    let election = client.election(&name).unwrap();
    let mut changes = election.observe().await.unwrap();
    assert_eq!(changes.next().await, Some(None), "nobody leads at first");
    let first = Etcdctl::elect(&server, &[&etcd_name, "etcdctl-first"]);
    assert_eq!(first.next_leader(&etcd_name), "etcdctl-first");
    let campaign = {
        let election = election.clone();
        tokio::spawn(async move { election.campaign("leasehold-second", opts()).await })
    };
    eventually("leasehold's candidate key is written", PROMPT, || async {
        candidate_keys(&server, &etcd_name).await.len() == 2
    })
    .await;
    let third = Etcdctl::elect(&server, &[&etcd_name, "etcdctl-third"]);
    eventually(
        "the second etcdctl candidate key is written",
        PROMPT,
        || async { candidate_keys(&server, &etcd_name).await.len() == 3 },
    )
    .await;
    let keys = candidate_keys(&server, &etcd_name).await;
    let values: Vec<&str> = keys.iter().map(|(_, value, _)| value.as_str()).collect();
    assert_eq!(
        values,
        ["etcdctl-first", "leasehold-second", "etcdctl-third"]
    );
    assert!(!campaign.is_finished(), "elected while etcdctl leads");

    first.kill();
    let mut etcd = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    etcd.lease_revoke(keys[0].2).await.unwrap();
    let leadership = tokio::time::timeout(PROMPT, campaign)
        .await
        .expect("leasehold, second in the queue, is elected")
        .unwrap()
        .unwrap();
    assert_eq!(
        election.leader().await.unwrap().map(|l| l.value),
        Some("leasehold-second".to_owned())
    );
    let term = leadership.term();
    leadership.resign().await.unwrap();
    assert_eq!(third.next_leader(&etcd_name), "etcdctl-third");

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let change = tokio::time::timeout(PROMPT, changes.next())
            .await
            .expect("the observer is told each leader")
            .expect("the observation goes on");
        seen.push(change.map(|l| (l.value, l.term)));
    }
    let values: Vec<Option<&str>> = seen
        .iter()
        .map(|l| l.as_ref().map(|(value, _)| value.as_str()))
        .collect();
    assert_eq!(
        values,
        [
            Some("etcdctl-first"),
            Some("leasehold-second"),
            Some("etcdctl-third")
        ]
    );
    let terms: Vec<u64> = seen.iter().flatten().map(|(_, term)| *term).collect();
    assert_eq!(terms[1], term);
    assert!(terms.windows(2).all(|t| t[0] < t[1]), "{terms:?}");
    third.stop();
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_in_txn_mode_are_refused_saying_they_need_lock_mode() {
    let server = EtcdServer::start();
    let client = start(server.backend(EtcdMode::Txn).await).await;
    let election = client.election(&unique_key("interop")).unwrap();
    let err = election.campaign("v", opts()).await.unwrap_err();
    assert!(err.to_string().contains("EtcdMode::Lock"), "{err}");
    assert!(!err.is_retryable());
    client.shutdown().await;
}
