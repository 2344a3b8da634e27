#!/usr/bin/env bash
# Installs what the tests need (when missing) and runs every check and test of leasehold:
# formatting, clippy, docs, the test suites with ractor's cluster feature off and on, the
# examples, and a compile of the benchmarks. Tests start their own redis-server and etcd.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

step() { echo; echo "==> $*"; "$@"; }

step cargo fmt --check
step cargo clippy --all-targets --all-features -- -D warnings
RUSTDOCFLAGS="-D warnings" step cargo doc --no-deps --all-features
# The default build must need neither protoc nor ractor's cluster feature.
step cargo build --no-default-features
step cargo build
# Every test, with ractor's cluster feature off and then on (message types change shape).
step cargo test --features testing
step cargo test --all-features
step cargo run --example quickstart
step cargo bench --no-run --all-features
echo
echo "==> all checks passed"
