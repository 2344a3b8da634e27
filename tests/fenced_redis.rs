//! Fenced writes on a real `redis-server` (one per test, on a free loopback port): the token
//! check and the write happen in one script, so a stale holder's write is refused and leaves
//! nothing behind, and tokens compare exactly across the whole u64 range. The last test pauses
//! a holder's whole process (SIGSTOP) past its ttl: this test binary, started again to run the
//! `#[ignore]`d entry `child_paused_holder`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use leasehold::testing::{start, unique_key};
use leasehold::{FenceError, FencedScript, LockOptions, RedisFence, StaleToken, Wait};
use leasehold_test_support::RedisServer;
use redis::aio::MultiplexedConnection;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::timeout;

async fn client(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn get(conn: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
}

#[tokio::test]
async fn older_token_is_refused_and_writes_nothing() {
    let server = RedisServer::start();
    let mut conn = client(&server).await;
    let fence = RedisFence::new(unique_key("value"));
    fence.set(&mut conn, 9, "nine").await.unwrap();
    let refused = fence.set(&mut conn, 8, "eight").await.unwrap_err();
    assert_eq!(refused.stale(), Some(StaleToken::new(8, 9)));
    assert_eq!(get(&mut conn, fence.key()).await.as_deref(), Some("nine"));
    assert_eq!(fence.newest(&mut conn).await.unwrap(), Some(9));
}

#[tokio::test]
async fn same_or_newer_token_writes_and_advances_the_fence() {
    let server = RedisServer::start();
    let mut conn = client(&server).await;
    let fence = RedisFence::new(unique_key("value"));
    assert_eq!(fence.newest(&mut conn).await.unwrap(), None);
    fence.set(&mut conn, 5, "a").await.unwrap();
    fence.set(&mut conn, 5, "b").await.unwrap();
    fence.set(&mut conn, 6, "c").await.unwrap();
    assert_eq!(get(&mut conn, fence.key()).await.as_deref(), Some("c"));
    assert_eq!(fence.newest(&mut conn).await.unwrap(), Some(6));
}

#[tokio::test]
async fn tokens_compare_exactly_above_two_to_the_53() {
    let server = RedisServer::start();
    let mut conn = client(&server).await;
    let fence = RedisFence::new(unique_key("value"));
    // As doubles these two are equal, and u64::MAX is no Redis integer.
    fence.set(&mut conn, u64::MAX, "max").await.unwrap();
    let refused = fence.set(&mut conn, u64::MAX - 1, "max-1").await;
    assert_eq!(
        refused.unwrap_err().stale(),
        Some(StaleToken::new(u64::MAX - 1, u64::MAX))
    );
    let fence = RedisFence::new(unique_key("value"));
    fence.set(&mut conn, (1 << 53) + 1, "a").await.unwrap();
    assert!(fence
        .set(&mut conn, 1 << 53, "b")
        .await
        .unwrap_err()
        .is_stale());
    // A shorter decimal is a smaller token, whatever its first digit.
    let fence = RedisFence::new(unique_key("value"));
    fence.set(&mut conn, 10, "ten").await.unwrap();
    assert!(fence
        .set(&mut conn, 9, "nine")
        .await
        .unwrap_err()
        .is_stale());
    assert_eq!(get(&mut conn, fence.key()).await.as_deref(), Some("ten"));
}

#[tokio::test]
async fn fenced_script_runs_the_callers_body_with_its_keys_and_args() {
    let server = RedisServer::start();
    let mut conn = client(&server).await;
    let key = unique_key("account");
    let fence = RedisFence::new(format!("{{{key}}}:balance"));
    let log = format!("{{{key}}}:log");
    let deposit = FencedScript::new(
        "local total = redis.call('INCRBY', KEYS[1], ARGV[1])\n\
         redis.call('RPUSH', KEYS[2], ARGV[2])\n\
         return total",
    );
    let total: i64 = fence
        .run(&mut conn, 3, &deposit, &[&log], &["10", "first"])
        .await
        .unwrap();
    assert_eq!(total, 10);
    let stale = fence
        .run::<_, _, _, i64>(&mut conn, 2, &deposit, &[&log], &["99", "stale"])
        .await;
    assert!(matches!(stale, Err(FenceError::Stale(_))));
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg(&log)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries, ["first"]);
    assert_eq!(get(&mut conn, fence.key()).await.as_deref(), Some("10"));
}

/// Issue 19's scenario: the first holder's lease runs out (no renewal, as if its process had
/// been paused), a second holder takes the key and writes, and then the first one wakes up
/// and writes with its old token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_whose_lease_ran_out_cannot_write_after_the_next_holder() {
    let server = RedisServer::start();
    let first_node = start(server.backend().await).await;
    let second_node = start(server.backend().await).await;
    let mut conn = client(&server).await;
    let key = unique_key("fenced");
    let resource = RedisFence::new(format!("resource:{key}"));
    let ttl = Duration::from_millis(300);

    let first = first_node
        .try_lock(
            &key,
            LockOptions::new().with_ttl(ttl).with_auto_renew(false),
        )
        .await
        .unwrap()
        .expect("the key is free");
    resource
        .set(&mut conn, first.fencing_token(), "first, in time")
        .await
        .unwrap();
    // The second holder waits for the first one's lease to expire (a bounded wait, not a sleep).
    let second = second_node
        .lock(
            &key,
            LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    assert!(second.fencing_token() > first.fencing_token());
    resource
        .set(&mut conn, second.fencing_token(), "second")
        .await
        .unwrap();

    let late = resource
        .set(&mut conn, first.fencing_token(), "first, too late")
        .await
        .unwrap_err();
    assert_eq!(
        late.stale(),
        Some(StaleToken::new(
            first.fencing_token(),
            second.fencing_token()
        ))
    );
    assert_eq!(
        get(&mut conn, resource.key()).await.as_deref(),
        Some("second")
    );
    drop(first);
    second.release().await.unwrap();
    first_node.shutdown().await;
    second_node.shutdown().await;
}

/// The child's lines on stdout that are meant for the parent start with this.
const REPORT: &str = "fenced-child: ";

/// Issue 19's scenario with a real pause: a holder process, renewing its lease as usual, is
/// frozen (SIGSTOP) past its ttl; another holder takes the key and writes; the frozen one is
/// thawed and, before it looks at its lock, writes with its old token: refused, nothing
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_process_paused_past_its_ttl_cannot_write_after_the_next_holder() {
    let server = RedisServer::start();
    let mut conn = client(&server).await;
    let key = unique_key("paused");
    let resource = format!("resource:{key}");
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_paused_holder", "--nocapture"])
        .env("FENCED_CHILD_REDIS", server.url())
        .env("FENCED_CHILD_KEY", &key)
        .env("FENCED_CHILD_RESOURCE", &resource)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // A failed test must not leave a stopped child behind.
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut report = async || loop {
        let line = timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the child reports within 30 s")
            .unwrap()
            .expect("the child reports before it exits");
        if let Some(report) = line.strip_prefix(REPORT) {
            return report.to_owned();
        }
    };
    let old_token: u64 = report()
        .await
        .strip_prefix("holding ")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        get(&mut conn, &resource).await.as_deref(),
        Some("child, in time")
    );

    let pid = child.id().unwrap();
    signal("-STOP", pid);
    wait_until_stopped(pid);
    let node = start(server.backend().await).await;
    // The child cannot renew now: the key frees when its ttl runs out (a bounded wait).
    let next = node
        .lock(
            &key,
            LockOptions::new().with_wait(Wait::UpTo(Duration::from_secs(15))),
        )
        .await
        .unwrap();
    assert!(next.fencing_token() > old_token);
    let fence = RedisFence::new(resource.clone());
    fence
        .set(&mut conn, next.fencing_token(), "next holder")
        .await
        .unwrap();

    signal("-CONT", pid);
    stdin.write_all(b"write\n").await.unwrap();
    assert_eq!(
        report().await,
        format!("refused {old_token} newest {}", next.fencing_token())
    );
    assert_eq!(
        get(&mut conn, &resource).await.as_deref(),
        Some("next holder")
    );
    drop(stdin);
    let status = timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the child failed: {status}");
    next.release().await.unwrap();
    node.shutdown().await;
}

/// The child side of the test above: takes the lock (1 s ttl, auto-renew on), writes, reports
/// its token, then on `write` writes again with that token and reports what the fence said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by holder_process_paused_past_its_ttl_cannot_write_after_the_next_holder"]
async fn child_paused_holder() {
    let env = |name: &str| std::env::var(name).expect("started by the parent test");
    let backend = leasehold::RedisBackend::connect(&env("FENCED_CHILD_REDIS"))
        .await
        .unwrap();
    let mut conn = redis::Client::open(env("FENCED_CHILD_REDIS"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let node = start(backend).await;
    let guard = node
        .try_lock(
            &env("FENCED_CHILD_KEY"),
            LockOptions::new().with_ttl(Duration::from_secs(1)),
        )
        .await
        .unwrap()
        .expect("the key is free");
    let token = guard.fencing_token();
    let fence = RedisFence::new(env("FENCED_CHILD_RESOURCE"));
    fence.set(&mut conn, token, "child, in time").await.unwrap();
    println!("{REPORT}holding {token}");

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    assert_eq!(stdin.next_line().await.unwrap().as_deref(), Some("write"));
    // A stale process does not look before it writes: the fence is what stops it.
    match fence.set(&mut conn, token, "child, too late").await {
        Err(FenceError::Stale(stale)) => {
            println!("{REPORT}refused {} newest {}", stale.token, stale.newest)
        }
        other => println!("{REPORT}not refused: {other:?}"),
    }
    drop(guard);
    node.shutdown().await;
}

fn signal(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Returns once the kernel shows `pid` stopped (bounded).
fn wait_until_stopped(pid: u32) {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state is the field after the command name, which is in parentheses.
        if stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            == Some('T')
        {
            return;
        }
        assert!(Instant::now() < give_up, "{pid} did not stop: {stat}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
