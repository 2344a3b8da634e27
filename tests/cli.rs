//! The `leasehold` command line, run as a user would: the built binary, as separate processes,
//! against a real redis-server.

use leasehold_test_support::redis_server;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use leasehold::testing::unique_key;
use leasehold::{LockManager, LockOptions};
use redis_server::RedisServer;

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

fn leasehold(server: &RedisServer) -> Command {
    let mut command = Command::new(BIN);
    command.env("LEASEHOLD_BACKEND", server.url());
    command
}

fn output(command: &mut Command) -> Output {
    command.output().expect("run leasehold")
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

/// Waits until `path` exists, or panics after `limit`.
fn wait_file(path: &Path, limit: Duration) {
    let give_up = Instant::now() + limit;
    while !path.exists() {
        assert!(
            Instant::now() < give_up,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn concurrent_runs_never_overlap_and_tokens_increase_in_start_order() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("intervals");
    let key = unique_key("cli-mutex");
    // Each run appends one line: start time, end time, fencing token.
    let script = format!(
        "s=$(date +%s%N); sleep 0.05; e=$(date +%s%N); echo \"$s $e $LEASEHOLD_FENCING_TOKEN\" >> {}",
        log.display()
    );
    let mut runs: Vec<Child> = (0..8)
        .map(|_| {
            leasehold(&server)
                .args(["run", "--wait", "60s", &key, "--", "sh", "-c", &script])
                .spawn()
                .unwrap()
        })
        .collect();
    for run in &mut runs {
        assert!(wait_exit(run, Duration::from_secs(60)).success());
    }
    let mut intervals: Vec<(u128, u128, u64)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(intervals.len(), 8, "{intervals:?}");
    intervals.sort();
    for pair in intervals.windows(2) {
        let ((_, end, token), (start, _, next_token)) = (pair[0], pair[1]);
        assert!(start >= end, "overlapping holds: {pair:?}");
        assert!(next_token > token, "tokens out of order: {pair:?}");
    }
}

#[test]
fn run_passes_the_key_and_token_and_exits_with_the_command_code() {
    let server = RedisServer::start();
    let key = unique_key("cli-env");
    let out = output(leasehold(&server).args([
        "run",
        &key,
        "--",
        "sh",
        "-c",
        "echo \"$LEASEHOLD_KEY $LEASEHOLD_FENCING_TOKEN\"; exit 3",
    ]));
    assert_eq!(out.status.code(), Some(3));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (printed_key, token) = stdout.trim().split_once(' ').unwrap();
    assert_eq!(printed_key, key);
    assert!(token.parse::<u64>().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_wait_on_a_held_key_exits_75() {
    let server = RedisServer::start();
    let client = LockManager::builder()
        .with_name(unique_key("cli-holder"))
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .unwrap();
    let key = unique_key("cli-held");
    let guard = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let mut command = leasehold(&server);
    command.args(["run", "--no-wait", &key, "--", "true"]);
    let out = tokio::task::spawn_blocking(move || output(&mut command))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&key) && stderr.lines().count() == 1,
        "{stderr}"
    );
    let mut command = leasehold(&server);
    command.args([
        "run",
        "--no-wait",
        "--conflict-exit-code",
        "9",
        &key,
        "--",
        "true",
    ]);
    let out = tokio::task::spawn_blocking(move || output(&mut command))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(9));
    guard.release().await.unwrap();
    client.shutdown().await;
}

#[test]
fn a_paused_store_stops_the_command_before_the_lease_deadline_and_exits_76() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (started, termed) = (dir.path().join("started"), dir.path().join("termed"));
    let key = unique_key("cli-lost");
    let ttl = Duration::from_secs(2);
    let script = format!(
        "trap 'date +%s%N > {termed}; exit 0' TERM; touch {started}; while true; do sleep 0.02; done",
        termed = termed.display(),
        started = started.display()
    );
    let mut run = leasehold(&server)
        .args([
            "run",
            "--ttl",
            "2s",
            "--kill-grace",
            "5s",
            &key,
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_file(&started, Duration::from_secs(10));
    server.pause();
    // Every renewal so far was sent before the pause, so the store's lease ends by then.
    let store_deadline = now_nanos() + ttl.as_nanos();
    let status = wait_exit(&mut run, ttl * 5);
    server.resume();
    assert_eq!(status.code(), Some(76));
    let termed_at: u128 = std::fs::read_to_string(&termed)
        .expect("the command got SIGTERM")
        .trim()
        .parse()
        .unwrap();
    assert!(
        termed_at < store_deadline,
        "SIGTERM came after the lease deadline"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("lost"), "{stderr}");
}

#[test]
fn sigterm_to_leasehold_reaches_the_command_and_frees_the_key() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (started, termed) = (dir.path().join("started"), dir.path().join("termed"));
    let key = unique_key("cli-sigterm");
    let script = format!(
        "trap 'touch {termed}; exit 0' TERM; touch {started}; while true; do sleep 0.02; done",
        termed = termed.display(),
        started = started.display()
    );
    let mut run = leasehold(&server)
        .args(["run", &key, "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_file(&started, Duration::from_secs(10));
    send_signal(run.id(), "-TERM");
    let status = wait_exit(&mut run, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(termed.exists(), "the command did not get SIGTERM");
    let out = output(leasehold(&server).args(["status", "--json", &key]));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["held"], false, "{status}");
}

/// SIGTERM to a `leasehold run` that waits for the lock gives up the wait: it exits as a
/// shell reports a SIGTERM (143), the command never runs, and the key stays its holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_gives_up_without_running_the_command() {
    let server = RedisServer::start();
    let holder = LockManager::builder()
        .with_name(unique_key("cli-holder"))
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .unwrap();
    let key = unique_key("cli-wait-term");
    let held = holder
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .expect("a fresh key is free");
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let mut run = leasehold(&server)
        .args(["run", &key, "--", "touch"])
        .arg(&ran)
        .spawn()
        .unwrap();
    // Waiting: subscribed to the key's release notices.
    let channel = format!("{}:released", server.backend().await.lock_key(&key));
    leasehold::testing::eventually("the run waits", Duration::from_secs(10), || {
        let reply =
            leasehold_test_support::resp::command(server.port(), &["PUBSUB", "NUMSUB", &channel]);
        let count = reply.map(|r| r.items().get(1).cloned());
        async move { matches!(count, Ok(Some(leasehold_test_support::resp::Resp::Int(1)))) }
    })
    .await;
    send_signal(run.id(), "-TERM");
    let status = wait_exit(&mut run, Duration::from_secs(10));
    assert_eq!(status.code(), Some(143), "{status:?}");
    assert!(
        !ran.exists(),
        "the command ran although the lock was never taken"
    );
    assert!(held.is_held(), "the holder keeps the key");
    held.release().await.unwrap();
    holder.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_the_holder_token_ttl_and_metadata() {
    let server = RedisServer::start();
    let client = LockManager::builder()
        .with_name(unique_key("cli-status"))
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .unwrap();
    let key = unique_key("cli-status");
    let guard = client
        .try_lock(&key, LockOptions::new().with_metadata("backup on host-3"))
        .await
        .unwrap()
        .unwrap();
    let mut command = leasehold(&server);
    command.args(["status", "--json", &key]);
    let out = tokio::task::spawn_blocking(move || output(&mut command))
        .await
        .unwrap();
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["held"], true);
    assert_eq!(status["key"], key.as_str());
    assert_eq!(status["fencing_token"], guard.fencing_token());
    assert_eq!(status["metadata"], "backup on host-3");
    let ttl_ms = status["remaining_ttl_ms"].as_u64().unwrap();
    assert!(ttl_ms > 0 && ttl_ms <= 30_000, "{status}");
    guard.release().await.unwrap();
    client.shutdown().await;
}

#[test]
fn usage_errors_exit_64_and_name_the_bad_argument() {
    let server = RedisServer::start();
    let cases: [(&[&str], &str); 5] = [
        (
            &["run", "--backend", "redis://h:notaport", "k", "--", "true"],
            "redis://h:notaport",
        ),
        (
            &["run", "--backend", "etcd://nohostport", "k", "--", "true"],
            "nohostport",
        ),
        (&["run", "--ttl", "5", "k", "--", "true"], "\"5\""),
        (&["run", "--wait", "2 weeks", "k", "--", "true"], "2 weeks"),
        (&["run", "k", "true"], "<CMD>"),
    ];
    for (args, named) in cases {
        let out = output(leasehold(&server).args(args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(named),
            "{args:?} should name {named}: {stderr}"
        );
    }
    let out = output(leasehold(&server).args(["run", "", "--", "true"]));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}

#[test]
fn an_unreachable_store_exits_69() {
    let server = RedisServer::start();
    let url = format!("redis://127.0.0.1:{}", server.port());
    drop(server);
    let out = output(Command::new(BIN).args(["run", "--backend", &url, "k", "--", "true"]));
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_an_acquisition_and_a_release() {
    use std::io::{BufRead, BufReader};

    let server = RedisServer::start();
    let prefix = unique_key("cli-watch");
    let mut watch = leasehold(&server)
        .args(["watch", "--json", &prefix])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stderr.read_line(&mut line).map(|_| line)
    });
    let ready = tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .expect("watch ready within 10 s")
        .unwrap()
        .unwrap();
    assert!(ready.contains("watching"), "{ready}");

    let client = LockManager::builder()
        .with_name(unique_key("cli-watch"))
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .unwrap();
    let key = format!("{prefix}/nightly");
    let guard = client
        .try_lock(&key, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    client.shutdown().await;

    let mut stdout = BufReader::new(watch.stdout.take().unwrap());
    let lines = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for _ in 0..2 {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            lines.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
        }
        lines
    });
    let lines = tokio::time::timeout(Duration::from_secs(10), lines)
        .await
        .expect("two events within 10 s")
        .unwrap();
    assert_eq!(lines[0]["event"], "acquired");
    assert_eq!(lines[0]["key"], key.as_str());
    assert_eq!(lines[0]["fencing_token"], token);
    assert_eq!(lines[1]["event"], "released");
    assert_eq!(lines[1]["key"], key.as_str());
    send_signal(watch.id(), "-INT");
    let status = wait_exit(&mut watch, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prefix_lists_every_held_key_under_the_prefix() {
    let server = RedisServer::start();
    let client = LockManager::builder()
        .with_name(unique_key("cli-list"))
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .unwrap();
    let prefix = unique_key("cli-list");
    let ttl = Duration::from_secs(60);
    let mut held = Vec::new();
    for (key, metadata) in [
        (format!("{prefix}/a"), "host-a pid 1"),
        (format!("{prefix}/b"), "host-b pid 2"),
        // Shares the beginning of the prefix's name but is not under `prefix/`.
        (format!("{prefix}-other"), "elsewhere"),
    ] {
        let options = LockOptions::new().with_ttl(ttl).with_metadata(metadata);
        let guard = client.try_lock(&key, options).await.unwrap().unwrap();
        held.push((key, metadata, guard));
    }
    // A released key is not listed, although its fence counter stays in Redis.
    let released = format!("{prefix}/released");
    client
        .try_lock(&released, LockOptions::new())
        .await
        .unwrap()
        .unwrap()
        .release()
        .await
        .unwrap();

    let under = format!("{prefix}/");
    let mut command = leasehold(&server);
    command.args(["status", "--json", "--prefix", &under]);
    let out = tokio::task::spawn_blocking(move || output(&mut command))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["prefix"], under.as_str());
    let rows = listed["held"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{listed}");
    for (row, (key, metadata, guard)) in rows.iter().zip(&held) {
        assert_eq!(row["key"], key.as_str());
        assert_eq!(row["metadata"], *metadata);
        assert_eq!(row["fencing_token"], guard.fencing_token());
        let left = row["remaining_ttl_ms"].as_u64().unwrap();
        assert!(left > 0 && left <= 60_000, "{row}");
    }

    let mut command = leasehold(&server);
    command.args(["status", "--prefix", &under]);
    let out = tokio::task::spawn_blocking(move || output(&mut command))
        .await
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("KEY") && lines[0].contains("FENCING TOKEN"),
        "{table}"
    );
    assert!(
        lines[1].starts_with(&held[0].0) && lines[1].ends_with("host-a pid 1"),
        "{table}"
    );
    assert!(
        lines[2].contains(&held[1].2.fencing_token().to_string()),
        "{table}"
    );
    for (_, _, guard) in held {
        guard.release().await.unwrap();
    }
    client.shutdown().await;
}

#[test]
fn status_needs_a_key_or_a_prefix() {
    let server = RedisServer::start();
    let out = output(leasehold(&server).args(["status"]));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<KEY>"));
}

#[test]
fn completions_are_generated_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef leasehold"),
        ("fish", "complete -c leasehold"),
    ] {
        let out = output(Command::new(BIN).args(["completions", shell]));
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        for subcommand in ["run", "status", "doctor", "completions"] {
            assert!(script.contains(subcommand), "{shell}: no {subcommand}");
        }
    }
    let out = output(Command::new(BIN).args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcsh"));
}

#[test]
fn the_man_page_is_roff_and_names_the_subcommands() {
    let out = output(Command::new(BIN).arg("man"));
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH leasehold"),
        "{page}"
    );
    assert!(page.contains(".SH NAME"), "{page}");
    for subcommand in ["run", "status", "watch", "doctor"] {
        assert!(page.contains(subcommand), "no {subcommand} in {page}");
    }
}

/// The URLs the README offers, parsed and tried by the installed binary: every one gets as
/// far as connecting (69: nothing answers on port 1), none is refused as unsupported.
#[test]
fn tls_and_credential_urls_reach_the_network() {
    for url in [
        "rediss://127.0.0.1:1",
        "rediss://user:secret@127.0.0.1:1/2",
        "etcd://127.0.0.1:1",
        "etcd://root:secret@127.0.0.1:1?mode=lock",
        "etcds://root:secret@127.0.0.1:1",
    ] {
        let out = output(Command::new(BIN).args(["status", "--backend", url, "k"]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{url}: {stderr}");
        assert!(
            !stderr.contains("feature") && !stderr.contains("not enabled"),
            "{url}: {stderr}"
        );
        assert!(!stderr.contains("secret"), "{url}: {stderr}");
    }
    let out = output(Command::new(BIN).args([
        "status",
        "--backend",
        "etcds://127.0.0.1:1?ca=/no/such/ca.pem",
        "k",
    ]));
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/ca.pem"));
}

#[test]
fn run_takes_a_lock_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = leasehold_test_support::tls::certificates(dir.path());
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let server = RedisServer::start_with_args(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &certs.cert.display().to_string(),
        "--tls-key-file",
        &certs.key.display().to_string(),
        "--tls-ca-cert-file",
        &certs.ca.display().to_string(),
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let key = unique_key("cli-tls");
    // The private CA through SSL_CERT_FILE, which rustls-native-certs reads.
    let out = output(
        Command::new(BIN)
            .env("SSL_CERT_FILE", &certs.ca)
            .args(["run", "--backend", &url, &key, "--"])
            .args(["sh", "-c", "echo $LEASEHOLD_FENCING_TOKEN"]),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", server.log());
    let token: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(token > 0);
    // The fence counter it advanced is this server's, read over the plain port.
    let mut plain = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let counter: u64 = redis::cmd("GET")
        .arg(format!("leasehold:{{{key}}}:fence"))
        .query(&mut plain)
        .unwrap();
    assert_eq!(counter, token);
    // Trusting another CA, the server's certificate is refused: nothing is acquired.
    let other = tempfile::tempdir().unwrap();
    let other = leasehold_test_support::tls::certificates(other.path());
    let ran = dir.path().join("ran");
    let out = output(
        Command::new(BIN)
            .env("SSL_CERT_FILE", &other.ca)
            .args(["run", "--backend", &url, &key, "--", "touch"])
            .arg(&ran),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&tls_port), "{stderr}");
    assert!(!ran.exists());
}

/// `watch` whose reader went away (`leasehold watch | head -1`) ends quietly on the broken
/// pipe, as Unix tools do: killed by SIGPIPE, without a panic on stderr.
#[test]
fn watch_ends_quietly_when_its_reader_goes_away() {
    use std::os::unix::process::ExitStatusExt;

    let server = RedisServer::start();
    let prefix = unique_key("cli-pipe");
    let mut watch = leasehold(&server)
        .args(["watch", &prefix])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before anything was printed.
    drop(watch.stdout.take());
    // Locks under the prefix until the watch has one to print (its subscription starts a
    // moment after the process does), bounded.
    let give_up = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = output(leasehold(&server).args(["run", &format!("{prefix}/k"), "--", "true"]));
        assert!(out.status.success(), "{out:?}");
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < give_up,
            "watch kept running with no reader"
        );
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn runs_with_permits_never_exceed_n_at_once_and_see_their_permits() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("intervals");
    let key = unique_key("cli-semaphore");
    // Each run appends one line: start time, end time, fencing token, permits.
    let script = format!(
        "s=$(date +%s%N); sleep 0.1; e=$(date +%s%N); echo \"$s $e $LEASEHOLD_FENCING_TOKEN $LEASEHOLD_PERMITS\" >> {}",
        log.display()
    );
    let mut runs: Vec<Child> = (0..6)
        .map(|_| {
            leasehold(&server)
                .args(["run", "--permits", "2", "--wait", "60s", &key])
                .args(["--", "sh", "-c", &script])
                .spawn()
                .unwrap()
        })
        .collect();
    for run in &mut runs {
        assert!(wait_exit(run, Duration::from_secs(60)).success());
    }
    let lines: Vec<Vec<String>> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    // +1 at each start, -1 at each end (ends first at equal times): never above 2.
    let mut edges: Vec<(u128, i32)> = Vec::new();
    for line in &lines {
        assert_eq!(line[3], "2", "LEASEHOLD_PERMITS: {line:?}");
        assert!(line[2].parse::<u64>().unwrap() > 0);
        edges.push((line[0].parse().unwrap(), 1));
        edges.push((line[1].parse().unwrap(), -1));
    }
    edges.sort();
    let mut running = 0;
    for (_, step) in edges {
        running += step;
        assert!(running <= 2, "{running} commands at once with 2 permits");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_a_semaphores_holders() {
    let server = RedisServer::start();
    let client = LockManager::builder()
        .with_name(unique_key("cli-semaphore-status"))
        .with_backend("redis", server.backend().await)
        .start()
        .await
        .unwrap();
    let key = unique_key("cli-semaphore-status");
    let semaphore = client.semaphore(&key, 3).unwrap();
    let one = semaphore
        .try_acquire(LockOptions::new().with_metadata("worker a"))
        .await
        .unwrap()
        .unwrap();
    let two = semaphore
        .try_acquire_many(2, LockOptions::new())
        .await
        .unwrap()
        .unwrap();
    let mut command = leasehold(&server);
    command.args(["status", "--json", &key]);
    let out = tokio::task::spawn_blocking(move || output(&mut command))
        .await
        .unwrap();
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["held"], false, "the lock of that name is free");
    let listed = &status["semaphore"];
    assert_eq!(listed["permits"], 3, "{status}");
    assert_eq!(listed["held"], 3, "{status}");
    let holders = listed["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 2, "{status}");
    assert_eq!(holders[0]["fencing_token"], one.fencing_token());
    assert_eq!(holders[0]["metadata"], "worker a");
    assert_eq!(holders[1]["permits"], 2);
    let mut command = leasehold(&server);
    command.args(["status", &key]);
    let out = tokio::task::spawn_blocking(move || output(&mut command))
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("3 of 3 permits held"), "{text}");
    assert!(text.contains("worker a"), "{text}");
    drop((one, two));
    client.shutdown().await;
}

#[test]
fn zero_permits_exit_64_naming_the_value() {
    let server = RedisServer::start();
    let key = unique_key("cli-semaphore-bad");
    let out = output(leasehold(&server).args(["run", "--permits", "0", &key, "--", "true"]));
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("permits 0"), "{stderr}");
}

/// The command line on a Redis Cluster: `run` takes the lock through a `redis+cluster://`
/// URL, the command sees its token, and `status` reads it back from its slot's shard.
#[test]
fn run_and_status_on_a_redis_cluster() {
    let cluster = leasehold_test_support::RedisCluster::shared();
    let key = unique_key("cli-cluster");
    let dir = tempfile::tempdir().unwrap();
    let (started, stop) = (dir.path().join("started"), dir.path().join("stop"));
    let script = format!(
        "echo $LEASEHOLD_FENCING_TOKEN > {started}; while [ ! -e {stop} ]; do sleep 0.02; done",
        started = started.display(),
        stop = stop.display()
    );
    let mut run = Command::new(BIN)
        .env("LEASEHOLD_BACKEND", cluster.url())
        .args(["run", &key, "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    wait_file(&started, Duration::from_secs(10));
    // The token is written with the file: read it once it is whole.
    let token = loop {
        let text = std::fs::read_to_string(&started).unwrap();
        if text.ends_with('\n') {
            break text.trim().to_owned();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let status = |key: &str| -> serde_json::Value {
        let out = output(
            Command::new(BIN)
                .env("LEASEHOLD_BACKEND", cluster.url())
                .args(["status", "--json", key]),
        );
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let held = status(&key);
    assert_eq!(held["held"], true, "{held}");
    assert_eq!(held["fencing_token"].to_string(), token, "{held}");
    std::fs::write(&stop, "").unwrap();
    let exit = wait_exit(&mut run, Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0));
    assert_eq!(status(&key)["held"], false);
}

/// `rediss+cluster://`: a Redis Cluster whose nodes speak TLS to clients and to each other.
/// `run` takes the lock over TLS (the command sees the token the key's shard counted); a second
/// `run` waits, subscribed to the key's release notices on its shard (sharded pub/sub, over
/// TLS too), and takes the lock once the holder lets go; trusting another CA, nothing is
/// acquired.
#[test]
fn run_waits_and_takes_the_lock_on_a_tls_cluster() {
    use leasehold_test_support::{resp, RedisCluster};

    let dir = tempfile::tempdir().unwrap();
    let certs = leasehold_test_support::tls::certificates(dir.path());
    let cluster = RedisCluster::start_tls(&certs);
    let url = cluster.url();
    assert!(url.starts_with("rediss+cluster://"), "{url}");
    let key = unique_key("cli-tls-cluster");
    // The private CA through SSL_CERT_FILE, which rustls-native-certs reads.
    let run = |args: &[&str]| {
        let mut command = Command::new(BIN);
        command
            .env("SSL_CERT_FILE", &certs.ca)
            .env("LEASEHOLD_BACKEND", &url)
            .arg("run")
            .args(args);
        command
    };
    let token_in = |path: &Path| -> u64 {
        wait_file(path, Duration::from_secs(20));
        loop {
            let text = std::fs::read_to_string(path).unwrap();
            if text.ends_with('\n') {
                break text.trim().parse().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (held, stop, second) = (
        dir.path().join("held"),
        dir.path().join("stop"),
        dir.path().join("second"),
    );
    let mut holder = run(&["--ttl", "60s", &key, "--", "sh", "-c"])
        .arg(format!(
            "echo $LEASEHOLD_FENCING_TOKEN > {held}; while [ ! -e {stop} ]; do sleep 0.02; done",
            held = held.display(),
            stop = stop.display()
        ))
        .spawn()
        .unwrap();
    let first = token_in(&held);
    let shard = cluster.primary_of(&key);
    let counter = resp::command(shard, &["GET", &format!("leasehold:{{{key}}}:fence")]);
    let counter = counter.ok().and_then(|c| c.text().map(str::to_owned));
    assert_eq!(
        counter,
        Some(first.to_string()),
        "{}",
        cluster.logs_of_everything()
    );

    let mut waiter = run(&["--wait", "50s", &key, "--", "sh", "-c"])
        .arg(format!(
            "echo $LEASEHOLD_FENCING_TOKEN > {second}",
            second = second.display()
        ))
        .spawn()
        .unwrap();
    // The waiter listens for the release on the key's shard before the holder lets go.
    let channel = format!("leasehold:{{{key}}}:released");
    let give_up = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = resp::command(shard, &["PUBSUB", "SHARDNUMSUB", &channel]);
        let count = reply
            .ok()
            .and_then(|r| r.items().get(1).and_then(resp::Resp::int));
        if count == Some(1) {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "the waiter did not subscribe to {channel} on {shard}: {count:?}\n{}",
            cluster.logs_of_everything()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(&stop, "").unwrap();
    assert_eq!(
        wait_exit(&mut holder, Duration::from_secs(20)).code(),
        Some(0)
    );
    assert_eq!(
        wait_exit(&mut waiter, Duration::from_secs(20)).code(),
        Some(0)
    );
    assert!(token_in(&second) > first);

    // Trusting another CA, the nodes' certificates are refused: nothing is acquired.
    let other = tempfile::tempdir().unwrap();
    let other = leasehold_test_support::tls::certificates(other.path());
    let ran = dir.path().join("ran");
    let out = output(
        run(&["--no-wait", &key, "--", "touch"])
            .env("SSL_CERT_FILE", &other.ca)
            .arg(&ran),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(!ran.exists());
}
