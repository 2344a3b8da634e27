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
