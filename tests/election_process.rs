//! Elections across OS processes: a leader in another process (`leasehold elect`, with its
//! command in its process group) is paused past its ttl or killed, and a candidate in this
//! process takes over; the paused one is demoted when it resumes. Against a real
//! redis-server, and a real etcd (`lock` mode) when the `etcd` feature is on.

use leasehold_test_support::redis_server;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use leasehold::testing::{start, unique_key};
use leasehold::{CampaignOptions, LockClient, Wait};
use redis_server::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");
const LIMIT: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(1);

/// `leasehold elect --ttl 1s NAME` running a command that says when it starts and when it
/// gets SIGTERM, in a process group of its own (so a signal to the group reaches both).
fn leader_process(url: &str, name: &str) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .env("LEASEHOLD_BACKEND", url)
        .args([
            "elect",
            "--ttl",
            "1s",
            "--value",
            "other-process",
            name,
            "--",
        ])
        .args([
            "sh",
            "-c",
            "trap 'echo terminated; exit 0' TERM; echo leading; while true; do sleep 0.02; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("leasehold starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        rx.recv_timeout(LIMIT)
            .expect("the leader starts its command"),
        "leading"
    );
    (child, rx)
}

/// Sends `signal` to the process group led by `child`.
fn signal_group(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} failed");
}

fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let give_up = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < give_up, "no exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn campaign_options() -> CampaignOptions {
    CampaignOptions::new()
        .with_ttl(TTL)
        .with_wait(Wait::UpTo(LIMIT))
}

/// The leader process is paused (SIGSTOP, with its command) past its ttl; a candidate here is
/// elected; on resume (SIGCONT) the paused one is demoted at once: its command gets SIGTERM
/// and it exits 76.
async fn paused_leader_is_replaced_and_demoted_on_resume(url: &str, client: LockClient) {
    let name = unique_key("process-pause");
    let election = client.election(&name).unwrap();
    let (mut other, said) = leader_process(url, &name);
    let paused_term = election
        .leader()
        .await
        .unwrap()
        .expect("the other process leads")
        .term;
    signal_group(&other, "STOP");
    let leadership = election
        .campaign("this-process", campaign_options())
        .await
        .expect("elected once the paused leader's lease ran out");
    assert!(leadership.term() > paused_term);
    signal_group(&other, "CONT");
    // On resume its lease deadline is long past: it is demoted at once, its command is told
    // by SIGTERM, and it exits 76.
    assert_eq!(said.recv_timeout(LIMIT).unwrap(), "terminated");
    assert_eq!(wait_exit(&mut other, LIMIT).code(), Some(76));
    // And this process still leads, by the store's account.
    let leader = election.leader().await.unwrap().unwrap();
    assert_eq!(
        (leader.value.as_str(), leader.term),
        ("this-process", leadership.term())
    );
    assert!(leadership.is_leader());
    leadership.resign().await.unwrap();
    client.shutdown().await;
}

/// The leader process is killed (SIGKILL, with its command) while a candidate here waits:
/// the candidate is elected once the dead leader's lease runs out.
async fn killed_leader_is_replaced_after_its_ttl(url: &str, client: LockClient) {
    let name = unique_key("process-kill");
    let election = client.election(&name).unwrap();
    let (mut other, _said) = leader_process(url, &name);
    let killed_term = election
        .leader()
        .await
        .unwrap()
        .expect("the other process leads")
        .term;
    let waiting = {
        let election = election.clone();
        tokio::spawn(async move { election.campaign("this-process", campaign_options()).await })
    };
    signal_group(&other, "KILL");
    let _ = wait_exit(&mut other, LIMIT);
    let leadership = waiting
        .await
        .unwrap()
        .expect("elected once the killed leader's lease ran out");
    assert!(leadership.term() > killed_term);
    leadership.resign().await.unwrap();
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_leader_paused_past_its_ttl_is_replaced_and_demoted_on_resume() {
    let server = RedisServer::start();
    let client = start(server.backend().await).await;
    paused_leader_is_replaced_and_demoted_on_resume(&server.url(), client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_leader_is_replaced_after_its_ttl() {
    let server = RedisServer::start();
    let client = start(server.backend().await).await;
    killed_leader_is_replaced_after_its_ttl(&server.url(), client).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_paused_past_its_ttl_is_replaced_and_demoted_on_resume() {
    let server = leasehold_test_support::EtcdServer::start();
    let client = start(server.backend(leasehold::EtcdMode::Lock).await).await;
    let url = format!("etcd://{}?mode=lock", server.endpoint());
    paused_leader_is_replaced_and_demoted_on_resume(&url, client).await;
}

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_leader_is_replaced_after_its_ttl() {
    let server = leasehold_test_support::EtcdServer::start();
    let client = start(server.backend(leasehold::EtcdMode::Lock).await).await;
    let url = format!("etcd://{}?mode=lock", server.endpoint());
    killed_leader_is_replaced_after_its_ttl(&url, client).await;
}
