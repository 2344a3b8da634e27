//! Elections on etcd interoperate with etcd's own Election service: `etcdctl elect` (a child
//! process, stopped by pid) and leasehold candidates share one queue, and each side sees the
//! other's leader and value.

use leasehold_test_support::etcd_server;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use etcd_server::EtcdServer;
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
        .with_ttl(Duration::from_secs(5))
        .with_wait(Wait::UpTo(PROMPT))
}

async fn lock_mode(server: &EtcdServer) -> EtcdBackend {
    server.backend(EtcdMode::Lock).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leasehold_follows_an_etcdctl_leader_and_sees_its_value() {
    let server = EtcdServer::start();
    let backend = lock_mode(&server).await;
    let client = start(backend.clone()).await;
    let name = unique_key("interop");
    let etcd_name = backend.lock_key(&name);
    let ctl = Etcdctl::elect(&server, &[&etcd_name, "etcdctl-leader"]);
    ctl.wait_for_line("its election", |line| line == "etcdctl-leader");
    let election = client.election(&name).unwrap();
    let leader = election.leader().await.unwrap().expect("etcdctl leads");
    assert_eq!(leader.value, "etcdctl-leader");
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
    let leadership = election.campaign("leasehold-leader", opts()).await.unwrap();
    // etcdctl's observer (`--listen`) names leasehold's candidate key and shows its value
    // (leasehold's lock value ends with it).
    let listener = Etcdctl::elect(&server, &["--listen", &etcd_name]);
    listener.wait_for_line("the leasehold leader", |line| {
        line.ends_with("leasehold-leader")
    });
    // An etcdctl candidate queues behind it, and is elected when it resigns.
    let follower = Etcdctl::elect(&server, &[&etcd_name, "etcdctl-follower"]);
    eventually("etcdctl's candidate key is written", PROMPT, || async {
        let mut etcd = etcd_client::Client::connect([server.endpoint()], None)
            .await
            .unwrap();
        let keys = etcd
            .get(
                format!("{etcd_name}/"),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_count_only(),
                ),
            )
            .await
            .unwrap();
        keys.count() == 2
    })
    .await;
    assert_eq!(
        election.leader().await.unwrap().map(|l| l.value),
        Some("leasehold-leader".to_owned())
    );
    let term = leadership.term();
    leadership.resign().await.unwrap();
    follower.wait_for_line("its election", |line| line == "etcdctl-follower");
    let leader = election.leader().await.unwrap().expect("etcdctl leads");
    assert_eq!(leader.value, "etcdctl-follower");
    assert!(leader.term > term);
    listener.wait_for_line("the etcdctl leader", |line| line == "etcdctl-follower");
    follower.stop();
    listener.stop();
    eventually("nobody leads", PROMPT, || async {
        election.leader().await.unwrap().is_none()
    })
    .await;
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
