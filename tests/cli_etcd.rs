//! The `leasehold` command line against a real etcd, in both modes: the same `run` and
//! `status` as on Redis, with `etcd://` backend URLs.

use leasehold_test_support::etcd_server;

use std::process::Command;

use etcd_server::EtcdServer;
use leasehold::testing::unique_key;

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

fn run_and_status(url: &str) {
    let key = unique_key("cli-etcd");
    let out = Command::new(BIN)
        .args([
            "run",
            "--backend",
            url,
            "--metadata",
            "etcd run",
            &key,
            "--",
        ])
        .args(["sh", "-c", "echo $LEASEHOLD_FENCING_TOKEN"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{url}: {stderr}");
    let token: u64 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(token > 0);
    let out = Command::new(BIN)
        .args(["status", "--json", "--backend", url, &key])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["held"], false,
        "released after the command: {status}"
    );
}

#[test]
fn run_and_status_work_on_etcd_in_txn_mode() {
    let server = EtcdServer::start();
    run_and_status(&format!("etcd://{}", server.endpoint()));
}

#[test]
fn run_and_status_work_on_etcd_in_lock_mode() {
    let server = EtcdServer::start();
    run_and_status(&format!("etcd://{}?mode=lock", server.endpoint()));
}

/// Holds two keys under a prefix and one beside it through the library, then lists the
/// prefix with the binary.
async fn status_prefix_lists_held_keys(
    url: String,
    mode: leasehold::EtcdMode,
    server: &EtcdServer,
) {
    use leasehold::{LockManager, LockOptions};

    let client = LockManager::builder()
        .with_name(unique_key("cli-etcd-list"))
        .with_backend("etcd", server.backend(mode).await)
        .start()
        .await
        .unwrap();
    let prefix = unique_key("cli-etcd-list");
    let mut guards = Vec::new();
    for (key, metadata) in [
        (format!("{prefix}/a"), "node a"),
        (format!("{prefix}/b/c"), "node b"),
        (format!("{prefix}-beside"), "node c"),
    ] {
        let options = LockOptions::new()
            .with_ttl(std::time::Duration::from_secs(30))
            .with_metadata(metadata);
        guards.push((
            key.clone(),
            client.try_lock(&key, options).await.unwrap().unwrap(),
        ));
    }
    let under = format!("{prefix}/");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["status", "--json", "--backend", &url, "--prefix", &under])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = listed["held"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{listed}");
    for (row, (key, guard)) in rows.iter().zip(&guards) {
        assert_eq!(row["key"], key.as_str(), "{listed}");
        assert_eq!(row["fencing_token"], guard.fencing_token(), "{listed}");
        assert!(row["remaining_ttl_ms"].as_u64().unwrap() > 0, "{listed}");
    }
    assert_eq!(rows[1]["metadata"], "node b");
    for (_, guard) in guards {
        guard.release().await.unwrap();
    }
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prefix_lists_held_keys_on_etcd_in_txn_mode() {
    let server = EtcdServer::start();
    let url = format!("etcd://{}", server.endpoint());
    status_prefix_lists_held_keys(url, leasehold::EtcdMode::Txn, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prefix_lists_held_keys_on_etcd_in_lock_mode() {
    let server = EtcdServer::start();
    let url = format!("etcd://{}?mode=lock", server.endpoint());
    status_prefix_lists_held_keys(url, leasehold::EtcdMode::Lock, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_authenticates_with_the_user_and_password_in_the_url() {
    let server = EtcdServer::start();
    // As `etcdctl user add root; user grant-role root root; auth enable` would.
    let mut admin = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    admin.user_add("root", "r00t%pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    drop(admin);

    // `%` is written `%25` in a URL.
    let url = format!("etcd://root:r00t%25pw@{}", server.endpoint());
    tokio::task::spawn_blocking(move || run_and_status(&url))
        .await
        .unwrap();

    let url = format!("etcd://root:wrong@{}", server.endpoint());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["run", "--backend", &url, "k", "--", "true"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("wrong"),
        "the password is not shown: {stderr}"
    );
}

#[test]
fn run_takes_a_lock_over_tls_with_the_ca_in_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let certs = leasehold_test_support::tls::certificates(dir.path());
    let server = EtcdServer::start_with_tls(&certs.cert, &certs.key);
    let tls = server.tls_endpoint().unwrap();
    run_and_status(&format!("etcds://{tls}?ca={}", certs.ca.display()));
    run_and_status(&format!(
        "etcds://{tls}?mode=lock&ca={}",
        certs.ca.display()
    ));

    // Without the CA the server's certificate is not trusted, and the plain port does not
    // speak TLS: nothing is acquired.
    for url in [
        format!("etcds://{tls}"),
        format!("etcds://{}?ca={}", server.endpoint(), certs.ca.display()),
    ] {
        let out = Command::new(BIN)
            .args(["run", "--backend", &url, "k", "--", "touch"])
            .arg(dir.path().join("ran"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url}");
        assert!(!dir.path().join("ran").exists(), "{url}");
    }
}
