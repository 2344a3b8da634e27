//! `leasehold elect` and `leasehold leader`, run as a user would: the built binary, as
//! separate processes, against a real redis-server.

use leasehold_test_support::redis_server;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use leasehold::testing::unique_key;
use redis_server::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");
const LIMIT: Duration = Duration::from_secs(10);

fn leasehold(server: &RedisServer) -> Command {
    let mut command = Command::new(BIN);
    command.env("LEASEHOLD_BACKEND", server.url());
    command
}

/// Waits for a child to exit, or panics after `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let give_up = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for leasehold") {
            return status;
        }
        assert!(
            Instant::now() < give_up,
            "leasehold did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child's stdout, line by line, on a channel.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(lines: &mpsc::Receiver<String>) -> String {
    lines
        .recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("no output line within {LIMIT:?}"))
}

fn leader_json(server: &RedisServer, name: &str) -> serde_json::Value {
    let out = leasehold(server)
        .args(["leader", "--json", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn elect_passes_term_and_value_and_exits_with_the_command_code() {
    let server = RedisServer::start();
    let name = unique_key("cli-elect");
    let out = leasehold(&server)
        .args(["elect", "--value", "node-a", &name, "--"])
        .args([
            "sh",
            "-c",
            "echo $LEASEHOLD_LEADER_TERM $LEASEHOLD_LEADER_VALUE; exit 3",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (term, value) = stdout.trim().split_once(' ').unwrap();
    assert!(term.parse::<u64>().unwrap() > 0);
    assert_eq!(value, "node-a");
    assert_eq!(
        leader_json(&server, &name)["leader"],
        false,
        "resigned after the command"
    );
}

#[test]
fn leader_shows_the_running_leader_and_a_second_candidate_follows_it() {
    let server = RedisServer::start();
    let name = unique_key("cli-elect");
    let mut first = leasehold(&server)
        .args(["elect", "--value", "first", &name, "--"])
        .args(["sh", "-c", "echo leading; exec sleep 60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let first_out = lines(&mut first);
    assert_eq!(next_line(&first_out), "leading");
    let shown = leader_json(&server, &name);
    assert_eq!(shown["value"], "first");
    let term = shown["term"].as_u64().unwrap();
    let mut second = leasehold(&server)
        .args(["elect", "--value", "second", &name, "--"])
        .args(["sh", "-c", "echo $LEASEHOLD_LEADER_TERM"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let second_out = lines(&mut second);
    // SIGTERM to the leader reaches its command, which ends; it resigns.
    let _ = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status();
    let status = wait_exit(&mut first, LIMIT);
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "the command ended by SIGTERM"
    );
    let second_term: u64 = next_line(&second_out).parse().unwrap();
    assert!(second_term > term);
    assert!(wait_exit(&mut second, LIMIT).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_key_is_taken_away_is_demoted_and_exits_76() {
    let server = RedisServer::start();
    let name = unique_key("cli-elect");
    let mut leader = leasehold(&server)
        .args(["elect", "--ttl", "1s", "--kill-grace", "5s", &name, "--"])
        .args([
            "sh",
            "-c",
            "trap 'echo terminated; exit 0' TERM; echo leading; while true; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(&mut leader);
    assert_eq!(next_line(&out), "leading");
    // Another client deletes the leadership behind its back: the next renewal finds out.
    let backend = server.backend().await;
    let mut redis = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(backend.lock_key(&name))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(next_line(&out), "terminated", "the command got SIGTERM");
    assert_eq!(wait_exit(&mut leader, LIMIT).code(), Some(76));
}

#[test]
fn leader_watch_prints_each_change() {
    let server = RedisServer::start();
    let name = unique_key("cli-elect");
    let mut watcher = leasehold(&server)
        .args(["leader", "--watch", "--json", &name])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = lines(&mut watcher);
    let first: serde_json::Value = serde_json::from_str(&next_line(&seen)).unwrap();
    assert_eq!(first["leader"], false);
    let out = leasehold(&server)
        .args(["elect", "--value", "brief", &name, "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let elected: serde_json::Value = serde_json::from_str(&next_line(&seen)).unwrap();
    assert_eq!(elected["value"], "brief");
    assert!(elected["term"].as_u64().unwrap() > 0);
    let resigned: serde_json::Value = serde_json::from_str(&next_line(&seen)).unwrap();
    assert_eq!(resigned["leader"], false);
    let _ = Command::new("kill")
        .args(["-INT", &watcher.id().to_string()])
        .status();
    assert!(wait_exit(&mut watcher, LIMIT).success());
}

#[test]
fn bad_election_input_exits_64_naming_it() {
    let server = RedisServer::start();
    let out = leasehold(&server)
        .args(["elect", "", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("name is empty"));
    let long = "v".repeat(2000);
    let out = leasehold(&server)
        .args(["elect", "--value", &long, "x", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("2000 bytes"));
}
